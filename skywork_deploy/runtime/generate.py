"""The generation loop every backend shares: prompts -> token ids -> prefill -> decode steps -> text.

Prompts are rendered with the bundle's chat template (Skywork-OR1 uses DeepSeek-R1's, which ends the
generation prompt with `<think>\\n`) unless `chat_template=False`. A batch is left-padded; position ids are
`cumsum(mask) - 1` clamped at 0, as the model and transformers' `generate` compute them. Greedy at
temperature 0, else seeded sampling with temperature, top-k and top-p (NumPy Generator). Rows stop at any EOS id
or at the token limit. Row 0's text is streamed through `on_text` as it becomes valid UTF-8.
"""
import time
from dataclasses import dataclass, field

import numpy as np

from ..base.errors import ConfigError, InputError, UsageError


GREEDY_BELOW = 1e-5  # temperatures under this are greedy (as vLLM does): logits / 1e-310 would overflow
SEED_MASK = (1 << 64) - 1  # any integer seed, negative or huge, maps onto NumPy's non-negative seeds


class Sampler:
    """Pick the next token of each row from (B, V) float32 logits.

    Greedy when temperature < GREEDY_BELOW, top_p == 0 or top_k == 1; any integer is a seed."""

    def __init__(self, temperature=0.0, top_p=1.0, seed=0, top_k=None):
        if not temperature >= 0:  # NaN too
            raise ConfigError(f"--temperature {temperature}: must be >= 0 (0 means greedy)")
        if not 0 <= top_p <= 1:
            raise ConfigError(f"--top-p {top_p}: must be in [0, 1] (0 means greedy)")
        if top_k is not None and top_k < 0:
            raise ConfigError(f"--top-k {top_k}: must be >= 0 (0 or none keeps every token)")
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.top_k = int(top_k) if top_k else None
        if self.temperature < GREEDY_BELOW or self.top_p == 0 or self.top_k == 1:
            self.temperature = 0.0
        self.rng = np.random.default_rng(None if seed is None else int(seed) & SEED_MASK)

    def __call__(self, logits):
        if self.temperature == 0:
            return logits.argmax(-1).astype(np.int64)
        return np.array([self._sample_row(row) for row in logits], dtype=np.int64)

    def _sample_row(self, logits):
        z = logits.astype(np.float64) / self.temperature
        if self.top_k and self.top_k < z.size:  # keep the k largest logits (ties at the k-th all kept)
            z = np.where(z >= np.partition(z, -self.top_k)[-self.top_k], z, -np.inf)
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if self.top_p < 1.0:
            order = self._nucleus_order(probs)
            sorted_p = probs[order]
            keep = (np.cumsum(sorted_p) - sorted_p) < self.top_p  # the smallest prefix reaching top_p
            ids, p = order[keep], sorted_p[keep]
        else:
            ids, p = np.arange(probs.size), probs
        cdf = np.cumsum(p)
        pick = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        return int(ids[min(pick, ids.size - 1)])

    def _nucleus_order(self, probs, k=1024):
        """Token ids by decreasing probability, covering at least top_p of the mass.

        Sorts only the k most likely tokens when they already hold top_p (the usual case for trained
        models); falls back to sorting the whole vocabulary otherwise.
        """
        if probs.size > k:
            top = np.argpartition(-probs, k)[:k]
            if probs[top].sum() >= self.top_p:
                return top[np.argsort(-probs[top], kind="stable")]
        return np.argsort(-probs, kind="stable")


def log_softmax(logits):
    """(V,) logits -> (V,) float64 log-probabilities."""
    z = logits.astype(np.float64)
    z -= z.max()
    return z - np.log(np.exp(z).sum())


def token_logprobs(logits, token, top=0):
    """(logprob of `token`, [(id, logprob)] of the `top` most likely tokens, best first) from (V,) logits."""
    lp = log_softmax(logits)
    if top <= 0:
        return float(lp[token]), []
    best = np.argpartition(-lp, top - 1)[:top] if top < lp.size else np.arange(lp.size)
    best = best[np.argsort(-lp[best], kind="stable")]
    return float(lp[token]), [(int(i), float(lp[i])) for i in best]


