"""The layer-streamed reference against whole models, and how validation chooses and skips."""
import weakref

import numpy as np
import pytest
import torch

from skywork_deploy.base import reference
from skywork_deploy.base.errors import ConfigError
from skywork_deploy.base.modeling import load_model, load_reference
from skywork_deploy.base.reference import streamed_logits


def left_padded_batch(vocab):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 10), generator=gen)  # (B, S)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    ids[1, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


@pytest.mark.parametrize("name", ["gqa", "mha", "tied"])
def test_streamed_equals_transformers_with_left_padding(tiny_model_factory, name):
    folder = tiny_model_factory(name, tokenizer=False)
    ids, mask, pos = left_padded_batch(1024)
    got = streamed_logits(folder, [(ids, mask, pos)])[0]  # (2, 10, V)
    with torch.no_grad():
        expected = load_reference(folder)(ids, attention_mask=mask, position_ids=pos).logits
    assert got.shape == expected.shape == (2, 10, 1024)
    assert float((got - expected).abs().max()) <= 1e-5


@pytest.mark.parametrize("name, include_lm_head", [("gqa", False), ("tied", True)])
def test_streamed_int8_folder_equals_quantize8(tiny_model_factory, tmp_path, name, include_lm_head):
    from skywork_deploy.quantize import quantize_model

    folder = tiny_model_factory(name, tokenizer=False)
    out = tmp_path / "q"
    quantize_model(folder, out, include_lm_head=include_lm_head, evaluate=False)
    batch = left_padded_batch(1024)
    model = load_model(folder, "fp32", insert_slice=False).quantize(8, include_lm_head=include_lm_head)
    with torch.no_grad():
        expected = model(batch[0], attention_mask=batch[1], position_ids=batch[2], iter_num=0).logits
    from_folder = streamed_logits(out, [batch])[0]
    in_memory = streamed_logits(folder, [batch], quantize_bits=8, include_lm_head=include_lm_head)[0]
    assert float((from_folder - expected).abs().max()) <= 1e-5
    assert torch.equal(from_folder, in_memory)
    assert not torch.equal(in_memory, streamed_logits(folder, [batch])[0])


def test_one_layer_in_memory_at_a_time_and_several_batches(tiny_model_factory, monkeypatch):
    folder = tiny_model_factory("gqa", tokenizer=False)
    alive, load = [], reference.load_layer

    def tracked(*args, **kwargs):
        alive.append(sum(ref() is not None for ref in refs))
        layer = load(*args, **kwargs)
        refs.append(weakref.ref(layer))
        return layer

    refs = []
    monkeypatch.setattr(reference, "load_layer", tracked)
    monkeypatch.setattr(reference, "LM_HEAD_BLOCK_ROWS", 300)  # 4 blocks, the last one short
    a, b = left_padded_batch(1024), (torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long),
                                     torch.arange(3)[None])
    both = streamed_logits(folder, [a, b])
    assert alive == [0, 0]  # the previous layer is gone before the next one is read
    with torch.no_grad():
        expected = load_reference(folder)(b[0]).logits
    assert float((both[1] - expected).abs().max()) <= 1e-5
    assert torch.equal(both[0], streamed_logits(folder, [a])[0])
    tail = streamed_logits(folder, [a], last=3)[0]  # (2, 3, V): lm_head on the last positions only
    assert tail.shape == (2, 3, 1024) and float((tail - both[0][:, -3:]).abs().max()) <= 1e-6


def test_reference_choice_budget_and_override(monkeypatch):
    from skywork_deploy.export import validate as v

    monkeypatch.delenv(v.REFERENCE_ENV, raising=False)
    assert v.choose_reference(10 << 30, available=100 << 30)[0] == "whole"
    how, why = v.choose_reference(30 << 30, available=24 << 30)
    assert how == "streamed" and "available" in why
    monkeypatch.setenv(v.REFERENCE_ENV, "streamed")
    assert v.choose_reference(1, available=100 << 30)[0] == "streamed"
    monkeypatch.setenv(v.REFERENCE_ENV, "bogus")
    with pytest.raises(ConfigError, match=v.REFERENCE_ENV):
        v.choose_reference(1)
    assert v.ort_fits(15 << 30, {}, v.FAST, False, available=24 << 30) is None
    assert "GiB" in v.ort_fits(30 << 30, {}, v.FAST, False, available=24 << 30)  # 7B in fp32
    # the 7B int8 bundle as exported: 6.53 GB int8 layers, fp16 lm_head 1.09 GB and embedding, 8.72 GB of data
    int8_7b = {"int8": 6_530_000_000, "matmul_float16": 1_090_000_000}
    assert v.ort_fits(8_720_000_000, int8_7b, v.EXACT, True, available=21 << 30) is None  # measured 11.2 GiB
    assert "GiB" in v.ort_fits(8_720_000_000, int8_7b, v.EXACT, True, available=14 << 30)
    assert "GiB" in v.ort_fits(8_720_000_000, int8_7b, v.UNFUSED, True, available=21 << 30)  # folded: 4x


def test_teacher_forced_inputs_are_seeded_and_left_padded():
    from skywork_deploy.export import validate as v

    ids, mask, forced = v.make_inputs(1024, 12)
    again = v.make_inputs(1024, 12)
    assert all(np.array_equal(x, y) for x, y in zip((ids, mask, forced), again))
    assert forced.shape == (2, v.DECODE_STEPS) and mask[1, :v.PAD].sum() == 0 and ids[1, :v.PAD].sum() == 0
