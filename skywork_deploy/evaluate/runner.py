"""Run a problem set on a target (and optionally a reference) and score it: avg@K, pass@k, paired difference.

Problem i is sampled with seed `seed + i` on every target, so a target and its reference see the same
problems and seeds. avg@K is the mean over problems of the share of correct samples (an unparsable prediction
is not correct; it is counted apart from the wrong ones); problems whose gold answer Math-Verify cannot parse
are left out of every figure and reported. pass@k uses the unbiased estimator 1 - C(n-c, k) / C(n, k).
The reference comparison is the mean of the per-problem differences with its paired standard error.
"""
import json
import math
import time
from math import comb

from ..base.errors import ConfigError
from ..base.progress import bar
from .scoring import CORRECT, GOLD_UNPARSABLE, STATUSES, parse_gold, score

SKYWORK_SAMPLING = {"temperature": 0.6, "top_p": 0.95}


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021)."""
    if k > n:
        raise ConfigError(f"pass@{k} needs at least {k} samples per problem (--samples {n})")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def ks_for(samples):
    """The k of pass@k reported: 1, the powers of two below K, and K."""
    ks, k = [], 1
    while k < samples:
        ks.append(k)
        k *= 2
    return ks + [samples]


def mean_se(values):
    """Mean and standard error of the mean (0 for fewer than two values)."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0
    m = sum(values) / n
    if n < 2:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def summarize(rows, samples):
    """Per-problem rows (with `statuses`) -> the figures of one target."""
    scored = [r for r in rows if not r["gold_unparsable"]]
    counts = {s: sum(r["statuses"].count(s) for r in rows) for s in STATUSES}
    acc = [r["correct"] / samples for r in scored]
    avg, se = mean_se(acc)
    passes = {f"pass@{k}": (sum(pass_at_k(samples, r["correct"], k) for r in scored) / len(scored)
                            if scored else 0.0) for k in ks_for(samples)}
    return {"problems": len(rows), "scored_problems": len(scored), f"avg@{samples}": avg, "avg": avg,
            "avg_se": se, **passes, "counts": counts,
            "gold_unparsable_ids": [r["id"] for r in rows if r["gold_unparsable"]]}


def paired_difference(target_rows, reference_rows, samples):
    """Target minus reference accuracy, in points (0-100), with the paired standard error."""
    diffs = [(t["correct"] - r["correct"]) / samples * 100 for t, r in zip(target_rows, reference_rows)
             if not t["gold_unparsable"]]
    d, se = mean_se(diffs)
    return {"points": d, "paired_se": se, "problems": len(diffs)}


def difference_line(name, diff, scores=None):
    """`int8 lost 0.4 points +- 1.1 (paired SE, 30 problems)`, then the two accuracies when given."""
    points = round(diff["points"], 1)
    verb = "lost" if points < 0 else "gained" if points > 0 else "matched the reference:"
    line = f"{name} {verb} {abs(points):.1f} points +- {diff['paired_se']:.1f} (paired SE, {diff['problems']} problems)"
    if scores:
        (k, avg, ref_avg, ref_name) = scores
        line += f"; avg@{k} {avg * 100:.1f} vs {ref_avg * 100:.1f} for {ref_name}"
    return line


def evaluate(target, problems, samples=1, max_tokens=512, temperature=0.6, top_p=0.95, seed=0, desc="eval"):
    """-> (per-problem rows, timing dict) for one target."""
    if samples < 1:
        raise ConfigError(f"--samples {samples}: must be at least 1")
    rows, tokens = [], 0
    t0 = time.perf_counter()
    for i, p in enumerate(bar(problems, total=len(problems), desc=desc, unit="problem")):
        gold = parse_gold(p["answer"])
        outs = target.generate(p["problem"], samples, seed + i, max_tokens, temperature, top_p)
        results = [score(o.text, p["answer"], gold) if gold else (GOLD_UNPARSABLE, None) for o in outs]
        tokens += sum(o.tokens for o in outs)
        rows.append({
            "index": i, "id": p["id"], "problem": p["problem"], "answer": p["answer"],
            "gold_unparsable": not gold, "statuses": [s for s, _ in results],
            "correct": sum(s == CORRECT for s, _ in results), "seed": seed + i,
            "samples": [{"text": o.text, "status": s, "prediction": pred, "tokens": o.tokens,
                         "finish_reason": o.finish_reason} for o, (s, pred) in zip(outs, results)],
        })
    wall = time.perf_counter() - t0
    return rows, {"wall_s": wall, "tokens_generated": tokens, "tokens_per_s": tokens / max(wall, 1e-9)}