class StreamDecoder:
    """Incremental detokenization: text appears only once its bytes form whole UTF-8 characters.

    Decodes a short window of recent tokens and emits what it adds beyond the already-emitted prefix,
    holding back while the window ends in U+FFFD (an incomplete multi-byte character).
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids = []
        self.prefix = 0  # window start
        self.read = 0  # tokens whose text has been emitted

    def _text(self, start, end):
        return self.tok.decode(self.ids[start:end], skip_special_tokens=False,
                               clean_up_tokenization_spaces=False)

    def push(self, token_id):
        self.ids.append(int(token_id))
        done = self._text(self.prefix, self.read)
        full = self._text(self.prefix, len(self.ids))
        if len(full) > len(done) and not full.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return full[len(done):]
        return ""

    def flush(self):
        done = self._text(self.prefix, self.read)
        full = self._text(self.prefix, len(self.ids))
        self.prefix = self.read = len(self.ids)
        return full[len(done):]


def chat_template_ids(tokenizer, messages):
    """Token ids of `messages` ([{"role", "content"}, ...]) through the tokenizer's chat template, ending in the
    generation prompt. A template Jinja refuses (its sandbox, a syntax or render error) is the user's to fix, so
    it is one line naming the tokenizer folder."""
    import jinja2

    if not getattr(tokenizer, "chat_template", None):
        raise InputError("the bundle's tokenizer has no chat template (pass --no-chat-template)")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except jinja2.TemplateError as exc:
        where = getattr(tokenizer, "name_or_path", None) or "the bundle"
        raise InputError(f"{where}: the chat template failed ({type(exc).__name__}: {exc}); fix chat_template in "
                         "tokenizer_config.json (or chat_template.jinja), or pass --no-chat-template") from None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 may return an encoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def render_prompts(tokenizer, prompts, chat_template=True):
    """Each prompt -> token ids, through the chat template (with the generation prompt) or raw."""
    rows = []
    for text in prompts:
        if chat_template:
            ids = chat_template_ids(tokenizer, [{"role": "user", "content": text}])
        else:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InputError("empty prompt: nothing to generate from (give --prompt some text)")
        rows.append([int(i) for i in ids])
    return rows


def check_context(longest, max_new_tokens, max_positions, error=InputError, option="--max-new-tokens",
                  prompt="prompt"):
    """The longest prompt (tokens) plus `option` (new tokens) within the model's positions."""
    if max_new_tokens >= max_positions:
        raise error(f"{option} {max_new_tokens}: the model has {max_positions} positions "
                    "(max_position_embeddings), so at most that many tokens in all; lower it")
    if longest + max_new_tokens > max_positions:
        raise error(f"{prompt} ({longest} tokens) + {option} {max_new_tokens} exceeds the model's "
                    f"max_position_embeddings {max_positions} (shorten one of them)")


def precheck(tokenizer, prompts, max_new_tokens, max_positions, chat_template=True):
    """Before any backend loads (seconds for a real model): every prompt plus --max-new-tokens fits, else a usage
    error (exit 2). Returns the prompts' token ids."""
    rows = render_prompts(tokenizer, prompts, chat_template)
    check_context(max(len(r) for r in rows), max_new_tokens, max_positions, UsageError)
    return rows


def left_pad(rows, pad_id, length=None):
    """Token id rows -> (input_ids, attention_mask, position_ids), int64 (B, length), padded on the left."""
    length = length or max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    return ids, mask, positions(mask)


def positions(mask):
    return np.clip(np.cumsum(mask, axis=-1) - 1, 0, None).astype(np.int64)


@dataclass
class Generation:
    tokens: list  # new token ids per row (an EOS that stopped a row included)
    stop_reasons: list  # "eos" or "length" per row
    prompt_tokens: list
    timing: dict = field(default_factory=dict)


