"""Tables, goal checks and the plot for benchmarks/run_all.py results.

Regenerate the Markdown and PNG from a result file:  python benchmarks/report.py benchmarks/results/DATE.json
Merge the cases of several runs:  python benchmarks/report.py A.json B.json -o benchmarks/results/DATE.json
"""
import json
from pathlib import Path

GIB = 1 << 30
EXPORT_GOAL = 0.5      # our export peak RSS / fp32 weight bytes
QUANTIZE_GOAL = 1.5    # (our quantize peak RSS - library overhead) / largest tensor
DECODE_GOAL = 1.0      # our decode tok/s / fastest peer's, same model and dtype


def _f(x, fmt="{:.1f}", none="-"):
    return none if x is None else fmt.format(x)


def label(row):
    name = f"{row['tool']} {row['dtype']}"
    return name + (f" ({row['variant']})" if row.get("variant") else "")


def _get(row, part, key, length=None):
    value = (row.get(part) or {}).get(key)
    if length is not None and isinstance(value, dict):
        value = value.get(str(length))
    return value


def decode(row, length):
    return _get(row, "run", "decode_tok_s", length)


def case_rows(data, case):
    return [r for r in data["rows"] if r["case"] == case]


def reference(rows):
    return next((r for r in rows if r["tool"].startswith("transformers")), None)


def timing(data, case):
    return data["cases"][case].get("timing") or data["settings"]


