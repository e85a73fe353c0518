"""Stage 5, compile (config half): the `vamc compile` YAML written from the model itself, checked first.

`CompileSettings` holds every option (typed, round-trips through YAML/JSON). `build_config(spec, checkpoint,
settings)` is the pure mapping to the vendor's layout (REFERENCE.md §3); `check_settings` collects every
problem a config would have; `plan_compile(folder, settings)` adds the checks that need the model folder
(patch status, calibration manifest) and the compiler's environment. Nothing here runs the compiler.
"""
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError
from .spec import ModelSpec, read_config

DTYPES = ("fp16", "int8")
QUANTIZE_TYPES = ("w8a16_gptq",)  # the vendor's weight-only int8 with GPTQ calibration
DEFAULT_QUANTIZE_TYPE = {"fp16": None, "int8": "w8a16_gptq"}
CALIB_DATASETS = ("c4", "ceval", "alpaca")
DATASET_KEYS = ("type", "name", "path", "nsamples", "seqlen")
BUCKET_ALIGN = 16
# The vendor says "models of 32B and more"; nominal sizes are rounded, so the line is drawn at 30e9 counted
# parameters (Skywork-OR1-32B counts 32.76e9, the 7B 7.62e9, and no Qwen2 size falls in between).
LARGE_MODEL_PARAMETERS = 30_000_000_000
LARGE_MODEL_ENV = {"VACC_STACK_SIZE": "256"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass
class CompileSettings:
    """Every setting of a compile; None for `name`/`quantize_type` means the derived default."""

    dtype: str = "fp16"
    tp: int = 4
    seq_lens: list = field(default_factory=lambda: [1024, 2048])
    b2s: bool = True
    workspace: str = "./vacc_deploy"
    workers: int = 4
    name: str = None
    quantize_type: str = None
    calib: str = None  # a calibration manifest (file or folder) written by `skywork-deploy calib`
    dataset: dict = None  # or an explicit `dataset:` block (type, name, path, nsamples, seqlen)

    def resolved_quantize_type(self):
        if self.quantize_type is not None:
            return self.quantize_type
        return DEFAULT_QUANTIZE_TYPE.get(self.dtype)

    def resolved_name(self, model_name):
        if self.name is not None:
            return self.name
        buckets = "-".join(str(n) for n in self.seq_lens)
        return f"{model_name}-{self.dtype}-tp{self.tp}-{buckets}"

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, data, where="compile settings"):
        """Settings from a dict (a YAML/JSON file's content); unknown keys and wrong types are errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping of settings")
        types = {"dtype": str, "tp": int, "seq_lens": list, "b2s": bool, "workspace": str, "workers": int,
                 "name": str, "quantize_type": str, "calib": str, "dataset": dict}
        problems = [f"{where}: unknown key {key!r} (allowed: {', '.join(types)})"
                    for key in data if key not in types]
        for key, value in data.items():
            want = types.get(key)
            if want is None or value is None and key in ("name", "quantize_type", "calib", "dataset"):
                continue
            wrong = not isinstance(value, want) or (want is int and isinstance(value, bool))
            if key == "seq_lens" and not wrong:
                wrong = not all(isinstance(n, int) and not isinstance(n, bool) for n in value)
            if wrong:
                expected = "a list of integers" if want is list else want.__name__
                problems.append(f"{where}: {key} is {value!r}, expected {expected}")
        if problems:
            raise ConfigError("\n".join(problems))
        return cls(**{k: (list(v) if k == "seq_lens" else v) for k, v in data.items()})

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


def needs_align_qkv(spec, tp):
    """The vendor's rule: align_qkv when tp does not divide the KV heads."""
    return isinstance(tp, int) and tp >= 1 and spec.num_kv_heads % tp != 0


def compiler_env(spec):
    """Extra environment variables for vamc: VACC_STACK_SIZE=256 for models of 32B parameters and more."""
    return dict(LARGE_MODEL_ENV) if spec.num_parameters >= LARGE_MODEL_PARAMETERS else {}


