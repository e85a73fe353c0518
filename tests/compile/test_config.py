"""The compile config: vamc YAMLs written from the model, every pre-flight check, sizes, the CLI's options.

The driver (running a stand-in vamc and checking what it writes) is tested in tests/compile/test_vamc.py.
"""
import json
import os
import shutil
from importlib import resources
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from skywork_deploy.cli import cli
from skywork_deploy.cli.compile import compile_
from skywork_deploy.compile.checks import check_dataset
from skywork_deploy.compile.config import build_config, check_vamc_config, dump_yaml, make_compile_config, plan_compile
from skywork_deploy.compile.settings import (
    PREFLIGHT_CHECKS, CompileSettings, advise, check_settings, compiler_env, expand_sizes, is_reasoning_model,
)
from skywork_deploy.base.errors import ConfigError, InputError
from skywork_deploy.compile.known_models import KNOWN_MODELS, diff_known_configs, known_spec, write_known_configs
from skywork_deploy.patch import patch_model
from skywork_deploy.base.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[2]

# REFERENCE.md §3 / VENDOR.md §2: the vendor's published Skywork-OR1-7B fp16 config (prompts up to 1024 tokens,
# 2048 in total, tp 4); the published file has the same keys and values with blank lines between blocks.
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
# The int8 file differs in name, backend.dtype and `quantize: {type: w8a16_gptq}` right after model_kwargs.
VENDOR_7B_INT8 = VENDOR_7B_FP16.replace("fp16", "int8").replace(
    "    model_arch: vacc\n", "    model_arch: vacc\n  quantize:\n    type: w8a16_gptq\n")


@pytest.fixture(scope="module")
def patched(tiny_model_factory, tmp_path_factory):
    """make(folder_name="tiny", tokenizer=True, **config_overrides) -> a patched tiny checkpoint (weights linked)."""
    cache = {}

    def make(folder_name="tiny", tokenizer=True, **overrides):
        key = (folder_name, tokenizer, tuple(sorted(overrides.items())))
        if key not in cache:
            base = tmp_path_factory.mktemp("patched")
            src = base / "src" / folder_name
            shutil.copytree(tiny_model_factory(tokenizer=tokenizer), src, copy_function=os.link)
            cfg = json.loads((src / "config.json").read_text())
            (src / "config.json").unlink()  # hard-linked: never write through to the cached model
            (src / "config.json").write_text(json.dumps({**cfg, **overrides}, indent=2))
            # check_vocab=False: some rows need a vocab_size below the tokenizer's ids, to test compile's own check
            cache[key] = patch_model(src, out=base / folder_name, check_vocab=False)["folder"]
        return Path(cache[key])

    return make


def known_config(name):
    return {k: v for k, v in KNOWN_MODELS[name][1].items() if k != "architectures"}


@pytest.fixture(scope="module")
def or1_7b(patched):
    """Tiny weights behind the published Skywork-OR1-7B-Preview config.json: only the config matters here."""
    return patched("Skywork-OR1-7B-Preview", **known_config("Skywork-OR1-7B-Preview"))


def test_7b_configs_are_the_vendor_published_text(or1_7b):
    for dtype, vendor in (("fp16", VENDOR_7B_FP16), ("int8", VENDOR_7B_INT8)):
        text, env, problems = make_compile_config(or1_7b, CompileSettings(dtype=dtype))
        assert problems == [] and env == {}
        assert text == vendor.replace("/path/to/Skywork-OR1-7B-Preview", str(or1_7b.resolve()))
        spec = known_spec("Skywork-OR1-7B-Preview")  # the spec-only path gives the same text
        assert dump_yaml(build_config(spec, "/path/to/Skywork-OR1-7B-Preview", CompileSettings(dtype=dtype))) == vendor


