"""Fuse projections that read the same activation into one MatMul over concatenated weights (ONNX Runtime graphs).

q/k/v of every layer read the normed hidden state, gate/up read the other one. In a decode step each MatMul is
a full pass over its weight plus a kernel launch on the thread pool; one MatMul over the concatenated weight
does the same arithmetic in one launch (each output column is still the same dot product, so the logits do
not change) and a Split hands each consumer its columns back:

    x ─► MatMul(W_q.T) ─► Add(b_q) ─► q          x ─► MatMul([W_q.T | W_k.T | W_v.T]) ─► Add([b_q|b_k|b_v])
    x ─► MatMul(W_k.T) ─► Add(b_k) ─► k    ==>                                     ─► Split(axis -1) ─► q, k, v
    x ─► MatMul(W_v.T) ─► Add(b_v) ─► v

int8 (standard flavour) fuses the same way one level up: DequantizeLinear(int8 W.T, scale, axis 1) over the
concatenated int8 weight and scales (per-output-channel scales concatenate like the columns they scale).
Nothing is materialised here: a fused parameter's recipe is the tuple of its parts' state names, and
weights.py streams the concatenation from the shards. The vacc flavour is never fused (its custom op is the
vendor's contract).
"""
import onnx
from onnx import helper

from .edit import attr, bypass, drop_unused_inputs, index, prune, replace_nodes

FUSED_JOIN = "+"


def _weight_of(matmul, params, producers, consumers):
    """("float", [weight]) or ("dq", [weight, scale, dq node]) when the MatMul's B is a fusable parameter."""
    b = matmul.input[1]
    if len(consumers.get(b, [])) != 1:
        return None
    if b in params and params[b][1]:
        return "float", [b]
    dq = producers.get(b)
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) != 2 or attr(dq, "axis", 1) != 1:
        return None
    w, scale = dq.input
    if w in params and params[w][1] and scale in params and not params[scale][1] \
            and len(consumers.get(w, [])) == 1 and len(consumers.get(scale, [])) == 1:
        return "dq", [w, scale, dq]
    return None


def _bias_of(matmul, params, consumers, inputs):
    """The Add(matmul output, 1-D bias parameter) right after `matmul`, if it is the only consumer."""
    users = consumers.get(matmul.output[0], [])
    if len(users) != 1 or users[0].op_type != "Add":
        return None
    add = users[0]
    other = [i for i in add.input if i != matmul.output[0]]
    if len(other) != 1 or other[0] not in params or params[other[0]][1]:
        return None
    if len(inputs[other[0]].type.tensor_type.shape.dim) != 1 or len(consumers.get(other[0], [])) != 1:
        return None
    return add, other[0]


def _fused_name(names):
    """'m.l.0.q_proj.weight.T', 'm.l.0.k_proj.weight.T' -> 'm.l.0.q_proj+k_proj.weight.T'."""
    parts = [n.split(".") for n in names]
    head = 0
    while all(len(p) > head and p[head] == parts[0][head] for p in parts):
        head += 1
    tail = 0
    while all(len(p) > tail + head and p[-1 - tail] == parts[0][-1 - tail] for p in parts):
        tail += 1
    middle = FUSED_JOIN.join(".".join(p[head:len(p) - tail]) for p in parts)
    return ".".join(parts[0][:head] + [middle] + (parts[0][len(parts[0]) - tail:] if tail else []))


def _dims(value):
    return [d.dim_value for d in value.type.tensor_type.shape.dim]


def fuse_projections(proto, params):
    """Fuse, in place, every group of >= 2 MatMuls that share input A and read transposed parameters.

    `params` ({graph input: (recipe, transposed)}) loses the parts and gains the fused parameters, whose
    recipe is the tuple of the parts' recipes (concatenated along the output channels). Returns the number
    of groups fused.
    """
    inputs = {v.name: v for v in proto.graph.input}
    _drop_identity_casts(proto, params, inputs)
    producers, consumers = index(proto)
    groups = {}
    for node in proto.graph.node:
        if node.op_type != "MatMul":
            continue
        weight = _weight_of(node, params, producers, consumers)
        if weight is None:
            continue
        kind, names = weight
        elem = inputs[names[0]].type.tensor_type.elem_type
        groups.setdefault((node.input[0], kind, elem), []).append((node, names))
    replaced, placed = set(), {}
    for (x, kind, elem), members in groups.items():
        if len(members) < 2:
            continue
        new_nodes, drop = _fuse_group(proto, params, inputs, consumers, x, kind, members)
        replaced |= drop
        placed[id(members[0][0])] = new_nodes
    nodes = []
    for node in proto.graph.node:
        if id(node) in placed:
            nodes += placed[id(node)]
        if id(node) not in replaced:
            nodes.append(node)
    replace_nodes(proto, nodes)
    _drop_split_concat(proto)
    drop_unused_inputs(proto, params)
    return len(placed)


