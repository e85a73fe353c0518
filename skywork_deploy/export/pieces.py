"""Cut a bundle graph into pieces at decoder-layer boundaries, for the layer-streamed run (streamed.py).

    input_ids ─► [embed] ─► [layers 0..g-1] ─► [layers g..2g-1] ─► … ─► [final norm + lm_head] ─► logits
                               │  ▲ past.i                 │  ▲
                               ▼  present.i                ▼

Each node gets a level: 0 the embedding, N + 1 decoder layer N, L + 1 the head (final norm, lm_head). A node
is anchored by the names it touches: weights named `layers.N.` (N + 1), `embed_tokens` (0), `model.norm.` /
`lm_head` (L + 1), read directly or through a constant subgraph (an int8 weight's Reshape -> Transpose ->
DequantizeLinear), and the graph inputs/outputs `past_key_values.N.*` / `present.N.*` (N + 1). Levels only grow
along edges: a node's level is at least its producers' (so the contrib graphs' SkipSimplifiedLayerNormalization
that adds layer N's residual and normalises with layer N + 1's weight lands in layer N + 1, and its (hidden,
residual) pair is what crosses the boundary); a node without an anchor goes as late as its consumers allow
(the rotary tables and the attention mask are computed in the first layer that reads them, then handed on).

Constant subgraphs (nodes computing only from initializers and Constant nodes: shapes, the MatMulNBits block
scales) are copied into every piece that reads them, like initializers, so ONNX Runtime folds them at load
exactly as in the whole graph; every other node is in exactly one piece. A piece's inputs are the graph
inputs and earlier pieces' outputs it reads; its outputs are what later pieces or the graph's outputs need.
Nothing here reads a weight: the pieces reference the same external data file as the graph they come from.
"""
import re
from dataclasses import dataclass, field

import onnx
from onnx import helper

from ..base.errors import ModelFormatError

LAYER = re.compile(r"(?:^|[./])layers\.(\d+)\.")
KV_NAME = re.compile(r"^(?:past_key_values|present)\.(\d+)\.")
HEAD = re.compile(r"(?:^|[./])(?:model\.norm\.|lm_head)")
EMBED = re.compile(r"embed_tokens")


@dataclass
class Piece:
    name: str  # "embed", "layers 0-3", "head"
    levels: tuple  # the node levels it holds (0 embed, N + 1 layer N, L + 1 head)
    nodes: list = field(default_factory=list)  # indices into graph.node, in graph order (constants included)
    constants: list = field(default_factory=list)  # the copied constant-subgraph nodes among `nodes`
    inputs: list = field(default_factory=list)  # graph inputs and earlier pieces' tensors it reads
    outputs: list = field(default_factory=list)  # tensors later pieces or the graph outputs need


def _anchor(names, num_layers):
    """The level the weight and K/V names a node touches pin it to, or None."""
    found = []
    for name in names:
        kv = KV_NAME.match(name)
        layer = None if kv else LAYER.search(name)
        if kv or layer:
            found.append(int((kv or layer).group(1)) + 1)
        elif HEAD.search(name):
            found.append(num_layers + 1)
        elif EMBED.search(name):
            found.append(0)
    return max(found) if found else None


def _touched(proto, constants):
    """Per node, the weight and K/V names it touches: its initializers (also through the constant subgraphs it
    reads, e.g. an int8 weight's Reshape -> DequantizeLinear), and the past/present names it reads or writes."""
    initializers = {t.name for t in proto.graph.initializer}
    sources = {}  # constant-subgraph tensor -> initializers it is computed from
    out = []
    for i, node in enumerate(proto.graph.node):
        names = set()
        for x in node.input:
            names |= {x} if x in initializers else sources.get(x, set())
        if i in constants:
            for o in node.output:
                sources[o] = names
            out.append(set())
            continue
        names |= {x for x in list(node.input) + list(node.output) if KV_NAME.match(x)}
        out.append(names)
    return out


def constant_nodes(proto):
    """Indices of the nodes that compute only from initializers and other such nodes (foldable at load)."""
    known = {t.name for t in proto.graph.initializer} | {""}
    out = set()
    for i, node in enumerate(proto.graph.node):
        if all(x in known for x in node.input):
            out.add(i)
            known.update(node.output)
    return out


def num_layers_of(proto):
    """Decoder layers of a graph, from its weights' and K/V names."""
    names = [t.name for t in proto.graph.initializer] + [v.name for v in proto.graph.input]
    layers = {int(m.group(1)) for n in names for m in [LAYER.search(n) or KV_NAME.match(n)] if m}
    if not layers:
        raise ModelFormatError(f"graph {proto.graph.name!r}: no `layers.N.` weights or past/present K/V names, so "
                               "it cannot be cut at decoder layers (validate with --validation whole)")
    return max(layers) + 1


