"""Layer-streamed torch reference: fp32 logits of a whole Qwen2 with about one decoder layer in memory.

    embedding rows of the ids ─► for each layer: its tensors from the shards (safe_open, one by one)
      ─► our Qwen2DecoderLayer [int8 folder: int8 linears; quantize_bits: quantize in memory]
      ─► every batch through it ─► freed
    ─► final norm ─► lm_head in blocks of rows (the embedding's rows when tied)

The layer math is the packaged source_code's own modules, so an int8 folder written by `quantize`, or
`quantize_bits=8` on the original folder, computes what `Qwen2ForCausalLM.quantize(8)` computes. Works on
plain, patched and quantized folders. Memory: one layer in fp32, one lm_head block, the activations.
"""
from pathlib import Path

from .errors import ModelFormatError
from .progress import bar
from .spec import ModelSpec, checkpoint_files, read_safetensors_header

LM_HEAD_BLOCK_ROWS = 16384  # 235 MB of fp32 rows at hidden 3584


class Shards:
    """Tensors by name over a checkpoint's safetensors files; each read maps its file only while reading."""

    def __init__(self, folder):
        self.where = {}
        for path in checkpoint_files(folder):
            for name, info in read_safetensors_header(path).items():
                if name != "__metadata__":
                    self.where[name] = path

    def __contains__(self, name):
        return name in self.where

    def _open(self, name):
        from safetensors import safe_open

        if name not in self.where:
            raise ModelFormatError(f"tensor {name} is missing from the checkpoint (incomplete or not a Qwen2 "
                                   "checkpoint; re-download it)")
        return safe_open(str(self.where[name]), framework="pt")

    def get(self, name):
        with self._open(name) as fh:
            return fh.get_tensor(name)

    def rows(self, name, start, stop):
        with self._open(name) as fh:
            return fh.get_slice(name)[start:stop]

    def gather(self, name, ids):
        """Rows `ids` (a sorted list) of a 2-D tensor, read one by one: (len(ids), cols)."""
        import torch

        with self._open(name) as fh:
            sl = fh.get_slice(name)
            return torch.cat([sl[i:i + 1] for i in ids], dim=0)


def _config(folder):
    from .modeling import _quiet_loading
    from ..source_code.configuration_qwen2_vacc import Qwen2Config

    ModelSpec.from_folder(folder)  # clear errors first
    _quiet_loading()
    return Qwen2Config.from_pretrained(str(folder))


def _targets(layer):
    from ..source_code.modeling_qwen2_vacc import ATTN_PROJECTIONS, PROJECTIONS

    return [(layer.self_attn if name in ATTN_PROJECTIONS else layer.mlp, name) for name in PROJECTIONS]


def _to_fp32(t):
    import torch

    return t if t.dtype in (torch.int8, torch.float32) else t.to(torch.float32)


def load_layer(shards, config, index, int8_bits=None, quantize_bits=None):
    """Decoder layer `index` in fp32 (int8 linears for a quantized folder, or quantized here when asked)."""
    import torch

    from ..source_code.modeling_qwen2_vacc import Qwen2DecoderLayer
    from ..source_code.quantization_vacc import quantize_linear_modules

    with torch.device("meta"):
        layer = Qwen2DecoderLayer(config)
        if int8_bits:
            quantize_linear_modules(_targets(layer), int8_bits, empty=True)
    prefix = f"model.layers.{index}."
    state = {key: _to_fp32(shards.get(prefix + key)) for key in layer.state_dict()}
    layer.load_state_dict(state, strict=True, assign=True)
    if quantize_bits:
        quantize_linear_modules(_targets(layer), quantize_bits)
    return layer.eval()


def _lm_head_block(shards, name, start, stop, int8_lm_head, quantize_bits):
    """fp32 (rows, hidden) weight block of lm_head, dequantized as QuantizedLinearPerChannel does."""
    from ..source_code.quantization_vacc import dequantize_per_channel, quantize_per_channel

    w = _to_fp32(shards.rows(name, start, stop))
    if int8_lm_head:
        return dequantize_per_channel(w, shards.rows("lm_head.weight_scale", start, stop))
    if quantize_bits:
        return dequantize_per_channel(*quantize_per_channel(w, quantize_bits))
    return w


def streamed_logits(folder, batches, quantize_bits=None, include_lm_head=False, last=None, desc="reference"):
    """fp32 logits (B, S, V) of every position for each batch (input_ids, attention_mask, position_ids).

    Each layer is read once and run on every batch. `quantize_bits` quantizes the original folder's linears
    in memory (as `.quantize(bits, include_lm_head)`); an int8 folder written by `quantize` is read as it is.
    `last` keeps only the last positions before lm_head, (B, last, V): a long prompt's logits are big.
    `desc` names the progress bar (layers done / total).
    """
    import torch
    import torch.nn.functional as F

    from ..source_code.configuration_qwen2_vacc import rope_theta
    from ..source_code.modeling_qwen2_vacc import Qwen2RMSNorm, attention_mask_4d, rotary_cos_sin

    folder = Path(folder)
    config = _config(folder)
    quant = config.vacc_quantization or {}
    if quant and quantize_bits:
        raise ModelFormatError(f"{folder}: already quantized; compare against the original checkpoint")
    shards = Shards(folder)
    batches = [tuple(torch.as_tensor(t, dtype=torch.long) for t in b) for b in batches]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    with torch.no_grad():
        ids = torch.unique(torch.cat([b[0].flatten() for b in batches]))  # sorted
        rows = _to_fp32(shards.gather("model.embed_tokens.weight", ids.tolist()))  # (U, hidden)
        hidden = [rows[torch.searchsorted(ids, b[0])] for b in batches]  # (B, S, hidden)
        del rows
        extras = [(*rotary_cos_sin(pos, head_dim, rope_theta(config), torch.float32),
                   attention_mask_4d(mask, ids_.shape[1])) for ids_, mask, pos in batches]
        for index in bar(range(config.num_hidden_layers), total=config.num_hidden_layers, desc=desc, unit="layer"):
            layer = load_layer(shards, config, index, quant.get("bits"), quantize_bits)
            hidden = [layer(x, attention_mask=mask, position_embeddings=(cos, sin))[0]
                      for x, (cos, sin, mask) in zip(hidden, extras)]
            del layer  # freed by reference counting (no gc.collect: it costs ~0.7 s in a big process)
        norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        norm.weight.data = _to_fp32(shards.get("model.norm.weight"))
        hidden = [norm(x if last is None else x[:, -last:]) for x in hidden]
        tied = config.tie_word_embeddings or "lm_head.weight" not in shards
        name = "model.embed_tokens.weight" if tied else "lm_head.weight"
        int8_lm_head = not tied and "lm_head.weight_scale" in shards
        q_bits = quantize_bits if include_lm_head else None
        logits = [torch.empty(*x.shape[:-1], config.vocab_size) for x in hidden]  # (B, S, V)
        for start in range(0, config.vocab_size, LM_HEAD_BLOCK_ROWS):
            stop = min(start + LM_HEAD_BLOCK_ROWS, config.vocab_size)
            w = _lm_head_block(shards, name, start, stop, int8_lm_head, q_bits)  # (rows, hidden)
            for out, x in zip(logits, hidden):
                out[..., start:stop] = F.linear(x, w)
    return logits


def fp32_model_bytes(folder):
    """Bytes of the whole model's weights in fp32 (what a whole-model reference holds)."""
    return ModelSpec.from_folder(folder).num_parameters * 4
