"""The demo model's own tokenizer: a small byte-level BPE trained with `tokenizers` on the problem corpus,
digits split one per token, DeepSeek-R1's special tokens and chat template (as Skywork-OR1 uses)."""
import json
from pathlib import Path

from ..synth import BOS, CHAT_TEMPLATE, EOS, R1_SPECIAL_TOKENS


def train_tokenizer(texts, vocab_size):
    """Texts -> a `tokenizers.Tokenizer` (byte-level BPE, R1 special tokens first, ids 0..6)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(R1_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok, folder):
    """Write tokenizer.json and tokenizer_config.json (special tokens, R1 chat template) into `folder`."""
    folder = Path(folder)
    tok.save(str(folder / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in R1_SPECIAL_TOKENS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in R1_SPECIAL_TOKENS if t not in (BOS, EOS)],
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": None,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 512, "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")


def render_prompt(text):
    """The R1 chat template applied to one user turn with the generation prompt (no tokenizer needed)."""
    return f"{BOS}<｜User｜>{text}<｜Assistant｜><think>\n"
