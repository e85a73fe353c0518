"""Serve a compiled VACC folder with the vendor's `vastgenx serve` (VENDOR.md §4): find it, start it, wait
until `/v1/models` answers, stream its log, stop it and everything it started.

    vastgenx serve --model DIR --host HOST --port PORT --llm_devices "[0,1,2,3]"

The devices default to 0..tp-1 from the compile manifest (`<workspace>/<name>.manifest.json`, written by
`skywork-deploy compile` after a real vamc run). The command is a list (no shell), logged with `shlex.join`;
vastgenx runs in its own process group, so Ctrl-C, SIGTERM or a failed readiness wait end the whole group
(SIGTERM, then SIGKILL after a grace period).
"""
import collections
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..base.errors import ConfigError, ExternalToolError, InputError, Interrupted, NetworkError
from ..base.process import find_tool, wait_interruptibly

log = logging.getLogger(__name__)
ENV_VAR = "SKYWORK_DEPLOY_VASTGENX"
GRACE_SECONDS = 5.0
TAIL_LINES = 20


def find_vastgenx(explicit=None, environ=None):
    """The server's path: `explicit` (--vastgenx), else $SKYWORK_DEPLOY_VASTGENX, else `vastgenx` on PATH."""
    return find_tool("vastgenx", "--vastgenx", ENV_VAR, explicit, environ,
                     "install VastAI's vastgenx wheel or pass --vastgenx PATH")


def _compile_manifest(path):
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("stage") == "compile" else None


def find_compiled(target):
    """(compiled folder, tp) when `target` is a `compile` output or holds one (a workspace or build folder),
    else None. Only a real compile counts: its manifest records an output folder that exists."""
    target = Path(target)
    own = _compile_manifest(target.parent / f"{target.name}.manifest.json")
    if own is not None:
        return target, _tp(own)
    for pattern in ("*.manifest.json", "*/*.manifest.json", "*/*/*.manifest.json"):
        for path in sorted(target.glob(pattern)):
            data = _compile_manifest(path)
            out = data and data.get("output_dir")
            if out and Path(out).is_dir():
                return Path(out), _tp(data)
    return None


def _tp(manifest):
    tp = (manifest.get("settings") or {}).get("tp")
    return int(tp) if isinstance(tp, int) and tp >= 1 else 1


def parse_devices(text):
    """'0,1,2,3' or '[0,1,2,3]' -> [0, 1, 2, 3]."""
    parts = [p.strip() for p in str(text).strip().strip("[]").split(",") if p.strip()]
    try:
        devices = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--devices {text}: give die numbers, e.g. 0,1,2,3") from None
    if not devices or any(d < 0 for d in devices) or len(set(devices)) != len(devices):
        raise ConfigError(f"--devices {text}: give distinct die numbers >= 0, e.g. 0,1,2,3")
    return devices


def vastgenx_command(exe, folder, host, port, devices):
    return [exe, "serve", "--model", str(folder), "--host", host, "--port", str(int(port)),
            "--llm_devices", json.dumps(list(devices), separators=(",", ":"))]


class VastgenxProcess:
    """vastgenx in its own process group; its output copied line by line to `echo` and kept as a tail."""

    def __init__(self, command, echo=None):
        self.command, self.echo = command, echo or sys.stderr
        self.tail = collections.deque(maxlen=TAIL_LINES)
        log.info("running %s", shlex.join(command))
        try:
            self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, text=True, errors="replace",
                                         start_new_session=True)
        except OSError as exc:
            raise ExternalToolError(f"cannot start {shlex.join(command)}: {exc.strerror or exc}") from None
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()

    def _pump(self):
        for line in self.proc.stdout:
            self.tail.append(line.rstrip("\n"))
            self.echo.write(line)
            self.echo.flush()

    def failure(self, what):
        tail = "\n".join(self.tail) or "(no output)"
        return ExternalToolError(f"{what}: {shlex.join(self.command)}\n{tail}")

    def wait_ready(self, url, timeout):
        """Poll `url`/models until it answers; error when vastgenx exits first or the time runs out."""
        from .client import EndpointClient

        client = EndpointClient(url, timeout=5.0)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    self.reader.join(GRACE_SECONDS)
                    raise self.failure(f"vastgenx exited with code {self.proc.returncode} before serving")
                try:
                    return client.models()
                except NetworkError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise self.failure(f"vastgenx did not answer {url}/models within {timeout:g} s (raise "
                                       "--ready-timeout if it loads slowly)")
                time.sleep(0.25)
        finally:
            client.close()

    def stop(self):
        """SIGTERM the process group, SIGKILL it after the grace period; returns the exit code."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(GRACE_SECONDS)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # children that outlived the leader still belong to the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.reader.join(GRACE_SECONDS)
        return self.proc.returncode


def serve_compiled(target, host="127.0.0.1", port=9900, devices=None, vastgenx=None, ready_timeout=600.0,
                   echo=None, on_ready=None):
    """Run vastgenx on a compiled folder until Ctrl-C or SIGTERM (or until it exits: an error unless 0)."""
    found = find_compiled(target)
    if found is None:
        raise InputError(f"{target}: no compiled VACC folder (a `compile` output with its <name>.manifest.json); "
                         "serve an export bundle instead, or run `skywork-deploy compile` without --dry-run")
    folder, tp = found
    devices = parse_devices(devices) if devices is not None else list(range(tp))
    if len(devices) != tp:
        raise ConfigError(f"--devices: {len(devices)} dies given but {folder.name} was compiled for tp {tp}")
    exe = find_vastgenx(vastgenx)
    proc = VastgenxProcess(vastgenx_command(exe, folder, host, port, devices), echo)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/v1"
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        models = proc.wait_ready(url, ready_timeout)
        if on_ready is not None:
            on_ready(url, models)
        code = wait_interruptibly(proc.proc)
        proc.reader.join(GRACE_SECONDS)
        if code != 0:
            raise proc.failure(f"vastgenx exited with code {code}")
        return code
    finally:  # Ctrl-C, SIGTERM, an error or a normal exit: nothing of the group is left running
        signal.signal(signal.SIGTERM, previous)
        proc.stop()


def _raise_interrupt(signum, frame):
    raise Interrupted(signum)  # the CLI exits 128+signum, as every command does on SIGTERM
