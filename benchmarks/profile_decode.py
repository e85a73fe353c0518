"""Where a decode step's time goes: ONNX Runtime's profiler over one graph, summed by operator type.

Runs the decode graph of an export bundle (or a GenAI model.onnx) for one token with `--past` cached
positions (random cache, 2 threads), N times, and prints per operator type: ms per step, nodes, share of
kernel time; also the plain (unprofiled) ms per step. Used to compare our graph with GenAI's node for node.

    python benchmarks/profile_decode.py BUNDLE/decode.onnx [--int8-accuracy fast] [--past 128] [--steps 30]
    benchmarks/.venvs/genai/bin/python benchmarks/profile_decode.py GENAI_DIR/model.onnx --int8-accuracy fast
"""
import argparse
import collections
import json
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("graph")
    ap.add_argument("--int8-accuracy", choices=["fast", "exact", "default"], default="default")
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--json", help="also write the table here")
    args = ap.parse_args(argv)

    plain = session(args.graph, args.int8_accuracy)
    feeds = feeds_for(plain, args.past)
    for _ in range(3):
        plain.run(None, feeds)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        plain.run(None, feeds)
    ms_plain = (time.perf_counter() - t0) / args.steps * 1e3
    del plain
    with tempfile.TemporaryDirectory() as tmp:
        prof = session(args.graph, args.int8_accuracy, tmp)
        runs = args.steps + 3
        for _ in range(runs):
            prof.run(None, feeds)
        events = json.load(open(prof.end_profiling()))
    time_by, nodes_by = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            time_by[e["args"]["op_name"]] += e["dur"]
            nodes_by[e["args"]["op_name"]] += 1
    total = sum(time_by.values())
    rows = [{"op": op, "ms_per_step": round(us / runs / 1e3, 3), "nodes": nodes_by[op] // runs,
             "share": round(us / total, 4)} for op, us in time_by.most_common()]
    print(f"{args.graph}: {ms_plain:.1f} ms/step unprofiled, {total / runs / 1e3:.1f} ms/step kernel time "
          f"({sum(r['nodes'] for r in rows)} nodes), past {args.past}")
    for r in rows:
        print(f"  {r['op']:34s} {r['ms_per_step']:7.3f} ms  {r['nodes']:4d} nodes  {r['share']:6.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"graph": args.graph, "past": args.past, "int8_accuracy": args.int8_accuracy,
                       "ms_per_step_unprofiled": round(ms_plain, 2), "ops": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
