"""Parity of source_code/ (our VACC Qwen2) with transformers' eager Qwen2ForCausalLM.

These tests load the patched folder exactly as the vendor compiler does, with
AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True). CI runs this file under the
transformers version of the main environment (5.x) and again under 4.45.2, the compiler's pin.
"""
import json
import shutil

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

from skywork_deploy.patch import patch_model
from skywork_deploy.source_code.quantization_vacc import (
    QuantizedLinearPerChannel, dequantize_per_channel, quantize_per_channel,
)

from .conftest import TINY_CONFIGS

TOL = 1e-5
DECODE_STEPS = 8


def _ref_kwargs():
    major = int(transformers.__version__.split(".")[0])
    return {"attn_implementation": "eager", ("dtype" if major >= 5 else "torch_dtype"): torch.float32}


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def pair(request, tiny_model_factory, tmp_path_factory):
    """(config name, patched folder, our model, reference model) for each tiny config."""
    src = tiny_model_factory(request.param, tokenizer=False)
    folder = tmp_path_factory.mktemp(f"patched-{request.param}") / "m"
    shutil.copytree(src, folder)
    (folder / "vocab.json").write_text("{}")  # patch checks for a tokenizer; these tests need none
    patch_model(folder, insert_slice=False)
    ours = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ref = Qwen2ForCausalLM.from_pretrained(folder, **_ref_kwargs()).eval()
    return request.param, folder, ours, ref


def _batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0  # row 1 is left-padded
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def test_loaded_class_is_ours(pair):
    _, _, ours, ref = pair
    assert type(ours).__module__.endswith("modeling_qwen2_vacc")
    assert type(ref).__module__.startswith("transformers.")
    ours_keys, ref_keys = set(ours.state_dict()), set(ref.state_dict())
    assert ours_keys == ref_keys


@torch.no_grad()
def test_prefill_all_positions_match(pair):
    _, _, ours, ref = pair
    ids, mask, pos = _batch(ours.config.vocab_size)
    a = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    b = ours(ids, attention_mask=mask, position_ids=pos).logits
    assert b.shape == a.shape
    diff = (a - b)[mask.bool()].abs().max().item()
    assert diff <= TOL, diff


@torch.no_grad()
def test_insert_slice_keeps_last_position(pair):
    _, _, ours, ref = pair
    ids, mask, pos = _batch(ours.config.vocab_size, seed=1)
    a = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1:]
    ours.config.insert_slice = True
    try:
        b = ours(ids, attention_mask=mask, position_ids=pos, iter_num=0).logits
    finally:
        ours.config.insert_slice = False
    assert b.shape == (2, 1, ours.config.vocab_size)
    assert (a - b).abs().max().item() <= TOL


@torch.no_grad()
def test_decode_steps_with_kv_cache_match(pair):
    _, _, ours, ref = pair
    ids, mask, pos = _batch(ours.config.vocab_size, seed=2)
    ref_out = ref(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    our_out = ours(ids, attention_mask=mask, position_ids=pos, iter_num=0)
    ref_cache, our_past = ref_out.past_key_values, our_out.past_key_values
    nxt = ref_out.logits[:, -1].argmax(-1, keepdim=True)
    pos = pos[:, -1:]
    worst = 0.0
    for _ in range(DECODE_STEPS):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        pos = pos + 1
        ref_out = ref(input_ids=nxt, attention_mask=mask, position_ids=pos, past_key_values=ref_cache,
                      use_cache=True)
        our_out = ours(nxt, attention_mask=mask, position_ids=pos, past_key_values=our_past, iter_num=1)
        ref_cache, our_past = ref_out.past_key_values, our_out.past_key_values
        worst = max(worst, (ref_out.logits - our_out.logits).abs().max().item())
        nxt = ref_out.logits[:, -1].argmax(-1, keepdim=True)
    assert our_past[0][0].shape[2] == 9 + DECODE_STEPS
    assert worst <= TOL, worst


@torch.no_grad()
def test_greedy_generate_tokens_identical(pair):
    _, _, ours, ref = pair
    ids, mask, _ = _batch(ours.config.vocab_size, seed=3)
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                            eos_token_id=None)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(expected, got)


def test_quantize_swaps_every_projection(pair):
    name, folder, _, _ = pair
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        ids, mask, pos = _batch(model.config.vocab_size, seed=4)
        before = model(ids, attention_mask=mask, position_ids=pos).logits
        model.quantize(8)
        after = model(ids, attention_mask=mask, position_ids=pos).logits
    # trust_remote_code loads its own copy of quantization_vacc, so compare class names
    quantized = [n for n, m in model.named_modules() if type(m).__name__ == "QuantizedLinearPerChannel"]
    assert len(quantized) == 7 * model.config.num_hidden_layers
    assert type(model.lm_head).__name__ == "Linear"
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.int8
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)
    cos = torch.nn.functional.cosine_similarity(before[mask.bool()], after[mask.bool()], dim=-1)
    assert cos.min().item() > 0.99, name


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


def test_generate_works_on_a_trust_remote_code_model(pair):
    _, folder, _, _ = pair
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.tensor([[1, 2, 3]])
    out = model.generate(ids, max_new_tokens=4)
    assert out.shape == (1, 7) and torch.equal(out[:, :3], ids)


@torch.no_grad()
def test_fp16_left_padding_stays_finite(tiny_model_factory, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_factory("gqa", tokenizer=False), folder)
    (folder / "vocab.json").write_text("{}")
    patch_model(folder, insert_slice=False)
    kwargs = {("dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"): torch.float16}
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kwargs).eval()
    ids, mask, pos = _batch(model.config.vocab_size, seed=5)
    mask[1, :8] = 0  # row 1: only one real token, so most query rows are fully masked
    logits = model(ids, attention_mask=mask, position_ids=pos).logits
    assert logits.dtype == torch.float16
    assert torch.isfinite(logits).all()
    norm = model.model.norm
    big = torch.full((1, 1, model.config.hidden_size), 300.0, dtype=torch.float16)
    assert torch.isfinite(norm(big)).all()  # x.pow(2) in fp16 would overflow at |x| ~ 256


@pytest.mark.parametrize("key, value, words", [
    ("use_sliding_window", True, "use_sliding_window"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}, "rope"),
])
def test_unsupported_configs_are_refused(tiny_model_factory, tmp_path, key, value, words):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_factory("gqa", tokenizer=False), folder)
    (folder / "vocab.json").write_text("{}")
    patch_model(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=words):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
