"""W8A16 in ONNX, two flavours, both derived from one trace.

The trace always emits the vendor's op for every quantized projection (through an export patch on
`QuantizedLinearPerChannel.forward`):

    x ──► Vastai::QuantizedLinearPerChannel(x, int8_weight (out,in), scale (out,)) ──► [Add bias] ──►

`to_standard` rewrites each custom node into what ONNX Runtime runs, with the weight stored transposed so
that DequantizeLinear feeds MatMul directly (the pattern ORT may fuse into MatMulNBits):

    int8_weight.T (in,out) ──► DequantizeLinear(scale (out,), axis=1) ──► MatMul(x, ·) ──►

`to_reference` rewrites a copy of the vacc graph with the same initializers (DQ axis 0, then Transpose), so
ORT can check the vacc graph numerically even though it cannot run the custom op.

`half_float_weights` stores what stays unquantized in an ONNX Runtime int8 graph (the embedding table and an
fp32 lm_head) in fp16 when the checkpoint holds them in bf16/fp16 (every such value with |x| in fp16's normal
range converts exactly, so fp32 storage buys no accuracy; the gated exact validation checks the whole graph):

    table fp16 ──► Gather ──► Cast(float) ──►          (only the looked-up rows are widened)
    lm_head.T fp16 ──► Cast(float) ──► MatMul ──►      (ONNX Runtime folds the Cast once, at load time)

A large lm_head is stored as vocabulary slices of at most `CHUNK_BYTES` each, every slice its own initializer
with its own Cast and MatMul, the logits concatenated (each logit is still one dot product over the hidden
size). ONNX Runtime's constant folding holds the folded fp32 tensor twice while it turns it into an
initializer: folded whole, the 7B lm_head's fp32 copy (2.18 GB) is held twice at load time; in slices the extra
is one slice (2-layer 7B-shaped int8 bundle of 2.52 GiB, one fast session in a fresh process: peak 4.64 GiB
whole, 2.85 GiB in 16 slices). With all 28 layers the peak comes later, from ONNX Runtime's packed int8
weights (~1.3x their bytes), so there the slices leave it as it was (11.19 -> 11.18 GiB,
`benchmarks/bench_full_build.py`).

    lm_head.T/part_k fp16 (hidden, slice_k) ──► Cast ──► MatMul(x, ·) ──┐
    ...                                                                   ├─► Concat(axis -1) ──► logits
"""
from dataclasses import dataclass

import onnx
from onnx import helper

from .edit import drop_unused_inputs, replace_nodes

DOMAIN, OP = "Vastai", "QuantizedLinearPerChannel"
DOMAIN_VERSION = 1
TRANSPOSED = ".T"  # suffix of initializers stored transposed (their recipe says so in weights.py)


