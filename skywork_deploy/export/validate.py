"""ONNX Runtime against the torch reference: a left-padded batch, then chained decode steps.

The reference is transformers' own Qwen2ForCausalLM (eager, fp32) for fp32 and fp16 bundles, and our model
with `.quantize(8)` in fp32 (exact W8A16 arithmetic) for int8 bundles. ONNX Runtime runs the prefill graph,
then `DECODE_STEPS` decode steps fed with its own present key/values; both sides get the same next token
(the reference's argmax). Every check is collected into rows; the caller raises once.

Tolerances (logits):
- fp32 and exact int8: max |diff| <= 1e-4 and the same top-1 token.
- fp16: max |diff| <= 5e-3 + 1e-2 * max |reference logit| (fp16 keeps 11 significant bits, ~5e-4 relative per
  rounding, accumulated over the layers), cosine >= 0.999, mean KL <= 1e-3; top-1 must agree wherever the
  reference's top-1/top-2 gap exceeds that tolerance (random models have near-flat logits).
- int8 with ORT's default MatMulNBits fusion (int8 activations): reported, not gated.
"""
import numpy as np

DECODE_STEPS = 8
PROMPT_LEN = 12
PAD = 5  # left padding of the second row
SEED = 1234
FAST = {}
EXACT = {"session.qdq_matmulnbits_accuracy_level": "0"}
UNFUSED = {"session.disable_quant_qdq": "1"}


def make_inputs(vocab, seq_len):
    rng = np.random.default_rng(SEED)
    ids = rng.integers(0, min(vocab, 151643), size=(2, seq_len), dtype=np.int64)
    mask = np.ones((2, seq_len), dtype=np.int64)
    mask[1, :PAD] = 0
    ids[1, :PAD] = 0
    return ids, mask


def positions(mask):
    return np.clip(mask.cumsum(-1) - 1, 0, None)


def tolerance(kind, ref):
    if kind == "fp16":
        return 5e-3 + 1e-2 * float(np.abs(ref).max())
    return 1e-4


class TorchReference:
    def __init__(self, folder, int8):
        from ..modeling import load_model, load_reference

        self.ours = int8
        if int8:
            self.model = load_model(folder, "fp32", insert_slice=True)
            if not self.model.config.vacc_quantization:
                self.model.quantize(8)
        else:
            self.model = load_reference(folder, "fp32")
        self.past = None

    def step(self, ids, mask):
        import torch

        pos = positions(mask)[:, -ids.shape[1]:]
        kwargs = {"attention_mask": torch.tensor(mask), "position_ids": torch.tensor(pos),
                  "past_key_values": self.past, "use_cache": True}
        if self.ours:
            kwargs["iter_num"] = 0 if self.past is None else 1
        with torch.no_grad():
            out = self.model(torch.tensor(ids), **kwargs)
        self.past = out.past_key_values
        return out.logits[:, -1, :].float().numpy()


def _metrics(ort_logits, ref, kind):
    a, b = ort_logits.astype(np.float64), ref.astype(np.float64)
    tol = tolerance(kind, b)
    diff = float(np.abs(a - b).max()) if np.isfinite(a).all() else float("inf")
    cos = float(min(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-30) for x, y in zip(a, b)))
    p = _softmax(b)
    kl = float(np.mean(np.sum(p * (np.log(p + 1e-30) - np.log(_softmax(a) + 1e-30)), axis=-1)))
    top_ref, top_ort = b.argmax(-1), a.argmax(-1)
    agree = float(np.mean(top_ref == top_ort))
    srt = np.sort(b, axis=-1)
    clear = (srt[:, -1] - srt[:, -2]) > tol
    flips = int(np.sum((top_ref != top_ort) & (clear if kind == "fp16" else True)))
    return {"max_abs_diff": diff, "tolerance": tol, "cosine": cos, "kl": kl, "top1_agreement": agree,
            "top1_flips": flips, "finite": bool(np.isfinite(ort_logits).all())}


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _ok(m, kind):
    if not m["finite"] or m["max_abs_diff"] > m["tolerance"] or m["top1_flips"]:
        return False
    if kind == "fp16":
        return m["cosine"] >= 0.999 and m["kl"] <= 1e-3
    return True


def run_chain(prefill_path, decode_path, reference_steps, num_layers, vocab, seq_len, options, float_np):
    """ORT logits per step: prefill then DECODE_STEPS decodes with its own presents; tokens from the reference."""
    import onnxruntime as ort

    sessions = []
    for path in (prefill_path, decode_path):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        for key, value in options.items():
            so.add_session_config_entry(key, value)
        sessions.append(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]))
    ids, mask = make_inputs(vocab, seq_len)
    out = sessions[0].run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)})
    logits, nonfinite = [out[0][:, -1, :]], [not all(np.isfinite(t).all() for t in out)]
    for step in range(DECODE_STEPS):
        nxt = reference_steps[step].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
        feed = {"input_ids": nxt, "attention_mask": mask, "position_ids": positions(mask)[:, -1:]}
        for i in range(num_layers):
            feed[f"past_key_values.{i}.key"] = out[1 + 2 * i].astype(float_np)
            feed[f"past_key_values.{i}.value"] = out[2 + 2 * i].astype(float_np)
        out = sessions[1].run(None, feed)
        logits.append(out[0][:, -1, :])
        nonfinite.append(not all(np.isfinite(t).all() for t in out))
    return logits, nonfinite


def reference_chain(folder, int8, vocab, seq_len):
    ref = TorchReference(folder, int8)
    ids, mask = make_inputs(vocab, seq_len)
    steps = [ref.step(ids, mask)]
    for _ in range(DECODE_STEPS):
        nxt = steps[-1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
        steps.append(ref.step(nxt, mask))
    return steps


def compare(mode, kind, gated, ort_steps, nonfinite, ref_steps):
    rows = []
    for i, (a, b, bad) in enumerate(zip(ort_steps, ref_steps, nonfinite)):
        m = _metrics(a, b, kind)
        m["finite"] = m["finite"] and not bad
        rows.append({"mode": mode, "step": "prefill" if i == 0 else f"decode {i}", "gated": gated,
                     "ok": _ok(m, kind) or not gated, **m})
    return rows


def table(rows):
    head = f"{'mode':<22}{'step':<10}{'max|diff|':>11}{'tol':>10}{'cosine':>10}{'KL':>10}{'top1':>6}  ok"
    lines = [head, "-" * len(head)]
    for r in rows:
        ok = ("yes" if r["ok"] else "NO") if r["gated"] else "info"
        lines.append(f"{r['mode']:<22}{r['step']:<10}{r['max_abs_diff']:>11.3g}{r['tolerance']:>10.3g}"
                     f"{r['cosine']:>10.6f}{r['kl']:>10.2e}{r['top1_agreement']:>6.2f}  {ok}")
    return "\n".join(lines)
