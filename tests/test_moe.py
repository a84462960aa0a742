"""Grouped GEMM, routing and the fused expert block against float64 references and transformers."""

import re
import subprocess
import sys

import pytest
import torch
from conftest import DEVICES
from torch.library import opcheck

import ossrl
from ossrl.ops import Routing, grouped_gemm, moe_experts, moe_route

from _tolerance import assert_within, gamma, unit_roundoff

# Fixed tolerances for the CUDA kernels (bf16/fp16 intermediates, not checked on the CPU's terms);
# the CPU results are checked against bounds from the lengths and magnitudes (*_bound below).
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-4, rtol=2e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=4e-2),
}
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def dtypes_for(device):
    return [d for d in FLOATS if not (device == "cuda" and d == torch.float64)]


def make_offsets(counts, device="cpu"):
    return torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)


# ---------------------------------------------------------------------------------------------
# float64 references, written the obvious way


def ref_grouped_gemm(x, w, offsets, bias=None):
    x, w = x.double(), w.double()
    out = torch.zeros(x.shape[0], w.shape[2], dtype=torch.float64, device=x.device)
    start = 0
    for e, end in enumerate(offsets.tolist()):
        out[start:end] = x[start:end] @ w[e] + (bias[e].double() if bias is not None else 0)
        start = end
    return out


def ref_route(logits, k):
    top, idx = torch.topk(logits.double(), k, dim=-1)
    return torch.softmax(top, dim=-1), idx


