"""The runtime stage: backends, the generation loop and streaming, against transformers' generate.

One fp32 bundle of a tiny random Qwen2 is exported once per session (the real exporter) and shared.
"""
import json
import shutil

import numpy as np
import pytest

from skywork_deploy.base.errors import ConfigError, InputError, ModelFormatError
from skywork_deploy.runtime.backends import make_backend
from skywork_deploy.runtime.bench import compare_logits, fidelity
from skywork_deploy.runtime.bundle import load_tokenizer, open_bundle
from skywork_deploy.runtime.generate import (Sampler, StreamDecoder, generate_ids, generate_text, left_pad,
                                             render_prompts)

PROMPTS = ["Hi", "What is the capital of France? Answer briefly.", "写一首关于春天的诗"]
NEW_TOKENS = 64


@pytest.fixture(scope="session")
def runtime_model(tiny_model_factory):
    # Peakier logits than the default init: greedy never sits on a near-tie between ORT and torch.
    return tiny_model_factory("gqa", initializer_range=0.2)


@pytest.fixture(scope="session")
def bundle_dir(runtime_model, tmp_path_factory):
    from skywork_deploy.export import export_model

    out = tmp_path_factory.mktemp("runtime") / "bundle"
    export_model(runtime_model, out, dtype="fp32")
    return out


@pytest.fixture(scope="session")
def bundle(bundle_dir):
    return open_bundle(bundle_dir)


@pytest.fixture(scope="session")
def tokenizer(bundle):
    return load_tokenizer(bundle)


@pytest.fixture(scope="session")
def ort_backend(bundle):
    return make_backend("onnxruntime", bundle, threads=2)


@pytest.fixture(scope="session")
def prompt_rows(tokenizer):
    rows = render_prompts(tokenizer, PROMPTS)
    assert len({len(r) for r in rows}) == len(rows)  # different lengths: left padding is exercised
    return rows


@pytest.fixture(scope="session")
def hf_tokens(runtime_model, bundle, tokenizer, prompt_rows):
    """transformers' own generate (greedy) on the left-padded batch: new tokens per row, cut after EOS."""
    import torch

    from skywork_deploy.base.modeling import load_reference

    model = load_reference(runtime_model)
    pad, eos = bundle.pad_id(tokenizer), bundle.eos_ids(tokenizer)
    ids, mask, _ = left_pad(prompt_rows, pad)
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad, eos_token_id=eos)
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


def _ours(backend, bundle, tokenizer, rows, **kwargs):
    return generate_ids(backend, rows, NEW_TOKENS, eos_ids=bundle.eos_ids(tokenizer),
                        pad_id=bundle.pad_id(tokenizer), **kwargs)


def test_onnxruntime_greedy_equals_transformers_generate(ort_backend, bundle, tokenizer, prompt_rows, hf_tokens):
    gen = _ours(ort_backend, bundle, tokenizer, prompt_rows)
    assert [len(t) for t in hf_tokens] == [NEW_TOKENS] * len(PROMPTS)
    assert gen.tokens == hf_tokens
    assert gen.stop_reasons == ["length"] * len(PROMPTS)
    assert gen.timing["decode_steps"] == NEW_TOKENS - 1


def test_naive_loop_equals_io_binding(bundle, tokenizer, prompt_rows, hf_tokens):
    naive = make_backend("onnxruntime", bundle, threads=2, io_binding=False)
    assert naive.describe()["io_binding"] is False
    assert _ours(naive, bundle, tokenizer, prompt_rows).tokens == hf_tokens


