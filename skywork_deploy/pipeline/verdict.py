"""The build's verdict: each stage's measured outcome, one line naming them all, and the exit code it gives.

Outcomes (what each word means, also in the README):
- validated: a check ran and its figures are within the thresholds it states (quantize: top-1 agreement and
  mean KL against the original; export: every gated ONNX Runtime row within tolerance of the torch reference);
- checked only: measured and recorded, not gated (the smoke run's ONNX Runtime vs torch tokens);
- done: the stage wrote its output and has no accuracy check of its own (patch, calib);
- skipped (why): a check that did not run, with the reason (a session that would not fit in memory,
  `--no-eval`);
- compiled / not compiled (why): whether `vamc` ran and its outputs were checked, or only the config was
  written and checked (a dry run, because no `vamc` was found);
- FAILED (why): a check ran and missed its thresholds (the stage raised; nothing was accepted).

Exit code rule: 1 when a check FAILED; 1 when a check was skipped, unless `--allow-unvalidated`; 1 when not
compiled and `--require-compile`; otherwise 0. A dry-run compile alone is not a failure.
"""
from ..quantize.report import verdict_text

GATE_OK, GATE_UNCHECKED, GATE_FAILED, GATE_NOT_COMPILED = "ok", "unchecked", "failed", "not compiled"


def _scalars(d):
    return {k: v for k, v in (d or {}).items() if not isinstance(v, (list, dict))}


def validation_figures(results):
    """{stage: figures} for the stages that check something, keyed by what was measured.

    `passed` appears only where a check ran (true or false); a check that did not run has `skipped` and
    `warning` instead; compile says `compiled` and lists its checks, never `passed`.
    """
    out = {}
    if "quantize" in results:
        e2e = dict((results["quantize"].get("result") or {}).get("end_to_end") or {})
        out["quantize"] = {**_scalars(e2e), "outcome": verdict_text(e2e).split(" (")[0]}
        if e2e.get("thresholds"):
            out["quantize"]["thresholds"] = e2e["thresholds"]
        if "skipped" in e2e:
            out["quantize"].pop("passed", None)
            out["quantize"]["warning"] = f"quantize accuracy check skipped: {e2e['skipped']}"
    if "validate" in results:
        res = results["validate"].get("result") or {}
        export = {**_scalars(res.get("export")), "passed": bool(res.get("passed"))}
        if res.get("skipped"):  # not a pass: a warning the build prints and records
            export.pop("passed")
            export.update(skipped=res["skipped"], warning=f"ONNX Runtime validation skipped: {res['skipped']}")
        export["outcome"] = "skipped" if res.get("skipped") else "validated" if export["passed"] else "FAILED"
        smoke = res.get("smoke") or {}
        if "token_agreement" in smoke:
            export["smoke_token_agreement"] = smoke["token_agreement"]
        out["export"] = export
    if "eval" in results:  # Math-Verify accuracy of the deployed bundle vs the fp32 reference: recorded, not gated
        out["eval"] = {**(results["eval"].get("result") or {}), "outcome": "checked only"}
    if "compile" in results:
        res = results["compile"].get("result") or {}
        compiled = bool(res.get("compiled", not res.get("dry_run", True)))
        out["compile"] = {"compiled": compiled, "dry_run": res.get("dry_run"), "note": res.get("note"),
                          "checks": list(res.get("checks") or []),
                          "outcome": "compiled" if compiled else "not compiled"}
    return out


def _export_rows(validation):
    rows = validation.get("rows") or []
    gated = [r for r in rows if r.get("gated")]
    return gated, [r for r in rows if not r.get("gated")]


