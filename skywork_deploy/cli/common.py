"""Shared pieces of the CLI: error conversion and exit codes, JSON output, path and option parsing helpers.

Exit codes, the same in every command: 0 success; 1 the work failed (a check did not pass, a file is corrupt,
the disk filled up, the compiler failed); 2 a usage error (an unknown or missing option, a bad option value,
a missing or wrong path); 128+N when signal N stopped it (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP). With `--json`, stdout always carries one JSON object: the result with `"ok": true`,
or `{"ok": false, "error": ..., "stage": ..., "exit_code": ...}` (written by the group, cli/__init__.py).
"""
import contextlib
import errno
import functools
import json
import os
import re
import signal
import sys
import threading
from pathlib import Path

import click

from ..base.errors import DeployError, Interrupted, UsageError
from ..base.manifest import MANIFEST_NAME

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name
HUB_SOURCE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/.+)?$")  # org/name[/file in the dataset repo]


class CommandError(click.ClickException):
    """A one-line error with its exit code and the stage it happened in (for `--json`)."""

    def __init__(self, message, exit_code=EXIT_FAILED, stage=None, details=None):
        super().__init__(message)
        self.exit_code, self.stage, self.details = exit_code, stage, details or {}


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stop_signals():
    """While a command runs, SIGINT, SIGTERM and SIGHUP raise Interrupted in the main thread (what CI runners,
    `timeout` and service managers send is handled like Ctrl-C). A second signal during the cleanup is ignored
    so that it finishes; a third ends the process at once. A signal the parent ignores (nohup, a shell without
    job control) stays ignored. After an interrupted command the caller's handlers are back at its next signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    count, done = [0], [False]

    def handler(signum, frame):
        if done[0]:  # the interrupted command has ended: hand this signal to the caller's own handler
            _restore(previous)
            old = previous[signum]
            return old(signum, frame) if callable(old) else os.kill(os.getpid(), signum)
        count[0] += 1
        if count[0] == 1:
            raise Interrupted(signum)
        if count[0] >= 3:
            os._exit(128 + signum)

    for sig, old in previous.items():
        if old is not signal.SIG_IGN:
            signal.signal(sig, handler)
    try:
        yield
    finally:
        if count[0]:
            done[0] = True  # not restored yet: a late second signal must not cut the exit short
        else:
            _restore(previous)


def _restore(previous):
    for sig, old in previous.items():
        signal.signal(sig, old if old is not None else signal.SIG_DFL)


def ignore_stop_signals():
    """The console script's last step after a stop signal: a late one may not turn exit 128+N into a death by
    signal while the interpreter shuts down (which resets Python-level handlers)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def check_working_folder():
    """A deleted current folder makes relative paths meaningless (and torch's oneMKL abort): one line, exit 2."""
    try:
        os.getcwd()
    except FileNotFoundError:
        raise UsageError("the current folder was deleted (or moved) while this shell was in it; cd to an existing "
                         "folder and run the command again") from None