def speed_table(data, case):
    stats = data["cases"][case]
    lens = timing(data, case)["prompt_lens"]
    first = str(lens[0])
    bw = data["machine"]["memory_bandwidth_gbps"] * 1e9
    rows = case_rows(data, case)
    ref = reference(rows)
    ref_dec = decode(ref, first) if ref else None
    head = (["tool", "export s", "export peak GiB", "peak / fp32 weights", "artifact GB"]
            + [f"prefill {n} ms" for n in lens] + [f"decode tok/s ({n})" for n in lens]
            + [f"decode vs eager ({first})", "bound tok/s", "% of bound", "max diff", "cos min", "top-1", "KL"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        exp = r.get("export") or {}
        peak = exp.get("peak_rss_bytes")
        per_token = stats["bytes_per_token"].get(r.get("weights") or r["dtype"])
        bound = bw / per_token if per_token else None
        dec = decode(r, first)
        fid = r.get("fidelity") or {}
        cells = [label(r), _f(exp.get("wall_s")), _f(peak and peak / GIB, "{:.2f}"),
                 _f(peak and peak / stats["fp32_weight_bytes"], "{:.2f}x"),
                 _f(exp.get("artifact_bytes") and exp["artifact_bytes"] / 1e9, "{:.2f}")]
        cells += [_f(_get(r, "run", "prefill_ms", n), "{:.0f}") for n in lens]
        cells += [_f(decode(r, n), "{:.2f}") for n in lens]
        cells += [_f(dec and ref_dec and dec / ref_dec, "{:.2f}x"), _f(bound, "{:.1f}"),
                  _f(dec and bound and 100 * dec / bound, "{:.0f}%"),
                  _f(fid.get("max_abs_diff"), "{:.2e}"), _f(fid.get("cosine_min"), "{:.6f}"),
                  _f(fid.get("top1"), "{:.3f}"), _f(fid.get("kl_mean"), "{:.2e}")]
        if r.get("error"):
            cells[0] += " **failed**"
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def pairs(data, case):
    """Ours against each peer of the same dtype, within this run: decode speed and export memory/time."""
    first = str(timing(data, case)["prompt_lens"][0])
    rows = case_rows(data, case)
    ours = [r for r in rows if r["tool"].startswith("ours") and not r.get("error")]
    others = [r for r in rows if not r["tool"].startswith("ours") and not r["tool"].startswith("transformers")
              and not r.get("error")]
    out = []
    for o in ours:
        for p in others:
            if p["dtype"] != o["dtype"]:
                continue
            d_o, d_p = decode(o, first), decode(p, first)
            e_o, e_p = o.get("export") or {}, p.get("export") or {}
            out.append({"ours": label(o), "peer": label(p),
                        "decode_ratio": d_o / d_p if d_o and d_p else None,
                        "export_peak_ratio": (e_o["peak_rss_bytes"] / e_p["peak_rss_bytes"]
                                              if e_o.get("peak_rss_bytes") and e_p.get("peak_rss_bytes") else None),
                        "export_time_ratio": (e_o["wall_s"] / e_p["wall_s"]
                                              if e_o.get("wall_s") and e_p.get("wall_s") else None)})
    return out


def goals(data):
    """[(goal, case, verdict text)] for the issue's goals, with the shortfall where one is missed."""
    out = []
    for case in data["cases"]:
        first = str(timing(data, case)["prompt_lens"][0])
        rows = [r for r in case_rows(data, case) if not r.get("error")]
        for dtype in ("fp32", "int8"):
            ours = [r for r in rows if r["tool"].startswith("ours") and r["dtype"] == dtype and decode(r, first)]
            peers = [r for r in rows if not r["tool"].startswith(("ours", "transformers")) and r["dtype"] == dtype
                     and decode(r, first)]
            if not ours or not peers:
                continue
            best_peer = max(peers, key=lambda r: decode(r, first))
            best_ours = max(ours, key=lambda r: decode(r, first))
            ratio = decode(best_ours, first) / decode(best_peer, first)
            verdict = (f"{label(best_ours)} {decode(best_ours, first):.2f} tok/s vs {label(best_peer)} "
                       f"{decode(best_peer, first):.2f} tok/s = {ratio:.2f}x "
                       + ("(met)" if ratio >= DECODE_GOAL else f"(missed by {100 * (1 - ratio):.0f}%)"))
            out.append((f"decode >= {DECODE_GOAL}x fastest peer, {dtype}", case, verdict))
        stats = data["cases"][case]
        exp = [r for r in rows if r["tool"].startswith("ours") and r["dtype"] == "fp32" and r.get("export")]
        if exp:
            peak = exp[0]["export"]["peak_rss_bytes"]
            ratio = peak / stats["fp32_weight_bytes"]
            net = (peak - data["overhead_bytes"]) / stats["fp32_weight_bytes"]
            alone = exp[0]["export"].get("export_only_peak_rss_bytes")
            # The goal is the export's (trace + weight streaming), as the peers' figures are; the whole
            # command adds our built-in validation (fp32 transformers reference when it fits in memory).
            judged = alone / stats["fp32_weight_bytes"] if alone else ratio
            what = (f"{judged:.2f}x before validation, {ratio:.2f}x whole command with validation" if alone
                    else f"{ratio:.2f}x (whole command, with validation)")
            out.append((f"export peak RSS <= {EXPORT_GOAL}x fp32 weight bytes", case,
                        f"{what}, {net:.2f}x net of the library overhead "
                        + ("(met)" if judged <= EXPORT_GOAL else f"(missed: {judged / EXPORT_GOAL:.1f}x the goal)")))
    for q in data.get("quantize", []):
        stats = data["cases"][q["case"]]
        if q["ours"]["rc"] != 0:
            continue
        net = (q["ours"]["peak_rss_bytes"] - q["overhead_bytes"]) / stats["largest_tensor_bf16_bytes"]
        out.append((f"quantize (peak - overhead) <= {QUANTIZE_GOAL}x largest tensor", q["case"],
                    f"{net:.2f}x " + ("(met)" if net <= QUANTIZE_GOAL else
                                      f"(missed by {100 * (net / QUANTIZE_GOAL - 1):.0f}%)")))
    return out


def quantize_table(data):
    lines = ["| case | layers | largest tensor GB | ours peak GiB | ours s | (peak - overhead) / largest | "
             "load-everything peak GiB | load-everything s |", "|---|---|---|---|---|---|---|---|"]
    for q in data.get("quantize", []):
        stats = data["cases"][q["case"]]
        o, b = q["ours"], q["load_everything"]
        lines.append(f"| {q['case']} | {stats['layers']} | {stats['largest_tensor_bf16_bytes'] / 1e9:.2f} | "
                     f"{o['peak_rss_bytes'] / GIB:.2f} | {o['wall_s']:.0f} | "
                     f"{(o['peak_rss_bytes'] - q['overhead_bytes']) / stats['largest_tensor_bf16_bytes']:.2f}x | "
                     f"{b['peak_rss_bytes'] / GIB:.2f} | {b['wall_s']:.0f} |")
    return lines


def markdown(data, notes=None):
    m, s = data["machine"], data["settings"]
    lines = [f"# Benchmarks, {data['date']}", "",
             f"Command: `{data['command']}`. Machine: {m['cores']} cores ({m['cpu']}), memory copy bandwidth "
             f"{m['memory_bandwidth_gbps']:.1f} GB/s (numpy, read + write), load average at start "
             f"{m['load_average_start'][0]:.1f}" + (f", at end {m['load_average_end'][0]:.1f}"
                                                    if m.get("load_average_end") else "") +
             ". The machine is shared with other jobs: compare the ratios within a table, not across runs.",
             f"Settings: {s['threads']} threads, greedy, {s['new_tokens']} new tokens, prompts "
             f"{', '.join(map(str, s['prompt_lens']))} tokens"
             + (f" (7B-layer cases: {s['big_new_tokens']} new tokens, prompts "
                f"{', '.join(map(str, s['big_prompt_lens']))})" if s.get("big_prompt_lens") else "")
             + f", medians of {s['repeats']} runs. "
             "Versions: " + "; ".join(f"{k}: " + ", ".join(f"{a} {b}" for a, b in v.items())
                                      for k, v in data.get("versions", {}).items()) + ".",
             "", "Columns: export = Optimum's `optimum-cli export onnx`, GenAI's model builder, our "
             "`skywork-deploy export`; peak RSS of the whole process tree. `bound tok/s` = memory bandwidth / "
             "weight bytes read per token (our int8 keeps lm_head in fp32 except in rows marked 'lm_head int8'; "
             "GenAI's int8 and int4 quantize every MatMul including lm_head, in blocks of 32 with fp32 scales). "
             "Fidelity: logits of a fixed 32-token prompt (every position) against transformers eager fp32: max |diff|, minimum cosine, top-1 agreement, "
             "mean KL(ref || row). Random-init models have flat logits, so top-1 under quantization looks worse "
             "than it would on a trained model.", ""]
    for case, stats in data["cases"].items():
        lines += [f"## {case}: {stats['layers']} layers, {stats['parameters'] / 1e9:.2f} G parameters, "
                  f"fp32 weights {stats['fp32_weight_bytes'] / 1e9:.2f} GB", ""]
        lines += speed_table(data, case) + [""]
        ps = pairs(data, case)
        if ps:
            lines += ["Pair by pair (ours / peer, same run; decode > 1 = we are faster, memory/time < 1 = we "
                      "use less):", "", "| ours | peer | decode | export peak RSS | export time |",
                      "|---|---|---|---|---|"]
            lines += [f"| {p['ours']} | {p['peer']} | {_f(p['decode_ratio'], '{:.2f}x')} | "
                      f"{_f(p['export_peak_ratio'], '{:.2f}x')} | {_f(p['export_time_ratio'], '{:.2f}x')} |"
                      for p in ps]
            lines.append("")
        errs = [r for r in case_rows(data, case) if r.get("error")]
        for r in errs:
            lines.append(f"- {label(r)}: {r['error'].strip().splitlines()[-1][:300]}")
        if errs:
            lines.append("")
    if data.get("quantize"):
        lines += ["## Quantize peak RSS: ours (streamed) vs load-everything + quantize(8)", "",
                  f"Overhead (python + torch + safetensors imported): {data['overhead_bytes'] / GIB:.2f} GiB.", ""]
        lines += quantize_table(data) + [""]
    g = goals(data)
    if g:
        lines += ["## Goals", "", "| goal | case | result |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in g]
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def plot(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(data["cases"])
    labels = []
    for r in data["rows"]:
        if label(r) not in labels:
            labels.append(label(r))
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    width = 0.8 / max(1, len(labels))
    bw = data["machine"]["memory_bandwidth_gbps"] * 1e9
    for k, lab in enumerate(labels):
        dec, mem = [], []
        for case in cases:
            row = next((r for r in case_rows(data, case) if label(r) == lab), None)
            first = str(timing(data, case)["prompt_lens"][0])
            dec.append((row and decode(row, first)) or 0)
            peak = row and (row.get("export") or {}).get("peak_rss_bytes")
            mem.append(peak / GIB if peak else 0)
        xs = [i + (k - len(labels) / 2 + 0.5) * width for i in range(len(cases))]
        axes[0].bar(xs, dec, width, label=lab)
        axes[1].bar(xs, mem, width, label=lab)
    for i, case in enumerate(cases):
        stats = data["cases"][case]
        for dtype, style in (("fp32", "--"), ("int8", ":")):
            bound = bw / stats["bytes_per_token"][dtype]
            axes[0].hlines(bound, i - 0.45, i + 0.45, colors="k", linestyles=style, linewidth=1)
        axes[1].hlines(stats["fp32_weight_bytes"] / GIB, i - 0.45, i + 0.45, colors="k", linestyles="--",
                       linewidth=1)
    axes[0].set_yscale("log")
    axes[0].set_title("decode tok/s, shortest prompt (dashed: fp32 bound, dotted: int8 bound)")
    axes[1].set_title("export / build peak RSS GiB (dashed: fp32 weight bytes)")
    for ax in axes:
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases)
    axes[1].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"skywork-deploy vs peers, {data['date']} ({data['settings']['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(parts):
    """Several run_all result files as one (cases, rows and quantize rows concatenated; the first's header).

    Ratios stay meaningful only within one case: each case's rows come from a single run."""
    data = json.loads(json.dumps(parts[0]))
    for other in parts[1:]:
        for case, stats in other["cases"].items():
            data["rows"] = [r for r in data["rows"] if r["case"] != case]
            data["quantize"] = [q for q in data.get("quantize", []) if q["case"] != case]
            data["cases"][case] = stats
        data["rows"] += other["rows"]
        data["quantize"] = data.get("quantize", []) + other.get("quantize", [])
        data.setdefault("merged_from", [parts[0]["date"]]).append(other["date"])
    return data


def write(data, stem):
    """stem.md (with stem.notes.json's lines, if that file exists) and stem.png."""
    stem = Path(stem)
    notes_file = stem.with_suffix(".notes.json")
    notes = json.loads(notes_file.read_text()) if notes_file.is_file() else None
    stem.with_suffix(".md").write_text(markdown(data, notes))
    plot(data, stem.with_suffix(".png"))


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="run_all result files (.json); several are merged by case")
    ap.add_argument("-o", "--out", help="merged result file to write (default: rewrite the first's .md/.png)")
    args = ap.parse_args(argv)
    parts = [json.loads(Path(p).read_text()) for p in args.results]
    data = merge(parts)
    out = Path(args.out or args.results[0])
    if args.out:
        out.write_text(json.dumps(data, indent=1) + "\n")
    write(data, out)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
