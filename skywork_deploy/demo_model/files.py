"""Where the shipped demo model and its held-out problems are."""
from importlib import resources
from pathlib import Path

from ..base.errors import ModelFormatError

WEIGHTS = "weights"
HELDOUT = "heldout.jsonl"


def _package_file(name):
    return Path(str(resources.files(__package__).joinpath(name)))


def demo_model_path():
    """The folder of the shipped trained model (checked to hold its weights)."""
    folder = _package_file(WEIGHTS)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise ModelFormatError(f"{folder}: the demo model's weights are missing (reinstall skywork-deploy, or "
                               f"retrain: python -m skywork_deploy.demo_model.train --out {folder})")
    return folder


def heldout_path():
    """The shipped held-out problem set (JSONL with `problem` and `answer`)."""
    return _package_file(HELDOUT)
