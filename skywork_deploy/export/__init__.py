"""Stage 4, export: prefill and decode ONNX graphs, simplified, with streamed weights, validated.

    folder ─► skeleton (no weights) ─► trace prefill / decode (params as graph inputs)
           ─► [int8: vacc custom op, or standard DQ+MatMul] ─► fold weight transposes
           ─► [not vacc: fuse q/k/v and gate/up into one MatMul each (fuse.py)] ─► onnxsim
           ─► [int8 standard: weights in MatMulNBits' layout, plus pre-fused graph files (nbits.py)]
           ─► stream initializers from the shards into model.onnx.data (shared by every graph file)
           ─► ONNX Runtime vs torch reference (whole sessions, or layer-streamed: verify.py) ─► manifest

The ONNX Runtime graphs (not vacc) are traced with residual+RMSNorm, rotary and attention as ONNX Runtime
contrib ops (--ort-ops contrib, the default; contrib.py) or in standard ONNX ops (--ort-ops onnx; attention.py).

Both graphs reference the same external data file `model.onnx.data` (same initializer names and bytes), which
halves disk use and export time; an int8 standard bundle adds `prefill.nbits.onnx` / `decode.nbits.onnx`
(MatMulNBits, the `fast` path) and `*.nbits-exact.onnx` (the same at accuracy level 0, `exact-nbits`), small
graph files over the same data, listed in the manifest's `graph_variants`.
"""
from .stage import DTYPES, GRAPHS, INT8_FORMATS, ORT_OPS, check_options, export_model
from .verify import VALIDATIONS

__all__ = ["DTYPES", "GRAPHS", "INT8_FORMATS", "ORT_OPS", "VALIDATIONS", "check_options", "export_model"]
