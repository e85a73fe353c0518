"""Parity of source_code/ (our VACC Qwen2) with transformers' eager Qwen2ForCausalLM, driven as HF tools drive it.

These tests load the folder written by `skywork-deploy patch` exactly as the vendor compiler does, with
AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True). CI runs this file under the
transformers version of the main environment (5.x) and again under 4.45.2, the compiler's pin; the same
checks (tests/vendor/drive.py, onnx_checks.py) run in the vendor's pinned stack through tests/vendor.
"""
import json
import shutil

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, Qwen2ForCausalLM

from skywork_deploy.patch import patch_model
from skywork_deploy.source_code.quantization_vacc import (
    QuantizedLinearPerChannel, dequantize_per_channel, quantize_per_channel,
)

from .conftest import TINY_CONFIGS
from .vendor import drive
from .vendor.onnx_checks import export_graph, run_ort, vendor_nodes

TOL = 1e-5
MAJOR = int(transformers.__version__.split(".")[0])


def _dtype(dtype):
    return {("dtype" if MAJOR >= 5 else "torch_dtype"): dtype}


def _patched(tiny_model_factory, name, folder, insert_slice=False):
    shutil.copytree(tiny_model_factory(name, tokenizer=False), folder)
    (folder / "vocab.json").write_text("{}")  # patch checks for a tokenizer; these tests need none
    patch_model(folder, insert_slice=insert_slice)
    return folder


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def pair(request, tiny_model_factory, tmp_path_factory):
    """(config name, patched folder, our model, reference model) for each tiny config."""
    folder = _patched(tiny_model_factory, request.param, tmp_path_factory.mktemp(f"patched-{request.param}") / "m")
    ours = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ref = Qwen2ForCausalLM.from_pretrained(folder, attn_implementation="eager", **_dtype(torch.float32)).eval()
    return request.param, folder, ours, ref


def _built(folder, **config_keys):
    """Our model from `folder` with config keys set before construction (as config_vacc.json would)."""
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    for key, value in config_keys.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_pretrained(folder, config=config, trust_remote_code=True).eval()


def test_loaded_class_is_ours_with_stock_names(pair):
    _, folder, ours, ref = pair
    assert type(ours).__module__.endswith("modeling_qwen2_vacc")
    assert type(ref).__module__.startswith("transformers.")
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    stock = [n for n, _ in ref.named_modules() if "rotary_emb" not in n]  # ours computes rotary in the model
    assert [n for n, _ in ours.named_modules()] == stock
    stock_theta = (getattr(ref.config, "rope_parameters", None) or {}).get("rope_theta") or ref.config.rope_theta
    patched = json.loads((folder / "config_vacc.json").read_text())  # top-level, whatever version saved it
    assert patched["rope_theta"] == ours.config.rope_theta == stock_theta


def test_prefill_all_positions_match(pair):
    _, _, ours, ref = pair
    assert drive.prefill_diff(ours, ref, *drive.batch(ours.config.vocab_size)) <= TOL


def test_insert_slice_from_config_keeps_last_position(pair):
    _, folder, _, ref = pair
    sliced = _built(folder, insert_slice=True)
    ids, mask, pos = drive.batch(ref.config.vocab_size, seed=1)
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1:]
        b = sliced(ids, attention_mask=mask, position_ids=pos).logits
        full = sliced(ids, attention_mask=mask, position_ids=pos, iter_num=1).logits  # our exporter's override
    assert b.shape == (2, 1, ref.config.vocab_size) and full.shape == (2, 9, ref.config.vocab_size)
    assert (a - b).abs().max().item() <= TOL


def test_iter_num_1_in_config_is_the_decode_graph_without_keyword(pair):
    _, folder, _, _ = pair
    decode = _built(folder, insert_slice=True, iter_num=1)
    assert decode.model.iter_num == 1 and decode.model.insert_slice
    ids, mask, pos = drive.batch(decode.config.vocab_size, seed=6)
    with torch.no_grad():
        out = decode(ids, attention_mask=mask, position_ids=pos)
    assert out.logits.shape == (2, 9, decode.config.vocab_size)  # no prefill slice in the iter1 graph


