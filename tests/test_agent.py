"""Event-driven episodes: pausing stragglers at a group quota and resuming them, engine aborts."""

import copy

import pytest
import torch

from ossrl.model import ByteTokenizer, GptOss, GptOssConfig
from ossrl.rollout.agent import CONTEXT, Trajectory, advance, run_episodes
from ossrl.rollout.engine import Engine, SamplingParams
from ossrl.rollout.tools import ToolRegistry

from _tolerance import assert_within, rounding_scale

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
    model64 = copy.deepcopy(model).double()
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
        lp, lp64 = _teacher_forced(model, t), _teacher_forced(model64, t)
        got = torch.tensor(t.rollout_logprobs)[1:]
        mask = torch.tensor(t.loss_mask[1:], dtype=torch.bool)
        # the engine's passes round differently: 4x the teacher-forced pass's float32 rounding
        assert_within(got[mask], lp[:-1][mask], 4 * rounding_scale((lp, lp64)))
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
    bad = trajs[0].to_json()
    bad["versions"] = bad["versions"][:-1]
    with pytest.raises(ValueError, match="one entry per token"):
        Trajectory.from_json(bad)


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


# ---- tool calls, with a scripted engine (a random model never calls a tool) ----


class _Scripted:
    """Stands in for Engine: episode e (its prompt starts with token 1000+e) writes the turns of
    script[e], one token per step; a Resume starts the next turn, a re-sent prompt after a pause
    goes on where the turn stopped."""

    def __init__(self, script):
        self.script, self.state, self.running, self.kept, self.ids = script, {}, [], {}, 0

    def add_request(self, prompt, params, *, keep=False, seed=None):
        from ossrl.rollout.engine import Completion, Resume

        if isinstance(prompt, Resume):
            e = self.kept.pop(prompt.handle)
            self.state[e] = [self.state[e][0] + 1, 0]
        else:
            e = prompt[0] - 1000
            turn, pos = self.state.setdefault(e, [0, 0])
            if pos == len(self.script[e][turn]):  # paused between turns: the tool result is in the prompt
                self.state[e] = [turn + 1, 0]
        self.ids += 1
        seq = type("Seq", (), {"id": self.ids, "e": e, "keep": keep, "out": Completion([], [], "length")})()
        self.running.append(seq)
        return seq

    def can_step(self):
        return bool(self.running)

    def step(self):
        done = []
        for seq in list(self.running):
            turn, pos = self.state[seq.e]
            seq.out.tokens.append(self.script[seq.e][turn][pos])
            seq.out.logprobs.append(-0.5)
            self.state[seq.e][1] = pos + 1
            if pos + 1 == len(self.script[seq.e][turn]):
                seq.out.finish_reason = "stop"
                if seq.keep:
                    seq.out.handle = seq.id
                    self.kept[seq.id] = seq.e
                self.running.remove(seq)
                done.append(seq)
        return done

    def abort(self, seq):
        self.running.remove(seq)
        seq.out.finish_reason = "aborted"
        return seq.out

    def release(self, handle):
        self.kept.pop(handle, None)


def _turn(tok, content, **kw):
    from ossrl.model.harmony import Message, encode_completion

    return encode_completion(tok, Message("assistant", content, **kw))


def _tools():
    import time

    reg = ToolRegistry(builtins=("calculator",))
    reg.register("slow", lambda text="": (time.sleep(0.3), f"slept {text}")[1], description="sleeps",
                 parameters_schema={"type": "object", "properties": {"text": {"type": "string"}}},
                 raw_argument="text")
    return reg


def test_tool_calls_rejoin_and_stragglers_pause_mid_turn():
    tok = ByteTokenizer()
    call = _turn(tok, "2+3", channel="commentary", recipient="functions.calculator")
    answer = _turn(tok, "5", channel="final")
    long_answer = _turn(tok, "a long answer " * 8, channel="final")
    engine = _Scripted({0: [call, answer], 1: [long_answer]})
    trajs = [Trajectory.start([1000 + e, 7, 8], seed=e) for e in range(2)]
    # reproducible: the result rejoins at the next step, however long the call took
    kw = dict(max_turns=3, tool_timeout=5.0, reproducible=True)
    params = SamplingParams(temperature=1.0, max_new_tokens=500)
    done = advance(engine, tok, _tools(), trajs, params, groups=[[0], [1]], quota=1, **kw)
    fast, slow = trajs
    assert done == [0] and fast.finish == "answer" and fast.final_answer == "5"
    assert fast.tool_calls == 1 and fast.tool_errors == 0 and fast.turns == 2
    assert "5" in tok.decode(fast.tokens[3 + len(call):len(fast.tokens) - len(answer)])  # the tool's result
    assert fast.loss_mask == [0] * 3 + [1] * len(call) + [0] * (len(fast.tokens) - 3 - len(call) - len(answer)) + [1] * len(answer)
    assert not slow.done and slow.pauses == 1 and 0 < len(slow.tokens) - 3 < len(long_answer)
    assert slow.tokens[3:] == long_answer[:len(slow.tokens) - 3]
    done = advance(engine, tok, _tools(), trajs, params, groups=[[0], [1]], version=1, **kw)
    assert done == [0, 1] and slow.tokens[3:] == long_answer and slow.final_answer.startswith("a long answer")
    assert slow.versions[3] == 0 and slow.versions[-1] == 1


