"""`skywork-deploy calib`: the three sources end to end, determinism, window edge cases, every bad input."""
import gzip
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from skywork_deploy.calib import read_calib_manifest
from skywork_deploy.calib.render import render_alpaca
from skywork_deploy.calib.safeio import ZipBudget, iter_lines
from skywork_deploy.cli import cli
from skywork_deploy.base.errors import DataFormatError, InputError

SAMPLES = Path(__file__).resolve().parents[2] / "calibration"
C4 = SAMPLES / "c4-sample.json.gz"
CEVAL = SAMPLES / "ceval-exam-sample.zip"
ALPACA = SAMPLES / "alpaca-sample.json"


@pytest.fixture(scope="module")
def model(tiny_model_factory):
    return tiny_model_factory()


@pytest.fixture(scope="module")
def tok(model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model))


def run(*args):
    return CliRunner().invoke(cli, ["calib", *map(str, args)])


def calib_ok(model, out, *args):
    result = run("--model", model, "-o", out, *args)
    assert result.exit_code == 0, result.output
    return load_file(str(Path(out) / "calib.safetensors")), read_calib_manifest(out)


def write_gz(path, lines):
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as fh:
        fh.write(b"".join(line if isinstance(line, bytes) else (line + "\n").encode() for line in lines))
    return path


def c4_lines(texts):
    return [json.dumps({"text": t, "timestamp": "2019-01-01T00:00:00Z", "url": f"https://example.org/{i}"})
            for i, t in enumerate(texts)]


def c4_texts():
    with gzip.open(C4, "rt", encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh]


def rebuild_packed(pieces, units, eos):
    """Rebuild a packed window from its provenance: pieces index each item's tokens followed by EOS."""
    out = []
    for item, start, end in pieces:
        out.extend((units[item] + [eos])[start:end])
    return out


# ------------------------------------------------------------------------------------------- end to end
def test_c4_windows_come_from_the_documents_they_name(model, tok, tmp_path):
    data, man = calib_ok(model, tmp_path / "out", "--dataset", "c4", "--source", C4, "--seqlen", 128,
                         "--nsamples", 16)
    ids, mask = data["input_ids"], data["attention_mask"]
    assert ids.shape == (16, 128) and ids.dtype == np.int64 and mask.dtype == np.int64 and (mask == 1).all()
    texts = c4_texts()
    docs = {w["document"] for w in man["windows"]}
    assert len(docs) == 16  # distinct documents
    for row, w in zip(ids, man["windows"]):
        assert w["kind"] == "window" and w["file"] == "c4-sample.json.gz"
        full = tok(texts[w["line"] - 1], add_special_tokens=False)["input_ids"]
        assert len(full) == w["tokens"] >= 128 and 0 <= w["offset"] <= len(full) - 128
        assert row.tolist() == full[w["offset"]:w["offset"] + 128]
    assert man["dataset_block"] == {"type": "huggingface", "name": "c4", "path": str(C4.resolve()),
                                    "nsamples": 16, "seqlen": 128}
    s = man["statistics"]
    assert s["documents_read"] == 400 and s["documents_used"] == 16 and s["long_documents_found"] == 16
    assert man["source"]["files"][0]["name"] == "c4-sample.json.gz" and len(man["source"]["files"][0]["sha256"]) == 64
    assert man["tokenizer"]["class"] and man["tokenizer"]["eos_token_id"] == 151643


def test_ceval_zip_default_split_and_nested_folder(model, tok, tmp_path):
    data, man = calib_ok(model, tmp_path / "zip", "--dataset", "ceval", "--source", CEVAL, "--nsamples", 8)
    assert data["input_ids"].shape == (8, 128) and man["split"] == "val" and man["seqlen"] == 128
    # The same archive unzipped under the ceval-exam/ prefix gives the same windows.
    folder = tmp_path / "unzipped"
    with zipfile.ZipFile(CEVAL) as zf:
        zf.extractall(folder / "ceval-exam")
    data2, man2 = calib_ok(model, tmp_path / "dir", "--dataset", "ceval", "--source", folder, "--nsamples", 8)
    assert np.array_equal(data["input_ids"], data2["input_ids"])
    assert man2["windows"] == man["windows"]
    # Rebuild window 0 from its pieces.
    from skywork_deploy.calib.readers import read_ceval

    items = dict(read_ceval(CEVAL, "val"))
    units = {k: tok(v, add_special_tokens=False)["input_ids"] for k, v in items.items()}
    assert data["input_ids"][0].tolist() == rebuild_packed(man["windows"][0]["pieces"], units, 151643)
    first = man["windows"][0]["pieces"][0][0]
    assert "\nA. " in items[first] and "\n答案：" in items[first]


