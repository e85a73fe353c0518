"""The settings of a build, typed: one dataclass per stage, read from build.yaml, overridden by options.

`BuildSettings.from_yaml(text)` refuses unknown keys (naming them) and wrong types; `to_dict()` is what
the build folder records in `build.yaml`, so a build can be repeated from its own record.
"""
from dataclasses import asdict, dataclass, field, fields

import yaml

from ..errors import ConfigError

DTYPES = ("fp16", "int8")
CALIB_DATASETS = ("c4", "ceval", "alpaca")


@dataclass
class CalibSettings:
    dataset: str = None  # c4 | ceval | alpaca; None: no calibration (fp16), or an error for int8
    source: str = None  # local file/folder or hub id
    nsamples: int = 128
    seqlen: int = None  # None: the dataset's vendor default
    seed: int = 0
    split: str = None


@dataclass
class QuantizeSettings:
    include_lm_head: bool = False


@dataclass
class ExportSettings:
    int8_format: str = "standard"  # standard runs on ONNX Runtime; vacc is the vendor's custom op
    ort_ops: str = "contrib"  # ONNX Runtime graphs: contrib (fused kernels) or onnx (standard ops only)
    seq_lens: list = None  # None: dynamic axes
    simplify: bool = True


@dataclass
class CompileStageSettings:
    tp: int = 4
    seq_lens: list = field(default_factory=lambda: [1024, 2048])
    b2s: bool = True
    workers: int = 4
    name: str = None
    vamc: str = None
    timeout: float = None


@dataclass
class RunSettings:
    prompt: str = "What is 17 * 23? Think step by step."
    max_new_tokens: int = 16


SECTIONS = {"calib": CalibSettings, "quantize": QuantizeSettings, "export": ExportSettings,
            "compile": CompileStageSettings, "run": RunSettings}


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
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
        return cls.from_dict(data or {}, where)

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
        if problems:
            raise ConfigError("invalid build settings:\n  " + "\n  ".join(problems))
        return self


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
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(names))})")
    out = kind()
    for key, item in value.items():
        default = getattr(out, key)
        if item is not None and default is not None and isinstance(default, bool) and not isinstance(item, bool):
            raise ConfigError(f"{where}.{key}: expected true or false, got {item!r}")
        if item is not None and isinstance(default, list) and not isinstance(item, list):
            raise ConfigError(f"{where}.{key}: expected a list, e.g. [1024, 2048]")
        setattr(out, key, item)
    return out
