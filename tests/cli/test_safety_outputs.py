"""Issue 29: the output rule for every path written, files included (one table, rows like test_safety's).

`eval -o`, `compile --config-out`, the compile log and manifest, and `build -o`: never an input, never inside
or containing one, never through a link, never replacing a file skywork-deploy did not write.
"""
import json
import os
import shutil

import pytest

from tests.cli.test_safety import assert_fails_cleanly, copy


def problems(tmp):
    path = tmp / "problems.jsonl"
    path.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    return path


def eval_row(output, words, setup=None):
    def row(w, tmp):
        data = problems(tmp)
        out = output(w, tmp, data)
        if setup:
            setup(w, tmp, data, out)
        return ["eval", w["bundle"], "--dataset", data, "--max-tokens", "2", "-o", out], \
            [data, w["bundle"]] + ([out] if out.exists() and out != data else []), words
    return row


def _link_to(target_of):
    def setup(w, tmp, data, out):
        os.symlink(target_of(w, tmp, data), out)
    return setup


def _hardlink_to(target_of):
    def setup(w, tmp, data, out):
        os.link(target_of(w, tmp, data), out)
    return setup


def _user_file(w, tmp, data, out):
    out.write_text("my notes\n")


def fake_vamc(tmp):
    tool = tmp / "bin" / "vamc"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(0o755)
    return tool


def compile_row(prepare, words):
    """A real compile (a fake vamc that would succeed) whose workspace already holds something at a path
    the compile writes."""
    def row(w, tmp):
        ws = tmp / "ws"
        ws.mkdir()
        victim = tmp / "victim.txt"
        victim.write_text("a user's file outside the workspace\n")
        prepare(ws, victim)
        return ["compile", w["patched"], "--dtype", "fp16", "--workspace", ws, "--name", "m",
                "--vamc", fake_vamc(tmp)], [w["patched"], ws, victim], words
    return row


def config_out_row(target, words, setup=None):
    def row(w, tmp):
        out = target(w, tmp)
        if setup:
            setup(w, tmp, out)
        return ["compile", w["patched"], "--dtype", "fp16", "--dry-run", "--config-out", out], \
            [w["patched"]] + ([tmp / "victim.txt"] if (tmp / "victim.txt").exists() else []), words
    return row


def _victim_link(w, tmp, out):
    (tmp / "victim.txt").write_text("mine\n")
    os.symlink(tmp / "victim.txt", out)


def build_parent(w, tmp):
    holder = tmp / "holder"
    m = copy(w["model"], holder / "model")
    return ["build", m, "--dtype", "fp16", "-o", holder], [holder], [str(holder), "contains the input"]


ROWS = {
    "eval -o the dataset": eval_row(lambda w, tmp, data: data, ["problems.jsonl", "is the input"]),
    "eval -o the bundle's config.json": eval_row(lambda w, tmp, data: w["bundle"] / "config.json",
                                                 ["config.json", "inside the input"]),
    "eval -o a user's file": eval_row(lambda w, tmp, data: tmp / "notes.jsonl", ["notes.jsonl", "not written"],
                                      _user_file),
    "eval -o a symlink": eval_row(lambda w, tmp, data: tmp / "link.jsonl", ["link.jsonl", "symbolic link"],
                                  _link_to(lambda w, tmp, data: tmp / "elsewhere.jsonl")),
    "eval -o a hard link to the dataset": eval_row(lambda w, tmp, data: tmp / "same.jsonl",
                                                   ["same.jsonl", "is the input"],
                                                   _hardlink_to(lambda w, tmp, data: data)),
    "compile --config-out MODEL/config.json": config_out_row(lambda w, tmp: w["patched"] / "config.json",
                                                             ["--config-out", "inside the input"]),
    "compile --config-out a symlink": config_out_row(lambda w, tmp: tmp / "c.yaml", ["--config-out", "symbolic link"],
                                                     _victim_link),
    "compile log: a symlink in the workspace": compile_row(
        lambda ws, victim: os.symlink(victim, ws / "m.compile.log"), ["m.compile.log", "symbolic link"]),
    "compile log: a hard link to a user's file": compile_row(
        lambda ws, victim: os.link(victim, ws / "m.compile.log"), ["m.compile.log", "not written"]),
    "compile manifest: a user's file": compile_row(
        lambda ws, victim: (ws / "m.manifest.json").write_text("{}"), ["m.manifest.json", "not written"]),
    "compile workspace inside the model": lambda w, tmp: (
        ["compile", w["patched"], "--dtype", "fp16", "--workspace", w["patched"] / "ws", "--vamc", fake_vamc(tmp)],
        [w["patched"]], ["workspace", "inside the input"]),
    "build -o PARENT-OF-MODEL": build_parent,
}


@pytest.mark.parametrize("name", list(ROWS))
def test_every_written_path_obeys_the_output_rule(world, tmp_path, name):
    assert_fails_cleanly(name, *ROWS[name](world, tmp_path), tmp_path)


def test_eval_replaces_its_own_results_file(world, tmp_path):
    from click.testing import CliRunner

    from skywork_deploy.cli import cli

    data, out = problems(tmp_path), tmp_path / "results.jsonl"
    args = ["eval", str(world["bundle"]), "--dataset", str(data), "--max-tokens", "2", "-o", str(out)]
    for _ in range(2):  # the second run replaces the file the first one wrote
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        assert json.loads(out.read_text().splitlines()[0])["id"] is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["problems.jsonl", "results.jsonl"]
    shutil.rmtree(tmp_path / "unused", ignore_errors=True)
