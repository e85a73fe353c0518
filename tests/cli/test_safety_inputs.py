"""Issue 29: inputs checked before they are trusted (one table, rows like test_safety's).

Duplicate JSON/YAML keys, YAML bombs, wrong encodings, unknown dtypes, a vocab_size that does not cover the
tokenizer, tensors the config does not explain, broken tokenizer files, NaN/Inf and fp16 overflow in weights,
oversized eval problems, and sizes that cannot fit the model (exit 2, before anything loads).
"""
import json
import os
import subprocess
import sys

import pytest

from tests.cli.test_safety import ALPACA, assert_fails_cleanly, config_row, copy, edit_json


def model(w, tmp):
    return copy(w["model"], tmp / "m")


def raw_config(text_edit, command, words):
    def row(w, tmp):
        m = model(w, tmp)
        path = m / "config.json"
        path.write_bytes(text_edit(path.read_text()))
        return command(m, tmp), [m], words
    return row


def dup(key, value):
    return lambda text: text.replace("{", "{\n  " + json.dumps(key) + ": " + json.dumps(value) + ",", 1).encode()


def file_row(name, data, command, words):
    def row(w, tmp):
        m = model(w, tmp)
        (m / name).write_bytes(data(m / name) if callable(data) else data)
        return command(m, tmp), [m], words
    return row


def patch_cmd(m, tmp):
    return ["patch", m]


def quantize_cmd(m, tmp):
    return ["quantize", m, "-o", tmp / "q", "--no-eval"]


def export_cmd(*extra):
    return lambda m, tmp: ["export", m, "-o", tmp / "e", "--no-simplify", *extra]


def with_tensor(change):
    """Rewrite model.safetensors with `change(tensors)` applied (the row's own copy of the model)."""
    def data(path):
        from safetensors.torch import load_file, save

        tensors = load_file(str(path))
        change(tensors)
        return save(tensors)
    return data


def _extra(tensors):
    import torch

    tensors["model.layers.7.vision.extra.weight"] = torch.zeros(2, 2)


def _set(name, index, value):
    def change(tensors):
        t = tensors[name].clone()
        t[index] = value
        tensors[name] = t
    return change


def build_yaml(text, words, code=2):
    def row(w, tmp):
        cfg = tmp / "build.yaml"
        body = text(w) if callable(text) else text
        cfg.write_bytes(body if isinstance(body, bytes) else body.encode())
        return ["build", "-c", cfg, "-o", tmp / "b"], [cfg, w["model"]], words, code
    return row