def test_ceval_test_split_has_no_answers(tmp_path):
    from skywork_deploy.calib.readers import read_ceval

    test_items = read_ceval(CEVAL, "test")
    dev_items = read_ceval(CEVAL, "dev")
    assert test_items and all("答案：" not in t and t.count("\n") == 4 for _, t in test_items)
    assert len(dev_items) == 25 and all(t.split("\n答案：")[1] in "ABCD" for _, t in dev_items)


def test_alpaca_packed_windows_rebuild(model, tok, tmp_path):
    data, man = calib_ok(model, tmp_path / "out", "--dataset", "alpaca", "--source", ALPACA, "--nsamples", 4)
    assert data["input_ids"].shape == (4, 512) and man["seqlen"] == 512
    records = json.loads(ALPACA.read_text(encoding="utf-8"))
    units = {}
    for w in man["windows"]:
        for item, _, _ in w["pieces"]:
            units[item] = tok(render_alpaca(records[item]), add_special_tokens=False)["input_ids"]
    for row, w in zip(data["input_ids"], man["windows"]):
        assert row.tolist() == rebuild_packed(w["pieces"], units, 151643)
    assert man["statistics"]["items_read"] == len(records)


def test_alpaca_templates():
    with_input = render_alpaca({"instruction": "Sort.", "input": "3, 1", "output": "1, 3"})
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    assert with_input.endswith("### Instruction:\nSort.\n\n### Input:\n3, 1\n\n### Response:\n1, 3")
    without = render_alpaca({"instruction": "Say hi.", "input": "", "output": "Hi."})
    assert "paired with an input" not in without and "### Input" not in without
    assert without.endswith("### Instruction:\nSay hi.\n\n### Response:\nHi.")


# ------------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("dataset,source,extra", [("c4", C4, ["--seqlen", 64, "--nsamples", 8]),
                                                  ("alpaca", ALPACA, ["--nsamples", 2])])
def test_byte_identical_and_seed_dependent(model, tmp_path, dataset, source, extra):
    outs = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        calib_ok(model, tmp_path / name, "--dataset", dataset, "--source", source, "--seed", seed, *extra)
        outs.append([(tmp_path / name / f).read_bytes() for f in ("calib.safetensors", "skywork_deploy_manifest.json")])
    assert outs[0] == outs[1]
    assert outs[0][0] != outs[2][0] and outs[0][1] != outs[2][1]
    assert str(tmp_path).encode() not in outs[0][1]


# ------------------------------------------------------------------------------------------ edge cases
@pytest.fixture(scope="module")
def exact_shard(tok, tmp_path_factory):
    """A shard with one document of exactly 40 tokens, one of 39 and short ones."""
    base = "The harbour master recorded the winter schedule before the rain arrived."
    words = (base + " ") * 12
    long_text = tok.decode(tok(words, add_special_tokens=False)["input_ids"][:40])
    assert len(tok(long_text, add_special_tokens=False)["input_ids"]) == 40
    near = tok.decode(tok(words, add_special_tokens=False)["input_ids"][:39])
    texts = ["Short one.", near, "Another short document.", long_text, "Tiny."]
    return write_gz(tmp_path_factory.mktemp("exact") / "exact.json.gz", c4_lines(texts)), long_text


def test_document_of_exactly_seqlen_tokens(model, tok, tmp_path, exact_shard):
    shard, long_text = exact_shard
    data, man = calib_ok(model, tmp_path / "out", "--dataset", "c4", "--source", shard, "--seqlen", 40,
                         "--nsamples", 1)
    assert man["windows"][0]["offset"] == 0 and man["windows"][0]["line"] == 4
    assert data["input_ids"][0].tolist() == tok(long_text, add_special_tokens=False)["input_ids"]


