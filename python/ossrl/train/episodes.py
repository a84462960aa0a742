"""Episodes for the loop: groups of them, rolling them out, scoring them, and demonstrations.

A :class:`Group` is the ``group_size`` episodes of one row; its number seeds the row and the
samples. Each episode has its own :class:`~ossrl.train.task.Episode` (environment and tools),
kept in memory while the group is paused between steps and rebuilt (a fresh ``reset`` and a
replay of its tool calls) when a checkpoint is resumed.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

import torch

from ..model.harmony import Message, encode_completion, encode_conversation, encode_pieces, render_pieces
from ..rollout.agent import Trajectory, advance, stream_seed
from ..rollout.engine import SamplingParams
from .config import TrainConfig
from .task import Episode, Scores, Task

__all__ = ["Group", "rollout", "run_episodes", "score", "demo_trajectory", "ENGINE_RETRIES"]

ENGINE_RETRIES = 2


def _prompt(tokenizer, ep: Episode) -> list[int]:
    return encode_conversation(tokenizer, ep.prompt, add_generation_prompt=True)


def _start(task: Task, tokenizer, row: dict, seed: int) -> tuple[Episode, Trajectory]:
    ep = task.start(row)
    t = Trajectory.start(_prompt(tokenizer, ep), seed)
    if ep.error is not None:  # the environment failed: nothing to sample, reward 0
        t.finish = "env_error"
    return ep, t


@dataclass
class Group:
    gid: int
    row: dict
    trajs: list[Trajectory]
    episodes: list[Episode] = field(default_factory=list)  # runtime only, never checkpointed

    @classmethod
    def new(cls, gid: int, task: Task, tokenizer, cfg: TrainConfig) -> "Group":
        row = task.train_row(gid)
        eps, trajs = zip(*(_start(task, tokenizer, row, stream_seed(cfg.seed, gid, j)) for j in range(cfg.group_size)))
        return cls(gid, row, list(trajs), list(eps))

    def oldest_version(self) -> int | None:
        from ..rollout.agent import CONTEXT

        return min((v for t in self.trajs for v in t.versions if v != CONTEXT), default=None)

    def close(self) -> None:
        for ep in self.episodes:
            ep.close()

    def to_json(self) -> dict:
        return {"gid": self.gid, "row": self.row, "trajs": [t.to_json() for t in self.trajs]}

    @classmethod
    def from_json(cls, d: dict, task: Task) -> "Group":
        """A checkpointed group; its environments are rebuilt by reset and replay."""
        row = d["row"] if "row" in d else dict(d["problem"])  # checkpoints before user tasks
        if not isinstance(row, dict):
            raise TypeError(f"row must be an object, got {type(row).__name__}")
        trajs = [Trajectory.from_json(t) for t in d["trajs"]]
        eps = []
        for t in trajs:
            ep = task.start(row)
            task.replay(ep, t.chat)
            eps.append(ep)
        return cls(int(d["gid"]), row, trajs, eps)


def rollout(engine, tokenizer, tools, trajs: list[Trajectory], cfg: TrainConfig, *, greedy: bool, version: int = 0,
            groups: list[list[int]] | None = None, quota: int | None = None, failures: list | None = None) -> list[int]:
    """Advances ``trajs`` in place (see ``ossrl.rollout.agent.advance``; ``tools``: one registry
    or one per trajectory) and returns the complete groups. An exception or out-of-memory inside
    the engine resets it and retries from the state the trajectories had before (their request
    numbers are their sampling seeds, so the retry samples what the first try would have); each
    failure is appended to ``failures``. Tool failures never get here: they are error messages
    in the conversation."""
    params = SamplingParams(temperature=0.0 if greedy else cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                            max_new_tokens=cfg.max_new_tokens)
    before = copy.deepcopy([t.__dict__ for t in trajs])
    was_training = engine.model.training
    engine.model.eval()
    try:
        for attempt in range(ENGINE_RETRIES + 1):
            engine.allocate_cache()
            try:
                done = advance(engine, tokenizer, tools, trajs, params, max_turns=cfg.max_turns,
                               tool_timeout=cfg.tool_timeout, max_concurrency=cfg.tool_concurrency, version=version,
                               groups=groups, quota=quota, reproducible=cfg.reproducible_rollouts)
                break
            except (RuntimeError, torch.OutOfMemoryError) as e:
                engine.reset()
                for t, state in zip(trajs, copy.deepcopy(before)):
                    t.__dict__.update(state)
                if failures is not None:
                    failures.append(f"{type(e).__name__}: {e}")
                if attempt == ENGINE_RETRIES:
                    raise
        engine.release_cache()  # the trainer takes the memory back
    finally:
        engine.model.train(was_training)
    return done


def trl_completion(chat: list[dict]) -> list[dict]:
    """An episode's messages as TRL hands them to reward functions: tool-call arguments parsed
    (when they are a JSON object), assistant content always a string."""
    out = []
    for m in chat:
        m = dict(m)
        if m.get("role") == "assistant":
            m["content"] = m.get("content") or ""
            calls = []
            for c in m.get("tool_calls") or ():
                fn = dict(c["function"])
                try:
                    args = json.loads(fn["arguments"])
                    if isinstance(args, dict):
                        fn["arguments"] = args
                except (TypeError, ValueError):
                    pass
                calls.append({**c, "function": fn})
            if calls:
                m["tool_calls"] = calls
        out.append(m)
    return out


def score(task: Task, rows: list[dict], eps: list[Episode], trajs: list[Trajectory], step: int = 0) -> Scores:
    """The task's rewards for finished episodes (their prompts and what they added)."""
    prompts = [_openai_prompt(r) for r in rows]
    sc = task.score(rows, eps, prompts, [trl_completion(t.chat) for t in trajs],
                    [[tok for tok, m in zip(t.tokens, t.loss_mask) if m] for t in trajs], step=step)
    # The environment's own tools failing (raising, hanging, an unprintable result; not the
    # model's malformed arguments, which never reach the tool) count as its errors, and the
    # episode gets reward 0: an environment that raises to refuse a move scores it as a failure.
    for i, t in enumerate(trajs):
        failures = sum(name in task.env_tools and err in _ENV_FAILURES for name, err in t.tool_log)
        if failures:
            sc.env_errors += failures
            sc.totals[i] = 0.0
    return sc


