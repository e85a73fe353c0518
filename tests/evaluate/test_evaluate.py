"""`skywork-deploy eval`: datasets, Math-Verify scoring, avg@K / pass@K / paired SE, in-process and endpoint.

The targets are the shipped trained demo model (torch, in-process) and its fp32 ONNX export served by a real
`skywork-deploy serve` process; the scorer is the real `math-verify` package.
"""
import itertools
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from skywork_deploy.cli import cli
from skywork_deploy.base.errors import DataFormatError, NetworkError
from skywork_deploy.evaluate import datasets, runner, scoring

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# -- metrics (pure) ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,c,k", [(4, 0, 1), (4, 1, 1), (4, 1, 2), (5, 2, 3), (8, 3, 4), (6, 6, 2), (3, 1, 3)])
def test_pass_at_k_equals_the_share_of_k_subsets_holding_a_correct_sample(n, c, k):
    subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
    brute = sum(any(s) for s in subsets) / len(subsets)
    assert runner.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_needs_k_samples():
    with pytest.raises(Exception, match="--samples 2"):
        runner.pass_at_k(2, 1, 4)


def test_paired_difference_and_its_standard_error_match_numpy():
    rng = np.random.default_rng(0)
    k = 4
    t = rng.integers(0, k + 1, size=30)
    r = rng.integers(0, k + 1, size=30)
    rows = lambda cs: [{"correct": int(c), "gold_unparsable": False} for c in cs]  # noqa: E731
    diff = runner.paired_difference(rows(t), rows(r), k)
    d = (t - r) / k * 100
    assert diff["points"] == pytest.approx(d.mean())
    assert diff["paired_se"] == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)))
    line = runner.difference_line("int8", diff, (k, 0.5, 0.6, "fp32"))
    assert line.startswith("int8 lost" if d.mean() < 0 else "int8 gained") and "(paired SE, 30 problems)" in line
    assert line.endswith("avg@4 50.0 vs 60.0 for fp32")
    same = runner.difference_line("int8", {"points": 0.0, "paired_se": 0.0, "problems": 3})
    assert same == "int8 matched the reference: 0.0 points +- 0.0 (paired SE, 3 problems)"


# -- scoring -------------------------------------------------------------------------------------------------

def test_the_answer_is_taken_after_the_last_think_end():
    assert scoring.score("<think>\n\\boxed{1}</think> so \\boxed{2}", "2") == ("correct", "2")
    assert scoring.score("<think>\n\\boxed{2}</think> so \\boxed{1}", "2")[0] == "wrong"


def test_math_verify_equivalence_and_solution_style_gold():
    assert scoring.score("</think> $\\boxed{\\frac{14}{3}}$", "\\frac{14}{3}")[0] == "correct"
    assert scoring.score("</think> \\boxed{\\dfrac{28}{6}}", "$\\frac{14}{3}$")[0] == "correct"
    assert scoring.score("</think> \\boxed{4.67}", "\\frac{14}{3}")[0] == "wrong"
    assert scoring.score("</think> \\boxed{7}", "so the total is $\\boxed{7}$.")[0] == "correct"


def test_unparsable_prediction_and_gold_are_their_own_statuses():
    assert scoring.score("</think> I cannot tell.", "7") == ("prediction_unparsable", None)
    assert scoring.score("</think> \\boxed{???}", "7") == ("prediction_unparsable", None)
    assert scoring.score("</think> \\boxed{7}", "}{")[0] == "gold_unparsable"


# -- datasets ------------------------------------------------------------------------------------------------

def test_published_column_names_are_recognised_in_every_format(tmp_path):
    aime24 = write_jsonl(tmp_path / "aime24.jsonl", [{"ID": "2024-I-1", "Problem": "P1", "Answer": 204,
                                                      "Solution": "..."}])
    pq.write_table(pa.table({"question": ["Q1", "Q2"], "answer": ["70", "588"]}), tmp_path / "aime25.parquet")
    (tmp_path / "math500.csv").write_text("problem,solution,answer,unique_id\nP,\"x \\boxed{3}\",3,test/a.json\n")
    (tmp_path / "solution_only.json").write_text(json.dumps([{"problem": "P", "solution": "so \\boxed{9}"}]))
    assert datasets.load_problems(aime24) == [{"id": "2024-I-1", "problem": "P1", "answer": "204"}]
    assert [r["answer"] for r in datasets.load_problems(tmp_path / "aime25.parquet")] == ["70", "588"]
    assert datasets.load_problems(tmp_path / "math500.csv") == [{"id": "test/a.json", "problem": "P", "answer": "3"}]
    gold = datasets.load_problems(tmp_path / "solution_only.json")[0]["answer"]
    assert scoring.score("</think> \\boxed{9}", gold)[0] == "correct"
    assert len(datasets.load_problems(tmp_path / "aime25.parquet", limit=1)) == 1


def test_problem_and_answer_keys_name_other_columns(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"q": "What is 2 + 2?", "gold": "4", "ask": "x"}])
    assert datasets.load_problems(path, problem_key="q")[0] == {"id": "0", "problem": "What is 2 + 2?",
                                                                "answer": "4"}
    with pytest.raises(DataFormatError, match="no column 'nope'.*--answer-key"):
        datasets.load_problems(path, problem_key="q", answer_key="nope")


