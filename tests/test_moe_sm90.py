"""The CUTLASS sm90 grouped GEMMs (OSSRL_MOE_GEMM=cutlass) against float64, and the switch's rules.

The GPU tests run on an sm_90 GPU with a build that has the kernels; the build facts are checked
everywhere (on CI, which compiles them, they must be there)."""

import os

import pytest
import torch

from ossrl import _C
from ossrl.ops import MOE_KERNELS, grouped_gemm, moe_experts, moe_kernels, moe_route

from _tolerance import unit_roundoff
from test_moe import expert_params, ref_experts, ref_route

HAS_CUDA = torch.cuda.is_available() and _C.with_cuda
SM90 = HAS_CUDA and _C.with_sm90_gemm and torch.cuda.get_device_capability()[0] == 9


def needs_sm90(test):
    skip = pytest.mark.skipif(not SM90, reason="needs an sm_90 GPU and a build with the CUTLASS sm90 kernels")
    return pytest.mark.cuda(skip(test))


def needs_cuda(test):
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")(test))


def _offsets(counts):
    return torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).cuda()


def _ref(x, w, counts, bias):
    """float64, expert by expert; rows past the last expert's stay zero."""
    out = torch.zeros(x.shape[0], w.shape[2], dtype=torch.float64, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        out[start:start + n] = x[start:start + n].double() @ w[e].double()
        if bias is not None:
            out[start:start + n] += bias[e].double()
        start += n
    return out


def _normwise(a, b):
    return float((a.detach().double() - b.detach()).norm() / b.detach().norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
@needs_sm90
def test_cutlass_grouped_gemm_and_gradients_match_float64(monkeypatch, dtype, with_bias):
    monkeypatch.setenv("OSSRL_MOE_GEMM", "cutlass")
    # Empty experts first, inside and last; one row; counts above and below the 128-row tile; and
    # rows past offsets[-1] that belong to no expert. K = 264 is several 64-wide K steps and not a
    # multiple of 64; N = 136 is two column tiles, the second mostly out of bounds.
    counts = [0, 200, 1, 0, 77, 130, 0]
    E, K, N, tail = len(counts), 264, 136, 9
    T = sum(counts) + tail
    off = _offsets(counts)
    x = torch.randn(T, K, device="cuda").to(dtype).requires_grad_()
    w = (torch.randn(E, K, N, device="cuda") / K**0.5).to(dtype).requires_grad_()
    b = torch.randn(E, N, device="cuda").to(dtype).requires_grad_() if with_bias else None
    g = torch.randn(T, N, device="cuda").to(dtype)
    before = _C.sm90_gemm_calls()
    out = grouped_gemm(x, w, off, b)
    leaves = (x, w, b) if with_bias else (x, w)
    grads = torch.autograd.grad((out.float() * g.float()).sum(), leaves)
    # forward, dx (through the K-major weights) and dw ran on the CUTLASS kernels, not the fallback
    assert _C.sm90_gemm_calls() - before == 3
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_() if with_bias else None
    ref = _ref(xd, wd, counts, bd)
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), (xd, wd, bd) if with_bias else (xd, wd))
    # fp32 accumulation over <= 264 terms (~1e-5 relative) and one rounding of each output to
    # dtype (u relative): 4u normwise; a wrong row, expert or tile is off by O(1).
    bound = 4 * unit_roundoff(dtype)
    for name, a, r in zip(("out", "dx", "dw", "db"), (out, *grads), (ref, *ref_grads)):
        assert torch.isfinite(a).all(), name
        assert _normwise(a, r) <= bound, (name, _normwise(a, r), bound)
    assert (out[T - tail:] == 0).all()  # no expert's rows: zeros, written by the zero-tail kernel
    dw = grads[1]
    for e, n in enumerate(counts):
        if n == 0:
            assert (dw[e] == 0).all(), e  # an expert without rows: its weight gradient is zero


def _rowwise(a, b, name):
    """The largest relative error of a row (a bug confined to a few rows shows here, where a
    normwise figure would average it away); rows that are exactly zero must stay exactly zero."""
    a, b = a.detach().double().flatten(1), b.detach().double().flatten(1)
    zero = b.norm(dim=1) == 0
    assert (a[zero] == 0).all(), (name, "a row that must be zero is not")
    if (~zero).any():
        return float(((a - b).norm(dim=1)[~zero] / b.norm(dim=1)[~zero]).max())
    return 0.0


