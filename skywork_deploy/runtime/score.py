"""In-process log-likelihood of token sequences: what `serve`'s completions `echo` + `logprobs` return, from the
bundle directly (the reference the server's scores are checked against).

The graphs give the last position's logits only, so a sequence is scored as the server does it: prefill its
first token, then feed each next token through the decode graph (teacher forcing) and read the log-probability
the model gave it.
"""
import numpy as np

from ..base.errors import InputError
from .generate import left_pad, token_logprobs


def score_ids(backend, ids, top=0):
    """[(token, logprob, [(id, logprob)] * top)] for ids[1:] given the tokens before each."""
    ids = [int(i) for i in ids]
    if len(ids) > backend.max_positions:
        raise InputError(f"{len(ids)} tokens to score but the model's context is {backend.max_positions}")
    x, mask, pos = left_pad([ids[:1]], 0, backend.bucket_for(1))
    logits, kv = backend.prefill(x, mask, pos)
    out = []
    for k, token in enumerate(ids[1:]):
        out.append((token, *token_logprobs(logits[0], token, top)))
        if k == len(ids) - 2:
            break
        mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)  # (1, W+1)
        logits, kv = backend.decode(np.array([[token]], dtype=np.int64), mask, mask.sum(-1, keepdims=True) - 1, kv)
    return out


def loglikelihood(backend, context, continuation):
    """(sum of the continuation's log-probs, whether each of its tokens was the greedy pick), as lm-eval scores."""
    scored = score_ids(backend, list(context) + list(continuation), top=1)[len(context) - 1:]
    return sum(lp for _, lp, _ in scored), all(top[0][0] == t for t, _, top in scored)
