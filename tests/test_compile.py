"""The compile stage: vamc configs from the model, their checks, and the driver run against a stand-in vamc."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from skywork_deploy.cli.compile import compile_
from skywork_deploy.compile_config import (
    CompileSettings, build_config, check_settings, check_vamc_config, dump_yaml, make_compile_config,
    plan_compile,
)
from skywork_deploy.errors import ConfigError, ExternalToolError, InputError
from skywork_deploy.known_models import KNOWN_MODELS, diff_known_configs, known_spec, write_known_configs
from skywork_deploy.patch import patch_model
from skywork_deploy.vamc import compile_model, find_vamc, run_vamc, write_config

ROOT = Path(__file__).resolve().parents[1]

# REFERENCE.md §3, the vendor's published example for Skywork-OR1-7B (fp16, tp 4, buckets 1024 and 2048).
VENDOR_7B_FP16 = """\
name: Skywork-OR1-7B-Preview-fp16-tp4-1024-2048
frontend:
  checkpoint: /path/to/Skywork-OR1-7B-Preview
  type: huggingface
  shape:
    input_ids: [[1024], [2048]]
  model_kwargs:
    b2s: true
    tp: 4
    model_arch: vacc
backend:
  type: tvm_vacc
  dtype: fp16
  merge_params: true
  compile:
    data_type: 0
    gather_data_vccl_dsp_enable: true
workspace:
  path: ./vacc_deploy
  workers: 4
"""

# The stand-in compiler: checks its YAML like the real one would, records argv/env, then acts per FAKE_VAMC_MODE.
FAKE_VAMC = """\
#!{python}
import json, os, subprocess, sys, time
from pathlib import Path
import yaml

mode = os.environ.get("FAKE_VAMC_MODE", "ok")
if len(sys.argv) != 3 or sys.argv[1] != "compile":
    print("usage: vamc compile CONFIG.yaml"); sys.exit(2)
cfg = yaml.safe_load(open(sys.argv[2]))
fe, be = cfg["frontend"], cfg["backend"]
problems = []
if fe["type"] != "huggingface" or fe["model_kwargs"]["model_arch"] != "vacc":
    problems.append("frontend: not a vacc huggingface model")
if not os.path.isfile(os.path.join(fe["checkpoint"], "config_vacc.json")):
    problems.append("checkpoint: no config_vacc.json")
if be["type"] != "tvm_vacc" or be["dtype"] not in ("fp16", "int8") or be["merge_params"] is not True:
    problems.append("backend: bad")
if be["dtype"] == "int8" and fe.get("quantize", {{}}).get("type") != "w8a16_gptq":
    problems.append("int8 without quantize type")
if any(b[0] % 16 for b in fe["shape"]["input_ids"]):
    problems.append("bucket not a multiple of 16")
record = {{"argv": sys.argv, "cwd": os.getcwd(), "VACC_STACK_SIZE": os.environ.get("VACC_STACK_SIZE"),
          "pid": os.getpid(), "problems": problems, "config": cfg}}
if mode == "hang":
    record["grandchild"] = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]).pid
Path(os.environ["FAKE_VAMC_RECORD"]).write_text(json.dumps(record))
if problems:
    print("\\n".join(problems)); sys.exit(2)
if mode == "fail":
    for i in range(30):
        print(f"vamc log line {{i}}", flush=True)
    sys.exit(3)
if mode == "hang":
    print("compiling...", flush=True); time.sleep(120)
out = Path(cfg["workspace"]["path"]) / cfg["name"]
if mode in ("ok", "empty"):
    out.mkdir(parents=True, exist_ok=True)
if mode == "ok":
    (out / "model.vacc").write_bytes(b"compiled")
