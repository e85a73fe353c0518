"""Readers for the three calibration sources in their published formats (REFERENCE.md §4).

- C4: gzipped JSON Lines shards, one object per line with a string `text`; streamed, never loaded whole.
- C-Eval: `ceval-exam.zip` or its unzipped folder, `{split}/{subject}_{split}.csv` (optionally under a
  `ceval-exam/` prefix); members are read in memory, never extracted.
- Alpaca: one JSON array of {"instruction", "input", "output"} objects.

Every malformed input raises DataFormatError naming the file and the line, row or entry.
"""
import csv
import io
import json
import re
from pathlib import Path

from ..base.errors import DataFormatError, InputError
from ..base.strict import unique_pairs
from .render import render_alpaca, render_ceval
from .safeio import FILE_CAP, MEMBER_CAP, ItemBudget, ZipBudget, iter_lines, open_zip, read_file_capped

C4_PATTERNS = ("*.json.gz", "*.jsonl.gz", "*.json", "*.jsonl")
CEVAL_SPLITS = ("dev", "val", "test")
CEVAL_COLUMNS = {
    "dev": ("id", "question", "A", "B", "C", "D", "answer"),   # dev also has `explanation` (not rendered)
    "val": ("id", "question", "A", "B", "C", "D", "answer"),
    "test": ("id", "question", "A", "B", "C", "D"),
}
CEVAL_MEMBER = re.compile(r"^(?P<prefix>(?:[^/]+/)*)(?P<split>dev|val|test)/(?P<subject>[^/]+)_(?P=split)\.csv$")


# ----------------------------------------------------------------------------------------------- C4
def c4_files(sources):
    """[(name shown in the manifest, Path)] for C4 shard files and folders, sorted within each folder."""
    out = []
    for src in sources:
        path = Path(src).expanduser()
        if path.is_dir():
            found = sorted({p for pattern in C4_PATTERNS for p in path.rglob(pattern) if p.is_file()})
            if not found:
                raise InputError(f"{path}: no C4 shards (*.json.gz) in this folder")
            out.extend((p.relative_to(path).as_posix(), p) for p in found)
        elif path.is_file():
            out.append((path.name, path))
        else:
            raise InputError(f"{src}: no such file or folder")
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        # Same base name from two places: fall back to the paths as given so the manifest stays unambiguous.
        out = [(str(p), p) for _, p in out]
    return out


def iter_c4_texts(name, path, progress=None):
    """Yield (line_no, text) of one C4 shard; every line is validated."""
    for line_no, raw in iter_lines(path, progress):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataFormatError(f"{path}: line {line_no}: not UTF-8 (byte {exc.start}); re-download the shard") \
                from None
        try:
            record = json.loads(text, object_pairs_hook=unique_pairs(f"{path}: line {line_no}", DataFormatError))
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{path}: line {line_no}: malformed JSON ({exc.msg} at column {exc.colno})") \
                from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataFormatError(f"{path}: line {line_no}: record has no string 'text' "
                                  "(C4 lines are objects with text, timestamp and url)")
        yield line_no, record["text"]


# -------------------------------------------------------------------------------------------- C-Eval
def read_ceval(source, split="val"):
    """Items [(item_id, text)] of one C-Eval split, and the files read [(name, Path or None)].

    `source` is ceval-exam.zip or a folder holding dev/ val/ test/ (directly or under one prefix folder).
    """
    if split not in CEVAL_SPLITS:
        raise InputError(f"--split {split!r}: choose one of {', '.join(CEVAL_SPLITS)}")
    path = Path(source).expanduser()
    if path.is_dir():
        members = _folder_members(path, split)
        if not members:
            raise DataFormatError(f"{path}: no {split}/ folder with *_{split}.csv files (expected the "
                                  "ceval-exam layout: dev/, val/, test/, optionally under ceval-exam/)")
        items, budget = [], ItemBudget(path)
        for rel, subject, file in members:
            items.extend(parse_ceval_csv(read_file_capped(file, MEMBER_CAP), file, subject, split, budget))
        return items
    if not path.is_file():
        raise InputError(f"{source}: no such file or folder")
    with open_zip(path) as zf:
        infos = []
        for info in zf.infolist():
            m = CEVAL_MEMBER.match(info.filename)
            if m and m["split"] == split and not info.is_dir():
                infos.append((m["prefix"], m["subject"], info))
        prefixes = sorted({p for p, _, _ in infos})
        if not infos:
            raise DataFormatError(f"{path}: no {split}/ folder with *_{split}.csv files (expected the "
                                  "ceval-exam layout: dev/, val/, test/ at the root or under ceval-exam/)")
        if len(prefixes) > 1:
            raise DataFormatError(f"{path}: {split}/ appears under several folders ({', '.join(prefixes)}); "
                                  "keep one copy")
        budget, item_budget = ZipBudget(zf, path), ItemBudget(path)
        items = []
        for _, subject, info in sorted(infos, key=lambda t: t[2].filename):
            where = f"{path}:{info.filename}"
            items.extend(parse_ceval_csv(budget.read(info), where, subject, split, item_budget))
    return items


def _folder_members(folder, split):
    for base in (folder, folder / "ceval-exam"):
        d = base / split
        if d.is_dir():
            files = sorted(p for p in d.glob(f"*_{split}.csv") if p.is_file())
            if files:
                return [(p.relative_to(folder).as_posix(), p.name[: -len(f"_{split}.csv")], p) for p in files]
    return []