def generate_ids(backend, rows, max_new_tokens=64, sampler=None, eos_ids=(), pad_id=0, on_token=None):
    """Generate from token id rows. `on_token(step, ids (B,), active (B,))` sees every step's tokens;
    `active` marks the rows that had not stopped before this step."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    sampler = sampler or Sampler()
    longest = max(len(r) for r in rows)
    check_context(longest, max_new_tokens, backend.max_positions)
    ids, mask, pos = left_pad(rows, pad_id, backend.bucket_for(longest))
    eos = np.array(sorted(eos_ids), dtype=np.int64)
    b = len(rows)
    tokens, done = [[] for _ in range(b)], np.zeros(b, dtype=bool)
    t0 = time.perf_counter()
    logits, kv = backend.prefill(ids, mask, pos)
    t_prefill = time.perf_counter()
    t_first, steps = None, 0
    for step in range(max_new_tokens):
        active = ~done
        nxt = np.where(done, pad_id, sampler(logits))
        for i in np.flatnonzero(active):
            tokens[i].append(int(nxt[i]))
        done |= np.isin(nxt, eos)
        if on_token is not None:
            on_token(step, nxt, active)
        if t_first is None:
            t_first = time.perf_counter()
        if done.all() or step == max_new_tokens - 1:
            break
        mask = np.concatenate([mask, np.ones((b, 1), dtype=np.int64)], axis=1)
        logits, kv = backend.decode(nxt[:, None], mask, mask.sum(-1, keepdims=True) - 1, kv)
        steps += 1
    t_end = time.perf_counter()
    real = int(sum(len(r) for r in rows))
    decode_s = t_end - t_first
    timing = {
        "time_to_first_token_s": t_first - t0, "prefill_s": t_prefill - t0, "prefill_tokens": real,
        "prefill_padded_length": int(ids.shape[1]),
        "prefill_tokens_per_s": real / max(t_prefill - t0, 1e-9),
        "decode_steps": steps, "decode_s": decode_s,
        "decode_tokens_per_s": (steps * b / decode_s) if steps else None, "batch_size": b,
    }
    reasons = ["eos" if tokens[i] and tokens[i][-1] in set(eos.tolist()) else "length" for i in range(b)]
    return Generation(tokens, reasons, [len(r) for r in rows], timing)


def generate_text(backend, tokenizer, prompts, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=0,
                  chat_template=True, eos_ids=None, pad_id=None, on_text=None):
    """Prompts -> dict with per-row text and tokens, stop reasons and timing; row 0 streamed to `on_text`."""
    bundle = backend.bundle
    eos_ids = bundle.eos_ids(tokenizer) if eos_ids is None else eos_ids
    pad_id = bundle.pad_id(tokenizer) if pad_id is None else pad_id
    rows = render_prompts(tokenizer, prompts, chat_template)
    stream = StreamDecoder(tokenizer)
    eos_set = set(eos_ids)

    def on_token(step, nxt, active):
        if on_text is not None and active[0] and int(nxt[0]) not in eos_set:
            piece = stream.push(int(nxt[0]))
            if piece:
                on_text(piece)

    result = generate_ids(backend, rows, max_new_tokens, Sampler(temperature, top_p, seed), eos_ids, pad_id,
                          on_token)
    if on_text is not None:
        tail = stream.flush()
        if tail:
            on_text(tail)
    outputs = []
    for toks, reason, n_prompt in zip(result.tokens, result.stop_reasons, result.prompt_tokens):
        body = toks[:-1] if reason == "eos" else toks
        outputs.append({"text": tokenizer.decode(body, skip_special_tokens=False,
                                                 clean_up_tokenization_spaces=False),
                        "tokens": toks, "prompt_tokens": n_prompt, "new_tokens": len(toks), "stop_reason": reason})
    return {"outputs": outputs, "timing": result.timing, "backend": backend.describe(),
            "sampling": {"temperature": temperature, "top_p": top_p, "seed": seed, "chat_template": chat_template}}
