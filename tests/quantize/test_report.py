"""The quantize report's accuracy gate: stated thresholds, measured against the original model."""
import json
import math

import pytest
from click.testing import CliRunner

from skywork_deploy.cli import cli
from skywork_deploy.base.errors import ConfigError
from skywork_deploy.quantize.report import MAX_KL, MIN_TOP1, check_thresholds, format_table, verdict_text


def figures(top1, kl):
    return {"top1_agreement": top1, "mean_kl": kl, "max_abs_diff": 0.1, "min_cosine": 0.99, "positions": 48,
            "prompts": 4, "bit_identical_to_in_memory": None}


def test_defaults_are_stated_and_sane_for_w8a16():
    assert 0.95 <= MIN_TOP1 < 1.0 and 0 < MAX_KL <= 0.05


@pytest.mark.parametrize("top1, kl, passed", [(1.0, 1e-6, True), (MIN_TOP1, MAX_KL, True),
                                              (MIN_TOP1 - 0.01, 1e-6, False), (1.0, MAX_KL * 2, False),
                                              (1.0, math.nan, False)])
def test_check_thresholds(top1, kl, passed):
    e2e = check_thresholds(figures(top1, kl))
    assert e2e["passed"] is passed and e2e["thresholds"] == {"min_top1": MIN_TOP1, "max_kl": MAX_KL}
    assert bool(e2e["failures"]) is not passed
    assert verdict_text(e2e).startswith("validated" if passed else "FAILED")


def test_a_skipped_check_is_not_judged():
    e2e = check_thresholds({"skipped": "--no-eval"})
    assert e2e == {"skipped": "--no-eval"} and verdict_text(e2e) == "skipped (--no-eval)"


def test_thresholds_out_of_range_are_config_errors():
    with pytest.raises(ConfigError, match="min-top1"):
        check_thresholds(figures(1.0, 0.0), min_top1=1.5)


def test_quantize_passes_within_and_fails_outside_its_thresholds(tiny_model_factory, tmp_path):
    model = str(tiny_model_factory(tokenizer=False))
    ok = CliRunner().invoke(cli, ["quantize", model, "-o", str(tmp_path / "ok")])
    assert ok.exit_code == 0, ok.output
    assert "accuracy verdict: validated (top-1" in ok.output
    e2e = json.loads((tmp_path / "ok" / "quantize_report.json").read_text())["end_to_end"]
    assert e2e["passed"] is True and e2e["thresholds"]["max_kl"] == MAX_KL and e2e["mean_kl"] > 0
    strict = CliRunner().invoke(cli, ["quantize", model, "-o", str(tmp_path / "strict"), "--max-kl", "0"])
    assert strict.exit_code == 1, strict.output
    assert "outside the accuracy thresholds" in strict.output and "> --max-kl 0" in strict.output
    assert "Traceback" not in strict.output and not (tmp_path / "strict").exists()  # nothing written
    assert not list(tmp_path.glob(".strict*"))


def test_format_table_states_the_verdict():
    report = {"layers": [], "total": {"layer": "total", "tensors": 0, "bytes_before": 0, "bytes_after": 0,
                                      "rel_fro_max": 0.0, "rel_fro_mean": 0.0, "max_row_rel": 0.0},
              "end_to_end": check_thresholds({**figures(0.5, 0.2), "min_cosine": 0.9, "method": "x"})}
    text = format_table(report)
    assert "accuracy verdict: FAILED (top-1 agreement 50.0% < --min-top1 97.0%; mean KL 0.2 nats > --max-kl 0.01)" \
        in text
