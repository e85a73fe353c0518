"""Files written safely: the output rule, temporary folders renamed at the end, locks, hashes, links.

The output rule, for every command that writes (`check_output`): the output may never be, contain or sit
inside an input; an existing output is replaced only with `overwrite`, and only when it carries a manifest of
ours (a folder skywork-deploy wrote). Temporary folders carry a marker file naming the process that made
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

from .errors import ExternalToolError, InputError

log = logging.getLogger(__name__)
MARKER = ".skywork_deploy_partial.json"    # inside every temporary folder we create
LOCK_NAME = ".skywork_deploy.lock"         # inside a folder a long command owns while it runs
STAGING = "making-"                        # a temporary folder's name until its marker is written
# Manifests that say "skywork-deploy wrote this folder" (patch's only for a copy, never for an in-place patch).
OUR_MANIFESTS = ("skywork_deploy_manifest.json", "manifest.json", "skywork_deploy_patch.json")


def wait_interruptibly(proc, timeout=None, poll=0.25):
    """`proc.wait(timeout)` that Ctrl-C always interrupts.

    A blocking wait never returns to Python when SIGINT is delivered to another thread of the process (the
    output reader), so KeyboardInterrupt would wait for the child to exit; short waits in a loop let the main
    thread notice it within `poll` seconds. Raises subprocess.TimeoutExpired at `timeout`, as wait does.
    """
    import subprocess

    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = poll if deadline is None else min(poll, deadline - time.monotonic())
        try:
            return proc.wait(timeout=max(left, 0))
        except subprocess.TimeoutExpired:
            if deadline is not None and time.monotonic() >= deadline:
                raise


def find_tool(name, option, env_var, explicit=None, environ=None, missing_hint=""):
    """An external program's absolute path: `explicit` (the option), else $env_var, else `name` on PATH."""
    environ = os.environ if environ is None else environ
    for source, value in ((option, explicit), (env_var, environ.get(env_var))):
        if value:
            found = shutil.which(value, path=environ.get("PATH"))
            if found is None:
                raise ExternalToolError(f"{name}: {source} {value} is not an executable file "
                                        "(fix the path or make it executable)")
            return str(Path(found).absolute())
    found = shutil.which(name, path=environ.get("PATH"))
    if found is None:
        raise ExternalToolError(f"{name} not found: {option} not given, {env_var} not set, no `{name}` on PATH; "
                                f"{missing_hint}")
    return str(Path(found).absolute())


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


def write_text(path, text):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------------- the output rule
def _real(path):
    return Path(os.path.realpath(Path(path).expanduser()))


def check_not_input(out, inputs, option="-o/--out", may_contain=False):
    """Refuse an output that is, contains or sits inside one of `inputs` (paths; None entries are ignored).

    `may_contain` lets a build folder hold its input (the demo's model lives in BUILD/model); its stage
    folders are then checked one by one.
    """
    real_out = _real(out)
    for given in inputs:
        if given is None or not Path(str(given)).expanduser().exists():
            continue  # a hub id or a missing path: nothing on disk to protect
        real_in = _real(given)
        if real_out == real_in:
            raise InputError(f"{option} {out}: is the input {given}; choose a new output folder")
        if real_out in real_in.parents and not may_contain:
            raise InputError(f"{option} {out}: contains the input {given}; choose an output folder outside it")
        if real_in in real_out.parents:
            raise InputError(f"{option} {out}: is inside the input {given}; choose an output folder outside it")


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


def peak_rss_bytes():
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
