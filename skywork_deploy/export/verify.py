"""Export validation driven per mode: the torch reference once, then each ONNX Runtime mode whole or streamed.

Per mode (the dtype's gated modes and the reported int8 fast path, validate.py), the way it runs:
- `whole`: the graph files' own sessions, prefill then decode (validate.run_chain), when the estimate fits;
- `streamed`: the same graph files cut at decoder layers, one piece's session at a time (streamed.py), when
  the largest piece plus the K/V and hidden states held between pieces fits (memory.streamed_bytes);
- `auto` (the default): whole when it fits, else streamed.
A mode that fits neither way is skipped (reported, not passed). Rows, tolerances and table are the same
either way; `runs` in the report says per mode which way it ran, its estimate, its sampled peak RSS and its
time.
"""
import logging
import time

log = logging.getLogger(__name__)
VALIDATIONS = ("auto", "whole", "streamed")
GRAPHS = ("prefill", "decode")


def mode_paths(bundle, variant):
    """[prefill, decode] paths a validation mode runs: its pre-fused variant when present, else the standard."""
    from .nbits import variant_file

    paths = [bundle / variant_file(k, variant) for k in GRAPHS] if variant else []
    return paths if paths and all(p.is_file() for p in paths) else [bundle / f"{k}.onnx" for k in GRAPHS]


def held_bytes(spec, seq, steps, float_bytes=4):
    """Bytes a streamed chain holds between pieces at validation's batch of 2: every layer's K/V (an upper
    bound: only a piece's layers are held), the boundary tensors of each step (hidden, residual, rotary tables,
    mask: a few rows of `hidden_size` per position) and the logits kept per step."""
    positions = seq + steps
    kv = 2 * 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * positions * float_bytes
    states = (1 + steps) * 2 * positions * 8 * spec.hidden_size * 4
    logits = (seq + 1 + steps) * 2 * spec.vocab_size * 4
    return kv + states + logits


def choose_run(validation, paths, sizes, data_bytes, options, is_int8, held, available=None):
    """({"how": "whole" | "streamed", "estimate_bytes", ...}, None) or (None, why the mode is skipped)."""
    from ..base.memory import Fit, available_bytes
    from . import streamed, validate as v

    have = available_bytes() if available is None else available
    whole = Fit("an ONNX Runtime session", v.session_estimate(data_bytes, sizes, options, is_int8), have,
                v.ORT_MAX_FRACTION)
    if validation == "whole" or (validation == "auto" and whole.fits):
        run = {"how": "whole", "estimate_bytes": whole.need, "choice": f"--validation {validation}"}
        return (run, None) if whole.fits else (None, whole.message)
    layers, need = streamed.plan(paths, options, is_int8, held)
    piece = Fit("a layer-streamed ONNX Runtime run (largest piece + K/V)", need, have, v.ORT_MAX_FRACTION)
    if not piece.fits:
        return None, piece.message
    why = (f"--validation {validation}" if validation == "streamed" else
           f"--validation auto: the whole session does not fit ({whole.message})")
    return {"how": "streamed", "estimate_bytes": need, "layers_per_piece": layers, "choice": why,
            "whole_estimate_bytes": whole.need}, None


def validate_bundle(bundle, folder, dtype, int8_format, spec, seq_lens, protos, validation="auto"):
    """Run validate.py's checks for this dtype/flavour; returns the report dict (rows, passed, table, runs).

    The reference is computed and freed first, then each ORT mode runs one session at a time (whole) or one
    piece's session at a time (streamed). When no gated mode ran, `passed` is None and `skipped` says why.
    """
    import onnx

    from . import int8, validate as v

    seq = seq_lens[0] if seq_lens else v.PROMPT_LEN
    is_int8 = dtype == "int8"
    float_np = "float16" if dtype == "fp16" else "float32"
    if not is_int8:
        modes, variants = [(f"{dtype} ort", v.FAST, True)], {}
    else:
        modes = [("int8 ort exact", v.EXACT, True), ("int8 ort unfused", v.UNFUSED, True),
                 (v.FAST_MODE, v.FAST, False)]
        variants = {"int8 ort exact": "nbits-exact", v.FAST_MODE: "nbits"}
    # each mode's graphs: the pre-fused MatMulNBits files when the bundle has them (nbits.py), else the
    # standard graphs with ONNX Runtime's load-time fusion
    paths = {mode: mode_paths(bundle, variants.get(mode)) for mode, _, _ in modes}
    temp = []
    if int8_format == "vacc":  # ORT cannot run the custom op: check its reference rewrite (same weights)
        temp = [bundle / f".validate-{k}.onnx" for k in GRAPHS]
        for proto, path in zip(protos, temp):
            onnx.save_model(int8.to_reference(proto), str(path))
        paths = {mode: temp for mode in paths}
    try:
        return _run_modes(bundle, folder, dtype, spec, seq, modes, paths, validation, is_int8, float_np,
                          int8_format)
    finally:
        for path in temp:
            path.unlink(missing_ok=True)