def test_kv_in_place_is_bit_identical_to_a_fresh_present_per_step(bundle, prompt_rows, monkeypatch):
    """GroupQueryAttention bundles keep one K/V buffer per layer and append in place (growing it when full);
    the logits equal those of the loop that gets a new, longer present every step."""
    from skywork_deploy.runtime import ort_backend

    monkeypatch.setattr(ort_backend.KVBuffers, "GROW", 3)  # full after 3 steps: the buffers grow mid-run
    in_place = make_backend("onnxruntime", bundle, threads=2)
    copying = make_backend("onnxruntime", bundle, threads=2, kv_in_place=False)
    assert in_place.describe()["kv_in_place"] is True and copying.describe()["kv_in_place"] is False
    ids, mask, pos = left_pad(prompt_rows, 0)
    logits, caches = [], []
    for backend in (in_place, copying):
        m = mask.copy()
        out, kv = backend.prefill(ids, m, pos)
        steps = [out]
        for _ in range(12):
            m = np.concatenate([m, np.ones((len(m), 1), np.int64)], 1)
            out, kv = backend.decode(out.argmax(-1)[:, None].astype(np.int64), m, m.sum(-1, keepdims=True) - 1, kv)
            steps.append(out)
        logits.append(np.stack(steps))
        caches.append(kv)
    grown, fresh = caches
    total = ids.shape[1] + 12
    assert grown.length == total and grown.capacity > ids.shape[1] + 3  # it grew
    assert all(f.shape()[2] == total for f in fresh)
    for a, f in zip(grown.arrays, fresh):  # the filled part of each buffer is the fresh present, exactly
        np.testing.assert_array_equal(a[:, :, :total], f.numpy())
    np.testing.assert_array_equal(logits[0], logits[1])


def test_torch_backend_equals_transformers_generate(bundle, tokenizer, prompt_rows, hf_tokens, runtime_model):
    torch_backend = make_backend("torch", bundle)
    assert torch_backend.describe()["source_model"] == str(runtime_model)
    assert _ours(torch_backend, bundle, tokenizer, prompt_rows).tokens == hf_tokens
    # a model folder is a valid BUNDLE for the torch backend
    direct = make_backend("torch", open_bundle(runtime_model))
    assert generate_ids(direct, prompt_rows[:1], 8).tokens[0] == hf_tokens[0][:8]


def test_fidelity_fp32_onnxruntime_vs_torch(ort_backend, bundle):
    report = fidelity(ort_backend, make_backend("torch", bundle), prompt_len=16, steps=8)
    assert report["top1_agreement"] == 1.0
    assert report["cosine_min"] > 0.999999 and report["max_abs_diff"] < 1e-3 and report["kl_mean"] < 1e-6
    same = compare_logits(np.ones((2, 4)), np.ones((2, 4)))
    assert same["top1_agreement"] == 1.0 and abs(same["kl_mean"]) < 1e-12


def test_int8_exact_and_fast_against_torch_w8a16(runtime_model, tmp_path):
    """int8 (standard DQ + MatMul) on ORT: exact follows our torch W8A16 model; fast is close, not equal."""
    from skywork_deploy.export import export_model

    export_model(runtime_model, tmp_path / "int8", dtype="int8", int8_format="standard")
    bundle = open_bundle(tmp_path / "int8")
    reference = make_backend("torch", bundle)  # quantizes the float source per channel, as the exporter did
    exact = fidelity(make_backend("onnxruntime", bundle, threads=2, int8_accuracy="exact"), reference, 16, 8)
    assert exact["top1_agreement"] == 1.0 and exact["cosine_min"] > 0.999999 and exact["max_abs_diff"] < 1e-3
    fast = fidelity(make_backend("onnxruntime", bundle, threads=2, int8_accuracy="fast"), reference, 16, 8)
    assert 0.99 < fast["cosine_min"] < 1.0 and fast["max_abs_diff"] > exact["max_abs_diff"]


def test_seeded_sampling_is_reproducible(ort_backend, bundle, tokenizer, prompt_rows):
    def sample(seed, top_p=0.9):
        return generate_ids(ort_backend, prompt_rows, 16, Sampler(1.0, top_p, seed), bundle.eos_ids(tokenizer),
                            bundle.pad_id(tokenizer)).tokens

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    greedy = generate_ids(ort_backend, prompt_rows, 16, Sampler()).tokens
    # top-p keeps only the most likely token when p is tiny: sampling collapses to greedy
    assert generate_ids(ort_backend, prompt_rows, 16, Sampler(1.0, 1e-9, 3)).tokens == greedy


