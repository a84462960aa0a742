"""Packed variable-length attention (sliding windows, GQA, sinks) and paged decoding.

Kernels: csrc/cpu/attention.cpp and csrc/cuda/attention_{varlen,paged}.cu (the forward kernel in
attention_fwd.cuh, shared helpers in attention_common.cuh); schemas: csrc/ops.cpp.

Masks, shared by every op here. Query ``i`` of a sequence with ``Lq`` queries and ``Lk`` keys
sits at key position ``p = i + Lk - Lq`` (the queries are the last ``Lq`` tokens: bottom-right
alignment). It sees key ``j`` when

- ``j <= p`` if ``causal`` (the right bound), and
- ``j > p - window`` if ``window`` is set (the left bound: ``window`` keys, itself included).

With ``causal=True`` (GPT-OSS) a window ``W`` is exactly ``p - W < j <= p``. Without
``causal`` the window only bounds the left side, as FlashAttention's ``window_size=(W - 1, -1)``.
A query that sees no key (an empty key sequence; with ``causal``, a query placed before the first
key because its sequence has more queries than keys) gets a zero output and zero gradients.

Sinks: one logit per query head, in the softmax denominator only and not scaled by
``softmax_scale``: ``p_j = exp(s_j) / (exp(sink_h) + sum_k exp(s_k))``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_ops = torch.ops.ossrl

__all__ = ["varlen_attention", "paged_kv_append", "paged_attention"]


def _window_arg(window: int | None) -> int:
    if window is None:
        return -1
    window = int(window)
    if window <= 0:
        raise ValueError(f"ossrl attention: window must be a positive number of keys or None, got {window}")
    return window


def _scale_arg(softmax_scale: float | None, q: Tensor) -> float:
    return float(q.shape[-1] ** -0.5) if softmax_scale is None else float(softmax_scale)


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = True,
    window: int | None = None,
    sinks: Tensor | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over packed sequences of different lengths, without padding.

    q (Tq, Hq, D); k, v (Tk, Hkv, D) with Hq a multiple of Hkv (grouped-query attention: query
    head h uses kv head h // (Hq // Hkv); K/V are never repeated in memory). cu_seqlens_q and
    cu_seqlens_k: int32 (B+1,) starts of each sequence (0, non-decreasing, last = Tq resp. Tk);
    sequence b is q[cu_seqlens_q[b]:cu_seqlens_q[b+1]] against k, v[cu_seqlens_k[b]:...].
    max_seqlen_q/k: at least the longest sequence (the CPU kernel checks it).

    causal, window: see the module docstring (bottom-right alignment; window W = W keys, the
    query's own position included). sinks: (Hq,) float32 or q.dtype, or None. softmax_scale:
    default D ** -0.5.

    Returns out (Tq, Hq, D) in q.dtype, or (out, lse) when return_lse: lse (Hq, Tq) float32
    (float64 for float64 inputs) is the log of the full softmax denominator, the sink included
    (-inf for a query that sees nothing when there are no sinks). Differentiable in q, k, v and
    sinks; lse is returned as a non-differentiable output. Works under
    ``torch.compile(fullgraph=True)``.
    """
    out, lse = _ops.varlen_attention(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        bool(causal),
        _window_arg(window),
        sinks,
        _scale_arg(softmax_scale, q),
    )
    return (out, lse) if return_lse else out


def paged_kv_append(
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor,
    v: Tensor,
    block_table: Tensor,
    cu_seqlens: Tensor,
    cache_seqlens: Tensor,
) -> None:
    """Writes new keys and values into a paged KV cache, in place.

    k_cache, v_cache (num_blocks, block_size, Hkv, D); block_table int32 (B, max_blocks): row b
    lists the cache blocks of sequence b in order, so its token t lives at
    ``cache[block_table[b, t // block_size], t % block_size]``. k, v (T, Hkv, D) in the cache's
    dtype, packed by cu_seqlens int32 (B+1,); cache_seqlens int32 (B,) tokens already cached.
    The new tokens of sequence b go to positions cache_seqlens[b] .. cache_seqlens[b] + n_b - 1.
    cache_seqlens is not updated (add the new lengths yourself). The block entries written must be
    in [0, num_blocks) and fit the row; sequences must not share the blocks they write to.
    Writes that would overwrite each other are errors: a cache whose elements share memory (a
    stride of 0) and K and V caches that share memory (CPU and CUDA), and two sequences writing
    one block (CPU only: on CUDA the check would need the block table on the host, a sync).
    """
    _ops.paged_kv_append(k_cache, v_cache, k, v, block_table, cu_seqlens, cache_seqlens)