def test_name_and_shape_are_prompt_and_total_lengths(or1_7b):
    cfg = yaml.safe_load(make_compile_config(or1_7b, CompileSettings(max_input_len=2048, max_seq_len=16384))[0])
    assert cfg["name"] == "Skywork-OR1-7B-Preview-fp16-tp4-2048-16384"
    assert cfg["frontend"]["shape"] == {"input_ids": [[2048], [16384]]}
    named = CompileSettings(model_name="or1", tp=8)
    assert yaml.safe_load(make_compile_config(or1_7b, named)[0])["name"] == "or1-fp16-tp8-1024-2048"


def test_32b_at_tp8_like_the_vendor_32b_config():
    spec = known_spec("Skywork-OR1-32B-Preview")  # 40 heads, 8 KV heads: tp 8 divides both, no align_qkv
    assert check_settings(spec, CompileSettings(tp=8)) == []
    text = dump_yaml(build_config(spec, "/m", CompileSettings(dtype="int8", tp=8)))
    assert text == VENDOR_7B_INT8.replace("Skywork-OR1-7B-Preview-int8-tp4", "Skywork-OR1-32B-Preview-int8-tp8") \
        .replace("/path/to/Skywork-OR1-7B-Preview", "/m").replace("tp: 4", "tp: 8")
    assert compiler_env(spec) == {"VACC_STACK_SIZE": "256"}


def test_parameter_counts_and_large_model_env():
    seven, big = known_spec("Skywork-OR1-7B-Preview"), known_spec("Skywork-OR1-32B-Preview")
    assert 7.5e9 < seven.num_parameters < 7.7e9  # Qwen2.5-7B: 7.62e9
    assert 32.7e9 < big.num_parameters < 32.9e9  # Qwen2.5-32B: 32.76e9
    assert compiler_env(seven) == {} and compiler_env(big) == {"VACC_STACK_SIZE": "256"}


@pytest.mark.parametrize("model,tp,align", [
    ("Skywork-OR1-7B-Preview", 1, None), ("Skywork-OR1-7B-Preview", 2, None), ("Skywork-OR1-7B-Preview", 4, None),
    ("Skywork-OR1-7B-Preview", 8, True),  # what the vendor serves: 28 heads, 4 KV heads on 8 dies
    ("Skywork-OR1-7B-Preview", 7, True), ("Skywork-OR1-7B-Preview", 28, True),
    ("Skywork-OR1-32B-Preview", 8, None), ("Skywork-OR1-32B-Preview", 16, True), ("Skywork-OR1-32B-Preview", 5, True),
])
def test_align_qkv_written_exactly_when_tp_does_not_divide_the_heads(model, tp, align):
    spec = known_spec(model)
    assert check_settings(spec, CompileSettings(tp=tp)) == []
    kwargs = build_config(spec, "/m", CompileSettings(tp=tp))["frontend"]["model_kwargs"]
    assert kwargs.get("align_qkv") is align and ("align_qkv" in kwargs) == (align is not None)


def test_align_qkv_can_be_asked_for_and_refused_only_where_it_works():
    spec = known_spec("Skywork-OR1-7B-Preview")
    for tp, asked in ((4, True), (4, False), (8, True)):
        assert check_settings(spec, CompileSettings(tp=tp, align_qkv=asked)) == []
        assert build_config(spec, "/m", CompileSettings(tp=tp, align_qkv=asked))["frontend"]["model_kwargs"][
            "align_qkv"] is asked
    assert check_settings(spec, CompileSettings(tp=8, align_qkv=False)) == [
        "align_qkv: false, but tp 8 does not divide the 4 KV heads and 28 heads of Skywork-OR1-7B-Preview evenly "
        "(drop --no-align-qkv, or use a tp that divides 4)"]


def test_int8_calib_args_and_dataset_block(or1_7b):
    cfg = yaml.safe_load(make_compile_config(or1_7b, CompileSettings(dtype="int8", calib_true_sequential=False))[0])
    assert cfg["frontend"]["quantize"] == {"type": "w8a16_gptq", "calib_args": {"true_sequential": False}}
    assert cfg["frontend"]["checkpoint"] == str(or1_7b.resolve())  # the unquantized patched folder
    assert "dataset" not in cfg  # optional: the vendor's published configs have none


