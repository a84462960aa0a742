// Hopper-native grouped GEMMs on CUTLASS's sm90 ptr-array kernels (grouped_gemm_sm90.cu), an
// alternative to the mma.sync kernels in gemm.cuh that OSSRL_MOE_GEMM=cutlass selects. Built only
// when the CUDA architectures include 90a and the CUTLASS headers are found (OSSRL_WITH_SM90_GEMM).
// grouped_gemm and its gradients (moe/grouped_gemm.cu) and moe_experts forward and backward
// (moe/experts_sm90.cu, called from experts.cu) use them.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

namespace ossrl::moe_cuda {

// OSSRL_MOE_GEMM, read at each call (grouped_gemm.cu): unset or "mma" keeps the mma.sync kernels
// of gemm.cuh, the default until a GPU run shows the CUTLASS ones correct and faster
// (benchmarks/NOTES.md); "cutlass" takes the CUTLASS sm90 kernels wherever sm90_applies, and
// the mma.sync ones elsewhere. Any other value, or "cutlass" in a build without them, is an error.
bool cutlass_selected(const char* op);
// The CUTLASS kernels' rules: an sm_90 GPU, bf16/fp16, every leading dimension in `dims` a
// multiple of 8 and every pointer in `ptrs` 16-byte aligned (the TMA's).
bool sm90_applies(const at::Tensor& x, std::initializer_list<int64_t> dims,
                  std::initializer_list<const void*> ptrs);
// One more op call that ran on the CUTLASS kernels (ossrl._C.sm90_gemm_calls()).
void count_sm90_call();
int64_t sm90_gemm_calls();

}  // namespace ossrl::moe_cuda

namespace ossrl::moe_cuda::sm90 {

// out (T, N) rows [bounds[e], bounds[e+1]) = x rows @ w[e] (+ bias[e]). x (T, K) contiguous;
// w (E, K, N) contiguous, or with w_kmajor its K-contiguous transpose; bias (E, N) or undefined.
// bounds: E+1 clamped, non-decreasing row bounds on the device (make_sched). bf16/fp16 only,
// K and N multiples of 8 and 16-byte aligned pointers (the TMA's rules): the caller checks.
// dw (E, K, N)[e] = x rows^T @ dy rows over expert e's rows (zeros for an expert without rows).
//
// moe_experts (experts_sm90.cu) on those GEMMs: what its forward and backward share. x, order,
// the weights (fp32, flat (T*k)), the schedule of make_sched (sched: its int32 (2E+2) tensor) and
// inv of make_inv are the default path's; the expert tensors are contiguous.
struct ExpertsSm90 {
  at::Tensor x, order, wts, sched, inv;
  int64_t max_tiles, topk;
  at::Tensor w_gate_up, b_gate_up, w_down, b_down;
  float alpha, limit;
};
// out (T, H) and h (T*k, 2I) as moe_experts returns them.
// dx, dw_flat (T*k fp32), dwgu, dbgu, dwd, dbd as moe_experts_backward's (grad_out and h in x's dtype).
#ifdef OSSRL_WITH_SM90_GEMM
void moe_experts(const ExpertsSm90& a, at::Tensor& out, at::Tensor& h, cudaStream_t stream);
void moe_experts_backward(const ExpertsSm90& a, const at::Tensor& grad_out, const at::Tensor& h,
                          at::Tensor& dx, at::Tensor& dw_flat, at::Tensor& dwgu, at::Tensor& dbgu,
                          at::Tensor& dwd, at::Tensor& dbd, cudaStream_t stream);
void grouped_gemm(const at::Tensor& x, const at::Tensor& w, bool w_kmajor, const at::Tensor& bias,
                  const int32_t* bounds, at::Tensor& out, cudaStream_t stream);
void grouped_gemm_dw(const at::Tensor& x, const at::Tensor& dy, const int32_t* bounds,
                     at::Tensor& dw, cudaStream_t stream);
#else
// Never reached: the callers check that the kernels were built first.
inline void moe_experts(const ExpertsSm90&, at::Tensor&, at::Tensor&, cudaStream_t) {
  TORCH_CHECK(false, "ossrl: this build has no CUTLASS sm90 kernels");
}
inline void moe_experts_backward(const ExpertsSm90&, const at::Tensor&, const at::Tensor&,
                                 at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&,
                                 at::Tensor&, cudaStream_t) {
  TORCH_CHECK(false, "ossrl: this build has no CUTLASS sm90 kernels");
}
inline void grouped_gemm(const at::Tensor&, const at::Tensor&, bool, const at::Tensor&,
                         const int32_t*, at::Tensor&, cudaStream_t) {
  TORCH_CHECK(false, "ossrl: this build has no CUTLASS sm90 kernels");
}
inline void grouped_gemm_dw(const at::Tensor&, const at::Tensor&, const int32_t*, at::Tensor&,
                            cudaStream_t) {
  TORCH_CHECK(false, "ossrl: this build has no CUTLASS sm90 kernels");
}
#endif

}  // namespace ossrl::moe_cuda::sm90
