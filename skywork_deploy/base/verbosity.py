"""How much the tool says: one setting for our logs, the stage lines and the libraries' logs and bars.

    -q    errors only: no stage lines, no progress bars, libraries at ERROR
    (none) warnings and stage lines; libraries at ERROR (their load-time warnings are noise we handle)
    -v    info; libraries at WARNING
    -vv   debug; libraries at DEBUG

The CLI calls `configure(verbose, quiet)` once. Libraries imported later read their settings from the
environment variables set here (TRANSFORMERS_VERBOSITY, HF_HUB_VERBOSITY, DATASETS_VERBOSITY and the
progress-bar switches), so this module imports none of them. Library code asks `library_level()` and
`stage_lines()`.
"""
import logging
import os

_STATE = {"ours": None, "libraries": None, "quiet": False}
LIBRARY_ENV = ("TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY", "DATASETS_VERBOSITY")
BAR_ENV = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")
NOISY = ("urllib3", "filelock", "httpx", "httpcore", "huggingface_hub", "datasets", "fsspec")


def levels(verbose, quiet):
    """(our level, the libraries' level) for `-v` given `verbose` times and `-q`."""
    if quiet:
        return logging.ERROR, logging.ERROR
    ours = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    libraries = (logging.ERROR, logging.WARNING, logging.DEBUG)[min(verbose, 2)]
    return ours, libraries


def configure(verbose=0, quiet=False, bars=None):
    """Set the levels; `bars` (True / False / None for "by the terminal") is passed to progress.configure."""
    from . import progress

    ours, libraries = levels(verbose, quiet)
    _STATE.update(ours=ours, libraries=libraries, quiet=quiet)
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    root.setLevel(ours)
    logging.getLogger("skywork_deploy").setLevel(ours)
    logging.captureWarnings(True)  # the libraries' warnings.warn (deprecations...) follow their level
    for name in NOISY + ("py.warnings",):
        logging.getLogger(name).setLevel(libraries)
    name = logging.getLevelName(libraries).lower()
    for var in LIBRARY_ENV:
        os.environ[var] = name
    progress.configure(False if quiet else bars)
    for var in BAR_ENV:  # read by huggingface_hub / transformers / datasets when they are imported
        if progress.enabled():
            os.environ.pop(var, None)
        else:
            os.environ[var] = "1"
    _apply_to_imported(libraries, progress.enabled())


def _apply_to_imported(level, bars):
    """Libraries already imported (tests calling the CLI in one process) do not read the environment again."""
    import sys

    if "transformers" in sys.modules:
        import transformers

        transformers.logging.set_verbosity(level)
        if not bars:
            transformers.utils.logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules and not bars:  # (enabling would warn when its variable was set)
        from huggingface_hub import utils

        utils.disable_progress_bars()


def library_level():
    """The level for transformers, datasets, huggingface_hub and ONNX Runtime (ERROR when not configured)."""
    return _STATE["libraries"] or logging.ERROR


def ort_severity():
    """ONNX Runtime's log_severity_level for `library_level()` (0 verbose .. 3 error)."""
    return {logging.DEBUG: 0, logging.INFO: 1, logging.WARNING: 2}.get(library_level(), 3)


def stage_lines():
    """Whether the `[stage] running...` lines are printed (not with -q)."""
    return not _STATE["quiet"]
