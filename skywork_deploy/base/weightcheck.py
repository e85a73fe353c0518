"""Weights checked as they stream: NaN or Inf anywhere, and values float16 cannot hold when the target is fp16,
reported with the tensor's name, the first bad index and its value (checked in chunks: no copy of a tensor)."""
from .errors import ModelFormatError

FP16_OVERFLOW = 65520.0    # |x| >= this rounds to Inf in float16 (its largest finite value is 65504)
CHUNK = 1 << 24            # elements per check


def check_weight(tensor, name, where, fp16=False, row_offset=0):
    """Raise ModelFormatError naming `name` in `where` when `tensor` holds NaN/Inf (or, with `fp16`, a value past
    float16's range). `row_offset`: the first row of `tensor` in the full weight (a chunk of it)."""
    import torch

    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    flat = tensor.reshape(-1)  # (numel,): a view of a contiguous tensor
    for start in range(0, flat.numel(), CHUNK):
        part = flat[start:start + CHUNK]
        bad = ~torch.isfinite(part)
        what = "NaN or Inf"
        if fp16 and not bad.any():
            bad = part.abs() >= FP16_OVERFLOW
            what = "a value float16 cannot hold (|x| >= 65520 becomes Inf)"
        if bad.any():
            at = start + int(bad.to(torch.uint8).argmax())
            index = _unravel(at, list(tensor.shape))
            index[0] += row_offset if index else 0
            value = flat[at].item()
            raise ModelFormatError(f"{where}: tensor {name} holds {what} at index {index} (value {value!r}); "
                                   "the checkpoint is damaged or was "
                                   "saved in a dtype that overflowed: re-download or re-save it"
                                   f"{'' if not fp16 or what.startswith('NaN') else ', or export fp32 / int8'}")


def _unravel(flat_index, shape):
    index = []
    for size in reversed(shape):
        index.append(flat_index % size)
        flat_index //= size
    return index[::-1]
