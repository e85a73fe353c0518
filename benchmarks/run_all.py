"""One entry point for the side-by-side benchmarks: ours against Optimum, ONNX Runtime GenAI and
transformers eager, on the same random checkpoints, in the same run.

    bash benchmarks/setup_peers.sh                    # once: the peers' own venvs (optional extras)
    python benchmarks/run_all.py [--quick] [--only peers|ours] [--repeats N] [--threads 2]

1. Synthetic random-init bf16 checkpoints with the real tokenizer: the Qwen2.5-0.5B shape, and the
   Skywork-OR1-7B layer shape with 2 and 4 layers (--quick: the 0.5B shape only).
2. For each: transformers eager (reference logits and speed), the peers (export / build, then decode),
   ours (streamed quantize vs load-everything, export fp32 and int8, decode on our ONNX Runtime backend).
   Each measurement is a subprocess measured from outside and holds /tmp/team/heavy.lock.
3. benchmarks/results/<date>.md, <date>.json and <date>.png.
Timings are medians of --repeats runs; ratios are taken pair by pair within this run.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peers  # noqa: E402
import report  # noqa: E402
from measure import folder_bytes, last_json_line, memory_bandwidth_gbps, run_measured, write_checkpoint  # noqa: E402

CASES = {  # name: (synth preset, layers); "tiny" is a smoke case, never in the default list
    "tiny": ("tiny", 2),
    "qwen2.5-0.5b": ("qwen2.5-0.5b", 24),
    "or1-7b-2L": ("skywork-or1-7b", 2),
    "or1-7b-4L": ("skywork-or1-7b", 4),
}
CLI = [sys.executable, "-m", "skywork_deploy"]


def log(msg):
    print(f"[run_all {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- checkpoints and their weight arithmetic ----

def make_checkpoint(folder, preset, layers):
    """A random bf16 checkpoint written tensor by tensor (measure.write_checkpoint) plus the R1 tokenizer."""
    from skywork_deploy.base.synth import write_r1_tokenizer

    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    write_checkpoint(folder, preset, layers)
    write_r1_tokenizer(folder)
    return folder


def weight_stats(folder):
    """Parameter counts and the bytes a decode step reads, per dtype (lm_head kept in fp32 for int8/int4)."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    stats = config_stats(cfg)
    stats["bf16_checkpoint_bytes"] = folder_bytes(folder)
    return stats


