"""`skywork-deploy calib`: thin CLI over skywork_deploy.calib."""
import click

from .common import PathArg, emit_json, handle_errors, json_option


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dataset", type=click.Choice(["c4", "ceval", "alpaca"]), required=True,
              help="Which calibration source SOURCE is.")
@click.option("--source", "sources", multiple=True, required=True, type=PathArg("source", hub=True),
              help="Local file or folder (C4: .json.gz shards, repeatable; C-Eval: ceval-exam.zip or its folder; "
                   "Alpaca: alpaca_data_cleaned.json), or a hub id (allenai/c4, ceval/ceval-exam, "
                   "yahma/alpaca-cleaned).")
@click.option("--model", required=True, type=PathArg("model", hub=True), help="Model folder (or hub id) whose tokenizer is used.")
@click.option("--nsamples", type=click.IntRange(min=1), default=None,
              help="Number of windows.  [default: 128]")
@click.option("--seqlen", type=click.IntRange(min=1), default=None,
              help="Tokens per window.  [default: c4 1024, ceval 128, alpaca 512]")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the one numpy generator.")
@click.option("--split", type=click.Choice(["dev", "val", "test"]), default=None,
              help="C-Eval split.  [default: val]")
@click.option("--allow-packing", is_flag=True,
              help="C4: when too few documents have SEQLEN tokens, pack shorter ones (EOS-separated) for the rest.")
@click.option("-o", "--out", type=click.Path(file_okay=False), required=True, help="Output folder (new).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only after the new set is complete).")
@json_option
@handle_errors
def calib(dataset, sources, model, nsamples, seqlen, seed, split, allow_packing, out, overwrite, as_json):
    """Build a seeded calibration set (token windows + manifest) from C4, C-Eval or Alpaca.

    Writes OUT/calib.safetensors (input_ids and attention_mask, int64 [NSAMPLES, SEQLEN]) and
    OUT/skywork_deploy_manifest.json (source hashes, tokenizer identity, where each window came from, and the
    `dataset:` block for the compiler YAML). Same inputs and seed give byte-identical files.

    \b
    Examples:
      skywork-deploy calib --dataset c4 --source c4-train.00000-of-01024.json.gz --model ./or1-7b -o calib-c4
      skywork-deploy calib --dataset ceval --source ceval-exam.zip --split val --model ./or1-7b -o calib-ceval
      skywork-deploy calib --dataset alpaca --source alpaca_data_cleaned.json --model ./or1-7b -o calib-alpaca
      skywork-deploy calib --dataset c4 --source allenai/c4 --model ./or1-7b --seqlen 2048 -o calib-c4-2k
    """
    from .. import calib as stage
    from ..calib.stage import summary_lines
    from ..base.progress import bar as progress_bar

    bar = progress_bar(desc="calib: reading", unit="B", unit_scale=True)

    try:
        result = stage.build_calib(dataset, list(sources), model, out,
                                   nsamples=nsamples or stage.DEFAULT_NSAMPLES, seqlen=seqlen, seed=seed,
                                   split=split, allow_packing=allow_packing, overwrite=overwrite, progress=bar.update)
    finally:
        bar.close()
    if as_json:
        emit_json({k: v for k, v in result.items() if k != "windows"})
    else:
        for line in summary_lines(result):
            click.echo(line)
