"""Benchmark of the runtime stage: our ONNX Runtime decoding against transformers eager, same run.

On a random Qwen2.5-0.5B-shaped checkpoint (synth preset "qwen2.5-0.5b"), 128-token prompt, 64 decode steps,
2 threads: prefill ms and decode tokens/s of
- transformers' Qwen2ForCausalLM, eager attention, fp32 (the reference; manual DynamicCache loop);
- our fp32 bundle on ONNX Runtime, with IOBinding and with the plain session.run loop;
- our int8 (standard: DequantizeLinear + MatMul) bundle: exact (disable_quant_qdq), exact through
  MatMulNBits accuracy level 0, and fast (MatMulNBits, int8 activations);
with ratios to the reference, and fidelity (cosine, top-1, KL, max diff; teacher-forced) of each bundle
against our torch model (fp32, or W8A16 for int8).

Run: flock /tmp/team/heavy.lock python benchmarks/bench_runtime.py   (writes benchmarks/results/runtime.json)
`measure_reference`, `measure_bundle` and `measure_fidelity` return plain dicts for benchmarks/run_all.py.
"""
import argparse
import gc
import json
import platform
import time
from pathlib import Path

from skywork_deploy.runtime.backends import make_backend
from skywork_deploy.runtime.bench import (bench_backend, bench_reference, fidelity, load_reference_model)
from skywork_deploy.runtime.bundle import open_bundle

RESULTS = Path(__file__).parent / "results" / "runtime.json"
VARIANTS = [  # (name, bundle dtype, options, repeats scale)
    ("ours fp32 (IOBinding)", "fp32", {"io_binding": True}),
    ("ours fp32 (session.run loop)", "fp32", {"io_binding": False}),
    ("ours int8 exact (disable_quant_qdq)", "int8", {"int8_accuracy": "exact"}),
    ("ours int8 exact (MatMulNBits level 0)", "int8", {"int8_accuracy": "exact-nbits"}),
    ("ours int8 fast (MatMulNBits level 4)", "int8", {"int8_accuracy": "fast"}),
]


def prepare(workdir, preset="qwen2.5-0.5b"):
    """The random checkpoint and its fp32 and int8 (standard) bundles, built once in `workdir`."""
    from skywork_deploy.export import export_model
    from skywork_deploy.base.synth import make_random_qwen2

    workdir = Path(workdir)
    model = workdir / "model"
    if not (model / "config.json").is_file():
        make_random_qwen2(model, preset=preset)
    bundles, errors = {}, {}
    for dtype in ("fp32", "int8"):
        out = workdir / f"bundle-{dtype}"
        if not (out / "skywork_deploy_manifest.json").is_file():
            t0 = time.perf_counter()
            kwargs = {"int8_format": "standard"} if dtype == "int8" else {}
            try:
                export_model(model, out, dtype=dtype, overwrite=True, **kwargs)
            except Exception as exc:  # record it and measure the other bundle
                errors[dtype] = f"export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                print(errors[dtype])
                continue
            print(f"exported {dtype} in {time.perf_counter() - t0:.0f} s")
        bundles[dtype] = out
    return model, bundles, errors


def measure_reference(model_folder, prompt_len=128, new_tokens=64, repeats=3, threads=2):
    model = load_reference_model(model_folder, threads)
    result = bench_reference(model, [prompt_len], new_tokens, repeats)[prompt_len]
    del model
    gc.collect()
    return {"name": "transformers eager fp32", **result}


def measure_bundle(bundle_dir, prompt_len=128, new_tokens=64, repeats=3, threads=2, **options):
    engine = make_backend("onnxruntime", open_bundle(bundle_dir), threads=threads, **options)
    result = bench_backend(engine, [prompt_len], new_tokens, repeats)[prompt_len]
    out = {"backend": engine.describe(), **result}
    del engine
    gc.collect()
    return out


def measure_fidelity(bundle_dir, prompt_len=128, steps=32, threads=2, **options):
    """Teacher-forced logits of the ORT bundle against our torch model (W8A16 for an int8 bundle)."""
    bundle = open_bundle(bundle_dir)
    reference = make_backend("torch", bundle, threads=threads)
    engine = make_backend("onnxruntime", bundle, threads=threads, **options)
    report = fidelity(engine, reference, prompt_len, steps)
    del engine, reference
    gc.collect()
    return {**report, "reference": "our torch model" + (" W8A16" if bundle.dtype == "int8" else " fp32")}


def run(workdir, prompt_len=128, new_tokens=64, repeats=3, threads=2, preset="qwen2.5-0.5b", slow_repeats=1,
        slow_tokens=16):
    model, bundles, errors = prepare(workdir, preset)
    ref = measure_reference(model, prompt_len, new_tokens, repeats, threads)
    print(f"reference: prefill {ref['prefill_ms']:.1f} ms, decode {ref['decode_tokens_per_s']:.2f} tok/s")
    rows = []
    for name, dtype, options in VARIANTS:
        if dtype not in bundles:
            rows.append({"name": name, "dtype": dtype, **options, "error": errors[dtype]})
            continue
        slow = options.get("int8_accuracy") == "exact-nbits"  # ~20x slower: fewer steps, one run
        speed = measure_bundle(bundles[dtype], prompt_len, slow_tokens if slow else new_tokens,
                               slow_repeats if slow else repeats, threads, **options)
        row = {"name": name, "dtype": dtype, **options, "prefill_ms": speed["prefill_ms"],
               "decode_tokens_per_s": speed["decode_tokens_per_s"],
               "prefill_speedup_vs_eager": ref["prefill_ms"] / speed["prefill_ms"],
               "decode_ratio_vs_eager": speed["decode_tokens_per_s"] / ref["decode_tokens_per_s"],
               "new_tokens": slow_tokens if slow else new_tokens, "runs": speed}
        if options.get("io_binding", True):
            row["fidelity"] = measure_fidelity(bundles[dtype], prompt_len, 32 if not slow else 8, threads,
                                               **options)
        rows.append(row)
        print(f"{name}: prefill {row['prefill_ms']:.1f} ms ({row['prefill_speedup_vs_eager']:.2f}x), decode "
              f"{row['decode_tokens_per_s']:.2f} tok/s ({row['decode_ratio_vs_eager']:.2f}x)"
              + (f", top-1 {row['fidelity']['top1_agreement']:.3f} cos {row['fidelity']['cosine_min']:.6f}"
                 if "fidelity" in row else ""))
    return {"benchmark": "runtime", "preset": preset, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "repeats": repeats, "threads": threads, "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "reference": ref, "rows": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/skywork_bench_runtime")
    ap.add_argument("--preset", default="qwen2.5-0.5b")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    result = run(args.workdir, args.prompt_len, args.new_tokens, args.repeats, args.threads, args.preset)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
