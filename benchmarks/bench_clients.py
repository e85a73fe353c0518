"""Third-party clients against `skywork-deploy serve`: lm-evaluation-harness and evalscope, in a venv of their own.

1. A venv `benchmarks/.venvs/clients` (system site packages, so torch is not downloaded again) gets the pinned
   `lm-eval` and `evalscope[perf]` from PyPI (once).
2. The demo model's fp32 export (or `--bundle`) is served by a real `skywork-deploy serve --json` process on a
   loopback port.
3. lm-eval `local-completions` runs two tiny local tasks made from `skywork_deploy/demo_model/heldout.jsonl`:
   `heldout_ll` (loglikelihood of " answer" after the chat-formatted problem: token-array prompts, echo,
   logprobs) and `heldout_gen` (generate_until, exact match of the last number). Each loglikelihood is then
   computed in-process from the same bundle (`skywork_deploy.runtime.score.loglikelihood`, the tokens split as
   lm-eval's `_encode_pair` splits them): the figure is the largest difference per continuation token
   (target <= 1e-4 nats).
4. `evalscope perf` (random prompts from the bundle's tokenizer, min_tokens = max_tokens) at parallel 1 and 4.

Run: python benchmarks/bench_clients.py   (writes benchmarks/results/clients.json; light: the demo model)
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venvs" / "clients"
PINS = ["lm-eval[api]==0.4.13", "evalscope[perf]==1.14.1"]
RESULTS = HERE / "results" / "clients.json"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "NO_PROXY": "127.0.0.1,localhost"}


def ensure_venv():
    py = VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(VENV)], check=True)
    probe = subprocess.run([str(py), "-c", "import lm_eval, evalscope, tenacity"], capture_output=True)
    if probe.returncode:
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PINS], check=True)
    return VENV / "bin"


def prepare_bundle(workdir):
    from skywork_deploy.demo_model import demo_model_path
    from skywork_deploy.export import export_model

    out = Path(workdir) / "demo-fp32"
    if not (out / "skywork_deploy_manifest.json").is_file():
        export_model(demo_model_path(), out, dtype="fp32", simplify=False, overwrite=True)
    return out


def start_server(bundle, threads):
    proc = subprocess.Popen([sys.executable, "-m", "skywork_deploy", "serve", str(bundle), "--port", "0",
                             "--threads", str(threads), "--max-batch", "8", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=ENV)
    ready = json.loads(proc.stdout.readline())
    return proc, ready["url"], ready["model"]


def chat_prefix(tokenizer, problem):
    """The chat-formatted prompt the demo model was trained on, as text (its control tokens stay control tokens
    in a completions prompt)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": problem}], add_generation_prompt=True,
                                         tokenize=False)


def write_tasks(folder, tokenizer, limit):
    from skywork_deploy.demo_model import heldout_path

    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in heldout_path().read_text().splitlines()[:limit]]
    data = folder / "heldout.jsonl"
    data.write_text("".join(json.dumps({**r, "prompt": chat_prefix(tokenizer, r["problem"])}) + "\n" for r in rows))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
              "doc_to_text: \"{{prompt}}\"\n")
    (folder / "heldout_ll.yaml").write_text(
        "task: heldout_ll\n" + common + "output_type: loglikelihood\ndoc_to_target: \" {{answer}}\"\n"
        "metric_list:\n  - metric: acc\n")
    (folder / "heldout_gen.yaml").write_text(
        "task: heldout_gen\n" + common + "output_type: generate_until\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"<｜end▁of▁sentence｜>\"]\n  max_gen_toks: 160\n"
        "filter_list:\n  - name: last_number\n    filter:\n      - function: regex\n"
        "        regex_pattern: \"(-?[0-9]+)(?!.*[0-9])\"\n      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n")
    return rows


def run_lm_eval(bin_dir, url, model, bundle, tasks, out):
    args = [str(bin_dir / "lm-eval"), "run", "--model", "local-completions", "--model_args",
            f"model={model},base_url={url}/completions,tokenizer_backend=huggingface,tokenizer={bundle},"
            "num_concurrent=2,max_retries=1,max_length=512",
            "--tasks", "heldout_ll,heldout_gen", "--include_path", str(tasks), "--output_path", str(out),
            "--log_samples", "--batch_size", "1"]
    t0 = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=ENV)
    if done.returncode:
        raise SystemExit(f"lm-eval failed ({done.returncode}):\n{done.stderr[-3000:]}")
    results = json.loads(next(Path(out).rglob("results_*.json")).read_text())
    samples = {name: [json.loads(line) for line in next(Path(out).rglob(f"samples_{name}_*.jsonl")).read_text()
                      .splitlines()] for name in ("heldout_ll", "heldout_gen")}
    return {"command": " ".join(args), "seconds": time.perf_counter() - t0, "results": results["results"]}, samples


