"""Shared pieces of the CLI: error conversion, JSON output, option parsing helpers."""
import errno
import functools
import json
import sys

import click

from ..errors import DeployError


def handle_errors(fn):
    """Turn the library's DeployError into a one-line ClickException (exit 1), never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DeployError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:  # the disk filled up or a path is not writable mid-run: one line, not a traceback
            raise click.ClickException(os_error_message(exc)) from None
        except KeyboardInterrupt:
            click.echo("Interrupted; nothing half-written was left in place.", err=True)
            sys.exit(130)

    return wrapper


def os_error_message(exc):
    where = f": {exc.filename}" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free disk space or choose another output folder"
    else:
        hint = "check the path and its permissions"
    return f"{exc.strerror or exc}{where} ({hint})"


def emit_json(data):
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")(fn)


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
