"""Tests of ossrl.ops.varlen_attention, paged_kv_append and paged_attention.

The reference builds the full masked score matrix of each sequence in float64 and appends the
sink column, as the GPT-OSS reference implementation does. CPU tests always run; the CUDA
variants run where a GPU (and a CUDA build of ossrl) is present.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import ossrl  # noqa: F401  (registers torch.ops.ossrl)
from ossrl.ops import paged_attention, paged_kv_append, varlen_attention

from _tolerance import assert_within, gamma, unit_roundoff

HAS_CUDA = torch.cuda.is_available() and getattr(ossrl._C, "with_cuda", False)
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda,
                                   pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")])
DEVICES = ["cpu", CUDA]

# Fixed tolerances for the CUDA kernels (bf16, P rounded to bf16 for P V) and for the backward
# pass; the CPU forward is checked against forward_bound. The backward tolerances are relative to
# the largest gradient (see test_backward_matches_reference): for float32, 1e-4 is ~1700 float32
# roundings, ~100x above the largest errors seen (the CPU kernels are ours, in a fixed order;
# their AVX-512, AVX2 and baseline clones differ at most in FMA contraction); for bf16/fp16 it is
# ~15-20 roundings of the result to the dtype, which dominate.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
GRAD_TOL = {
    torch.float64: dict(atol=1e-9, rtol=1e-9),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=6e-2),
}


# ---- helpers ----------------------------------------------------------------------------------


def cu(lens, device="cpu"):
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


def make_inputs(lens_q, lens_k, hq, hkv, d, dtype, device="cpu", sinks=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), hq, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(sum(lens_k), hkv, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(sum(lens_k), hkv, d, generator=g).to(device=device, dtype=dtype)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.randn(hq, generator=g).to(device=device, dtype=sdt) if sinks else None
    return q, k, v, s


def visible(lq, lk, causal, window):
    """(lq, lk) bool: which keys each query sees (bottom-right aligned)."""
    p = torch.arange(lq)[:, None] + (lk - lq)
    j = torch.arange(lk)[None, :]
    m = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        m &= j <= p
    if window is not None:
        m &= j > p - window
    return m


def reference(q, k, v, cu_q, cu_k, *, causal=True, window=None, sinks=None, scale=None):
    """float64, differentiable: the full masked score matrix per sequence plus the sink column."""
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    cq, ck = cu_q.tolist(), cu_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qb = q[cq[b] : cq[b + 1]].double().transpose(0, 1)  # (H, Lq, D)
        kb = k[ck[b] : ck[b + 1]].double().repeat_interleave(g, 1).transpose(0, 1)
        vb = v[ck[b] : ck[b + 1]].double().repeat_interleave(g, 1).transpose(0, 1)
        lq, lk = qb.shape[1], kb.shape[1]
        s = (qb @ kb.transpose(1, 2)) * scale
        s = s.masked_fill(~visible(lq, lk, causal, window), -math.inf)
        if sinks is not None:
            s = torch.cat([s, sinks.double()[:, None, None].expand(hq, lq, 1)], dim=-1)
        any_ = torch.isfinite(s).any(-1, keepdim=True)
        s_safe = torch.where(any_, s, torch.zeros_like(s))
        lse = torch.logsumexp(s_safe, -1, keepdim=True)
        p = torch.exp(s_safe - lse) * any_
        if sinks is not None:
            p = p[..., :-1]
        outs.append((p @ vb).transpose(0, 1))
        lses.append(torch.where(any_, lse, torch.full_like(lse, -math.inf))[..., 0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def assert_close(actual, expected, dtype, tol=TOL):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), **tol[dtype])


def forward_bound(q, k, v, cu_q, cu_k, *, causal=True, window=None, sinks=None, scale=None):
    """Elementwise bounds (out (T, Hq, D), lse (Hq, T)) on how far the CPU kernel's results in
    q.dtype (accumulating in float32, or float64) may be from the exact ones, in any order of its
    sums (tiles, threads, key splits, vector width), from the lengths and magnitudes:

    * scores s = scale q.k: gamma(D + 4) M, M the largest |scale q_i . k_j| (|.| elementwise) or
      |sink| of the row (the shift by the row max adds 2u M);
    * each weight p = exp(s - m) / l: twice that (numerator and denominator), exp (4u: ours is a
      polynomial with ~1e-7 relative error), the sums of l and of P V over n <= keys + 1 terms
      (gamma(n) each), the online rescaling once per key tile of 64 (exp + multiply, on o and l);
    * out = P V: that relative error on sum_j p_j |v_j| (the float64 reference run on |v|), plus
      the rounding of out to q.dtype (twice, for the float32 error under it);
    * lse = m + log l: the score error, the relative error of l, the rounding of the sum.
    The float64 reference's own error (the same bound in float64) is added."""
    d = q.shape[2]
    scale = d**-0.5 if scale is None else scale
    pv, _ = reference(q, k, v.abs(), cu_q, cu_k, causal=causal, window=window, sinks=sinks, scale=scale)
    _, ref_lse = reference(q, k, v, cu_q, cu_k, causal=causal, window=window, sinks=sinks, scale=scale)
    g = q.shape[1] // k.shape[1]
    cq, ck = cu_q.tolist(), cu_k.tolist()
    mags = []
    for b in range(len(cq) - 1):
        qb = q[cq[b] : cq[b + 1]].double().abs().transpose(0, 1)  # (H, Lq, D)
        kb = k[ck[b] : ck[b + 1]].double().abs().repeat_interleave(g, 1).transpose(0, 1)
        m = (qb @ kb.transpose(1, 2)).amax(-1) * scale if kb.shape[1] else qb.new_zeros(qb.shape[:2])  # (H, Lq)
        if sinks is not None:
            m = torch.maximum(m, sinks.double().abs()[:, None])
        mags.append(m)
    m = torch.cat(mags, dim=1)  # (Hq, T)
    n = max((ck[b + 1] - ck[b] for b in range(len(ck) - 1)), default=0) + 1
    tiles = -(-n // 64) + 1
    bounds_out, bounds_lse = 0, 0
    for acc in (torch.float64 if q.dtype == torch.float64 else torch.float32, torch.float64):  # kernel, reference
        ds = gamma(d + 4, acc) * m
        eps = 2 * ds + gamma(2 * n + 10 * tiles + 10, acc)  # (Hq, T): relative error of each p
        bounds_out = bounds_out + eps.transpose(0, 1)[..., None] * pv
        bounds_lse = bounds_lse + ds + gamma(n + 5 * tiles + 8, acc) * (1 + ref_lse.abs().nan_to_num(posinf=0))
    if q.dtype not in (torch.float32, torch.float64):  # rounding out to q.dtype, subnormals included
        fi = torch.finfo(q.dtype)
        bounds_out = bounds_out + 2 * unit_roundoff(q.dtype) * pv + fi.tiny * fi.eps
    return bounds_out, bounds_lse


# Sequence mixes: length-1, empty, queries shorter than keys, more queries than keys, blocks of
# 64 crossed.
LENS = {
    "mixed": ([1, 0, 37, 70, 5, 3], [1, 3, 37, 150, 0, 2]),
    "self": ([9, 1, 66], [9, 1, 66]),
}


# ---- forward ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 1, 5, 1000])
@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("gqa", [1, 2, 8])
def test_forward_matches_reference(dtype, causal, window, sinks, gqa):
    lens_q, lens_k = LENS["mixed"]
    q, k, v, s = make_inputs(lens_q, lens_k, 8, 8 // gqa, 16, dtype, sinks=sinks)
    cq, ck = cu(lens_q), cu(lens_k)
    out, lse = varlen_attention(q, k, v, cq, ck, 70, 150, causal=causal, window=window, sinks=s, return_lse=True)
    ref_out, ref_lse = reference(q, k, v, cq, ck, causal=causal, window=window, sinks=s)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    out_bound, lse_bound = forward_bound(q, k, v, cq, ck, causal=causal, window=window, sinks=s)
    assert_within(out, ref_out, out_bound, "out")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert_within(lse, ref_lse, lse_bound, "lse")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [None, 128])
def test_forward_gpt_oss_shapes(device, window):
    """Hq=64, Hkv=8, D=64 (the GPT-OSS attention), a few packed sequences."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lens = [300, 17, 1, 130]
    q, k, v, s = make_inputs(lens, lens, 64, 8, 64, dtype, device=device, sinks=True)
    cq = cu(lens, device)
    out = varlen_attention(q, k, v, cq, cq, 300, 300, window=window, sinks=s)
    ref_out, _ = reference(q.cpu(), k.cpu(), v.cpu(), cq.cpu(), cq.cpu(), window=window, sinks=s.cpu())
    if device == "cuda":
        assert_close(out, ref_out, dtype)
    else:
        assert_within(out, ref_out, forward_bound(q, k, v, cq, cq, window=window, sinks=s)[0])


def test_softmax_scale_and_sink_dtype():
    lens = [20, 7]
    q, k, v, s = make_inputs(lens, lens, 4, 2, 8, torch.bfloat16, sinks=True)
    cq = cu(lens)
    out = varlen_attention(q, k, v, cq, cq, 20, 20, sinks=s.bfloat16(), softmax_scale=0.3)
    ref_out, _ = reference(q, k, v, cq, cq, sinks=s.bfloat16(), scale=0.3)
    assert_within(out, ref_out, forward_bound(q, k, v, cq, cq, sinks=s.bfloat16(), scale=0.3)[0])


def test_rows_that_see_nothing():
    # Sequence 0 has no keys; sequence 1 has more queries than keys, so under causal masking its
    # first queries sit before every key.
    lens_q, lens_k = [3, 6], [0, 2]
    for sinks in (False, True):
        q, k, v, s = make_inputs(lens_q, lens_k, 2, 1, 8, torch.float64, sinks=sinks)
        for t in (q, k, v) + ((s,) if sinks else ()):
            t.requires_grad_(True)
        cq, ck = cu(lens_q), cu(lens_k)
        out, lse = varlen_attention(q, k, v, cq, ck, 6, 2, sinks=s, return_lse=True)
        blind = [0, 1, 2, 3, 4, 5, 6]  # tokens 0-2 (no keys) and 3-6 (positions -4..-1)
        assert torch.all(out[blind] == 0)
        if sinks:
            torch.testing.assert_close(lse[:, blind], s.detach()[:, None].expand(2, 7).double())
        else:
            assert torch.all(torch.isneginf(lse[:, blind]))
        out.sum().backward()
        for t in (q, k, v) + ((s,) if sinks else ()):
            assert torch.isfinite(t.grad).all()
        assert torch.all(q.grad[blind] == 0)


# ---- backward -----------------------------------------------------------------------------------


def run_backward(fn, q, k, v, s, grad):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    sl = s.detach().clone().requires_grad_(True) if s is not None else None
    out = fn(*leaves, sl)
    out.backward(grad)
    return [t.grad for t in leaves] + ([sl.grad] if sl is not None else [])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("gqa", [1, 2, 8])
def test_backward_matches_reference(dtype, causal, window, sinks, gqa):
    lens_q, lens_k = LENS["mixed"]
    q, k, v, s = make_inputs(lens_q, lens_k, 8, 8 // gqa, 16, dtype, sinks=sinks, seed=1)
    cq, ck = cu(lens_q), cu(lens_k)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(dtype)

    ours = run_backward(
        lambda q_, k_, v_, s_: varlen_attention(q_, k_, v_, cq, ck, 70, 150, causal=causal, window=window, sinks=s_),
        q, k, v, s, grad,
    )
    refs = run_backward(
        lambda q_, k_, v_, s_: reference(q_, k_, v_, cq, ck, causal=causal, window=window, sinks=s_)[0],
        q.double(), k.double(), v.double(), s.double() if s is not None else None, grad.double(),
    )
    for name, a, r in zip(["dq", "dk", "dv", "dsinks"], ours, refs):
        assert a.dtype == (s.dtype if name == "dsinks" else dtype), name
        scale = max(1.0, r.abs().max().item()) if dtype != torch.float64 else 1.0
        torch.testing.assert_close(a.double() / scale, r / scale, **GRAD_TOL[dtype], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize(
    "lens_q,lens_k,hq,hkv,causal,window,sinks",
    [
        ([3, 5], [3, 5], 2, 1, True, 2, True),
        ([2, 0, 4], [5, 2, 3], 4, 2, True, None, True),
        ([4, 3], [4, 6], 2, 2, False, None, False),
        ([3, 1], [3, 4], 2, 1, False, 2, True),
    ],
)
def test_gradcheck(lens_q, lens_k, hq, hkv, causal, window, sinks):
    q, k, v, s = make_inputs(lens_q, lens_k, hq, hkv, 4, torch.float64, sinks=sinks, seed=3)
    cq, ck = cu(lens_q), cu(lens_k)
    inputs = [t.requires_grad_(True) for t in (q, k, v)] + ([s.double().requires_grad_(True)] if sinks else [])

    def fn(q_, k_, v_, *s_):
        return varlen_attention(
            q_, k_, v_, cq, ck, max(lens_q), max(lens_k), causal=causal, window=window, sinks=s_[0] if s_ else None
        )

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_gpt_oss_shapes(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lens = [150, 1, 77]
    q, k, v, s = make_inputs(lens, lens, 16, 2, 64, dtype, device=device, sinks=True, seed=4)
    cq = cu(lens, device)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(device=device, dtype=dtype)
    ours = run_backward(lambda *a: varlen_attention(*a[:3], cq, cq, 150, 150, window=128, sinks=a[3]), q, k, v, s, grad)
    cqc = cq.cpu()
    refs = run_backward(
        lambda *a: reference(*a[:3], cqc, cqc, window=128, sinks=a[3])[0],
        q.double().cpu(), k.double().cpu(), v.double().cpu(), s.double().cpu(), grad.double().cpu(),
    )
    for a, r in zip(ours, refs):
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(a.double().cpu() / scale, r / scale, **GRAD_TOL[dtype])


# ---- strides, poisoned outputs --------------------------------------------------------------------


def test_non_contiguous_inputs():
    lens = [40, 3, 70]
    T, hq, hkv, d = sum(lens), 4, 2, 16
    g = torch.Generator().manual_seed(6)
    # q, k, v as views into one fused projection, with a non-unit innermost stride on v.
    qkv = torch.randn(T, hq + hkv, 2 * d, generator=g)
    q = qkv[:, :hq, :d]
    k = qkv[:, hq:, d:]
    v = torch.randn(T, hkv, 2 * d, generator=g)[:, :, ::2]
    s = torch.randn(hq, generator=g)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    cq = cu(lens)
    args = (cq, cq, 70, 70)
    kw = dict(window=9, sinks=s)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = varlen_attention(*[t for t in leaves], *args, **kw)
    grad = torch.randn(T, 2 * d, hq, generator=g).transpose(1, 2)[:, :, :d]  # non-contiguous dO
    out.backward(grad)
    cont = [t.detach().contiguous().requires_grad_(True) for t in (q, k, v)]
    out_c = varlen_attention(*cont, *args, **kw)
    out_c.backward(grad.contiguous())
    assert torch.equal(out, out_c)
    for a, b in zip(leaves, cont):
        assert torch.equal(a.grad, b.grad)


def test_independent_of_threads_and_batch():
    """Each (sequence, head, block) is computed by one task in a fixed order: the result of a
    sequence does not depend on the thread count or on what else is packed with it."""
    lens = [70, 130, 9]
    q, k, v, s = make_inputs(lens, lens, 4, 2, 16, torch.float32, sinks=True, seed=11)
    cq = cu(lens)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(12))

    def run(q_, k_, v_, cu_, n):
        return run_backward(lambda *a: varlen_attention(*a[:3], cu_, cu_, n, n, window=33, sinks=a[3]),
                            q_, k_, v_, s, grad[: q_.shape[0]] if q_.shape[0] != q.shape[0] else grad)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(q, k, v, cq, 130)
    finally:
        torch.set_num_threads(threads)
    many = run(q, k, v, cq, 130)
    for a, b in zip(one, many):
        assert torch.equal(a, b)
    # sequence 1 alone
    sl = slice(70, 200)
    alone = run_backward(
        lambda *a: varlen_attention(*a[:3], cu([130]), cu([130]), 130, 130, window=33, sinks=a[3]),
        q[sl], k[sl], v[sl], s, grad[sl],
    )
    for a, b in zip(alone[:3], many[:3]):
        assert torch.equal(a, b[sl])


def test_outputs_fully_written():
    """Fresh outputs start as NaN (deterministic fill of uninitialised memory): every element must
    be written, including rows that see no key and keys no query sees."""
    lens_q, lens_k = [3, 0, 5, 2], [0, 4, 9, 2]
    q, k, v, s = make_inputs(lens_q, lens_k, 4, 2, 8, torch.float32, sinks=True)
    cq, ck = cu(lens_q), cu(lens_k)
    prev = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.isnan(torch.empty(4)).all()
        for sinks in (None, s):
            out, lse = torch.ops.ossrl.varlen_attention(q, k, v, cq, ck, 5, 9, True, 3, sinks, 0.5)
            assert not torch.isnan(out).any() and not torch.isnan(lse).any()
            grads = torch.ops.ossrl.varlen_attention_backward(
                torch.randn_like(out), q, k, v, out, lse, cq, ck, 5, 9, True, 3, sinks, 0.5
            )
            for t in grads:
                assert not torch.isnan(t).any()
        kc, vc, bt, seq_lens = build_cache(k, v, ck, block_size=3)
        pout = paged_attention(q, kc, vc, bt, cq, seq_lens, 5, 9, window=3, sinks=s)
        assert not torch.isnan(pout).any()
    finally:
        torch.use_deterministic_algorithms(prev[0])
        torch.utils.deterministic.fill_uninitialized_memory = prev[1]


# ---- opcheck, torch.compile ------------------------------------------------------------------------


@pytest.mark.parametrize("sinks", [False, True])
def test_opcheck_varlen(sinks):
    lens_q, lens_k = [5, 0, 9], [7, 2, 9]
    q, k, v, s = make_inputs(lens_q, lens_k, 4, 2, 8, torch.float32, sinks=sinks)
    cq, ck = cu(lens_q), cu(lens_k)
    for t in (q, k, v) + ((s,) if sinks else ()):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.ossrl.varlen_attention.default, (q, k, v, cq, ck, 9, 9, True, 4, s, 0.35))
    out, lse = torch.ops.ossrl.varlen_attention(q, k, v, cq, ck, 9, 9, False, -1, s, 0.35)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, cq, ck, 9, 9, False, -1,
            s.detach() if sinks else None, 0.35)
    torch.library.opcheck(torch.ops.ossrl.varlen_attention_backward.default, args)


def test_opcheck_paged():
    lens_q, lens_k = [2, 1, 0], [9, 4, 3]
    q, k, v, s = make_inputs(lens_q, lens_k, 4, 2, 8, torch.float32, sinks=True)
    ck = cu(lens_k)
    kc, vc, bt, seq_lens = build_cache(k, v, ck, block_size=4)
    cq = cu(lens_q)
    torch.library.opcheck(
        torch.ops.ossrl.paged_attention.default, (q, kc, vc, bt, cq, seq_lens, 2, 9, True, 3, s, 0.35)
    )
    new_lens = [2, 0, 1]
    kn = torch.randn(3, 2, 8)
    vn = torch.randn(3, 2, 8)
    torch.library.opcheck(torch.ops.ossrl.paged_kv_append.default, (kc, vc, kn, vn, bt, cu(new_lens), seq_lens))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    lens = [12, 5, 30]
    q, k, v, s = make_inputs(lens, lens, 4, 2, 16, torch.float32, sinks=True)
    cq = cu(lens)

    if backend == "aot_eager":  # the op inside a larger graph, lse used

        def f(q, k, v, s):
            out, lse = varlen_attention(q, k, v, cq, cq, 30, 30, window=8, sinks=s, return_lse=True)
            return (out * out).sum() + lse.sum()

        grad = torch.tensor(1.0)
    else:  # inductor: just the op (keeps the C++ code generation, and the test, short)

        def f(q, k, v, s):
            return varlen_attention(q, k, v, cq, cq, 30, 30, window=8, sinks=s)

        grad = torch.randn(q.shape)
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    eager = run_backward(f, q, k, v, s, grad)
    comp = run_backward(compiled, q, k, v, s, grad)
    for a, b in zip(eager, comp):
        torch.testing.assert_close(a, b)


# ---- transformers' GPT-OSS eager attention as a peer ------------------------------------------------


@pytest.mark.parametrize("window", [None, 4])
def test_matches_transformers_gpt_oss_eager(window):
    mod = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    lens = [7, 20, 1]
    hq, hkv, d = 8, 2, 16
    q, k, v, s = make_inputs(lens, lens, hq, hkv, d, torch.float32, sinks=True, seed=7)
    cq = cu(lens)
    ours = varlen_attention(q, k, v, cq, cq, 20, 20, window=window, sinks=s)
    module = types.SimpleNamespace(num_key_value_groups=hq // hkv, sinks=s, training=False)
    c = cq.tolist()
    for b, n in enumerate(lens):
        sl = slice(c[b], c[b + 1])
        mask = torch.zeros(1, 1, n, n).masked_fill(~visible(n, n, True, window), -math.inf)
        peer, _ = mod.eager_attention_forward(
            module, q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None], v[sl].transpose(0, 1)[None],
            mask, d**-0.5,
        )
        # two float32 computations, each within forward_bound of the exact result (transformers'
        # has the same sums, without the online rescaling)
        one = cu([n])
        bound, _ = forward_bound(q[sl], k[sl], v[sl], one, one, window=window, sinks=s)
        assert_within(ours[sl], peer[0], 2 * bound)


# ---- paged cache ----------------------------------------------------------------------------------


def build_cache(k, v, cu_k, block_size, extra_blocks=3, seed=0, split_append=True):
    """A shuffled paged cache holding the key/value histories packed in k, v by cu_k, filled with
    paged_kv_append (in two rounds when split_append, to exercise appending after cached tokens).
    Unused cache slots are NaN, so any stray read shows."""
    lens = (cu_k[1:] - cu_k[:-1]).tolist()
    hkv, d = k.shape[1], k.shape[2]
    nblk = [max(1, -(-n // block_size)) for n in lens]
    total = sum(nblk) + extra_blocks
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    max_blocks = max(nblk) + 1
    bt = torch.full((len(lens), max_blocks), -7, dtype=torch.int32)
    i = 0
    for b, n in enumerate(nblk):
        bt[b, :n] = torch.tensor(perm[i : i + n], dtype=torch.int32)
        i += n
    kc = torch.full((total, block_size, hkv, d), math.nan, dtype=k.dtype, device=k.device)
    vc = torch.full_like(kc, math.nan)
    bt = bt.to(k.device)
    c = cu_k.tolist()
    first = [n // 3 if split_append else n for n in lens]
    rounds = [(0, first), (1, [n - f for n, f in zip(lens, first)])]
    for r, take in rounds:
        ks, vs = [], []
        for b, n in enumerate(take):
            start = c[b] + (0 if r == 0 else first[b])
            ks.append(k[start : start + n])
            vs.append(v[start : start + n])
        cache_lens = torch.tensor([0] * len(lens) if r == 0 else first, dtype=torch.int32, device=k.device)
        paged_kv_append(kc, vc, torch.cat(ks), torch.cat(vs), bt, cu(take, k.device), cache_lens)
    return kc, vc, bt, torch.tensor(lens, dtype=torch.int32, device=k.device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [16, 5, 7])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("gqa", [1, 8])
def test_paged_matches_varlen(device, block_size, window, gqa):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    d = 64 if device == "cuda" else 16
    lens_k = [32, 1, 45, 80, 7]
    lens_q = [1, 1, 3, 80, 0]  # decode steps, a 3-token chunk, a whole prefill, nothing
    hq = 8
    q, k, v, s = make_inputs(lens_q, lens_k, hq, hq // gqa, d, dtype, device=device, sinks=True, seed=8)
    cq, ck = cu(lens_q, device), cu(lens_k, device)
    kc, vc, bt, seq_lens = build_cache(k, v, ck, block_size)
    for sinks in (None, s):
        want = varlen_attention(q, k, v, cq, ck, 80, 80, window=window, sinks=sinks)
        got = paged_attention(q, kc, vc, bt, cq, seq_lens, 80, 80, window=window, sinks=sinks)
        if device == "cuda":
            torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
        else:  # two float32 kernels (the paged one may split keys over threads), each within the bound
            bound, _ = forward_bound(q, k, v, cq, ck, window=window, sinks=sinks)
            assert_within(got, want, 2 * bound)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_reads_a_cache_with_odd_strides_as_the_same_cache(device):
    """A cache whose rows are not 16-byte aligned (a slice of a wider one): on CUDA the blocks the
    table names are gathered (not the whole cache copied); the result is bit for bit the same."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    d = 64 if device == "cuda" else 16
    lens_k, lens_q = [32, 1, 45], [1, 3, 45]
    q, k, v, s = make_inputs(lens_q, lens_k, 8, 2, d, dtype, device=device, sinks=True, seed=9)
    cq, ck = cu(lens_q, device), cu(lens_k, device)
    kc, vc, bt, seq_lens = build_cache(k, v, ck, 16, extra_blocks=40)
    want = paged_attention(q, kc, vc, bt, cq, seq_lens, 45, 45, sinks=s)
    wide_k = torch.full(kc.shape[:-1] + (d + 3,), math.nan, dtype=dtype, device=device)
    wide_v = torch.full_like(wide_k, math.nan)
    wide_k[..., 1:d + 1], wide_v[..., 1:d + 1] = kc, vc
    odd_k, odd_v = wide_k[..., 1:d + 1], wide_v[..., 1:d + 1]  # rows of d + 3 elements, shifted by one
    assert odd_k.stride(2) == d + 3 and not odd_k.is_contiguous()
    got = paged_attention(q, odd_k, odd_v, bt, cq, seq_lens, 45, 45, sinks=s)
    assert torch.equal(got, want)


def test_paged_cache_contents_and_untouched_slots():
    lens = [10, 3]
    k = torch.randn(13, 2, 4)
    v = torch.randn(13, 2, 4)
    kc, vc, bt, _ = build_cache(k, v, cu(lens), block_size=4, extra_blocks=2)
    written = torch.zeros(kc.shape[:2], dtype=torch.bool)
    c = cu(lens).tolist()
    for b, n in enumerate(lens):
        for t in range(n):
            blk, slot = bt[b, t // 4].item(), t % 4
            assert torch.equal(kc[blk, slot], k[c[b] + t]) and torch.equal(vc[blk, slot], v[c[b] + t])
            written[blk, slot] = True
    assert torch.isnan(kc[~written]).all() and torch.isnan(vc[~written]).all()


@pytest.mark.parametrize("causal", [True, False])
def test_paged_long_sequence_split(causal):
    """One long sequence: the key axis is split over threads and merged by log-sum-exp."""
    lens_k, lens_q = [3000, 200], [2, 1]
    q, k, v, s = make_inputs(lens_q, lens_k, 8, 2, 32, torch.float32, sinks=True, seed=9)
    cq, ck = cu(lens_q), cu(lens_k)
    kc, vc, bt, seq_lens = build_cache(k, v, ck, block_size=32, split_append=False)
    for window in (None, 700):
        want = varlen_attention(q, k, v, cq, ck, 2, 3000, causal=causal, window=window, sinks=s)
        got = paged_attention(q, kc, vc, bt, cq, seq_lens, 2, 3000, causal=causal, window=window, sinks=s)
        bound, _ = forward_bound(q, k, v, cq, ck, causal=causal, window=window, sinks=s)
        assert_within(got, want, 2 * bound)  # the split count follows the thread count


def test_paged_window_ignores_evicted_blocks():
    lens_k, lens_q = [50], [1]
    q, k, v, s = make_inputs(lens_q, lens_k, 4, 1, 8, torch.float32, sinks=True)
    cq, ck = cu(lens_q), cu(lens_k)
    kc, vc, bt, seq_lens = build_cache(k, v, ck, block_size=8)
    bt_evicted = bt.clone()
    bt_evicted[0, :4] = -1  # blocks 0-3 hold keys 0..31; a window of 10 over 50 keys starts at 40
    want = varlen_attention(q, k, v, cq, ck, 1, 50, window=10, sinks=s)
    got = paged_attention(q, kc, vc, bt_evicted, cq, seq_lens, 1, 50, window=10, sinks=s)
    assert_within(got, want, 2 * forward_bound(q, k, v, cq, ck, window=10, sinks=s)[0])  # NaN if it read them
    with pytest.raises(ValueError, match="block_table"):
        paged_attention(q, kc, vc, bt_evicted, cq, seq_lens, 1, 50, window=30, sinks=s)


# ---- bad input ------------------------------------------------------------------------------------


def _good():
    lens = [4, 6]
    q, k, v, s = make_inputs(lens, lens, 4, 2, 8, torch.float32, sinks=True)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu(lens), cu_seqlens_k=cu(lens), max_seqlen_q=6, max_seqlen_k=6, sinks=s)


def _call(**over):
    a = _good()
    a.update(over)
    return varlen_attention(
        a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], a["max_seqlen_q"], a["max_seqlen_k"],
        sinks=a["sinks"], window=a.get("window"),
    )