def test_short_total_length_warns_for_reasoning_models(or1_7b, patched):
    plan = plan_compile(or1_7b, CompileSettings())
    (warning,) = plan.warnings
    assert warning.startswith("max_seq_len: 2048 tokens in total (prompt + answer) is short for ")
    assert "8K-32K tokens" in warning and "1024:2048 (Skywork-OR1)" in warning and "2048:4096" in warning
    assert plan.problems == []  # a warning, not an error
    assert plan_compile(or1_7b, CompileSettings(max_input_len=2048, max_seq_len=16384)).warnings == []
    assert is_reasoning_model(known_spec("Skywork-OR1-Math-7B"))
    assert is_reasoning_model(plan_compile(patched(), CompileSettings()).spec, patched())  # <think> template
    plain = known_spec("Skywork-OR1-7B-Preview").__class__(**{**known_spec("Skywork-OR1-7B-Preview").to_dict(),
                                                              "name": "Qwen2.5-7B"})
    assert not is_reasoning_model(plain) and advise(plain, CompileSettings(), reasoning=False) == []



def test_short_total_length_warning_suggests_only_sizes_the_model_allows():
    or1 = known_spec("Skywork-OR1-7B-Preview")

    def warnings(positions, **sizes):
        spec = or1.__class__(**{**or1.to_dict(), "max_positions": positions})
        return advise(spec, CompileSettings(**sizes), reasoning=True)

    assert "--size 2048:16384 or 4096:32768" in warnings(32768)[0]
    (mid,) = warnings(20000)
    assert "--size 2048:16384" in mid and "32768" not in mid
    (short,) = warnings(8192)  # the model cannot take 16384: its own limit is the suggestion
    assert "16384 or" not in short and "--size 1024:8192 is the longest it can take" in short
    assert "max_position_embeddings" in short
    assert warnings(512, max_input_len=256, max_seq_len=512) == []  # the demo model: already at its limit
    assert warnings(8200, max_input_len=256, max_seq_len=8192) == []  # 8200 rounds down to 8192

def ds(**changes):
    """A valid `dataset:` block with some values changed (None removes the key)."""
    block = {"type": "huggingface", "name": "c4", "path": "allenai/c4", "nsamples": 8, "seqlen": 64, **changes}
    return {k: v for k, v in block.items() if v is not None}