def test_too_few_long_documents_errors_then_packs(model, tmp_path, exact_shard):
    shard, _ = exact_shard
    result = run("--dataset", "c4", "--source", shard, "--model", model, "--seqlen", 40, "--nsamples", 3,
                 "-o", tmp_path / "out")
    assert result.exit_code == 1 and "only 1 of 5 C4 documents have at least 40 tokens" in result.output
    assert "--allow-packing" in result.output and not (tmp_path / "out").exists()
    data, man = calib_ok(model, tmp_path / "packed", "--dataset", "c4", "--source", shard, "--seqlen", 40,
                         "--nsamples", 2, "--allow-packing")
    kinds = [w["kind"] for w in man["windows"]]
    assert kinds == ["window", "packed"] and man["statistics"]["windows_packed"] == 1
    assert all(p[0].startswith("exact.json.gz:") for p in man["windows"][1]["pieces"])
    assert (data["input_ids"][1:] == 151643).any()  # EOS separators
    # Not enough text at all even with packing: a clear error, no hang.
    result = run("--dataset", "c4", "--source", shard, "--model", model, "--seqlen", 40, "--nsamples", 50,
                 "--allow-packing", "-o", tmp_path / "none")
    assert result.exit_code == 1 and "too little text" in result.output


def test_several_shards_and_a_folder(model, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    texts = c4_texts()
    write_gz(folder / "a.json.gz", c4_lines(texts[:200]))
    write_gz(folder / "b.json.gz", c4_lines(texts[200:]))
    _, by_files = calib_ok(model, tmp_path / "o1", "--dataset", "c4", "--source", folder / "a.json.gz",
                           "--source", folder / "b.json.gz", "--seqlen", 64, "--nsamples", 4)
    _, by_folder = calib_ok(model, tmp_path / "o2", "--dataset", "c4", "--source", folder, "--seqlen", 64,
                            "--nsamples", 4)
    assert by_files["windows"] == by_folder["windows"]
    assert by_folder["statistics"]["documents_read"] == 400
    assert by_folder["dataset_block"]["path"] == str(folder.resolve())


def test_small_text_budget_rereads_shards(tok):
    """Candidates beyond the in-memory budget are fetched again; the windows do not change."""
    from skywork_deploy.calib import readers, sampling

    files = readers.c4_files([C4])
    results = []
    for budget in (1 << 30, 20_000):
        rng = np.random.default_rng(3)
        corpus = sampling.scan_c4(files, 64, rng, budget=budget)
        ids, windows, stats = sampling.sample_c4(corpus, sampling.Tokens(tok), 20, 64, 151643, rng)
        results.append((ids, windows, stats["passes"]))
    assert np.array_equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]
    assert results[0][2] == 1 and results[1][2] > 1


# ------------------------------------------------------------------------------------------- bad input
def _zip(path, members):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


VAL_CSV = "id,question,A,B,C,D,answer\n0,一加一等于几？,1,2,3,4,B\n".encode()


