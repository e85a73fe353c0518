"""`skywork-deploy eval`: thin CLI over skywork_deploy.evaluate (Math-Verify scoring of a deployment)."""
import click

from .common import emit_json, handle_errors, json_option
from .run import BACKEND_NAMES


@click.command("eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("target", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--endpoint", default=None, metavar="URL",
              help="Evaluate an OpenAI-compatible server instead of a folder (ours, vastgenx, vLLM).")
@click.option("--model", "model_name", default=None, metavar="NAME",
              help="Model name on the endpoint (default: the first one /v1/models lists).")
@click.option("--api-key", envvar="SKYWORK_DEPLOY_API_KEY", default=None, help="Bearer key for the endpoint.")
@click.option("--dataset", required=True, metavar="FILE",
              help="JSON/JSONL/Parquet/CSV problems (AIME24/AIME25/MATH-500 columns recognised), or a hub id.")
@click.option("--problem-key", default=None, help="Column holding the problem text (when not recognised).")
@click.option("--answer-key", default=None, help="Column holding the gold answer (when not recognised).")
@click.option("--split", default=None, help="Split of a hub dataset (default: test).")
@click.option("--samples", "-k", type=click.IntRange(min=1), default=1, show_default=True,
              help="Samples per problem (K of avg@K and pass@K).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N problems.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Token limit of each answer.")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.6, show_default=True,
              help="Skywork-OR1's default; 0 = greedy.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=0.95, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Problem i is sampled with seed SEED+i.")
@click.option("--reference", default=None, metavar="TARGET2",
              help="A second folder or endpoint URL run on the same problems and seeds (e.g. the fp32 bundle).")
@click.option("--backend", type=click.Choice(BACKEND_NAMES), default=None,
              help="Backend for TARGET (default: onnxruntime for a bundle, torch for a model folder).")
@click.option("--reference-backend", type=click.Choice(BACKEND_NAMES), default=None,
              help="Backend for --reference (same default rule; torch = the reference of a folder).")
@click.option("--int8-accuracy", type=click.Choice(["exact", "fast"]), default="exact", show_default=True,
              help="int8 bundles on ONNX Runtime: exact W8A16 arithmetic, or fast MatMulNBits.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for in-process backends.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write per-problem results (every sample, its status and tokens) as JSONL here.")
@json_option
@handle_errors
def eval_(target, endpoint, model_name, api_key, dataset, problem_key, answer_key, split, samples, limit,
          max_tokens, temperature, top_p, seed, reference, backend, reference_backend, int8_accuracy, threads,
          output, as_json):
    """Score TARGET on math problems with Math-Verify: avg@K, pass@K, tokens and time.

    TARGET is an export bundle, a build folder or a model folder run in this process, or use --endpoint
    for a server. Each problem goes through the model's chat template (DeepSeek-R1's, ending in
    `<think>`); the answer after `</think>` is parsed and verified against the gold answer. Answers
    Math-Verify cannot parse are counted apart from wrong ones. With --reference the same problems and
    seeds run on a second target and the difference is printed with its paired standard error.

    \b
    Examples:
      skywork-deploy eval ./build/export --dataset aime25.jsonl --samples 32 --max-tokens 32768
      skywork-deploy eval ./int8-onnx --dataset math500.parquet --reference ./fp32-onnx --limit 100
      skywork-deploy eval --endpoint http://127.0.0.1:9900/v1 --dataset aime24.parquet -k 4
      skywork-deploy eval ./b --dataset q.csv --problem-key Question --answer-key Gold -o results.jsonl
    """
    from ..evaluate.datasets import load_problems
    from ..evaluate.runner import check_results_file, report_lines, run_eval
    from ..evaluate.targets import open_target

    if (target is None) == (endpoint is None):
        raise click.UsageError("give exactly one of TARGET or --endpoint URL")
    if output:
        check_results_file(output, [dataset, target, reference])
    problems = load_problems(dataset, problem_key, answer_key, split=split, limit=limit)
    for folder in (target, reference):
        _check_tokens(folder, max_tokens)
    opened = []
    try:
        tgt = open_target(endpoint or target, backend, threads, int8_accuracy, model=model_name, api_key=api_key)
        opened.append(tgt)
        ref = None
        if reference is not None:
            ref = open_target(reference, reference_backend, threads, int8_accuracy, api_key=api_key)
            opened.append(ref)
        result = run_eval(tgt, problems, reference=ref, samples=samples, max_tokens=max_tokens,
                          temperature=temperature, top_p=top_p, seed=seed, output=output)
    finally:
        for t in opened:
            t.close()
    result["dataset"] = str(dataset)
    if as_json:
        emit_json(result)
        return
    for line in report_lines(result):
        click.echo(line)
    if output:
        click.echo(f"per-problem results: {output}", err=True)


def _check_tokens(folder, max_tokens):
    """--max-tokens against a local target's positions, before its backend loads (exit 2)."""
    from pathlib import Path

    if folder is None or not Path(folder).is_dir():
        return  # an endpoint URL: the server says
    from ..base.errors import UsageError
    from ..runtime.bundle import open_bundle
    from ..runtime.generate import check_context

    check_context(1, max_tokens, open_bundle(folder).spec.max_positions, UsageError, "--max-tokens")
