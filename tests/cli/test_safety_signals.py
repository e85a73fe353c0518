"""Issue 29: SIGTERM, SIGHUP and SIGINT stop every long command cleanly.

Each child is paused at a test point (base/testpoint.py) while its temporary output folder (and, for build, its
lock) exists, then signalled: it must exit 128+signal with one line and no traceback, remove its `.partial`
and temporary folders, release the lock and leave its inputs byte-identical.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli.test_safety import ALPACA, listing, snapshot

CHILD = "from skywork_deploy.cli import main; main()"


def run_paused(args, tmp_path, point, sig, before_signal=None):
    """Run the CLI in a child paused at `point`, send `sig` there; returns (returncode, stderr)."""
    pause = tmp_path / "paused"
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env = {**os.environ, "SKYWORK_DEPLOY_PAUSE": point, "SKYWORK_DEPLOY_PAUSE_FILE": str(pause),
           "TMPDIR": str(tmpdir)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)
    deadline = time.time() + 240
    while not pause.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert pause.exists(), ("the child never reached", point, proc.communicate(timeout=60))
    if before_signal:
        before_signal()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    pause.unlink()
    assert list(tmpdir.iterdir()) == [], "temporary folders were left in TMPDIR"
    tmpdir.rmdir()
    return proc.returncode, err


def _default_signals():
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def assert_clean_stop(code, err, sig):
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[")]  # stage lines
    assert code == 128 + sig, (code, err)
    assert "Traceback" not in err, err
    assert lines == [f"Interrupted ({signal.Signals(sig).name}); nothing half-written was left in place."], err


def model_copy(world, tmp_path):
    import shutil

    return Path(shutil.copytree(world["model"], tmp_path / "m"))


COMMANDS = {
    "quantize": lambda m, w, tmp: ["quantize", m, "-o", tmp / "out", "--no-eval"],
    "export": lambda m, w, tmp: ["export", w["patched"], "-o", tmp / "out", "--dtype", "fp32", "--no-simplify"],
    "calib": lambda m, w, tmp: ["calib", "--dataset", "alpaca", "--source", ALPACA, "--model", m,
                                "--nsamples", "4", "--seqlen", "32", "-o", tmp / "out"],
    "patch -o": lambda m, w, tmp: ["patch", m, "-o", tmp / "out"],
    "build": lambda m, w, tmp: ["build", m, "--dtype", "fp16", "-o", tmp / "out"],
}
CASES = [("quantize", signal.SIGTERM), ("export", signal.SIGHUP), ("calib", signal.SIGTERM),
         ("patch -o", signal.SIGTERM), ("build", signal.SIGTERM)]  # SIGINT: tests/patch/test_patch_crash.py


@pytest.mark.parametrize("command, sig", CASES, ids=[f"{c}-{s.name}" for c, s in CASES])
def test_a_stop_signal_cleans_up_and_exits_128_plus_signal(world, tmp_path, command, sig):
    model = model_copy(world, tmp_path)
    args = COMMANDS[command](model, world, tmp_path)
    watched = [model, world["patched"]]
    before = [snapshot(p) for p in watched]
    files_before = listing(tmp_path)
    held = []
    lock = tmp_path / "out" / ".skywork_deploy.lock"
    code, err = run_paused(args, tmp_path, "output:1", sig,
                           before_signal=lambda: held.append(lock.exists() and any(tmp_path.glob("out/.*.partial-*"))))
    assert_clean_stop(code, err, sig)
    assert [snapshot(p) for p in watched] == before
    if command == "build":  # the build folder stays (it may hold earlier stages); its lock and .partial go
        assert held == [True], "the build was not paused holding its lock and a stage's .partial"
        assert not lock.exists() and not list((tmp_path / "out").glob(".*.partial-*"))
        files_before = sorted(files_before + [p for p in listing(tmp_path) if p == "out" or p.startswith("out/")])
    assert listing(tmp_path) == files_before, "something was left behind"


def test_stop_signals_raise_once_then_hand_back_to_the_callers_handler():
    from skywork_deploy.base.errors import Interrupted
    from skywork_deploy.cli.common import stop_signals

    seen = []
    term = signal.getsignal(signal.SIGTERM)
    previous = signal.signal(signal.SIGHUP, lambda signum, frame: seen.append(signum))
    try:
        with pytest.raises(Interrupted) as caught:
            with stop_signals():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)  # the handler raises at the next bytecode
        assert caught.value.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGHUP)  # after the interrupted command: the caller's handler again
        time.sleep(0.01)
        assert seen == [signal.SIGHUP]
    finally:
        signal.signal(signal.SIGHUP, previous)
        signal.signal(signal.SIGTERM, term)
