"""Stage 5, compile (settings): every option of one `vamc compile`, typed, and the checks that need only the
model's spec.

`CompileSettings` holds every option of one compile (typed, round-trips through YAML/JSON); one compile is
one size, `[[max_input_len], [max_seq_len]]` (VENDOR.md §2: the longest prompt and the longest prompt plus
answer, not prefill buckets); several sizes are several settings (`expand_sizes`). `check_settings` collects
every problem; `advise` the warnings (a total length that truncates a reasoning model's answers).
"""

import json
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import yaml

from ..base.errors import ConfigError

DTYPES = ("fp16", "int8")
QUANTIZE_TYPES = ("w8a16_gptq",)  # the vendor's weight-only int8 with GPTQ calibration
DEFAULT_QUANTIZE_TYPE = {"fp16": None, "int8": "w8a16_gptq"}
LENGTH_ALIGN = 16
# Skywork-OR1's reasoning traces run 8K-32K tokens (RL stages at 16K and 32K contexts; the vendor's own
# accuracy runs allow 16,384 answer tokens): a smaller total length cuts most answers short.
REASONING_TOTAL = 16384
# The vendor says "models of 32B and more"; nominal sizes are rounded, so the line is drawn at 30e9 counted
# parameters (Skywork-OR1-32B counts 32.76e9, the 7B 7.62e9, and no Qwen2 size falls in between).
LARGE_MODEL_PARAMETERS = 30_000_000_000
LARGE_MODEL_ENV = {"VACC_STACK_SIZE": "256"}
SEQ_LENS_REPLACED = ("seq_lens was removed: the compiler's input_ids [[A], [B]] is the longest prompt A and the "
                     "longest prompt plus answer B, not buckets; use max_input_len and max_seq_len "
                     "(--max-input-len A --max-seq-len B, or --size A:B once per compile)")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
# What check_settings and plan_compile check before anything runs (the compile record lists them).
PREFLIGHT_CHECKS = {
    "dtype": "dtype is fp16 or int8",
    "lengths": "max_input_len and max_seq_len are multiples of 16, input < total <= max_position_embeddings",
    "tp": "1 <= tp <= attention heads",
    "align_qkv": "align_qkv is on when tp does not divide the KV heads or the heads",
    "workspace": "workspace and workers are usable",
    "name": "the build name is a plain file name",
    "quantize": "int8 has quantize type w8a16_gptq (and calib_args), fp16 none",
    "dataset": "calibration manifest or dataset block is complete and for int8",
    "checkpoint": "the folder carries the current patch and unquantized weights",
    "calib_tokenizer": "the calibration set was tokenized by this model's tokenizer",
}


