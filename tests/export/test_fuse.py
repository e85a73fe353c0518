"""Export graph speedups for ONNX Runtime: fused q/k/v and gate/up projections, grouped-query attention without
repeated K/V, ONNX Runtime contrib kernels (--ort-ops contrib) against the standard-ops graph; the int8 lm_head
(tied embedding) path through quantize -> export -> run."""
import numpy as np
import pytest

LAYERS = 2


@pytest.fixture(scope="module")
def small_model(tiny_model_factory):
    return tiny_model_factory("gqa", tokenizer=True, vocab_size=1024)


def _initializers(path):
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}, proto


def _checkpoint(folder):
    from safetensors.numpy import load_file

    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _run_chain(bundle, steps=3):
    """Logits of a left-padded batch of 2: prefill, then `steps` greedy decode steps (numpy in, numpy out)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = {k: ort.InferenceSession(str(bundle / f"{k}.onnx"), opts, providers=["CPUExecutionProvider"])
            for k in ("prefill", "decode")}
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, (2, 8)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    outs = sess["prefill"].run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos})
    logits, kv, result = outs[0], outs[1:], [outs[0]]
    past = [i.name for i in sess["decode"].get_inputs() if i.name.startswith("past")]
    for _ in range(steps):
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        feeds = {"input_ids": logits[:, -1].argmax(-1)[:, None].astype(np.int64), "attention_mask": mask,
                 "position_ids": mask.sum(-1, keepdims=True) - 1, **dict(zip(past, kv))}
        outs = sess["decode"].run(None, feeds)
        logits, kv = outs[0], outs[1:]
        result.append(logits)
    return np.concatenate(result, 1)


def test_fused_weights_are_the_concatenation_and_logits_match_unfused(small_model, tmp_path, monkeypatch):
    from skywork_deploy.export import attention, export_model, fuse

    result = export_model(small_model, tmp_path / "fused", ort_ops="onnx")
    assert result["validation"]["passed"]
    inits, proto = _initializers(tmp_path / "fused" / "decode.onnx")
    ckpt = _checkpoint(small_model)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        qkv = inits[f"m.{p}self_attn.q_proj+k_proj+v_proj.weight.T"]
        want = np.concatenate([ckpt[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]).T
        np.testing.assert_array_equal(qkv, want.astype(np.float32))
        bias = inits[f"m.{p}self_attn.q_proj+k_proj+v_proj.bias"]
        np.testing.assert_array_equal(bias, np.concatenate([ckpt[p + f"self_attn.{n}_proj.bias"] for n in "qkv"]))
        gate_up = inits[f"m.{p}mlp.gate_proj+up_proj.weight.T"]
        np.testing.assert_array_equal(gate_up, np.concatenate([ckpt[p + "mlp.gate_proj.weight"],
                                                               ckpt[p + "mlp.up_proj.weight"]]).T)
    fused = [i for i, n in enumerate(proto.graph.node) if n.op_type == "MatMul" and "+" in n.input[1]]
    assert len(fused) == 2 * LAYERS
    ops = [n.op_type for n in proto.graph.node]
    assert "Expand" not in ops[fused[0]:] and "Shape" not in ops[fused[0]:]  # no repeated K/V, no shape math

    monkeypatch.setattr(fuse, "fuse_projections", lambda proto, params: 0)
    monkeypatch.setattr(attention, "ort_patches", lambda: [])
    export_model(small_model, tmp_path / "plain", ort_ops="onnx")
    plain_ops = [n.op_type for n in _initializers(tmp_path / "plain" / "decode.onnx")[1].graph.node]
    assert "Split" not in plain_ops and plain_ops.count("Expand") >= 2 * LAYERS
    fused, plain = _run_chain(tmp_path / "fused"), _run_chain(tmp_path / "plain")
    assert np.abs(fused - plain).max() <= 1e-5
    assert (fused.argmax(-1) == plain.argmax(-1)).all()


def test_int8_lm_head_of_a_tied_model_quantize_export_run(tiny_model_factory, tmp_path):
    """quantize --include-lm-head on a tied model: the embedding stays fp32 for the Gather, lm_head gets its
    own int8 copy (MatMulNBits-fusable DequantizeLinear + MatMul); fused q/k/v and gate/up hold the
    quantized parts side by side; validation passes; the runtime generates."""
    from skywork_deploy.export import export_model
    from skywork_deploy.quantize import quantize_model
    from skywork_deploy.runtime.backends import make_backend
    from skywork_deploy.runtime.bundle import open_bundle
    from skywork_deploy.runtime.generate import generate_ids

    tied = tiny_model_factory("tied", tokenizer=True, vocab_size=1024)
    quantize_model(str(tied), str(tmp_path / "q"), include_lm_head=True)
    result = export_model(tmp_path / "q", tmp_path / "int8", int8_format="standard")
    assert result["dtype"] == "int8" and result["validation"]["passed"]
    inits, proto = _initializers(tmp_path / "int8" / "decode.onnx")
    assert inits["m.model.embed_tokens.weight"].dtype == np.float32
    head = inits["m.lm_head.weight.u8"]  # MatMulNBits' layout: uint8 = int8 + 128, (N, K / block, block)
    assert head.dtype == np.uint8 and head.shape == (1024, 1, 64)
    ckpt = _checkpoint(tmp_path / "q")

    def as_int8(stored):
        return (stored.reshape(stored.shape[0], -1).astype(np.int16) - 128).astype(np.int8)

    np.testing.assert_array_equal(as_int8(head), ckpt["lm_head.weight"])
    p = "model.layers.0.self_attn."
    np.testing.assert_array_equal(as_int8(inits[f"m.{p}q_proj+k_proj+v_proj.weight.u8"]),
                                  np.concatenate([ckpt[p + f"{n}_proj.weight"] for n in "qkv"]))
    np.testing.assert_array_equal(inits[f"m.{p}q_proj+k_proj+v_proj.weight_scale"],
                                  np.concatenate([ckpt[p + f"{n}_proj.weight_scale"] for n in "qkv"]))
    # the traced `bias.to(x.dtype)` Casts are dropped, so the three bias Adds fuse into one before the Split
    np.testing.assert_array_equal(inits[f"m.{p}q_proj+k_proj+v_proj.bias"],
                                  np.concatenate([ckpt[p + f"{n}_proj.bias"] for n in "qkv"]))
    ops = [n.op_type for n in proto.graph.node]
    assert "Cast" not in ops[ops.index("DequantizeLinear"):]
    assert ops.count("DequantizeLinear") == 4 * LAYERS + 1  # qkv, o, gate+up, down per layer; lm_head
    assert not [n for n in proto.graph.node if n.domain not in ("", "com.microsoft")]  # ONNX Runtime runs it
    tokens = {}
    for accuracy in ("exact", "exact-nbits", "fast"):  # standard graph folded; the two pre-fused variants
        backend = make_backend("onnxruntime", open_bundle(tmp_path / "int8"), threads=1, int8_accuracy=accuracy)
        assert backend.describe()["graph_variant"] == {"exact": None, "exact-nbits": "nbits-exact",
                                                       "fast": "nbits"}[accuracy]
        tokens[accuracy] = generate_ids(backend, [[1, 2, 3, 4]], max_new_tokens=4).tokens[0]
        assert len(tokens[accuracy]) == 4
    assert tokens["exact"] == tokens["exact-nbits"]  # the same W8A16 arithmetic through either graph


def test_contrib_ops_graph_matches_the_standard_ops_graph(small_model, tmp_path):
    """--ort-ops contrib (the default) puts residual+RMSNorm, rotary and attention into ONNX Runtime's fused
    kernels; both graphs pass validation and agree on a left-padded batch through prefill and decode."""
    import json

    from skywork_deploy.export import export_model

    contrib = export_model(small_model, tmp_path / "contrib")
    onnx_ops = export_model(small_model, tmp_path / "onnx", ort_ops="onnx")
    assert contrib["ort_ops"] == "contrib" and onnx_ops["ort_ops"] == "onnx"
    assert contrib["validation"]["passed"] and onnx_ops["validation"]["passed"]
    ms = "com.microsoft"
    for kind in ("prefill", "decode"):
        nodes = _initializers(tmp_path / "contrib" / f"{kind}.onnx")[1].graph.node
        ops = [(n.domain, n.op_type) for n in nodes]
        gqa = [n for n in nodes if n.op_type == "GroupQueryAttention"]
        assert len(gqa) == LAYERS and ops.count((ms, "SkipSimplifiedLayerNormalization")) == 2 * LAYERS
        assert ("", "Softmax") not in ops and ("", "Concat") not in ops
        if kind == "prefill":  # q and k rotated by their own kernels: the prompt's rows need every position
            assert ops.count((ms, "RotaryEmbedding")) == 2 * LAYERS
        else:  # decode: the fused q|k|v MatMul feeds the kernel packed, rotary inside it, no Split
            assert ops.count((ms, "RotaryEmbedding")) == 0 and ops.count(("", "Split")) == LAYERS  # gate|up
            assert all(n.input[1] == n.input[2] == "" for n in gqa)
            assert all(a.i == 1 for n in gqa for a in n.attribute if a.name == "do_rotary")
        plain = _initializers(tmp_path / "onnx" / f"{kind}.onnx")[1]
        assert {n.domain for n in plain.graph.node} == {""}
        assert contrib["nodes"][kind] < onnx_ops["nodes"][kind] / 1.5
    manifest = json.loads((tmp_path / "contrib" / "skywork_deploy_manifest.json").read_text())
    assert manifest["ort_ops"] == "contrib"
    assert manifest["graphs"]["decode"]["custom_opsets"] == {"com.microsoft": 1}
    a, b = _run_chain(tmp_path / "contrib", steps=4), _run_chain(tmp_path / "onnx", steps=4)
    assert np.abs(a - b).max() <= 1e-5
    assert (a.argmax(-1) == b.argmax(-1)).all()

