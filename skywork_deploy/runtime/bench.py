"""Speed and fidelity measurements of a backend, with transformers' eager Qwen2 as the reference.

- `bench_backend(backend, ...)`: prefill ms and decode tokens/s per prompt length, medians over repeats.
- `bench_reference(model_folder, ...)`: the same figures for transformers' Qwen2ForCausalLM (eager
  attention, manual KV-cache loop with `DynamicCache`, `logits_to_keep=1` in prefill as `generate` does).
- `fidelity(backend, reference, ...)`: teacher-forced comparison of the logits of both backends over a
  prompt and the reference's greedy continuation: cosine, top-1 agreement, KL(ref || ours), max |diff|.
- `bench_bundle(...)`: all of it for one bundle, with ratios; what `skywork-deploy bench` prints.
Each returns plain dicts so benchmark scripts can collect them.
"""
import statistics
import time

import numpy as np

from .generate import Sampler, generate_ids

BASE_VOCAB = 151643  # ids below this are ordinary BPE tokens in Qwen vocabularies


DEFAULT_PROMPT_LENS = (128, 1024)


def ordinary_ids(vocab_size, tokenizer=None):
    """Token ids a random prompt may use: the tokenizer's ids that are not special or added tokens, below the
    model's vocabulary; without a tokenizer, the ids below `vocab_size` and Qwen's first special id."""
    if tokenizer is None:
        return np.arange(min(vocab_size, BASE_VOCAB))
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return np.array([i for i in range(min(vocab_size, len(tokenizer))) if i not in special])


def random_prompt(length, vocab, seed=0):
    """`length` random ids (seeded) from `vocab`: an ordinary_ids() array, or a vocabulary size."""
    pool = ordinary_ids(vocab) if isinstance(vocab, (int, np.integer)) else vocab
    rng = np.random.default_rng(seed)
    return pool[rng.integers(0, len(pool), size=length)].tolist()


def prompt_lengths(lengths, new_tokens, max_positions, option="--prompt-len", new_option="--new-tokens"):
    """The prompt lengths to measure: the given ones, checked against the context (an error naming the options),
    or the defaults that fit (DEFAULT_PROMPT_LENS, else the longest prompt the context leaves room for)."""
    from ..base.errors import UsageError

    room = max_positions - new_tokens - 1
    if room < 1:
        raise UsageError(f"{new_option} {new_tokens} leaves no room for a prompt in the model's context of "
                          f"{max_positions} positions (ask for at most {max_positions - 2})")
    if lengths:
        too_long = [n for n in lengths if n > room]
        if too_long:
            raise UsageError(f"{option} {too_long[0]} + {new_option} {new_tokens} exceed the model's context of "
                              f"{max_positions} positions (give {option} {room} or less)")
        return list(lengths)
    return [n for n in DEFAULT_PROMPT_LENS if n <= room] or [room]


def _summary(prefill_ms, decode_tps):
    return {"prefill_ms": statistics.median(prefill_ms), "decode_tokens_per_s": statistics.median(decode_tps),
            "prefill_ms_runs": prefill_ms, "decode_tokens_per_s_runs": decode_tps}


def bench_backend(backend, prompt_lens=(128,), new_tokens=64, repeats=3, seed=0, warmup=True, vocab=None):
    """{prompt_len: {prefill_ms, decode_tokens_per_s, ...}} for batch 1, greedy, EOS ignored; prompts drawn
    from `vocab` (ordinary_ids of the bundle's tokenizer; default: the backend's vocabulary size)."""
    from ..base.progress import bar

    results = {}
    runs = bar(total=len(prompt_lens) * (repeats + bool(warmup)), desc=f"bench {getattr(backend, 'name', '')}",
               unit="run")
    for length in prompt_lens:
        prompt = random_prompt(length, backend.vocab_size if vocab is None else vocab, seed)
        if warmup:
            generate_ids(backend, [prompt], min(4, new_tokens), Sampler(), eos_ids=())
            runs.update(1)
        prefill, decode = [], []
        for _ in range(repeats):
            gen = generate_ids(backend, [prompt], new_tokens + 1, Sampler(), eos_ids=())
            prefill.append(gen.timing["prefill_s"] * 1000)
            decode.append(gen.timing["decode_tokens_per_s"])
            runs.set_postfix_str(f"prompt {length}, {decode[-1] or 0:.1f} tok/s", refresh=False)
            runs.update(1)
        results[length] = _summary(prefill, decode)
    runs.close()
    return results


def load_reference_model(folder, threads=None):
    import torch

    from ..base.modeling import load_reference

    if threads:
        torch.set_num_threads(threads)
    return load_reference(folder, "fp32")


def reference_greedy(model, prompt, new_tokens):
    """transformers eager: (prefill seconds, decode seconds, tokens, logits per step (new_tokens, V))."""
    import torch
    from transformers import DynamicCache

    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    logits_seen, tokens = [], []
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config),
                    use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1)
        t1 = time.perf_counter()
        for step in range(new_tokens):
            logits_seen.append(out.logits[0, -1].float().numpy())
            tokens.append(int(nxt[0]))
            if step == new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
            out = model(input_ids=nxt[:, None], attention_mask=mask, past_key_values=out.past_key_values,
                        use_cache=True)
            nxt = out.logits[:, -1].argmax(-1)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, tokens, np.stack(logits_seen)


