"""The layer-streamed ONNX Runtime backend: the same greedy answer as whole sessions, one piece at a time."""
import numpy as np
import pytest

from skywork_deploy.base import memory


@pytest.fixture(scope="module")
def bundles(tiny_model_factory, tmp_path_factory):
    from skywork_deploy.export import export_model

    model = tiny_model_factory("gqa", tokenizer=True, vocab_size=1024)
    root = tmp_path_factory.mktemp("streamed-backend")
    for dtype in ("fp16", "int8"):
        export_model(model, root / dtype, dtype=dtype, simplify=False)
    return root


def _answer(name, bundle, **options):
    from skywork_deploy.runtime.backends import make_backend
    from skywork_deploy.runtime.bundle import open_bundle
    from skywork_deploy.runtime.generate import generate_ids

    engine = make_backend(name, open_bundle(bundle), **options)
    gen = generate_ids(engine, [[7, 99, 512, 3], [5, 6]], max_new_tokens=5)  # a left-padded batch of two
    return engine, gen.tokens


@pytest.mark.parametrize("dtype,options", [("fp16", {}), ("int8", {"int8_accuracy": "fast"}),
                                           ("int8", {"int8_accuracy": "exact"})])
def test_streamed_greedy_answer_is_the_whole_sessions_answer(bundles, dtype, options, monkeypatch):
    monkeypatch.delenv(memory.LIMIT_ENV, raising=False)
    whole, expected = _answer("onnxruntime", bundles / dtype, one_session=True, **options)
    engine, tokens = _answer("onnxruntime-streamed", bundles / dtype, **options)
    assert tokens == expected and [len(t) for t in tokens] == [5, 5]
    info = engine.describe()
    assert info["backend"] == "onnxruntime-streamed" and info["pieces"] >= 3 and info["memory"]["fits"]


def test_streamed_step_logits_match_and_memory_is_checked_first(bundles, monkeypatch):
    from skywork_deploy.runtime.backends import make_backend
    from skywork_deploy.runtime.bundle import open_bundle

    monkeypatch.delenv(memory.LIMIT_ENV, raising=False)
    b = open_bundle(bundles / "fp16")
    ids = np.array([[0, 0, 7, 99, 512, 3]], dtype=np.int64)
    mask = np.array([[0, 0, 1, 1, 1, 1]], dtype=np.int64)
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    got = []
    for name, options in (("onnxruntime", {"one_session": True}), ("onnxruntime-streamed", {"layers_per_piece": 1})):
        engine = make_backend(name, b, **options)
        logits, kv = engine.prefill(ids, mask, pos)
        more = np.concatenate([mask, [[1]]], axis=1)
        step, _ = engine.decode(logits.argmax(-1)[:, None].astype(np.int64), more, pos[:, -1:] + 1, kv)
        got.append((logits, step))
        del engine
    # fp16 logits; the runtime's whole sessions prepack their weights (other kernels than validation's streamed
    # and whole runs, which agree bit for bit in tests/export/test_streamed.py): within an fp16 rounding or two
    assert np.abs(got[0][0] - got[1][0]).max() <= 1e-3 and np.abs(got[0][1] - got[1][1]).max() <= 1e-3
    monkeypatch.setenv(memory.LIMIT_ENV, "1M")
    with pytest.raises(memory.MemoryBudgetError, match="layer-streamed"):
        make_backend("onnxruntime-streamed", b)


def test_build_smoke_run_streams_when_no_whole_session_fits(tiny_model_factory, tmp_path, monkeypatch):
    """Real vocabulary (151,936 rows: the embedding and lm_head dominate, as in 7B/32B): a limit below the whole
    session but above the largest piece makes the build's smoke run layer-streamed, its answer shortened and
    said so, and its tokens the first tokens of the torch reference's answer."""
    from skywork_deploy.export import export_model
    from skywork_deploy.pipeline import stages
    from skywork_deploy.pipeline.settings import RunSettings
    from skywork_deploy.runtime.bundle import open_bundle
    from skywork_deploy.runtime.streamed_backend import StreamedBackend

    out = tmp_path / "fp32"
    export_model(tiny_model_factory("gqa"), out, simplify=False)
    monkeypatch.delenv(memory.LIMIT_ENV, raising=False)
    bundle = open_bundle(out)
    whole = memory.check_session_fits([bundle.graph_path(g) for g in ("prefill", "decode")], "float", have=0).need
    pieces = StreamedBackend(bundle).memory.need
    assert pieces < whole
    monkeypatch.setenv(memory.LIMIT_ENV, str(int((pieces + whole) / 2 / memory.FRACTION)))
    assert stages._smoke_session(bundle)[0] == stages.STREAMED
    result = stages._validate(RunSettings(max_new_tokens=8), out, tmp_path / "validate")
    smoke = result["smoke"]
    ort, ref = smoke["runs"]["onnxruntime"], smoke["runs"]["torch"]
    assert ort["layer_streamed"] and len(ort["tokens"]) == stages.STREAMED_SMOKE_TOKENS and len(ref["tokens"]) == 8
    assert smoke["compared_tokens"] == stages.STREAMED_SMOKE_TOKENS and smoke["token_agreement"] == 1.0
    assert any("shortened to 4 tokens" in n for n in smoke["notes"]) and result["passed"]
