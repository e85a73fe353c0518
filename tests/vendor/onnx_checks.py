"""A plain torch.onnx.export of a model built from a config, and the checks a 2023 stack applies to it.

No exporter patch and no wrapper: the model (config `torchscript: true`, so it returns tuples) is exported
as it is, then onnx.checker (full check), onnxsim and onnxruntime see the file.
"""
import inspect

import torch

OPSET = 17
VENDOR_DOMAIN, VENDOR_OP = "Vastai", "QuantizedLinearPerChannel"


def _example(model, iter_num, b=2, s=7, past_len=5):
    """Inputs of the prefill (iter0) or decode (iter1) graph, and their names."""
    cfg = model.config
    g = torch.Generator().manual_seed(iter_num)
    if iter_num == 0:
        ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
        mask = torch.ones(b, s, dtype=torch.long)
        mask[1, :2] = 0  # left padding
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return (ids, mask, pos), ["input_ids", "attention_mask", "position_ids"]
    attn = model.model.layers[0].self_attn
    past = tuple((torch.randn(b, attn.num_kv_heads, past_len, attn.head_dim, generator=g),
                  torch.randn(b, attn.num_kv_heads, past_len, attn.head_dim, generator=g))
                 for _ in range(cfg.num_hidden_layers))  # (B, KVH, P, D)
    ids = torch.randint(0, cfg.vocab_size, (b, 1), generator=g)
    mask = torch.ones(b, past_len + 1, dtype=torch.long)
    pos = torch.full((b, 1), past_len, dtype=torch.long)
    names = ["input_ids", "attention_mask", "position_ids"]
    names += [f"past_key_values.{i}.{n}" for i in range(cfg.num_hidden_layers) for n in ("key", "value")]
    return (ids, mask, pos, past), names


def _flat(outputs):
    if isinstance(outputs, (tuple, list)):
        return [t for o in outputs for t in _flat(o)]
    return [outputs]


def export_graph(model, iter_num, path):
    """Export, check (onnx full check, onnxsim), return (proto, ORT feeds, torch outputs as numpy)."""
    import onnx
    import onnxsim

    args, names = _example(model, iter_num)
    n_layers = model.config.num_hidden_layers
    out_names = ["logits"] + [f"present.{i}.{n}" for i in range(n_layers) for n in ("key", "value")]
    axes = {n: {0: "batch", 1: "sequence"} for n in ("input_ids", "attention_mask", "position_ids")}
    kwargs = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript exporter, as torch 2.1 has only that one
    if any(type(m).__name__ == "QuantizedLinearPerChannel" for m in model.modules()):
        kwargs["custom_opsets"] = {VENDOR_DOMAIN: 1}
    with torch.no_grad():
        expected = [t.numpy() for t in _flat(model(*args))]
        torch.onnx.export(model, args, str(path), input_names=names, output_names=out_names, dynamic_axes=axes,
                          opset_version=OPSET, **kwargs)
    proto = onnx.load(str(path))
    assert not doubles(proto), doubles(proto)  # torch 2.1 once wrote a double fill constant into Where
    onnx.checker.check_model(proto, full_check=True)
    simplified, ok = onnxsim.simplify(proto, skip_shape_inference=False)
    assert ok, "onnxsim could not validate the simplified graph"
    onnx.checker.check_model(simplified, full_check=True)
    feeds = dict(zip(names, [t.numpy() for t in _flat(args)]))
    return proto, feeds, expected


def run_ort(path, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in wanted})


def vendor_nodes(proto):
    """The Vastai::QuantizedLinearPerChannel nodes, each checked: 3 inputs, no attributes, int8 weight."""
    import onnx

    inits = {t.name: t for t in proto.graph.initializer}
    nodes = [n for n in proto.graph.node if n.domain == VENDOR_DOMAIN and n.op_type == VENDOR_OP]
    for node in nodes:
        assert len(node.input) == 3 and not node.attribute, node
        assert inits[node.input[1]].data_type == onnx.TensorProto.INT8, node.input[1]
        assert inits[node.input[2]].data_type == onnx.TensorProto.FLOAT, node.input[2]
    return nodes


def doubles(proto):
    """Names of initializers, Constant nodes and Casts of type double: none belongs in an fp32 graph."""
    import onnx

    double = onnx.TensorProto.DOUBLE
    found = [t.name for t in proto.graph.initializer if t.data_type == double]
    for node in proto.graph.node:
        for attr in node.attribute:
            if (attr.name == "value" and attr.t.data_type == double) or (node.op_type == "Cast" and attr.i == double):
                found.append(node.name or node.op_type)
    return found
