"""One choice of a request inside the engine: its sampler, forced prompt tokens, stop strings and log-probs.

A row either replays its prompt (`forced`: completions' `echo` with `logprobs` scores every prompt token through
the decode graph, one per step, interleaved with the other rows) or generates. Each step it reads its logits
(V,) once: the log-probabilities it reports (`logprobs`) and the token it samples come from the same array.
"""
import collections
from dataclasses import dataclass, field

import numpy as np

from ..runtime.generate import Sampler, StreamDecoder, token_logprobs


@dataclass
class Params:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = None
    seed: int = None
    stop: list = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    min_tokens: int = 0
    logprobs: int = None  # None: off; k >= 0: each token's log-prob and the k most likely alternatives
    prompt_logprobs: bool = False  # score the prompt's tokens too (completions' echo + logprobs)


class Row:
    def __init__(self, request, index, tokenizer, eos):
        p = request.params
        seed = None if p.seed is None else p.seed + index
        self.request, self.index, self.eos = request, index, eos
        self.sampler = Sampler(p.temperature, p.top_p, seed, p.top_k)
        self.stream = StreamDecoder(tokenizer)
        self.tokens, self.text, self.sent = [], "", 0
        self.logprobs = []  # entries not yet sent: (token, logprob, [(id, logprob), ...])
        prompt = request.prompt_ids
        self.forced = collections.deque(prompt[1:] if p.prompt_logprobs else ())
        self.prefill_ids = prompt[:1] if p.prompt_logprobs else prompt
        self.done = False
        if p.prompt_logprobs and not self.forced:  # a one-token prompt: nothing to score, say so at once
            request.sink({"type": "prompt_logprobs", "index": index, "entries": []})

    def step(self, logits):
        """(V,) logits of this row's last position -> the token to feed next; reports what it generated."""
        p = self.request.params
        if self.forced:  # still replaying the prompt: score its next token, feed it
            token = self.forced.popleft()
            self._score(logits, token)
            if not self.forced:
                self.request.sink({"type": "prompt_logprobs", "index": self.index, "entries": self._take()})
                if p.max_tokens == 0:
                    self.finish("length")
            return token
        if p.max_tokens == 0:  # echo without scoring: nothing to generate
            self.finish("length")
            return 0
        if len(self.tokens) < p.min_tokens and not p.ignore_eos and self.eos:
            logits = logits.copy()
            logits[sorted(self.eos)] = -np.inf  # no EOS before min_tokens
        token = int(self.sampler(logits[None, :])[0])
        if p.logprobs is not None:
            self._score(logits, token)
        self.accept(token)
        return token

    def _score(self, logits, token):
        lp, top = token_logprobs(logits, token, self.request.params.logprobs or 0)
        self.logprobs.append((int(token), lp, top))

    def _take(self):
        entries, self.logprobs = self.logprobs, []
        return entries

    def accept(self, token):
        """Take a generated token: text out; the row finishes on EOS, a stop string or max_tokens."""
        p = self.request.params
        self.tokens.append(token)
        early = len(self.tokens) <= p.min_tokens  # neither EOS nor stop strings end a row before min_tokens
        if token in self.eos and not p.ignore_eos and not early:
            self.emit(self.stream.flush(), final=True)
            return self.finish("stop")
        if self.emit(self.stream.push(token), check=not early):
            return self.finish("stop")
        if len(self.tokens) >= p.max_tokens:
            self.emit(self.stream.flush(), final=True)
            self.finish("length")

    def emit(self, piece, final=False, check=True):
        """Add decoded text; send what cannot be the start of a stop string. True when a stop string hit."""
        self.text += piece
        stops = self.request.params.stop if check else ()
        hit = min((i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in stops) if i >= 0),
                  default=-1)
        if hit >= 0:
            self.text = self.text[:hit]
            final = True
        end = len(self.text) if final else len(self.text) - held(self.text, stops)
        if end > self.sent or (self.logprobs and final):
            self.request.sink({"type": "text", "index": self.index, "text": self.text[self.sent:end],
                               "logprobs": self._take()})
            self.sent = end
        return hit >= 0

    def finish(self, reason):
        self.done = True
        req = self.request
        req.sink({"type": "finish", "index": self.index, "reason": reason, "tokens": len(self.tokens),
                  "logprobs": self._take()})
        req.open_rows -= 1
        if req.open_rows == 0:
            req.sink({"type": "end", "prompt_tokens": len(req.prompt_ids)})


def held(text, stops):
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
