"""Patch time on a large-weight folder: a 65 GB Skywork-OR1-32B-shaped checkpoint (sparse files) vs a tiny one.

Shards are valid safetensors files whose data is a hole (truncate), so the benchmark needs no disk space;
`patch -o` hard-links weights, so its time should not depend on their size.

    python benchmarks/bench_patch.py            # writes benchmarks/results/patch.json
"""
import json
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

from skywork_deploy.patch import patch_model, revert
from skywork_deploy.base.synth import PRESETS, write_r1_tokenizer

RESULTS = Path(__file__).parent / "results"


def sparse_checkpoint(folder, total_bytes, shards):
    folder.mkdir(parents=True)
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "torch_dtype": "bfloat16",
           **PRESETS["skywork-or1-32b"]}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    write_r1_tokenizer(folder)
    per = total_bytes // shards
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensor = f"blob.{i}"
        header = json.dumps({tensor: {"dtype": "BF16", "shape": [per // 2], "data_offsets": [0, per // 2 * 2]}})
        header = header.encode() + b" " * (-len(header) % 8)
        with open(folder / name, "wb") as fh:
            fh.write(struct.pack("<Q", len(header)) + header)
            fh.truncate(8 + len(header) + per // 2 * 2)
        weight_map[tensor] = name
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def timed(fn, repeats=5):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main():
    work = Path(tempfile.mkdtemp(prefix="bench-patch-"))
    try:
        rows = {}
        for label, size, shards in (("65GB", 65 * 10**9, 17), ("1MB", 10**6, 1)):
            src = sparse_checkpoint(work / label, size, shards)
            outs = iter(range(100))

            def to_new_folder():
                patch_model(src, out=work / f"{label}-out-{next(outs)}")

            def in_place():
                patch_model(src)
                revert(src)

            rows[label] = {"weights_bytes": size, "shards": shards, "patch_to_new_folder_s": timed(to_new_folder),
                           "patch_in_place_and_revert_s": timed(in_place)}
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "patch.json").write_text(json.dumps(rows, indent=2) + "\n")
        print("| weights | shards | patch -o (s) | in place + revert (s) |\n|---|---|---|---|")
        for label, r in rows.items():
            print(f"| {label} | {r['shards']} | {r['patch_to_new_folder_s']:.3f} | "
                  f"{r['patch_in_place_and_revert_s']:.3f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
