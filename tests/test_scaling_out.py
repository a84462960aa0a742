"""Expert parallelism and context parallelism on 2 and 4 gloo processes against one process.

Every rank also computes the one-process result itself (the whole global batch on an unsharded
copy of the same model), so the comparison needs no transfer: forward log-probs of the rank's own
tokens, the loss, every gradient (expert shards gathered whole) and every weight after a clipped
AdamW step. Float64 throughout, so the bound is the model's float32 intermediates (see
_tolerance.MODEL_FLOAT64_ULPS), not rounding of one machine's sums.

The batch is built to hit the edge cases: sequences of 1 token and of many, split unevenly across
ranks and across rank boundaries; a sliding window (8) shorter than the rank pieces and one longer
(the full layer), sinks far from zero; layer 0's router never picks expert 3 (its rank receives no
rows for it: with 4 expert ranks, none at all).
"""

from __future__ import annotations

import copy

import pytest
import torch

from _ranks import run_ranks
from _tolerance import MODEL_FLOAT64_ULPS

# sequence i goes to data rank i % (world // cp); 125 tokens, so cp pieces differ in size (62|63, 31|31|31|32)
LENGTHS = [37, 1, 23, 5, 16, 29, 3, 11]
LR, EPS, MAX_NORM = 1e-3, 1e-3, 0.5  # eps of the order of the grads (see test_fsdp); the norm does clip


def _model():
    from ossrl.model import GptOss, GptOssConfig

    torch.manual_seed(0)
    m = GptOss(GptOssConfig.tiny(sliding_window=8)).double()
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.sinks.normal_(0.0, 1.0)
        m.model.layers[0].mlp.router.bias[3] = -1e4  # expert 3 is never chosen in layer 0
    return m


def _batch(seqs: list[torch.Tensor]):
    ids = torch.cat(seqs)
    targets = torch.cat([torch.roll(s, -1) for s in seqs])
    cu = torch.tensor([0] + [len(s) for s in seqs], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    mask = torch.ones(len(ids), dtype=torch.float64)
    mask[cu[1:].long() - 1] = 0
    return ids, targets, cu, mask


def _seqs() -> list[torch.Tensor]:
    from ossrl.model import GptOssConfig

    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, GptOssConfig.tiny().vocab_size, (n,), generator=g) for n in LENGTHS]


def _bound(ref: torch.Tensor) -> float:
    return MODEL_FLOAT64_ULPS * torch.finfo(torch.float32).eps * max(ref.abs().max().item(), 1e-30)