def base_yaml(w, **extra):
    lines = [f"model: {w['model']}", "dtype: fp16"] + [f"{k}: {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))


def eval_row(rows_text, words, name="p.jsonl"):
    def row(w, tmp):
        data = tmp / name
        data.write_text(rows_text)
        return ["eval", w["bundle"], "--dataset", data, "--max-tokens", "2"], [data, w["bundle"]], words
    return row


def sparse_dataset(w, tmp):
    data = tmp / "huge.jsonl"
    with open(data, "wb") as fh:
        fh.truncate(65 << 20)  # sparse: no disk used, but 65 MiB to a reader
    return ["eval", w["bundle"], "--dataset", data], [data], ["huge.jsonl", "larger than a problem set"]


LAYER0 = "model.layers.0.mlp.down_proj.weight"
ROWS = {
    # duplicate keys, encodings, values in config.json
    "config.json: hidden_size twice": raw_config(dup("hidden_size", 128), patch_cmd, ["config.json", "hidden_size", "twice"]),
    "config.json: num_hidden_layers twice": raw_config(dup("num_hidden_layers", 9), export_cmd(),
                                                       ["config.json", "num_hidden_layers", "twice"]),
    "config.json: UTF-16": raw_config(lambda text: text.encode("utf-16"), patch_cmd, ["config.json", "UTF-16"]),
    "config.json: NaN": raw_config(dup("rms_norm_eps", float("nan")), quantize_cmd, ["config.json", "NaN"]),
    "config.json: torch_dtype int4": config_row(torch_dtype="int4"),
    "config.json: dtype float8": config_row(dtype="float8"),
    # the tokenizer against the config, tokenizer files parsed at the start
    "vocab_size below the tokenizer's ids (patch)": lambda w, tmp: (
        ["patch", edit_json(model(w, tmp) / "config.json", vocab_size=1000).parent], [tmp / "m"],
        ["vocab_size 1000", "tokenizer"]),
    "vocab_size below the tokenizer's ids (calib)": lambda w, tmp: (
        ["calib", "--dataset", "alpaca", "--source", ALPACA, "--model",
         edit_json(model(w, tmp) / "config.json", vocab_size=1000).parent, "-o", tmp / "c"], [tmp / "m"],
        ["vocab_size 1000", "tokenizer"]),
    "tokenizer_config.json not JSON (export)": file_row("tokenizer_config.json", b"{not json", export_cmd(),
                                                        ["tokenizer_config.json", "not valid JSON"]),
    "tokenizer_config.json with a key twice": file_row("tokenizer_config.json", b'{"eos_token": "a", "eos_token": "b"}',
                                                       patch_cmd, ["tokenizer_config.json", "eos_token", "twice"]),
    "vocab.json with a string id": file_row("vocab.json", b'{"a": 0, "b": "1"}', patch_cmd, ["vocab.json", "token id"]),
    "merges.txt not UTF-8": file_row("merges.txt", b"#version: 0.2\n\xff\xfe a b\n", patch_cmd, ["merges.txt", "UTF-8"]),
    # tensors the config does not explain, bad values in weights
    "an extra tensor (patch)": file_row("model.safetensors", with_tensor(_extra), patch_cmd,
                                        ["model.layers.7.vision.extra.weight", "--allow-extra-tensors"]),
    "a layer past num_hidden_layers (quantize)": lambda w, tmp: (
        quantize_cmd(edit_json(model(w, tmp) / "config.json", num_hidden_layers=1).parent, tmp), [tmp / "m"],
        ["model.layers.1.", "does not explain", "--allow-extra-tensors"]),
    "a NaN weight (quantize)": file_row("model.safetensors", with_tensor(_set(LAYER0, (1, 2), float("nan"))),
                                        quantize_cmd, [LAYER0, "NaN", "[1, 2]"]),
    "a weight past fp16 (export --dtype fp16)": file_row(
        "model.safetensors", with_tensor(_set("model.norm.weight", (5,), 70000.0)), export_cmd("--dtype", "fp16"),
        ["--dtype fp16", "model.norm.weight", "float16", "[5]"]),
    # build.yaml: read strictly, checked against the model before any stage runs (exit 2)
    "build.yaml with a key twice": build_yaml(lambda w: base_yaml(w) + "dtype: int8\n", ["build.yaml", "dtype", "twice"]),
    "build.yaml alias bomb": build_yaml(lambda w: base_yaml(w) + BOMB, ["build.yaml", "aliases"]),
    "build.yaml in UTF-16": build_yaml(lambda w: base_yaml(w).encode("utf-16"), ["build.yaml", "UTF-16"]),
    "build.yaml of 12 MB": build_yaml(lambda w: base_yaml(w) + "# " + "x" * (12 << 20) + "\n", ["build.yaml", "larger"]),
    "build.yaml seq_lens of strings": build_yaml(lambda w: base_yaml(w) + "export:\n  seq_lens: [a, b]\n",
                                                 ["export.seq_lens", "positive integers"]),
    "build.yaml run.prompt of 100 KB": build_yaml(lambda w: base_yaml(w) + f"run:\n  prompt: {'x' * 100_000}\n",
                                                  ["run.prompt", "100000 characters"]),
    "build.yaml run.max_new_tokens over the positions": build_yaml(
        lambda w: base_yaml(w) + "run:\n  max_new_tokens: 5000\n", ["config.json", "run.max_new_tokens", "4096"]),
    "build --max-input-len over the positions": lambda w, tmp: (
        ["build", w["model"], "--dtype", "fp16", "--max-input-len", "8192", "--max-seq-len", "16384", "-o", tmp / "b"],
        [w["model"]], ["compile.max_input_len", "4096 positions"], 2),
    # run and eval: sizes against the model before the backend loads, capped dataset reads
    "run --max-new-tokens over the positions": lambda w, tmp: (
        ["run", w["bundle"], "-p", "hi", "--max-new-tokens", "5000"], [w["bundle"]], ["--max-new-tokens 5000", "4096"], 2),
    "run with a prompt longer than the context": lambda w, tmp: (
        ["run", w["bundle"], "-p", "hello " * 5000, "--max-new-tokens", "2"], [w["bundle"]],
        ["prompt (", "max_position_embeddings 4096"], 2),
    "eval: a 300 KB problem": eval_row(json.dumps({"problem": "x" * 300_000, "answer": "1"}) + "\n",
                                       ["p.jsonl", "row 1", "300000 characters"]),
    "eval: a JSON dataset with a key twice": eval_row('[{"problem": "1+1", "answer": "2", "answer": "3"}]',
                                                      ["p.json", "answer", "twice"], name="p.json"),
    "eval: a 65 MiB dataset": sparse_dataset,
}


@pytest.mark.parametrize("name", list(ROWS))
def test_inputs_are_checked_before_they_are_trusted(world, tmp_path, name):
    args, watch, words, *code = ROWS[name](world, tmp_path)  # code: the exit code, when the row names one
    assert_fails_cleanly(name, args, watch, words, tmp_path, *code)


def test_allow_extra_tensors_accepts_them(world, tmp_path):
    from click.testing import CliRunner

    from skywork_deploy.cli import cli

    m = model(world, tmp_path)
    (m / "model.safetensors").write_bytes(with_tensor(_extra)(m / "model.safetensors"))
    result = CliRunner().invoke(cli, ["patch", str(m), "-o", str(tmp_path / "p"), "--allow-extra-tensors"])
    assert result.exit_code == 0, result.output


def test_a_deleted_working_folder_is_one_line_exit_2(world, tmp_path):
    gone = tmp_path / "gone"
    gone.mkdir()

    def enter_and_delete():
        os.chdir(gone)
        os.rmdir(gone)

    proc = subprocess.run([sys.executable, "-c", "from skywork_deploy.cli import main; main()", "quantize",
                           str(world["model"]), "-o", "q"], capture_output=True, text=True, timeout=120,
                          preexec_fn=enter_and_delete)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "current folder was deleted" in proc.stderr


def _drop_read_override():
    """preexec_fn: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so the child, root or
    not, is refused a mode-000 file as any user would be."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        assert libc.prctl(24, cap, 0, 0, 0) == 0, ctypes.get_errno()  # PR_CAPBSET_DROP


@pytest.mark.parametrize("name", ["config.json", "vocab.json", "model.safetensors"])
def test_an_unreadable_input_file_is_one_line(world, tmp_path_factory, name):
    """Mode 000 (run as root, the child first drops the capabilities that let root read anything)."""
    import shutil
    import stat

    base = tmp_path_factory.mktemp("unreadable")
    m = base / "m"
    shutil.copytree(world["model"], m, copy_function=lambda a, b: os.link(a, b) if a.endswith(".safetensors")
                    and name != "model.safetensors" else shutil.copy2(a, b))  # a link shares the mode: copy that one
    for p in [base, m, *(p for p in m.iterdir() if p.suffix != ".safetensors")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    (m / name).chmod(0)
    proc = subprocess.run([sys.executable, "-c", "from skywork_deploy.cli import main; main()", "patch", str(m),
                           "-o", str(base / "out")], capture_output=True, text=True, timeout=120, cwd=base,
                          preexec_fn=_drop_read_override if os.geteuid() == 0 else None)
    lines = proc.stderr.strip().splitlines()
    print(f"\nROW | mode 000 {name} | exit {proc.returncode} | {lines[-1] if lines else ''}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert name in lines[0] and "permission" in lines[0].lower(), lines[0]
    assert stat.S_IMODE((m / name).stat().st_mode) == 0 and not (base / "out").exists()


def locked_patch(w, tmp):
    import socket
    import time

    m = model(w, tmp)
    (m / ".skywork_deploy.lock").write_text(json.dumps({"format": "skywork-deploy", "pid": os.getpid(),
                                                        "host": socket.gethostname(), "started": time.time()}))
    return ["patch", m], [m], ["another patch is running", f"pid {os.getpid()}"]


def old_backup(w, tmp):
    m = model(w, tmp)
    (m / ".skywork_deploy_backup").mkdir()
    (m / ".skywork_deploy_backup" / "config.json").write_text("{}")
    return ["patch", m], [m], [".skywork_deploy_backup", "without its record.json"]


def alpaca_twice(w, tmp):
    src = tmp / "alpaca.json"
    src.write_text('[{"instruction": "a", "output": "b", "output": "c"}]')
    return ["calib", "--dataset", "alpaca", "--source", src, "--model", w["model"], "-o", tmp / "c"], [src], \
        ["alpaca.json", "'output' appears twice"]



MORE_ROWS = {
    "patch while another patch runs": locked_patch,
    "patch over a backup folder without its record": old_backup,
    "config.json nested 100,000 deep": raw_config(lambda text: ("[" * 100_000 + "]" * 100_000).encode(), patch_cmd,
                                                  ["config.json", "nested too deeply"]),
    "build.yaml nested 3,000 deep": build_yaml("a: " + "[" * 3_000 + "]" * 3_000 + "\n", ["build.yaml"]),
    "shard index with a key twice": file_row(
        "model.safetensors.index.json", b'{"weight_map": {}, "weight_map": {"a": "model.safetensors"}}',
        quantize_cmd, ["model.safetensors.index.json", "weight_map", "twice"]),
    "calib: an Alpaca entry with a key twice": alpaca_twice,
    "eval: a CSV field over the cap": eval_row("problem,answer\n" + "x" * 300_000 + ",1\n", ["p.csv", "field"],
                                               name="p.csv"),
}


@pytest.mark.parametrize("name", list(MORE_ROWS))
def test_more_classes_of_bad_input(world, tmp_path, name):
    args, watch, words, *code = MORE_ROWS[name](world, tmp_path)
    assert_fails_cleanly(name, args, watch, words, tmp_path, *code)


SIZE_ROWS = {
    "eval --max-tokens over the positions": lambda w, tmp: (
        ["eval", w["bundle"], "--dataset", eval_file(tmp), "--max-tokens", "5000"], [w["bundle"]],
        ["--max-tokens 5000", "4096 positions"], 2),
    "bench --prompt-len over the positions": lambda w, tmp: (
        ["bench", w["bundle"], "--prompt-len", "8000", "--new-tokens", "2"], [w["bundle"]],
        ["--prompt-len 8000", "4096"], 2),
}


def eval_file(tmp):
    path = tmp / "p.jsonl"
    path.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    return path


@pytest.mark.parametrize("name", list(SIZE_ROWS))
def test_sizes_are_checked_against_the_model_before_loading(world, tmp_path, name):
    args, watch, words, code = SIZE_ROWS[name](world, tmp_path)
    assert_fails_cleanly(name, args, watch, words, tmp_path, code)
