"""The two graphs (prefill, decode) traced from our Qwen2 core without real weights.

The model is built on the meta device and then given uninitialised CPU storage (`to_empty`): the trace runs
the forward on pages the kernel never materialises, so tracing a 7B shape costs a few hundred MB. The
TorchScript exporter writes the graph with `export_params=False` (parameters become graph inputs named after
the state dict) and with its own shape inference off (that pass walks every parameter and took 68 s and
2.9 GB on the 0.5B shape). `weights.py` then turns those inputs into initializers streamed from the shards.

I/O names follow the contract (/tmp/team/CONTRACT_EXPORT.md): `input_ids`, `attention_mask`,
`position_ids`, `past_key_values.<i>.key|value` in; `logits`, `present.<i>.key|value` out.
"""
import contextlib
import io
import logging
import warnings

log = logging.getLogger(__name__)
OPSET = 17
BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
TRACE_BATCH, TRACE_SEQ = 2, 16  # example shapes; a sequence of 1 would look static to the tracer


def skeleton(folder, dtype="fp32", int8=False):
    """Our Qwen2ForCausalLM for `folder` with uninitialised weights (no file is read but config.json)."""
    import torch

    from ..base.modeling import torch_dtype
    from ..source_code.configuration_qwen2_vacc import Qwen2Config
    from ..source_code.modeling_qwen2_vacc import Qwen2ForCausalLM

    config = Qwen2Config.from_pretrained(str(folder))
    config.insert_slice = True
    already_int8 = bool(config.vacc_quantization)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config).to(torch_dtype(dtype))
        if int8 and not already_int8:
            model.quantize(8, empty=True)
    model = model.to_empty(device="cpu").eval()
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


class PrefillGraph:
    """Flat prefill: (input_ids, attention_mask, position_ids) -> (logits[B,1,V], present.0.key, ...)."""

    @staticmethod
    def wrap(model):
        import torch

        class Prefill(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask, position_ids):
                out = self.m(input_ids, attention_mask=attention_mask, position_ids=position_ids, iter_num=0)
                return (out.logits,) + tuple(t for kv in out.past_key_values for t in kv)

        return Prefill(model)


class DecodeGraph:
    """Flat decode: (input_ids[B,1], attention_mask[B,P+1], position_ids[B,1], past...) -> (logits, present...)."""

    @staticmethod
    def wrap(model):
        import torch

        class Decode(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask, position_ids, *past):
                pairs = tuple((past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2))
                out = self.m(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=pairs, iter_num=1)
                return (out.logits,) + tuple(t for kv in out.past_key_values for t in kv)

        return Decode(model)


def io_spec(kind, num_layers, kv_heads, head_dim, vocab, float_type, seq=None):
    """[(name, dtype, shape)] inputs and outputs of a graph; `seq` fixes prefill's sequence axis."""
    s = seq if seq is not None else SEQ
    present = [(f"present.{i}.{n}", float_type, [BATCH, kv_heads, s if kind == "prefill" else TOTAL, head_dim])
               for i in range(num_layers) for n in ("key", "value")]
    outputs = [("logits", float_type, [BATCH, 1, vocab])] + present
    if kind == "prefill":
        inputs = [(n, "int64", [BATCH, s]) for n in ("input_ids", "attention_mask", "position_ids")]
    else:
        inputs = [("input_ids", "int64", [BATCH, 1]), ("attention_mask", "int64", [BATCH, TOTAL]),
                  ("position_ids", "int64", [BATCH, 1])]
        inputs += [(f"past_key_values.{i}.{n}", float_type, [BATCH, kv_heads, PAST, head_dim])
                   for i in range(num_layers) for n in ("key", "value")]
    return inputs, outputs


def _dynamic_axes(inputs, outputs):
    return {name: {i: d for i, d in enumerate(shape) if isinstance(d, str)} for name, _, shape in inputs + outputs}


def trace(model, kind, seq=None, attempts=3):
    """Trace one graph; returns (onnx.ModelProto without weights, {graph input name: state-dict name}).

    A trace that defines a name twice (the exporter's value-based dedup of parameters did this before it was
    turned off) is detected and traced again, then refused with a clear error.
    """
    from ..base.errors import ModelFormatError

    for attempt in range(attempts):
        proto, params = _trace_once(model, kind, seq)
        problem = ssa_problem(proto)
        if problem is None:
            return proto, params
        log.warning("%s trace %d: %s; tracing again", kind, attempt + 1, problem)
    raise ModelFormatError(f"{kind}: the TorchScript exporter produced an invalid graph {attempts} times "
                           f"({problem}); please report this")


def _has_quantized(model):
    return any(type(m).__name__ == "QuantizedLinearPerChannel" for m in model.modules())


