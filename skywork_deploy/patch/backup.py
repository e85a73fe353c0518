"""The backup of an in-place patch, crash-safe at every instant.

The journal, in the order it is written:
1. the files a patch changes are copied into `.skywork_deploy_backup.making-<pid>/` with `record.json`
   (each fsync'd), and that folder is renamed to `.skywork_deploy_backup/`: the backup appears complete with its
   record, or not at all;
2. the patch manifest is removed (a re-patch), then each file is replaced atomically (a temporary file inside
   the backup folder, fsync, rename);
3. the patch manifest is written last: only then is the folder "patched".
So at every instant the folder is untouched (perhaps beside a `making-` folder), or holds a complete backup
beside some changed files (an interrupted patch: `patch` finishes it, `patch --revert` undoes it), or is
patched. A revert removes the manifest, restores each file atomically, deletes what the patch created, then
renames the backup to `.skywork_deploy_backup.done-<pid>` before deleting it. `making-` and `done-` folders a
killed run left are removed, under the folder's lock, by the next patch or revert.
"""
import contextlib
import json
import os
import shutil
from pathlib import Path

from ..base.errors import InputError
from ..base.fsutil import atomic_file, fsync_dir, write_text
from ..base.testpoint import pause_point
from .files import BACKUP_DIR, PATCH_MANIFEST, plain_name

RECORD = "record.json"
LEFTOVER_PREFIXES = (f"{BACKUP_DIR}.making-", f"{BACKUP_DIR}.done-")


def read_backup_record(folder):
    """The backup record of an in-place patch, checked: only plain names of files inside `folder`."""
    record_path = Path(folder) / BACKUP_DIR / RECORD
    where = f"{record_path}"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise InputError(f"{where}: corrupt backup record (not readable JSON); restore the folder from another "
                         f"copy (the saved files are in {Path(folder) / BACKUP_DIR})") from None
    if not isinstance(record, dict) or not all(isinstance(record.get(k), list) for k in ("saved", "created")):
        raise InputError(f"{where}: corrupt backup record (expected lists 'saved' and 'created'); restore the "
                         "folder from another copy")
    for name in record["saved"] + record["created"]:
        if not plain_name(name):
            raise InputError(f"{where}: refusing the entry {name!r}: a backup record names only files inside "
                             "the model folder (the record was edited or corrupted)")
    for name in record["saved"]:
        saved = Path(folder) / BACKUP_DIR / name
        if saved.is_symlink() or not saved.is_file():
            raise InputError(f"{where}: the saved copy of {name} is missing from {Path(folder) / BACKUP_DIR}; "
                             "restore the folder from another copy")
    return record


def has_backup(folder):
    return (Path(folder) / BACKUP_DIR / RECORD).is_file()


def leftovers(folder):
    """Folders and temporary files an interrupted patch or revert left behind (ours by their names)."""
    folder = Path(folder)
    found = [p for p in folder.iterdir() if p.name.startswith(LEFTOVER_PREFIXES)]
    backup = folder / BACKUP_DIR
    if backup.is_dir() and not backup.is_symlink():
        found += [p for p in backup.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    return sorted(found)


def remove_leftovers(folder):
    """Remove `leftovers(folder)` (call it holding the folder's lock). Returns their names."""
    removed = []
    for path in leftovers(folder):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path.name)
    return removed


def interrupted_problem(folder):
    """The `--check` line for a folder an interrupted patch or revert left, else None."""
    folder = Path(folder)
    if has_backup(folder) and not (folder / PATCH_MANIFEST).is_file():
        return (f"{folder}: a patch or revert was interrupted ({BACKUP_DIR} holds the original files but there is "
                f"no {PATCH_MANIFEST}); run `skywork-deploy patch {folder}` to finish the patch or "
                f"`skywork-deploy patch --revert {folder}` to restore the original files")
    left = leftovers(folder)
    if left:
        return (f"{left[0]}: left by an interrupted patch or revert; run `skywork-deploy patch --revert {folder}` "
                "to remove it")
    return None


def make_backup(folder, names):
    """Save the current state of `names` (once: the first patch's state wins). True when made by this call."""
    folder = Path(folder)
    backup = folder / BACKUP_DIR
    if has_backup(folder):
        read_backup_record(folder)
        return False
    if backup.exists() or backup.is_symlink():
        raise InputError(f"{backup}: a backup folder without its {RECORD} (left by an older skywork-deploy); "
                         "check that the model files are the originals, then delete it")
    staging = folder / f"{LEFTOVER_PREFIXES[0]}{os.getpid()}"
    staging.mkdir()
    try:
        record = {"created": [], "saved": []}
        for name in sorted(names):
            pause_point("patch")
            if (folder / name).exists():
                _copy_durable(folder / name, staging / name)
                record["saved"].append(name)
            else:
                record["created"].append(name)
        record["created"].append(PATCH_MANIFEST)
        pause_point("patch")
        write_text(staging / RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n", fsync=True)
        pause_point("patch")
        os.rename(staging, backup)
        fsync_dir(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return True


def _copy_durable(src, dst):
    shutil.copy2(src, dst)
    with open(dst, "rb") as fh:
        os.fsync(fh.fileno())


def replace_file(folder, name, data):
    """Replace `folder/name` with `data` atomically, its temporary file inside the backup folder."""
    with atomic_file(Path(folder) / name, "wb", fsync=True, tmp_dir=Path(folder) / BACKUP_DIR) as fh:
        fh.write(data)


def restore(folder, record):
    """Undo an in-place patch (finished or interrupted): the folder as it was before the first patch."""
    folder = Path(folder)
    backup = folder / BACKUP_DIR
    pause_point("revert")
    with contextlib.suppress(FileNotFoundError):
        (folder / PATCH_MANIFEST).unlink()  # from here on the folder no longer claims to be patched
    for name in record["saved"]:
        pause_point("revert")
        target, saved = folder / name, backup / name
        data = saved.read_bytes()
        if target.is_symlink() or not target.is_file() or target.read_bytes() != data:
            replace_file(folder, name, data)
        shutil.copystat(saved, target)
    for name in record["created"]:
        pause_point("revert")
        target = folder / name
        if target.is_file() or target.is_symlink():
            target.unlink()
    pause_point("revert")
    done = folder / f"{LEFTOVER_PREFIXES[1]}{os.getpid()}"
    os.rename(backup, done)
    fsync_dir(folder)
    pause_point("revert")
    shutil.rmtree(done)
