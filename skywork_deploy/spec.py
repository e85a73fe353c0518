"""What a Qwen2 model folder is: its config values, shards and tokenizer files, read without torch.

`ModelSpec.from_folder(path)` validates `config.json` and returns the numbers every stage needs
(layers, heads, vocab, rope_theta, tied embeddings...). `checkpoint_files(path)` lists the safetensors
shards (single file or index plus every shard it names) and checks each exists.
"""
import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ModelFormatError

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
        if cfg.get("model_type") != "qwen2":
            raise ModelFormatError(
                f"{where}: model_type is {cfg.get('model_type')!r}, expected 'qwen2' "
                "(skywork-deploy supports Qwen2 / Skywork-OR1 checkpoints only)")
        missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                               "vocab_size") if not isinstance(cfg.get(k), int)]
        if missing:
            raise ModelFormatError(f"{where}: missing or non-integer {', '.join(missing)}")
        if cfg.get("use_sliding_window"):
            raise ModelFormatError(f"{where}: use_sliding_window is true; only full attention is supported "
                                   "(set use_sliding_window to false)")
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if rope_type not in ("default", None):
            raise ModelFormatError(f"{where}: rope scaling type {rope_type!r} is not supported "
                                   "(only default RoPE; remove rope_scaling)")
        heads = cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads") or heads
        if cfg["hidden_size"] % heads or heads % kv:
            raise ModelFormatError(f"{where}: hidden_size must divide by num_attention_heads and "
                                   "num_attention_heads by num_key_value_heads")
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


def read_json(path):
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{path}: not valid JSON ({exc})") from None


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
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelFormatError(f"{path}: corrupt safetensors header (re-download or re-save it)") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: corrupt safetensors header (re-download or re-save it)")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ModelFormatError(f"{path}: truncated safetensors file, {size} bytes but the header needs "
                               f"{8 + n + end} (re-download it)")
    return header


def tokenizer_files(folder):
    """Tokenizer files present in `folder`; raises when there is no tokenizer at all."""
    folder = Path(folder)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelFormatError(f"{folder}: no tokenizer (expected tokenizer.json or vocab.json + merges.txt)")
    return [folder / f for f in TOKENIZER_SIDE_FILES if (folder / f).is_file()]