def _drop_split_concat(proto):
    """Concat(Split(y)) that puts every part back in order along the same axis is y: a consumer that wants
    the packed projections (GroupQueryAttention takes q|k|v as one tensor) reads the fused MatMul directly."""
    producers, consumers = index(proto)
    renames = {}
    for node in proto.graph.node:
        split = producers.get(node.input[0]) if node.op_type == "Concat" and node.input else None
        if split is None or split.op_type != "Split" or list(node.input) != list(split.output):
            continue
        if attr(node, "axis") != attr(split, "axis", 0) or any(len(consumers[o]) != 1 for o in split.output):
            continue
        renames[node.output[0]] = split.input[0]
    if renames:
        bypass(proto, renames)
        prune(proto)


def _drop_identity_casts(proto, params, inputs):
    """Bypass Cast(parameter) to the parameter's own type (int8 layers trace `bias.to(x.dtype)`), so that the
    bias Adds of a fused group see their parameters directly."""
    bypass(proto, {node.output[0]: node.input[0] for node in proto.graph.node
                   if node.op_type == "Cast" and node.input[0] in params and node.input[0] in inputs
                   and attr(node, "to") == inputs[node.input[0]].type.tensor_type.elem_type})


def _add_param(proto, params, inputs, names, elem, dims, transposed):
    name = _fused_name(names)
    params[name] = (tuple(params[n][0] for n in names), transposed)
    value = helper.make_tensor_value_info(name, elem, dims)
    proto.graph.input.append(value)
    inputs[name] = value
    return name


def _fuse_group(proto, params, inputs, consumers, x, kind, members):
    """The nodes replacing one group, and the ids of the nodes they replace."""
    weights = [names[0] for _, names in members]
    widths = [_dims(inputs[w])[1] for w in weights]
    k = _dims(inputs[weights[0]])[0]
    elem = inputs[weights[0]].type.tensor_type.elem_type
    w = _add_param(proto, params, inputs, weights, elem, [k, sum(widths)], True)
    base = members[0][0].name or members[0][0].output[0]
    drop = {id(node) for node, _ in members}
    nodes = []
    if kind == "dq":
        scales = [names[1] for _, names in members]
        s_elem = inputs[scales[0]].type.tensor_type.elem_type
        s = _add_param(proto, params, inputs, scales, s_elem, [sum(widths)], False)
        drop |= {id(names[2]) for _, names in members}
        nodes.append(helper.make_node("DequantizeLinear", [w, s], [w + "/dq"], name=base + "/fused/dq", axis=1))
        w = w + "/dq"
    fused = base + "/fused"
    nodes.append(helper.make_node("MatMul", [x, w], [fused + "/MatMul_output_0"], name=fused + "/MatMul"))
    y = fused + "/MatMul_output_0"
    biases = [_bias_of(node, params, consumers, inputs) for node, _ in members]
    if all(biases):
        b = _add_param(proto, params, inputs, [name for _, name in biases],
                       inputs[biases[0][1]].type.tensor_type.elem_type, [sum(widths)], False)
        nodes.append(helper.make_node("Add", [y, b], [fused + "/Add_output_0"], name=fused + "/Add"))
        y = fused + "/Add_output_0"
        outputs = [add.output[0] for add, _ in biases]
        drop |= {id(add) for add, _ in biases}
    else:
        outputs = [node.output[0] for node, _ in members]
    sizes = helper.make_tensor(fused + "/split_sizes", onnx.TensorProto.INT64, [len(widths)], widths)
    nodes.append(helper.make_node("Constant", [], [fused + "/split_sizes"], name=fused + "/SplitSizes",
                                  value=sizes))
    nodes.append(helper.make_node("Split", [y, fused + "/split_sizes"], outputs, name=fused + "/Split", axis=-1))
    return nodes, drop
