"""`build_calib`: read a source, tokenize with the model's tokenizer, sample windows, write the set.

Output folder (built in a temporary folder and renamed at the end):
- calib.safetensors: `input_ids` int64 [nsamples, seqlen] and `attention_mask` int64 ones;
- skywork_deploy_manifest.json (stage "calib"): source files with sha256, tokenizer identity, seed, sizes,
  where every window came from, statistics, and `dataset_block` for the compiler YAML.
Nothing in either file depends on the time, the output path or the machine, so the same inputs and seed
give byte-identical files.
"""
import hashlib
import time
from pathlib import Path

import numpy as np

from ..base.errors import InputError, ModelFormatError
from ..base.fsutil import atomic_output_dir, check_output, sha256_file
from ..base.manifest import read_manifest, write_manifest
from ..base.spec import ModelSpec, tokenizer_files
from ..base.tokfiles import check_tokenizer_files
from . import readers, sampling
from .sources import resolve_sources


DATASETS = ("c4", "ceval", "alpaca")
DEFAULT_NSAMPLES = 128
DEFAULT_SEQLEN = {"c4": 1024, "ceval": 128, "alpaca": 512}
DEFAULT_SPLIT = "val"
CALIB_FILE = "calib.safetensors"
STAGE = "calib"


def build_calib(dataset, sources, model, out, nsamples=DEFAULT_NSAMPLES, seqlen=None, seed=0, split=None,
                allow_packing=False, overwrite=False, progress=None):
    """Build a calibration set in `out`; returns a summary (the manifest plus `seconds` and `out`)."""
    start = time.perf_counter()
    if dataset not in DATASETS:
        raise InputError(f"--dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    seqlen = DEFAULT_SEQLEN[dataset] if seqlen is None else int(seqlen)
    if nsamples < 1 or seqlen < 1:
        raise InputError("--nsamples and --seqlen must be at least 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"--seed {seed}: must be a non-negative integer (numpy seeds are 0 or more)")
    if split is not None and dataset != "ceval":
        raise InputError(f"--split applies to ceval only, not {dataset}")
    if allow_packing and dataset != "c4":
        raise InputError("--allow-packing applies to c4 only (ceval and alpaca are always packed)")
    split = (split or DEFAULT_SPLIT) if dataset == "ceval" else None
    out = Path(out)
    inputs = [model, *sources]
    check_output(out, inputs, overwrite)  # the output rule, before any work

    src = resolve_sources(dataset, sources, split or DEFAULT_SPLIT)
    files = source_files(dataset, src)
    rng = np.random.default_rng(seed)
    # Read (and validate) the source before loading the tokenizer: bad files fail fast.
    if dataset == "c4":
        corpus = sampling.scan_c4(files, seqlen, rng, progress=progress)
    elif dataset == "ceval":
        items = (readers.read_ceval_parquet(src.paths[0], split) if src.kind == "hub-parquet"
                 else readers.read_ceval(src.paths[0], split))
    else:
        items = readers.read_alpaca(src.paths[0])
    tokenizer, tok_info = load_tokenizer(model)
    eos_id = tok_info["eos_token_id"]
    tokens = sampling.Tokens(tokenizer)
    if dataset == "c4":
        ids, windows, stats = sampling.sample_c4(corpus, tokens, nsamples, seqlen, eos_id, rng, allow_packing)
    else:
        ids, windows, stats = sampling.sample_packed(items, tokens, nsamples, seqlen, eos_id, rng)
    stats["tokens_in_set"] = int(ids.size)

    block = {"type": "huggingface", "name": dataset, "path": src.block_path, "nsamples": nsamples,
             "seqlen": seqlen}
    fields = {
        "dataset": dataset,
        "split": split,
        "source": {"given": src.given, "hub_id": src.hub_id, "hub_files": src.hub_files,
                   "files": [{"name": n, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for n, p in files]},
        "tokenizer": tok_info,
        "seed": seed,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "sampling": sampling_description(dataset, allow_packing),
        "statistics": stats,
        "windows": windows,
        "dataset_block": block,
    }
    with atomic_output_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        write_safetensors(tmp / CALIB_FILE, ids, dataset, seed)
        fields["output"] = {"file": CALIB_FILE, "sha256": sha256_file(tmp / CALIB_FILE),
                            "shape": [nsamples, seqlen], "dtype": "int64"}
        manifest = write_manifest(tmp, STAGE, **fields)
    return {**manifest, "out": str(out), "seconds": round(time.perf_counter() - start, 3)}


def source_files(dataset, src):
    """[(name in the manifest, Path)] of the files read (C4 shards, the zip or CSVs, the JSON)."""
    if dataset == "c4":
        return readers.c4_files(src.paths)
    path = src.paths[0]
    if path.is_file():
        return [(path.name, path)]
    if src.kind == "hub-parquet":
        found = sorted(path.glob("*/*.parquet"))
    else:
        found = sorted(p for p in path.rglob("*.csv") if p.is_file())
    return [(p.relative_to(path).as_posix(), p) for p in found]


def sampling_description(dataset, allow_packing):
    if dataset == "c4":
        return {"method": "random windows from distinct documents with >= seqlen tokens, in a seeded random "
                          "order; offset uniform in [0, tokens - seqlen]",
                "prefilter": "documents with fewer than seqlen - 1 UTF-8 bytes are never tokenized",
                "fallback": "packing of the other documents separated by EOS" if allow_packing else "error"}
    return {"method": "items rendered, tokenized without special tokens, each followed by EOS, packed in a "
                      "seeded random order into seqlen windows",
            "piece": "[item id, start, end): token positions in the item's tokens followed by EOS"}


_TOKENIZERS = {}  # (folder, sha256 of its tokenizer files) -> tokenizer, reused within one process


def load_tokenizer(model):
    """(tokenizer, identity dict) from a model folder (or hub id) with AutoTokenizer."""
    from ..patch import resolve_model

    folder = resolve_model(str(model))
    if (folder / "config.json").is_file():  # the windows index the embedding: vocab_size must cover every id
        check_tokenizer_files(folder, ModelSpec.from_folder(folder))
    hashes = {f.name: sha256_file(f) for f in tokenizer_files(folder)}
    combined = hashlib.sha256("".join(f"{n}:{h}\n" for n, h in sorted(hashes.items())).encode()).hexdigest()
    key = (str(folder.resolve()), combined)
    tok = _TOKENIZERS.get(key)
    if tok is None:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(folder))
        except Exception as exc:  # transformers raises many types for broken tokenizer files
            raise ModelFormatError(f"{folder}: cannot load the tokenizer ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        _TOKENIZERS.clear()  # keep one: the same process (tests, `build`) usually reuses the same model
        _TOKENIZERS[key] = tok
    if tok.eos_token_id is None:
        raise ModelFormatError(f"{folder}: the tokenizer has no EOS token (set eos_token in tokenizer_config.json)")
    info = {"class": type(tok).__name__, "is_fast": bool(getattr(tok, "is_fast", False)),
            "vocab_size": len(tok), "base_vocab_size": int(tok.vocab_size), "eos_token": tok.eos_token,
            "eos_token_id": int(tok.eos_token_id), "model": folder.resolve().name, "files": hashes,
            "sha256": combined}
    return tok, info


def write_safetensors(path, ids, dataset, seed):
    from safetensors.numpy import save

    ids = np.ascontiguousarray(ids, dtype=np.int64)
    # One metadata key only: safetensors writes metadata from a hash map, so several keys change order per run.
    data = save({"input_ids": ids, "attention_mask": np.ones_like(ids)},
                metadata={"format": f"skywork-deploy-calib dataset={dataset} seed={seed}"})
    with open(path, "wb") as fh:  # written by Python, so a full disk is an OSError the CLI prints in one line
        fh.write(data)


def read_calib_manifest(path_or_folder):
    """The validated manifest of a calibration set (folder or manifest file), plus `calib_file` (its path)."""
    path = Path(path_or_folder)
    data = read_manifest(path, STAGE)
    if data is None:
        raise InputError(f"{path}: no calibration manifest (build one with `skywork-deploy calib`)")
    folder = path if path.is_dir() else path.parent
    where = folder / "skywork_deploy_manifest.json" if path.is_dir() else path
    problems = []
    if data.get("dataset") not in DATASETS:
        problems.append(f"dataset {data.get('dataset')!r}")
    for key in ("nsamples", "seqlen", "seed"):
        if not isinstance(data.get(key), int) or isinstance(data.get(key), bool):
            problems.append(f"{key} not an integer")
    block = data.get("dataset_block")
    keys = ("type", "name", "path", "nsamples", "seqlen")
    if not isinstance(block, dict) or any(k not in block for k in keys):
        problems.append(f"dataset_block must have {', '.join(keys)}")
    elif (block["name"], block["nsamples"], block["seqlen"]) != (data.get("dataset"), data.get("nsamples"),
                                                                 data.get("seqlen")):
        problems.append("dataset_block disagrees with dataset/nsamples/seqlen")
    if not isinstance(data.get("windows"), list) or len(data["windows"]) != data.get("nsamples"):
        problems.append("windows must list one entry per sample")
    if problems:
        raise InputError(f"{where}: invalid calibration manifest: {'; '.join(problems)} (re-run skywork-deploy calib)")
    calib = folder / data.get("output", {}).get("file", CALIB_FILE)
    if not calib.is_file():
        raise InputError(f"{calib}: missing; the calibration set is incomplete (re-run skywork-deploy calib)")
    from ..base.spec import read_safetensors_header

    header = read_safetensors_header(calib)
    shape = header.get("input_ids", {}).get("shape")
    if shape != [data["nsamples"], data["seqlen"]]:
        raise InputError(f"{calib}: input_ids shape {shape} does not match the manifest "
                         f"[{data['nsamples']}, {data['seqlen']}] (re-run skywork-deploy calib)")
    return {**data, "calib_file": str(calib)}


def summary_lines(result):
    """Human-readable statistics printed by the CLI."""
    s, block = result["statistics"], result["dataset_block"]
    lines = [f"Calibration set: {result['nsamples']} x {result['seqlen']} tokens from {result['dataset']}"
             f"{' (' + result['split'] + ')' if result.get('split') else ''}, seed {result['seed']} "
             f"-> {result['out']} in {result['seconds']:.2f} s"]
    if result["dataset"] == "c4":
        lines.append(f"  documents: {s['documents_read']} read, {s['documents_candidate']} long enough in bytes, "
                     f"{s['texts_tokenized']} tokenized, {s['long_documents_found']} with >= {result['seqlen']} "
                     f"tokens, {s['documents_used']} used")
        if s.get("windows_packed"):
            lines.append(f"  {s['windows_packed']} window(s) packed from shorter documents (--allow-packing)")
        lines.append(f"  tokens: {s['tokens_tokenized']} tokenized (mean {s['mean_tokens_tokenized']} per "
                     f"document), mean document {s['mean_document_bytes']} bytes, {s['passes']} pass(es)")
    else:
        lines.append(f"  items: {s['items_read']} read, {s['texts_tokenized']} tokenized, {s['items_used']} used")
        lines.append(f"  tokens: {s['tokens_tokenized']} tokenized (mean {s['mean_item_tokens']} per item)")
    lines.append(f"  dataset block: name {block['name']}, path {block['path']}")
    return lines
