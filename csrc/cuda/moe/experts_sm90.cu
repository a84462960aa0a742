// moe_experts forward and backward with every GEMM on the CUTLASS sm90 kernels
// (OSSRL_MOE_GEMM=cutlass; the GEMMs are in grouped_gemm_sm90.cu, the default path in experts.cu).
// CUTLASS's TMA loads cannot gather rows and its epilogue writes each row where its problem puts
// it, so what the mma.sync kernels fuse into their GEMMs is done here by small kernels between
// them: the gathers of routed rows, the SwiGLU and its gradient, and the (token, slot) combines.
// Each costs a pass over (routed rows x H or I) in bf16/fp16, against GEMMs of 2 x rows x H x I
// flops. Reductions keep a fixed order, so results are bitwise reproducible from run to run (not
// bitwise equal to the default path's: h and g are rounded to x's dtype before the SwiGLU and
// its gradient, and the routing weight multiplies a rounded row). Temporaries are released as
// soon as the last kernel that reads them is queued, to keep the peak near the default's.
#include "gemm.cuh"
#include "grouped_gemm_sm90.h"

namespace ossrl::moe_cuda::sm90 {
namespace {

constexpr int kRowThreads = 128;

// xs[r] = x[order[r] / k] for the routed rows r < *end, in 16-byte chunks (16-bit T, H % 8 == 0).
// An entry of order outside [0, T*k) (build_inv_kernel has already asserted on it) reads nothing:
// its row is zero.
template <typename T>
__global__ void gather_rows_kernel(const T* __restrict__ x, const int32_t* __restrict__ order,
                                   const int32_t* __restrict__ end_ptr, int topk, int H,
                                   int flat_total, T* __restrict__ xs) {
  static_assert(sizeof(T) == 2, "16-byte chunks of 8 elements");
  const int64_t end = *end_ptr;
  const int chunks = H / 8;
  for (int64_t r = blockIdx.x; r < end; r += gridDim.x) {
    const int f = order[r];
    uint4* dst = reinterpret_cast<uint4*>(xs + r * H);
    if (f < 0 || f >= flat_total) {
      for (int c = threadIdx.x; c < chunks; c += blockDim.x) dst[c] = make_uint4(0, 0, 0, 0);
      continue;
    }
    const uint4* src = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(f / topk) * H);
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) dst[c] = src[c];
  }
}

// act[r, i] = swiglu(h[r, 2i], h[r, 2i+1]) for the routed rows r < *end.
template <typename T>
__global__ void swiglu_rows_kernel(const T* __restrict__ h, const int32_t* __restrict__ end_ptr,
                                   int I, float alpha, float limit, T* __restrict__ act) {
  const int64_t n = static_cast<int64_t>(*end_ptr) * I;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    act[i] = T(swiglu_fwd(static_cast<float>(h[2 * i]), static_cast<float>(h[2 * i + 1]), alpha,
                          limit));
}

