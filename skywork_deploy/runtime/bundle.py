"""What `run` and `bench` read: an export bundle (graphs, config, tokenizer, manifest) or a model folder.

`open_bundle(path)` accepts
- an `export` output folder (manifest stage "export", `prefill.onnx` and `decode.onnx`);
- a `build` folder: the first sub-folder (depth 1 or 2) holding an export manifest;
- a model folder (config.json + safetensors), usable by the torch backend only.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..base.errors import DeployError, ModelFormatError, UsageError
from ..base.manifest import MANIFEST_NAME, find_stage_output, read_manifest
from ..base.spec import ModelSpec, read_config, read_json

GRAPHS = ("prefill", "decode")
# Keys an export manifest may use for the folder it was exported from (first present wins).
SOURCE_KEYS = ("source", "source_model", "model_folder")


@dataclass
class Bundle:
    folder: Path
    kind: str  # "export" or "model"
    config: dict
    spec: ModelSpec
    manifest: dict = field(default_factory=dict)

    @property
    def dtype(self):
        return self.manifest.get("dtype", "fp32")

    @property
    def buckets(self):
        """Fixed prefill lengths (sorted) or None when the graphs take any length."""
        lens = self.manifest.get("seq_lens")
        return sorted(int(x) for x in lens) if lens else None

    @property
    def vocab_size(self):
        return int(self.manifest.get("vocab_size") or self.spec.vocab_size)

    def graph_variant(self, int8_accuracy):
        """The pre-fused graph variant ("nbits", "nbits-exact") serving an int8 accuracy, or None (standard)."""
        for variant, info in (self.manifest.get("graph_variants") or {}).items():
            if int8_accuracy and info.get("int8_accuracy") == int8_accuracy:
                return variant
        return None

    def graph_path(self, name, int8_accuracy=None):
        """Path of the prefill or decode graph (the pre-fused variant for that int8 accuracy when the bundle
        has one, export/nbits.py); a clear error when the bundle has none."""
        if self.kind != "export":
            raise ModelFormatError(f"{self.folder}: a model folder, not an export bundle: it has no ONNX graphs "
                                   "(run `skywork-deploy export` on it, or use --backend torch)")
        variant = self.graph_variant(int8_accuracy)
        graphs = self.manifest["graph_variants"][variant] if variant else self.manifest.get("graphs") or {}
        info = graphs.get(name) or {}
        path = self.folder / info.get("file", f"{name}.onnx")
        if not path.is_file():
            raise ModelFormatError(f"{path}: the {name} graph is missing from the bundle "
                                   f"(re-run `skywork-deploy export` into {self.folder})")
        return path

    def source_chain(self):
        """The folders this bundle was made from, nearest first (export <- quantize <- patch <- the user's model),
        each where its stage recorded it or, for a build folder moved since, beside it under the same name."""
        chain, manifest, here = [], self.manifest, self.folder
        for _ in range(8):
            value = _recorded_source(manifest)
            if value is None:
                break
            path = Path(value)
            if not path.is_dir() and (here.parent / path.name).is_dir():
                path = here.parent / path.name
            chain.append(path)
            manifest, here = _stage_manifest(path), path
        return chain

    def source_model(self, float_only=False):
        """The model folder the torch backend loads: the folder itself, or the one the manifests record (with
        `float_only`, the first that is not a `quantize` output: the float reference, a build's patch/)."""
        if self.kind == "model":
            return self.folder
        for path in self.source_chain():
            if (path / "config.json").is_file() and not (float_only and
                                                         _stage_manifest(path).get("stage") == "quantize"):
                return path
        raise ModelFormatError(f"{self.folder / MANIFEST_NAME}: the source model folder it records is missing; "
                               "the torch backend needs the model weights (pass the model folder as BUNDLE)")

    def eos_ids(self, tokenizer=None):
        """Every end-of-sequence id: generation_config.json, config.json and the tokenizer's EOS."""
        ids = set()
        gen = self.folder / "generation_config.json"
        sources = [self.config]
        if gen.is_file():
            sources.insert(0, read_json(gen))
        for src in sources:
            value = src.get("eos_token_id")
            ids.update(value if isinstance(value, list) else ([] if value is None else [value]))
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        return sorted(int(i) for i in ids)

    def pad_id(self, tokenizer=None):
        if tokenizer is not None and tokenizer.pad_token_id is not None:
            return int(tokenizer.pad_token_id)
        eos = self.eos_ids(tokenizer)
        return eos[0] if eos else 0


def _recorded_source(manifest):
    """The folder a stage manifest says it read (export: `source`, quantize: `inputs.folder`), else None."""
    value = next((manifest.get(k) for k in SOURCE_KEYS if manifest.get(k)), None)
    if value is None:
        value = (manifest.get("inputs") or {}).get("folder") if isinstance(manifest.get("inputs"), dict) else None
    if isinstance(value, dict):  # {"path": ..., "sha256": ...} style entries
        value = value.get("path") or value.get("folder")
    return value if isinstance(value, str) else None


def _stage_manifest(folder):
    """The stage manifest of `folder` (a stage output's, or patch's own record), {} when there is none."""
    from ..patch.stage import PATCH_MANIFEST

    for name in (MANIFEST_NAME, PATCH_MANIFEST):
        try:
            data = read_manifest(folder, name=name)
        except DeployError:  # unreadable: it names nothing, the chain stops there
            return {}
        if data:
            return data
    return {}


def open_bundle(path):
    folder = Path(path)
    if not folder.is_dir():
        raise UsageError(f"{folder}: not a folder (pass an export bundle, a build folder or a model folder)")
    manifest = read_manifest(folder)
    if manifest is not None and manifest.get("stage") != "export":
        sub, sub_manifest = find_stage_output(folder, "export")
        if sub is not None:
            folder, manifest = sub, sub_manifest
        elif not (folder / "config.json").is_file():
            raise ModelFormatError(f"{folder}: a {manifest.get('stage')!r} output, not an export bundle "
                                   "(run `skywork-deploy export` first)")
        else:
            manifest = None
    elif manifest is None and not (folder / "config.json").is_file():
        sub, manifest = find_stage_output(folder, "export")
        if sub is None:
            raise UsageError(f"{folder}: no config.json and no export bundle inside "
                                   "(pass the output folder of `skywork-deploy export`)")
        folder = sub
    config = read_config(folder)
    spec = ModelSpec.from_config(config, name=folder.resolve().name, where=str(folder / "config.json"))
    if manifest is not None:
        bundle = Bundle(folder, "export", config, spec, manifest)
        for name in GRAPHS:
            bundle.graph_path(name)
        return bundle
    return Bundle(folder, "model", config, spec, {})


def load_tokenizer(bundle):
    """AutoTokenizer from the bundle folder, checked against the model's vocabulary."""
    from transformers import AutoTokenizer

    from ..base.spec import tokenizer_files

    tokenizer_files(bundle.folder)
    try:
        tok = AutoTokenizer.from_pretrained(str(bundle.folder))
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{bundle.folder}: cannot load the tokenizer ({exc})") from None
    if len(tok) > bundle.vocab_size:
        raise ModelFormatError(f"{bundle.folder}: the tokenizer has {len(tok)} tokens but the model's vocabulary "
                               f"has {bundle.vocab_size} rows (tokenizer files from another model? copy the "
                               "model's own tokenizer files into the bundle)")
    return tok
