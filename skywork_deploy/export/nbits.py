"""int8 weights in ONNX Runtime's MatMulNBits layout, shared by the DequantizeLinear graphs and pre-fused ones.

ONNX Runtime fuses DequantizeLinear + MatMul into its `MatMulNBits` kernel when it loads a graph: for the 7B
shape that fusion re-lays every int8 weight out (uint8, blocks of 32 with one fp32 scale each) and then packs
it: for eight 7B-shaped MLP matrices (543 MB of int8) a 2.3 s load and 0.77 GiB steady, against 0.8 s and
0.59 GiB when the graph already holds MatMulNBits over weights in its layout. So the weights are stored once
in that kernel's own layout, and the bundle carries small graph files that read the same bytes two ways:

    standard graph (prefill.onnx, `--int8-accuracy exact` folds it to fp32 once; validation's "unfused"):
    w.u8 (N, K/bs, bs) uint8 ──► Reshape (N, K) ──► Transpose (K, N)
                             ──► DequantizeLinear(scale (N,), zero point 128, axis 1) ──► MatMul(x, ·)

    pre-fused graphs (prefill.nbits.onnx: accuracy level 4, int8 activations, `fast`;
                      prefill.nbits-exact.onnx: accuracy level 0, fp32 arithmetic, `exact-nbits`):
    scale (N,) ──► Reshape (N, 1) ──► Tile (N, K/bs) ──► Reshape (N * K/bs,) ──┐  (folded at load)
    x ──► com.microsoft::MatMulNBits(w.u8 (N, K/bs, bs), block scales ◄───────┘, bits 8, block_size bs)

`uint8 = int8 + 128` with MatMulNBits' default zero point 128 for 8 bits, and every block of a row carries
that row's per-channel scale, so both compute `x @ (q * scale).T` exactly as the vendor's W8A16 (the exact
modes are gated against the same reference). The block size is the largest power of two in 16..BLOCK_MAX that
divides K; it sets how coarsely the `fast` path quantizes activations, not the weights. A projection whose K
has no such divisor keeps the int8 DequantizeLinear form (and ONNX Runtime's load-time fusion).
"""
import onnx
from onnx import helper

from ..base.errors import DeployError
from .edit import drop_unused_inputs, index, replace_nodes
from .int8 import TRANSPOSED

BLOCK_MIN, BLOCK_MAX = 16, 128
SUFFIX, BLOCKS = ".u8", ".blocks"
# graph-file suffix -> (the runtime's --int8-accuracy it serves, MatMulNBits accuracy_level)
VARIANTS = {"nbits": ("fast", 4), "nbits-exact": ("exact-nbits", 0)}
MS_DOMAIN = "com.microsoft"


def block_size(k):
    """Largest power of two in [BLOCK_MIN, BLOCK_MAX] dividing k, or None."""
    bs = BLOCK_MAX
    while bs >= BLOCK_MIN:
        if k % bs == 0:
            return bs
        bs //= 2
    return None


def _dims(value):
    return [d.dim_value for d in value.type.tensor_type.shape.dim]


