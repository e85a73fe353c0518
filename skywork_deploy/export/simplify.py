"""onnxsim on the weightless graph.

The graphs are simplified before the weights are attached: parameters are still graph inputs, so onnxsim
folds only shape arithmetic and constants, never copies a weight (no duplicated tied embedding), and needs
memory for the graph structure only (a few MB even for 32B). The threshold guards the structure size anyway.
"""
import logging

log = logging.getLogger(__name__)
MAX_GRAPH_BYTES = 512 << 20


def node_count(proto):
    return len(proto.graph.node)


def simplify(proto, name):
    """(proto, info): the simplified graph when onnxsim helps, else the input; info records why."""
    before = node_count(proto)
    info = {"applied": False, "nodes_before": before, "nodes_after": before, "message": None}
    size = proto.ByteSize()
    if size > MAX_GRAPH_BYTES:
        info["message"] = f"{name}: graph structure is {size >> 20} MB (> {MAX_GRAPH_BYTES >> 20} MB); skipped"
        log.warning(info["message"])
        return proto, info
    try:
        import onnxsim
    except ImportError:
        info["message"] = "onnxsim is not installed; skipped (pip install onnxsim)"
        log.warning(info["message"])
        return proto, info
    inputs = [v.name for v in proto.graph.input]
    try:
        simplified, ok = onnxsim.simplify(proto, check_n=0, skip_shape_inference=False)
    except Exception as exc:  # onnxsim raises bare exceptions from C++ (e.g. an unknown custom domain)
        info["message"] = f"{name}: onnxsim failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); " \
                          "kept the unsimplified graph"
        log.warning(info["message"])
        return proto, info
    if not ok or [v.name for v in simplified.graph.input] != inputs:
        info["message"] = f"{name}: onnxsim changed the graph inputs or failed its check; kept the original"
        log.warning(info["message"])
        return proto, info
    after = node_count(simplified)
    if after >= before:
        info.update(nodes_after=after, message=f"{name}: onnxsim did not reduce the node count; kept the original")
        return proto, info
    del simplified.graph.value_info[:]
    info.update(applied=True, nodes_after=after)
    return simplified, info
