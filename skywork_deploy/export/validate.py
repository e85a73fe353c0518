"""ONNX Runtime against a torch reference: a left-padded batch, prefill then chained decode steps.

Teacher forcing makes the reference one pass: the `DECODE_STEPS` decode tokens are drawn in advance
(seeded), the reference computes fp32 logits for prompt + decode tokens in one forward, and ONNX Runtime's
prefill + decode steps (fed with its own present key/values) are compared with the reference's logits at
the matching positions. Order, so that only one big thing is in memory at a time: the reference (then
freed), then per ORT mode the prefill session (run, presents kept as NumPy, session freed), then the decode
session. Every check is collected into rows; the caller raises once.

References (fp32): transformers' Qwen2ForCausalLM (eager) for fp32/fp16 bundles and our model with
`.quantize(8)` for int8, whole, when the fp32 model fits in `WHOLE_MAX_FRACTION` of the available memory;
otherwise the layer-streamed reference (skywork_deploy/reference.py, same math as ours, about one layer in
memory). `SKYWORK_DEPLOY_REFERENCE=whole|streamed` forces one. An ORT mode whose estimated session memory
does not fit in `ORT_MAX_FRACTION` of the available memory is skipped and reported as skipped.

Tolerances (logits):
- fp32 and exact int8: max |diff| <= 1e-4 and the same top-1 token.
- fp16: max |diff| <= 5e-3 + 1e-2 * max |reference logit| (fp16 keeps 11 significant bits, ~5e-4 relative per
  rounding, accumulated over the layers), cosine >= 0.999, mean KL <= 1e-3; top-1 must agree wherever the
  reference's top-1/top-2 gap exceeds that tolerance (random models have near-flat logits).
- int8 with ORT's default MatMulNBits fusion (int8 activations): reported, not gated.
"""
import gc
import logging
import os

import numpy as np

from ..base.agreement import logit_agreement

log = logging.getLogger(__name__)
DECODE_STEPS = 8
PROMPT_LEN = 12
PAD = 5  # left padding of the second row
SEED = 1234
FAST = {}
EXACT = {"session.qdq_matmulnbits_accuracy_level": "0"}
UNFUSED = {"session.disable_quant_qdq": "1"}
# ONNX Runtime's default int8 path, MatMulNBits with int8 activations: what `run --int8-accuracy fast` uses
# (`run`'s default is `exact`, the vendor's W8A16 arithmetic, which the gated modes check).
FAST_MODE = "int8 ort fast"
LEGEND = ("ok: yes / NO = within / beyond tol (gated); info = reported, not gated: the int8 fast path "
          "(run --int8-accuracy fast) quantizes activations to int8, so its error above tol is expected")
REFERENCE_ENV = "SKYWORK_DEPLOY_REFERENCE"
REFERENCES = ("auto", "whole", "streamed")
WHOLE_MAX_FRACTION = 0.4  # whole fp32 reference only while its weights take at most this share of free RAM
ORT_MAX_FRACTION = 0.8  # an ORT session is tried only while its estimated bytes fit in this share
# Prepacking copies every MatMul weight into anonymous memory (3.8 GiB of 4.1 GB for a 7B-shaped 2-layer
# fp32 prefill, 5.9 GiB peak while creating); without it the weights stay in ORT's read-only mapping of the
# external data file: file-backed pages the kernel can reclaim (benchmarks/results/ort_session_memory.json).
# Float graphs only: without prepacking MatMulNBits computes exactly, which would hide the int8 fast path.
LOW_MEMORY_SESSION = {"session.disable_prepacking": "1"}
# MatMulNBits at accuracy level 0 (the gated exact int8 mode) dequantizes every weight on every call: about
# 4.7 s a call for the 7B shape's 2 layers and 61-68 s for all 28 on 2 cores, nine calls a third of the 7B
# build's time. Above EXACT_SHORT_CHAIN_BYTES of int8 weights that mode's chain is the prefill and
# EXACT_SHORT_DECODE_STEPS decode steps, the second fed with the first's presents, so the decode graph and the
# K/V hand-over (prefill -> decode and decode -> decode) are still checked exactly; the other modes keep the
# full chain (benchmarks/bench_full_build.py).
EXACT_SHORT_CHAIN_BYTES = 1 << 30
EXACT_SHORT_DECODE_STEPS = 2


