"""C4 calibration speed: `build_calib` against the reference one-document-at-a-time GPTQ loop, same run.

    flock /tmp/team/heavy.lock python benchmarks/bench_calib.py [--docs 45000] [--nsamples 128] [--seqlen 2048]

1. Generates a C4-sized shard in a temp folder: 45,000 documents of our own synthetic English (sentences from
   calibration/make_samples.py), words per document lognormal (mean ~450, sigma 1.0, so a few percent of
   the documents exceed 2,048 tokens), in the real format (gzipped JSON Lines with text/timestamp/url).
2. Reference (as GPTQ's get_c4 does it): load every document, then per sample draw a random document,
   tokenize it alone (`tokenizer(text, return_tensors="pt")`), retry until it has more than seqlen tokens,
   and cut a random window. Loading uses plain gzip + json (cheaper than `datasets.load_dataset`).
3. Ours: `skywork_deploy.calib.build_calib` end to end (hashing, scan, batched tokenization, writing).
Both load the same Qwen tokenizer from scratch. Results: benchmarks/results/calib.json.
"""
import argparse
import gzip
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "calib.json"


def load_make_samples():
    spec = importlib.util.spec_from_file_location("make_samples", ROOT / "calibration" / "make_samples.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_shard(path, ndocs, seed=0):
    samples = load_make_samples()
    rng = np.random.default_rng(seed)
    words = rng.lognormal(np.log(450) - 0.5, 1.0, ndocs).clip(5, 20000)
    docs = samples.english_documents(words.astype(int), seed=seed)
    samples.write_jsonl_gz(path, docs, seed=seed, compresslevel=6)
    return words


def reference_gptq(shard, tok_folder, nsamples, seqlen, seed):
    """The common GPTQ C4 loop, one document at a time (numpy generator instead of `random`)."""
    import torch
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(tok_folder))
    t_tok = time.perf_counter()
    with gzip.open(shard, "rt", encoding="utf-8") as fh:
        data = [json.loads(line) for line in fh]
    t_load = time.perf_counter()
    rng = np.random.default_rng(seed)
    windows, draws, tokens = [], 0, 0
    for _ in range(nsamples):
        while True:
            i = int(rng.integers(0, len(data)))
            enc = tok(data[i]["text"], return_tensors="pt")
            draws += 1
            tokens += enc.input_ids.shape[1]
            if enc.input_ids.shape[1] > seqlen:
                break
        j = int(rng.integers(0, enc.input_ids.shape[1] - seqlen))  # GPTQ: randint(0, n - seqlen - 1)
        windows.append(enc.input_ids[:, j:j + seqlen])
    ids = torch.cat(windows, dim=0)
    t_end = time.perf_counter()
    return {"seconds": round(t_end - t0, 3), "tokenizer_load_s": round(t_tok - t0, 3),
            "read_s": round(t_load - t_tok, 3), "sample_s": round(t_end - t_load, 3), "documents_tokenized": draws,
            "tokens_tokenized": tokens, "shape": list(ids.shape)}


def ours(shard, tok_folder, nsamples, seqlen, seed, out):
    from skywork_deploy.calib import build_calib, stage

    stage._TOKENIZERS.clear()
    t0 = time.perf_counter()
    result = build_calib("c4", [shard], tok_folder, out, nsamples=nsamples, seqlen=seqlen, seed=seed)
    seconds = time.perf_counter() - t0
    s = result["statistics"]
    return {"seconds": round(seconds, 3), "documents_tokenized": s["texts_tokenized"],
            "tokens_tokenized": s["tokens_tokenized"], "documents_candidate": s["documents_candidate"],
            "passes": s["passes"], "shape": result["output"]["shape"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=45000)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    # Import everything both sides use first, so neither pays the one-time import cost inside its timing.
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoTokenizer  # noqa: F401

    import skywork_deploy.calib.stage  # noqa: F401
    import skywork_deploy.patch  # noqa: F401
    from skywork_deploy.base.synth import write_r1_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench-calib-") as tmp:
        tmp = Path(tmp)
        tok_folder = tmp / "tokenizer"
        tok_folder.mkdir()
        write_r1_tokenizer(tok_folder)
        shard = tmp / "c4-bench.json.gz"
        t0 = time.perf_counter()
        words = make_shard(shard, args.docs, args.seed)
        gen_s = time.perf_counter() - t0
        print(f"shard: {args.docs} documents, {shard.stat().st_size / 1e6:.1f} MB gz, generated in {gen_s:.1f} s",
              file=sys.stderr)
        mine = ours(shard, tok_folder, args.nsamples, args.seqlen, args.seed, tmp / "out")
        print(f"ours: {mine}", file=sys.stderr)
        ref = reference_gptq(shard, tok_folder, args.nsamples, args.seqlen, args.seed)
        print(f"reference: {ref}", file=sys.stderr)
        # Fraction of documents longer than seqlen tokens (estimated on 2,000 random documents).
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tok_folder))
        with gzip.open(shard, "rt", encoding="utf-8") as fh:
            texts = [json.loads(line)["text"] for line in fh]
        pick = np.random.default_rng(1).choice(len(texts), 2000, replace=False)
        counts = np.array([len(e) for e in tok.backend_tokenizer.encode_batch([texts[i] for i in pick],
                                                                               add_special_tokens=False)])
        shard_info = {"documents": args.docs, "gz_bytes": shard.stat().st_size,
                      "text_bytes": int(sum(len(t) for t in texts)), "mean_words": round(float(words.mean()), 1),
                      "mean_tokens_est": round(float(counts.mean()), 1),
                      "fraction_longer_than_seqlen_est": round(float((counts > args.seqlen).mean()), 4),
                      "generated_s": round(gen_s, 2)}
    result = {
        "benchmark": "calib c4: 128 windows from a C4-sized shard, ours vs reference GPTQ loop (same run)",
        "command": "flock /tmp/team/heavy.lock python benchmarks/bench_calib.py",
        "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed, "shard": shard_info,
        "ours": mine, "reference": ref, "speedup": round(ref["seconds"] / mine["seconds"], 2),
        "machine": {"cpus": os.cpu_count(), "load_average_1m_at_end": round(os.getloadavg()[0], 2),
                    "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "(unset)")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