def paged_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_table: Tensor,
    cu_seqlens_q: Tensor,
    seq_lens: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = True,
    window: int | None = None,
    sinks: Tensor | None = None,
    softmax_scale: float | None = None,
) -> Tensor:
    """Attention of new queries against a paged KV cache (decoding, chunked prefill).

    q (Tq, Hq, D) packed by cu_seqlens_q int32 (B+1,); seq_lens int32 (B,): sequence b attends to
    its first seq_lens[b] cached tokens (already appended, its own new tokens included), and its
    queries are the last tokens of those (bottom-right alignment; one query per sequence is plain
    decoding). Cache layout as in :func:`paged_kv_append`. Same causal, window, sinks and
    softmax_scale semantics as :func:`varlen_attention`, so on the same history it returns what
    varlen_attention returns. Only the blocks the queries can see are read (and checked): with a
    window, entries of blocks wholly before it may hold anything. Long contexts are split over
    the key axis and merged by log-sum-exp, so one long sequence still uses every core.
    Returns (Tq, Hq, D) in q.dtype. Not differentiable.
    """
    return _ops.paged_attention(
        q,
        k_cache,
        v_cache,
        block_table,
        cu_seqlens_q,
        seq_lens,
        max_seqlen_q,
        max_seqlen_k,
        bool(causal),
        _window_arg(window),
        sinks,
        _scale_arg(softmax_scale, q),
    )


# ---- fake (meta) kernels: shapes, dtypes and devices only, for torch.compile and opcheck ----


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _check_varlen_fake(op, q, k, v, cu_q, cu_k, sinks):
    def check(cond, msg):
        torch._check(cond, lambda: f"ossrl.{op}: {msg}")

    check(q.dim() == 3 and k.dim() == 3 and v.dim() == 3, "q, k and v must be 3-D")
    check(k.dtype == q.dtype and v.dtype == q.dtype, "k and v must have the dtype of q")
    for name, t in (("k", k), ("v", v), ("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k), ("sinks", sinks)):
        if t is not None:
            check(t.device == q.device, f"{name} is on {t.device} but q is on {q.device}")
    check(cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32, "cu_seqlens_q/k must be int32")
    check(q.shape[1] % k.shape[1] == 0, "the query heads must be a multiple of the key/value heads")
    check(k.shape[2] == q.shape[2] and v.shape[2] == q.shape[2], "q, k and v must have the same head dim")
    if sinks is not None:
        check(sinks.dim() == 1 and sinks.shape[0] == q.shape[1], "sinks must be (Hq,)")


def _check_devices_fake(op, ref_name, ref, **tensors):
    for name, t in tensors.items():
        msg = f"ossrl.{op}: {name} is on {t.device} but {ref_name} is on {ref.device}"
        torch._check(t.device == ref.device, lambda: msg)


@torch.library.register_fake("ossrl::varlen_attention")
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window, sinks, softmax_scale):
    _check_varlen_fake("varlen_attention", q, k, v, cu_seqlens_q, cu_seqlens_k, sinks)
    out = q.new_empty(q.shape)
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q))
    return out, lse


@torch.library.register_fake("ossrl::varlen_attention_backward")
def _(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window,
      sinks, softmax_scale):
    _check_varlen_fake("varlen_attention_backward", q, k, v, cu_seqlens_q, cu_seqlens_k, sinks)
    dsinks = q.new_empty((q.shape[1] if sinks is not None else 0,), dtype=_lse_dtype(q))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


@torch.library.register_fake("ossrl::paged_kv_append")
def _(k_cache, v_cache, k, v, block_table, cu_seqlens, cache_seqlens):
    _check_devices_fake("paged_kv_append", "k_cache", k_cache, v_cache=v_cache, k=k, v=v, block_table=block_table,
                        cu_seqlens=cu_seqlens, cache_seqlens=cache_seqlens)
    return None


@torch.library.register_fake("ossrl::paged_attention")
def _(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, max_seqlen_q, max_seqlen_k, causal, window,
      sinks, softmax_scale):
    _check_devices_fake("paged_attention", "q", q, k_cache=k_cache, v_cache=v_cache, block_table=block_table,
                        cu_seqlens_q=cu_seqlens_q, seq_lens=seq_lens)
    if sinks is not None:
        _check_devices_fake("paged_attention", "q", q, sinks=sinks)
    torch._check(q.dim() == 3 and k_cache.dim() == 4, lambda: "ossrl.paged_attention: q must be 3-D and k_cache 4-D")
    torch._check(q.shape[1] % k_cache.shape[2] == 0,
                 lambda: "ossrl.paged_attention: the query heads must be a multiple of the key/value heads")
    return q.new_empty(q.shape)


# ---- autograd ----


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, window, sinks, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, sinks)
    ctx.args = (max_q, max_k, causal, window, scale)
    ctx.sinks_dtype = sinks.dtype if sinks is not None else None
    ctx.mark_non_differentiable(lse)


def _varlen_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_q, cu_k, sinks = ctx.saved_tensors
    max_q, max_k, causal, window, scale = ctx.args
    if grad_out is None:
        return (None,) * 11
    dq, dk, dv, dsinks = _ops.varlen_attention_backward(
        grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, window, sinks, scale
    )
    dsinks = dsinks.to(ctx.sinks_dtype) if ctx.sinks_dtype is not None else None
    return dq, dk, dv, None, None, None, None, None, None, dsinks, None


torch.library.register_autograd("ossrl::varlen_attention", _varlen_backward, setup_context=_varlen_setup)