def decode_steps(options, int8_bytes):
    """Decode steps a mode's chain runs: DECODE_STEPS, or the short exact chain for large int8 weights."""
    if options == EXACT and int8_bytes > EXACT_SHORT_CHAIN_BYTES:
        return EXACT_SHORT_DECODE_STEPS
    return DECODE_STEPS


def make_inputs(vocab, seq_len):
    """Prompt (2, seq_len) with the second row left-padded, its mask, and the forced decode tokens (2, steps)."""
    rng = np.random.default_rng(SEED)
    top = min(vocab, 151643)
    ids = rng.integers(0, top, size=(2, seq_len), dtype=np.int64)
    forced = rng.integers(0, top, size=(2, DECODE_STEPS), dtype=np.int64)
    mask = np.ones((2, seq_len), dtype=np.int64)
    mask[1, :PAD] = 0
    ids[1, :PAD] = 0
    return ids, mask, forced


def positions(mask):
    return np.clip(mask.cumsum(-1) - 1, 0, None)


def tolerance(kind, ref):
    if kind == "fp16":
        return 5e-3 + 1e-2 * float(np.abs(ref).max())
    return 1e-4


def available_bytes():
    from ..base.memory import available_bytes as available

    return available()


def choose_reference(fp32_bytes, available=None):
    """("whole" | "streamed", why): the environment override, else whether the fp32 model fits the budget."""
    forced = os.environ.get(REFERENCE_ENV, "auto").strip().lower() or "auto"
    if forced not in REFERENCES:
        from ..base.errors import ConfigError

        raise ConfigError(f"{REFERENCE_ENV}={forced}: choose one of {', '.join(REFERENCES)}")
    if forced != "auto":
        return forced, f"{REFERENCE_ENV}={forced}"
    available = available_bytes() if available is None else available
    budget = int(available * WHOLE_MAX_FRACTION)
    if fp32_bytes <= budget:
        return "whole", f"fp32 weights {fp32_bytes / 2**30:.2f} GiB <= {WHOLE_MAX_FRACTION:.0%} of available"
    return "streamed", (f"fp32 weights {fp32_bytes / 2**30:.2f} GiB > {WHOLE_MAX_FRACTION:.0%} of available "
                        f"{available / 2**30:.2f} GiB")


def reference_logits(folder, int8, vocab, seq_len, how):
    """Reference fp32 logits (2, V) at the prefill's last position and after each forced decode token."""
    ids, mask, forced = make_inputs(vocab, seq_len)
    full_ids = np.concatenate([ids, forced], axis=1)  # (2, S + steps)
    full_mask = np.concatenate([mask, np.ones_like(forced)], axis=1)
    full_pos = positions(full_mask)
    if how == "streamed":
        from ..base.reference import streamed_logits
        from ..base.spec import read_config

        quantized = bool(read_config(folder).get("quantization_config"))
        logits = streamed_logits(folder, [(full_ids, full_mask, full_pos)], last=DECODE_STEPS + 1,
                                 quantize_bits=8 if int8 and not quantized else None)[0]
    else:
        logits = _whole_logits(folder, int8, full_ids, full_mask, full_pos)[:, seq_len - 1:]
    logits = logits.numpy()  # (2, 1 + steps, V)
    return [logits[:, i, :] for i in range(DECODE_STEPS + 1)]


def _whole_logits(folder, int8, ids, mask, pos):
    import torch

    from ..base.modeling import load_model, load_reference

    if int8:
        model = load_model(folder, "fp32", insert_slice=False)
        if not model.config.vacc_quantization:
            model.quantize(8)
        extra = {"iter_num": 0}
    else:
        model = load_reference(folder, "fp32")
        extra = {}
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                    use_cache=False, **extra).logits.float()  # (2, S, V)
    del model
    gc.collect()
    return out


def session_estimate(data_bytes, weights, options, int8):
    """Peak bytes of one validation session (skywork_deploy.base.memory's estimate); `weights` from
    memory.graph_weights (its "other" is recomputed from the data file's size).

    Float graphs run here without prepacking (LOW_MEMORY_SESSION): their fp32 weights stay in ORT's read-only
    mapping of the data file. int8 graphs keep prepacking, as the runtime does (MatMulNBits packs the int8
    weights once; `session.disable_quant_qdq` folds them to fp32, 4x). 7B-shaped 2-layer int8 prefill:
    4.64 GiB peak, unfused 5.88 (benchmarks/results/ort_session_memory.json).
    """
    from ..base.memory import mode_for, session_bytes

    held = ("int8", "int8_nbits", "matmul_float32", "matmul_float16")
    w = {k: weights.get(k, 0) for k in held + ("largest_matmul_float16",)}
    w["other"] = max(0, data_bytes - sum(w[k] for k in held))
    return session_bytes(w, mode_for(int8, {**({} if int8 else LOW_MEMORY_SESSION), **options}))


