"""Layer-streamed ONNX Runtime run of a bundle's own graphs: one piece's session alive at a time.

Each graph file (prefill.onnx, decode.onnx, or a mode's pre-fused variant) is cut at decoder-layer boundaries
(pieces.py). A piece's session is created from its serialized graph (a few KB: the initializers are external
data references) with the bundle's folder as the external-data folder, so every piece reads the weights the
bundle ships, in place: nothing is written or copied. The pieces run in order; each piece's session runs every step it is given before it is freed, so a teacher-forced
chain (validation: the decode tokens are drawn in advance) loads each piece once per graph:

    prefill graph:  piece 0 (step 0) ─► piece 1 (step 0) ─► … ─► head (step 0) ─► logits 0, presents
    decode graph:   piece 0 (steps 1..n) ─► piece 1 (steps 1..n, step i fed step i-1's presents) ─► …

What is held between pieces: the boundary tensors of every step (the hidden state and residual, the rotary
tables and mask, a few MB at validation sizes) and the layers' presents until the next step reads them.
Memory: the largest piece's session plus that (memory.streamed_bytes), independent of the number of layers.
"""
import logging
import re
from pathlib import Path

import numpy as np

from . import pieces as cutting

log = logging.getLogger(__name__)
PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")


def past_name(present):
    """`present.N.key` -> `past_key_values.N.key` (the decode graph's input for the next step)."""
    m = PRESENT.match(present)
    return f"past_key_values.{m.group(1)}.{m.group(2)}" if m else None


class StreamedGraph:
    """One graph file cut into pieces, runnable step by step with one piece's session at a time."""

    def __init__(self, path, layers_per_piece=1, options=None, low_memory=True):
        import onnx

        self.path = Path(path)
        self.proto = onnx.load(str(self.path), load_external_data=False)
        self.num_layers = cutting.num_layers_of(self.proto)
        self.pieces = cutting.cut(self.proto, layers_per_piece, self.num_layers)
        self.options, self.low_memory = options or {}, low_memory
        self._models = {}

    def piece_weights(self):
        """[memory.graph_weights of each piece] (read from the protos, no weight bytes)."""
        from ..base.memory import graph_weights

        return [graph_weights(cutting.piece_model(self.proto, p)) for p in self.pieces]

    def session(self, k, feed):
        """Piece k's session; its graph is made once, its boundary inputs typed from the first feed."""
        import onnx

        from .validate import open_session

        if k not in self._models:
            types = {x: onnx.helper.np_dtype_to_tensor_dtype(np.asarray(feed[x]).dtype)
                     for x in self.pieces[k].inputs}
            self._models[k] = cutting.piece_model(self.proto, self.pieces[k], types).SerializeToString()
        return open_session(self._models[k], self.options, self.low_memory, data_folder=self.path.parent)

    def run(self, steps, float_np, progress=None):
        """Run every step through every piece, piece-major.

        `steps`: [feed dict] with the graph inputs of each step; a step after the first gets its past K/V
        from the previous step's presents (cast to `float_np`) unless its feed holds them. Returns
        ([{graph output: array}] per step, [all of that step's outputs finite]); a step's presents are handed
        on to the next step and not returned, except the last step's.
        """
        states = [dict(feed) for feed in steps]
        graph_outputs = {o.name for o in self.proto.graph.output}
        results, finite = [{} for _ in steps], [True] * len(steps)
        for k, piece in enumerate(self.pieces):
            session = self.session(k, states[0])
            for i, state in enumerate(states):
                out = dict(zip(piece.outputs, session.run(piece.outputs, {x: state[x] for x in piece.inputs})))
                state.update(out)
                finite[i] = finite[i] and all(np.isfinite(out[n]).all() for n in out if n in graph_outputs)
                for name in graph_outputs & out.keys():
                    past = past_name(name)
                    if past is None or i + 1 == len(states):
                        results[i][name] = out[name]
                    elif past not in steps[i + 1]:
                        states[i + 1][past] = out[name].astype(float_np)
                if progress is not None:
                    progress.update(1)
            del session  # freed here (reference counting): one piece's session at a time
            later = {x for p in self.pieces[k + 1:] for x in p.inputs}
            for state in states:  # what no later piece reads goes now
                for name in [n for n in state if n not in later]:
                    del state[name]
        return results, finite


def piece_estimates(path, options, is_int8):
    """Estimated session bytes of each piece of the 1-layer cut of a graph file (validate.session_estimate)."""
    import onnx

    from ..base.memory import graph_weights
    from .validate import session_estimate

    proto = onnx.load(str(path), load_external_data=False)
    out = []
    for piece in cutting.cut(proto, 1):
        w = graph_weights(cutting.piece_model(proto, piece))
        out.append(session_estimate(sum(v for k, v in w.items() if k != "largest_matmul_float16"), w, options,
                                    is_int8))
    return out


def plan(paths, options, is_int8, held_bytes, layers=None):
    """(layers per piece, estimated peak bytes) of a streamed run of `paths` (memory.streamed_bytes).

    `layers` None: as many layers per piece as fit in the largest piece that cannot be split (the embedding or
    the head), so the peak stays that piece's with fewer session loads."""
    from ..base.memory import OVERHEAD, streamed_bytes

    per_graph = [piece_estimates(p, options, is_int8) for p in paths]
    fixed = max(max(e[0], e[-1]) for e in per_graph) - OVERHEAD
    layer = max(max(e[1:-1] or [OVERHEAD]) for e in per_graph) - OVERHEAD
    group = max(1, int(fixed // max(layer, 1))) if layers is None else max(1, int(layers))
    group = min(group, max(len(e) - 2 for e in per_graph))  # at most the graph's layers
    return group, streamed_bytes([fixed + OVERHEAD, group * layer + OVERHEAD], held_bytes)


def run_chain(prefill_path, decode_path, ids, mask, forced, options, float_np, layers, low_memory=True,
              desc="validate"):
    """Teacher-forced chain, streamed with `layers` layers per piece: logits (B, V) of the prefill and of each
    forced decode token (`forced` (B, steps)), and whether each step's outputs (logits, presents) were finite."""
    from ..base.progress import bar
    from .validate import positions

    decode_feeds, m = [], mask
    for step in range(forced.shape[1]):
        m = np.concatenate([m, np.ones((m.shape[0], 1), dtype=np.int64)], axis=1)  # (B, P + 1)
        decode_feeds.append({"input_ids": forced[:, step:step + 1], "attention_mask": m,
                             "position_ids": positions(m)[:, -1:]})
    pre = StreamedGraph(prefill_path, layers, options, low_memory)
    dec = StreamedGraph(decode_path, layers, options, low_memory)
    progress = bar(total=len(pre.pieces) + len(dec.pieces) * len(decode_feeds), desc=desc, unit="piece-step")
    outs, finite = pre.run([{"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)}],
                           float_np, progress)
    if decode_feeds:
        decode_feeds[0].update({past_name(n): v.astype(float_np) for n, v in outs[0].items() if past_name(n)})
        more, more_finite = dec.run(decode_feeds, float_np, progress)
        outs, finite = outs + more, finite + more_finite
    logits = [out["logits"][:, -1, :] for out in outs]  # (B, V) per step
    progress.close()
    return logits, [not f for f in finite]
