"""Training an agent written only against the OpenAI SDK (``agent=``): the loop runs it against
the colocated engine and trains on exactly the tokens it sampled."""

from __future__ import annotations

import json
import os
import shutil

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

import ossrl.train.agents as agents  # noqa: E402
import ossrl.train.loop as loop  # noqa: E402
from ossrl.train import run  # noqa: E402

from _ranks import run_ranks  # noqa: E402


def _rows(tmp_path, n=8):
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"{i}+{i}", "answer": str(2 * i)}) + "\n" for i in range(n)))
    return str(f)


async def talker(client, prompt, answer, **row):
    """Two requests: the second goes on from the first answer (an extension of its tokens)."""
    first = await client.chat.completions.create(model="whatever", messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=6, temperature=1.0)
    answer_msg = first.choices[0].message.model_dump(exclude_none=True)
    history = [{"role": "user", "content": prompt}, answer_msg, {"role": "user", "content": "and?"}]
    second = await client.chat.completions.create(model="policy", messages=history, max_tokens=6)
    text = second.choices[0].message.content or ""
    return 1.0 if answer in text else float(len(text) % 3) / 2  # some spread, so groups have signal


async def editor(client, prompt, **row):
    """Edits its history: the second request does not extend the first."""
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}], max_tokens=4)
    r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "forget that: " + prompt}],
                                             max_tokens=4)
    return float(len(r.choices[0].message.content or "") % 2)


async def broken(client, prompt, **row):
    if prompt.startswith("1"):
        raise RuntimeError("the agent broke")
    r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}], max_tokens=4)
    return float(len(r.choices[0].message.content or "") % 2)


COMMON = dict(sft_steps=0, prompts_per_step=2, group_size=2, eval_prompts=2, eval_every=100, max_new_tokens=8,
              filter_groups=False, checkpoint_every=100, chat_preamble=False)


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_agent_training_uses_exactly_the_sampled_tokens(tmp_path, monkeypatch):
    seen_eps, trained = [], []
    real_run, real_step = agents.run_agent_episodes, loop.train_step

    def spy_run(*a, **k):
        eps, stats = real_run(*a, **k)
        seen_eps.append(eps)
        return eps, stats

    def spy_step(model, optimizer, trajs, adv, *a, **k):
        trained.append([(list(t.tokens), list(t.loss_mask), list(t.rollout_logprobs)) for t in trajs])
        cfg = model.config  # every fed token carries the engine's expert record (routing replay)
        width = cfg.num_hidden_layers * cfg.num_experts_per_tok
        assert all(len(t.routing) == (len(t.tokens) - 1) * width for t in trajs)
        return real_step(model, optimizer, trajs, adv, *a, **k)
    monkeypatch.setattr(agents, "run_agent_episodes", spy_run)
    monkeypatch.setattr(loop, "train_step", spy_step)
    run_dir = tmp_path / "run"
    run(dict(COMMON, dataset=_rows(tmp_path), steps=2), run_dir=run_dir, agent=talker, log=lambda *a: None)
    steps = [r for r in _records(run_dir) if "reward_mean" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["agent_requests"] == 2 * 4 and r["agent_errors"] == 0
        assert r["agent_sequences"] == 4  # each episode's second request extends its first: one sequence
        assert r["agent_prefix_reuse"] > 0.3  # ... and resumed the kept cache
    rollouts = [eps for eps in seen_eps if len(eps) == 4]  # the others are evaluations (eval_prompts = 2)
    assert len(rollouts) == len(trained) == 2 and len(seen_eps) == 4
    for eps, batch in zip(rollouts, trained):
        assert len(batch) == len(eps)
        for ep, (tokens, mask, lps) in zip(eps, batch):
            (r1, r2) = ep.requests
            # trained tokens = first prompt, first sample, the new context, second sample: no re-tokenization
            assert tokens == r2.prompt + r2.tokens and r2.prompt[: len(r1.prompt) + len(r1.tokens)] == r1.prompt + r1.tokens
            sampled = [t for t, m in zip(tokens, mask) if m]
            assert sampled == r1.tokens + r2.tokens
            assert [lp for lp, m in zip(lps, mask) if m] == r1.logprobs + r2.logprobs


def test_an_agent_that_edits_history_becomes_several_sequences(tmp_path):
    run_dir = tmp_path / "run"
    run(dict(COMMON, dataset=_rows(tmp_path), steps=1), run_dir=run_dir, agent=editor, log=lambda *a: None)
    (step,) = [r for r in _records(run_dir) if "reward_mean" in r]
    assert step["agent_requests"] == 8 and step["agent_sequences"] == 8  # two per episode


def test_an_agent_that_raises_gets_reward_zero_and_the_loop_goes_on(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["1+1", "2+2", "1+3", "3+3"] * 2))
    run_dir = tmp_path / "run"
    run(dict(COMMON, dataset=str(rows), steps=2), run_dir=run_dir, agent=broken, log=lambda *a: None)
    steps = [r for r in _records(run_dir) if "reward_mean" in r]
    assert len(steps) == 2 and sum(r["agent_errors"] for r in steps) > 0


