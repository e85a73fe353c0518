"""Issue 19: bad inputs driven through the CLI, one table (keep adding rows).

Every row asserts: a non-zero exit, no traceback, one error line that names the file or option at fault, the
watched input folders byte-identical, and nothing left behind in the row's folder (no output, no .partial).
"""
import hashlib
import json
import os
import shutil
import socket
import struct
import time
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from skywork_deploy.cli import cli

ALPACA = Path(__file__).resolve().parents[2] / "calibration" / "alpaca-sample.json"


def snapshot(folder):
    folder = Path(folder)
    if folder.is_file():
        return hashlib.sha256(folder.read_bytes()).hexdigest()
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*"))


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))
    return path


def config_row(**changes):
    def setup(w, tmp):
        m = copy(w["model"], tmp / "m")
        edit_json(m / "config.json", **changes)
        return ["quantize", m, "-o", tmp / "q"], [m], ["config.json", next(iter(changes))]
    return setup


def bad_header(w, tmp):
    m = copy(w["model"], tmp / "m")
    path = m / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = ["0", "x"]
    text = json.dumps(header).encode().ljust(n)
    if len(text) > n:
        text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    path.write_bytes(raw[:8] + text + raw[8 + n:])
    return ["export", m, "-o", tmp / "e"], [m], ["model.safetensors", "header entry"]


def in_place_patched(w, tmp):
    m = copy(w["model"], tmp / "m")
    from skywork_deploy.patch import patch_model

    patch_model(m)
    return m


def revert_dotdot(w, tmp):
    m = in_place_patched(w, tmp)
    (tmp / "victim.txt").write_text("keep me")
    record = m / ".skywork_deploy_backup" / "record.json"
    edit_json(record, created=json.loads(record.read_text())["created"] + ["../victim.txt"])
    return ["patch", "--revert", m], [m, tmp / "victim.txt"], ["record.json", "../victim.txt"]


def revert_corrupt(w, tmp):
    m = in_place_patched(w, tmp)
    (m / ".skywork_deploy_backup" / "record.json").write_text("{not json")
    return ["patch", "--revert", m], [m], ["record.json", "corrupt backup record"]


def repatch_edited(w, tmp):
    m = in_place_patched(w, tmp)
    path = m / "modeling_qwen2_vacc.py"
    path.write_text(path.read_text() + "# mine\n")
    return ["patch", m], [m], ["modeling_qwen2_vacc.py", "edited", "--force"]


def tampered(change):
    def setup(w, tmp):
        p = copy(w["patched"], tmp / "p")
        words = change(p)
        return None, [p], words
    return setup


def _auto_map(p):
    edit_json(p / "config_vacc.json", auto_map={"AutoModelForCausalLM": "evil.Model"})
    return ["config_vacc.json", "auto_map"]


def _insert_slice(p):
    edit_json(p / "config_vacc.json", insert_slice=False)
    return ["config_vacc.json", "insert_slice"]


def _modeling(p):
    path = p / "modeling_qwen2_vacc.py"
    path.write_text(path.read_text() + "\nimport os  # injected\n")
    return ["modeling_qwen2_vacc.py"]


def _extra_py(p):
    (p / "evil.py").write_text("import os\n")
    return ["evil.py"]


def _tokenizer_auto_map(p):
    edit_json(p / "tokenizer_config.json", auto_map={"AutoTokenizer": ["evil.Tok", None]})
    return ["tokenizer_config.json", "auto_map"]


def unpatched_extra_py(w, tmp):
    m = copy(w["model"], tmp / "m")
    return ["quantize", m, "-o", tmp / "q"], [m], _extra_py(m) + ["remove it"]


def with_cmd(setup, command):
    def wrapped(w, tmp):
        _, watch, words = setup(w, tmp)
        return command(watch[0], tmp), watch, words
    return wrapped