// For the routed rows r < *end (one warp each), with g = grad_out rows @ w_down^T and the row's
// routing weight w: dh = d swiglu(h) / dh at upstream w * g, aw = w * swiglu(h), and
// dots[r] = <g, swiglu(h)> (lane-strided partial sums, then a butterfly: a fixed order).
template <typename T>
__global__ void swiglu_bwd_rows_kernel(const T* __restrict__ g, const T* __restrict__ h,
                                       const int32_t* __restrict__ order,
                                       const float* __restrict__ wts,
                                       const int32_t* __restrict__ end_ptr, int flat_total,
                                       int I, float alpha, float limit, T* __restrict__ dh,
                                       T* __restrict__ aw, float* __restrict__ dots) {
  const int64_t end = *end_ptr;
  const int lane = threadIdx.x & 31;
  const int warps = blockDim.x / 32;
  for (int64_t row = blockIdx.x * warps + threadIdx.x / 32; row < end;
       row += static_cast<int64_t>(gridDim.x) * warps) {
    const int f = order[row];
    const float w = (f >= 0 && f < flat_total) ? wts[f] : 0.f;  // see gather_rows_kernel
    float dot = 0.f;
    for (int i = lane; i < I; i += 32) {
      const float gr = static_cast<float>(g[row * I + i]);
      const SwigluGrad s = swiglu_bwd(static_cast<float>(h[row * 2 * I + 2 * i]),
                                      static_cast<float>(h[row * 2 * I + 2 * i + 1]), w * gr,
                                      alpha, limit);
      dot += gr * s.a;
      dh[row * 2 * I + 2 * i] = T(s.dgate);
      dh[row * 2 * I + 2 * i + 1] = T(s.dup);
      aw[row * I + i] = T(w * s.a);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    if (lane == 0) dots[row] = dot;
  }
}

// out[t, n] = sum over slots j (in order, fp32) of w[f] * y[inv[f], n] (w = 1 when null), for
// the routed f = t*k + j: y is in routed order, as the CUTLASS epilogue writes it.
template <typename T>
__global__ void combine_rows_kernel(const T* __restrict__ y, const int32_t* __restrict__ inv,
                                    const float* __restrict__ w, int topk, int N,
                                    T* __restrict__ out) {
  const int64_t t = blockIdx.x;
  for (int n = threadIdx.x; n < N; n += blockDim.x) {
    float s = 0.f;
    for (int j = 0; j < topk; ++j) {
      const int64_t f = t * topk + j;
      const int r = inv[f];
      if (r >= 0) s += (w ? w[f] : 1.f) * static_cast<float>(y[static_cast<int64_t>(r) * N + n]);
    }
    out[t * N + n] = T(s);
  }
}

unsigned row_grid(int64_t rows) {
  return static_cast<unsigned>(std::max<int64_t>(std::min<int64_t>(rows, 4096), 1));
}

template <typename T>
at::Tensor gather_rows(const at::Tensor& src, const at::Tensor& order, const int32_t* end,
                       int64_t topk, cudaStream_t stream) {
  const int64_t R = order.size(0), H = src.size(1);
  at::Tensor rows = at::empty({R, H}, src.options());
  gather_rows_kernel<T><<<row_grid(R), kRowThreads, 0, stream>>>(
      static_cast<const T*>(src.data_ptr()), order.data_ptr<int32_t>(), end,
      static_cast<int>(topk), static_cast<int>(H), static_cast<int>(R),
      static_cast<T*>(rows.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return rows;
}

template <typename T>
void combine_rows(const at::Tensor& y, const at::Tensor& inv, const float* w, int64_t topk,
                  at::Tensor& out, cudaStream_t stream) {
  const int64_t T_ = out.size(0), N = out.size(1);
  if (T_ == 0 || N == 0) return;
  combine_rows_kernel<T><<<static_cast<unsigned>(T_), kThreads, 0, stream>>>(
      static_cast<const T*>(y.data_ptr()), inv.data_ptr<int32_t>(), w, static_cast<int>(topk),
      static_cast<int>(N), static_cast<T*>(out.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename F>
void dispatch16(at::ScalarType dtype, F&& f) {
  if (dtype == at::kBFloat16)
    f(c10::BFloat16{});
  else if (dtype == at::kHalf)
    f(c10::Half{});
  else
    TORCH_CHECK(false, "ossrl: the CUTLASS sm90 path takes bfloat16 or float16, not ", dtype);
}

}  // namespace

void moe_experts(const ExpertsSm90& a, at::Tensor& out, at::Tensor& h, cudaStream_t stream) {
  const int64_t E = a.w_gate_up.size(0), I = a.w_down.size(1), R = a.order.size(0);
  const Sched s{a.sched, a.max_tiles};
  const int32_t* end = s.ptr() + E;
  dispatch16(a.x.scalar_type(), [&](auto tag) {
    using S = decltype(tag);
    at::Tensor xs = gather_rows<S>(a.x, a.order, end, a.topk, stream);
    grouped_gemm(xs, a.w_gate_up, false, a.b_gate_up, s.ptr(), h, stream);  // h = xs W_gu + b
    xs = at::Tensor();
    launch_zero_tail<S>(h, s, E, stream);
    at::Tensor act = at::empty({R, I}, a.x.options());
    swiglu_rows_kernel<S><<<row_grid(R), kThreads, 0, stream>>>(
        static_cast<const S*>(h.data_ptr()), end, static_cast<int>(I), a.alpha, a.limit,
        static_cast<S*>(act.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor y = at::empty({R, out.size(1)}, a.x.options());
    grouped_gemm(act, a.w_down, false, a.b_down, s.ptr(), y, stream);  // y = act W_d + b
    combine_rows<S>(y, a.inv, a.wts.data_ptr<float>(), a.topk, out, stream);
  });
}

void moe_experts_backward(const ExpertsSm90& a, const at::Tensor& grad_out, const at::Tensor& h,
                          at::Tensor& dx, at::Tensor& dw_flat, at::Tensor& dwgu, at::Tensor& dbgu,
                          at::Tensor& dwd, at::Tensor& dbd, cudaStream_t stream) {
  const int64_t E = a.w_gate_up.size(0), H = a.x.size(1), I = a.w_down.size(1);
  const int64_t R = a.order.size(0);
  const Sched s{a.sched, a.max_tiles};
  const int32_t* end = s.ptr() + E;
  dispatch16(a.x.scalar_type(), [&](auto tag) {
    using S = decltype(tag);
    // g = grad_out[token(r)] @ w_down[e]^T (w_down[e] is (I, H): its transpose is K-major)
    at::Tensor gs = gather_rows<S>(grad_out, a.order, end, a.topk, stream);
    at::Tensor g = at::empty({R, I}, a.x.options());
    grouped_gemm(gs, a.w_down.transpose(1, 2), true, at::Tensor(), s.ptr(), g, stream);
    at::Tensor dh = at::empty({R, 2 * I}, a.x.options());
    at::Tensor aw = at::empty({R, I}, a.x.options());
    at::Tensor dots = at::empty({R}, a.x.options().dtype(at::kFloat));
    swiglu_bwd_rows_kernel<S><<<row_grid((R + kThreads / 32 - 1) / (kThreads / 32)), kThreads, 0,
                                stream>>>(
        static_cast<const S*>(g.data_ptr()), static_cast<const S*>(h.data_ptr()),
        a.order.data_ptr<int32_t>(), a.wts.data_ptr<float>(), end, static_cast<int>(R),
        static_cast<int>(I), a.alpha, a.limit, static_cast<S*>(dh.data_ptr()),
        static_cast<S*>(aw.data_ptr()), dots.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    g = at::Tensor();
    // dweights[f] = <g_r, a_r> + <grad_out[t], b_down[e]> (one partial per row here)
    dweights_kernel<S><<<static_cast<unsigned>((R + kThreads / 32 - 1) / (kThreads / 32)),
                         kThreads, 0, stream>>>(
        dots.data_ptr<float>(), 1, a.inv.data_ptr<int32_t>(), s.ptr(), static_cast<int>(E),
        static_cast<const S*>(grad_out.data_ptr()), static_cast<const S*>(a.b_down.data_ptr()),
        static_cast<int>(a.topk), static_cast<int>(H), static_cast<int>(R),
        dw_flat.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dots = at::Tensor();
    // dw_down[e] = (w_f a_r)^T grad_out rows; db_down[e] = sum of w_f grad_out[token(r)]
    grouped_gemm_dw(aw, gs, s.ptr(), dwd, stream);
    gs = at::Tensor();
    aw = at::Tensor();
    ColSum cb = colsum_of(grad_out.data_ptr(), H, H, s, E);
    cb.gather = 1;
    cb.order = a.order.data_ptr<int32_t>();
    cb.topk = static_cast<int>(a.topk);
    cb.flat_total = static_cast<int>(R);
    cb.wts = a.wts.data_ptr<float>();
    launch_colsum<S>(cb, s, dbd, stream);
    // dx = the slots' sum of dh[r] @ w_gate_up[e]^T (w_gate_up[e] is (H, 2I): K-major transpose)
    at::Tensor dslots = at::empty({R, H}, a.x.options());
    grouped_gemm(dh, a.w_gate_up.transpose(1, 2), true, at::Tensor(), s.ptr(), dslots, stream);
    combine_rows<S>(dslots, a.inv, nullptr, a.topk, dx, stream);
    dslots = at::Tensor();
    // dw_gate_up[e] = x rows^T dh; db_gate_up[e] = sum of dh rows
    at::Tensor xs = gather_rows<S>(a.x, a.order, end, a.topk, stream);
    grouped_gemm_dw(xs, dh, s.ptr(), dwgu, stream);
    xs = at::Tensor();
    launch_colsum<S>(colsum_of(dh.data_ptr(), 2 * I, 2 * I, s, E), s, dbgu, stream);
  });
}

}  // namespace ossrl::moe_cuda::sm90
