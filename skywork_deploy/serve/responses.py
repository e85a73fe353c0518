"""OpenAI response bodies and server-sent chunks from the engine's events (chat and completions).

A `Job` is one HTTP request: one engine request per prompt (completions take several), their events on one
asyncio queue as (prompt number, event); choice `k * n + i` is choice i of prompt k. Log-probs come in OpenAI's
two shapes: chat `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`, completions `{"tokens",
"token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`; with `echo` the prompt's tokens come first
(the first one has no log-prob: null).
"""
import asyncio
import json
import time
import uuid

from .protocol import ApiError

RETRY_AFTER_S = 5


class Job:
    def __init__(self, model, chat, n, token_text, top=None, echo=False):
        self.model, self.chat, self.n, self.tt, self.top, self.echo = model, chat, n, token_text, top, echo
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.events = asyncio.Queue()
        self.requests, self.prompts = [], []  # engine requests; (text, ids) per prompt

    def sink_for(self, loop, k):
        """The engine-thread callback of prompt k: events onto this job's queue, on the server's event loop."""
        def sink(ev):
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, (k, ev))
            except RuntimeError:  # the event loop is closed (the server stopped): no one is left to tell
                pass

        return sink

    def head(self, suffix=""):
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + suffix, "created": self.created, "model": self.model}

    # -- log-probs ---------------------------------------------------------------------------------------
    def chat_logprobs(self, entries):
        def one(token, lp):
            return {"token": self.tt.text(token), "logprob": lp, "bytes": self.tt.bytes(token)}

        return {"content": [{**one(t, lp), "top_logprobs": [one(i, v) for i, v in top]} for t, lp, top in entries]}

    def completion_logprobs(self, entries, offset, first_null=False):
        """(logprobs part, the text offset after it); entries: (token, logprob or None, top or None)."""
        part = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for k, (token, lp, top) in enumerate(entries):
            text = self.tt.text(token)
            part["tokens"].append(text)
            part["token_logprobs"].append(None if first_null and k == 0 else lp)
            part["top_logprobs"].append(None if first_null and k == 0 else {self.tt.text(i): v for i, v in top})
            part["text_offset"].append(offset)
            offset += len(text)
        return part, offset

    def echo_part(self, k, scored):
        """The prompt's text and (with logprobs) its log-probs: the first token null, the rest scored."""
        text, ids = self.prompts[k]
        if self.top is None:
            return text, None
        entries = [(ids[0], None, None)] + list(scored)
        return text, self.completion_logprobs(entries, 0, first_null=True)[0]


def _usage(prompt, completion):
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _merge(a, b):
    return {key: a[key] + b[key] for key in a} if a else b


def error_from(ev):
    status = ev.get("status", 500)
    kind = {400: "invalid_request_error", 503: "server_unavailable"}.get(status, "server_error")
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return ApiError(status, ev["message"], kind=kind, headers=headers)


async def collect(job):
    """The whole response body of a non-streamed request."""
    total = len(job.requests) * job.n
    texts, reasons, tokens = [""] * total, [None] * total, [0] * total
    entries, scored = [[] for _ in range(total)], [[] for _ in range(total)]
    ended, prompt_tokens = 0, 0
    while ended < len(job.requests):
        k, ev = await job.events.get()
        if ev["type"] == "error":
            raise error_from(ev)
        if ev["type"] == "end":
            ended, prompt_tokens = ended + 1, prompt_tokens + ev["prompt_tokens"]
            continue
        c = k * job.n + ev["index"]
        if ev["type"] == "prompt_logprobs":
            scored[c] = ev["entries"]
            continue
        entries[c] += ev.get("logprobs") or []
        if ev["type"] == "text":
            texts[c] += ev["text"]
        elif ev["type"] == "finish":
            reasons[c], tokens[c] = ev["reason"], ev["tokens"]
    choices = [_choice(job, c, texts[c], reasons[c], tokens[c], entries[c], scored[c]) for c in range(total)]
    return {**job.head(), "choices": choices, "usage": _usage(prompt_tokens, sum(tokens))}


def _choice(job, c, text, reason, tokens, entries, scored):
    out = {"index": c, "finish_reason": reason, "completion_tokens": tokens}
    if job.chat:
        out["message"] = {"role": "assistant", "content": text}
        out["logprobs"] = job.chat_logprobs(entries) if job.top is not None else None
        return out
    logprobs, offset = None, 0
    if job.echo:
        prompt_text, logprobs = job.echo_part(c // job.n, scored)
        text, offset = prompt_text + text, len(prompt_text)
    if job.top is not None:
        logprobs = _merge(logprobs, job.completion_logprobs(entries, offset)[0])
    return {**out, "text": text, "logprobs": logprobs}


async def stream_events(job, engine, include_usage):
    """SSE data lines; a client that goes away cancels the generator, and `finally` frees the requests' rows.

    An error (a failed step, the drain's deadline) ends the stream with an OpenAI error object, then `[DONE]`."""
    total = len(job.requests) * job.n
    tokens, offsets, ended, prompt_tokens = [0] * total, [0] * total, 0, 0
    try:
        if job.chat:  # the first chunk of each choice carries the role, as OpenAI's does
            yield json.dumps({**job.head(".chunk"), "choices": [
                {"index": c, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for c in range(total)]})
        elif job.echo and job.top is None:
            for c in range(total):
                text = job.prompts[c // job.n][0]
                offsets[c] = len(text)
                yield json.dumps({**job.head(), "choices": [_chunk(job, c, text, None, None)]})
        while ended < len(job.requests):
            k, ev = await job.events.get()
            if ev["type"] == "error":
                err = error_from(ev)
                yield json.dumps({"error": {"message": err.message, "type": err.kind, "param": None,
                                            "code": err.status}})
                break
            if ev["type"] == "end":
                ended, prompt_tokens = ended + 1, prompt_tokens + ev["prompt_tokens"]
                continue
            c = k * job.n + ev["index"]
            if ev["type"] == "prompt_logprobs":  # echo + logprobs: the prompt and its scores come first
                text, logprobs = job.echo_part(k, ev["entries"])
                offsets[c] = len(text)
                yield json.dumps({**job.head(), "choices": [_chunk(job, c, text, None, logprobs)]})
                continue
            logprobs = None
            if job.top is not None:
                if job.chat:
                    logprobs = job.chat_logprobs(ev.get("logprobs") or [])
                else:
                    logprobs, offsets[c] = job.completion_logprobs(ev.get("logprobs") or [], offsets[c])
            reason = ev["reason"] if ev["type"] == "finish" else None
            if ev["type"] == "finish":
                tokens[c] = ev["tokens"]
            yield json.dumps({**job.head(".chunk" if job.chat else ""),
                              "choices": [_chunk(job, c, ev.get("text", ""), reason, logprobs)]})
        else:
            if include_usage:
                yield json.dumps({**job.head(".chunk" if job.chat else ""), "choices": [],
                                  "usage": _usage(prompt_tokens, sum(tokens))})
        yield "[DONE]"
    finally:
        for req in job.requests:
            engine.cancel(req)


def _chunk(job, c, text, reason, logprobs):
    if job.chat:
        return {"index": c, "delta": {"content": text} if text or reason is None else {}, "logprobs": logprobs,
                "finish_reason": reason}
    return {"index": c, "text": text, "logprobs": logprobs, "finish_reason": reason}
