"""FSDP2 on two gloo processes computes what one process computes on the whole batch.

Two ranks, each with half of a packed batch: rank 0 runs its half as two micro-batches, rank 1 as
one plus a zero-weight padding pass (equal pass counts, sync only in the last). The grads, the
clipped grad norm and the parameters after one AdamW step are compared with one unsharded process
doing the same step; grads would be half as large if FSDP averaged instead of summing. The reshard
plan must rebuild each rank's plain replica bit for bit, and checkpoints must round-trip.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from ossrl.model import GptOss, GptOssConfig

from _ranks import run_ranks
from _tolerance import assert_within, rounding_scale

LENGTHS = [7, 5, 9, 4, 6, 8]  # rank 0: the first three (two micro-batches), rank 1: the rest
# AdamW's first step moves a parameter by lr * g / (|g| + eps). With the default eps (1e-8) that is
# about lr * sign(g): blind to the scale of g (summed or averaged alike) and, for the few g near 0,
# turning rounding differences into a sizeable part of lr. eps of the order of the grads fixes both.
# MAX_NORM lies between the summed grads' norm (~3.2) and half of it, so clipping does happen and
# averaged grads would also be clipped differently.
LR, EPS, MAX_NORM = 1e-3, 1e-3, 2.0


def _seqs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    vocab = GptOssConfig.tiny().vocab_size
    return [torch.randint(0, vocab, (n,), generator=g) for n in LENGTHS]


def _loss(model: GptOss, seqs: list[torch.Tensor], n_tokens: int) -> torch.Tensor:
    """-(sum of next-token log-probs of seqs) / n_tokens, the global count (last positions masked)."""
    ids = torch.cat(seqs)
    targets = torch.cat([torch.roll(s, -1) for s in seqs])
    cu = torch.tensor([0] + [len(s) for s in seqs], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    mask = torch.ones(len(ids))
    mask[cu[1:].long() - 1] = 0
    logp = model.token_logprobs(ids, cu, targets)
    return -(logp * mask).sum() / n_tokens


N_TOKENS = sum(n - 1 for n in LENGTHS)


def _worker(rank: int, world: int, out_dir: str, tied: bool) -> None:
    from ossrl import reshard
    from ossrl.train import fsdp

    torch.manual_seed(0)
    model = GptOss(GptOssConfig.tiny(tie_word_embeddings=tied))
    replica = copy.deepcopy(model)  # the "rollout" copy: plain tensors, made before sharding
    fsdp.shard_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)

    seqs = _seqs()
    mine = seqs[:3] if rank == 0 else seqs[3:]
    micro = [mine[:2], mine[2:]] if rank == 0 else [mine]
    n = fsdp.equal_micro_batches(len(micro))
    for i in fsdp.sync_on_last(model, n):
        if i < len(micro):
            _loss(model, micro[i], N_TOKENS).backward()
        else:
            fsdp.padding_pass(model)
    grads = {k: p.grad.full_tensor() for k, p in model.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    opt.step()
    opt.zero_grad()

    model_sd, optim_sd = fsdp.full_state_dicts(model, opt)

    plan = reshard.build_plan([reshard.cast(k, k) for k, _ in model.named_parameters()], model, replica)
    plan.sync()
    out = {"n": n, "grads": grads, "norm": norm, "model_sd": model_sd, "optim_sd": optim_sd,
           "replica": {k: v.detach().clone() for k, v in replica.state_dict().items()},
           "sharded": {k: type(p).__name__ for k, p in model.named_parameters()}}

    # Round trip: a differently initialised sharded model and a fresh optimizer load the dicts
    # (rank 0 holds them, the others pass empty ones) and must give back the same dicts.
    torch.manual_seed(1)
    other = fsdp.shard_model(GptOss(GptOssConfig.tiny(tie_word_embeddings=tied)))
    other_opt = torch.optim.AdamW(other.parameters(), lr=LR, eps=EPS)
    fsdp.load_full_state_dicts(other, other_opt, model_sd, optim_sd)
    out["reloaded"] = fsdp.full_state_dicts(other, other_opt)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def _reference(tied: bool, dtype: torch.dtype = torch.float32):
    """One process, the whole batch, the same step. In float64 (the same initial weights) it tells
    how far float32 rounding moves each result on this machine: the ranks compute the same sums in
    other orders (two micro-batches, a gloo sum), so their float32 results may differ from the
    one-process ones by about twice that, never by the factor 2 of averaging instead of summing."""
    torch.manual_seed(0)
    model = GptOss(GptOssConfig.tiny(tie_word_embeddings=tied)).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    _loss(model, _seqs(), N_TOKENS).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    opt.step()
    return model, opt, grads, norm


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def two_ranks(request, tmp_path_factory):
    """Each rank's results (see _worker), with lm_head separate from or tied to embed_tokens."""
    out_dir = tmp_path_factory.mktemp("fsdp")
    run_ranks(_worker, 2, str(out_dir), request.param, timeout=180)  # a hang fails the test instead of blocking it
    return request.param, [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _close(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m: f"{k}: {m}", **tol)


def test_parameters_are_sharded_and_passes_padded(two_ranks):
    _, ranks = two_ranks
    assert all(t == "DTensor" for t in ranks[0]["sharded"].values())
    assert [r["n"] for r in ranks] == [2, 2]  # rank 1 padded its one micro-batch to two


def test_grads_are_summed_like_one_process(two_ranks):
    tied, ranks = two_ranks
    _, _, grads, norm = _reference(tied)
    _, _, grads64, norm64 = _reference(tied, torch.float64)
    for r in ranks:
        assert r["grads"].keys() == grads.keys()
        assert_within(r["grads"], grads, 4 * rounding_scale((grads, grads64)), "grads")
        assert_within(r["norm"], norm, 4 * rounding_scale((norm, norm64)), "grad norm")
    assert norm > MAX_NORM > norm / 2  # the clip scales the grads, and would not scale half of them


def test_step_matches_one_process(two_ranks):
    tied, ranks = two_ranks
    model, opt, _, _ = _reference(tied)
    model64, opt64, _, _ = _reference(tied, torch.float64)
    model_sd, optim_sd = ranks[0]["model_sd"], ranks[0]["optim_sd"]
    assert list(model_sd) == list(model.state_dict())  # plain Hugging Face names, same order
    assert all(type(v) is torch.Tensor and v.device.type == "cpu" for v in model_sd.values())
    assert_within(model_sd, model.state_dict(), 4 * rounding_scale((model.state_dict(), model64.state_dict())),
                  "parameters")
    torch.manual_seed(0)
    initial = GptOss(GptOssConfig.tiny(tie_word_embeddings=tied)).state_dict()
    for k in ("lm_head.weight", "model.layers.1.mlp.experts.down_proj", "model.norm.weight"):
        assert (model_sd[k] - initial[k]).abs().max() > 100 * 1e-6, k  # the step moved it
    # AdamW moments, keyed by parameter name: (1 - beta1) g and (1 - beta2) g^2, each within its
    # own float32 rounding scale
    for moment in ("exp_avg", "exp_avg_sq"):
        want = {k: opt.state[p][moment] for k, p in model.named_parameters()}
        want64 = {k: opt64.state[p][moment] for k, p in model64.named_parameters()}
        got = {k: optim_sd["state"][k][moment] for k in want}
        assert_within(got, want, 4 * rounding_scale((want, want64)), moment)
    assert ranks[1]["model_sd"] == {} and ranks[1]["optim_sd"] == {}  # rank 0 only


def test_reshard_plan_rebuilds_every_replica_exactly(two_ranks):
    _, ranks = two_ranks
    full = ranks[0]["model_sd"]
    for r in ranks:
        assert r["replica"].keys() == full.keys()
        for k in full:
            assert torch.equal(r["replica"][k], full[k]), k


def test_checkpoint_round_trip(two_ranks):
    _, ranks = two_ranks
    model_sd, optim_sd = ranks[0]["reloaded"]
    _close(model_sd, ranks[0]["model_sd"], rtol=0, atol=0)
    want = ranks[0]["optim_sd"]
    # the broadcast turns tuples (AdamW's betas) into lists
    assert [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in want["param_groups"]] == \
        optim_sd["param_groups"]
    assert optim_sd["state"].keys() == want["state"].keys()
    for k, st in want["state"].items():
        _close(optim_sd["state"][k], st, rtol=0, atol=0)


def test_unsharded_model_gives_and_takes_the_same_dicts():
    """Without a process group the helpers work on a plain model, so either kind of run can write
    a checkpoint the other reads."""
    from ossrl.train import fsdp

    model, opt, _, _ = _reference(False)
    model_sd, optim_sd = fsdp.full_state_dicts(model, opt)
    assert list(model_sd) == list(model.state_dict())
    assert list(optim_sd["state"]) == [k for k, _ in model.named_parameters()]
    torch.manual_seed(1)
    other = GptOss(GptOssConfig.tiny())
    other_opt = torch.optim.AdamW(other.parameters(), lr=LR, eps=EPS)
    fsdp.load_full_state_dicts(other, other_opt, model_sd, optim_sd)
    _close(other.state_dict(), model.state_dict(), rtol=0, atol=0)
    for k, p in other.named_parameters():
        _close(other_opt.state[p], optim_sd["state"][k], rtol=0, atol=0)
