"""The output rule, marked temporary folders, stale-folder cleanup after kill -9, and the folder lock."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from skywork_deploy.base.errors import InputError
from skywork_deploy.base.fsutil import (
    LOCK_NAME, MARKER, atomic_output_dir, check_output, folder_lock, remove_stale, work_dir, write_json,
    written_by_us,
)
from tests.conftest import sigint_default


def ours(folder, stage="export", **extra):
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "skywork_deploy_manifest.json", {"format": "skywork-deploy", "stage": stage, **extra})
    return folder


@pytest.mark.parametrize("relation, words", [("same", "is the input"), ("parent", "contains the input"),
                                             ("child", "is inside the input")])
def test_output_may_not_be_contain_or_sit_inside_an_input(tmp_path, relation, words):
    model = tmp_path / "m" / "model"
    model.mkdir(parents=True)
    out = {"same": model, "parent": model.parent, "child": model / "sub"}[relation]
    with pytest.raises(InputError, match=words):
        check_output(out, [model], overwrite=True)


def test_overwrite_replaces_only_folders_we_wrote(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(InputError, match="already exists"):
        check_output(foreign, [])
    with pytest.raises(InputError, match="not written by skywork-deploy"):
        with atomic_output_dir(foreign, overwrite=True):
            pass
    assert (foreign / "thesis.tex").read_text() == "years of work"
    inplace = tmp_path / "inplace"
    inplace.mkdir()
    write_json(inplace / "skywork_deploy_patch.json", {"format": "skywork-deploy", "stage": "patch", "mode": "in-place"})
    assert written_by_us(inplace) is None  # a model folder patched in place stays the user's
    mine = ours(tmp_path / "mine")
    with atomic_output_dir(mine, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in mine.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "inplace", "mine"]


KILLED = textwrap.dedent("""
    import sys, time
    from skywork_deploy.base.fsutil import atomic_output_dir, work_dir
    with work_dir("skywork-test-work-"), atomic_output_dir(sys.argv[1]) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 1000)
        print("ready", flush=True)
        time.sleep(60)
""")


def test_kill_9_leftovers_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert len(partial) == 1 and (partial[0] / MARKER).is_file()
    assert remove_stale(tmp_path, ".out.partial-") == []  # still running: not stale
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    unmarked = tmp_path / ".out.partial-someone-else"
    unmarked.mkdir()  # not ours (no marker): never removed
    with atomic_output_dir(out) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.partial-someone-else", "out"]
    with work_dir("skywork-test-work-") as fresh:  # the killed run's temp work folder goes too
        left = [p for p in fresh.parent.glob("skywork-test-work-*") if p != fresh]
    assert left == []


def test_lock_names_its_live_owner_and_is_taken_over_when_dead(tmp_path):
    with folder_lock(tmp_path, "build"):
        with pytest.raises(InputError, match=f"pid {os.getpid()} on {socket.gethostname()}"):
            with folder_lock(tmp_path, "build"):
                pass
    assert not (tmp_path / LOCK_NAME).exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"format": "skywork-deploy", "pid": int(dead.stdout),
                                                 "host": socket.gethostname(), "started": time.time()}))
    with folder_lock(tmp_path, "build") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_overwrite_says_what_it_replaced(tmp_path, caplog):
    mine = ours(tmp_path / "bundle", stage="export")
    (mine / "old.onnx").write_bytes(b"old")
    with caplog.at_level("WARNING", logger="skywork_deploy.base.fsutil"):
        with atomic_output_dir(mine, overwrite=True) as tmp:
            (tmp / "new.onnx").write_bytes(b"new")
    assert f"replaced {mine} (a export folder" in caplog.text
    assert [p.name for p in mine.iterdir()] == ["new.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # the old copy is gone too


def test_wait_interruptibly_sees_ctrl_c_delivered_to_another_thread(tmp_path):
    """SIGINT that the kernel hands to the output-reader thread never wakes a blocking wait in the main thread;
    the polling wait raises KeyboardInterrupt within its poll interval (what vamc and vastgenx rely on)."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "child.py"
    script.write_text(
        "import signal, subprocess, sys, threading\n"
        "from skywork_deploy.base.process import wait_interruptibly\n"
        "proc = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], stdout=subprocess.PIPE)\n"
        "reader = threading.Thread(target=proc.stdout.read, daemon=True); reader.start()\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])  # only the reader thread can receive it\n"
        "print('ready', flush=True)\n"
        "try:\n"
        "    wait_interruptibly(proc)\n"
        "except KeyboardInterrupt:\n"
        "    proc.kill(); print('interrupted', flush=True); sys.exit(130)\n")
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                             preexec_fn=sigint_default)
    assert child.stdout.readline().strip() == "ready"
    start = time.monotonic()
    child.send_signal(signal.SIGINT)
    out, _ = child.communicate(timeout=30)
    assert child.returncode == 130 and "interrupted" in out
    assert time.monotonic() - start < 10
    with pytest.raises(subprocess.TimeoutExpired):  # a timeout still raises as Popen.wait's does
        from skywork_deploy.base.process import wait_interruptibly

        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            wait_interruptibly(sleeper, timeout=0.6)
        finally:
            sleeper.kill()
