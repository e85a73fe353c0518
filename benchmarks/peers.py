"""The peers, each run in a subprocess of its own environment and measured from outside.

- Optimum (`benchmarks/.venvs/optimum`): `optimum-cli export onnx --task text-generation-with-past`, then
  ORTModelForCausalLM (transformers' generate over ONNX Runtime).
- ONNX Runtime GenAI (`benchmarks/.venvs/genai`): `python -m onnxruntime_genai.models.builder` in fp32, int8
  or int4 for the CPU provider, then its generator (intra_op_num_threads written into genai_config.json).
- transformers eager generate (this environment): the reference for speed ratios and logits.
- ours (this environment): an exported bundle on our ONNX Runtime backend (skywork_deploy.runtime).

Install the peers with `bash benchmarks/setup_peers.sh`. Every function returns a plain dict; wall time
and peak RSS come from benchmarks/measure.py (process-tree polling and /usr/bin/time -v).
"""
import os
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import folder_bytes, last_json_line, run_measured  # noqa: E402

VENVS = Path(os.environ.get("SKYWORK_BENCH_VENVS", HERE / ".venvs"))
WORKER = HERE / "peer_worker.py"
GENAI_PRECISIONS = ("fp32", "int8", "int4")


def venv_python(name):
    """The python of venv `name` (optimum, genai), or of this process for `main`."""
    if name == "main":
        return sys.executable
    return VENVS / name / "bin" / "python"


def available(name):
    return name == "main" or (VENVS / name / ".installed").is_file()


def _env():
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    return env


def _summary(res, out=None):
    row = {"wall_s": res["wall_s"], "peak_rss_bytes": res["peak_rss_bytes"], "rc": res["rc"], "cmd": res["cmd"]}
    if out is not None and Path(out).exists():
        row["artifact_bytes"] = folder_bytes(out)
    if res["rc"] != 0:
        row["error"] = res["stderr_tail"][-1500:]
    return row


def _fresh(out):
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def optimum_export(ckpt, out, timeout=3600):
    """`optimum-cli export onnx --task text-generation-with-past --model CKPT OUT` (fp32)."""
    out = _fresh(out)
    cli = VENVS / "optimum" / "bin" / "optimum-cli"
    res = run_measured([cli, "export", "onnx", "--task", "text-generation-with-past", "--model", ckpt, out],
                       env=_env(), timeout=timeout, heavy=True)
    return {"tool": "optimum", "stage": "export", "dtype": "fp32", **_summary(res, out)}


def genai_build(ckpt, out, precision="fp32", timeout=3600):
    """GenAI's model builder from a Hugging Face folder (it reads the tokenizer there too) for the CPU."""
    out = _fresh(out)
    cache = out.parent / (out.name + "-cache")
    res = run_measured([venv_python("genai"), "-m", "onnxruntime_genai.models.builder", "-i", ckpt, "-o", out,
                        "-p", precision, "-e", "cpu", "-c", cache], env=_env(), timeout=timeout, heavy=True)
    shutil.rmtree(cache, ignore_errors=True)
    return {"tool": "genai", "stage": "export", "dtype": precision, **_summary(res, out)}


def run_worker(backend, model_dir, logits_out=None, venv=None, threads=2, prompt_lens=(128, 1024),
               new_tokens=64, repeats=3, seed=0, extra=(), timeout=7200):
    """Decode/prefill timings (+ logits of the fixed prompt) of one backend, in its environment."""
    venv = venv or {"hf": "main", "ours": "main", "optimum": "optimum", "genai": "genai"}[backend]
    cmd = [venv_python(venv), WORKER, "--backend", backend, "--model", model_dir, "--threads", threads,
           "--prompt-lens", ",".join(str(p) for p in prompt_lens), "--new-tokens", new_tokens,
           "--repeats", repeats, "--seed", seed, *extra]
    if logits_out:
        cmd += ["--logits-out", logits_out]
    res = run_measured(cmd, env=_env(), timeout=timeout, heavy=True)
    parsed = last_json_line(res["stdout"]) if res["rc"] == 0 else None
    row = {"wall_s": res["wall_s"], "peak_rss_bytes": res["peak_rss_bytes"], "rc": res["rc"], "cmd": res["cmd"]}
    if parsed is None:
        row["error"] = (res["stderr_tail"] or res["stdout"][-1500:])[-1500:]
        return row
    row.update(parsed)
    return row


def compare_logits(ref_path, other_path):
    """Max |diff|, cosine (min over positions), top-1 agreement and mean KL(ref || other), in float64.

    Compares the positions both files hold: all of them, or the last one when a graph returns only that.
    """
    from skywork_deploy.base.agreement import logit_agreement

    ref, other = np.load(ref_path), np.load(other_path)
    n = min(len(ref), len(other))
    m = logit_agreement(other[-n:], ref[-n:])
    return {"max_abs_diff": m["max_abs_diff"], "cosine_min": m["cosine_min"], "top1": m["top1_agreement"],
            "kl_mean": m["kl_mean"], "positions": n}
