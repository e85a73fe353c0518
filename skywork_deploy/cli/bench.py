"""`skywork-deploy bench`: thin CLI over skywork_deploy.runtime.bench."""
import click

from .common import emit_json, handle_errors, json_option, parse_int_list
from .run import backend_options


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt-len", callback=parse_int_list, default="128,1024", show_default=True,
              help="Prompt lengths in tokens, comma-separated (random ordinary tokens, seeded).")
@click.option("--new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Decode steps per run (EOS ignored).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed runs per prompt length (after one warm-up); medians are reported.")
@backend_options
@click.option("--no-reference", is_flag=True, help="Skip the transformers eager reference.")
@click.option("--no-io-binding", is_flag=True, help="ONNX Runtime: plain session.run loop (to measure IOBinding).")
@click.option("--no-kv-in-place", is_flag=True,
              help="ONNX Runtime: a fresh present per step instead of appending to one K/V buffer (to measure it).")
@click.option("--seed", type=int, default=0, show_default=True)
@json_option
@handle_errors
def bench(bundle, prompt_len, new_tokens, repeats, backend, threads, int8_accuracy, no_reference, no_io_binding,
          no_kv_in_place, seed, as_json):
    """Measure prefill latency and decode speed of BUNDLE against transformers eager.

    For each prompt length: prefill milliseconds and decode tokens/s at batch 1 (medians over --repeats),
    then the same for transformers' Qwen2ForCausalLM (eager attention, fp32) loaded from the bundle's
    source model in the same run, and the ratios (prefill speed-up, decode ratio; > 1 means faster).

    \b
    Examples:
      skywork-deploy bench ./or1-7b-onnx
      skywork-deploy bench ./qwen-0.5b-int8 --prompt-len 128 --new-tokens 64 --threads 2 --int8-accuracy fast
      skywork-deploy bench ./qwen-0.5b-onnx --no-reference --json
    """
    from ..runtime.bench import bench_bundle
    from ..runtime.bundle import open_bundle

    report = bench_bundle(open_bundle(bundle), backend, prompt_len, new_tokens, repeats, threads=threads,
                          int8_accuracy=int8_accuracy, reference=not no_reference, seed=seed,
                          io_binding=not no_io_binding, kv_in_place=not no_kv_in_place)
    if as_json:
        emit_json(report)
        return
    b = report["backend"]
    click.echo(f"{b['backend']} {b['dtype']} ({report['threads']} threads), {new_tokens} new tokens, "
               f"median of {repeats}:")
    click.echo(f"{'prompt':>7} {'prefill ms':>11} {'decode tok/s':>13} {'ref prefill ms':>15} "
               f"{'ref tok/s':>10} {'prefill x':>10} {'decode x':>9}")
    for r in report["rows"]:
        ref = [f"{r['reference_prefill_ms']:15.1f}", f"{r['reference_decode_tokens_per_s']:10.2f}",
               f"{r['prefill_speedup']:10.2f}", f"{r['decode_ratio']:9.2f}"] if "decode_ratio" in r else []
        click.echo(f"{r['prompt_len']:>7} {r['prefill_ms']:11.1f} {r['decode_tokens_per_s']:13.2f} " + " ".join(ref))
    if report.get("reference_error"):
        click.echo(f"reference skipped: {report['reference_error']}", err=True)
