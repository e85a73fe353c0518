"""A small client for any OpenAI-compatible server (ours, the vendor's `vastgenx`, vLLM), over httpx.

    client = EndpointClient("http://127.0.0.1:9900")          # or .../v1; model: the server's first one
    client.chat([{"role": "user", "content": "Hi"}], max_tokens=64)        -> [Choice(text, finish_reason, ...)]
    for event in client.stream_chat(messages, max_tokens=64): ...          -> StreamEvent per text delta, then usage
    client.complete("raw prompt", max_tokens=16)                           -> /v1/completions

Sampling options map onto the request body as the vendor's server and vLLM take them: `top_k`, `seed` and
`ignore_eos` are sent only when given. A server that is down raises NetworkError naming the URL; an HTTP
error raises EndpointError with the server's own message and status.
"""
import json
import time
from dataclasses import dataclass, field

from ..base.errors import EndpointError, NetworkError


@dataclass
class Choice:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class StreamEvent:
    """One streamed item: a text delta of choice `index` (`text`), or the final `usage` (text empty).

    `t` is time.perf_counter() when the chunk arrived; `finish_reason` is set on a choice's last chunk.
    """

    text: str = ""
    index: int = 0
    t: float = 0.0
    finish_reason: str = None
    usage: dict = field(default=None)


def base_url(url):
    """'http://h:p', 'http://h:p/' or 'http://h:p/v1' -> 'http://h:p/v1'."""
    url = str(url).rstrip("/")
    if "://" not in url:
        raise NetworkError(f"--endpoint {url}: not a URL (example: http://127.0.0.1:9900/v1)")
    return url if url.endswith("/v1") else url + "/v1"


class EndpointClient:
    def __init__(self, url, model=None, api_key=None, timeout=600.0):
        from .server import require_serve_extra

        require_serve_extra(("httpx",), "talking to an --endpoint")
        import httpx

        self.url = base_url(url)
        self.api_key = api_key or "EMPTY"  # the vendor's examples use the key EMPTY
        self._httpx = httpx
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                                  headers={"Authorization": f"Bearer {self.api_key}"})
        self._model = model

    # -- plumbing ------------------------------------------------------------------------------------------
    def close(self):
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _unreachable(self, exc):
        reason = str(exc) or type(exc).__name__
        return NetworkError(f"cannot reach {self.url}: {reason} (start the server or fix --endpoint)")

    def _check(self, response):
        if response.status_code < 400:
            return
        response.read()
        message = response.text.strip()[:500]
        try:
            body = response.json()
            err = body.get("error", body) if isinstance(body, dict) else body
            message = err.get("message", message) if isinstance(err, dict) else str(err)
        except ValueError:
            pass
        raise EndpointError(f"{self.url} answered {response.status_code}: {message}", status=response.status_code)

    def _get(self, path):
        try:
            response = self._http.get(self.url + path)
        except self._httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        self._check(response)
        return response.json()

    def _post(self, path, body):
        try:
            response = self._http.post(self.url + path, json=body)
        except self._httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        self._check(response)
        return response.json()

    @property
    def model(self):
        if self._model is None:
            names = self.models()
            if not names:
                raise EndpointError(f"{self.url}/models lists no model (pass --model NAME)")
            self._model = names[0]
        return self._model

    # -- the API -------------------------------------------------------------------------------------------
    def models(self):
        data = self._get("/models")
        return [m["id"] for m in data.get("data", [])]

    def model_card(self):
        """The /v1/models entry of the model in use ({} when the server lists it without details)."""
        data = self._get("/models").get("data", [])
        return next((m for m in data if isinstance(m, dict) and m.get("id") == self.model), {})

    def _body(self, max_tokens, temperature=0.0, top_p=1.0, top_k=None, seed=None, n=1, stop=None,
              ignore_eos=False):
        body = {"model": self.model, "max_tokens": int(max_tokens), "temperature": float(temperature),
                "top_p": float(top_p), "n": int(n)}
        for key, value in (("top_k", top_k), ("seed", seed), ("stop", stop)):
            if value is not None:
                body[key] = value
        if ignore_eos:
            body["ignore_eos"] = True
        return body

    def chat(self, messages, **options):
        """Non-streamed chat completion -> one Choice per `n`."""
        data = self._post("/chat/completions", {**self._body(**options), "messages": list(messages)})
        return _choices(data, lambda c: (c.get("message") or {}).get("content") or "")

    def complete(self, prompt, **options):
        """Non-streamed text completion of `prompt` (text, or a list of token ids) -> one Choice per `n`."""
        data = self._post("/completions", {**self._body(**options), "prompt": prompt})
        return _choices(data, lambda c: c.get("text") or "")

    def stream_chat(self, messages, **options):
        """Streamed chat completion: StreamEvent per text delta, then one with `usage`."""
        body = {**self._body(**options), "messages": list(messages)}
        return self._stream("/chat/completions", body, lambda c: (c.get("delta") or {}).get("content") or "")

    def stream_complete(self, prompt, **options):
        """Streamed text completion: StreamEvent per text delta, then one with `usage`."""
        return self._stream("/completions", {**self._body(**options), "prompt": prompt},
                            lambda c: c.get("text") or "")

    def _stream(self, path, body, text_of):
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        try:
            with self._http.stream("POST", self.url + path, json=body) as response:
                self._check(response)
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue  # SSE comments, event names, keep-alive blank lines
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        return
                    yield from _events(json.loads(payload), text_of, time.perf_counter())
        except self._httpx.HTTPError as exc:
            raise self._unreachable(exc) from None