BAD_VARLEN = [
    ("cu_seqlens_q", dict(cu_seqlens_q=torch.tensor([1, 4, 10], dtype=torch.int32)), ValueError, r"cu_seqlens_q\[0\]"),
    ("decreasing", dict(cu_seqlens_k=torch.tensor([0, 7, 6, 10], dtype=torch.int32),
                        cu_seqlens_q=torch.tensor([0, 4, 4, 10], dtype=torch.int32)), ValueError, "non-decreasing"),
    ("last", dict(cu_seqlens_k=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError, r"cu_seqlens_k\[-1\]"),
    ("int64", dict(cu_seqlens_q=torch.tensor([0, 4, 10])), RuntimeError, "cu_seqlens_q must be int32"),
    ("2-D", dict(cu_seqlens_q=torch.tensor([[0, 4, 10]], dtype=torch.int32)), RuntimeError, "cu_seqlens_q must be 1-D"),
    ("lengths", dict(cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32)), RuntimeError, "same length"),
    ("max_q", dict(max_seqlen_q=5), ValueError, "max_seqlen_q"),
    ("max_k", dict(max_seqlen_k=3), ValueError, "max_seqlen_k"),
    ("heads", dict(k=torch.randn(10, 3, 8), v=torch.randn(10, 3, 8)), RuntimeError, "multiple"),
    ("head dim", dict(k=torch.randn(10, 2, 4), v=torch.randn(10, 2, 4)), RuntimeError, "head dim"),
    ("v shape", dict(v=torch.randn(9, 2, 8)), RuntimeError, "v"),
    ("sinks size", dict(sinks=torch.randn(3)), RuntimeError, "sinks"),
    ("sinks dtype", dict(sinks=torch.randn(4, dtype=torch.float64)), RuntimeError, "sinks"),
    ("k dtype", dict(k=torch.randn(10, 2, 8, dtype=torch.float64)), RuntimeError, "k has dtype"),
    ("q dtype", dict(q=torch.ones(10, 4, 8, dtype=torch.int32)), RuntimeError, "q must be float"),
    ("q dims", dict(q=torch.randn(10, 32)), RuntimeError, "q must be 3-D"),
    ("sinks device", dict(sinks=torch.randn(4, device="meta")), RuntimeError, "sinks"),
    ("k device", dict(k=torch.randn(10, 2, 8, device="meta")), RuntimeError, "k"),
]


