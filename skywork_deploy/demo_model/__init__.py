"""The demo model shipped with the package: a tiny Qwen2 (GQA, q/k/v bias) trained here from scratch on
synthetic arithmetic written as Skywork-OR1 answers (R1 chat template, a short `<think>` trace, then
`\\boxed{answer}`), with its own byte-level BPE tokenizer.

    weights/       config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
                   generation_config.json, training_log.json (written by `train.py`)
    heldout.jsonl  held-out problems (never trained on) in the AIME / MATH-500 column style

Retrain with `python -m skywork_deploy.demo_model.train --out skywork_deploy/demo_model/weights`.
"""
from importlib import resources
from pathlib import Path

from ..errors import ModelFormatError

WEIGHTS = "weights"
HELDOUT = "heldout.jsonl"


def _package_file(name):
    return Path(str(resources.files(__name__).joinpath(name)))


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