def config_stats(cfg):
    """weight_stats from a config.json dict alone (no checkpoint needed)."""
    h, i, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    d = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    proj = n * (h * q + 2 * h * kv + q * h + 3 * h * i)
    small = n * (q + 2 * kv + 2 * h) + h  # biases and norms
    embed = v * h
    tied = bool(cfg.get("tie_word_embeddings"))
    params = proj + small + embed + (0 if tied else embed)
    largest = max(embed, h * i)
    per_token = {"fp32": 4 * (proj + small + embed), "int8": proj + 4 * (small + embed),
                 "int4": proj // 2 + 4 * (small + embed),
                 "int8_lm_head": proj + embed + 4 * small + 4 * v,  # int8 lm_head, fp32 scales
                 # GenAI's int8/int4: every MatMul including lm_head in blocks of 32, one fp32 scale per block
                 "int8_b32": (proj + embed) * 9 // 8 + 4 * small, "int4_b32": (proj + embed) * 5 // 8 + 4 * small}
    return {"parameters": params, "fp32_weight_bytes": 4 * params,
            "largest_tensor_bf16_bytes": 2 * largest, "bytes_per_token": per_token, "layers": n, "tied": tied}


# ---- rows ----

def speed_row(case, tool, dtype, run, export=None, variant="", weights=None):
    """One table row; `weights` names the bytes-per-token entry of weight_stats when it is not `dtype`."""
    row = {"case": case, "tool": tool, "dtype": dtype, "variant": variant, "export": export, "run": run}
    if weights:
        row["weights"] = weights
    if export and export.get("rc", 0) != 0:
        row["error"] = "export failed: " + export.get("error", "")[-400:]
    elif run and "error" in run:
        row["error"] = "run failed: " + run["error"][-400:]
    return row


def case_timing(preset, args):
    """Timing settings of one case: the 7B-layer cases are ~13x heavier per token, so shorter by default."""
    big = preset.startswith("skywork-or1")
    return {"threads": args.threads, "repeats": args.repeats,
            "prompt_lens": args.big_prompt_lens if big else args.prompt_lens,
            "new_tokens": args.big_new_tokens if big else args.new_tokens}


def run_reference(case, ckpt, logits_dir, args):
    if args.exports_only:
        return []
    log(f"{case}: transformers eager")
    run = peers.run_worker("hf", ckpt, logits_dir / "hf.npy", **args.timing)
    return [speed_row(case, "transformers eager", "fp32", run)]


def run_peers(case, ckpt, work, logits_dir, args):
    rows = []
    common = args.timing
    if "optimum" in args.peers and peers.available("optimum"):
        log(f"{case}: optimum export")
        out = work / "optimum"
        exp = peers.optimum_export(ckpt, out)
        run = None
        if exp["rc"] == 0 and not args.exports_only:
            log(f"{case}: optimum decode")
            run = peers.run_worker("optimum", out, logits_dir / "optimum.npy", **common)
        rows.append(speed_row(case, "Optimum (ORTModelForCausalLM)", "fp32", run, exp))
        shutil.rmtree(out, ignore_errors=True)
    elif "optimum" in args.peers:
        log("optimum venv missing: run `bash benchmarks/setup_peers.sh`")
    if "genai" in args.peers and peers.available("genai"):
        for precision in args.genai_precisions:
            log(f"{case}: genai build {precision}")
            out = work / f"genai-{precision}"
            exp = peers.genai_build(ckpt, out, precision)
            run = None
            if exp["rc"] == 0 and not args.exports_only:
                log(f"{case}: genai decode {precision}")
                run = peers.run_worker("genai", out, logits_dir / f"genai-{precision}.npy", **common)
            rows.append(speed_row(case, "ORT GenAI (generator)", precision, run, exp,
                                  weights={"int8": "int8_b32", "int4": "int4_b32"}.get(precision)))
            shutil.rmtree(out, ignore_errors=True)
    elif "genai" in args.peers:
        log("genai venv missing: run `bash benchmarks/setup_peers.sh`")
    return rows


def cli_has(command):
    probe = subprocess.run(CLI + [command, "-h"], capture_output=True, text=True)
    return probe.returncode == 0


def run_quantize(case, ckpt, work, overhead):
    """Our streamed quantize vs loading everything then quantize(8), both measured from outside."""
    from bench_quantize import BASELINE_CODE

    out = work / "ours-w8"
    shutil.rmtree(out, ignore_errors=True)
    log(f"{case}: our quantize")
    ours = run_measured(CLI + ["quantize", ckpt, "-o", out, "--no-eval", "--json"], heavy=True)
    shutil.rmtree(out, ignore_errors=True)
    log(f"{case}: load-everything quantize")
    base = run_measured([sys.executable, "-c", BASELINE_CODE, ckpt], heavy=True)
    keep = ("wall_s", "peak_rss_bytes", "rc", "cmd")
    return {"case": case, "overhead_bytes": overhead, "ours": {k: ours[k] for k in keep},
            "load_everything": {k: base[k] for k in keep},
            "errors": [r["stderr_tail"][-600:] for r in (ours, base) if r["rc"] != 0]}


# (row dtype, export --dtype, int8 variants, quantize --include-lm-head first): the vendor-default int8 keeps
# lm_head in fp32 (W8A16 on the projections only); "int8, lm_head int8" quantizes it too, as GenAI int8 does.
OUR_BUILDS = [("fp32", "fp32", ["exact"], False), ("int8", "int8", ["exact", "fast"], False),
              ("int8", "int8", ["fast"], True)]


def run_ours(case, ckpt, work, logits_dir, args):
    rows = []
    common = args.timing
    if not cli_has("export"):
        log("`skywork-deploy export` is not available: our export rows are skipped")
        return rows
    for row_dtype, dtype, variants, lm_head in OUR_BUILDS:
        if lm_head and args.no_int8_lm_head:
            continue
        tag = dtype + ("-lm" if lm_head else "")
        out = work / f"ours-{tag}"
        shutil.rmtree(out, ignore_errors=True)
        src = ckpt
        if lm_head:  # quantize (with lm_head) first; its time and memory are not part of the export figures
            src = work / "ours-w8-lm"
            shutil.rmtree(src, ignore_errors=True)
            log(f"{case}: our quantize --include-lm-head")
            res = run_measured(CLI + ["quantize", ckpt, "-o", src, "--include-lm-head", "--no-eval", "--json"],
                               heavy=True)
            if res["rc"] != 0:
                exp = {"rc": res["rc"], "error": "quantize: " + res["stderr_tail"][-1500:]}
                rows.append(speed_row(case, "ours (ONNX Runtime)", row_dtype, None, exp, weights="int8_lm_head"))
                continue
        log(f"{case}: our export {tag}")
        cmd = CLI + ["export", src, "-o", out, "--dtype", dtype, "--json"]
        if dtype == "int8":
            cmd += ["--int8-format", "standard"]  # the ONNX Runtime-runnable int8 form
        res = run_measured(cmd, heavy=True)
        exp = {"wall_s": res["wall_s"], "peak_rss_bytes": res["peak_rss_bytes"], "rc": res["rc"],
               "cmd": res["cmd"], "artifact_bytes": folder_bytes(out) if out.exists() else None}
        reported = last_json_line(res["stdout"]) or {}
        if reported.get("export_peak_rss_bytes"):  # the export alone, before its built-in validation
            exp["export_only_peak_rss_bytes"] = reported["export_peak_rss_bytes"]
        weights = "int8_lm_head" if lm_head else None
        if res["rc"] != 0:
            exp["error"] = res["stderr_tail"][-1500:]
            rows.append(speed_row(case, "ours (ONNX Runtime)", row_dtype, None, exp, weights=weights))
            continue
        if args.exports_only:
            rows.append(speed_row(case, "ours (ONNX Runtime)", row_dtype, None, exp, weights=weights))
            variants = []
        for acc in variants:
            log(f"{case}: our decode {tag} {acc}")
            run = peers.run_worker("ours", out, logits_dir / f"ours-{tag}-{acc}.npy",
                                   extra=["--int8-accuracy", acc], **common)
            variant = "" if dtype == "fp32" else acc + (", lm_head int8" if lm_head else "")
            rows.append(speed_row(case, "ours (ONNX Runtime)", row_dtype, run, exp, variant=variant,
                                  weights=weights))
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
            if lm_head:
                shutil.rmtree(src, ignore_errors=True)
    return rows


def add_fidelity(rows, logits_dir):
    ref = logits_dir / "hf.npy"
    for row in rows:
        path = (row.get("run") or {}).get("logits_out")
        if ref.is_file() and path and Path(path).is_file():
            row["fidelity"] = peers.compare_logits(ref, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the 0.5B shape only, 2 repeats")
    ap.add_argument("--only", choices=["peers", "ours"], help="run only the peers or only our stages "
                    "(transformers eager always runs: it is the reference)")
    ap.add_argument("--cases", default=None, help=f"comma-separated subset of {', '.join(CASES)}")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per prompt length (default 3; quick 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-lens", default="128,1024")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--big-prompt-lens", default="128", help="prompt lengths for the 7B-layer cases")
    ap.add_argument("--big-new-tokens", type=int, default=16, help="new tokens for the 7B-layer cases")
    ap.add_argument("--genai-precisions", default="fp32,int8,int4")
    ap.add_argument("--peers", default="optimum,genai", help="comma-separated peers to run (optimum, genai)")
    ap.add_argument("--no-int8-lm-head", action="store_true",
                    help="skip our int8 row with lm_head quantized (quantize --include-lm-head, then export)")
    ap.add_argument("--work-dir", default=str(HERE / "work" / "run_all"))
    ap.add_argument("--results-dir", default=str(HERE / "results"))
    ap.add_argument("--tag", default="", help="suffix of the result files: results/<date>[-TAG].md")
    ap.add_argument("--exports-only", action="store_true",
                    help="measure export/build and quantize only (no decode, no logits): the memory figures")
    ap.add_argument("--keep", action="store_true", help="keep our exported bundles in the work folder")
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.prompt_lens = [int(p) for p in args.prompt_lens.split(",") if p]
    args.big_prompt_lens = [int(p) for p in args.big_prompt_lens.split(",") if p]
    args.genai_precisions = [p for p in args.genai_precisions.split(",") if p]
    args.peers = [p for p in args.peers.split(",") if p]
    default = ["qwen2.5-0.5b"] if args.quick else [c for c in CASES if c != "tiny"]
    names = args.cases.split(",") if args.cases else default
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log("memory bandwidth (numpy copy)")
    bandwidth = memory_bandwidth_gbps()
    over = run_measured([sys.executable, "-c", "import torch, safetensors, safetensors.torch"])
    data = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": "python benchmarks/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "memory_bandwidth_gbps": round(bandwidth, 2), "load_average_start": os.getloadavg()},
            "settings": {"threads": args.threads, "repeats": args.repeats, "prompt_lens": args.prompt_lens,
                         "new_tokens": args.new_tokens, "big_prompt_lens": args.big_prompt_lens,
                         "big_new_tokens": args.big_new_tokens}, "versions": versions(),
            "tag": args.tag, "overhead_bytes": over["peak_rss_bytes"], "cases": {}, "rows": [], "quantize": []}
    for name in names:
        preset, layers = CASES[name]
        case_dir = work / name
        logits_dir = case_dir / "logits"
        logits_dir.mkdir(parents=True, exist_ok=True)
        log(f"{name}: checkpoint")
        ckpt = make_checkpoint(case_dir / "checkpoint", preset, layers)
        args.timing = case_timing(preset, args)
        data["cases"][name] = {**weight_stats(ckpt), "timing": args.timing}
        stages = [lambda: run_reference(name, ckpt, logits_dir, args)]
        if args.only != "ours":
            stages.append(lambda: run_peers(name, ckpt, case_dir, logits_dir, args))
        if args.only != "peers":
            if cli_has("quantize"):
                stages.append(lambda: data["quantize"].append(
                    run_quantize(name, ckpt, case_dir, data["overhead_bytes"])) or [])
            stages.append(lambda: run_ours(name, ckpt, case_dir, logits_dir, args))
        for stage in stages:
            rows = stage()
            add_fidelity(rows, logits_dir)
            data["rows"] += rows
            save(data, args.results_dir)  # after every stage: a long run leaves usable partial results
    data["machine"]["load_average_end"] = os.getloadavg()
    paths = save(data, args.results_dir)
    log("wrote " + ", ".join(str(p) for p in paths))
    return 0


