"""Mixture-of-experts ops: grouped GEMM, top-k routing and the fused GPT-OSS expert block.

Kernels: csrc/cpu/moe.cpp and csrc/cuda/moe/ (one file per kernel family: grouped GEMM, routing,
the expert block; *_sm90.cu are the CUTLASS sm90 ones, see ``moe_kernels``); schemas: csrc/ops.cpp.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, NamedTuple

import torch
from torch import Tensor

_ops = torch.ops.ossrl

MOE_KERNELS = ("mma", "cutlass")


@contextlib.contextmanager
def moe_kernels(name: str) -> Iterator[None]:
    """Run the MoE ops' CUDA GEMMs inside the block on one kernel family.

    ``"mma"`` (the default): ossrl's mma.sync kernels, with the gather, bias, SwiGLU and combine
    fused in. ``"cutlass"``: CUTLASS's sm90 grouped GEMMs (TMA, wgmma) for ``grouped_gemm`` and
    ``moe_experts`` forward and backward wherever they apply (an sm_90 GPU, bf16/fp16, K and N
    multiples of 8), ``"mma"`` elsewhere. This sets ``OSSRL_MOE_GEMM``, which the ops read at each
    call, for the whole process, and restores it on exit. CPU ops are unaffected. For example::

        with moe_kernels("cutlass"):
            y = moe_experts(x, routing, w_gate_up, b_gate_up, w_down, b_down)
    """
    if name not in MOE_KERNELS:
        raise ValueError(f"moe_kernels: {name!r} is not one of {MOE_KERNELS}")
    from ossrl import _C

    if name == "cutlass" and not _C.with_sm90_gemm:
        raise RuntimeError("moe_kernels('cutlass'): this build has no CUTLASS sm90 kernels (they are built when "
                           "OSSRL_CUDA_ARCHS includes 90a and the nvidia-cutlass headers are found)")
    old = os.environ.get("OSSRL_MOE_GEMM")
    os.environ["OSSRL_MOE_GEMM"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OSSRL_MOE_GEMM", None)
        else:
            os.environ["OSSRL_MOE_GEMM"] = old


class Routing(NamedTuple):
    """Where each token goes.

    weights: (T, k) float32, softmax over the k selected logits (GPT-OSS convention).
    experts: (T, k) int32, the selected experts, highest logit first.
    order: (T*k,) int32, flat (token * k + slot) indices sorted stably by expert.
    offsets: (E,) int32, inclusive cumulative ends of each expert's rows in ``order``.
    """

    weights: Tensor
    experts: Tensor
    order: Tensor
    offsets: Tensor


def grouped_gemm(x: Tensor, w: Tensor, offsets: Tensor, bias: Tensor | None = None) -> Tensor:
    """Rows of ``x`` grouped by expert, each group multiplied by its own weight.

    x (T, K); w (E, K, N); offsets int32 (E,) inclusive ends of each group's rows
    (non-decreasing, offsets[-1] <= T); bias (E, N) or None. Returns (T, N) with
    ``out[r] = x[r] @ w[e] + bias[e]`` for the group e holding row r, and zeros for rows at or
    beyond offsets[-1]. Differentiable in x, w and bias. On CUDA the offsets never leave the
    device (no host synchronisation; safe to capture in a CUDA graph).
    """
    return _ops.grouped_gemm(x, w, offsets, bias)


def moe_route(router_logits: Tensor, top_k: int) -> Routing:
    """Top-k routing as GPT-OSS does it: softmax over the k largest logits of each token.

    router_logits (T, E). Differentiable in router_logits through ``weights``.
    """
    return Routing(*_ops.moe_route(router_logits, top_k))


def moe_route_given(router_logits: Tensor, experts: Tensor) -> Routing:
    """Routing to given experts (routing replay): ``experts`` (T, k) int32, the experts each token
    goes to, in slot order; the weights are the softmax of ``router_logits`` (T, E) at those
    experts, so the router still gets gradients (differentiable in router_logits through
    ``weights``, exactly as :func:`moe_route`). ``moe_route_given(logits, moe_route(logits, k).experts)``
    equals ``moe_route(logits, k)``.

    Bad ids are errors on the CPU (out of [0, E), or one expert twice in a row); on CUDA only
    shapes and dtypes are checked (the values would need a host synchronisation): ids are
    clamped into [0, E) there.
    """
    return Routing(*_ops.moe_route_given(router_logits, experts))


def moe_experts(
    x: Tensor,
    routing: Routing,
    w_gate_up: Tensor,
    b_gate_up: Tensor,
    w_down: Tensor,
    b_down: Tensor,
    *,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> Tensor:
    """The expert block of a GPT-OSS layer, fused.

    For every routed (token, slot): h = x[token] @ w_gate_up[e] + b_gate_up[e];
    gate, up = h[::2], h[1::2]; gate = min(gate, limit); up = clamp(up, -limit, limit);
    a = (up + 1) * gate * sigmoid(alpha * gate); y = a @ w_down[e] + b_down[e]; and
    out[token] += routing.weights[token, slot] * y.

    Hugging Face layouts: x (T, H); w_gate_up (E, H, 2I); b_gate_up (E, 2I); w_down (E, I, H);
    b_down (E, H). Differentiable in x, all weights and biases, and routing.weights.
    Routed rows beyond routing.offsets[-1] are dropped. Each (token, slot) may appear in
    routing.order once; a repeat is an error on the CPU (on CUDA, where the check would cost a
    host synchronisation, it is not checked and races).
    """
    out, _ = _ops.moe_experts(
        x,
        routing.weights,
        routing.order,
        routing.offsets,
        w_gate_up,
        b_gate_up,
        w_down,
        b_down,
        float(swiglu_alpha),
        float(swiglu_limit),
    )
    return out


# ---- fake (meta) kernels: shapes and dtypes only, for torch.compile and opcheck ----


@torch.library.register_fake("ossrl::grouped_gemm")
def _(x, w, offsets, bias=None):
    torch._check(x.dim() == 2 and w.dim() == 3, lambda: "ossrl.grouped_gemm: x must be 2-D and w 3-D")
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.register_fake("ossrl::grouped_gemm_dw")
def _(x, dy, offsets, bias_grad):
    e = offsets.shape[0]
    dw = x.new_empty(e, x.shape[1], dy.shape[1])
    db = dy.new_empty(e, dy.shape[1]) if bias_grad else dy.new_empty(0)
    return dw, db


@torch.library.register_fake("ossrl::moe_route")
def _(router_logits, top_k):
    t, e = router_logits.shape
    torch._check(0 < top_k <= e, lambda: f"ossrl.moe_route: top_k must be in [1, {e}], got {top_k}")
    # float64 logits are routed in float64 (gradcheck); everything else gives float32 weights.
    wdtype = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    weights = router_logits.new_empty(t, top_k, dtype=wdtype)
    experts = router_logits.new_empty(t, top_k, dtype=torch.int32)
    order = router_logits.new_empty(t * top_k, dtype=torch.int32)
    offsets = router_logits.new_empty(e, dtype=torch.int32)
    return weights, experts, order, offsets


@torch.library.register_fake("ossrl::moe_route_given")
def _(router_logits, experts):
    t, e = router_logits.shape
    torch._check(experts.dim() == 2 and experts.shape[0] == t, lambda: "ossrl.moe_route_given: experts must be (T, k)")
    k = experts.shape[1]
    torch._check(0 < k <= e, lambda: f"ossrl.moe_route_given: experts must have 1 to {e} slots, got {k}")
    wdtype = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    return (router_logits.new_empty(t, k, dtype=wdtype), router_logits.new_empty(t, k, dtype=torch.int32),
            router_logits.new_empty(t * k, dtype=torch.int32), router_logits.new_empty(e, dtype=torch.int32))


@torch.library.register_fake("ossrl::moe_experts")
def _(x, weights, order, offsets, w_gate_up, b_gate_up, w_down, b_down, alpha, limit):
    return x.new_empty(x.shape), x.new_empty(order.shape[0], w_gate_up.shape[2])


@torch.library.register_fake("ossrl::moe_experts_backward")
def _(grad_out, x, weights, order, offsets, h, w_gate_up, w_down, b_down, alpha, limit):
    return (
        torch.empty_like(x),
        torch.empty_like(weights),
        torch.empty_like(w_gate_up),
        w_gate_up.new_empty(w_gate_up.shape[0], w_gate_up.shape[2]),
        torch.empty_like(w_down),
        torch.empty_like(b_down),
    )


# ---- autograd ----


def _grouped_gemm_setup(ctx, inputs, output):
    x, w, offsets, bias = inputs
    ctx.save_for_backward(x, w, offsets)
    ctx.has_bias = bias is not None


def _grouped_gemm_backward(ctx, grad):
    x, w, offsets = ctx.saved_tensors
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        # dx = dy @ w^T per group: the forward kernel on a transposed view of w.
        dx = _ops.grouped_gemm(grad, w.transpose(1, 2), offsets, None)
    if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[3]):
        dw, db = _ops.grouped_gemm_dw(x, grad, offsets, ctx.has_bias)
        if not ctx.needs_input_grad[1]:
            dw = None
        if not ctx.has_bias or not ctx.needs_input_grad[3]:
            db = None
    return dx, dw, None, db


torch.library.register_autograd(
    "ossrl::grouped_gemm", _grouped_gemm_backward, setup_context=_grouped_gemm_setup
)


def _moe_route_setup(ctx, inputs, output):
    weights, experts, _, _ = output
    ctx.save_for_backward(weights, experts)
    ctx.num_experts = inputs[0].shape[1]
    ctx.logits_dtype = inputs[0].dtype


def _moe_route_backward(ctx, d_weights, d_experts, d_order, d_offsets):
    # Softmax over the selected logits: d logit_j = w_j * (g_j - sum_i w_i g_i); others get 0.
    weights, experts = ctx.saved_tensors
    if d_weights is None:
        return None, None
    g = d_weights.to(weights.dtype)
    d_sel = weights * (g - (weights * g).sum(-1, keepdim=True))
    d_logits = weights.new_zeros(weights.shape[0], ctx.num_experts)
    d_logits.scatter_(1, experts.long(), d_sel)
    return d_logits.to(ctx.logits_dtype), None


torch.library.register_autograd("ossrl::moe_route", _moe_route_backward, setup_context=_moe_route_setup)
torch.library.register_autograd("ossrl::moe_route_given", _moe_route_backward, setup_context=_moe_route_setup)


def _moe_experts_setup(ctx, inputs, output):
    x, weights, order, offsets, w_gate_up, b_gate_up, w_down, b_down, alpha, limit = inputs
    ctx.save_for_backward(x, weights, order, offsets, output[1], w_gate_up, w_down, b_down)
    ctx.alpha, ctx.limit = alpha, limit


def _moe_experts_backward(ctx, grad_out, grad_h):
    x, weights, order, offsets, h, w_gate_up, w_down, b_down = ctx.saved_tensors
    dx, dweights, dwgu, dbgu, dwd, dbd = _ops.moe_experts_backward(
        grad_out.contiguous(), x, weights, order, offsets, h, w_gate_up, w_down, b_down, ctx.alpha, ctx.limit
    )
    return dx, dweights, None, None, dwgu, dbgu, dwd, dbd, None, None


torch.library.register_autograd(
    "ossrl::moe_experts", _moe_experts_backward, setup_context=_moe_experts_setup
)