class _FlowList(list):
    """A list written inline ([[1024], [2048]]), as in the vendor's example."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(
    _FlowList, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


def dump_yaml(config):
    """The config as YAML text: key order kept, nested blocks, the shape lists inline. Deterministic."""
    return yaml.dump(config, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True,
                     width=1000)


def dataset_block(block):
    """The `dataset:` block with the vendor's key order (unknown keys kept after them, sorted)."""
    known = {k: block[k] for k in DATASET_KEYS if k in block}
    return {**known, **{k: block[k] for k in sorted(block) if k not in DATASET_KEYS}}


def build_config(spec, checkpoint, settings, dataset=None):
    """The vamc config as a dict in the vendor's key order (REFERENCE.md §3). Pure: no checks, no I/O."""
    kwargs = {"b2s": settings.b2s, "tp": settings.tp, "model_arch": "vacc"}
    if needs_align_qkv(spec, settings.tp):
        kwargs["align_qkv"] = True
    frontend = {
        "checkpoint": str(checkpoint),
        "type": "huggingface",
        "shape": {"input_ids": _FlowList(_FlowList([n]) for n in settings.seq_lens)},
        "model_kwargs": kwargs,
    }
    quantize_type = settings.resolved_quantize_type()
    if quantize_type is not None:
        frontend["quantize"] = {"type": quantize_type}
    config = {
        "name": settings.resolved_name(spec.name),
        "frontend": frontend,
        "backend": {
            "type": "tvm_vacc",
            "dtype": settings.dtype,
            "merge_params": True,
            "compile": {"data_type": 0, "gather_data_vccl_dsp_enable": True},
        },
        "workspace": {"path": settings.workspace, "workers": settings.workers},
    }
    if dataset is not None:
        config["dataset"] = dataset_block(dataset)
    return config


def check_settings(spec, settings):
    """Every problem of `settings` for a model of this spec, one line each (empty list: fine)."""
    p = []
    if settings.dtype not in DTYPES:
        p.append(f"dtype: {settings.dtype!r} is not supported (use {' or '.join(DTYPES)})")
    if settings.tp < 1:
        p.append(f"tp: {settings.tp} must be at least 1")
    elif spec.num_heads % settings.tp:
        divisors = [d for d in range(1, spec.num_heads + 1) if spec.num_heads % d == 0]
        p.append(f"tp: {settings.tp} does not divide the {spec.num_heads} attention heads of {spec.name} "
                 f"(use one of {', '.join(map(str, divisors))})")
    p += _check_buckets(spec, settings.seq_lens)
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
    if settings.calib is not None and settings.dataset is not None:
        p.append("calib and dataset: give either a calibration manifest or a dataset block, not both")
    return p


