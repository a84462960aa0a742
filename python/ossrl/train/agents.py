"""Training agents written against the OpenAI API (``agent = "pkg.mod:fn"``), token in, token out.

``async def fn(client, **row) -> float | None`` runs one episode with an ``openai.AsyncOpenAI``
client whose requests go to the colocated engine, through an in-process ``ossrl serve`` on
127.0.0.1 with one URL per episode (``/episodes/ID/v1``). Every request of the episode is
recorded with its prompt token ids and the sampled token ids and log-probs, and training uses
exactly those: nothing is re-tokenized. When a request's messages extend the previous request's
messages plus the answer it got (a conversation that goes on), its prompt is the exact tokens
of that request and answer followed by the new messages, so the engine resumes its kept cache
and the episode stays one training sequence; when they do not (the agent edited its history),
the episode becomes several sequences, each trained with the episode's reward.

The return value is the reward; None lets the task's ``reward_funcs`` score the episode (its
completion: the messages of its last request after the row's prompt, then the last answer). An
agent that raises or runs past ``agent_timeout`` gets reward 0 and is counted (``agent_errors``).
Agent episodes are never paused between steps: the rollout phase waits for every episode of
the step (an agent's state lives in its coroutine, which cannot be checkpointed), so
``extra_groups`` does not apply and each step trains on the policy that sampled it (staleness 0).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..model.chat import from_openai, prompt_messages
from ..model.harmony import encode_conversation
from ..rollout.agent import Trajectory

__all__ = ["EpisodeBook", "AgentEpisode", "run_agent_episodes"]


@dataclass
class _Request:
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]
    routing: bytes = b""  # the engine's expert record of this request's token stream, from its start


@dataclass
class AgentEpisode:
    row: dict
    requests: list[_Request] = field(default_factory=list)
    last_messages: list | None = None  # the previous request's messages ...
    last_answer: dict | None = None  # ... and the assistant message it got
    last_tokens: list[int] | None = None  # its prompt and sampled tokens
    reward: float | None = None
    error: str | None = None
    completion: list[dict] = field(default_factory=list)

    def sequences(self, version: int) -> list[Trajectory]:
        """The training sequences: one per run of requests that extend each other."""
        out: list[Trajectory] = []
        cur: Trajectory | None = None
        for r in self.requests:
            if cur is not None and len(r.prompt) >= len(cur.tokens) and r.prompt[: len(cur.tokens)] == cur.tokens:
                cur.append(r.prompt[len(cur.tokens):], sampled=False)
            else:
                cur = Trajectory.start(r.prompt)
                out.append(cur)
            cur.append(r.tokens, sampled=True, logprobs=r.logprobs, version=version)
            cur.take_routing(r.routing)
        return out


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _answer_matches(sent: dict, got: dict) -> bool:
    """The assistant message the agent sends back is the one it got (ids and text as given)."""
    if sent.get("role") != "assistant":
        return False
    calls_a = [(c.get("function") or {}).get("name") for c in sent.get("tool_calls") or ()]
    calls_b = [(c.get("function") or {}).get("name") for c in got.get("tool_calls") or ()]
    args_a = [(c.get("function") or {}).get("arguments") for c in sent.get("tool_calls") or ()]
    args_b = [(c.get("function") or {}).get("arguments") for c in got.get("tool_calls") or ()]
    return calls_a == calls_b and args_a == args_b and (sent.get("content") or "") == (got.get("content") or "")


class EpisodeBook:
    """What the in-process server asks about episodes: their prompts and their records."""

    def __init__(self, tokenizer, preamble: bool):
        self.tokenizer, self.preamble = tokenizer, preamble
        self.episodes: dict[str, AgentEpisode] = {}
        self.lock = threading.Lock()

    def open(self, row: dict) -> str:
        eid = secrets.token_hex(8)
        with self.lock:
            self.episodes[eid] = AgentEpisode(row)
        return eid

    def known(self, eid: str) -> bool:
        return eid in self.episodes

    def prompt(self, eid: str, body: dict, gen) -> list[int]:
        ep = self.episodes[eid]
        msgs = body.get("messages") or []
        k = len(ep.last_messages or [])
        if (ep.last_tokens is not None and len(msgs) > k and _same(msgs[:k], ep.last_messages)
                and isinstance(msgs[k], dict) and _answer_matches(msgs[k], ep.last_answer or {})):
            tail = msgs[k + 1:]
            if not tail or any(isinstance(m, dict) and m.get("role") in ("system", "developer") for m in tail):
                return gen.prompt  # nothing new, or instructions that render before the conversation
            # the answer as it was sampled, then the new messages rendered after it
            names = [dict(msgs[k], content=None)]  # lets tool messages find their call's name
            head = from_openai(names, preamble=False)
            rest = from_openai(names + list(tail), preamble=False)[len(head):]
            return ep.last_tokens + encode_conversation(self.tokenizer, rest, add_generation_prompt=True) + gen.prefix
        return gen.prompt

    def record(self, eid: str, body: dict, gen, choices: list, reqs) -> None:
        ep = self.episodes.get(eid)
        if ep is None:
            return
        with self.lock:
            for (tokens, logprobs, _), req in zip(choices, reqs):
                out = getattr(req.seq, "out", None)
                routing = bytes(out.routing) if out is not None and out.routing is not None else b""
                ep.requests.append(_Request(list(gen.prompt), list(tokens), list(logprobs), routing))
            tokens, _, message = choices[0]
            ep.last_messages = list(body.get("messages") or [])
            ep.last_answer = message
            ep.last_tokens = list(gen.prompt) + list(tokens)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentServer:
    """``ossrl serve`` in-process, for one rollout phase: started, used, stopped."""

    def __init__(self, engine, tokenizer, *, preamble: bool, max_requests: int = 4096):
        import uvicorn

        from ..serve.app import create_app
        from ..serve.runner import EngineRunner

        self.book = EpisodeBook(tokenizer, preamble)
        self.runner = EngineRunner(engine, max_requests=max_requests)
        self.app = create_app(engine.model, tokenizer, model_name="policy", preamble=preamble, any_model=True,
                              runner=self.runner, book=self.book, max_cache_tokens=engine.capacity_tokens)
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, name="ossrl-agent-server", daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if time.monotonic() - t0 > 60 or not self.thread.is_alive():
                raise RuntimeError("the agents' in-process server did not start")
            time.sleep(0.01)

    def url(self, eid: str) -> str:
        return f"http://127.0.0.1:{self.port}/episodes/{eid}/v1"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.runner.close()


def run_agent_episodes(fn, engine, tokenizer, rows: list[dict], *, preamble: bool, timeout: float,
                       concurrency: int = 256) -> tuple[list[AgentEpisode], dict]:
    """Runs ``fn(client, **row)`` for every row (one episode each) against the engine; returns
    the episodes (records, rewards or errors) and the phase's stats."""
    import openai

    srv = AgentServer(engine, tokenizer, preamble=preamble)
    eids = [srv.book.open(dict(r)) for r in rows]

    async def one(eid: str, row: dict, sem: asyncio.Semaphore) -> None:
        ep = srv.book.episodes[eid]
        async with sem:
            client = openai.AsyncOpenAI(base_url=srv.url(eid), api_key="ossrl", max_retries=0, timeout=timeout)
            try:
                ep.reward = await asyncio.wait_for(fn(client, **row), timeout)
                if ep.reward is not None:
                    ep.reward = float(ep.reward)
            except asyncio.TimeoutError:
                ep.error = f"the agent ran longer than agent_timeout ({timeout:g} s)"
            except Exception as e:  # noqa: BLE001 - the episode fails, the step goes on
                ep.error = f"{type(e).__name__}: {e}"
            finally:
                await client.close()
        prompt = prompt_messages(row["prompt"]) if "prompt" in row else []
        msgs = list(ep.last_messages or [])
        ep.completion = msgs[len(prompt):] + ([ep.last_answer] if ep.last_answer else [])

    async def main():
        sem = asyncio.Semaphore(max(1, concurrency))
        await asyncio.gather(*(one(e, r, sem) for e, r in zip(eids, rows)))
    try:
        asyncio.run(main())
    finally:
        srv.close()
    st = srv.runner.stats
    stats = {"agent_requests": st["requests"],
             "agent_prefix_reuse": st["reused_tokens"] / st["prompt_tokens"] if st["prompt_tokens"] else 0.0}
    return [srv.book.episodes[e] for e in eids], stats


