"""The ONNX Runtime backend: the export bundle's prefill and decode graphs on CPU.

Decoding keeps the KV cache inside ONNX Runtime: with IOBinding (the default) every `present.*` output stays
an OrtValue allocated by ONNX Runtime and is bound as the next step's `past_key_values.*` input, so the cache
never goes through NumPy. `io_binding=False` is the plain `session.run` loop, kept to measure the difference.

Bundles exported with `--ort-ops contrib` (the default) compute attention with ONNX Runtime's
GroupQueryAttention, which appends the new token's K/V in place when the past and present of a layer are the
same buffer. The decode loop then keeps one preallocated buffer per layer (B, KVH, capacity, D), binds it as
both, and grows it by doubling when full: no copy of the cache per step, a cost that grows with the context
(0.5B shape, int8 fast, 2 threads, after a 4,096-token prompt: 14.5-18.0 tok/s in place, 12.7-14.2 with a
fresh present per step; the same within noise after 1,024; `skywork-deploy bench B --prompt-len 4096
[--no-kv-in-place]`). The logits are bit-identical either way (tests/test_runtime.py).

int8 bundles in the standard format (DequantizeLinear + MatMul) are fused by ONNX Runtime into MatMulNBits.
`int8_accuracy` chooses how they run:
- "exact" (default): the vendor's W8A16 arithmetic, fp32 activations. `session.disable_quant_qdq=1` keeps
  ONNX Runtime from fusing and folds each DequantizeLinear into an fp32 weight at load time (fp32 speed and
  memory); the alternative `session.qdq_matmulnbits_accuracy_level=0` is also exact but far slower here
  (see benchmarks/results/runtime.json), so it is only reachable as `int8_accuracy="exact-nbits"`.
- "fast": MatMulNBits with accuracy level 4: activations quantized to int8 on the fly; faster, not exact.

Memory (skywork_deploy/memory.py, the estimate every session goes through): each session holds its own packed
copy of the weights, so prefill and decode are both kept alive only when two sessions fit; otherwise one at a
time (the other freed before loading; a single request loses nothing), and when not even one fits the backend
raises "needs X GiB, have Y GiB" before loading anything. The K/V buffers start at the prompt + 256 positions
and double when full (never sized from max_position_embeddings).
"""
import gc
import logging

import numpy as np

from ..base.errors import BackendUnavailableError, ModelFormatError
from .backend import Backend, last_logits, physical_cores