print("compiled", cfg["name"], flush=True)
"""


@pytest.fixture
def fake_vamc(tmp_path, monkeypatch):
    """Path of the stand-in vamc; its record goes to tmp_path/vamc_record.json."""
    path = tmp_path / "bin" / "vamc"
    path.parent.mkdir()
    path.write_text(FAKE_VAMC.format(python=sys.executable))
    path.chmod(0o755)
    monkeypatch.setenv("FAKE_VAMC_RECORD", str(tmp_path / "vamc_record.json"))
    monkeypatch.setenv("FAKE_VAMC_MODE", "ok")
    monkeypatch.delenv("SKYWORK_DEPLOY_VAMC", raising=False)
    monkeypatch.delenv("VACC_STACK_SIZE", raising=False)
    monkeypatch.chdir(tmp_path)
    return path


def record(tmp_path):
    return json.loads((tmp_path / "vamc_record.json").read_text())


@pytest.fixture(scope="module")
def patched(tiny_model_factory, tmp_path_factory):
    """make(folder_name="tiny", **config_overrides) -> a patched tiny checkpoint (weights hard-linked)."""
    cache = {}

    def make(folder_name="tiny", **overrides):
        key = (folder_name, tuple(sorted(overrides.items())))
        if key not in cache:
            base = tmp_path_factory.mktemp("patched")
            src = base / "src" / folder_name
            shutil.copytree(tiny_model_factory(), src, copy_function=os.link)
            cfg = json.loads((src / "config.json").read_text())
            (src / "config.json").unlink()  # hard-linked: never write through to the cached model
            (src / "config.json").write_text(json.dumps({**cfg, **overrides}, indent=2))
            cache[key] = patch_model(src, out=base / folder_name)["folder"]
        return Path(cache[key])

    return make


def known_config(name):
    return {k: v for k, v in KNOWN_MODELS[name][1].items() if k != "architectures"}


@pytest.fixture(scope="module")
def or1_7b(patched):
    """Tiny weights behind the published Skywork-OR1-7B-Preview config.json: only the config matters here."""
    return patched("Skywork-OR1-7B-Preview", **known_config("Skywork-OR1-7B-Preview"))


def test_7b_fp16_config_is_the_vendor_example(or1_7b):
    text, env, problems = make_compile_config(or1_7b, CompileSettings(dtype="fp16"))
    assert problems == [] and env == {}
    assert text == VENDOR_7B_FP16.replace("/path/to/Skywork-OR1-7B-Preview", str(or1_7b.resolve()))
    spec = known_spec("Skywork-OR1-7B-Preview")  # the spec-only path gives the same text
    assert dump_yaml(build_config(spec, "/path/to/Skywork-OR1-7B-Preview", CompileSettings())) == VENDOR_7B_FP16


def test_7b_int8_differs_only_where_the_vendor_says(or1_7b):
    fp16 = yaml.safe_load(make_compile_config(or1_7b, CompileSettings(dtype="fp16"))[0])
    int8 = yaml.safe_load(make_compile_config(or1_7b, CompileSettings(dtype="int8"))[0])
    assert int8["name"] == "Skywork-OR1-7B-Preview-int8-tp4-1024-2048"
    assert int8["backend"]["dtype"] == "int8"
    assert int8["frontend"].pop("quantize") == {"type": "w8a16_gptq"}
    int8["name"], int8["backend"]["dtype"] = fp16["name"], "fp16"
    assert int8 == fp16


def test_parameter_counts_and_large_model_env():
    seven, big = known_spec("Skywork-OR1-7B-Preview"), known_spec("Skywork-OR1-32B-Preview")
    assert 7.5e9 < seven.num_parameters < 7.7e9  # Qwen2.5-7B: 7.62e9
    assert 32.7e9 < big.num_parameters < 32.9e9  # Qwen2.5-32B: 32.76e9
    from skywork_deploy.compile_config import compiler_env

    assert compiler_env(seven) == {} and compiler_env(big) == {"VACC_STACK_SIZE": "256"}


@pytest.mark.parametrize("heads,kv,tp,align", [
    (4, 2, 1, False), (4, 2, 2, False), (4, 2, 4, True),  # tiny GQA
    (4, 4, 4, False),  # MHA
    (8, 4, 8, True), (8, 4, 4, False),
])
def test_align_qkv_exactly_when_tp_does_not_divide_kv_heads(patched, heads, kv, tp, align):
    folder = patched(num_attention_heads=heads, num_key_value_heads=kv)
    text, _, problems = make_compile_config(folder, CompileSettings(tp=tp))
    assert problems == []
    assert yaml.safe_load(text)["frontend"]["model_kwargs"].get("align_qkv", False) is align


def test_7b_tp_rules():
    spec = known_spec("Skywork-OR1-7B-Preview")
    problems = check_settings(spec, CompileSettings(tp=8))
    assert any("tp: 8 does not divide the 28 attention heads" in p for p in problems), problems
    cfg = build_config(spec, "/m", CompileSettings(tp=7))  # 28 heads / 7 fine, 4 KV heads / 7 not
    assert check_settings(spec, CompileSettings(tp=7)) == []
    assert cfg["frontend"]["model_kwargs"]["align_qkv"] is True


def ds(**changes):
    """A valid `dataset:` block with some values changed (None removes the key)."""
    block = {"type": "huggingface", "name": "c4", "path": "allenai/c4", "nsamples": 8, "seqlen": 64, **changes}
    return {k: v for k, v in block.items() if v is not None}


# Each check with a failing example: (settings overrides, text the problem must contain).
# The tiny model has 4 heads, 2 KV heads and 4096 positions.
INT8 = {"dtype": "int8"}
FAILING = {
    "bucket not a multiple of 16": ({"seq_lens": [1000, 2048]}, "seq_lens: 1000 is not a positive multiple of 16"),
    "bucket over max positions": ({"seq_lens": [1024, 8192]},
                                  "seq_lens: 8192 exceeds max_position_embeddings 4096"),
    "buckets repeated": ({"seq_lens": [1024, 1024]}, "must be increasing without repeats"),
    "buckets unordered": ({"seq_lens": [2048, 1024]}, "(use 1024,2048)"),
    "no bucket": ({"seq_lens": []}, "seq_lens: empty"),
    "tp does not divide heads": ({"tp": 3}, "tp: 3 does not divide the 4 attention heads"),
    "tp zero": ({"tp": 0}, "tp: 0 must be at least 1"),
    "workers zero": ({"workers": 0}, "workers: 0 must be at least 1"),
    "bad name": ({"name": "../x"}, "name: '../x' is used as a file and folder name"),
    "empty workspace": ({"workspace": " "}, "workspace: empty"),
    "bad dtype": ({"dtype": "bf16"}, "dtype: 'bf16' is not supported"),
    "int8 without quantize type": ({**INT8, "quantize_type": "w4a16"}, "int8 needs a quantize type"),
    "fp16 with quantize type": ({"quantize_type": "w8a16_gptq"}, "set for an fp16 build"),
    "dataset on fp16": ({"dataset": ds()}, "calibration data is used by int8 builds only"),
    "dataset unknown name": ({**INT8, "dataset": ds(name="wiki")}, "dataset.name: 'wiki'"),
    "dataset nsamples 0": ({**INT8, "dataset": ds(nsamples=0)}, "dataset.nsamples: 0"),
    "dataset seqlen 0": ({**INT8, "dataset": ds(seqlen=0)}, "dataset.seqlen: 0 must be a positive integer"),
    "dataset seqlen too long": ({**INT8, "dataset": ds(seqlen=9000)},
                                "dataset.seqlen: 9000 exceeds max_position_embeddings"),
    "dataset empty path": ({**INT8, "dataset": ds(path="")}, "dataset.path: empty"),
    "dataset missing keys": ({**INT8, "dataset": ds(type=None, nsamples=None)}, "dataset: missing type, nsamples"),
    "dataset type": ({**INT8, "dataset": ds(type="json")}, "dataset.type: 'json'"),
    "calib and dataset": ({**INT8, "calib": "CALIB", "dataset": ds()},
                          "give either a calibration manifest or a dataset block"),
}


@pytest.fixture(scope="module")
def calib_dir(patched, tmp_path_factory):
    """A real calibration set (the calib stage, Alpaca sample file) built with the tiny model's tokenizer."""
    from skywork_deploy.calib import build_calib

    out = tmp_path_factory.mktemp("calib") / "alpaca"
    build_calib("alpaca", [str(ROOT / "calibration" / "alpaca-sample.json")], str(patched()), out, nsamples=2,
                seqlen=32)
    return out


