"""Weight-only per-output-channel int8 (W8A16) for the VACC Qwen2.

The math is one pure function, `quantize_per_channel`; the module swap is separate. Per output row:
`scale = absmax(row) / 127`, `q = round(row / scale)` as int8, and the layer computes
`x @ (q * scale[:, None]).T + bias`. The vendor's ONNX op for this layer is
`Vastai::QuantizedLinearPerChannel(x, int8_weight, scale)`.
"""
import torch
import torch.nn.functional as F
from torch import nn

QUANT_METHOD = "vacc_w8a16"
SUPPORTED_BITS = (8,)


def quantize_per_channel(weight, bits=8):
    """(out, in) float weight -> (int8 (out, in), float32 scale (out,)).

    Computed in float32 whatever the input dtype. A row of zeros gets scale 0 and zeros; a tiny row gets the
    smallest normal float32 scale so the division stays finite. Non-finite weights raise ValueError.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"weight_bit_width {bits} is not supported (supported: {SUPPORTED_BITS})")
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight has non-finite values (inf or nan)")
    qmax = 2 ** (bits - 1) - 1
    absmax = w.abs().amax(dim=1)  # (out,)
    scale = torch.where(absmax > 0, (absmax / qmax).clamp(min=torch.finfo(torch.float32).tiny),
                        torch.zeros_like(absmax))
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / divisor[:, None]).clamp(-qmax, qmax).to(torch.int8)  # (out, in)
    return q, scale


def dequantize_per_channel(q, scale, dtype=torch.float32):
    """int8 (out, in) and scale (out,) -> (out, in) weight in `dtype`."""
    return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


class QuantizedLinearPerChannel(nn.Module):
    """A Linear whose weight is int8 with one float32 scale per output row (W8A16)."""

    def __init__(self, in_features, out_features, bias=True, bits=8, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.zeros(out_features, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear, bits=8):
        q, scale = quantize_per_channel(linear.weight.data, bits)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, linear.weight.dtype)
        layer.weight.data.copy_(q)
        layer.weight_scale.data.copy_(scale)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.data)
        return layer

    def forward(self, x):
        w = dequantize_per_channel(self.weight, self.weight_scale, x.dtype)  # (out, in)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def quantize_linear_modules(targets, bits=8, empty=False):
    """Replace each `getattr(parent, name)` nn.Linear by a QuantizedLinearPerChannel.

    With `empty=True` the new modules are allocated without quantizing (their values come from a state dict).
    """
    for parent, name in targets:
        linear = getattr(parent, name)
        if isinstance(linear, QuantizedLinearPerChannel):
            continue
        if empty:
            new = QuantizedLinearPerChannel(linear.in_features, linear.out_features, linear.bias is not None,
                                            bits, linear.weight.dtype)
        else:
            new = QuantizedLinearPerChannel.from_linear(linear, bits)
        setattr(parent, name, new)
