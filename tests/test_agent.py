"""Event-driven episodes: pausing stragglers at a group quota and resuming them, engine aborts."""

import pytest
import torch

from ossrl.model import ByteTokenizer, GptOss, GptOssConfig
from ossrl.rollout.agent import CONTEXT, Trajectory, advance, run_episodes
from ossrl.rollout.engine import Engine, SamplingParams
from ossrl.rollout.tools import ToolRegistry

PROMPTS = [[5, 17, 3], list(range(40, 100)), list(range(100, 190))]  # prefill takes 1, 4 and 6 steps


def _model(seed=0):
    torch.manual_seed(seed)
    m = GptOss(GptOssConfig.tiny()).eval()
    with torch.no_grad():  # crisp argmaxes
        for name, p in m.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.3)
    return m


def _advance(engine, trajs, params, **kw):
    return advance(engine, ByteTokenizer(), ToolRegistry(), trajs, params, max_turns=2, tool_timeout=1.0, **kw)


def _teacher_forced(model, t: Trajectory) -> torch.Tensor:
    ids = torch.tensor(t.tokens)
    with torch.no_grad():
        return model.token_logprobs(ids, torch.tensor([0, len(ids)], dtype=torch.int32), ids.roll(-1))


def test_quota_pauses_stragglers_and_resume_continues_them():
    model = _model()
    params = SamplingParams(temperature=0, max_new_tokens=12)
    reference = run_episodes(Engine(model, step_tokens=16), ByteTokenizer(), ToolRegistry(), PROMPTS, params,
                             max_turns=2, tool_timeout=1.0)

    engine = Engine(model, step_tokens=16, max_cache_tokens=1024)
    trajs = [Trajectory.start(p, seed=i) for i, p in enumerate(PROMPTS)]
    done = _advance(engine, trajs, params, groups=[[0], [1], [2]], quota=1, version=0)
    assert done == [0] and trajs[0].done and not trajs[1].done and not trajs[2].done
    assert trajs[1].pauses == trajs[2].pauses == 1
    assert len(trajs[1].tokens) > len(PROMPTS[1])  # paused mid-turn: what it sampled is kept
    assert not engine.has_unfinished() and len(engine.cache.free) == engine.num_blocks  # KV dropped

    done = _advance(engine, trajs, params, groups=[[0], [1], [2]], version=1)
    assert done == [0, 1, 2]
    for t, ref in zip(trajs, reference):
        # greedy: pausing and recomputing the prefix changes nothing
        assert t.tokens == ref.tokens and t.finish == ref.finish
        n = len(t.tokens) - len(PROMPTS[trajs.index(t)])
        assert sum(t.loss_mask) == n == 12 and len(t.versions) == len(t.tokens)
        # log-probs reported across the pause are the model's own, teacher-forced
        lp = _teacher_forced(model, t)
        got = torch.tensor(t.rollout_logprobs)[1:]
        mask = torch.tensor(t.loss_mask[1:], dtype=torch.bool)
        torch.testing.assert_close(got[mask], lp[:-1][mask], rtol=1e-4, atol=1e-4)
    sampled = [v for v in trajs[1].versions if v != CONTEXT]
    assert sampled[0] == 0 and sampled[-1] == 1 and sampled == sorted(sampled)  # tokens know their policy
    assert all(v == 0 for v in trajs[0].versions if v != CONTEXT)
    assert trajs[1].versions[:len(PROMPTS[1])] == [CONTEXT] * len(PROMPTS[1])


def test_quota_of_all_groups_runs_everything_and_checkpoint_round_trip():
    model = _model(1)
    params = SamplingParams(temperature=1.0, max_new_tokens=6)
    trajs = [Trajectory.start(p, seed=10 + i) for i, p in enumerate(PROMPTS)]
    done = _advance(Engine(model), trajs, params, groups=[[0, 1], [2]])
    assert done == [0, 1] and all(t.done for t in trajs)
    back = [Trajectory.from_json(t.to_json()) for t in trajs]
    assert [b.to_json() for b in back] == [t.to_json() for t in trajs]


def test_engine_abort_returns_partial_output_and_frees_the_cache():
    engine = Engine(_model(), max_cache_tokens=256, block_size=8, step_tokens=64)
    seq = engine.add_request(list(range(30)), SamplingParams(temperature=0, max_new_tokens=50))
    queued = engine.add_request([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=5))
    for _ in range(4):
        engine.step()
    free_before = len(engine.cache.free)
    out = engine.abort(seq)
    assert out.finish_reason == "aborted" and len(out.tokens) == len(out.logprobs) == 4
    assert len(engine.cache.free) > free_before
    assert len(engine.abort(queued).tokens) == 4
    assert not engine.has_unfinished() and len(engine.cache.free) == engine.num_blocks
    with pytest.raises(ValueError, match="not queued or running"):
        engine.abort(seq)