def vacc_patches():
    """Export patches: [(owner, attribute, replacement, reason)] for graphs.export_patches."""
    import torch
    from ..source_code.quantization_vacc import QuantizedLinearPerChannel

    class VaccLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, scale, out_features):
            # values are irrelevant to the trace (weights are uninitialised); never materialise a dequantized
            # copy, which the tracer would keep alive for every layer
            return x.new_zeros(*x.shape[:-1], out_features)

        @staticmethod
        def symbolic(g, x, weight, scale, out_features):
            out = g.op(f"{DOMAIN}::{OP}", x, weight, scale)
            sizes = x.type().varyingSizes() if x.type().dim() is not None else None
            if sizes:
                out.setType(x.type().with_sizes(sizes[:-1] + [out_features]))
            else:
                out.setType(x.type())
            return out

    def forward(self, x):
        y = VaccLinear.apply(x, self.weight, self.weight_scale, self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    return [(QuantizedLinearPerChannel, "forward", forward,
             "emit Vastai::QuantizedLinearPerChannel instead of tracing the dequantize arithmetic")]


def custom_nodes(proto):
    return [n for n in proto.graph.node if n.domain == DOMAIN and n.op_type == OP]


def _inputs(proto):
    return {v.name: v for v in proto.graph.input}


def to_standard(proto, params):
    """Replace every custom node by DequantizeLinear(int8 weight.T, scale, axis=1) + MatMul, in place.

    `params` ({graph input: (state name, transposed)}) gains the transposed weights.
    """
    inputs = _inputs(proto)
    nodes = []
    for node in proto.graph.node:
        if not (node.domain == DOMAIN and node.op_type == OP):
            nodes.append(node)
            continue
        x, weight, scale = node.input
        w_t = weight + TRANSPOSED
        if w_t not in inputs:
            out_f, in_f = [d.dim_value for d in inputs[weight].type.tensor_type.shape.dim]
            value = helper.make_tensor_value_info(w_t, onnx.TensorProto.INT8, [in_f, out_f])
            proto.graph.input.append(value)
            inputs[w_t] = value
            params[w_t] = (params[weight][0], True)
        dq = node.output[0] + "/dq"
        nodes.append(helper.make_node("DequantizeLinear", [w_t, scale], [dq], name=node.name + "/DequantizeLinear",
                                      axis=1))
        nodes.append(helper.make_node("MatMul", [x, dq], list(node.output), name=node.name + "/MatMul"))
    replace_nodes(proto, nodes)
    drop_unused_inputs(proto, params)
    _drop_domain(proto)
    return proto


def to_reference(proto):
    """A copy of a vacc graph with each custom node as DequantizeLinear(axis 0) + Transpose + MatMul."""
    ref = onnx.ModelProto()
    ref.CopyFrom(proto)
    nodes = []
    for node in ref.graph.node:
        if not (node.domain == DOMAIN and node.op_type == OP):
            nodes.append(node)
            continue
        x, weight, scale = node.input
        dq, wt = node.output[0] + "/dq", node.output[0] + "/dq_t"
        nodes += [helper.make_node("DequantizeLinear", [weight, scale], [dq], axis=0),
                  helper.make_node("Transpose", [dq], [wt], perm=[1, 0]),
                  helper.make_node("MatMul", [x, wt], list(node.output))]
    replace_nodes(ref, nodes)
    _drop_domain(ref)
    return ref


def _drop_domain(proto):
    keep = [o for o in proto.opset_import if o.domain != DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)


def ensure_domain(proto):
    """Declare the Vastai domain (version 1) when the graph uses the custom op."""
    if custom_nodes(proto) and not any(o.domain == DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return proto


CHUNK_BYTES = 64 << 20  # largest fp16 lm_head slice (its fp32 fold is what ONNX Runtime holds twice)


@dataclass(frozen=True)
class Rows:
    """Weight recipe: rows [start, stop) of checkpoint tensor `state` (output channels of a Linear)."""

    state: str
    start: int
    stop: int


HALF_SOURCES = ("BF16", "F16")  # checkpoint dtypes whose values fp16 holds exactly (in its normal range)
HALF_WEIGHTS = ("embed_tokens.weight", "lm_head.weight")


def half_float_weights(proto, params, source_dtypes):
    """Store the float32 embedding / lm_head inputs as fp16 when the checkpoint holds them in bf16/fp16.

    `source_dtypes` {state name: safetensors dtype}. Returns the graph inputs changed (for the manifest).
    """
    inputs = {v.name: v for v in proto.graph.input}
    changed = []
    for name, (recipe, _) in params.items():
        names = recipe if isinstance(recipe, tuple) else (recipe,)
        value = inputs.get(name)
        if (value is None or value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT
                or not all(n.endswith(HALF_WEIGHTS) and source_dtypes.get(n) in HALF_SOURCES for n in names)):
            continue
        value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
        changed.append(name)
    if not changed:
        return changed
    half, casted = set(changed), set()
    nodes = []
    for node in proto.graph.node:
        if node.op_type == "Gather" and node.input[0] in half:  # widen the gathered rows, not the table
            wide = node.output[0]
            node.output[0] = wide + "/fp16"
            nodes += [node, helper.make_node("Cast", [node.output[0]], [wide], name=node.name + "/Cast",
                                             to=onnx.TensorProto.FLOAT)]
            continue
        if node.op_type == "MatMul" and node.input[1] in half and params[node.input[1]][1]:
            nodes += _sliced_matmul(proto, params, inputs, node)
            continue
        for k, name in enumerate(node.input):
            if name in half:
                wide = name + "/fp32"
                if wide not in casted:
                    casted.add(wide)
                    nodes.append(helper.make_node("Cast", [name], [wide], name=wide + "/Cast",
                                                  to=onnx.TensorProto.FLOAT))
                node.input[k] = wide
        nodes.append(node)
    replace_nodes(proto, nodes)
    drop_unused_inputs(proto, params)
    return changed


def _sliced_matmul(proto, params, inputs, node):
    """MatMul(x, W.T fp16) as Concat over vocabulary slices of Cast(W.T slice) @ x; the slices become inputs."""
    x, name = node.input
    state, _ = params[name]
    hidden, out = [d.dim_value for d in inputs[name].type.tensor_type.shape.dim]  # stored transposed (in, out)
    parts = max(1, -(-hidden * out * 2 // CHUNK_BYTES))
    if parts == 1:
        wide = name + "/fp32"
        return [helper.make_node("Cast", [name], [wide], name=wide + "/Cast", to=onnx.TensorProto.FLOAT),
                helper.make_node("MatMul", [x, wide], list(node.output), name=node.name)]
    nodes, outs = [], []
    bounds = [out * k // parts for k in range(parts + 1)]
    for k, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        part = f"{name}/part{k:02d}"
        proto.graph.input.append(helper.make_tensor_value_info(part, onnx.TensorProto.FLOAT16, [hidden, stop - start]))
        params[part] = (Rows(state, start, stop), True)
        outs.append(f"{node.output[0]}/part{k:02d}")
        nodes += [helper.make_node("Cast", [part], [part + "/fp32"], name=part + "/Cast", to=onnx.TensorProto.FLOAT),
                  helper.make_node("MatMul", [x, part + "/fp32"], [outs[-1]], name=part + "/MatMul")]
    nodes.append(helper.make_node("Concat", outs, list(node.output), name=node.name + "/Concat", axis=-1))
    return nodes
