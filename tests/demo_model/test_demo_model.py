"""The shipped trained demo model: its problems, artifacts, accuracy, training reproducibility, and int8
fidelity on trained weights (quantize report, export validation, held-out text, eval of int8 vs fp32)."""
import json
import re

import numpy as np
import pytest

from skywork_deploy.demo_model import demo_model_path, heldout_path
from skywork_deploy.demo_model import problems as P
from skywork_deploy.evaluate.scoring import score

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
R1_TOKENS = ["<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>",
             "<think>", "</think>"]


# -- problems ------------------------------------------------------------------------------------------------

def test_every_trace_step_is_true_and_the_boxed_answer_verifies():
    for p in P.sample(300, seed=5) + P.sample(60, seed=6, heldout=True):
        text = P.solution(p)
        for lhs, rhs in re.findall(r"(\d+(?: [-+*] \d+)+) = (\d+)", text):
            assert eval(lhs) == int(rhs), (p, lhs, rhs)  # noqa: S307 (digits and + - * only)
        assert re.search(r"borrow: (\d+) - (\d+) = (\d+)", text) is None or p.op == "-"
        assert text.count("</think>") == 1 and score(text, str(p.answer)) == ("correct", str(p.answer))


def test_heldout_problems_never_appear_in_training_and_the_shipped_set_is_heldout():
    train = {p.expression for p in P.split(heldout=False)}
    held = {p.expression for p in P.split(heldout=True)}
    assert not train & held and 0.05 < len(held) / (len(train) + len(held)) < 0.15
    rows = [json.loads(line) for line in heldout_path().read_text().splitlines()]
    assert len(rows) == 200 and all(set(r) == {"problem", "answer"} for r in rows)
    for r in rows:
        expr = re.search(r"(\d+ [-+*] \d+)", r["problem"]).group(1)
        assert expr in held and str(eval(expr)) == r["answer"]  # noqa: S307


# -- the shipped artifacts -----------------------------------------------------------------------------------

def test_shipped_model_is_a_small_gqa_qwen2_with_qkv_bias_and_r1_tokenizer():
    from safetensors import safe_open
    from transformers import AutoTokenizer

    folder = demo_model_path()
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["num_attention_heads"] // cfg["num_key_value_heads"] >= 2
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        names = set(f.keys())
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert f"model.layers.0.self_attn.{proj}.bias" in names
    assert sum(f.stat().st_size for f in folder.iterdir()) + heldout_path().stat().st_size < 4.2e6
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert len(tok) <= cfg["vocab_size"]
    for t in R1_TOKENS:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == "<｜begin▁of▁sentence｜><｜User｜>What is 2 + 3?<｜Assistant｜><think>\n"
    assert tok.decode(tok("12 + 7 = 19", add_special_tokens=False)["input_ids"]) == "12 + 7 = 19"
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["temperature"] == 0.6 and gen["top_p"] == 0.95 and gen["eos_token_id"] == tok.eos_token_id


def test_training_log_records_a_falling_loss_heldout_accuracy_time_and_seed():
    log = json.loads((demo_model_path() / "training_log.json").read_text())
    losses = [p["loss"] for p in log["loss_curve"]]
    assert len(losses) >= 20 and np.mean(losses[-5:]) < 0.1 * np.mean(losses[:2])
    assert log["heldout"]["accuracy_greedy_fp32"] >= 0.95 and log["heldout"]["scorer"] == "math-verify"
    assert log["train_time_s"] > 0 and isinstance(log["seed"], int) and log["parameters"] < 1.2e6


def test_training_is_seeded_and_reproducible(tmp_path):
    from safetensors.numpy import load_file

    from skywork_deploy.demo_model.train import train

    kw = dict(seed=3, steps=3, batch_size=4, heldout_problems=1, probe_problems=1, log=lambda *_: None)
    a, b = train(tmp_path / "a", **kw), train(tmp_path / "b", **kw)
    assert a["loss_curve"] == b["loss_curve"]
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