@needs_sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["all routed", "last expert dropped", "two dropped, middle empty"])
def test_cutlass_moe_experts_forward_and_backward_match_float64(monkeypatch, dtype, case):
    # Forward and backward GEMMs on CUTLASS, with the gathers, SwiGLU (and its gradient) and the
    # combines as kernels between them; the routing-weight gradient goes through moe_route too.
    monkeypatch.setenv("OSSRL_MOE_GEMM", "cutlass")
    T, H, I, E, k = 300, 136, 72, 5, 2
    x = torch.randn(T, H, device="cuda").to(dtype).requires_grad_()
    logits = torch.randn(T, E, device="cuda")
    if case == "two dropped, middle empty":
        logits[:, 1] = -1e4  # expert 1 gets no rows
    logits.requires_grad_()
    params = expert_params(E, H, I, dtype, "cuda", requires_grad=True)
    g = torch.randn(T, H, device="cuda").to(dtype)
    r = moe_route(logits, k)
    rw, re = ref_route(logits, k)
    dropped = {"all routed": [], "last expert dropped": [E - 1], "two dropped, middle empty": [E - 2, E - 1]}[case]
    if dropped:  # their rows lie past offsets[-1]: they contribute nothing (some tokens lose both slots)
        kept = int(r.offsets[dropped[0] - 1])
        r = r._replace(offsets=torch.cat([r.offsets[:dropped[0]], r.offsets.new_full((len(dropped),), kept)]))
        for e in dropped:
            rw = rw * (re != e)
    before = _C.sm90_gemm_calls()
    out = moe_experts(x, r, *params)
    assert _C.sm90_gemm_calls() - before == 1
    grads = torch.autograd.grad((out.float() * g.float()).sum(), (x, logits, *params))
    assert _C.sm90_gemm_calls() - before == 2  # the backward too
    ref = ref_experts(x, rw, re, *params)
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), (x, logits, *params))
    # h, swiglu(h), each slot, g and dh are rounded to dtype once each: a few u per row; a wrong
    # row, expert, bias or weight is off by O(1).
    bound = 32 * unit_roundoff(dtype)
    names = ["out", "dx", "dlogits", "dw_gate_up", "db_gate_up", "dw_down", "db_down"]
    for name, a, b in zip(names, [out, *grads], [ref, *ref_grads]):
        assert torch.isfinite(a).all(), name
        if name == "dlogits":  # rows can nearly cancel: normwise
            assert _normwise(a, b) <= bound, (name, _normwise(a, b), bound)
        else:  # rows of out/dx, experts of the weight and bias gradients
            assert _rowwise(a, b, name) <= bound, (name, _rowwise(a, b, name), bound)
    for e in dropped + ([1] if case == "two dropped, middle empty" else []):
        for name, grad in zip(names[3:], grads[2:]):
            assert (grad[e] == 0).all(), (name, e)  # an expert without rows: exactly zero
    _, h = torch.ops.ossrl.moe_experts(x.detach(), r.weights, r.order, r.offsets, *(p.detach() for p in params),
                                       1.702, 7.0)
    assert (h[int(r.offsets[-1]):] == 0).all()  # rows past offsets[-1]


@needs_sm90
def test_cutlass_grouped_gemm_replays_in_a_cuda_graph_with_new_offsets(monkeypatch):
    # No host synchronisation: the problem sizes are read on the device at each replay.
    monkeypatch.setenv("OSSRL_MOE_GEMM", "cutlass")
    E, K, N, T = 4, 128, 256, 384
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, K, N, device="cuda", dtype=torch.bfloat16) / K**0.5
    off = _offsets([100, 0, 200, 84])
    before = _C.sm90_gemm_calls()
    grouped_gemm(x, w, off)  # warm-up outside the capture
    torch.cuda.synchronize()
    assert _C.sm90_gemm_calls() == before + 1  # on the CUTLASS kernels, not the fallback
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = grouped_gemm(x, w, off)
    for counts in ([100, 0, 200, 84], [0, 384, 0, 0], [7, 9, 11, 13]):
        off.copy_(_offsets(counts))
        graph.replay()
        torch.cuda.synchronize()
        assert _normwise(out, _ref(x, w, counts, None)) <= 4 * unit_roundoff(torch.bfloat16), counts


