"""Decode speed, ours against ONNX Runtime GenAI, interleaved: every bundle runs once per round, rounds repeat.

The machine is shared, so a single pass of run_all can put one row under someone else's load; alternating
the rows round by round and taking each row's median over rounds compares them under the same conditions.
Builds what is missing in --work-dir (GenAI fp32/int8, our fp32 / int8 / int8 with lm_head int8), then runs
benchmarks/peer_worker.py for each (--prompt-lens, --new-tokens, 2 threads), each under the heavy lock; the
row order is reversed every other round, and --only keeps the named rows.

    python benchmarks/decode_ab.py --ckpt benchmarks/work/run_all/qwen2.5-0.5b/checkpoint --rounds 2 \\
        [--extra NAME=ours:PATH:ACCURACY ...] --out benchmarks/results/<date>-decode-ab.json
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peers  # noqa: E402
from measure import run_measured  # noqa: E402

CLI = [sys.executable, "-m", "skywork_deploy"]


def build(ckpt, work):
    """{row name: (backend, bundle, int8 accuracy)}; builds the bundles that are not there yet."""
    rows = {}
    for precision in ("fp32", "int8"):
        out = work / f"genai-{precision}"
        if not (out / "genai_config.json").is_file():
            print("genai build", precision, flush=True)
            peers.genai_build(ckpt, out, precision)
        rows[f"GenAI {precision}"] = ("genai", out, None)
    q = work / "w8-lm"
    if not (q / "config.json").is_file():
        run_measured(CLI + ["quantize", ckpt, "-o", q, "--include-lm-head", "--no-eval", "--overwrite"], heavy=True)
    for name, src, dtype in (("fp32", ckpt, "fp32"), ("int8", ckpt, "int8"), ("int8-lm", q, "int8")):
        out = work / f"ours-{name}"
        if not (out / "skywork_deploy_manifest.json").is_file():
            print("our export", name, flush=True)
            cmd = CLI + ["export", src, "-o", out, "--dtype", dtype, "--overwrite"]
            res = run_measured(cmd + (["--int8-format", "standard"] if dtype == "int8" else []), heavy=True)
            if res["rc"] != 0:
                raise SystemExit(f"export {name} failed:\n{res['stderr_tail'][-2000:]}")
    rows["ours fp32"] = ("ours", work / "ours-fp32", "exact")
    rows["ours int8 exact"] = ("ours", work / "ours-int8", "exact")
    rows["ours int8 fast"] = ("ours", work / "ours-int8", "fast")
    rows["ours int8 fast, lm_head int8"] = ("ours", work / "ours-int8-lm", "fast")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--work-dir", default=str(HERE / "work" / "decode_ab"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs inside each worker (median)")
    ap.add_argument("--prompt-lens", default="128")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--extra", action="append", default=[], help="NAME=ours:BUNDLE:ACCURACY, another row")
    ap.add_argument("--only", action="append", default=[], help="run only this row (repeat the option)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rows = build(Path(args.ckpt), work)
    for spec in args.extra:
        name, _, rest = spec.partition("=")
        backend, path, acc = rest.split(":")
        rows[name] = (backend, Path(path), acc)
    if args.only:
        unknown = [n for n in args.only if n not in rows]
        if unknown:
            raise SystemExit(f"--only {unknown[0]!r}: not a row (rows: {', '.join(rows)})")
        rows = {n: rows[n] for n in args.only}
    lens = [int(x) for x in args.prompt_lens.split(",")]
    results = {name: [] for name in rows}
    for r in range(args.rounds):
        order = list(rows) if r % 2 == 0 else list(rows)[::-1]  # no row always runs first (or last)
        for name in order:
            backend, path, acc = rows[name]
            extra = ["--int8-accuracy", acc] if backend == "ours" else []
            run = peers.run_worker(backend, path, prompt_lens=lens, new_tokens=args.new_tokens,
                                   repeats=args.repeats, extra=extra)
            tok_s = (run.get("decode_tok_s") or {}).get(str(lens[0]))
            print(f"round {r + 1} {time.strftime('%H:%M:%S')} {name}: {tok_s} tok/s", flush=True)
            results[name].append(run)
    summary = {name: statistics.median(x["decode_tok_s"][str(lens[0])] for x in runs if "decode_tok_s" in x)
               for name, runs in results.items() if any("decode_tok_s" in x for x in runs)}
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                          "command": " ".join(sys.argv), "median_decode_tok_s": summary,
                                          "runs": results}, indent=1, default=str) + "\n")
    for name, v in summary.items():
        print(f"{name:40s} {v:7.2f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
