"""Stage 1, patch: write the VACC Qwen2 files and config_vacc.json into a model folder.

In place, every file that is changed or created is recorded in `.skywork_deploy_backup/` first, so that
`revert` restores the folder byte for byte. With an output folder, a new folder is built beside it, weight
files are hard-linked (else symlinked) instead of copied, and it is renamed into place at the end.
Patching is idempotent: the patched files are computed from the original config every time.

The patch manifest records the sha256 of every file written, so a hand edit is never discarded silently:
`revert` and a re-patch refuse while a patched file differs from what we wrote, unless `force` (then the
edited file is kept beside it as `<name>.edited-<time>` first). `patch_status` checks everything
`trust_remote_code` can reach: our three .py files, the config keys we wrote, no other .py file in the
folder, and no `auto_map` in any other JSON file (tokenizer, processor) unless the patch allowed them.
"""
import json
import logging
import os
import shutil
import time
from importlib import resources
from pathlib import Path

from ..base.errors import InputError, ModelFormatError, NetworkError
from ..base.fsutil import atomic_output_dir, link_or_copy, sha256_bytes, sha256_file, write_json
from ..base.manifest import read_manifest, write_manifest
from ..base.spec import ModelSpec, checkpoint_files, tokenizer_files

log = logging.getLogger(__name__)
SOURCE_FILES = ("configuration_qwen2_vacc.py", "modeling_qwen2_vacc.py", "quantization_vacc.py")
BACKUP_DIR = ".skywork_deploy_backup"
PATCH_MANIFEST = "skywork_deploy_patch.json"
CONFIG_FILES = ("config.json", "config_vacc.json")
AUTO_MAP = {
    "AutoConfig": "configuration_qwen2_vacc.Qwen2Config",
    "AutoModel": "modeling_qwen2_vacc.Qwen2ForCausalLM",
    "AutoModelForCausalLM": "modeling_qwen2_vacc.Qwen2ForCausalLM",
}
# config keys that decide which code runs and what it builds; quantize may change the others (dtype, tie).
PROTECTED_KEYS = (
    "auto_map", "_attn_implementation", "insert_slice", "iter_num", "model_type", "architectures",
    "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "max_position_embeddings", "rope_theta", "rope_scaling", "rms_norm_eps",
    "use_sliding_window", "sliding_window", "max_window_layers", "hidden_act",
)
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
    # transformers 5.x saves the RoPE base only inside rope_parameters; 4.45.2 (the vendor's pin) reads the
    # top-level key and would fall back to 10000 without it
    params = config.get("rope_parameters")
    if out.get("rope_theta") is None:
        theta = params.get("rope_theta") if isinstance(params, dict) else None
        out["rope_theta"] = float(theta if theta is not None else 10000.0)
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
    from ..base.hub import offline_reason

    offline = offline_reason()  # at once, instead of huggingface_hub's retries
    if offline:
        raise NetworkError(f"{model}: cannot download from the Hugging Face hub ({offline}); pass a local model "
                           "folder instead")
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
    if backup.is_file() and not backup.is_symlink():
        read_backup_record(folder)  # a backup is used only when its record is sound
        return backup.read_bytes()
    return (folder / "config.json").read_bytes()


def planned_files(folder, insert_slice=True):
    """{relative name: bytes} that a patch writes into `folder`."""
    try:
        original = json.loads(_original_config_bytes(folder))
    except (UnicodeDecodeError, ValueError):
        raise ModelFormatError(f"{folder / 'config.json'}: not valid JSON (restore the original config.json)") \
            from None
    patched = _json_bytes(vacc_config(original, insert_slice))
    files = dict(source_files())
    files["config_vacc.json"] = patched
    files["config.json"] = patched
    return files


def _write_bytes(path, data):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------- backup record and edits
def _plain_name(name):
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name \
        and "\0" not in name and not name.startswith("~")


def read_backup_record(folder):
    """The backup record of an in-place patch, checked: only plain names of files inside `folder`."""
    record_path = folder / BACKUP_DIR / "record.json"
    where = f"{record_path}"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise InputError(f"{where}: corrupt backup record (not readable JSON); restore the folder from another "
                         f"copy (the saved files are in {folder / BACKUP_DIR})") from None
    if not isinstance(record, dict) or not all(isinstance(record.get(k), list) for k in ("saved", "created")):
        raise InputError(f"{where}: corrupt backup record (expected lists 'saved' and 'created'); restore the "
                         "folder from another copy")
    for name in record["saved"] + record["created"]:
        if not _plain_name(name):
            raise InputError(f"{where}: refusing the entry {name!r}: a backup record names only files inside "
                             "the model folder (the record was edited or corrupted)")
    for name in record["saved"]:
        saved = folder / BACKUP_DIR / name
        if saved.is_symlink() or not saved.is_file():
            raise InputError(f"{where}: the saved copy of {name} is missing from {folder / BACKUP_DIR}; "
                             "restore the folder from another copy")
    return record


