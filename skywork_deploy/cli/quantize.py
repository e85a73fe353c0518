"""`skywork-deploy quantize`: thin CLI over skywork_deploy.quantize."""
import logging

import click

from ..quantize.report import MAX_KL, MIN_TOP1
from .common import PathArg, emit_json, extra_tensors_option, handle_errors, json_option


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=PathArg("model", hub=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="New folder for the quantized checkpoint (must not exist unless --overwrite).")
@click.option("--bits", type=int, default=8, show_default=True, help="Weight bit width (8 only).")
@click.option("--include-lm-head", is_flag=True, help="Quantize lm_head too (unties a tied embedding).")
@click.option("--eval/--no-eval", "evaluate", default=None,
              help="Compare logits of the quantized and original model on fixed prompts (layer-streamed "
                   "in fp32, about one layer in memory; default: at every size, on the 2 shortest prompts above "
                   "10B parameters for time; --eval: every prompt).")
@click.option("--min-top1", type=click.FloatRange(0, 1), default=None, metavar="SHARE",
              help="Accuracy gate: least share of positions whose greedy token the quantized model keeps "
                   f"[default: {MIN_TOP1}].")
@click.option("--max-kl", type=click.FloatRange(min=0), default=None, metavar="NATS",
              help=f"Accuracy gate: largest mean KL(original || quantized) over the positions [default: {MAX_KL}].")
@click.option("--max-shard-size", default="1GB", show_default=True,
              help="Largest output shard (capped by the largest tensor, which bounds memory).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only after success).")
@extra_tensors_option
@json_option
@handle_errors
def quantize(model, out, bits, include_lm_head, evaluate, min_top1, max_kl, max_shard_size, overwrite,
             allow_extra_tensors, as_json):
    """Weight-only per-channel int8 (W8A16) of a Qwen2 checkpoint, streamed tensor by tensor.

    Reads MODEL (plain or patched; bf16, fp16 or fp32 safetensors, single or sharded) one tensor at a
    time and writes OUT: q/k/v/o/gate/up/down of every layer as int8 `<proj>.weight` plus fp32
    `<proj>.weight_scale`, everything else unchanged, config.json with a quantization_config block,
    tokenizer files, a manifest and quantize_report.json (weight errors and end-to-end logits).
    Memory stays near the largest single tensor (the end-to-end check: near one fp32 layer). The check
    passes only within its stated thresholds (--min-top1, --max-kl); outside them the command exits 1 and
    writes nothing. With --no-eval its verdict is "skipped"; above 10B parameters it checks the 2 shortest
    prompts unless --eval (the report says so).
    `load_model(OUT)` computes what `quantize(8)` computes in memory, bit for bit.

    \b
    Examples:
      skywork-deploy quantize ./Skywork-OR1-7B-Preview -o ./or1-7b-w8a16
      skywork-deploy quantize ./qwen2.5-0.5b -o ./q05-w8 --include-lm-head --json
      skywork-deploy quantize ./or1-7b-vacc -o ./or1-7b-vacc-w8 --no-eval
    """
    from .. import quantize as stage
    from ..quantize.report import format_table

    progress = logging.getLogger().isEnabledFor(logging.WARNING)
    result = stage.quantize_model(model, out, bits=bits, include_lm_head=include_lm_head, evaluate=evaluate,
                                  max_shard_bytes=stage.parse_size(max_shard_size), overwrite=overwrite,
                                  progress=progress, min_top1=min_top1, max_kl=max_kl,
                                  allow_extra_tensors=allow_extra_tensors)
    if as_json:
        emit_json(result)
        return
    click.echo(format_table(result["report"]))
    total = result["report"]["total"]
    click.echo(f"Wrote {result['folder']}: {total['quantized']} tensors quantized, "
               f"{total['bytes_before'] / 1e9:.3f} GB -> {total['bytes_after'] / 1e9:.3f} GB in "
               f"{len(result['shards'])} shard(s), {result['seconds']:.1f} s, "
               f"peak RSS {result['peak_rss_bytes'] / 1e9:.2f} GB.")