def agent_eval(task, engine, tokenizer, rows: list[dict], cfg, step: int) -> list[float]:
    """One agent episode per held-out row: the rewards."""
    return _agent_phase(task, engine, tokenizer, rows, cfg, 0, step)[2]


def agent_rollout(task, engine, tokenizer, group_rows: list[dict], cfg, version: int, step: int):
    """One rollout phase of agent episodes, ``group_size`` per row: (training sequences, the
    episode each belongs to, one reward per episode, the reward functions' scores, stats)."""
    return _agent_phase(task, engine, tokenizer, [r for r in group_rows for _ in range(cfg.group_size)], cfg,
                        version, step)


def _agent_phase(task, engine, tokenizer, rows: list[dict], cfg, version: int, step: int):
    import math

    from .task import Episode, Scores

    was = engine.model.training
    engine.model.eval()
    engine.allocate_cache()
    try:
        eps, stats = run_agent_episodes(task.agent, engine, tokenizer, rows, preamble=task.preamble,
                                        timeout=cfg.agent_timeout, concurrency=cfg.tool_concurrency)
    finally:
        engine.release_cache()
        engine.model.train(was)
    rewards, errors = [], 0
    for ep in eps:
        r = ep.reward if ep.error is None else 0.0
        if ep.error is None and r is not None and not math.isfinite(r):
            ep.error, r = f"the agent returned {r}", 0.0
        errors += ep.error is not None
        rewards.append(r)
    scores: list[Scores] = []
    todo = [i for i, r in enumerate(rewards) if r is None]
    if todo and task.reward_funcs:
        sc = task.score([eps[i].row for i in todo], [Episode([], None) for _ in todo],
                        [prompt_messages(eps[i].row["prompt"]) if "prompt" in eps[i].row else [] for i in todo],
                        [eps[i].completion for i in todo],
                        [[t for r in eps[i].requests for t in r.tokens] for i in todo], step=step)
        for i, total in zip(todo, sc.totals):
            rewards[i] = total
        scores.append(sc)
    rewards = [0.0 if r is None else r for r in rewards]
    trajs, owners = [], []
    for k, ep in enumerate(eps):
        for t in ep.sequences(version):
            trajs.append(t)
            owners.append(k)
    stats.update(agent_errors=errors, agent_sequences=len(trajs))
    return trajs, owners, rewards, scores, stats