@pytest.mark.parametrize("name,over,exc,match", BAD_VARLEN, ids=[b[0] for b in BAD_VARLEN])
def test_bad_varlen_inputs(name, over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


def test_bad_window_and_backward_args():
    with pytest.raises(ValueError, match="window"):
        _call(window=0)
    a = _good()
    with pytest.raises(ValueError, match="window"):
        torch.ops.ossrl.varlen_attention(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], 6, 6, True, 0,
                                         None, 1.0)
    out, lse = torch.ops.ossrl.varlen_attention(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], 6, 6,
                                                True, -1, None, 1.0)
    with pytest.raises(RuntimeError, match="lse"):
        torch.ops.ossrl.varlen_attention_backward(out, a["q"], a["k"], a["v"], out, lse[:, :3], a["cu_seqlens_q"],
                                                  a["cu_seqlens_k"], 6, 6, True, -1, None, 1.0)
    with pytest.raises(RuntimeError, match="grad_out"):
        torch.ops.ossrl.varlen_attention_backward(out[:5], a["q"], a["k"], a["v"], out, lse, a["cu_seqlens_q"],
                                                  a["cu_seqlens_k"], 6, 6, True, -1, None, 1.0)


def _paged_good():
    lens_k, lens_q = [9, 4], [1, 2]
    q, k, v, s = make_inputs(lens_q, lens_k, 4, 2, 8, torch.float32, sinks=True)
    kc, vc, bt, seq_lens = build_cache(k, v, cu(lens_k), block_size=4)
    return q, kc, vc, bt, cu(lens_q), seq_lens, s