def test_bad_dataset_files_are_one_line_errors(tmp_path):
    cols = write_jsonl(tmp_path / "cols.jsonl", [{"text": "a", "label": "b"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for path, expected in ((cols, "no recognisable problem column among text, label"),
                           (empty, "no problems in the file")):
        result = invoke(["eval", tmp_path, "--dataset", path])
        assert result.exit_code == 1, result.output
        msg = result.output.strip()
        assert msg.startswith("Error:") and str(path) in msg and expected in msg and "\n" not in msg
        assert "Traceback" not in msg
    assert "--problem-key" in invoke(["eval", tmp_path, "--dataset", cols]).output


def test_a_hub_id_without_network_is_a_network_error():
    with pytest.raises(NetworkError, match="HuggingFaceH4/MATH-500.*local"):
        datasets.load_problems("HuggingFaceH4/MATH-500")


# -- end to end on the trained demo model --------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_model():
    from skywork_deploy.demo_model import demo_model_path

    return demo_model_path()


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory):
    """Three held-out problems and one whose gold answer Math-Verify cannot parse."""
    from skywork_deploy.demo_model import heldout_path

    rows = [json.loads(line) for line in heldout_path().read_text().splitlines()[:3]]
    rows.append({"problem": "What is 3 + 4?", "answer": "}{"})
    return write_jsonl(tmp_path_factory.mktemp("eval") / "problems.jsonl", rows)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fp32_bundle(demo_bundle):
    """The demo model exported to fp32 ONNX (validated by the exporter; shared, tests/conftest.py)."""
    return demo_bundle


def test_eval_in_process_reports_avg_pass_tokens_and_writes_jsonl(fp32_bundle, problems_file, tmp_path):
    out = tmp_path / "rows.jsonl"
    result = invoke(["eval", fp32_bundle, "--dataset", problems_file, "-k", "2", "--max-tokens", "80",
                     "--reference", fp32_bundle, "-o", out, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    t = data["target"]
    assert t["backend"] == "onnxruntime" and t["problems"] == 4 and t["scored_problems"] == 3
    assert t["gold_unparsable_ids"] == ["3"] and t["counts"]["gold_unparsable"] == 2
    assert t["avg@2"] >= 0.66 and t["pass@1"] == pytest.approx(t["avg@2"]) and t["pass@2"] >= t["pass@1"]
    assert t["tokens_generated"] > 0 and t["wall_s"] > 0
    assert data["difference"]["points"] == 0.0 and data["difference"]["paired_se"] == 0.0  # same model, seeds
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["samples"]) == 2 for r in rows)
    assert rows[0]["samples"][0]["status"] in scoring.STATUSES and rows[0]["reference"]["correct"] >= 0
    assert sum(r["correct"] for r in rows[:3]) == round(t["avg@2"] * 6)


@pytest.fixture(scope="module")
def served_bundle(fp32_bundle):
    """The fp32 ONNX bundle served by a real `skywork-deploy serve` process."""
    import httpx

    bundle = fp32_bundle
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "skywork_deploy", "serve", str(bundle), "--port", str(port),
                             "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited: {proc.stderr.read().decode()[-2000:]}")
    yield bundle, url
    proc.terminate()
    proc.wait(timeout=30)


def test_eval_through_an_endpoint_against_the_in_process_reference(served_bundle, demo_model, problems_file):
    bundle, url = served_bundle
    result = invoke(["eval", "--endpoint", url, "--dataset", problems_file, "--limit", "3", "-k", "2",
                     "--max-tokens", "80", "--reference", demo_model])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith(f"target demo_model@{url}: avg@2 ") and "pass@2" in lines[0]  # the served name
    assert lines[1].startswith("reference fp32 (torch")
    assert " points +- " in lines[-1] and "(paired SE, 3 problems)" in lines[-1]


def test_endpoint_down_is_one_line_naming_the_url():
    from skywork_deploy.demo_model import heldout_path

    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    result = invoke(["eval", "--endpoint", url, "--dataset", heldout_path(), "--limit", "1"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    msg = result.output.strip()
    assert "\n" not in msg and f"cannot reach {url}" in msg


def test_build_yaml_eval_block_round_trips_and_unknown_keys_are_named():
    from skywork_deploy.base.errors import ConfigError
    from skywork_deploy.pipeline.settings import BuildSettings

    s = BuildSettings.from_yaml("model: m\ndtype: fp16\neval:\n  dataset: aime25.jsonl\n  samples: 4\n  limit: 8\n")
    assert (s.eval.dataset, s.eval.samples, s.eval.limit, s.eval.temperature) == ("aime25.jsonl", 4, 8, 0.6)
    assert BuildSettings.from_yaml(s.to_yaml()).eval == s.eval
    with pytest.raises(ConfigError, match="eval: unknown key 'sampels'"):
        BuildSettings.from_yaml("model: m\neval:\n  sampels: 4\n")
