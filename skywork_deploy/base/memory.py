"""One memory estimate and one policy for every ONNX Runtime session the tool opens.

Export validation, the build's smoke run, `run`, `bench`, `serve` and `eval` all ask `check_session_fits`
before creating a session: it returns a `Fit` ("needs X GiB, have Y GiB") and, with `strict=True`, raises
`MemoryBudgetError` with that sentence, so a stage that cannot fit says so before spending time.

What a CPU session holds, read from the graph (weights are external, so only the small proto is parsed) and
measured on 7B-shaped graphs (benchmarks/results/ort_session_memory.json, bench_full_build.py results):
- float32 MatMul weights: prepacked into ONNX Runtime's own memory; the mapped original and the copy coexist
  while it packs (2x at the peak, then the mapping is released). With `session.disable_prepacking` they stay
  in the read-only file mapping: 1x.
- float16 weights feeding MatMul: the CPU provider has no fp16 MatMul, so the Cast (inserted by it, or the
  int8 graphs' own before lm_head) is folded into a float32 initializer at load time: 2x, and while one tensor
  is folded ONNX Runtime holds its fp32 result twice (the largest such tensor counts 2x more). int8 graphs
  store a large lm_head in vocabulary slices for that reason (export/int8.py).
- int8 weights fused into MatMulNBits (`fast`, `exact-nbits`): ONNX Runtime's packed layout, 1.3x (a 7B
  int8 fast session peaked at 11.18 GiB, 12.0 GB, for 6.53 GB of int8 weights beside 2.2 GB fp16 tables;
  2-layer 7B-shaped: 2,775 MiB anonymous with prepacking, 2,638 MiB without). Weights the bundle already
  stores in MatMulNBits' layout (export/nbits.py, read by the graph's own MatMulNBits nodes): 1.15x (eight
  7B-shaped MLP matrices, 543 MB of int8: 0.77 GiB steady with the load-time fusion, 0.59 GiB pre-fused). With
  `session.disable_quant_qdq` (`exact`, and validation's "unfused" mode) every DequantizeLinear is folded into
  an fp32 weight: 4x.
- everything else (embedding tables, norms, scales): mapped, 1x.
Plus 10% and 256 MiB for activations and the runtime. Two live sessions of the same bundle (prefill and
decode) hold two copies: callers pass `sessions=2` to ask whether both fit.

`SKYWORK_DEPLOY_MEMORY_LIMIT` (bytes, or with a K/M/G suffix, e.g. `12G`) caps what is considered available,
for CI runners whose cgroup limit is below the machine's free memory (and for tests).
"""
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, DeployError

FRACTION = 0.8  # a session is opened only while its estimate fits in this share of the available memory
LIMIT_ENV = "SKYWORK_DEPLOY_MEMORY_LIMIT"
OVERHEAD = 256 << 20
PACKED_INT8 = 1.3  # MatMulNBits' packed copy per int8 weight byte (measured, see above)
PREFUSED_INT8 = 1.15  # the same for weights stored in MatMulNBits' own layout (export/nbits.py; measured, above)
GIB = 2 ** 30
MODES = ("float", "float-low-memory", "int8-fused", "int8-unfused")


class MemoryBudgetError(DeployError):
    """An ONNX Runtime session (or another big allocation) would not fit in the available memory."""


@dataclass
class Fit:
    what: str
    need: int
    have: int
    fraction: float = FRACTION

    @property
    def fits(self):
        return self.need <= self.have * self.fraction

    @property
    def message(self):
        return (f"{self.what} needs about {self.need / GIB:.1f} GiB, have {self.have / GIB:.1f} GiB available "
                f"(at most {self.fraction:.0%} of it is used)")

    def as_dict(self):
        return {"what": self.what, "need_bytes": self.need, "have_bytes": self.have, "fits": self.fits,
                "message": self.message}


def _parse_size(text):
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in "KMGT" else text
    try:
        return int(float(number) * scale)
    except ValueError:
        raise ConfigError(f"{LIMIT_ENV}={text}: not a size (write bytes or e.g. 12G)") from None


def available_bytes():
    """Memory the next allocation can use: psutil's available, capped by SKYWORK_DEPLOY_MEMORY_LIMIT."""
    import psutil

    have = psutil.virtual_memory().available
    limit = os.environ.get(LIMIT_ENV, "").strip()
    return min(have, _parse_size(limit)) if limit else have


