"""Where a decode step's time goes: decode graphs timed side by side, then ONNX Runtime's profiler by op type.

Runs each decode graph (an export bundle's decode.onnx, or a GenAI model.onnx: ONNX Runtime runs both) for
one token with `--past` cached positions (random cache, 2 threads): unprofiled ms per step in alternating
rounds (median), then per operator type ms per step, nodes and share of kernel time. Compares our graph
with GenAI's node for node, on the same ONNX Runtime, in one process.

    python benchmarks/profile_decode.py BUNDLE/decode.onnx GENAI_DIR/model.onnx --int8-accuracy fast \
        [--past 128] [--steps 30] [--rounds 5] [--json OUT]
"""
import argparse
import collections
import json
import statistics
import sys
import tempfile
import time

import numpy as np


def feeds_for(session, past):
    """Inputs for one decode token: ids 1, full mask of past+1, position `past`, random float cache."""
    rng = np.random.default_rng(0)
    sizes = {"batch_size": 1, "sequence_length": 1, "past_sequence_length": past, "total_sequence_length": past + 1}
    feeds = {}
    for value in session.get_inputs():
        head_dim = value.shape[-1] if isinstance(value.shape[-1], int) else 64
        shape = [d if isinstance(d, int) else sizes.get(d, head_dim) for d in value.shape]
        if "int64" in value.type or "int32" in value.type:
            dtype = np.int64 if "int64" in value.type else np.int32
            feeds[value.name] = np.full(shape, past, dtype) if value.name == "position_ids" else np.ones(shape, dtype)
        else:
            feeds[value.name] = rng.random(shape, dtype=np.float32).astype(
                np.float16 if "float16" in value.type else np.float32)
    return feeds


def session(path, accuracy, profile_dir=None, threads=2):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    if accuracy == "fast":
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "4")
    elif accuracy == "exact":
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    if profile_dir:
        opts.enable_profiling, opts.profile_file_prefix = True, f"{profile_dir}/decode"
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def op_table(path, accuracy, feeds, steps):
    """[{op, ms_per_step, nodes, share}] from ONNX Runtime's profiler over `steps` + 3 runs."""
    with tempfile.TemporaryDirectory() as tmp:
        prof = session(path, accuracy, tmp)
        runs = steps + 3
        for _ in range(runs):
            prof.run(None, feeds)
        events = json.load(open(prof.end_profiling()))
    time_by, nodes_by = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            time_by[e["args"]["op_name"]] += e["dur"]
            nodes_by[e["args"]["op_name"]] += 1
    total = sum(time_by.values())
    return [{"op": op, "ms_per_step": round(us / runs / 1e3, 3), "nodes": nodes_by[op] // runs,
             "share": round(us / total, 4)} for op, us in time_by.most_common()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("graphs", nargs="+", help="decode graphs to compare (timed in alternating rounds)")
    ap.add_argument("--int8-accuracy", choices=["fast", "exact", "default"], default="default")
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of unprofiled timing")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    sessions = {g: session(g, args.int8_accuracy) for g in args.graphs}
    feeds = {g: feeds_for(s, args.past) for g, s in sessions.items()}
    for g, s in sessions.items():
        for _ in range(3):
            s.run(None, feeds[g])
    timed = {g: [] for g in args.graphs}
    for r in range(args.rounds):
        for g in (args.graphs if r % 2 == 0 else args.graphs[::-1]):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                sessions[g].run(None, feeds[g])
            timed[g].append(round((time.perf_counter() - t0) / args.steps * 1e3, 2))
    del sessions
    results = []
    for g in args.graphs:
        rows = op_table(g, args.int8_accuracy, feeds[g], args.steps)
        median = statistics.median(timed[g])
        results.append({"graph": g, "ms_per_step_median": median, "ms_per_step_rounds": timed[g],
                        "nodes": sum(r["nodes"] for r in rows), "ops": rows})
        print(f"{g}: {median:.1f} ms/step (median of {args.rounds} alternating rounds {timed[g]}), "
              f"{sum(r['nodes'] for r in rows)} nodes after ONNX Runtime's optimizer, past {args.past}")
        for r in rows[:8]:
            print(f"  {r['op']:34s} {r['ms_per_step']:7.3f} ms  {r['nodes']:4d} nodes  {r['share']:6.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv),
                       "past": args.past, "int8_accuracy": args.int8_accuracy, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
