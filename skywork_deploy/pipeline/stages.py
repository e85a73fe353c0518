"""The build's stages as data: (name, upstream stages, options, function(folder) -> result dict).

Each function calls the library function of the matching stage module and returns a small JSON-able
summary; the stage module writes its own output folder and manifest.
"""
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


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
    cs = settings.compile
    compile_opts = {**vars(cs), "dtype": settings.dtype, "calib": bool(settings.calib.dataset)}
    calib_dir = build_dir / "calib" if settings.calib.dataset else None
    steps.append(("compile", ["patch"] + (["calib"] if calib_dir else []), compile_opts,
                  lambda out: _compile(cs, settings.dtype, patched, calib_dir, out)))
    return steps


def _patch(model, out):
    from ..patch import patch_model

    result = patch_model(model, out=out)
    return {"weights_linked": result["weights_linked"], "written": result["written"]}


def _calib(c, model, out):
    from ..calib import build_calib

    result = build_calib(c.dataset, [c.source], model, out, nsamples=c.nsamples, seqlen=c.seqlen, seed=c.seed,
                         split=c.split)
    return {k: result[k] for k in ("nsamples", "seqlen", "statistics", "dataset_block") if k in result}


def _quantize(q, model, out):
    from ..quantize import quantize_model

    result = quantize_model(model, out, include_lm_head=q.include_lm_head)
    report = result["report"]
    return {"total": report.get("total"), "end_to_end": report.get("end_to_end")}


def _export(e, dtype, src, out):
    from ..export import export_model

    result = export_model(src, out, dtype=dtype, int8_format=e.int8_format, seq_lens=e.seq_lens,
                          simplify=e.simplify, ort_ops=e.ort_ops)
    return {k: result[k] for k in ("validation", "graphs") if k in result}


def _validate(r, export_dir, out):
    """The export's own validation, plus a greedy answer through the runtime: ONNX Runtime vs torch tokens."""
    from ..fsutil import write_json
    from ..runtime.backends import make_backend
    from ..runtime.bundle import load_tokenizer, open_bundle
    from ..runtime.generate import generate_text

    out.mkdir(parents=True)
    export_validation = json.loads((export_dir / "validation.json").read_text())
    bundle = open_bundle(export_dir)
    tokenizer = load_tokenizer(bundle)
    runs, notes = {}, []
    skipped = export_validation.get("skipped")  # ORT would not fit in memory: no ORT smoke run either
    runnable = bundle.manifest.get("runnable_on_onnxruntime", True) and not skipped
    backends = ["onnxruntime"] if runnable else []
    torch_note = _torch_smoke_skip(bundle)
    if torch_note:
        notes.append(torch_note)
        log.warning("smoke run: %s", torch_note)
    else:
        backends.append("torch")
    for backend in backends:
        gen = generate_text(make_backend(backend, bundle), tokenizer, [r.prompt], max_new_tokens=r.max_new_tokens)
        runs[backend] = {"tokens": gen["outputs"][0]["tokens"], "text": gen["outputs"][0]["text"],
                         "decode_tokens_per_s": gen["timing"]["decode_tokens_per_s"]}
    smoke = {"prompt": r.prompt, "runs": runs, **({"notes": notes} if notes else {})}
    if len(runs) == 2:
        a, b = runs["onnxruntime"]["tokens"], runs["torch"]["tokens"]
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


def _torch_smoke_skip(bundle):
    """Why the torch smoke run (the whole model in memory) is skipped, or None when it fits."""
    from ..export.validate import choose_reference
    from ..reference import fp32_model_bytes

    how, why = choose_reference(fp32_model_bytes(bundle.source_model()))
    return None if how == "whole" else f"torch run skipped (the whole model would not fit: {why})"


def _validation_summary(v):
    keep = ("passed", "skipped", "reference_kind", "dtype", "checks", "summary", "tolerances")
    return {k: v[k] for k in keep if k in v} or v


def _compile(cs, dtype, patched, calib_dir, out):
    from ..compile_config import CompileSettings
    from ..errors import ExternalToolError
    from ..vamc import compile_model, find_vamc

    out.mkdir(parents=True)
    settings = CompileSettings(dtype=dtype, tp=cs.tp, seq_lens=list(cs.seq_lens), b2s=cs.b2s,
                               workspace="vacc_deploy", workers=cs.workers, name=cs.name,
                               calib=str(calib_dir) if calib_dir else None)
    try:
        find_vamc(cs.vamc)
        dry_run, note = False, None
    except ExternalToolError:
        dry_run, note = True, "vamc not found: the config was checked and written (dry run), not compiled"
    result = compile_model(patched, settings, vamc=cs.vamc, timeout=cs.timeout, dry_run=dry_run,
                           config_out=out / "vamc_config.yaml", cwd=out)
    summary = {"dry_run": dry_run, "note": note, "name": result["name"], "config": "compile/vamc_config.yaml",
               "command": result.get("command"), "env": result.get("env")}
    if not dry_run:
        summary.update(output_dir=result.get("output_dir"), seconds=result.get("seconds"))
    return summary


def summarize_validation(results):
    """{stage: {"passed": bool, ...figures}} for the stages that validate something.

    A validation skipped for lack of memory has `passed: None`, `skipped` and `warning`: the build does not
    fail on it, but prints and records it as not validated.
    """
    out = {}
    if "quantize" in results:
        e2e = (results["quantize"].get("result") or {}).get("end_to_end") or {}
        out["quantize"] = {"passed": True, **{k: v for k, v in e2e.items() if not isinstance(v, (list, dict))}}
    if "validate" in results:
        res = results["validate"].get("result") or {}
        out["export"] = {**(res.get("export") or {}), "passed": bool(res.get("passed"))}
        if res.get("skipped"):  # not a pass: a warning the build prints and records
            out["export"].update(passed=None, skipped=res["skipped"],
                                 warning=f"ONNX Runtime validation skipped: {res['skipped']}")
        smoke = res.get("smoke") or {}
        if "token_agreement" in smoke:
            out["export"]["smoke_token_agreement"] = smoke["token_agreement"]
    if "compile" in results:
        res = results["compile"].get("result") or {}
        out["compile"] = {"passed": True, "dry_run": res.get("dry_run"), "note": res.get("note")}
    return out
