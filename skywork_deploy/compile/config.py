"""Stage 5, compile (config): the `vamc compile` YAML written from the model itself, checked first.

`build_config(spec, checkpoint, settings)` is the pure mapping to the vendor's layout (settings.py holds the
options); `plan_compile(folder, settings)` adds the checks that need the model folder (checks.py) and returns
the YAML with every problem; `check_vamc_config` runs the same checks on an existing YAML. Nothing here runs
the compiler.
"""
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from ..base.errors import ConfigError, InputError
from ..base.manifest import find_stage_output
from ..base.spec import ModelSpec
from ..patch import PATCH_MANIFEST
from .checks import check_calib_tokenizer, check_checkpoint, check_dataset, check_tokenizer, dataset_block
from .settings import (
    PREFLIGHT_CHECKS, CompileSettings, _is_int, advise, check_settings, compiler_env, is_reasoning_model,
    needs_align_qkv,
)


log = logging.getLogger(__name__)


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


def build_config(spec, checkpoint, settings, dataset=None):
    """The vamc config as a dict in the vendor's key order (VENDOR.md §2). Pure: no checks, no I/O."""
    kwargs = {"b2s": settings.b2s, "tp": settings.tp, "model_arch": "vacc"}
    align = settings.resolved_align_qkv(spec)
    if align is not None:
        kwargs["align_qkv"] = align
    shape = _FlowList([_FlowList([settings.max_input_len]), _FlowList([settings.max_seq_len])])
    frontend = {"checkpoint": str(checkpoint), "type": "huggingface", "shape": {"input_ids": shape},
                "model_kwargs": kwargs}
    quantize_type = settings.resolved_quantize_type()
    if quantize_type is not None:
        frontend["quantize"] = {"type": quantize_type}
        if settings.calib_true_sequential is not None:
            frontend["quantize"]["calib_args"] = {"true_sequential": settings.calib_true_sequential}
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
    warnings: list
    checks: list  # the PREFLIGHT_CHECKS names that applied (dataset/calib_tokenizer only with calibration data)

    @property
    def name(self):
        return self.config["name"]

    @property
    def workspace(self):
        return self.config["workspace"]["path"]


def resolve_build_folder(model_folder, settings_list):
    """MODEL given as a build folder -> (its patched model, the settings with its calibration set for int8).

    A folder holding config.json is the model itself. Otherwise the patched model inside it (BUILD/patch/) is
    compiled, and an int8 size without `calib` gets the build's calibration set (BUILD/calib/), found the way
    `run`, `serve` and `eval` find a build's export bundle (base.manifest.find_stage_output).
    """
    folder = Path(model_folder).expanduser()
    if not folder.is_dir() or (folder / "config.json").is_file():
        return model_folder, settings_list
    patched, record = find_stage_output(folder, "patch", name=PATCH_MANIFEST)
    if patched is None:
        raise InputError(f"{model_folder}: no config.json and no patched model inside (pass the folder "
                         "patched by `skywork-deploy patch`, or a build folder holding one)")
    calib, _ = find_stage_output(folder, "calib")
    model_name = Path(str(record.get("source") or patched)).name  # named after the model, as `build` does
    resolved = [replace(s, model_name=s.model_name or model_name,
                        calib=str(calib) if s.dtype == "int8" and s.calib is None and calib else s.calib)
                for s in settings_list]
    log.info("build folder %s: compiling %s%s", folder, patched,
             f" with the calibration set {calib}" if any(s.calib == str(calib) for s in resolved) else "")
    return patched, resolved


def plan_compile(model_folder, settings):
    """Read the model folder, build the config and collect every problem (raises only for unreadable input)."""
    folder = Path(model_folder).expanduser()
    if not folder.is_dir():
        raise InputError(f"{model_folder}: not a folder (pass the patched model folder; "
                         "see `skywork-deploy patch`)")
    spec = ModelSpec.from_folder(folder)
    problems = check_settings(spec, settings) + check_checkpoint(folder)
    dataset = settings.dataset
    if settings.calib is not None:
        from ..calib import read_calib_manifest  # validates the manifest and its dataset_block

        manifest = read_calib_manifest(settings.calib)
        dataset = manifest["dataset_block"]
        problems += check_calib_tokenizer(manifest, folder, spec, where=f"calib ({settings.calib})")
    if dataset is not None:
        problems += check_dataset(dataset, spec, settings.dtype)
    warnings = advise(spec, settings, is_reasoning_model(spec, folder)) + check_tokenizer(folder)
    config = build_config(spec, folder.resolve(), settings, dataset if isinstance(dataset, dict) else None)
    skipped = ({"dataset"} if dataset is None else set()) | ({"calib_tokenizer"} if settings.calib is None else set())
    checks = [name for name in PREFLIGHT_CHECKS if name not in skipped]
    return CompilePlan(spec, folder.resolve(), settings, config, dump_yaml(config), compiler_env(spec), problems,
                       warnings, checks)


def make_compile_config(model_folder, settings):
    """(yaml_text, extra env for vamc, problems) for compiling `model_folder` with `settings`."""
    plan = plan_compile(model_folder, settings)
    return plan.yaml_text, plan.env, plan.problems


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
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(b, list) and len(b) == 1 and
                                                                _is_int(b[0]) for b in shape)):
        return p + [f"{path}: frontend.shape.input_ids must be [[max prompt length], [max total length]], "
                    "e.g. [[1024], [2048]]"]
    quantize_type = get("frontend.quantize.type")
    if get("backend.dtype") == "int8" and quantize_type is None:
        p.append(f"{path}: frontend.quantize.type is missing for an int8 build "
                 "(add quantize: {type: w8a16_gptq} under frontend)")
    align = get("frontend.model_kwargs.align_qkv")
    settings = CompileSettings.from_dict({
        "dtype": get("backend.dtype"), "tp": get("frontend.model_kwargs.tp"), "max_input_len": shape[0][0],
        "max_seq_len": shape[1][0], "b2s": bool(get("frontend.model_kwargs.b2s")), "workspace": get("workspace.path"),
        "workers": get("workspace.workers") or 1, "name": get("name"), "quantize_type": quantize_type,
        "align_qkv": align if isinstance(align, bool) else None,
        "calib_true_sequential": get("frontend.quantize.calib_args.true_sequential"),
        "dataset": data.get("dataset")}, where=str(path))
    plan = plan_compile(get("frontend.checkpoint"), settings)
    if align is None and needs_align_qkv(plan.spec, settings.tp):
        p.append(f"{path}: frontend.model_kwargs.align_qkv must be true: tp {settings.tp} does not divide the "
                 f"{plan.spec.num_kv_heads} KV heads (or {plan.spec.num_heads} heads) evenly")
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