def levels(proto, num_layers=None):
    """Level of every node (list by node index); constant-subgraph nodes get None."""
    num_layers = num_layers_of(proto) if num_layers is None else num_layers
    constants = constant_nodes(proto)
    nodes = proto.graph.node
    produced, consumers = {}, {}
    for i, node in enumerate(nodes):
        for o in node.output:
            produced[o] = i
        for x in node.input:
            consumers.setdefault(x, []).append(i)
    outputs = {o.name for o in proto.graph.output}
    anchors = [None if i in constants else _anchor(names, num_layers)
               for i, names in enumerate(_touched(proto, constants))]
    level = [None] * len(nodes)
    for i, node in enumerate(nodes):  # graph order is topological: as early as the producers allow
        if i in constants:
            continue
        below = [level[produced[x]] for x in node.input if x in produced and produced[x] not in constants]
        level[i] = max([anchors[i] or 0] + below)
    for i in reversed(range(len(nodes))):  # unanchored: as late as the consumers allow
        if i in constants or anchors[i] is not None or any(o in outputs for o in nodes[i].output):
            continue
        later = [level[c] for o in nodes[i].output for c in consumers.get(o, ()) if c not in constants]
        if later:
            level[i] = max(level[i], min(later))
    return level


def crossing_tensors(proto, node_levels):
    """{tensor: (producer level, {consumer levels})} of every non-constant tensor read at another level."""
    produced = {o: node_levels[i] for i, n in enumerate(proto.graph.node) if node_levels[i] is not None
                for o in n.output}
    out = {}
    for i, node in enumerate(proto.graph.node):
        for x in node.input:
            if x in produced and node_levels[i] is not None and node_levels[i] != produced[x]:
                out.setdefault(x, (produced[x], set()))[1].add(node_levels[i])
    return out


def group_levels(num_layers, layers_per_piece):
    """[(name, levels)]: the embedding, the layers in groups of `layers_per_piece`, the head."""
    groups = [("embed", (0,))]
    for start in range(0, num_layers, layers_per_piece):
        stop = min(start + layers_per_piece, num_layers)
        name = f"layer {start}" if stop - start == 1 else f"layers {start}-{stop - 1}"
        groups.append((name, tuple(range(start + 1, stop + 1))))
    return groups + [("head", (num_layers + 1,))]


def cut(proto, layers_per_piece=1, num_layers=None):
    """The pieces of a graph, in run order (empty ones dropped)."""
    num_layers = num_layers_of(proto) if num_layers is None else num_layers
    node_levels = levels(proto, num_layers)
    nodes = proto.graph.node
    constants = constant_nodes(proto)
    graph_outputs = [o.name for o in proto.graph.output]
    pieces = []
    for name, group in group_levels(num_layers, max(1, int(layers_per_piece))):
        mine = [i for i, lv in enumerate(node_levels) if lv in group]
        if mine:
            pieces.append(Piece(name, group, mine))
    produced_by = {o: k for k, p in enumerate(pieces) for i in p.nodes for o in nodes[i].output}
    read_by = {}
    for k, p in enumerate(pieces):
        for i in p.nodes:
            for x in nodes[i].input:
                read_by.setdefault(x, set()).add(k)
    const_out = {o for i in constants for o in nodes[i].output} | {t.name for t in proto.graph.initializer}
    for k, p in enumerate(pieces):
        made = {o for i in p.nodes for o in nodes[i].output}
        read = dict.fromkeys(x for i in p.nodes for x in nodes[i].input)
        p.inputs = [x for x in read if x and x not in made and x not in const_out]
        if any(produced_by.get(x, -1) > k for x in p.inputs):
            raise ModelFormatError(f"piece {p.name!r} reads a tensor a later piece makes (internal error)")
        p.outputs = [o for i in p.nodes for o in nodes[i].output
                     if o in graph_outputs or any(r > k for r in read_by.get(o, ()))]
        p.constants = _constants_for(proto, constants, p)
        p.nodes = sorted(set(p.nodes) | set(p.constants))
    return pieces


def _constants_for(proto, constants, piece):
    """The constant-subgraph nodes a piece's own nodes read, transitively."""
    nodes = proto.graph.node
    producer = {o: i for i in constants for o in nodes[i].output}
    need, todo = set(), [x for i in piece.nodes for x in nodes[i].input]
    while todo:
        x = todo.pop()
        i = producer.get(x)
        if i is not None and i not in need:
            need.add(i)
            todo.extend(nodes[i].input)
    return sorted(need)


def piece_model(proto, piece, input_types=None):
    """One piece as a ModelProto over the same initializers (external data references, not bytes).

    `input_types` {tensor: ONNX element type} for the boundary inputs (the graph's own inputs keep their
    declared types; float when not given); outputs other than the graph's are left for ONNX Runtime to type.
    """
    types = input_types or {}
    nodes = [proto.graph.node[i] for i in piece.nodes]
    read = {x for n in nodes for x in n.input}
    declared = {v.name: v for v in proto.graph.input}
    inputs = [declared[x] if x in declared else
              helper.make_tensor_value_info(x, types.get(x, onnx.TensorProto.FLOAT), None) for x in piece.inputs]
    results = {v.name: v for v in proto.graph.output}
    outputs = [results[o] if o in results else onnx.ValueInfoProto(name=o) for o in piece.outputs]
    graph = helper.make_graph(nodes, f"{proto.graph.name}:{piece.name}", inputs, outputs,
                              initializer=[t for t in proto.graph.initializer if t.name in read])
    model = helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    model.functions.extend(proto.functions)
    return model