def graph_weights(source):
    """Bytes of a graph's initializers by how a session holds them; `source` is a path or a ModelProto.

    {"int8", "int8_nbits", "matmul_float32", "matmul_float16", "largest_matmul_float16", "other"}; sizes come from
    the external-data lengths. "int8_nbits": weights a MatMulNBits node of the graph reads (pre-fused).
    """
    import onnx

    proto = onnx.load(str(source), load_external_data=False) if isinstance(source, (str, Path)) else source
    matmul_inputs = {name for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") for name in n.input[1:]}
    # an fp16 weight widened by an explicit Cast before its MatMul (int8 graphs' lm_head) is held like one the
    # provider widens itself: ONNX Runtime folds the Cast into an fp32 initializer at load time
    matmul_inputs |= {n.input[0] for n in proto.graph.node if n.op_type == "Cast" and n.output[0] in matmul_inputs}
    prefused = {n.input[1] for n in proto.graph.node if n.op_type == "MatMulNBits"}
    out = {"int8": 0, "int8_nbits": 0, "matmul_float32": 0, "matmul_float16": 0, "largest_matmul_float16": 0,
           "other": 0}
    for t in proto.graph.initializer:
        size = int(next((e.value for e in t.external_data if e.key == "length"), 0) or len(t.raw_data))
        if t.name in prefused:
            out["int8_nbits"] += size
        elif t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            out["int8"] += size
        elif t.name in matmul_inputs and t.data_type == onnx.TensorProto.FLOAT:
            out["matmul_float32"] += size
        elif t.name in matmul_inputs and t.data_type == onnx.TensorProto.FLOAT16:
            out["matmul_float16"] += size
            out["largest_matmul_float16"] = max(out["largest_matmul_float16"], size)
        else:
            out["other"] += size
    return out


def session_bytes(weights, mode):
    """Estimated peak bytes of one CPU session; `weights` from graph_weights, `mode` one of MODES."""
    if mode not in MODES:
        raise ValueError(f"unknown session mode {mode!r}")
    f32 = weights.get("matmul_float32", 0) * (1 if mode == "float-low-memory" else 2)
    f16 = (weights.get("matmul_float16", 0) + weights.get("largest_matmul_float16", 0)) * 2  # fp32 copies, the
    # largest twice while it is folded
    q = weights.get("int8", 0) * (4 if mode == "int8-unfused" else PACKED_INT8)
    q += weights.get("int8_nbits", 0) * PREFUSED_INT8
    return int((f32 + f16 + q + weights.get("other", 0)) * 1.1) + OVERHEAD


def mode_for(is_int8, options=None, int8_accuracy=None):
    """The estimate's mode from session config entries (validation) or the runtime's int8 accuracy."""
    options = options or {}
    if not is_int8:
        return "float-low-memory" if options.get("session.disable_prepacking") == "1" else "float"
    if options.get("session.disable_quant_qdq") == "1" or int8_accuracy == "exact":
        return "int8-unfused"
    return "int8-fused"


def check_session_fits(graphs, mode, what="an ONNX Runtime session", sessions=1, have=None, strict=False,
                       fraction=FRACTION):
    """Fit of `sessions` live sessions of the largest of `graphs` (paths or protos); raises when strict."""
    graphs = graphs if isinstance(graphs, (list, tuple)) else [graphs]
    need = max(session_bytes(graph_weights(g), mode) for g in graphs) * sessions
    fit = Fit(what, need, available_bytes() if have is None else have, fraction)
    if strict and not fit.fits:
        raise MemoryBudgetError(f"{fit.message}; free memory, use a machine with more, or use a smaller dtype "
                                "(int8 with --int8-accuracy fast)")
    return fit


def peak_rss_bytes():
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def streamed_bytes(piece_bytes, held_bytes=0):
    """Estimated peak of a layer-streamed run (export/streamed.py): one piece's session at a time, so the
    largest piece's session_bytes, plus what is held between pieces (K/V of the batch, hidden states)."""
    return max(piece_bytes) + int(held_bytes)


class PeakMemory:
    """Peak RSS of this process while a `with` block runs, sampled every 20 ms by a thread."""

    def __init__(self, interval=0.02):
        import psutil

        self._proc, self._interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self):
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
