"""The OpenAI-compatible HTTP API (FastAPI) over the batching engine.

`GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`, `POST /v1/completions`, streamed as
server-sent events (sse-starlette) or not; `GET /health`. Every error, whatever its status, is OpenAI's error
object `{"error": {"message", "type", "param", "code"}}`: 400 for a request the server cannot run (bad JSON, a
wrong or unsupported field, a prompt the bundle cannot take, a malformed header), 401 without the API key, 404
for an unknown model (`model_not_found`) or path, 405, 413 for a body over the size limit, 429 when the queue is
full and 503 while draining (both with `Retry-After`), 500 (message only, traceback in the server log).

Requests are checked completely (protocol.py) and tokenized on worker threads before they reach the engine: the
event loop and the engine thread never run one request's per-request CPU work.
"""
import asyncio
import logging
import secrets

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException

from .engine import Request as EngineRequest, ServerBusyError
from .protocol import MAX_N, ApiError, ChatRequest, CompletionRequest, message_texts, params_for, prompt_list
from .responses import RETRY_AFTER_S, Job, collect, stream_events
from .tokens import TokenText, chat_ids, prompt_ids

log = logging.getLogger(__name__)
MAX_CONTENT_LENGTH_DIGITS = 15


def error_body(status, message, param=None, code=None, kind="invalid_request_error", headers=None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                        headers=headers)


def _where(loc):
    """pydantic's error location -> `messages[0].content`: field names and indices, not union member tags."""
    out = ""
    for part in loc:
        if part == "body" or (isinstance(part, str) and ("[" in part or part in _TAGS)):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before"}


def create_app(engine, model_name, tokenizer, max_positions, api_key=None, max_request_bytes=1 << 20):
    app = FastAPI(title="skywork-deploy serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.draining, app.state.model_name = engine, False, model_name
    model_card = {"id": model_name, "object": "model", "created": 0, "owned_by": "skywork-deploy",
                  "max_model_len": max_positions, "vocab_size": engine.backend.vocab_size}
    token_text = TokenText(tokenizer)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc):
        return error_body(exc.status, exc.message, exc.param, exc.code, exc.kind, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error_body(400, f"the request body is not valid JSON ({first.get('msg', '')})", code="bad_json")
        where = _where(first.get("loc", ()))
        return error_body(400, f"{where or 'body'}: {first.get('msg', 'invalid value')}", param=where or None)

    @app.exception_handler(HTTPException)
    async def _http(request, exc):
        kinds = {404: ("not_found", "invalid_request_error"), 405: ("method_not_allowed", "invalid_request_error")}
        code, kind = kinds.get(exc.status_code, (None, "server_error" if exc.status_code >= 500 else
                                                 "invalid_request_error"))
        return error_body(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code,
                          kind=kind, headers=getattr(exc, "headers", None))

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
        if app.state.draining and request.method == "POST":
            return error_body(503, "the server is shutting down (retry on another replica or later)",
                              code="draining", kind="server_unavailable",
                              headers={"Retry-After": str(RETRY_AFTER_S)})
        return await call_next(request)

    app.add_middleware(BodyLimit, limit=max_request_bytes)  # bodies without Content-Length (chunked)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model(model_id)
        return model_card

    @app.get("/health")
    async def health():
        body = {"status": "draining" if app.state.draining else "ok", **engine.stats()}
        return JSONResponse(body, 503 if app.state.draining else 200)

    def check_model(name):
        if name is not None and name != model_name:
            raise ApiError(404, f"model {name!r} is not served here (this server serves {model_name!r}; see GET "
                           "/v1/models)", "model", "model_not_found")

    def chat_job(body):
        """Worker thread: the conversation through the template -> one engine request's ids and params."""
        ids = chat_ids(tokenizer, message_texts(body.messages))
        top = body.top_logprobs if body.logprobs else None
        job = Job(model_name, True, body.n, token_text, top)
        job.prompts = [(None, ids)]
        return job, [params_for(body, len(ids), max_positions, top)]

    def completion_job(body):
        items = prompt_list(body.prompt, engine.backend.vocab_size)
        if len(items) * body.n > MAX_N:
            raise ApiError(400, f"{len(items)} prompts x n {body.n}: at most {MAX_N} choices per request", "n")
        prompts = []
        for text, ids in items:
            ids = ids if ids is not None else prompt_ids(tokenizer, text)
            if not ids:
                raise ApiError(400, "the prompt is empty", "prompt")
            if text is None and body.echo:
                text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            prompts.append((text, ids))
        job = Job(model_name, False, body.n, token_text, body.logprobs, body.echo)
        job.prompts = prompts
        scored = body.echo and body.logprobs is not None
        return job, [params_for(body, len(ids), max_positions, body.logprobs, scored) for _, ids in prompts]

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        check_model(body.model)
        return await run(body, *(await asyncio.to_thread(chat_job, body)))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        return await run(body, *(await asyncio.to_thread(completion_job, body)))

    async def run(body, job, params):
        loop = asyncio.get_running_loop()
        job.requests = [EngineRequest(ids, p, job.sink_for(loop, k)) for k, ((_, ids), p) in
                        enumerate(zip(job.prompts, params))]
        try:
            for req in job.requests:
                engine.submit(req)
        except ServerBusyError as exc:
            for req in job.requests:
                engine.cancel(req)
            raise ApiError(429, str(exc), code="queue_full", kind="server_busy",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventSourceResponse(stream_events(job, engine, usage), ping=15)
        try:
            return await collect(job)
        finally:
            for req in job.requests:
                engine.cancel(req)  # no-op when finished; frees the rows if the handler was cancelled or failed

    return app


class BodyLimit:
    """ASGI middleware: check Content-Length (400 when malformed, 413 over `limit`) before reading anything, read
    a POST body up to `limit` bytes (413 beyond: chunked bodies have no Content-Length), then hand it to the app.

    Later receive() calls go to the server's own, so a streaming response still sees the client disconnect.
    """

    def __init__(self, app, limit):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = self._header_problem(scope)
        if problem is not None:
            return await problem(scope, receive, send)
        if scope.get("method") != "POST":
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

    def _header_problem(self, scope):
        sizes = [v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == b"content-length"]
        if not sizes:
            return None
        size = sizes[0].strip()
        if len(sizes) > 1 or not size.isdigit() or len(size) > MAX_CONTENT_LENGTH_DIGITS:
            return error_body(400, f"Content-Length {size[:40]!r} is not one byte count", code="bad_header")
        if int(size) > self.limit:
            return error_body(413, f"the request body is over {self.limit} bytes", code="too_large")
        return None