_ENV_FAILURES = ("exception", "timeout", "unavailable", "crash")


def _openai_prompt(row: dict) -> list[dict]:
    from ..model.chat import prompt_messages

    return prompt_messages(row["prompt"]) if "prompt" in row else []


def run_episodes(engine, tokenizer, task: Task, rows: list[dict], cfg: TrainConfig, *, greedy: bool,
                 seeds: list[int], failures: list | None = None) -> tuple[list[Trajectory], Scores]:
    """Every row run to the end once (evaluation): trajectories and their scores."""
    eps, trajs = [], []
    for r, s in zip(rows, seeds):
        ep, t = _start(task, tokenizer, r, s)
        eps.append(ep)
        trajs.append(t)
    try:
        rollout(engine, tokenizer, [ep.registry for ep in eps], trajs, cfg, greedy=greedy, failures=failures)
        return trajs, score(task, rows, eps, trajs)
    finally:
        for ep in eps:
            ep.close()


def demo_trajectory(tokenizer, messages: list[Message]) -> Trajectory:
    """A demonstration (harmony messages) as a trajectory: the leading prompt is context; every
    assistant message is a model turn carrying the loss (in the form the model writes it, ending
    ``<|call|>`` or ``<|return|>``, or ``<|end|>`` plus the next ``<|start|>assistant`` when the
    assistant goes on); tool results and other messages in between are context."""
    k = 0
    while k < len(messages) and messages[k].role != "assistant":
        k += 1
    t = Trajectory.start(encode_conversation(tokenizer, messages[:k], add_generation_prompt=True))
    for j in range(k, len(messages)):
        m = messages[j]
        if m.role == "assistant":
            goes_on = j + 1 < len(messages) and messages[j + 1].role == "assistant"
            if goes_on:  # history form, then the model opens its next message itself
                piece = encode_pieces(tokenizer, render_pieces([m])[2:] + render_pieces([], add_generation_prompt=True))
            else:
                piece = encode_completion(tokenizer, m)
            t.append(piece, sampled=True, logprobs=[0.0] * len(piece))
        else:
            t.append(encode_conversation(tokenizer, [m], add_generation_prompt=True), sampled=False)
    return t
