"""Write the small calibration samples in this folder, deterministically, from text generated here.

    python calibration/make_samples.py            # rewrites c4-sample.json.gz, ceval-exam-sample.zip,
                                                  # alpaca-sample.json (byte-identical on every run)

Nothing is taken from C4, C-Eval or Alpaca: the sentences come from the small grammar below, the C-Eval-style
questions are generated arithmetic, unit, calendar and geometry exercises, and the Alpaca-style records are
generated text-manipulation tasks with computed answers. Only the file formats are the real ones.
`english_documents` is also used by benchmarks/bench_calib.py to build a C4-sized shard.
"""
import gzip
import io
import json
import random
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

SUBJECTS = ("the engineer", "a small team", "our neighbour", "the city council", "every student", "the old mill",
            "a travelling musician", "the research group", "my grandmother", "the harbour master", "a young botanist",
            "the night train", "this compiler", "the village library", "a careful reader", "the weather station")
VERBS = ("repaired", "described", "measured", "painted", "questioned", "carried", "organised", "forgot",
         "recorded", "translated", "visited", "compared", "rebuilt", "explained", "discovered", "borrowed")
OBJECTS = ("the wooden bridge", "an unusual signal", "three maps of the valley", "the winter schedule",
           "a box of letters", "the broken telescope", "several hundred seeds", "the river crossing",
           "an old recipe for bread", "the solar panels", "a list of questions", "the mountain path",
           "two rival theories", "the kitchen garden", "a forgotten melody", "the quarterly report")
ENDINGS = ("before the rain arrived", "with surprising patience", "during the long autumn", "for the first time",
           "after a difficult week", "without asking anyone", "near the eastern gate", "in less than an hour",
           "while the market was closing", "to everyone's relief", "under a pale morning sky",
           "despite the noise", "at the end of the season", "as the committee had planned")
CONNECTORS = ("Meanwhile,", "Later that day,", "In the end,", "Surprisingly,", "As a result,", "Some time later,",
              "According to the notes,", "Nobody expected that", "Even so,", "On the following morning,")


def sentence(rnd):
    parts = [rnd.choice(SUBJECTS), rnd.choice(VERBS), rnd.choice(OBJECTS)]
    if rnd.random() < 0.7:
        parts.append(rnd.choice(ENDINGS))
    if rnd.random() < 0.3:
        parts.insert(0, rnd.choice(CONNECTORS))
        text = " ".join(parts)
    else:
        text = " ".join(parts)
        text = text[0].upper() + text[1:]
    if rnd.random() < 0.15:
        text += f", and the count reached {rnd.randint(2, 9999)}"
    return text + "."


def sentence_pool(n=4000, seed=7):
    rnd = random.Random(seed)
    return [sentence(rnd) for _ in range(n)]


def english_documents(word_counts, seed=0, pool=None):
    """One document per entry of `word_counts` (approximate words), paragraphs separated by \\n."""
    import numpy as np

    pool = pool or sentence_pool()
    words = np.array([len(s.split()) for s in pool])
    rng = np.random.default_rng(seed)
    docs = []
    for target in word_counts:
        k = max(1, int(round(target / words.mean())))
        picks = rng.integers(0, len(pool), k)
        breaks = rng.random(k) < 0.2
        out = []
        for j, p in enumerate(picks):
            out.append(pool[p])
            out.append("\n" if breaks[j] and j < k - 1 else " ")
        docs.append("".join(out[:-1]))
    return docs


def write_jsonl_gz(path, docs, seed=0, compresslevel=9):
    rnd = random.Random(seed)
    lines = []
    for i, text in enumerate(docs):
        stamp = f"2019-{rnd.randint(1, 12):02d}-{rnd.randint(1, 28):02d}T{rnd.randint(0, 23):02d}:" \
                f"{rnd.randint(0, 59):02d}:{rnd.randint(0, 59):02d}Z"
        lines.append(json.dumps({"text": text, "timestamp": stamp, "url": f"https://example.org/sample/{i}"}))
    data = ("\n".join(lines) + "\n").encode("utf-8")
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                                     compresslevel=compresslevel) as fh:
        fh.write(data)


def c4_sample(path):
    rnd = random.Random(1)
    counts = [int(rnd.lognormvariate(4.3, 0.8)) for _ in range(380)]  # median ~75 words
    counts += [900 + 40 * i for i in range(20)]                        # long: 1,100-2,000 tokens
    rnd.shuffle(counts)
    write_jsonl_gz(path, english_documents(counts, seed=1))


# --------------------------------------------------------------------------------------------- C-Eval
def _choices(rnd, answer, spread):
    opts = {answer}
    while len(opts) < 4:
        value = answer + rnd.choice([-1, 1]) * rnd.randint(1, spread)
        if value > 0:
            opts.add(value)
    opts = sorted(opts)
    return [str(o) for o in opts], "ABCD"[opts.index(answer)]