def _run_modes(bundle, folder, dtype, spec, seq, modes, paths, validation, is_int8, float_np, int8_format):
    import onnx

    from . import streamed, validate as v, weights
    from ..base.memory import PeakMemory, graph_weights
    from ..base.reference import fp32_model_bytes

    data_bytes = (bundle / weights.DATA_FILE).stat().st_size
    sizes = {mode: graph_weights(onnx.load(str(paths[mode][0]), load_external_data=False)) for mode, _, _ in modes}
    held = held_bytes(spec, seq, v.DECODE_STEPS, 2 if dtype == "fp16" else 4)
    runs, skipped_modes = {}, {}
    for mode, options, _ in modes:
        runs[mode], why = choose_run(validation, paths[mode], sizes[mode], data_bytes, options, is_int8, held)
        if why:
            skipped_modes[mode] = why
            del runs[mode]
    how, why_ref = v.choose_reference(fp32_model_bytes(folder))
    base = {"reference_kind": how, "reference_choice": why_ref, "seq_len": seq, "batch": 2,
            "left_padding": v.PAD, "decode_steps": v.DECODE_STEPS, "decode_tokens": "forced (seeded)",
            "validation": validation}
    if is_int8:
        base["reference"] = "ours+quantize(8) fp32" + (", layer-streamed" if how == "streamed" else "")
    else:
        base["reference"] = ("transformers Qwen2ForCausalLM eager fp32" if how == "whole" else
                             "ours fp32, layer-streamed (skywork_deploy.base.reference)")
    if all(m in skipped_modes for m, _, gated in modes if gated):
        reason = "; ".join(sorted(set(skipped_modes.values())))
        log.warning("ONNX Runtime validation skipped: %s", reason)
        return {**base, "passed": None, "skipped": reason, "skipped_modes": skipped_modes, "rows": [],
                "runs": runs, "table": f"WARNING: ONNX Runtime validation skipped (bundle not validated): {reason}"}
    clock = time.perf_counter()
    seconds = {}  # per phase: the one reference pass, then each mode (its sessions and steps)
    ref = v.reference_logits(folder, is_int8, spec.vocab_size, seq, how)
    seconds["reference"] = round(time.perf_counter() - clock, 2)
    rows, decode_steps_by_mode = [], {}
    ids, mask, forced = v.make_inputs(spec.vocab_size, seq)
    for mode, options, gated in modes:
        if mode in skipped_modes:
            log.warning("validation mode %r skipped: %s", mode, skipped_modes[mode])
            continue
        clock = time.perf_counter()
        chain = v.decode_steps(options, sizes[mode]["int8"] + sizes[mode]["int8_nbits"])
        if chain < v.DECODE_STEPS:
            decode_steps_by_mode[mode] = chain
        with PeakMemory() as peak:
            if runs[mode]["how"] == "whole":
                steps, nonfinite = v.run_chain(*paths[mode], spec.num_layers, spec.vocab_size, seq, options,
                                               float_np, low_memory=not is_int8, desc=f"validate: {mode}",
                                               steps=chain)
            else:
                steps, nonfinite = streamed.run_chain(*paths[mode], ids, mask, forced[:, :chain], options,
                                                      float_np, runs[mode]["layers_per_piece"],
                                                      low_memory=not is_int8,
                                                      desc=f"validate: {mode} (layer-streamed)")
        rows += v.compare(mode, "fp16" if dtype == "fp16" else "exact", gated, steps, nonfinite, ref)
        seconds[mode] = round(time.perf_counter() - clock, 2)
        runs[mode].update(peak_rss_bytes=peak.peak, seconds=seconds[mode])
    checked = "vacc graph with custom nodes rewritten to DequantizeLinear+Transpose+MatMul" \
        if int8_format == "vacc" else "bundle graphs"
    report = {**base, "passed": all(r["ok"] for r in rows), "checked": checked, "rows": rows,
              "table": v.table(rows), "seconds": seconds, "runs": runs}
    if skipped_modes:
        report["skipped_modes"] = skipped_modes
    if decode_steps_by_mode:  # modes whose chain is shorter than decode_steps (validate.decode_steps says why)
        report["decode_steps_by_mode"] = decode_steps_by_mode
    log.debug("validation:\n%s", report["table"])
    return report