def _events(chunk, text_of, now):
    if "error" in chunk:
        err = chunk["error"]
        message = err.get("message", err) if isinstance(err, dict) else err
        raise EndpointError(f"the server stopped the stream: {message}")
    for c in chunk.get("choices") or []:
        text = text_of(c)
        if text or c.get("finish_reason"):
            yield StreamEvent(text=text, index=int(c.get("index", 0)), t=now, finish_reason=c.get("finish_reason"))
    if chunk.get("usage"):
        yield StreamEvent(t=now, usage=chunk["usage"])


def _choices(data, text_of):
    usage = data.get("usage") or {}
    prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    choices = sorted(data.get("choices", []), key=lambda c: c.get("index", 0))
    per_choice = [c.get("completion_tokens") for c in choices]  # our server reports each; others only the sum
    out = []
    for c, own in zip(choices, per_choice):
        tokens = int(own) if own is not None else (completion if len(choices) == 1 else completion // len(choices))
        out.append(Choice(text_of(c), c.get("finish_reason") or "stop", prompt, tokens))
    return out


def generate_remote(client, prompts, max_tokens, temperature=0.0, top_p=1.0, seed=None, chat=True, on_text=None):
    """What `run --endpoint` does: one request per prompt, the first streamed to `on_text` -> result dict."""
    outputs, timing = [], {}
    options = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    for i, prompt in enumerate(prompts):
        messages = [{"role": "user", "content": prompt}]
        if i == 0:
            start, first, text, reason, usage = time.perf_counter(), None, [], None, {}
            events = client.stream_chat(messages, **options) if chat else client.stream_complete(prompt, **options)
            for ev in events:
                if ev.usage:
                    usage = ev.usage
                    continue
                if ev.text:
                    first = first or ev.t
                    text.append(ev.text)
                    if on_text is not None:
                        on_text(ev.text)
                reason = ev.finish_reason or reason
            end = time.perf_counter()
            timing = {"time_to_first_token_s": (first or end) - start, "total_s": end - start,
                      "completion_tokens": int(usage.get("completion_tokens", 0))}
            outputs.append({"text": "".join(text), "stop_reason": reason or "stop",
                            "prompt_tokens": int(usage.get("prompt_tokens", 0)),
                            "new_tokens": int(usage.get("completion_tokens", 0))})
            continue
        c = (client.chat(messages, **options) if chat else client.complete(prompt, **options))[0]
        outputs.append({"text": c.text, "stop_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
                        "new_tokens": c.completion_tokens})
    return {"endpoint": client.url, "model": client.model, "outputs": outputs, "timing": timing,
            "sampling": {"temperature": temperature, "top_p": top_p, "seed": seed, "chat_template": chat}}
