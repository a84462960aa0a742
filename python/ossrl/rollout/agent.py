"""Multi-turn episodes, event-driven: generate, run the tool calls the model makes, append their
results, resume — each episode at its own pace.

A trajectory is one token stream: the prompt, then alternating model turns (loss mask 1, with
the rollout engine's log-probs and the policy version that sampled each token) and tool results
plus the next ``<|start|>assistant`` header (context, mask 0).

The engine runs continuously: when an episode's turn ends in a tool call, its KV cache is kept
and the call goes to a background event loop (at most ``max_concurrency`` in flight, each with
its timeout) while every other episode keeps decoding; the result comes back as a ``Resume``
of the kept cache, so the prefix is never recomputed. A failing or hanging tool becomes an
error message in the conversation.

No waiting on stragglers: ``advance(..., groups=..., quota=q)`` returns as soon as q groups are
complete. The other episodes are paused: their engine requests are aborted (KV dropped), the
tokens and log-probs sampled so far are kept, and the next ``advance`` resumes them by
recomputing their prefix, generating the rest with whatever weights the engine then has.

Reproducibility: every engine request samples from its own stream, seeded from the episode's
seed and the request's number, so an episode does not depend on what shares its batch. With
``reproducible=True`` (the default) a tool result rejoins at the engine step right after the one
that made the call (the engine waits only for a tool slower than one forward pass), so which
groups finish first, and hence the whole run, is the same every time; with False results rejoin
whenever they are ready (no waiting at all, timing-dependent).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures as cf
import hashlib
import re
import threading
from dataclasses import dataclass, field, replace

from ..model.chat import to_openai
from ..model.harmony import encode_conversation, parse_completion, tool_result
from ..model.tokenizer import Tokenizer
from .engine import Completion, Engine, Resume, SamplingParams
from .tools import ToolCall, ToolRegistry, ToolResult

CONTEXT = -1  # version of tokens the policy did not sample (prompt, tool results)
_TOOL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-.]*")


@dataclass
class Trajectory:
    tokens: list[int]
    loss_mask: list[int]  # 1 where the policy generated the token
    rollout_logprobs: list[float]  # the engine's log-prob of each generated token, 0 elsewhere
    versions: list[int] = field(default_factory=list)  # policy version of each sampled token, CONTEXT elsewhere
    seed: int = 0  # the episode's sampling seed
    final_answer: str | None = None
    finish: str = "running"  # running | answer | no_answer | max_turns | rejected
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    tool_seconds: float = 0.0
    turn_start: int = 0  # where the current model turn's tokens begin
    requests: int = 0  # engine requests made so far (each samples from its own stream)
    pauses: int = 0
    # what the episode added, as OpenAI-style messages (assistant turns with tool_calls, tool
    # results, the final answer): what reward functions see, and what --resume replays
    chat: list = field(default_factory=list)
    tool_log: list = field(default_factory=list)  # [tool name, error kind or None] per call
    # the experts each token chose in every MoE layer while the engine fed it (uint8, layers x
    # top_k per token, from the first token on; the last sampled token is never fed): replay
    routing: bytes = b""
    messages: list = field(default_factory=list)  # the parsed assistant messages (not checkpointed)

    @classmethod
    def start(cls, prompt: list[int], seed: int = 0) -> "Trajectory":
        n = len(prompt)
        return cls(list(prompt), [0] * n, [0.0] * n, [CONTEXT] * n, seed=seed, turn_start=n)

    @property
    def done(self) -> bool:
        return self.finish != "running"

    def append(self, tokens: list[int], *, sampled: bool, logprobs: list[float] | None = None,
               version: int = CONTEXT) -> None:
        self.tokens += tokens
        self.loss_mask += [int(sampled)] * len(tokens)
        self.rollout_logprobs += logprobs if sampled else [0.0] * len(tokens)
        self.versions += [version if sampled else CONTEXT] * len(tokens)

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("messages", "routing")}
        d["routing"] = base64.b64encode(self.routing).decode("ascii")
        return d

    def take_routing(self, recorded) -> None:
        """Keeps the engine's record of the positions this trajectory has no record for yet (a
        recomputed prefix after a pause keeps the routing it was sampled with)."""
        if recorded is not None and len(recorded) > len(self.routing):
            self.routing = self.routing + bytes(recorded[len(self.routing):])

    @classmethod
    def from_json(cls, d: dict) -> "Trajectory":
        """The inverse of ``to_json``; a ValueError for anything that could misalign training."""
        d = dict(d)
        try:
            d["routing"] = base64.b64decode(d.get("routing") or "", validate=True)
        except (ValueError, TypeError) as e:
            raise ValueError(f"Trajectory.from_json: routing is not base64 ({e})") from None
        t = cls(**d)
        n = len(t.tokens)
        if not (len(t.loss_mask) == len(t.rollout_logprobs) == len(t.versions) == n) or not 0 <= t.turn_start <= n:
            raise ValueError("Trajectory.from_json: tokens, loss_mask, rollout_logprobs and versions must have "
                             "one entry per token and turn_start must lie within them")
        return t


def stream_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (episode seed, request number, ...)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def tool_loop() -> asyncio.AbstractEventLoop:
    """The process's tool event loop, on a daemon thread. One loop for the whole run: what an
    async tool or environment binds to it (a connection, a lock) stays valid across steps."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, name="ossrl-tools", daemon=True).start()
        return _LOOP