def test_a_pause_during_a_tool_call_keeps_its_result():
    tok = ByteTokenizer()
    call = _turn(tok, "zz", channel="commentary", recipient="functions.slow")
    answer = _turn(tok, "done", channel="final")
    engine = _Scripted({0: [call, answer], 1: [_turn(tok, "x" * 3 * len(call), channel="final")]})
    trajs = [Trajectory.start([1000 + e, 7], seed=e) for e in range(2)]
    kw = dict(max_turns=3, tool_timeout=5.0, groups=[[0], [1]])
    params = SamplingParams(temperature=1.0, max_new_tokens=500)
    # episode 1 answers (after episode 0's call, without waiting for its result) while the slow
    # tool still runs: the quota is met
    assert advance(engine, tok, _tools(), trajs, params, quota=1, reproducible=False, **kw) == [1]
    t = trajs[0]
    assert not t.done and t.tool_calls == 1 and "slept zz" in tok.decode(t.tokens[1:])
    assert t.turn_start == len(t.tokens) and not engine.kept  # result appended, KV released
    assert advance(engine, tok, _tools(), trajs, params, **kw) == [0, 1]
    assert t.final_answer == "done" and t.tokens[-len(answer):] == answer


# ---- whatever the model writes is at worst a failed tool call in its episode ----


def _fuzz_turns(tok, rng, n_turns):
    """Random and adversarial model turns: raw random ids (special tokens included), and
    harmony-shaped calls whose recipient, channel or constraint is garbled."""
    sp = tok.SPECIAL
    pieces = ["functions.a<b>", "functions.calculat", "functions.", "functions.calculator", " to=functions.x y",
              "functions.\n", "assistant", "functions.calc\u00e9"]
    turns = []
    for _ in range(n_turns):
        kind = rng.randrange(3)
        if kind == 0:  # anything at all, stop token last (the engine stops there)
            body = [rng.randrange(tok.VOCAB_SIZE) for _ in range(rng.randrange(1, 40))]
            turns.append(body + [rng.choice([sp["<|call|>"], sp["<|return|>"]])])
            continue
        recipient = rng.choice(pieces)
        if kind == 1:
            junk = [rng.randrange(tok.VOCAB_SIZE) for _ in range(rng.randrange(4))]
            recipient = recipient[:3] + tok.decode(junk) + recipient[3:]
        text = f"<|channel|>commentary to={recipient} <|constrain|>json<|message|>{{\"x\": 1}}<|call|>"
        ids = []
        for part in text.replace("<|", "\0<|").replace("|>", "|>\0").split("\0"):
            ids += [sp[part]] if part in sp else tok.encode(part)
        turns.append(ids)
    return turns


@pytest.mark.parametrize("seed", range(8))
def test_fuzzed_model_output_never_ends_the_rollout(seed):
    """The issue's case (`to=functions.a<b> <|constrain|>json...`) raised ValueError out of
    advance(); random and adversarial turns must all end as episodes (answer, no_answer or
    max_turns), their tool calls at worst failed ones."""
    import random

    tok = ByteTokenizer()
    rng = random.Random(seed)
    n = 12
    script = {e: _fuzz_turns(tok, rng, 3) for e in range(n)}
    trajs = [Trajectory.start([1000 + e, 7], seed=e) for e in range(n)]
    params = SamplingParams(temperature=1.0, max_new_tokens=500)
    done = advance(_Scripted(script), tok, _tools(), trajs, params, max_turns=3, tool_timeout=5.0)
    assert done == [0] and all(t.finish in ("answer", "no_answer", "max_turns") for t in trajs)
    for t in trajs:  # every token accounted for: sampled ones carry the loss, tool results do not
        assert len(t.tokens) == len(t.loss_mask) == len(t.rollout_logprobs) == len(t.versions)
        assert t.tool_errors <= t.tool_calls <= 2