log = logging.getLogger(__name__)
PREFILL_INPUTS = ("input_ids", "attention_mask", "position_ids")
INT8_ACCURACY = {
    "exact": {"session.disable_quant_qdq": "1"},
    "exact-nbits": {"session.qdq_matmulnbits_accuracy_level": "0"},
    "fast": {"session.qdq_matmulnbits_accuracy_level": "4"},
}
NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, bundle, threads=None, io_binding=True, int8_accuracy="exact", kv_in_place=True,
                 one_session=None, **_):
        super().__init__(bundle)
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailableError("onnxruntime is not installed (pip install onnxruntime)") from None
        if bundle.manifest.get("runnable_on_onnxruntime") is False:
            raise ModelFormatError(
                f"{bundle.folder}: this bundle uses the vendor's custom op (int8_format "
                f"{bundle.manifest.get('int8_format')!r}), which ONNX Runtime cannot run (re-export with "
                "--int8-format standard, or compile it and `skywork-deploy serve` the compiled folder)")
        if int8_accuracy not in INT8_ACCURACY:
            raise ModelFormatError(f"int8 accuracy {int8_accuracy!r} is unknown (choose exact or fast)")
        self.threads = int(threads or physical_cores())
        self.io_binding = bool(io_binding)
        # GroupQueryAttention graphs only: the standard-ops graph's present is a new, longer tensor every step
        self.kv_in_place = bool(kv_in_place and io_binding and bundle.manifest.get("ort_ops") == "contrib")
        self.int8_accuracy = int8_accuracy if bundle.dtype == "int8" else None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        from ..base.verbosity import ort_severity

        opts.log_severity_level = ort_severity()  # errors only unless -v / -vv
        for key, value in INT8_ACCURACY.get(self.int8_accuracy, {}).items():
            opts.add_session_config_entry(key, value)
        self._opts, self.sessions = opts, {}
        gc.collect()  # what an earlier stage of this process freed goes back to the kernel before the estimate
        _release_freed_memory()
        self.one_session = self._memory_policy(one_session)
        # ORT prepacks weights into the session's CPU arena, and an arena outlives its session while any output
        # it allocated (the prefill's K/V) is alive: with one session at a time the freed prefill session's
        # packed weights stayed resident (7B int8: 22.9 GB peak instead of ~12). Without the arena they go back.
        opts.enable_cpu_mem_arena = not self.one_session
        for graph in (() if self.one_session else ("prefill", "decode")):
            self._session(graph)
        self._check_io()

    def _memory_policy(self, one_session):
        """True to keep one session alive at a time (the other freed first); raises when even one won't fit.

        Both graphs share the bundle's weights on disk, but each session holds its own packed copy: two live
        sessions need twice the memory (skywork_deploy.base.memory). A single greedy request loses nothing with one
        at a time (prefill once, then decode); a server reloads the prefill graph per request.
        """
        from ..base.memory import check_session_fits, mode_for

        paths = [self.bundle.graph_path(g, self.int8_accuracy) for g in ("prefill", "decode")]
        mode = mode_for(self.bundle.dtype == "int8", int8_accuracy=self.int8_accuracy)
        if one_session is None:
            both = check_session_fits(paths, mode, "two ONNX Runtime sessions (prefill + decode)", sessions=2)
            one_session = not both.fits
            if one_session:
                log.warning("%s: one ONNX Runtime session at a time (%s)", self.bundle.folder, both.message)
        what = f"an ONNX Runtime session of {self.bundle.folder}"
        self.memory = check_session_fits(paths, mode, what, sessions=1 if one_session else 2, strict=True)
        return bool(one_session)

    def _session(self, graph):
        if graph in self.sessions:
            return self.sessions[graph]
        import onnxruntime as ort

        if self.one_session and self.sessions:
            self.sessions.clear()  # the other graph's session (and its packed weights) goes first
            gc.collect()
            _release_freed_memory()
        path = self.bundle.graph_path(graph, self.int8_accuracy)
        try:
            self.sessions[graph] = ort.InferenceSession(str(path), self._opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, NoSuchFile...)
            raise ModelFormatError(f"{path}: ONNX Runtime cannot load the graph "
                                   f"({str(exc).splitlines()[0][:300]})") from None
        return self.sessions[graph]

    def _graph_io(self, graph):
        """({input name: type string}, [output names]) from the live session, else from the graph file."""
        if graph in self.sessions:
            sess = self.sessions[graph]
            return {i.name: i.type for i in sess.get_inputs()}, [o.name for o in sess.get_outputs()]
        import onnx

        proto = onnx.load(str(self.bundle.graph_path(graph, self.int8_accuracy)), load_external_data=False)
        types = {onnx.TensorProto.FLOAT: "tensor(float)", onnx.TensorProto.FLOAT16: "tensor(float16)",
                 onnx.TensorProto.INT64: "tensor(int64)"}
        inits = {t.name for t in proto.graph.initializer}
        inputs = {v.name: types.get(v.type.tensor_type.elem_type, "?") for v in proto.graph.input
                  if v.name not in inits}
        return inputs, [v.name for v in proto.graph.output]

    def _check_io(self):
        layers = self.bundle.manifest.get("num_layers") or self.bundle.spec.num_layers
        self.present = [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
        self.past = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
        expect = {"prefill": (list(PREFILL_INPUTS), ["logits", *self.present]),
                  "decode": (list(PREFILL_INPUTS) + self.past, ["logits", *self.present])}
        io = {graph: self._graph_io(graph) for graph in expect}
        for graph, (inputs, outputs) in expect.items():
            have_in, have_out = io[graph]
            missing = [n for n in inputs if n not in have_in] + [n for n in outputs if n not in have_out]
            if missing:
                path = self.bundle.graph_path(graph, self.int8_accuracy)
                raise ModelFormatError(f"{path}: missing graph input/output {missing[0]!r} ({len(missing)} "
                                       "missing; re-export the bundle)")
        self.kv_dtype = NP_TYPES.get(io["decode"][0][self.past[0]], np.float32)

    def describe(self):
        return {**super().describe(), "threads": self.threads, "io_binding": self.io_binding,
                "kv_in_place": self.kv_in_place, "int8_accuracy": self.int8_accuracy,
                "graph_variant": self.bundle.graph_variant(self.int8_accuracy),
                "one_session": self.one_session, "memory": self.memory.as_dict()}

    # -- steps ---------------------------------------------------------------------------------------------
    def prefill(self, input_ids, attention_mask, position_ids):
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        return self._step("prefill", feeds, ())

    def decode(self, token_ids, attention_mask, position_ids, kv):
        feeds = {"input_ids": token_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if not self.kv_in_place:
            return self._step("decode", feeds, kv)
        if not isinstance(kv, KVBuffers):  # the first step after prefill
            kv = KVBuffers.from_presents(kv, self.kv_dtype)
        total = attention_mask.shape[1]
        kv.reserve(total)
        logits, _ = self._step("decode", feeds, kv.buffers, into=kv.buffers)  # GQA appends in place
        kv.length = total
        return logits, kv

    def _step(self, graph, feeds, kv, into=None):
        """Run one graph; `into`: OrtValues to write the presents into (bound as outputs) instead of new ones."""
        sess = self._session(graph)
        feeds = {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in feeds.items()}
        if not self.io_binding:
            feeds.update(zip(self.past, kv))
            outs = sess.run(None, feeds)
            return last_logits(outs[0]), outs[1:]
        io = sess.io_binding()
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        for name, value in zip(self.past, kv):
            if isinstance(value, np.ndarray):  # one session at a time: the prefill's K/V came back as NumPy
                io.bind_cpu_input(name, value)
            else:
                io.bind_ortvalue_input(name, value)
        io.bind_output("logits", "cpu")  # first: get_outputs() follows the binding order
        for k, name in enumerate(self.present):
            if into is None:
                io.bind_output(name, "cpu")
            else:
                io.bind_ortvalue_output(name, into[k])
        sess.run_with_iobinding(io)
        outs = io.get_outputs()
        presents = list(outs[1:])
        if self.one_session and graph == "prefill":
            # OrtValues the session allocated keep its memory (packed weights included) alive until they go:
            # copied out, the prefill session is really freed before the decode session loads (7B int8: the
            # smoke run peaked at 22.9 GB with both resident, measured in bench_full_build.py)
            presents = [np.array(v.numpy()) for v in presents]
        return last_logits(outs[0].numpy()), presents


class KVBuffers:
    """Per-layer K/V buffers (B, KVH, capacity, D) of which the first `length` positions are filled.

    decode() writes into them and returns the same object: pass back the kv it returned, never an older one.
    `buffers` are OrtValues over the memory of `arrays` (no copy), so both see what the kernel wrote.
    """

    GROW = 256  # room added after prefill; then the capacity doubles whenever it is reached

    def __init__(self, filled, capacity):
        self.length = filled[0].shape[2]
        self._place(filled, capacity)

    @classmethod
    def from_presents(cls, presents, dtype):
        filled = [np.asarray(p.numpy() if hasattr(p, "numpy") else p, dtype=dtype) for p in presents]
        return cls(filled, filled[0].shape[2] + cls.GROW)

    @property
    def capacity(self):
        return self.arrays[0].shape[2]

    def reserve(self, total):
        """Room for `total` positions (past + the token being decoded)."""
        if total > self.capacity:
            self._place([a[:, :, :self.length] for a in self.arrays], max(total, 2 * self.capacity))

    def _place(self, filled, capacity):
        import onnxruntime as ort

        arrays = []
        for a in filled:  # (B, KVH, length, D) -> (B, KVH, capacity, D), the tail zeroed
            big = np.zeros(a.shape[:2] + (capacity,) + a.shape[3:], dtype=a.dtype)
            big[:, :, :a.shape[2]] = a
            arrays.append(big)
        self.arrays, self.buffers = arrays, [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]


def _release_freed_memory():
    """Hand the heap pages a freed session left behind back to the kernel (glibc keeps them otherwise)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
