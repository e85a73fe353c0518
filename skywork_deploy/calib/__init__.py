"""Calibration sets from C4, C-Eval and Alpaca (`skywork-deploy calib`).

Public API:
- build_calib(dataset, sources, model, out, nsamples=128, seqlen=None, seed=0, split=None, ...) -> summary
- read_calib_manifest(path_or_folder) -> validated manifest dict; its "dataset_block" is the compiler's
  `dataset:` YAML block and "calib_file" the path of calib.safetensors.
"""
from .stage import (CALIB_FILE, DATASETS, DEFAULT_NSAMPLES, DEFAULT_SEQLEN, DEFAULT_SPLIT, build_calib,
                    read_calib_manifest)

__all__ = ["CALIB_FILE", "DATASETS", "DEFAULT_NSAMPLES", "DEFAULT_SEQLEN", "DEFAULT_SPLIT", "build_calib",
           "read_calib_manifest"]
