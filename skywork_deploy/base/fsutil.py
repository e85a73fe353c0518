"""Files written safely: the output rule, temporary folders renamed at the end, locks, hashes, links.

The output rule, for every path a command writes: the output may never be, contain or sit inside an input;
an existing output is replaced only when skywork-deploy wrote it (a folder: with `overwrite` and a manifest of
ours, `check_output`; a file: when `ours(path)` recognises it, `check_output_file`); and every file is written
to a temporary name and renamed (`write_text`, `atomic_file`) or opened as a new file (`open_new`), so it is
never opened through an existing link. Temporary folders carry a marker file naming the process that made
them, so a later run of the same command removes the ones a killed run left behind (`remove_stale`).
"""
import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from .errors import InputError
from .testpoint import pause_point

log = logging.getLogger(__name__)
MARKER = ".skywork_deploy_partial.json"    # inside every temporary folder we create
LOCK_NAME = ".skywork_deploy.lock"         # inside a folder a long command owns while it runs
STAGING = "making-"                        # a temporary folder's name until its marker is written
# Manifests that say "skywork-deploy wrote this folder" (patch's only for a copy, never for an in-place patch).
OUR_MANIFESTS = ("skywork_deploy_manifest.json", "manifest.json", "skywork_deploy_patch.json")


