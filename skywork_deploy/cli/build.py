"""`skywork-deploy build`: thin CLI over skywork_deploy.pipeline."""
from pathlib import Path

import click

from ..quantize.report import MAX_KL, MIN_TOP1
from .compile import parse_sizes, removed_seq_lens
from .common import EXIT_USAGE, CommandError, check_path, emit_json, handle_errors, json_option, parse_int_list, stage_echo


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False)
@click.option("-c", "--config", "config_file", type=click.Path(dir_okay=False, exists=True),
              help="A build.yaml with the same settings as the options (options override it; relative paths in "
              "it are relative to its folder).")
@click.option("--dtype", type=click.Choice(["fp16", "int8"]), default=None, help="Build dtype.")
@click.option("-o", "--out", default=None, help="Build folder (default: build-<model>-<dtype>).")
@click.option("--demo", is_flag=True, help="Build the shipped trained demo model, answer a problem, eval int8 vs fp32.")
@click.option("--calib-dataset", type=click.Choice(["c4", "ceval", "alpaca"]), default=None,
              help="Calibration dataset (int8).")
@click.option("--calib-source", default=None, help="Calibration file/folder or hub id.")
@click.option("--nsamples", type=int, default=None, help="Calibration windows.")
@click.option("--seqlen", type=int, default=None, help="Calibration window length.")
@click.option("--allow-packing", is_flag=True, default=None,
              help="C4: when too few documents have SEQLEN tokens, pack shorter ones for the rest.")
@click.option("--min-top1", type=click.FloatRange(0, 1), default=None, metavar="SHARE",
              help=f"Quantize accuracy gate: least top-1 agreement with the original [default: {MIN_TOP1}].")
@click.option("--max-kl", type=click.FloatRange(min=0), default=None, metavar="NATS",
              help=f"Quantize accuracy gate: largest mean KL against the original [default: {MAX_KL}].")
@click.option("--int8-format", type=click.Choice(["standard", "vacc"]), default=None,
              help="ONNX int8 flavour: standard (ONNX Runtime) or vacc (vendor custom op).")
@click.option("--ort-ops", type=click.Choice(["contrib", "onnx"]), default=None,
              help="ONNX Runtime graphs: contrib (fused kernels, default) or onnx (standard ops only).")
@click.option("--validation", type=click.Choice(["auto", "whole", "streamed"]), default=None,
              help="ONNX Runtime validation: whole sessions, layer-streamed (one piece at a time), or auto (whole "
                   "when it fits, else streamed) [default: auto].")
@click.option("--export-seq-len", default=None, callback=parse_int_list,
              help="Fixed ONNX buckets, e.g. 1024,2048 (default: dynamic axes).")
@click.option("--tp", type=int, default=None, help="Tensor parallel size for vamc.")
@click.option("--max-input-len", type=int, default=None, help="vamc: longest prompt [default: 1024].")
@click.option("--max-seq-len", type=int, default=None, help="vamc: longest prompt + answer [default: 2048].")
@click.option("--size", "sizes", multiple=True, callback=parse_sizes, metavar="IN:TOTAL",
              help="vamc size MAX_INPUT_LEN:MAX_SEQ_LEN; repeat for several (one config and compile each).")
@click.option("--seq-lens", hidden=True, expose_value=False, callback=removed_seq_lens)
@click.option("--vamc", default=None, envvar="SKYWORK_DEPLOY_VAMC", help="vamc executable [env SKYWORK_DEPLOY_VAMC].")
@click.option("--prompt", default=None, help="Prompt for the validation (and demo) answer.")
@click.option("--eval-dataset", default=None, metavar="FILE",
              help="Problems (JSON/JSONL/Parquet/CSV) for a short Math-Verify eval of the deployed bundle against "
                   "the fp32 reference, recorded in the manifest (build.yaml: eval: block).")
@click.option("--force", is_flag=True, help="Redo every stage even when its inputs are unchanged.")
@click.option("--allow-unvalidated", is_flag=True,
              help="Exit 0 even when a check was skipped (no room for an ONNX Runtime session, quantize check "
                   "not run); the verdict still says skipped.")
@click.option("--require-compile", is_flag=True,
              help="Exit 1 when vamc did not compile (a dry run without vamc is otherwise accepted).")