def bad_inputs(tmp):
    """(name, dataset, source, words the one-line error must contain)."""
    good = write_gz(tmp / "good.json.gz", c4_lines(["Hello world."] * 3))
    cases = []
    trunc = tmp / "truncated.json.gz"
    trunc.write_bytes(C4.read_bytes()[: C4.stat().st_size // 2])
    cases.append(("truncated gzip", "c4", trunc, ["truncated.json.gz", "truncated or corrupt gzip"]))
    plain = tmp / "plain.json.gz"
    plain.write_bytes(b'{"text": "not compressed"}\n')
    cases.append(("not gzip", "c4", plain, ["plain.json.gz", "not a gzip file"]))
    cases.append(("bad utf-8", "c4", write_gz(tmp / "utf8.json.gz", [c4_lines(["ok"])[0], b'{"text": "\xff\xfe"}\n']),
                  ["utf8.json.gz", "line 2", "not UTF-8"]))
    cases.append(("malformed json", "c4", write_gz(tmp / "json.json.gz", c4_lines(["ok", "fine"]) + ['{"text": "x",']),
                  ["json.json.gz", "line 3", "malformed JSON"]))
    cases.append(("no text", "c4", write_gz(tmp / "notext.json.gz", ['{"url": "https://example.org"}']),
                  ["notext.json.gz", "line 1", "no string 'text'"]))
    cases.append(("zip without val", "ceval", _zip(tmp / "noval.zip", {"dev/a_dev.csv": VAL_CSV}),
                  ["noval.zip", "no val/ folder"]))
    cases.append(("csv columns", "ceval",
                  _zip(tmp / "cols.zip", {"val/a_val.csv": "id,question,A,B,C\n0,q,1,2,3\n".encode()}),
                  ["cols.zip:val/a_val.csv", "columns missing: D, answer"]))
    cases.append(("csv not utf-8", "ceval", _zip(tmp / "gbk.zip", {"val/a_val.csv": VAL_CSV.decode().encode("gbk")}),
                  ["gbk.zip:val/a_val.csv", "not UTF-8"]))
    tz = tmp / "trunc.zip"
    tz.write_bytes(CEVAL.read_bytes()[: CEVAL.stat().st_size // 2])
    cases.append(("truncated zip", "ceval", tz, ["trunc.zip", "not a valid zip archive"]))
    for name, text, words in [
        ("not array", '{"instruction": "a", "output": "b"}', ["expected an array"]),
        ("truncated", '[{"instruction": "a", "input": "", "output": "b"}, {"instru', ["invalid JSON", "truncated"]),
        ("json lines", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n', ["JSON Lines"]),
        ("no instruction", '[{"instruction": "a", "output": "b"}, {"input": "", "output": "b"}]',
         ["entry 1", "'instruction'"]),
        ("no output", '[{"instruction": "a", "input": "x"}]', ["entry 0", "'output'"]),
    ]:
        path = tmp / f"alpaca-{name.replace(' ', '-')}.json"
        path.write_text(text, encoding="utf-8")
        cases.append((f"alpaca {name}", "alpaca", path, [path.name] + words))
    assert good.is_file()
    return cases


def test_every_bad_input_is_one_line_with_no_output(model, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    seen = []
    for name, dataset, source, words in bad_inputs(src):
        out = tmp_path / f"out-{len(seen)}"
        result = run("--dataset", dataset, "--source", source, "--model", model, "-o", out)
        message = result.output.strip()
        assert result.exit_code == 1, (name, result.output)
        assert "Traceback" not in result.output and len(message.splitlines()) == 1, (name, message)
        assert all(w in message for w in words), (name, message)
        assert not out.exists() and not list(tmp_path.glob(f".out-{len(seen)}*")), name
        seen.append(name)
    assert len(seen) == 14


def test_caps_stop_bombs(tmp_path):
    bomb = tmp_path / "bomb.zip"
    _zip(bomb, {"val/a_val.csv": b"0" * (2 << 20)})
    with zipfile.ZipFile(bomb) as zf:
        with pytest.raises(DataFormatError, match="bomb.zip:val/a_val.csv"):
            ZipBudget(zf, bomb, member_cap=1 << 20).read(zf.getinfo("val/a_val.csv"))
    shard = write_gz(tmp_path / "long.json.gz", [b'{"text": "' + b"a" * (2 << 20) + b'"}\n'])
    with pytest.raises(DataFormatError, match="line 1 is longer than"):
        list(iter_lines(shard, line_cap=1 << 20))


def test_hub_id_offline_is_a_network_error(model, tmp_path):
    result = run("--dataset", "c4", "--source", "allenai/c4", "--model", model, "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert "allenai/c4: cannot download" in result.output and "pass local files" in result.output
    result = run("--dataset", "alpaca", "--source", "./missing.json", "--model", model, "-o", tmp_path / "out")
    assert result.exit_code in (1, 2) and "missing.json" in result.output  # 2: the CLI's usage check saw it


def test_option_errors(model, tmp_path):
    result = run("--dataset", "c4", "--source", C4, "--model", model, "--split", "dev", "-o", tmp_path / "o")
    assert result.exit_code == 1 and "--split applies to ceval only" in result.output
    (tmp_path / "exists").mkdir()
    result = run("--dataset", "c4", "--source", C4, "--model", model, "-o", tmp_path / "exists")
    assert result.exit_code == 1 and "already exists" in result.output


def test_read_calib_manifest_rejects_incomplete_sets(model, tmp_path):
    with pytest.raises(InputError, match="no calibration manifest"):
        read_calib_manifest(tmp_path)
    calib_ok(model, tmp_path / "set", "--dataset", "alpaca", "--source", ALPACA, "--nsamples", 1)
    (tmp_path / "set" / "calib.safetensors").unlink()
    with pytest.raises(InputError, match="calib.safetensors: missing"):
        read_calib_manifest(tmp_path / "set")


def test_samples_are_reproducible_and_small(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_samples", SAMPLES / "make_samples.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(tmp_path)
    total = 0
    for name in ("c4-sample.json.gz", "ceval-exam-sample.zip", "alpaca-sample.json"):
        assert (tmp_path / name).read_bytes() == (SAMPLES / name).read_bytes(), name
        total += (SAMPLES / name).stat().st_size
    assert total < 1 << 20
    shutil.rmtree(tmp_path)


def test_ceval_hub_parquet_layout(tmp_path):
    """The hub repo's current layout ({subject}/{split}-*.parquet) renders like the CSV files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from skywork_deploy.calib.readers import read_ceval_parquet

    (tmp_path / "calendar").mkdir()
    table = pa.table({"id": [0], "question": ["一周有几天？"], "A": ["5"], "B": ["6"], "C": ["7"], "D": ["8"],
                      "answer": ["C"], "explanation": [""]})
    pq.write_table(table, tmp_path / "calendar" / "val-00000-of-00001.parquet")
    assert read_ceval_parquet(tmp_path, "val") == [
        ("calendar_val:0", "一周有几天？\nA. 5\nB. 6\nC. 7\nD. 8\n答案：C")]


def test_caps_count_decoded_lines_and_rendered_items(tmp_path, monkeypatch):
    from skywork_deploy.calib import readers, safeio

    shard = write_gz(tmp_path / "many.json.gz", [b'{"text": ""}\n'] * 5000)
    with pytest.raises(DataFormatError, match="many.json.gz: decompresses to more than"):
        list(iter_lines(shard, lines_cap=4000))
    with pytest.raises(DataFormatError, match="many.json.gz: decompresses to more than"):
        list(iter_lines(shard, text_cap=1000))
    monkeypatch.setattr(safeio, "ITEMS_CAP", 300)
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "", "output": ""}] * 301))
    with pytest.raises(DataFormatError, match="alpaca.json: more than 300 items"):
        readers.read_alpaca(alpaca)
    rows = "id,question,A,B,C,D,answer\n" + "0,q,a,b,c,d,A\n" * 301
    ceval = _zip(tmp_path / "rows.zip", {"val/a_val.csv": rows.encode()})
    with pytest.raises(DataFormatError, match="rows.zip:val/a_val.csv: more than 300 items"):
        readers.read_ceval(ceval, "val")
    monkeypatch.setattr(safeio, "ITEMS_CAP", 10_000)
    monkeypatch.setattr(safeio, "RENDERED_CAP", 5_000)  # rendered text counts, not only the CSV bytes
    with pytest.raises(DataFormatError, match="or 5000 characters of text"):
        readers.read_ceval(ceval, "val")
    monkeypatch.setattr(safeio, "RENDERED_CAP", 1 << 20)
    assert len(readers.read_alpaca(alpaca)) == 301


def test_c4_scan_keeps_compact_per_document_records(tmp_path):
    from skywork_deploy.calib import readers, sampling

    shard = write_gz(tmp_path / "s.json.gz", c4_lines(["short"] * 2000))
    corpus = sampling.scan_c4(readers.c4_files([shard]), 64, np.random.default_rng(0))
    assert len(corpus.keys) == 2000 and not corpus.cache
    per_doc = sum(a.itemsize for a in (corpus.file_of, corpus.line_of, corpus.nbytes, corpus.keys))
    assert per_doc == 20  # bytes a document, whatever the number of lines (Python lists cost ~117)