# Each pre-flight check with failing examples: "check: case" -> (settings overrides, text the problem contains).
# The tiny model has 4 heads, 2 KV heads and 4096 positions.
INT8 = {"dtype": "int8"}
FAILING = {
    "dtype: bf16": ({"dtype": "bf16"}, "dtype: 'bf16' is not supported"),
    "lengths: input not a multiple of 16": ({"max_input_len": 1000}, "max_input_len: 1000 is not a positive multiple "
                                                                     "of 16 (use 1008)"),
    "lengths: total not a multiple of 16": ({"max_seq_len": 2050}, "max_seq_len: 2050 is not a positive multiple"),
    "lengths: zero": ({"max_input_len": 0}, "max_input_len: 0 is not a positive multiple of 16 (use 16)"),
    "lengths: input not below total": ({"max_input_len": 2048}, "max_input_len: 2048 must be below max_seq_len 2048"),
    "lengths: total over max positions": ({"max_seq_len": 8192},
                                          "max_seq_len: 8192 exceeds max_position_embeddings 4096 of tiny"),
    "tp: zero": ({"tp": 0}, "tp: 0 must be at least 1"),
    "tp: above the heads": ({"tp": 5}, "tp: 5 is more than the 4 attention heads of tiny (use at most 4)"),
    "align_qkv: refused where needed": ({"tp": 4, "align_qkv": False}, "align_qkv: false, but tp 4 does not divide"),
    "workspace: zero workers": ({"workers": 0}, "workers: 0 must be at least 1"),
    "workspace: empty": ({"workspace": " "}, "workspace: empty"),
    "name: path in it": ({"name": "../x"}, "name: '../x' is used as a file and folder name"),
    "quantize: int8 with another type": ({**INT8, "quantize_type": "w4a16"}, "int8 needs a quantize type"),
    "quantize: fp16 with a type": ({"quantize_type": "w8a16_gptq"}, "set for an fp16 build"),
    "quantize: calib_args on fp16": ({"calib_true_sequential": True}, "calib_true_sequential: calibration settings "
                                                                      "are for int8 builds only"),
    "dataset: on fp16": ({"dataset": ds()}, "calibration data is used by int8 builds only"),
    "dataset: unknown name": ({**INT8, "dataset": ds(name="wiki")}, "dataset.name: 'wiki'"),
    "dataset: nsamples 0": ({**INT8, "dataset": ds(nsamples=0)}, "dataset.nsamples: 0"),
    "dataset: seqlen 0": ({**INT8, "dataset": ds(seqlen=0)}, "dataset.seqlen: 0 must be a positive integer"),
    "dataset: seqlen too long": ({**INT8, "dataset": ds(seqlen=9000)},
                                 "dataset.seqlen: 9000 exceeds max_position_embeddings"),
    "dataset: empty path": ({**INT8, "dataset": ds(path="")}, "dataset.path: empty"),
    "dataset: missing keys": ({**INT8, "dataset": ds(type=None, nsamples=None)}, "dataset: missing type, nsamples"),
    "dataset: type": ({**INT8, "dataset": ds(type="json")}, "dataset.type: 'json'"),
    "dataset: with calib": ({**INT8, "calib": "CALIB", "dataset": ds()},
                            "give either a calibration manifest or a dataset block"),
}
# The checks that need a folder of their own have their own tests below.
FOLDER_CHECKS = {"checkpoint": "test_checkpoint_must_carry_the_current_patch",
                 "calib_tokenizer": "test_calibration_tokenizer_must_match_the_model"}


def test_every_preflight_check_has_a_failing_example():
    covered = {case.split(":")[0] for case in FAILING} | set(FOLDER_CHECKS)
    assert covered == set(PREFLIGHT_CHECKS)
    assert all(callable(globals()[name]) for name in FOLDER_CHECKS.values())


@pytest.fixture(scope="module")
def calib_dir(patched, tmp_path_factory):
    """A real calibration set (the calib stage, Alpaca sample file) built with the tiny model's tokenizer."""
    from skywork_deploy.calib import build_calib

    out = tmp_path_factory.mktemp("calib") / "alpaca"
    build_calib("alpaca", [str(ROOT / "calibration" / "alpaca-sample.json")], str(patched()), out, nsamples=2,
                seqlen=32)
    return out


@pytest.fixture(scope="module")
def tiny_spec(patched):
    return ModelSpec.from_folder(patched())


@pytest.mark.parametrize("case", sorted(FAILING))
def test_each_check_fails_with_a_message_naming_the_key(tiny_spec, case):
    """The check functions themselves (plan_compile adds the folder checks and collects them all: below)."""
    overrides, expected = FAILING[case]
    settings = CompileSettings(**{k: ("calib-dir" if v == "CALIB" else v) for k, v in overrides.items()})
    problems = check_settings(tiny_spec, settings)
    if settings.dataset is not None:
        problems += check_dataset(settings.dataset, tiny_spec, settings.dtype)
    assert any(expected in p for p in problems), problems


