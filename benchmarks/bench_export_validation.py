"""Whole-command memory of `export` (with its validation) and `quantize` (with its end-to-end check).

    python benchmarks/bench_export_validation.py run [--cases 7b-2,7b-4] [--before-tree /tmp/before]
    python benchmarks/bench_export_validation.py summarize

`run` measures, one at a time under the heavy lock, with benchmarks/memwatch.py (peaks of RssAnon, RssFile
and VmRSS over the process tree, and /usr/bin/time -v):
- after: `SKYWORK_DEPLOY_REFERENCE=streamed skywork-deploy export CKPT -o OUT --json` (fp32), and with
  --auto the same without the variable (the reference chosen by memory);
- after: `skywork-deploy quantize CKPT -o OUT --json` (end-to-end check on by default, layer-streamed);
- before (when --before-tree holds an export of the previous commit, `git archive HEAD | tar -x -C DIR`
  plus links DIR/skywork_deploy/{source_code,build_in,calibration} -> ../...): the same export command.
Checkpoints are the 7B-shaped bf16 ones of bench_export.py (benchmarks/work/export/CASE-ckpt, reused).
`summarize` turns benchmarks/work/export/mem/*.json into benchmarks/results/export_validation.json.
"""
import argparse
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from memwatch import watch  # noqa: E402

WORK = HERE / "work" / "export"
MEM = WORK / "mem"
GIB = 2 ** 30


def _ckpt(case):
    from bench_export import CASES
    from bench_quantize import write_checkpoint
    from skywork_deploy.base.synth import write_r1_tokenizer

    ckpt = WORK / f"{case}-ckpt"
    if not (ckpt / "model.safetensors.index.json").is_file():
        shutil.rmtree(ckpt, ignore_errors=True)
        write_checkpoint(ckpt, *CASES[case])
        write_r1_tokenizer(ckpt)
    return ckpt


def _measure(name, cmd, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    res = watch(cmd, heavy=True, env=env)
    res["env"] = env_extra or {}
    MEM.mkdir(parents=True, exist_ok=True)
    (MEM / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    print(name, res["rc"], res["wall_s"], {k: round(v / GIB, 2) for k, v in res["peak"].items()}, flush=True)


def run(cases, before_tree, auto):
    cli = [sys.executable, "-m", "skywork_deploy"]
    for case in cases:
        ckpt = _ckpt(case)
        runs = [("before", {"PYTHONPATH": str(before_tree)})] if before_tree else []
        runs.append(("after-streamed", {"SKYWORK_DEPLOY_REFERENCE": "streamed"}))
        if auto:
            runs.append(("after-auto", {}))
        for label, env in runs:
            out = WORK / f"{label}-{case}"
            shutil.rmtree(out, ignore_errors=True)
            _measure(f"{label}-{case}", cli + ["export", ckpt, "-o", out, "--json"], env)
            shutil.rmtree(out, ignore_errors=True)
        out = WORK / f"q-{case}"
        shutil.rmtree(out, ignore_errors=True)
        _measure(f"after-quantize-{case}", cli + ["quantize", ckpt, "-o", out, "--json"])


def _row(name, res):
    row = {"run": name, "cmd": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(res["cmd"])),
           "env": res.get("env"), "rc": res["rc"], "wall_s": res["wall_s"],
           "peak_gib": {k: round(v / GIB, 2) for k, v in res["peak"].items()},
           "time_max_rss_gib": round((res["time_max_rss_bytes"] or 0) / GIB, 2)}
    try:
        out = json.loads(res["stdout"][res["stdout"].index("{"):])
    except ValueError:
        return row
    if "validation" in out:
        v = out["validation"]
        row.update(seconds=out["seconds"], trace_s=out["trace_seconds"], write_s=out["write_seconds"],
                   validate_s=out["validate_seconds"],
                   export_phase_peak_gib=round(out["export_peak_rss_bytes"] / GIB, 2),
                   weight_bytes=out["weight_bytes"], validation_passed=v["passed"],
                   reference=v.get("reference"), reference_kind=v.get("reference_kind", "whole (before)"),
                   max_abs_diff=max((r["max_abs_diff"] for r in v["rows"] if r["gated"]), default=None),
                   modes=sorted({r["mode"] for r in v["rows"]}), skipped_modes=v.get("skipped_modes"))
        if res.get("timeline"):  # anon peak once validation starts (after trace + write)
            start = out["trace_seconds"] + out["write_seconds"]
            row["validation_phase_anon_peak_gib"] = round(max(a for t, a, f in res["timeline"] if t >= start) / GIB, 2)
    elif "report" in out:
        e2e = out["report"].get("end_to_end", {})
        row.update(seconds=out["seconds"], end_to_end={k: v for k, v in e2e.items() if not isinstance(v, dict)})
    return row


def summarize():
    rows = [_row(p.stem, json.loads(p.read_text())) for p in sorted(MEM.glob("*.json"))]
    out = HERE / "results" / "export_validation.json"
    notes = {
        "before": "commit 74c1b28's code (git archive HEAD, PYTHONPATH): whole transformers reference and two ORT "
                  "sessions at once, default session options; quantize --eval loaded the fp32 model twice",
        "after-streamed": "SKYWORK_DEPLOY_REFERENCE=streamed: layer-streamed reference, one ORT session at a time "
                          "without prepacking (weights stay in the file mapping: RssFile, reclaimable)",
        "after-auto": "the reference chosen by memory: whole transformers while fp32 weights <= 40% of available",
        "after-quantize": "quantize with its default end-to-end check (layer-streamed, original vs quantized "
                          "folder); earlier 'before' ran no check above 1B parameters",
        "peak_gib": "peaks over the process tree from /proc/PID/status every 50 ms; each field's own peak",
        "validation_phase_anon_peak_gib": "RssAnon peak after trace + write (1 s timeline)",
        "graphs": "the after runs include the other helper's concurrent export changes (fused projections)",
    }
    out.write_text(json.dumps({"machine": "2 cores, 24 GiB (shared)", "notes": notes, "rows": rows}, indent=2)
                   + "\n")
    for r in rows:
        print(r["run"], r["wall_s"], r["peak_gib"], r.get("validation_phase_anon_peak_gib"))
    print(f"wrote {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("run", "summarize"))
    ap.add_argument("--cases", default="7b-2,7b-4")
    ap.add_argument("--before-tree")
    ap.add_argument("--auto", action="store_true", help="Also measure with the reference chosen by memory.")
    args = ap.parse_args()
    if args.what == "run":
        run(args.cases.split(","), args.before_tree, args.auto)
    summarize()


if __name__ == "__main__":
    main()
