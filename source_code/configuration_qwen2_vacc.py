"""Qwen2 configuration for the VACC export flow (loaded with trust_remote_code).

A thin subclass of transformers' own Qwen2Config, so that every key of a stock
Qwen2 `config.json` keeps its meaning under transformers 4.45.2 and 5.x. It adds
the vendor's keys: `insert_slice` (keep only the last position before lm_head
in the prefill graph) and accepts `attn_implementation` spelled either way.
"""
from transformers import Qwen2Config as _StockQwen2Config

QUANT_METHOD = "vacc_w8a16"  # same value as quantization_vacc.QUANT_METHOD

SUPPORTED_ROPE_TYPES = ("default", None)


class Qwen2Config(_StockQwen2Config):
    model_type = "qwen2"

    def __init__(self, insert_slice=False, vacc_quantization=None, **kwargs):
        # The Skywork-OR1 page spells it `attn_implementation`; both mean eager here.
        kwargs.pop("attn_implementation", None)
        # A folder written by `skywork-deploy quantize` says what was done in `quantization_config`; keep it
        # under our own key so that transformers' quantizer registry (which does not know it) stays out.
        quant = kwargs.pop("quantization_config", None)
        if isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD:
            vacc_quantization = quant
        elif quant is not None:
            kwargs["quantization_config"] = quant
        self.insert_slice = bool(insert_slice)
        self.vacc_quantization = vacc_quantization
        super().__init__(**kwargs)


def rope_theta(config):
    """The RoPE base wherever this transformers version keeps it (4.x: top level, 5.x: rope_parameters)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    theta = getattr(config, "rope_theta", None)
    return float(theta if theta is not None else 10000.0)


def unsupported_reason(config):
    """Why this Qwen2 config cannot run on the VACC model, or None when it can."""
    if getattr(config, "use_sliding_window", False):
        return ("config.json sets use_sliding_window: true; the VACC Qwen2 supports full attention only "
                "(set use_sliding_window to false)")
    for key in ("rope_scaling", "rope_parameters"):
        params = getattr(config, key, None)
        if isinstance(params, dict):
            rope_type = params.get("rope_type", params.get("type"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                return (f"config.json sets {key}.rope_type: {rope_type!r}; only default RoPE is supported "
                        f"(remove {key} or set rope_type to 'default')")
    if config.hidden_size % config.num_attention_heads:
        return "config.json: hidden_size must be a multiple of num_attention_heads"
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if config.num_attention_heads % kv_heads:
        return "config.json: num_attention_heads must be a multiple of num_key_value_heads"
    return None
