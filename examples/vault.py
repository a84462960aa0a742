"""A complete user task for ``ossrl train``: an environment, a reward function and the data.

Each episode's vault holds two numbered boxes; the question names them ("a3+b7") and the answer
is the sum of what they hold. The model must open both boxes (two dependent calls to the
environment's ``open_box`` tool), add the numbers (the built-in ``calculator``), and answer.

    python examples/vault.py data/               # rows.jsonl, eval.jsonl, demos.jsonl
    cd examples && ossrl train --run-dir ../runs/vault dataset=../data/rows.jsonl \\
        eval_dataset=../data/eval.jsonl sft_dataset=../data/demos.jsonl environment_factory=vault:Vault \\
        'reward_funcs=["vault:exact"]' 'tools=["calculator"]' max_turns=4 chat_preamble=false \\
        sft_steps=1000 steps=40 eval_every=5 eval_prompts=100

The same from Python: ``ossrl.train.run({...}, environment_factory=Vault, reward_funcs=[exact],
tools=["calculator"])``. Nothing here imports ossrl: the classes follow TRL's conventions, so
TRL's GRPOTrainer takes them as they are.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path


class Vault:
    """Two boxes per episode, filled from the dataset row (``reset(**row)``)."""

    def __init__(self):
        self.boxes: dict[str, int] = {}
        self.opened: list[str] = []

    def reset(self, boxes: dict, **row) -> None:
        self.boxes = {k: int(v) for k, v in boxes.items()}
        self.opened = []
        return None  # the row's prompt is the question

    def open_box(self, box: str) -> str:
        """Open a box of the vault and read the number inside.

        Args:
            box: The box's label, for example "a3".
        """
        if box not in self.boxes:
            raise KeyError(f"there is no box {box!r}")
        self.opened.append(box)
        return str(self.boxes[box])


def exact(completions, answer, **kwargs) -> list[float]:
    """1.0 when the episode's last message is the right sum, else 0.0 (TRL's signature)."""
    out = []
    for messages, want in zip(completions, answer):
        last = messages[-1] if messages else {}
        ok = last.get("role") == "assistant" and not last.get("tool_calls") and \
            str(last.get("content", "")).strip() == str(want)
        out.append(1.0 if ok else 0.0)
    return out


def make_row(rng: random.Random) -> dict:
    a, b = f"a{rng.randint(0, 9)}", f"b{rng.randint(0, 9)}"
    va, vb = rng.randint(10, 99), rng.randint(10, 99)
    return {"prompt": f"{a}+{b}", "boxes": {a: va, b: vb}, "answer": str(va + vb)}


def demonstration(row: dict, rng: random.Random, guess_rate: float = 0.5) -> list[dict]:
    """A teacher who opens both boxes and adds them, or (guess_rate of the time) answers at once
    with a wrong guess: the warm-up teaches the format, RL has to teach using the tools."""
    (a, va), (b, vb) = row["boxes"].items()
    msgs: list[dict] = [{"role": "user", "content": row["prompt"]}]
    if rng.random() < guess_rate:
        return msgs + [{"role": "assistant", "content": str(va)}]
    for i, (name, args, result) in enumerate([("open_box", {"box": a}, va), ("open_box", {"box": b}, vb),
                                              ("calculator", f"{va}+{vb}", va + vb)]):
        arguments = args if isinstance(args, str) else json.dumps(args)
        msgs.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": arguments}}]})
        msgs.append({"role": "tool", "tool_call_id": f"c{i}", "content": str(result)})
    return msgs + [{"role": "assistant", "content": row["answer"]}]


def main(out: str) -> None:
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    rows = [make_row(rng) for _ in range(4000)]
    train, held = rows[:3800], rows[3800:]
    for name, part in (("rows.jsonl", train), ("eval.jsonl", held)):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    (d / "demos.jsonl").write_text("".join(json.dumps({"messages": demonstration(r, rng)}) + "\n" for r in train))
    print(f"wrote {len(train)} rows, {len(held)} held-out rows and {len(train)} demonstrations to {d}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data")