def _check_buckets(spec, seq_lens):
    if not seq_lens:
        return ["seq_lens: empty (give at least one bucket, e.g. 1024,2048)"]
    p = []
    for n in dict.fromkeys(seq_lens):  # each value once, in the given order
        if n < BUCKET_ALIGN or n % BUCKET_ALIGN:
            fix = max(BUCKET_ALIGN, -(-n // BUCKET_ALIGN) * BUCKET_ALIGN)
            p.append(f"seq_lens: {n} is not a positive multiple of {BUCKET_ALIGN} (use {fix})")
        if n > spec.max_positions:
            p.append(f"seq_lens: {n} exceeds max_position_embeddings {spec.max_positions} of {spec.name} "
                     f"(use at most {spec.max_positions // BUCKET_ALIGN * BUCKET_ALIGN})")
    if list(seq_lens) != sorted(set(seq_lens)):
        p.append(f"seq_lens: {','.join(map(str, seq_lens))} must be increasing without repeats "
                 f"(use {','.join(map(str, sorted(set(seq_lens))))})")
    return p


def check_dataset(block, spec, dtype, where="dataset"):
    """Problems of a `dataset:` block. Its seqlen need not be a multiple of 16: calibration windows go
    through the frontend's PyTorch model during quantization, not through the compiled buckets."""
    if not isinstance(block, dict):
        return [f"{where}: expected a mapping with keys {', '.join(DATASET_KEYS)}"]
    p = []
    if dtype != "int8":
        p.append(f"{where}: calibration data is used by int8 builds only (drop it or use --dtype int8)")
    missing = [k for k in DATASET_KEYS if k not in block]
    if missing:
        p.append(f"{where}: missing {', '.join(missing)} (a block has {', '.join(DATASET_KEYS)})")
    if "type" in block and block["type"] != "huggingface":
        p.append(f"{where}.type: {block['type']!r}, the compiler documents only 'huggingface'")
    name, path = block.get("name"), block.get("path")
    if "name" in block and name not in CALIB_DATASETS:
        p.append(f"{where}.name: {name!r} is not one of {', '.join(CALIB_DATASETS)}")
    if "path" in block and (not isinstance(path, str) or not path.strip()):
        p.append(f"{where}.path: empty (give a hub id or a local copy of the dataset)")
    elif isinstance(path, str) and Path(path).exists():
        if name == "ceval" and not Path(path).is_dir():
            p.append(f"{where}.path: {path} is not a folder; ceval needs the unzipped ceval-exam folder")
        if name == "alpaca" and not (Path(path).is_file() and path.endswith(".json")):
            p.append(f"{where}.path: {path} is not a .json file; alpaca needs alpaca_data_cleaned.json")
    nsamples, seqlen = block.get("nsamples"), block.get("seqlen")
    if "nsamples" in block and not (_is_int(nsamples) and nsamples > 0):
        p.append(f"{where}.nsamples: {nsamples!r} must be a positive integer (the vendor uses 128)")
    if "seqlen" in block:
        if not (_is_int(seqlen) and seqlen > 0):
            p.append(f"{where}.seqlen: {seqlen!r} must be a positive integer (c4 1024, ceval 128, alpaca 512)")
        elif seqlen > spec.max_positions:
            p.append(f"{where}.seqlen: {seqlen} exceeds max_position_embeddings {spec.max_positions}")
    return p


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def check_checkpoint(folder):
    """Problems of the model folder as a compiler checkpoint: patched with our current files, not int8."""
    from .patch import patch_status

    status = patch_status(folder)
    p = [f"checkpoint: {line} (run `skywork-deploy patch {folder}`)" if status["patched"] else
         f"checkpoint: {line}" for line in status["problems"]]
    qc = read_config(folder).get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "vacc_w8a16":
        p.append(f"checkpoint: {folder} holds int8 weights from `skywork-deploy quantize`; the compiler "
                 "quantizes itself (w8a16_gptq): pass the patched unquantized folder")
    return p


def check_calib_tokenizer(manifest, folder, spec, where="calib"):
    """The calibration tokens must come from this model's tokenizer and fit its vocabulary.

    `manifest["tokenizer"]` is the calib stage's tokenizer identity: vocab_size (len of the tokenizer) and
    files ({file name: sha256} of the tokenizer files it loaded from the model folder).
    """
    from .fsutil import sha256_file

    tok = manifest.get("tokenizer") if isinstance(manifest.get("tokenizer"), dict) else {}
    p = []
    vocab = tok.get("vocab_size")
    if _is_int(vocab) and vocab > spec.vocab_size:
        p.append(f"{where}: the calibration tokenizer has {vocab} tokens but {spec.name} has {spec.vocab_size} "
                 "embedding rows (re-run `skywork-deploy calib --model` with this model)")
    files = tok.get("files") if isinstance(tok.get("files"), dict) else {}
    for name, digest in sorted(files.items()):
        mine = Path(folder) / name
        if isinstance(digest, dict):
            digest = digest.get("sha256")
        if not mine.is_file() or isinstance(digest, str) and sha256_file(mine) != digest:
            p.append(f"{where}: {name} differs from the tokenizer the calibration set was built with "
                     "(re-run `skywork-deploy calib --model` with this model)")
    return p


@dataclass
class CompilePlan:
    """Everything needed to write and run one compile; `problems` empty means the config is sound."""

    spec: ModelSpec
    checkpoint: Path
    settings: CompileSettings
    config: dict
    yaml_text: str
    env: dict
    problems: list

    @property
    def name(self):
        return self.config["name"]

    @property
    def workspace(self):
        return self.config["workspace"]["path"]


def plan_compile(model_folder, settings):
    """Read the model folder, build the config and collect every problem (raises only for unreadable input)."""
    from .errors import InputError

    folder = Path(model_folder).expanduser()
    if not folder.is_dir():
        raise InputError(f"{model_folder}: not a folder (pass the patched model folder; "
                         "see `skywork-deploy patch`)")
    spec = ModelSpec.from_folder(folder)
    problems = check_settings(spec, settings) + check_checkpoint(folder)
    dataset = settings.dataset
    if settings.calib is not None:
        from .calib import read_calib_manifest  # validates the manifest and its dataset_block

        manifest = read_calib_manifest(settings.calib)
        dataset = manifest["dataset_block"]
        problems += check_calib_tokenizer(manifest, folder, spec, where=f"calib ({settings.calib})")
    if dataset is not None:
        problems += check_dataset(dataset, spec, settings.dtype)
    config = build_config(spec, folder.resolve(), settings, dataset if isinstance(dataset, dict) else None)
    return CompilePlan(spec, folder.resolve(), settings, config, dump_yaml(config), compiler_env(spec), problems)


def make_compile_config(model_folder, settings):
    """(yaml_text, extra env for vamc, problems) for compiling `model_folder` with `settings`."""
    plan = plan_compile(model_folder, settings)
    return plan.yaml_text, plan.env, plan.problems


def raise_problems(problems, what):
    """One ConfigError listing every problem, one per line."""
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"{len(problems)} problem(s) in {what}:\n{lines}")


def check_vamc_config(path):
    """Problems of an existing (e.g. hand-edited) vamc YAML: the same checks plus align_qkv and fixed keys."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read a YAML config ({exc})") from None
    get = _getter(data)
    p = [f"{path}: {key} is missing" for key in (
        "name", "frontend.checkpoint", "frontend.shape.input_ids", "frontend.model_kwargs.tp",
        "backend.dtype", "workspace.path") if get(key) is None]
    if p:
        return p
    for key, want in (("frontend.type", "huggingface"), ("frontend.model_kwargs.model_arch", "vacc"),
                      ("backend.type", "tvm_vacc")):
        if get(key) != want:
            p.append(f"{path}: {key} is {get(key)!r}, expected {want!r}")
    shape = get("frontend.shape.input_ids")
    if not (isinstance(shape, list) and all(isinstance(b, list) and len(b) == 1 for b in shape)):
        return p + [f"{path}: frontend.shape.input_ids must be one [length] per bucket, e.g. [[1024], [2048]]"]
    quantize_type = get("frontend.quantize.type")
    if get("backend.dtype") == "int8" and quantize_type is None:
        p.append(f"{path}: frontend.quantize.type is missing for an int8 build "
                 "(add quantize: {type: w8a16_gptq} under frontend)")
    settings = CompileSettings.from_dict({
        "dtype": get("backend.dtype"), "tp": get("frontend.model_kwargs.tp"), "seq_lens": [b[0] for b in shape],
        "b2s": bool(get("frontend.model_kwargs.b2s")), "workspace": get("workspace.path"),
        "workers": get("workspace.workers") or 1, "name": get("name"), "quantize_type": quantize_type,
        "dataset": data.get("dataset")}, where=str(path))
    plan = plan_compile(get("frontend.checkpoint"), settings)
    align = bool(get("frontend.model_kwargs.align_qkv"))
    if align != needs_align_qkv(plan.spec, settings.tp):
        want = "true" if not align else "absent (or false)"
        p.append(f"{path}: frontend.model_kwargs.align_qkv must be {want}: tp {settings.tp} "
                 f"{'does not divide' if not align else 'divides'} the {plan.spec.num_kv_heads} KV heads")
    return p + [f"{path}: {line}" for line in plan.problems]


def _getter(data):
    def get(dotted):
        node = data
        for key in dotted.split("."):
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    return get
