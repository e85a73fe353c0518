"""What quantization did to a model: weight errors and bytes per layer, and end to end on fixed prompts.

Definitions (also written into the report):
- rel_fro: per tensor, ||W - deq(Q)||_F / ||W||_F, with deq(Q) = Q * scale[:, None] in fp32 (0 for W = 0);
- max_row_rel: per tensor, max over elements of |W - deq(Q)| / absmax(row of W); rounding bounds it by
  0.5 / 127 = 0.394% for 8 bits (rows of zeros count as 0). One exception, from the vendor's math: a row
  whose absmax is below 127 x the smallest normal float32 (~1.5e-36) gets that smallest scale and
  quantizes to zeros, relative error 1;
- per layer and in total: the max and the mean of rel_fro over the quantized tensors, the max of max_row_rel;
- end to end, over every position of every prompt (fp32 logits, our model, no last-position slice),
  computed layer-streamed (skywork_deploy/reference.py: about one fp32 layer in memory, so 7B/32B work):
  max_abs_diff of logits, top1_agreement (share of positions whose argmax agrees), mean_kl =
  mean KL(softmax(original) || softmax(quantized)) in nats; plus bit_identical_to_in_memory: the quantized
  folder's logits equal (torch.equal) those of the original model quantized in memory with `quantize(bits)`
  with whole fp32 models (`load_model(...).quantize(bits)`), so only up to EVAL_WHOLE_MAX_PARAMS parameters
  (None above; `bit_identical_check` says so).

The verdict (`end_to_end.passed`) is measured against stated thresholds (`end_to_end.thresholds`):
top1_agreement >= MIN_TOP1 and mean_kl <= MAX_KL, both against the original model on the fixed prompts.
Defaults for weight-only per-channel int8 (W8A16), which should be close to lossless: 0.97 lets one greedy
token in ~50 positions flip at a near-tie (random-init models have near-flat logits), and 0.01 nats is
about ten times what W8A16 costs a real model's next-token distribution while 4-bit weights typically cost
more than that. Stricter or looser gates: `--min-top1` / `--max-kl` (build.yaml `quantize.min_top1/max_kl`).
"""
import gc
import math

from ..base.errors import ValidationError
from ..base.spec import ModelSpec, tokenizer_files

EVAL_WHOLE_MAX_PARAMS = 1_000_000_000  # up to this, bit-identity is also checked on whole fp32 models
MIN_TOP1 = 0.97  # default gate: share of positions whose greedy token is unchanged by quantization
MAX_KL = 0.01  # default gate: mean KL(original || quantized) over the positions, nats

DEFINITIONS = {
    "rel_fro": "||W - deq(Q)||_F / ||W||_F per tensor, deq(Q) = Q * scale[:, None] in fp32",
    "max_row_rel": "max |W - deq(Q)| / absmax(row of W) per tensor; <= 0.5/127 for 8 bits, except rows "
                   "with absmax < 127 * float32 tiny, which become zeros (1.0)",
    "rel_fro_max/rel_fro_mean": "max / mean of rel_fro over the quantized tensors of the layer or model",
    "bytes_before/bytes_after": "tensor data bytes in the source / output safetensors (headers excluded)",
    "end_to_end": "fp32 logits at every prompt position, layer-streamed: original vs quantized folder (max "
                  "abs diff, top-1 agreement, mean KL(original || quantized) in nats)",
}
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Solve for x: 2x + 3 = 11. First, subtract 3 from both sides",
    "人工智能的未来是",
)


def _sum_sq(x):
    """Sum of squares of a 2-D fp32 tensor: row norms in fp32 (one fast pass), float64 again only when a
    row overflows fp32 or comes out 0 (outliers beyond ~1e19, rows of zeros or of values too tiny to square)."""
    import torch

    rows = torch.linalg.vector_norm(x, dim=1)  # (rows,)
    if bool(((rows > 0) & torch.isfinite(rows)).all()):
        return float(rows.double().square().sum())
    return float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2


