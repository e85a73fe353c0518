"""Stage 1, patch: write the VACC Qwen2 files and config_vacc.json into a model folder.

In place, every file that is changed or created is recorded in `.skywork_deploy_backup/` first, so that
`revert` restores the folder byte for byte. With an output folder, a new folder is built beside it, weight
files are hard-linked (else symlinked) instead of copied, and it is renamed into place at the end.
Patching is idempotent: the patched files are computed from the original config every time.
"""
import json
import logging
import os
import shutil
import time
from importlib import resources
from pathlib import Path

from .errors import InputError, ModelFormatError, NetworkError
from .fsutil import atomic_output_dir, link_or_copy, sha256_bytes, sha256_file, write_json
from .manifest import read_manifest, write_manifest
from .spec import ModelSpec, checkpoint_files, read_config, tokenizer_files

log = logging.getLogger(__name__)
SOURCE_FILES = ("configuration_qwen2_vacc.py", "modeling_qwen2_vacc.py", "quantization_vacc.py")
BACKUP_DIR = ".skywork_deploy_backup"
PATCH_MANIFEST = "skywork_deploy_patch.json"
AUTO_MAP = {
    "AutoConfig": "configuration_qwen2_vacc.Qwen2Config",
    "AutoModel": "modeling_qwen2_vacc.Qwen2ForCausalLM",
    "AutoModelForCausalLM": "modeling_qwen2_vacc.Qwen2ForCausalLM",
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def source_files():
    """{file name: bytes} of the packaged VACC model files."""
    pkg = resources.files("skywork_deploy.source_code")
    return {name: pkg.joinpath(name).read_bytes() for name in SOURCE_FILES}


def source_hashes():
    return {name: sha256_bytes(data) for name, data in source_files().items()}


def vacc_config(config, insert_slice=True):
    """config.json's dict with the vendor keys added (original key order kept, new keys appended)."""
    out = dict(config)
    out["auto_map"] = dict(AUTO_MAP)
    out["_attn_implementation"] = "eager"
    out["insert_slice"] = bool(insert_slice)
    return out


def _json_bytes(data):
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def resolve_model(model, revision=None):
    """A local folder as a Path, or a hub id downloaded with huggingface_hub when a network exists."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{path}: not a folder (pass the model folder that holds config.json)")
        return path
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise InputError(f"{model}: no such folder (pass a local model folder or a hub id like org/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise NetworkError(f"{model}: huggingface_hub is not installed; pass a local folder instead") from None
    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=[
            "*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]))
    except Exception as exc:  # offline, unknown repo, gated...: all end the same way for the user
        raise NetworkError(f"{model}: cannot download from the Hugging Face hub ({type(exc).__name__}); "
                           "pass a local model folder instead") from None


def check_folder(folder):
    """Everything patch needs, checked before anything is written. Returns the ModelSpec."""
    spec = ModelSpec.from_folder(folder)
    checkpoint_files(folder)
    tokenizer_files(folder)
    return spec


def _original_config_bytes(folder):
    """config.json as it was before any patch (from the backup when the folder is patched already)."""
    backup = folder / BACKUP_DIR / "config.json"
    return backup.read_bytes() if backup.is_file() else (folder / "config.json").read_bytes()


def planned_files(folder, insert_slice=True):
    """{relative name: bytes} that a patch writes into `folder`."""
    original = json.loads(_original_config_bytes(folder))
    patched = _json_bytes(vacc_config(original, insert_slice))
    files = dict(source_files())
    files["config_vacc.json"] = patched
    files["config.json"] = patched
    return files


def _write_bytes(path, data):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _backup(folder, names):
    """Record the current state of `names` in the backup folder, once (the first patch's state wins)."""
    backup = folder / BACKUP_DIR
    record_path = backup / "record.json"
    if record_path.is_file():
        return
    backup.mkdir(exist_ok=True)
    record = {"created": [], "saved": []}
    for name in sorted(names):
        if (folder / name).exists():
            shutil.copy2(folder / name, backup / name)
            record["saved"].append(name)
        else:
            record["created"].append(name)
    record["created"].append(PATCH_MANIFEST)
    write_json(record_path, record)


def _apply(folder, insert_slice, mode, source):
    files = planned_files(folder, insert_slice)
    if mode == "in-place":
        _backup(folder, files)
    for name, data in files.items():
        target = folder / name
        if not target.is_file() or target.read_bytes() != data:
            _write_bytes(target, data)
    write_manifest(folder, "patch", name=PATCH_MANIFEST, mode=mode, source=str(source),
                   options={"insert_slice": insert_slice},
                   source_files=source_hashes(),
                   original_config_sha256=sha256_bytes(_original_config_bytes(folder)))
    return sorted(files)


def patch_model(model, out=None, insert_slice=True, revision=None):
    """Patch `model` in place, or into a new folder `out`. Returns a result dict for the CLI."""
    start = time.perf_counter()
    folder = resolve_model(model, revision)
    spec = check_folder(folder)
    if out is None:
        written = _apply(folder, insert_slice, "in-place", folder)
        target, links = folder, {}
    else:
        target = Path(out)
        if target.resolve() == folder.resolve():
            raise InputError(f"{out}: the output folder is the model folder (omit -o to patch in place)")
        with atomic_output_dir(target) as tmp:
            links = _populate(folder, tmp)
            written = _apply(tmp, insert_slice, "copy", folder)
    return {"folder": str(target), "model": spec.name, "written": written, "weights_linked": links,
            "seconds": round(time.perf_counter() - start, 3), "status": patch_status(target)}


def _populate(src, dst):
    """Copy small files from `src` to `dst` and link the weight files; returns {file: link method}."""
    links = {}
    for item in sorted(src.iterdir()):
        if item.name in (BACKUP_DIR, PATCH_MANIFEST) or item.name.startswith("."):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name)
        elif item.name.endswith(WEIGHT_SUFFIXES):
            links[item.name] = link_or_copy(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)
    backup_config = src / BACKUP_DIR / "config.json"
    if backup_config.is_file():  # an already patched source: start from its original config
        shutil.copy2(backup_config, dst / "config.json")
    return links


def revert(model):
    """Restore a folder patched in place to its exact state before the first patch."""
    folder = resolve_model(model)
    backup = folder / BACKUP_DIR
    record_path = backup / "record.json"
    if not record_path.is_file():
        raise InputError(f"{folder}: no {BACKUP_DIR}/record.json, so the folder was not patched in place "
                         "by skywork-deploy (nothing to revert)")
    record = json.loads(record_path.read_text())
    for name in record["saved"]:
        shutil.copy2(backup / name, folder / name)
    for name in record["created"]:
        if (folder / name).exists():
            (folder / name).unlink()
    shutil.rmtree(backup)
    return {"folder": str(folder), "restored": record["saved"], "removed": record["created"]}


def patch_status(folder):
    """{"patched", "current", "problems"}: is `folder` patched with this version's source files?"""
    folder = Path(folder)
    problems = []
    manifest = read_manifest(folder / PATCH_MANIFEST, stage="patch")
    if manifest is None:
        return {"patched": False, "current": False,
                "problems": [f"{folder}: not patched (run `skywork-deploy patch {folder}`)"]}
    expected = source_hashes()
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{path}: differs from this skywork-deploy version's file (older or modified)")
    cfg = read_config(folder)
    if cfg.get("auto_map") != AUTO_MAP:
        problems.append(f"{folder / 'config.json'}: auto_map missing or changed")
    if not (folder / "config_vacc.json").is_file():
        problems.append(f"{folder / 'config_vacc.json'}: missing")
    return {"patched": True, "current": not problems, "problems": problems,
            "tool_version": manifest.get("tool_version")}


def require_current_patch(folder):
    """Raise unless `folder` is patched with this version's source files."""
    status = patch_status(folder)
    if not status["current"]:
        raise ModelFormatError(f"{status['problems'][0]} (run `skywork-deploy patch {folder}` to update it)")
    return status
