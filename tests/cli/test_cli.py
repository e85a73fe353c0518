"""The CLI shell: help, version, exit codes, and a fast `--help` that imports no heavy library."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from skywork_deploy import __version__
from skywork_deploy.cli import COMMANDS, cli

HEAVY = ("torch", "transformers", "onnx", "onnxruntime", "numpy", "safetensors")


def run_py(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_help_imports_no_heavy_library():
    code = ("import sys\nfrom skywork_deploy.cli import cli\n"
            "try:\n    cli(['--help'], prog_name='skywork-deploy')\nexcept SystemExit:\n    pass\n"
            f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = run_py(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HEAVY=", out.stdout


def test_help_is_fast():
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "skywork_deploy", "--help"], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    assert out.returncode == 0 and "patch" in out.stdout
    assert elapsed < 2.0, elapsed  # goal 0.3 s on an idle machine; generous here for a loaded CI box


def test_version_and_short_help():
    runner = CliRunner()
    assert runner.invoke(cli, ["--version"]).output.strip().endswith(__version__)
    result = runner.invoke(cli, ["-h"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_has_help_with_examples(name):
    result = CliRunner().invoke(cli, [name, "-h"])
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.output


# The exit-code table: every command, every way of calling it wrongly. 2 = usage error (option, path).
CALLS = {
    "patch": lambda p, tmp: ["patch", p],
    "quantize": lambda p, tmp: ["quantize", p, "-o", tmp / "out"],
    "calib": lambda p, tmp: ["calib", "--dataset", "alpaca", "--source", _alpaca(), "--model", p, "-o", tmp / "out"],
    "export": lambda p, tmp: ["export", p, "-o", tmp / "out"],
    "compile": lambda p, tmp: ["compile", p, "--dtype", "fp16", "--dry-run"],
    "run": lambda p, tmp: ["run", p, "-p", "Hi"],
    "bench": lambda p, tmp: ["bench", p],
    "serve": lambda p, tmp: ["serve", p],
    "eval": lambda p, tmp: ["eval", p, "--dataset", _problems()],
    "build": lambda p, tmp: ["build", p, "--dtype", "fp16", "-o", tmp / "out"],
}
MISTAKES = {  # name -> (how to make the path, extra arguments)
    "missing folder": (lambda tmp: tmp / "missing", []),
    "a file, not a folder": (lambda tmp: _touch(tmp / "config.json"), []),
    "folder without config.json": (lambda tmp: _mkdir(tmp / "empty"), []),
    "unknown option": (lambda tmp: tmp / "missing", ["--no-such-option"]),
}





def _alpaca():
    from skywork_deploy.pipeline.demo import alpaca_sample

    return alpaca_sample()


def _problems():
    from skywork_deploy.demo_model import heldout_path

    return heldout_path()


def _touch(path):
    path.write_text("{}")
    return path


def _mkdir(path):
    path.mkdir()
    return path


def invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_the_table_covers_every_command():
    assert set(CALLS) == set(COMMANDS)


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
@pytest.mark.parametrize("name", sorted(CALLS))
def test_exit_code_table(name, mistake, tmp_path):
    make, extra = MISTAKES[mistake]
    args = CALLS[name](make(tmp_path), tmp_path) + extra
    result = invoke(args)
    assert result.exit_code == 2, (args, result.output)
    assert "Traceback" not in result.output and "Error:" in result.output
    assert not (tmp_path / "out").exists()  # nothing half-made
    with_json = invoke(args + ["--json"])
    assert with_json.exit_code == 2
    data = json.loads(with_json.stdout)  # exactly one JSON object on stdout, on failure too
    assert data["ok"] is False and data["exit_code"] == 2 and data["stage"] == name and data["error"]


@pytest.mark.parametrize("name", sorted(CALLS))
def test_missing_required_arguments_exit_2(name):
    result = invoke([name])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_unknown_command_exits_2():
    assert invoke(["no-such-command"]).exit_code == 2


def test_a_failed_check_exits_1_with_one_json_object(tiny_model_factory):
    """patch --check on a folder that is not patched: the work's answer is "no", exit 1, not a usage error."""
    model = tiny_model_factory(tokenizer=False)
    result = invoke(["patch", "--check", model])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "Traceback" not in result.output
    result = invoke(["patch", "--check", model, "--json"])
    data = json.loads(result.stdout)
    assert result.exit_code == 1 and data["ok"] is False and data["current"] is False and data["stage"] == "patch"


