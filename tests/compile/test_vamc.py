"""The compile driver against a stand-in `vamc`: command, environment, streaming, timeout, Ctrl-C, and the
checks of what it wrote (model suites hashed, tokenizer made servable, the compile manifest).

The stand-in is a real executable run as a subprocess. It checks the YAML it receives against the
checkpoint's own config_vacc.json (independently of our code), then writes the layout we infer from the
vendor's documents: `<workspace>/<name>/prefill_<max_input_len>_rank<r>/mod.{so,json,params}` for each rank.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from skywork_deploy.cli.compile import compile_
from skywork_deploy.compile.config import plan_compile
from skywork_deploy.compile.settings import PREFLIGHT_CHECKS, CompileSettings
from skywork_deploy.compile.output import OUTPUT_CHECKS
from skywork_deploy.base.errors import ExternalToolError
from skywork_deploy.compile.vamc import compile_model, compile_models, find_vamc, run_vamc, write_config
from tests.conftest import sigint_default
from tests.compile.test_config import known_config, patched  # noqa: F401  (a fixture)

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
kw = fe["model_kwargs"]
problems = []
model = json.load(open(os.path.join(fe["checkpoint"], "config_vacc.json")))
if fe["type"] != "huggingface" or kw["model_arch"] != "vacc":
    problems.append("frontend: not a vacc huggingface model")
if be["type"] != "tvm_vacc" or be["dtype"] not in ("fp16", "int8") or be["merge_params"] is not True:
    problems.append("backend: bad")
if be["dtype"] == "int8" and fe.get("quantize", {{}}).get("type") != "w8a16_gptq":
    problems.append("int8 without quantize type")
if "quantization_config" in model:
    problems.append("checkpoint already quantized")
(n_in,), (n_total,) = fe["shape"]["input_ids"]
if n_in % 16 or n_total % 16 or not n_in < n_total <= model["max_position_embeddings"]:
    problems.append("bad input_ids")
tp, kv = kw["tp"], model["num_key_value_heads"]
if kv % tp and kw.get("align_qkv") is not True:
    problems.append(f"tp {{tp}} on {{kv}} KV heads needs align_qkv")
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
if mode != "none":
    out.mkdir(parents=True, exist_ok=True)
if mode == "nosuite":
    (out / "build.log").write_text("done")
ranks = 1 if mode == "oneranks" else tp
for r in range(ranks) if mode in ("ok", "partial", "tokenizer", "oneranks") else ():
    suite = out / f"prefill_{{n_in}}_rank{{r}}"
    suite.mkdir(exist_ok=True)
    (suite / "mod.so").write_bytes(b"so" * (r + 1))
    if mode != "partial":
        (suite / "mod.json").write_text(json.dumps({{"rank": r}}))
        (suite / "mod.params").write_bytes(bytes(range(16)) * (r + 1))
if mode == "tokenizer":
    (out / "tokenizer").mkdir()
    (out / "tokenizer" / "tokenizer.json").write_text("{{}}")
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


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_dry_run_prints_yaml_and_command_and_runs_nothing(patched, fake_vamc, tmp_path):
    args = [str(patched()), "--dtype", "int8", "--dry-run", "--vamc", str(fake_vamc)]
    result = CliRunner().invoke(compile_, args)
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.output)  # the command is a YAML comment: the output stays valid YAML
    assert cfg["name"] == "tiny-int8-tp4-1024-2048"
    config_path = tmp_path / "vacc_deploy" / "tiny-int8-tp4-1024-2048.yaml"
    assert f"# command: {fake_vamc} compile {config_path}" in result.output
    assert "# config: not written (dry run; add --config-out FILE" in result.output
    assert "# compiled: false (dry run)" in result.output
    assert not (tmp_path / "vamc_record.json").exists() and not (tmp_path / "vacc_deploy").exists()


def test_dry_run_without_vamc_still_checks_and_says_so(patched, fake_vamc, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent/bin")
    result = CliRunner().invoke(compile_, [str(patched()), "--dtype", "fp16", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["command"][0] == "vamc" and "vamc not found" in data["vamc_missing"]
    assert "/nonexistent/bin" not in data["vamc_missing"]  # no $PATH dump
    no_calib = [name for name in PREFLIGHT_CHECKS if name not in ("dataset", "calib_tokenizer")]
    assert data["compiled"] is False and [c["name"] for c in data["checks"]] == no_calib


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
    assert "no `vamc` on PATH" in str(err.value) and str(tmp_path) not in str(err.value)


def test_cli_reads_vamc_from_the_environment(patched, fake_vamc, tmp_path):
    result = CliRunner().invoke(compile_, [str(patched()), "--dtype", "fp16"],
                                env={"SKYWORK_DEPLOY_VAMC": str(fake_vamc)})
    assert result.exit_code == 0, result.output
    assert record(tmp_path)["argv"][0] == str(fake_vamc)
    result = CliRunner().invoke(compile_, [str(patched()), "--dtype", "fp16"],
                                env={"SKYWORK_DEPLOY_VAMC": str(tmp_path / "nope")})
    assert result.exit_code == 1 and "SKYWORK_DEPLOY_VAMC" in result.output


def test_success_records_suites_with_sha256_and_makes_the_folder_servable(patched, fake_vamc, tmp_path):
    model = patched()
    result = CliRunner().invoke(compile_, [str(model), "--dtype", "int8", "--vamc", str(fake_vamc),
                                           "--workspace", "ws", "--name", "t8", "--calib-true-sequential"])
    assert result.exit_code == 0, result.output
    rec = record(tmp_path)
    assert rec["argv"][1:] == ["compile", str(tmp_path / "ws" / "t8.yaml")] and rec["problems"] == []
    assert rec["cwd"] == str(tmp_path) and rec["VACC_STACK_SIZE"] is None
    assert rec["config"]["frontend"]["quantize"]["calib_args"] == {"true_sequential": True}
    assert "compiled t8" in result.output  # streamed to the terminal...
    assert "compiled t8" in (tmp_path / "ws" / "t8.compile.log").read_text()  # ...and to the log
    assert "4 model suite(s) (prefill_1024_rank0, prefill_1024_rank1, prefill_1024_rank2, prefill_1024_rank3)" \
        in result.output
    manifest = json.loads((tmp_path / "ws" / "t8.manifest.json").read_text())
    assert manifest["stage"] == "compile" and manifest["compiled"] is True
    assert manifest["command"] == [str(fake_vamc), "compile", str(tmp_path / "ws" / "t8.yaml")]
    out = tmp_path / "ws" / "t8"
    assert [s["path"] for s in manifest["suites"]] == [f"prefill_1024_rank{r}" for r in range(4)]
    for suite in manifest["suites"]:
        for name, info in suite["files"].items():
            path = out / suite["path"] / name
            assert info == {"bytes": path.stat().st_size, "sha256": sha(path)}
    no_calib = [name for name in PREFLIGHT_CHECKS if name not in ("dataset", "calib_tokenizer")]
    assert [c["name"] for c in manifest["checks"]] == no_calib + list(OUTPUT_CHECKS)
    assert all(c["result"] == "passed" for c in manifest["checks"])
    tok = manifest["tokenizer"]
    assert tok["source"] == f"copied by skywork-deploy from {model.resolve()}" and tok["chat_template"] is True
    assert sorted(tok["files"]) == ["generation_config.json", "merges.txt", "tokenizer_config.json", "vocab.json"]
    for name in tok["files"]:
        assert tok["files"][name] == sha(model / name) == sha(out / "tokenizer" / name)
    assert "<think>" in json.loads((out / "tokenizer" / "tokenizer_config.json").read_text())["chat_template"]
    assert not (out / ".tokenizer.partial").exists()


def test_a_tokenizer_written_by_vamc_is_kept(patched, fake_vamc, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_VAMC_MODE", "tokenizer")
    result = compile_model(patched(), CompileSettings(), vamc=str(fake_vamc))
    assert result["tokenizer"]["source"] == "vamc" and list(result["tokenizer"]["files"]) == ["tokenizer.json"]
    assert result["tokenizer"]["chat_template"] is False  # vamc's own copy is recorded as it is, with a warning
    assert {c["name"]: c["result"] for c in result["checks"]}["tokenizer"] == "warning"
    assert any("no chat template" in w for w in result["warnings"])
    assert (Path(result["output_dir"]) / "tokenizer" / "tokenizer.json").read_text() == "{}"


def test_no_tokenizer_in_the_checkpoint_is_a_recorded_warning(patched, fake_vamc, caplog, tmp_path):
    folder = tmp_path / "notok"
    shutil.copytree(patched(), folder)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (folder / name).unlink()
    result = compile_model(folder, CompileSettings(), vamc=str(fake_vamc))
    assert result["compiled"] is True and result["tokenizer"]["files"] == {}
    assert {c["name"]: c["result"] for c in result["checks"]}["tokenizer"] == "warning"
    assert any("has no tokenizer" in w for w in result["warnings"]), result["warnings"]
    assert "has no tokenizer" in caplog.text


def test_ranks_that_do_not_match_tp_are_a_warning(patched, fake_vamc, monkeypatch):
    monkeypatch.setenv("FAKE_VAMC_MODE", "oneranks")
    result = compile_model(patched(), CompileSettings(tp=2), vamc=str(fake_vamc))
    assert "model suites name ranks [0] but tp is 2 (expected ranks 0..1); check the compile log" in result["warnings"]


def test_several_sizes_compile_into_one_folder_each(patched, fake_vamc, tmp_path):
    sizes = [CompileSettings(max_input_len=a, max_seq_len=b) for a, b in ((1024, 2048), (2048, 4096))]
    results = compile_models(patched(), sizes, vamc=str(fake_vamc))
    assert [r["name"] for r in results] == ["tiny-fp16-tp4-1024-2048", "tiny-fp16-tp4-2048-4096"]
    for r, n_in in zip(results, (1024, 2048)):
        assert (tmp_path / "vacc_deploy" / f"{r['name']}.manifest.json").is_file()
        assert [s["path"] for s in r["suites"]][0] == f"prefill_{n_in}_rank0"
        assert (tmp_path / "vacc_deploy" / r["name"] / "tokenizer" / "vocab.json").is_file()


def test_32b_runs_with_vacc_stack_size_at_tp8(patched, fake_vamc, tmp_path):
    folder = patched("Skywork-OR1-32B-Preview", **known_config("Skywork-OR1-32B-Preview"))
    result = compile_model(folder, CompileSettings(dtype="fp16", tp=8), vamc=str(fake_vamc))
    assert result["env"] == {"VACC_STACK_SIZE": "256"} and record(tmp_path)["VACC_STACK_SIZE"] == "256"
    assert result["command_line"].startswith("VACC_STACK_SIZE=256 ")
    assert record(tmp_path)["config"]["name"] == "Skywork-OR1-32B-Preview-fp16-tp8-1024-2048"
    assert "align_qkv" not in record(tmp_path)["config"]["frontend"]["model_kwargs"] and record(tmp_path)[
        "problems"] == []
    assert len(result["suites"]) == 8


# Each output check with a failing example: stand-in mode -> text of the error.
OUTPUT_FAILING = {
    "exit_code": [("fail", "vamc failed with exit code 3")],
    "output_folder": [("none", "did not create"), ("empty", "is empty")],
    "model_suites": [("nosuite", "holds no model suite (no folder with mod.so, mod.json, mod.params"),
                     ("partial", "incomplete model suite in")],
}


def test_every_output_check_has_a_failing_example():
    # the tokenizer check warns (test_no_tokenizer_in_the_checkpoint_is_a_recorded_warning), never fails
    assert set(OUTPUT_FAILING) | {"tokenizer"} == set(OUTPUT_CHECKS)


@pytest.mark.parametrize("mode,expected", [case for cases in OUTPUT_FAILING.values() for case in cases])
def test_a_compile_without_a_model_suite_is_an_error_with_the_log_tail(patched, fake_vamc, monkeypatch, tmp_path,
                                                                       mode, expected):
    monkeypatch.setenv("FAKE_VAMC_MODE", mode)
    with pytest.raises(ExternalToolError) as err:
        compile_model(patched(), CompileSettings(), vamc=str(fake_vamc))
    message = str(err.value)
    assert expected in message and f"{fake_vamc} compile " in message
    assert "log " in message and ("compiled tiny-fp16-tp4-1024-2048" in message or mode == "fail")
    if mode == "partial":
        assert "prefill_1024_rank0/ lacks mod.json, mod.params" in message
    assert not (tmp_path / "vacc_deploy" / "tiny-fp16-tp4-1024-2048.manifest.json").exists()


def test_failure_raises_with_command_and_log_tail(patched, fake_vamc, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VAMC_MODE", "fail")
    with pytest.raises(ExternalToolError) as err:
        compile_model(patched(), CompileSettings(), vamc=str(fake_vamc))
    message = str(err.value)
    assert "exit code 3" in message and f"{fake_vamc} compile " in message
    assert "vamc log line 10" in message and "vamc log line 29" in message and "vamc log line 9\n" not in message
    log = (tmp_path / "vacc_deploy" / "tiny-fp16-tp4-1024-2048.compile.log").read_text()
    assert "vamc log line 0\n" in log and "vamc log line 29\n" in log


def test_stale_outputs_from_an_earlier_run_are_not_accepted(patched, fake_vamc, tmp_path, monkeypatch):
    old = tmp_path / "vacc_deploy" / "tiny-fp16-tp4-1024-2048" / "prefill_1024_rank0"
    old.mkdir(parents=True)
    for name in ("mod.so", "mod.json", "mod.params"):
        (old / name).write_bytes(b"old")
        os.utime(old / name, (time.time() - 3600, time.time() - 3600))
    monkeypatch.setenv("FAKE_VAMC_MODE", "none")
    with pytest.raises(ExternalToolError, match="wrote nothing new"):
        compile_model(patched(), CompileSettings(), vamc=str(fake_vamc))


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
                            stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
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


def test_run_vamc_on_an_existing_config(patched, fake_vamc, tmp_path):
    plan = plan_compile(patched(), CompileSettings(workspace=str(tmp_path / "abs-ws")))
    config = tmp_path / "given.yaml"
    config.write_text(plan.yaml_text)
    result = run_vamc(config, vamc=str(fake_vamc))
    assert Path(result["output_dir"]) == tmp_path / "abs-ws" / plan.name and result["compiled"] is True
    assert len(result["suites"]) == 4 and result["tokenizer"]["chat_template"] is True