def _row_absmax(x):
    import torch

    lo, hi = torch.aminmax(x, dim=1)  # (rows,) each
    return torch.maximum(hi, -lo)


class WeightError:
    """Accumulates the error of one quantized tensor over its row chunks."""

    def __init__(self):
        self.err_sq, self.ref_sq, self.max_row_rel, self.shape_rows = 0.0, 0.0, 0.0, 0

    def update(self, w, q, scale):
        import torch

        w = w.to(torch.float32)  # (rows, in)
        diff = q.to(torch.float32).mul_(scale.to(torch.float32)[:, None]).sub_(w)  # (rows, in): dequantized - w
        self.err_sq += _sum_sq(diff)
        self.ref_sq += _sum_sq(w)
        absmax = _row_absmax(w)  # (rows,)
        row_err = _row_absmax(diff)  # (rows,)
        rel = torch.where(absmax > 0, row_err / torch.where(absmax > 0, absmax, 1.0), 0.0)
        if rel.numel():
            self.max_row_rel = max(self.max_row_rel, float(rel.max()))
        self.shape_rows += w.shape[0]

    @property
    def rel_fro(self):
        return math.sqrt(self.err_sq / self.ref_sq) if self.ref_sq > 0 else 0.0


def _summary(plans, errors):
    rel = [errors[p.out_name].rel_fro for p in plans if p.quantize]
    row = [errors[p.out_name].max_row_rel for p in plans if p.quantize]
    return {
        "tensors": len(plans), "quantized": len(rel),
        "bytes_before": sum(p.source_bytes for p in plans if p.out_name == p.name),
        "bytes_after": sum(p.out_bytes for p in plans),
        "rel_fro_max": max(rel, default=0.0), "rel_fro_mean": sum(rel) / len(rel) if rel else 0.0,
        "max_row_rel": max(row, default=0.0),
    }


def build_report(plans, errors):
    """{definitions, layers: [...], total, tensors: {name: ...}} from the plans and their WeightErrors."""
    groups = {}
    for p in plans:
        groups.setdefault(p.group, []).append(p)
    order = sorted((g for g in groups if g != "other"), key=int) + (["other"] if "other" in groups else [])
    layers = [{"layer": g, **_summary(groups[g], errors)} for g in order]
    tensors = {p.out_name: {"source": p.name, "shape": list(p.shape), "source_dtype": p.dtype,
                            "rel_fro": errors[p.out_name].rel_fro, "max_row_rel": errors[p.out_name].max_row_rel}
               for p in plans if p.quantize}
    return {"definitions": DEFINITIONS, "layers": layers, "total": _summary(plans, errors), "tensors": tensors}


def prompt_ids(folder, vocab_size):
    """Token ids of the fixed prompts with the folder's tokenizer (fixed ids when it has none)."""
    try:
        from transformers import AutoTokenizer

        tokenizer_files(folder)  # raises when the folder has none (AutoTokenizer would build an empty one)
        tok = AutoTokenizer.from_pretrained(str(folder))
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
        source = "tokenizer"
    except Exception:  # no or unreadable tokenizer: the check still runs on fixed ids
        ids = [[(7919 * (i + 1) + 104729 * j) % vocab_size for j in range(12)] for i in range(len(PROMPTS))]
        source = "fixed ids"
    return [[t for t in seq if t < vocab_size] or [0] for seq in ids], source


def _logits(model, prompts):
    import torch

    with torch.no_grad():
        out = [model(torch.tensor([ids]), iter_num=0, use_cache=False).logits[0] for ids in prompts]  # (S, V)
    return torch.cat(out, dim=0)  # (positions, V)


def compare_logits(ref, got):
    """max_abs_diff, top1_agreement, mean_kl, cosine of two (positions, V) fp32 logit tensors."""
    import torch

    from ..base.agreement import logit_agreement

    m = logit_agreement(got.numpy(), ref.numpy())
    return {"positions": ref.shape[0], "max_abs_diff": m["max_abs_diff"], "top1_agreement": m["top1_agreement"],
            "mean_kl": m["kl_mean"], "min_cosine": m["cosine_min"], "exact": bool(torch.equal(ref, got))}


