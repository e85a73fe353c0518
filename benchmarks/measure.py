"""The benchmarks' shared helpers: measure a command from outside, write synthetic checkpoints.

Measuring: wall time and peak resident memory of a command's whole process tree.

Peak RSS is taken two ways and the larger is reported:
- polling: psutil sums the RSS of the process and all its descendants every `interval` seconds;
- /usr/bin/time -v (when present): the kernel's exact high-water mark of the largest single process,
  which catches spikes shorter than the polling interval.
Also: the memory bandwidth of this machine (numpy large-array copy), for the decode-speed bound, and
`write_checkpoint`, a random bf16 Qwen2 checkpoint in a synth preset's shape written tensor by tensor
(bench_quantize, bench_export, run_all).
"""
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

GNU_TIME = "/usr/bin/time"
HEAVY_LOCK = "/tmp/team/heavy.lock"
SHARD_BYTES = 2 * 10**9


def _tree_rss(proc):
    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _has_gnu_time():
    if not os.access(GNU_TIME, os.X_OK):
        return False
    probe = subprocess.run([GNU_TIME, "-v", "true"], capture_output=True, text=True)
    return "Maximum resident set size" in probe.stderr


def run_measured(cmd, env=None, cwd=None, timeout=None, log_path=None, interval=0.05, heavy=False):
    """Run `cmd` (a list); return {"rc", "wall_s", "peak_rss_bytes", "poll_peak_bytes", "time_peak_bytes",
    "stdout", "stderr_tail", "cmd"}.

    `heavy=True` wraps the command in `flock /tmp/team/heavy.lock` (this machine is shared; only one
    heavy job at a time). The wait for the lock is not counted: time starts once the lock is held.
    SKYWORK_BENCH_NO_LOCK=1 skips the lock (smoke runs on tiny models).
    """
    cmd = [str(c) for c in cmd]
    with tempfile.TemporaryDirectory() as tmp:
        time_file = Path(tmp) / "time.txt"
        started_file = Path(tmp) / "started"
        inner = cmd
        use_time = _has_gnu_time()
        if use_time:
            inner = [GNU_TIME, "-v", "-o", str(time_file)] + inner
        if heavy and os.path.exists(os.path.dirname(HEAVY_LOCK)) and not os.environ.get("SKYWORK_BENCH_NO_LOCK"):
            # `touch` marks the moment the lock is held, so waiting for it is not measured.
            inner = ["flock", HEAVY_LOCK, "sh", "-c", f'touch {shlex.quote(str(started_file))} && exec "$@"',
                     "sh"] + inner
        else:
            started_file.touch()
        out_f = open(log_path, "w") if log_path else tempfile.TemporaryFile("w+")
        err_f = tempfile.TemporaryFile("w+")
        t_submit = time.perf_counter()
        proc = subprocess.Popen(inner, env=env, cwd=cwd, stdout=out_f if log_path else subprocess.PIPE,
                                stderr=err_f, text=True)
        ps = psutil.Process(proc.pid)
        peak, t0, stdout_chunks = 0, None, []
        while True:
            if t0 is None and started_file.exists():
                t0 = time.perf_counter()
            if t0 is not None:
                peak = max(peak, _tree_rss(ps))
            if proc.poll() is not None:
                break
            if timeout and t0 is not None and time.perf_counter() - t0 > timeout:
                _kill_tree(ps)
                proc.wait()
                break
            time.sleep(interval)
        t1 = time.perf_counter()
        stdout = proc.stdout.read() if proc.stdout else ""
        if log_path:
            out_f.close()
            stdout = Path(log_path).read_text(errors="replace")
        err_f.seek(0)
        stderr = err_f.read()
        err_f.close()
        time_peak = 0
        if use_time and time_file.exists():
            m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_file.read_text())
            if m:
                time_peak = int(m.group(1)) * 1024
        return {
            "cmd": shlex.join(cmd), "rc": proc.returncode,
            "wall_s": round(t1 - (t0 if t0 is not None else t_submit), 3),
            "peak_rss_bytes": max(peak, time_peak), "poll_peak_bytes": peak, "time_peak_bytes": time_peak,
            "stdout": stdout, "stderr_tail": stderr[-3000:],
        }


def _kill_tree(ps):
    for p in ps.children(recursive=True) + [ps]:
        try:
            p.kill()
        except psutil.Error:
            pass


def last_json_line(text):
    """The JSON object `text` is (the CLI's indented `--json`), else its last line that parses as one
    (workers print their result last)."""
    import json

    try:
        whole = json.loads(text)
        if isinstance(whole, dict):
            return whole
    except ValueError:
        pass
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def memory_bandwidth_gbps(size_mb=1024, repeats=5):
    """Copy bandwidth in GB/s (bytes read + bytes written per second), median of `repeats` copies of a
    `size_mb` array. numpy's copy is one thread; a decode step of ORT with 2 threads can draw a little more."""
    import numpy as np

    n = size_mb * (1 << 20) // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch the pages
    speeds = []
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        speeds.append(2 * src.nbytes / (time.perf_counter() - t) / 1e9)
    speeds.sort()
    return speeds[len(speeds) // 2]


def folder_bytes(path):
    """Total size of the regular files under `path`."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tensor_shapes(cfg):
    """[(name, shape)] of a Qwen2 checkpoint in save order."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                   (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.q_proj.bias", (q,)),
                   (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.k_proj.bias", (kv,)),
                   (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.v_proj.bias", (kv,)),
                   (p + "self_attn.o_proj.weight", (h, q)), (p + "mlp.gate_proj.weight", (i, h)),
                   (p + "mlp.up_proj.weight", (i, h)), (p + "mlp.down_proj.weight", (h, i))]
    shapes.append(("model.norm.weight", (h,)))
    if not cfg["tie_word_embeddings"]:
        shapes.append(("lm_head.weight", (v, h)))
    return shapes


def write_checkpoint(folder, preset, layers, seed=0):
    """A random bf16 Qwen2 checkpoint written tensor by tensor into ~2 GB safetensors shards."""
    import torch

    from skywork_deploy.base.synth import PRESETS

    folder.mkdir(parents=True)
    cfg = {**PRESETS[preset], "num_hidden_layers": layers, "architectures": ["Qwen2ForCausalLM"],
           "model_type": "qwen2", "hidden_act": "silu", "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16",
           "use_sliding_window": False, "bos_token_id": 151646, "eos_token_id": 151643}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator().manual_seed(seed)
    shards, buffer, size, largest = [], {}, 0, 0
    for name, shape in tensor_shapes(cfg):
        t = torch.empty(shape, dtype=torch.bfloat16)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        nbytes = t.numel() * 2
        largest = max(largest, nbytes)
        if buffer and size + nbytes > SHARD_BYTES:
            shards.append(_flush(folder, buffer, len(shards)))
            buffer, size = {}, 0
        buffer[name] = t
        size += nbytes
        del t
    shards.append(_flush(folder, buffer, len(shards)))
    names = {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": tensors for i, (tmp, tensors) in
             enumerate(shards)}
    weight_map = {}
    for (tmp, tensors), final in zip(shards, names):
        tmp.rename(folder / final)
        weight_map.update({t: final for t in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return largest


def _flush(folder, buffer, index):
    from safetensors.torch import save_file

    path = folder / f"shard-{index}.tmp"
    save_file(buffer, str(path), metadata={"format": "pt"})
    names = list(buffer)
    buffer.clear()
    return path, names


if __name__ == "__main__":
    res = run_measured(sys.argv[1:])
    print({k: v for k, v in res.items() if k not in ("stdout", "stderr_tail")})