def stage_outcomes(results):
    """[{stage, outcome, detail, gate}] in run order, from the stage records of a build."""
    out = []
    for name, record in results.items():
        res = record.get("result") or {}
        start = len(out)
        if name == "quantize":
            e2e = res.get("end_to_end") or {}
            text = verdict_text(e2e)
            gate = GATE_FAILED if e2e.get("passed") is False else GATE_OK if e2e.get("passed") else GATE_UNCHECKED
            outcome, _, detail = text.partition(" (")
            out.append({"stage": name, "outcome": outcome, "detail": detail.rstrip(")"), "gate": gate})
        elif name == "export":
            v = res.get("validation") or {}
            gated, info = _export_rows(v)
            if v.get("skipped"):
                out.append({"stage": name, "outcome": "skipped", "detail": v["skipped"],
                            "gate": GATE_UNCHECKED})
            else:
                bad = [r for r in gated if not r.get("ok")]
                streamed = [m for m, run in (v.get("runs") or {}).items() if run.get("how") == "streamed"]
                detail = (f"{len(gated) - len(bad)}/{len(gated)} gated checks within tolerance"
                          + (f", {len(info)} info rows not gated" if info else "")
                          + (f", layer-streamed: {', '.join(streamed)}" if streamed else ""))
                out.append({"stage": name, "outcome": "FAILED" if bad else "validated", "detail": detail,
                            "gate": GATE_FAILED if bad else GATE_OK})
        elif name == "validate":
            smoke = res.get("smoke") or {}
            runs = smoke.get("runs") or {}
            if "token_agreement" in smoke:
                n = max((len(r.get("tokens") or []) for r in runs.values()), default=0)
                detail = f"onnxruntime vs torch greedy tokens agree {smoke['token_agreement']:.0%} of {n}"
            elif runs:
                detail = f"answered on {', '.join(runs)}; " + "; ".join(smoke.get("notes") or ["no second backend"])
            else:
                detail = "; ".join(smoke.get("notes") or ["no backend could run"])
            outcome = "checked only" if runs else "skipped"
            out.append({"stage": name, "outcome": outcome, "detail": detail, "gate": GATE_OK})
        elif name == "compile":
            compiled = bool(res.get("compiled", not res.get("dry_run", True)))
            checks = res.get("checks") or []
            if compiled:
                detail = "vamc ran" + (f"; {len(checks)} checks" if checks else "")
            else:
                detail = ("dry run: vamc not found; config written and checked"
                          + (f", {len(checks)} checks" if checks else ""))
            out.append({"stage": name, "outcome": "compiled" if compiled else "not compiled",
                        "detail": detail, "gate": GATE_OK if compiled else GATE_NOT_COMPILED})
        elif isinstance(res.get("outcome"), str):  # a stage that states its own (e.g. "checked only")
            out.append({"stage": name, "outcome": res["outcome"], "detail": str(res.get("detail", "")),
                        "gate": res.get("gate", GATE_OK)})
        else:
            summary = {"calib": lambda r: f"{r.get('nsamples')} windows x {r.get('seqlen')} tokens",
                       "eval": lambda r: r.get("line") or f"skipped: {r.get('skipped')}"}.get(name)
            detail = (summary(res) if summary else "written")
            outcome = "checked only" if name == "eval" else "done"  # eval: measured and recorded, not gated
            out.append({"stage": name, "outcome": outcome, "detail": detail, "gate": GATE_OK})
        for o in out[start:]:
            o["cached"] = bool(record.get("skipped"))
    return out


def decide(outcomes, allow_unvalidated=False, require_compile=False):
    """{accepted, exit_code, reasons, line, stages} from the outcomes and the two acceptance options."""
    reasons = []
    for o in outcomes:
        if o["gate"] == GATE_FAILED:
            reasons.append(f"{o['stage']} failed its check")
        elif o["gate"] == GATE_UNCHECKED and not allow_unvalidated:
            reasons.append(f"{o['stage']} was not checked (pass --allow-unvalidated to accept that)")
        elif o["gate"] == GATE_NOT_COMPILED and require_compile:
            reasons.append(f"{o['stage']}: not compiled and --require-compile was given")
    accepted = not reasons
    stages = "; ".join(f"{o['stage']} {o['outcome']} ({o['detail']})" + (" [cached]" if o.get("cached") else "")
                       for o in outcomes)
    head = "verdict: ACCEPTED" if accepted else f"verdict: REJECTED ({'; '.join(reasons)})"
    return {"accepted": accepted, "exit_code": 0 if accepted else 1, "reasons": reasons,
            "line": f"{head}: {stages}", "allow_unvalidated": allow_unvalidated,
            "require_compile": require_compile, "stages": {o["stage"]: o for o in outcomes}}


def failure_line(outcomes, failed_stage, message, planned):
    """The verdict line of a build that stopped in `failed_stage` with `message`."""
    done = "; ".join(f"{o['stage']} {o['outcome']}" for o in outcomes)
    rest = [name for name in planned if name not in {o["stage"] for o in outcomes} and name != failed_stage]
    parts = [p for p in (done, f"{failed_stage} FAILED ({message})",
                         f"not run: {', '.join(rest)}" if rest else "") if p]
    return "verdict: REJECTED: " + "; ".join(parts)
