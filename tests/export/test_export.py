"""Export stage: prefill/decode graphs on tiny random Qwen2 models, validated by ONNX Runtime."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from skywork_deploy.cli import cli
from skywork_deploy.base.errors import ConfigError, InputError

LAYERS = 2


@pytest.fixture(scope="session")
def small_model(tiny_model_factory):
    """Tiny GQA model with a 1,024-row embedding (fast); tokenizer files present (patching needs them)."""
    return tiny_model_factory("gqa", tokenizer=True, vocab_size=1024)


@pytest.fixture(scope="session")
def fp32_bundle(tiny_model_factory, tmp_path_factory):
    from skywork_deploy.export import export_model

    out = tmp_path_factory.mktemp("export") / "fp32"
    result = export_model(tiny_model_factory("gqa", tokenizer=True), out)
    return out, result


def _manifest(out):
    return json.loads((out / "skywork_deploy_manifest.json").read_text())


def test_fp32_bundle_layout_and_names_follow_the_contract(fp32_bundle):
    import onnx

    out, result = fp32_bundle
    for name in ("prefill.onnx", "decode.onnx", "model.onnx.data", "config.json", "vocab.json", "merges.txt",
                 "tokenizer_config.json", "validation.json"):
        assert (out / name).is_file(), name
    m = _manifest(out)
    assert m["stage"] == "export" and m["dtype"] == "fp32" and m["int8_format"] is None and m["seq_lens"] is None
    assert (m["num_layers"], m["num_kv_heads"], m["head_dim"], m["vocab_size"]) == (LAYERS, 2, 16, 151936)
    assert m["kv_dtype"] == m["logits_dtype"] == "float32" and m["runnable_on_onnxruntime"] is True
    pre, dec = m["graphs"]["prefill"], m["graphs"]["decode"]
    assert [i["name"] for i in pre["inputs"]] == ["input_ids", "attention_mask", "position_ids"]
    present = [f"present.{i}.{n}" for i in range(LAYERS) for n in ("key", "value")]
    assert [o["name"] for o in pre["outputs"]] == ["logits"] + present
    assert [i["name"] for i in dec["inputs"]] == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{n}" for i in range(LAYERS) for n in ("key", "value")]
    assert pre["outputs"][0]["shape"] == ["batch_size", 1, 151936]
    assert dec["inputs"][3]["shape"] == ["batch_size", 2, "past_sequence_length", 16]
    assert pre["opset"] == 17 and pre["file"] == "prefill.onnx"
    # both graphs keep their weights in the one shared, external data file
    for kind in ("prefill", "decode"):
        proto = onnx.load(str(out / f"{kind}.onnx"), load_external_data=False)
        locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {"model.onnx.data"}
        assert pre["simplify"]["nodes_after"] < pre["simplify"]["nodes_before"]


def test_fp32_validation_passes_against_transformers(fp32_bundle):
    out, result = fp32_bundle
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"] and report["reference"].startswith("transformers")
    assert len(report["rows"]) == 9  # prefill + 8 chained decode steps
    assert max(r["max_abs_diff"] for r in report["rows"]) <= 1e-4
    assert all(r["top1_agreement"] == 1.0 for r in report["rows"])


def test_fp32_decode_runs_with_its_own_presents(fp32_bundle):
    import onnxruntime as ort

    out, _ = fp32_bundle
    pre = ort.InferenceSession(str(out / "prefill.onnx"))
    dec = ort.InferenceSession(str(out / "decode.onnx"))
    ids = np.array([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]], dtype=np.int64)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=np.int64)
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    o = pre.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos})
    assert o[0].shape == (2, 1, 151936) and o[1].shape == (2, 2, 5, 16)
    feed = {"input_ids": o[0].argmax(-1), "attention_mask": np.ones((2, 6), dtype=np.int64),
            "position_ids": pos[:, -1:] + 1}
    feed["attention_mask"][0, :2] = 0
    for i in range(LAYERS):
        feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = o[1 + 2 * i], o[2 + 2 * i]
    d = dec.run(None, feed)
    assert d[1].shape == (2, 2, 6, 16) and np.isfinite(d[0]).all()


def test_fp16_left_padded_batch_has_no_nan(small_model, tmp_path):
    from skywork_deploy.export import export_model

    result = export_model(small_model, tmp_path / "fp16", dtype="fp16")
    m = result["manifest"]
    assert m["kv_dtype"] == "float16" and m["graphs"]["decode"]["inputs"][3]["dtype"] == "float16"
    rows = result["validation"]["rows"]
    assert result["validation"]["passed"] and all(r["finite"] for r in rows)
    assert min(r["cosine"] for r in rows) > 0.999


def test_int8_standard_runs_on_onnxruntime_exactly(small_model, tmp_path):
    """int8 weights are stored once, in MatMulNBits' layout (uint8 = int8 + 128, export/nbits.py): the standard
    graphs read them through DequantizeLinear, the pre-fused variants through MatMulNBits (accuracy 4 and 0),
    all over the one data file; every gated mode matches the reference to 1e-4."""
    import onnx
    import torch
    from onnx import numpy_helper
    from safetensors.torch import load_file

    from skywork_deploy.export import export_model, nbits
    from skywork_deploy.source_code.quantization_vacc import quantize_per_channel

    out = tmp_path / "int8"
    result = export_model(small_model, out, dtype="int8", simplify=False)
    proto = onnx.load(str(out / "prefill.onnx"), load_external_data=False)
    ops = [n.op_type for n in proto.graph.node]
    # q/k/v and gate/up are fused (export/fuse.py): 4 quantized MatMuls per layer
    assert ops.count("DequantizeLinear") == 4 * LAYERS and not result["custom_nodes"]
    u8 = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.UINT8]
    assert len(u8) == 4 * LAYERS and all(t.name.endswith(nbits.SUFFIX) and len(t.dims) == 3 for t in u8)
    assert not [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    variants = result["manifest"]["graph_variants"]
    assert {k: v["int8_accuracy"] for k, v in variants.items()} == {"nbits": "fast", "nbits-exact": "exact-nbits"}
    for variant in variants.values():
        fused = onnx.load(str(out / variant["prefill"]["file"]), load_external_data=False)
        levels = {a.i for n in fused.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                  if a.name == "accuracy_level"}
        assert nbits.count(fused) == 4 * LAYERS and levels == {variant["accuracy_level"]}
        assert "DequantizeLinear" not in {n.op_type for n in fused.graph.node}
        shared = {t.name: [(e.key, e.value) for e in t.external_data] for t in fused.graph.initializer}
        assert all(shared[t.name] == [(e.key, e.value) for e in t.external_data] for t in u8)  # same bytes
    # the stored bytes: the checkpoint's per-channel int8 + 128, row-major (out, in)
    weights = onnx.load(str(out / "prefill.onnx"))
    down = next(t for t in weights.graph.initializer if t.name.endswith("layers.1.mlp.down_proj.weight" + nbits.SUFFIX))
    ckpt = load_file(str(next(Path(small_model).glob("*.safetensors"))))
    q, _ = quantize_per_channel(ckpt["model.layers.1.mlp.down_proj.weight"])
    stored = numpy_helper.to_array(down)
    np.testing.assert_array_equal(stored.reshape(q.shape).astype(np.int16) - 128, q.numpy())
    assert stored.shape[2] == nbits.block_size(q.shape[1])
    rows = result["validation"]["rows"]
    for mode in ("int8 ort exact", "int8 ort unfused"):
        exact = [r for r in rows if r["mode"] == mode]
        assert len(exact) == 9 and all(r["ok"] and r["max_abs_diff"] <= 1e-4 for r in exact)
    fast = [r for r in rows if r["mode"] == "int8 ort fast"]
    assert len(fast) == 9 and not any(r["gated"] for r in fast) and min(r["cosine"] for r in fast) > 0.99
    assert result["manifest"]["graphs"]["prefill"]["simplify"]["message"] == "--no-simplify"
    assert torch.equal(torch.from_numpy(stored.reshape(q.shape).astype(np.int16) - 128).to(torch.int8), q)


def test_nbits_block_size_is_the_largest_power_of_two_dividing_k():
    from skywork_deploy.export import nbits

    assert [nbits.block_size(k) for k in (3584, 18944, 896, 4864, 64, 48, 8, 100)] == [128, 128, 128, 128, 64, 16,
                                                                                     None, None]


def test_int8_vacc_from_quantized_folder_has_custom_nodes_and_passes_checker(small_model, tmp_path):
    """A `quantize` folder implies int8; the vacc graph is checked by onnx.checker and by its ORT rewrite."""
    import onnx

    from skywork_deploy.export import export_model
    from skywork_deploy.quantize import quantize_model

    quantize_model(str(small_model), str(tmp_path / "q"))
    out = tmp_path / "vacc"
    result = export_model(tmp_path / "q", out, int8_format="vacc")
    assert result["dtype"] == "int8"
    proto = onnx.load(str(out / "decode.onnx"), load_external_data=False)
    onnx.checker.check_model(str(out / "decode.onnx"))
    custom = [n for n in proto.graph.node if n.domain == "Vastai" and n.op_type == "QuantizedLinearPerChannel"]
    assert len(custom) == 7 * LAYERS and all(len(n.input) == 3 for n in custom)
    assert {o.domain: o.version for o in proto.opset_import}.get("Vastai") == 1
    m = result["manifest"]
    assert m["runnable_on_onnxruntime"] is False and m["int8_format"] == "vacc"
    assert result["validation"]["passed"] and "rewritten" in result["validation"]["checked"]
    assert not list(out.glob(".validate-*"))


def test_fixed_bucket_via_cli(small_model, tmp_path):
    out = tmp_path / "b32"
    res = CliRunner().invoke(cli, ["export", str(small_model), "-o", str(out), "--seq-len", "32", "--json"])
    assert res.exit_code == 0, res.output
    m = _manifest(out)
    assert m["seq_lens"] == [32] and "fixed to 32" in m["seq_lens_meaning"]
    assert m["graphs"]["prefill"]["inputs"][0]["shape"] == ["batch_size", 32]
    assert json.loads((out / "validation.json").read_text())["seq_len"] == 32


@pytest.mark.parametrize("args, message", [
    (["--seq-len", "20"], "multiple of 16"),
    (["--seq-len", "8192"], "max_position_embeddings"),
    (["--dtype", "fp16", "--int8-format", "bogus"], "bogus"),
])
def test_bad_options_leave_no_output(small_model, tmp_path, args, message):
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["export", str(small_model), "-o", str(out)] + args)
    assert res.exit_code != 0 and message in res.output
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_non_qwen2_folder_is_refused(small_model, tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(small_model, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    res = CliRunner().invoke(cli, ["export", str(folder), "-o", str(tmp_path / "out")])
    assert res.exit_code == 1 and "model_type" in res.output and not (tmp_path / "out").exists()


def test_disk_space_and_option_checks(tmp_path, small_model):
    from skywork_deploy.export.stage import _check_disk, check_options
    from skywork_deploy.base.spec import ModelSpec

    with pytest.raises(InputError, match="not enough disk space"):
        _check_disk(tmp_path / "out", 1 << 62)
    spec = ModelSpec.from_folder(small_model)
    assert check_options(spec, None, "standard", [64, 32, 64], False) == ("fp32", None, [32, 64], "contrib")
    assert check_options(spec, None, "vacc", None, True) == ("int8", "vacc", None, None)  # vendor graph: no contrib
    assert check_options(spec, "fp16", "standard", None, False, "onnx")[3] == "onnx"
    with pytest.raises(ConfigError, match="--ort-ops"):
        check_options(spec, "fp32", "standard", None, False, "tensorrt")
    with pytest.raises(ConfigError, match="quantized"):
        check_options(spec, "fp16", "standard", None, True)


def test_validation_collects_every_mismatch():
    from skywork_deploy.export import validate

    ref = [np.array([[0.0, 1.0, 2.0], [3.0, 2.0, 1.0]])] * 3
    bad = [r + np.array([[0.0, 0.0, 0.5]]) for r in ref]
    bad[2] = bad[2] * np.nan
    rows = validate.compare("fp32 ort", "exact", True, bad, [False, False, False], ref)
    assert [r["ok"] for r in rows] == [False, False, False] and rows[2]["finite"] is False
    assert "NO" in validate.table(rows)


def test_forced_streamed_reference_validates_int8_and_is_recorded(small_model, tmp_path, monkeypatch):
    """Also the short exact chain of large int8 models (threshold lowered to this model): prefill + 2 decodes
    for the MatMulNBits exact mode, the full chain for the others, all against the one reference pass."""
    from skywork_deploy.export import export_model, validate

    monkeypatch.setenv(validate.REFERENCE_ENV, "streamed")
    monkeypatch.setattr(validate, "EXACT_SHORT_CHAIN_BYTES", 0)
    out = tmp_path / "int8"
    result = export_model(small_model, out, dtype="int8", simplify=False)
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"] and report["reference_kind"] == "streamed" and "layer-streamed" in report["reference"]
    assert report["decode_tokens"].startswith("forced") and validate.REFERENCE_ENV in report["reference_choice"]
    assert report["decode_steps_by_mode"] == {"int8 ort exact": validate.EXACT_SHORT_DECODE_STEPS}
    steps = {m: [r["step"] for r in result["validation"]["rows"] if r["mode"] == m]
             for m in ("int8 ort exact", "int8 ort unfused", "int8 ort fast")}
    assert steps["int8 ort exact"] == ["prefill", "decode 1", "decode 2"]
    assert len(steps["int8 ort unfused"]) == len(steps["int8 ort fast"]) == 1 + validate.DECODE_STEPS
    exact = [r for r in result["validation"]["rows"] if r["gated"]]
    assert len(exact) == 12 and max(r["max_abs_diff"] for r in exact) <= 1e-4
    assert validate.decode_steps(validate.EXACT, 1) == validate.EXACT_SHORT_DECODE_STEPS
    assert validate.decode_steps(validate.FAST, 1) == validate.decode_steps(validate.UNFUSED, 1) == 8
    monkeypatch.setattr(validate, "EXACT_SHORT_CHAIN_BYTES", 1 << 30)
    assert validate.decode_steps(validate.EXACT, 1 << 30) == 8 and validate.decode_steps(validate.EXACT, 2 << 30) == 2


def test_validation_skipped_when_no_session_fits_is_reported_not_passed(small_model, tmp_path, monkeypatch):
    from skywork_deploy.export import export_model, validate

    monkeypatch.setattr(validate, "ORT_MAX_FRACTION", 0.0)
    monkeypatch.setattr(validate, "reference_logits", lambda *a: pytest.fail("reference computed for nothing"))
    out = tmp_path / "fp32"
    result = export_model(small_model, out, simplify=False)
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"] is None and "GiB" in report["skipped"] and report["rows"] == []
    assert "skipped" in result["validation"]["table"] and out.is_dir()
    assert _manifest(out)["validation"] == {"passed": None, "file": "validation.json", "runs": {},
                                            "skipped": report["skipped"]}
    assert "layer-streamed" in report["skipped"]  # auto: tried whole, then streamed


def test_int8_from_bf16_keeps_embedding_and_lm_head_in_fp16_exactly(tiny_model_factory, small_model, tmp_path):
    """A bf16 checkpoint's embedding and lm_head go into the int8 bundle as fp16 (lossless): fewer bytes, and
    the exact mode still matches the fp32 reference to 1e-4. Each phase's time is in the manifest."""
    import onnx

    from skywork_deploy.export import export_model

    bf16 = tiny_model_factory("gqa", tokenizer=True, vocab_size=1024, dtype="bfloat16")
    result = export_model(bf16, tmp_path / "bf16", dtype="int8", simplify=False)
    wide = export_model(small_model, tmp_path / "fp32", dtype="int8", simplify=False)  # fp32 checkpoint
    proto = onnx.load(str(tmp_path / "bf16" / "prefill.onnx"), load_external_data=False)
    half = sorted(t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    assert half == result["manifest"]["fp16_weights"] and len(half) == 2
    assert half[0].endswith("lm_head.weight.T") and half[1].endswith("embed_tokens.weight")
    assert wide["manifest"]["fp16_weights"] == []  # fp32 source: kept as it is
    gathers = [n for n in proto.graph.node if n.op_type == "Gather" and n.input[0] == half[1]]
    assert len(gathers) == 1  # the table stays fp16; only the looked-up rows are widened
    embed_and_head = 2 * 1024 * 64
    assert wide["weight_bytes"] - result["weight_bytes"] >= 2 * embed_and_head  # 4 -> 2 bytes a value
    exact = [r for r in result["validation"]["rows"] if r["mode"] == "int8 ort exact"]
    assert len(exact) == 9 and all(r["ok"] and r["max_abs_diff"] <= 1e-4 for r in exact)
    seconds = result["manifest"]["seconds"]
    assert {"trace", "simplify", "weights", "save_and_check"} <= set(seconds)
    assert {"reference", "int8 ort exact", "int8 ort unfused", "int8 ort fast"} <= set(seconds["validation"])
    assert all(v >= 0 for v in seconds["validation"].values())


def test_int8_fp16_lm_head_in_vocabulary_slices_matches_and_stores_each_row_once(tiny_model_factory, tmp_path,
                                                                                   monkeypatch):
    """An lm_head larger than CHUNK_BYTES is stored as vocabulary slices (one initializer, Cast and MatMul each,
    the logits concatenated), so ONNX Runtime folds one slice at a time: the bytes are the same as one tensor,
    the slices are the checkpoint's rows in order, and the exact mode still matches the reference to 1e-4."""
    import onnx
    from onnx import numpy_helper
    from safetensors.torch import load_file

    from skywork_deploy.export import export_model, int8

    bf16 = tiny_model_factory("gqa", tokenizer=True, vocab_size=1024, dtype="bfloat16")
    whole = export_model(bf16, tmp_path / "whole", dtype="int8", simplify=False)
    monkeypatch.setattr(int8, "CHUNK_BYTES", 1024 * 64 * 2 // 3 + 1)  # three slices: 341 + 341 + 342 rows
    result = export_model(bf16, tmp_path / "sliced", dtype="int8", simplify=False)
    proto = onnx.load(str(tmp_path / "sliced" / "prefill.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    parts = sorted(n for n in inits if "lm_head" in n)
    assert [inits[n].shape for n in parts] == [(64, 341), (64, 341), (64, 342)]
    assert all(inits[n].dtype == np.float16 for n in parts)
    shard = next(Path(bf16).glob("*.safetensors"))
    head = load_file(str(shard))["lm_head.weight"].float().numpy()
    np.testing.assert_array_equal(np.concatenate([inits[n] for n in parts], axis=1), head.T.astype(np.float16))
    concat = [n for n in proto.graph.node if n.op_type == "Concat" and n.output[0] == "logits"]
    assert len(concat) == 1 and len(concat[0].input) == 3
    assert abs(result["weight_bytes"] - whole["weight_bytes"]) <= 3 * 4096  # alignment padding only
    exact = [r for r in result["validation"]["rows"] if r["mode"] == "int8 ort exact"]
    assert len(exact) == 9 and all(r["ok"] and r["max_abs_diff"] <= 1e-4 for r in exact)