def to_nbits_storage(proto, params):
    """Rewrite every DequantizeLinear(int8 W.T (K, N), scale, axis 1) -> MatMul of the standard int8 graph to
    read W (N, K/bs, bs) uint8 through Reshape -> Transpose -> DequantizeLinear(axis 1), in place.

    `params` ({graph input: (recipe, transposed)}) gets the uint8 weights (stored untransposed) instead of the
    int8 ones. Returns how many projections were converted.
    """
    inputs = {v.name: v for v in proto.graph.input}
    _, consumers = index(proto)
    nodes, converted, constants = [], 0, {}
    for node in proto.graph.node:
        w_t = node.input[0] if node.op_type == "DequantizeLinear" else None
        value = inputs.get(w_t)
        if (value is None or w_t not in params or not params[w_t][1] or len(node.input) != 2
                or value.type.tensor_type.elem_type != onnx.TensorProto.INT8
                or not all(c.op_type == "MatMul" and c.input[1] == node.output[0]
                           for c in consumers.get(node.output[0], []))):
            nodes.append(node)
            continue
        k, n = _dims(value)
        bs = block_size(k)
        if bs is None:
            nodes.append(node)
            continue
        name = (w_t[: -len(TRANSPOSED)] if w_t.endswith(TRANSPOSED) else w_t) + SUFFIX
        proto.graph.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.UINT8, [n, k // bs, bs]))
        params[name] = (params[w_t][0], False)
        if n not in constants:  # one zero-point vector per output width, shared by the layers
            constants[n] = f"nbits/zero_point_{n}"
            nodes.append(helper.make_node(
                "Constant", [], [constants[n]], name=constants[n],
                value=helper.make_tensor(constants[n], onnx.TensorProto.UINT8, [n], b"\x80" * n, raw=True)))
        if "shape" not in constants:
            constants["shape"] = "nbits/shape_2d"
            nodes.append(helper.make_node(
                "Constant", [], ["nbits/shape_2d"], name="nbits/shape_2d",
                value=helper.make_tensor("nbits/shape_2d", onnx.TensorProto.INT64, [2], [0, -1])))
        base = node.output[0]
        # transposed before dequantizing: ONNX Runtime folds the uint8 Transpose at load and the DequantizeLinear
        # -> MatMul left is the pattern its `exact` folding prepacks (a Transpose after it would become
        # FusedMatMul(transB), unpacked: half the decode speed)
        nodes += [helper.make_node("Reshape", [name, "nbits/shape_2d"], [base + "/rows"], name=base + "/Reshape"),
                  helper.make_node("Transpose", [base + "/rows"], [base + "/columns"], name=base + "/Transpose",
                                   perm=[1, 0]),
                  helper.make_node("DequantizeLinear", [base + "/columns", node.input[1], constants[n]], [base],
                                   name=base + "/DequantizeLinear", axis=1)]
        converted += 1
    replace_nodes(proto, nodes)
    drop_unused_inputs(proto, params)
    return converted


def prefused(proto, params, accuracy_level):
    """A copy of a `to_nbits_storage` graph with each Reshape->Transpose->DequantizeLinear->MatMul chain as one
    MatMulNBits over the same weight. Its per-block scales are the per-channel scale tiled per block, computed
    from constants, so ONNX Runtime folds them once at load (the bundle stores each scale once)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    inputs = {v.name: v for v in out.graph.input}
    _, consumers = index(out)
    drop, replace, made = set(), {}, {}
    for node in out.graph.node:
        if node.op_type != "Reshape" or not node.input[0].endswith(SUFFIX) or node.input[0] not in params:
            continue
        tr = _only(consumers, node.output[0], "Transpose")
        dq = tr and _only(consumers, tr.output[0], "DequantizeLinear")
        matmuls = consumers.get(dq.output[0], []) if dq else []
        if not matmuls or any(m.op_type != "MatMul" or m.input[1] != dq.output[0] for m in matmuls):
            raise DeployError(f"{node.input[0]}: unexpected nodes around an int8 weight (internal error)")
        weight, scale = node.input[0], dq.input[1]
        n, blocks, bs = _dims(inputs[weight])
        scales = scale + BLOCKS
        if scales not in made:
            made[scales] = _tiled(scale, blocks, made)
        drop |= {id(node), id(dq), id(tr)}
        for m in matmuls:
            replace[id(m)] = made[scales] + [helper.make_node(
                "MatMulNBits", [m.input[0], weight, scales], list(m.output), name=(m.name or m.output[0]) + "/nbits",
                domain=MS_DOMAIN, K=blocks * bs, N=n, bits=8, block_size=bs, accuracy_level=accuracy_level)]
            made[scales] = []  # the tiling nodes go in once, before the first MatMulNBits that reads them
    nodes = [x for n in out.graph.node if id(n) not in drop for x in replace.get(id(n), [n])]
    replace_nodes(out, nodes)
    _drop_unused_constants(out)
    if not any(o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return out


def _tiled(scale, blocks, made):
    """Nodes computing scale (N,) -> (N, 1) -> tiled (N, blocks) -> (N * blocks,) as `scale + BLOCKS`."""
    nodes = []
    for name, values in (("nbits/column", [-1, 1]), ("nbits/flat", [-1]), (f"nbits/repeats_{blocks}", [1, blocks])):
        if name not in made:
            made[name] = []
            value = helper.make_tensor(name, onnx.TensorProto.INT64, [len(values)], values)
            nodes.append(helper.make_node("Constant", [], [name], name=name, value=value))
    base = scale + BLOCKS
    return nodes + [
        helper.make_node("Reshape", [scale, "nbits/column"], [base + "/column"], name=base + "/Reshape"),
        helper.make_node("Tile", [base + "/column", f"nbits/repeats_{blocks}"], [base + "/tiled"], name=base + "/Tile"),
        helper.make_node("Reshape", [base + "/tiled", "nbits/flat"], [base], name=base + "/Flatten")]


def _only(consumers, tensor, op_type):
    users = consumers.get(tensor, [])
    return users[0] if len(users) == 1 and users[0].op_type == op_type else None


def _drop_unused_constants(proto):
    read = {i for n in proto.graph.node for i in n.input}
    replace_nodes(proto, [n for n in proto.graph.node if n.op_type != "Constant" or n.output[0] in read])


def variants(proto):
    """{graph-file suffix: copy of a pre-fused graph (weights attached) at that variant's accuracy level}."""
    out = {}
    for variant, (_, level) in VARIANTS.items():
        out[variant] = onnx.ModelProto()
        out[variant].CopyFrom(proto)
        for node in out[variant].graph.node:
            for a in node.attribute if node.op_type == "MatMulNBits" else ():
                if a.name == "accuracy_level":
                    a.i = level
    return out


def variant_file(kind, variant):
    """The graph file of a pre-fused variant: `prefill.nbits.onnx`, `decode.nbits-exact.onnx`."""
    return f"{kind}.{variant}.onnx"


def count(proto):
    return sum(n.op_type == "MatMulNBits" for n in proto.graph.node)
