"""`skywork-deploy compile`: thin CLI over skywork_deploy.compile_config and skywork_deploy.vamc."""
import click

from ..compile_config import DTYPES, CompileSettings
from .common import emit_json, handle_errors, json_option, parse_int_list

VAMC_ENV_VAR = "SKYWORK_DEPLOY_VAMC"
D = CompileSettings()  # the defaults, declared once in the settings class (light import: no torch)


@click.command("compile", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(file_okay=False))
@click.option("--dtype", type=click.Choice(DTYPES), required=True,
              help="fp16, or int8 (weight-only, the compiler's w8a16_gptq).")
@click.option("--tp", type=int, default=None, help="Tensor-parallel size; must divide the attention heads "
              f"[default: {D.tp}].")
@click.option("--seq-lens", callback=parse_int_list, default=None, metavar="N,N",
              help=f"Sequence-length buckets, multiples of 16 [default: {','.join(map(str, D.seq_lens))}].")
@click.option("--calib", type=click.Path(exists=True), default=None, metavar="MANIFEST",
              help="Calibration set from `skywork-deploy calib` (folder or manifest): adds the dataset: block.")
@click.option("--b2s/--no-b2s", default=None,
              help=f"b2s raises throughput; off for latency tests [default: {'on' if D.b2s else 'off'}].")
@click.option("--workspace", default=None, metavar="DIR",
              help=f"The compiler's work folder [default: {D.workspace}].")
@click.option("--workers", type=int, default=None, help=f"Compiler workers [default: {D.workers}].")
@click.option("--name", default=None,
              help="Build name [default: <model folder>-<dtype>-tp<tp>-<buckets>, the vendor's pattern].")
@click.option("--dry-run", is_flag=True, help="Check, print the YAML and the exact command; run nothing.")
@click.option("--config-out", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Write the YAML here (an existing different file is kept as FILE.bak) "
              "[default: <workspace>/<name>.yaml].")
@click.option("--vamc", default=None, envvar=VAMC_ENV_VAR, show_envvar=True, metavar="PATH",
              help="The vamc executable [default: vamc on PATH].")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="Stop the compiler after this long [default: no limit].")
@json_option
@click.pass_context
@handle_errors
def compile_(ctx, model, dtype, tp, seq_lens, calib, b2s, workspace, workers, name, dry_run, config_out, vamc,
             timeout, as_json):
    """Write the vamc YAML config for MODEL, check it, and run `vamc compile`.

    MODEL is a folder patched by `skywork-deploy patch`. Every problem (buckets not multiples of 16 or
    beyond max_position_embeddings, a tp that does not divide the heads, a stale patch, an inconsistent
    calibration set...) is reported at once, before anything runs. align_qkv is set when tp does not divide
    the KV heads; VACC_STACK_SIZE=256 is set for models of 32B parameters and more.

    The compiler's output is shown and logged to <workspace>/<name>.compile.log; afterwards
    <workspace>/<name>/ must hold its outputs (our assumption about vamc's layout).

    \b
    Examples:
      skywork-deploy compile ./or1-7b-vacc --dtype fp16 --dry-run
      skywork-deploy compile ./or1-7b-vacc --dtype int8 --calib ./calib-c4 --config-out or1-7b-int8.yaml
      SKYWORK_DEPLOY_VAMC=/opt/vastai/bin/vamc skywork-deploy compile ./or1-32b-vacc --dtype int8 --tp 8
    """
    from ..vamc import compile_model, default_echo

    given = {"dtype": dtype, "tp": tp, "seq_lens": seq_lens, "calib": calib, "b2s": b2s,
             "workspace": workspace, "workers": workers, "name": name}
    settings = CompileSettings(**{k: v for k, v in given.items() if v is not None})
    if ctx.get_parameter_source("vamc") == click.core.ParameterSource.ENVIRONMENT:
        vamc = None  # let the library read the variable, so its messages name it
    result = compile_model(model, settings, vamc=vamc, timeout=timeout, dry_run=dry_run, config_out=config_out,
                           echo=default_echo(as_json))
    if as_json:
        emit_json(result)
    elif dry_run:
        click.echo(result["yaml"], nl=False)
        click.echo(f"# command: {result['command_line']}")
        if result["vamc_missing"]:
            click.echo(f"# note: {result['vamc_missing']}")
        if result["config_written"]:
            click.echo(f"# config: {_written(result['config_written'])}")
    else:
        click.echo(f"Compiled {result['name']} in {result['seconds']:.1f} s: {len(result['outputs'])} file(s) in "
                   f"{result['output_dir']} (log {result['log']}; config {_written(result['config_written'])}).")


def _written(info):
    state = "written" if info["written"] else "unchanged"
    backup = f", previous kept as {info['backup']}" if info["backup"] else ""
    return f"{info['path']} {state}{backup}"
