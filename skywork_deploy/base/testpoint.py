"""Test points: a test makes a child process stop at a named point, then signals or kills it there.

`SKYWORK_DEPLOY_PAUSE=<point>:<n>` makes the n-th call of `pause_point(<point>)` write its pid to the file
`SKYWORK_DEPLOY_PAUSE_FILE` and sleep (at most a minute) until a signal ends it; the test waits for that file,
then sends SIGKILL, SIGINT, SIGTERM or SIGHUP. Unset (always outside tests), a call costs one dict lookup.
Points: `output` (a stage's temporary output folder was just made), `patch` and `revert` (before each step
of an in-place patch or revert).
"""
import os
import time
from pathlib import Path

_CALLS = {}


def pause_point(point):
    wanted = os.environ.get("SKYWORK_DEPLOY_PAUSE")
    if not wanted:
        return
    name, _, nth = wanted.partition(":")
    if name != point:
        return
    _CALLS[point] = _CALLS.get(point, 0) + 1
    if _CALLS[point] != int(nth or 1):
        return
    Path(os.environ["SKYWORK_DEPLOY_PAUSE_FILE"]).write_text(str(os.getpid()), encoding="utf-8")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.01)