def parse_ceval_csv(data, where, subject, split, budget=None):
    """[(item_id, rendered text)] from one subject's CSV bytes (UTF-8, optional BOM), counted by `budget`."""
    budget = budget or ItemBudget(where)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{where}: not UTF-8 (byte {exc.start}); C-Eval CSV files are UTF-8, "
                              "re-save the file as UTF-8") from None
    del data
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise DataFormatError(f"{where}: empty CSV (expected columns {','.join(CEVAL_COLUMNS[split])})")
        header = [h.strip() for h in header]
        missing = [c for c in CEVAL_COLUMNS[split] if c not in header]
        if missing:
            raise DataFormatError(f"{where}: CSV columns missing: {', '.join(missing)} (a C-Eval {split} file "
                                  f"has {','.join(CEVAL_COLUMNS[split])})")
        col = {c: header.index(c) for c in CEVAL_COLUMNS[split]}
        with_answer = "answer" in CEVAL_COLUMNS[split]
        items = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < len(header):
                raise DataFormatError(f"{where}: line {reader.line_num}: {len(row)} fields, the header has "
                                      f"{len(header)}")
            rec = {c: row[i] for c, i in col.items()}
            items.append((f"{subject}_{split}:{rec['id']}", budget.take(render_ceval(rec, with_answer), where)))
    except csv.Error as exc:
        raise DataFormatError(f"{where}: line {reader.line_num}: malformed CSV ({exc})") from None
    return items


def read_ceval_parquet(folder, split):
    """Items from the hub's parquet layout `{subject}/{split}-*.parquet` (ceval/ceval-exam today)."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    files = sorted(folder.glob(f"*/{split}-*.parquet"))
    if not files:
        raise DataFormatError(f"{folder}: no {split} parquet files (expected {{subject}}/{split}-*.parquet)")
    items, budget = [], ItemBudget(folder)
    with_answer = "answer" in CEVAL_COLUMNS[split]
    for file in files:
        if file.stat().st_size > MEMBER_CAP:
            raise DataFormatError(f"{file}: larger than {MEMBER_CAP >> 20} MiB (a C-Eval subject is a few hundred "
                                  "KiB); refusing to read it")
        try:
            rows = pq.read_table(file).to_pylist()
        except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
            raise DataFormatError(f"{file}: unreadable parquet ({exc})") from None
        subject = file.parent.name
        for i, rec in enumerate(rows):
            missing = [c for c in CEVAL_COLUMNS[split] if c not in rec]
            if missing:
                raise DataFormatError(f"{file}: row {i}: columns missing: {', '.join(missing)}")
            rec = {k: "" if v is None else str(v) for k, v in rec.items()}
            with_answer_here = with_answer and bool(rec.get("answer"))
            items.append((f"{subject}_{split}:{rec['id']}", budget.take(render_ceval(rec, with_answer_here), file)))
    return items


# -------------------------------------------------------------------------------------------- Alpaca
def read_alpaca(path):
    """Items [(entry index, rendered text)] of an Alpaca JSON array file, parsed entry by entry (capped)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{path}: no such file (pass alpaca_data_cleaned.json)")
    data = read_file_capped(path, FILE_CAP)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: not UTF-8 (byte {exc.start})") from None
    del data
    budget, items = ItemBudget(path), []
    for i, rec in _json_array(text, path):
        if not isinstance(rec, dict):
            raise DataFormatError(f"{path}: entry {i}: expected an object, found {type(rec).__name__}")
        missing = [k for k in ("instruction", "output") if not isinstance(rec.get(k), str)]
        if missing:
            raise DataFormatError(f"{path}: entry {i}: missing or non-string {', '.join(repr(k) for k in missing)}")
        if not isinstance(rec.get("input", ""), str):
            raise DataFormatError(f"{path}: entry {i}: 'input' is not a string")
        items.append((i, budget.take(render_alpaca(rec))))
    if not items:
        raise DataFormatError(f"{path}: the array is empty")
    return items


_SPACE = re.compile(r"[ \t\n\r]*")


def _json_array(text, path):
    """Yield (index, value) of the top-level JSON array in `text`, one entry at a time (never all at once)."""
    decoder = json.JSONDecoder(object_pairs_hook=unique_pairs(str(path), DataFormatError))
    pos = _SPACE.match(text).end()
    if pos == len(text):
        raise DataFormatError(f"{path}: empty file (expected a JSON array of instruction records)")
    try:
        if text[pos] != "[":
            value, end = decoder.raw_decode(text, pos)
            if text[pos] == "{" and _SPACE.match(text, end).end() < len(text):
                raise DataFormatError(f"{path}: looks like JSON Lines (one object per line); expected one JSON "
                                      "array [...] like alpaca_data_cleaned.json")
            raise DataFormatError(f"{path}: the top level is a JSON {type(value).__name__}, expected an array of "
                                  "{instruction, input, output} records")
        pos, index = _SPACE.match(text, pos + 1).end(), 0
        if text.startswith("]", pos):
            pos += 1
        else:
            while True:
                value, pos = decoder.raw_decode(text, pos)
                yield index, value
                index += 1
                pos = _SPACE.match(text, pos).end()
                if text.startswith(",", pos):
                    pos = _SPACE.match(text, pos + 1).end()
                elif text.startswith("]", pos):
                    pos += 1
                    break
                else:
                    raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
        if _SPACE.match(text, pos).end() != len(text):
            raise json.JSONDecodeError("Extra data", text, pos)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); "
                              "the file may be truncated, re-download it") from None