def encode_pair(tokenizer, context, continuation):
    """lm-eval's TemplateLM._encode_pair for a causal model with the huggingface tokenizer backend."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


def compare_loglikelihoods(bundle, samples, threads):
    """Each lm-eval loglikelihood (through serve) against the in-process score of the same tokens."""
    from skywork_deploy.runtime.backends import make_backend
    from skywork_deploy.runtime.bundle import load_tokenizer, open_bundle
    from skywork_deploy.runtime.score import loglikelihood

    b = open_bundle(bundle)
    tokenizer, backend = load_tokenizer(b), make_backend("onnxruntime", b, threads=threads)
    rows = []
    for s in samples:
        context, continuation = s["arguments"]["gen_args_0"]["arg_0"], s["arguments"]["gen_args_0"]["arg_1"]
        ctx, cont = encode_pair(tokenizer, context, continuation)
        ours, greedy = loglikelihood(backend, ctx, cont)
        served, served_greedy = s["resps"][0][0]  # lm-eval logs them as strings: ["-76.97", "False"]
        rows.append({"doc": s["doc_id"], "tokens": len(cont), "served": float(served), "in_process": ours,
                     "per_token_diff": abs(float(served) - ours) / len(cont),
                     "greedy_agrees": (str(served_greedy) == "True") == greedy})
    return {"docs": len(rows), "max_diff_nats_per_token": max(r["per_token_diff"] for r in rows),
            "greedy_flags_agree": all(r["greedy_agrees"] for r in rows), "rows": rows}


def run_evalscope(bin_dir, url, model, bundle, out, parallel=(1, 4), tokens=32):
    args = [str(bin_dir / "evalscope"), "perf", "--url", f"{url}/chat/completions", "--api", "openai", "--model",
            model, "--parallel", *map(str, parallel), "--number", *[str(2 * p) for p in parallel],
            "--dataset", "random", "--tokenizer-path", str(bundle), "--min-prompt-length", "64",
            "--max-prompt-length", "64", "--max-tokens", str(tokens), "--min-tokens", str(tokens),
            "--outputs-dir", str(out), "--stream", "--no-test-connection"]
    t0 = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=ENV)
    summaries = [json.loads(p.read_text()) for p in sorted(Path(out).rglob("benchmark_summary.json"))]
    return {"command": " ".join(args), "exit_code": done.returncode, "seconds": time.perf_counter() - t0,
            "summaries": summaries, "log_tail": (done.stdout + done.stderr)[-2500:]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/bench_clients")
    ap.add_argument("--bundle", default=None, help="an export bundle (default: the demo model's fp32 export)")
    ap.add_argument("--limit", type=int, default=40, help="held-out problems per lm-eval task")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    from skywork_deploy.runtime.bundle import load_tokenizer, open_bundle

    bin_dir = ensure_venv()
    work = Path(args.workdir)
    bundle = Path(args.bundle) if args.bundle else prepare_bundle(work)
    tokenizer = load_tokenizer(open_bundle(bundle))
    write_tasks(work / "tasks", tokenizer, args.limit)
    proc, url, model = start_server(bundle, args.threads)
    try:
        lm_eval, samples = run_lm_eval(bin_dir, url, model, bundle, work / "tasks", work / f"lm-eval-{time.time():.0f}")
        perf = run_evalscope(bin_dir, url, model, bundle, work / f"evalscope-{time.time():.0f}")
    finally:
        proc.terminate()
        drained = proc.wait(60)
    scores = compare_loglikelihoods(bundle, samples["heldout_ll"], args.threads)
    result = {"bundle": str(bundle), "model": model, "pins": PINS, "lm_eval": lm_eval,
              "loglikelihood_vs_in_process": scores, "evalscope_perf": perf, "serve_exit_code": drained,
              "command": "python benchmarks/bench_clients.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({"lm_eval": lm_eval["results"], "max_diff_nats_per_token": scores["max_diff_nats_per_token"],
                      "greedy_flags_agree": scores["greedy_flags_agree"], "evalscope_exit": perf["exit_code"],
                      "serve_exit": drained}, indent=2))


if __name__ == "__main__":
    main()
