"""Where the calibration text comes from: local files as given, or hub ids downloaded when a network exists.

Hub ids: `allenai/c4` (default file en/c4-train.00000-of-01024.json.gz, the shard GPTQ calibrates on),
`ceval/ceval-exam` (ceval-exam.zip when the repo has it, else its per-subject parquet files) and
`yahma/alpaca-cleaned` (alpaca_data_cleaned.json). A file inside a hub repo can be named after the id:
`allenai/c4/en/c4-validation.00000-of-00008.json.gz`.
"""
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..base.errors import InputError, NetworkError

HUB_IDS = {"c4": "allenai/c4", "ceval": "ceval/ceval-exam", "alpaca": "yahma/alpaca-cleaned"}
HUB_DEFAULT_FILES = {"c4": "en/c4-train.00000-of-01024.json.gz", "alpaca": "alpaca_data_cleaned.json"}
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<file>.+))?$")


@dataclass
class Source:
    given: list          # the strings the user passed
    paths: list          # local Paths to read (files or folders)
    hub_id: str = None   # set when downloaded from the hub
    hub_files: list = None
    kind: str = "local"  # "local", "hub", or "hub-parquet" (C-Eval parquet folder)

    @property
    def block_path(self):
        """`path` for the compiler's dataset block: the hub id, or the absolute local path."""
        if self.hub_id:
            return self.hub_id
        paths = [p.resolve() for p in self.paths]
        if len(paths) == 1:
            return str(paths[0])
        return os.path.commonpath([str(p.parent) for p in paths])


def is_hub_id(text):
    if Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or "\\" in text:
        return False
    return bool(HUB_ID.match(text))


def resolve_sources(dataset, given, split="val"):
    """A Source for the strings given: every one local, or one hub id (downloaded)."""
    given = [str(g) for g in given]
    if not given:
        raise InputError("--source is required: a local file or folder, or a hub id like "
                         f"{HUB_IDS[dataset]}")
    if dataset != "c4" and len(given) > 1:
        raise InputError(f"--source given {len(given)} times; {dataset} reads one file or folder")
    hub = [g for g in given if is_hub_id(g)]
    if not hub:
        missing = [g for g in given if not Path(g).expanduser().exists()]
        if missing:
            raise InputError(f"{missing[0]}: no such file or folder (pass a local {dataset} file or a hub id "
                             f"like {HUB_IDS[dataset]})")
        return Source(given=given, paths=[Path(g).expanduser() for g in given])
    if len(given) > 1:
        raise InputError(f"{hub[0]}: a hub id cannot be mixed with other sources; pass one hub id or local files")
    return download(dataset, given[0], split)


def download(dataset, text, split):
    from ..base.hub import offline_reason

    m = HUB_ID.match(text)
    repo, filename = m["repo"], m["file"]
    offline = offline_reason()  # at once, instead of huggingface_hub's retries
    if offline:
        raise NetworkError(f"{text}: cannot download from the Hugging Face hub ({offline}); pass local files "
                           f"instead, e.g. --source ./{Path(HUB_DEFAULT_FILES.get(dataset, 'ceval-exam.zip')).name} "
                           "(calibration/README.md says where to get them)")
    try:
        import huggingface_hub
    except ImportError:
        raise NetworkError(f"{text}: huggingface_hub is not installed; pass local {dataset} files instead "
                           "(see calibration/README.md)") from None
    try:
        if dataset == "ceval" and not filename:
            folder = Path(huggingface_hub.snapshot_download(
                repo, repo_type="dataset", allow_patterns=["ceval-exam.zip", f"*/{split}-*.parquet"]))
            zip_path = folder / "ceval-exam.zip"
            if zip_path.is_file():
                return Source(given=[text], paths=[zip_path], hub_id=repo, hub_files=["ceval-exam.zip"], kind="hub")
            return Source(given=[text], paths=[folder], hub_id=repo, hub_files=[f"*/{split}-*.parquet"],
                          kind="hub-parquet")
        filename = filename or HUB_DEFAULT_FILES.get(dataset)
        local = Path(huggingface_hub.hf_hub_download(repo, filename, repo_type="dataset"))
    except Exception as exc:  # offline, unknown repo, missing file, gated: the same advice for the user
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else f"{type(exc).__name__}"
        raise NetworkError(f"{text}: cannot download from the Hugging Face hub ({why}); pass local files "
                           f"instead, e.g. --source ./{Path(HUB_DEFAULT_FILES.get(dataset, 'ceval-exam.zip')).name} "
                           "(calibration/README.md says where to get them)") from None
    return Source(given=[text], paths=[local], hub_id=repo if not m["file"] else text, hub_files=[filename],
                  kind="hub")