def _backup(folder, names):
    """Record the current state of `names` in the backup folder, once (the first patch's state wins)."""
    backup = folder / BACKUP_DIR
    record_path = backup / "record.json"
    if record_path.is_file():
        read_backup_record(folder)
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


def edited_files(folder):
    """Files we wrote into `folder` that differ from what we wrote (by the patch manifest's hashes)."""
    manifest = _patch_manifest(folder)
    written = (manifest or {}).get("written")
    if not isinstance(written, dict):
        return []
    out = []
    for name, digest in sorted(written.items()):
        path = folder / name
        if _plain_name(name) and path.is_file() and sha256_file(path) != digest:
            out.append(name)
    return out


def _protect_edits(folder, force, action):
    """Refuse `action` over hand-edited patched files unless `force`; with it, keep each as <name>.edited-<t>."""
    edited = edited_files(folder)
    if not edited:
        return []
    if not force:
        raise InputError(f"{folder / edited[0]}: edited since skywork-deploy wrote it ({len(edited)} file(s): "
                         f"{', '.join(edited)}); {action} would discard the edits: pass --force to keep a copy "
                         "of each beside it and go on")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kept = []
    for name in edited:
        copy = folder / f"{name}.edited-{stamp}"
        shutil.copy2(folder / name, copy)
        kept.append(copy.name)
        log.warning("%s was edited by hand; kept as %s", folder / name, copy)
    return kept


def _patch_manifest(folder):
    try:
        return read_manifest(folder / PATCH_MANIFEST, stage="patch")
    except InputError:
        return None


def _apply(folder, insert_slice, mode, source, allow_remote_code_files=False):
    files = planned_files(folder, insert_slice)
    if mode == "in-place":
        _backup(folder, files)
    for name, data in files.items():
        target = folder / name
        if not target.is_file() or target.read_bytes() != data:
            _write_bytes(target, data)
    vacc = json.loads(files["config_vacc.json"])
    write_manifest(folder, "patch", name=PATCH_MANIFEST, mode=mode, source=str(source),
                   options={"insert_slice": insert_slice, "allow_remote_code_files": allow_remote_code_files},
                   source_files=source_hashes(),
                   written={name: sha256_bytes(data) for name, data in files.items()},
                   protected_config={k: vacc[k] for k in PROTECTED_KEYS if k in vacc},
                   original_config_sha256=sha256_bytes(_original_config_bytes(folder)))
    return sorted(files)


def patch_model(model, out=None, insert_slice=True, revision=None, force=False, allow_remote_code_files=False):
    """Patch `model` in place, or into a new folder `out`. Returns a result dict for the CLI."""
    start = time.perf_counter()
    folder = resolve_model(model, revision)
    spec = check_folder(folder)
    kept = []
    if out is None:
        kept = _protect_edits(folder, force, "patching again")
        written = _apply(folder, insert_slice, "in-place", folder, allow_remote_code_files)
        target, links = folder, {}
    else:
        target = Path(out)
        with atomic_output_dir(target, inputs=[folder]) as tmp:
            links = _populate(folder, tmp)
            written = _apply(tmp, insert_slice, "copy", folder, allow_remote_code_files)
    return {"folder": str(target), "model": spec.name, "written": written, "weights_linked": links,
            "edits_kept": kept, "seconds": round(time.perf_counter() - start, 3),
            "status": patch_status(target)}


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
        read_backup_record(src)
        shutil.copy2(backup_config, dst / "config.json")
    return links


