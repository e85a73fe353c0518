"""Streamed quantize vs load-everything-then-quantize(8): wall time and peak RSS.

Synthetic bf16 checkpoints are written tensor by tensor straight to safetensors (no torch model is built)
in ~2 GB shards, in the Qwen2.5-0.5B shape (2, 4 and all 24 layers) and the Skywork-OR1-7B layer shape
(2 and 4 layers); shapes from REFERENCE.md section 1. For each checkpoint, in subprocesses:
- ours: `python -m skywork_deploy quantize CKPT -o OUT --no-eval --json`;
- baseline: `load_model(CKPT, "bf16").quantize(8)`, the whole model in memory;
- overhead: a process that imports torch and safetensors and does nothing.
Peak RSS comes from benchmarks/measure.py (psutil polling of the process tree and /usr/bin/time -v).
The goal: (peak RSS - overhead) / largest tensor bytes <= 1.5, the same for 2 and 4 layers.

Run (heavy: holds the machine-wide lock for the whole run):
    flock /tmp/team/heavy.lock python benchmarks/bench_quantize.py
Writes benchmarks/results/quantize.json and benchmarks/results/quantize.md. The synthetic checkpoints live
in a work folder under /tmp (or --work-dir) and are deleted at the end.
"""
import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import folder_bytes, last_json_line, run_measured, write_checkpoint  # noqa: E402

RESULTS = HERE / "results"
CASES = [("qwen2.5-0.5b", 2), ("qwen2.5-0.5b", 4), ("qwen2.5-0.5b", 24), ("skywork-or1-7b", 2),
         ("skywork-or1-7b", 4)]
OVERHEAD_CODE = "import torch, safetensors, safetensors.torch"
BASELINE_CODE = (
    "import json, sys, time, torch\n"
    "from skywork_deploy.base.modeling import load_model\n"
    "from skywork_deploy.base.memory import peak_rss_bytes\n"
    "t = time.perf_counter()\n"
    "model = load_model(sys.argv[1], 'bf16').quantize(8)\n"
    "n = sum(p.numel() for p in model.parameters())\n"
    "print(json.dumps({'parameters': n, 'seconds': time.perf_counter() - t, 'peak_rss_bytes': peak_rss_bytes()}))\n"
)


def measured(cmd):
    """run_measured plus the CPU seconds (user + system) of the finished process tree."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = run_measured(cmd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    res["cpu_s"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2)
    return res


def measure_case(work, preset, layers, overhead):
    ckpt, out = work / f"{preset}-{layers}L", work / f"{preset}-{layers}L-w8"
    t = time.perf_counter()
    largest = write_checkpoint(ckpt, preset, layers)
    print(f"[bench] {ckpt.name}: {folder_bytes(ckpt) / 1e9:.2f} GB written in {time.perf_counter() - t:.0f} s",
          flush=True)
    ours = measured([sys.executable, "-m", "skywork_deploy", "-q", "quantize", str(ckpt), "-o", str(out),
                         "--no-eval", "--json"])
    if ours["rc"] != 0:
        raise SystemExit(f"quantize failed:\n{ours['stderr_tail']}")
    result = json.loads(ours["stdout"])
    out_bytes = folder_bytes(out)
    shutil.rmtree(out)
    base = measured([sys.executable, "-c", BASELINE_CODE, str(ckpt)])
    if base["rc"] != 0:
        raise SystemExit(f"baseline failed:\n{base['stderr_tail']}")
    shutil.rmtree(ckpt)
    row = {
        "case": f"{preset} x {layers} layers", "preset": preset, "layers": layers,
        "checkpoint_bytes": result["report"]["total"]["bytes_before"], "output_bytes": out_bytes,
        "largest_tensor_bytes": largest, "overhead_bytes": overhead,
        "ours_wall_s": ours["wall_s"], "ours_cpu_s": ours["cpu_s"],
        "ours_peak_rss_bytes": ours["peak_rss_bytes"],
        "ours_self_reported_peak_bytes": result["peak_rss_bytes"], "ours_shards": len(result["shards"]),
        "baseline_wall_s": base["wall_s"], "baseline_cpu_s": base["cpu_s"],
        "baseline_peak_rss_bytes": base["peak_rss_bytes"],
    }
    row["ours_ratio"] = row["ours_peak_rss_bytes"] / largest
    row["ours_net_ratio"] = (row["ours_peak_rss_bytes"] - overhead) / largest
    row["baseline_ratio"] = row["baseline_peak_rss_bytes"] / largest
    row["baseline_net_ratio"] = (row["baseline_peak_rss_bytes"] - overhead) / largest
    print(f"[bench] {row['case']}: ours {row['ours_peak_rss_bytes'] / 1e9:.2f} GB {row['ours_wall_s']:.0f} s, "
          f"baseline {row['baseline_peak_rss_bytes'] / 1e9:.2f} GB {row['baseline_wall_s']:.0f} s", flush=True)
    return row


def markdown(data):
    lines = [
        f"Streamed `skywork-deploy quantize` vs load-all + `quantize(8)`, bf16 synthetic checkpoints "
        f"({data['machine']}). Overhead (python + torch + safetensors imported, nothing else): "
        f"{data['overhead_bytes'] / 1e9:.2f} GB. Net ratio = (peak RSS - overhead) / largest tensor bytes; "
        f"goal <= 1.5.",
        "",
        "| checkpoint | size GB | largest tensor GB | ours wall s (cpu s) | ours peak GB | ours net ratio | "
        "baseline wall s (cpu s) | baseline peak GB | baseline net ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['case']} | {r['checkpoint_bytes'] / 1e9:.2f} | {r['largest_tensor_bytes'] / 1e9:.3f} | "
            f"{r['ours_wall_s']:.1f} ({r['ours_cpu_s']:.0f}) | {r['ours_peak_rss_bytes'] / 1e9:.2f} | "
            f"{r['ours_net_ratio']:.2f} | {r['baseline_wall_s']:.1f} ({r['baseline_cpu_s']:.0f}) | "
            f"{r['baseline_peak_rss_bytes'] / 1e9:.2f} | {r['baseline_net_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", default=None, help="Parent folder for the synthetic checkpoints (/tmp).")
    parser.add_argument("--only", default=None, help="Run only cases whose preset contains this text.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_quantize_", dir=args.work_dir or "/tmp"))
    try:
        over = run_measured([sys.executable, "-c", OVERHEAD_CODE])
        overhead = over["peak_rss_bytes"]
        print(f"[bench] overhead (import torch + safetensors): {overhead / 1e9:.2f} GB", flush=True)
        rows = [measure_case(work, preset, layers, overhead) for preset, layers in CASES
                if not args.only or args.only in preset]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import torch

    data = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "overhead_bytes": overhead, "overhead_cmd": OVERHEAD_CODE, "rows": rows,
            "command": "flock /tmp/team/heavy.lock python benchmarks/bench_quantize.py"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quantize.json").write_text(json.dumps(data, indent=2) + "\n")
    table = markdown(data)
    (RESULTS / "quantize.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
