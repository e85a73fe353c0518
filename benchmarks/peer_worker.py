"""Timing and logits worker, run by benchmarks/peers.py inside a peer's own virtual environment.

Standalone on purpose (skywork_deploy is imported only by the `ours` backend): the same file runs under the
main environment (transformers eager; our bundle on ONNX Runtime), the `optimum` venv (ORTModelForCausalLM)
and the `genai` venv (onnxruntime-genai).

    python peer_worker.py --backend hf|ours|optimum|genai --model DIR [--logits-out FILE.npy] ...

Prompts are token ids drawn from a seeded generator, identical for every backend. Per prompt length:
prefill ms = time until the first new token exists; decode tok/s = (new_tokens - 1) / time of the
remaining steps (greedy, no early stop). The result is printed as one JSON line, last.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

BASE_VOCAB = 151643  # ids below this are ordinary BPE tokens in the Qwen vocabulary


def prompt_ids(length, seed):
    return np.random.default_rng(seed + length).integers(0, BASE_VOCAB, size=length, dtype=np.int64)


# ---- transformers eager and Optimum ORTModelForCausalLM (both driven by transformers' generate) ----

def _timed_generate(model, ids, new_tokens):
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    x = torch.from_numpy(ids)[None]
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=0,
                             logits_processor=LogitsProcessorList([Stamp()]))
    n = out.shape[1] - x.shape[1]
    return (stamps[0] - t0) * 1e3, (n - 1) / (stamps[-1] - stamps[0]), n


def load_hf(folder, threads):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                **{key: torch.float32}).eval()


def load_optimum(folder, threads):
    import onnxruntime as ort
    import torch
    import transformers
    from optimum.onnxruntime import ORTModelForCausalLM

    # ONNX Runtime does the compute with its own `threads`; torch only glues generate() together, and a
    # second pool of spinning threads on the same cores would slow ORT down.
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ORTModelForCausalLM.from_pretrained(folder, session_options=so, provider="CPUExecutionProvider",
                                               use_cache=True, use_io_binding=False)


def torch_logits(model, ids):
    import torch

    x = torch.from_numpy(ids)[None]
    with torch.inference_mode():
        out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True)
    return out.logits[0].float().numpy()


# ---- onnxruntime-genai ----

def set_genai_threads(folder, threads):
    """GenAI's generator ignores the process thread count; it reads its session options from the config."""
    path = Path(folder) / "genai_config.json"
    cfg = json.loads(path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    if opts.get("intra_op_num_threads") != threads:
        opts["intra_op_num_threads"] = threads
        opts["inter_op_num_threads"] = 1
        path.write_text(json.dumps(cfg, indent=4))


def load_genai(folder, threads):
    import onnxruntime_genai as og

    set_genai_threads(folder, threads)
    return og.Model(folder)


def _genai_generator(model, total_len, min_len=None):
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    opts = {"max_length": total_len, "do_sample": False}
    if min_len:
        opts["min_length"] = min_len
    params.set_search_options(**opts)
    return og.Generator(model, params)


def genai_generate(model, ids, new_tokens):
    gen = _genai_generator(model, len(ids) + new_tokens, len(ids) + new_tokens)
    t0 = time.perf_counter()
    gen.append_tokens(ids[None].astype(np.int32))
    gen.generate_next_token()  # samples from the prefill logits
    t1 = time.perf_counter()
    n = 1
    while n < new_tokens and not gen.is_done():
        gen.generate_next_token()  # one forward for the previous token, then a greedy pick
        n += 1
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (n - 1) / (t2 - t1), n


def genai_logits(model, ids):
    gen = _genai_generator(model, len(ids) + 1)
    gen.append_tokens(ids[None].astype(np.int32))
    logits = np.asarray(gen.get_output("logits"), dtype=np.float32)
    return logits.reshape(-1, logits.shape[-1])  # (S, V) or (1, V) when the graph keeps the last row only


# ---- ours: an exported bundle on skywork_deploy's ONNX Runtime backend (main environment only) ----

def load_ours(folder, threads, int8_accuracy="exact"):
    from skywork_deploy.runtime.backends import make_backend
    from skywork_deploy.runtime.bundle import open_bundle

    return make_backend("onnxruntime", open_bundle(folder), threads=threads, int8_accuracy=int8_accuracy)


def _ours_step(engine, token, mask, kv):
    mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
    logits, kv = engine.decode(np.array([[token]], dtype=np.int64), mask, mask.sum(-1, keepdims=True) - 1, kv)
    return logits, mask, kv


def ours_generate(engine, ids, new_tokens):
    x = ids[None].astype(np.int64)
    mask = np.ones_like(x)
    t0 = time.perf_counter()
    logits, kv = engine.prefill(x, mask, np.arange(len(ids), dtype=np.int64)[None])
    token = int(np.asarray(logits).reshape(-1, np.asarray(logits).shape[-1])[-1].argmax())
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits, mask, kv = _ours_step(engine, token, mask, kv)
        token = int(np.asarray(logits).reshape(-1, np.asarray(logits).shape[-1])[-1].argmax())
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (new_tokens - 1) / (t2 - t1), new_tokens


def ours_logits(engine, ids):
    """Logits at every prompt position, teacher-forced (our prefill graph returns the last row only)."""
    x = ids[None, :1].astype(np.int64)
    mask = np.ones_like(x)
    logits, kv = engine.prefill(x, mask, np.zeros((1, 1), dtype=np.int64))
    rows = [np.asarray(logits, dtype=np.float32).reshape(-1, np.asarray(logits).shape[-1])[-1]]
    for tok in ids[1:]:
        logits, mask, kv = _ours_step(engine, int(tok), mask, kv)
        rows.append(np.asarray(logits, dtype=np.float32).reshape(-1, np.asarray(logits).shape[-1])[-1])
    return np.stack(rows)


BACKENDS = {
    "ours": (load_ours, ours_generate, ours_logits),
    "hf": (load_hf, _timed_generate, torch_logits),
    "optimum": (load_optimum, _timed_generate, torch_logits),
    "genai": (load_genai, genai_generate, genai_logits),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=sorted(BACKENDS), required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-lens", default="128,1024")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--logits-out", help="save the logits of the fixed prompt here (.npy)")
    ap.add_argument("--logits-prompt-len", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--int8-accuracy", default="exact", help="ours only: exact or fast")
    args = ap.parse_args(argv)

    load, generate, logits = BACKENDS[args.backend]
    t = time.perf_counter()
    extra = {"int8_accuracy": args.int8_accuracy} if args.backend == "ours" else {}
    model = load(args.model, args.threads, **extra)
    result = {"backend": args.backend, "load_s": round(time.perf_counter() - t, 3), "threads": args.threads,
              "new_tokens": args.new_tokens, "repeats": args.repeats, "prefill_ms": {}, "decode_tok_s": {},
              "raw": {}}
    if args.logits_out:
        arr = logits(model, prompt_ids(args.logits_prompt_len, args.seed))
        np.save(args.logits_out, arr)
        result["logits_out"] = args.logits_out
    generate(model, prompt_ids(16, args.seed), 4)  # warm-up: first-run allocations and kernel choice
    for length in [int(v) for v in args.prompt_lens.split(",") if v]:
        ids = prompt_ids(length, args.seed)
        runs = [generate(model, ids, args.new_tokens) for _ in range(args.repeats)]
        result["prefill_ms"][str(length)] = round(statistics.median(r[0] for r in runs), 2)
        result["decode_tok_s"][str(length)] = round(statistics.median(r[1] for r in runs), 3)
        result["raw"][str(length)] = [[round(r[0], 2), round(r[1], 3), r[2]] for r in runs]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
