"""What a Qwen2 model folder is: its config values, shards and tokenizer files, read without torch.

`ModelSpec.from_folder(path)` validates `config.json` and returns the numbers every stage needs
(layers, heads, vocab, rope_theta, tied embeddings...). `checkpoint_files(path)` lists the safetensors
shards (single file or index plus every shard it names) and checks each exists.
"""
import math
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ModelFormatError
from .strict import loads_json, read_json_file

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
TOKENIZER_SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "generation_config.json", "chat_template.jinja",
)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    rope_theta: float
    tie_word_embeddings: bool
    torch_dtype: str

    @property
    def num_parameters(self):
        """Parameter count from the config alone (embeddings counted once when tied)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * self.num_heads * d + 2 * h * self.num_kv_heads * d + self.num_heads * d * h
        attn_bias = self.num_heads * d + 2 * self.num_kv_heads * d
        layer = attn + attn_bias + 3 * h * i + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + h

    @property
    def kv_bytes_per_token(self):
        """fp16 KV cache bytes per token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_config(cls, cfg, name="model", where="config.json"):
        """The spec of a checked config dict (see `check_config`): nothing is allocated before this passes."""
        check_config(cfg, where)
        heads = cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads") or heads
        theta = cfg.get("rope_theta")
        if theta is None and isinstance(cfg.get("rope_parameters"), dict):
            theta = cfg["rope_parameters"].get("rope_theta")
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
        return cls(
            name=name, num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_heads=heads, num_kv_heads=kv,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab_size=cfg["vocab_size"],
            max_positions=cfg.get("max_position_embeddings", 32768), rope_theta=float(theta or 10000.0),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), torch_dtype=str(dtype),
        )

    @classmethod
    def from_folder(cls, folder):
        folder = Path(folder)
        return cls.from_config(read_config(folder), name=folder.resolve().name, where=str(folder / "config.json"))


# Sizes beyond any published Qwen2 (the largest: 80 layers, hidden 8192, vocab 152,064, 128K positions):
# a config past these cannot describe a real model, and trusting it would make export allocate terabytes.
LIMITS = {
    "num_hidden_layers": 256, "hidden_size": 65536, "intermediate_size": 262144, "num_attention_heads": 1024,
    "num_key_value_heads": 1024, "head_dim": 1024, "vocab_size": 1 << 20, "max_position_embeddings": 1 << 24,
}
REQUIRED_SIZES = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")
MIN_POSITIONS = 16
TORCH_DTYPES = ("bfloat16", "float16", "float32")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_config(cfg, where="config.json"):
    """Validate a Qwen2 config dict; raise one ModelFormatError naming the key and the fix."""
    if not isinstance(cfg, dict):
        raise ModelFormatError(f"{where}: expected a JSON object")
    if cfg.get("model_type") != "qwen2":
        raise ModelFormatError(
            f"{where}: model_type is {cfg.get('model_type')!r}, expected 'qwen2' "
            "(skywork-deploy supports Qwen2 / Skywork-OR1 checkpoints only)")
    missing = [k for k in REQUIRED_SIZES if not _is_int(cfg.get(k))]
    if missing:
        raise ModelFormatError(f"{where}: missing or non-integer {', '.join(missing)} (each must be a positive "
                               "integer, as in the model's original config.json)")
    for key in REQUIRED_SIZES + OPTIONAL_SIZES:
        value = cfg.get(key)
        if key in OPTIONAL_SIZES and value is None:
            continue
        if not _is_int(value) or value < 1:
            raise ModelFormatError(f"{where}: {key} is {value!r}; it must be a positive integer")
        if value > LIMITS[key]:
            raise ModelFormatError(f"{where}: {key} is {value}, beyond any published Qwen2 (at most {LIMITS[key]}); "
                                   "fix config.json")
    positions = cfg.get("max_position_embeddings")
    if positions is not None and positions < MIN_POSITIONS:
        raise ModelFormatError(f"{where}: max_position_embeddings is {positions}; it must be at least "
                               f"{MIN_POSITIONS}")
    if cfg.get("use_sliding_window"):
        raise ModelFormatError(f"{where}: use_sliding_window is true; only full attention is supported "
                               "(set use_sliding_window to false)")
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ModelFormatError(f"{where}: rope_scaling must be an object or null, not {type(rope).__name__}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise ModelFormatError(f"{where}: rope scaling type {rope_type!r} is not supported "
                               "(only default RoPE; remove rope_scaling)")
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    kv = cfg.get("num_key_value_heads") or heads
    if hidden % heads:
        raise ModelFormatError(f"{where}: hidden_size {hidden} does not divide by num_attention_heads {heads}")
    if heads % kv:
        raise ModelFormatError(f"{where}: num_attention_heads {heads} does not divide by num_key_value_heads {kv}")
    head_dim = cfg.get("head_dim") or hidden // heads
    if head_dim % 2:
        raise ModelFormatError(f"{where}: the head dimension is {head_dim} (hidden_size / num_attention_heads"
                               " or head_dim); rotary embeddings need an even head dimension")
    theta = cfg.get("rope_theta")
    if theta is None and isinstance(cfg.get("rope_parameters"), dict):
        theta = cfg["rope_parameters"].get("rope_theta")
    if theta is not None and not (_is_number(theta) and theta > 0):
        raise ModelFormatError(f"{where}: rope_theta is {theta!r}; it must be a positive number (e.g. 1000000.0)")
    eps = cfg.get("rms_norm_eps")
    if eps is not None and not (_is_number(eps) and 0 < eps < 1):
        raise ModelFormatError(f"{where}: rms_norm_eps is {eps!r}; it must be a small positive number (e.g. 1e-06)")
    tie = cfg.get("tie_word_embeddings")
    if tie is not None and not isinstance(tie, bool):
        raise ModelFormatError(f"{where}: tie_word_embeddings is {tie!r}; it must be true or false")
    for key in ("torch_dtype", "dtype"):
        if cfg.get(key) is not None and cfg[key] not in TORCH_DTYPES:
            raise ModelFormatError(f"{where}: {key} is {cfg[key]!r}; expected one of {', '.join(TORCH_DTYPES)} "
                                   "(the dtype the checkpoint's weights are stored in)")


