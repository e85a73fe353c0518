"""source_code/ in the vendor's pinned stack, through the files of a patched folder only (no skywork_deploy).

Loading (config.json and config_vacc.json), equality with stock Qwen2ForCausalLM (eager fp32), the ways
toolchains drive a Hugging Face model, plain torch.onnx.export of iter0/iter1 (fp32 and quantized) checked by
onnx, onnxsim and onnxruntime, and a quantized folder loaded with low_cpu_mem_usage and bfloat16.
"""
import json
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, Qwen2ForCausalLM

import drive
from folders import SOURCE_FILES, dtype_kwarg
from onnx_checks import export_graph, run_ort, vendor_nodes

TOL = 1e-5


@pytest.fixture(scope="module")
def models(patched):
    name, folder = patched
    ours = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ref = Qwen2ForCausalLM.from_pretrained(folder, attn_implementation="eager", **dtype_kwarg(torch.float32)).eval()
    return name, folder, ours, ref


def test_loads_through_config_json_as_our_class(models):
    _, _, ours, ref = models
    assert type(ours).__module__.endswith("modeling_qwen2_vacc") and type(ours).__name__ == "Qwen2ForCausalLM"
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in ref.named_modules() if "rotary_emb" not in n]


def test_loads_through_config_vacc_json(models, tmp_path):
    _, folder, ours, _ = models
    copy = tmp_path / "m"
    shutil.copytree(folder, copy)
    shutil.copy2(copy / "config.stock.json", copy / "config.json")  # config.json: the stock one, no auto_map
    config = AutoConfig.from_pretrained(copy, trust_remote_code=True, _configuration_file="config_vacc.json")
    assert type(config).__module__.endswith("configuration_qwen2_vacc")
    assert config.rope_theta == json.loads((copy / "config_vacc.json").read_text())["rope_theta"]
    model = AutoModelForCausalLM.from_pretrained(copy, config=config, trust_remote_code=True).eval()
    ids, mask, pos = drive.batch(config.vocab_size)
    assert drive.prefill_diff(model, ours, ids, mask, pos) == 0.0


def test_prefill_matches_stock(models):
    _, _, ours, ref = models
    assert drive.prefill_diff(ours, ref, *drive.batch(ours.config.vocab_size)) <= TOL


def test_slice_from_config_keeps_last_position(models):
    _, folder, _, ref = models
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    config.insert_slice = True  # read once, when the model is built
    sliced = AutoModelForCausalLM.from_pretrained(folder, config=config, trust_remote_code=True).eval()
    ids, mask, pos = drive.batch(config.vocab_size, seed=1)
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1:]
        b = sliced(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert b.shape == (2, 1, config.vocab_size)
    assert (a - b).abs().max().item() <= TOL


@pytest.mark.parametrize("cache", [None, DynamicCache], ids=["tuples", "DynamicCache"])
def test_eight_cached_decode_steps_match_stock(models, cache):
    _, _, ours, ref = models
    assert drive.decode_diff(ours, ref, *drive.batch(ours.config.vocab_size, seed=2), cache=cache) <= TOL


def test_generate_equals_stock(models):
    _, _, ours, ref = models
    ids, mask, _ = drive.batch(ours.config.vocab_size, seed=3)
    assert drive.generate_equal(ours, ref, ids, mask)


def test_driven_like_hf_toolchains(models):
    _, _, ours, ref = models
    ids, mask, pos = drive.batch(ours.config.vocab_size, seed=4)
    assert drive.gptq_replay_diff(ours, ids, mask) <= TOL
    assert drive.hidden_states_diff(ours, ref, ids, mask) <= TOL
    assert drive.loss_diff(ours, ref, ids) <= TOL
    assert drive.inputs_embeds_diff(ours, ref, ids, mask) <= TOL
    assert drive.jit_trace_diff(type(ours), ours.config, ours.state_dict(), ids, mask, pos) <= TOL


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("iter_num", [0, 1])
def test_plain_onnx_export_is_valid_and_runs(models, tmp_path, iter_num, quantized):
    _, folder, _, _ = models
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    config.iter_num, config.insert_slice, config.torchscript = iter_num, True, True
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, trust_remote_code=True).eval()
    if quantized:
        assert model.quantize(8) is model
    proto, feeds, expected = export_graph(model, iter_num, tmp_path / "model.onnx")
    if quantized:
        nodes = vendor_nodes(proto)
        assert len(nodes) == 7 * config.num_hidden_layers  # one per projection, lm_head stays a MatMul
    else:
        got = run_ort(tmp_path / "model.onnx", feeds)
        worst = max(float(abs(g - e).max()) for g, e in zip(got, expected))
        assert worst <= 1e-4, worst


def test_quantized_folder_loads_low_cpu_mem_usage_bf16(models, tmp_path):
    _, folder, _, _ = models
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval().quantize(8)
    model.save_pretrained(tmp_path / "q", safe_serialization=True)
    for name in SOURCE_FILES:  # as `skywork-deploy quantize` does: the model files travel with the weights
        shutil.copy2(folder / name, tmp_path / "q" / name)
    ids, mask, pos = drive.batch(model.config.vocab_size, seed=5)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q", trust_remote_code=True).eval()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", trust_remote_code=True, low_cpu_mem_usage=True,
                                                  **dtype_kwarg(torch.bfloat16)).eval()
    mapped = AutoModelForCausalLM.from_pretrained(tmp_path / "q", trust_remote_code=True, device_map="cpu")
    assert mapped.model.layers[1].self_attn.q_proj.weight.dtype == torch.int8
    down = loaded.model.layers[0].mlp.down_proj
    assert down.weight.dtype == torch.int8 and not down.weight.requires_grad
    assert torch.equal(down.weight, model.model.layers[0].mlp.down_proj.weight)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, attention_mask=mask, position_ids=pos).logits, want)
        got = loaded(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got.float()[mask.bool()], want[mask.bool()], dim=-1).min() > 0.99
