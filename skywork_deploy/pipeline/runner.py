"""The build runner: stages in order, each cached by the hash of its inputs and options.

A stage writes its output folder `BUILD/<stage>/` (atomically, through the stage's own module) and then a
record `BUILD/.stages/<stage>.json` holding its key. A stage whose key is unchanged and whose record and
folder exist is skipped; `force` redoes everything; a build interrupted mid-stage has no record for that
stage, so the next run resumes there.
"""
import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path

from ..base.errors import DeployError, InputError
from ..base.fsutil import check_not_input, folder_lock, read_marker, sha256_file, write_json, written_by_us
from ..base.manifest import FORMAT, make_manifest
from ..base.memory import PeakMemory
from ..version import __version__

log = logging.getLogger(__name__)
RECORDS = ".stages"
OWNER = "owner.json"            # BUILD/.stages/owner.json: the names this build folder owns
TOP_FILES = ("build.yaml", "manifest.json")
STAGE_NAMES = ("patch", "calib", "quantize", "export", "validate", "compile")
LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime", "onnxsim", "safetensors", "tokenizers", "numpy")


def stage_key(name, options, upstream):
    blob = json.dumps({"stage": name, "options": options, "upstream": upstream, "tool": __version__},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def folder_fingerprint(folder):
    """A model folder's identity without reading its weights: small files by content; weight files by name,
    size and the sha256 of their safetensors header (which names every tensor with its shape and offsets)."""
    from ..base.spec import read_safetensors_header

    h = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        h.update(path.name.encode() + b"\0")
        if path.suffix == ".safetensors":
            header = json.dumps(read_safetensors_header(path), sort_keys=True).encode()
            h.update(str(path.stat().st_size).encode() + hashlib.sha256(header).digest())
        else:
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def artifacts(folder, root, skip_suffixes=()):
    """[{path, bytes, sha256}] of every file under `folder` (paths relative to the build root)."""
    out = []
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            entry = {"path": path.relative_to(root).as_posix(), "bytes": path.stat().st_size}
            if path.suffix in skip_suffixes:
                entry["sha256"] = None
                entry["note"] = "linked from the model folder; identified by the model fingerprint"
            else:
                entry["sha256"] = sha256_file(path)
            out.append(entry)
    return out


def library_versions():
    from importlib import metadata

    versions = {"python": platform.python_version(), "skywork-deploy": __version__}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class BuildFolder:
    """What a build folder's own record says it owns: only those names are ever replaced by a build."""

    def __init__(self, build_dir, inputs=()):
        self.dir = Path(build_dir)
        self.inputs = [i for i in inputs if i]
        self.path = self.dir / RECORDS / OWNER
        self.owned = self._read()

    def _read(self):
        data = read_marker(self.path)
        if data and data.get("format") == FORMAT and isinstance(data.get("owned"), list):
            return {name for name in data["owned"] if isinstance(name, str)}
        # a build folder from before the record: its manifest, or the cache records of its stages, say so
        records = {p.stem for p in (self.dir / RECORDS).glob("*.json")
                   if p.name != OWNER and (read_marker(p) or {}).get("stage") == p.stem}
        if written_by_us(self.dir) == "build" or records:
            return set(TOP_FILES) | records
        return set()

    def check(self, name):
        """Refuse `name` when it is an input or exists without being ours (someone else wrote it)."""
        target = self.dir / name
        check_not_input(target, self.inputs, option="build")
        if name not in self.owned and (target.exists() or target.is_symlink()):
            raise InputError(f"{target}: exists and was not written by a build of this folder (not in "
                             f"{self.path}); a build replaces only what it wrote: move it away or choose "
                             "another build folder")

    def claim(self, name):
        """Make `name` (a stage folder or top-level file) ours to replace; refuse one someone else wrote."""
        self.check(name)
        if name in self.owned:
            return
        self.owned.add(name)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"format": FORMAT, "stage": "build-owner", "owned": sorted(self.owned)})


