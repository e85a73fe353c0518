"""The settings of a build, typed: one dataclass per stage, read from build.yaml, overridden by options.

`BuildSettings.from_yaml(text)` refuses unknown keys (naming them) and wrong types; `to_dict()` is what
the build folder records in `build.yaml`, so a build can be repeated from its own record.
"""
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from ..base.errors import ConfigError
from ..base.strict import YAML_MAX_BYTES, load_yaml, read_input_text

DTYPES = ("fp16", "int8")
RUN_PROMPT_MAX_BYTES = 64 << 10  # run.prompt is the build's smoke-test prompt
CALIB_DATASETS = ("c4", "ceval", "alpaca")


@dataclass
class CalibSettings:
    dataset: str = None  # c4 | ceval | alpaca; None: no calibration (fp16), or an error for int8
    source: str = None  # local file/folder or hub id
    nsamples: int = 128
    seqlen: int = None  # None: the dataset's vendor default
    seed: int = 0
    split: str = None
    allow_packing: bool = False  # c4: pack shorter documents when too few have seqlen tokens


@dataclass
class QuantizeSettings:
    include_lm_head: bool = False
    min_top1: float = None  # accuracy gate of the quantize check; None: quantize_report.MIN_TOP1
    max_kl: float = None  # None: quantize_report.MAX_KL (nats)


@dataclass
class ExportSettings:
    int8_format: str = "standard"  # standard runs on ONNX Runtime; vacc is the vendor's custom op
    ort_ops: str = "contrib"  # ONNX Runtime graphs: contrib (fused kernels) or onnx (standard ops only)
    seq_lens: list = None  # None: dynamic axes
    simplify: bool = True
    validation: str = "auto"  # ONNX Runtime validation: auto (whole when it fits, else streamed), whole, streamed


@dataclass
class CompileStageSettings:
    """None: the compile command's default (skywork_deploy.compile.config.CompileSettings)."""

    tp: int = 4
    max_input_len: int = None  # longest prompt
    max_seq_len: int = None  # longest prompt + answer
    sizes: list = None  # several [max_input_len, max_seq_len] pairs (or "IN:TOTAL"): one compile each
    b2s: bool = True
    align_qkv: bool = None
    calib_true_sequential: bool = None
    workers: int = 4
    name: str = None
    vamc: str = None
    timeout: float = None

    def problems(self):
        from ..compile.settings import parse_size
        from ..base.errors import ConfigError

        p = []
        if self.sizes is not None and (self.max_input_len is not None or self.max_seq_len is not None):
            p.append("compile.sizes: give either sizes or max_input_len/max_seq_len, not both")
        for item in self.sizes or []:
            try:
                parse_size(item, where="compile.sizes")
            except ConfigError as exc:
                p.append(str(exc))
        return p


@dataclass
class RunSettings:
    prompt: str = "What is 17 * 23? Think step by step."
    max_new_tokens: int = 16


@dataclass
class EvalSettings:
    """A short Math-Verify eval of the deployed bundle against the fp32 reference; off while dataset is None."""

    dataset: str = None  # JSON/JSONL/Parquet/CSV problems (skywork_deploy.evaluate.datasets)
    limit: int = 16
    samples: int = 1
    max_tokens: int = 512
    temperature: float = 0.6  # Skywork-OR1's sampling
    top_p: float = 0.95
    seed: int = 0
    problem_key: str = None
    answer_key: str = None


SECTIONS = {"calib": CalibSettings, "quantize": QuantizeSettings, "export": ExportSettings,
            "compile": CompileStageSettings, "run": RunSettings, "eval": EvalSettings}


