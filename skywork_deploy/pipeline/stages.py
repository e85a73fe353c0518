"""The build's stages as data: (name, upstream stages, options, function(folder) -> result dict).

Each function calls the library function of the matching stage module and returns a small JSON-able
summary; the stage module writes its own output folder and manifest.
"""
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)
STREAMED = "onnxruntime-streamed"
STREAMED_SMOKE_TOKENS = 4  # new tokens of a layer-streamed smoke answer (each one loads every piece)


def plan(settings, model, build_dir):
    """The stages this build runs, in order."""
    build_dir = Path(build_dir)
    patched = build_dir / "patch"
    int8 = settings.dtype == "int8"
    steps = [("patch", [], {"insert_slice": True}, lambda out: _patch(model, out))]
    if settings.calib.dataset:
        c = settings.calib
        steps.append(("calib", ["patch"], vars(c).copy(), lambda out: _calib(c, patched, out)))
    if int8:
        q = settings.quantize
        steps.append(("quantize", ["patch"], vars(q).copy(), lambda out: _quantize(q, patched, out)))
    export_src = build_dir / ("quantize" if int8 else "patch")
    e = settings.export
    export_opts = {**vars(e), "dtype": settings.dtype}
    steps.append(("export", ["quantize" if int8 else "patch"], export_opts,
                  lambda out: _export(e, settings.dtype, export_src, out)))
    r = settings.run
    steps.append(("validate", ["export"], vars(r).copy(), lambda out: _validate(r, build_dir / "export", out)))
    if getattr(settings, "eval", None) is not None and settings.eval.dataset:
        from ..evaluate.build_eval import eval_options

        ev = settings.eval
        steps.append(("eval", ["export", "patch"], eval_options(ev),
                      lambda out: _eval(ev, build_dir / "export", patched, out)))
    cs = settings.compile
    model_name = Path(str(settings.model)).name  # the build is named after the model, not its patch/ folder
    compile_opts = {**vars(cs), "dtype": settings.dtype, "calib": bool(settings.calib.dataset),
                    "model_name": model_name}
    calib_dir = build_dir / "calib" if settings.calib.dataset else None
    steps.append(("compile", ["patch"] + (["calib"] if calib_dir else []), compile_opts,
                  lambda out: _compile(cs, settings.dtype, patched, calib_dir, out, model_name)))
    return steps


def _patch(model, out):
    from ..patch import patch_model

    result = patch_model(model, out=out)
    return {"weights_linked": result["weights_linked"], "written": result["written"]}


def _calib(c, model, out):
    from ..calib import build_calib

    from ..base.progress import bar

    reading = bar(desc="calib: reading", unit="B", unit_scale=True)
    try:
        result = build_calib(c.dataset, [c.source], model, out, nsamples=c.nsamples, seqlen=c.seqlen, seed=c.seed,
                             split=c.split, allow_packing=c.allow_packing, progress=reading.update)
    finally:
        reading.close()
    return {k: result[k] for k in ("nsamples", "seqlen", "statistics", "dataset_block") if k in result}


def _quantize(q, model, out):
    from ..quantize import quantize_model

    result = quantize_model(model, out, include_lm_head=q.include_lm_head, min_top1=q.min_top1, max_kl=q.max_kl,
                            progress=True)
    report = result["report"]
    return {"total": report.get("total"), "end_to_end": report.get("end_to_end")}


def _export(e, dtype, src, out):
    from ..export import export_model

    result = export_model(src, out, dtype=dtype, int8_format=e.int8_format, seq_lens=e.seq_lens,
                          simplify=e.simplify, ort_ops=e.ort_ops, validation=e.validation)
    return {k: result[k] for k in ("validation", "graphs") if k in result}