def test_the_plan_collects_settings_dataset_and_folder_problems(patched, calib_dir):
    settings = CompileSettings(dtype="fp16", tp=0, max_seq_len=8192, calib=str(calib_dir))
    problems = plan_compile(patched(), settings).problems
    assert [p.split(":")[0] for p in problems] == ["max_seq_len", "tp", "dataset"], problems


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
    with_calib = plan_compile(patched(), CompileSettings(dtype="int8", calib=str(calib_dir))).checks
    assert with_calib == list(PREFLIGHT_CHECKS)  # the calibration checks ran
    assert "calib_tokenizer" not in plan_compile(patched(), CompileSettings(dtype="int8")).checks


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
    assert any("modeling_qwen2_vacc.py" in p for p in problems), problems
    cfg = json.loads((stale / "config.json").read_text())
    (stale / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "vacc_w8a16"}}))
    _, _, problems = make_compile_config(stale, CompileSettings(dtype="int8"))
    assert any("the compiler quantizes itself" in p for p in problems), problems


def test_problems_are_all_reported_in_one_error(patched):
    result = CliRunner().invoke(compile_, [str(patched()), "--dtype", "fp16", "--tp", "5", "--max-input-len", "1000",
                                           "--max-seq-len", "8192", "--workers", "0", "--dry-run"])
    assert result.exit_code == 1
    assert "4 problem(s)" in result.output
    for text in ("tp: 5", "max_input_len: 1000", "max_seq_len: 8192", "workers: 0"):
        assert sum(text in line for line in result.output.splitlines()) == 1, result.output


def test_seq_lens_is_gone_with_a_one_line_usage_error(patched, tmp_path):
    for command, args in ((compile_, []), (cli, ["build"])):
        result = CliRunner().invoke(command, args + [str(patched()), "--dtype", "fp16", "--seq-lens", "1024,2048"])
        assert result.exit_code == 2, result.output
        (line,) = [x for x in result.output.splitlines() if x.startswith("Error")]
        assert "--seq-lens" in line and "--max-input-len" in line and "--size" in line
        assert "Traceback" not in result.output
    with pytest.raises(ConfigError, match="seq_lens was removed.*max_input_len and max_seq_len"):
        CompileSettings.from_dict({"seq_lens": [1024, 2048]})
    from skywork_deploy.pipeline.settings import BuildSettings

    with pytest.raises(ConfigError, match="compile.seq_lens was removed"):
        BuildSettings.from_yaml("compile:\n  seq_lens: [1024, 2048]\n")