# -- fidelity on trained weights -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from skywork_deploy.patch import patch_model
    from skywork_deploy.quantize import quantize_model

    root = tmp_path_factory.mktemp("demo-fidelity")
    patch_model(demo_model_path(), out=root / "patch")
    result = quantize_model(root / "patch", root / "w8a16")
    return root, result


def heldout_texts(n=40):
    from skywork_deploy.demo_model.tokenizer import render_prompt
    from skywork_deploy.base.synth import EOS

    return [render_prompt(p.prompt()) + P.solution(p) + EOS for p in P.sample(n, seed=11, heldout=True)]


def test_w8a16_on_trained_weights_keeps_top1_and_kl_on_heldout_text(quantized):
    import torch
    from transformers import AutoTokenizer

    from skywork_deploy.base.agreement import logit_agreement
    from skywork_deploy.base.modeling import load_model

    root, result = quantized
    e2e = result["report"]["end_to_end"]  # the quantize stage's own check, on its fixed prompts
    assert e2e["top1_agreement"] >= 0.99 and e2e["mean_kl"] <= 1e-3
    tok = AutoTokenizer.from_pretrained(str(root / "patch"))
    fp32 = load_model(root / "patch", dtype="fp32", insert_slice=False)
    w8 = load_model(root / "w8a16", dtype="fp32", insert_slice=False)
    ours, ref = [], []
    with torch.inference_mode():
        for text in heldout_texts():
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])  # (1, S)
            ref.append(fp32(ids, iter_num=0, use_cache=False).logits[0].numpy())  # (S, V)
            ours.append(w8(ids, iter_num=0, use_cache=False).logits[0].numpy())
    m = logit_agreement(np.concatenate(ours), np.concatenate(ref))
    assert m["positions"] > 2000 and m["top1_agreement"] >= 0.99 and m["kl_mean"] <= 1e-3, m


def test_int8_onnx_export_validates_and_answers_as_well_as_fp32(quantized, tmp_path):
    from skywork_deploy.evaluate.runner import run_eval
    from skywork_deploy.evaluate.targets import BundleTarget
    from skywork_deploy.export import export_model

    root, _ = quantized
    result = export_model(root / "w8a16", tmp_path / "int8", simplify=False)
    assert result["validation"]["passed"] is True
    problems = [{"id": str(i), **json.loads(line)}
                for i, line in enumerate(heldout_path().read_text().splitlines()[:24])]
    out = run_eval(BundleTarget(tmp_path / "int8"), problems, reference=BundleTarget(root / "patch"),
                   samples=1, max_tokens=96, temperature=0.0)
    assert out["reference"]["avg"] >= 0.95 and out["target"]["avg"] >= 0.95
    diff = out["difference"]
    assert abs(diff["points"]) <= max(2 * diff["paired_se"], 1e-9), diff["line"]


# -- build --demo --------------------------------------------------------------------------------------------

def test_build_demo_answers_right_and_ends_with_an_int8_vs_fp32_eval(tmp_path):
    from click.testing import CliRunner

    from skywork_deploy.cli import cli

    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["build", "--demo", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "Prompt: What is 85 - 39?" in result.stdout  # a held-out problem
    assert "Answer (the shipped trained demo model, int8 on ONNX Runtime): " in result.stdout
    assert "So 85 - 39 = 46." in result.stdout and "\\boxed{46}" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage_order"] == ["patch", "calib", "quantize", "export", "validate", "eval", "compile"]
    ev = manifest["validation"]["eval"]
    assert ev["problems"] == 6 and ev["target"]["backend"] == "onnxruntime" and ev["reference"]["backend"] == "torch"
    assert ev["target"]["avg"] >= 5 / 6 and ev["reference"]["avg"] >= 5 / 6 and "(paired SE, 6 problems)" in ev["line"]
    assert f"Eval on 6 held-out problems: {ev['line']}" in result.stdout
    assert "; eval checked only (int8 exact (onnxruntime, export) " in result.stdout.strip().splitlines()[-1]
    rows = [json.loads(line) for line in (out / "eval" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all("reference" in r for r in rows)
