"""`skywork-deploy patch`: checks, files written, backups, revert, links, idempotence, staleness."""
import json
import os
import re
import shutil

import pytest
from click.testing import CliRunner

from skywork_deploy.cli import cli
from skywork_deploy.base.errors import ModelFormatError
from skywork_deploy.patch import (
    AUTO_MAP, BACKUP_DIR, PATCH_MANIFEST, SOURCE_FILES, patch_model, patch_status, require_current_patch,
    revert, source_files,
)


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def invoke(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


def test_patch_in_place_writes_sources_and_vendor_config(tiny_model):
    result = invoke("patch", tiny_model)
    assert result.exit_code == 0, result.output
    for name, data in source_files().items():
        assert (tiny_model / name).read_bytes() == data
    vacc = json.loads((tiny_model / "config_vacc.json").read_text())
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert vacc == cfg
    assert cfg["auto_map"] == AUTO_MAP
    assert cfg["_attn_implementation"] == "eager" and cfg["insert_slice"] is True
    assert cfg["model_type"] == "qwen2"
    manifest = json.loads((tiny_model / PATCH_MANIFEST).read_text())
    assert manifest["stage"] == "patch" and set(manifest["source_files"]) == set(SOURCE_FILES)
    assert patch_status(tiny_model)["current"]


def test_patch_is_idempotent_and_revert_restores_bytes(tiny_model):
    before = snapshot(tiny_model)
    patch_model(tiny_model)
    once = snapshot(tiny_model)
    patch_model(tiny_model)
    assert snapshot(tiny_model) == once
    assert (tiny_model / BACKUP_DIR / "config.json").read_bytes() == before["config.json"]
    result = invoke("patch", "--revert", tiny_model)
    assert result.exit_code == 0, result.output
    assert snapshot(tiny_model) == before


def test_patch_to_new_folder_links_weights(tiny_model, tmp_path):
    out = tmp_path / "patched"
    before = snapshot(tiny_model)
    result = invoke("patch", tiny_model, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["weights_linked"] == {"model.safetensors": "hardlink"}
    assert os.path.samefile(out / "model.safetensors", tiny_model / "model.safetensors")
    assert snapshot(tiny_model) == before  # the source is untouched
    assert patch_status(out)["current"]
    assert not (out / BACKUP_DIR).exists()


def test_patch_of_a_patched_folder_into_new_folder_equals_fresh_patch(tiny_model, tmp_path):
    patch_model(tiny_model, out=tmp_path / "a")
    patch_model(tiny_model)
    patch_model(tiny_model, out=tmp_path / "b")
    a, b = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    a.pop(PATCH_MANIFEST), b.pop(PATCH_MANIFEST)
    assert a == b


def test_modified_source_file_is_detected(tiny_model):
    patch_model(tiny_model)
    path = tiny_model / "modeling_qwen2_vacc.py"
    path.write_text(path.read_text() + "\n# local edit\n")
    status = patch_status(tiny_model)
    assert status["patched"] and not status["current"]
    assert "modeling_qwen2_vacc.py" in status["problems"][0]
    with pytest.raises(ModelFormatError, match="skywork-deploy patch"):
        require_current_patch(tiny_model)
    result = invoke("patch", "--check", tiny_model)
    assert result.exit_code == 1 and "older or modified" in result.output
    result = invoke("patch", tiny_model)  # re-patching would discard the edit: refused without --force
    assert result.exit_code == 1 and "edited since skywork-deploy wrote it" in result.output
    assert "--force" in result.output and "# local edit" in path.read_text()
    result = invoke("patch", tiny_model, "--force")
    assert result.exit_code == 0, result.output
    assert patch_status(tiny_model)["current"]
    kept = sorted(tiny_model.glob("modeling_qwen2_vacc.py.edited-*"))
    assert len(kept) == 1 and kept[0].read_text().endswith("# local edit\n")


def test_unpatched_folder_check_says_what_to_run(tiny_model):
    result = invoke("patch", "--check", tiny_model)
    assert result.exit_code == 1
    assert "run `skywork-deploy patch" in result.output


@pytest.mark.parametrize("breakage, words", [
    (lambda d: (d / "config.json").unlink(), "config.json"),
    (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "llama"})), "expected 'qwen2'"),
    (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00"), "truncated safetensors"),
    (lambda d: [(d / f).unlink() for f in ("vocab.json", "merges.txt", "tokenizer_config.json")], "no tokenizer"),
])
def test_bad_folders_give_one_line_errors_and_change_nothing(tiny_model, breakage, words):
    breakage(tiny_model)
    before = snapshot(tiny_model)
    result = invoke("patch", tiny_model)
    assert result.exit_code in (1, 2)  # 2 when the CLI itself sees the folder is not a model folder
    errors = [line for line in result.output.splitlines() if line.lower().startswith("error:")]
    assert len(errors) == 1 and words in errors[0], result.output
    assert "Traceback" not in result.output
    assert snapshot(tiny_model) == before