def _streamed(folder, prompts, desc, **quantize):
    """(positions, V) fp32 logits of every prompt position, the prompts left-padded into one batch."""
    import torch

    from ..base.reference import streamed_logits

    width = max(len(ids) for ids in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)  # (B, S)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, seq in enumerate(prompts):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = streamed_logits(folder, [(ids, mask, pos)], desc=desc, **quantize)[0]  # (B, S, V)
    return torch.cat([logits[row, width - len(seq):] for row, seq in enumerate(prompts)], dim=0)


def _whole_in_memory_vs_folder(model_folder, quant_folder, prompts, bits, include_lm_head):
    """(in-memory quantize(bits) logits, quantized folder logits) with whole fp32 models, one at a time."""
    from ..base.modeling import load_model

    model = load_model(model_folder, "fp32", insert_slice=False)
    model.quantize(bits, include_lm_head=include_lm_head)
    in_memory = _logits(model, prompts)
    del model
    gc.collect()
    model = load_model(quant_folder, "fp32", insert_slice=False)
    quantized = _logits(model, prompts)
    del model
    gc.collect()
    return in_memory, quantized


def evaluate(model_folder, quant_folder, bits, include_lm_head, whole_max_params=None, max_prompts=None,
             subset=None):
    """Original vs quantized folder on the fixed prompts, layer-streamed (about one fp32 layer in memory).

    `max_prompts`: only that many of the shortest prompts (the report's `prompt_subset` says why: `subset`).

    Bit-identity to the in-memory `quantize(bits)` needs whole fp32 models: checked up to `whole_max_params`
    parameters (default EVAL_WHOLE_MAX_PARAMS), reported as not run above.
    """
    import torch

    spec = ModelSpec.from_folder(model_folder)
    whole_max_params = EVAL_WHOLE_MAX_PARAMS if whole_max_params is None else whole_max_params
    prompts, source = prompt_ids(model_folder, spec.vocab_size)
    if max_prompts:
        prompts = sorted(prompts, key=len)[:max_prompts]
    original = _streamed(model_folder, prompts, "check: original")
    quantized = _streamed(quant_folder, prompts, "check: quantized")
    result = compare_logits(original, quantized)
    result.pop("exact")
    result.update(prompts=len(prompts), prompt_source=source, method="layer-streamed",
                  **({"prompt_subset": subset} if max_prompts else {}))
    if spec.num_parameters > whole_max_params:
        result.update(bit_identical_to_in_memory=None, bit_identical_check=(
            f"not run above {whole_max_params / 1e9:g}B parameters (needs the whole fp32 model)"))
        return result
    in_memory, loaded = _whole_in_memory_vs_folder(model_folder, quant_folder, prompts, bits, include_lm_head)
    result.update(bit_identical_to_in_memory=bool(torch.equal(in_memory, loaded)),
                  bit_identical_check="whole fp32 models: load_model(original).quantize(bits) vs "
                                      "load_model(quantized folder)",
                  streamed_vs_whole_max_diff=float((loaded - quantized).abs().max()))
    if not result["bit_identical_to_in_memory"]:
        diff = float((in_memory - loaded).abs().max())
        raise ValidationError(f"{quant_folder}: logits of the quantized folder differ from the in-memory "
                              f"quantize({bits}) by up to {diff:.3g} (expected bit-identical; please report it)")
    return result