def test_sampler_top_p_keeps_the_nucleus():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    picks = {int(Sampler(1.0, 0.7, seed)(logits)[0]) for seed in range(200)}
    assert picks == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 are cut
    # a large vocabulary: the partial sort over the top tokens gives the same draws as the full sort
    big = np.random.default_rng(0).normal(size=(1, 5000)).astype(np.float32) * 4
    fast, full = Sampler(0.7, 0.9, 1), Sampler(0.7, 0.9, 1)
    full._nucleus_order = lambda p: np.argsort(-p, kind="stable")
    assert [int(fast(big)[0]) for _ in range(20)] == [int(full(big)[0]) for _ in range(20)]
    assert int(Sampler(0.0)(logits)[0]) == 0


def test_sampler_top_k_keeps_the_k_most_likely():
    logits = np.log(np.array([[0.4, 0.3, 0.2, 0.1]], dtype=np.float32))
    assert {int(Sampler(1.0, 1.0, seed, top_k=2)(logits)[0]) for seed in range(200)} == {0, 1}
    assert {int(Sampler(1.0, 1.0, seed, top_k=0)(logits)[0]) for seed in range(200)} == {0, 1, 2, 3}  # 0: off
    with pytest.raises(ConfigError, match="--top-k"):
        Sampler(1.0, top_k=-2)


def test_stops_at_eos(ort_backend, bundle, tokenizer, prompt_rows, hf_tokens):
    stop = hf_tokens[0][5]  # pretend the 6th greedy token of row 0 is an EOS
    first = hf_tokens[0].index(stop)
    gen = generate_ids(ort_backend, prompt_rows, NEW_TOKENS, eos_ids=[stop], pad_id=bundle.pad_id(tokenizer))
    assert gen.tokens[0] == hf_tokens[0][: first + 1]
    assert gen.stop_reasons[0] == "eos"
    for row, ref in zip(gen.tokens[1:], hf_tokens[1:]):  # other rows go on until their own stop
        cut = ref.index(stop) + 1 if stop in ref else len(ref)
        assert row == ref[:cut]


def test_stream_decoder_handles_multibyte_utf8(tokenizer):
    text = "naïve 你好🙂 𓀀龘🦜 日本語テキスト ✓"  # the last three are split into byte tokens
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = []
    stream = StreamDecoder(tokenizer)
    for i in ids:
        piece = stream.push(i)
        assert "\ufffd" not in piece
        pieces.append(piece)
    pieces.append(stream.flush())
    assert "".join(pieces) == text
    assert len(ids) > len([p for p in pieces if p])  # some characters span several tokens


def test_generate_text_streams_what_it_returns(ort_backend, tokenizer):
    pieces = []
    result = generate_text(ort_backend, tokenizer, ["你好"], max_new_tokens=24, on_text=pieces.append)
    out = result["outputs"][0]
    assert "".join(pieces) == out["text"] and out["new_tokens"] == 24
    assert result["timing"]["time_to_first_token_s"] > 0 and result["timing"]["decode_tokens_per_s"] > 0


def test_bad_bundles(bundle_dir, tmp_path, runtime_model):
    no_graph = tmp_path / "no_graph"
    shutil.copytree(bundle_dir, no_graph)
    (no_graph / "decode.onnx").unlink()
    with pytest.raises(ModelFormatError, match="decode graph is missing"):
        open_bundle(no_graph)

    wrong_vocab = tmp_path / "wrong_vocab"
    shutil.copytree(bundle_dir, wrong_vocab, ignore=shutil.ignore_patterns("*.onnx*"))
    for name in ("config.json", "skywork_deploy_manifest.json"):
        data = json.loads((wrong_vocab / name).read_text())
        data["vocab_size"] = 1024
        (wrong_vocab / name).write_text(json.dumps(data))
    for g in ("prefill.onnx", "decode.onnx"):
        (wrong_vocab / g).symlink_to(bundle_dir / g)
    with pytest.raises(ModelFormatError, match="tokenizer has .* tokens but the model's vocabulary has 1024"):
        load_tokenizer(open_bundle(wrong_vocab))

    with pytest.raises(ModelFormatError, match="no ONNX graphs"):
        make_backend("onnxruntime", open_bundle(runtime_model))  # a model folder: torch backend only
    with pytest.raises(ConfigError, match="unknown backend 'vacc'"):  # no step-by-step VACC backend: see serve
        make_backend("vacc", open_bundle(bundle_dir))


