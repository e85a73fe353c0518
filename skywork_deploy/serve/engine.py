"""Continuous batching over the ONNX Runtime backend: every running request shares each decode graph run.

One engine thread owns the backend. Between two decode steps it admits waiting requests: their prompts are
prefilled together (left-padded, as `run` does with several prompts), and their K/V rows are joined to the
running batch. Rows of a batch all end at the same position, so joining is left padding the shorter side:

    running K/V (B, KVH, W, D), mask (B, W)  +  new K/V (N, KVH, S, D), mask (N, S)
      -> both left-padded with zeros to max(W, S) -> concatenated: (B+N, KVH, max(W, S), D)

Padded positions have mask 0, so attention never sees them and each row's position ids (`cumsum(mask) - 1`)
are unchanged: a row computes what it would compute alone, up to floating-point summation order. A finished
or cancelled row is dropped (its K/V rows sliced out) and columns that no remaining row uses are trimmed.
Each decode step then feeds every row's last token in one (B, 1) graph run. Joining and dropping copy the
cache; steady decoding appends to the backend's in-place K/V buffers.

Results go back through each request's `sink(event)`, called on the engine thread:
`{"type": "text", "index": i, "text": piece}`, `{"type": "finish", "index": i, "reason": "stop"|"length",
"tokens": n}`, `{"type": "end", "prompt_tokens": n}` (all choices done) or `{"type": "error", "message": m}`.
"""
import collections
import logging
import threading
from dataclasses import dataclass, field

import numpy as np

from ..base.errors import DeployError
from ..runtime.generate import Sampler, StreamDecoder, left_pad

log = logging.getLogger(__name__)


class ServerBusyError(DeployError):
    """The engine's queue is full (the server answers 429)."""


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


class Request:
    def __init__(self, prompt_ids, params, sink):
        self.prompt_ids, self.params, self.sink = list(prompt_ids), params, sink
        self.cancelled = False
        self.open_rows = params.n
        self.admitted = 0  # choices given a batch row so far (n may exceed the free rows: admitted in parts)


class Row:
    """One choice of a request: its sampler, tokens, incremental text and stop-string hold-back."""

    def __init__(self, request, index, tokenizer):
        p = request.params
        seed = None if p.seed is None else p.seed + index
        self.request, self.index = request, index
        self.sampler = Sampler(p.temperature, p.top_p, seed, p.top_k)
        self.stream = StreamDecoder(tokenizer)
        self.tokens, self.text, self.sent = [], "", 0
        self.done = False

    def emit(self, piece, final=False):
        """Add decoded text; send what cannot be the start of a stop string. True when a stop string hit."""
        self.text += piece
        stops = self.request.params.stop
        hit = min((i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in stops) if i >= 0),
                  default=-1)
        if hit >= 0:
            self.text = self.text[:hit]
            final = True
        end = len(self.text) if final else len(self.text) - _held(self.text, stops)
        if end > self.sent:
            self.request.sink({"type": "text", "index": self.index, "text": self.text[self.sent:end]})
            self.sent = end
        return hit >= 0


