"""Issue 29: an in-place patch killed at every step (a revert at every other one) leaves a folder that
`patch --check` names and `patch --revert` (or `patch` again) restores: always the original bytes.

The child stops at the n-th test point of the step (base/testpoint.py) and is killed there (SIGKILL) or
interrupted (SIGINT: it undoes its own half patch at once).
"""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from skywork_deploy.cli import cli

PATCH_POINTS = 14   # make_backup: 5 files + record + rename; _apply: manifest removal + 5 files + manifest
REVERT_POINTS = 9   # manifest removal + 1 saved + 5 created + rename + delete


@pytest.fixture(scope="module")
def original(tiny_model_factory):
    return tiny_model_factory()


def fresh(original, tmp_path):
    """A private copy of the model (weights hard-linked: patch never writes them)."""
    shutil.copytree(original, tmp_path / "m", copy_function=lambda s, d: os.link(s, d) if s.endswith(
        ".safetensors") else shutil.copy2(s, d))
    return tmp_path / "m"


def state(folder):
    """Every entry of `folder` with its bytes' hash (weights: inode and mtime) and mode."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        rel = p.relative_to(folder).as_posix()
        if p.is_dir():
            out[rel] = "dir"
        elif p.name.endswith(".safetensors"):
            out[rel] = (st.st_ino, st.st_mtime_ns, st.st_mode)
        else:
            out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mode)
    return out


def stopped_at(args, folder, point, sig, repeat=1):
    """Run `skywork-deploy ARGS` paused at `point`, send `sig`; (returncode, stderr), or None when it finished
    before reaching the point."""
    pause = folder.parent / "paused"
    env = {**os.environ, "SKYWORK_DEPLOY_PAUSE": point, "SKYWORK_DEPLOY_PAUSE_FILE": str(pause)}
    proc = subprocess.Popen([sys.executable, "-c", "from skywork_deploy.cli import main; main()", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while not pause.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    if not pause.exists():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        return None
    pause.unlink()
    for _ in range(repeat):  # a second Ctrl-C arrives while the first one's cleanup runs
        proc.send_signal(sig)
        time.sleep(0.002)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def cli_run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output and result.exception is None or \
        isinstance(result.exception, SystemExit), result.output
    return result


@pytest.mark.parametrize("step", range(1, PATCH_POINTS + 1))
def test_patch_killed_at_any_step_is_named_by_check_and_undone_by_revert(original, tmp_path, step):
    m = fresh(original, tmp_path)
    before = state(m)
    stopped = stopped_at(["patch", str(m)], m, f"patch:{step}", signal.SIGKILL)
    assert stopped is not None and stopped[0] == -signal.SIGKILL
    check = cli_run("patch", "--check", m)
    assert check.exit_code == 1 and len(check.output.strip().splitlines()) == 1, check.output
    if state(m) != before:  # something changed: --check names the interrupted state and the fix
        assert "interrupted" in check.output and "--revert" in check.output, check.output
        assert cli_run("patch", "--revert", m).exit_code == 0
    assert state(m) == before


@pytest.mark.parametrize("step", [2, 8, 13])
def test_patch_killed_at_a_step_is_finished_by_patching_again(original, tmp_path, step):
    m = fresh(original, tmp_path)
    before = state(m)
    stopped_at(["patch", str(m)], m, f"patch:{step}", signal.SIGKILL)
    assert cli_run("patch", m).exit_code == 0
    assert cli_run("patch", "--check", m).exit_code == 0
    assert cli_run("patch", "--revert", m).exit_code == 0
    assert state(m) == before


@pytest.mark.parametrize("step", range(1, PATCH_POINTS + 1, 3))
def test_patch_interrupted_at_a_step_undoes_itself(original, tmp_path, step):
    m = fresh(original, tmp_path)
    before = state(m)
    code, err = stopped_at(["patch", str(m)], m, f"patch:{step}", signal.SIGINT)
    assert code == 130 and "Traceback" not in err, err
    assert err.strip().splitlines() == ["Interrupted (SIGINT); nothing half-written was left in place."], err
    assert state(m) == before


@pytest.mark.parametrize("step", [5, 12])
def test_ctrl_c_twice_still_undoes_the_half_patch(original, tmp_path, step):
    m = fresh(original, tmp_path)
    before = state(m)
    code, err = stopped_at(["patch", str(m)], m, f"patch:{step}", signal.SIGINT, repeat=2)
    assert code == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert state(m) == before


@pytest.mark.parametrize("step", range(1, REVERT_POINTS + 1, 2))
def test_revert_killed_at_a_step_is_finished_by_revert(original, tmp_path, step):
    m = fresh(original, tmp_path)
    before = state(m)
    assert cli_run("patch", m).exit_code == 0
    stopped = stopped_at(["patch", "--revert", str(m)], m, f"revert:{step}", signal.SIGKILL)
    assert stopped is not None
    if state(m) != before:
        assert cli_run("patch", "--revert", m).exit_code == 0
    assert state(m) == before


def test_a_re_patch_interrupted_says_how_to_finish_or_undo(original, tmp_path):
    m = fresh(original, tmp_path)
    before = state(m)
    assert cli_run("patch", m).exit_code == 0
    code, err = stopped_at(["patch", "--no-insert-slice", str(m)], m, "patch:3", signal.SIGTERM)
    assert code == 143 and "Traceback" not in err and "--revert" in err and len(err.strip().splitlines()) == 1, err
    check = cli_run("patch", "--check", m)
    assert check.exit_code == 1 and "interrupted" in check.output
    assert "interrupted" in cli_run("export", m, "-o", tmp_path / "e").output  # no stage trusts a half patch
    assert cli_run("patch", "--revert", m).exit_code == 0
    assert state(m) == before