@pytest.mark.parametrize("case", sorted(FAILING))
def test_each_check_fails_with_a_message_naming_the_key(patched, calib_dir, case):
    overrides, expected = FAILING[case]
    overrides = {k: (str(calib_dir) if v == "CALIB" else v) for k, v in overrides.items()}
    _, _, problems = make_compile_config(patched(), CompileSettings(**overrides))
    assert any(expected in p for p in problems), problems


def test_local_dataset_paths_are_checked(patched, tmp_path):
    (tmp_path / "ceval.zip").write_bytes(b"PK")
    (tmp_path / "alpaca").mkdir()
    for name, path, expected in (("ceval", tmp_path / "ceval.zip", "ceval needs the unzipped ceval-exam folder"),
                                 ("alpaca", tmp_path / "alpaca", "alpaca needs alpaca_data_cleaned.json")):
        block = {"type": "huggingface", "name": name, "path": str(path), "nsamples": 4, "seqlen": 128}
        _, _, problems = make_compile_config(patched(), CompileSettings(dtype="int8", dataset=block))
        assert any(expected in p for p in problems), problems


def test_calibration_manifest_adds_the_dataset_block(patched, calib_dir):
    text, _, problems = make_compile_config(patched(), CompileSettings(dtype="int8", calib=str(calib_dir)))
    assert problems == []
    cfg = yaml.safe_load(text)
    assert list(cfg) == ["name", "frontend", "backend", "workspace", "dataset"]
    assert list(cfg["dataset"]) == ["type", "name", "path", "nsamples", "seqlen"]
    assert cfg["dataset"] == ds(name="alpaca", path=str(ROOT / "calibration" / "alpaca-sample.json"), nsamples=2,
                                seqlen=32)


