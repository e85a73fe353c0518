"""Stage 5, compile (checks that read files): the dataset block, the model folder, a hand-edited vamc YAML.

Each function returns a list of one-line problems (empty: fine); `config.plan_compile` collects them
with the settings' own checks so that every problem is reported at once, before anything runs.
"""
from pathlib import Path

from ..base.spec import TOKENIZER_FILES, TOKENIZER_SIDE_FILES, read_config

CALIB_DATASETS = ("c4", "ceval", "alpaca")
DATASET_KEYS = ("type", "name", "path", "nsamples", "seqlen")


def dataset_block(block):
    """The `dataset:` block with the vendor's key order (unknown keys kept after them, sorted)."""
    known = {k: block[k] for k in DATASET_KEYS if k in block}
    return {**known, **{k: block[k] for k in sorted(block) if k not in DATASET_KEYS}}


def check_dataset(block, spec, dtype, where="dataset"):
    """Problems of a `dataset:` block (the vendor documents it in its quantization config; whether
    `vamc compile` reads it is not public). Its seqlen need not be a multiple of 16: calibration windows go
    through the frontend's PyTorch model during quantization, not through the compiled lengths."""
    if not isinstance(block, dict):
        return [f"{where}: expected a mapping with keys {', '.join(DATASET_KEYS)}"]
    p = []
    if dtype != "int8":
        p.append(f"{where}: calibration data is used by int8 builds only (drop it or use --dtype int8)")
    missing = [k for k in DATASET_KEYS if k not in block]
    if missing:
        p.append(f"{where}: missing {', '.join(missing)} (a block has {', '.join(DATASET_KEYS)})")
    if "type" in block and block["type"] != "huggingface":
        p.append(f"{where}.type: {block['type']!r}, the compiler documents only 'huggingface'")
    name, path = block.get("name"), block.get("path")
    if "name" in block and name not in CALIB_DATASETS:
        p.append(f"{where}.name: {name!r} is not one of {', '.join(CALIB_DATASETS)}")
    if "path" in block and (not isinstance(path, str) or not path.strip()):
        p.append(f"{where}.path: empty (give a hub id or a local copy of the dataset)")
    elif isinstance(path, str) and Path(path).exists():
        if name == "ceval" and not Path(path).is_dir():
            p.append(f"{where}.path: {path} is not a folder; ceval needs the unzipped ceval-exam folder")
        if name == "alpaca" and not (Path(path).is_file() and path.endswith(".json")):
            p.append(f"{where}.path: {path} is not a .json file; alpaca needs alpaca_data_cleaned.json")
    nsamples, seqlen = block.get("nsamples"), block.get("seqlen")
    if "nsamples" in block and not (_is_int(nsamples) and nsamples > 0):
        p.append(f"{where}.nsamples: {nsamples!r} must be a positive integer (the vendor uses 128)")
    if "seqlen" in block:
        if not (_is_int(seqlen) and seqlen > 0):
            p.append(f"{where}.seqlen: {seqlen!r} must be a positive integer (c4 1024, ceval 128, alpaca 512)")
        elif seqlen > spec.max_positions:
            p.append(f"{where}.seqlen: {seqlen} exceeds max_position_embeddings {spec.max_positions}")
    return p


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def check_checkpoint(folder):
    """Problems of the model folder as a compiler checkpoint: patched with our current files, not int8."""
    from ..patch import patch_status

    status = patch_status(folder)
    p = [f"checkpoint: {line} (run `skywork-deploy patch {folder}`)" if status["patched"] else
         f"checkpoint: {line}" for line in status["problems"]]
    qc = read_config(folder).get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "vacc_w8a16":
        p.append(f"checkpoint: {folder} holds int8 weights from `skywork-deploy quantize`; the compiler "
                 "quantizes itself (w8a16_gptq): pass the patched unquantized folder")
    return p


def tokenizer_sources(folder):
    """(tokenizer files to copy beside a compiled model, whether a chat template is among them)."""
    folder = Path(folder)
    files = [folder / name for name in TOKENIZER_SIDE_FILES if (folder / name).is_file()]
    if not any(p.name in TOKENIZER_FILES for p in files):
        return [], False
    chat = (folder / "chat_template.jinja").is_file()
    config = folder / "tokenizer_config.json"
    if not chat and config.is_file():
        chat = '"chat_template"' in config.read_text(encoding="utf-8", errors="replace")
    return files, chat


def check_tokenizer(folder):
    """Warnings: the compiled folder is served with <folder>/tokenizer, which is copied from the checkpoint."""
    files, chat = tokenizer_sources(folder)
    if not files:
        return [f"checkpoint: {folder} has no tokenizer (tokenizer.json or vocab.json); the compiled folder will "
                "need one in its tokenizer/ subfolder before `vastgenx serve` can use it"]
    if not chat:
        return [f"checkpoint: {folder} has no chat template (tokenizer_config.json chat_template or "
                "chat_template.jinja); chat completions on the compiled model will not use the model's format"]
    return []


def check_calib_tokenizer(manifest, folder, spec, where="calib"):
    """The calibration tokens must come from this model's tokenizer and fit its vocabulary.

    `manifest["tokenizer"]` is the calib stage's tokenizer identity: vocab_size (len of the tokenizer) and
    files ({file name: sha256} of the tokenizer files it loaded from the model folder).
    """
    from ..base.fsutil import sha256_file

    tok = manifest.get("tokenizer") if isinstance(manifest.get("tokenizer"), dict) else {}
    p = []
    vocab = tok.get("vocab_size")
    if _is_int(vocab) and vocab > spec.vocab_size:
        p.append(f"{where}: the calibration tokenizer has {vocab} tokens but {spec.name} has {spec.vocab_size} "
                 "embedding rows (re-run `skywork-deploy calib --model` with this model)")
    files = tok.get("files") if isinstance(tok.get("files"), dict) else {}
    for name, digest in sorted(files.items()):
        mine = Path(folder) / name
        if isinstance(digest, dict):
            digest = digest.get("sha256")
        if not mine.is_file() or isinstance(digest, str) and sha256_file(mine) != digest:
            p.append(f"{where}: {name} differs from the tokenizer the calibration set was built with "
                     "(re-run `skywork-deploy calib --model` with this model)")
    return p
