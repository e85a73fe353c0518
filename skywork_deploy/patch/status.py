"""Is a folder patched with this version and unchanged since? Everything `trust_remote_code` can reach.

`patch_status` checks our three .py files, the config keys we wrote, no other .py file in the folder, no
`auto_map` in any other JSON file (tokenizer, processor) unless the patch allowed them, and names an interrupted
patch or revert with the command that finishes or undoes it.
"""
import json
from pathlib import Path

from ..base.errors import InputError, ModelFormatError
from ..base.fsutil import sha256_file
from ..base.manifest import read_manifest
from .backup import interrupted_problem
from .files import AUTO_MAP, BACKUP_DIR, CONFIG_FILES, PATCH_MANIFEST, PROTECTED_KEYS, SOURCE_FILES, plain_name, \
    source_hashes


def patch_manifest(folder):
    try:
        return read_manifest(Path(folder) / PATCH_MANIFEST, stage="patch")
    except InputError:
        return None


def edited_files(folder):
    """Files we wrote into `folder` that differ from what we wrote (by the patch manifest's hashes)."""
    written = (patch_manifest(folder) or {}).get("written")
    if not isinstance(written, dict):
        return []
    out = []
    for name, digest in sorted(written.items()):
        path = Path(folder) / name
        if plain_name(name) and path.is_file() and sha256_file(path) != digest:
            out.append(name)
    return out


def patch_status(folder):
    """{"patched", "current", "problems"}: is `folder` patched with this version, and unchanged since?"""
    folder = Path(folder)
    manifest = read_manifest(folder / PATCH_MANIFEST, stage="patch")
    if manifest is None:
        interrupted = interrupted_problem(folder)
        problem = interrupted or f"{folder}: not patched (run `skywork-deploy patch {folder}`)"
        return {"patched": False, "current": False, "problems": [problem], "interrupted": bool(interrupted)}
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
    if status.get("interrupted"):
        raise ModelFormatError(status["problems"][0])
    if status["patched"] and not status["current"]:
        first = status["problems"][0]
        more = f" (and {len(status['problems']) - 1} more problem(s))" if len(status["problems"]) > 1 else ""
        ours = any(f"{folder / name}:" in first for name in SOURCE_FILES + CONFIG_FILES)
        fix = (f"; the patched folder changed since skywork-deploy wrote it (check it, then "
               f"`skywork-deploy patch --force {folder}` to re-patch)") if ours else ""
        raise ModelFormatError(f"{first}{more}{fix}")
    return status
