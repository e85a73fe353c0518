"""The demo model's own tokenizer: a small byte-level BPE trained with `tokenizers` on the problem corpus,
digits split one per token, DeepSeek-R1's special tokens and chat template (as Skywork-OR1 uses)."""
from pathlib import Path

from ..base.synth import BOS, R1_SPECIAL_TOKENS, write_r1_tokenizer_config


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
    write_r1_tokenizer_config(folder, "PreTrainedTokenizerFast", {t: tok.token_to_id(t) for t in R1_SPECIAL_TOKENS},
                              model_max_length=512)


def render_prompt(text):
    """The R1 chat template applied to one user turn with the generation prompt (no tokenizer needed)."""
    return f"{BOS}<｜User｜>{text}<｜Assistant｜><think>\n"