def run_eval(target, problems, reference=None, samples=1, max_tokens=512, temperature=0.6, top_p=0.95, seed=0,
             output=None):
    """Evaluate `target` (and `reference` on the same problems and seeds) -> a JSON-able result dict.

    `output`: a path for the per-problem JSONL (written through a temporary file)."""
    opts = dict(samples=samples, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    rows, timing = evaluate(target, problems, desc="eval", **opts)
    result = {"samples": samples, "sampling": {"temperature": temperature, "top_p": top_p, "seed": seed},
              "max_tokens": max_tokens, "problems": len(problems),
              "target": {"name": target.name, **target.info, **summarize(rows, samples), **timing}}
    ref_rows = None
    if reference is not None:
        ref_rows, ref_timing = evaluate(reference, problems, desc="reference", **opts)
        result["reference"] = {"name": reference.name, **reference.info, **summarize(ref_rows, samples),
                               **ref_timing}
        diff = paired_difference(rows, ref_rows, samples)
        scores = (samples, result["target"]["avg"], result["reference"]["avg"], reference.name)
        result["difference"] = {**diff, "line": difference_line(target.name, diff, scores)}
    if output:
        write_rows(output, rows, ref_rows)
        result["output"] = str(output)
    return result


RESULTS_STAMP = b'{"index": 0, "id": '  # how every per-problem results file write_rows writes begins


def check_results_file(path, inputs):
    """The output rule for `eval -o`, checked before anything loads: not an input (the dataset, a bundle's own
    file), not a link, and an existing file only when it is a results file of ours."""
    from ..base.fsutil import check_output_file, starts_with

    return check_output_file(path, inputs, "-o/--output", starts_with(RESULTS_STAMP))


def write_rows(path, rows, ref_rows=None):
    from ..base.fsutil import write_text

    lines = []
    for i, row in enumerate(rows):
        rec = {k: v for k, v in row.items() if k != "statuses"}
        if ref_rows is not None:
            ref = ref_rows[i]
            rec["reference"] = {"correct": ref["correct"], "samples": ref["samples"]}
        lines.append(json.dumps(rec, ensure_ascii=False))
    write_text(path, "\n".join(lines) + "\n")


def report_lines(result):
    """The human-readable summary `eval` prints."""
    k = result["samples"]
    lines = []
    for role in ("target", "reference"):
        t = result.get(role)
        if not t:
            continue
        c = t["counts"]
        passes = ", ".join(f"{key} {t[key] * 100:.1f}" for key in t if key.startswith("pass@"))
        lines.append(f"{role} {t['name']}: avg@{k} {t['avg'] * 100:.1f} +- {t['avg_se'] * 100:.1f} (SE), {passes} "
                     f"on {t['scored_problems']} problems; samples {c[CORRECT]} correct, {c['wrong']} wrong, "
                     f"{c['prediction_unparsable']} unparsable; {t['tokens_generated']} tokens in "
                     f"{t['wall_s']:.1f} s ({t['tokens_per_s']:.0f} tok/s)")
        if t["gold_unparsable_ids"]:
            lines.append(f"  {len(t['gold_unparsable_ids'])} problems skipped: gold answer unparsable "
                         f"(ids {', '.join(t['gold_unparsable_ids'][:10])})")
    if "difference" in result:
        lines.append(result["difference"]["line"])
    return lines
