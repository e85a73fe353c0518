"""In-process log-likelihood of token sequences: what `serve`'s completions `echo` + `logprobs` return, from the
bundle directly (the reference the server's scores are checked against).

The graphs give the last position's logits only, so a sequence is scored as the server does it: prefill its
first token, then feed each next token through the decode graph (teacher forcing) and read the log-probability
the model gave it.
"""
from ..base.errors import InputError
from .bench import teacher_forced_logits
from .generate import token_logprobs


def score_ids(backend, ids, top=0):
    """[(token, logprob, [(id, logprob)] * top)] for ids[1:] given the tokens before each."""
    ids = [int(i) for i in ids]
    if not 2 <= len(ids) <= backend.max_positions:
        raise InputError(f"{len(ids)} tokens to score: give 2 to {backend.max_positions} (the model's context)")
    logits = teacher_forced_logits(backend, ids[:1], ids[1:])  # (len(ids) - 1, V)
    return [(token, *token_logprobs(row, token, top)) for row, token in zip(logits, ids[1:])]


def loglikelihood(backend, context, continuation):
    """(sum of the continuation's log-probs, whether each of its tokens was the greedy pick), as lm-eval scores."""
    scored = score_ids(backend, list(context) + list(continuation), top=1)[len(context) - 1:]
    return sum(lp for _, lp, _ in scored), all(top[0][0] == t for t, _, top in scored)
