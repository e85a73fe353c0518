"""Weight-only per-output-channel int8 (W8A16) for the VACC Qwen2.

The math is one pure function, `quantize_per_channel`; the module swap is separate. Per output row:
`scale = absmax(row) / 127`, `q = round(row / scale)` as int8, and the layer computes
`x @ (q * scale[:, None]).T + bias`. Exported with a plain `torch.onnx.export`, each layer is the vendor's

    x ──► Vastai::QuantizedLinearPerChannel(x, int8_weight (out, in), scale (out,)) ──► [Add bias] ──►

(domain Vastai, 3 inputs, no attributes). The int8 weight and the scale are buffers, not parameters: they
never require grad, so `low_cpu_mem_usage`, `device_map` and `torch_dtype` loads treat them as plain tensors.
"""
import torch
import torch.nn.functional as F
from torch import nn

QUANT_METHOD = "vacc_w8a16"
SUPPORTED_BITS = (8,)
VACC_OP = "Vastai::QuantizedLinearPerChannel"


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
    if w is weight:
        w = w.clone()  # divided in place below
    qmax = 2 ** (bits - 1) - 1
    lo, hi = torch.aminmax(w, dim=1)  # (out,) each; one pass, and NaN/inf propagate into them
    absmax = torch.maximum(hi, -lo)  # (out,)
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("weight has non-finite values (inf or nan)")
    scale = torch.where(absmax > 0, (absmax / qmax).clamp(min=torch.finfo(torch.float32).tiny),
                        torch.zeros_like(absmax))
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    # in place on the fp32 copy: the same round(w / scale) as out of place, without three temporaries
    q = w.div_(divisor[:, None]).round_().clamp_(-qmax, qmax).to(torch.int8)  # (out, in)
    return q, scale


def dequantize_per_channel(q, scale, dtype=torch.float32):
    """int8 (out, in) and scale (out,) -> (out, in) weight in `dtype`."""
    return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


class _VaccLinear(torch.autograd.Function):
    """x @ dequant(q, scale).T + bias in eager mode; the vendor's op (then Add bias) when exported to ONNX."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias=None):
        return F.linear(x, dequantize_per_channel(weight, scale, x.dtype), bias)  # (..., out)

    @staticmethod
    def symbolic(g, x, weight, scale, bias=None):
        out = g.op(VACC_OP, x, weight, scale)
        try:  # rank and sizes for the exporter's later symbolics: (..., in) -> (..., out)
            sizes = x.type().varyingSizes()
            out.setType(x.type().with_sizes(sizes[:-1] + [weight.type().varyingSizes()[0]]))
        except (AttributeError, RuntimeError, TypeError):
            out.setType(x.type())
        return out if bias is None else g.op("Add", out, bias)


class QuantizedLinearPerChannel(nn.Module):
    """A Linear whose weight is int8 with one scale per output row (W8A16).

    The scale is kept in the layer's own dtype, as the vendor's file keeps it (a bf16 model has bf16 scales);
    it is computed in float32 first. Folders written by `skywork-deploy quantize` store float32 scales, which
    a load in another dtype casts.
    """

    def __init__(self, in_features, out_features, bias=True, bits=8, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear, bits=8):
        q, scale = quantize_per_channel(linear.weight.data, bits)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, linear.weight.dtype)
        layer.weight.copy_(q)
        layer.weight_scale.copy_(scale.to(linear.weight.dtype))
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.data)
        return layer.to(linear.weight.device)

    def forward(self, x):
        if self.bias is None:
            return _VaccLinear.apply(x, self.weight, self.weight_scale)  # (..., out)
        return _VaccLinear.apply(x, self.weight, self.weight_scale, self.bias.to(x.dtype))

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


def quantize(model, weight_bit_width=8, include_lm_head=False, empty=False):
    """Swap q/k/v/o/gate/up/down of every decoder layer of a Qwen2ForCausalLM (and lm_head when asked)."""
    targets = [(layer.self_attn, n) for layer in model.model.layers for n in ("q_proj", "k_proj", "v_proj",
                                                                              "o_proj")]
    targets += [(layer.mlp, n) for layer in model.model.layers for n in ("gate_proj", "up_proj", "down_proj")]
    if include_lm_head:
        targets.append((model, "lm_head"))
    quantize_linear_modules(targets, weight_bit_width, empty=empty)
    return model
