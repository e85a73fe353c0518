"""Stage 5, compile (what vamc wrote): the model suites found and hashed, the tokenizer made servable.

A compiled model is a suite `mod.so` + `mod.json` + `mod.params` (VENDOR.md §3). Where vamc puts the suites
of an LLM is inferred, not verified: a decoder wrote `<workspace>/<name>/prefill_<N>_rank<r>/mod.*`, so every
folder under `<workspace>/<name>/` that holds a suite is recorded, whatever its name. `vastgenx serve` reads
the tokenizer from `<folder>/tokenizer`; when vamc did not write one, the checkpoint's is copied there.
"""
import re
import shutil
from pathlib import Path

from .checks import tokenizer_sources
from ..base.errors import ExternalToolError
from ..base.fsutil import sha256_file

SUITE_FILES = ("mod.so", "mod.json", "mod.params")
TOKENIZER_DIR = "tokenizer"
_RANK_RE = re.compile(r"rank(\d+)$")
# What is checked after vamc exits (the compile record lists them with the pre-flight checks).
OUTPUT_CHECKS = {
    "exit_code": "vamc exited 0",
    "output_folder": "<workspace>/<name>/ exists and holds files written by this run",
    "model_suites": "at least one complete suite (mod.so, mod.json, mod.params), each hashed",
    "tokenizer": "<workspace>/<name>/tokenizer/ holds the tokenizer (vamc's, or copied from the checkpoint)",
}


def find_suites(out_dir, since, tail=""):
    """[{path, files: {name: {bytes, sha256}}}] for every suite under out_dir; ExternalToolError if none.

    A folder with some of the three files but not all is an error naming what is missing; a suite whose
    files all predate `since` (an earlier run's) does not count.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ExternalToolError(f"vamc exited 0 but did not create {out_dir} (the expected output folder "
                                f"<workspace.path>/<name>){tail}")
    files = [p for p in out_dir.rglob("*") if p.is_file()]
    if not files:
        raise ExternalToolError(f"vamc exited 0 but {out_dir} is empty{tail}")
    if max(p.stat().st_mtime for p in files) < since - 1:
        raise ExternalToolError(f"vamc exited 0 but wrote nothing new in {out_dir} (its files predate this "
                                f"run){tail}")
    folders = sorted({p.parent for p in files if p.name in SUITE_FILES})
    suites, incomplete = [], []
    for folder in folders:
        missing = [n for n in SUITE_FILES if not (folder / n).is_file()]
        rel = str(folder.relative_to(out_dir)) if folder != out_dir else "."
        if missing:
            incomplete.append(f"{rel}/ lacks {', '.join(missing)}")
            continue
        if max((folder / n).stat().st_mtime for n in SUITE_FILES) < since - 1:
            continue
        suites.append({"path": rel, "files": {n: {"bytes": (folder / n).stat().st_size,
                                                  "sha256": sha256_file(folder / n)} for n in SUITE_FILES}})
    if incomplete:
        raise ExternalToolError(f"vamc exited 0 but wrote an incomplete model suite in {out_dir}: "
                                f"{'; '.join(incomplete)}{tail}")
    if not suites:
        raise ExternalToolError(f"vamc exited 0 but {out_dir} holds no model suite (no folder with "
                                f"{', '.join(SUITE_FILES)} written by this run){tail}")
    return suites


def rank_warnings(suites, tp):
    """A warning when the suites' rank folders (…_rank<r>) do not cover 0..tp-1 (the layout is inferred)."""
    ranks = {int(m.group(1)) for s in suites for m in [_RANK_RE.search(Path(s["path"]).name)] if m}
    if ranks and ranks != set(range(tp)):
        return [f"model suites name ranks {sorted(ranks)} but tp is {tp} (expected ranks 0..{tp - 1}); "
                "check the compile log"]
    return []


def provide_tokenizer(out_dir, checkpoint):
    """Make `out_dir/tokenizer/` hold the tokenizer: kept when vamc wrote it, else copied (atomically)."""
    target = Path(out_dir) / TOKENIZER_DIR
    if target.is_dir() and any(p.is_file() for p in target.iterdir()):
        files, chat = tokenizer_sources(target)
        return {"source": "vamc", "path": str(target), "files": _digests(target), "chat_template": chat}
    files, chat = tokenizer_sources(checkpoint)
    if not files:
        return {"source": None, "path": str(target), "files": {}, "chat_template": False,
                "note": f"{checkpoint} has no tokenizer: put one in {target} before serving"}
    partial = target.with_name(f".{TOKENIZER_DIR}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for path in files:
        shutil.copy2(path, partial / path.name)
    shutil.rmtree(target, ignore_errors=True)  # an empty folder vamc may have left
    partial.rename(target)
    return {"source": f"copied by skywork-deploy from {checkpoint}", "path": str(target), "files": _digests(target),
            "chat_template": chat}


def _digests(folder):
    return {p.name: sha256_file(p) for p in sorted(Path(folder).iterdir()) if p.is_file()}