def foreign_stage(w, tmp):
    build = tmp / "build"
    (build / "export").mkdir(parents=True)
    (build / "export" / "results.csv").write_text("someone's data")
    return ["build", w["model"], "--dtype", "fp16", "-o", build], [build], ["export", "not written by a build"]


def locked_build(w, tmp):
    build = tmp / "build"
    build.mkdir()
    (build / ".skywork_deploy.lock").write_text(json.dumps({
        "format": "skywork-deploy", "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
    return ["build", w["model"], "--dtype", "fp16", "-o", build], [build], [f"pid {os.getpid()}", "build"]


def build_yaml_types(w, tmp):
    cfg = tmp / "build.yaml"
    cfg.write_text(f"model: {w['model']}\ndtype: int8\ncalib:\n  dataset: alpaca\n  source: {ALPACA}\n"
                   "  nsamples: many\n")
    return ["build", "-c", cfg, "-o", tmp / "b"], [cfg], ["nsamples"]


def build_yaml_seed(w, tmp):
    cfg = tmp / "build.yaml"
    cfg.write_text(f"model: {w['model']}\ndtype: int8\ncalib:\n  dataset: alpaca\n  source: {ALPACA}\n  seed: -1\n")
    return ["build", "-c", cfg, "-o", tmp / "b"], [cfg], ["calib.seed"]


def holder_row(command):
    def setup(w, tmp):
        holder = tmp / "holder"
        m = copy(w["model"], holder / "model")
        (holder / "notes.txt").write_text("unrelated")
        return command(m, holder), [holder], [str(holder), "contains the input"]
    return setup


def foreign_overwrite(w, tmp):
    out = tmp / "foreign"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    return ["export", w["patched"], "-o", out, "--overwrite"], [out], [str(out), "not written by skywork-deploy"]


def zip_bomb(w, tmp):
    path = tmp / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("val/a_val.csv", "w") as fh:
        fh.write(b"id,question,A,B,C,D,answer\n")
        for _ in range(17):
            fh.write(b"0" * (1 << 20))
    return ["calib", "--dataset", "ceval", "--source", path, "--model", w["model"], "-o", tmp / "c"], [path], \
        ["bomb.zip:val/a_val.csv", "more than"]


def gzip_bomb(w, tmp):
    import gzip

    path = tmp / "bomb.json.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(b'{"text": "')
        for _ in range(17):
            fh.write(b"a" * (1 << 20))
    return ["calib", "--dataset", "c4", "--source", path, "--model", w["model"], "-o", tmp / "c"], [path], \
        ["bomb.json.gz", "longer than"]


def bad_template(w, tmp):
    b = copy(w["bundle"], tmp / "b")
    edit_json(b / "tokenizer_config.json", chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    return ["run", b, "-p", "hi", "--max-new-tokens", "2"], [b], ["chat template"]


def run_row(*extra, words):
    def setup(w, tmp):
        return ["run", w["bundle"], "--max-new-tokens", "2", *extra], [w["bundle"]], words
    return setup


ROWS = {
    # the output rule
    "export -o MODEL --overwrite": lambda w, tmp: (["export", w["patched"], "-o", w["patched"], "--overwrite"],
                                                   [w["patched"]], [str(w["patched"]), "is the input"]),
    "calib --model M -o M --overwrite": lambda w, tmp: (
        ["calib", "--dataset", "alpaca", "--source", ALPACA, "--model", w["model"], "-o", w["model"], "--overwrite"],
        [w["model"]], [str(w["model"]), "is the input"]),
    "quantize -o PARENT --overwrite": holder_row(lambda m, h: ["quantize", m, "-o", h, "--overwrite"]),
    "export -o PARENT --overwrite": holder_row(lambda m, h: ["export", m, "-o", h, "--overwrite"]),
    "export -o MODEL/sub": lambda w, tmp: (["export", w["patched"], "-o", w["patched"] / "onnx"], [w["patched"]],
                                           ["onnx", "inside the input"]),
    "patch -o MODEL": lambda w, tmp: (["patch", w["model"], "-o", w["model"]], [w["model"]], ["is the input"]),
    "export --overwrite a foreign folder": foreign_overwrite,
    "build over a foreign stage folder": foreign_stage,
    "build while another build runs": locked_build,
    "build.yaml with a wrong type": build_yaml_types,
    "build.yaml with calib.seed -1": build_yaml_seed,
    # patch records and edits
    "patch --revert with ../ in the record": revert_dotdot,
    "patch --revert with a corrupt record": revert_corrupt,
    "patch again over a hand edit": repatch_edited,
    # integrity of a patched folder
    "patch --check: foreign auto_map": with_cmd(tampered(_auto_map), lambda p, tmp: ["patch", "--check", p]),
    "patch --check: extra .py": with_cmd(tampered(_extra_py), lambda p, tmp: ["patch", "--check", p]),
    "patch --check: tokenizer auto_map": with_cmd(tampered(_tokenizer_auto_map), lambda p, tmp: ["patch", "--check", p]),
    "compile: insert_slice edited": with_cmd(tampered(_insert_slice),
                                             lambda p, tmp: ["compile", p, "--dtype", "fp16", "--dry-run"]),
    "quantize: modeling file edited": with_cmd(tampered(_modeling), lambda p, tmp: ["quantize", p, "-o", tmp / "q"]),
    "export: extra .py": with_cmd(tampered(_extra_py), lambda p, tmp: ["export", p, "-o", tmp / "e"]),
    "export of an unpatched folder with a tokenizer auto_map": lambda w, tmp: (
        ["export", edit_json(copy(w["model"], tmp / "m") / "tokenizer_config.json",
                             auto_map={"AutoTokenizer": ["evil.Tok", None]}).parent, "-o", tmp / "e"],
        [tmp / "m"], ["tokenizer_config.json", "auto_map", "--allow-remote-code-files"]),
    "quantize of an unpatched folder with an extra .py": unpatched_extra_py,
    # config.json validation (before anything allocates)
    "num_hidden_layers 0": config_row(num_hidden_layers=0),
    "max_position_embeddings 0": config_row(max_position_embeddings=0),
    "vocab_size 1e9 (float)": config_row(vocab_size=1e9),
    "vocab_size 2e9": config_row(vocab_size=2_000_000_000),
    "num_hidden_layers 1000": config_row(num_hidden_layers=1000),
    "intermediate_size -5": config_row(intermediate_size=-5),
    "hidden_size true": config_row(hidden_size=True),
    "rope_theta a string": config_row(rope_theta="1e6"),
    "odd head_dim": config_row(head_dim=15),
    "malformed safetensors header entry": bad_header,
    # calibration bombs
    "calib zip bomb": zip_bomb,
    "calib gzip bomb": gzip_bomb,
    # options
    "calib --seed -1": lambda w, tmp: (["calib", "--dataset", "alpaca", "--source", ALPACA, "--model", w["model"],
                                        "--seed", "-1", "-o", tmp / "c"], [w["model"]], ["--seed"]),
    "run --seed -1": run_row("-p", "hi", "--seed", "-1", words=["--seed"]),
    "run --temperature nan": run_row("-p", "hi", "--temperature", "nan", words=["--temperature"]),
    "run --top-p nan": run_row("-p", "hi", "--temperature", "0.7", "--top-p", "nan", words=["--top-p"]),
    "run with non-UTF-8 prompt bytes": run_row("-p", "caf\udce9", words=["--prompt", "UTF-8"]),
    "compile --timeout nan": lambda w, tmp: (["compile", w["patched"], "--dtype", "fp16", "--dry-run", "--timeout",
                                              "nan"], [w["patched"]], ["--timeout"]),
    "bench --prompt-len 0": lambda w, tmp: (["bench", w["bundle"], "--prompt-len", "0"], [w["bundle"]],
                                            ["--prompt-len"]),
    "run with a chat template the sandbox refuses": bad_template,
}


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input_fails_cleanly(world, tmp_path, name):
    assert_fails_cleanly(name, *ROWS[name](world, tmp_path), tmp_path)


def assert_fails_cleanly(name, args, watch, words, tmp_path, code=None):
    """One row: `args` fails (with exit `code` when given) in one line holding every word of `words`, the
    `watch`ed paths are byte-identical and nothing new is left in `tmp_path`."""
    before = {str(p): snapshot(p) for p in watch}
    files_before = listing(tmp_path)
    result = CliRunner().invoke(cli, [str(a) for a in args])
    out = result.output
    assert result.exit_code not in (0, None) and result.exit_code == (code or result.exit_code), (name, out)
    assert result.exception is None or isinstance(result.exception, SystemExit), (name, repr(result.exception))
    assert "Traceback" not in out, (name, out)
    lines = out.splitlines()
    errors = [i for i, line in enumerate(lines) if line.lower().startswith("error")]
    assert len(errors) == 1, (name, out)
    message = "\n".join(lines[errors[0]:])  # the error line (compile follows it with its table of problems)
    assert all(w in message for w in words), (name, words, message)
    for p in watch:
        assert snapshot(p) == before[str(p)], (name, f"{p} changed")
    assert listing(tmp_path) == files_before, (name, "something was left behind")
    print(f"\nROW | {name} | exit {result.exit_code} | {lines[errors[0]]}")  # the table `pytest -s` shows


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # writes past the limit fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
from skywork_deploy.cli import main
sys.argv = ["skywork-deploy", *sys.argv[1:]]
main()
"""


def test_calib_on_a_full_disk_is_one_line_and_leaves_nothing(world, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "calib"
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, "calib", "--dataset", "alpaca", "--source", str(ALPACA),
                           "--model", str(world["model"]), "--nsamples", "64", "--seqlen", "256", "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.lower().startswith("error")]
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr
    assert "File too large" in errors[0] and "free disk space" in errors[0], errors[0]
    assert list(tmp_path.iterdir()) == []  # no output, no .calib.partial-*


def test_a_failed_rebuild_leaves_no_passing_manifest_and_no_lock(world, tmp_path):
    from skywork_deploy.base.fsutil import write_json

    build = tmp_path / "build"
    build.mkdir()
    write_json(build / "manifest.json", {"format": "skywork-deploy", "stage": "build", "passed": True})
    model = copy(world["model"], tmp_path / "m")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (model / name).unlink()
    result = CliRunner().invoke(cli, ["build", str(model), "--dtype", "fp16", "-o", str(build)])
    assert result.exit_code == 1 and "no tokenizer" in result.output, result.output
    assert not (build / "manifest.json").exists()  # removed before the rebuild started, never rewritten
    assert not (build / ".skywork_deploy.lock").exists()
    assert json.loads((build / ".stages" / "owner.json").read_text())["owned"] == ["build.yaml", "manifest.json",
                                                                                  "patch"]


def partials(folder):
    """The killed run's temporary output folders (named so only once their marker is written)."""
    return [p for p in folder.glob(".q.partial-*") if not p.name.startswith(".q.partial-making-")]


def test_kill_9_mid_quantize_then_the_next_run_cleans_up(world, tmp_path):
    import signal
    import subprocess
    import sys

    out = tmp_path / "q"
    cmd = [sys.executable, "-c", "from skywork_deploy.cli import main; main()", "quantize", str(world["model"]),
           "-o", str(out), "--no-eval"]
    for _ in range(3):  # the tiny model quantizes in about a second: catch it while its .partial exists
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and not partials(tmp_path):
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        shutil.rmtree(out, ignore_errors=True)
    assert partials(tmp_path) and not out.exists(), "the run was not caught mid-write"
    result = CliRunner().invoke(cli, ["quantize", str(world["model"]), "-o", str(out), "--no-eval"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # the killed run's .q.partial-* is gone