@pytest.mark.parametrize("cache", [None, DynamicCache], ids=["tuples", "DynamicCache"])
def test_decode_steps_with_kv_cache_match(pair, cache):
    _, _, ours, ref = pair
    assert drive.decode_diff(ours, ref, *drive.batch(ours.config.vocab_size, seed=2), cache=cache) <= TOL


def test_greedy_generate_tokens_identical(pair):
    _, _, ours, ref = pair
    ids, mask, _ = drive.batch(ours.config.vocab_size, seed=3)
    assert drive.generate_equal(ours, ref, ids, mask, new_tokens=12)


def test_generate_on_a_sliced_folder(tiny_model_factory, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(_patched(tiny_model_factory, "gqa", tmp_path / "m", True),
                                                 trust_remote_code=True).eval()
    assert model.model.insert_slice  # what `patch` writes by default
    ids = torch.tensor([[1, 2, 3]])
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7) and torch.equal(out[:, :3], ids)


def test_driven_like_hf_toolchains(pair):
    """GPTQ-style layer replay, output_hidden_states, labels -> loss, inputs_embeds, torch.jit.trace."""
    name, _, ours, ref = pair
    ids, mask, pos = drive.batch(ours.config.vocab_size, seed=4)
    assert drive.gptq_replay_diff(ours, ids, mask) <= TOL
    assert drive.hidden_states_diff(ours, ref, ids, mask) <= TOL
    assert drive.loss_diff(ours, ref, ids) <= TOL
    assert drive.inputs_embeds_diff(ours, ref, ids, mask) <= TOL
    if name in ("gqa", "tied"):  # tracing is the slow part; tests/vendor traces all four configs
        assert drive.jit_trace_diff(type(ours), ours.config, ours.state_dict(), ids, mask, pos) <= TOL


def test_decoder_layer_returns_the_4x_tuple(pair):
    _, _, ours, _ = pair
    layer, x = ours.model.layers[0], torch.randn(1, 3, ours.config.hidden_size)
    with torch.no_grad():
        plain = layer(x)
        full = layer(x, output_attentions=True, use_cache=True)
    assert len(plain) == 1 and len(full) == 3
    assert full[1].shape == (1, ours.config.num_attention_heads, 3, 3)  # (B, H, S, T) weights
    assert full[2][0].shape[2] == 3 and torch.equal(plain[0], full[0])  # present (key, value)
    keep = torch.ones(1, 1, 3, 3, dtype=torch.bool).tril()  # (B, 1, S, T) causal keep-mask
    additive = torch.zeros(1, 1, 3, 3).masked_fill(~keep, torch.finfo(torch.float32).min)  # as stock builds it
    with torch.no_grad():
        assert torch.equal(layer(x, attention_mask=keep)[0], plain[0])  # no mask given: causal
        assert (layer(x, attention_mask=additive)[0] - plain[0]).abs().max().item() <= TOL


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("iter_num", [0, 1])
def test_plain_onnx_export_is_valid(tiny_model_factory, tmp_path, iter_num, quantized):
    folder = _patched(tiny_model_factory, "gqa", tmp_path / "m")
    model = _built(folder, iter_num=iter_num, insert_slice=True, torchscript=True)
    if quantized:
        assert model.quantize(8) is model
    proto, feeds, expected = export_graph(model, iter_num, tmp_path / "model.onnx")
    if quantized:
        assert len(vendor_nodes(proto)) == 7 * model.config.num_hidden_layers
    else:
        got = run_ort(tmp_path / "model.onnx", feeds)
        assert max(float(abs(g - e).max()) for g, e in zip(got, expected)) <= 1e-4


