"""Streamed vs whole ONNX Runtime validation on the same bundle: same logits, time ratio, peak memory.

    python benchmarks/bench_streamed_validation.py --shape qwen2.5-0.5b --dtypes fp32,fp16,int8
    python benchmarks/bench_streamed_validation.py --shape skywork-or1-7b --layers 2 --dtypes fp16,int8

Makes a random checkpoint of the shape (bench_full_build.make_checkpoint; int8 through `quantize --no-eval`),
exports each dtype once (with its own validation, auto), then per validation mode runs the teacher-forced
chain twice, each in a fresh process under the machine-wide lock: whole sessions (export/validate.run_chain) and layer-streamed
(export/streamed.run_chain, the auto group size). Each child saves its logits; the parent reports the max
|diff| between them, each run's wall time and peak RSS, and the streamed/whole time ratio.
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from measure import run_measured  # noqa: E402

GIB = 2 ** 30
SHAPES = {"qwen2.5-0.5b": "q05", "skywork-or1-7b": "7b", "tiny": "tiny"}  # tiny: a check of this script


def _modes(dtype):
    from skywork_deploy.export import validate as v

    if dtype != "int8":
        return [(f"{dtype} ort", v.FAST, None)]
    return [("int8 ort exact", v.EXACT, "nbits-exact"), ("int8 ort unfused", v.UNFUSED, None),
            (v.FAST_MODE, v.FAST, "nbits")]


def child(bundle, mode, how, out):
    """One chain in this process; writes the logits to `out` (npz) and prints {"seconds", "layers"}."""
    import numpy as np

    from skywork_deploy.base.spec import ModelSpec
    from skywork_deploy.export import streamed, validate as v
    from skywork_deploy.export.verify import held_bytes, mode_paths

    bundle = Path(bundle)
    dtype = json.loads((bundle / "skywork_deploy_manifest.json").read_text())["dtype"]
    name, options, variant = next(m for m in _modes(dtype) if m[0] == mode)
    spec = ModelSpec.from_folder(bundle)
    paths = mode_paths(bundle, variant)
    float_np = "float16" if dtype == "fp16" else "float32"
    ids, mask, forced = v.make_inputs(spec.vocab_size, v.PROMPT_LEN)
    t = time.perf_counter()
    layers = None
    if how == "whole":
        logits, bad = v.run_chain(*paths, spec.num_layers, spec.vocab_size, v.PROMPT_LEN, options, float_np,
                                  low_memory=dtype != "int8")
    else:
        layers, need = streamed.plan(paths, options, dtype == "int8",
                                     held_bytes(spec, v.PROMPT_LEN, v.DECODE_STEPS))
        logits, bad = streamed.run_chain(*paths, ids, mask, forced, options, float_np, layers,
                                         low_memory=dtype != "int8")
    seconds = time.perf_counter() - t
    np.savez(out, *[np.asarray(x, dtype=np.float32) for x in logits])
    print(json.dumps({"seconds": round(seconds, 2), "layers_per_piece": layers, "nonfinite": any(bad)}))


def _run_child(bundle, mode, how, out):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = run_measured([sys.executable, __file__, "--child", str(bundle), mode, how, str(out)], env=env, heavy=True)
    row = {"rc": res["rc"], "wall_s": round(res["wall_s"], 1), "peak_rss_gib": round(res["peak_rss_bytes"] / GIB, 2)}
    try:
        row.update(json.loads(res["stdout"].strip().splitlines()[-1]))
    except (ValueError, IndexError):
        row["stderr_tail"] = res["stderr_tail"][-800:]
    return row


def _export(src, dtype, out, log):
    cmd = [sys.executable, "-m", "skywork_deploy", "export", str(src), "-o", str(out), "--dtype", dtype, "--json"]
    res = run_measured(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, log_path=log, heavy=True)
    return {"rc": res["rc"], "wall_s": round(res["wall_s"], 1), "peak_rss_gib": round(res["peak_rss_bytes"] / GIB, 2)}


def _quantize(src, out, log):
    cmd = [sys.executable, "-m", "skywork_deploy", "quantize", str(src), "-o", str(out), "--no-eval"]
    return run_measured(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, log_path=log, heavy=True)["rc"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--dtypes", default="fp32,fp16,int8")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "streamed_validation"))
    ap.add_argument("--tag", default=None)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    import numpy as np

    from bench_full_build import SHAPES as FULL_SHAPES, make_checkpoint
    from skywork_deploy.base.synth import PRESETS

    FULL_SHAPES.setdefault(SHAPES[args.shape], args.shape)
    layers = args.layers or PRESETS[args.shape]["num_hidden_layers"]
    work = Path(args.work) / f"{SHAPES[args.shape]}-{layers}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    make_checkpoint(work / "ckpt", SHAPES[args.shape], layers, 1)
    result = {"benchmark": "streamed_validation", "shape": args.shape, "layers": layers,
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
                          "shared_with_other_agents": True}, "rows": []}
    tag = args.tag or f"streamed-validation-{SHAPES[args.shape]}-{layers}"
    out_file = ROOT / "benchmarks" / "results" / f"{time.strftime('%Y-%m-%d')}-{tag}.json"
    for dtype in args.dtypes.split(","):
        src = work / "ckpt"
        if dtype == "int8":
            _quantize(src, work / "q", work / "quantize.log")
            src = work / "q"
        bundle = work / f"bundle-{dtype}"
        export = _export(src, dtype, bundle, work / f"export-{dtype}.log")
        for mode, _, _ in _modes(dtype):
            runs = {how: _run_child(bundle, mode, how, work / f"{dtype}-{how}.npz") for how in ("whole", "streamed")}
            row = {"dtype": dtype, "mode": mode, "export": export, **runs}
            if all(r["rc"] == 0 for r in runs.values()):
                a, b = np.load(work / f"{dtype}-whole.npz"), np.load(work / f"{dtype}-streamed.npz")
                row["max_abs_diff"] = float(max(np.abs(a[k].astype(np.float64) - b[k]).max() for k in a.files))
                row["time_ratio_streamed_over_whole"] = round(runs["streamed"]["seconds"] / runs["whole"]["seconds"], 3)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            result["machine"]["load_avg_at_end"] = os.getloadavg()
            out_file.write_text(json.dumps(result, indent=2) + "\n")
        shutil.rmtree(bundle, ignore_errors=True)
    out_file.with_suffix(".md").write_text(markdown(result))
    shutil.rmtree(work, ignore_errors=True)
    print(out_file)


def markdown(result):
    lines = [f"# Streamed vs whole ONNX Runtime validation, {result['shape']} x {result['layers']} layers "
             f"({result['date']}, shared 2-core machine, load {result['machine']['load_avg_at_start']})", "",
             "| dtype | mode | whole s | whole peak GiB | streamed s | streamed peak GiB | layers a piece | "
             "streamed/whole time | max abs diff |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        w, s = r["whole"], r["streamed"]
        lines.append(f"| {r['dtype']} | {r['mode']} | {w.get('seconds')} | {w['peak_rss_gib']} | {s.get('seconds')} | "
                     f"{s['peak_rss_gib']} | {s.get('layers_per_piece')} | {r.get('time_ratio_streamed_over_whole')} | "
                     f"{r.get('max_abs_diff')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