@dataclass
class BuildSettings:
    model: str = None
    revision: str = None
    dtype: str = None
    output: str = None
    calib: CalibSettings = field(default_factory=CalibSettings)
    quantize: QuantizeSettings = field(default_factory=QuantizeSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    compile: CompileStageSettings = field(default_factory=CompileStageSettings)
    run: RunSettings = field(default_factory=RunSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def to_dict(self):
        return asdict(self)

    def to_yaml(self):
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @classmethod
    def from_dict(cls, data, where="build.yaml"):
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping of settings at the top level")
        top = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - top)
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(top))})")
        out = cls()
        for key, value in data.items():
            if key in SECTIONS:
                setattr(out, key, _section(SECTIONS[key], value, f"{where}: {key}"))
            else:
                setattr(out, key, _scalar(value, f"{where}: {key}"))
        return out

    @classmethod
    def from_yaml(cls, text, where="build.yaml"):
        """Duplicate keys, alias bombs and oversized files refused (base/strict.py) before anything is built."""
        return cls.from_dict(load_yaml(text, where) or {}, where)

    @classmethod
    def from_file(cls, path):
        """A build.yaml read as UTF-8 within the size budget (UTF-16, unreadable: one line naming it)."""
        return cls.from_yaml(read_input_text(path, ConfigError, YAML_MAX_BYTES, "build.yaml"), where=str(path))

    def resolve_paths(self, base):
        """Relative local paths of a build.yaml (model, output, calib.source) against its folder `base`.

        A `model:` or `calib.source:` that exists nowhere relative to `base` and looks like a hub id
        (org/name) stays as it is."""
        base = Path(base)

        def local(value, hub_ok):
            if value is None or Path(str(value)).expanduser().is_absolute():
                return value
            candidate = base / str(value)
            looks_hub = "/" in str(value) and not str(value).startswith((".", "~"))
            return value if hub_ok and looks_hub and not candidate.exists() else str(candidate)

        self.model = local(self.model, True)
        self.output = local(self.output, False)
        self.calib.source = local(self.calib.source, True)
        self.eval.dataset = local(self.eval.dataset, True)
        return self

    def override(self, dotted, value):
        """Set `section.key` (or a top-level key) from a command-line option; None leaves it unchanged."""
        if value is None:
            return
        if "." in dotted:
            section, key = dotted.split(".", 1)
            setattr(getattr(self, section), key, value)
        else:
            setattr(self, dotted, value)

    def check(self):
        """Every problem with these settings, collected; raises one ConfigError listing them."""
        problems = []
        if not self.model:
            problems.append("model: missing (give MODEL, --demo, or `model:` in build.yaml)")
        if self.dtype not in DTYPES:
            problems.append(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)} (use --dtype)")
        if self.dtype == "int8" and not (self.calib.dataset and self.calib.source):
            problems.append("calib: an int8 build needs calibration data (--calib-dataset and --calib-source)")
        if self.calib.dataset and self.calib.dataset not in CALIB_DATASETS:
            problems.append(f"calib.dataset: {self.calib.dataset!r} is not one of {', '.join(CALIB_DATASETS)}")
        if self.export.int8_format not in ("standard", "vacc"):
            problems.append("export.int8_format: must be standard or vacc")
        if self.export.ort_ops not in ("contrib", "onnx"):
            problems.append("export.ort_ops: must be contrib or onnx")
        from ..export.verify import VALIDATIONS

        if self.export.validation not in VALIDATIONS:
            problems.append(f"export.validation: must be one of {', '.join(VALIDATIONS)} (--validation)")
        for key, low, high in (("min_top1", 0, 1), ("max_kl", 0, float("inf"))):
            value = getattr(self.quantize, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not low <= value <= high):
                problems.append(f"quantize.{key}: expected a number in [{low}, {high}], got {value!r}")
        for key, low in (("nsamples", 1), ("seqlen", 1), ("seed", 0)):  # before any stage runs
            value = getattr(self.calib, key)
            if value is not None and _has_type(value, int) and value < low:
                problems.append(f"calib.{key}: {value} must be at least {low}")
        prompt = self.run.prompt
        if not isinstance(prompt, str) or not prompt or len(prompt.encode("utf-8", "replace")) > RUN_PROMPT_MAX_BYTES:
            problems.append(f"run.prompt: expected a non-empty text of at most {RUN_PROMPT_MAX_BYTES} bytes (a smoke "
                            f"test prompt), got {_sized(prompt)}")
        problems += self.compile.problems()
        if problems:
            raise ConfigError("invalid build settings:\n  " + "\n  ".join(problems))
        return self


def limit_problems(settings, max_positions):
    """Settings that cannot fit a model of `max_positions` positions (checked before any stage runs)."""
    sizes = [("run.max_new_tokens", settings.run.max_new_tokens), ("eval.max_tokens", settings.eval.max_tokens),
             ("compile.max_input_len", settings.compile.max_input_len),
             ("compile.max_seq_len", settings.compile.max_seq_len)]
    sizes += [("export.seq_lens", n) for n in settings.export.seq_lens or []]
    return [f"{key}: {value} is more than the model's {max_positions} positions (max_position_embeddings); "
            f"lower it" for key, value in sizes if _has_type(value, int) and value > max_positions]


def _sized(value):
    return f"{len(value)} characters" if isinstance(value, str) and value else repr(value)


def _scalar(value, where):
    if value is not None and not isinstance(value, (str, int, float, bool)):
        raise ConfigError(f"{where}: expected a single value, got {type(value).__name__}")
    return value


def _section(kind, value, where):
    if value is None:
        return kind()
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping")
    names = {f.name: f for f in fields(kind)}
    if kind is CompileStageSettings and "seq_lens" in value:
        from ..compile.settings import SEQ_LENS_REPLACED

        raise ConfigError(f"{where}.{SEQ_LENS_REPLACED} (in build.yaml: max_input_len, max_seq_len or sizes)")
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(names))})")
    out = kind()
    for key, item in value.items():
        default = getattr(out, key)
        if item is not None and default is not None and isinstance(default, bool) and not isinstance(item, bool):
            raise ConfigError(f"{where}.{key}: expected true or false, got {item!r}")
        if names[key].type in (list, "list"):
            _check_list(item, f"{where}.{key}", ints=key == "seq_lens")
        want = names[key].type
        if item is not None and want in (int, float, str) and not _has_type(item, want):
            raise ConfigError(f"{where}.{key}: expected {'a number' if want is float else want.__name__}, "
                              f"got {item!r}")
        setattr(out, key, item)
    return out


def _check_list(item, where, ints):
    if item is None:
        return
    if not isinstance(item, list):
        raise ConfigError(f"{where}: expected a list, e.g. [1024, 2048]")
    if ints and not all(_has_type(n, int) and n >= 1 for n in item):
        raise ConfigError(f"{where}: expected a list of positive integers, e.g. [128, 512], got {item!r}")


def _has_type(value, want):
    """YAML value `value` fits a field typed `want` (int: not bool; float: any real number; str: a string)."""
    if want is str:
        return isinstance(value, str)
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if want is int else isinstance(value, (int, float))
