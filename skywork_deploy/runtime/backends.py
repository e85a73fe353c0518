"""One small interface for running a model step by step, and the backends behind it.

A backend computes two steps on NumPy int64 inputs:
- `prefill(input_ids (B, S), attention_mask (B, S), position_ids (B, S)) -> (logits (B, V) float32, kv)`,
  the logits of the last position only;
- `decode(token_ids (B, 1), attention_mask (B, P+1), position_ids (B, 1), kv) -> (logits (B, V), kv)`.
`kv` is opaque to the caller (torch tensors, ONNX Runtime OrtValues or buffers it appends to in place): pass
back the one the last step returned, never an older one.

Backends: `onnxruntime` (an export bundle, CPU) and `torch` (our model from the source folder: the reference).
`BACKENDS` maps each name to a factory `f(bundle, **options) -> Backend`. There is no step-by-step VACC
backend: the vendor publishes no API for running a compiled LLM's prefill/decode with a KV cache through
`vaststreamx` (VENDOR.md §4); a compiled folder runs behind `vastgenx serve`, which `skywork-deploy serve`
starts, and `run`/`bench --endpoint` talk to it.
"""
import logging

import numpy as np

from ..errors import ConfigError, InputError

log = logging.getLogger(__name__)


def physical_cores():
    import psutil

    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


class Backend:
    """Base class: metadata shared by every backend, and the two steps each one implements."""

    name = "base"

    def __init__(self, bundle):
        self.bundle = bundle
        self.vocab_size = bundle.vocab_size
        self.buckets = bundle.buckets  # fixed prefill lengths or None
        self.max_positions = bundle.spec.max_positions

    def prefill(self, input_ids, attention_mask, position_ids):
        raise NotImplementedError

    def decode(self, token_ids, attention_mask, position_ids, kv):
        raise NotImplementedError

    def describe(self):
        return {"backend": self.name, "folder": str(self.bundle.folder), "dtype": self.bundle.dtype}

    def bucket_for(self, length):
        """The prefill length to pad a prompt of `length` tokens to (itself when the graphs are dynamic)."""
        if not self.buckets:
            return length
        for bucket in self.buckets:
            if length <= bucket:
                return bucket
        raise InputError(f"the prompt has {length} tokens but the largest sequence bucket of "
                         f"{self.bundle.folder} is {self.buckets[-1]} (shorten the prompt or export with "
                         f"--seq-len {max(length, self.buckets[-1])})")


class TorchBackend(Backend):
    """Our patched Qwen2 (skywork_deploy.modeling.load_model) in eager PyTorch: the reference backend.

    For an int8 bundle exported from a float folder, the weights are quantized per channel (W8A16) as the
    exporter did, so the torch backend computes the same arithmetic as the graphs.
    """

    name = "torch"

    def __init__(self, bundle, threads=None, **_):
        super().__init__(bundle)
        import torch

        from ..modeling import load_model

        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        folder = bundle.source_model()
        dtype = {"fp16": "fp16", "bf16": "bf16"}.get(bundle.dtype, "fp32")
        self.model = load_model(folder, dtype=dtype, insert_slice=True)
        if bundle.dtype == "int8" and not getattr(self.model.config, "vacc_quantization", None):
            self.model.quantize(8)
        self.source = folder
        self._torch = torch

    def prefill(self, input_ids, attention_mask, position_ids):
        torch = self._torch
        with torch.inference_mode():
            out = self.model(torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                             position_ids=torch.from_numpy(position_ids), iter_num=0)
        return out.logits[:, -1, :].float().numpy(), out.past_key_values

    def decode(self, token_ids, attention_mask, position_ids, kv):
        torch = self._torch
        with torch.inference_mode():
            out = self.model(torch.from_numpy(token_ids), attention_mask=torch.from_numpy(attention_mask),
                             position_ids=torch.from_numpy(position_ids), past_key_values=kv, iter_num=1)
        return out.logits[:, -1, :].float().numpy(), out.past_key_values

    def describe(self):
        return {**super().describe(), "source_model": str(self.source), "threads": self.threads}


def _onnxruntime_backend(bundle, **options):
    from .ort_backend import OrtBackend

    return OrtBackend(bundle, **options)


BACKENDS = {
    "onnxruntime": _onnxruntime_backend,
    "torch": TorchBackend,
}


def make_backend(name, bundle, **options):
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    return BACKENDS[name](bundle, **options)


def last_logits(logits):
    """(B, 1, V) or (B, V) logits of any float dtype -> (B, V) float32."""
    logits = np.asarray(logits)
    if logits.ndim == 3:
        logits = logits[:, -1, :]
    return logits.astype(np.float32, copy=False)
