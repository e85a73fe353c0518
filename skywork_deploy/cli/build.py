"""`skywork-deploy build`: thin CLI over skywork_deploy.pipeline."""
from pathlib import Path

import click

from .common import emit_json, handle_errors, json_option, parse_int_list


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False)
@click.option("-c", "--config", "config_file", type=click.Path(dir_okay=False, exists=True),
              help="A build.yaml with the same settings as the options (options override it).")
@click.option("--dtype", type=click.Choice(["fp16", "int8"]), default=None, help="Build dtype.")
@click.option("-o", "--out", default=None, help="Build folder (default: build-<model>-<dtype>).")
@click.option("--demo", is_flag=True, help="Build a random tiny Qwen2 with a real tokenizer, then answer a prompt.")
@click.option("--calib-dataset", type=click.Choice(["c4", "ceval", "alpaca"]), default=None,
              help="Calibration dataset (int8).")
@click.option("--calib-source", default=None, help="Calibration file/folder or hub id.")
@click.option("--nsamples", type=int, default=None, help="Calibration windows.")
@click.option("--seqlen", type=int, default=None, help="Calibration window length.")
@click.option("--int8-format", type=click.Choice(["standard", "vacc"]), default=None,
              help="ONNX int8 flavour: standard (ONNX Runtime) or vacc (vendor custom op).")
@click.option("--ort-ops", type=click.Choice(["contrib", "onnx"]), default=None,
              help="ONNX Runtime graphs: contrib (fused kernels, default) or onnx (standard ops only).")
@click.option("--export-seq-len", default=None, callback=parse_int_list,
              help="Fixed ONNX buckets, e.g. 1024,2048 (default: dynamic axes).")
@click.option("--tp", type=int, default=None, help="Tensor parallel size for vamc.")
@click.option("--seq-lens", default=None, callback=parse_int_list, help="vamc buckets, e.g. 1024,2048.")
@click.option("--vamc", default=None, envvar="SKYWORK_DEPLOY_VAMC", help="vamc executable [env SKYWORK_DEPLOY_VAMC].")
@click.option("--prompt", default=None, help="Prompt for the validation (and demo) answer.")
@click.option("--force", is_flag=True, help="Redo every stage even when its inputs are unchanged.")
@click.option("--allow-unvalidated", is_flag=True,
              help="Exit 0 even when a validation was skipped for lack of memory (recorded as a warning).")
@json_option
@handle_errors
def build(model, config_file, dtype, out, demo, calib_dataset, calib_source, nsamples, seqlen, int8_format,
          ort_ops, export_seq_len, tp, seq_lens, vamc, prompt, force, allow_unvalidated, as_json):
    """Run patch -> calib -> quantize -> export -> validate -> compile into one build folder.

    Each stage writes its own subfolder and manifest; a stage whose inputs and options are unchanged is
    skipped, an interrupted build resumes where it stopped. BUILD/manifest.json records versions, model
    identity, every artifact's sha256, each stage's time and peak memory, and the validation figures.
    Exit code 0 only when every stage and every validation passed (see --allow-unvalidated).

    \b
    Examples:
      skywork-deploy build --demo
      skywork-deploy build ./Skywork-OR1-7B-Preview --dtype fp16 -o build-7b-fp16
      skywork-deploy build ./Skywork-OR1-7B-Preview --dtype int8 \\
          --calib-dataset c4 --calib-source ./c4/en --nsamples 128 --seqlen 1024
      skywork-deploy build -c build.yaml --json
    """
    from ..pipeline import BuildSettings, run_build
    from ..pipeline.demo import demo_settings, ensure_demo_model

    if demo:
        settings = demo_settings(out or "skywork-demo", dtype or "int8")
        ensure_demo_model(settings.model)
    elif config_file:
        settings = BuildSettings.from_yaml(Path(config_file).read_text(encoding="utf-8"), where=config_file)
    else:
        settings = BuildSettings()
    for dotted, value in (("model", model), ("dtype", dtype), ("output", out), ("calib.dataset", calib_dataset),
                          ("calib.source", calib_source), ("calib.nsamples", nsamples), ("calib.seqlen", seqlen),
                          ("export.int8_format", int8_format), ("export.ort_ops", ort_ops),
                          ("export.seq_lens", export_seq_len),
                          ("compile.tp", tp), ("compile.seq_lens", seq_lens), ("compile.vamc", vamc),
                          ("run.prompt", prompt)):
        settings.override(dotted, value)
    echo = (lambda text: click.echo(text, err=True))
    manifest = run_build(settings, force=force, echo=echo, allow_unvalidated=allow_unvalidated)
    if as_json:
        emit_json(manifest)
        return
    _print_summary(manifest)
    if demo:
        _demo_answer(manifest)


def _print_summary(manifest):
    click.echo(f"\n{'stage':<10} {'status':<8} {'seconds':>8} {'peak RSS':>10}")
    for name in manifest["stage_order"]:
        stage = manifest["stages"][name]
        status = "cached" if stage["skipped"] else "done"
        click.echo(f"{name:<10} {status:<8} {stage['seconds']:>8.1f} {stage['peak_rss_bytes'] / 2**30:>8.2f} GiB")
    for name, v in manifest["validation"].items():
        figures = ", ".join(f"{k}={v[k]}" for k in sorted(v) if k != "passed" and not isinstance(v[k], (dict, list)))
        status = "passed" if v.get("passed") else "SKIPPED (warning)" if v.get("skipped") else "FAILED"
        click.echo(f"validation {name}: {status} {figures}")
    click.echo(f"Build folder: {Path(manifest['settings']['output']).resolve()} (manifest.json)")


def _demo_answer(manifest):
    from ..runtime.backends import make_backend
    from ..runtime.bundle import load_tokenizer, open_bundle
    from ..runtime.generate import generate_text

    bundle = open_bundle(manifest["settings"]["output"])
    tokenizer = load_tokenizer(bundle)
    prompt = manifest["settings"]["run"]["prompt"]
    click.echo(f"\nPrompt: {prompt}\nAnswer (random weights, so meaningless text): ", nl=False)
    result = generate_text(make_backend("onnxruntime", bundle), tokenizer, [prompt],
                           max_new_tokens=manifest["settings"]["run"]["max_new_tokens"],
                           on_text=lambda piece: click.echo(piece, nl=False))
    timing = result["timing"]
    click.echo(f"\n[{timing['decode_steps']} tokens, decode {timing['decode_tokens_per_s'] or 0:.1f} tok/s]")