def test_several_sizes_give_one_config_each(or1_7b, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/nonexistent")
    result = CliRunner().invoke(compile_, [str(or1_7b), "--dtype", "int8", "--tp", "8", "--size", "1024:2048",
                                           "--size", "2048:16384", "--dry-run"])
    assert result.exit_code == 0, result.output
    docs = list(yaml.safe_load_all(result.output))
    assert [d["name"] for d in docs] == ["Skywork-OR1-7B-Preview-int8-tp8-1024-2048",
                                         "Skywork-OR1-7B-Preview-int8-tp8-2048-16384"]
    assert [d["frontend"]["shape"]["input_ids"] for d in docs] == [[[1024], [2048]], [[2048], [16384]]]
    assert all(d["frontend"]["model_kwargs"]["align_qkv"] is True for d in docs)
    assert result.output.count("# compiled: false (dry run)") == 2 and not (tmp_path / "vacc_deploy").exists()
    data = json.loads(CliRunner().invoke(compile_, [str(or1_7b), "--dtype", "fp16", "--size", "1024:2048",
                                                    "--size", "2048:4096", "--dry-run", "--json"]).output)
    assert data["compiled"] is False and [b["name"][-9:] for b in data["builds"]] == ["1024-2048", "2048-4096"]


@pytest.mark.parametrize("args,code,expected", [
    (["--size", "1024"], 2, "'1024' is not a size MAX_INPUT_LEN:MAX_SEQ_LEN"),
    (["--size", "1024:2048", "--max-seq-len", "4096"], 2, "not both"),
    (["--size", "1024:2048", "--size", "2048:4096", "--name", "x"], 1, "name: 'x' would name all 2 sizes the same"),
    (["--size", "1024:2048", "--size", "2048:4096", "--config-out", "c.yaml"], 1, "--config-out c.yaml: names one"),
    (["--size", "1024:2048", "--size", "1024:2048"], 1, "is given by 2 sizes"),
    (["--size", "1024:2048", "--size", "2004:4096"], 1, "tiny-fp16-tp4-2004-4096: max_input_len: 2004"),
])
def test_bad_size_combinations(patched, tmp_path, monkeypatch, args, code, expected):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(compile_, [str(patched()), "--dtype", "fp16", "--dry-run", *args])
    assert result.exit_code == code and expected in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_settings_round_trip_and_reject_bad_keys():
    s = CompileSettings(dtype="int8", tp=2, max_input_len=512, max_seq_len=4096, b2s=False, align_qkv=True,
                        workspace="/w", workers=2, name="n", calib_true_sequential=True,
                        dataset={"type": "huggingface", "name": "c4", "path": "p", "nsamples": 1, "seqlen": 16})
    assert CompileSettings.from_yaml(s.to_yaml()) == s and CompileSettings.from_json(s.to_json()) == s
    with pytest.raises(ConfigError) as err:
        CompileSettings.from_dict({"tp": "4", "max_seq_length": 1, "b2s": 1, "max_input_len": True})
    lines = str(err.value).splitlines()
    assert len(lines) == 4 and any("unknown key 'max_seq_length'" in x for x in lines)
    assert any("tp is '4', expected int" in x for x in lines)
    assert [(s.max_input_len, s.max_seq_len) for s in expand_sizes(CompileSettings(), ["512:1024", (16, 32)])] == \
        [(512, 1024), (16, 32)]


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
    cfg["frontend"]["shape"]["input_ids"] = [[1024], [2048], [4096]]  # the old bucket reading
    bad.write_text(yaml.safe_dump(cfg))
    assert any("[[max prompt length], [max total length]]" in p for p in check_vamc_config(bad))


def test_build_in_configs_regenerate_without_difference(tmp_path):
    assert write_known_configs(tmp_path) and diff_known_configs(tmp_path) == []
    shipped = ROOT / "build_in" / "build"
    names = sorted(p.name for p in shipped.glob("*.yaml"))
    assert names == sorted(p.name for p in tmp_path.glob("*.yaml")) == [
        "Skywork-OR1-32B-Preview-fp16-tp8-1024-2048.yaml", "Skywork-OR1-32B-Preview-int8-tp8-1024-2048.yaml",
        "Skywork-OR1-7B-Preview-fp16-tp4-1024-2048.yaml", "Skywork-OR1-7B-Preview-int8-tp4-1024-2048.yaml",
        "Skywork-OR1-Math-7B-fp16-tp4-1024-2048.yaml", "Skywork-OR1-Math-7B-int8-tp4-1024-2048.yaml"]
    for path in tmp_path.glob("*.yaml"):
        assert (shipped / path.name).read_bytes() == path.read_bytes(), path.name
    for dtype, vendor in (("fp16", VENDOR_7B_FP16), ("int8", VENDOR_7B_INT8)):  # apart from the checkpoint
        text = (shipped / f"Skywork-OR1-7B-Preview-{dtype}-tp4-1024-2048.yaml").read_text()
        assert text == vendor.replace("/path/to/", "/models/")
    assert diff_known_configs(shipped) == []
    packaged = resources.files("skywork_deploy.build_in").joinpath("build")
    assert packaged.joinpath("Skywork-OR1-32B-Preview-int8-tp8-1024-2048.yaml").read_text() == \
        (tmp_path / "Skywork-OR1-32B-Preview-int8-tp8-1024-2048.yaml").read_text()
    (tmp_path / "Skywork-OR1-Math-7B-fp16-tp4-1024-2048.yaml").write_text("name: edited\n")
    assert diff_known_configs(tmp_path) == ["Skywork-OR1-Math-7B-fp16-tp4-1024-2048.yaml"]
