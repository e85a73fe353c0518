"""One small interface for running a model step by step, and the backends behind it.

A backend computes two steps on NumPy int64 inputs:
- `prefill(input_ids (B, S), attention_mask (B, S), position_ids (B, S)) -> (logits (B, V) float32, kv)`,
  the logits of the last position only;
- `decode(token_ids (B, 1), attention_mask (B, P+1), position_ids (B, 1), kv) -> (logits (B, V), kv)`.
`kv` is opaque to the caller (torch tensors, ONNX Runtime OrtValues or buffers it appends to in place): pass
back the one the last step returned, never an older one.

Backends: `onnxruntime` (an export bundle, CPU), `onnxruntime-streamed` (the same graphs cut at decoder layers,
one piece's session at a time: for bundles whose whole session does not fit; slow, every token loads every
piece) and `torch` (our model from the source folder: the reference).
`BACKENDS` maps each name to a factory `f(bundle, **options) -> Backend`. There is no step-by-step VACC
backend: the vendor publishes no API for running a compiled LLM's prefill/decode with a KV cache through
`vaststreamx` (VENDOR.md §4); a compiled folder runs behind `vastgenx serve`, which `skywork-deploy serve`
starts, and `run`/`bench --endpoint` talk to it.
"""
from ..base.errors import ConfigError


def _onnxruntime_backend(bundle, **options):
    from .ort_backend import OrtBackend

    return OrtBackend(bundle, **options)


def _streamed_backend(bundle, **options):
    from .streamed_backend import StreamedBackend

    return StreamedBackend(bundle, **options)


def _torch_backend(bundle, **options):
    from .torch_backend import TorchBackend

    return TorchBackend(bundle, **options)


BACKENDS = {
    "onnxruntime": _onnxruntime_backend,
    "onnxruntime-streamed": _streamed_backend,
    "torch": _torch_backend,
}


def make_backend(name, bundle, **options):
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    return BACKENDS[name](bundle, **options)
