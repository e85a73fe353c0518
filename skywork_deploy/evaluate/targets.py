"""What `eval` generates from: a bundle or build folder run in-process, or an OpenAI-compatible endpoint.

Both take the same request: one problem, `k` samples, a seed, the sampling settings; both answer a list of
`Sample(text, tokens, finish_reason)`. The in-process target renders the problem with the model's own chat
template (DeepSeek-R1's, ending in `<think>\\n`); an endpoint applies its server's template to the same
user message.
"""
from dataclasses import dataclass
from pathlib import Path

from ..base.errors import ConfigError


@dataclass
class Sample:
    text: str
    tokens: int
    finish_reason: str  # "eos"/"stop" or "length"


class BundleTarget:
    """A bundle, build folder or model folder, generated from by a runtime backend in this process."""

    def __init__(self, path, backend=None, threads=None, int8_accuracy="exact"):
        from ..runtime.backends import make_backend
        from ..runtime.bundle import load_tokenizer, open_bundle

        self.bundle = open_bundle(path)
        backend = backend or ("torch" if self.bundle.kind == "model" else "onnxruntime")
        self.tokenizer = load_tokenizer(self.bundle)
        self.engine = make_backend(backend, self.bundle, threads=threads, int8_accuracy=int8_accuracy)
        self.name = _short_name(self.bundle, backend, int8_accuracy)
        self.info = {**self.engine.describe(), "kind": self.bundle.kind, "int8_accuracy": int8_accuracy}

    def generate(self, problem, k, seed, max_tokens, temperature, top_p):
        from ..runtime.generate import generate_text

        result = generate_text(self.engine, self.tokenizer, [problem] * k, max_new_tokens=max_tokens,
                               temperature=temperature, top_p=top_p, seed=seed)
        return [Sample(o["text"], o["new_tokens"], o["stop_reason"]) for o in result["outputs"]]

    def close(self):
        pass


class EndpointTarget:
    """An OpenAI-compatible server (ours, the vendor's vastgenx, vLLM), through serve.client.EndpointClient."""

    def __init__(self, url, model=None, api_key=None, timeout=600.0):
        from ..serve.client import EndpointClient

        self.client = EndpointClient(url, model=model, api_key=api_key, timeout=timeout)
        self.model = self.client.model  # asks /v1/models when no name was given: fails early when down
        self.name = f"{self.model}@{self.client.url}"
        self.info = {"backend": "endpoint", "url": self.client.url, "model": self.model}

    def generate(self, problem, k, seed, max_tokens, temperature, top_p):
        choices = self.client.chat([{"role": "user", "content": problem}], max_tokens=max_tokens,
                                   temperature=temperature, top_p=top_p, seed=seed, n=k)
        return [Sample(c.text, c.completion_tokens, c.finish_reason) for c in choices]

    def close(self):
        self.client.close()


def _short_name(bundle, backend, int8_accuracy):
    dtype = bundle.dtype if bundle.kind == "export" else "fp32"
    if dtype == "int8" and backend == "onnxruntime":
        dtype = f"int8 {int8_accuracy}"
    return f"{dtype} ({backend}, {Path(bundle.folder).name})"


def is_url(text):
    return "://" in str(text)


def open_target(spec, backend=None, threads=None, int8_accuracy="exact", model=None, api_key=None):
    """A path -> BundleTarget; an http(s) URL -> EndpointTarget."""
    if spec is None:
        raise ConfigError("give a TARGET folder or --endpoint URL to evaluate")
    if is_url(spec):
        return EndpointTarget(spec, model=model, api_key=api_key)
    return BundleTarget(spec, backend=backend, threads=threads, int8_accuracy=int8_accuracy)
