"""Stage 2, quantize: weight-only per-channel int8 (W8A16), streamed tensor by tensor (stage.py), with its
accuracy report against the original (report.py)."""
from .stage import QUANT_METHOD, REPORT_NAME, parse_size, quantize_model

__all__ = ["QUANT_METHOD", "REPORT_NAME", "parse_size", "quantize_model"]
