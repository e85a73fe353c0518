"""The `skywork-deploy` command: a thin Click group over the stage modules.

Subcommands are imported only when they run, so `skywork-deploy --help` never imports torch,
transformers or onnx. Each subcommand lives in `skywork_deploy/cli/<name>.py` as a Click command.
"""
import click

from ..version import __version__

# name -> (module under skywork_deploy.cli, attribute, one-line help shown by `--help`)
COMMANDS = {
    "patch": ("patch", "patch", "Write the VACC Qwen2 model files and config_vacc.json into a model folder."),
    "quantize": ("quantize", "quantize", "Weight-only per-channel int8 (W8A16), streamed tensor by tensor."),
    "calib": ("calib", "calib", "Build a seeded calibration set from C4, C-Eval or Alpaca."),
    "export": ("export", "export", "Export prefill and decode ONNX graphs and validate them."),
    "compile": ("compile", "compile_", "Write the vamc YAML config, check it, and run the compiler."),
    "run": ("run", "run", "Generate text from an exported bundle (ONNX Runtime, torch) or an OpenAI endpoint."),
    "bench": ("bench", "bench", "Measure prefill latency and decode speed of a bundle."),
    "serve": ("serve", "serve", "Serve a bundle (ONNX Runtime) or a compiled VACC folder (vastgenx) over the OpenAI API."),
    "eval": ("eval", "eval_", "Score a deployment on math problems with Math-Verify (avg@K, pass@K)."),
    "build": ("build", "build", "Run the whole pipeline into one build folder (CI entry point)."),
}
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class LazyGroup(click.Group):
    """Subcommands imported on use; `--json` failures (usage errors included) still print one JSON object."""

    def parse_args(self, ctx, args):
        ctx.meta["json"] = "--json" in args
        ctx.meta["command"] = next((a for a in args if a in COMMANDS), None)
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if ctx.meta.get("json"):
                from .common import emit_json, failure_json

                emit_json(failure_json(exc, ctx.meta.get("command")))
            raise

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module_name, attr, _ = COMMANDS[name]
        import importlib

        module = importlib.import_module(f"{__name__}.{module_name}")
        return getattr(module, attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, short) for name, (_, _, short) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="skywork-deploy")
@click.option("-v", "--verbose", count=True,
              help="More log output: -v info, -vv debug (ours and the libraries'). Default: warnings and the "
                   "stage lines.")
@click.option("-q", "--quiet", is_flag=True, help="Errors only: no stage lines, no progress bars.")
def cli(verbose, quiet):
    """Make Qwen2 / Skywork-OR1 checkpoints ready for VastAI VACC accelerators.

    The pipeline, data flowing one way:

    \b
      model folder -> patch -> quantize / calib -> export -> compile -> run

    Exit codes, the same in every command: 0 success, 1 the work failed, 2 a usage error (unknown or missing
    option, bad value, missing or wrong path), 128+N when signal N stopped it (SIGTERM and SIGHUP are handled
    like Ctrl-C). Progress bars go to stderr on a terminal (SKYWORK_DEPLOY_PROGRESS=1
    forces them on, =0 off; -q turns them off).

    \b
    Examples:
      skywork-deploy build --demo
      skywork-deploy patch ./Skywork-OR1-7B-Preview
      skywork-deploy compile ./Skywork-OR1-7B-Preview --dtype int8 --dry-run
    """
    from ..base.verbosity import configure

    configure(verbose, quiet)  # our logs, the libraries' logs and bars; progress bars on a terminal only


def main():
    try:
        cli(prog_name="skywork-deploy")
    except SystemExit as exc:
        if isinstance(exc.code, int) and exc.code > 128:  # stopped by a signal (cli/common.py)
            from .common import ignore_stop_signals

            ignore_stop_signals()
        raise
