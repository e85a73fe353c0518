"""The tokenizer files of a model folder, parsed and checked before any stage trusts them.

Every JSON tokenizer file must parse (strictly: duplicate keys refused) to an object, the text files must be
UTF-8, every token id must be a non-negative integer, and config.json's `vocab_size` must cover the largest
one: a smaller embedding would be indexed past its end by the calibration windows and every prompt.
"""
from pathlib import Path

from .errors import ModelFormatError
from .spec import TOKENIZER_FILES, check_tensor_names, tokenizer_files
from .strict import read_input_text, read_json_file

JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "special_tokens_map.json",
              "added_tokens.json", "generation_config.json")
MAX_BYTES = 64 << 20  # Qwen2's tokenizer.json is 7 MB


def check_model_files(folder, spec, allow_extra_tensors=False, tokenizer_required=True, vocab_coverage=True):
    """What a stage reads beside config.json, checked at its start: the tensors (every one explained by the
    config unless `allow_extra_tensors`) and the tokenizer files (when there are any, or `tokenizer_required`)."""
    check_tensor_names(folder, spec, allow_extra_tensors)
    if tokenizer_required or any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        check_tokenizer_files(folder, spec, vocab_coverage)


def check_tokenizer_files(folder, spec, vocab_coverage=True):
    """Parse and check the tokenizer files of `folder` against `spec` (ModelSpec); returns the largest id.

    `vocab_coverage`: refuse a vocab_size below the largest id (patch and calib; export and quantize read
    weights only, and the test suite exports 1,024-row embeddings under the real tokenizer for speed)."""
    top, where = -1, None
    for path in tokenizer_files(folder):
        if path.name not in JSON_FILES:  # merges.txt, chat_template.jinja
            read_input_text(path, ModelFormatError, MAX_BYTES, "tokenizer file")
            continue
        data = read_json_file(path, ModelFormatError, MAX_BYTES)
        if not isinstance(data, dict):
            raise ModelFormatError(f"{path}: expected a JSON object (restore the model's original file)")
        _check_template(path, data)
        for token_id in _ids(path, data):
            if token_id > top:
                top, where = token_id, path
    if vocab_coverage and top >= spec.vocab_size:
        raise ModelFormatError(f"{Path(folder) / 'config.json'}: vocab_size {spec.vocab_size} does not cover the "
                               f"tokenizer's id {top} ({where.name}); the embedding would be indexed past its end: "
                               "use the config and tokenizer that belong together")
    return top


def _ids(path, data):
    if path.name in ("vocab.json", "added_tokens.json"):
        values = list(data.values())
    elif path.name == "tokenizer.json":
        model = data.get("model") if isinstance(data.get("model"), dict) else {}
        vocab = model.get("vocab")
        values = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab or [])))
        values += [t.get("id") if isinstance(t, dict) else t for t in data.get("added_tokens") or []]
    elif path.name == "tokenizer_config.json":
        values = [_int_key(path, k) for k in (data.get("added_tokens_decoder") or {})]
    else:
        return []
    for value in values:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ModelFormatError(f"{path}: token id {value!r} is not a non-negative integer (restore the "
                                   "model's original file)")
    return values


def _int_key(path, key):
    try:
        return int(key)
    except ValueError:
        raise ModelFormatError(f"{path}: added_tokens_decoder key {key!r} is not a token id") from None


def _check_template(path, data):
    template = data.get("chat_template")
    if template is not None and not isinstance(template, (str, list)):
        raise ModelFormatError(f"{path}: chat_template is a {type(template).__name__}; expected a text (or a list "
                               "of named templates)")
