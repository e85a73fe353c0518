"""`skywork-deploy quantize`: the math against NumPy, streamed output loading bit-identically, bad inputs."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from skywork_deploy.quantize import stage
from skywork_deploy.cli import cli
from skywork_deploy.base.errors import DeployError, InputError
from skywork_deploy.base.fsutil import sha256_file
from skywork_deploy.base.modeling import load_model
from skywork_deploy.quantize.report import WeightError, compare_logits
from skywork_deploy.source_code.quantization_vacc import dequantize_per_channel, quantize_per_channel

PROMPT = torch.tensor([[151646, 785, 6722, 315, 9625, 374, 11, 323, 220, 17, 10, 18]])  # (1, 12)


def numpy_reference(w):
    """Per row: scale = absmax / 127, q = round-half-to-even(w / scale) clipped to [-127, 127]."""
    w = np.asarray(w, dtype=np.float32)
    scale = (np.abs(w).max(axis=1) / np.float32(127)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.round(w / safe[:, None]), -127, 127).astype(np.int8)
    return q, scale


def run_cli(*args):
    return CliRunner().invoke(cli, ["quantize", *map(str, args)])


def logits(folder, quantize_in_memory=False, include_lm_head=False):
    model = load_model(folder, "fp32", insert_slice=False)
    if quantize_in_memory:
        model.quantize(8, include_lm_head=include_lm_head)
    with torch.no_grad():
        return model(PROMPT % model.config.vocab_size, iter_num=0).logits  # (1, 12, V)


def assert_bit_identical(model_dir, out, include_lm_head=False):
    expected = logits(model_dir, quantize_in_memory=True, include_lm_head=include_lm_head)
    got = logits(out)
    assert torch.equal(got, expected)
    assert not torch.equal(got, logits(model_dir))  # quantization did change something


def rewrite_tensor(folder, name, fn):
    """Apply `fn` to one tensor of a single-file checkpoint and save it back."""
    path = Path(folder) / "model.safetensors"
    tensors = load_file(path)
    tensors[name] = fn(tensors[name])
    save_file(tensors, path, metadata={"format": "pt"})


def leftovers(parent, name):
    return [p.name for p in Path(parent).iterdir() if p.name.startswith(f".{name}.")]


# --- the math ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_math_matches_numpy_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(96, 200, generator=gen) * torch.logspace(-3, 2, 96)[:, None]).to(dtype)
    w[5, 7] = w[5].abs().max() * 0.5 / 127 * 127  # an exact .5 step somewhere is handled like NumPy
    before = w.clone()
    q, scale = quantize_per_channel(w)
    assert torch.equal(w, before)  # the in-place division works on a copy, never on the caller's weight
    q_ref, scale_ref = numpy_reference(w.float().numpy())
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    np.testing.assert_array_equal(scale.numpy(), scale_ref)
    np.testing.assert_array_equal(q.numpy(), q_ref)
    # round half to even, as np.round: row absmax 127 gives scale 1, so 2.5 -> 2 and -3.5 -> -4
    q, scale = quantize_per_channel(torch.tensor([[127.0, 2.5, -3.5, 0.49]]))
    assert scale.tolist() == [1.0] and q.tolist() == [[127, 2, -4, 0]]


def test_degenerate_rows():
    w = torch.randn(4, 64)
    w[0] = 0.0  # a row of zeros: scale 0, q 0, dequantizes to exact zeros
    w[1, 3] = 1e30  # one huge outlier: it maps to 127, the rest of its row to 0
    w[2] = 1e-42  # subnormal row: scale clamped to the smallest normal float32, still finite
    q, scale = quantize_per_channel(w)
    assert scale[0] == 0 and not q[0].any()
    assert q[1, 3] == 127 and (q[1].abs() <= 127).all() and int((q[1] != 0).sum()) == 1
    assert torch.isfinite(scale).all() and scale[2] == torch.finfo(torch.float32).tiny
    np.testing.assert_array_equal(q.numpy()[[0, 1, 3]], numpy_reference(w.numpy())[0][[0, 1, 3]])
    err = WeightError()
    err.update(w[[0, 1, 3]], q[[0, 1, 3]], scale[[0, 1, 3]])
    assert 0 < err.rel_fro < 1e-20 and err.max_row_rel <= 0.5 / 127 + 1e-6  # no fp32 overflow of 1e30**2
    subnormal = WeightError()
    subnormal.update(w[2:3], q[2:3], scale[2:3])
    assert not q[2].any() and subnormal.max_row_rel == 1.0 and subnormal.rel_fro == 1.0  # documented limit
    assert torch.equal(dequantize_per_channel(q, scale)[0], torch.zeros(64))
    zero = WeightError()
    zero.update(torch.zeros(3, 8), *quantize_per_channel(torch.zeros(3, 8)))
    assert zero.rel_fro == 0.0 and zero.max_row_rel == 0.0
    for bad in (float("inf"), float("nan")):
        w[3, 0] = bad
        with pytest.raises(ValueError, match="non-finite"):
            quantize_per_channel(w)


def test_weight_error_definition():
    w = torch.randn(8, 32)
    q, scale = quantize_per_channel(w)
    err = WeightError()
    err.update(w[:3], q[:3], scale[:3])  # accumulated over row chunks
    err.update(w[3:], q[3:], scale[3:])
    deq = dequantize_per_channel(q, scale)
    assert err.rel_fro == pytest.approx(float((w - deq).norm() / w.norm()), rel=1e-5)
    expected = float(((w - deq).abs().amax(1) / w.abs().amax(1)).max())
    assert err.max_row_rel == pytest.approx(expected, rel=1e-6)


# --- the streamed checkpoint ------------------------------------------------------------------------------

def test_quantized_folder_is_bit_identical(tiny_model_factory, tmp_path):
    model_dir, out = tiny_model_factory(), tmp_path / "q"
    result = run_cli(model_dir, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert_bit_identical(model_dir, out)

    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc == {"quant_method": "vacc_w8a16", "bits": 8, "group": "per_channel", "symmetric": True,
                  "scale_dtype": "float32", "modules": stage.module_patterns(False), "include_lm_head": False,
                  "source_dtype": "float32"}
    assert cfg["hidden_size"] == 64 and cfg["tie_word_embeddings"] is False
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (model_dir / name).read_bytes()

    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(out / shard))
    source = load_file(model_dir / "model.safetensors")
    assert set(tensors) == set(source) | {f"model.layers.{i}.{p}.{m}.weight_scale" for i in range(2)
                                          for m, p in stage.PROJECTIONS.items()}
    q_name = "model.layers.1.mlp.down_proj.weight"
    q_ref, scale_ref = numpy_reference(source[q_name].numpy())
    np.testing.assert_array_equal(tensors[q_name].numpy(), q_ref)
    np.testing.assert_array_equal(tensors[q_name + "_scale"].numpy(), scale_ref)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.bias"):
        assert torch.equal(tensors[name], source[name])

    manifest = json.loads((out / "skywork_deploy_manifest.json").read_text())
    assert manifest["stage"] == "quantize" and manifest["quantization_config"] == qc
    assert manifest["inputs"]["shards"] == {"model.safetensors": sha256_file(model_dir / "model.safetensors")}
    assert manifest["outputs"]["shards"] == {s: sha256_file(out / s) for s in set(index["weight_map"].values())}
    report = json.loads((out / "quantize_report.json").read_text())
    assert report == json.loads(json.dumps(data["report"]))
    assert [row["layer"] for row in report["layers"]] == ["0", "1", "other"]
    total = report["total"]
    assert total["quantized"] == 14 and total["bytes_after"] < total["bytes_before"]
    assert 0 < total["rel_fro_mean"] <= total["rel_fro_max"] < 0.01
    assert 0 < total["max_row_rel"] <= 0.5 / 127 + 1e-6
    layer0 = report["layers"][0]
    assert layer0["bytes_after"] < 0.3 * layer0["bytes_before"]  # fp32 -> int8 + scales, norms unchanged
    e2e = report["end_to_end"]
    assert e2e["bit_identical_to_in_memory"] is True and e2e["prompt_source"] == "tokenizer"
    assert 0 < e2e["max_abs_diff"] < 0.1 and e2e["top1_agreement"] > 0.8 and 0 <= e2e["mean_kl"] < 1e-3
    assert e2e["method"] == "layer-streamed" and e2e["bit_identical_check"].startswith("whole")
    assert e2e["streamed_vs_whole_max_diff"] <= 1e-5


def report_total():
    return {"tensors": 0, "quantized": 0, "bytes_before": 0, "bytes_after": 0, "rel_fro_max": 0.0,
            "rel_fro_mean": 0.0, "max_row_rel": 0.0}


def test_end_to_end_check_streams_above_the_whole_model_limit(tiny_model_factory, tmp_path, monkeypatch):
    from skywork_deploy.quantize import report as quantize_report

    model_dir, out = tiny_model_factory("gqa", tokenizer=False), tmp_path / "q"
    stage.quantize_model(model_dir, out, evaluate=False)
    monkeypatch.setattr("skywork_deploy.base.modeling.load_model", lambda *a, **k: pytest.fail("whole model loaded"))
    e2e = quantize_report.evaluate(model_dir, out, 8, False, whole_max_params=0)
    assert e2e["bit_identical_to_in_memory"] is None and e2e["bit_identical_check"].startswith("not run")
    assert e2e["positions"] == 4 * 12 and 0 < e2e["max_abs_diff"] < 0.1 and e2e["method"] == "layer-streamed"
    assert "not checked" in quantize_report.format_table({"layers": [], "total": report_total(), "end_to_end": e2e})


def test_sharded_input_small_chunks_and_shards(tiny_model_factory, tmp_path, monkeypatch):
    from skywork_deploy.base.synth import make_random_qwen2

    model_dir = make_random_qwen2(tmp_path / "sharded", preset="tiny", seed=3, shard_size="20MB")
    assert len(list(model_dir.glob("model-*.safetensors"))) > 1
    monkeypatch.setattr(stage, "CHUNK_ELEMENTS", 1000)  # many row chunks per tensor: same bits
    out = tmp_path / "q"
    result = stage.quantize_model(model_dir, out, evaluate=False, max_shard_bytes=20_000)
    assert result["report"]["end_to_end"] == {"skipped": "--no-eval"}
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    per_shard = {s: [t for t, f in weight_map.items() if f == s] for s in result["shards"]}
    assert len(per_shard) > 3  # shards of at most 20 kB, or one bigger tensor alone
    assert all(n <= 20_000 or len(per_shard[s]) == 1 for s, n in result["shards"].items())
    assert sorted(p.name for p in out.glob("model-*.safetensors")) == sorted(result["shards"])
    assert_bit_identical(model_dir, out)


def test_shard_writer_writes_the_planned_layout_tensor_by_tensor(tmp_path):
    """Headers are written before the data; each tensor goes to disk when added; safetensors reads the files;
    a tensor out of plan (name, dtype or shape) is refused."""
    from safetensors import safe_open

    def plan(name, dtype, shape, q):
        return stage.TensorPlan(name, tmp_path / "src.safetensors", dtype, shape, q, name)

    plans = [plan("a", "F32", (3, 5), True), plan("b", "BF16", (7,), False), plan("big", "F32", (40, 2), False),
             plan("c", "F16", (2, 2), False)]
    groups = stage.shard_groups(plans, shard_bytes=41)
    assert [[p.name for p in g] for g in groups] == [["a", "b"], ["big"], ["c"]]  # 27 + 14 fit in 41; 320 alone
    writer = stage.ShardWriter(tmp_path, groups)
    values = {"a": torch.arange(15, dtype=torch.int8).reshape(3, 5), "a_scale": torch.rand(3),
              "b": torch.rand(7).to(torch.bfloat16), "big": torch.rand(40, 2), "c": torch.rand(2, 2).half()}
    writer.add("a", values["a"])
    assert writer.fh.tell() % 8 == 15 % 8 and writer.fh.tell() > 15  # header (8-aligned) and `a` handed to the file
    with pytest.raises(DeployError, match="expected a_scale"):
        writer.add("b", values["b"])
    writer.pending.insert(0, ("a_scale", "F32", (3,)))
    for name in ("a_scale", "b", "big", "c"):
        writer.add(name, values[name])
    sizes = writer.finish()
    assert sizes == {"model-00001-of-00003.safetensors": 15 + 12 + 14, "model-00002-of-00003.safetensors": 320,
                     "model-00003-of-00003.safetensors": 8}
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    for name, value in values.items():
        with safe_open(str(tmp_path / index["weight_map"][name]), "pt") as fh:
            assert torch.equal(fh.get_tensor(name), value)


def test_bf16_input_keeps_dtypes(tmp_path):
    from skywork_deploy.base.synth import make_random_qwen2

    model_dir = make_random_qwen2(tmp_path / "bf16", preset="tiny", seed=1, dtype="bfloat16", tokenizer=False)
    out = tmp_path / "q"
    result = stage.quantize_model(model_dir, out, evaluate=True)
    assert result["quantization_config"]["source_dtype"] == "bfloat16"
    assert result["report"]["end_to_end"]["prompt_source"] == "fixed ids"
    tensors = {}
    for shard in result["shards"]:
        tensors.update(load_file(out / shard))
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.self_attn.k_proj.bias"].dtype == torch.bfloat16
    assert tensors["model.layers.0.self_attn.k_proj.weight"].dtype == torch.int8
    assert tensors["model.layers.0.self_attn.k_proj.weight_scale"].dtype == torch.float32
    assert_bit_identical(model_dir, out)


@pytest.mark.parametrize("name", ["gqa", "tied"])
def test_include_lm_head(tiny_model_factory, tmp_path, name):
    model_dir, out = tiny_model_factory(name, tokenizer=False), tmp_path / "q"
    result = run_cli(model_dir, "-o", out, "--include-lm-head", "--no-eval")
    assert result.exit_code == 0, result.output
    assert "total" in result.output and "end to end: skipped (--no-eval)" in result.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["include_lm_head"] is True
    assert cfg["quantization_config"]["modules"][-1] == "lm_head"
    assert cfg["tie_word_embeddings"] is False  # a tied lm_head gets its own int8 copy
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["tensors"]["lm_head.weight"]["source"] == ("model.embed_tokens.weight" if name == "tied"
                                                             else "lm_head.weight")
    assert report["total"]["quantized"] == 15
    assert_bit_identical(model_dir, out, include_lm_head=True)


def test_patched_input_carries_sources(tiny_model_factory, tmp_path):
    from skywork_deploy.patch import patch_model, patch_status

    patched = tmp_path / "patched"
    patch_model(str(tiny_model_factory()), out=patched)
    out = tmp_path / "q"
    stage.quantize_model(patched, out, evaluate=False)
    for name in ("modeling_qwen2_vacc.py", "configuration_qwen2_vacc.py", "quantization_vacc.py"):
        assert (out / name).read_bytes() == (patched / name).read_bytes()
    vacc = json.loads((out / "config_vacc.json").read_text())
    assert vacc["insert_slice"] is True and vacc["quantization_config"]["quant_method"] == "vacc_w8a16"
    assert patch_status(out)["current"]
    assert_bit_identical(patched, out)


# --- bad input: one line, exit 1, nothing written ---------------------------------------------------------

def corrupt_header(folder):
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"{not json at all" + b"!" * 16
    path.write_bytes(bytes(data))


def missing_shard(folder):
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def integer_weights(folder):
    rewrite_tensor(folder, "model.layers.0.mlp.up_proj.weight", lambda t: t.to(torch.int8))


def non_qwen2(folder):
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))


def infinite_weight(folder):
    def poison(t):
        t = t.clone()
        t[3, 5] = float("inf")
        return t
    rewrite_tensor(folder, "model.layers.1.mlp.down_proj.weight", poison)


def nan_weight(folder):
    rewrite_tensor(folder, "model.layers.0.self_attn.v_proj.weight", lambda t: t * float("nan"))


@pytest.mark.parametrize("damage, expected", [
    (corrupt_header, "corrupt safetensors header"),
    (missing_shard, "model-00002-of-00002.safetensors, which is missing"),
    (integer_weights, "tensor model.layers.0.mlp.up_proj.weight is I8"),
    (non_qwen2, "model_type is 'llama'"),
    (infinite_weight, "tensor model.layers.1.mlp.down_proj.weight holds NaN or Inf at index"),
    (nan_weight, "tensor model.layers.0.self_attn.v_proj.weight holds NaN or Inf at index [0, 0]"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_model_factory, tmp_path, damage, expected):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_factory("gqa", tokenizer=False), model_dir)
    damage(model_dir)
    out = tmp_path / "q"
    result = run_cli(model_dir, "-o", out, "--no-eval")
    assert result.exit_code == 1
    assert expected in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("Error: ")
    if damage in (infinite_weight, nan_weight):
        assert "model.safetensors" in result.output
    assert not out.exists() and leftovers(tmp_path, "q") == []


def test_disk_full_mid_write_is_one_line_and_writes_nothing(tiny_model_factory, tmp_path, monkeypatch):
    import errno

    class FullDisk:
        def __init__(self, real):
            self.real, self.written = real, 0

        def write(self, data):
            self.written += 1
            if self.written > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.real.write(data)

        def __getattr__(self, name):
            return getattr(self.real, name)

    real_open = stage.ShardWriter._open_next

    def open_next(self):
        real_open(self)
        self.fh = FullDisk(self.fh)

    monkeypatch.setattr(stage.ShardWriter, "_open_next", open_next)
    out = tmp_path / "q"
    result = run_cli(tiny_model_factory("gqa", tokenizer=False), "-o", out, "--no-eval")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "No space left on device" in result.output and ".safetensors (free disk space" in result.output
    assert "free disk space" in result.output
    assert not out.exists() and leftovers(tmp_path, "q") == []


def test_already_quantized_and_bad_options(tiny_model_factory, tmp_path):
    model_dir, out = tiny_model_factory("gqa", tokenizer=False), tmp_path / "q"
    assert run_cli(model_dir, "-o", out, "--no-eval").exit_code == 0
    again = run_cli(out, "-o", tmp_path / "qq", "--no-eval")
    assert again.exit_code == 1 and "already quantized" in again.output and not (tmp_path / "qq").exists()
    exists = run_cli(model_dir, "-o", out, "--no-eval")
    assert exists.exit_code == 1 and "already exists" in exists.output
    bits = run_cli(model_dir, "-o", tmp_path / "q4", "--bits", "4")
    assert bits.exit_code == 1 and "--bits 4 is not supported" in bits.output
    size = run_cli(model_dir, "-o", tmp_path / "q4", "--max-shard-size", "lots")
    assert size.exit_code == 1 and "--max-shard-size" in size.output
    with pytest.raises(InputError, match="inside"):
        stage.quantize_model(model_dir, model_dir / "sub", evaluate=False)
    assert stage.parse_size("1GB") == 10**9 and stage.parse_size("20MiB") == 20 * 2**20


def test_compare_logits():
    ref = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    got = torch.tensor([[1.0, 2.0, 3.5], [0.0, 2.0, 1.0]])
    res = compare_logits(ref, got)
    assert res["max_abs_diff"] == 2.0 and res["top1_agreement"] == 0.5 and res["mean_kl"] > 0
    assert compare_logits(ref, ref)["mean_kl"] == pytest.approx(0.0, abs=1e-7) and compare_logits(ref, ref)["exact"]


def test_large_models_are_checked_on_fewer_prompts_not_skipped(tiny_model_factory, tmp_path, monkeypatch):
    """Above EVAL_SHORT_PARAMS (10B: 32B builds) the default check still runs, on the shortest prompts, and the
    report says so; --eval keeps every prompt."""
    from skywork_deploy.quantize import report as quantize_report

    monkeypatch.setattr(stage, "EVAL_SHORT_PARAMS", 0)
    model_dir = tiny_model_factory("gqa", tokenizer=True, vocab_size=1024)
    result = stage.quantize_model(model_dir, tmp_path / "q", min_top1=0, max_kl=1)
    e2e = result["report"]["end_to_end"]
    assert e2e["prompts"] == stage.EVAL_SHORT_PROMPTS < len(quantize_report.PROMPTS) and "passed" in e2e
    assert "shortest" in e2e["prompt_subset"] and "above 0B" in e2e["prompt_subset"]
    assert e2e["prompt_subset"] in quantize_report.format_table(result["report"])
    full = stage.quantize_model(model_dir, tmp_path / "q-all", evaluate=True, min_top1=0, max_kl=1)
    assert full["report"]["end_to_end"]["prompts"] == len(quantize_report.PROMPTS)
    assert "prompt_subset" not in full["report"]["end_to_end"]
