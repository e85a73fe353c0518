"""Files written safely: temporary folders renamed at the end, hashes, backups, links."""
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import InputError


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


@contextlib.contextmanager
def atomic_output_dir(out, overwrite=False):
    """Yield a temporary folder beside `out`; on success it is renamed to `out`, on failure removed.

    An existing `out` is refused unless `overwrite`; then it is moved aside and deleted only after the rename.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out}: already exists (choose another output folder or remove it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
