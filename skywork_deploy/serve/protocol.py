"""What a request may say: the OpenAI request bodies, checked completely before anything reaches the engine.

Types are strict (a token id is an integer, never `true` or `1.0`; a temperature is a number, never `"0.5"`),
`null` means the default for every field, unknown fields are refused (as OpenAI does), and the fields this
server does not implement are refused with a 400 naming them, unless they carry their no-op value
(`frequency_penalty: 0`, `logit_bias: {}`, `response_format: {"type": "text"}`, `tools: []`, ...).
Sizes are bounded: at most MAX_STOPS stop strings of at most MAX_STOP_CHARS characters, MAX_N choices per request
(all prompts of a completions request together), MAX_TOP_LOGPROBS alternatives per token.
"""
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .rows import Params

MAX_N = 64  # choices per request; beyond the free batch rows they are admitted in turn
MAX_STOPS, MAX_STOP_CHARS = 16, 256
MAX_TOP_LOGPROBS = 20
MAX_SEED_BITS = 256
# field -> the values that ask for nothing (accepted); any other value is refused with a 400 naming the field
NOT_IMPLEMENTED = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "repetition_penalty": (1, 1.0),
    "logit_bias": ({},), "response_format": ({"type": "text"},), "tools": ([],), "tool_choice": ("none",),
    "functions": ([],), "function_call": ("none",), "parallel_tool_calls": (True, False), "suffix": ("",),
    "best_of": (1,), "stop_token_ids": ([],), "modalities": (["text"],), "audio": (), "prediction": (),
    "reasoning_effort": (), "web_search_options": (), "store": (False,), "metadata": ({},),
    "service_tier": ("auto", "default"), "user": None,  # None: any value (an end-user id changes no output)
}


class ApiError(Exception):
    """An OpenAI error response: status, message, the field it is about, a code."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers


class Body(BaseModel):
    """Strict, closed: null is the default, unsupported fields are refused by name."""

    model_config = ConfigDict(strict=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _nulls_and_refusals(cls, data):
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if v is not None}  # null means the default
        for key in list(data):
            if key in NOT_IMPLEMENTED and key not in cls.model_fields:
                allowed = NOT_IMPLEMENTED[key]
                if allowed is not None and data[key] not in allowed:
                    raise ApiError(400, f"{key} is not supported by this server (remove it"
                                   f"{', or send ' + repr(allowed[0]) if allowed else ''})", key,
                                   "unsupported_parameter")
                del data[key]
        return data


class StreamOptions(Body):
    include_usage: bool = False


class Sampling(Body):
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    min_tokens: int = Field(0, ge=0)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, ge=0, le=1, allow_inf_nan=False)  # 0: greedy
    top_k: int = Field(-1, ge=-1, le=1 << 31)  # -1 or 0: off, as vLLM takes it
    seed: Optional[int] = None
    stop: Union[str, list[str]] = Field(default_factory=list)
    n: int = Field(1, ge=1, le=MAX_N)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: Optional[StreamOptions] = None


class Part(Body):
    type: Literal["text"]
    text: str


class Message(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[Any]] = ""  # parts are checked by message_texts (messages that name the part)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1, max_length=4096)
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(Sampling):
    prompt: Any
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False


def checked_text(value, where):
    """A string that encodes as UTF-8 (JSON can carry lone surrogates, which no tokenizer takes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{where}: the text holds an unpaired UTF-16 surrogate (send valid Unicode)",
                       where) from None
    return value


def stop_list(stop):
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop: {len(stops)} stop strings; at most {MAX_STOPS} are taken", "stop")
    for i, s in enumerate(stops):
        if len(s) > MAX_STOP_CHARS:
            raise ApiError(400, f"stop[{i}]: {len(s)} characters; at most {MAX_STOP_CHARS} are taken", "stop")
        checked_text(s, f"stop[{i}]")
    return [s for s in stops if s]


def check_seed(seed):
    if seed is not None and abs(seed).bit_length() > MAX_SEED_BITS:
        raise ApiError(400, f"seed: at most {MAX_SEED_BITS} bits", "seed")


def message_texts(messages):
    """[{"role", "content"}] with every content a checked string (text parts joined); `developer` is `system`."""
    convo = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ApiError(400, f"{where}.type: {kind!r} parts are not supported (this model takes "
                                   "text parts only)", f"{where}.type")
                if set(part) - {"type", "text"} or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"{where}: a text part is {{\"type\": \"text\", \"text\": STRING}}", where)
                texts.append(part["text"])
            content = "".join(texts)
        convo.append({"role": "system" if m.role == "developer" else m.role,
                      "content": checked_text(content, f"messages[{i}].content")})
    return convo


def prompt_list(prompt, vocab_size):
    """A completions prompt -> [(text or None, ids or None)]: a string, strings, token ids or lists of them."""
    def ids_of(value, where):
        if not value:
            raise ApiError(400, f"{where}: the prompt is empty", "prompt")
        for i in value:
            if type(i) is not int:  # bool is an int subclass: refused too
                raise ApiError(400, f"{where}: token ids are integers, not {json_name(i)}", "prompt")
            if not 0 <= i < vocab_size:
                raise ApiError(400, f"{where}: prompt token id {i} is outside the vocabulary "
                               f"(0...{vocab_size - 1})", "prompt")
        return list(value)

    if isinstance(prompt, str):
        return [(checked_text(prompt, "prompt"), None)]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, "prompt: a string, a list of strings, a list of token ids or a list of such lists",
                       "prompt")
    if all(isinstance(p, str) for p in prompt):
        items = [(checked_text(p, f"prompt[{i}]"), None) for i, p in enumerate(prompt)]
    elif all(isinstance(p, list) for p in prompt):
        items = [(None, ids_of(p, f"prompt[{i}]")) for i, p in enumerate(prompt)]
    else:
        items = [(None, ids_of(prompt, "prompt"))]
    if len(items) > MAX_N:
        raise ApiError(400, f"prompt: {len(items)} prompts; at most {MAX_N} per request", "prompt")
    return items


def json_name(value):
    return {bool: "booleans", float: "numbers with a fraction", str: "strings"}.get(type(value), type(value).__name__)


def params_for(body, n_prompt, max_positions, logprobs=None, prompt_logprobs=False):
    """Engine parameters of one prompt of `n_prompt` tokens; every range checked against the model's context."""
    room = max_positions - n_prompt
    where = "messages" if hasattr(body, "messages") else "prompt"
    if room < 1:
        raise ApiError(400, f"the prompt has {n_prompt} tokens but the model's context is {max_positions} tokens "
                       "(shorten the prompt)", where, "context_length_exceeded")
    key = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = getattr(body, key)
    echo = getattr(body, "echo", False)
    if max_tokens is None:
        max_tokens = room
    if max_tokens < (0 if echo else 1):
        raise ApiError(400, f"{key} {max_tokens}: must be at least {0 if echo else 1}", key)
    if max_tokens > room:
        raise ApiError(400, f"{key} {max_tokens} + the prompt's {n_prompt} tokens exceed the model's context of "
                       f"{max_positions} tokens (ask for at most {room})", key, "context_length_exceeded")
    if body.min_tokens > max_tokens:
        raise ApiError(400, f"min_tokens {body.min_tokens} is more than {key} {max_tokens}", "min_tokens")
    check_seed(body.seed)
    return Params(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                  top_k=body.top_k if body.top_k > 0 else None, seed=body.seed, stop=stop_list(body.stop),
                  ignore_eos=body.ignore_eos, n=body.n, min_tokens=body.min_tokens, logprobs=logprobs,
                  prompt_logprobs=prompt_logprobs)
