"""External programs: found on the command line, in the environment or on PATH, and waited for interruptibly."""
import os
import shutil
import time
from pathlib import Path

from .errors import ExternalToolError


def wait_interruptibly(proc, timeout=None, poll=0.25):
    """`proc.wait(timeout)` that Ctrl-C always interrupts.

    A blocking wait never returns to Python when SIGINT is delivered to another thread of the process (the
    output reader), so KeyboardInterrupt would wait for the child to exit; short waits in a loop let the main
    thread notice it within `poll` seconds. Raises subprocess.TimeoutExpired at `timeout`, as wait does.
    """
    import subprocess

    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = poll if deadline is None else min(poll, deadline - time.monotonic())
        try:
            return proc.wait(timeout=max(left, 0))
        except subprocess.TimeoutExpired:
            if deadline is not None and time.monotonic() >= deadline:
                raise


def find_tool(name, option, env_var, explicit=None, environ=None, missing_hint=""):
    """An external program's absolute path: `explicit` (the option), else $env_var, else `name` on PATH."""
    environ = os.environ if environ is None else environ
    for source, value in ((option, explicit), (env_var, environ.get(env_var))):
        if value:
            found = shutil.which(value, path=environ.get("PATH"))
            if found is None:
                raise ExternalToolError(f"{name}: {source} {value} is not an executable file "
                                        "(fix the path or make it executable)")
            return str(Path(found).absolute())
    found = shutil.which(name, path=environ.get("PATH"))
    if found is None:
        raise ExternalToolError(f"{name} not found: {option} not given, {env_var} not set, no `{name}` on PATH; "
                                f"{missing_hint}")
    return str(Path(found).absolute())
