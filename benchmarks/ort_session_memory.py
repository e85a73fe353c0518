"""How much memory one ONNX Runtime CPU session takes on an external-data graph, per session setting.

    python benchmarks/ort_session_memory.py BUNDLE [--graph prefill] [--variants default,no_arena,...]

Each variant runs in its own child process: create the session, run the left-padded validation batch once,
then report VmHWM (peak RSS) and RssAnon/RssFile after creation and after the run (/proc/self/status).
RssFile pages are mmapped external data the kernel can reclaim; RssAnon is what really has to fit.
Writes benchmarks/results/ort_session_memory.json (rows appended per bundle/graph/variant).
"""
import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "default": ({}, True),
    "no_arena": ({}, False),
    "no_prepack": ({"session.disable_prepacking": "1"}, True),
    "no_arena_no_prepack": ({"session.disable_prepacking": "1"}, False),
    "device_alloc_inits": ({"session.use_device_allocator_for_initializers": "1"}, True),
    "no_arena_device_alloc": ({"session.use_device_allocator_for_initializers": "1"}, False),
    "int8_exact_nbits": ({"session.qdq_matmulnbits_accuracy_level": "0"}, False),
    "int8_unfused": ({"session.disable_quant_qdq": "1"}, False),
}
CHILD = r'''
import json, re, sys, time
import numpy as np
import onnxruntime as ort
def status():
    t = open("/proc/self/status").read()
    return {k: int(re.search(k + r":\s+(\d+)", t).group(1)) * 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}
path, entries, arena = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "1"
so = ort.SessionOptions(); so.log_severity_level = 3; so.enable_cpu_mem_arena = arena
for k, v in entries.items(): so.add_session_config_entry(k, v)
t = time.perf_counter()
s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
created = {**status(), "seconds": round(time.perf_counter() - t, 2)}
ids = np.random.default_rng(0).integers(0, 1000, size=(2, 12)).astype(np.int64)
mask = np.ones((2, 12), dtype=np.int64); mask[1, :5] = 0
feed = {"input_ids": ids, "attention_mask": mask, "position_ids": np.clip(mask.cumsum(-1) - 1, 0, None)}
if "decode" in path:
    n = sum(1 for i in s.get_inputs() if i.name.startswith("past_key_values")) // 2
    shape = [d if isinstance(d, int) else 2 for d in s.get_inputs()[3].shape]
    mask = np.ones((2, 13), dtype=np.int64); mask[1, :5] = 0
    feed = {"input_ids": ids[:, :1], "attention_mask": mask,
            "position_ids": np.clip(mask.cumsum(-1) - 1, 0, None)[:, -1:]}
    for i in range(n):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = np.zeros((2, shape[1], 12, shape[3]), dtype=np.float32)
t = time.perf_counter()
s.run(None, feed)
ran = {**status(), "seconds": round(time.perf_counter() - t, 2)}
print(json.dumps({"after_create": created, "after_run": ran}))
'''


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--graph", default="prefill")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    bundle = Path(args.bundle)
    path = bundle / f"{args.graph}.onnx"
    data = bundle / "model.onnx.data"
    rows = []
    for name in args.variants.split(","):
        entries, arena = VARIANTS[name]
        res = subprocess.run([sys.executable, "-c", CHILD, str(path), json.dumps(entries), "1" if arena else "0"],
                             capture_output=True, text=True)
        if res.returncode:
            row = {"variant": name, "error": res.stderr[-1500:]}
        else:
            row = {"variant": name, "options": entries, "cpu_mem_arena": arena,
                   **json.loads(res.stdout.strip().splitlines()[-1])}
        row.update(bundle=bundle.name, graph=args.graph, data_bytes=data.stat().st_size)
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = HERE / "results" / "ort_session_memory.json"
    old = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    keys = {(r["bundle"], r["graph"], r["variant"]) for r in rows}
    old["rows"] = [r for r in old["rows"] if (r["bundle"], r["graph"], r["variant"]) not in keys] + rows
    out.write_text(json.dumps(old, indent=2) + "\n")


if __name__ == "__main__":
    main()
