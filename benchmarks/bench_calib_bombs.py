"""Peak RSS of `skywork-deploy calib` on decompression bombs we build ourselves (issue 19).

    flock /tmp/team/heavy.lock python benchmarks/bench_calib_bombs.py [--only NAME ...]

Each bomb is written into a temp folder by streaming (the generator never holds the decoded data), then
`skywork-deploy calib` runs on it in a subprocess under `/usr/bin/time -v`; the table gives the compressed
size, the exit code, the first words of the error line and the child's maximum resident set size. The caps
in skywork_deploy/calib/safeio.py must stop every bomb with a one-line error and peak RSS under 1 GiB.
Results: benchmarks/results/calib_bombs.json.
"""
import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "calib_bombs.json"
MiB = 1 << 20
HEADER = b"id,question,A,B,C,D,answer\n"


def _repeat(fh, chunk, total):
    written = 0
    while written < total:
        piece = chunk[: total - written]
        fh.write(piece)
        written += len(piece)


def zip_zeros(path):
    """One C-Eval member: a header, then 1 GiB of zeros on one line (deflates to ~1 MB)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("val/a_val.csv", "w", force_zip64=True) as fh:
        fh.write(HEADER)
        _repeat(fh, b"0" * MiB, 1024 * MiB)
    return "ceval", []


def zip_rows(path):
    """64 members of 15 MiB each, all tiny rows (1.1 M questions a member; C-Eval has 13,948 in all)."""
    row = b"0,q,a,b,c,d,A\n"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(64):
            with zf.open(f"val/s{i:02d}_val.csv", "w") as fh:
                fh.write(HEADER)
                _repeat(fh, row * (MiB // len(row)), 15 * MiB)
    return "ceval", []


def gzip_one_line(path):
    """A C4 shard of one 1 GiB line."""
    with gzip.open(path, "wb", compresslevel=6) as fh:
        fh.write(b'{"text": "')
        _repeat(fh, b"a" * MiB, 1024 * MiB)
    return "c4", []


def gzip_tiny_lines(path):
    """50 M lines of an empty document (a real shard has ~356 K lines)."""
    line = b'{"text": ""}\n'
    with gzip.open(path, "wb", compresslevel=6) as fh:
        _repeat(fh, line * (MiB // len(line)), 50_000_000 * len(line))
    return "c4", []


def gzip_long_docs(path):
    """600 K documents of 1,100 digits (1,100 tokens): every one a window for --seqlen 1024, 2.5x the kept-text
    budget of the scan."""
    line = b'{"text": "' + b"0123456789" * 110 + b'"}\n'
    with gzip.open(path, "wb", compresslevel=6) as fh:
        for _ in range(600_000 // 1000):
            fh.write(line * 1000)
    return "c4", ["--seqlen", "1024", "--nsamples", "8"]


def alpaca_tiny_entries(path):
    """A 127 MiB Alpaca array of 4.3 M empty entries (the real file has 51,760)."""
    entry = b'{"instruction":"","output":""},'
    with open(path, "wb") as fh:
        fh.write(b"[")
        _repeat(fh, entry * (MiB // len(entry)), 127 * MiB)
        fh.write(b'{"instruction":"","output":""}]')
    return "alpaca", []


BOMBS = {"zip-zeros.zip": zip_zeros, "zip-rows.zip": zip_rows, "c4-one-line.json.gz": gzip_one_line,
         "c4-tiny-lines.json.gz": gzip_tiny_lines, "c4-long-docs.json.gz": gzip_long_docs,
         "alpaca-tiny-entries.json": alpaca_tiny_entries}


def run_calib(dataset, source, model, out, extra):
    cmd = ["/usr/bin/time", "-v", sys.executable, "-c", "from skywork_deploy.cli import main; main()",
           "calib", "--dataset", dataset, "--source", str(source), "--model", str(model), "-o", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("\t")
             and "Command exited" not in ln and "Command being timed" not in ln]
    error = next((ln for ln in lines if ln.lower().startswith("error")), "")
    return {"exit_code": proc.returncode, "error": error[:200], "traceback": "Traceback" in proc.stderr,
            "peak_rss_mib": round(rss_kib / 1024, 1), "output_written": Path(out).exists()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="bomb file names to run (default: all)")
    args = parser.parse_args()
    from skywork_deploy.base.synth import make_random_qwen2

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-bombs-") as tmp:
        tmp = Path(tmp)
        model = make_random_qwen2(tmp / "model", preset="tiny", tokenizer=True)
        for name, make in BOMBS.items():
            if args.only and name not in args.only:
                continue
            path = tmp / name
            dataset, extra = make(path)
            row = {"bomb": name, "what": make.__doc__, "dataset": dataset, "bytes_on_disk": path.stat().st_size,
                   **run_calib(dataset, path, model, tmp / f"out-{name}", extra)}
            path.unlink()
            rows.append(row)
            print(f"{name:<26} {row['bytes_on_disk'] / MiB:>8.2f} MiB on disk  exit {row['exit_code']}  "
                  f"peak RSS {row['peak_rss_mib']:>7.1f} MiB  {row['error'][:110]}", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if args.only and RESULTS.is_file():  # a partial run updates its rows and keeps the others
        fresh = {r["bomb"] for r in rows}
        rows = [r for r in json.loads(RESULTS.read_text())["rows"] if r["bomb"] not in fresh] + rows
        rows.sort(key=lambda r: list(BOMBS).index(r["bomb"]))
    RESULTS.write_text(json.dumps({"rows": rows, "limit_mib": 1024}, indent=2) + "\n")
    worst = max(r["peak_rss_mib"] for r in rows)
    print(f"worst peak RSS: {worst:.1f} MiB (limit 1024 MiB); results in {RESULTS}")
    return 0 if worst < 1024 and not any(r["traceback"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
