"""Stage 1, patch: write the VACC Qwen2 files and config_vacc.json into a model folder.

In place, every file that is changed or created is recorded in `.skywork_deploy_backup/` first (crash-safe at
every instant: backup.py), so that `revert` restores the folder byte for byte, also after a kill. With an
output folder, a new folder is built beside it, weight files are hard-linked (else symlinked) instead of
copied, and it is renamed into place at the end. Patching is idempotent: the patched files are computed from
the original config every time.

The patch manifest records the sha256 of every file written, so a hand edit is never discarded silently:
`revert` and a re-patch refuse while a patched file differs from what we wrote, unless `force` (then the
edited file is kept beside it as `<name>.edited-<time>` first).
"""
import json
import logging
import os
import shutil
import time
from pathlib import Path

from ..base.errors import InputError, ModelFormatError, NetworkError
from ..base.fsutil import atomic_file, atomic_output_dir, folder_lock, sha256_bytes
from ..base.manifest import write_manifest
from ..base.spec import ModelSpec
from ..base.tokfiles import check_model_files
from ..base.testpoint import pause_point
from .backup import has_backup, make_backup, read_backup_record, remove_leftovers, replace_file, restore
from .files import BACKUP_DIR, PATCH_MANIFEST, PROTECTED_KEYS, WEIGHT_SUFFIXES, json_bytes, source_files, \
    source_hashes, vacc_config
from .status import edited_files, patch_status

log = logging.getLogger(__name__)


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


def check_folder(folder, allow_extra_tensors=False, check_vocab=True):
    """Everything patch needs (config, shards and their tensors, tokenizer files and, with `check_vocab`, a
    vocab_size covering every token id), checked before anything is written. Returns the ModelSpec."""
    spec = ModelSpec.from_folder(folder)
    check_model_files(folder, spec, allow_extra_tensors, vocab_coverage=check_vocab)
    return spec


def _original_config_bytes(folder):
    """config.json as it was before any patch (from the backup when the folder is patched already)."""
    backup = folder / BACKUP_DIR / "config.json"
    if has_backup(folder) and backup.is_file() and not backup.is_symlink():
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
    patched = json_bytes(vacc_config(original, insert_slice))
    files = dict(source_files())
    files["config_vacc.json"] = patched
    files["config.json"] = patched
    return files


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


def _apply(folder, files, insert_slice, mode, source, allow_remote_code_files=False):
    """Write `files` into `folder`, the manifest last (in place: each file atomically, see backup.py)."""
    if mode == "in-place":
        pause_point("patch")
        (folder / PATCH_MANIFEST).unlink(missing_ok=True)  # a re-patch: "interrupted" until the manifest is back
    for name, data in files.items():
        pause_point("patch")
        target = folder / name
        if target.is_symlink() or not target.is_file() or target.read_bytes() != data:
            if mode == "in-place":
                replace_file(folder, name, data)
            else:
                with atomic_file(target, "wb") as fh:
                    fh.write(data)
    pause_point("patch")
    vacc = json.loads(files["config_vacc.json"])
    write_manifest(folder, "patch", name=PATCH_MANIFEST, mode=mode, source=str(source),
                   options={"insert_slice": insert_slice, "allow_remote_code_files": allow_remote_code_files},
                   source_files=source_hashes(),
                   written={name: sha256_bytes(data) for name, data in files.items()},
                   protected_config={k: vacc[k] for k in PROTECTED_KEYS if k in vacc},
                   original_config_sha256=sha256_bytes(_original_config_bytes(folder)))
    return sorted(files)


def _patch_in_place(folder, insert_slice, force, allow_remote_code_files):
    with folder_lock(folder, "patch"):
        remove_leftovers(folder)
        kept = _protect_edits(folder, force, "patching again")
        files = planned_files(folder, insert_slice)
        made = make_backup(folder, files)
        try:
            return _apply(folder, files, insert_slice, "in-place", folder, allow_remote_code_files), kept
        except BaseException as exc:
            if made:  # this run's own half patch: undo it, the folder is as it was
                restore(folder, read_backup_record(folder))
            elif isinstance(exc, KeyboardInterrupt):
                exc.hint = (f"the re-patch of {folder} was interrupted: run `skywork-deploy patch {folder}` to "
                            f"finish it or `skywork-deploy patch --revert {folder}` to restore the original files")
            raise


def patch_model(model, out=None, insert_slice=True, revision=None, force=False, allow_remote_code_files=False,
                allow_extra_tensors=False, check_vocab=True):
    """Patch `model` in place, or into a new folder `out`. Returns a result dict for the CLI."""
    start = time.perf_counter()
    folder = resolve_model(model, revision)
    spec = check_folder(folder, allow_extra_tensors, check_vocab)
    kept = []
    if out is None:
        written, kept = _patch_in_place(folder, insert_slice, force, allow_remote_code_files)
        target, links = folder, {}
    else:
        target = Path(out)
        with atomic_output_dir(target, inputs=[folder]) as tmp:
            links = _populate(folder, tmp)
            written = _apply(tmp, planned_files(tmp, insert_slice), insert_slice, "copy", folder,
                             allow_remote_code_files)
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


def link_or_copy(src, dst):
    """Hard link `src` at `dst`, else a symlink, else a copy. Returns the method used."""
    src, dst = Path(src), Path(dst)
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:
        pass
    try:
        os.symlink(src.resolve(), dst)
        return "symlink"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


def revert(model, force=False):
    """Restore a folder patched in place (or whose patch or revert was interrupted) to its state before the
    first patch; remove what an interrupted run left behind."""
    folder = resolve_model(model)
    with folder_lock(folder, "patch"):
        removed = remove_leftovers(folder)
        if not has_backup(folder):
            if removed:
                return {"folder": str(folder), "restored": [], "removed": removed, "edits_kept": []}
            raise InputError(f"{folder}: no {BACKUP_DIR}/record.json, so the folder was not patched in place "
                             "by skywork-deploy (nothing to revert)")
        record = read_backup_record(folder)
        kept = _protect_edits(folder, force, "--revert")
        restore(folder, record)
    return {"folder": str(folder), "restored": record["saved"], "removed": record["created"] + removed,
            "edits_kept": kept}
