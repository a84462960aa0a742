// Shared by the attention CUDA files: constants, device helpers (numerics, PTX) and the host
// helpers (dispatch, argument checks, sinks).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include "ossrl/cuda_arch.h"
#include "ossrl/attention_composite.h"
#include "ossrl/check.h"

namespace ossrl {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kThreads = 128;  // 4 warps per block in every attention kernel
constexpr int kBr = 64;        // forward: query rows per block (16 per warp)
constexpr int kBc = 64;        // keys per tile (forward and backward)
constexpr int kMaxTokens = 1 << 30;  // keeps all position arithmetic inside int32

// ------------------------------------------------------------------------------------------
// Small device helpers
// ------------------------------------------------------------------------------------------

__device__ __forceinline__ int clampi(int x, int lo, int hi) { return min(max(x, lo), hi); }

// Start and length of sequence b in a packed tensor of `total` rows, clamped into range.
__device__ __forceinline__ void seq_bounds(const int* cu, int b, int total, int& start, int& len) {
  const int s = clampi(cu[b], 0, total);
  const int e = clampi(cu[b + 1], s, total);
  start = s;
  len = e - s;
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low 16 bits) = lo
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// c[16x8] += a[16x16] * b[16x8], fp32 accumulators. Fragment layouts (PTX ISA, m16n8k16,
// g = lane / 4, t = lane % 4; each 32-bit register holds two consecutive-column halves, the
// lower column in the low 16 bits):
//   a[0]: (row g,   cols 2t,2t+1)   a[1]: (row g+8, cols 2t,2t+1)
//   a[2]: (row g,   cols 2t+8,+9)   a[3]: (row g+8, cols 2t+8,+9)
//   b0:   (k rows 2t,2t+1,   col g) b1:   (k rows 2t+8,2t+9, col g)
//   c[0],c[1]: (row g, cols 2t,2t+1)  c[2],c[3]: (row g+8, cols 2t,2t+1)
template <typename T>
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// ldmatrix x4: lanes 8m..8m+7 give the 8 row addresses (16 bytes each) of matrix m; register
// r[m] then holds, in lane l, row l/4, columns 2(l%4), 2(l%4)+1 of matrix m (with .trans: the
// transposed matrix, i.e. rows 2(l%4), 2(l%4)+1 of column l/4).
__device__ __forceinline__ void ldsm_x4(uint32_t* r, const void* smem_row) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t* r, const void* smem_row) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// The three ldmatrix address patterns used below, for a tile stored row-major in shared
// memory with leading dimension ld (elements), at rows r0.., columns c0..:
//
// (A) A operand, 16x16 at (r0, c0): matrices (rows 0-7, cols 0-7), (rows 8-15, cols 0-7),
//     (rows 0-7, cols 8-15), (rows 8-15, cols 8-15) -> a[0..3] exactly.
template <typename T>
__device__ __forceinline__ const T* addr_a(const T* s, int ld, int r0, int c0, int lane) {
  return s + (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + c0 + (lane >> 4) * 8;
}
// (B) B operand where the stored tile is [n][k] (e.g. K stored [key][d] for S = Q K^T):
//     matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15), so that
//     r[0], r[1] = (b0, b1) of n-tile n0..n0+7 and r[2], r[3] = (b0, b1) of n-tile n0+8..+15.
template <typename T>
__device__ __forceinline__ const T* addr_b_nk(const T* s, int ld, int n0, int k0, int lane) {
  return s + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8;
}
// (C) B operand where the stored tile is [k][n] (e.g. V stored [key][d] for O = P V), loaded
//     with .trans: matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15),
//     so r[0], r[1] = (b0, b1) of n-tile n0..n0+7 and r[2], r[3] = (b0, b1) of n0+8..n0+15.
template <typename T>
__device__ __forceinline__ const T* addr_b_kn(const T* s, int ld, int k0, int n0, int lane) {
  return s + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8;
}

// 16-byte global->shared copy; when !pred the destination is zero-filled and nothing is read.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// The visibility rule, shared by every kernel (see the header comment).
__device__ __forceinline__ bool visible(int j, int pos, bool causal, int window) {
  return (!causal || j <= pos) && (window < 0 || j > pos - window);
}

// ------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Contiguous, 16-byte aligned (the kernels read rows with 16-byte copies).
at::Tensor dense(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

// bf16/fp16 and head dim 64/128: calls f(T{}, std::integral_constant<int, D>{}).
// Whether the tensor-core kernels have an instantiation for these inputs; the others (float32,
// float64, other head dims) run the ATen composite (csrc/attention_composite.cpp): exact, slow.
bool kernels_take(at::ScalarType st, int64_t D) {
  return (st == at::kBFloat16 || st == at::kHalf) && (D == 64 || D == 128);
}

at::Tensor given(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

template <typename F>
void dispatch_attn(at::ScalarType st, int64_t D, const char* op, F&& f) {
  OSSRL_CHECK(st == at::kBFloat16 || st == at::kHalf, op,
              "the CUDA kernels take bfloat16 or float16 q/k/v, got ", st,
              " (cast the inputs, or run on the CPU)");
  OSSRL_CHECK(D == 64 || D == 128, op, "the CUDA kernels support head dim 64 or 128, got ", D);
  if (st == at::kBFloat16) {
    if (D == 64) f(__nv_bfloat16{}, std::integral_constant<int, 64>{});
    else f(__nv_bfloat16{}, std::integral_constant<int, 128>{});
  } else {
    if (D == 64) f(__half{}, std::integral_constant<int, 64>{});
    else f(__half{}, std::integral_constant<int, 128>{});
  }
}

template <typename K>
void set_smem(K kernel, size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

struct AttnDims {
  int64_t Tq, Tk, Hq, Hkv, D, B;
};

// cu_seqlens: int32 (B+1,) on ref's device. Its values are not read here (that would
// synchronise); the kernels clamp them instead.
void check_cu(const at::Tensor& cu, int64_t total, const at::Tensor& ref, const char* op,
              const char* name, const char* total_name, const char* ref_name) {
  check_cu_seqlens(cu, total, op, name, total_name);  // check.h: dtype, dim, size
  check_same_device(cu, ref, op, name, ref_name);
}

void check_window(int64_t window, const char* op) {
  OSSRL_CHECK_VALUE(window != 0, op, "window must be positive (keys per query, itself included) ",
                    "or negative for no window, got 0");
}

// sinks: (Hq,) fp32 or q's dtype, same device; returned as contiguous fp32 (or undefined).
at::Tensor prepare_sinks(const std::optional<at::Tensor>& sinks, const at::Tensor& q, int64_t Hq,
                         const char* op) {
  if (!sinks.has_value() || !sinks->defined()) return at::Tensor();
  const at::Tensor& s = *sinks;
  check_dim(s, 1, op, "sinks");
  check_size(s, 0, Hq, op, "sinks", "the number of query heads");
  check_aux_dtype(s, q, op, "sinks", "q");
  check_same_device(s, q, op, "sinks", "q");
  return s.to(at::kFloat).contiguous();
}

int clamp_window(int64_t window, int64_t Tk) {
  if (window < 0) return -1;
  // A window of Tk or more keys never excludes anything (p <= Lk - 1 <= Tk - 1).
  return static_cast<int>(std::min<int64_t>(window, std::max<int64_t>(Tk, 1)));
}

AttnDims check_varlen(const char* op, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
                      int64_t max_q, int64_t max_k, int64_t window) {
  check_window(window, op);
  check_dim(q, 3, op, "q");
  check_dim(k, 3, op, "k");
  check_dim(v, 3, op, "v");
  check_float(q, op, "q");
  check_same_dtype(k, q, op, "k", "q");
  check_same_dtype(v, q, op, "v", "q");
  OSSRL_CHECK(q.is_cuda(), op, "q must be a CUDA tensor here, got ", q.device());
  check_same_device(k, q, op, "k", "q");
  check_same_device(v, q, op, "v", "q");
  check_cu(cu_q, q.size(0), q, op, "cu_seqlens_q", "the number of query tokens q.shape[0]", "q");
  check_cu(cu_k, k.size(0), q, op, "cu_seqlens_k", "the number of key tokens k.shape[0]", "q");
  AttnDims d{q.size(0), k.size(0), q.size(1), k.size(1), q.size(2), cu_q.size(0) - 1};
  OSSRL_CHECK(cu_k.size(0) == cu_q.size(0), op, "cu_seqlens_k has ", cu_k.size(0),
              " entries but cu_seqlens_q has ", cu_q.size(0));
  OSSRL_CHECK(v.size(0) == d.Tk && v.size(1) == d.Hkv, op, "v has shape ", v.sizes(),
              " but k has shape ", k.sizes());
  OSSRL_CHECK(k.size(2) == d.D && v.size(2) == d.D, op, "q, k and v must share the head dim: q ",
              q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  OSSRL_CHECK(d.Hkv > 0 && d.Hq % d.Hkv == 0, op, "the number of query heads (", d.Hq,
              ") must be a multiple of the number of key/value heads (", d.Hkv, ")");
  OSSRL_CHECK(max_q >= 0 && max_k >= 0, op, "max_seqlen_q and max_seqlen_k must be >= 0");
  OSSRL_CHECK(d.Tq < kMaxTokens && d.Tk < kMaxTokens, op, "at most 2^30 tokens are supported");
  OSSRL_CHECK(d.B <= 65535, op, "at most 65535 sequences per call on CUDA, got ", d.B);
  OSSRL_CHECK(d.Hq <= 65535, op, "at most 65535 heads on CUDA");
  return d;
}

}  // namespace
}  // namespace ossrl