class _ToolRunner:
    """Calls on the tool loop, at most max_concurrency at once; close() cancels what is left."""

    def __init__(self, max_concurrency: int):
        self.loop = tool_loop()
        self.limit = max(1, int(max_concurrency))
        self.sem: asyncio.Semaphore | None = None
        self.pending: set[cf.Future] = set()

    def submit(self, tools: ToolRegistry, call: ToolCall) -> cf.Future:
        async def run() -> ToolResult:
            if self.sem is None:
                self.sem = asyncio.Semaphore(self.limit)
            async with self.sem:
                return await tools.call(call.name, call.arguments, timeout=call.timeout)
        fut = asyncio.run_coroutine_threadsafe(run(), self.loop)
        self.pending.add(fut)
        fut.add_done_callback(self.pending.discard)
        return fut

    def close(self) -> None:
        for fut in list(self.pending):
            fut.cancel()
        cf.wait(list(self.pending), timeout=60)


def advance(engine: Engine, tokenizer: Tokenizer, tools: ToolRegistry | list[ToolRegistry], trajs: list[Trajectory],
            params: SamplingParams, *, max_turns: int, tool_timeout: float, max_concurrency: int = 64,
            version: int = 0, groups: list[list[int]] | None = None, quota: int | None = None,
            reproducible: bool = True) -> list[int]:
    """Runs the unfinished trajectories (in place) until all are done or, with ``groups`` (lists of
    indices into ``trajs``) and ``quota``, until ``quota`` groups are all done; the rest are paused.
    ``params.max_new_tokens`` bounds each model turn; ``version`` tags the tokens sampled now.
    Returns the indices of the complete groups (of all trajectories when no groups are given).
    ``tools``: one registry for every trajectory, or a list with one per trajectory (each
    episode's own environment)."""
    if isinstance(tools, (list, tuple)) and len(tools) != len(trajs):
        raise ValueError(f"advance: {len(tools)} tool registries for {len(trajs)} trajectories")
    if not isinstance(tools, (list, tuple)) and tools.holds_session and len(trajs) > 1:
        raise ValueError("advance: python_session keeps one interpreter per episode: pass one registry per trajectory")
    if groups is None:
        groups, quota = [list(range(len(trajs)))], 1
    quota = len(groups) if quota is None else quota
    params = replace(params, stop_token_ids=tuple(set(params.stop_token_ids) | set(tokenizer.stop_token_ids)))
    live: dict[int, object] = {}  # trajectory -> its engine request
    owner: dict[int, int] = {}  # engine request id -> trajectory
    kept: dict[int, int] = {}  # trajectory -> engine handle, kept while its tool call runs
    calls: dict[cf.Future, tuple[int, ToolCall]] = {}

    def submit(i: int, prompt) -> None:
        t = trajs[i]
        budget = params.max_new_tokens - (len(t.tokens) - t.turn_start)  # a paused turn goes on where it stopped
        seq = engine.add_request(prompt, replace(params, max_new_tokens=budget), keep=t.turns + 1 < max_turns,
                                 seed=stream_seed(t.seed, t.requests))
        t.requests += 1
        live[i], owner[seq.id] = seq, i

    def end_turn(i: int, out: Completion) -> None:
        t = trajs[i]
        t.append(out.tokens, sampled=True, logprobs=out.logprobs, version=version)
        t.take_routing(out.routing)
        if out.finish_reason == "rejected":  # can never fit the cache
            t.finish = "rejected"
            return
        t.turns += 1
        try:
            msgs = parse_completion(t.tokens[t.turn_start:], tokenizer)
        except ValueError:  # the model wrote something that is not harmony
            msgs = []
        t.messages += msgs
        t.chat += to_openai(msgs, first_call=t.tool_calls)
        last = msgs[-1] if msgs else None
        if out.finish_reason == "stop" and last is not None and last.is_tool_call and last.end == "<|call|>" \
                and t.turns < max_turns:
            kept[i] = out.handle
            call = ToolCall(last.tool_name, last.content, timeout=tool_timeout)
            calls[runner.submit(tools[i] if isinstance(tools, (list, tuple)) else tools, call)] = (i, call)
            return
        if out.handle is not None:
            engine.release(out.handle)
        answers = [m for m in msgs if m.channel == "final" and m.end is not None]
        t.final_answer = answers[-1].content if answers else None
        if t.final_answer is not None:
            t.finish = "answer"
        else:
            t.finish = "max_turns" if last is not None and last.is_tool_call else "no_answer"

    def absorb(futures, resume: bool) -> None:
        for fut in sorted(futures, key=lambda f: calls[f][0]):  # a fixed order: request numbers are seeds
            i, call = calls.pop(fut)
            res = fut.result()
            t = trajs[i]
            t.chat.append({"role": "tool", "tool_call_id": f"call_{t.tool_calls}", "name": call.name,
                           "content": res.content})
            t.tool_log.append([call.name, res.error])
            t.tool_calls += 1
            t.tool_errors += not res.ok
            t.tool_seconds += res.seconds
            # The result is addressed from the tool the model named; a name the model garbled
            # (special tokens, spaces) cannot be a harmony role, so it answers as "invalid".
            name = call.name if _TOOL_NAME.fullmatch(call.name or "") else "invalid"
            ctx = encode_conversation(tokenizer, [tool_result(name, res.content)], add_generation_prompt=True)
            t.append(ctx, sampled=False)
            t.turn_start = len(t.tokens)
            handle = kept.pop(i)
            if resume:
                submit(i, Resume(handle, ctx) if handle is not None else t.tokens)
            elif handle is not None:
                engine.release(handle)

    def complete() -> list[int]:
        return [g for g, members in enumerate(groups) if all(trajs[i].done for i in members)]

    runner = _ToolRunner(max_concurrency)
    try:
        for i, t in enumerate(trajs):
            if not t.done:
                submit(i, t.tokens)  # new, or paused: the prefix is recomputed
        while len(complete()) < quota and (live or calls):
            if not reproducible:
                absorb([f for f in calls if f.done()], resume=True)
            if live and engine.can_step():
                for seq in engine.step():
                    i = owner.pop(seq.id)
                    del live[i]
                    end_turn(i, seq.out)
                if reproducible and calls:
                    absorb(cf.wait(list(calls))[0], resume=True)
            elif calls:
                absorb(cf.wait(list(calls), return_when=cf.FIRST_COMPLETED)[0], resume=True)
            elif live:
                raise RuntimeError("rollout: requests wait for cache that nothing will free")
        # Quota met: pause the stragglers. Their tool calls finish (bounded by the timeout) and
        # the results join the trajectory; the next advance recomputes the prefix and goes on.
        if calls:
            absorb(cf.wait(list(calls))[0], resume=False)
        for i, seq in list(live.items()):
            out = engine.abort(seq)
            trajs[i].append(out.tokens, sampled=True, logprobs=out.logprobs, version=version)
            trajs[i].take_routing(out.routing)
            trajs[i].pauses += 1
            del live[i]
    finally:
        runner.close()
        # every trajectory is now done or paused: its python_session interpreter ends with it
        for reg in {id(r): r for r in (tools if isinstance(tools, (list, tuple)) else [tools])}.values():
            reg.close_sessions()
    return complete()


def run_episodes(engine: Engine, tokenizer: Tokenizer, tools: ToolRegistry, prompts: list[list[int]],
                 params: SamplingParams, *, max_turns: int, tool_timeout: float, max_concurrency: int = 64,
                 seeds: list[int] | None = None) -> list[Trajectory]:
    """Runs every prompt (token ids ending in ``<|start|>assistant``) to a final answer, a turn limit
    or the cache limit. ``params.max_new_tokens`` bounds each turn. seeds: one sampling seed per
    prompt, so an episode does not depend on which others share its batch (or its process)."""
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"run_episodes: {len(seeds)} seeds for {len(prompts)} prompts")
    trajs = [Trajectory.start(p, seeds[i] if seeds else i) for i, p in enumerate(prompts)]
    advance(engine, tokenizer, tools, trajs, params, max_turns=max_turns, tool_timeout=tool_timeout,
            max_concurrency=max_concurrency)
    return trajs
