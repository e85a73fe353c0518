"""Text <-> token ids for the API, run on worker threads (never on the event loop nor the engine thread).

The chat template's own control tokens (`<｜Assistant｜>`, `<｜end▁of▁sentence｜>`, every added token) inside a
message's content are encoded as text, never as the control token: a user cannot forge a turn. The template is
rendered with each such occurrence replaced by a one-time marker; the rendered text is tokenized as usual and each
marker by the token's characters with special tokens split (`split_special_tokens`). Content without control
tokens is tokenized exactly as the template alone would.
"""
import functools
import re
import uuid

from ..runtime.generate import chat_template_ids
from .protocol import ApiError

THINK_TAGS = ("<think>", "</think>")  # the template strips reasoning from assistant turns: they keep their meaning


def added_tokens(tokenizer):
    """The tokenizer's added (control) tokens' strings, longest first."""
    vocab = getattr(tokenizer, "get_added_vocab", dict)()
    return sorted((t for t in vocab if t), key=len, reverse=True)


def chat_ids(tokenizer, convo):
    """Token ids of a conversation through the chat template, ending in the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "the model's tokenizer has no chat template (use /v1/completions)", "messages")
    specials = added_tokens(tokenizer)
    pattern = re.compile("|".join(map(re.escape, specials))) if specials else None
    marks, escaped = {}, []
    for m in convo:
        keep = THINK_TAGS if m["role"] == "assistant" else ()

        def mark(match, keep=keep):
            if match.group(0) in keep:
                return match.group(0)
            key = f"\ue000{uuid.uuid4().hex}\ue001"
            marks[key] = match.group(0)
            return key

        escaped.append({**m, "content": pattern.sub(mark, m["content"]) if pattern else m["content"]})
    try:
        if not marks:
            return chat_template_ids(tokenizer, escaped)
        text = tokenizer.apply_chat_template(escaped, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # the template raises jinja2 / ValueError / our InputError for conversations it rejects
        raise ApiError(400, f"the chat template rejects these messages ({str(exc).splitlines()[0][:200]})",
                       "messages") from None
    ids = []
    for piece in re.split("(\ue000[0-9a-f]{32}\ue001)", text):
        if piece in marks:
            ids += as_text(tokenizer, marks[piece])
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return [int(i) for i in ids]


def as_text(tokenizer, text):
    """Ids that spell `text` with no control token (special tokens split into ordinary pieces)."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def prompt_ids(tokenizer, text):
    """A completions prompt string -> ids. The prompt is the model's whole input (a client may write the template
    itself), so control tokens in it are control tokens, as in OpenAI's and vLLM's completions."""
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


class TokenText:
    """Each token's text and UTF-8 bytes, as OpenAI's logprobs report them (cached per id)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.text = functools.lru_cache(maxsize=1 << 16)(self._text)
        self.bytes = functools.lru_cache(maxsize=1 << 16)(self._bytes)

    def _text(self, token):
        return self.tok.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _bytes(self, token):
        """Byte-level BPE pieces map back to their raw bytes (a token may be half a UTF-8 character)."""
        piece = self.tok.convert_ids_to_tokens(token)
        table = _byte_decoder()
        if isinstance(piece, str) and piece and all(c in table for c in piece):
            return [table[c] for c in piece]
        return list(self.text(token).encode("utf-8"))


@functools.lru_cache(maxsize=1)
def _byte_decoder():
    """GPT-2's byte-level alphabet: printable character -> the byte it stands for."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}
