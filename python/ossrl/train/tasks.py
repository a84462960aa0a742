"""Built-in multi-turn tool tasks.

A task makes problems (a user prompt and the right answer), a demonstration conversation for
the supervised warm-up, and scores the final answer. Problems come from a seeded generator, so
step N of a run sees the same problems whether or not the run was resumed; held-out problems
are drawn from a disjoint set (a hash of the problem decides its split).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from ..model.harmony import Message, tool_result


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


class ArithmeticTask:
    """Two-operand arithmetic that needs the calculator tool.

    A small model cannot multiply two-digit numbers in its head, so the reliable way to the
    reward is the multi-turn one: call ``calculator`` with the expression, read the result,
    answer with it in the final channel.
    """

    name = "arithmetic"
    tools = ("calculator",)
    system = "Use the calculator tool, then give only the number."

    def __init__(self, low: int = 10, high: int = 99, ops: str = "+-*", demo_guess_rate: float = 0.0):
        # Two-digit operands: a fixed-width prompt, so copying it into the call is a fixed offset.
        self.low, self.high, self.ops = low, high, ops
        if not 0.0 <= demo_guess_rate <= 1.0:
            raise ValueError(f"demo_guess_rate must be in [0, 1], got {demo_guess_rate}")
        self.demo_guess_rate = demo_guess_rate

    @staticmethod
    def _split(a: int, op: str, b: int) -> str:
        h = hashlib.sha256(f"{a}{op}{b}".encode()).digest()[0]
        return "eval" if h < 32 else "train"  # 1/8 of all problems are held out

    def sample(self, rng: random.Random, n: int, split: str = "train") -> list[Problem]:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        out = []
        while len(out) < n:
            a, b = rng.randint(self.low, self.high), rng.randint(self.low, self.high)
            op = rng.choice(self.ops)
            if self._split(a, op, b) != split:
                continue
            out.append(Problem(prompt=f"{a}{op}{b}", answer=str(_apply(a, op, b))))
        return out

    def prompt(self, p: Problem) -> list[Message]:
        return [Message("user", p.prompt)]

    def demonstration(self, p: Problem, rng: random.Random | None = None) -> list[Message]:
        """The conversation after the prompt: call the tool, read its result, answer with it.

        The teacher does not always use the tool: with probability ``demo_guess_rate`` (drawn
        from ``rng``) it answers at once with a wild guess, the first number of the question
        (never right: both operands are at least 10). The warm-up thus teaches the whole tool
        format (call, read the result, answer with it) but leaves the policy unsure whether to
        use the tool at all: the decision RL with a verifiable reward has to make. The guess is
        deliberately unrelated to the answer's digits: a guess one digit off taught the small
        model digit heuristics that then corrupted its copying of the tool's result."""
        if rng is not None and rng.random() < self.demo_guess_rate:
            return [Message("assistant", _first_operand(p.prompt), channel="final")]
        # The calculator takes its expression as plain text too: a short call for a small model.
        call = Message("assistant", p.prompt, channel="commentary", recipient="functions.calculator")
        return [
            call,
            tool_result("calculator", p.answer),
            Message("assistant", p.answer, channel="final"),
        ]

    def reward(self, p: Problem, final_answer: str | None) -> float:
        return 1.0 if final_answer is not None and final_answer.strip() == p.answer else 0.0


def _first_operand(expr: str) -> str:
    return expr[:next(i for i, c in enumerate(expr) if i and c in "+-*")]


def _apply(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


TASKS = {"arithmetic": ArithmeticTask}


def make_task(name: str, **options):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} (built in: {', '.join(TASKS)})")
    return TASKS[name](**options)