@dataclass
class CompileSettings:
    """Every setting of one compile; None means the derived default (name, quantize type, align_qkv)."""

    dtype: str = "fp16"
    tp: int = 4
    max_input_len: int = 1024
    max_seq_len: int = 2048
    b2s: bool = True
    align_qkv: bool = None  # None: true when tp does not divide the KV heads (or heads), else left out
    workspace: str = "./vacc_deploy"
    workers: int = 4
    name: str = None
    model_name: str = None  # the name's prefix; None: the model folder's name
    quantize_type: str = None
    calib_true_sequential: bool = None  # int8: written as frontend.quantize.calib_args.true_sequential
    calib: str = None  # a calibration manifest (file or folder) written by `skywork-deploy calib`
    dataset: dict = None  # or an explicit `dataset:` block (type, name, path, nsamples, seqlen)

    def resolved_quantize_type(self):
        if self.quantize_type is not None:
            return self.quantize_type
        return DEFAULT_QUANTIZE_TYPE.get(self.dtype)

    def resolved_name(self, model_name):
        if self.name is not None:
            return self.name
        prefix = self.model_name or model_name
        return f"{prefix}-{self.dtype}-tp{self.tp}-{self.max_input_len}-{self.max_seq_len}"

    def resolved_align_qkv(self, spec):
        """True/False to write, or None to leave the key out (the vendor's YAMLs have no align_qkv)."""
        if self.align_qkv is not None:
            return self.align_qkv
        return True if needs_align_qkv(spec, self.tp) else None

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, data, where="compile settings"):
        """Settings from a dict (a YAML/JSON file's content); unknown keys and wrong types are errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping of settings")
        types = {f.name: f.type for f in fields(cls)}
        nullable = {f.name for f in fields(cls) if f.default is None}
        problems = [f"{where}: {SEQ_LENS_REPLACED}" if key == "seq_lens" else
                    f"{where}: unknown key {key!r} (allowed: {', '.join(types)})"
                    for key in data if key not in types]
        for key, value in data.items():
            want = types.get(key)
            if want is None or value is None and key in nullable:
                continue
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                problems.append(f"{where}: {key} is {value!r}, expected {want.__name__}")
        if problems:
            raise ConfigError("\n".join(problems))
        return cls(**data)

    def to_yaml(self):
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text, where="compile settings"):
        try:
            return cls.from_dict(yaml.safe_load(text), where)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: not valid YAML ({exc})") from None

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text, where="compile settings"):
        try:
            return cls.from_dict(json.loads(text), where)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc})") from None


def parse_size(value, where="--size"):
    """'1024:2048', [1024, 2048] or (1024, 2048) -> (1024, 2048); ConfigError naming `where` otherwise."""
    parts = value.split(":") if isinstance(value, str) else value
    try:
        n_in, n_total = (int(p) for p in parts)
        if any(isinstance(p, (bool, float)) for p in parts):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a size MAX_INPUT_LEN:MAX_SEQ_LEN (e.g. 1024:2048)") from None
    return n_in, n_total


def expand_sizes(settings, sizes):
    """One CompileSettings per (max_input_len, max_seq_len); `settings` alone when sizes is empty."""
    if not sizes:
        return [settings]
    if settings.name is not None and len(sizes) > 1:
        raise ConfigError(f"name: {settings.name!r} would name all {len(sizes)} sizes the same: leave it out "
                          "(each size gets <model>-<dtype>-tp<tp>-<in>-<total>) or compile one size")
    return [replace(settings, max_input_len=a, max_seq_len=b) for a, b in (parse_size(s) for s in sizes)]


def needs_align_qkv(spec, tp):
    """align_qkv when tp does not divide the KV heads (VENDOR.md §2), or does not divide the heads."""
    return _is_int(tp) and tp >= 1 and bool(spec.num_kv_heads % tp or spec.num_heads % tp)


def compiler_env(spec):
    """Extra environment variables for vamc: VACC_STACK_SIZE=256 for models of 32B parameters and more."""
    return dict(LARGE_MODEL_ENV) if spec.num_parameters >= LARGE_MODEL_PARAMETERS else {}


def check_settings(spec, settings):
    """Every problem of `settings` for a model of this spec, one line each (empty list: fine)."""
    p = []
    if settings.dtype not in DTYPES:
        p.append(f"dtype: {settings.dtype!r} is not supported (use {' or '.join(DTYPES)})")
    p += check_lengths(spec, settings.max_input_len, settings.max_seq_len)
    p += _check_tp(spec, settings)
    if settings.workers < 1:
        p.append(f"workers: {settings.workers} must be at least 1")
    if not settings.workspace.strip():
        p.append("workspace: empty (give the compiler's work folder, e.g. ./vacc_deploy)")
    name = settings.resolved_name(spec.name)
    if not _NAME_RE.match(name):
        p.append(f"name: {name!r} is used as a file and folder name: use letters, digits, '.', '_', '+', '-' "
                 "only, starting with a letter or digit")
    quantize_type = settings.resolved_quantize_type()
    if settings.dtype == "int8" and quantize_type not in QUANTIZE_TYPES:
        p.append(f"quantize_type: int8 needs a quantize type, got {quantize_type!r} (use {QUANTIZE_TYPES[0]})")
    if settings.dtype == "fp16" and quantize_type is not None:
        p.append(f"quantize_type: {quantize_type!r} is set for an fp16 build (drop it or use --dtype int8)")
    if settings.dtype == "fp16" and settings.calib_true_sequential is not None:
        p.append("calib_true_sequential: calibration settings are for int8 builds only (drop "
                 "--calib-true-sequential/--no-calib-true-sequential or use --dtype int8)")
    if settings.calib is not None and settings.dataset is not None:
        p.append("calib and dataset: give either a calibration manifest or a dataset block, not both")
    return p


def check_lengths(spec, max_input_len, max_seq_len):
    """Problems of one size: both multiples of 16, input < total <= max_position_embeddings."""
    p = []
    for key, n in (("max_input_len", max_input_len), ("max_seq_len", max_seq_len)):
        if not _is_int(n) or n < LENGTH_ALIGN or n % LENGTH_ALIGN:
            fix = max(LENGTH_ALIGN, -(-n // LENGTH_ALIGN) * LENGTH_ALIGN) if _is_int(n) else 1024
            p.append(f"{key}: {n} is not a positive multiple of {LENGTH_ALIGN} (use {fix})")
    if not (_is_int(max_input_len) and _is_int(max_seq_len)):
        return p
    if max_input_len >= max_seq_len:
        p.append(f"max_input_len: {max_input_len} must be below max_seq_len {max_seq_len} (the total is the "
                 f"prompt plus the answer; e.g. --size {max_input_len}:{2 * max_input_len})")
    if max_seq_len > spec.max_positions:
        p.append(f"max_seq_len: {max_seq_len} exceeds max_position_embeddings {spec.max_positions} of "
                 f"{spec.name} (use at most {spec.max_positions // LENGTH_ALIGN * LENGTH_ALIGN})")
    return p


def _check_tp(spec, settings):
    tp = settings.tp
    if tp < 1:
        return [f"tp: {tp} must be at least 1"]
    if tp > spec.num_heads:
        return [f"tp: {tp} is more than the {spec.num_heads} attention heads of {spec.name} "
                f"(use at most {spec.num_heads})"]
    if settings.align_qkv is False and needs_align_qkv(spec, tp):
        return [f"align_qkv: false, but tp {tp} does not divide the {spec.num_kv_heads} KV heads and "
                f"{spec.num_heads} heads of {spec.name} evenly (drop --no-align-qkv, or use a tp that divides "
                f"{spec.num_kv_heads})"]
    return []


def advise(spec, settings, reasoning):
    """Warnings (not errors): a total length that cuts a reasoning model's answers short.

    Only sizes the model allows are suggested (total <= max_position_embeddings); a total already at the
    model's limit gets no warning, as nothing longer is possible.
    """
    limit = spec.max_positions // LENGTH_ALIGN * LENGTH_ALIGN
    model = settings.model_name or spec.name
    if not reasoning or settings.max_seq_len >= min(REASONING_TOTAL, limit):
        return []
    sizes = [f"{prompt}:{total}" for prompt, total in ((2048, REASONING_TOTAL), (4096, 2 * REASONING_TOTAL))
             if total <= limit]
    suggestion = (f"for reasoning use e.g. --size {' or '.join(sizes)}" if sizes else
                  f"{model} allows at most {limit} positions (max_position_embeddings): "
                  f"--size {settings.max_input_len}:{limit} is the longest it can take")
    return [f"max_seq_len: {settings.max_seq_len} tokens in total (prompt + answer) is short for "
            f"{model}: Skywork-OR1's reasoning traces run 8K-32K tokens (its RL stages trained at 16K and "
            "32K), so most answers will be cut off; the vendor's example configs use 1024:2048 (Skywork-OR1) and "
            f"2048:4096 (Qwen2.5-7B-Instruct serving); {suggestion}"]


def is_reasoning_model(spec, folder=None):
    """Skywork-OR1 by name, or any model whose chat template opens a <think> block."""
    if "or1" in spec.name.lower():
        return True
    if folder is None:
        return False
    texts = []
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        path = Path(folder) / name
        if path.is_file():
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return any("<think>" in text for text in texts)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def raise_problems(problems, what):
    """One ConfigError listing every problem, one per line."""
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"{len(problems)} problem(s) in {what}:\n{lines}")