def ceval_rows(subject, n, rnd):
    rows = []
    for _ in range(n):
        if subject == "basic_arithmetic":
            a, b, c = rnd.randint(10, 99), rnd.randint(2, 9), rnd.randint(1, 50)
            q, ans, why = f"计算 {a} × {b} + {c} 的结果是____。", a * b + c, f"先算乘法 {a}×{b}={a * b}，再加 {c}。"
            opts, letter = _choices(rnd, ans, 20)
        elif subject == "unit_conversion":
            km = rnd.randint(2, 90)
            q, ans, why = f"{km} 千米等于多少米？", km * 1000, "1 千米等于 1000 米。"
            opts, letter = _choices(rnd, km * 10, 9)
            opts = [f"{int(o) * 100} 米" for o in opts]
        elif subject == "calendar":
            d, k = rnd.randint(0, 6), rnd.randint(3, 40)
            days = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
            q = f"如果今天是{days[d]}，那么 {k} 天以后是____。"
            right = days[(d + k) % 7]
            others = rnd.sample([x for x in days if x != right], 3)
            opts = sorted(others + [right], key=days.index)
            letter, why = "ABCD"[opts.index(right)], f"{k} 除以 7 余 {k % 7}。"
        elif subject == "plane_geometry":
            w, h = rnd.randint(2, 30), rnd.randint(2, 30)
            q, ans, why = f"一个长 {w} 厘米、宽 {h} 厘米的长方形，周长是多少厘米？", 2 * (w + h), "周长等于 2×(长+宽)。"
            opts, letter = _choices(rnd, ans, 12)
        else:  # number_sequences
            a, step = rnd.randint(1, 20), rnd.randint(2, 9)
            seq = "，".join(str(a + step * i) for i in range(4))
            q, ans, why = f"数列 {seq}，____ 的下一项是多少？", a + step * 4, f"相邻两项相差 {step}。"
            opts, letter = _choices(rnd, ans, 6)
        rows.append((q, opts, letter, why))
    return rows


def ceval_csv(rows, split, bom):
    buf = io.StringIO(newline="")
    import csv

    w = csv.writer(buf, lineterminator="\n")
    head = ["id", "question", "A", "B", "C", "D"] + {"dev": ["answer", "explanation"], "val": ["answer"],
                                                      "test": []}[split]
    w.writerow(head)
    for i, (q, opts, letter, why) in enumerate(rows):
        extra = {"dev": [letter, why], "val": [letter], "test": []}[split]
        w.writerow([i, q, *opts, *extra])
    return buf.getvalue().encode("utf-8-sig" if bom else "utf-8")


CEVAL_SUBJECTS = ("basic_arithmetic", "unit_conversion", "calendar", "plane_geometry", "number_sequences")


def ceval_sample(path):
    rnd = random.Random(2)
    members = []
    for k, subject in enumerate(CEVAL_SUBJECTS):
        for split, n in (("dev", 5), ("val", 90), ("test", 20)):
            data = ceval_csv(ceval_rows(subject, n, rnd), split, bom=(k % 2 == 1))
            members.append((f"{split}/{subject}_{split}.csv", data))
    write_zip(path, members)


def write_zip(path, members):
    """A zip with fixed timestamps and member order, so it is byte-identical on every run."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted({m.rsplit("/", 1)[0] + "/" for m, _ in members}):
            zf.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), b"")
        for name, data in sorted(members):
            info = zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)


# --------------------------------------------------------------------------------------------- Alpaca
def alpaca_record(rnd, pool):
    kind = rnd.randrange(6)
    s = rnd.choice(pool)
    if kind == 0:
        return {"instruction": "Count the words in the sentence.", "input": s, "output": f"It has {len(s.split())} words."}
    if kind == 1:
        nums = [rnd.randint(1, 500) for _ in range(rnd.randint(4, 8))]
        return {"instruction": "Sort these numbers from smallest to largest.", "input": ", ".join(map(str, nums)),
                "output": ", ".join(map(str, sorted(nums)))}
    if kind == 2:
        km = rnd.randint(1, 400)
        return {"instruction": f"How many metres are there in {km} kilometres?", "input": "",
                "output": f"There are {km * 1000} metres in {km} kilometres, because one kilometre is 1000 metres."}
    if kind == 3:
        return {"instruction": "Rewrite the sentence in upper case.", "input": s, "output": s.upper()}
    if kind == 4:
        a, b = rnd.randint(10, 999), rnd.randint(10, 999)
        return {"instruction": f"Add {a} and {b}, and explain the result in one sentence.", "input": "",
                "output": f"The sum of {a} and {b} is {a + b}."}
    story = " ".join(rnd.choice(pool) for _ in range(rnd.randint(3, 7)))
    return {"instruction": "Write a short paragraph that continues this story.", "input": "",
            "output": story}


def alpaca_sample(path):
    rnd = random.Random(3)
    pool = sentence_pool(600, seed=3)
    records = [alpaca_record(rnd, pool) for _ in range(900)]
    path.write_text(json.dumps(records, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")


def main(folder=HERE):
    folder = Path(folder)
    c4_sample(folder / "c4-sample.json.gz")
    ceval_sample(folder / "ceval-exam-sample.zip")
    alpaca_sample(folder / "alpaca-sample.json")
    for name in ("c4-sample.json.gz", "ceval-exam-sample.zip", "alpaca-sample.json"):
        print(f"{name}: {(folder / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
