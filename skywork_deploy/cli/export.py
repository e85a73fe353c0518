"""`skywork-deploy export`: thin CLI over skywork_deploy.export."""
import click

from .common import PathArg, emit_json, extra_tensors_option, handle_errors, json_option, parse_int_list, run_line


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=PathArg("model", hub=True))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Bundle folder to create.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="Weights and activations: fp32 (default), fp16, or int8 W8A16 (implied for a quantized folder).")
@click.option("--int8-format", type=click.Choice(["vacc", "standard"]), default="standard", show_default=True,
              help="vacc: Vastai::QuantizedLinearPerChannel custom op (for vamc); standard: DequantizeLinear+MatMul "
                   "(ONNX Runtime).")
@click.option("--ort-ops", type=click.Choice(["contrib", "onnx"]), default="contrib", show_default=True,
              help="ONNX Runtime graphs (not vacc): contrib uses ONNX Runtime's fused kernels (SkipSimplified"
                   "LayerNormalization, RotaryEmbedding, GroupQueryAttention); onnx keeps standard ONNX ops only.")
@click.option("--seq-len", "seq_lens", multiple=True, callback=parse_int_list,
              help="Fixed prefill bucket(s), multiples of 16 (repeat or comma-separate). Default: dynamic axes.")
@click.option("--validation", type=click.Choice(["auto", "whole", "streamed"]), default="auto", show_default=True,
              help="How ONNX Runtime runs the graphs for the check: whole (one session per graph), streamed (cut at "
                   "decoder layers, one piece's session at a time: about the largest piece's memory), auto (whole "
                   "when it fits, else streamed).")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT folder.")
@extra_tensors_option
@json_option
@handle_errors
def export(model, out, dtype, int8_format, ort_ops, seq_lens, validation, no_simplify, overwrite, allow_extra_tensors,
           as_json):
    """Export the prefill and decode ONNX graphs of MODEL and validate them against the torch reference.

    MODEL is a plain Qwen2 folder (patched on the fly in a temporary copy), a patched folder, or a folder
    written by `skywork-deploy quantize` (then --dtype int8 is implied). The graphs are traced without
    weights; the weights are streamed from the shards into one external data file shared by both graphs.
    ONNX Runtime is checked against the reference on a left-padded batch and 8 chained decode steps; the
    table is written to OUT/validation.json. On a mismatch OUT is not created and the bundle is kept in
    OUT.failed for inspection. The reference is the whole fp32 model when it fits in memory, else a
    layer-streamed one (SKYWORK_DEPLOY_REFERENCE=whole|streamed forces one). ONNX Runtime runs each graph as
    one session when it fits, else layer-streamed (--validation): the same graph files cut at decoder layers,
    one piece's session at a time, so 7B fp16 and 32B bundles are checked on a 24 GiB machine; only when not
    even the largest piece fits is validation skipped with a warning (validation.json: "skipped").

    \b
    Examples:
      skywork-deploy export ./or1-7b-vacc -o ./or1-7b-onnx
      skywork-deploy export ./or1-7b-vacc -o ./or1-7b-fp16 --dtype fp16 --seq-len 1024,2048
      skywork-deploy export ./or1-7b-int8 -o ./or1-7b-int8-onnx --int8-format vacc
      skywork-deploy export ./or1-7b-vacc -o ./or1-7b-portable --ort-ops onnx
      skywork-deploy export ./or1-32b-vacc -o ./or1-32b-fp16 --dtype fp16 --validation streamed
    """
    from ..export import export_model

    result = export_model(model, out, dtype=dtype, int8_format=int8_format, seq_lens=seq_lens,
                          simplify=not no_simplify, overwrite=overwrite, ort_ops=ort_ops,
                          validation=validation, allow_extra_tensors=allow_extra_tensors)
    if as_json:
        emit_json(result)
        return
    click.echo(result["validation"]["table"])
    for mode, run in (result["validation"].get("runs") or {}).items():
        if "seconds" in run:
            click.echo(f"{mode}: {run_line(run)}")
    for kind, info in result["simplify"].items():
        if info.get("message"):
            click.echo(f"note: {info['message']}")
    nodes = ", ".join(f"{k} {v}" for k, v in result["nodes"].items())
    click.echo(f"Exported {result['dtype']}{'/' + result['int8_format'] if result['int8_format'] else ''} to "
               f"{result['out']} in {result['seconds']:.1f} s (nodes: {nodes}; weights "
               f"{result['weight_bytes'] / 2**20:.1f} MiB; peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB).")