def revert(model, force=False):
    """Restore a folder patched in place to its exact state before the first patch."""
    folder = resolve_model(model)
    backup = folder / BACKUP_DIR
    if not (backup / "record.json").is_file():
        raise InputError(f"{folder}: no {BACKUP_DIR}/record.json, so the folder was not patched in place "
                         "by skywork-deploy (nothing to revert)")
    record = read_backup_record(folder)
    kept = _protect_edits(folder, force, "--revert")
    for name in record["saved"]:
        _write_bytes(folder / name, (backup / name).read_bytes())
        shutil.copystat(backup / name, folder / name)
    for name in record["created"]:
        target = folder / name
        if target.is_file() or target.is_symlink():
            target.unlink()
    shutil.rmtree(backup)
    return {"folder": str(folder), "restored": record["saved"], "removed": record["created"], "edits_kept": kept}


# ------------------------------------------------------------------------------------------ integrity
def patch_status(folder):
    """{"patched", "current", "problems"}: is `folder` patched with this version, and unchanged since?"""
    folder = Path(folder)
    manifest = read_manifest(folder / PATCH_MANIFEST, stage="patch")
    if manifest is None:
        return {"patched": False, "current": False,
                "problems": [f"{folder}: not patched (run `skywork-deploy patch {folder}`)"]}
    problems = []
    for name, digest in source_hashes().items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{path}: differs from this skywork-deploy version's file (older or modified)")
    options = manifest.get("options") if isinstance(manifest.get("options"), dict) else {}
    protected = manifest.get("protected_config")
    for name in CONFIG_FILES:
        problems.extend(_config_problems(folder / name, protected, options))
    problems.extend(remote_code_problems(folder, bool(options.get("allow_remote_code_files"))))
    return {"patched": True, "current": not problems, "problems": problems,
            "tool_version": manifest.get("tool_version")}


def _config_problems(path, protected, options):
    if not path.is_file():
        return [f"{path}: missing"]
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        return [f"{path}: not valid JSON"]
    if not isinstance(cfg, dict):
        return [f"{path}: not a JSON object"]
    expected = dict(protected) if isinstance(protected, dict) else {}
    expected.update(auto_map=AUTO_MAP, _attn_implementation="eager")
    if "insert_slice" in options:
        expected["insert_slice"] = bool(options["insert_slice"])
    changed = [k for k in expected if cfg.get(k) != expected[k]]
    if isinstance(protected, dict):  # a key we did not write appeared (older manifests lack the record)
        changed += [k for k in PROTECTED_KEYS if k in cfg and k not in expected]
    return [f"{path}: {key} changed since skywork-deploy wrote it ({cfg.get(key)!r}, expected "
            f"{expected.get(key)!r})" for key in changed]


def remote_code_problems(folder, allowed=False):
    """Code trust_remote_code could run besides ours: other .py files, auto_map in other JSON files."""
    problems = []
    for path in sorted(folder.rglob("*.py")):
        rel = path.relative_to(folder)
        if rel.parts[0] == BACKUP_DIR or (len(rel.parts) == 1 and rel.name in SOURCE_FILES):
            continue
        problems.append(f"{path}: a Python file skywork-deploy did not write (trust_remote_code could import it; "
                        "remove it)")
    if allowed:
        return problems
    for path in sorted(folder.glob("*.json")):
        if path.name in CONFIG_FILES or path.name == PATCH_MANIFEST:
            continue
        try:
            raw = path.read_bytes()
            # vocab.json / tokenizer.json run to megabytes: parse only the files that mention the key
            data = json.loads(raw.decode("utf-8")) if b'"auto_map"' in raw else None
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if isinstance(data, dict) and "auto_map" in data:
            problems.append(f"{path}: has an auto_map (trust_remote_code would run its code); remove it, or "
                            "patch the folder with --allow-remote-code-files if you trust it")
    return problems


def require_current_patch(folder):
    """Raise unless `folder` is patched with this version's source files."""
    status = patch_status(folder)
    if not status["current"]:
        raise ModelFormatError(f"{status['problems'][0]} (run `skywork-deploy patch {folder}` to update it)")
    return status


def verify_if_patched(folder):
    """Raise, naming what changed, when `folder` carries our patch manifest but no longer matches it."""
    status = patch_status(folder)
    if status["patched"] and not status["current"]:
        first = status["problems"][0]
        more = f" (and {len(status['problems']) - 1} more problem(s))" if len(status["problems"]) > 1 else ""
        ours = any(f"{folder / name}:" in first for name in SOURCE_FILES + CONFIG_FILES)
        fix = (f"; the patched folder changed since skywork-deploy wrote it (check it, then "
               f"`skywork-deploy patch --force {folder}` to re-patch)") if ours else ""
        raise ModelFormatError(f"{first}{more}{fix}")
    return status
