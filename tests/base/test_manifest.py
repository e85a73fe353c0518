"""Stage manifests: written, read back, and found inside a build folder."""
import pytest

from skywork_deploy.base.errors import InputError
from skywork_deploy.base.manifest import find_stage_output, read_manifest, write_manifest


def test_find_stage_output_finds_each_stage_one_or_two_levels_down_by_its_record(tmp_path):
    build = tmp_path / "build"
    for sub in ("calib", "export", "patch", "nested/export2"):
        (build / sub).mkdir(parents=True)
    write_manifest(build / "calib", "calib", nsamples=8)
    write_manifest(build / "export", "export", dtype="int8")
    write_manifest(build / "patch", "patch", name="skywork_deploy_patch.json", mode="copy")
    write_manifest(build / "nested" / "export2", "export", dtype="fp16")  # a second export deeper down

    folder, record = find_stage_output(build, "export")
    assert folder == build / "export" and record["dtype"] == "int8"  # one level first, then two
    assert find_stage_output(build, "calib")[0] == build / "calib"
    assert find_stage_output(build, "patch") == (None, None)  # the patch record has its own file name
    folder, record = find_stage_output(build, "patch", name="skywork_deploy_patch.json")
    assert folder == build / "patch" and record["mode"] == "copy"
    assert find_stage_output(build / "nested", "export")[0] == build / "nested" / "export2"
    assert find_stage_output(tmp_path / "missing", "export") == (None, None)


def test_read_manifest_names_the_file_and_the_stage_it_expected(tmp_path):
    write_manifest(tmp_path, "calib")
    assert read_manifest(tmp_path, stage="calib")["stage"] == "calib"
    with pytest.raises(InputError, match=r"manifest.json: a manifest of stage 'calib', expected 'export'"):
        read_manifest(tmp_path, stage="export")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "skywork_deploy_manifest.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        find_stage_output(tmp_path, "export")  # a corrupt record is an error, not skipped silently
