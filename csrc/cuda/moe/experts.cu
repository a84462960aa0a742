// The fused GPT-OSS expert block on CUDA, forward and backward: gathered gate/up GEMM with bias and
// the clamped SwiGLU, down GEMM with the routing weight scattered to (token, slot) rows, the
// deterministic combine, and the gradients (see moe/gemm.cuh for the tiling). With
// OSSRL_MOE_GEMM=cutlass both run on the CUTLASS sm90 GEMMs instead (moe/experts_sm90.cu).
#include "gemm.cuh"
#include "grouped_gemm_sm90.h"

namespace ossrl::moe_cuda {

// ---------------------------------------------------------------------------------------------
// The GPT-OSS expert block

using ExpertArgs = ExpertShapes;

// Validates what moe_experts and its backward share (the same checks as the CPU kernel, except
// the values of order/offsets, which would need a host synchronisation: the kernels clamp them).
ExpertArgs check_experts(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& order,
                         const at::Tensor& offsets, const at::Tensor& w_gate_up,
                         const at::Tensor* b_gate_up, const at::Tensor& w_down,
                         const at::Tensor& b_down, const char* op) {
  check_cuda(x, op, "x");
  const ExpertArgs a =
      check_expert_shapes(x, weights, order, offsets, w_gate_up, b_gate_up, w_down, b_down, op);
  check_int_range(a.T * a.k, op, "T*k");
  check_int_range(2 * a.I, op, "2I");
  check_int_range(a.H, op, "H");
  check_int_range(a.E, op, "E");
  return a;
}

std::tuple<at::Tensor, at::Tensor> moe_experts_cuda(
    const at::Tensor& x, const at::Tensor& weights, const at::Tensor& order,
    const at::Tensor& offsets, const at::Tensor& w_gate_up, const at::Tensor& b_gate_up,
    const at::Tensor& w_down, const at::Tensor& b_down, double alpha, double limit) {
  ossrl::cuda::require_kernel_image(x, "moe_experts");
  const char* op = "moe_experts";
  const ExpertArgs a = check_experts(x, weights, order, offsets, w_gate_up, &b_gate_up, w_down,
                                     b_down, op);
  const int64_t T = a.T, H = a.H, I = a.I, E = a.E, k = a.k, R = T * k;
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({T, H}, x.options());
  at::Tensor h = at::empty({R, 2 * I}, x.options());
  if (R == 0 || E == 0) {
    out.zero_();
    h.zero_();
    return {out, h};
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const at::Tensor xc = x.contiguous(), ordc = order.contiguous(), off = offsets.contiguous();
  const at::Tensor wf = weights.to(at::kFloat).contiguous();
  const at::Tensor wgu = w_gate_up.contiguous(), bgu = b_gate_up.contiguous();
  const at::Tensor wd = w_down.contiguous(), bd = b_down.contiguous();
  const Sched s = make_sched(off, E, R, stream, op);
  // (H, I > 0: a CUTLASS problem with K = 0 would issue no MMA to clear its accumulators)
  if (cutlass_selected(op) && I > 0 && H > 0 &&
      sm90_applies(x, {H, I}, {xc.data_ptr(), wgu.data_ptr(), bgu.data_ptr(), wd.data_ptr(),
                              bd.data_ptr()})) {
    // inv (made first) is also the device-side check of order that the gathers rely on.
    const sm90::ExpertsSm90 args{xc, ordc, wf, s.t, make_inv(ordc, s, E, R, stream), s.max_tiles,
                                 k, wgu, bgu, wd, bd, static_cast<float>(alpha),
                                 static_cast<float>(limit)};
    sm90::moe_experts(args, out, h, stream);
    count_sm90_call();
    return {out, h};
  }
  at::Tensor act = at::empty({R, I}, x.options());    // swiglu(h), routed order
  at::Tensor slots = at::empty({R, H}, x.options());  // w_f * y at flat f (see gemm.cuh)

  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using S = decltype(tag);
    if (I > 0) {
      // h = x[token(r)] @ w_gate_up[e] + b_gate_up[e]; a = swiglu(h). A rows gathered.
      RowGemm p{};
      p.a = xc.data_ptr();
      p.lda = H;
      p.order = ordc.data_ptr<int32_t>();
      p.a_gather = 1;
      p.topk = static_cast<int>(k);
      p.flat_total = static_cast<int>(R);
      p.b = wgu.data_ptr();
      p.b_se = H * 2 * I;
      p.b_ld = 2 * I;
      p.M = static_cast<int>(R);
      p.N = static_cast<int>(2 * I);
      p.K = static_cast<int>(H);
      p.sched = s.ptr();
      p.E = static_cast<int>(E);
      p.vec_a = copy_width<S>(p.a, {H});
      p.vec_b = copy_width<S>(p.b, {H * 2 * I, 2 * I});
      p.epi = kEpiSwiglu;
      p.bias = bgu.data_ptr();
      p.out = h.data_ptr();
      p.ldo = 2 * I;
      p.out2 = act.data_ptr();
      p.alpha = static_cast<float>(alpha);
      p.limit = static_cast<float>(limit);
      launch_row_gemm<S, false>(p, s.max_tiles, stream);
    }
    launch_zero_tail<S>(h, s, E, stream);
    {
      // slots[f] = w_f * (a[r] @ w_down[e] + b_down[e]), f = order[r].
      RowGemm p{};
      p.a = act.data_ptr();
      p.lda = I;
      p.order = ordc.data_ptr<int32_t>();
      p.a_gather = 0;
      p.topk = static_cast<int>(k);
      p.flat_total = static_cast<int>(R);
      p.b = wd.data_ptr();
      p.b_se = I * H;
      p.b_ld = H;
      p.M = static_cast<int>(R);
      p.N = static_cast<int>(H);
      p.K = static_cast<int>(I);
      p.sched = s.ptr();
      p.E = static_cast<int>(E);
      p.vec_a = copy_width<S>(p.a, {I});
      p.vec_b = copy_width<S>(p.b, {I * H, H});
      p.epi = kEpiScatter;
      p.bias = bd.data_ptr();
      p.out = slots.data_ptr();
      p.ldo = H;
      p.wts = wf.data_ptr<float>();
      launch_row_gemm<S, false>(p, s.max_tiles, stream);
    }
    const at::Tensor inv = make_inv(ordc, s, E, R, stream);
    launch_combine<S>(slots, inv, k, out, stream);
  });
  return {out, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
moe_experts_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                          const at::Tensor& weights, const at::Tensor& order,
                          const at::Tensor& offsets, const at::Tensor& h,
                          const at::Tensor& w_gate_up, const at::Tensor& w_down,
                          const at::Tensor& b_down, double alpha, double limit) {
  ossrl::cuda::require_kernel_image(grad_out, "moe_experts_backward");
  const char* op = "moe_experts_backward";
  const ExpertArgs a = check_experts(x, weights, order, offsets, w_gate_up, nullptr, w_down,
                                     b_down, op);
  OSSRL_CHECK(grad_out.sizes() == x.sizes(), op, "grad_out must have the shape of x ",
              x.sizes(), ", got ", grad_out.sizes());
  check_float(grad_out, op, "grad_out");
  check_same_device(grad_out, x, op, "grad_out", "x");
  OSSRL_CHECK(h.dim() == 2 && h.size(0) == a.T * a.k && h.size(1) == 2 * a.I, op,
              "h must be (T*k, 2I) = (", a.T * a.k, ", ", 2 * a.I, "), got ", h.sizes());
  check_float(h, op, "h");
  check_same_device(h, x, op, "h", "x");
  const int64_t T = a.T, H = a.H, I = a.I, E = a.E, k = a.k, R = T * k;

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty({T, H}, x.options());
  at::Tensor dweights = at::empty(weights.sizes(), weights.options());
  at::Tensor dwgu = at::empty({E, H, 2 * I}, x.options());
  at::Tensor dbgu = at::empty({E, 2 * I}, x.options());
  at::Tensor dwd = at::empty({E, I, H}, x.options());
  at::Tensor dbd = at::empty({E, H}, x.options());
  if (R == 0 || E == 0) {
    for (at::Tensor* t : {&dx, &dweights, &dwgu, &dbgu, &dwd, &dbd}) t->zero_();
    return {dx, dweights, dwgu, dbgu, dwd, dbd};
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // grad_out and h in x's dtype (the CPU kernel accepts any float dtype for them too).
  const at::Tensor go = grad_out.to(x.scalar_type()).contiguous();
  const at::Tensor hc = h.to(x.scalar_type()).contiguous();
  const at::Tensor xc = x.contiguous();
  const at::Tensor ordc = order.contiguous(), off = offsets.contiguous();
  const at::Tensor wf = weights.to(at::kFloat).contiguous();
  const at::Tensor wgu = w_gate_up.contiguous(), wd = w_down.contiguous();
  const at::Tensor bd = b_down.contiguous();
  const Sched s = make_sched(off, E, R, stream, op);
  const at::Tensor inv = make_inv(ordc, s, E, R, stream);

  if (cutlass_selected(op) && I > 0 && H > 0 &&
      sm90_applies(x, {H, I}, {go.data_ptr(), hc.data_ptr(), xc.data_ptr(), wgu.data_ptr(),
                              wd.data_ptr(), bd.data_ptr()})) {
    at::Tensor dw_flat = at::empty({R}, x.options().dtype(at::kFloat));
    const sm90::ExpertsSm90 args{xc, ordc, wf, s.t, inv, s.max_tiles, k, wgu, at::Tensor(), wd,
                                 bd, static_cast<float>(alpha), static_cast<float>(limit)};
    sm90::moe_experts_backward(args, go, hc, dx, dw_flat, dwgu, dbgu, dwd, dbd, stream);
    count_sm90_call();
    dweights.copy_(dw_flat.view(weights.sizes()));
    return {dx, dweights, dwgu, dbgu, dwd, dbd};
  }

  at::Tensor dh = at::empty({R, 2 * I}, x.options());  // routed order; rows past the end unused
  at::Tensor aw = at::empty({R, I}, x.options());      // w_f * swiglu(h_r)
  const int64_t ntI = (I + kBN - 1) / kBN;
  at::Tensor dots = at::empty({R, std::max<int64_t>(ntI, 1)}, x.options().dtype(at::kFloat));
  at::Tensor dw_flat = at::empty({R}, x.options().dtype(at::kFloat));
  at::Tensor dslots = at::empty({R, H}, x.options());

  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using S = decltype(tag);
    if (I > 0 && H > 0) {
      // g = grad_out[token(r)] @ w_down[e]^T (B K-major: w_down[e] is (I, H) = (N, K)); the
      // epilogue writes dh, w_f * a and the per-tile partials of <g, a>.
      RowGemm p{};
      p.a = go.data_ptr();
      p.lda = H;
      p.order = ordc.data_ptr<int32_t>();
      p.a_gather = 1;
      p.topk = static_cast<int>(k);
      p.flat_total = static_cast<int>(R);
      p.b = wd.data_ptr();
      p.b_se = I * H;
      p.b_ld = H;
      p.M = static_cast<int>(R);
      p.N = static_cast<int>(I);
      p.K = static_cast<int>(H);
      p.sched = s.ptr();
      p.E = static_cast<int>(E);
      p.vec_a = copy_width<S>(p.a, {H});
      p.vec_b = copy_width<S>(p.b, {I * H, H});
      p.epi = kEpiSwigluBwd;
      p.out = dh.data_ptr();
      p.out2 = aw.data_ptr();
      p.h = hc.data_ptr();
      p.wts = wf.data_ptr<float>();
      p.partial = dots.data_ptr<float>();
      p.alpha = static_cast<float>(alpha);
      p.limit = static_cast<float>(limit);
      launch_row_gemm<S, true>(p, s.max_tiles, stream);
    } else {
      dots.zero_();
      dh.zero_();
      aw.zero_();
    }
    // dweights[f] = <g_r, a_r> + <grad_out[t], b_down[e]>.
    dweights_kernel<S><<<static_cast<unsigned>((R + kThreads / 32 - 1) / (kThreads / 32)),
                         kThreads, 0, stream>>>(
        dots.data_ptr<float>(), static_cast<int>(I > 0 ? ntI : 1), inv.data_ptr<int32_t>(),
        s.ptr(), static_cast<int>(E), static_cast<const S*>(go.data_ptr()),
        static_cast<const S*>(bd.data_ptr()), static_cast<int>(k), static_cast<int>(H),
        static_cast<int>(R), dw_flat.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    if (H > 0) {
      if (I > 0) {
        // dx slots: dslots[f] = dh[r] @ w_gate_up[e]^T (B K-major: w_gate_up[e] is (H, 2I)).
        RowGemm p{};
        p.a = dh.data_ptr();
        p.lda = 2 * I;
        p.order = ordc.data_ptr<int32_t>();
        p.a_gather = 0;
        p.topk = static_cast<int>(k);
        p.flat_total = static_cast<int>(R);
        p.b = wgu.data_ptr();
        p.b_se = H * 2 * I;
        p.b_ld = 2 * I;
        p.M = static_cast<int>(R);
        p.N = static_cast<int>(H);
        p.K = static_cast<int>(2 * I);
        p.sched = s.ptr();
        p.E = static_cast<int>(E);
        p.vec_a = copy_width<S>(p.a, {2 * I});
        p.vec_b = copy_width<S>(p.b, {H * 2 * I, 2 * I});
        p.epi = kEpiScatter;
        p.out = dslots.data_ptr();
        p.ldo = H;
        launch_row_gemm<S, true>(p, s.max_tiles, stream);
        launch_combine<S>(dslots, inv, k, dx, stream);
      } else {
        dx.zero_();
      }
    }

    // dw_gate_up[e] = sum_r x[token(r)]^T dh[r]; db_gate_up[e] = sum_r dh[r].
    VarKGemm g{};
    g.p = xc.data_ptr();
    g.ldp = H;
    g.p_gather = 1;
    g.q = dh.data_ptr();
    g.ldq = 2 * I;
    g.order = ordc.data_ptr<int32_t>();
    g.topk = static_cast<int>(k);
    g.flat_total = static_cast<int>(R);
    g.sched = s.ptr();
    g.E = static_cast<int>(E);
    g.M = static_cast<int>(H);
    g.N = static_cast<int>(2 * I);
    g.vec_p = copy_width<S>(g.p, {H});
    g.vec_q = copy_width<S>(g.q, {2 * I});
    g.out = dwgu.data_ptr();
    launch_vark_gemm<S>(g, stream);
    launch_colsum<S>(colsum_of(dh.data_ptr(), 2 * I, 2 * I, s, E), s, dbgu, stream);

    // dw_down[e] = sum_r (w_f a_r)^T grad_out[token(r)]; db_down[e] = sum_r w_f grad_out[token(r)].
    VarKGemm d{};
    d.p = aw.data_ptr();
    d.ldp = I;
    d.q = go.data_ptr();
    d.ldq = H;
    d.q_gather = 1;
    d.order = ordc.data_ptr<int32_t>();
    d.topk = static_cast<int>(k);
    d.flat_total = static_cast<int>(R);
    d.sched = s.ptr();
    d.E = static_cast<int>(E);
    d.M = static_cast<int>(I);
    d.N = static_cast<int>(H);
    d.vec_p = copy_width<S>(d.p, {I});
    d.vec_q = copy_width<S>(d.q, {H});
    d.out = dwd.data_ptr();
    launch_vark_gemm<S>(d, stream);
    ColSum cb = colsum_of(go.data_ptr(), H, H, s, E);
    cb.gather = 1;
    cb.order = ordc.data_ptr<int32_t>();
    cb.topk = static_cast<int>(k);
    cb.flat_total = static_cast<int>(R);
    cb.wts = wf.data_ptr<float>();
    launch_colsum<S>(cb, s, dbd, stream);
  });
  dweights.copy_(dw_flat.view(weights.sizes()));
  return {dx, dweights, dwgu, dbgu, dwd, dbd};
}

}  // namespace ossrl::moe_cuda