@json_option
@handle_errors
def build(model, config_file, dtype, out, demo, calib_dataset, calib_source, nsamples, seqlen, allow_packing,
          min_top1, max_kl, int8_format, ort_ops, validation, export_seq_len, tp, max_input_len, max_seq_len, sizes, vamc, prompt, eval_dataset, force,
          allow_unvalidated, require_compile, as_json):
    """Run patch -> calib -> quantize -> export -> validate -> compile into one build folder.

    Each stage writes its own subfolder and manifest; a stage whose inputs and options are unchanged is
    skipped, an interrupted build resumes where it stopped. BUILD/manifest.json records versions, model
    identity, every artifact's sha256, each stage's time and peak memory, and the validation figures.

    The last line is the verdict, naming each stage's measured outcome: validated (a check within its stated
    thresholds), checked only (measured, not gated: the smoke run), done (no check of its own), skipped (a
    check that did not run, and why), compiled / not compiled (a dry run: vamc not found). Exit code: 1 when
    a check failed, or was skipped (unless --allow-unvalidated), or vamc did not compile and
    --require-compile was given; 2 for a usage error (bad option, build.yaml key or path); else 0.

    \b
    Examples:
      skywork-deploy build --demo
      skywork-deploy build ./Skywork-OR1-7B-Preview --dtype fp16 -o build-7b-fp16
      skywork-deploy build ./Skywork-OR1-7B-Preview --dtype int8 \\
          --calib-dataset c4 --calib-source ./c4/en --nsamples 128 --seqlen 1024
      skywork-deploy build -c build.yaml --json
    """
    from ..base.errors import ConfigError, DeployError
    from ..pipeline import BuildRejected, BuildSettings, run_build
    from ..pipeline.demo import demo_settings, ensure_demo_model

    if demo:
        settings = demo_settings(out or "skywork-demo", dtype or "int8")
        ensure_demo_model(settings.model)
    elif config_file:
        try:  # a wrong build.yaml is a usage error, like a wrong option (exit 2)
            settings = BuildSettings.from_file(config_file)
        except ConfigError as exc:
            raise CommandError(str(exc), EXIT_USAGE) from None
        settings.resolve_paths(Path(config_file).resolve().parent)  # relative to the file, not the shell
    else:
        settings = BuildSettings()
    for dotted, value in (("model", model), ("dtype", dtype), ("output", out), ("calib.dataset", calib_dataset),
                          ("calib.source", calib_source), ("calib.nsamples", nsamples), ("calib.seqlen", seqlen),
                          ("calib.allow_packing", allow_packing), ("quantize.min_top1", min_top1),
                          ("quantize.max_kl", max_kl),
                          ("export.int8_format", int8_format), ("export.ort_ops", ort_ops),
                          ("export.validation", validation),
                          ("export.seq_lens", export_seq_len),
                          ("compile.tp", tp), ("compile.max_input_len", max_input_len), ("compile.max_seq_len", max_seq_len),
                          ("compile.sizes", [list(s) for s in sizes] if sizes else None), ("compile.vamc", vamc),
                          ("run.prompt", prompt), ("eval.dataset", eval_dataset)):
        settings.override(dotted, value)
    try:
        settings.check()
    except ConfigError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    check_path(settings.model, "model (MODEL or build.yaml model:)", "model", hub=True)  # exit 2, nothing made
    if settings.calib.source:
        check_path(settings.calib.source, "calib.source (--calib-source)", "source", hub=True)
    try:
        manifest = run_build(settings, force=force, echo=stage_echo(), allow_unvalidated=allow_unvalidated,
                             require_compile=require_compile)
    except BuildRejected as exc:  # every stage ran; the verdict does not accept the build: exit 1
        _finish(exc.manifest, as_json, demo=False)
        raise click.exceptions.Exit(1) from None
    except DeployError as exc:
        if getattr(exc, "verdict", None):  # a stage failed: its error, then the verdict as the last line
            click.echo(f"error in {exc.stage}: {exc}", err=True)
            raise CommandError(exc.verdict, stage=exc.stage) from None
        raise
    _finish(manifest, as_json, demo)


def _finish(manifest, as_json, demo):
    if as_json:
        emit_json({"ok": manifest["accepted"], **manifest})
        return
    if demo:
        _demo_answer(manifest)
    _print_summary(manifest)


def _print_summary(manifest):
    """The stage table, where the build is, and the verdict as the last line (pipeline/verdict.py)."""
    outcomes = manifest["verdict"]["stages"]
    click.echo(f"\n{'stage':<10} {'run':<7} {'seconds':>8} {'peak RSS':>10}  outcome")
    for name in manifest["stage_order"]:
        stage, o = manifest["stages"][name], outcomes.get(name, {})
        status = "cached" if stage["skipped"] else "ran"
        click.echo(f"{name:<10} {status:<7} {stage['seconds']:>8.1f} {stage['peak_rss_bytes'] / 2**30:>6.2f} GiB  "
                   f"{o.get('outcome', '?')}: {o.get('detail', '')}")
    for name, v in manifest["validation"].items():
        if v.get("warning"):
            click.echo(f"warning: {v['warning']}")
    click.echo(f"Build folder: {Path(manifest['settings']['output']).resolve()} (manifest.json)")
    click.echo(manifest["verdict"]["line"])


def _demo_answer(manifest):
    from ..runtime.backends import make_backend
    from ..runtime.bundle import load_tokenizer, open_bundle
    from ..runtime.generate import generate_text

    bundle = open_bundle(manifest["settings"]["output"])
    tokenizer = load_tokenizer(bundle)
    prompt = manifest["settings"]["run"]["prompt"]
    click.echo(f"\nPrompt: {prompt}\nAnswer (the shipped trained demo model, int8 on ONNX Runtime): ", nl=False)
    result = generate_text(make_backend("onnxruntime", bundle), tokenizer, [prompt],
                           max_new_tokens=manifest["settings"]["run"]["max_new_tokens"],
                           on_text=lambda piece: click.echo(piece, nl=False))
    timing = result["timing"]
    click.echo(f"\n[{timing['decode_steps']} tokens, decode {timing['decode_tokens_per_s'] or 0:.1f} tok/s]")
    ev = manifest["validation"].get("eval")
    if ev and ev.get("line"):
        click.echo(f"Eval on {ev.get('problems')} held-out problems: {ev['line']}")