def ssa_problem(proto):
    """A description of the first name defined twice (inputs, initializers, node outputs), else None."""
    seen = set()
    defined = [v.name for v in proto.graph.input] + [t.name for t in proto.graph.initializer]
    defined += [o for n in proto.graph.node for o in n.output if o]
    for name in defined:
        if name in seen:
            return f"{name!r} is defined more than once"
        seen.add(name)
    return None


def _trace_once(model, kind, seq=None):
    import onnx
    import torch
    from torch.onnx._internal.torchscript_exporter.utils import _export

    cfg = model.config
    attn = model.model.layers[0].self_attn
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    float_type = "float16" if dtype == torch.float16 else "float32"
    inputs, outputs = io_spec(kind, cfg.num_hidden_layers, attn.num_kv_heads, attn.head_dim, cfg.vocab_size,
                              float_type, seq)
    b, s = TRACE_BATCH, seq or TRACE_SEQ
    if kind == "prefill":
        wrapper = PrefillGraph.wrap(model)
        args = (torch.ones(b, s, dtype=torch.long), torch.ones(b, s, dtype=torch.long),
                torch.arange(s).repeat(b, 1))
    else:
        wrapper = DecodeGraph.wrap(model)
        past = tuple(torch.zeros(b, attn.num_kv_heads, TRACE_SEQ, attn.head_dim, dtype=dtype)
                     for _ in range(2 * cfg.num_hidden_layers))
        args = (torch.ones(b, 1, dtype=torch.long), torch.ones(b, TRACE_SEQ + 1, dtype=torch.long),
                torch.full((b, 1), TRACE_SEQ, dtype=torch.long)) + past
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Private entry point: the public one cannot turn off the exporter's shape inference pass.
        _export(wrapper, args, buf, export_params=False, do_constant_folding=False, onnx_shape_inference=False,
                opset_version=OPSET, input_names=[n for n, _, _ in inputs],
                output_names=[n for n, _, _ in outputs], dynamic_axes=_dynamic_axes(inputs, outputs),
                custom_opsets={"Vastai": 1} if _has_quantized(model) else None,
                # keeps the exporter from "deduplicating" parameters by value: uninitialised (all-zero) weights
                # compare equal and were merged through Identity nodes (a name defined twice, a dropped lm_head)
                keep_initializers_as_inputs=True)
    proto = onnx.load_from_string(buf.getvalue())
    _declare_missing_params(proto, wrapper)
    _set_io(proto, inputs, outputs)
    return proto, _param_names(proto, {n for n, _, _ in inputs})


def _declare_missing_params(proto, wrapper):
    """Declare parameters that nodes use but the exporter left out of the graph inputs.

    With export_params=False the TorchScript exporter drops the last parameter (lm_head.weight) from the
    input list while nodes still consume it; declare it from the module's own tensor.
    """
    import onnx
    from onnx.helper import np_dtype_to_tensor_dtype

    declared = {v.name for v in proto.graph.input} | {t.name for t in proto.graph.initializer}
    declared |= {o for n in proto.graph.node for o in n.output}
    used = {i for n in proto.graph.node for i in n.input}
    for name, tensor in wrapper.state_dict(keep_vars=True).items():
        if name in used and name not in declared:
            elem = np_dtype_to_tensor_dtype(tensor.detach()[:0].numpy().dtype)
            proto.graph.input.append(onnx.helper.make_tensor_value_info(name, elem, list(tensor.shape)))


def _param_names(proto, io_names):
    """Graph inputs that are parameters: strip the wrapper's `m.` prefix to get the state-dict name."""
    names = {}
    for value in proto.graph.input:
        if value.name not in io_names:
            names[value.name] = value.name[2:] if value.name.startswith("m.") else value.name
    return names


def _set_io(proto, inputs, outputs):
    """Declare the contract's element types and (symbolic) shapes on the graph inputs and outputs."""
    import onnx

    types = {"int64": onnx.TensorProto.INT64, "float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16}
    declared = {name: (dtype, shape) for name, dtype, shape in inputs + outputs}
    for value in list(proto.graph.input) + list(proto.graph.output):
        if value.name not in declared:
            continue
        dtype, shape = declared[value.name]
        new = onnx.helper.make_tensor_value_info(value.name, types[dtype], shape)
        value.CopyFrom(new)
    del proto.graph.value_info[:]


@contextlib.contextmanager
def export_patches(patches):
    """Apply [(owner, attribute, replacement, reason)] for the duration of the block, then restore them."""
    saved = []
    try:
        for owner, attr, replacement, reason in patches:
            log.debug("export patch %s.%s: %s", getattr(owner, "__name__", owner), attr, reason)
            saved.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, replacement)
        yield
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)