def versions():
    out = {}
    for venv, mods in (("optimum", "optimum.version:__version__ transformers onnxruntime"),
                       ("genai", "onnxruntime_genai transformers onnxruntime")):
        if not peers.available(venv):
            continue
        code = ("import importlib, json; r = {}\n"
                f"for m in {mods.split()!r}:\n"
                "    name, _, attr = m.partition(':')\n"
                "    mod = importlib.import_module(name)\n"
                "    r[name] = getattr(mod, attr or '__version__', '?')\n"
                "print(json.dumps(r))")
        res = subprocess.run([str(peers.venv_python(venv)), "-c", code], capture_output=True, text=True)
        out[venv] = last_json_line(res.stdout) or {"error": res.stderr[-300:]}
    import onnxruntime
    import torch
    import transformers
    out["main"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                   "onnxruntime": onnxruntime.__version__}
    return out


def save(data, results_dir):
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / (data["date"][:10] + (f"-{data['tag']}" if data.get("tag") else ""))
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    md_path, png_path = stem.with_suffix(".md"), stem.with_suffix(".png")
    try:
        report.write(data, stem)
    except ImportError:
        md_path.write_text(report.markdown(data))
        log("matplotlib missing (pip install -e .[bench]): no plot")
        png_path = None
    return [p for p in (md_path, json_path, png_path) if p]


if __name__ == "__main__":
    sys.exit(main())
