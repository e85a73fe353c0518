"""Small in-place edits of a weightless ONNX graph, shared by the export passes (int8, fold, fuse, contrib).

`params` is the passes' common map {graph input that is a weight: (recipe, transposed)}.
"""
from onnx import helper

from ..base.errors import ModelFormatError


def index(proto):
    """({tensor: producing node}, {tensor: [consuming nodes]})."""
    producers, consumers = {}, {}
    for node in proto.graph.node:
        for o in node.output:
            producers[o] = node
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    return producers, consumers


def attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def replace_nodes(proto, nodes):
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def bypass(proto, renames):
    """Drop every node whose output is a key of `renames` and feed its consumers the mapped tensor instead."""
    for out in proto.graph.output:
        if out.name in renames:  # a weight passed straight out: never happens in our graphs, refuse loudly
            raise ModelFormatError(f"graph output {out.name} would be bypassed to {renames[out.name]}")
    nodes = [n for n in proto.graph.node if not any(o in renames for o in n.output)]
    for node in nodes:
        for k, name in enumerate(node.input):
            if name in renames:
                node.input[k] = renames[name]
    replace_nodes(proto, nodes)


def drop_unused_inputs(proto, params):
    """Remove weight inputs no node reads any more, from the graph and from `params`."""
    used = {i for n in proto.graph.node for i in n.input}
    keep = [v for v in proto.graph.input if v.name in used or v.name not in params]
    for v in proto.graph.input:
        if v.name not in used and v.name in params:
            del params[v.name]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)


def prune(proto):
    """Drop nodes none of whose outputs is read (by a node or as a graph output), until none is left."""
    while True:
        read = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
        nodes = [n for n in proto.graph.node if any(o in read for o in n.output)]
        if len(nodes) == len(proto.graph.node):
            return
        replace_nodes(proto, nodes)
