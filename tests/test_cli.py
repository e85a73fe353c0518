"""The CLI shell: help, version, exit codes, and a fast `--help` that imports no heavy library."""
import subprocess
import sys
import time

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


def test_usage_errors_exit_2():
    runner = CliRunner()
    assert runner.invoke(cli, ["no-such-command"]).exit_code == 2
    assert runner.invoke(cli, ["patch"]).exit_code == 2  # missing MODEL
    assert runner.invoke(cli, ["patch", "x", "--no-such-option"]).exit_code == 2


def test_user_errors_exit_1_without_traceback(tmp_path):
    result = CliRunner().invoke(cli, ["patch", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "Traceback" not in result.output


def _readme_blocks(lang):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return [block.split("\n", 1)[1] for block in text.split("```")[1::2] if block.startswith(lang + "\n")]


def _readme_commands():
    """Every `skywork-deploy ...` line of the README's bash blocks, continuation lines joined."""
    import shlex

    for block in _readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].split(">", 1)[0].strip()
            if line.startswith("skywork-deploy "):
                yield shlex.split(line)[1:]


def test_readme_examples_use_only_existing_commands_and_options():
    commands = list(_readme_commands())
    assert {args[0] for args in commands if not args[0].startswith("-")} >= set(COMMANDS)  # one example per command
    for args in commands:
        if args[0].startswith("-"):
            continue
        command = cli.get_command(None, args[0])
        known = {opt for param in command.params for opt in param.opts + param.secondary_opts}
        unknown = [a for a in args[1:] if a.startswith("-") and a not in known]
        assert not unknown, f"README: `skywork-deploy {' '.join(args)}` uses unknown options {unknown}"


def test_readme_build_yaml_example_is_valid():
    from skywork_deploy.pipeline.settings import BuildSettings

    (example,) = _readme_blocks("yaml")
    settings = BuildSettings.from_yaml(example)
    assert settings.dtype == "int8" and settings.calib.dataset == "c4" and settings.compile.seq_lens == [1024, 2048]
