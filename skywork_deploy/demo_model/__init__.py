"""The demo model shipped with the package: a tiny Qwen2 (GQA, q/k/v bias) trained here from scratch on
synthetic arithmetic written as Skywork-OR1 answers (R1 chat template, a short `<think>` trace, then
`\\boxed{answer}`), with its own byte-level BPE tokenizer.

    weights/       config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
                   generation_config.json, training_log.json (written by `train.py`)
    heldout.jsonl  held-out problems (never trained on) in the AIME / MATH-500 column style

Retrain with `python -m skywork_deploy.demo_model.train --out skywork_deploy/demo_model/weights`.
"""
from .files import HELDOUT, WEIGHTS, demo_model_path, heldout_path

__all__ = ["HELDOUT", "WEIGHTS", "demo_model_path", "heldout_path"]
