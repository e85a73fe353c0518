"""`skywork-deploy build`: the whole pipeline into one folder, its verdict, manifest, cache and config file.

One int8 build of a random tiny Qwen2 (real tokenizer, Alpaca calibration) is made per module; the other
tests rerun it from its own build.yaml, change one option, or simulate an interruption. (`build --demo`, on
the shipped trained model, is tested in tests/demo_model/test_demo_model.py.)
"""
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from skywork_deploy.cli import cli
from skywork_deploy.pipeline import BuildSettings
from skywork_deploy.pipeline.runner import Runner

STAGES = ["patch", "calib", "quantize", "export", "validate", "compile"]
SAMPLES = Path(__file__).resolve().parents[2] / "calibration"


def invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def last_line(result):
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_factory):
    out = tmp_path_factory.mktemp("build") / "b"
    model = tiny_model_factory()
    result = invoke(["build", model, "--dtype", "int8", "--calib-dataset", "alpaca", "--calib-source",
                     SAMPLES / "alpaca-sample.json", "--nsamples", 8, "--seqlen", 64, "-o", out])
    assert result.exit_code == 0, result.output
    return out, result, json.loads((out / "manifest.json").read_text()), model


def copy(built, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(built[0], dst)
    return dst


def rerun(folder, *extra, code=0):
    result = invoke(["build", "-c", folder / "build.yaml", "-o", folder, "--json", *extra])
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


def ran(manifest):
    return sorted(name for name, stage in manifest["stages"].items() if not stage["skipped"])


def test_last_line_is_one_verdict_naming_each_stage(built):
    _, result, _, _ = built
    line = last_line(result)
    assert line.startswith("verdict: ACCEPTED: patch done")
    for part in ("calib done (8 windows x 64 tokens)", "quantize validated (top-1 ", "export validated (",
                 "gated checks within tolerance", "validate checked only (onnxruntime vs torch greedy tokens",
                 "compile not compiled (dry run: vamc not found"):
        assert part in line, line
    starts = [line.index(f"{'ACCEPTED:' if i == 0 else ';'} {name} ") for i, name in enumerate(STAGES)]
    assert starts == sorted(starts)  # in run order



def test_compile_takes_the_build_folder_and_finds_its_patched_model_and_calibration_set(built, tmp_path,
                                                                                        monkeypatch):
    out, _, _, model = built
    monkeypatch.chdir(tmp_path)  # a dry run writes nothing; the default workspace would be ./vacc_deploy

    def dry_run(target, dtype):
        result = invoke(["compile", target, "--dtype", dtype, "--size", "64:128", "--dry-run", "--json"])
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        return data, yaml.safe_load(data["yaml"])

    data, config = dry_run(out, "int8")
    assert config["frontend"]["checkpoint"] == str((out / "patch").resolve())  # BUILD/patch, not the build
    assert config["frontend"]["quantize"]["type"] == "w8a16_gptq"
    assert (config["dataset"]["nsamples"], config["dataset"]["seqlen"]) == (8, 64)  # from BUILD/calib
    assert data["name"] == f"{Path(model).name}-int8-tp4-64-128"  # named after the model, as `build` names it
    fp16, config16 = dry_run(out, "fp16")
    assert config16["frontend"]["checkpoint"] == config["frontend"]["checkpoint"] and "dataset" not in config16
    assert dry_run(out / "patch", "int8")[1]["frontend"]["checkpoint"] == config["frontend"]["checkpoint"]
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = invoke(["compile", empty, "--dtype", "fp16", "--dry-run"])
    assert refused.exit_code == 2 and "no config.json in it" in refused.output and "or a build folder" in refused.output

def test_manifest_says_passed_only_for_what_was_checked(built):
    _, _, manifest, _ = built
    assert manifest["accepted"] is True and "passed" not in manifest
    v = manifest["validation"]
    assert v["quantize"]["passed"] is True and v["quantize"]["outcome"] == "validated"
    assert v["quantize"]["top1_agreement"] >= v["quantize"]["thresholds"]["min_top1"]
    assert v["quantize"]["mean_kl"] <= v["quantize"]["thresholds"]["max_kl"]
    assert v["export"]["passed"] is True and v["export"]["smoke_token_agreement"] == 1.0
    assert "passed" not in v["compile"] and v["compile"]["compiled"] is False  # no vamc on this machine
    assert v["compile"]["outcome"] == "not compiled" and v["compile"]["dry_run"] is True

    def passed_keys(node, path=""):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "passed" and value is True:
                    yield path
                yield from passed_keys(value, f"{path}.{key}")
        elif isinstance(node, list):
            for item in node:
                yield from passed_keys(item, path)
    assert set(passed_keys({k: manifest[k] for k in ("validation", "verdict")})) <= {
        ".validation.quantize", ".validation.export"}
    stages = manifest["verdict"]["stages"]
    assert stages["compile"]["gate"] == "not compiled" and stages["quantize"]["gate"] == "ok"


def test_manifest_records_stages_artifacts_versions(built):
    out, _, manifest, _ = built
    assert manifest["stage"] == "build" and manifest["format_version"] == 1
    assert manifest["stage_order"] == STAGES
    for name in STAGES:
        assert (out / name).is_dir()
        assert manifest["stages"][name]["peak_rss_bytes"] > 0 and manifest["stages"][name]["seconds"] >= 0
    assert manifest["versions"]["torch"] and manifest["versions"]["onnxruntime"]
    assert len(manifest["model"]["fingerprint"]) == 64
    paths = {a["path"] for a in manifest["artifacts"]}
    assert {"export/prefill.onnx", "export/decode.onnx", "calib/calib.safetensors"} <= paths
    assert all(a["bytes"] > 0 for a in manifest["artifacts"])


def test_compile_config_is_named_after_the_model_and_points_at_the_patched_folder(built):
    out, _, _, model = built
    (config_path,) = (out / "compile").glob("*.yaml")
    config = yaml.safe_load(config_path.read_text())
    assert config["frontend"]["checkpoint"] == str((out / "patch").resolve())
    assert config["name"].startswith(Path(model).name + "-int8") and not config["name"].startswith("patch")
    assert config["backend"]["dtype"] == "int8" and config["frontend"]["quantize"] == {"type": "w8a16_gptq"}


def test_rebuild_from_its_own_record_is_fully_cached(built):
    out = built[0]
    recorded = BuildSettings.from_yaml((out / "build.yaml").read_text())
    assert recorded.dtype == "int8" and recorded.calib.nsamples == 8 and recorded.output == str(out.resolve())
    manifest = rerun(out)
    assert ran(manifest) == [] and manifest["ok"] is True and "[cached]" in manifest["verdict"]["line"]


def test_require_compile_turns_a_dry_run_into_a_failure(built, tmp_path):
    folder = copy(built, tmp_path)
    result = invoke(["build", "-c", folder / "build.yaml", "-o", folder, "--require-compile"])
    assert result.exit_code == 1, result.output
    assert last_line(result).startswith("verdict: REJECTED (compile: not compiled and --require-compile was given)")
    manifest = rerun(folder, "--require-compile", code=1)  # --json: the manifest, "ok": false
    assert manifest["ok"] is False and manifest["accepted"] is False


def test_changed_option_reruns_only_what_depends_on_it(built, tmp_path):
    assert ran(rerun(copy(built, tmp_path), "--tp", "2")) == ["compile"]


def test_interrupted_stage_resumes_and_gives_identical_artifacts(built, tmp_path):
    folder = copy(built, tmp_path)
    (folder / ".stages" / "export.json").unlink()  # as if the build was killed during export
    shutil.rmtree(folder / "export")
    again = rerun(folder)
    assert ran(again) == ["export"]
    exported = lambda m: {a["path"]: a["sha256"] for a in m["artifacts"]
                          if a["path"].startswith("export/") and a["path"].endswith((".onnx", ".data"))}
    assert exported(again) and exported(again) == exported(built[2])


def test_build_yaml_paths_are_relative_to_the_file(built, tmp_path):
    folder = copy(built, tmp_path)
    settings = yaml.safe_load((folder / "build.yaml").read_text())
    settings["model"] = os.path.relpath(built[3], folder)
    settings["calib"]["source"] = os.path.relpath(SAMPLES / "alpaca-sample.json", folder)
    settings["output"] = "."
    (folder / "build.yaml").write_text(yaml.safe_dump(settings))
    result = invoke(["build", "-c", folder / "build.yaml", "--json"])  # cwd is elsewhere (the repository)
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert ran(manifest) == [] and manifest["settings"]["output"] == str(folder.resolve())
    assert manifest["settings"]["model"] == str(Path(built[3]).resolve())
    assert BuildSettings(model="../m", output="o").resolve_paths("/x/y").model == "/x/y/../m"
    assert BuildSettings(model="Qwen/Qwen2.5-0.5B").resolve_paths("/x").model == "Qwen/Qwen2.5-0.5B"


def test_force_redoes_cached_stages(tmp_path):
    calls = []
    for force in (False, False, True):
        runner = Runner(tmp_path, force=force)
        runner.run("one", {"a": 1}, [], lambda out: calls.append(out.mkdir()) or {"ok": True})
    assert len(calls) == 2


def test_bad_settings_are_usage_errors_and_make_nothing(tmp_path, tiny_model_factory):
    bad = tmp_path / "build.yaml"
    bad.write_text("model: x\ndtype: int8\nexport:\n  simplfy: false\n")
    result = invoke(["build", "-c", bad])
    assert result.exit_code == 2 and "unknown key 'simplfy'" in result.output
    result = invoke(["build", tiny_model_factory(), "--dtype", "int8", "-o", tmp_path / "o"])
    assert result.exit_code == 2 and "calibration data" in result.output
    result = invoke(["build", "--dtype", "fp16", "-o", tmp_path / "o"])
    assert result.exit_code == 2 and "model: missing" in result.output
    result = invoke(["build", tmp_path / "nope", "--dtype", "fp16", "-o", tmp_path / "o"])
    assert result.exit_code == 2 and "no such folder" in result.output
    bad.write_text("model: x\ndtype: fp16\nexport:\n  ort_ops: tensorrt\n")
    result = invoke(["build", "-c", bad])
    assert result.exit_code == 2 and "export.ort_ops: must be contrib or onnx" in result.output
    assert not (tmp_path / "o").exists()


def test_a_failing_stage_is_named_in_the_verdict_and_the_json(tmp_path, tiny_model_factory):
    broken = tmp_path / "alpaca.json"
    broken.write_text('[{"instruction": "x"')  # truncated JSON
    args = ["build", tiny_model_factory(), "--dtype", "int8", "--calib-dataset", "alpaca", "--calib-source", broken,
            "-o", tmp_path / "b"]
    result = invoke(args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("Error: verdict: REJECTED: patch done; calib FAILED (")
    assert line.endswith("not run: quantize, export, validate, compile")
    data = json.loads(invoke(args + ["--json"]).stdout)
    assert data["ok"] is False and data["stage"] == "calib" and data["exit_code"] == 1


def test_allow_packing_reaches_the_calibration_stage(tmp_path, tiny_model_factory):
    """build has --allow-packing (the c4 error suggests it) and passes it to calib."""
    from skywork_deploy.base.errors import InputError
    from skywork_deploy.pipeline import stages

    settings = BuildSettings(model=str(tiny_model_factory()), dtype="int8", output=str(tmp_path))
    settings.calib.dataset, settings.calib.source = "c4", str(SAMPLES / "c4-sample.json.gz")
    settings.calib.nsamples, settings.calib.seqlen = 4, 4096  # longer than the sample's documents
    steps = {name: fn for name, _, _, fn in stages.plan(settings, Path(settings.model), tmp_path)}
    steps["patch"](tmp_path / "patch")
    with pytest.raises(InputError, match="--allow-packing"):
        steps["calib"](tmp_path / "calib")
    assert "--allow-packing" in invoke(["build", "-h"]).output
    settings.calib.allow_packing = True
    result = steps["calib"](tmp_path / "calib")
    assert result["nsamples"] == 4


def test_skipped_export_validation_is_a_visible_warning_not_a_pass():
    from skywork_deploy.pipeline import stages, verdict

    skipped = "an ONNX Runtime session needs about 30.0 GiB"
    results = {"export": {"result": {"validation": {"passed": None, "skipped": skipped, "rows": []}}},
               "validate": {"result": {"passed": None, "skipped": skipped,
                                       "export": {"passed": None, "skipped": skipped}, "smoke": {}}}}
    v = stages.summarize_validation(results)["export"]
    assert "passed" not in v and v["skipped"] == skipped and v["warning"].endswith(skipped)
    outcomes = verdict.stage_outcomes(results)
    assert outcomes[0] == {"stage": "export", "outcome": "skipped", "detail": skipped, "gate": "unchecked",
                           "cached": False}
    assert not verdict.decide(outcomes)["accepted"] and verdict.decide(outcomes, allow_unvalidated=True)["accepted"]


def test_torch_smoke_run_is_skipped_when_the_whole_model_would_not_fit(built, monkeypatch):
    from skywork_deploy.pipeline import stages
    from skywork_deploy.runtime.bundle import open_bundle

    bundle = open_bundle(built[0] / "export")
    assert stages._torch_smoke_skip(bundle) is None  # the tiny model fits
    monkeypatch.setenv("SKYWORK_DEPLOY_REFERENCE", "streamed")  # what a 7B/32B on a small machine gets
    assert "torch run skipped" in stages._torch_smoke_skip(bundle)


def test_build_fails_on_a_skipped_validation_unless_allowed(built, tmp_path, monkeypatch):
    from skywork_deploy.base import memory

    folder = copy(built, tmp_path)
    for stage in ("export", "validate"):  # redo both as on a machine too small for an ORT session
        (folder / ".stages" / f"{stage}.json").unlink()
        shutil.rmtree(folder / stage)
    monkeypatch.setenv(memory.LIMIT_ENV, "1M")  # the memory policy's own cap: no session fits
    result = invoke(["build", "-c", folder / "build.yaml", "-o", folder])
    assert result.exit_code == 1, result.output
    line = last_line(result)
    assert line.startswith("verdict: REJECTED (export was not checked (pass --allow-unvalidated") and \
        "export skipped (" in line
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["accepted"] is False and "passed" not in manifest["validation"]["export"]
    result = invoke(["build", "-c", folder / "build.yaml", "-o", folder, "--allow-unvalidated"])
    assert result.exit_code == 0, result.output
    assert last_line(result).startswith("verdict: ACCEPTED") and "warning: ONNX Runtime validation skipped" \
        in result.output


def test_an_offline_hub_id_fails_at_once_and_makes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke(["build", "someorg/somemodel", "--dtype", "fp16", "-o", tmp_path / "b", "--json"])
    assert result.exit_code == 1 and "HF_HUB_OFFLINE is set" in json.loads(result.stdout)["error"]
    assert not (tmp_path / "b").exists()


def test_validation_table_explains_its_info_rows_and_names_the_fast_path_as_run_does(built):
    from skywork_deploy.export.validate import LEGEND

    validation = json.loads((built[0] / "export" / "validation.json").read_text())
    modes = {r["mode"]: r["gated"] for r in validation["rows"]}
    assert modes == {"int8 ort exact": True, "int8 ort unfused": True, "int8 ort fast": False}
    assert validation["table"].endswith(LEGEND) and "run --int8-accuracy fast" in LEGEND
    assert "default" not in validation["table"]


def test_streamed_validation_reruns_export_and_is_named_in_the_verdict(built, tmp_path):
    folder = copy(built, tmp_path)
    manifest = rerun(folder, "--validation", "streamed")
    assert ran(manifest) == ["export", "validate"] and manifest["accepted"]
    assert manifest["settings"]["export"]["validation"] == "streamed"
    assert "validation: streamed" in (folder / "build.yaml").read_text()
    runs = json.loads((folder / "export" / "validation.json").read_text())["runs"]
    assert {run["how"] for run in runs.values()} == {"streamed"}
    assert "layer-streamed: int8 ort exact, int8 ort unfused, int8 ort fast" in manifest["verdict"]["line"]