def test_bad_paged_inputs():
    q, kc, vc, bt, cq, seq_lens, s = _paged_good()

    def call(q=q, kc=kc, vc=vc, bt=bt, cq=cq, seq_lens=seq_lens, s=s, max_k=9):
        return paged_attention(q, kc, vc, bt, cq, seq_lens, 2, max_k, sinks=s)

    call()
    bad_bt = bt.clone()
    bad_bt[0, 1] = kc.shape[0]
    with pytest.raises(ValueError, match=r"block_table\[0, 1\]"):
        call(bt=bad_bt)
    bad_bt[0, 1] = -1
    with pytest.raises(ValueError, match=r"block_table\[0, 1\]"):
        call(bt=bad_bt)
    with pytest.raises(ValueError, match="exceeds"):
        call(seq_lens=torch.tensor([9, 4 * bt.shape[1] + 1], dtype=torch.int32), max_k=100)
    with pytest.raises(ValueError, match="seq_lens"):
        call(seq_lens=torch.tensor([9, -1], dtype=torch.int32))
    with pytest.raises(ValueError, match="max_seqlen_k"):
        call(max_k=8)
    with pytest.raises(RuntimeError, match="block_table must be int32"):
        call(bt=bt.long())
    with pytest.raises(RuntimeError, match="k_cache has dtype"):
        call(kc=kc.double(), vc=vc.double())
    with pytest.raises(RuntimeError, match="v_cache"):
        call(vc=vc[:, :2])
    with pytest.raises(RuntimeError, match="multiple"):
        call(q=torch.randn(3, 3, 8))
    with pytest.raises(RuntimeError, match="head dim"):
        call(q=torch.randn(3, 4, 6))
    with pytest.raises(RuntimeError, match="cu_seqlens_q"):
        call(cq=cu([1, 1, 1]))
    with pytest.raises(RuntimeError, match="sinks"):
        call(s=torch.randn(5))
    with pytest.raises(RuntimeError, match="block_table"):
        call(bt=bt[:1])
    with pytest.raises(RuntimeError, match="block_table"):
        call(bt=bt.to("meta"))


