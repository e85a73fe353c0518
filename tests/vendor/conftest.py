"""Fixtures for the vendor-stack tests: patched tiny folders built with stock transformers only.

Run in the vendor venv (Python 3.10, torch 2.1.0, transformers 4.45.2, onnx 1.14.0, onnxsim 0.4.35,
onnxruntime 1.13.1) as `.ci/run` does: `python -m pytest tests/vendor --confcutdir tests/vendor`. The main
test run ignores this folder (tests/conftest.py: collect_ignore).
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402

from folders import CONFIGS, make_checkpoint, patch_folder  # noqa: E402


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def patched(request, tmp_path_factory):
    """(config name, patched folder) for GQA, MHA, tied-embedding and rope_theta 1e6 configs."""
    folder = tmp_path_factory.mktemp(f"vendor-{request.param}") / "m"
    make_checkpoint(folder, **CONFIGS[request.param])
    return request.param, patch_folder(folder)