@contextlib.contextmanager
def build_session(build_dir, inputs=()):
    """Lock `build_dir` for one build, check it against the inputs, and invalidate its old manifest.

    A second build of the same folder fails at once naming the first one's pid and host. `manifest.json` is
    removed before anything runs and written again only when the build ends.
    """
    build_dir = Path(build_dir)
    check_not_input(build_dir, inputs, option="-o/--out")  # nor may it contain its model: stages go beside it
    if build_dir.exists() and not build_dir.is_dir():
        raise InputError(f"-o/--out {build_dir}: is a file, not a build folder; choose another path")
    build_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(build_dir, "build"):
        folder = BuildFolder(build_dir, inputs)
        for name in STAGE_NAMES:  # every stage folder checked before the first stage runs
            folder.check(name)
        for name in TOP_FILES:
            folder.claim(name)
        (build_dir / "manifest.json").unlink(missing_ok=True)
        yield folder


class Runner:
    """Runs (name, options, upstream names, function) stages into `build_dir` with caching."""

    def __init__(self, build_dir, force=False, echo=None, folder=None):
        self.build_dir = Path(build_dir)
        self.force = force
        self.echo = echo or (lambda text: None)
        self.keys, self.results, self.rows, self.running = {}, {}, [], None
        self.folder = folder  # a BuildFolder: stage folders are replaced only when it owns them

    def record_path(self, name):
        return self.build_dir / RECORDS / f"{name}.json"

    def run(self, name, options, upstream, fn, inputs_identity=None):
        key = stage_key(name, options, {"inputs": inputs_identity, **{u: self.keys[u] for u in upstream}})
        self.keys[name] = key
        folder = self.build_dir / name
        record = self._read_record(name)
        if not self.force and record and record.get("key") == key and folder.exists():
            self.echo(f"[{name}] unchanged, skipped (cached)")
            record["skipped"] = True
            self.results[name] = record
            self.rows.append(record)
            return record
        if self.folder is not None:
            self.folder.claim(name)
        self.record_path(name).unlink(missing_ok=True)
        if folder.exists():
            shutil.rmtree(folder)
        self.echo(f"[{name}] running...")
        self.running = name  # the stage a failure is reported in (verdict line, --json "stage")
        start = time.perf_counter()
        with PeakMemory() as mem:
            result = fn(folder)
        record = {"stage": name, "key": key, "options": options, "skipped": False,
                  "seconds": round(time.perf_counter() - start, 3), "peak_rss_bytes": mem.peak,
                  "result": result}
        (self.build_dir / RECORDS).mkdir(parents=True, exist_ok=True)
        write_json(self.record_path(name), record)
        self.echo(f"[{name}] done in {record['seconds']:.1f} s, peak RSS {mem.peak / 2**30:.2f} GiB")
        self.results[name] = record
        self.rows.append(record)
        return record

    def _read_record(self, name):
        path = self.record_path(name)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None


def write_build_manifest(build_dir, settings, identity, runner, validation, verdict, skip_suffixes=(".safetensors",)):
    """BUILD/manifest.json: `accepted` and `verdict` (pipeline/verdict.py) say what was checked and how it went;
    `validation` holds the figures (`passed` only where a check ran)."""
    stages, arts = {}, []
    for row in runner.rows:
        name = row["stage"]
        stages[name] = {k: row[k] for k in ("options", "seconds", "peak_rss_bytes", "skipped", "key")}
        folder = Path(build_dir) / name
        if folder.exists():
            skips = skip_suffixes if name == "patch" else ()
            arts.extend(artifacts(folder, build_dir, skips))
    manifest = make_manifest("build", settings=settings.to_dict(), model=identity, versions=library_versions(),
                             stages=stages, stage_order=[row["stage"] for row in runner.rows], artifacts=arts, validation=validation,
                             accepted=verdict["accepted"], verdict=verdict,
                             host={"machine": platform.machine(), "cpus": os.cpu_count()})
    write_json(Path(build_dir) / "manifest.json", manifest)
    return manifest


def raise_if_failed(errors):
    if errors:
        raise DeployError("; ".join(errors))