def test_calibration_tokenizer_must_match_the_model(patched, calib_dir, tmp_path):
    small = patched(vocab_size=151000)  # fewer embedding rows than the tokenizer's 151,650 tokens
    _, _, problems = make_compile_config(small, CompileSettings(dtype="int8", calib=str(calib_dir)))
    assert any("tokenizer has 151650 tokens but tiny has 151000 embedding rows" in p for p in problems), problems
    other = tmp_path / "other"
    shutil.copytree(patched(), other)
    (other / "merges.txt").write_text((other / "merges.txt").read_text() + "a b\n")
    _, _, problems = make_compile_config(other, CompileSettings(dtype="int8", calib=str(calib_dir)))
    assert problems == [f"calib ({calib_dir}): merges.txt differs from the tokenizer the calibration set was "
                        "built with (re-run `skywork-deploy calib --model` with this model)"]
    with pytest.raises(InputError, match="no calibration manifest"):
        make_compile_config(other, CompileSettings(dtype="int8", calib=str(tmp_path)))


def test_checkpoint_must_carry_the_current_patch(tiny_model, patched, tmp_path):
    _, _, problems = make_compile_config(tiny_model, CompileSettings())
    assert any("not patched" in p and "skywork-deploy patch" in p for p in problems), problems
    stale = tmp_path / "stale"
    shutil.copytree(patched(), stale)
    (stale / "modeling_qwen2_vacc.py").write_text("# an older version\n")
    _, _, problems = make_compile_config(stale, CompileSettings())
    assert any("modeling_qwen2_vacc.py: differs from this skywork-deploy version" in p for p in problems)
    cfg = json.loads((stale / "config.json").read_text())
    (stale / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "vacc_w8a16"}}))
    _, _, problems = make_compile_config(stale, CompileSettings(dtype="int8"))
    assert any("the compiler quantizes itself" in p for p in problems), problems


def test_problems_are_all_reported_in_one_error(patched):
    result = CliRunner().invoke(compile_, [str(patched()), "--dtype", "fp16", "--tp", "3",
                                           "--seq-lens", "1000,8192", "--workers", "0", "--dry-run"])
    assert result.exit_code == 1
    assert "4 problem(s)" in result.output
    for text in ("tp: 3", "seq_lens: 1000", "seq_lens: 8192", "workers: 0"):
        assert sum(text in line for line in result.output.splitlines()) == 1, result.output


