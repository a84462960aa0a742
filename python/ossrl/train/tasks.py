"""Built-in tasks, on the same contract as a user's (see :mod:`ossrl.train.task`).

* ``arithmetic`` (the default): two-operand arithmetic that needs the ``calculator`` tool. Rows
  come from a seeded generator (``prompt``, ``answer``), the reward is :func:`exact_answer`, the
  warm-up demonstrations are OpenAI-style conversations from :meth:`ArithmeticTask.demonstration`.
* ``lookup``: an environment (:class:`LookupEnv`) holds two secret numbers; the question asks
  for their sum, so an episode needs two dependent ``lookup`` calls and then the calculator
  (four model turns: set ``max_turns`` to 4 or more).

Problems come from a seeded generator, so step N of a run sees the same problems whether or not
the run was resumed; held-out problems are drawn from a disjoint set (a hash of the problem
decides its split).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

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

    def row(self, p: Problem) -> dict:
        return {"prompt": p.prompt, "answer": p.answer}

    def demonstration(self, p: Problem, rng: random.Random | None = None) -> list[dict]:
        """The conversation after the prompt (OpenAI messages): call the tool, read its result,
        answer with it.

        The teacher does not always use the tool: with probability ``demo_guess_rate`` (drawn
        from ``rng``) it answers at once with a wild guess, the first number of the question
        (never right: both operands are at least 10). The warm-up thus teaches the whole tool
        format (call, read the result, answer with it) but leaves the policy unsure whether to
        use the tool at all: the decision RL with a verifiable reward has to make. The guess is
        deliberately unrelated to the answer's digits: a guess one digit off taught the small
        model digit heuristics that then corrupted its copying of the tool's result."""
        if rng is not None and rng.random() < self.demo_guess_rate:
            return [{"role": "assistant", "content": _first_operand(p.prompt)}]
        # The calculator takes its expression as plain text too: a short call for a small model.
        return [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_0", "type": "function", "function": {"name": "calculator", "arguments": p.prompt}}]},
            {"role": "tool", "tool_call_id": "call_0", "content": p.answer},
            {"role": "assistant", "content": p.answer},
        ]


def _first_operand(expr: str) -> str:
    return expr[:next(i for i, c in enumerate(expr) if i and c in "+-*")]


def _apply(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def final_answer(completion: list[dict]) -> str | None:
    """The episode's answer: the content of its last message when that is an assistant message
    without tool calls (an episode that stopped at a call, or never answered, has none)."""
    last = completion[-1] if completion else None
    if not isinstance(last, dict) or last.get("role") != "assistant" or last.get("tool_calls"):
        return None
    content = last.get("content")
    return content if isinstance(content, str) and content else None


def exact_answer(completions: list[list[dict]], answer: list, **kwargs) -> list[float]:
    """1.0 where the final answer, stripped, equals the row's ``answer`` column, else 0.0."""
    out = []
    for c, a in zip(completions, answer):
        got = final_answer(c)
        out.append(1.0 if got is not None and got.strip() == str(a).strip() else 0.0)
    return out


class LookupEnv:
    """Two secret numbers per episode, one ``lookup`` away each (TRL environment convention)."""

    def __init__(self):
        self.values: dict[str, int] = {}
        self.looked_up: list[str] = []

    def reset(self, keys: list[str], values: list[int], **row) -> None:
        self.values = dict(zip(keys, values))
        self.looked_up = []
        return None

    def lookup(self, key: str) -> str:
        """Look up the secret number stored under a key.

        Args:
            key: The key, for example "x3".
        """
        if key not in self.values:
            raise KeyError(f"no number is stored under {key!r}; keys: {', '.join(self.values)}")
        self.looked_up.append(key)
        return str(self.values[key])


class LookupTask:
    name = "lookup"

    @staticmethod
    def sample(rng: random.Random, n: int, split: str = "train") -> list[dict]:
        out = []
        while len(out) < n:
            keys = [f"{c}{rng.randint(0, 9)}" for c in "xy"]
            values = [rng.randint(10, 99), rng.randint(10, 99)]
            h = hashlib.sha256(repr((keys, values)).encode()).digest()[0]
            if ("eval" if h < 32 else "train") != split:
                continue
            out.append({"prompt": f"{keys[0]}+{keys[1]}", "keys": keys, "values": values,
                        "answer": str(sum(values))})
        return out

    @staticmethod
    def demonstration(row: dict) -> list[dict]:
        (a, b), (va, vb) = row["keys"], row["values"]

        def call(i: int, name: str, args: str) -> list[dict]:
            return [{"role": "assistant", "content": None, "tool_calls": [
                {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}}]}]
        return (call(0, "lookup", '{"key": "%s"}' % a) + [{"role": "tool", "tool_call_id": "call_0", "content": str(va)}]
                + call(1, "lookup", '{"key": "%s"}' % b) + [{"role": "tool", "tool_call_id": "call_1", "content": str(vb)}]
                + call(2, "calculator", f"{va}+{vb}") + [{"role": "tool", "tool_call_id": "call_2", "content": row["answer"]}]
                + [{"role": "assistant", "content": row["answer"]}])