def _held(text, stops):
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class Engine:
    def __init__(self, backend, tokenizer, eos_ids, pad_id, max_batch=8, max_queue=64):
        self.backend, self.tokenizer = backend, tokenizer
        self.eos = set(int(i) for i in eos_ids)
        self.pad_id = int(pad_id)
        self.max_batch, self.max_queue = int(max_batch), int(max_queue)
        self.waiting = collections.deque()
        self.rows, self.mask, self.kv, self.pending = [], None, None, None
        self.cond = threading.Condition()
        self.stopping = False
        self.steps = 0  # decode graph runs (a step of B rows counts once)
        self.thread = threading.Thread(target=self._loop, name="skywork-deploy-engine", daemon=True)

    # -- the request side (any thread) -------------------------------------------------------------------
    def start(self):
        self.thread.start()
        return self

    def stop(self):
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout=30)

    def submit(self, request):
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise ServerBusyError(f"{len(self.waiting)} requests are already waiting (the queue holds "
                                      f"{self.max_queue}); retry later")
            self.waiting.append(request)
            self.cond.notify_all()

    def cancel(self, request):
        request.cancelled = True
        with self.cond:
            self.cond.notify_all()

    def stats(self):
        with self.cond:
            return {"running": len(self.rows), "waiting": len(self.waiting), "decode_steps": self.steps}

    # -- the engine thread -------------------------------------------------------------------------------
    def _loop(self):
        while True:
            with self.cond:
                while not self.stopping and not self.rows and not self.waiting:
                    self.cond.wait()
                if self.stopping:
                    return
                new = self._take()
            try:
                if new:
                    self._admit(new)
                self._drop_finished()
                if self.rows:
                    self._decode()
                    self._drop_finished()
            except Exception as exc:  # a failing graph run must not kill the server: fail the batch, go on
                log.exception("engine step failed")
                message = f"generation failed: {str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}"
                for req in {id(r.request): r.request for r in self.rows}.values():
                    req.sink({"type": "error", "message": message})
                for req, _ in new:
                    req.sink({"type": "error", "message": message})
                self.rows, self.mask, self.kv, self.pending = [], None, None, None

    def _take(self):
        """[(request, choice indices)] for the free batch rows, in arrival order (called with the lock held)."""
        taken, free = [], self.max_batch - len(self.rows)
        while self.waiting and free > 0:
            req = self.waiting[0]
            if req.cancelled:
                self.waiting.popleft()
                continue
            k = min(free, req.params.n - req.admitted)
            taken.append((req, range(req.admitted, req.admitted + k)))
            req.admitted += k
            free -= k
            if req.admitted == req.params.n:
                self.waiting.popleft()
        return taken

    def _admit(self, taken):
        rows = [Row(req, i, self.tokenizer) for req, indices in taken for i in indices]
        prompts = [r.request.prompt_ids for r in rows]
        longest = max(len(p) for p in prompts)
        ids, mask, pos = left_pad(prompts, self.pad_id, self.backend.bucket_for(longest))
        logits, kv = self.backend.prefill(ids, mask, pos)
        first = np.array([row.sampler(logits[i:i + 1])[0] for i, row in enumerate(rows)], dtype=np.int64)
        new_kv = kv_arrays(kv)
        if self.rows:
            width = max(self.mask.shape[1], mask.shape[1])
            old = kv_arrays(self.kv)
            self.kv = to_kv(self.backend, [np.concatenate([_pad_left(a, width, 2), _pad_left(b, width, 2)])
                                           for a, b in zip(old, new_kv)])
            self.mask = np.concatenate([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
            self.pending = np.concatenate([self.pending, first])
        else:
            self.kv, self.mask, self.pending = kv, mask, first
        self.rows += rows
        for row, token in zip(rows, first):
            self._accept(row, int(token))

    def _decode(self):
        b = len(self.rows)
        self.mask = np.concatenate([self.mask, np.ones((b, 1), dtype=np.int64)], axis=1)  # (B, W+1)
        logits, self.kv = self.backend.decode(self.pending[:, None], self.mask,
                                              self.mask.sum(-1, keepdims=True) - 1, self.kv)
        self.steps += 1
        greedy = logits.argmax(-1)
        nxt = np.array([greedy[i] if row.sampler.temperature == 0 else row.sampler(logits[i:i + 1])[0]
                        for i, row in enumerate(self.rows)], dtype=np.int64)
        self.pending = nxt
        for row, token in zip(self.rows, nxt):
            if not row.done:
                self._accept(row, int(token))

    def _accept(self, row, token):
        """Take a row's next token: text out, and the row finished on EOS, a stop string or max_tokens."""
        p = row.request.params
        if row.request.cancelled:
            row.done = True
            return
        row.tokens.append(token)
        if token in self.eos and not p.ignore_eos:
            row.emit(row.stream.flush(), final=True)
            return self._finish(row, "stop")
        if row.emit(row.stream.push(token)):
            return self._finish(row, "stop")
        if len(row.tokens) >= p.max_tokens:
            row.emit(row.stream.flush(), final=True)
            self._finish(row, "length")

    def _finish(self, row, reason):
        row.done = True
        req = row.request
        req.sink({"type": "finish", "index": row.index, "reason": reason, "tokens": len(row.tokens)})
        req.open_rows -= 1
        if req.open_rows == 0:
            req.sink({"type": "end", "prompt_tokens": len(req.prompt_ids)})

    def _drop_finished(self):
        for row in self.rows:
            row.done = row.done or row.request.cancelled
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.mask, self.kv, self.pending = [], None, None, None
            return
        mask = self.mask[keep]
        start = int(np.argmax(mask.any(axis=0)))  # leading columns no remaining row uses
        self.kv = to_kv(self.backend, [np.ascontiguousarray(a[keep][:, :, start:]) for a in kv_arrays(self.kv)])
        self.mask, self.pending = np.ascontiguousarray(mask[:, start:]), self.pending[keep]
        self.rows = [self.rows[i] for i in keep]


def _pad_left(a, width, axis):
    """Zero-pad `a` on the left of `axis` to `width` (mask (B, W) on axis 1, K/V (B, KVH, W, D) on axis 2)."""
    extra = width - a.shape[axis]
    if extra == 0:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (extra, 0)
    return np.pad(a, pad)


def kv_arrays(kv):
    """The backend's cache (in-place buffers, OrtValues or arrays) -> NumPy arrays (B, KVH, T, D) per layer."""
    if hasattr(kv, "arrays") and hasattr(kv, "length"):  # ort_backend.KVBuffers: the filled part only
        return [a[:, :, :kv.length] for a in kv.arrays]
    return [p.numpy() if hasattr(p, "numpy") else np.asarray(p) for p in kv]


def to_kv(backend, arrays):
    """NumPy K/V arrays -> what the backend's decode takes back (it wraps arrays itself when in place)."""
    if getattr(backend, "kv_in_place", False) or not getattr(backend, "io_binding", False):
        return arrays
    import onnxruntime as ort

    return [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in arrays]
