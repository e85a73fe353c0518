"""The one memory estimate and policy for ONNX Runtime sessions (skywork_deploy/memory.py), on real sessions."""
import subprocess
import sys

import numpy as np
import pytest

from skywork_deploy.base import memory
from skywork_deploy.base.memory import MemoryBudgetError


@pytest.fixture(scope="module")
def int8_bundle(tiny_model_factory, tmp_path_factory):
    from skywork_deploy.export import export_model

    out = tmp_path_factory.mktemp("memory") / "int8"
    export_model(tiny_model_factory("gqa", tokenizer=True, vocab_size=1024), out, dtype="int8", simplify=False)
    return out


def test_graph_weights_account_for_every_byte_and_modes_order(int8_bundle):
    w = memory.graph_weights(int8_bundle / "prefill.onnx")
    data = (int8_bundle / "model.onnx.data").stat().st_size
    assert w["int8"] > 0 and w["matmul_float32"] > 0  # int8 projections; the fp32 lm_head
    held = sum(v for k, v in w.items() if k != "largest_matmul_float16")
    assert 0.9 * data <= held <= data  # the rest of the file is alignment padding
    fused, unfused = memory.session_bytes(w, "int8-fused"), memory.session_bytes(w, "int8-unfused")
    # DequantizeLinear folded to fp32 (4x) against MatMulNBits' packed layout
    assert unfused - fused == pytest.approx((4 - memory.PACKED_INT8) * w["int8"] * 1.1, abs=2)
    pre = memory.graph_weights(int8_bundle / "prefill.nbits.onnx")  # the same bytes, read by MatMulNBits
    assert pre["int8_nbits"] == w["int8"] and pre["int8"] == 0
    assert memory.session_bytes(pre, "int8-fused") < fused  # no load-time re-layout beside the stored weights
    assert memory.mode_for(True, int8_accuracy="exact") == "int8-unfused"
    assert memory.mode_for(True, {"session.qdq_matmulnbits_accuracy_level": "0"}) == "int8-fused"
    assert memory.mode_for(False, {"session.disable_prepacking": "1"}) == "float-low-memory"


def test_limit_env_caps_available_and_strict_check_says_need_and_have(int8_bundle, monkeypatch):
    monkeypatch.setenv(memory.LIMIT_ENV, "64M")
    assert memory.available_bytes() == 64 << 20
    fit = memory.check_session_fits(int8_bundle / "decode.onnx", "int8-fused")
    assert not fit.fits and fit.have == 64 << 20 and "needs about" in fit.message and "have 0.1 GiB" in fit.message
    with pytest.raises(MemoryBudgetError, match="needs about .* GiB, have .* GiB"):
        memory.check_session_fits(int8_bundle / "decode.onnx", "int8-fused", strict=True)
    monkeypatch.setenv(memory.LIMIT_ENV, "lots")
    with pytest.raises(memory.ConfigError, match=memory.LIMIT_ENV):
        memory.available_bytes()


