"""Multi-turn episodes: generate, run the tool calls the model makes, append their results, resume.

A trajectory is one token stream: the prompt, then alternating model turns (loss mask 1, with
the rollout engine's log-probs) and tool results plus the next ``<|start|>assistant`` header
(context, mask 0). Each turn resumes the engine's kept KV cache, so the prefix is never
recomputed. Tool calls of all trajectories in a turn run concurrently, outside the model's loop;
a failing or hanging tool becomes an error message in the conversation.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

from ..model.harmony import encode_conversation, parse_completion, tool_result
from ..model.tokenizer import Tokenizer
from .engine import Engine, Resume, SamplingParams
from .tools import ToolCall, ToolRegistry


@dataclass
class Trajectory:
    tokens: list[int]
    loss_mask: list[int]  # 1 where the policy generated the token
    rollout_logprobs: list[float]  # the engine's log-prob of each generated token, 0 elsewhere
    final_answer: str | None = None
    finish: str = "running"  # answer | no_answer | max_turns | rejected
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    tool_seconds: float = 0.0
    messages: list = field(default_factory=list)  # the parsed assistant messages


def run_episodes(engine: Engine, tokenizer: Tokenizer, tools: ToolRegistry, prompts: list[list[int]],
                 params: SamplingParams, *, max_turns: int, tool_timeout: float, max_concurrency: int = 64,
                 seeds: list[int] | None = None) -> list[Trajectory]:
    """Runs every prompt (token ids ending in ``<|start|>assistant``) to a final answer, a turn limit
    or the cache limit. ``params.max_new_tokens`` bounds each turn. seeds: one sampling seed per
    prompt, so an episode does not depend on which others share its batch (or its process)."""
    params = replace(params, stop_token_ids=tuple(set(params.stop_token_ids) | set(tokenizer.stop_token_ids)))
    trajs = [Trajectory(list(p), [0] * len(p), [0.0] * len(p)) for p in prompts]
    inputs: list = [list(p) for p in prompts]
    active = list(range(len(prompts)))
    for turn in range(max_turns):
        last_turn = turn == max_turns - 1
        # later turns resume sequences that keep their own sampling streams
        outs = engine.generate(inputs, params, keep=not last_turn, seeds=seeds if turn == 0 else None)
        calls, waiting = [], []
        for i, out in zip(active, outs):
            t = trajs[i]
            t.turns += 1
            t.tokens += out.tokens
            t.loss_mask += [1] * len(out.tokens)
            t.rollout_logprobs += out.logprobs
            try:
                msgs = parse_completion(out.tokens, tokenizer)
            except ValueError:  # the model wrote something that is not harmony
                msgs = []
            t.messages += msgs
            last = msgs[-1] if msgs else None
            if out.finish_reason == "stop" and last is not None and last.is_tool_call and last.end == "<|call|>" \
                    and not last_turn:
                calls.append(ToolCall(last.tool_name, last.content, timeout=tool_timeout))
                waiting.append((i, out.handle))
                continue
            if out.handle is not None:
                engine.release(out.handle)
            answers = [m for m in msgs if m.channel == "final" and m.end is not None]
            t.final_answer = answers[-1].content if answers else None
            if out.finish_reason == "rejected":
                t.finish = "rejected"
            elif t.final_answer is not None:
                t.finish = "answer"
            else:
                t.finish = "max_turns" if last is not None and last.is_tool_call else "no_answer"
        if not calls:
            break
        results = asyncio.run(tools.run_calls(calls, max_concurrency=max_concurrency))
        inputs, active = [], []
        for (i, handle), call, res in zip(waiting, calls, results):
            t = trajs[i]
            t.tool_calls += 1
            t.tool_errors += not res.ok
            t.tool_seconds += res.seconds
            ctx = encode_conversation(tokenizer, [tool_result(call.name, res.content)], add_generation_prompt=True)
            t.tokens += ctx
            t.loss_mask += [0] * len(ctx)
            t.rollout_logprobs += [0.0] * len(ctx)
            inputs.append(Resume(handle, ctx))
            active.append(i)
    return trajs