def _close(actual, expected, what):
    from _tolerance import assert_within

    assert_within(actual, expected, _bound(expected), what)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _layouts_worker(rank: int, world: int, layouts) -> None:
    import torch.distributed as dist

    from ossrl.train.parallel import make_parallel

    seqs = _seqs()
    n_tokens = sum(n - 1 for n in LENGTHS)
    base = _model()

    # one process, the whole batch
    ref = copy.deepcopy(base)
    ids, targets, cu, mask = _batch(seqs)
    ref_loss = -(ref.token_logprobs(ids, cu, targets) * mask).sum() / n_tokens
    ref_loss.backward()
    ref_grads = {k: p.grad.clone() for k, p in ref.named_parameters()}
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, eps=EPS)
    opt.step()

    for kind, ep, cp in layouts:
        where = f"{kind} ep={ep} cp={cp} rank {rank}"
        dp = make_parallel(kind, ep, cp)
        model = dp.prepare(copy.deepcopy(base))
        mine = seqs[(rank // cp)::world // cp]
        ids, targets, cu, mask = _batch(mine)
        with torch.no_grad():  # this rank's tokens, as one process computes them
            expected = base.token_logprobs(ids, cu, targets)
        shard = dp.context_shard(cu)
        if shard is not None:
            ids, targets, mask, expected = (shard.local(t) for t in (ids, targets, mask, expected))
            cu = shard.cu_seqlens_q
        with model.context_shard(shard):
            logp = model.token_logprobs(ids, cu, targets)
            loss = -(logp * mask).sum() / n_tokens
            loss.backward()
        _close(logp.detach(), expected, f"{where}: log-probs")
        total = loss.detach().clone()
        dist.all_reduce(total)
        _close(total, ref_loss.detach(), f"{where}: loss")
        dp.reduce_grads(model)
        grads = {k: _full(p.grad) for k, p in model.named_parameters()}
        for k, g in ref_grads.items():
            _close(grads[k], g, f"{where}: grad {k}")
        norm = dp.clip_grads(model, MAX_NORM)
        _close(norm, ref_norm, f"{where}: grad norm")
        torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, **dp.optimizer_options()).step()
        params = dict(model.named_parameters())
        for k, p in ref.named_parameters():
            _close(_full(params[k].detach()), p.detach(), f"{where}: weight {k} after the step")
        if ep > 1:  # each rank holds its quarter/half of the experts, not all of them
            w = model.model.layers[0].mlp.experts.gate_up_proj
            assert w.to_local().shape[0] == 4 // ep and w.shape[0] == 4, where


@pytest.mark.parametrize("world, layouts", [
    pytest.param(2, [("dp", 2, 1), ("dp", 1, 2), ("dp", 2, 2), ("fsdp", 2, 2)], id="2-ranks"),
    pytest.param(4, [("dp", 4, 1), ("dp", 1, 4), ("dp", 2, 2), ("dp", 4, 2), ("fsdp", 2, 1), ("fsdp", 2, 4)],
                 id="4-ranks"),
])
def test_layouts_match_one_process(world, layouts):
    run_ranks(_layouts_worker, world, layouts)


def test_context_shard_pieces():
    """The pieces cover the batch once, in order, with each token's position in its sequence and
    the key range every query needs (its sequence from the start up to the piece's end)."""
    from ossrl.model.distributed import ContextShard, split_bounds
    from ossrl.model.gpt_oss import positions_from_cu_seqlens

    class G:  # ContextShard asks the group for its size and rank only
        pass

    cu = torch.tensor([0, 37, 38, 61, 66], dtype=torch.int32)
    pos = positions_from_cu_seqlens(cu, 66)
    import torch.distributed as dist

    for size in (1, 2, 3, 4, 7):
        cuts = split_bounds(66, size)
        assert cuts[0] == 0 and cuts[-1] == 66 and max(b - a for a, b in zip(cuts, cuts[1:])) - \
            min(b - a for a, b in zip(cuts, cuts[1:])) <= 1
        for r in range(size):
            orig = dist.get_world_size, dist.get_rank
            dist.get_world_size, dist.get_rank = (lambda g: size), (lambda g, r=r: r)
            try:
                s = ContextShard(G(), cu)
            finally:
                dist.get_world_size, dist.get_rank = orig
            assert (s.lo, s.hi) == (cuts[r], cuts[r + 1])
            assert torch.equal(s.positions, pos[s.lo: s.hi])
            q, k = s.cu_seqlens_q.tolist(), s.cu_seqlens_k.tolist()
            assert q[-1] == s.hi - s.lo and k[-1] == s.hi - s.key_lo
            # every query sequence ends where its key sequence ends (bottom-right alignment)
            assert [b - a for a, b in zip(q, q[1:])] <= [b - a for a, b in zip(k, k[1:])]
            assert s.key_lo in cu.tolist() and s.key_lo <= s.lo


def _bad_config_worker(rank: int, world: int) -> None:
    from ossrl.model import GptOss, GptOssConfig
    from ossrl.model.distributed import ContextShard
    from ossrl.train.parallel import DataParallel

    for ep, cp in ((3, 1), (1, 4), (0, 1)):
        with pytest.raises(ValueError, match="must divide the number of processes"):
            DataParallel(ep, cp)
    with pytest.raises(ValueError, match="must divide the number of experts"):
        DataParallel(2, 1).prepare(GptOss(GptOssConfig.tiny(num_local_experts=3)))
    dp = DataParallel(1, 2)
    with pytest.raises(ValueError, match="cannot give every rank at least one"):
        ContextShard(dp.cp_group, torch.tensor([0, 1], dtype=torch.int32))


def test_bad_configurations_are_rejected():
    run_ranks(_bad_config_worker, 2)


def _train_worker(rank: int, world: int, args: list[str]) -> None:
    from ossrl.cli import main

    assert main(["train", *args]) == 0


@pytest.mark.parametrize("parallel", ["dp", "fsdp"])
def test_expert_parallel_checkpoint_resumes_the_run(tmp_path, parallel):
    """Under expert_parallel=2 (dense weights replicated or FSDP-sharded) the checkpoint holds every expert whole (the shards gathered), and
    --resume puts each rank's shard back: stopping after step 1 and resuming ends where the
    uninterrupted run does."""
    from safetensors.torch import load_file

    args = ["sft_steps=4", "prompts_per_step=4", "group_size=4", "eval_prompts=8", "eval_every=100",
            "checkpoint_every=1", "max_turns=2", "sft_batch=8", "filter_groups=false", "extra_groups=0",
            "expert_parallel=2", f"parallel={parallel}"]
    run_ranks(_train_worker, 2, ["--run-dir", str(tmp_path / "straight"), "steps=2", *args])
    run_ranks(_train_worker, 2, ["--run-dir", str(tmp_path / "split"), "steps=1", *args])
    first = tmp_path / "split" / "checkpoints" / "step_00000001" / "model.safetensors"
    written = first.stat().st_mtime_ns
    run_ranks(_train_worker, 2, ["--run-dir", str(tmp_path / "split"), "--resume", "steps=2", *args])
    assert first.stat().st_mtime_ns == written  # resumed after step 1, not started over
    a = load_file(tmp_path / "straight" / "checkpoints" / "step_00000002" / "model.safetensors")
    b = load_file(tmp_path / "split" / "checkpoints" / "step_00000002" / "model.safetensors")
    assert a.keys() == b.keys()
    assert a["model.layers.0.mlp.experts.gate_up_proj"].shape[0] == 4  # whole, not one rank's half
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")


def _uneven_step_worker(rank: int, world: int) -> None:
    """The loop's train_step under expert_parallel=2 with a KL reference: rank 0 has three
    micro-batches, rank 1 one (it pads with two passes, the reference forward included, or the
    ranks' all-to-alls pair up wrongly); the step equals one process's on all trajectories."""
    from ossrl.model import GptOss, GptOssConfig
    from ossrl.rollout.agent import Trajectory
    from ossrl.train.config import TrainConfig
    from ossrl.train.loop import train_step
    from ossrl.train.parallel import DataParallel

    torch.manual_seed(0)
    base = GptOss(GptOssConfig.tiny())
    g = torch.Generator().manual_seed(3)
    trajs = []
    for n in (30, 28, 33, 25):
        tokens = torch.randint(0, base.config.vocab_size, (n,), generator=g).tolist()
        mask = [0] * 10 + [1] * (n - 10)
        trajs.append(Trajectory(tokens=tokens, loss_mask=mask,
                                rollout_logprobs=[-(m * 0.5) for m in mask]))
    adv = [1.0, -0.5, 0.25, -0.75]
    cfg = TrainConfig(micro_batch_tokens=40)
    assert cfg.loss.kl_coef > 0

    def step(model, dp, mine, a):
        ref = dp.prepare(copy.deepcopy(base).requires_grad_(False))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-3, **dp.optimizer_options())
        return train_step(model, opt, mine, a, cfg, torch.device("cpu"), dp, ref_model=ref)

    one = DataParallel()
    one.on, one.world, one.rank = False, 1, 0  # this process alone, all four trajectories
    ref_model = copy.deepcopy(base)
    expected = step(ref_model, one, trajs, adv)
    dp = DataParallel(2, 1)
    model = dp.prepare(copy.deepcopy(base))
    mine = [0, 1, 2] if rank == 0 else [3]
    got = step(model, dp, [trajs[i] for i in mine], [adv[i] for i in mine])
    for k in ("loss", "kl", "grad_norm"):
        assert got[k] == pytest.approx(expected[k], rel=1e-5, abs=1e-7), (k, got, expected)
    params = dict(model.named_parameters())
    for k, p in ref_model.named_parameters():
        torch.testing.assert_close(_full(params[k].detach()), p.detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{k}: {m}")


def test_expert_parallel_pads_uneven_micro_batches():
    run_ranks(_uneven_step_worker, 2, timeout=120)


def _short_tail_worker(rank: int, world: int) -> None:
    """context_parallel=2 where the last micro-batch would be a 1-token trajectory (one rank would
    get nothing): it joins the micro-batch before it, and the step equals one process's."""
    from ossrl.model import GptOss, GptOssConfig
    from ossrl.rollout.agent import Trajectory
    from ossrl.train.config import TrainConfig
    from ossrl.train.loop import train_step
    from ossrl.train.parallel import DataParallel

    torch.manual_seed(0)
    base = GptOss(GptOssConfig.tiny())
    g = torch.Generator().manual_seed(5)
    trajs = []
    for n in (40, 40, 1):
        tokens = torch.randint(0, base.config.vocab_size, (n,), generator=g).tolist()
        mask = [0] * min(n, 8) + [1] * max(n - 8, 0)
        trajs.append(Trajectory(tokens=tokens, loss_mask=mask, rollout_logprobs=[-(m * 0.5) for m in mask]))
    adv = [1.0, -0.5, 0.25]
    cfg = TrainConfig(micro_batch_tokens=20)  # 40 tokens per micro-batch of the block: one trajectory each

    def step(model, dp, mine, a):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-3)
        ref = copy.deepcopy(base).requires_grad_(False)
        return train_step(model, opt, mine, a, cfg, torch.device("cpu"), dp, ref_model=ref)

    one = DataParallel()
    one.on, one.world, one.rank = False, 1, 0
    ref_model = copy.deepcopy(base)
    expected = step(ref_model, one, trajs, adv)
    model = copy.deepcopy(base)
    mine = [0, 1] if rank == 0 else [2]
    got = step(model, DataParallel(1, 2), [trajs[i] for i in mine], [adv[i] for i in mine])
    for k in ("loss", "kl", "grad_norm"):
        assert got[k] == pytest.approx(expected[k], rel=1e-5, abs=1e-7), (k, got, expected)
    for (k, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_context_parallel_short_last_micro_batch():
    run_ranks(_short_tail_worker, 2, timeout=120)
