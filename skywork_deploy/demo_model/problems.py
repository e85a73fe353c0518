"""Seeded synthetic arithmetic problems, answered the way Skywork-OR1 answers: a short `<think>` trace done
column by column, then `\\boxed{answer}`.

Problems: `a + b` and `a - b` (a >= b) with 1-2 digit numbers, `a * b` with a 1-2 digit number and a one-digit
factor. Each problem falls in the held-out split or the training split by a hash of its text, so the held-out
problems are never seen in training whatever the seed.
"""
import hashlib
import random
from dataclasses import dataclass

OPS = ("+", "-", "*")
PHRASES = ("What is {q}?", "Compute {q}.", "Calculate {q}.")
HELDOUT_PERCENT = 10  # share of the problem space kept out of training


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int

    @property
    def expression(self):
        return f"{self.a} {self.op} {self.b}"

    @property
    def answer(self):
        return {"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op]

    def prompt(self, phrase=0):
        return PHRASES[phrase % len(PHRASES)].format(q=self.expression)

    @property
    def heldout(self):
        digest = hashlib.sha256(self.expression.encode()).digest()
        return digest[0] * 100 // 256 < HELDOUT_PERCENT


def _digits(n):
    return n // 10, n % 10


def _trace_add(a, b):
    (at, au), (bt, bu) = _digits(a), _digits(b)
    units = au + bu
    carry, u = units // 10, units % 10
    steps = [f"{au} + {bu} = {units}, write {u} carry {carry}."]
    tens = at + bt + carry
    steps.append(f"{at} + {bt} + {carry} = {tens}.")
    return steps


def _trace_sub(a, b):
    (at, au), (bt, bu) = _digits(a), _digits(b)
    if au >= bu:
        steps, borrow = [f"{au} - {bu} = {au - bu}, no borrow."], 0
    else:
        steps, borrow = [f"{au} < {bu}, borrow: {au + 10} - {bu} = {au + 10 - bu}."], 1
    steps.append(f"{at} - {borrow} - {bt} = {at - borrow - bt}.")
    return steps


def _trace_mul(a, b):
    at, au = _digits(a)
    units = au * b
    carry, u = units // 10, units % 10
    steps = [f"{au} * {b} = {units}, write {u} carry {carry}."]
    steps.append(f"{at} * {b} = {at * b}, {at * b} + {carry} = {at * b + carry}.")
    return steps


TRACES = {"+": _trace_add, "-": _trace_sub, "*": _trace_mul}


def solution(problem):
    """The assistant turn after `<think>\\n`: the trace, `</think>`, then the boxed answer."""
    steps = TRACES[problem.op](problem.a, problem.b)
    think = " ".join(steps) + f" So {problem.expression} = {problem.answer}."
    return f"{think}\n</think>\n\nThe answer is $\\boxed{{{problem.answer}}}$."


def all_problems():
    """Every problem of the space, in a fixed order."""
    out = []
    for a in range(100):
        for b in range(100):
            out.append(Problem(a, "+", b))
            if a >= b:
                out.append(Problem(a, "-", b))
            if b < 10:
                out.append(Problem(a, "*", b))
    return out


def split(heldout):
    """The held-out problems (heldout=True) or the training problems, in a fixed order."""
    return [p for p in all_problems() if p.heldout == heldout]


def sample(n, seed, heldout=False):
    """`n` distinct problems of one split, seeded; the three operations equally often."""
    rng = random.Random(seed)
    pool = {op: [p for p in split(heldout) if p.op == op] for op in OPS}
    for items in pool.values():
        rng.shuffle(items)
    out = []
    while len(out) < n:
        op = OPS[len(out) % len(OPS)]
        idx = len(out) // len(OPS)
        out.append(pool[op][idx % len(pool[op])])
    return out


def as_record(problem, phrase=0):
    """A problem in the column style of the published AIME / MATH-500 files."""
    return {"problem": problem.prompt(phrase), "answer": str(problem.answer)}