def bench_reference(model, prompt_lens=(128,), new_tokens=64, repeats=3, seed=0, vocab=None):
    from ..base.progress import bar

    vocab = model.config.vocab_size if vocab is None else vocab
    results = {}
    runs = bar(total=len(prompt_lens) * (repeats + 1), desc="bench transformers", unit="run")
    for length in prompt_lens:
        prompt = random_prompt(length, vocab, seed)
        reference_greedy(model, prompt, min(4, new_tokens))  # warm-up
        runs.update(1)
        prefill, decode = [], []
        for _ in range(repeats):
            p, d, _, _ = reference_greedy(model, prompt, new_tokens + 1)
            prefill.append(p * 1000)
            decode.append(new_tokens / d)
            runs.set_postfix_str(f"prompt {length}, {decode[-1]:.1f} tok/s", refresh=False)
            runs.update(1)
        results[length] = _summary(prefill, decode)
    runs.close()
    return results


def teacher_forced_logits(backend, prompt, tokens):
    """Logits (len(tokens), V) of `backend` fed the prompt then `tokens` one by one."""
    ids = np.array([prompt], dtype=np.int64)
    mask = np.ones_like(ids)
    logits, kv = backend.prefill(ids, mask, np.arange(len(prompt), dtype=np.int64)[None])
    seen = [logits[0]]
    for tok in tokens[:-1]:
        mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
        logits, kv = backend.decode(np.array([[tok]], dtype=np.int64), mask, mask.sum(-1, keepdims=True) - 1, kv)
        seen.append(logits[0])
    return np.stack(seen)


def compare_logits(ours, ref):
    """Cosine (mean and min over steps), top-1 agreement, mean KL(ref || ours), max |diff|."""
    from ..base.agreement import logit_agreement

    result = logit_agreement(ours, ref)
    result["steps"] = result.pop("positions")
    return result


def fidelity(backend, reference, prompt_len=128, steps=64, seed=0):
    """Compare `backend` with `reference` (another Backend, e.g. TorchBackend W8A16) on the reference's
    greedy continuation of a random prompt, teacher-forced so both see the same tokens."""
    prompt = random_prompt(prompt_len, backend.vocab_size, seed)
    gen = generate_ids(reference, [prompt], steps, Sampler(), eos_ids=())
    ref_logits = teacher_forced_logits(reference, prompt, gen.tokens[0])
    ours = teacher_forced_logits(backend, prompt, gen.tokens[0])
    return compare_logits(ours, ref_logits)


def bench_bundle(bundle, backend_name="onnxruntime", prompt_lens=(128,), new_tokens=64, repeats=3,
                 threads=None, int8_accuracy="exact", reference=True, seed=0, io_binding=True, kv_in_place=True):
    """Everything `skywork-deploy bench` reports for one bundle, as a dict."""
    from .backend import physical_cores
    from .backends import make_backend

    threads = threads or physical_cores()
    prompt_lens = prompt_lengths(prompt_lens, new_tokens, bundle.spec.max_positions)
    vocab = bundle_vocab(bundle)
    engine = make_backend(backend_name, bundle, threads=threads, int8_accuracy=int8_accuracy,
                          io_binding=io_binding, kv_in_place=kv_in_place)
    ours = bench_backend(engine, prompt_lens, new_tokens, repeats, seed, vocab=vocab)
    report = {"backend": engine.describe(), "new_tokens": new_tokens, "prompt_ids": len(vocab), "repeats": repeats, "threads": threads,
              "rows": [], "reference": None}
    ref = None
    if reference:
        del engine  # free the sessions before loading a second copy of the weights
        try:
            model = load_reference_model(bundle.source_model(float_only=True), threads)
        except Exception as exc:  # the reference is optional: say why it is missing
            report["reference_error"] = str(exc).splitlines()[0]
        else:
            ref = bench_reference(model, prompt_lens, new_tokens, repeats, seed, vocab)
            report["reference"] = "transformers Qwen2ForCausalLM eager (fp32)"
    for length in prompt_lens:
        row = {"prompt_len": length, "prefill_ms": ours[length]["prefill_ms"],
               "decode_tokens_per_s": ours[length]["decode_tokens_per_s"], "runs": ours[length]}
        if ref:
            row["reference_prefill_ms"] = ref[length]["prefill_ms"]
            row["reference_decode_tokens_per_s"] = ref[length]["decode_tokens_per_s"]
            row["prefill_speedup"] = ref[length]["prefill_ms"] / ours[length]["prefill_ms"]
            row["decode_ratio"] = ours[length]["decode_tokens_per_s"] / ref[length]["decode_tokens_per_s"]
            row["reference_runs"] = ref[length]
        report["rows"].append(row)
    return report


def bundle_vocab(bundle):
    """ordinary_ids() of the bundle's own tokenizer (its vocabulary size alone when it has none)."""
    from .bundle import load_tokenizer

    try:
        return ordinary_ids(bundle.vocab_size, load_tokenizer(bundle))
    except Exception:  # no usable tokenizer files: ids below the vocabulary size and Qwen's specials
        return ordinary_ids(bundle.vocab_size)
