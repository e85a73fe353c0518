"""skywork-deploy: make Qwen2 / Skywork-OR1 checkpoints ready for VastAI VACC accelerators.

Stages, data flowing one way: patch -> quantize / calib -> export -> compile -> run.
Importing this package imports no heavy library; each stage imports torch/onnx when it runs.
"""
from .version import __version__

__all__ = ["__version__"]
