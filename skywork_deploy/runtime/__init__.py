"""Run a bundle: backends (ONNX Runtime, torch), the shared generation loop, and benchmarks.

The stage reads an `export` output folder (or a `build` folder holding one, or for the torch backend a model
folder) and never writes into it.
"""