def test_settings_round_trip_and_reject_bad_keys():
    s = CompileSettings(dtype="int8", tp=2, seq_lens=[512], b2s=False, workspace="/w", workers=2, name="n",
                        dataset={"type": "huggingface", "name": "c4", "path": "p", "nsamples": 1, "seqlen": 16})
    assert CompileSettings.from_yaml(s.to_yaml()) == s and CompileSettings.from_json(s.to_json()) == s
    with pytest.raises(ConfigError) as err:
        CompileSettings.from_dict({"tp": "4", "seq_len": [1], "b2s": 1, "seq_lens": [1024, True]})
    lines = str(err.value).splitlines()
    assert len(lines) == 4 and any("unknown key 'seq_len'" in x for x in lines)
    assert any("tp is '4', expected int" in x for x in lines)


def test_user_config_file_is_checked_including_align_qkv(patched, tmp_path):
    folder = patched()  # 2 KV heads: tp 4 needs align_qkv
    text, _, _ = make_compile_config(folder, CompileSettings(dtype="int8"))
    good = tmp_path / "good.yaml"
    good.write_text(text)
    assert check_vamc_config(good) == []
    cfg = yaml.safe_load(text)
    del cfg["frontend"]["model_kwargs"]["align_qkv"]
    del cfg["frontend"]["quantize"]
    cfg["backend"]["type"] = "tvm"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    problems = check_vamc_config(bad)
    assert any("align_qkv must be true: tp 4 does not divide the 2 KV heads" in p for p in problems), problems
    assert any("frontend.quantize.type is missing for an int8 build" in p for p in problems)
    assert any("backend.type is 'tvm'" in p for p in problems)
    cfg = yaml.safe_load(text)
    cfg["frontend"]["model_kwargs"]["tp"] = 2  # divides the KV heads, yet align_qkv is still set
    bad.write_text(yaml.safe_dump(cfg))
    assert any("align_qkv must be absent" in p for p in check_vamc_config(bad))


def test_build_in_configs_regenerate_without_difference(tmp_path):
    assert write_known_configs(tmp_path) and diff_known_configs(tmp_path) == []
    shipped = ROOT / "build_in" / "build"
    assert sorted(p.name for p in shipped.glob("*.yaml")) == sorted(p.name for p in tmp_path.glob("*.yaml"))
    assert len(list(shipped.glob("*.yaml"))) == 6
    for path in tmp_path.glob("*.yaml"):
        assert (shipped / path.name).read_bytes() == path.read_bytes(), path.name
    assert diff_known_configs(shipped) == []
    packaged = resources.files("skywork_deploy.build_in").joinpath("build")
    assert packaged.joinpath("Skywork-OR1-32B-Preview-int8-tp4-1024-2048.yaml").read_text() == \
        (tmp_path / "Skywork-OR1-32B-Preview-int8-tp4-1024-2048.yaml").read_text()
    (tmp_path / "Skywork-OR1-Math-7B-fp16-tp4-1024-2048.yaml").write_text("name: edited\n")
    assert diff_known_configs(tmp_path) == ["Skywork-OR1-Math-7B-fp16-tp4-1024-2048.yaml"]


# ---- the driver ----

def test_dry_run_prints_yaml_and_command_and_runs_nothing(patched, fake_vamc, tmp_path):
    args = [str(patched()), "--dtype", "int8", "--dry-run", "--vamc", str(fake_vamc)]
    result = CliRunner().invoke(compile_, args)
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.output)  # the command is a YAML comment: the output stays valid YAML
    assert cfg["name"] == "tiny-int8-tp4-1024-2048"
    config_path = tmp_path / "vacc_deploy" / "tiny-int8-tp4-1024-2048.yaml"
    assert f"# command: {fake_vamc} compile {config_path}" in result.output
    assert not (tmp_path / "vamc_record.json").exists() and not (tmp_path / "vacc_deploy").exists()


