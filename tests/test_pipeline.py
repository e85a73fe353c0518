"""`skywork-deploy build`: the whole pipeline into one folder, its manifest, cache, config file and demo.

One demo build (random tiny Qwen2, real tokenizer, int8 with Alpaca calibration) is made per module; the
other tests rerun it from its own build.yaml, change one option, or simulate an interruption.
"""
import json
import shutil

import pytest
import yaml
from click.testing import CliRunner

from skywork_deploy.cli import cli
from skywork_deploy.pipeline import BuildSettings
from skywork_deploy.pipeline.runner import Runner

STAGES = ["patch", "calib", "quantize", "export", "validate", "compile"]


def invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    result = invoke(["build", "--demo", "-o", out])
    assert result.exit_code == 0, result.output
    return out, result, json.loads((out / "manifest.json").read_text())


def rerun(folder, *extra):
    result = invoke(["build", "-c", folder / "build.yaml", "-o", folder, "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def ran(manifest):
    return sorted(name for name, stage in manifest["stages"].items() if not stage["skipped"])


def test_demo_answers_a_prompt_and_says_the_text_is_meaningless(demo):
    _, result, _ = demo
    assert "Answer (random weights, so meaningless text)" in result.stdout
    assert "tok/s" in result.stdout
    assert "validation export: passed" in result.stdout


def test_manifest_records_stages_artifacts_versions_and_validation(demo):
    out, _, manifest = demo
    assert manifest["stage"] == "build" and manifest["format_version"] == 1 and manifest["passed"] is True
    assert manifest["stage_order"] == STAGES
    for name in STAGES:
        assert (out / name).is_dir()
        assert manifest["stages"][name]["peak_rss_bytes"] > 0 and manifest["stages"][name]["seconds"] >= 0
    assert manifest["versions"]["torch"] and manifest["versions"]["onnxruntime"]
    assert len(manifest["model"]["fingerprint"]) == 64
    paths = {a["path"] for a in manifest["artifacts"]}
    assert {"export/prefill.onnx", "export/decode.onnx", "calib/calib.safetensors",
            "compile/vamc_config.yaml"} <= paths
    assert all(a["bytes"] > 0 for a in manifest["artifacts"])
    v = manifest["validation"]
    assert v["export"]["passed"] is True and v["export"]["smoke_token_agreement"] == 1.0
    assert v["quantize"]["top1_agreement"] >= 0.9 and v["quantize"]["bit_identical_to_in_memory"] is True
    assert v["compile"]["dry_run"] is True  # no vamc on this machine


def test_compile_config_points_at_the_patched_folder_with_calibration(demo):
    out, _, _ = demo
    config = yaml.safe_load((out / "compile" / "vamc_config.yaml").read_text())
    assert config["frontend"]["checkpoint"] == str((out / "patch").resolve())
    assert config["backend"]["dtype"] == "int8" and config["frontend"]["quantize"] == {"type": "w8a16_gptq"}
    assert config["dataset"]["name"] == "alpaca" and config["dataset"]["nsamples"] == 8


def test_rebuild_from_its_own_record_is_fully_cached(demo):
    out, _, _ = demo
    recorded = BuildSettings.from_yaml((out / "build.yaml").read_text())
    assert recorded.dtype == "int8" and recorded.calib.nsamples == 8 and recorded.output == str(out.resolve())
    assert ran(rerun(out)) == []


def test_changed_option_reruns_only_what_depends_on_it(demo, tmp_path):
    out, _, _ = demo
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    assert ran(rerun(copy, "--tp", "2")) == ["compile"]


def test_interrupted_stage_resumes_and_gives_identical_artifacts(demo, tmp_path):
    out, _, first = demo
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    (copy / ".stages" / "export.json").unlink()  # as if the build was killed during export
    shutil.rmtree(copy / "export")
    again = rerun(copy)
    assert ran(again) == ["export"]
    exported = lambda m: {a["path"]: a["sha256"] for a in m["artifacts"]
                          if a["path"].startswith("export/") and a["path"].endswith((".onnx", ".data"))}
    assert exported(again) and exported(again) == exported(first)


def test_force_redoes_cached_stages(tmp_path):
    calls = []
    for force in (False, False, True):
        runner = Runner(tmp_path, force=force)
        runner.run("one", {"a": 1}, [], lambda out: calls.append(out.mkdir()) or {"ok": True})
    assert len(calls) == 2


def test_bad_settings_are_one_line_errors(tmp_path, tiny_model_factory):
    bad = tmp_path / "build.yaml"
    bad.write_text("model: x\ndtype: int8\nexport:\n  simplfy: false\n")
    result = invoke(["build", "-c", bad])
    assert result.exit_code == 1 and "unknown key 'simplfy'" in result.output
    result = invoke(["build", tiny_model_factory(), "--dtype", "int8", "-o", tmp_path / "o"])
    assert result.exit_code == 1 and "calibration data" in result.output
    assert not (tmp_path / "o").exists()
    result = invoke(["build", "--dtype", "fp16"])
    assert result.exit_code == 1 and "model: missing" in result.output
    bad.write_text("model: x\ndtype: fp16\nexport:\n  ort_ops: tensorrt\n")
    result = invoke(["build", "-c", bad])
    assert result.exit_code == 1 and "export.ort_ops: must be contrib or onnx" in result.output


def test_skipped_export_validation_is_a_visible_warning_not_a_pass():
    from skywork_deploy.pipeline import stages

    skipped = "an ONNX Runtime session needs about 30.0 GiB"
    results = {"validate": {"result": {"passed": None, "skipped": skipped,
                                       "export": {"passed": None, "skipped": skipped}, "smoke": {}}}}
    v = stages.summarize_validation(results)["export"]
    assert v["passed"] is None and v["skipped"] == skipped and v["warning"].endswith(skipped)


def test_torch_smoke_run_is_skipped_when_the_whole_model_would_not_fit(demo, monkeypatch):
    from skywork_deploy.pipeline import stages
    from skywork_deploy.runtime.bundle import open_bundle

    bundle = open_bundle(demo[0] / "export")
    assert stages._torch_smoke_skip(bundle) is None  # the tiny demo fits
    monkeypatch.setenv("SKYWORK_DEPLOY_REFERENCE", "streamed")  # what a 7B/32B on a small machine gets
    assert "torch run skipped" in stages._torch_smoke_skip(bundle)


def test_build_fails_on_a_skipped_validation_unless_allowed(demo, tmp_path, monkeypatch):
    from skywork_deploy.export import validate

    out, _, _ = demo
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    for stage in ("export", "validate"):  # redo both as on a machine too small for an ORT session
        (copy / ".stages" / f"{stage}.json").unlink()
        shutil.rmtree(copy / stage)
    monkeypatch.setattr(validate, "ORT_MAX_FRACTION", 0.0)
    result = invoke(["build", "-c", copy / "build.yaml", "-o", copy])
    assert result.exit_code == 1 and "validation of export was skipped" in result.output
    assert "--allow-unvalidated" in result.output and "Traceback" not in result.output
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["passed"] is False and manifest["validation"]["export"]["passed"] is None
    result = invoke(["build", "-c", copy / "build.yaml", "-o", copy, "--allow-unvalidated"])
    assert result.exit_code == 0, result.output
    assert "SKIPPED (warning)" in result.output