TASKS = ("arithmetic", "lookup")


def builtin_task(cfg, reward_funcs: list, tools: list):
    """A built-in task as a :class:`~ossrl.train.task.Task`: generated rows, built-in reward,
    tools and demonstrations (no chat preamble: the tiny model learns the format from them)."""
    from .task import Task, TaskError, _env_schemas, _openai_spec
    from ..rollout.tools import ToolRegistry

    name = cfg.task or "arithmetic"
    if name not in TASKS:
        raise TaskError(f"config key 'task': unknown task {name!r} (built in: {', '.join(TASKS)}; "
                        "or give a dataset or an environment_factory)")
    if reward_funcs or tools or cfg.sft_dataset or cfg.eval_dataset:
        raise TaskError(f"the built-in task {name!r} brings its own rewards, tools and demonstrations: "
                        "reward_funcs, tools, sft_dataset and eval_dataset need a dataset or an environment_factory")
    seed = cfg.seed
    if name == "arithmetic":
        t = ArithmeticTask(demo_guess_rate=cfg.demo_guess_rate)

        def demos(step, batch, lo, hi):
            probs = t.sample(random.Random(f"{seed}-sft-{step}"), batch)
            return [[{"role": "user", "content": p.prompt}]
                    + t.demonstration(p, random.Random(f"{seed}-demo-{step}-{j}")) for j, p in
                    enumerate(probs[lo:hi], lo)]
        return Task(name, lambda gid: t.row(t.sample(random.Random(f"{seed}-group-{gid}"), 1)[0]),
                    lambda n: [t.row(p) for p in t.sample(random.Random(f"{seed}-eval"), n, split="eval")],
                    demos, [exact_answer], [1.0], ["calculator"], preamble=False, tool_timeout=cfg.tool_timeout,
                    specs=ToolRegistry(builtins=["calculator"]).specs())

    def lookup_demos(step, batch, lo, hi):
        rows = LookupTask.sample(random.Random(f"{seed}-sft-{step}"), batch)
        return [[{"role": "user", "content": r["prompt"]}] + LookupTask.demonstration(r) for r in rows[lo:hi]]
    specs = ToolRegistry(builtins=["calculator"]).specs() + [_openai_spec(s) for s in _env_schemas(LookupEnv)]
    return Task(name, lambda gid: LookupTask.sample(random.Random(f"{seed}-group-{gid}"), 1)[0],
                lambda n: LookupTask.sample(random.Random(f"{seed}-eval"), n, split="eval"),
                lookup_demos, [exact_answer], [1.0], ["calculator"], environment_factory=LookupEnv,
                preamble=False, tool_timeout=cfg.tool_timeout, specs=specs, env_tools=["lookup"])
