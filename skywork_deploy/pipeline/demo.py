"""The built-in demo: the shipped trained arithmetic model (skywork_deploy/demo_model), built end to end.

Needs no download: the model and its tokenizer ship with the package, the calibration text is the
Alpaca-format sample in `calibration/` and the eval problems are the demo model's held-out set. The build
ends with a short Math-Verify eval of the deployed int8 ONNX bundle against the fp32 torch reference.
"""
from importlib import resources
from pathlib import Path

from .settings import BuildSettings

DEMO_PROMPT = "What is 85 - 39?"  # a held-out problem: never seen in training
ALPACA_SAMPLE = "alpaca-sample.json"
DEMO_EVAL_PROBLEMS = 6


def alpaca_sample():
    path = resources.files("skywork_deploy.calibration").joinpath(ALPACA_SAMPLE)
    return str(path)


def demo_settings(output="skywork-demo", dtype="int8"):
    """Settings of the demo build on the shipped trained model."""
    from ..demo_model import demo_model_path, heldout_path

    settings = BuildSettings(model=str(demo_model_path()), dtype=dtype, output=str(Path(output)))
    settings.calib.dataset = "alpaca"
    settings.calib.source = alpaca_sample()
    settings.calib.nsamples = 8
    settings.calib.seqlen = 128
    settings.compile.max_input_len = 256  # the demo model has 512 positions: prompt 256, prompt + answer 512
    settings.compile.max_seq_len = 512
    settings.run.prompt = DEMO_PROMPT
    settings.run.max_new_tokens = 96
    settings.eval.dataset = str(heldout_path())
    settings.eval.limit = DEMO_EVAL_PROBLEMS
    settings.eval.samples = 1
    settings.eval.max_tokens = 96
    return settings


def ensure_demo_model(folder):
    """The demo model folder, checked to hold its weights (they ship with the package)."""
    from ..demo_model import demo_model_path

    if Path(folder).resolve() == demo_model_path().resolve():
        return Path(folder)
    if not (Path(folder) / "config.json").is_file():
        from ..base.errors import ModelFormatError

        raise ModelFormatError(f"{folder}: no config.json (the demo model is {demo_model_path()})")
    return Path(folder)