def test_success_json_says_ok(tiny_model_factory, tmp_path):
    result = invoke(["patch", tiny_model_factory(), "-o", tmp_path / "p", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"] is True


def test_offline_hub_id_fails_at_once_in_one_line(tmp_path):
    """A hub id without a network: the error at once (no retries with a warning each)."""
    for env in ({"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "skywork_deploy", "patch", "someorg/somemodel"],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path,
                             env={k: v for k, v in {**os.environ, **env}.items()
                                  if not k.lower().endswith("_proxy")})
        elapsed = time.perf_counter() - start
        assert out.returncode == 1, out.stderr
        assert out.stderr.strip().count("\n") == 0, out.stderr  # one line
        assert "cannot download from the Hugging Face hub" in out.stderr
        assert ("HF_HUB_OFFLINE" in out.stderr) == (env["HF_HUB_OFFLINE"] == "1")
        assert elapsed < 10, elapsed


def test_log_levels_for_ours_and_the_libraries(monkeypatch):
    import logging

    from skywork_deploy.base import progress, verbosity

    assert verbosity.levels(0, False) == (logging.WARNING, logging.ERROR)
    assert verbosity.levels(1, False) == (logging.INFO, logging.WARNING)
    assert verbosity.levels(2, False) == (logging.DEBUG, logging.DEBUG)
    assert verbosity.levels(0, True) == (logging.ERROR, logging.ERROR)
    monkeypatch.setenv("SKYWORK_DEPLOY_PROGRESS", "1")
    for var in verbosity.LIBRARY_ENV + verbosity.BAR_ENV:
        monkeypatch.delenv(var, raising=False)
    try:
        verbosity.configure(2, False)
        assert logging.getLogger("skywork_deploy").level == logging.DEBUG
        assert os.environ["TRANSFORMERS_VERBOSITY"] == "debug" and progress.enabled()
        verbosity.configure(0, True)  # -q wins over SKYWORK_DEPLOY_PROGRESS=1
        assert not progress.enabled() and not verbosity.stage_lines()
        assert os.environ["TRANSFORMERS_VERBOSITY"] == "error" and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        import transformers

        assert transformers.logging.get_verbosity() == logging.ERROR
    finally:
        verbosity.configure(0, False)


def test_quiet_prints_only_errors_and_progress_shows_done_total_rate(tiny_model_factory, tmp_path):
    """Through the real command in a subprocess (stderr is not a terminal there)."""
    model = tiny_model_factory(tokenizer=False)

    def quantize(*flags, env=None, out="q", check=False):
        return subprocess.run([sys.executable, "-m", "skywork_deploy", *flags, "quantize", str(model), "-o",
                               str(tmp_path / out), *([] if check else ["--no-eval"])], capture_output=True,
                              text=True, timeout=300, env={**os.environ, **(env or {})})

    forced = quantize(env={"SKYWORK_DEPLOY_PROGRESS": "1"}, out="bars", check=True)
    assert forced.returncode == 0, forced.stderr
    for desc, unit in (("quantize", "tensor"), ("check: original", "layer"), ("check: quantized", "layer")):
        pattern = rf"{desc}: +\d+%.*? \d+/\d+ \[[^\]]*({unit}/s|s/{unit})\]"  # done/total [elapsed, rate]
        assert re.search(pattern, forced.stderr), forced.stderr[-2000:]
    plain = quantize(out="plain")  # stderr is a pipe: no bars
    assert plain.returncode == 0 and "it/s" not in plain.stderr and "tensor/s" not in plain.stderr
    quiet = quantize("-q", env={"SKYWORK_DEPLOY_PROGRESS": "1"}, out="quiet")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


DOCS_ROOT = Path(__file__).resolve().parents[2]


def _readme_blocks(lang, page="README.md"):
    text = (DOCS_ROOT / page).read_text()
    return [block.split("\n", 1)[1] for block in text.split("```")[1::2] if block.startswith(lang + "\n")]


def _readme_commands(page="README.md"):
    """Every `skywork-deploy ...` line of a page's bash blocks, continuation lines joined."""
    import shlex

    for block in _readme_blocks("bash", page):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].split(">", 1)[0].strip()
            if line.startswith("skywork-deploy "):
                yield shlex.split(line)[1:]


def _unknown_options(args):
    command = cli.get_command(None, args[0])
    assert command is not None, f"`skywork-deploy {' '.join(args)}`: no command {args[0]!r}"
    known = {opt for param in command.params for opt in param.opts + param.secondary_opts}
    return [a for a in args[1:] if a.startswith("-") and a not in known]


def test_readme_examples_use_only_existing_commands_and_options():
    commands = list(_readme_commands())
    assert {args[0] for args in commands if not args[0].startswith("-")} >= set(COMMANDS)  # one example per command
    for args in commands:
        if args[0].startswith("-"):
            continue
        unknown = _unknown_options(args)
        assert not unknown, f"README: `skywork-deploy {' '.join(args)}` uses unknown options {unknown}"


def test_docs_examples_use_only_existing_commands_and_options():
    pages = sorted(str(p.relative_to(DOCS_ROOT)) for p in (DOCS_ROOT / "docs").glob("*.md"))
    assert "docs/commands.md" in pages
    checked = 0
    for page in pages:
        for args in _readme_commands(page):
            if not args[0].startswith("-"):
                unknown = _unknown_options(args)
                assert not unknown, f"{page}: `skywork-deploy {' '.join(args)}` uses unknown options {unknown}"
                checked += 1
    assert checked >= len(COMMANDS)


def test_readme_build_yaml_example_is_valid():
    from skywork_deploy.pipeline.settings import BuildSettings

    (example,) = _readme_blocks("yaml")
    settings = BuildSettings.from_yaml(example)
    assert settings.dtype == "int8" and settings.calib.dataset == "c4" and settings.compile.sizes == [[1024, 2048], [2048, 16384]]


def test_compile_dry_run_says_the_config_was_not_written_and_does_not_dump_path(tiny_model_factory, tmp_path,
                                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    patched = tmp_path / "m"
    assert invoke(["patch", tiny_model_factory(), "-o", patched]).exit_code == 0
    monkeypatch.setenv("PATH", os.environ["PATH"] + os.pathsep + "/a/marker/dir")
    result = invoke(["compile", patched, "--dtype", "fp16", "--dry-run"])
    assert result.exit_code == 0, result.output
    command = next(line for line in result.output.splitlines() if line.startswith("# command: "))
    would_write = command.split()[-1]
    assert "# config: not written" in result.output and would_write in result.output.split("# config: ")[1]
    assert "/a/marker/dir" not in result.output and not Path(would_write).exists()
