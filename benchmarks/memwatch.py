"""Run a command and report the peaks of its process tree's anonymous and file-backed resident memory.

    python benchmarks/memwatch.py [--heavy] [--out FILE.json] -- CMD ...

RssAnon (heap, arenas, copies of weights) cannot be reclaimed without swap; RssFile (mmapped files such as
safetensors shards or ONNX external data read through a mapping) is page cache the kernel can drop under
pressure. /proc/PID/status is polled every 50 ms over the whole tree; the peak of each field, and of their
sum, is reported, with the kernel's exact high-water mark from /usr/bin/time -v. `--heavy` waits for the
machine-wide lock (benchmarks/measure.py HEAVY_LOCK) first; the wait is not timed.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import GNU_TIME, HEAVY_LOCK  # noqa: E402

FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def _status(pid):
    out = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for field in FIELDS:
        m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
        if m:
            out[field] = int(m.group(1)) * 1024
    return out


def _tree(ps):
    try:
        return [ps] + ps.children(recursive=True)
    except psutil.Error:
        return [ps]


def watch(cmd, heavy=False, interval=0.05, env=None):
    """{rc, wall_s, peak: {field: bytes}, peak_at_s: {...}, time_max_rss_bytes, stdout, stderr_tail}."""
    with tempfile.TemporaryDirectory() as tmp:
        started, time_file = Path(tmp) / "started", Path(tmp) / "time.txt"
        inner = [GNU_TIME, "-v", "-o", str(time_file)] + [str(c) for c in cmd]
        if heavy and os.path.isdir(os.path.dirname(HEAVY_LOCK)):
            inner = ["flock", HEAVY_LOCK, "sh", "-c", f'touch "{started}" && exec "$@"', "sh"] + inner
        else:
            started.touch()
        out_f, err_f = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        proc = subprocess.Popen(inner, stdout=out_f, stderr=err_f, text=True, env=env)
        ps = psutil.Process(proc.pid)
        peak, peak_at, t0, timeline, last = {f: 0 for f in FIELDS + ("anon+file",)}, {}, None, [], -1.0
        while proc.poll() is None:
            if t0 is None and started.exists():
                t0 = time.perf_counter()
            if t0 is not None:
                total = {f: 0 for f in FIELDS}
                for p in _tree(ps):
                    for f, v in _status(p.pid).items():
                        total[f] += v
                total["anon+file"] = total["RssAnon"] + total["RssFile"]
                now = time.perf_counter() - t0
                for f, v in total.items():
                    if v > peak[f]:
                        peak[f], peak_at[f] = v, round(now, 2)
                if now - last >= 1.0:  # coarse timeline: [s, RssAnon, RssFile] once a second
                    timeline.append([round(now, 1), total["RssAnon"], total["RssFile"]])
                    last = now
            time.sleep(interval)
        wall = time.perf_counter() - (t0 or time.perf_counter())
        out_f.seek(0)
        err_f.seek(0)
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_file.read_text()) \
            if time_file.exists() else None
        return {"cmd": [str(c) for c in cmd], "rc": proc.returncode, "wall_s": round(wall, 2), "peak": peak,
                "peak_at_s": peak_at, "timeline": timeline, "time_max_rss_bytes": int(m.group(1)) * 1024 if m else None,
                "stdout": out_f.read(), "stderr_tail": err_f.read()[-3000:]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heavy", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    res = watch(cmd, heavy=args.heavy)
    slim = {k: v for k, v in res.items() if k not in ("stdout", "timeline")}
    print(json.dumps(slim, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