def test_quantize_swaps_every_projection(pair):
    name, folder, _, _ = pair
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        ids, mask, pos = drive.batch(model.config.vocab_size, seed=4)
        before = model(ids, attention_mask=mask, position_ids=pos).logits
        assert model.quantize(8) is model
        after = model(ids, attention_mask=mask, position_ids=pos).logits
    # trust_remote_code loads its own copy of quantization_vacc, so compare class names
    quantized = [n for n, m in model.named_modules() if type(m).__name__ == "QuantizedLinearPerChannel"]
    assert len(quantized) == 7 * model.config.num_hidden_layers
    assert type(model.lm_head).__name__ == "Linear"
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.int8
    assert not any(t.requires_grad for t in model.model.layers[0].mlp.down_proj.state_dict(keep_vars=True).values())
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)
    cos = torch.nn.functional.cosine_similarity(before[mask.bool()], after[mask.bool()], dim=-1)
    assert cos.min().item() > 0.99, name


def test_quantized_folder_loads_low_cpu_mem_usage_bf16(tiny_model_factory, tmp_path):
    folder = _patched(tiny_model_factory, "gqa", tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval().quantize(8)
    model.save_pretrained(tmp_path / "q", safe_serialization=True)
    for f in ("configuration_qwen2_vacc.py", "modeling_qwen2_vacc.py", "quantization_vacc.py"):
        shutil.copy2(folder / f, tmp_path / "q" / f)
    extra = {"low_cpu_mem_usage": True} if MAJOR < 5 else {}  # 5.x always loads that way
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", trust_remote_code=True, **extra,
                                                  **_dtype(torch.bfloat16)).eval()
    down = loaded.model.layers[0].mlp.down_proj
    assert down.weight.dtype == torch.int8 and torch.equal(down.weight, model.model.layers[0].mlp.down_proj.weight)
    ids, mask, pos = drive.batch(model.config.vocab_size, seed=5)
    with torch.no_grad():
        want = model(ids, attention_mask=mask, position_ids=pos).logits
        got = loaded(ids, attention_mask=mask, position_ids=pos).logits
    assert got.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(got.float()[mask.bool()], want[mask.bool()], dim=-1).min() > 0.99


def test_quantize_keeps_the_scale_in_the_weight_dtype_as_the_vendor_does():
    from skywork_deploy.source_code.quantization_vacc import QuantizedLinearPerChannel, quantize_per_channel

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        lin = torch.nn.Linear(32, 16, bias=True).to(dtype)
        layer = QuantizedLinearPerChannel.from_linear(lin)
        q, scale = quantize_per_channel(lin.weight.data)  # computed in float32, then kept in the layer's dtype
        assert layer.weight_scale.dtype == dtype and torch.equal(layer.weight, q)
        assert torch.equal(layer.weight_scale, scale.to(dtype))


def test_quantized_linear_is_the_vendor_formula():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16, bias=True)
    q, scale = quantize_per_channel(lin.weight.data)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(scale, lin.weight.data.abs().amax(1) / 127)
    layer = QuantizedLinearPerChannel.from_linear(lin)
    x = torch.randn(3, 32)
    expected = x @ (q.float() * scale[:, None]).T + lin.bias.data
    assert torch.allclose(layer(x), expected, atol=1e-6, rtol=0)
    assert torch.equal(dequantize_per_channel(q, scale), q.float() * scale[:, None])


@torch.no_grad()
def test_fp16_left_padding_stays_finite(tiny_model_factory, tmp_path):
    folder = _patched(tiny_model_factory, "gqa", tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **_dtype(torch.float16)).eval()
    ids, mask, pos = drive.batch(model.config.vocab_size, seed=5, pad=8)  # row 1: one real token
    logits = model(ids, attention_mask=mask, position_ids=pos).logits
    assert logits.dtype == torch.float16
    assert torch.isfinite(logits).all()
    norm = model.model.norm
    big = torch.full((1, 1, model.config.hidden_size), 300.0, dtype=torch.float16)
    assert torch.isfinite(norm(big)).all()  # x.pow(2) in fp16 would overflow at |x| ~ 256


@pytest.mark.parametrize("key, value, words", [
    ("use_sliding_window", True, "use_sliding_window"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}, "rope"),
    ("iter_num", 2, "iter_num"),
])
def test_unsupported_configs_are_refused(tiny_model_factory, tmp_path, key, value, words):
    folder = _patched(tiny_model_factory, "gqa", tmp_path / "m", True)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=words):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