@needs_sm90
def test_cutlass_falls_back_where_the_tma_rules_do_not_hold(monkeypatch):
    monkeypatch.setenv("OSSRL_MOE_GEMM", "cutlass")
    counts = [5, 0, 11]
    for dtype, K, N in ((torch.bfloat16, 12, 16), (torch.bfloat16, 16, 12), (torch.float32, 16, 16)):
        x = torch.randn(sum(counts), K, device="cuda").to(dtype)
        w = torch.randn(3, K, N, device="cuda").to(dtype)
        before = _C.sm90_gemm_calls()
        out = grouped_gemm(x, w, _offsets(counts))
        assert _C.sm90_gemm_calls() == before, (dtype, K, N)  # the mma.sync kernels ran
        ref = _ref(x, w, counts, None)
        assert _normwise(out, ref) <= 4 * unit_roundoff(torch.bfloat16), (dtype, K, N)


@needs_cuda
def test_a_bad_or_unbuilt_kernel_choice_is_a_clear_error(monkeypatch):
    x = torch.randn(4, 8, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2, 8, 8, device="cuda", dtype=torch.bfloat16)
    off = _offsets([2, 2])
    monkeypatch.setenv("OSSRL_MOE_GEMM", "fastest")
    with pytest.raises(RuntimeError, match="OSSRL_MOE_GEMM must be 'mma'"):
        grouped_gemm(x, w, off)
    monkeypatch.setenv("OSSRL_MOE_GEMM", "mma")
    assert _normwise(grouped_gemm(x, w, off), _ref(x, w, [2, 2], None)) <= 4 * unit_roundoff(torch.bfloat16)
    if not _C.with_sm90_gemm:
        monkeypatch.setenv("OSSRL_MOE_GEMM", "cutlass")
        with pytest.raises(RuntimeError, match="no CUTLASS sm90 kernels"):
            grouped_gemm(x, w, off)


def test_build_reports_the_cutlass_kernels():
    from ossrl.cli import info

    line = next(s for s in info().splitlines() if s.startswith("CUTLASS sm90 grouped GEMMs:"))
    assert ("built" in line and "not built" not in line) == _C.with_sm90_gemm
    # CI builds for sm_90a with the CUTLASS headers (.ci/run sets this): they must be in the wheel.
    if os.environ.get("OSSRL_EXPECT_SM90_GEMM") == "1":
        assert _C.with_cuda and _C.with_sm90_gemm, _C.cuda_archs


def test_moe_kernels_sets_and_restores_the_switch(monkeypatch):
    monkeypatch.delenv("OSSRL_MOE_GEMM", raising=False)
    assert MOE_KERNELS == ("mma", "cutlass")
    with moe_kernels("mma"):
        assert os.environ["OSSRL_MOE_GEMM"] == "mma"
    assert "OSSRL_MOE_GEMM" not in os.environ
    monkeypatch.setenv("OSSRL_MOE_GEMM", "mma")
    with pytest.raises(KeyError):  # restored even when the block raises
        with moe_kernels("mma"):
            os.environ["OSSRL_MOE_GEMM"] = "changed inside"
            raise KeyError("inside")
    assert os.environ["OSSRL_MOE_GEMM"] == "mma"
    with pytest.raises(ValueError, match="not one of"):
        with moe_kernels("fastest"):
            pass
    if _C.with_sm90_gemm:
        with moe_kernels("cutlass"):
            assert os.environ["OSSRL_MOE_GEMM"] == "cutlass"
            # CPU ops ignore it: same result as outside the block
            x, w = torch.randn(6, 8), torch.randn(2, 8, 4)
            off = torch.tensor([2, 6], dtype=torch.int32)
            inside = grouped_gemm(x, w, off)
        assert torch.equal(inside, grouped_gemm(x, w, off))
    else:
        with pytest.raises(RuntimeError, match="no CUTLASS sm90 kernels"):
            with moe_kernels("cutlass"):
                pass
