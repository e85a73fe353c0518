"""The OpenAI-compatible HTTP API (FastAPI) over the batching engine.

`GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`, streamed as server-sent events
(sse-starlette) or not. Every error is an OpenAI-style body `{"error": {"message", "type", "param", "code"}}`:
400 for a request the server cannot run (bad JSON, a wrong field, an unknown model, max_tokens out of range,
a prompt the bundle cannot take), 401 without the API key, 413 for a body over the size limit, 429 when the
queue is full, 500 (message only, traceback in the server log) for anything else.
"""
import asyncio
import json
import logging
import secrets
import time
import uuid
from typing import Optional, Union

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse

from ..base.errors import DeployError
from ..runtime.generate import chat_template_ids
from .engine import Params, Request as EngineRequest, ServerBusyError

log = logging.getLogger(__name__)
MAX_N = 64  # choices per request; beyond the free batch rows they are admitted in turn


class ApiError(Exception):
    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1)  # -1 or 0: off, as vLLM takes it
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    n: int = Field(1, ge=1, le=MAX_N)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: Optional[StreamOptions] = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: Optional[Union[str, list[dict]]] = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: Union[str, list[int]]


def error_body(status, message, param=None, code=None, kind="invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def create_app(engine, model_name, tokenizer, max_positions, api_key=None, max_request_bytes=1 << 20):
    app = FastAPI(title="skywork-deploy serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def _api_error(request, exc):
        return error_body(exc.status, exc.message, exc.param, exc.code, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return error_body(400, f"the request body is not valid JSON ({first.get('msg', '')})", code="bad_json")
        return error_body(400, f"{where or 'body'}: {first.get('msg', 'invalid value')}", param=where or None)

    @app.exception_handler(Exception)
    async def _crash(request, exc):
        log.exception("request failed")
        return error_body(500, "internal server error (see the server log)", kind="server_error")

    @app.middleware("http")
    async def _guard(request, call_next):
        if api_key is not None:
            given = request.headers.get("authorization", "")
            token = given[7:].strip() if given.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(token.encode(), api_key.encode()):
                return error_body(401, "invalid or missing API key (send the header Authorization: Bearer KEY)",
                                  code="invalid_api_key")
        size = request.headers.get("content-length")
        if size is not None and not size.isdigit():
            return error_body(400, f"Content-Length {size[:40]!r} is not a number")
        if size is not None and int(size) > max_request_bytes:
            return error_body(413, f"the request body is over {max_request_bytes} bytes", code="too_large")
        return await call_next(request)

    app.add_middleware(BodyLimit, limit=max_request_bytes)  # bodies without Content-Length (chunked)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "skywork-deploy", "max_model_len": max_positions}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.stats()}

    def check_model(body):
        if body.model is not None and body.model != model_name:
            raise ApiError(400, f"model {body.model!r} is not served here (this server serves "
                           f"{model_name!r}; see GET /v1/models)", "model", "model_not_found")

    def params_for(body, n_prompt):
        room = max_positions - n_prompt
        if room < 1:
            raise ApiError(400, f"the prompt has {n_prompt} tokens but the model's context is {max_positions} "
                           "tokens (shorten the prompt)", "messages", "context_length_exceeded")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        key = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        if max_tokens is None:
            max_tokens = room
        if max_tokens < 1:
            raise ApiError(400, f"{key} {max_tokens}: must be at least 1", key)
        if max_tokens > room:
            raise ApiError(400, f"{key} {max_tokens} + the prompt's {n_prompt} tokens exceed the model's context "
                           f"of {max_positions} tokens (ask for at most {room})", key, "context_length_exceeded")
        try:
            engine.backend.bucket_for(n_prompt)
        except DeployError as exc:
            raise ApiError(400, str(exc), "messages", "context_length_exceeded") from None
        stop = [body.stop] if isinstance(body.stop, str) else [s for s in (body.stop or []) if s]
        return Params(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                      top_k=body.top_k if body.top_k and body.top_k > 0 else None, seed=body.seed,
                      stop=[s for s in stop if s], ignore_eos=body.ignore_eos, n=body.n)

    def chat_ids(messages):
        convo = []
        for m in messages:
            content = m.content
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
            convo.append({"role": m.role, "content": content or ""})
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "the model's tokenizer has no chat template (use /v1/completions)", "messages")
        try:
            return chat_template_ids(tokenizer, convo)
        except Exception as exc:  # the template raises jinja2 / ValueError for conversations it rejects
            raise ApiError(400, f"the chat template rejects these messages ({str(exc).splitlines()[0][:200]})",
                           "messages") from None

    def completion_ids(prompt):
        if isinstance(prompt, str):
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            bad = [i for i in prompt if not 0 <= i < engine.backend.vocab_size]
            if bad:
                raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary (0..."
                               f"{engine.backend.vocab_size - 1})", "prompt")
            ids = list(prompt)
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        return ids

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        check_model(body)
        ids = chat_ids(body.messages)
        return await run(body, ids, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body)
        return await run(body, completion_ids(body.prompt), chat=False)

    async def run(body, ids, chat):
        params = params_for(body, len(ids))
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()
        req = EngineRequest(ids, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        try:
            engine.submit(req)
        except ServerBusyError as exc:
            raise ApiError(429, str(exc), code="queue_full", kind="server_busy") from None
        shape = Shape(model_name, chat)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventSourceResponse(stream_events(engine, req, events, shape, params.n, usage), ping=15)
        try:
            return await collect(req, events, shape, params.n)
        finally:
            engine.cancel(req)  # no-op when finished; frees the rows if the handler was cancelled or failed

    return app


class BodyLimit:
    """ASGI middleware: read a POST body up to `limit` bytes (413 beyond), then hand it to the app.

    Later receive() calls go to the server's own, so a streaming response still sees the client disconnect.
    """

    def __init__(self, app, limit):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                response = error_body(413, f"the request body is over {self.limit} bytes", code="too_large")
                return await response(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


class Shape:
    """How one API (chat or completions) spells its bodies and chunks."""

    def __init__(self, model, chat):
        self.model, self.chat = model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def head(self, obj_suffix=""):
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + obj_suffix, "created": self.created, "model": self.model}

    def choice(self, index, text, reason, tokens=None, delta=False):
        c = {"index": index, "finish_reason": reason}
        if self.chat:
            c["delta" if delta else "message"] = {"content": text} if delta else {"role": "assistant", "content": text}
        else:
            c.update(text=text or "", logprobs=None)
        if tokens is not None:
            c["completion_tokens"] = tokens
        return c


def _usage(prompt, completion):
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def collect(req, events, shape, n):
    texts, reasons, tokens = [""] * n, [None] * n, [0] * n
    while True:
        ev = await events.get()
        if ev["type"] == "text":
            texts[ev["index"]] += ev["text"]
        elif ev["type"] == "finish":
            reasons[ev["index"]], tokens[ev["index"]] = ev["reason"], ev["tokens"]
        elif ev["type"] == "error":
            raise ApiError(500, ev["message"], kind="server_error")
        else:
            body = shape.head()
            body["choices"] = [shape.choice(i, texts[i], reasons[i], tokens[i]) for i in range(n)]
            body["usage"] = _usage(ev["prompt_tokens"], sum(tokens))
            return body


async def stream_events(engine, req, events, shape, n, include_usage):
    """SSE data lines; a client that goes away cancels the generator, and `finally` frees the request's rows."""
    tokens = [0] * n
    try:
        if shape.chat:  # the first chunk of each choice carries the role, as OpenAI's does
            yield json.dumps({**shape.head(".chunk"), "choices": [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None} for i in range(n)]})
        while True:
            ev = await events.get()
            if ev["type"] == "text":
                yield json.dumps({**shape.head(".chunk"),
                                  "choices": [shape.choice(ev["index"], ev["text"], None, delta=True)]})
            elif ev["type"] == "finish":
                tokens[ev["index"]] = ev["tokens"]
                yield json.dumps({**shape.head(".chunk"),
                                  "choices": [shape.choice(ev["index"], "", ev["reason"], delta=True)]})
            elif ev["type"] == "error":
                yield json.dumps({"error": {"message": ev["message"], "type": "server_error", "param": None,
                                            "code": None}})
                break
            else:
                if include_usage:
                    yield json.dumps({**shape.head(".chunk"), "choices": [],
                                      "usage": _usage(ev["prompt_tokens"], sum(tokens))})
                break
        yield "[DONE]"
    finally:
        engine.cancel(req)