def sha256_file(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def write_json(path, data):
    """Write JSON atomically (temp file in the same folder, then rename), sorted and indented."""
    path = Path(path)
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    write_text(path, text)


def write_text(path, text, fsync=False):
    """Write `text` through a new temporary file renamed over `path` (a link at `path` is replaced, never
    written through). `fsync`: the data reaches the disk before the rename (crash-safe journals)."""
    with atomic_file(path, "w", fsync=fsync) as fh:
        fh.write(text)


@contextlib.contextmanager
def atomic_file(path, mode="w", fsync=False, keep_on_error=False, tmp_dir=None):
    """A file handle on a new temporary file beside `path` (or in `tmp_dir`, same file system), created with
    O_EXCL, so never an existing link, and renamed to `path` at the end; removed on an error unless
    `keep_on_error` (a log wanted after a failure)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=tmp_dir or path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            try:
                yield fh
            finally:
                if fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if keep_on_error and os.path.exists(tmp):
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(path.parent)


def fsync_dir(folder):
    """Make renames and new names inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


# ------------------------------------------------------------------------------------- the output rule
def _real(path):
    return Path(os.path.realpath(Path(path).expanduser()))


def check_not_input(out, inputs, option="-o/--out"):
    """Refuse an output that is, contains or sits inside one of `inputs` (paths; None entries are ignored)."""
    real_out = _real(out)
    for given in inputs:
        if given is None or not Path(str(given)).expanduser().exists():
            continue  # a hub id or a missing path: nothing on disk to protect
        real_in = _real(given)
        if real_out == real_in or _same_inode(out, given):  # a hard link to the input is the input
            raise InputError(f"{option} {out}: is the input {given}; choose a new output")
        if real_out in real_in.parents:
            raise InputError(f"{option} {out}: contains the input {given}; choose an output outside it")
        if real_in in real_out.parents:
            raise InputError(f"{option} {out}: is inside the input {given}; choose an output outside it")


def _same_inode(a, b):
    try:
        return os.path.samefile(Path(a).expanduser(), Path(b).expanduser())
    except OSError:
        return False


def check_output_file(path, inputs=(), option="-o/--output", ours=None):
    """The output rule for one file (see the module docstring). Returns True when an existing file of ours
    will be replaced. `ours(path) -> bool` recognises a file skywork-deploy wrote (None: never replace one)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise InputError(f"{option} {path}: is a folder; give a file name")
    check_not_input(path, inputs, option)
    if path.is_symlink():
        raise InputError(f"{option} {path}: is a symbolic link; skywork-deploy never writes through or replaces "
                         "a link (remove it or choose another file)")
    if not path.exists():
        return False
    if not path.is_file() or ours is None or not ours(path):
        raise InputError(f"{option} {path}: exists and was not written by skywork-deploy, so it is not replaced; "
                         "remove it yourself or choose another file")
    return True


def starts_with(prefix):
    """An `ours` test for check_output_file: the file begins with the bytes `prefix` (a stamp we write)."""
    def test(path):
        try:
            with open(path, "rb") as fh:
                return fh.read(len(prefix)) == prefix
        except OSError:
            return False
    return test


def ours_json(path):
    """An `ours` test for check_output_file: a JSON object carrying our format key (manifests, records)."""
    return (read_marker(path) or {}).get("format") == "skywork-deploy"


def written_by_us(folder):
    """The stage name when `folder` carries a manifest skywork-deploy wrote for its own output, else None."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return None
    for name in OUR_MANIFESTS:
        data = read_marker(folder / name)
        if data is None or data.get("format") != "skywork-deploy" or not isinstance(data.get("stage"), str):
            continue
        if name == "skywork_deploy_patch.json" and data.get("mode") != "copy":
            continue  # a model folder patched in place is the user's folder, never ours to delete
        return data["stage"]
    return None


def open_new(path, inputs=(), option="the log", ours=None):
    """Open `path` for writing as a new file, for a log read while it grows: the output rule checked, an old
    file of ours removed first, then O_EXCL | O_NOFOLLOW, so never through a link that appeared meanwhile."""
    if check_output_file(path, inputs, option, ours):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    return os.fdopen(fd, "w", encoding="utf-8")


def check_output(out, inputs=(), overwrite=False, option="-o/--out"):
    """The output rule (see the module docstring). Returns the stage of the folder `overwrite` would replace."""
    out = Path(out)
    check_not_input(out, inputs, option)
    if not (out.exists() or out.is_symlink()):
        return None
    if not overwrite:
        raise InputError(f"{option} {out}: already exists (choose another output folder, or pass --overwrite "
                         "to replace a folder skywork-deploy wrote)")
    if out.is_symlink():
        raise InputError(f"{option} {out}: is a symbolic link; --overwrite replaces only real folders "
                         "skywork-deploy wrote (remove the link or choose another output folder)")
    stage = written_by_us(out)
    if stage is None:
        raise InputError(f"{option} {out}: exists and was not written by skywork-deploy (no manifest of ours), "
                         "so --overwrite will not delete it; remove it yourself or choose another output folder")
    return stage


# ------------------------------------------------------------------------------------- markers and locks
def _process_start(pid):
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # psutil missing or the process is gone
        return None


def owner_record(**extra):
    pid = os.getpid()
    return {"format": "skywork-deploy", "pid": pid, "host": socket.gethostname(), "started": time.time(),
            "process_start": _process_start(pid), **extra}


def read_marker(path):
    """A JSON object from `path`, or None when it is absent or unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def owner_alive(record):
    """True unless `record`'s process is known to be gone (another host counts as alive: we cannot tell)."""
    if record.get("host") != socket.gethostname():
        return True
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = record.get("process_start")
    now = _process_start(pid)
    return started is None or now is None or abs(now - started) < 1.0  # else the pid was reused


def owner_text(record):
    return f"pid {record.get('pid')} on {record.get('host')}"


def _remove_marked(folder):
    """Delete a marked folder, its marker last, so an interrupted delete stays recognisable. A folder already
    moved away (export keeps a failed bundle as OUT.failed) is left alone: the error that moved it is the one
    to report, not a missing temporary folder."""
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        if child.name == MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                child.unlink()
    with contextlib.suppress(FileNotFoundError):
        (folder / MARKER).unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


def remove_stale(parent, prefix):
    """Remove folders `parent/prefix*` that carry our marker and whose process is gone. Returns their names."""
    removed = []
    parent = Path(parent)
    if not parent.is_dir():
        return removed
    for item in parent.iterdir():
        if not item.name.startswith(prefix) or item.is_symlink() or not item.is_dir():
            continue
        if item.name.startswith(prefix + STAGING) and time.time() - _mtime(item) > 60:
            with contextlib.suppress(OSError):
                item.rmdir()  # killed between mkdtemp and its marker: still empty, so rmdir (only) removes it
        record = read_marker(item / MARKER)
        if record is None or record.get("format") != "skywork-deploy" or owner_alive(record):
            continue
        _remove_marked(item)
        removed.append(item.name)
        log.info("removed %s, left by a killed run (%s)", item, owner_text(record))
    return removed


def _make_marked_dir(parent, prefix, target):
    """A new folder `parent/<prefix>XXXX` that has its marker from the moment it carries that name."""
    staging = Path(tempfile.mkdtemp(prefix=f"{prefix}{STAGING}", dir=parent))
    os.chmod(staging, 0o755)
    write_json(staging / MARKER, owner_record(kind="partial", target=str(target)))
    tmp = staging.with_name(prefix + staging.name[len(prefix) + len(STAGING):])
    os.rename(staging, tmp)
    return tmp


@contextlib.contextmanager
def work_dir(prefix):
    """A marked temporary folder in the system temp dir, removed at the end; stale ones of `prefix` go first."""
    base = Path(tempfile.gettempdir())
    remove_stale(base, prefix)
    tmp = _make_marked_dir(base, prefix, "work")
    try:
        yield tmp
    finally:
        _remove_marked(tmp)


@contextlib.contextmanager
def folder_lock(folder, what="build"):
    """Hold `folder/.skywork_deploy.lock` while the block runs; a live owner makes this fail at once."""
    path = Path(folder) / LOCK_NAME
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            record = read_marker(path)
            if record is None and time.time() - _mtime(path) < 10:
                time.sleep(0.2)  # being written by its owner right now
                continue
            if record is not None and owner_alive(record):
                raise InputError(f"{folder}: another {what} is running in this folder ({owner_text(record)}, "
                                 f"lock {path}); wait for it to finish or use another folder") from None
            log.warning("%s: taking over the lock of a %s that is gone (%s)", folder, what,
                        owner_text(record or {}))
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(owner_record(kind="lock", what=what), fh)
        break
    else:
        raise InputError(f"{folder}: locked ({path}); remove the lock file if no {what} is running")
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _mtime(path):
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# ------------------------------------------------------------------------------------- atomic folders
@contextlib.contextmanager
def atomic_output_dir(out, overwrite=False, inputs=(), option="-o/--out"):
    """Yield a temporary folder beside `out`; on success it is renamed to `out`, on failure removed.

    The output rule is checked first (`check_output`). An existing `out` that we wrote is moved aside and
    deleted only after the rename, and the log says what was replaced. Temporary folders a killed run left for
    the same `out` are removed first.
    """
    out = Path(out)
    replaced = check_output(out, inputs, overwrite, option)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent, f".{out.name}.partial-")
    remove_stale(out.parent, f".{out.name}.old-")
    tmp = _make_marked_dir(out.parent, f".{out.name}.partial-", out)
    try:
        pause_point("output")
        yield tmp
        check_output(out, inputs, overwrite, option)  # still true after the work (the folder may have changed)
    except BaseException:
        _remove_marked(tmp)
        raise
    (tmp / MARKER).unlink()
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        write_json(old / MARKER, owner_record(kind="old", target=str(out)))
    os.replace(tmp, out)
    if old is not None:
        _remove_marked(old)
        log.warning("replaced %s (a %s folder skywork-deploy wrote earlier)", out, replaced)  # said, never silent