def _validate(r, export_dir, out):
    """The export's own validation, plus a greedy answer through the runtime: ONNX Runtime vs torch tokens."""
    from ..base.fsutil import write_json
    from ..runtime.backends import make_backend
    from ..runtime.bundle import load_tokenizer, open_bundle
    from ..runtime.generate import generate_text

    out.mkdir(parents=True)
    export_validation = json.loads((export_dir / "validation.json").read_text())
    bundle = open_bundle(export_dir)
    tokenizer = load_tokenizer(bundle)
    runs, notes = {}, []
    skipped = export_validation.get("skipped")
    backends, options = [], {}
    if bundle.manifest.get("runnable_on_onnxruntime", True):
        ort_backend, ort_options, why = _smoke_session(bundle)  # the same memory policy as the export's validation
        if why:
            notes.append(why)
            log.warning("smoke run: %s", why)
        if ort_backend:
            backends.append(ort_backend)
            options[ort_backend] = ort_options
    torch_note = _torch_smoke_skip(bundle)
    if torch_note:
        notes.append(torch_note)
        log.warning("smoke run: %s", torch_note)
    else:
        backends.append("torch")
    for backend in backends:
        tokens = STREAMED_SMOKE_TOKENS if backend == STREAMED else r.max_new_tokens
        engine = make_backend(backend, bundle, **options.get(backend, {}))
        gen = generate_text(engine, tokenizer, [r.prompt], max_new_tokens=min(tokens, r.max_new_tokens))
        del engine  # its sessions go before the next backend loads its model
        name = "onnxruntime" if backend == STREAMED else backend
        runs[name] = {"tokens": gen["outputs"][0]["tokens"], "text": gen["outputs"][0]["text"],
                      "decode_tokens_per_s": gen["timing"]["decode_tokens_per_s"],
                      **({"options": options[backend]} if backend in options else {}),
                      **({"layer_streamed": True} if backend == STREAMED else {})}
    smoke = {"prompt": r.prompt, "runs": runs, **({"notes": notes} if notes else {})}
    if len(runs) == 2:
        a, b = runs["onnxruntime"]["tokens"], runs["torch"]["tokens"]
        if runs["onnxruntime"].get("layer_streamed"):  # the shortened answer against as many torch tokens
            b = b[:len(a)]
            smoke["compared_tokens"] = len(b)
        same = sum(x == y for x, y in zip(a, b))
        smoke["token_agreement"] = same / max(len(a), len(b), 1)
        smoke["first_divergence"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    result = {"export": _validation_summary(export_validation), "smoke": smoke,
              "passed": None if skipped else bool(export_validation.get("passed", False))}
    if skipped:
        result["skipped"] = skipped
        log.warning("export validation was skipped: %s", skipped)
    write_json(out / "validation.json", result)
    return result


def _eval(ev, export_dir, patched, out):
    """A short Math-Verify eval of the deployed bundle (ONNX Runtime) against the fp32 torch reference
    (skywork_deploy/evaluate/build_eval.py); each side runs only when its session fits in memory."""
    from ..evaluate.build_eval import build_eval
    from ..runtime.bundle import open_bundle

    backend, ort_options, why = _smoke_session(open_bundle(export_dir))
    if backend != "onnxruntime":
        why = why if backend is None else "eval needs a whole ONNX Runtime session (" + why + ")"
        log.warning("eval: %s", why)
        return {"skipped": why, "dataset": str(ev.dataset)}
    return build_eval(ev, export_dir, patched, out, ort_options, _torch_smoke_skip(open_bundle(export_dir)))


def _smoke_session(bundle):
    """(backend, options, note) for the ORT smoke run: the whole-session backend when one session fits, else
    the layer-streamed one (with a note saying why, and that its answer is shortened), else (None, {}, why).

    One session at a time (a single prompt prefills once, then decodes). int8: the exact W8A16 arithmetic,
    folded to fp32 weights ("exact", 4x the int8 bytes) only when that fits, else the runtime's packed int8
    fast path ("fast", 1x). Not "exact-nbits": exact too, and the export validation gates it, but about 60 s a
    decode step for the 7B shape on 2 cores (bench_full_build.py), while "fast" is the path users run.
    Streamed, int8 runs "fast" too: every token loads every piece, and the pre-fused graphs load fastest.
    """
    from ..base.errors import DeployError
    from ..base.memory import check_session_fits, mode_for
    from ..runtime.backends import make_backend

    is_int8 = bundle.dtype == "int8"
    choices = ["exact", "fast"] if is_int8 else [None]
    fit = None
    for accuracy in choices:
        paths = [bundle.graph_path(g, accuracy) for g in ("prefill", "decode")]
        fit = check_session_fits(paths, mode_for(is_int8, int8_accuracy=accuracy), "the ONNX Runtime smoke run")
        if fit.fits:
            return "onnxruntime", {"one_session": True, **({"int8_accuracy": accuracy} if accuracy else {})}, None
    options = {"int8_accuracy": "fast"} if is_int8 else {}
    try:
        make_backend(STREAMED, bundle, **options)  # its memory policy: the largest piece + K/V must fit
    except DeployError as exc:
        return None, {}, f"ONNX Runtime smoke run skipped: {fit.message}, and layer-streamed: {exc}"
    return STREAMED, options, (f"ONNX Runtime smoke run layer-streamed ({fit.message}); its answer is shortened "
                               f"to {STREAMED_SMOKE_TOKENS} tokens: greedy decoding cannot be teacher-forced, so "
                               "every token loads every piece again")


def _torch_smoke_skip(bundle):
    """Why the torch smoke run (the whole model in memory) is skipped, or None when it fits."""
    from ..export.validate import choose_reference
    from ..base.reference import fp32_model_bytes

    how, why = choose_reference(fp32_model_bytes(bundle.source_model()))
    return None if how == "whole" else f"torch run skipped (the whole model would not fit: {why})"


def _validation_summary(v):
    keep = ("passed", "skipped", "reference_kind", "dtype", "checks", "summary", "tolerances")
    return {k: v[k] for k in keep if k in v} or v


def _compile(cs, dtype, patched, calib_dir, out, model_name):
    """One vamc config per size in compile/<name>.yaml, compiled into compile/vacc_deploy/<name>/ when vamc
    is found, else checked and written (a dry run, `compiled: false`)."""
    from ..compile.settings import CompileSettings, expand_sizes
    from ..base.errors import ExternalToolError
    from ..compile.vamc import compile_models, find_vamc

    out.mkdir(parents=True)
    given = {"tp": cs.tp, "max_input_len": cs.max_input_len, "max_seq_len": cs.max_seq_len, "b2s": cs.b2s,
             "align_qkv": cs.align_qkv, "calib_true_sequential": cs.calib_true_sequential, "workers": cs.workers,
             "name": cs.name}
    base = CompileSettings(dtype=dtype, workspace="vacc_deploy", model_name=model_name,
                           calib=str(calib_dir) if calib_dir else None,
                           **{k: v for k, v in given.items() if v is not None})
    try:
        find_vamc(cs.vamc)
        dry_run, note = False, None
    except ExternalToolError:
        dry_run, note = True, "vamc not found: the config was checked and written (dry run), not compiled"
    results = compile_models(patched, expand_sizes(base, cs.sizes), vamc=cs.vamc, timeout=cs.timeout,
                             dry_run=dry_run, config_dir=out, cwd=out)
    keep = ("name", "command", "env", "compiled", "checks", "warnings", "output_dir", "seconds", "suites",
            "tokenizer")
    entries = [{"config": f"compile/{Path(r['config_path']).name}", **{k: r[k] for k in keep if k in r}}
               for r in results]
    return {"dry_run": dry_run, "note": note, "compiled": all(r["compiled"] for r in results),
            "checks": list(dict.fromkeys(c["name"] for r in results for c in r["checks"])),
            "builds": entries, "warnings": [w for r in results for w in r["warnings"]]}


def summarize_validation(results):
    """{stage: figures} of the stages that check something (pipeline/verdict.py: `passed` only where a
    check ran; a skipped one has `skipped` and `warning`; compile has `compiled`, never `passed`)."""
    from .verdict import validation_figures

    return validation_figures(results)
