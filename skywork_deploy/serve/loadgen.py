"""The vendor's serving benchmark (a fork of vLLM's benchmark_serving.py, VENDOR.md §5), over any endpoint.

For each concurrency level, `num_prompts` requests of random prompts (`input_len` ordinary token ids, seeded)
go out with at most `concurrency` in flight; each asks for `output_len` tokens with `ignore_eos`, streamed with
usage. Per request: TTFT (first text chunk), E2E latency, TPOT = (latency - TTFT) / (tokens - 1), and the
inter-token latencies (gaps between chunks). Per level: request and token throughput over the wall time and
mean / median / p99 of each latency in ms.

Prompts are ordinary token ids of the served model (runtime.bench.ordinary_ids: the bundle's tokenizer locally,
`--tokenizer`, else the vocabulary size the endpoint's /v1/models reports, else Qwen's): sent as text when a
tokenizer is given (decoded; the server re-encodes them, so the prompt length it reports may differ by a few
tokens: the report uses the server's count), else as a token-id list, which our server and vLLM's
`/v1/completions` accept. The default prompt length fits the context the endpoint reports (`max_model_len`).
"""
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..base.errors import ConfigError, EndpointError
from ..runtime.bench import BASE_VOCAB, ordinary_ids, prompt_lengths, random_prompt
from .client import EndpointClient

METRICS = ("ttft", "tpot", "itl", "e2el")


def random_prompts(n, input_len, vocab, seed=0):
    """`n` prompts of `input_len` ids from `vocab` (an ordinary_ids() array or a vocabulary size), seeded."""
    rng = np.random.default_rng(seed)
    return [random_prompt(input_len, vocab, int(s)) for s in rng.integers(0, 1 << 31, size=n)]


def one_request(client, prompt, output_len):
    """Stream one completion; the raw timings of it."""
    start = time.perf_counter()
    chunks, usage = [], {}
    for event in client.stream_complete(prompt, max_tokens=output_len, temperature=0.0, ignore_eos=True):
        if event.usage:
            usage = event.usage
        elif event.text:
            chunks.append(event.t)
    end = time.perf_counter()
    tokens = int(usage.get("completion_tokens", len(chunks)))
    ttft = (chunks[0] - start) if chunks else end - start
    latency = end - start
    return {"ttft": ttft, "e2el": latency, "tpot": (latency - ttft) / (tokens - 1) if tokens > 1 else None,
            "itl": list(np.diff(chunks)), "output_tokens": tokens,
            "prompt_tokens": int(usage.get("prompt_tokens", len(prompt) if isinstance(prompt, list) else 0))}


def _stats(values):
    values = [v * 1000 for v in values if v is not None]
    if not values:
        return {"mean": None, "median": None, "p99": None}
    return {"mean": statistics.fmean(values), "median": statistics.median(values),
            "p99": float(np.percentile(values, 99))}


def run_level(client, prompts, output_len, concurrency):
    """Every prompt through the endpoint with at most `concurrency` in flight -> one report row."""
    results, lock = [], threading.Lock()

    def task(prompt):
        r = one_request(client, prompt, output_len)
        with lock:
            results.append(r)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for f in [pool.submit(task, p) for p in prompts]:
            f.result()  # re-raises a request's error (NetworkError, EndpointError)
    wall = time.perf_counter() - start
    out_tokens = sum(r["output_tokens"] for r in results)
    in_tokens = sum(r["prompt_tokens"] for r in results)
    row = {"concurrency": concurrency, "requests": len(results), "duration_s": wall,
           "request_throughput": len(results) / wall, "output_token_throughput": out_tokens / wall,
           "total_token_throughput": (in_tokens + out_tokens) / wall, "total_input_tokens": in_tokens,
           "total_output_tokens": out_tokens}
    for metric in METRICS:
        values = [v for r in results for v in r["itl"]] if metric == "itl" else [r[metric] for r in results]
        row[f"{metric}_ms"] = _stats(values)
    return row


def bench_endpoint(url, model=None, api_key=None, input_len=None, output_len=64, concurrency=(1, 4, 8, 16),
                   num_prompts=None, tokenizer=None, vocab=None, seed=0, warmup=True):
    """The serving benchmark at each concurrency level -> {"endpoint", "model", "rows": [...], ...}.

    `vocab`: the ordinary ids prompts use (default: from `tokenizer`, else the endpoint's model card)."""
    if (input_len is not None and input_len < 1) or output_len < 1:
        raise ConfigError(f"--input-len {input_len} / --output-len {output_len}: both must be at least 1")
    if not concurrency or min(concurrency) < 1:
        raise ConfigError(f"--concurrency {concurrency}: give levels >= 1, e.g. 1,4,8,16")
    with EndpointClient(url, model=model, api_key=api_key) as client:
        card = client.model_card()
        context = card.get("max_model_len")
        if context:
            input_len = prompt_lengths([input_len] if input_len else None, output_len, int(context),
                                       "--input-len", "--output-len")[0]
        input_len = input_len or 128
        if vocab is None:
            size = card.get("vocab_size") or (len(tokenizer) if tokenizer is not None else BASE_VOCAB)
            vocab = ordinary_ids(int(size), tokenizer)
        report = {"endpoint": client.url, "model": client.model, "input_len": input_len, "output_len": output_len,
                  "seed": seed, "prompts_as": "text" if tokenizer is not None else "token ids", "rows": []}
        try:
            if warmup:  # the first graph runs pay one-time costs; they are not the server's speed
                one_request(client, random_prompts(1, input_len, vocab, seed + 999)[0], min(4, output_len))
            for level in concurrency:
                n = num_prompts or max(4, 2 * level)
                ids = random_prompts(n, input_len, vocab, seed + level)
                prompts = [tokenizer.decode(p) for p in ids] if tokenizer is not None else ids
                report["rows"].append(run_level(client, prompts, output_len, level))
        except EndpointError as exc:
            if "outside the vocabulary" in str(exc):
                raise EndpointError(f"{exc} (pass --tokenizer with the served model's tokenizer folder)",
                                    status=exc.status) from None
            raise
    return report


def format_table(report):
    """The report as the lines of a fixed-width table (ms; throughput per second)."""
    head = (f"{'conc':>4} {'req/s':>7} {'out tok/s':>9} {'tot tok/s':>9} "
            + " ".join(f"{m.upper() + ' ' + s:>12}" for m in METRICS for s in ("mean", "med", "p99")))
    lines = [f"{report['endpoint']} model {report['model']}: input {report['input_len']} tokens, output "
             f"{report['output_len']} (ignore_eos), prompts as {report['prompts_as']}", head]
    for r in report["rows"]:
        cells = [f"{r['concurrency']:>4}", f"{r['request_throughput']:7.2f}", f"{r['output_token_throughput']:9.1f}",
                 f"{r['total_token_throughput']:9.1f}"]
        for m in METRICS:
            s = r[f"{m}_ms"]
            cells += [f"{s[k]:12.1f}" if s[k] is not None else f"{'-':>12}" for k in ("mean", "median", "p99")]
        lines.append(" ".join(cells))
    return lines
