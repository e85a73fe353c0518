"""Export time and peak RSS on random bf16 checkpoints: the Qwen2.5-0.5B shape and 2/4 layers of Skywork-OR1-7B.

    python benchmarks/bench_export.py [--cases q05,7b-2,7b-4] [--dtypes fp32]

Checkpoints are written tensor by tensor (measure.write_checkpoint) plus the R1 tokenizer. Each export
runs as `skywork-deploy export ... --json` in a child process under the heavy lock; the result JSON gives the
peak RSS before validation (trace + weight streaming: the figure of the issue) and the whole-process peak
(validation loads the fp32 transformers reference and two ORT sessions). Writes benchmarks/results/export.json.
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import run_measured, write_checkpoint  # noqa: E402

CASES = {"q05": ("qwen2.5-0.5b", 24), "7b-2": ("skywork-or1-7b", 2), "7b-4": ("skywork-or1-7b", 4)}


def weight_bytes_fp32(folder):
    from skywork_deploy.base.spec import ModelSpec

    return ModelSpec.from_folder(folder).num_parameters * 4


def run_case(work, case, dtype):
    from skywork_deploy.base.synth import write_r1_tokenizer

    preset, layers = CASES[case]
    ckpt = work / f"{case}-ckpt"
    if not (ckpt / "model.safetensors.index.json").is_file():
        shutil.rmtree(ckpt, ignore_errors=True)
        write_checkpoint(ckpt, preset, layers)
        write_r1_tokenizer(ckpt)
    out = work / f"{case}-{dtype}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "skywork_deploy", "export", str(ckpt), "-o", str(out), "--dtype", dtype, "--json"]
    res = run_measured(cmd, heavy=True)
    if res["rc"] != 0:
        return {"case": case, "dtype": dtype, "error": res["stderr_tail"][-2000:]}
    result = json.loads(res["stdout"][res["stdout"].index("{"):])
    fp32 = weight_bytes_fp32(ckpt)
    row = {
        "case": case, "preset": preset, "layers": layers, "dtype": dtype, "fp32_weight_bytes": fp32,
        "written_weight_bytes": result["weight_bytes"], "wall_s": res["wall_s"], "export_s": result["seconds"],
        "trace_s": result["trace_seconds"], "write_s": result["write_seconds"],
        "validate_s": result["validate_seconds"],
        "export_peak_rss_bytes": result["export_peak_rss_bytes"],
        "export_peak_rss_over_fp32_weights": round(result["export_peak_rss_bytes"] / fp32, 3),
        "process_peak_rss_bytes": res["peak_rss_bytes"], "nodes": result["nodes"],
        "validation_passed": result["validation"]["passed"], "validation_table": result["validation"]["table"],
    }
    shutil.rmtree(out, ignore_errors=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="q05,7b-2,7b-4")
    ap.add_argument("--dtypes", default="fp32")
    ap.add_argument("--work", default=str(HERE / "work" / "export"))
    ap.add_argument("--keep", action="store_true", help="Keep the checkpoints.")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in args.cases.split(","):
        for dtype in args.dtypes.split(","):
            t = time.perf_counter()
            row = run_case(work, case, dtype)
            print(json.dumps({k: v for k, v in row.items() if k != "validation_table"}), flush=True)
            print(row.get("validation_table", ""), flush=True)
            rows.append(row)
            print(f"[{case} {dtype}] {time.perf_counter() - t:.1f} s", flush=True)
        if not args.keep:
            shutil.rmtree(work / f"{case}-ckpt", ignore_errors=True)
    results = HERE / "results" / "export.json"
    old = json.loads(results.read_text()) if results.is_file() else {"runs": []}
    keys = {(r["case"], r["dtype"]) for r in rows}
    old["runs"] = [r for r in old.get("runs", []) if (r["case"], r["dtype"]) not in keys] + rows
    results.write_text(json.dumps(old, indent=2) + "\n")
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