def test_agent_config_errors(tmp_path):
    from ossrl.train.config import load_config
    from ossrl.train.task import TaskError, build_task

    def sync_agent(client, **row):
        return 1.0
    with pytest.raises(TaskError, match="must be an async function"):
        build_task(load_config(None, [f"dataset={_rows(tmp_path)}"]), agent=sync_agent)
    with pytest.raises(TaskError, match="needs a 'dataset'"):
        build_task(load_config(None), agent=talker)


async def silent(client, prompt, **row):
    """Returns None: the task's reward functions score the episode from its messages."""
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}], max_tokens=4)
    return None


def test_an_agent_returning_none_is_scored_by_the_reward_functions(tmp_path):
    got = []

    def length_reward(completions, answer, **kw):
        got.append((completions, answer))
        return [float(len(c[-1]["content"] or "") % 2) if c else 0.0 for c in completions]
    run_dir = tmp_path / "run"
    run(dict(COMMON, dataset=_rows(tmp_path), steps=1), run_dir=run_dir, agent=silent, reward_funcs=[length_reward],
        log=lambda *a: None)
    (step,) = [r for r in _records(run_dir) if "reward_mean" in r]
    assert "reward_mean/length_reward" in step and step["reward_errors"] == 0
    completions, answers = got[-1]
    assert all(c and c[-1]["role"] == "assistant" for c in completions) and len(answers) == len(completions)


def test_agent_training_resumes_from_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    cfg = dict(COMMON, dataset=_rows(tmp_path), checkpoint_every=1)
    run(dict(cfg, steps=1), run_dir=run_dir, agent=talker, log=lambda *a: None)
    run(dict(cfg, steps=2), run_dir=run_dir, agent=talker, resume=True, log=lambda *a: None)
    steps = [r["step"] for r in _records(run_dir) if "reward_mean" in r]
    assert steps == [1, 2] and (run_dir / "checkpoints" / "step_00000002").is_dir()


_AGENT_MODULE = '''
async def talker(client, prompt, answer, **row):
    r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}], max_tokens=4)
    return float(len(r.choices[0].message.content or "") % 2)
'''


def _rank(rank, world, cwd, args):
    from ossrl.cli import main

    os.chdir(cwd)  # the agent's module lives here
    assert main(["train", *args]) == 0


def test_agents_under_two_processes(tmp_path):
    """torchrun-style: each rank runs its own agents against its own engine and server."""
    (tmp_path / "myagent.py").write_text(_AGENT_MODULE)
    args = ["--run-dir", str(tmp_path / "run"), f"dataset={_rows(tmp_path)}", "agent=myagent:talker", "steps=2",
            "sft_steps=0", "prompts_per_step=2", "group_size=2", "eval_prompts=2", "eval_every=100",
            "checkpoint_every=100", "max_new_tokens=4", "filter_groups=false", "chat_preamble=false"]
    run_ranks(_rank, 2, str(tmp_path), args, init=False,
              reset=lambda: shutil.rmtree(tmp_path / "run", ignore_errors=True))
    steps = [r for r in _records(tmp_path / "run") if "reward_mean" in r]
    assert [r["processes"] for r in steps] == [2, 2] and all(r["episodes"] == 4 for r in steps)