def test_prompt_longer_than_the_largest_bucket(bundle, ort_backend):
    ort_backend.buckets = [16, 32]
    try:
        assert ort_backend.bucket_for(10) == 16 and ort_backend.bucket_for(32) == 32
        with pytest.raises(InputError, match="largest sequence bucket .* is 32"):
            generate_ids(ort_backend, [[1] * 40], 4)
        # a short prompt is left-padded to its bucket and gives the same tokens as without buckets
        padded = generate_ids(ort_backend, [[5, 6, 7]], 8).tokens
    finally:
        ort_backend.buckets = None
    assert padded == generate_ids(ort_backend, [[5, 6, 7]], 8).tokens


# -- the CLI ----------------------------------------------------------------------------------------------
def _cli(*args):
    from click.testing import CliRunner

    from skywork_deploy.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_cli_run_streams_tokens_and_reports_timing(bundle_dir, ort_backend, tokenizer):
    args = ["--prompt", "你好", "--max-new-tokens", 12, "--threads", 2]
    streamed = _cli("run", bundle_dir, *args)
    assert streamed.exit_code == 0, streamed.output
    data = json.loads(_cli("run", bundle_dir, *args, "--json").stdout)
    out = data["outputs"][0]
    assert streamed.stdout == out["text"] + "\n"
    assert "time to first token" in streamed.stderr and "decode 11 steps" in streamed.stderr
    expected = generate_text(ort_backend, tokenizer, ["你好"], max_new_tokens=12)["outputs"][0]
    assert out["tokens"] == expected["tokens"] and out["stop_reason"] == "length"
    assert {"time_to_first_token_s", "prefill_tokens_per_s", "decode_tokens_per_s"} <= set(data["timing"])
    assert data["backend"]["threads"] == 2 and data["backend"]["backend"] == "onnxruntime"
    sampled = [json.loads(_cli("run", bundle_dir, *args, "--temperature", 0.8, "--top-p", 0.9, "--seed", 5,
                               "--no-chat-template", "--json").stdout)["outputs"][0]["tokens"] for _ in range(2)]
    assert sampled[0] == sampled[1] and data["sampling"]["chat_template"] is True


def test_cli_run_errors_are_one_line(bundle_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, message in [((empty, "-p", "x"), "no config.json in it"),
                          ((bundle_dir, "-p", "x", "--backend", "vacc"), "'vacc' is not one of"),
                          (("-p", "x"), "give either BUNDLE or --endpoint"),
                          ((bundle_dir, "-p", "x", "--top-p", 0), "--top-p")]:
        result = _cli("run", *args)
        assert result.exit_code != 0 and message in result.output
        assert "Traceback" not in result.output


def test_cli_bench_json(bundle_dir):
    result = _cli("bench", bundle_dir, "--prompt-len", "8,16", "--new-tokens", 4, "--repeats", 1, "--threads", 2,
                  "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["prompt_len"] for r in report["rows"]] == [8, 16]
    for row in report["rows"]:
        assert row["prefill_ms"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["decode_ratio"] == pytest.approx(row["decode_tokens_per_s"] / row["reference_decode_tokens_per_s"])
    assert report["reference"].startswith("transformers") and report["backend"]["kv_in_place"] is True
    table = _cli("bench", bundle_dir, "--prompt-len", 8, "--new-tokens", 2, "--repeats", 1, "--no-reference")
    assert table.exit_code == 0 and "decode tok/s" in table.stdout
    copying = _cli("bench", bundle_dir, "--prompt-len", 8, "--new-tokens", 2, "--repeats", 1, "--no-reference",
                   "--no-kv-in-place", "--json")
    assert copying.exit_code == 0 and json.loads(copying.stdout)["backend"]["kv_in_place"] is False
