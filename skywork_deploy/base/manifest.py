"""Small versioned manifests written beside each stage's output; the next stage reads them.

Every manifest has `format` (always "skywork-deploy"), `format_version`, `stage`, `tool_version`, and the
stage's own keys (inputs with hashes, options, outputs).
"""
import json
from pathlib import Path

from .errors import InputError
from .fsutil import write_json
from ..version import __version__

FORMAT = "skywork-deploy"
FORMAT_VERSION = 1
MANIFEST_NAME = "skywork_deploy_manifest.json"


def make_manifest(stage, **fields):
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "stage": stage, "tool_version": __version__,
            **fields}


def write_manifest(folder, stage, name=MANIFEST_NAME, **fields):
    data = make_manifest(stage, **fields)
    write_json(Path(folder) / name, data)
    return data


def read_manifest(folder_or_file, stage=None, name=MANIFEST_NAME):
    """Read a manifest; None when absent. Raises when it is unreadable, of another format or another stage."""
    path = Path(folder_or_file)
    if path.is_dir():
        path = path / name
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(f"{path}: manifest is not valid JSON (re-run the stage that wrote it)") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"{path}: not a skywork-deploy manifest")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise InputError(f"{path}: written by a newer skywork-deploy (format {data.get('format_version')}); "
                         "upgrade skywork-deploy")
    if stage is not None and data.get("stage") != stage:
        raise InputError(f"{path}: a manifest of stage {data.get('stage')!r}, expected {stage!r}")
    return data


def find_stage_output(folder, stage, name=MANIFEST_NAME):
    """(sub-folder, record) of the first `stage` output one or two levels inside `folder`, else (None, None).

    A build folder holds one output per stage (BUILD/patch/, BUILD/calib/, BUILD/export/, ...), each found by
    the record `name` it carries (a stage manifest, or the patch record) and that record's `stage`.
    """
    for depth in ("*", "*/*"):
        for candidate in sorted(Path(folder).glob(f"{depth}/{name}")):
            data = read_manifest(candidate)
            if data and data.get("stage") == stage:
                return candidate.parent, data
    return None, None