def ref_swiglu(h, alpha, limit):
    gate, up = h[..., ::2], h[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


def ref_experts(x, weights, experts, wgu, bgu, wd, bd, alpha=1.702, limit=7.0):
    """Token by token, slot by slot: out[t] = sum_j w[t,j] * expert_{e[t,j]}(x[t])."""
    x, weights = x.double(), weights.double()
    wgu, bgu, wd, bd = (p.double() for p in (wgu, bgu, wd, bd))
    out = torch.zeros_like(x)
    for j in range(experts.shape[1]):
        e = experts[:, j].long()
        h = torch.einsum("th,thi->ti", x, wgu[e]) + bgu[e]
        y = torch.einsum("ti,tih->th", ref_swiglu(h, alpha, limit), wd[e]) + bd[e]
        out = out + weights[:, j, None] * y
    return out


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _out_rounding(dtype, mag):
    """Rounding a float32 result to a narrower dtype: 2u (u for the rounding, u for the float32
    error under it, to first order) of the magnitude, plus the smallest subnormal."""
    if dtype in (torch.float32, torch.float64):
        return 0
    fi = torch.finfo(dtype)
    return 2 * unit_roundoff(dtype) * mag + fi.tiny * fi.eps


def grouped_gemm_bound(x, w, offsets, bias, dtype):
    """|grouped_gemm - exact| <= gamma(K + 1) (|x| |w_e| + |b_e|) in the accumulation dtype, in any
    summation order (BLAS blocking, vector width, threads), plus the rounding to dtype; plus the
    float64 reference's own error."""
    mag = ref_grouped_gemm(x.abs(), w.abs(), offsets, bias.abs() if bias is not None else None)
    n = x.shape[1] + 1
    return (gamma(n, _acc(dtype)) + gamma(n, torch.float64)) * mag + _out_rounding(dtype, mag)


def experts_bound(x, weights, experts, wgu, bgu, wd, bd, dtype, alpha=1.702, limit=7.0):
    """|moe_experts - exact| on the CPU (everything in the accumulation dtype, one rounding to dtype
    at the end), to first order, slot by slot as ref_experts:
    h = x W_gu + b: gamma(H + 1) (|x| |W_gu| + |b|); the clamps are 1-Lipschitz; the SwiGLU
    a = (u + 1) g sigmoid(alpha g) moves by at most 1.1 |u + 1| dg + |g| sigmoid dg_up (1.1 bounds
    d/dz z sigmoid(z)) and rounds within (9 + alpha |g|) units of |u + 1| |g| sigmoid (sigmoid's
    argument, exp, the additions, the products); y = a W_d + b: the propagated error times |W_d|
    plus gamma(I + 1) (|a| |W_d| + |b|); the weighted sum over k slots: |w| times that plus
    gamma(k + 1) sum |w y|."""
    x, weights = x.double(), weights.double()
    wgu, bgu, wd, bd = (p.double() for p in (wgu, bgu, wd, bd))
    H, I2 = wgu.shape[1], wgu.shape[2]
    k = experts.shape[1]
    total = torch.zeros_like(x)
    for acc in (_acc(dtype), torch.float64):  # the kernel, the float64 reference
        u = unit_roundoff(acc)
        err, mag = torch.zeros_like(x), torch.zeros_like(x)
        for j in range(k):
            e = experts[:, j].long()
            h = torch.einsum("th,thi->ti", x, wgu[e]) + bgu[e]
            eh = gamma(H + 1, acc) * (torch.einsum("th,thi->ti", x.abs(), wgu[e].abs()) + bgu[e].abs())
            g, up = h[..., ::2].clamp(max=limit), h[..., 1::2].clamp(-limit, limit)
            sig = torch.sigmoid(alpha * g)
            a = (up + 1) * g * sig
            ea = (1.1 * (up.abs() + 1) * eh[..., ::2] + g.abs() * sig * eh[..., 1::2]
                  + (9 + alpha * g.abs()) * u * (up.abs() + 1) * g.abs() * sig)
            y = torch.einsum("ti,tih->th", a, wd[e]) + bd[e]
            ey = (torch.einsum("ti,tih->th", ea, wd[e].abs())
                  + gamma(I2 // 2 + 1, acc) * (torch.einsum("ti,tih->th", a.abs(), wd[e].abs()) + bd[e].abs()))
            err = err + weights[:, j, None].abs() * ey
            mag = mag + (weights[:, j, None] * y).abs()
        total = total + 1.1 * (err + gamma(k + 1, acc) * mag)  # 1.1: room for second-order terms
    return total + _out_rounding(dtype, mag)


def expert_params(E, H, I, dtype, device, requires_grad=False):
    ps = [
        torch.randn(E, H, 2 * I, dtype=dtype, device=device) / H**0.5,
        torch.randn(E, 2 * I, dtype=dtype, device=device),
        torch.randn(E, I, H, dtype=dtype, device=device) / I**0.5,
        torch.randn(E, H, dtype=dtype, device=device),
    ]
    return [p.requires_grad_(requires_grad) for p in ps]


# ---------------------------------------------------------------------------------------------
# grouped_gemm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_grouped_gemm_matches_reference(device, with_bias):
    T, K, N = 41, 19, 23
    counts = [5, 0, 13, 1, 0, 17]  # empty experts; offsets[-1] = 36 < T
    for dtype in dtypes_for(device):
        x = torch.randn(T, K, dtype=dtype, device=device)
        w = torch.randn(len(counts), K, N, dtype=dtype, device=device) / K**0.5
        bias = torch.randn(len(counts), N, dtype=dtype, device=device) if with_bias else None
        off = make_offsets(counts, device)
        out = grouped_gemm(x, w, off, bias)
        assert out.dtype == dtype and out.shape == (T, N)
        ref = ref_grouped_gemm(x, w, off, bias)
        if device == "cuda":
            torch.testing.assert_close(out.double(), ref, **TOL[dtype])
        else:
            assert_within(out, ref, grouped_gemm_bound(x.cpu(), w.cpu(), off.cpu(), bias, dtype), str(dtype))
        assert out[36:].abs().sum() == 0, "rows at or beyond offsets[-1] must be zero"


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_gemm_noncontiguous_and_empty(device):
    T, K, N, E = 30, 12, 10, 4
    x = torch.randn(K, T, device=device).t()  # column-major x
    w = torch.randn(E, N, K, device=device).transpose(1, 2)  # K-contiguous w
    off = make_offsets([7, 0, 20, 3], device)
    if device == "cuda":
        torch.testing.assert_close(grouped_gemm(x, w, off).double(), ref_grouped_gemm(x, w, off), **TOL[torch.float32])
    else:
        assert_within(grouped_gemm(x, w, off), ref_grouped_gemm(x, w, off),
                      grouped_gemm_bound(x, w, off, None, torch.float32))
    # T = 0, all experts empty
    out = grouped_gemm(x[:0], w, torch.zeros(E, dtype=torch.int32, device=device))
    assert out.shape == (0, N)
    # every expert empty with rows present: all zero
    out = grouped_gemm(x, w, torch.zeros(E, dtype=torch.int32, device=device))
    assert out.abs().sum() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_gemm_gradients(device):
    T, K, N = 29, 11, 7
    off = make_offsets([6, 0, 15, 4], device)
    x = torch.randn(T, K, device=device, requires_grad=True)
    w = torch.randn(4, K, N, device=device, requires_grad=True)
    b = torch.randn(4, N, device=device, requires_grad=True)
    g = torch.randn(T, N, device=device)
    grads = torch.autograd.grad((grouped_gemm(x, w, off, b) * g).sum(), (x, w, b))
    ref = torch.autograd.grad((ref_grouped_gemm(x, w, off, b) * g.double()).sum(), (x, w, b))
    # dx = g w^T (N terms), dw_e = x_e^T g_e and db_e (the expert's rows, <= T terms): gamma of the
    # longest times the same products of absolute values (the gradients of the |.| problem)
    leaves = [t.detach().abs().requires_grad_() for t in (x, w, b)]
    mags = torch.autograd.grad((ref_grouped_gemm(*leaves[:2], off, leaves[2]) * g.double().abs()).sum(), leaves)
    n = max(T, K, N) + 1
    for name, a, r, m in zip(("dx", "dw", "db"), grads, ref, mags):
        if device == "cuda":
            torch.testing.assert_close(a, r, **TOL[torch.float32])
        else:
            assert_within(a, r, (gamma(n) + gamma(n, torch.float64)) * m.cpu(), name)
    # only some inputs requiring grad
    (dw,) = torch.autograd.grad(grouped_gemm(x.detach(), w, off).sum(), (w,))
    (ref_dw,) = torch.autograd.grad(ref_grouped_gemm(x.detach(), w, off).sum(), (w,))
    (mag_dw,) = torch.autograd.grad(ref_grouped_gemm(x.detach().abs(), leaves[1], off).sum(), (leaves[1],))
    if device == "cuda":
        torch.testing.assert_close(dw, ref_dw, **TOL[torch.float32])
    else:
        assert_within(dw, ref_dw, (gamma(n) + gamma(n, torch.float64)) * mag_dw, "dw alone")


def test_grouped_gemm_gradcheck():
    off = make_offsets([3, 0, 4])
    x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: grouped_gemm(x, w, off, b), (x, w, b))


# ---------------------------------------------------------------------------------------------
# moe_route


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,E,k", [(37, 8, 2), (64, 32, 4), (5, 3, 3), (0, 4, 2), (9, 1, 1)])
def test_moe_route_matches_reference(device, T, E, k):
    logits = torch.randn(T, E, device=device)
    r = moe_route(logits, k)
    assert isinstance(r, Routing)
    ref_w, ref_e = ref_route(logits, k)
    assert r.experts.dtype == torch.int32 and r.order.dtype == torch.int32 and r.offsets.dtype == torch.int32
    assert r.weights.dtype == torch.float32
    torch.testing.assert_close(r.experts.long(), ref_e)
    torch.testing.assert_close(r.weights.double(), ref_w, atol=1e-6, rtol=1e-6)
    flat = r.experts.flatten().long()
    # order: flat indices sorted stably by expert; offsets: inclusive cumulative counts
    torch.testing.assert_close(r.order.long(), torch.sort(flat, stable=True).indices)
    torch.testing.assert_close(r.offsets.long(), torch.bincount(flat, minlength=E).cumsum(0))


def test_moe_route_ties_and_dtypes():
    logits = torch.zeros(4, 6)
    r = moe_route(logits, 3)
    assert r.experts.tolist() == [[0, 1, 2]] * 4  # ties go to the lower expert id
    torch.testing.assert_close(r.weights, torch.full((4, 3), 1 / 3))
    for dtype in (torch.bfloat16, torch.float16):
        lg = torch.randn(20, 8).to(dtype)
        r = moe_route(lg, 2)
        ref_w, ref_e = ref_route(lg, 2)
        assert r.weights.dtype == torch.float32
        torch.testing.assert_close(r.experts.long(), ref_e)
        torch.testing.assert_close(r.weights.double(), ref_w, atol=1e-6, rtol=1e-6)
    assert moe_route(torch.randn(3, 4, dtype=torch.float64), 2).weights.dtype == torch.float64


def test_moe_route_gradcheck():
    logits = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l: moe_route(l, 2).weights, (logits,))


def test_moe_route_matches_transformers_router():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    cfg = GptOssConfig(hidden_size=24, num_local_experts=16, num_experts_per_tok=4)
    router = GptOssTopKRouter(cfg)
    torch.nn.init.normal_(router.weight)
    torch.nn.init.normal_(router.bias)
    h = torch.randn(50, 24)
    logits, scores, indices = router(h)
    r = moe_route(logits, 4)
    torch.testing.assert_close(r.experts.long(), indices)
    torch.testing.assert_close(r.weights, scores)


# ---------------------------------------------------------------------------------------------
# moe_experts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,H,I,E,k", [(33, 16, 12, 8, 2), (7, 9, 5, 16, 4), (1, 8, 4, 3, 3), (0, 8, 4, 4, 2)])
def test_moe_experts_matches_reference(device, T, H, I, E, k):
    for dtype in dtypes_for(device):
        x = torch.randn(T, H, dtype=dtype, device=device)
        r = moe_route(torch.randn(T, E, device=device), k)
        params = expert_params(E, H, I, dtype, device)
        out = moe_experts(x, r, *params, swiglu_limit=1.0)  # a low limit exercises both clamps
        ref = ref_experts(x, r.weights, r.experts, *params, limit=1.0)
        assert out.dtype == dtype and out.shape == (T, H)
        if device == "cuda":
            torch.testing.assert_close(out.double(), ref, **TOL[dtype])
        else:
            assert_within(out, ref, experts_bound(x, r.weights, r.experts, *params, dtype, limit=1.0), str(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_moe_experts_gradients(device):
    T, H, I, E, k = 21, 10, 6, 5, 2
    x = torch.randn(T, H, device=device, requires_grad=True)
    logits = torch.randn(T, E, device=device, requires_grad=True)
    params = expert_params(E, H, I, torch.float32, device, requires_grad=True)
    g = torch.randn(T, H, device=device)
    r = moe_route(logits, k)
    out = moe_experts(x, r, *params, swiglu_alpha=1.3, swiglu_limit=1.2)
    grads = torch.autograd.grad((out * g).sum(), (x, logits, *params))
    rw, re = ref_route(logits, k)
    ref = ref_experts(x, rw, re, *params, alpha=1.3, limit=1.2)
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), (x, logits, *params))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_moe_experts_gradcheck_including_routing_weights():
    T, H, I, E, k = 6, 4, 3, 3, 2
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    r = moe_route(torch.randn(T, E, dtype=torch.float64), k)
    w = r.weights.clone().requires_grad_(True)
    params = expert_params(E, H, I, torch.float64, "cpu", requires_grad=True)

    def f(x, w, *ps):
        return moe_experts(x, r._replace(weights=w), *ps, swiglu_limit=0.8)

    assert torch.autograd.gradcheck(f, (x, w, *params))


def test_moe_experts_partial_routing_drops_rows():
    """Rows beyond offsets[-1] (e.g. capacity-dropped) contribute nothing, forward or backward."""
    T, H, I, E, k = 12, 8, 4, 3, 2
    x = torch.randn(T, H, dtype=torch.float64)
    r = moe_route(torch.randn(T, E, dtype=torch.float64), k)
    kept = int(r.offsets[1])  # drop the last expert's rows
    dropped = r._replace(offsets=torch.tensor([int(r.offsets[0]), kept, kept], dtype=torch.int32))
    params = expert_params(E, H, I, torch.float64, "cpu")
    w = r.weights.clone().requires_grad_(True)
    out = moe_experts(x, dropped._replace(weights=w), *params)
    mask = (r.experts != 2).double()
    torch.testing.assert_close(out, ref_experts(x, r.weights * mask, r.experts, *params))
    (gw,) = torch.autograd.grad(out.sum(), w)
    assert gw[r.experts == 2].abs().sum() == 0


def test_moe_experts_noncontiguous():
    T, H, I, E, k = 15, 8, 6, 4, 2
    x = torch.randn(H, T).t()
    r = moe_route(torch.randn(T, E), k)
    wgu = torch.randn(E, 2 * I, H).transpose(1, 2)
    bgu = torch.randn(2 * I, E).t()
    wd = torch.randn(E, H, I).transpose(1, 2)
    bd = torch.randn(H, E).t()
    out = moe_experts(x, r, wgu, bgu, wd, bd)
    assert_within(out, ref_experts(x, r.weights, r.experts, wgu, bgu, wd, bd),
                  experts_bound(x, r.weights, r.experts, wgu, bgu, wd, bd, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_experts_matches_transformers(dtype):
    """The whole GPT-OSS MLP (router + experts) against transformers' modules on the same weights."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts, GptOssTopKRouter

    cfg = GptOssConfig(hidden_size=32, intermediate_size=24, num_local_experts=8, num_experts_per_tok=3)
    router, experts = GptOssTopKRouter(cfg), GptOssExperts(cfg)
    for p in (*router.parameters(), *experts.parameters()):
        torch.nn.init.normal_(p, std=0.3)
    router.to(dtype)
    experts.to(dtype)
    h = torch.randn(40, 32, dtype=dtype)
    g = torch.randn(40, 32, dtype=dtype)

    logits, scores, indices = router(h)
    ref = experts(h, indices, scores)
    ref_grads = torch.autograd.grad((ref * g).sum(), [router.weight, *experts.parameters()], retain_graph=True)

    r = moe_route(logits, cfg.num_experts_per_tok)
    p = experts
    out = moe_experts(h, r, p.gate_up_proj, p.gate_up_proj_bias, p.down_proj, p.down_proj_bias,
                      swiglu_alpha=p.alpha, swiglu_limit=p.limit)
    grads = torch.autograd.grad((out * g).sum(), [router.weight, *experts.parameters()])
    # float32: two computations of the same sums, each within experts_bound of the exact result.
    # bf16: transformers rounds every intermediate to bf16 (ours accumulates in float32): a fixed
    # tolerance of a few dozen bf16 roundings, as do the gradients (~20x above the errors seen)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.15, rtol=0.05)
    if dtype == torch.float32:
        bound = experts_bound(h, r.weights, r.experts, p.gate_up_proj, p.gate_up_proj_bias, p.down_proj,
                              p.down_proj_bias, dtype, alpha=p.alpha, limit=p.limit)
        assert_within(out, ref, 2 * bound)
    else:
        torch.testing.assert_close(out, ref, **tol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.float(), b.float(), atol=tol["atol"] * 10, rtol=tol["rtol"] * 2)


# ---------------------------------------------------------------------------------------------
# opcheck and torch.compile


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H, I", [(136, 72), (138, 70)])
def test_cuda_moe_experts_on_asynchronous_tiles_with_many_row_steps(dtype, H, I):
    # H, I multiples of 8 take the 16-byte cp.async loads, even ones the element-pair loads;
    # ~150 rows per expert give the weight-gradient GEMMs several 32-row steps (their row
    # lookups are fetched a step ahead); H > 128 gives two column tiles; the k slots are
    # combined from a buffer of x's dtype.
    T, E, k = 300, 4, 2
    x = torch.randn(T, H, device="cuda").to(dtype).requires_grad_()
    logits = torch.randn(T, E, device="cuda", requires_grad=True)
    params = expert_params(E, H, I, dtype, "cuda", requires_grad=True)
    g = torch.randn(T, H, device="cuda").to(dtype)
    r = moe_route(logits, k)
    out = moe_experts(x, r, *params)
    grads = torch.autograd.grad((out.float() * g.float()).sum(), (x, logits, *params))
    rw, re = ref_route(logits, k)
    ref = ref_experts(x, rw, re, *params)
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), (x, logits, *params))
    # Normwise: bf16/fp16 round h, swiglu(h), each weighted slot and dh once each (a few bf16 unit
    # roundoffs, relative); an indexing or pipeline fault is off by O(1).
    bound = 1e-4 if dtype == torch.float32 else 32 * unit_roundoff(torch.bfloat16)
    for name, a, b in zip(["out", "dx", "dlogits", "dw_gate_up", "db_gate_up", "dw_down", "db_down"],
                          [out, *grads], [ref, *ref_grads]):
        err = (a.double() - b).norm() / b.norm().clamp_min(1e-30)
        assert torch.isfinite(a).all() and err <= bound, (name, float(err), bound)


def _sample_inputs(device="cpu"):
    T, H, I, E, k = 13, 8, 6, 4, 2
    x = torch.randn(T, H, device=device)
    r = moe_route(torch.randn(T, E, device=device), k)
    params = expert_params(E, H, I, torch.float32, device)
    return T, H, I, E, k, x, r, params


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    T, H, I, E, k, x, r, params = _sample_inputs(device)
    ops = torch.ops.ossrl
    w = torch.randn(E, H, 5, device=device)
    opcheck(ops.grouped_gemm, (x, w, r.offsets[:E] // k, torch.randn(E, 5, device=device)))
    opcheck(ops.grouped_gemm, (x.requires_grad_(), w.requires_grad_(), r.offsets // k, None))
    opcheck(ops.grouped_gemm_dw, (x.detach(), torch.randn(T, 5, device=device), r.offsets // k, True))
    opcheck(ops.moe_route, (torch.randn(T, E, device=device, requires_grad=True), k))
    args = (x.detach(), r.weights, r.order, r.offsets, *params, 1.702, 7.0)
    opcheck(ops.moe_experts, args)
    grad_args = (x.detach().requires_grad_(), r.weights.requires_grad_(), r.order, r.offsets,
                 *(p.requires_grad_() for p in params), 1.702, 7.0)
    opcheck(ops.moe_experts, grad_args)
    out, h = ops.moe_experts(*args)
    opcheck(ops.moe_experts_backward,
            (torch.randn_like(out), x.detach(), r.weights.detach(), r.order, r.offsets, h,
             params[0].detach(), params[2].detach(), params[3].detach(), 1.702, 7.0))


def test_torch_compile_fullgraph_forward_backward():
    T, H, I, E, k, x, _, params = _sample_inputs()
    router_w = torch.randn(E, H, requires_grad=True)
    params = [p.requires_grad_() for p in params]

    def layer(x, router_w, *ps):
        r = moe_route(x @ router_w.t(), k)
        return moe_experts(x, r, *ps)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x, router_w, *params)
    ref = layer(x, router_w, *params)
    torch.testing.assert_close(out, ref)
    g1 = torch.autograd.grad(out.sum(), [router_w, *params])
    g2 = torch.autograd.grad(ref.sum(), [router_w, *params])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# bad input: a clear exception naming the argument, never a crash

ERR = (RuntimeError, ValueError)


def test_grouped_gemm_bad_input():
    x, w, b = torch.randn(10, 4), torch.randn(3, 4, 5), torch.randn(3, 5)
    off = make_offsets([3, 3, 4])
    cases = [
        ((x, w, torch.tensor([3, 2, 4], dtype=torch.int32), b), "non-decreasing"),
        ((x, w, torch.tensor([3, 6, 11], dtype=torch.int32), b), "offsets\\[-1\\]"),
        ((x, w, torch.tensor([-1, 6, 8], dtype=torch.int32), b), "offsets"),
        ((x, w, off.long(), b), "offsets must be int32"),
        ((x, w, off[:2], b), "offsets must have one entry per expert"),
        ((x, torch.randn(3, 5, 5), off, b), "w.shape\\[1\\]"),
        ((x, w.double(), off, b), "w has dtype"),
        ((x, w, off, torch.randn(3, 4)), "bias must be"),
        ((x.int(), w, off, b), "x must be"),
        ((x[0], w, off, b), "x must be 2-D"),
        ((x, w[0], off, b), "w must be 3-D"),
    ]
    for args, msg in cases:
        with pytest.raises(ERR, match=msg):
            grouped_gemm(*args)


def test_moe_route_bad_input():
    with pytest.raises(ERR, match="top_k"):
        moe_route(torch.randn(4, 3), 4)
    with pytest.raises(ERR, match="top_k"):
        moe_route(torch.randn(4, 3), 0)
    with pytest.raises(ERR, match="router_logits must be 2-D"):
        moe_route(torch.randn(4), 1)
    with pytest.raises(ERR, match="router_logits must be float"):
        moe_route(torch.ones(4, 3, dtype=torch.int64), 1)


def test_moe_experts_bad_input():
    T, H, I, E, k, x, r, (wgu, bgu, wd, bd) = _sample_inputs()
    bad_order = r.order.clone()
    bad_order[0] = T * k
    neg_order = r.order.clone()
    neg_order[3] = -1
    dup_order = r.order.clone()
    dup_order[5] = dup_order[2]  # one (token, slot) twice (and another never): summed twice, a race on CUDA
    cases = [
        (dict(routing=r._replace(order=dup_order)), "routing.order\\[5\\] = .* appears more than once"),
        (dict(routing=r._replace(order=bad_order)), "routing.order\\[0\\]"),
        (dict(routing=r._replace(order=neg_order)), "routing.order\\[3\\]"),
        (dict(routing=r._replace(order=r.order[:-1])), "routing.order must have"),
        (dict(routing=r._replace(order=r.order.long())), "routing.order must be int32"),
        (dict(routing=r._replace(offsets=r.offsets.flip(0))), "non-decreasing"),
        (dict(routing=r._replace(offsets=r.offsets + 1)), "offsets\\[-1\\]"),
        (dict(routing=r._replace(offsets=r.offsets[:-1])), "one entry per expert"),
        (dict(routing=r._replace(weights=r.weights[:-1])), "routing.weights must be"),
        (dict(routing=r._replace(weights=r.weights.half())), "routing.weights must be float32"),
        (dict(w_gate_up=wgu[:, :-1]), "w_gate_up must be"),
        (dict(w_gate_up=wgu[..., :-1]), "w_gate_up must be"),
        (dict(b_gate_up=bgu[:, :-2]), "b_gate_up must be"),
        (dict(w_down=wd.transpose(1, 2)), "w_down must be"),
        (dict(b_down=bd[:-1]), "b_down must be"),
        (dict(w_down=wd.double()), "w_down has dtype"),
        (dict(x=x[:, :-1]), "w_gate_up must be"),
    ]
    base = dict(x=x, routing=r, w_gate_up=wgu, b_gate_up=bgu, w_down=wd, b_down=bd)
    for change, msg in cases:
        kw = {**base, **change}
        with pytest.raises(ERR, match=msg):
            moe_experts(kw["x"], kw["routing"], kw["w_gate_up"], kw["b_gate_up"], kw["w_down"], kw["b_down"])


def test_info_lists_ops(capsys):
    from ossrl.cli import main

    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"ossrl {ossrl.__version__}" in text
    for op in ("grouped_gemm", "moe_route", "moe_experts"):
        assert f"  {op}" in text


# ---------------------------------------------------------------------------------------------
# moe_route_given (routing replay)


def _given(T, E, k, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32).to(device) \
        if T else torch.zeros(0, k, dtype=torch.int32, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,E,k", [(37, 8, 2), (64, 32, 4), (5, 3, 3), (0, 4, 2), (9, 1, 1)])
def test_moe_route_given_matches_a_float64_reference(device, T, E, k):
    from ossrl.ops import moe_route_given

    logits = torch.randn(T, E, device=device)
    experts = _given(T, E, k, device)
    r = moe_route_given(logits, experts)
    ref = torch.softmax(logits.double().gather(1, experts.long()), dim=-1)  # softmax at the given experts
    assert r.weights.dtype == torch.float32 and r.experts.dtype == r.order.dtype == r.offsets.dtype == torch.int32
    assert torch.equal(r.experts, experts) and (T == 0 or r.experts.data_ptr() != experts.data_ptr())
    # float32 exp and sum over k terms: a few roundings per weight
    assert_within(r.weights.double(), ref, gamma(k + 4, torch.float32) * 2)
    flat = experts.flatten().long()
    assert torch.equal(r.order.long(), torch.sort(flat, stable=True).indices)
    assert torch.equal(r.offsets.long(), torch.bincount(flat, minlength=E).cumsum(0))
    # replaying what moe_route chose reproduces it exactly
    own = moe_route(logits, k)
    again = moe_route_given(logits, own.experts)
    assert torch.equal(again.experts, own.experts) and torch.equal(again.order, own.order)
    assert torch.equal(again.offsets, own.offsets)
    torch.testing.assert_close(again.weights, own.weights, rtol=0, atol=gamma(E + k, torch.float32))


def test_moe_route_given_gradients_and_opcheck():
    from ossrl.ops import moe_route_given

    logits = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    experts = _given(7, 5, 2, "cpu", seed=1)
    assert torch.autograd.gradcheck(lambda l: moe_route_given(l, experts).weights, (logits,))
    # the gradient reaches exactly the given experts' logits
    moe_route_given(logits, experts).weights[:, 0].sum().backward()
    touched = logits.grad != 0
    assert torch.equal(touched, torch.zeros_like(touched).scatter_(1, experts.long(), True))
    opcheck(torch.ops.ossrl.moe_route_given.default, (torch.randn(6, 4), _given(6, 4, 2, "cpu")))


def test_moe_route_given_bad_input():
    from ossrl.ops import moe_route_given

    lg = torch.randn(4, 6)
    good = _given(4, 6, 2, "cpu")
    bad_id = good.clone()
    bad_id[2, 1] = 6
    twice = good.clone()
    twice[1, 1] = twice[1, 0]
    for experts, match in [(bad_id, r"experts\[2, 1\] = 6 is out of range"), (twice, "appears twice"),
                           (good.long(), "int32"), (good[:3], "one row per token"), (good[:, :0], "1 to E"),
                           (good.flatten(), "experts")]:
        with pytest.raises((RuntimeError, ValueError), match=match):
            moe_route_given(lg, experts)
    with pytest.raises((RuntimeError, ValueError)):
        moe_route_given(lg.to(torch.int32), good)


_DEVICE_ASSERT = """
import sys, torch
from ossrl.ops import moe_experts, moe_route, moe_route_given
torch.manual_seed(0)
T, H, I, E, k = 13, 8, 6, 4, 2
x = torch.randn(T, H, device="cuda")
r = moe_route(torch.randn(T, E, device="cuda"), k)
ps = [torch.randn(E, H, 2 * I, device="cuda"), torch.randn(E, 2 * I, device="cuda"),
      torch.randn(E, I, H, device="cuda"), torch.randn(E, H, device="cuda")]
case = sys.argv[1]
if case == "twice":
    order = r.order.clone()
    order[5] = order[2]
    moe_experts(x, r._replace(order=order), *ps)
elif case == "outside":
    order = r.order.clone()
    order[0] = T * k
    moe_experts(x, r._replace(order=order), *ps)
else:
    g = torch.tensor([[0, 1], [2, 9]], dtype=torch.int32, device="cuda")
    moe_route_given(torch.randn(2, E, device="cuda"), g)
torch.cuda.synchronize()
print("no error")
"""


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case, message", [("twice", "appears more than once"), ("outside", "not a flat"),
                                           ("given", "outside \\[0, num_experts\\)")])
def test_cuda_rejects_bad_routing_on_the_device(case, message):
    """On CUDA the routing's values are checked without a host synchronisation: a device-side
    assert (it ends the process's CUDA context, so each case runs in a process of its own)."""
    p = subprocess.run([sys.executable, "-c", _DEVICE_ASSERT, case], capture_output=True, text=True, timeout=300)
    said = p.stdout + p.stderr  # the device prints its assertion on its own stream
    assert p.returncode != 0 and "no error" not in p.stdout, said[-2000:]
    assert "device-side assert" in said and re.search(message, said), said[-2000:]