def read_json(path, max_bytes=None):
    """A model file's JSON: duplicate keys, NaN, non-UTF-8 text and unreadable files refused naming it."""
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: file not found")
    return read_json_file(path, ModelFormatError, max_bytes)


def read_config(folder):
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFormatError(f"{folder}: not a folder (pass a model folder containing config.json)")
    cfg = read_json(folder / "config.json")
    if not isinstance(cfg, dict):
        raise ModelFormatError(f"{folder / 'config.json'}: expected a JSON object")
    return cfg


def checkpoint_files(folder):
    """The safetensors files of a checkpoint, checked: single `model.safetensors` or an index and its shards."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFormatError(f"{index}: no weight_map (re-download the index file)")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelFormatError(f"{index} names {missing[0]}, which is missing from {folder} "
                                   f"({len(missing)} missing shard(s); re-download them)")
        files = [folder / n for n in names]
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        raise ModelFormatError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                               "(skywork-deploy reads safetensors checkpoints only)")
    for f in files:
        read_safetensors_header(f)
    return files


def read_safetensors_header(path):
    """The JSON header of a safetensors file ({name: {dtype, shape, data_offsets}}), checked against its size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ModelFormatError(f"{path}: truncated safetensors file (re-download or re-save it)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100_000_000):
            raise ModelFormatError(f"{path}: corrupt safetensors header (re-download or re-save it)")
        try:
            header = loads_json(fh.read(n).decode("utf-8"), f"{path}: corrupt safetensors header")
        except UnicodeDecodeError:
            raise ModelFormatError(f"{path}: corrupt safetensors header (re-download or re-save it)") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: corrupt safetensors header (re-download or re-save it)")
    end = max((_check_entry(path, k, v) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ModelFormatError(f"{path}: truncated safetensors file, {size} bytes but the header needs "
                               f"{8 + n + end} (re-download it)")
    return header


DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
               "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


def _check_entry(path, name, entry):
    """One tensor entry of a safetensors header, checked; returns the end offset of its data."""
    bad = f"{path}: corrupt safetensors header entry {name!r}"
    if not isinstance(entry, dict):
        raise ModelFormatError(f"{bad} (not an object; re-download or re-save the file)")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise ModelFormatError(f"{bad}: unknown dtype {dtype!r} (re-download or re-save the file)")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ModelFormatError(f"{bad}: shape {shape!r} is not a list of non-negative integers (re-download it)")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]):
        raise ModelFormatError(f"{bad}: data_offsets {offsets!r} are not [start, end] (re-download it)")
    if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise ModelFormatError(f"{bad}: shape {shape} of {dtype} does not match its {offsets[1] - offsets[0]} "
                               "data bytes (re-download or re-save the file)")
    return offsets[1]


LAYER_TENSORS = (
    "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
    "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
    "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.rotary_emb.inv_freq",  # a buffer older checkpoints saved
)


def explained_tensors(spec, quantized=False):
    """Every tensor name a Qwen2 checkpoint of `spec` may hold (int8 ones: each projection's `_scale` too)."""
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    names |= {f"model.layers.{i}.{name}" for i in range(spec.num_layers) for name in LAYER_TENSORS}
    if quantized:
        names |= {f"{n}_scale" for n in names if n.endswith("_proj.weight") or n.startswith(("lm_head", "model.embed"))}
    return names


def check_tensor_names(folder, spec, allow_extra=False):
    """Refuse tensors config.json does not explain (a layer past num_hidden_layers, a vision tower, a LoRA...):
    every stage would carry or drop them silently. `allow_extra` (--allow-extra-tensors) accepts them."""
    folder = Path(folder)
    quantized = isinstance(read_config(folder).get("quantization_config"), dict)
    found = {name for f in checkpoint_files(folder) for name in read_safetensors_header(f) if name != "__metadata__"}
    extra = sorted(found - explained_tensors(spec, quantized))
    if extra and not allow_extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        raise ModelFormatError(f"{folder}: {len(extra)} tensor(s) that config.json does not explain ({shown}); "
                               "check that config.json belongs to these weights, or pass --allow-extra-tensors "
                               "to go on without them")
    return extra


def tokenizer_files(folder):
    """Tokenizer files present in `folder`; raises when there is no tokenizer at all."""
    folder = Path(folder)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelFormatError(f"{folder}: no tokenizer (expected tokenizer.json or vocab.json + merges.txt)")
    return [folder / f for f in TOKENIZER_SIDE_FILES if (folder / f).is_file()]
