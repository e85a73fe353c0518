"""A regular (non-editable) wheel carries source_code/, build_in/ and calibration/ inside the package."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_owner_folders_and_they_import(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel = next(tmp_path.glob("skywork_deploy-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("configuration_qwen2_vacc.py", "modeling_qwen2_vacc.py", "quantization_vacc.py"):
        assert f"skywork_deploy/source_code/{f}" in names
    for sub in ("cli", "calib", "export", "runtime", "pipeline"):
        assert f"skywork_deploy/{sub}/__init__.py" in names, sub
    assert "skywork_deploy/calibration/alpaca-sample.json" in names  # the demo's calibration text
    assert sum(n.startswith("skywork_deploy/build_in/build/") and n.endswith(".yaml") for n in names) == 6
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    code = ("import sys; sys.path.insert(0, sys.argv[1]);"
            "from skywork_deploy.patch import source_files, SOURCE_FILES;"
            "import skywork_deploy; files = source_files();"
            "assert skywork_deploy.__file__.startswith(sys.argv[1]), skywork_deploy.__file__;"
            "print(sorted(files) == sorted(SOURCE_FILES), min(len(v) for v in files.values()))")
    out = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    ok, smallest = out.stdout.split()
    assert ok == "True" and int(smallest) > 1000
    shipped = (target / "skywork_deploy" / "source_code" / "modeling_qwen2_vacc.py").read_bytes()
    assert shipped == (ROOT / "source_code" / "modeling_qwen2_vacc.py").read_bytes()
