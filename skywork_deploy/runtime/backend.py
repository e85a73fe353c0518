"""The one small interface every backend implements (see backends.py for the list of backends)."""
import numpy as np

from ..base.errors import InputError


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


def last_logits(logits):
    """(B, 1, V) or (B, V) logits of any float dtype -> (B, V) float32."""
    logits = np.asarray(logits)
    if logits.ndim == 3:
        logits = logits[:, -1, :]
    return logits.astype(np.float32, copy=False)
