"""How the layers of one forward pass run across ranks: expert parallelism and context parallelism.

Both are hooks the trainer sets on the model for the duration of a forward (and its backward),
like :class:`~ossrl.model.gpt_oss.RoutingTape`; the architecture itself stays one readable file.
The collectives go through torch.distributed (NCCL on GPUs, gloo on CPUs) with process groups the
trainer builds (:mod:`ossrl.train.parallel`).

Expert parallelism (:class:`ExpertShard`): each of E ranks holds ``num_local_experts / E``
consecutive experts of every MoE layer. A layer routes its own tokens (the router is replicated),
sends each routed (token, slot) row to the rank holding its expert (all-to-all; the per-expert row
counts are exchanged first, so the ranks can receive different numbers of rows), runs the fused
expert block on the rows it received, and sends the results back (a second all-to-all), where
they are weighted by the routing weights and summed per token. The backward runs the same
exchanges in reverse. The routing weights stay on the token's rank, so the router's gradient is
local.

Context parallelism (:class:`ContextShard`): the tokens of one packed batch (one long trajectory
or several) are cut into C contiguous pieces, one per rank; every rank runs the whole model on
its piece. Attention is the only layer that looks at other tokens: each rank all-gathers the
keys and values of the batch and attends its own queries over the keys of their sequences up to
its last token, with the masks aligned bottom-right (the queries are the last tokens of those
key ranges), so causal masks, sliding windows, GQA and sinks are exact. The backward sums each
rank's gradient of the gathered keys and values back onto the rank that owns them. An
all-gather costs 2 * Hkv * D values per token and layer (1 KiB per token in bf16 for GPT-OSS):
against ring attention it saves the log-sum-exp merging and keeps one kernel call per layer;
with activation checkpointing it is live one layer at a time.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .. import ops

__all__ = ["ExpertShard", "ContextShard", "split_bounds"]


class _AllToAll(torch.autograd.Function):
    """Rows of x, in_splits[r] of them for rank r, exchanged for out_splits[r] rows from each rank r;
    the backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        gx = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(gx, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return gx, None, None, None


class _GatherRows(torch.autograd.Function):
    """Every rank's rows of x (sizes[r] rows from rank r), concatenated in rank order; the backward
    sums the ranks' gradients of the whole and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], rank: int, group) -> Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        most = max(sizes)
        padded = x.new_zeros(most, *x.shape[1:])  # all_gather wants equal sizes; pieces may differ by one
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        lo = sum(ctx.sizes[: ctx.rank])
        return grad[lo: lo + ctx.sizes[ctx.rank]], None, None, None


class ExpertShard:
    """This rank's share of the experts in an expert-parallel group of ``size`` ranks: experts
    [rank * local, (rank + 1) * local) of every MoE layer."""

    def __init__(self, group, num_experts: int):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if num_experts % self.size:
            raise ValueError(f"expert_parallel={self.size} must divide the number of experts ({num_experts})")
        self.local = num_experts // self.size

    def experts(self, x: Tensor, routing: ops.Routing, w_gate_up: Tensor, b_gate_up: Tensor, w_down: Tensor,
                b_down: Tensor, *, swiglu_alpha: float, swiglu_limit: float) -> Tensor:
        """What ``ops.moe_experts(x, routing, ...)`` computes over all experts, with the weights of
        this rank's experts only ((local, ...) slices)."""
        t, k = routing.experts.shape
        ends = routing.offsets.long()
        counts = torch.diff(ends, prepend=ends.new_zeros(1))  # rows per expert, in expert order
        send = counts.view(self.size, self.local)  # row r: what goes to rank r, per expert there
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # row s: what rank s sends me, per local expert
        send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()  # the one host sync

        rows = routing.order.long()[: int(ends[-1])]  # (token * k + slot), sorted by expert = by rank
        got = _AllToAll.apply(x[rows // k], recv_splits, send_splits, self.group)
        # Received rows come per source rank, each sorted by expert: regroup them by expert.
        expert_of = torch.repeat_interleave(torch.arange(self.local, device=x.device).repeat(self.size),
                                            recv.reshape(-1), output_size=got.shape[0])
        order = torch.argsort(expert_of, stable=True).to(torch.int32)
        mine = ops.Routing(weights=got.new_ones(got.shape[0], 1, dtype=torch.float32),
                           experts=expert_of[:, None].to(torch.int32), order=order,
                           offsets=recv.sum(0).cumsum(0).to(torch.int32))
        y = ops.moe_experts(got, mine, w_gate_up, b_gate_up, w_down, b_down, swiglu_alpha=swiglu_alpha,
                            swiglu_limit=swiglu_limit)
        back = _AllToAll.apply(y, send_splits, recv_splits, self.group)
        w = routing.weights.reshape(-1)[rows].to(back.dtype)
        return x.new_zeros(t, x.shape[1]).index_add(0, rows // k, back * w[:, None])


def split_bounds(total: int, parts: int) -> list[int]:
    """Cut points of ``total`` tokens into ``parts`` contiguous pieces whose sizes differ by at most one."""
    return [total * r // parts for r in range(parts + 1)]


class ContextShard:
    """This rank's piece of a packed batch in a context-parallel group, and how its attention
    layers see the other pieces.

    cu_seqlens: the whole batch's (B+1,) int32 sequence starts. The rank holds tokens [lo, hi) of
    the batch: ``local(t)`` cuts a per-token tensor of the whole batch to them; ``positions`` are
    their rotary positions within their sequences; ``cu_seqlens_q`` is the model's cu_seqlens
    argument for the piece.
    """

    def __init__(self, group, cu_seqlens: Tensor):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        cu = [int(c) for c in cu_seqlens.tolist()]
        total = cu[-1]
        if total < self.size:
            raise ValueError(f"context_parallel={self.size}: a packed batch of {total} tokens cannot give every "
                             f"rank at least one")
        cuts = split_bounds(total, self.size)
        self.sizes = [b - a for a, b in zip(cuts, cuts[1:])]
        self.lo, self.hi = lo, hi = cuts[self.rank], cuts[self.rank + 1]
        # Sequences overlapping [lo, hi): queries are their tokens in [lo, hi), keys everything of
        # theirs before hi. The key ranges are contiguous: [start of the first, hi).
        seqs = [(a, b) for a, b in zip(cu, cu[1:]) if a < hi and b > lo]
        self.key_lo = seqs[0][0]
        q_ends = [min(b, hi) - lo for _, b in seqs]
        k_ends = [min(b, hi) - self.key_lo for _, b in seqs]
        dev = cu_seqlens.device
        self.cu_seqlens_q = torch.tensor([0, *q_ends], dtype=torch.int32, device=dev)
        self.cu_seqlens_k = torch.tensor([0, *k_ends], dtype=torch.int32, device=dev)
        self.max_q = max(min(b, hi) - max(a, lo) for a, b in seqs)
        self.max_k = max(min(b, hi) - a for a, b in seqs)
        counts = torch.tensor([min(b, hi) - max(a, lo) for a, b in seqs], device=dev)
        starts = torch.tensor([a for a, _ in seqs], device=dev)
        self.positions = torch.arange(lo, hi, device=dev) - torch.repeat_interleave(starts, counts, output_size=hi - lo)

    def local(self, t: Tensor) -> Tensor:
        return t[self.lo: self.hi]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, window: int | None, sinks: Tensor,
               softmax_scale: float) -> Tensor:
        """Attention of this piece's queries over the keys and values of every rank's piece."""
        kv = _GatherRows.apply(torch.stack((k, v), 1), self.sizes, self.rank, self.group)[self.key_lo: self.hi]
        return ops.varlen_attention(q, kv[:, 0], kv[:, 1], self.cu_seqlens_q, self.cu_seqlens_k, self.max_q,
                                    self.max_k, causal=True, window=window, sinks=sinks, softmax_scale=softmax_scale)
