"""ONNX Runtime, layer-streamed: the bundle's graphs cut at decoder layers, one piece's session at a time.

For a bundle whose whole session does not fit in memory (7B fp16, 32B on a 24 GiB machine): every step
(the prefill, then each decode token) runs the graph's pieces in order, each piece's session created and
freed in turn (export/streamed.py), so memory is about the largest piece's session plus the K/V, whatever
the number of layers, and each token costs a load of every piece. Greedy generation cannot be
teacher-forced, so this is the slow way; export validation's streamed chain loads each piece once.
"""
import numpy as np

from ..base.errors import ModelFormatError
from .backend import Backend, last_logits
from .ort_backend import INT8_ACCURACY

HELD_POSITIONS = 4096  # K/V positions the memory estimate allows for (a smoke run's prompt and answer)


class StreamedBackend(Backend):
    name = "onnxruntime-streamed"

    def __init__(self, bundle, int8_accuracy="fast", layers_per_piece=None, have=None, **_):
        super().__init__(bundle)
        from ..base.memory import Fit, MemoryBudgetError, available_bytes
        from ..export import streamed
        from ..export.validate import ORT_MAX_FRACTION

        if bundle.manifest.get("runnable_on_onnxruntime") is False:
            raise ModelFormatError(f"{bundle.folder}: the vendor's custom op cannot run on ONNX Runtime")
        if int8_accuracy not in INT8_ACCURACY:
            raise ModelFormatError(f"int8 accuracy {int8_accuracy!r} is unknown (choose exact or fast)")
        is_int8 = bundle.dtype == "int8"
        self.int8_accuracy = int8_accuracy if is_int8 else None
        options = dict(INT8_ACCURACY.get(self.int8_accuracy, {}))
        self.float_np = "float16" if bundle.dtype == "fp16" else "float32"
        paths = [bundle.graph_path(g, self.int8_accuracy) for g in ("prefill", "decode")]
        held = bundle.spec.kv_bytes_per_token * (2 if self.float_np == "float32" else 1) * HELD_POSITIONS
        group, need = streamed.plan(paths, options, is_int8, held, layers_per_piece)
        self.memory = Fit(f"a layer-streamed ONNX Runtime run of {bundle.folder}", need,
                          available_bytes() if have is None else have, ORT_MAX_FRACTION)
        if not self.memory.fits:
            raise MemoryBudgetError(f"{self.memory.message}; free memory or use a machine with more")
        self.layers_per_piece = group
        self.graphs = {g: streamed.StreamedGraph(p, group, options, low_memory=not is_int8)
                       for g, p in zip(("prefill", "decode"), paths)}
        self._past_name = streamed.past_name

    def describe(self):
        return {**super().describe(), "int8_accuracy": self.int8_accuracy, "layers_per_piece": self.layers_per_piece,
                "pieces": len(self.graphs["decode"].pieces), "memory": self.memory.as_dict()}

    def _step(self, graph, feed):
        (out,), _ = self.graphs[graph].run([feed], self.float_np)
        kv = {self._past_name(n): v for n, v in out.items() if self._past_name(n)}
        return last_logits(out["logits"]), kv

    def prefill(self, input_ids, attention_mask, position_ids):
        return self._step("prefill", {"input_ids": input_ids, "attention_mask": attention_mask,
                                      "position_ids": position_ids})

    def decode(self, token_ids, attention_mask, position_ids, kv):
        feed = {"input_ids": token_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feed.update({name: np.asarray(v, dtype=self.float_np) for name, v in kv.items()})
        return self._step("decode", feed)
