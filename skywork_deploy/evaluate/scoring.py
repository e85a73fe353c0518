"""Scoring one response against a gold answer with Math-Verify (the `math-verify` package).

The response's answer is the text after its last `</think>` (a reasoning model's final answer; the whole text
when the model never closed its thought). Both sides go through `math_verify.parse`; a gold answer or a
prediction that parses to no math expression (nothing, or only Math-Verify's raw-string fallback) is
counted as unparsable, separately from right and wrong.
"""
import threading

from ..base.errors import BackendUnavailableError

THINK_END = "</think>"
CORRECT, WRONG = "correct", "wrong"
GOLD_UNPARSABLE, PRED_UNPARSABLE = "gold_unparsable", "prediction_unparsable"
STATUSES = (CORRECT, WRONG, GOLD_UNPARSABLE, PRED_UNPARSABLE)


def _math_verify():
    try:
        import math_verify
    except ImportError:
        raise BackendUnavailableError("scoring needs the `math-verify` package: pip install math-verify") from None
    return math_verify


def _timeout():
    # math-verify times out through SIGALRM, which only the main thread may use.
    return 5 if threading.current_thread() is threading.main_thread() else None


def final_answer(text):
    """The part of a response after its last `</think>`, stripped (the whole text when there is none)."""
    head, sep, tail = text.rpartition(THINK_END)
    return (tail if sep else text).strip()


def _parse(text):
    """math_verify.parse, [] when it found no expression (its fallback returns the raw string alone)."""
    parsed = _math_verify().parse(text, parsing_timeout=_timeout())
    return parsed if any(not isinstance(x, str) for x in parsed) else []


def parse_gold(gold):
    """A gold answer -> Math-Verify's parsed form ([] when unparsable). A bare answer such as `\\frac{14}{3}`
    is read as LaTeX math; a solution text is read through its `\\boxed{}`."""
    gold = str(gold).strip()
    if not gold:
        return []
    if "$" in gold or "\\boxed" in gold:
        return _parse(gold)
    return _parse(f"${gold}$") or _parse(gold)


def score(response, gold, parsed_gold=None):
    """-> (status, extracted prediction as text or None). `parsed_gold` skips re-parsing the gold answer."""
    mv = _math_verify()
    gold_p = parse_gold(gold) if parsed_gold is None else parsed_gold
    if not gold_p:
        return GOLD_UNPARSABLE, None
    answer = final_answer(response)
    pred = _parse(answer) if answer else []
    if not pred:
        return PRED_UNPARSABLE, None
    ok = mv.verify(gold_p, pred, timeout_seconds=_timeout())
    return (CORRECT if ok else WRONG), str(pred[-1])
