"""MoE routing replay: the engine records each fed token's experts, the trainer routes to them."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from ossrl.model import ByteTokenizer, GptOss, GptOssConfig
from ossrl.model.gpt_oss import RoutingTape
from ossrl.rollout.agent import Trajectory, advance
from ossrl.rollout.engine import Engine, SamplingParams
from ossrl.rollout.tools import ToolRegistry
from ossrl.train.loop import pack

from _tolerance import gamma

CFG = GptOssConfig.tiny()
L, K = CFG.num_hidden_layers, CFG.num_experts_per_tok


def _model(seed=0):
    torch.manual_seed(seed)
    m = GptOss(GptOssConfig.tiny()).eval()
    with torch.no_grad():  # decisive routers: few near-ties
        for name, p in m.named_parameters():
            if "router" in name:
                p.normal_(0, 1.0)
    return m


def _routing(t: Trajectory) -> np.ndarray:
    return np.frombuffer(t.routing, dtype=np.uint8).reshape(-1, L, K)


def test_the_engine_records_what_its_forward_chose(monkeypatch):
    model = _model()
    seen = []
    real = RoutingTape.route

    def spy(self, layer, logits, top_k):
        r = real(self, layer, logits, top_k)
        seen.append((layer, r.experts.clone()))
        return r
    monkeypatch.setattr(RoutingTape, "route", spy)
    engine = Engine(model, max_cache_tokens=2048, step_tokens=8)  # prefill in chunks of 8
    engine.record_routing = True
    prompt = list(range(40, 60))
    out = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=6))[0]
    rec = np.frombuffer(out.routing, dtype=np.uint8).reshape(-1, L, K)
    fed = len(prompt) + len(out.tokens) - 1  # the last sampled token is never fed
    assert rec.shape[0] == fed
    # the engine's own per-step choices, layer by layer, in feeding order
    steps = [torch.stack([e for l, e in seen[i:i + L]], dim=1) for i in range(0, len(seen), L)]
    assert torch.equal(torch.cat(steps).to(torch.uint8), torch.from_numpy(rec.copy()))


def test_a_replayed_forward_routes_exactly_as_recorded_and_the_router_learns():
    model = _model()
    engine = Engine(model, max_cache_tokens=2048)
    engine.record_routing = True
    prompt = list(range(10, 40))
    out = engine.generate([prompt], SamplingParams(temperature=1.0, max_new_tokens=10), seed=3)[0]
    t = Trajectory.start(prompt)
    t.append(out.tokens, sampled=True, logprobs=out.logprobs)
    t.take_routing(out.routing)
    b = pack([t], torch.device("cpu"), routing_shape=(L, K))
    given = b["routing"]
    assert (given[-1] == -1).all() and (given[:-1] >= 0).all()  # only the last token has no record
    tape = RoutingTape(given, replay=True)
    with model.routing_tape(tape):
        logp = model.token_logprobs(b["ids"], b["cu_seqlens"], b["targets"], max_seqlen=b["max_seqlen"])
    replayed = torch.stack([tape.recorded[i] for i in range(L)], dim=1)
    assert torch.equal(replayed[:-1], given[:-1])
    # the metric against a direct computation: own top-k sets equal the record
    own = RoutingTape(given, replay=False)
    with model.routing_tape(own):
        model.token_logprobs(b["ids"], b["cu_seqlens"], b["targets"], max_seqlen=b["max_seqlen"])
    mine = torch.stack([own.recorded[i] for i in range(L)], dim=1)[:-1]
    direct = (torch.sort(mine, -1).values == torch.sort(given[:-1], -1).values).all(-1).sum()
    assert int(own.agree) == int(direct) and int(own.compared) == (len(t.tokens) - 1) * L
    # gradients into the router under replay, float32 against float64 with the same routing
    m64 = copy.deepcopy(model).double()
    grads = []
    for m in (model, m64):
        m.zero_grad()
        with m.routing_tape(RoutingTape(given, replay=True)):
            lp = m.token_logprobs(b["ids"], b["cu_seqlens"], b["targets"], max_seqlen=b["max_seqlen"])
            (lp * b["mask"].to(lp.dtype)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in m.named_parameters() if "router" in n]))
    g32, g64 = grads
    assert g64.abs().max() > 0
    err = (g32.double() - g64).abs().max() / g64.abs().max()
    # float32 rounding of sums over the hidden size and the sequence; a routing flip would be O(1)
    assert err < gamma(CFG.hidden_size * len(t.tokens), torch.float32), err


def test_the_routing_record_survives_a_pause_and_a_checkpoint():
    model = _model()
    params = SamplingParams(temperature=0, max_new_tokens=12)
    prompts = [[5, 17, 3], list(range(40, 100))]
    engine = Engine(model, step_tokens=16, max_cache_tokens=1024)
    engine.record_routing = True
    trajs = [Trajectory.start(p, seed=i) for i, p in enumerate(prompts)]
    advance(engine, ByteTokenizer(), ToolRegistry(), trajs, params, max_turns=1, tool_timeout=1.0,
            groups=[[0], [1]], quota=1)
    paused = trajs[1]
    assert not paused.done and len(paused.routing) > 0
    before = bytes(paused.routing)
    back = Trajectory.from_json(json.loads(json.dumps(paused.to_json())))  # a checkpoint round trip
    assert back.routing == before
    advance(engine, ByteTokenizer(), ToolRegistry(), [back], params, max_turns=1, tool_timeout=1.0)
    assert back.done and back.routing[: len(before)] == before  # the recomputed prefix keeps its record
    assert len(_routing(back)) == len(back.tokens) - 1
    with pytest.raises(ValueError, match="routing"):
        Trajectory.from_json({**paused.to_json(), "routing": "not base64!"})
    bad = Trajectory.start([1, 2, 3])
    bad.routing = bytes(5)
    with pytest.raises(ValueError, match="does not fit"):
        pack([bad], torch.device("cpu"), routing_shape=(L, K))


@pytest.mark.parametrize("replay", [False, True])
def test_the_loop_logs_mismatch_and_routing_agreement(tmp_path, replay):
    from ossrl.cli import main
    from ossrl.train.metrics import read

    args = ["sft_steps=10", "sft_batch=16", "steps=2", "prompts_per_step=2", "group_size=4", "eval_prompts=4",
            "eval_every=2", "checkpoint_every=2", "max_turns=2", "filter_groups=false", "extra_groups=0",
            f"routing_replay={'true' if replay else 'false'}", "rollout_dtype=bfloat16"]
    assert main(["train", "--run-dir", str(tmp_path / "run"), *args]) == 0
    steps = [r for r in read(tmp_path / "run" / "metrics.jsonl") if "reward_mean" in r]
    for r in steps:
        assert 0.0 <= r["routing_agreement"] <= 1.0 and r["mismatch_kl"] >= 0 and r["logprob_gap_max"] >= 0
