"""The build's eval stage: a short Math-Verify eval of the deployed ONNX bundle against the fp32 torch reference.

Runs only when the build has problems configured (build.yaml `eval:` block / `--eval-dataset`). The target
is the export bundle on ONNX Runtime (int8: the exact W8A16 arithmetic), the reference is the patched fp32
model on torch, both on the same problems and seeds. Writes eval.json and results.jsonl into its folder;
the returned summary goes into the build manifest. When either side would not fit in memory it runs what
fits and says why the rest was skipped.
"""
from pathlib import Path

from ..base.fsutil import sha256_file, write_json
from .datasets import load_problems
from .runner import run_eval
from .targets import BundleTarget


def eval_options(ev):
    """The stage's cache key options: the settings plus the dataset file's hash (edits redo the stage)."""
    opts = dict(vars(ev))
    path = Path(str(ev.dataset))
    if path.is_file():
        opts["dataset_sha256"] = sha256_file(path)
    return opts


def _keep(side):
    keys = ("name", "backend", "problems", "scored_problems", "avg", "avg_se", "counts", "tokens_generated",
            "wall_s")
    return {k: side[k] for k in keys if k in side} | {k: v for k, v in side.items() if k.startswith("pass@")}


def build_eval(ev, export_dir, reference_dir, out, ort_options=None, reference_note=None):
    """Run the eval of `export_dir` (vs `reference_dir` on torch unless `reference_note` says why not)."""
    out = Path(out)
    out.mkdir(parents=True)
    problems = load_problems(ev.dataset, ev.problem_key, ev.answer_key, limit=ev.limit)
    ort_options = dict(ort_options or {})
    accuracy = ort_options.pop("int8_accuracy", "exact")
    target = BundleTarget(export_dir, backend="onnxruntime", int8_accuracy=accuracy)
    reference = None if reference_note else BundleTarget(reference_dir, backend="torch")
    result = run_eval(target, problems, reference=reference, samples=ev.samples, max_tokens=ev.max_tokens,
                      temperature=ev.temperature, top_p=ev.top_p, seed=ev.seed, output=out / "results.jsonl")
    result["dataset"] = str(ev.dataset)
    write_json(out / "eval.json", result)
    summary = {"dataset": str(ev.dataset), "problems": len(problems), "samples": ev.samples,
               "sampling": result["sampling"], "target": _keep(result["target"])}
    if reference is not None:
        summary["reference"] = _keep(result["reference"])
        summary["difference"] = result["difference"]
        summary["line"] = result["difference"]["line"]
    else:
        summary["reference_skipped"] = reference_note
        summary["line"] = f"{target.name}: avg@{ev.samples} {result['target']['avg'] * 100:.1f} " \
                          f"(reference skipped: {reference_note})"
    return summary