def test_fp16_matmul_weights_are_widened_at_load_as_the_estimate_says(tmp_path):
    """ONNX Runtime's CPU provider converts an fp16 MatMul weight to fp32 when the session is created."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k = 2048
    w = np.random.default_rng(0).standard_normal((k, k)).astype(np.float16)  # 8 MiB
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, k])],
                              [numpy_helper.from_array(w, "w")])
    path = tmp_path / "m.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
                    save_as_external_data=True, location="m.data", size_threshold=0)
    weights = memory.graph_weights(path)
    assert weights == {"int8": 0, "int8_nbits": 0, "matmul_float32": 0, "matmul_float16": w.nbytes,
                       "largest_matmul_float16": w.nbytes, "other": 0}
    # Measured in a fresh process: in a long test run, freed heap pages would absorb the new allocation.
    probe = (
        "import sys, numpy as np, onnxruntime as ort, psutil\n"
        "proc = psutil.Process(); before = proc.memory_info().rss\n"
        "so = ort.SessionOptions(); so.enable_cpu_mem_arena = False\n"
        "session = ort.InferenceSession(sys.argv[1], so, providers=['CPUExecutionProvider'])\n"
        "grown = proc.memory_info().rss - before\n"
        f"y = session.run(None, {{'x': np.ones((1, {k}), np.float16)}})[0]\n"
        "assert y.shape == (1, %d) and np.isfinite(y).all()\n"
        "print(grown)\n" % k
    )
    grown = int(subprocess.run([sys.executable, "-c", probe, str(path)], check=True, capture_output=True,
                               text=True).stdout.split()[-1])
    assert grown >= 1.5 * w.nbytes  # the fp32 copy (2x) is really made
    assert grown <= memory.session_bytes(weights, "float")


def _greedy(bundle, steps=6, **options):
    """Greedy tokens of one left-padded prompt, through the backend's own prefill and in-place decode."""
    from skywork_deploy.runtime.backends import make_backend
    from skywork_deploy.runtime.bundle import open_bundle

    engine = make_backend("onnxruntime", open_bundle(bundle), int8_accuracy="exact-nbits", **options)
    ids = np.array([[0, 0, 7, 99, 512, 3]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    mask[0, 2:] = 1
    logits, kv = engine.prefill(ids, mask, np.clip(mask.cumsum(-1) - 1, 0, None))
    tokens = []
    for _ in range(steps):
        nxt = logits.argmax(-1)[:, None].astype(np.int64)  # (1, 1)
        tokens.append(int(nxt[0, 0]))
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        logits, kv = engine.decode(nxt, mask, mask.sum(-1, keepdims=True) - 1, kv)
    return engine, tokens


def test_backend_keeps_one_session_when_two_do_not_fit_and_refuses_before_loading(int8_bundle, monkeypatch):
    monkeypatch.delenv(memory.LIMIT_ENV, raising=False)
    both, tokens = _greedy(int8_bundle)
    assert both.one_session is False and set(both.sessions) == {"prefill", "decode"}
    one_need = both.memory.need // 2
    # room for one session, not for two: the backend frees one graph's session before loading the other
    monkeypatch.setenv(memory.LIMIT_ENV, str(int(one_need * 1.5 / memory.FRACTION)))
    single, single_tokens = _greedy(int8_bundle)
    assert single.one_session is True and list(single.sessions) == ["decode"]
    assert single_tokens == tokens and len(tokens) == 6  # the same greedy answer
    monkeypatch.setenv(memory.LIMIT_ENV, str(int(one_need * 0.5)))
    with pytest.raises(MemoryBudgetError, match="needs about"):
        _greedy(int8_bundle)


def test_smoke_run_uses_the_exact_path_that_fits(int8_bundle, monkeypatch):
    from skywork_deploy.pipeline.stages import _smoke_session
    from skywork_deploy.runtime.bundle import open_bundle

    bundle = open_bundle(int8_bundle)
    w = memory.graph_weights(int8_bundle / "prefill.onnx")
    monkeypatch.delenv(memory.LIMIT_ENV, raising=False)
    assert _smoke_session(bundle) == ("onnxruntime", {"one_session": True, "int8_accuracy": "exact"}, None)
    between = (memory.session_bytes(w, "int8-fused") + memory.session_bytes(w, "int8-unfused")) / 2
    monkeypatch.setenv(memory.LIMIT_ENV, str(int(between / memory.FRACTION)))
    assert _smoke_session(bundle) == ("onnxruntime", {"one_session": True, "int8_accuracy": "fast"}, None)
    monkeypatch.setenv(memory.LIMIT_ENV, "1M")  # not even the largest piece (tests/runtime: the streamed choice)
    backend, options, why = _smoke_session(bundle)
    assert backend is None and options == {} and why.startswith("ONNX Runtime smoke run skipped") and "GiB" in why
    assert "layer-streamed" in why