def ort_fits(data_bytes, weights, options, int8, available=None):
    """None when a session should fit, else the reason to skip it ("needs X GiB, have Y GiB")."""
    from ..base.memory import Fit

    fit = Fit("an ONNX Runtime session", session_estimate(data_bytes, weights, options, int8),
              available_bytes() if available is None else available, ORT_MAX_FRACTION)
    return None if fit.fits else fit.message


def open_session(model, options, low_memory, data_folder=None):
    """A CPU session of a graph file, or of serialized graph bytes whose external data is in `data_folder`."""
    import onnxruntime as ort

    from ..base.verbosity import ort_severity

    so = ort.SessionOptions()
    so.log_severity_level = ort_severity()  # errors only unless -v / -vv
    so.enable_cpu_mem_arena = False  # activations freed after each run, not kept in a growing arena
    for key, value in {**(LOW_MEMORY_SESSION if low_memory else {}), **options}.items():
        so.add_session_config_entry(key, value)
    if data_folder is not None:  # graph bytes: their external data paths are relative to this folder
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(data_folder))
    return ort.InferenceSession(model if data_folder is not None else str(model), so,
                                providers=["CPUExecutionProvider"])


def run_chain(prefill_path, decode_path, num_layers, vocab, seq_len, options, float_np, low_memory=True,
              desc="validate", steps=DECODE_STEPS):
    """ORT logits per step: prefill, then `steps` (<= DECODE_STEPS) decodes of the forced tokens with its own
    presents.

    One session at a time: the prefill session is freed (its presents kept as NumPy) before the decode one.
    A progress bar `desc` counts the steps (prefill + decodes, each with its session load).
    """
    from ..base.progress import bar

    ids, mask, forced = make_inputs(vocab, seq_len)
    decodes = min(steps, DECODE_STEPS)
    steps = bar(total=1 + decodes, desc=desc, unit="step")
    session = open_session(prefill_path, options, low_memory)
    out = session.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)})
    steps.update(1)
    del session  # freed here (reference counting): one session at a time
    logits, nonfinite = [out[0][:, -1, :]], [not all(np.isfinite(t).all() for t in out)]
    past = [t.astype(float_np) for t in out[1:]]
    del out
    session = open_session(decode_path, options, low_memory)
    for step in range(decodes):
        mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
        feed = {"input_ids": forced[:, step:step + 1], "attention_mask": mask,
                "position_ids": positions(mask)[:, -1:]}
        for i in range(num_layers):
            feed[f"past_key_values.{i}.key"] = past[2 * i]
            feed[f"past_key_values.{i}.value"] = past[2 * i + 1]
        out = session.run(None, feed)
        logits.append(out[0][:, -1, :])
        nonfinite.append(not all(np.isfinite(t).all() for t in out))
        past = [t.astype(float_np) for t in out[1:]]
        steps.update(1)
    steps.close()
    del session
    return logits, nonfinite


def _metrics(ort_logits, ref, kind):
    a, b = ort_logits.astype(np.float64), ref.astype(np.float64)
    tol = tolerance(kind, b)
    diff = float(np.abs(a - b).max()) if np.isfinite(a).all() else float("inf")
    m = logit_agreement(a, b)
    cos, kl, agree = m["cosine_min"], m["kl_mean"], m["top1_agreement"]
    top_ref, top_ort = b.argmax(-1), a.argmax(-1)
    srt = np.sort(b, axis=-1)
    clear = (srt[:, -1] - srt[:, -2]) > tol
    flips = int(np.sum((top_ref != top_ort) & (clear if kind == "fp16" else True)))
    return {"max_abs_diff": diff, "tolerance": tol, "cosine": cos, "kl": kl, "top1_agreement": agree,
            "top1_flips": flips, "finite": bool(np.isfinite(ort_logits).all())}


def _ok(m, kind):
    if not m["finite"] or m["max_abs_diff"] > m["tolerance"] or m["top1_flips"]:
        return False
    if kind == "fp16":
        return m["cosine"] >= 0.999 and m["kl"] <= 1e-3
    return True


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
    if any(not r["gated"] for r in rows):
        lines.append(LEGEND)
    return "\n".join(lines)
