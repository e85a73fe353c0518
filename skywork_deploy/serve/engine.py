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

Fairness: requests are checked and tokenized before they reach the engine (app.py, on worker threads). A prefill
of more than `prefill_inline_tokens` (padded) tokens while rows are decoding runs on its own thread
(`BackgroundPrefill`; ONNX Runtime sessions run concurrently) and the batch keeps decoding until it joins: a long
prompt costs the running streams the CPU it shares, not its whole prefill as one stall. (The decode graph takes
one token per row, so a vLLM-style chunked prefill is not possible with these graphs; with one session at a time,
the memory policy of big models, the prefill runs inline.)

Results go back through each request's `sink(event)`, called on the engine thread:
`{"type": "text", "index": i, "text": piece, "logprobs": [(token, logprob, top)]}`, `{"type": "prompt_logprobs",
"index": i, "entries": [...]}` (echo with logprobs: the prompt's tokens after the first), `{"type": "finish",
"index": i, "reason": "stop"|"length", "tokens": n, "logprobs": [...]}`, `{"type": "end", "prompt_tokens": n}`
(all choices done) or `{"type": "error", "message": m, "status": 400|500|503}`. Whatever one request carries
(parameters the sampler refuses, ids outside the vocabulary, a failing step of its own) fails that request
alone (`Request.fail`); only a failing graph run fails the batch it ran.
"""
import collections
import logging
import threading

import numpy as np

from ..base.errors import DeployError
from ..runtime.generate import left_pad
from .rows import Params, Row

log = logging.getLogger(__name__)
__all__ = ["Engine", "Params", "Request", "ServerBusyError"]
PREFILL_INLINE_TOKENS = 512  # a larger prefill (padded tokens) runs beside the running batch's decode steps


class ServerBusyError(DeployError):
    """The engine's queue is full (the server answers 429)."""


class Request:
    def __init__(self, prompt_ids, params, sink):
        self.prompt_ids, self.params, self.sink = list(prompt_ids), params, sink
        self.cancelled = False
        self.failed = False
        self.open_rows = params.n
        self.admitted = 0  # choices given a batch row so far (n may exceed the free rows: admitted in parts)

    def fail(self, message, status=500):
        """End the request with an error event (once); its rows are dropped at the next step."""
        if not self.failed:
            self.failed = self.cancelled = True
            self.sink({"type": "error", "message": message, "status": status})


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
        self.prefilling = None  # a BackgroundPrefill while a long prompt is prefilled beside the decode steps
        self.prefill_inline_tokens = PREFILL_INLINE_TOKENS
        self.background_prefills = 0
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
            return {"running": len(self.rows), "waiting": len(self.waiting), "decode_steps": self.steps,
                    "prefilling": len(self.prefilling.rows) if self.prefilling else 0,
                    "background_prefills": self.background_prefills}

    def idle(self):
        with self.cond:
            return not self.rows and not self.waiting and self.prefilling is None

    def abort_all(self, message, status=503):
        """End every running and waiting request with an error event (the drain's last step)."""
        with self.cond:
            rows = self.rows + (self.prefilling.rows if self.prefilling else [])
            requests = {id(r.request): r.request for r in rows}
            requests.update((id(r), r) for r in self.waiting)
            self.waiting.clear()
            self.cond.notify_all()
        for req in requests.values():
            req.fail(message, status)

    # -- the engine thread -------------------------------------------------------------------------------
    def _loop(self):
        while True:
            with self.cond:
                while not self.stopping and self._nothing_to_do():
                    self.cond.wait()
                if self.stopping:
                    return
                new = self._take() if self.prefilling is None else []
            try:
                if self.prefilling is not None and self.prefilling.done.is_set():
                    self._join_prefill()
                if new:
                    self._admit(new)
                self._drop_finished()
                if self.rows:
                    self._decode()
                    self._drop_finished()
            except Exception as exc:  # a failing graph run must not kill the server: fail the batch, go on
                log.exception("engine step failed")
                message = f"generation failed: {_first_line(exc)}"
                for req in {id(r.request): r.request for r in self.rows}.values():
                    req.fail(message)
                for req, _ in new:
                    req.fail(message)
                self.rows, self.mask, self.kv, self.pending = [], None, None, None

    def _nothing_to_do(self):
        """(lock held) No row to decode, and no prefill result or waiting request to take up."""
        if self.rows:
            return False
        if self.prefilling is not None:
            return not self.prefilling.done.is_set()
        return not self.waiting

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

    def _rows_for(self, taken):
        """Rows of the requests taken; a request whose rows cannot be built (bad parameters, ids outside the
        vocabulary or the context) fails alone."""
        rows = []
        for req, indices in taken:
            try:
                self._check_prompt(req)
                rows += [Row(req, i, self.tokenizer, self.eos) for i in indices]
            except Exception as exc:  # whatever a request carries, it fails only itself
                log.warning("request refused by the engine: %s", _first_line(exc))
                req.fail(f"the request cannot run: {_first_line(exc)}", 400)
        return rows

    def _check_prompt(self, req):
        ids, vocab = req.prompt_ids, self.backend.vocab_size
        if not ids or not all(isinstance(i, int) and 0 <= i < vocab for i in ids):
            raise DeployError(f"prompt token ids must be integers in 0...{vocab - 1}")
        p = req.params
        if len(ids) + p.max_tokens > self.backend.max_positions:
            raise DeployError(f"prompt + max_tokens exceed the model's context of {self.backend.max_positions}")
        self.backend.bucket_for(len(ids))

    def _admit(self, taken):
        rows = self._rows_for(taken)
        if not rows:
            return
        prompts = [r.prefill_ids for r in rows]
        longest = max(len(p) for p in prompts)
        ids, mask, pos = left_pad(prompts, self.pad_id, self.backend.bucket_for(longest))
        if self.rows and ids.size > self.prefill_inline_tokens and not getattr(self.backend, "one_session", False):
            self.prefilling = BackgroundPrefill(self.backend, rows, ids, mask, pos, self._wake)
            self.background_prefills += 1
            return  # the running rows keep decoding; the new ones join when their prefill is done
        logits, kv = self.backend.prefill(ids, mask, pos)
        self._join(rows, logits, kv, mask)

    def _wake(self):
        with self.cond:
            self.cond.notify_all()

    def _join_prefill(self):
        job, self.prefilling = self.prefilling, None
        if job.error is not None:  # fails the requests it prefilled, not the running batch
            log.error("prefill failed: %s", _first_line(job.error))
            for row in job.rows:
                row.request.fail(f"generation failed: {_first_line(job.error)}")
            return
        self._join(job.rows, *job.result, job.mask)

    def _join(self, rows, logits, kv, mask):
        """New rows' prefill results (logits (N, V), K/V, mask (N, S)) joined to the running batch."""
        first = self._steps(rows, logits)
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

    def _decode(self):
        b = len(self.rows)
        self.mask = np.concatenate([self.mask, np.ones((b, 1), dtype=np.int64)], axis=1)  # (B, W+1)
        logits, self.kv = self.backend.decode(self.pending[:, None], self.mask,
                                              self.mask.sum(-1, keepdims=True) - 1, self.kv)
        self.steps += 1
        self.pending = self._steps(self.rows, logits)

    def _steps(self, rows, logits):
        """Each live row's next token from its logits (B, V); a row that fails ends its own request only."""
        nxt = np.full(len(rows), self.pad_id, dtype=np.int64)
        for i, row in enumerate(rows):
            if row.done or row.request.cancelled:
                row.done = True
                continue
            try:
                nxt[i] = row.step(logits[i])
            except Exception as exc:  # whatever a request carries, it fails only itself
                log.exception("a request failed in the engine")
                row.request.fail(f"generation failed: {_first_line(exc)}")
                row.done = True
        return nxt

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


class BackgroundPrefill:
    """A prefill on its own thread (ONNX Runtime sessions run concurrently): the engine keeps decoding the running
    rows meanwhile, so a long prompt delays them by the CPU it shares, not by its whole prefill."""

    def __init__(self, backend, rows, ids, mask, pos, on_done):
        self.rows, self.mask, self.result, self.error = rows, mask, None, None
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(backend, ids, mask, pos, on_done), daemon=True,
                         name="skywork-deploy-prefill").start()

    def _run(self, backend, ids, mask, pos, on_done):
        try:
            self.result = backend.prefill(ids, mask, pos)
        except Exception as exc:  # handed to the engine thread, which fails these requests only
            self.error = exc
        finally:
            self.done.set()
            on_done()


def _first_line(exc):
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__


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
