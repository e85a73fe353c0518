"""One progress bar for every long stage: tqdm on stderr, off with `-q`, off when stderr is not a terminal.

`SKYWORK_DEPLOY_PROGRESS=1` forces bars on (CI logs) except with `-q`, `=0` forces them off. The CLI calls `configure()` once
from the group's `-v/-q` options; library code only calls `bar(...)`.
"""
import os
import sys

_ENABLED = None  # None: decide by the terminal; True / False: forced


def configure(enabled=None):
    """Set the bars off (False: `-q`, which wins), else by the environment variable, else by the terminal."""
    global _ENABLED
    env = os.environ.get("SKYWORK_DEPLOY_PROGRESS")
    _ENABLED = False if enabled is False else {"1": True, "0": False}.get(env, enabled)


def enabled():
    if _ENABLED is not None:
        return _ENABLED
    env = os.environ.get("SKYWORK_DEPLOY_PROGRESS")
    if env in ("0", "1"):
        return env == "1"
    return sys.stderr.isatty()


def bar(iterable=None, total=None, desc=None, unit="it", **kwargs):
    """A tqdm bar (or a silent one) over `iterable`, `total` items: done / total and a rate."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled(),
                dynamic_ncols=True, leave=False, **kwargs)
