"""`skywork-deploy compile`: thin CLI over skywork_deploy.compile.config and skywork_deploy.compile.vamc."""
import click

from ..compile.settings import DTYPES, CompileSettings
from .common import PathArg, emit_json, finite_number, handle_errors, json_option

VAMC_ENV_VAR = "SKYWORK_DEPLOY_VAMC"
D = CompileSettings()  # the defaults, declared once in the settings class (light import: no torch)


def removed_seq_lens(ctx, param, value):
    """`--seq-lens` is gone: a one-line usage error saying what replaced it (no silent reinterpretation)."""
    if value is not None:
        raise click.UsageError("--seq-lens was removed: the compiler's input_ids [[A], [B]] is the longest prompt A "
                               "and the longest prompt plus answer B, not buckets; use --max-input-len A "
                               "--max-seq-len B, or --size A:B once per compile", ctx=ctx)
    return value


def parse_sizes(ctx, param, value):
    """Click callback: ('1024:2048', '2048:4096') -> [(1024, 2048), (2048, 4096)]."""
    from ..compile.settings import parse_size
    from ..base.errors import ConfigError

    try:
        return [parse_size(v) for v in value] or None
    except ConfigError as exc:
        raise click.BadParameter(str(exc).split(": ", 1)[1]) from None


@click.command("compile", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=PathArg("build", hub=False))
@click.option("--dtype", type=click.Choice(DTYPES), required=True,
              help="fp16, or int8 (weight-only, the compiler's w8a16_gptq).")
@click.option("--tp", type=int, default=None, help="Tensor-parallel size (dies); 1 to the number of attention "
              f"heads [default: {D.tp}].")
@click.option("--max-input-len", type=int, default=None, metavar="N",
              help=f"Longest prompt, a multiple of 16 [default: {D.max_input_len}].")
@click.option("--max-seq-len", type=int, default=None, metavar="N",
              help="Longest prompt + answer, a multiple of 16, above --max-input-len, at most "
              f"max_position_embeddings [default: {D.max_seq_len}].")
@click.option("--size", "sizes", multiple=True, callback=parse_sizes, metavar="IN:TOTAL",
              help="A size MAX_INPUT_LEN:MAX_SEQ_LEN; repeat for several (one YAML, compile and folder each).")
@click.option("--seq-lens", hidden=True, expose_value=False, callback=removed_seq_lens)
@click.option("--align-qkv/--no-align-qkv", default=None,
              help="Write frontend.model_kwargs.align_qkv [default: true when tp does not divide the KV heads "
              "or heads, else left out].")
@click.option("--calib", type=click.Path(exists=True), default=None, metavar="MANIFEST",
              help="Calibration set from `skywork-deploy calib` (folder or manifest): adds the dataset: block.")
@click.option("--calib-true-sequential/--no-calib-true-sequential", default=None,
              help="int8: write frontend.quantize.calib_args.true_sequential [default: not written].")
@click.option("--b2s/--no-b2s", default=None,
              help=f"b2s raises throughput; off for latency tests [default: {'on' if D.b2s else 'off'}].")
@click.option("--workspace", default=None, metavar="DIR",
              help=f"The compiler's work folder [default: {D.workspace}].")
@click.option("--workers", type=int, default=None, help=f"Compiler workers [default: {D.workers}].")
@click.option("--name", default=None,
              help="Build name [default: <model folder>-<dtype>-tp<tp>-<in>-<total>, the vendor's pattern].")
@click.option("--dry-run", is_flag=True, help="Check, print the YAML and the exact command; run nothing.")
@click.option("--config-out", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Write the YAML here (an existing different file is kept as FILE.bak) "
              "[default: <workspace>/<name>.yaml; with --dry-run: not written].")
@click.option("--vamc", default=None, envvar=VAMC_ENV_VAR, show_envvar=True, metavar="PATH",
              help="The vamc executable [default: vamc on PATH].")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS", callback=finite_number,
              help="Stop the compiler after this long [default: no limit].")