def test_dry_run_without_vamc_still_checks_and_says_so(patched, fake_vamc, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    result = CliRunner().invoke(compile_, [str(patched()), "--dtype", "fp16", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["command"][0] == "vamc" and "vamc not found" in data["vamc_missing"]


def test_config_out_is_atomic_and_backs_up_a_different_file(patched, fake_vamc, tmp_path):
    out = tmp_path / "cfg" / "c.yaml"
    args = [str(patched()), "--dtype", "fp16", "--dry-run", "--config-out", str(out)]
    assert CliRunner().invoke(compile_, args).exit_code == 0
    first = out.read_text()
    assert yaml.safe_load(first)["frontend"]["checkpoint"] == str(patched().resolve())
    assert "unchanged" in CliRunner().invoke(compile_, args).output and not out.with_name("c.yaml.bak").exists()
    out.write_text("my own edits\n")
    result = CliRunner().invoke(compile_, args)
    assert "previous kept as" in result.output
    assert out.with_name("c.yaml.bak").read_text() == "my own edits\n" and out.read_text() == first
    out.write_text("more edits\n")
    assert write_config(out, first)["backup"] == str(out.with_name("c.yaml.bak.1"))
    assert out.with_name("c.yaml.bak").read_text() == "my own edits\n"
    assert [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_vamc_lookup_order_and_missing_error(fake_vamc, tmp_path, monkeypatch):
    other = tmp_path / "other-vamc"
    shutil.copy2(fake_vamc, other)
    monkeypatch.setenv("PATH", f"{fake_vamc.parent}{os.pathsep}/usr/bin")
    assert find_vamc() == str(fake_vamc)
    monkeypatch.setenv("SKYWORK_DEPLOY_VAMC", str(other))
    assert find_vamc() == str(other)
    assert find_vamc(str(fake_vamc)) == str(fake_vamc)  # --vamc wins over the environment
    monkeypatch.setenv("SKYWORK_DEPLOY_VAMC", str(tmp_path / "missing"))
    with pytest.raises(ExternalToolError, match="SKYWORK_DEPLOY_VAMC .*missing is not an executable file"):
        find_vamc()
    monkeypatch.delenv("SKYWORK_DEPLOY_VAMC")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ExternalToolError) as err:
        find_vamc()
    assert "--vamc not given" in str(err.value) and "SKYWORK_DEPLOY_VAMC not set" in str(err.value)
    assert f"no `vamc` in PATH ({tmp_path / 'empty'})" in str(err.value)


def test_cli_reads_vamc_from_the_environment(patched, fake_vamc, tmp_path):
    result = CliRunner().invoke(compile_, [str(patched()), "--dtype", "fp16"],
                                env={"SKYWORK_DEPLOY_VAMC": str(fake_vamc)})
    assert result.exit_code == 0, result.output
    assert record(tmp_path)["argv"][0] == str(fake_vamc)
    result = CliRunner().invoke(compile_, [str(patched()), "--dtype", "fp16"],
                                env={"SKYWORK_DEPLOY_VAMC": str(tmp_path / "nope")})
    assert result.exit_code == 1 and "SKYWORK_DEPLOY_VAMC" in result.output


def test_success_streams_logs_checks_outputs_and_writes_a_manifest(patched, fake_vamc, tmp_path):
    result = CliRunner().invoke(compile_, [str(patched()), "--dtype", "int8", "--vamc", str(fake_vamc),
                                           "--workspace", "ws", "--name", "t8"])
    assert result.exit_code == 0, result.output
    rec = record(tmp_path)
    assert rec["argv"][1:] == ["compile", str(tmp_path / "ws" / "t8.yaml")] and rec["problems"] == []
    assert rec["cwd"] == str(tmp_path) and rec["VACC_STACK_SIZE"] is None
    assert "compiled t8" in result.output  # streamed to the terminal...
    assert "compiled t8" in (tmp_path / "ws" / "t8.compile.log").read_text()  # ...and to the log
    manifest = json.loads((tmp_path / "ws" / "t8.manifest.json").read_text())
    assert manifest["stage"] == "compile" and manifest["outputs"] == {"model.vacc": 8}
    assert manifest["command"] == [str(fake_vamc), "compile", str(tmp_path / "ws" / "t8.yaml")]


def test_32b_runs_with_vacc_stack_size(patched, fake_vamc, tmp_path):
    folder = patched("Skywork-OR1-32B-Preview", **known_config("Skywork-OR1-32B-Preview"))
    result = compile_model(folder, CompileSettings(dtype="fp16"), vamc=str(fake_vamc))
    assert result["env"] == {"VACC_STACK_SIZE": "256"} and record(tmp_path)["VACC_STACK_SIZE"] == "256"
    assert result["command_line"].startswith("VACC_STACK_SIZE=256 ")
    assert record(tmp_path)["config"]["name"] == "Skywork-OR1-32B-Preview-fp16-tp4-1024-2048"


def test_failure_raises_with_command_and_log_tail(patched, fake_vamc, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VAMC_MODE", "fail")
    with pytest.raises(ExternalToolError) as err:
        compile_model(patched(), CompileSettings(), vamc=str(fake_vamc))
    message = str(err.value)
    assert "exit code 3" in message and f"{fake_vamc} compile " in message
    assert "vamc log line 10" in message and "vamc log line 29" in message and "vamc log line 9\n" not in message
    log = (tmp_path / "vacc_deploy" / "tiny-fp16-tp4-1024-2048.compile.log").read_text()
    assert "vamc log line 0\n" in log and "vamc log line 29\n" in log


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _wait_dead(pids, seconds=10):
    end = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.05)
    return not any(_alive(p) for p in pids)


def test_timeout_stops_the_compiler_and_its_children(patched, fake_vamc, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VAMC_MODE", "hang")
    start = time.monotonic()
    with pytest.raises(ExternalToolError, match=r"timed out after 1.5 s(.|\n)*compiling\.\.\."):
        compile_model(patched(), CompileSettings(), vamc=str(fake_vamc), timeout=1.5)
    assert time.monotonic() - start < 10
    rec = record(tmp_path)
    assert _wait_dead([rec["pid"], rec["grandchild"]])


def test_ctrl_c_stops_the_compiler_and_exits_cleanly(patched, fake_vamc, tmp_path):
    env = {**os.environ, "FAKE_VAMC_MODE": "hang"}
    proc = subprocess.Popen([sys.executable, "-m", "skywork_deploy", "compile", str(patched()), "--dtype", "fp16",
                             "--vamc", str(fake_vamc)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "vamc_record.json").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # let the stand-in reach its sleep
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, (out, err)
    assert "Interrupted" in err and "Traceback" not in err
    rec = record(tmp_path)
    assert _wait_dead([rec["pid"], rec["grandchild"]])
    assert "interrupted: the compiler was stopped" in (
        tmp_path / "vacc_deploy" / "tiny-fp16-tp4-1024-2048.compile.log").read_text()


@pytest.mark.parametrize("mode,expected", [("none", "did not create"), ("empty", "is empty")])
def test_success_without_outputs_is_an_error(patched, fake_vamc, monkeypatch, mode, expected):
    monkeypatch.setenv("FAKE_VAMC_MODE", mode)
    with pytest.raises(ExternalToolError, match=expected):
        compile_model(patched(), CompileSettings(), vamc=str(fake_vamc))


def test_stale_outputs_from_an_earlier_run_are_not_accepted(patched, fake_vamc, tmp_path, monkeypatch):
    out = tmp_path / "vacc_deploy" / "tiny-fp16-tp4-1024-2048"
    out.mkdir(parents=True)
    (out / "old.vacc").write_bytes(b"old")
    os.utime(out / "old.vacc", (time.time() - 3600, time.time() - 3600))
    monkeypatch.setenv("FAKE_VAMC_MODE", "none")
    with pytest.raises(ExternalToolError, match="wrote nothing new"):
        compile_model(patched(), CompileSettings(), vamc=str(fake_vamc))


def test_run_vamc_on_an_existing_config(patched, fake_vamc, tmp_path):
    plan = plan_compile(patched(), CompileSettings(workspace=str(tmp_path / "abs-ws")))
    config = tmp_path / "given.yaml"
    config.write_text(plan.yaml_text)
    result = run_vamc(config, vamc=str(fake_vamc))
    assert Path(result["output_dir"]) == tmp_path / "abs-ws" / plan.name
    assert result["outputs"] == {"model.vacc": 8} and result["returncode"] == 0
