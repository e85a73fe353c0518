"""The real job at real size: `skywork-deploy build` on random-init checkpoints in the exact Skywork-OR1 shapes.

    python benchmarks/bench_full_build.py --shape 7b --dtypes int8,fp16
    python benchmarks/bench_full_build.py --shape 32b --layers 1,2,4 --dtypes int8 --tag 32b-sweep
    python benchmarks/bench_full_build.py --shape 7b --dtypes int8 --include-lm-head --tag 7b-int8-lm-head
    python benchmarks/bench_full_build.py --shape 7b --dtypes fp16 --strict --tag 7b-fp16-streamed
    python benchmarks/bench_full_build.py --shape 7b --dtypes int8 --strict --validations whole,streamed
    python benchmarks/bench_full_build.py --shape 32b --layers 1,2,4,8 --dtypes fp16,int8 --strict --validations streamed \
        --memory-limit 10G --tag 32b-streamed

Each case writes a bf16 checkpoint shard by shard (random normal * 0.02, seeded: 2^26 values drawn once,
each tensor that block rotated by a seeded random offset and tiled; four shards and
`model.safetensors.index.json` for the full 7B, as the published folder has, so making it holds one shard in
memory), runs the whole build (patch -> calib -> quantize (int8) -> export with validation -> smoke run ->
compile dry run) as a user would, in a child process whose process-tree RSS is polled, and records each
stage's wall time and peak RSS from the build's own manifest. For int8 it then opens one ONNX Runtime
session of the bundle (the runtime's `fast` path, one prefill + decode step) in a fresh process and reports
its peak against the bundle's bytes. Checkpoints and builds are deleted after each case (`--keep` keeps them);
only the JSON/MD results stay in benchmarks/results/.

`--strict` drops the benchmark's `--allow-unvalidated`, so a build exits 0 only when every check ran (none
skipped); `--validations whole,streamed` builds once per export validation way (`build --validation`), in
the same run, and each build records per validation mode which way it ran, its peak RSS and its time.

The 32B shape with 64 layers would need 65 GB of disk per copy: `--layers 1,2,4` measures reduced layer
counts and fits peak and time against the layer count, to show what the full model needs.
The machine is shared with other agents: wall times are inflated by their load (recorded in the result).
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
SHAPES = {"7b": "skywork-or1-7b", "32b": "skywork-or1-32b", "tiny": "tiny"}  # tiny: a check of this script
BASE = 1 << 26  # random values drawn per checkpoint
SHARDS = {"7b": 4, "32b": 14, "tiny": 1}  # the published checkpoints' shard counts (scaled by the layer count)


def _tensors(cfg):
    """[(name, shape)] of a Qwen2ForCausalLM in the order transformers writes them."""
    h, i, nh, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // nh
    out = [("model.embed_tokens.weight", (cfg["vocab_size"], h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "mlp.down_proj.weight", (h, i)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.k_proj.bias", (kv * d,)), (p + "self_attn.k_proj.weight", (kv * d, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "self_attn.q_proj.bias", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.v_proj.bias", (kv * d,)), (p + "self_attn.v_proj.weight", (kv * d, h))]
    # a tied shape (Qwen2.5-0.5B) ships no lm_head.weight: transformers would ignore a stray one and the export
    # would read it, so validation rightly fails (bench_streamed_validation.py's first 0.5B run, 2026-12-08)
    head = [] if cfg.get("tie_word_embeddings") else [("lm_head.weight", (cfg["vocab_size"], h))]
    return out + [("model.norm.weight", (h,))] + head


def make_checkpoint(dst, shape, layers, shards, seed=0):
    """Write a random bf16 checkpoint shard by shard (one shard in memory at a time); returns its bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config

    from skywork_deploy.base.synth import PRESETS, write_r1_tokenizer

    dst = Path(dst)
    dst.mkdir(parents=True)
    values = {**PRESETS[SHAPES[shape]], "num_hidden_layers": layers}
    cfg = Qwen2Config(**values, bos_token_id=151646, eos_token_id=151643, use_sliding_window=False,
                      rms_norm_eps=1e-6, torch_dtype="bfloat16")
    cfg.save_pretrained(str(dst))
    names = _tensors(cfg.to_dict())
    sizes = [2 * _numel(s) for _, s in names]
    total, per_shard = sum(sizes), sum(sizes) / shards
    groups, current, filled = [], [], 0
    for item, size in zip(names, sizes):  # close a shard once it holds its share (the last takes the rest)
        if current and filled + size / 2 > per_shard * (len(groups) + 1) and len(groups) < shards - 1:
            groups.append(current)
            current = []
        current.append(item)
        filled += size
    groups.append(current)
    weight_map = {}
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(BASE, generator=gen) * 0.02).to(torch.bfloat16)  # drawn once: randn of 7.6G values is
    # minutes on this machine; each tensor is this block rotated by a seeded random offset, tiled
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, s in group:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(s, dtype=torch.bfloat16)
            else:
                tensors[name] = _fill(base, _numel(s), gen).reshape(s)
            weight_map[name] = file
        save_file(tensors, str(dst / file), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    write_r1_tokenizer(dst)
    return total


def _fill(base, n, gen):
    """n values: `base` rotated by a random offset, repeated as needed."""
    import torch

    shift = int(torch.randint(0, base.numel(), (1,), generator=gen))
    src = torch.cat([base[shift:], base[:shift]])
    return src.repeat(-(-n // src.numel()))[:n].clone()


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def _bytes(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run_build(ckpt, dtype, out, log, include_lm_head=False, strict=False, validation=None, memory_limit=None):
    cmd = [sys.executable, "-m", "skywork_deploy", "build", str(ckpt), "--dtype", dtype, "-o", str(out), "--json"]
    cmd += [] if strict else ["--allow-unvalidated"]
    cmd += ["--validation", validation] if validation else []
    if include_lm_head and dtype == "int8":  # a build.yaml key (no command-line flag): lm_head in int8 too
        config = Path(str(out) + ".yaml")
        config.write_text("quantize:\n  include_lm_head: true\n")
        cmd += ["-c", str(config)]
    if dtype == "int8":
        # Random-init weights have nearly flat logits, so W8A16 flips many near-ties: the quantize gate's
        # defaults (top-1 >= 97%, KL <= 0.01, for trained models) would reject it. Measured, recorded, not gated.
        cmd += ["--min-top1", "0", "--max-kl", "1"]
        cmd += ["--calib-dataset", "c4", "--calib-source", str(ROOT / "calibration" / "c4-sample.json.gz"),
                "--nsamples", "16", "--seqlen", "256"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SKYWORK_DEPLOY_PROGRESS": "1"}
    if memory_limit:  # the memory policy's own cap (a CI runner's cgroup): what the full-size model would meet
        env["SKYWORK_DEPLOY_MEMORY_LIMIT"] = memory_limit
    res = run_measured(cmd, env=env, log_path=log, heavy=True)
    manifest = Path(out) / "manifest.json"
    stages = {}
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        stages = {k: {"seconds": v.get("seconds"), "peak_rss_gib": round((v.get("peak_rss_bytes") or 0) / GIB, 2)}
                  for k, v in (m.get("stages") or {}).items()}
    export_manifest = Path(out) / "export" / "skywork_deploy_manifest.json"
    em = json.loads(export_manifest.read_text()) if export_manifest.is_file() else {}
    timing = em.get("seconds")
    streamed = em.get("peak_rss_before_validation_bytes")  # the export without its validation sessions
    if streamed and "export" in stages:
        stages["export (streaming, before validation)"] = {"seconds": None, "peak_rss_gib": round(streamed / GIB, 2)}
    validation = {}
    for name in ("export/validation.json", "validate/validation.json"):
        if (Path(out) / name).is_file():
            v = json.loads((Path(out) / name).read_text())
            validation[name] = {k: v.get(k) for k in ("passed", "skipped", "skipped_modes", "table", "smoke", "runs",
                                                       "seconds") if k in v}
    return {"cmd": res["cmd"], "rc": res["rc"], "wall_s": res["wall_s"],
            "peak_rss_gib": round(res["peak_rss_bytes"] / GIB, 2), "stages": stages, "export_seconds": timing,
            "validation": validation, "stderr_tail": res["stderr_tail"][-1500:],
            "bundle_bytes": _bytes(Path(out) / "export") if (Path(out) / "export").is_dir() else None}


def session_child(bundle):
    """In a fresh process: one ORT session of the int8 bundle's prefill (fast path), one run; prints JSON."""
    import numpy as np
    import psutil

    from skywork_deploy.runtime.backends import make_backend
    from skywork_deploy.runtime.bundle import open_bundle

    b = open_bundle(bundle)
    t = time.perf_counter()
    engine = make_backend("onnxruntime", b, int8_accuracy="fast", one_session=True, threads=2)
    ids = np.array([[1, 2, 3, 4]], dtype=np.int64)
    engine.prefill(ids, np.ones_like(ids), np.arange(4)[None])
    print(json.dumps({"seconds": round(time.perf_counter() - t, 2), "rss": psutil.Process().memory_info().rss,
                      "estimate": engine.memory.need}))


def session_memory(bundle):
    res = run_measured([sys.executable, __file__, "--session", str(bundle)], heavy=True)
    data = Path(bundle) / "model.onnx.data"
    out = {"rc": res["rc"], "peak_rss_gib": round(res["peak_rss_bytes"] / GIB, 2),
           "bundle_data_gib": round(data.stat().st_size / GIB, 2),
           "ratio_to_bundle": round(res["peak_rss_bytes"] / data.stat().st_size, 3)}
    try:
        out.update(json.loads(res["stdout"].strip().splitlines()[-1]))
    except (ValueError, IndexError):
        out["stderr_tail"] = res["stderr_tail"][-800:]
    return out


def session_estimates(bundle, dtype):
    """What skywork_deploy.base.memory says one session of each kind needs (GiB), from the graph alone."""
    from skywork_deploy.base import memory

    graphs = [Path(bundle) / f"{k}.onnx" for k in ("prefill", "decode")]
    modes = ("int8-fused", "int8-unfused") if dtype == "int8" else ("float",)
    return {m: round(memory.check_session_fits(graphs, m, have=0).need / GIB, 2) for m in modes}


def run_case(shape, layers, dtypes, work, keep, include_lm_head=False, strict=False, validations=(None,),
             memory_limit=None):
    work = Path(work) / f"{shape}-{layers}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shards = max(1, round(SHARDS[shape] * layers / {"7b": 28, "32b": 64, "tiny": 2}[shape]))
    t = time.perf_counter()
    ckpt_bytes = make_checkpoint(work / "ckpt", shape, layers, shards)
    case = {"shape": shape, "layers": layers, "shards": shards, "checkpoint_gib": round(ckpt_bytes / GIB, 2),
            "make_checkpoint_s": round(time.perf_counter() - t, 1), "builds": {}}
    print(json.dumps({k: v for k, v in case.items() if k != "builds"}), flush=True)
    for dtype, validation in [(d, v) for d in dtypes for v in validations]:
        key = dtype if validation is None else f"{dtype}-{validation}"
        out = work / f"build-{key}"
        row = run_build(work / "ckpt", dtype, out, work / f"build-{key}.log", include_lm_head, strict, validation,
                        memory_limit)
        row.update(memory_limit=memory_limit, include_lm_head=include_lm_head and dtype == "int8", strict=strict, validation_way=validation or "auto",
                   load_avg_after=os.getloadavg())
        if (out / "export" / "prefill.onnx").is_file():
            row["session_estimates_gib"] = session_estimates(out / "export", dtype)
        if dtype == "int8" and (out / "export" / "model.onnx.data").is_file():
            row["ort_session"] = session_memory(out / "export")
        case["builds"][key] = row
        print(json.dumps({key: {k: row[k] for k in ("rc", "wall_s", "peak_rss_gib", "stages")}}), flush=True)
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    b = case["builds"]
    if "int8" in b and "fp16" in b and b["int8"]["bundle_bytes"] and b["fp16"]["bundle_bytes"]:
        case["int8_over_fp16_bundle"] = round(b["int8"]["bundle_bytes"] / b["fp16"]["bundle_bytes"], 3)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return case


def _fit(xs, ys):
    """Least-squares line y = a + b x; returns (a, b)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs) or 1.0
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var
    return my - b * mx, b


def sweep_summary(cases, full_layers, dtype):
    rows = [(c["layers"], c["builds"][dtype]) for c in cases if dtype in c["builds"]]
    if len(rows) < 2:
        return None
    xs = [x for x, _ in rows]
    a, b = _fit(xs, [r["wall_s"] for _, r in rows])
    pa, pb = _fit(xs, [r["peak_rss_gib"] for _, r in rows])
    stages = {}  # each stage's own line: the streamed stages stay flat, the ONNX Runtime ones grow
    for stage in rows[0][1]["stages"]:
        walls = [r["stages"].get(stage, {}).get("seconds") for _, r in rows]
        peaks = [r["stages"].get(stage, {}).get("peak_rss_gib") for _, r in rows]
        if None in peaks:
            continue
        qa, qb = _fit(xs, peaks)
        stages[stage] = {"wall_s_per_layer": None, f"wall_s_at_{full_layers}": None,
                         "peak_gib_per_layer": round(qb, 3),
                         f"peak_gib_at_{full_layers}": round(qa + qb * full_layers, 2)}
        if None not in walls:
            sa, sb = _fit(xs, walls)
            stages[stage].update({"wall_s_per_layer": round(sb, 2),
                                  f"wall_s_at_{full_layers}": round(sa + sb * full_layers)})
    need = {}
    for m in rows[0][1].get("session_estimates_gib", {}):
        na, nb = _fit(xs, [r["session_estimates_gib"][m] for _, r in rows])
        need[m] = round(na + nb * full_layers, 1)
    return {"dtype": dtype, "layers": xs, "stages": stages, "validation_runs": _runs_fit(rows, full_layers),
            f"session_estimate_gib_at_{full_layers}": need,
            "wall_s": [r["wall_s"] for _, r in rows],
            "peak_rss_gib": [r["peak_rss_gib"] for _, r in rows],
            "wall_fit": {"a": round(a, 1), "b_per_layer": round(b, 2)},
            "peak_fit": {"a": round(pa, 2), "b_per_layer": round(pb, 3)},
            f"wall_s_at_{full_layers}": round(a + b * full_layers, 0),
            f"peak_rss_gib_at_{full_layers}": round(pa + pb * full_layers, 2)}


def _runs_fit(rows, full_layers):
    """Per export validation mode: its run's way, peak RSS and time by layer count, and the line through the
    times at `full_layers` (a layer-streamed run's peak should be flat, its time linear)."""
    out = {}
    for x, r in rows:
        runs = ((r.get("validation") or {}).get("export/validation.json") or {}).get("runs") or {}
        for mode, run in runs.items():
            if "seconds" in run:
                o = out.setdefault(mode, {"layers": [], "how": [], "peak_rss_gib": [], "seconds": []})
                o["layers"].append(x)
                o["how"].append(run["how"])
                o["peak_rss_gib"].append(round(run["peak_rss_bytes"] / GIB, 2))
                o["seconds"].append(run["seconds"])
    for o in out.values():
        if len(o["layers"]) > 1:
            a, b = _fit(o["layers"], o["seconds"])
            o.update(seconds_fit={"a": round(a, 1), "b_per_layer": round(b, 2)},
                     **{f"seconds_at_{full_layers}": round(a + b * full_layers),
                        "peak_spread": round(max(o["peak_rss_gib"]) / min(o["peak_rss_gib"]) - 1, 3)})
    return out


def markdown(result):
    """The result as a table: one row per build (whole command), then each stage's wall and peak."""
    lines = [f"# Full build, {result['shape']} shape ({result['date']}, shared 2-core machine: times inflated)", "",
             "| layers | dtype | rc | wall s | peak RSS GiB | stages (s / GiB) | bundle GB | ORT session GiB (x bundle) |",
             "|---|---|---|---|---|---|---|---|"]
    for case in result["cases"]:
        for dtype, b in case["builds"].items():
            stages = ", ".join(f"{k} {v['seconds']:.0f}/{v['peak_rss_gib']:.1f}" if v.get("seconds") is not None
                               else f"{k} {v['peak_rss_gib']:.1f}" for k, v in b["stages"].items())
            ort = b.get("ort_session") or {}
            session = f"{ort['peak_rss_gib']} ({ort['ratio_to_bundle']}x)" if "ratio_to_bundle" in ort else ""
            size = f"{b['bundle_bytes'] / 1e9:.2f}" if b.get("bundle_bytes") else ""
            lines.append(f"| {case['layers']} | {dtype} | {b['rc']} | {b['wall_s']:.0f} | {b['peak_rss_gib']} | "
                         f"{stages} | {size} | {session} |")
            runs = ((b.get("validation") or {}).get("export/validation.json") or {}).get("runs") or {}
            if runs:
                lines.append("| | | | | | validation: " + "; ".join(
                    f"{m} {r['how']}" + (f" ({r['layers_per_piece']} layers a piece)" if r.get("layers_per_piece")
                                         else "") + f" {r.get('seconds', 0):.0f} s / "
                    f"{(r.get('peak_rss_bytes') or 0) / GIB:.2f} GiB" for m, r in runs.items()) + " | | |")
        if "int8_over_fp16_bundle" in case:
            lines.append(f"\nint8 / fp16 bundle bytes ({case['layers']} layers): {case['int8_over_fp16_bundle']}")
    for s in result.get("sweep", []):
        full = next((k.rsplit("_", 1)[1] for k in s if k.startswith("wall_s_at_")), "?")
        lines += ["", f"Per stage, {s['dtype']}, least-squares line over {s['layers']} layers, at {full} layers:", "",
                  "| stage | s per layer | s at full | GiB per layer | peak GiB at full |", "|---|---|---|---|---|"]
        for stage, f in s.get("stages", {}).items():
            lines.append(f"| {stage} | {f['wall_s_per_layer']} | {f[f'wall_s_at_{full}']} | "
                         f"{f['peak_gib_per_layer']} | {f[f'peak_gib_at_{full}']} |")
        need = s.get(f"session_estimate_gib_at_{full}") or {}
        if need:
            lines.append(f"\nOne ONNX Runtime session at {full} layers (skywork_deploy.base.memory's estimate, GiB): "
                         + ", ".join(f"{m} {v}" for m, v in need.items()))
        for mode, o in (s.get("validation_runs") or {}).items():
            lines.append(f"\nvalidation {mode} ({', '.join(sorted(set(o['how'])))}): peak GiB {o['peak_rss_gib']} "
                         f"(spread {o.get('peak_spread')}), seconds {o['seconds']} at layers {o['layers']}; "
                         f"line {o.get('seconds_fit')}, at {full} layers {o.get(f'seconds_at_{full}')} s")
        lines.append(f"\nsweep {s['dtype']}: wall = {s['wall_fit']['a']} + {s['wall_fit']['b_per_layer']} s/layer, "
                     f"peak = {s['peak_fit']['a']} + {s['peak_fit']['b_per_layer']} GiB/layer; "
                     + ", ".join(f"{k} {v}" for k, v in s.items() if k.startswith(("wall_s_at", "peak_rss_gib_at"))))
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--layers", default=None, help="comma-separated layer counts (default: the full model)")
    ap.add_argument("--dtypes", default="int8,fp16")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "full_build"))
    ap.add_argument("--tag", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--include-lm-head", action="store_true", help="int8 builds quantize lm_head too")
    ap.add_argument("--strict", action="store_true", help="no --allow-unvalidated: exit 0 only when every check ran")
    ap.add_argument("--validations", default=None, help="comma-separated build --validation ways (one build each)")
    ap.add_argument("--memory-limit", default=None,
                    help="SKYWORK_DEPLOY_MEMORY_LIMIT for the builds (e.g. 10G): reduced-layer builds then choose "
                         "the streamed paths the full model needs")
    ap.add_argument("--session", help=argparse.SUPPRESS)
    ap.add_argument("--summarize", metavar="RESULT.json", help="recompute the sweep and tables of a result file")
    args = ap.parse_args()
    if args.session:
        return session_child(args.session)
    if args.summarize:
        return summarize(Path(args.summarize))
    full = {"7b": 28, "32b": 64, "tiny": 2}[args.shape]
    layers = [int(x) for x in args.layers.split(",")] if args.layers else [full]
    dtypes = args.dtypes.split(",")
    import psutil

    result = {"benchmark": "full_build", "shape": args.shape, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"cpus": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / GIB, 1),
                          "load_avg_at_start": os.getloadavg(), "shared_with_other_agents": True},
              "cases": []}
    tag = args.tag or f"{args.shape}-full-build"
    out = ROOT / "benchmarks" / "results" / f"{time.strftime('%Y-%m-%d')}-{tag}.json"
    for n in layers:
        result["cases"].append(run_case(args.shape, n, dtypes, args.work, args.keep, args.include_lm_head, args.strict,
                                        args.validations.split(",") if args.validations else (None,),
                                        args.memory_limit))
        result["machine"]["load_avg_at_end"] = os.getloadavg()
        if len(layers) > 1:
            result["sweep"] = [s for d in dtypes if (s := sweep_summary(result["cases"], full, d))]
        out.write_text(json.dumps(result, indent=2) + "\n")  # after every case: a partial run keeps its rows
        out.with_suffix(".md").write_text(markdown(result))
    print(out)


def summarize(path):
    """Recompute a result file's sweep (one per build key) and its markdown table."""
    result = json.loads(path.read_text())
    full = {"7b": 28, "32b": 64, "tiny": 2}[result["shape"]]
    keys = list(dict.fromkeys(k for c in result["cases"] for k in c["builds"]))
    if len(result["cases"]) > 1:
        result["sweep"] = [s for k in keys if (s := sweep_summary(result["cases"], full, k))]
    path.write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(result))
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
