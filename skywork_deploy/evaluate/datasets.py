"""Problem sets for `eval`: JSON / JSONL / Parquet / CSV files, or a hub id through `datasets`.

The column names of the published sets are recognised: AIME 2024 (`Problem`, `Answer`), AIME 2025
(`question`, `answer`), MATH-500 (`problem`, `answer`, `solution`); a solution text is used through its
`\\boxed{}` only when no answer column exists. Other files name their columns with `problem_key` /
`answer_key`. Every loader returns a list of `{"id", "problem", "answer"}` dicts in file order.

Reads are capped before anything is tokenized: a file of at most FILE_CAP bytes (MATH's full test set is
~10 MB), at most ROWS_CAP problems, each problem and answer at most ROW_TEXT_CAP characters (a real one is a
few KB; a 60 MB "problem" would grow past 4 GiB in the chat template and the tokenizer).
"""
import csv
import json
from pathlib import Path

from ..base.errors import DataFormatError, InputError, NetworkError
from ..base.strict import loads_json, read_input_text

PROBLEM_KEYS = ("problem", "question", "Problem", "Question", "prompt", "input")
ANSWER_KEYS = ("answer", "Answer", "final_answer", "expected_answer", "gold", "target",
               "solution", "Solution")  # a solution column only when no answer column exists
ID_KEYS = ("id", "ID", "unique_id", "idx")
SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
FILE_CAP = 64 << 20
ROWS_CAP = 100_000
ROW_TEXT_CAP = 256 << 10


def _read_json(path):
    text = read_input_text(path, DataFormatError, FILE_CAP, "problem set")
    if not text.strip():
        return []
    data = loads_json(text, str(path), DataFormatError, hint="; a file with one object per line should be named "
                                                            ".jsonl")
    if isinstance(data, dict):  # {"data": [...]} / {"test": [...]}, or columns {"problem": [...], ...}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1 and all(isinstance(r, dict) for r in lists[0]):
            data = lists[0]
        elif lists and all(isinstance(v, list) for v in data.values()):
            keys = list(data)
            data = [dict(zip(keys, row)) for row in zip(*data.values())]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataFormatError(f"{path}: expected a list of objects with a problem and an answer field")
    return data


def _read_jsonl(path):
    rows = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{path}:{n}: not a JSON object ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataFormatError(f"{path}:{n}: expected a JSON object per line")
            rows.append(row)
    return rows


def _read_parquet(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        return pq.read_table(str(path)).to_pylist()
    except Exception as exc:  # pyarrow raises its own ArrowInvalid / OSError types for corrupt files
        raise DataFormatError(f"{path}: not a readable Parquet file ({exc})") from None


def _read_csv(path):
    csv.field_size_limit(ROW_TEXT_CAP + 1)
    with path.open(encoding="utf-8", newline="") as fh:
        try:
            return list(csv.DictReader(fh))
        except csv.Error as exc:  # a field over the cap among them
            raise DataFormatError(f"{path}: not a usable CSV file ({exc}; a field may be at most {ROW_TEXT_CAP} "
                                  "characters)") from None


READERS = {".json": _read_json, ".jsonl": _read_jsonl, ".parquet": _read_parquet, ".csv": _read_csv}


def pick_keys(columns, where, problem_key=None, answer_key=None):
    """The problem and answer column names among `columns`, or a DataFormatError naming what exists."""
    columns = list(columns)
    for key, option in ((problem_key, "--problem-key"), (answer_key, "--answer-key")):
        if key is not None and key not in columns:
            raise DataFormatError(f"{where}: no column {key!r} ({option}); columns: {', '.join(columns)}")
    p = problem_key or next((k for k in PROBLEM_KEYS if k in columns), None)
    a = answer_key or next((k for k in ANSWER_KEYS if k in columns), None)
    if p is None or a is None:
        missing = "problem" if p is None else "answer"
        raise DataFormatError(f"{where}: no recognisable {missing} column among {', '.join(columns) or '(none)'} "
                              f"(name them with --problem-key and --answer-key)")
    return p, a


def to_records(rows, where, problem_key=None, answer_key=None):
    if not rows:
        raise DataFormatError(f"{where}: no problems in the file (it is empty)")
    if len(rows) > ROWS_CAP:
        raise DataFormatError(f"{where}: {len(rows)} rows, more than {ROWS_CAP}; pass a problem set, or split it")
    p, a = pick_keys(rows[0].keys(), where, problem_key, answer_key)
    id_key = next((k for k in ID_KEYS if k in rows[0]), None)
    out = []
    for i, row in enumerate(rows):
        problem, answer = row.get(p), row.get(a)
        if problem is None or not str(problem).strip():
            raise DataFormatError(f"{where}: row {i + 1} has no {p!r} text")
        for key, value in ((p, problem), (a, answer)):
            if value is not None and len(str(value)) > ROW_TEXT_CAP:
                raise DataFormatError(f"{where}: row {i + 1}: {key!r} is {len(str(value))} characters, more than "
                                      f"{ROW_TEXT_CAP} (no real problem is that long); fix or drop the row")
        out.append({"id": str(row[id_key]) if id_key and row.get(id_key) is not None else str(i),
                    "problem": str(problem), "answer": "" if answer is None else str(answer)})
    return out


def load_hub(name, split=None, problem_key=None, answer_key=None):
    try:
        import datasets
    except ImportError:
        raise InputError(f"{name}: not a file; loading a hub dataset needs `pip install datasets`") from None
    try:
        ds = datasets.load_dataset(name, split=split or "test")
    except Exception as exc:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ValueError)
        raise NetworkError(f"--dataset {name}: not a local file and the hub cannot provide it "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); pass a local "
                           f"JSON/JSONL/Parquet/CSV file") from None
    return to_records(list(ds), name, problem_key, answer_key)


def load_problems(source, problem_key=None, answer_key=None, split=None, limit=None):
    """A file path or hub id -> [{"id", "problem", "answer"}] (the first `limit` rows when given)."""
    path = Path(source)
    if path.is_dir():
        raise InputError(f"--dataset {path}: a folder; pass a {'/'.join(s[1:] for s in SUFFIXES)} file")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in READERS:
            raise InputError(f"--dataset {path}: unknown file type {suffix or '(none)'} "
                             f"(use {', '.join(SUFFIXES)})")
        size = path.stat().st_size
        if size > FILE_CAP:
            raise DataFormatError(f"{path}: {size} bytes, larger than a problem set ({FILE_CAP} bytes at most); "
                                  "pass the problems only, or split the file")
        try:
            rows = READERS[suffix](path)
        except UnicodeDecodeError:
            raise DataFormatError(f"{path}: not UTF-8 text (is it really a {suffix} file?)") from None
        records = to_records(rows, str(path), problem_key, answer_key)
    elif "/" in str(source) and not str(source).lower().endswith(SUFFIXES) and not path.parent.is_dir():
        records = load_hub(str(source), split, problem_key, answer_key)
    else:
        raise InputError(f"--dataset {source}: no such file")
    return records[:limit] if limit else records