def test_bad_append_inputs():
    q, kc, vc, bt, cq, seq_lens, s = _paged_good()
    kn, vn = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    new = cu([2, 1])

    def call(kn=kn, vn=vn, bt=bt, new=new, start=seq_lens):
        paged_kv_append(kc, vc, kn, vn, bt, new, start)

    call(start=torch.tensor([0, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match="more than its block_table row holds"):
        call(start=torch.tensor([4 * bt.shape[1] - 1, 0], dtype=torch.int32))
    bad_bt = bt.clone()
    bad_bt[1, 1] = 99
    with pytest.raises(ValueError, match=r"block_table\[1, 1\]"):
        call(bt=bad_bt)  # sequence 1 writes positions 4 (block 1)
    with pytest.raises(ValueError, match="cache_seqlens"):
        call(start=torch.tensor([0, -2], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="k has dtype"):
        call(kn=kn.double())
    with pytest.raises(RuntimeError, match="k must be"):
        call(kn=torch.randn(3, 1, 8), vn=torch.randn(3, 1, 8))
    with pytest.raises(ValueError, match="cu_seqlens"):
        call(new=cu([2, 2]))
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        call(new=cu([3]))
    with pytest.raises(RuntimeError, match="cache_seqlens"):
        call(start=seq_lens.to("meta"))
    # writes that would overwrite each other: a broadcast cache, one tensor as both caches, two
    # sequences appending into one block
    with pytest.raises(RuntimeError, match="k_cache has elements that share memory"):
        paged_kv_append(kc[:1].expand_as(kc), vc, kn, vn, bt, new, seq_lens)
    with pytest.raises(RuntimeError, match="k_cache and v_cache share memory"):
        paged_kv_append(kc, kc, kn, vn, bt, new, seq_lens)
    shared = bt.clone()
    shared[1, 1] = bt[0, seq_lens[0] // kc.shape[1]]  # the block sequence 0 appends into
    with pytest.raises(ValueError, match="sequences 0 and 1 both append into block"):
        call(bt=shared)



@pytest.mark.parametrize("device", DEVICES)
def test_append_rejects_caches_whose_writes_overlap(device):
    """The cheap checks (no host synchronisation) hold on every device: a broadcast cache and
    one tensor used as both caches. Two sequences writing one block is checked on the CPU only."""
    q, kc, vc, bt, cq, seq_lens, s = (t.to(device) for t in _paged_good())
    kn, vn = torch.randn(3, 2, 8, device=device), torch.randn(3, 2, 8, device=device)
    new = cu([2, 1], device)
    with pytest.raises(RuntimeError, match="v_cache has elements that share memory"):
        paged_kv_append(kc, vc[:1].expand_as(vc), kn, vn, bt, new, seq_lens)
    with pytest.raises(RuntimeError, match="k_cache and v_cache share memory"):
        paged_kv_append(kc, kc, kn, vn, bt, new, seq_lens)
    with pytest.raises(RuntimeError, match="share memory"):  # partly: V is K's second half
        both = torch.zeros((kc.shape[0] * 2,) + tuple(kc.shape[1:]), device=device)
        paged_kv_append(both[: kc.shape[0]], both[kc.shape[0] // 2:][: kc.shape[0]], kn, vn, bt, new, seq_lens)
    before = kc.clone()
    paged_kv_append(kc, vc, kn, vn, bt, new, torch.zeros_like(seq_lens))  # a good call still works
    assert not torch.equal(kc, before)

# ---- memory: nothing quadratic --------------------------------------------------------------------

_MEM_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch, ossrl
    from ossrl.ops import varlen_attention

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) // 1024  # MiB

    mode, window = sys.argv[1], (None if sys.argv[2] == "none" else int(sys.argv[2]))
    torch.manual_seed(0)
    T, hq, hkv, d = 16384, 2, 1, 16
    cu = torch.tensor([0, T], dtype=torch.int32)
    q = torch.randn(T, hq, d, requires_grad=True)
    k = torch.randn(T, hkv, d, requires_grad=True)
    v = torch.randn(T, hkv, d, requires_grad=True)
    s = torch.zeros(hq, requires_grad=True)
    small = torch.tensor([0, 256], dtype=torch.int32)
    varlen_attention(q[:256], k[:256], v[:256], small, small, 256, 256, sinks=s).sum().backward()  # warm up
    q.grad = k.grad = v.grad = s.grad = None
    try:  # reset the peak resident set size (Linux >= 4.0), then measure peak minus current
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before, peak = status("VmRSS"), lambda: status("VmHWM")
    except OSError:
        before, peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, (
            lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
    if mode == "ours":
        varlen_attention(q, k, v, cu, cu, T, T, window=window, sinks=s).sum().backward()
    else:  # control: one T x T fp32 matrix, which the assertion must catch
        torch.ones(T, T).sum()
    print(peak() - before)
    """
)


def _peak_mib(mode, window):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    res = subprocess.run(
        [sys.executable, "-c", _MEM_SCRIPT, mode, str(window).lower()],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    return int(res.stdout.strip().splitlines()[-1])


MEM_LIMIT_MIB = 128  # a 16k x 16k fp32 matrix is 1024 MiB (a bool one 256 MiB)


def test_memory_control_detects_quadratic():
    assert _peak_mib("control", None) > MEM_LIMIT_MIB


@pytest.mark.parametrize("window", [None, 128])
def test_memory_linear_16k(window):
    assert _peak_mib("ours", window) < MEM_LIMIT_MIB


# ---- the ATen composite the CUDA ops fall back to (float32, other head dims) ----------------------
# Registered on the CPU as private ops so that it is checked here; on a GPU the public ops run it.

_F64 = dict(rtol=1e-10, atol=1e-12)  # float64 against float64: the same sums in another order


def _window(w):
    return -1 if w is None else w


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("gqa, d", [(1, 16), (4, 24)])
def test_composite_matches_reference_forward_and_backward(causal, window, sinks, gqa, d):
    lens_q, lens_k = LENS["mixed"]  # with a query row that sees nothing and an empty sequence
    q, k, v, s = make_inputs(lens_q, lens_k, 8, 8 // gqa, d, torch.float64, sinks=sinks, seed=3)
    cq, ck = cu(lens_q), cu(lens_k)
    scale = d**-0.5
    out, lse = torch.ops.ossrl._varlen_attention_composite(q, k, v, cq, ck, causal, _window(window), s, scale)
    ref_out, ref_lse = reference(q, k, v, cq, ck, causal=causal, window=window, sinks=s)
    torch.testing.assert_close(out, ref_out, **_F64)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    torch.testing.assert_close(torch.where(torch.isinf(lse), 0, lse), torch.where(torch.isinf(ref_lse), 0, ref_lse),
                               **_F64)
    grad = torch.randn_like(q)
    want = run_backward(lambda q_, k_, v_, s_: reference(q_, k_, v_, cq, ck, causal=causal, window=window,
                                                         sinks=s_)[0], q, k, v, s, grad)
    got = torch.ops.ossrl._varlen_attention_backward_composite(grad, q, k, v, out, lse, cq, ck, causal,
                                                               _window(window), s, scale)
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), got, want + [None]):
        if b is None:  # no sinks: an empty dsinks
            assert a.numel() == 0
            continue
        torch.testing.assert_close(a, b, **_F64, msg=lambda m: f"{name}: {m}")


def test_composite_float32_agrees_with_the_cpu_kernels_within_their_bounds():
    lens_q, lens_k = LENS["mixed"]
    q, k, v, s = make_inputs(lens_q, lens_k, 8, 2, 24, torch.float32, sinks=True, seed=4)
    cq, ck = cu(lens_q), cu(lens_k)
    out, lse = torch.ops.ossrl._varlen_attention_composite(q, k, v, cq, ck, True, 6, s, 24**-0.5)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    ref_out, _ = reference(q, k, v, cq, ck, causal=True, window=6, sinks=s)
    bound, _ = forward_bound(q, k, v, cq, ck, causal=True, window=6, sinks=s)
    assert_within(out, ref_out, bound, "composite out")
    kernel = varlen_attention(q, k, v, cq, ck, 70, 150, window=6, sinks=s)
    assert_within(out, kernel, 2 * bound, "composite vs kernel")


@pytest.mark.parametrize("window", [None, 6])
def test_composite_paged_matches_the_varlen_reference(window):
    lens_k, lens_q = [32, 1, 45, 80, 7], [1, 1, 3, 80, 0]
    q, k, v, s = make_inputs(lens_q, lens_k, 8, 2, 16, torch.float64, sinks=True, seed=8)
    cq, ck = cu(lens_q), cu(lens_k)
    kc, vc, bt, seq_lens = build_cache(k, v, ck, 5)  # unused slots NaN: a stray read would show
    got = torch.ops.ossrl._paged_attention_composite(q, kc, vc, bt, cq, seq_lens, True, _window(window), s, 0.25)
    want, _ = reference(q, k, v, cq, ck, window=window, sinks=s, scale=0.25)
    torch.testing.assert_close(got, want, **_F64)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, d", [(torch.float32, 64), (torch.bfloat16, 32), (torch.float32, 80)])
def test_cuda_attention_without_a_kernel_instantiation_runs_the_composite(dtype, d):
    """float32 and head dims other than 64 and 128 on CUDA: forward, backward and paged, against
    the CPU kernels on the same inputs (within the float32 / bf16 rounding of both)."""
    lens_q, lens_k = LENS["mixed"]
    q, k, v, s = make_inputs(lens_q, lens_k, 8, 2, d, dtype, sinks=True, seed=5)
    cq, ck = cu(lens_q), cu(lens_k)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    grad = torch.randn_like(q)
    fn = lambda q_, k_, v_, s_: varlen_attention(q_, k_, v_, cq.to(q_.device), ck.to(q_.device), 70, 150,
                                                 window=5, sinks=s_)
    want = run_backward(fn, q, k, v, s, grad)
    got = run_backward(fn, q.cuda(), k.cuda(), v.cuda(), s.cuda(), grad.cuda())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu().float(), b.float(), **tol)
    kc, vc, bt, seq_lens = build_cache(k, v, ck, 16)
    want = paged_attention(q, kc, vc, bt, cq, seq_lens, 70, 150, window=5, sinks=s)
    got = paged_attention(q.cuda(), kc.cuda(), vc.cuda(), bt.cuda(), cq.cuda(), seq_lens.cuda(), 70, 150,
                          window=5, sinks=s.cuda())
    torch.testing.assert_close(got.cpu().float(), want.float(), **tol)