def check_thresholds(e2e, min_top1=None, max_kl=None):
    """Add `thresholds`, `passed` and `failures` to an end-to-end result; raise nothing (the caller decides).

    A check that was skipped stays as it is: unjudged, no `passed` key.
    """
    min_top1 = MIN_TOP1 if min_top1 is None else float(min_top1)
    max_kl = MAX_KL if max_kl is None else float(max_kl)
    if not 0.0 <= min_top1 <= 1.0 or max_kl < 0:
        from ..base.errors import ConfigError

        raise ConfigError(f"--min-top1 {min_top1} / --max-kl {max_kl}: min-top1 must be in [0, 1] and max-kl >= 0")
    if "skipped" in e2e:
        return e2e
    e2e["thresholds"] = {"min_top1": min_top1, "max_kl": max_kl}
    failures = []
    if not e2e["top1_agreement"] >= min_top1:
        failures.append(f"top-1 agreement {e2e['top1_agreement']:.1%} < --min-top1 {min_top1:.1%}")
    if not e2e["mean_kl"] <= max_kl:  # `not <=`: a NaN KL fails
        failures.append(f"mean KL {e2e['mean_kl']:.3g} nats > --max-kl {max_kl:g}")
    e2e.update(passed=not failures, failures=failures)
    return e2e


def threshold_error(folder, e2e):
    """The ValidationError for a result whose thresholds failed (None when it passed or was not checked)."""
    if e2e.get("passed") is not False:
        return None
    return ValidationError(f"{folder}: the quantized model is outside the accuracy thresholds on its check: "
                           f"{'; '.join(e2e['failures'])} (nothing written; loosen --min-top1 / --max-kl only "
                           "if that accuracy is acceptable)")


def verdict_text(e2e):
    """`validated (...)`, `FAILED (...)` or `skipped (why)` for the end-to-end check."""
    if not e2e or "skipped" in e2e:
        return f"skipped ({(e2e or {}).get('skipped', 'no end-to-end check')})"
    t = e2e.get("thresholds") or {}
    figures = (f"top-1 {e2e['top1_agreement']:.1%} >= {t.get('min_top1', MIN_TOP1):.0%}, mean KL "
               f"{e2e['mean_kl']:.2g} <= {t.get('max_kl', MAX_KL):g} nats")
    if e2e.get("passed") is False:
        return f"FAILED ({'; '.join(e2e['failures'])})"
    return f"validated ({figures})" if e2e.get("passed") else f"measured, not gated ({figures})"


def _mb(n):
    return f"{n / 1e6:,.1f}"


def format_table(report):
    """The report as a plain-text table (one row per layer, then other tensors, then the total)."""
    head = f"{'layer':>6} {'tensors':>7} {'MB before':>10} {'MB after':>9} {'ratio':>6} " \
           f"{'rel_fro max':>11} {'rel_fro mean':>12} {'max_row_rel':>11}"
    lines = [head, "-" * len(head)]
    for row in report["layers"] + [{"layer": "total", **report["total"]}]:
        ratio = row["bytes_after"] / row["bytes_before"] if row["bytes_before"] else 0.0
        lines.append(f"{row['layer']:>6} {row['tensors']:>7} {_mb(row['bytes_before']):>10} "
                     f"{_mb(row['bytes_after']):>9} {ratio:>6.3f} {row['rel_fro_max']:>11.3e} "
                     f"{row['rel_fro_mean']:>12.3e} {row['max_row_rel']:>11.3e}")
    e2e = report.get("end_to_end") or {}
    if "skipped" in e2e:
        lines.append(f"end to end: skipped ({e2e['skipped']})")
    elif e2e:
        lines.append(f"end to end ({e2e['prompts']} prompts"
                     f"{' (' + e2e['prompt_subset'] + ')' if e2e.get('prompt_subset') else ''}, "
                     f"{e2e['positions']} positions, fp32"
                     f"{', ' + e2e['method'] if e2e.get('method') else ''}): "
                     f"max |dlogit| {e2e['max_abs_diff']:.4g}, top-1 agreement {e2e['top1_agreement']:.1%}, "
                     f"mean KL {e2e['mean_kl']:.3g} nats, min cosine {e2e['min_cosine']:.6f}, "
                     f"bit-identical to in-memory quantize: "
                     f"{ {True: 'yes', False: 'no', None: 'not checked'}[e2e['bit_identical_to_in_memory']]}")
    if e2e:
        lines.append(f"accuracy verdict: {verdict_text(e2e)}")
    return "\n".join(lines)
