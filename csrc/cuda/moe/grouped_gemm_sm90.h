// Hopper-native grouped GEMMs on CUTLASS's sm90 ptr-array kernels (grouped_gemm_sm90.cu), an
// alternative to the mma.sync kernels in gemm.cuh that OSSRL_MOE_GEMM=cutlass selects. Built only
// when the CUDA architectures include 90a and the CUTLASS headers are found (OSSRL_WITH_SM90_GEMM).
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace ossrl::moe_cuda::sm90 {

// out (T, N) rows [bounds[e], bounds[e+1]) = x rows @ w[e] (+ bias[e]). x (T, K) contiguous;
// w (E, K, N) contiguous, or with w_kmajor its K-contiguous transpose; bias (E, N) or undefined.
// bounds: E+1 clamped, non-decreasing row bounds on the device (make_sched). bf16/fp16 only,
// K and N multiples of 8 and 16-byte aligned pointers (the TMA's rules): the caller checks.
// dw (E, K, N)[e] = x rows^T @ dy rows over expert e's rows (zeros for an expert without rows).
#ifdef OSSRL_WITH_SM90_GEMM
void grouped_gemm(const at::Tensor& x, const at::Tensor& w, bool w_kmajor, const at::Tensor& bias,
                  const int32_t* bounds, at::Tensor& out, cudaStream_t stream);
void grouped_gemm_dw(const at::Tensor& x, const at::Tensor& dy, const int32_t* bounds,
                     at::Tensor& dw, cudaStream_t stream);
#else
// Never reached: the callers check that the kernels were built first.
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
