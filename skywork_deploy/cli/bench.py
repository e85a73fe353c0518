"""`skywork-deploy bench`: thin CLI over skywork_deploy.runtime.bench."""
import click

from .common import PathArg, emit_json, handle_errors, json_option, parse_int_list, positive_int_list
from .run import backend_options, bundle_or_endpoint, endpoint_options


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=PathArg("bundle", hub=False), required=False)
@click.option("--prompt-len", callback=positive_int_list, default=None,
              help="Prompt lengths in tokens, comma-separated (random ordinary tokens of the bundle's tokenizer, "
                   "seeded) [default: 128,1024, those that fit the model's context with --new-tokens].")
@click.option("--new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Decode steps per run (EOS ignored).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed runs per prompt length (after one warm-up); medians are reported.")
@backend_options
@click.option("--no-reference", is_flag=True, help="Skip the transformers eager reference.")
@click.option("--no-io-binding", is_flag=True, help="ONNX Runtime: plain session.run loop (to measure IOBinding).")
@click.option("--no-kv-in-place", is_flag=True,
              help="ONNX Runtime: a fresh present per step instead of appending to one K/V buffer (to measure it).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@endpoint_options
@click.option("--concurrency", callback=parse_int_list, default=None,
              help="Serving benchmark at these concurrency levels, e.g. 1,4,8,16 (the default with --endpoint).")
@click.option("--input-len", type=click.IntRange(min=1), default=None,
              help="Serving benchmark: prompt tokens (random ordinary tokens of the model's tokenizer, seeded) "
                   "[default: 128, or what the model's context leaves beside --output-len].")
@click.option("--output-len", type=click.IntRange(min=1), default=64, show_default=True,
              help="Serving benchmark: tokens generated per request (ignore_eos).")
@click.option("--num-prompts", type=click.IntRange(min=1), default=None,
              help="Serving benchmark: requests per level (default: max(4, 2 x concurrency)).")
@click.option("--tokenizer", "tokenizer_path", type=PathArg("bundle", hub=False), default=None,
              help="Serving benchmark with --endpoint: a folder with the served model's tokenizer (a bundle, a build "
                   "or a model folder); prompts are then its ordinary tokens, sent as text. Default: the "
                   "vocabulary size /v1/models reports (our server does), else Qwen's.")
@json_option
@handle_errors
def bench(bundle, prompt_len, new_tokens, repeats, backend, threads, int8_accuracy, no_reference, no_io_binding,
          no_kv_in_place, seed, endpoint, model_name, api_key, concurrency, input_len, output_len, num_prompts,
          tokenizer_path, as_json):
    """Measure prefill latency and decode speed of BUNDLE against transformers eager, or serving speed.

    For each prompt length: prefill milliseconds and decode tokens/s at batch 1 (medians over --repeats),
    then the same for transformers' Qwen2ForCausalLM (eager attention, fp32) loaded from the bundle's
    source model in the same run, and the ratios (prefill speed-up, decode ratio; > 1 means faster).

    With --endpoint URL (any OpenAI-compatible server) or --concurrency, it runs the vendor's serving
    benchmark instead: random prompts of --input-len tokens, --output-len tokens each with ignore_eos,
    streamed, at each --concurrency level; request and token throughput and mean/median/p99 of TTFT,
    TPOT ((latency - TTFT) / (tokens - 1)), ITL and end-to-end latency in ms. On a BUNDLE it starts
    `skywork-deploy serve`'s server on a free loopback port and measures through it.

    \b
    Examples:
      skywork-deploy bench ./or1-7b-onnx
      skywork-deploy bench ./qwen-0.5b-int8 --prompt-len 128 --new-tokens 64 --threads 2 --int8-accuracy fast
      skywork-deploy bench ./qwen-0.5b-onnx --no-reference --json
      skywork-deploy bench --endpoint http://127.0.0.1:9900/v1 --input-len 510 --output-len 512
      skywork-deploy bench ./qwen-0.5b-int8 --concurrency 1,4,8 --int8-accuracy fast --threads 2
    """
    bundle_or_endpoint(bundle, endpoint)
    if tokenizer_path and not endpoint:
        raise click.UsageError("--tokenizer applies to --endpoint only (a BUNDLE's own tokenizer is used)")
    if endpoint or concurrency:
        return serving_bench(bundle, endpoint, model_name, api_key, concurrency or [1, 4, 8, 16], input_len,
                             output_len, num_prompts, threads, int8_accuracy, seed, as_json, tokenizer_path)
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


def serving_bench(bundle, endpoint, model_name, api_key, concurrency, input_len, output_len, num_prompts, threads,
                  int8_accuracy, seed, as_json, tokenizer_path=None):
    from ..serve.loadgen import bench_endpoint, format_table

    running, vocab = None, None
    if bundle is not None:  # our own server on a free loopback port: the same HTTP path as --endpoint
        from ..runtime.bench import bundle_vocab
        from ..runtime.bundle import open_bundle
        from ..serve.server import start_in_thread

        opened = open_bundle(bundle)
        if opened.kind != "export":
            raise click.UsageError(f"{bundle}: the serving benchmark needs an export bundle (or a build folder "
                                   "holding one), not a model folder")
        vocab = bundle_vocab(opened)
        running = start_in_thread(bundle, threads=threads, int8_accuracy=int8_accuracy, max_batch=max(concurrency),
                                  max_queue=max(64, 4 * max(concurrency)))
        endpoint = running.url
    try:
        report = bench_endpoint(endpoint, model_name, api_key, input_len, output_len, concurrency, num_prompts,
                                tokenizer=_tokenizer(tokenizer_path), vocab=vocab, seed=seed)
    finally:
        if running is not None:
            running.stop()
    if bundle is not None:
        report["server"] = {"bundle": str(bundle), "threads": threads, "int8_accuracy": int8_accuracy,
                            "max_batch": max(concurrency)}
    if as_json:
        emit_json(report)
        return
    for line in format_table(report):
        click.echo(line)


def _tokenizer(path):
    if path is None:
        return None
    from ..runtime.bundle import load_tokenizer, open_bundle

    return load_tokenizer(open_bundle(path))