@json_option
@click.pass_context
@handle_errors
def compile_(ctx, model, dtype, tp, max_input_len, max_seq_len, sizes, align_qkv, calib, calib_true_sequential,
             b2s, workspace, workers, name, dry_run, config_out, vamc, timeout, as_json):
    """Write the vamc YAML config for MODEL, check it, and run `vamc compile`.

    MODEL is a folder patched by `skywork-deploy patch`, or a build folder (`skywork-deploy build`): its
    patched model (BUILD/patch/) is compiled and, for int8 without --calib, its calibration set (BUILD/calib/)
    gives the dataset: block. One compile serves prompts up to --max-input-len
    tokens and prompt + answer up to --max-seq-len tokens (input_ids: [[in], [total]]); each --size is one
    more YAML, compile and folder. Every problem (lengths not multiples of 16 or beyond
    max_position_embeddings, tp above the heads, a stale patch, an inconsistent calibration set...) is
    reported at once, before anything runs. A total below 16384 on a reasoning model is a warning: its
    answers run 8K-32K tokens (no warning when the model's max_position_embeddings allows no more). VACC_STACK_SIZE=256 is set for models of 32B parameters and more.

    The compiler's output is shown and logged to <workspace>/<name>.compile.log; afterwards the model
    suites (mod.so, mod.json, mod.params) under <workspace>/<name>/ are found and hashed into
    <workspace>/<name>.manifest.json, and the tokenizer is copied to <workspace>/<name>/tokenizer/ unless
    vamc wrote one (that layout is inferred from the vendor's documents).

    \b
    Examples:
      skywork-deploy compile ./or1-7b-vacc --dtype fp16 --dry-run
      skywork-deploy compile ./build-or1-7b-int8 --dtype int8 --tp 8 --size 2048:16384
      skywork-deploy compile ./or1-7b-vacc --dtype int8 --calib ./calib-c4 --config-out or1-7b-int8.yaml
      skywork-deploy compile ./or1-7b-vacc --dtype int8 --tp 8 --size 2048:16384 --size 4096:32768
      SKYWORK_DEPLOY_VAMC=/opt/vastai/bin/vamc skywork-deploy compile ./or1-32b-vacc --dtype int8 --tp 8
    """
    from ..compile.settings import expand_sizes
    from ..compile.vamc import compile_models, default_echo

    if sizes and (max_input_len is not None or max_seq_len is not None):
        raise click.UsageError("--size: give the sizes either as --size IN:TOTAL or as --max-input-len and "
                               "--max-seq-len, not both", ctx=ctx)
    given = {"dtype": dtype, "tp": tp, "max_input_len": max_input_len, "max_seq_len": max_seq_len,
             "align_qkv": align_qkv, "calib": calib, "calib_true_sequential": calib_true_sequential, "b2s": b2s,
             "workspace": workspace, "workers": workers, "name": name}
    settings = CompileSettings(**{k: v for k, v in given.items() if v is not None})
    if ctx.get_parameter_source("vamc") == click.core.ParameterSource.ENVIRONMENT:
        vamc = None  # let the library read the variable, so its messages name it
    results = compile_models(model, expand_sizes(settings, sizes), vamc=vamc, timeout=timeout, dry_run=dry_run,
                             config_out=config_out, echo=default_echo(as_json))
    if as_json:
        emit_json(results[0] if len(results) == 1 else
                  {"compiled": all(r["compiled"] for r in results), "dry_run": dry_run, "builds": results})
        return
    for i, result in enumerate(results):
        if dry_run:
            click.echo(("---\n" if i else "") + result["yaml"], nl=False)
            _echo_dry_run(result)
        else:
            suites = ", ".join(s["path"] for s in result["suites"])
            click.echo(f"Compiled {result['name']} in {result['seconds']:.1f} s: {len(result['suites'])} model "
                       f"suite(s) ({suites}) in {result['output_dir']}; tokenizer "
                       f"{result['tokenizer']['source'] or 'missing'}; manifest "
                       f"{result['output_dir']}.manifest.json (log {result['log']}; config "
                       f"{_written(result['config_written'])}).")


def _echo_dry_run(result):
    """The command as a YAML comment (the output stays valid YAML), saying whether the config was written."""
    click.echo(f"# command: {result['command_line']}")
    if result["config_written"]:
        click.echo(f"# config: {_written(result['config_written'])}")
    else:
        click.echo(f"# config: not written (dry run; add --config-out FILE to write it, or run without "
                   f"--dry-run to write {result['config_path']} and compile)")
    if result["vamc_missing"]:
        click.echo(f"# note: {result['vamc_missing']}")
    click.echo("# compiled: false (dry run)")


def _written(info):
    state = "written" if info["written"] else "unchanged"
    backup = f", previous kept as {info['backup']}" if info["backup"] else ""
    return f"{info['path']} {state}{backup}"