def test_missing_shard_named_by_index(tiny_model_factory, tmp_path):
    from skywork_deploy.base.synth import make_random_qwen2

    folder = make_random_qwen2(tmp_path / "sharded", tokenizer=False, shard_size="300KB")
    (folder / "vocab.json").write_text("{}")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (folder / victim).unlink()
    result = invoke("patch", folder)
    assert result.exit_code == 1 and victim in result.output


def test_hub_id_offline_says_pass_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("patch", "Skywork/Skywork-OR1-7B-Preview")
    assert result.exit_code == 1
    assert "pass a local model folder" in result.output


def test_revert_of_unpatched_folder_is_an_error(tiny_model):
    result = invoke("patch", "--revert", tiny_model)
    assert result.exit_code == 1 and "nothing to revert" in result.output


def test_output_folder_that_exists_is_refused(tiny_model, tmp_path):
    (tmp_path / "exists").mkdir()
    result = invoke("patch", tiny_model, "-o", tmp_path / "exists")
    assert result.exit_code == 1 and "already exists" in result.output


def test_patched_model_loads_with_trust_remote_code_and_generates(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    patch_model(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert model.config.insert_slice is True
    ids = tok("Hello", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3)
    assert out.shape[1] == ids.shape[1] + 3 or tok.eos_token_id in out[0].tolist()
    revert(tiny_model)
    shutil.rmtree(tiny_model)


def test_revert_refuses_a_record_naming_files_outside_the_folder(tiny_model, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    patch_model(tiny_model)
    record_path = tiny_model / BACKUP_DIR / "record.json"
    record = json.loads(record_path.read_text())
    record["created"].append("../victim.txt")
    record_path.write_text(json.dumps(record))
    before = snapshot(tiny_model)
    result = invoke("patch", "--revert", tiny_model)
    assert result.exit_code == 1 and "'../victim.txt'" in result.output and "Traceback" not in result.output
    assert victim.read_text() == "keep me" and snapshot(tiny_model) == before
    record_path.write_text("{broken")
    result = invoke("patch", "--revert", tiny_model)
    assert result.exit_code == 1 and "corrupt backup record" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_revert_keeps_hand_edits_unless_forced(tiny_model):
    original = snapshot(tiny_model)
    patch_model(tiny_model)
    cfg = tiny_model / "config_vacc.json"
    cfg.write_text(cfg.read_text().replace('"insert_slice": true', '"insert_slice": false'))
    edited = cfg.read_bytes()
    result = invoke("patch", "--revert", tiny_model)
    assert result.exit_code == 1 and "config_vacc.json" in result.output and "--force" in result.output
    assert cfg.read_bytes() == edited
    result = invoke("patch", "--revert", "--force", tiny_model)
    assert result.exit_code == 0, result.output
    after = snapshot(tiny_model)
    kept = [n for n in after if n.startswith("config_vacc.json.edited-")]
    assert len(kept) == 1 and after.pop(kept[0]) == edited
    assert after == original


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))


@pytest.mark.parametrize("tamper, words", [
    (lambda d: _edit_json(d / "config_vacc.json", auto_map={"AutoModelForCausalLM": "evil.Model"}),
     "config_vacc.json: auto_map changed"),
    (lambda d: _edit_json(d / "config.json", auto_map={"AutoConfig": "evil.Config"}), "config.json: auto_map changed"),
    (lambda d: _edit_json(d / "config_vacc.json", insert_slice=False), "insert_slice changed"),
    (lambda d: _edit_json(d / "config_vacc.json", _attn_implementation="sdpa"), "_attn_implementation changed"),
    (lambda d: _edit_json(d / "config_vacc.json", num_hidden_layers=1), "num_hidden_layers changed"),
    (lambda d: (d / "helper.py").write_text("import os\n"), "helper.py: a Python file skywork-deploy did not"),
    (lambda d: _edit_json(d / "tokenizer_config.json", auto_map={"AutoTokenizer": ["evil.Tok", None]}),
     "tokenizer_config.json: has an auto_map"),
])
def test_check_names_what_trust_remote_code_could_reach(tiny_model, tmp_path, tamper, words):
    out = tmp_path / "patched"
    patch_model(tiny_model, out=out)
    tamper(out)
    result = invoke("patch", "--check", out)
    assert result.exit_code == 1 and words in result.output, result.output
    from skywork_deploy.patch import verify_if_patched

    with pytest.raises(ModelFormatError, match=re.escape(words)):
        verify_if_patched(out)


def test_remote_code_json_files_are_accepted_only_when_opted_in(tiny_model, tmp_path):
    _edit_json(tiny_model / "tokenizer_config.json", auto_map={"AutoTokenizer": ["tok.Tok", None]})
    refused = patch_model(tiny_model, out=tmp_path / "a")
    assert not refused["status"]["current"] and "auto_map" in refused["status"]["problems"][0]
    allowed = patch_model(tiny_model, out=tmp_path / "b", allow_remote_code_files=True)
    assert allowed["status"]["current"], allowed["status"]["problems"]
    result = invoke("patch", "--check", tmp_path / "b")
    assert result.exit_code == 0, result.output