def handle_errors(fn):
    """Turn the library's DeployError into a one-line error (exit 2 for UsageError, else 1), never a traceback;
    a stop signal into one line and exit 128+signal, after every cleanup ran (`stop_signals`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            check_working_folder()
            with stop_signals():
                return fn(*args, **kwargs)
        except DeployError as exc:
            code = EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILED
            raise CommandError(str(exc), code, getattr(exc, "stage", None)) from None
        except OSError as exc:  # the disk filled up or a path is not writable mid-run: one line, not a traceback
            raise CommandError(os_error_message(exc)) from None
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            hint = getattr(exc, "hint", None) or "nothing half-written was left in place"
            click.echo(f"Interrupted ({signal.Signals(signum).name}); {hint}.", err=True)
            sys.exit(128 + signum)

    return wrapper


def failure_json(exc, stage):
    """The one JSON object `--json` prints for a failed command."""
    if isinstance(exc, click.ClickException):
        message, code = exc.format_message(), exc.exit_code
    else:  # a bug: the traceback still goes to stderr
        message, code = f"internal error: {type(exc).__name__}: {exc}", EXIT_FAILED
    return {"ok": False, "error": message, "stage": getattr(exc, "stage", None) or stage, "exit_code": code,
            **getattr(exc, "details", {})}


def path_problem(value, kind="model", hub=True):
    """Why `value` is not a usable path of `kind` (None when it is).

    kind: "model" (a folder holding config.json), "bundle" (a folder holding config.json or a stage output),
    "build" (a folder holding config.json, or a build folder with a patched model inside), "source" (any file
    or folder). `hub`: a string shaped like a hub id (org/name) that is not a local path is
    accepted; the stage downloads it or says that it cannot.
    """
    path = Path(str(value)).expanduser()
    if not path.exists():
        hub_like = (HUB_SOURCE if kind == "source" else HUB_ID).match(str(value))
        if hub and hub_like and not str(value).startswith((".", "/", "~")):
            return None
        what = "file or folder" if kind == "source" else "folder"
        hint = " or a hub id like org/name" if hub else ""
        return f"{value}: no such {what} (pass an existing {what}{hint})"
    if kind == "source":
        return None
    if not path.is_dir():
        return f"{value}: not a folder (pass the {'bundle' if kind == 'bundle' else 'model'} folder, not a file)"
    if (path / "config.json").is_file():
        return None
    if kind == "bundle" and ((path / MANIFEST_NAME).is_file() or any(path.glob(f"*/{MANIFEST_NAME}"))):
        return None  # a stage output (export bundle) or a build folder holding one
    if kind == "build":
        from ..patch import PATCH_MANIFEST

        if any(path.glob(f"*/{PATCH_MANIFEST}")):
            return None  # a build folder: its patched model is found inside (compile)
    alternative = {"bundle": ", or an export/build folder", "build": ", or a build folder"}.get(kind, "")
    return (f"{value}: not a model folder (no config.json in it; pass the folder that holds config.json"
            f"{alternative})")


def check_path(value, where, kind="model", hub=True):
    """Raise UsageError (exit 2) naming `where` (an option or build.yaml key) when `value` is not usable."""
    problem = path_problem(value, kind, hub)
    if problem:
        raise UsageError(f"{where}: {problem}")


class PathArg(click.ParamType):
    """A path argument checked before the command runs: a missing or wrong path is a usage error (exit 2)."""

    name = "path"

    def __init__(self, kind="model", hub=True):
        self.kind, self.hub = kind, hub

    def convert(self, value, param, ctx):
        problem = path_problem(value, self.kind, self.hub)
        if problem:
            self.fail(problem, param, ctx)
        return value


def os_error_message(exc):
    where = f": {exc.filename}" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = "free disk space or choose another output folder"
    else:
        hint = "check the path and its permissions"
    return f"{exc.strerror or exc}{where} ({hint})"


def emit_json(data):
    """The one JSON object of a successful command on stdout (`"ok": true` added to a dict)."""
    if isinstance(data, dict) and "ok" not in data:
        data = {"ok": True, **data}
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def stage_echo():
    """Print a `[stage] ...` progress line on stderr (silent with -q)."""
    from ..base.verbosity import stage_lines

    return (lambda text: click.echo(text, err=True)) if stage_lines() else (lambda text: None)


def extra_tensors_option(fn):
    return click.option("--allow-extra-tensors", is_flag=True,
                        help="Accept checkpoint tensors config.json does not explain (refused by default).")(fn)


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout (on any failure: "
                        '{"ok": false, "error": ..., "exit_code": N}).')(fn)


def parse_int_list(ctx, param, value):
    """Click callback: '1024,2048' (or repeated options) -> [1024, 2048]."""
    if value is None:
        return None
    items = value if isinstance(value, (tuple, list)) else [value]
    out = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                out.append(int(part))
            except ValueError:
                raise click.BadParameter(f"{part!r} is not an integer (example: 1024,2048)") from None
    return out or None


def finite_number(ctx, param, value):
    """Click callback: refuse nan and inf (FloatRange lets nan through: every comparison with it is false)."""
    import math

    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def utf8_texts(ctx, param, value):
    """Click callback: texts that are valid UTF-8 (bytes the shell could not decode arrive as surrogates)."""
    for text in value if isinstance(value, (tuple, list)) else [value]:
        if text is None:
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            byte = ord(exc.object[exc.start]) - 0xDC00  # the shell's undecodable byte, as surrogateescape keeps it
            shown = f"0x{byte:02x}" if 0 <= byte < 256 else repr(exc.object[exc.start])
            raise click.BadParameter(f"not valid UTF-8 (byte {shown} at character {exc.start}); pass UTF-8 "
                                     "text") from None
    return value


def positive_int_list(ctx, param, value):
    """Click callback: parse_int_list, every item at least 1."""
    items = parse_int_list(ctx, param, value)
    for n in items or ():
        if n < 1:
            raise click.BadParameter(f"{n} is not a positive integer (example: 128,1024)")
    return items


def run_line(run):
    """One validation mode's run (export/verify.py's `runs` entry): which way, peak memory, time."""
    how = "layer-streamed" + (f", {run['layers_per_piece']} layers a piece" if run.get("layers_per_piece") else "") \
        if run.get("how") == "streamed" else "whole sessions"
    return f"{how}, peak RSS {run.get('peak_rss_bytes', 0) / 2**30:.2f} GiB, {run.get('seconds', 0):.1f} s"
