"""Text rendering of C-Eval and Alpaca records (pure functions; templates from REFERENCE.md §4)."""

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
CEVAL_CHOICES = ("A", "B", "C", "D")
CEVAL_ANSWER = "\n答案："


def render_alpaca(record):
    """The prompt (with or without the Input block) followed by the output."""
    inp = record.get("input") or ""
    if inp.strip():
        prompt = ALPACA_WITH_INPUT.format(instruction=record["instruction"], input=inp)
    else:
        prompt = ALPACA_NO_INPUT.format(instruction=record["instruction"])
    return prompt + record["output"]


def render_ceval(row, with_answer):
    """The question, `\\nA. ...` for each choice, then `\\n答案：` and the answer when the split has answers."""
    text = row["question"] + "".join(f"\n{c}. {row[c]}" for c in CEVAL_CHOICES)
    if with_answer:
        text += CEVAL_ANSWER + row["answer"].strip()
    return text
