"""Qwen2 configuration for the VACC flow (loaded with trust_remote_code).

Defined on `PretrainedConfig` itself (not on transformers' Qwen2Config, whose keys moved between 4.37 and
5.x), with the keys of a stock Qwen2 `config.json` and the vendor's two extras, read once when the model is
built: `iter_num` (0: prefill graph "iter0", 1: decode graph "iter1") and `insert_slice` (the prefill keeps
only the last position before lm_head). `rope_theta` is a top-level key; a config saved by transformers 5.x
keeps it inside `rope_parameters`, and it is read from there when the top-level key is missing.
"""
from transformers import PretrainedConfig

QUANT_METHOD = "vacc_w8a16"  # same value as quantization_vacc.QUANT_METHOD
SUPPORTED_ROPE_TYPES = ("default", None)


class Qwen2Config(PretrainedConfig):
    model_type = "qwen2"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=None, hidden_act="silu",
                 max_position_embeddings=32768, initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True,
                 tie_word_embeddings=False, rope_theta=None, rope_scaling=None, use_sliding_window=False,
                 sliding_window=4096, max_window_layers=28, attention_dropout=0.0, iter_num=0,
                 insert_slice=False, vacc_quantization=None, **kwargs):
        rope_parameters = kwargs.pop("rope_parameters", None)  # transformers 5.x spelling
        if isinstance(rope_parameters, dict):
            if rope_theta is None:
                rope_theta = rope_parameters.get("rope_theta")
            if rope_scaling is None and rope_parameters.get("rope_type", "default") != "default":
                rope_scaling = rope_parameters
        kwargs.pop("attn_implementation", None)  # the Skywork-OR1 page spells it so; eager either way
        # A folder written by `skywork-deploy quantize` records what was done in `quantization_config`; keep
        # it under our own key so that transformers' quantizer registry (which does not know it) stays out.
        quant = kwargs.pop("quantization_config", None)
        if isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD:
            vacc_quantization = quant
        elif quant is not None:
            kwargs["quantization_config"] = quant
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.hidden_act, self.max_position_embeddings = hidden_act, max_position_embeddings
        self.initializer_range, self.rms_norm_eps, self.use_cache = initializer_range, rms_norm_eps, use_cache
        self.rope_theta = float(rope_theta if rope_theta is not None else 10000.0)
        if rope_scaling is not None:  # (5.x turns this attribute into rope_parameters, with a warning)
            self.rope_scaling = rope_scaling
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window if use_sliding_window else None
        self.max_window_layers, self.attention_dropout = max_window_layers, attention_dropout
        self.iter_num, self.insert_slice = int(iter_num), bool(insert_slice)
        self.vacc_quantization = vacc_quantization
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def rope_theta(config):
    """The RoPE base of any Qwen2 config object (ours: top level; transformers 5.x's: rope_parameters)."""
    theta = getattr(config, "rope_theta", None)
    params = getattr(config, "rope_parameters", None)
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
    return float(theta if theta is not None else 10000.0)


def unsupported_reason(config):
    """Why this Qwen2 config cannot run on the VACC model (naming the key to change), or None when it can."""
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
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"config.json sets hidden_act: {config.hidden_act!r}; Qwen2 uses 'silu'"
    if config.hidden_size % config.num_attention_heads:
        return "config.json: hidden_size must be a multiple of num_attention_heads"
    if config.num_attention_heads % (config.num_key_value_heads or config.num_attention_heads):
        return "config.json: num_attention_heads must be a multiple of num_key_value_heads"
    if getattr(config, "iter_num", 0) not in (0, 1):
        return f"config_vacc.json sets iter_num: {config.iter_num!r}; use 0 (prefill) or 1 (decode)"
    return None
