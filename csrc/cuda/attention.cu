// CUDA kernels for packed variable-length attention (causal / sliding window / GQA / sinks),
// its backward, and paged-KV-cache decoding. Semantics: see csrc/ops.cpp and DESIGN.md; they
// must match csrc/cpu/attention.cpp exactly.
//
// Masks. Per sequence b: Lq queries, Lk keys, off = Lk - Lq. Query i sits at key position
// p = i + off (bottom-right alignment) and sees key j (0 <= j < Lk) iff
//   (!causal || j <= p) && (window < 0 || j > p - window).
// A row that sees no key gets out = 0 and lse = sink (or -inf without sinks).
//
// Tiling, and why:
// - All matrix products use mma.sync m16n8k16 (bf16/fp16 in, fp32 accumulate) on fragments
//   loaded with ldmatrix from padded shared memory (row stride D+8 halves: the 8 rows an
//   ldmatrix reads then fall in 8 different bank groups). mma.sync keeps the code readable and
//   quick to compile; the fragment layouts are written out next to each use so a reviewer can
//   check them against the PTX manual.
// - Forward (FlashAttention-2 style): a block = 4 warps = 64 query rows of one head (or, for
//   the paged kernel, 64 (token, head) rows of one GQA group, so each K/V byte of the cache is
//   read once per group). Each warp owns 16 rows, so the online softmax (row max / row sum)
//   lives in registers and needs only quad shuffles; S never leaves registers: the C fragment
//   of Q K^T is re-packed in place as the A fragment of P V. Key tiles of 64: the K tile of the
//   next step is fetched with cp.async while softmax and P V run, the V tile while Q K^T runs.
//   Only key tiles that intersect the union of the rows' visible ranges are visited (causal +
//   window skipping); the per-element mask is applied only on tiles that straddle a boundary.
// - Split-K (paged decoding): with few sequences x heads the (row tile, head, sequence) grid
//   cannot fill 132 SMs, so the keys of a sequence are cut into chunks, each block writes an
//   fp32 partial (output normalised within its chunk, and its log-sum-exp), and a merge kernel
//   combines them by log-sum-exp, folding in the sink. The split count comes from host-known
//   values only (max_seqlen_k, batch, heads, SM count): no device->host synchronisation.
// - Backward (FlashAttention-2 style): a block owns 64 keys of one KV head and loops over all
//   query heads of its GQA group and over the query tiles that can see those keys, so dK/dV
//   accumulate in registers without atomics and without repeating K/V. Each warp owns 16 keys,
//   computes S^T = K Q^T, P^T, dP^T = V dO^T and dS^T in registers (keys as the M dimension),
//   which makes P^T and dS^T directly the A operands of dV += P^T dO and dK += dS^T Q. dQ needs
//   dS with queries as rows, so dS goes through shared memory once and dQ = dS K is added with
//   fp32 atomics into a (Tq, Hq, D) workspace. D_i = rowsum(dO_i * O_i) and the sink gradient
//   come from a small preprocessing kernel.
// - Robustness: cu_seqlens / seq_lens / block tables live on the device and are not validated
//   (that would synchronise); every value read is clamped so that bad values can never cause
//   an out-of-bounds access. max_seqlen_q/k only size the grid: blocks loop over their row/key
//   tiles with a grid stride, so an understated max_seqlen still computes everything.
// - dtypes: bfloat16 and float16 with head dim 64 or 128. float32 (and float64) inputs are
//   rejected on CUDA with a clear error (cast to bf16/fp16, or use the CPU kernels).
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
// Forward (varlen and paged)
// ------------------------------------------------------------------------------------------

struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;                 // final mode: (Tq, Hq, D) in q's dtype
  float* lse;                // final mode: (Hq, Tq), may be null (paged)
  float* out_part;           // split mode: (splits, Tq, Hq, D) fp32, normalised per split
  float* lse_part;           // split mode: (splits, Tq, Hq) fp32, sink excluded
  const int* cu_q;           // (B+1)
  const int* cu_k;           // (B+1), varlen only
  const int* block_table;    // (B, max_blocks), paged only
  const int* seq_lens;       // (B), paged only
  const float* sinks;        // (Hq) fp32 or null
  int64_t k_blk, k_tok, k_head;  // K/V element strides (varlen: k_blk unused; K and V share them)
  int64_t v_blk, v_tok, v_head;
  int Tq, Tk, Hq, Hkv, group;
  int rows_per_token;        // 1: a block is one head; group: a block is one GQA group (paged)
  int max_blocks, block_size, num_cache_blocks, max_keys;  // paged only
  int causal, window;
  int num_splits, row_tiles;  // row_tiles: the row-tile grid stride
  float scale_log2;          // softmax_scale * log2(e)
};

template <typename T, int D, bool PAGED>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(const FwdParams p) {
  static_assert(D % 16 == 0, "head dim must be a multiple of 16");
  constexpr int LDS = D + 8;  // padded row stride (elements) of the Q/K/V tiles
  constexpr int CPR = D / 8;  // 16-byte chunks per row
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBr * LDS;
  T* sV = sK + kBc * LDS;

  const T* __restrict__ q = static_cast<const T*>(p.q);
  const T* __restrict__ kp = static_cast<const T*>(p.k);
  const T* __restrict__ vp = static_cast<const T*>(p.v);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, tq = lane & 3;
  const int b = blockIdx.z;

  int qs, Lq;
  seq_bounds(p.cu_q, b, p.Tq, qs, Lq);
  int ks = 0, Lk;
  if constexpr (PAGED) {
    Lk = clampi(p.seq_lens[b], 0, p.max_keys);
  } else {
    seq_bounds(p.cu_k, b, p.Tk, ks, Lk);
  }
  const int off = Lk - Lq;

  // Row tiles in reverse launch order: with a causal mask the last tiles see the most keys, so
  // they start first and the short ones fill the tail. (Any permutation of [0, row_tiles) works.)
  int split = 0, rt_first = p.row_tiles - 1 - static_cast<int>(blockIdx.x);
  if (p.num_splits > 1) {
    split = blockIdx.x % p.num_splits;
    rt_first = p.row_tiles - 1 - static_cast<int>(blockIdx.x / p.num_splits);
  }
  const int rpt = p.rows_per_token;
  const int hkv = PAGED ? blockIdx.y : blockIdx.y / p.group;
  const int hbase = PAGED ? blockIdx.y * p.group : blockIdx.y;
  const int rows = Lq * rpt;
  const float* __restrict__ sinks = p.num_splits > 1 ? nullptr : p.sinks;

  // Pointer to the first element of key j (0 <= j < Lk) of this KV head.
  auto key_row = [&](const T* base, int j, int64_t s_blk, int64_t s_tok, int64_t s_head) {
    if constexpr (PAGED) {
      int blk = p.block_table[static_cast<int64_t>(b) * p.max_blocks + j / p.block_size];
      blk = clampi(blk, 0, p.num_cache_blocks - 1);
      return base + blk * s_blk + static_cast<int64_t>(j % p.block_size) * s_tok + hkv * s_head;
    } else {
      return base + static_cast<int64_t>(ks + j) * s_tok + hkv * s_head;
    }
  };
  // Load keys n0..n0+kBc-1 into a tile; rows at or beyond khi are zero-filled.
  auto load_kv = [&](T* dst, const T* base, int n0, int khi, int64_t s_blk, int64_t s_tok,
                     int64_t s_head) {
    for (int c = tid; c < kBc * CPR; c += kThreads) {
      const int r = c / CPR, col = (c % CPR) * 8;
      const int j = n0 + r;
      const bool ok = j < khi;
      const T* src = ok ? key_row(base, j, s_blk, s_tok, s_head) + col : base;
      cp_async16(dst + r * LDS + col, src, ok);
    }
  };

  for (int rt = rt_first; rt * kBr < rows; rt += p.row_tiles) {
    const int r0 = rt * kBr;
    const int r1 = min(rows, r0 + kBr);  // exclusive
    const int p_min = r0 / rpt + off, p_max = (r1 - 1) / rpt + off;
    // Keys visible to at least one row of the tile: [klo, khi).
    int klo = 0, khi = Lk;
    if (p.window >= 0) klo = max(0, p_min - p.window + 1);
    if (p.causal) khi = min(Lk, p_max + 1);
    if (p.num_splits > 1 && klo < khi) {
      // This split's share: consecutive chunks of whole key tiles; trailing splits may be empty.
      const int span = khi - klo;
      const int chunk = (span + p.num_splits - 1) / p.num_splits;
      const int chunk_tiles = (chunk + kBc - 1) / kBc * kBc;
      khi = klo + min(span, (split + 1) * chunk_tiles);
      klo = klo + min(span, split * chunk_tiles);
    }
    const bool any = klo < khi;
    // Warps whose 16 rows are all past the end (decoding: G rows per token) skip the math.
    const bool warp_active = r0 + warp * 16 < rows;

    __syncthreads();  // the previous row tile is done with shared memory

    // Q tile: row r -> token r / rpt, head hbase + r % rpt; rows >= `rows` zero-filled.
    for (int c = tid; c < kBr * CPR; c += kThreads) {
      const int r = c / CPR, col = (c % CPR) * 8;
      const int rr = r0 + r;
      const bool ok = rr < rows;
      const T* src = q;
      if (ok) {
        const int64_t tok = qs + rr / rpt;
        const int h = hbase + rr % rpt;
        src = q + (tok * p.Hq + h) * D + col;
      }
      cp_async16(sQ + r * LDS + col, src, ok);
    }
    cp_async_commit();
    if (any) {
      load_kv(sK, kp, klo, khi, p.k_blk, p.k_tok, p.k_head);
      cp_async_commit();
      load_kv(sV, vp, klo, khi, p.v_blk, p.v_tok, p.v_head);
      cp_async_commit();
      cp_async_wait<2>();  // Q has landed (K, V may be in flight)
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    // This thread's two rows: warp*16 + g and warp*16 + g + 8 of the tile.
    int pos[2];
    for (int hr = 0; hr < 2; ++hr) pos[hr] = (r0 + warp * 16 + g + hr * 8) / rpt + off;

    uint32_t qf[D / 16][4];
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) ldsm_x4(qf[kc], addr_a(sQ, LDS, warp * 16, kc * 16, lane));

    float m[2] = {-INFINITY, -INFINITY};  // running max, log2 units
    float l[2] = {0.f, 0.f};              // running sum (this thread's columns only)
    float acc[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[dt][e] = 0.f;

    for (int n0 = klo; n0 < khi; n0 += kBc) {
      const bool has_next = n0 + kBc < khi;
      cp_async_wait<1>();  // K(n0) has landed; V(n0) may still be in flight
      __syncthreads();

      float s[kBc / 8][4];
#pragma unroll
      for (int nt = 0; nt < kBc / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll
      for (int kc = 0; kc < D / 16; ++kc) {
        if (!warp_active) break;
#pragma unroll
        for (int np = 0; np < kBc / 16; ++np) {
          uint32_t kb[4];
          ldsm_x4(kb, addr_b_nk(sK, LDS, np * 16, kc * 16, lane));
          mma16816<T>(s[2 * np], qf[kc], kb[0], kb[1]);
          mma16816<T>(s[2 * np + 1], qf[kc], kb[2], kb[3]);
        }
      }
      __syncthreads();  // every warp is done with sK
      if (has_next) {
        load_kv(sK, kp, n0 + kBc, khi, p.k_blk, p.k_tok, p.k_head);
        cp_async_commit();
      }

      // Scale into log2 units, then mask (after scaling, so -inf never meets a zero scale).
      const bool need_mask = (n0 + kBc > khi) || (p.causal && n0 + kBc - 1 > p_min) ||
                             (p.window >= 0 && n0 <= p_max - p.window);
#pragma unroll
      for (int nt = 0; nt < kBc / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = s[nt][e] * p.scale_log2;
          if (need_mask) {
            const int j = n0 + nt * 8 + 2 * tq + (e & 1);
            if (!(j < khi && visible(j, pos[e >> 1], p.causal, p.window))) x = -INFINITY;
          }
          s[nt][e] = x;
        }
      }

      // Online softmax; rows are shared by the 4 lanes of a quad.
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kBc / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * hr], s[nt][2 * hr + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[hr], mx);
        const float m_use = (m_new == -INFINITY) ? 0.f : m_new;  // no NaN from (-inf) - (-inf)
        const float alpha = exp2f(m[hr] - m_use);
        m[hr] = m_new;
        float rs = 0.f;
#pragma unroll
        for (int nt = 0; nt < kBc / 8; ++nt) {
          s[nt][2 * hr] = exp2f(s[nt][2 * hr] - m_use);
          s[nt][2 * hr + 1] = exp2f(s[nt][2 * hr + 1] - m_use);
          rs += s[nt][2 * hr] + s[nt][2 * hr + 1];
        }
        l[hr] = l[hr] * alpha + rs;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          acc[dt][2 * hr] *= alpha;
          acc[dt][2 * hr + 1] *= alpha;
        }
      }

      if (has_next) cp_async_wait<1>();  // V(n0) has landed (K(n0+kBc) may be in flight)
      else cp_async_wait<0>();
      __syncthreads();

      // acc += P V. The C fragments of S for keys 16kk..16kk+15 (n-tiles 2kk, 2kk+1) are the A
      // fragment of P for that k-chunk: a[0] = (g, 2t..) of tile 2kk, a[1] = (g+8, 2t..) of
      // tile 2kk, a[2] = (g, 2t..) of tile 2kk+1 (= cols 8+2t..), a[3] = (g+8, ..) of 2kk+1.
#pragma unroll
      for (int kk = 0; kk < kBc / 16; ++kk) {
        if (!warp_active) break;
        uint32_t a[4];
        a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
        a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
        a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t vb[4];
          ldsm_x4_t(vb, addr_b_kn(sV, LDS, kk * 16, dp * 16, lane));
          mma16816<T>(acc[2 * dp], a, vb[0], vb[1]);
          mma16816<T>(acc[2 * dp + 1], a, vb[2], vb[3]);
        }
      }
      __syncthreads();  // every warp is done with sV
      if (has_next) {
        load_kv(sV, vp, n0 + kBc, khi, p.v_blk, p.v_tok, p.v_head);
        cp_async_commit();
      }
    }

    // Epilogue: the quad's partial row sums, then normalise (sink folded in, final mode).
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float lsum = l[hr];
      lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
      lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
      const int r = r0 + warp * 16 + g + hr * 8;
      if (r >= rows) continue;
      const int64_t tok = qs + r / rpt;
      const int h = hbase + r % rpt;
      const int64_t row = tok * p.Hq + h;  // index into (Tq, Hq)
      const float mrow = m[hr];
      float lse2, sc;
      if (p.num_splits > 1) {
        // Partial: normalised within this split, no sink (the merge adds it).
        const bool empty = (mrow == -INFINITY);
        lse2 = empty ? -INFINITY : mrow + log2f(lsum);
        sc = empty ? 0.f : 1.f / lsum;
        float* dst = p.out_part + (static_cast<int64_t>(split) * p.Tq * p.Hq + row) * D;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          const int col = dt * 8 + 2 * tq;
          *reinterpret_cast<float2*>(dst + col) =
              make_float2(acc[dt][2 * hr] * sc, acc[dt][2 * hr + 1] * sc);
        }
        if (tq == 0) p.lse_part[static_cast<int64_t>(split) * p.Tq * p.Hq + row] = lse2 * kLn2;
      } else {
        const float sink2 = sinks ? sinks[h] * kLog2e : -INFINITY;
        const float M = fmaxf(mrow, sink2);
        if (M == -INFINITY) {  // no visible key and no sink
          lse2 = -INFINITY;
          sc = 0.f;
        } else {
          const float den = lsum * exp2f(mrow - M) + exp2f(sink2 - M);
          lse2 = M + log2f(den);
          sc = exp2f(mrow - lse2);  // 0 when the row saw no key
        }
        T* dst = static_cast<T*>(p.out) + row * D;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          const int col = dt * 8 + 2 * tq;
          *reinterpret_cast<uint32_t*>(dst + col) =
              pack2<T>(acc[dt][2 * hr] * sc, acc[dt][2 * hr + 1] * sc);
        }
        if (p.lse != nullptr && tq == 0) p.lse[static_cast<int64_t>(h) * p.Tq + tok] = lse2 * kLn2;
      }
    }
  }
}

// Combines the split partials of one (token, head) row per warp by log-sum-exp, with the sink.
template <typename T>
__global__ void __launch_bounds__(kThreads) attn_merge_kernel(const float* __restrict__ out_part,
                                                              const float* __restrict__ lse_part,
                                                              const float* __restrict__ sinks,
                                                              T* __restrict__ out, int Tq, int Hq,
                                                              int D, int splits) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t nrows = static_cast<int64_t>(Tq) * Hq;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + warp;
  if (row >= nrows) return;
  const int h = static_cast<int>(row % Hq);
  const float sink = sinks ? sinks[h] : -INFINITY;
  float M = sink;
  for (int s = 0; s < splits; ++s) M = fmaxf(M, lse_part[s * nrows + row]);
  T* dst = out + row * D;
  if (M == -INFINITY) {
    for (int d = lane; d < D; d += 32) dst[d] = from_float<T>(0.f);
    return;
  }
  float den = expf(sink - M);
  for (int s = 0; s < splits; ++s) den += expf(lse_part[s * nrows + row] - M);
  const float lse = M + logf(den);
  for (int d = lane; d < D; d += 32) {
    float o = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float ls = lse_part[s * nrows + row];
      if (ls != -INFINITY) o += expf(ls - lse) * out_part[(s * nrows + row) * D + d];
    }
    dst[d] = from_float<T>(o);
  }
}

// ------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------

// D_i = rowsum(dO_i * O_i) into dvec (Hq, Tq); dsinks[h] += -sum_i exp(sink_h - lse_i) D_i.
// Block = (64 tokens, one head); warp w handles tokens t0 + 16w .. t0 + 16w + 15.
template <typename T>
__global__ void __launch_bounds__(kThreads) attn_bwd_pre_kernel(
    const T* __restrict__ dout, const T* __restrict__ out, const float* __restrict__ lse,
    const float* __restrict__ sinks, float* __restrict__ dvec, float* __restrict__ dsinks, int Tq,
    int Hq, int D) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int h = blockIdx.y;
  const int t0 = blockIdx.x * 64 + warp * 16;
  float sink_part = 0.f;
  for (int k = 0; k < 16; ++k) {
    const int t = t0 + k;
    if (t >= Tq) break;  // warp-uniform
    const int64_t base = (static_cast<int64_t>(t) * Hq + h) * D;
    float s = 0.f;
    for (int d = lane; d < D; d += 32) s += to_float(dout[base + d]) * to_float(out[base + d]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) {
      dvec[static_cast<int64_t>(h) * Tq + t] = s;
      if (sinks) {
        const float l = lse[static_cast<int64_t>(h) * Tq + t];
        if (l != -INFINITY) sink_part -= expf(sinks[h] - l) * s;
      }
    }
  }
  if (sinks) {
    __shared__ float red[kThreads / 32];
    if (lane == 0) red[warp] = sink_part;
    __syncthreads();
    if (threadIdx.x == 0) {
      float tot = 0.f;
      for (int w = 0; w < kThreads / 32; ++w) tot += red[w];
      atomicAdd(dsinks + h, tot);
    }
  }
}

struct BwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* dout;
  const float* lse;   // (Hq, Tq)
  const float* dvec;  // (Hq, Tq)
  float* dq_acc;      // (Tq, Hq, D) fp32, zero-initialised; unscaled
  void* dk;           // (Tk, Hkv, D)
  void* dv;
  const int* cu_q;
  const int* cu_k;
  int Tq, Tk, Hq, Hkv, group, causal, window;
  float scale_log2, scale;
};

template <int D>
struct BwdCfg {
  static constexpr int Br = D >= 128 ? 32 : 64;  // query rows per step (register budget)
  static constexpr int LDS = D + 8;
  static constexpr int LDP = kBc + 8;            // dS tile row stride
  static constexpr int RG = Br / 16;             // dQ = dS K: warps as RG row groups x CG col groups
  static constexpr int CG = 4 / RG;
  static constexpr int DC = D / CG;              // dQ columns per warp
  static constexpr size_t smem_bytes(size_t elem) {
    return (2 * kBc * LDS + 2 * Br * LDS + Br * LDP) * elem + 2 * Br * sizeof(float);
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_bwd_kernel(const BwdParams p) {
  using Cfg = BwdCfg<D>;
  constexpr int Br = Cfg::Br, LDS = Cfg::LDS, LDP = Cfg::LDP, CPR = D / 8;
  static_assert(Cfg::RG * Cfg::CG == 4 && Cfg::DC % 16 == 0, "bad dQ warp layout");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBc * LDS;
  T* sQ = sV + kBc * LDS;
  T* sdO = sQ + Br * LDS;
  T* sdS = sdO + Br * LDS;  // [query][key]
  float* sLse = reinterpret_cast<float*>(sdS + Br * LDP);  // lse * log2(e)
  float* sDv = sLse + Br;

  const T* __restrict__ q = static_cast<const T*>(p.q);
  const T* __restrict__ kp = static_cast<const T*>(p.k);
  const T* __restrict__ vp = static_cast<const T*>(p.v);
  const T* __restrict__ dop = static_cast<const T*>(p.dout);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, tq = lane & 3;
  const int b = blockIdx.z, hkv = blockIdx.y;
  int qs, Lq, ks, Lk;
  seq_bounds(p.cu_q, b, p.Tq, qs, Lq);
  seq_bounds(p.cu_k, b, p.Tk, ks, Lk);
  const int off = Lk - Lq;
  const bool causal = p.causal != 0;
  const int window = p.window;

  for (int kb = blockIdx.x; kb * kBc < Lk; kb += gridDim.x) {
    const int j0 = kb * kBc, j1 = min(Lk, j0 + kBc);
    // Query rows that see at least one key of [j0, j1):
    //   causal: p = i + off >= j0;  window: p - window < j1 - 1, i.e. i < j1 - 1 + window - off.
    const int i_lo = causal ? max(0, j0 - off) : 0;
    int i_hi = Lq;
    if (window >= 0) {
      const int64_t lim = static_cast<int64_t>(j1) - 1 + window - off;
      i_hi = static_cast<int>(std::min<int64_t>(Lq, std::max<int64_t>(lim, 0)));
    }

    __syncthreads();  // the previous key block is done with shared memory
    for (int c = tid; c < kBc * CPR; c += kThreads) {
      const int r = c / CPR, col = (c % CPR) * 8;
      const int j = j0 + r;
      const bool ok = j < j1;
      const int64_t o = ok ? (static_cast<int64_t>(ks + j) * p.Hkv + hkv) * D + col : 0;
      cp_async16(sK + r * LDS + col, kp + o, ok);
      cp_async16(sV + r * LDS + col, vp + o, ok);
    }
    cp_async_commit();

    float dK[D / 8][4], dV[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dK[dt][e] = dV[dt][e] = 0.f;

    for (int hh = 0; hh < p.group; ++hh) {
      const int h = hkv * p.group + hh;
      for (int i0 = i_lo; i0 < i_hi; i0 += Br) {
        __syncthreads();  // the previous step is done with sQ / sdO / sdS / sLse / sDv
        for (int c = tid; c < Br * CPR; c += kThreads) {
          const int r = c / CPR, col = (c % CPR) * 8;
          const int i = i0 + r;
          const bool ok = i < i_hi;
          const int64_t o = ok ? (static_cast<int64_t>(qs + i) * p.Hq + h) * D + col : 0;
          cp_async16(sQ + r * LDS + col, q + o, ok);
          cp_async16(sdO + r * LDS + col, dop + o, ok);
        }
        cp_async_commit();
        for (int r = tid; r < Br; r += kThreads) {
          const int i = i0 + r;
          const bool ok = i < i_hi;
          const int64_t o = static_cast<int64_t>(h) * p.Tq + qs + i;
          sLse[r] = ok ? p.lse[o] * kLog2e : 0.f;
          sDv[r] = ok ? p.dvec[o] : 0.f;
        }
        cp_async_wait<0>();
        __syncthreads();

        const int last_i = min(i0 + Br, i_hi) - 1;
        const bool need_mask = (i0 + Br > i_hi) || (j0 + kBc > j1) ||
                               (causal && j1 - 1 > i0 + off) ||
                               (window >= 0 && j0 <= last_i + off - window);

        // S^T (16 keys of this warp x Br queries) = K Q^T.
        float sT[Br / 8][4];
#pragma unroll
        for (int nt = 0; nt < Br / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) sT[nt][e] = 0.f;
#pragma unroll
        for (int kc = 0; kc < D / 16; ++kc) {
          uint32_t ka[4];
          ldsm_x4(ka, addr_a(sK, LDS, warp * 16, kc * 16, lane));
#pragma unroll
          for (int np = 0; np < Br / 16; ++np) {
            uint32_t qb[4];
            ldsm_x4(qb, addr_b_nk(sQ, LDS, np * 16, kc * 16, lane));
            mma16816<T>(sT[2 * np], ka, qb[0], qb[1]);
            mma16816<T>(sT[2 * np + 1], ka, qb[2], qb[3]);
          }
        }
        // P^T: element (key jl = warp*16 + g + 8*(e>>1), query il = nt*8 + 2*tq + (e&1)).
#pragma unroll
        for (int nt = 0; nt < Br / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int il = nt * 8 + 2 * tq + (e & 1);
            float pv = exp2f(sT[nt][e] * p.scale_log2 - sLse[il]);
            if (need_mask) {
              const int i = i0 + il;
              const int j = j0 + warp * 16 + g + 8 * (e >> 1);
              if (!(i < i_hi && j < j1 && visible(j, i + off, causal, window))) pv = 0.f;
            }
            sT[nt][e] = pv;
          }
        }
        // dV += P^T dO  (A = P^T from the C fragments, as in the forward; B = dO stored [i][d]).
#pragma unroll
        for (int kk = 0; kk < Br / 16; ++kk) {
          uint32_t a[4];
          a[0] = pack2<T>(sT[2 * kk][0], sT[2 * kk][1]);
          a[1] = pack2<T>(sT[2 * kk][2], sT[2 * kk][3]);
          a[2] = pack2<T>(sT[2 * kk + 1][0], sT[2 * kk + 1][1]);
          a[3] = pack2<T>(sT[2 * kk + 1][2], sT[2 * kk + 1][3]);
#pragma unroll
          for (int dp = 0; dp < D / 16; ++dp) {
            uint32_t ob[4];
            ldsm_x4_t(ob, addr_b_kn(sdO, LDS, kk * 16, dp * 16, lane));
            mma16816<T>(dV[2 * dp], a, ob[0], ob[1]);
            mma16816<T>(dV[2 * dp + 1], a, ob[2], ob[3]);
          }
        }
        // dP^T = V dO^T, then dS^T = P^T * (dP^T - D_i), in place.
        float dsT[Br / 8][4];
#pragma unroll
        for (int nt = 0; nt < Br / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) dsT[nt][e] = 0.f;
#pragma unroll
        for (int kc = 0; kc < D / 16; ++kc) {
          uint32_t va[4];
          ldsm_x4(va, addr_a(sV, LDS, warp * 16, kc * 16, lane));
#pragma unroll
          for (int np = 0; np < Br / 16; ++np) {
            uint32_t ob[4];
            ldsm_x4(ob, addr_b_nk(sdO, LDS, np * 16, kc * 16, lane));
            mma16816<T>(dsT[2 * np], va, ob[0], ob[1]);
            mma16816<T>(dsT[2 * np + 1], va, ob[2], ob[3]);
          }
        }
#pragma unroll
        for (int nt = 0; nt < Br / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int il = nt * 8 + 2 * tq + (e & 1);
            dsT[nt][e] = sT[nt][e] * (dsT[nt][e] - sDv[il]);
          }
        // dK += dS^T Q  (scaled by softmax_scale at the end); B = Q stored [i][d].
#pragma unroll
        for (int kk = 0; kk < Br / 16; ++kk) {
          uint32_t a[4];
          a[0] = pack2<T>(dsT[2 * kk][0], dsT[2 * kk][1]);
          a[1] = pack2<T>(dsT[2 * kk][2], dsT[2 * kk][3]);
          a[2] = pack2<T>(dsT[2 * kk + 1][0], dsT[2 * kk + 1][1]);
          a[3] = pack2<T>(dsT[2 * kk + 1][2], dsT[2 * kk + 1][3]);
#pragma unroll
          for (int dp = 0; dp < D / 16; ++dp) {
            uint32_t qb[4];
            ldsm_x4_t(qb, addr_b_kn(sQ, LDS, kk * 16, dp * 16, lane));
            mma16816<T>(dK[2 * dp], a, qb[0], qb[1]);
            mma16816<T>(dK[2 * dp + 1], a, qb[2], qb[3]);
          }
        }
        // dS (queries as rows) to shared memory for dQ.
#pragma unroll
        for (int nt = 0; nt < Br / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int il = nt * 8 + 2 * tq + (e & 1);
            const int jl = warp * 16 + g + 8 * (e >> 1);
            sdS[il * LDP + jl] = from_float<T>(dsT[nt][e]);
          }
        __syncthreads();

        // dQ[i0.., h] += dS K: warp (rg, cg) does rows rg*16..+15, columns cg*DC..+DC-1.
        {
          const int rg = warp % Cfg::RG, cg = warp / Cfg::RG;
          float dq[Cfg::DC / 8][4];
#pragma unroll
          for (int dt = 0; dt < Cfg::DC / 8; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) dq[dt][e] = 0.f;
#pragma unroll
          for (int kk = 0; kk < kBc / 16; ++kk) {
            uint32_t a[4];
            ldsm_x4(a, addr_a(sdS, LDP, rg * 16, kk * 16, lane));
#pragma unroll
            for (int dp = 0; dp < Cfg::DC / 16; ++dp) {
              uint32_t kb2[4];
              ldsm_x4_t(kb2, addr_b_kn(sK, LDS, kk * 16, cg * Cfg::DC + dp * 16, lane));
              mma16816<T>(dq[2 * dp], a, kb2[0], kb2[1]);
              mma16816<T>(dq[2 * dp + 1], a, kb2[2], kb2[3]);
            }
          }
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            const int i = i0 + rg * 16 + g + hr * 8;
            if (i >= i_hi) continue;
            float* dst = p.dq_acc + (static_cast<int64_t>(qs + i) * p.Hq + h) * D + cg * Cfg::DC;
#pragma unroll
            for (int dt = 0; dt < Cfg::DC / 8; ++dt) {
              const int col = dt * 8 + 2 * tq;
              atomicAdd(dst + col, dq[dt][2 * hr]);
              atomicAdd(dst + col + 1, dq[dt][2 * hr + 1]);
            }
          }
        }
      }
    }
    cp_async_wait<0>();  // the K/V copies, in case no query step waited for them

    // dK, dV rows of this warp's keys.
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int j = j0 + warp * 16 + g + hr * 8;
      if (j >= j1) continue;
      const int64_t o = (static_cast<int64_t>(ks + j) * p.Hkv + hkv) * D;
      T* dkr = static_cast<T*>(p.dk) + o;
      T* dvr = static_cast<T*>(p.dv) + o;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        const int col = dt * 8 + 2 * tq;
        *reinterpret_cast<uint32_t*>(dkr + col) =
            pack2<T>(dK[dt][2 * hr] * p.scale, dK[dt][2 * hr + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(dvr + col) = pack2<T>(dV[dt][2 * hr], dV[dt][2 * hr + 1]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// Paged KV append
// ------------------------------------------------------------------------------------------

// One block per new token: find its sequence by binary search over cu_seqlens, then copy its
// Hkv*D keys and values to logical position cache_seqlens[b] + i through the block table.
// Out-of-range positions or block ids are skipped (the CPU op raises for them).
template <typename S>
__global__ void paged_append_kernel(S* __restrict__ kc, S* __restrict__ vc,
                                    const S* __restrict__ k, const S* __restrict__ v,
                                    const int* __restrict__ block_table,
                                    const int* __restrict__ cu, const int* __restrict__ cache_lens,
                                    int B, int max_blocks, int block_size, int num_blocks, int Hkv,
                                    int D, int64_t kc_blk, int64_t kc_tok, int64_t kc_head,
                                    int64_t kc_d, int64_t vc_blk, int64_t vc_tok, int64_t vc_head,
                                    int64_t vc_d) {
  const int t = blockIdx.x;
  // Smallest b with cu[b+1] > t.
  int lo = 0, hi = B;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (cu[mid + 1] > t) hi = mid;
    else lo = mid + 1;
  }
  const int b = lo;
  if (b >= B || cu[b] > t) return;
  const int64_t pos = static_cast<int64_t>(cache_lens[b]) + (t - cu[b]);
  if (pos < 0 || pos >= static_cast<int64_t>(max_blocks) * block_size) return;
  const int blk = block_table[static_cast<int64_t>(b) * max_blocks + pos / block_size];
  if (blk < 0 || blk >= num_blocks) return;
  const int64_t slot = pos % block_size;
  const int64_t src = static_cast<int64_t>(t) * Hkv * D;
  for (int e = threadIdx.x; e < Hkv * D; e += blockDim.x) {
    const int hh = e / D, d = e % D;
    kc[blk * kc_blk + slot * kc_tok + hh * kc_head + d * kc_d] = k[src + e];
    vc[blk * vc_blk + slot * vc_tok + hh * vc_head + d * vc_d] = v[src + e];
  }
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

// ---- varlen_attention ----

std::tuple<at::Tensor, at::Tensor> varlen_attention_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& cu_q_in, const at::Tensor& cu_k_in, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, int64_t window, const std::optional<at::Tensor>& sinks_in,
    double softmax_scale) {
  ossrl::cuda::require_kernel_image(q_in, "varlen_attention");
  const char* op = "varlen_attention";
  const AttnDims d = check_varlen(op, q_in, k_in, v_in, cu_q_in, cu_k_in, max_seqlen_q,
                                  max_seqlen_k, window);
  c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor sinks = prepare_sinks(sinks_in, q_in, d.Hq, op);
  at::Tensor out = at::zeros(q_in.sizes(), q_in.options());
  at::Tensor lse = at::full({d.Hq, d.Tq}, -std::numeric_limits<float>::infinity(),
                            q_in.options().dtype(at::kFloat));
  dispatch_attn(q_in.scalar_type(), d.D, op, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    if (d.Tq == 0 || d.B == 0 || d.Hq == 0) return;
    at::Tensor q = dense(q_in), k = dense(k_in), v = dense(v_in);
    at::Tensor cu_q = cu_q_in.contiguous(), cu_k = cu_k_in.contiguous();
    FwdParams p{};
    p.q = q.data_ptr();
    p.k = k.data_ptr();
    p.v = v.data_ptr();
    p.out = out.data_ptr();
    p.lse = lse.data_ptr<float>();
    p.cu_q = cu_q.data_ptr<int>();
    p.cu_k = cu_k.data_ptr<int>();
    p.sinks = sinks.defined() ? sinks.data_ptr<float>() : nullptr;
    p.k_tok = p.v_tok = d.Hkv * D;
    p.k_head = p.v_head = D;
    p.Tq = static_cast<int>(d.Tq);
    p.Tk = static_cast<int>(d.Tk);
    p.Hq = static_cast<int>(d.Hq);
    p.Hkv = static_cast<int>(d.Hkv);
    p.group = static_cast<int>(d.Hq / d.Hkv);
    p.rows_per_token = 1;
    p.causal = causal;
    p.window = clamp_window(window, d.Tk);
    p.num_splits = 1;
    const int64_t tiles = std::max<int64_t>(1, ceil_div(std::min<int64_t>(max_seqlen_q, d.Tq), kBr));
    p.row_tiles = static_cast<int>(tiles);
    p.scale_log2 = static_cast<float>(softmax_scale) * kLog2e;
    const size_t smem = (kBr + 2 * kBc) * (D + 8) * sizeof(T);
    auto kernel = attn_fwd_kernel<T, D, false>;
    set_smem(kernel, smem);
    dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(d.Hq),
              static_cast<unsigned>(d.B));
    kernel<<<grid, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

// ---- varlen_attention_backward ----

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const at::Tensor& cu_q_in, const at::Tensor& cu_k_in, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, int64_t window, const std::optional<at::Tensor>& sinks_in,
    double softmax_scale) {
  ossrl::cuda::require_kernel_image(grad_out, "varlen_attention_backward");
  const char* op = "varlen_attention_backward";
  const AttnDims d = check_varlen(op, q_in, k_in, v_in, cu_q_in, cu_k_in, max_seqlen_q,
                                  max_seqlen_k, window);
  OSSRL_CHECK(grad_out.sizes() == q_in.sizes(), op, "grad_out must have q's shape ", q_in.sizes(),
              ", got ", grad_out.sizes());
  OSSRL_CHECK(out_in.sizes() == q_in.sizes(), op, "out must have q's shape ", q_in.sizes(),
              ", got ", out_in.sizes());
  check_same_dtype(grad_out, q_in, op, "grad_out", "q");
  check_same_dtype(out_in, q_in, op, "out", "q");
  check_same_device(grad_out, q_in, op, "grad_out", "q");
  check_same_device(out_in, q_in, op, "out", "q");
  check_dim(lse_in, 2, op, "lse");
  OSSRL_CHECK(lse_in.scalar_type() == at::kFloat, op, "lse must be float32, got ",
              lse_in.scalar_type());
  OSSRL_CHECK(lse_in.size(0) == d.Hq && lse_in.size(1) == d.Tq, op, "lse must have shape (",
              d.Hq, ", ", d.Tq, "), got ", lse_in.sizes());
  check_same_device(lse_in, q_in, op, "lse", "q");
  c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor sinks = prepare_sinks(sinks_in, q_in, d.Hq, op);

  at::Tensor dk = at::zeros(k_in.sizes(), k_in.options());
  at::Tensor dv = at::zeros(v_in.sizes(), v_in.options());
  at::Tensor dsinks = sinks.defined() ? at::zeros({d.Hq}, q_in.options().dtype(at::kFloat))
                                      : at::empty({0}, q_in.options().dtype(at::kFloat));
  at::Tensor dq;
  dispatch_attn(q_in.scalar_type(), d.D, op, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    if (d.Tq == 0 || d.B == 0 || d.Hq == 0) {
      dq = at::zeros(q_in.sizes(), q_in.options());
      return;
    }
    auto stream = at::cuda::getCurrentCUDAStream();
    at::Tensor q = dense(q_in), k = dense(k_in), v = dense(v_in);
    at::Tensor dout = grad_out.contiguous(), out = out_in.contiguous();
    at::Tensor dO = dense(dout);
    at::Tensor lse = lse_in.contiguous();
    at::Tensor cu_q = cu_q_in.contiguous(), cu_k = cu_k_in.contiguous();
    at::Tensor dvec = at::empty({d.Hq, d.Tq}, q_in.options().dtype(at::kFloat));
    at::Tensor dq_acc = at::zeros({d.Tq, d.Hq, D}, q_in.options().dtype(at::kFloat));

    {
      dim3 grid(static_cast<unsigned>(ceil_div(d.Tq, 64)), static_cast<unsigned>(d.Hq));
      attn_bwd_pre_kernel<T><<<grid, kThreads, 0, stream>>>(
          static_cast<const T*>(dO.data_ptr()), static_cast<const T*>(out.data_ptr()),
          lse.data_ptr<float>(), sinks.defined() ? sinks.data_ptr<float>() : nullptr,
          dvec.data_ptr<float>(), sinks.defined() ? dsinks.data_ptr<float>() : nullptr,
          static_cast<int>(d.Tq), static_cast<int>(d.Hq), D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (d.Tk > 0) {
      BwdParams p{};
      p.q = q.data_ptr();
      p.k = k.data_ptr();
      p.v = v.data_ptr();
      p.dout = dO.data_ptr();
      p.lse = lse.data_ptr<float>();
      p.dvec = dvec.data_ptr<float>();
      p.dq_acc = dq_acc.data_ptr<float>();
      p.dk = dk.data_ptr();
      p.dv = dv.data_ptr();
      p.cu_q = cu_q.data_ptr<int>();
      p.cu_k = cu_k.data_ptr<int>();
      p.Tq = static_cast<int>(d.Tq);
      p.Tk = static_cast<int>(d.Tk);
      p.Hq = static_cast<int>(d.Hq);
      p.Hkv = static_cast<int>(d.Hkv);
      p.group = static_cast<int>(d.Hq / d.Hkv);
      p.causal = causal;
      p.window = clamp_window(window, d.Tk);
      p.scale = static_cast<float>(softmax_scale);
      p.scale_log2 = static_cast<float>(softmax_scale) * kLog2e;
      const size_t smem = BwdCfg<D>::smem_bytes(sizeof(T));
      auto kernel = attn_bwd_kernel<T, D>;
      set_smem(kernel, smem);
      const int64_t tiles =
          std::max<int64_t>(1, ceil_div(std::min<int64_t>(max_seqlen_k, d.Tk), kBc));
      dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(d.Hkv),
                static_cast<unsigned>(d.B));
      kernel<<<grid, kThreads, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    dq = dq_acc.mul_(softmax_scale).to(q_in.scalar_type());
  });
  return {dq, dk, dv, dsinks};
}

// ---- paged KV cache ----

struct PagedDims {
  int64_t num_blocks, block_size, Hkv, D, B, max_blocks;
};

PagedDims check_cache(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& block_table, const at::Tensor& ref, const char* ref_name) {
  check_dim(k_cache, 4, op, "k_cache");
  check_float(k_cache, op, "k_cache");
  OSSRL_CHECK(v_cache.sizes() == k_cache.sizes(), op, "v_cache has shape ", v_cache.sizes(),
              " but k_cache has shape ", k_cache.sizes());
  check_same_dtype(v_cache, k_cache, op, "v_cache", "k_cache");
  check_same_device(k_cache, ref, op, "k_cache", ref_name);
  check_same_device(v_cache, k_cache, op, "v_cache", "k_cache");
  check_int32(block_table, op, "block_table");
  check_dim(block_table, 2, op, "block_table");
  check_same_device(block_table, k_cache, op, "block_table", "k_cache");
  PagedDims d{k_cache.size(0), k_cache.size(1), k_cache.size(2), k_cache.size(3),
              block_table.size(0), block_table.size(1)};
  OSSRL_CHECK(d.block_size > 0, op, "k_cache block_size (dim 1) must be > 0");
  OSSRL_CHECK(d.num_blocks < (int64_t(1) << 31), op, "too many cache blocks");
  OSSRL_CHECK(d.B <= 65535, op, "at most 65535 sequences per call on CUDA, got ", d.B);
  return d;
}

void paged_kv_append_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& k_in, const at::Tensor& v_in,
                          const at::Tensor& block_table_in, const at::Tensor& cu_in,
                          const at::Tensor& cache_seqlens_in) {
  ossrl::cuda::require_kernel_image(k_cache, "paged_kv_append");
  const char* op = "paged_kv_append";
  check_dim(k_in, 3, op, "k");
  check_dim(v_in, 3, op, "v");
  OSSRL_CHECK(k_cache.is_cuda(), op, "k_cache must be a CUDA tensor here, got ",
              k_cache.device());
  const PagedDims d = check_cache(op, k_cache, v_cache, block_table_in, k_cache, "k_cache");
  // Cheap (no host sync), as on the CPU: every write needs memory of its own. Two sequences
  // appending into one block are not checked here (that needs the block table on the host).
  for (auto [c, name] : {std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"}})
    OSSRL_CHECK(at::has_internal_overlap(*c) != at::MemOverlap::Yes, op, name,
                " has elements that share memory (a stride of 0?): appends into it would overwrite each other");
  const auto kv = at::get_overlap_status(k_cache, v_cache);
  OSSRL_CHECK(kv != at::MemOverlapStatus::Full && kv != at::MemOverlapStatus::Partial, op,
              "k_cache and v_cache share memory: they must be two separate caches");
  check_same_dtype(k_in, k_cache, op, "k", "k_cache");
  check_same_dtype(v_in, k_cache, op, "v", "k_cache");
  check_same_device(k_in, k_cache, op, "k", "k_cache");
  check_same_device(v_in, k_cache, op, "v", "k_cache");
  OSSRL_CHECK(v_in.sizes() == k_in.sizes(), op, "v has shape ", v_in.sizes(), " but k has shape ",
              k_in.sizes());
  OSSRL_CHECK(k_in.size(1) == d.Hkv && k_in.size(2) == d.D, op, "k must have shape (T, ", d.Hkv,
              ", ", d.D, ") to match the cache, got ", k_in.sizes());
  check_cu(cu_in, k_in.size(0), k_cache, op, "cu_seqlens", "the number of new tokens k.shape[0]",
           "k_cache");
  OSSRL_CHECK(cu_in.size(0) == d.B + 1, op, "cu_seqlens must have B+1 = ", d.B + 1,
              " entries (B = block_table.shape[0]), got ", cu_in.size(0));
  check_int32(cache_seqlens_in, op, "cache_seqlens");
  check_dim(cache_seqlens_in, 1, op, "cache_seqlens");
  check_same_device(cache_seqlens_in, k_cache, op, "cache_seqlens", "k_cache");
  check_size(cache_seqlens_in, 0, d.B, op, "cache_seqlens", "the number of sequences");
  const int64_t Tn = k_in.size(0);
  OSSRL_CHECK(Tn < (int64_t(1) << 31) - 1, op, "too many new tokens");
  if (Tn == 0 || d.B == 0 || d.Hkv * d.D == 0 || d.num_blocks == 0 || d.max_blocks == 0) return;
  c10::cuda::CUDAGuard guard(k_cache.device());
  at::Tensor k = k_in.contiguous(), v = v_in.contiguous();
  at::Tensor bt = block_table_in.contiguous(), cu = cu_in.contiguous(),
             cl = cache_seqlens_in.contiguous();
  const int threads = static_cast<int>(std::min<int64_t>(256, ceil_div(d.Hkv * d.D, 32) * 32));
  auto launch = [&](auto zero) {
    using S = decltype(zero);
    paged_append_kernel<S><<<static_cast<unsigned>(Tn), threads, 0,
                             at::cuda::getCurrentCUDAStream()>>>(
        static_cast<S*>(k_cache.data_ptr()), static_cast<S*>(v_cache.data_ptr()),
        static_cast<const S*>(k.data_ptr()), static_cast<const S*>(v.data_ptr()),
        bt.data_ptr<int>(), cu.data_ptr<int>(), cl.data_ptr<int>(), static_cast<int>(d.B),
        static_cast<int>(d.max_blocks), static_cast<int>(d.block_size),
        static_cast<int>(d.num_blocks), static_cast<int>(d.Hkv), static_cast<int>(d.D),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  // A bitwise copy: the dtypes are equal.
  if (k_cache.element_size() == 2) launch(uint16_t{});
  else if (k_cache.element_size() == 4) launch(uint32_t{});
  else launch(uint64_t{});
}

// Whether the forward kernel can read a K/V cache in place: unit stride in the head dim, 16-byte
// aligned rows.
bool cache_readable(const at::Tensor& c) {
  const int64_t es = c.element_size();
  return c.stride(3) == 1 && (c.stride(0) * es) % 16 == 0 && (c.stride(1) * es) % 16 == 0 &&
         (c.stride(2) * es) % 16 == 0 && reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0;
}

// A cache it cannot: only the blocks the table names are copied (B x max_blocks of them, in table
// order, not the whole cache), and the table becomes their positions. Entries past a sequence's
// length are never read; clamped, they copy some block harmlessly. No host synchronisation.
void gather_cache_blocks(at::Tensor& kc, at::Tensor& vc, at::Tensor& bt, int64_t num_blocks) {
  const at::Tensor idx = bt.to(at::kLong).flatten().clamp(0, num_blocks - 1);
  kc = kc.index_select(0, idx).contiguous();
  vc = vc.index_select(0, idx).contiguous();
  bt = at::arange(idx.numel(), bt.options()).view(bt.sizes());
}

at::Tensor paged_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_cache_in,
                                const at::Tensor& v_cache_in, const at::Tensor& block_table_in,
                                const at::Tensor& cu_q_in, const at::Tensor& seq_lens_in,
                                int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
                                int64_t window, const std::optional<at::Tensor>& sinks_in,
                                double softmax_scale) {
  ossrl::cuda::require_kernel_image(q_in, "paged_attention");
  const char* op = "paged_attention";
  check_dim(q_in, 3, op, "q");
  check_float(q_in, op, "q");
  OSSRL_CHECK(q_in.is_cuda(), op, "q must be a CUDA tensor here, got ", q_in.device());
  const PagedDims d = check_cache(op, k_cache_in, v_cache_in, block_table_in, q_in, "q");
  check_same_dtype(k_cache_in, q_in, op, "k_cache", "q");
  const int64_t Tq = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2);
  OSSRL_CHECK(D == d.D, op, "q has head dim ", D, " but the cache has ", d.D);
  OSSRL_CHECK(d.Hkv > 0 && Hq % d.Hkv == 0, op, "the number of query heads (", Hq,
              ") must be a multiple of the number of cached key/value heads (", d.Hkv, ")");
  check_window(window, op);
  check_cu(cu_q_in, Tq, q_in, op, "cu_seqlens_q", "the number of query tokens q.shape[0]", "q");
  OSSRL_CHECK(cu_q_in.size(0) == d.B + 1, op, "cu_seqlens_q must have B+1 = ", d.B + 1,
              " entries (B = block_table.shape[0]), got ", cu_q_in.size(0));
  check_int32(seq_lens_in, op, "seq_lens");
  check_dim(seq_lens_in, 1, op, "seq_lens");
  check_same_device(seq_lens_in, q_in, op, "seq_lens", "q");
  check_size(seq_lens_in, 0, d.B, op, "seq_lens", "the number of sequences");
  OSSRL_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, op,
              "max_seqlen_q and max_seqlen_k must be >= 0");
  const int64_t G = Hq / std::max<int64_t>(d.Hkv, 1);
  OSSRL_CHECK(Tq * std::max<int64_t>(G, 1) < kMaxTokens, op,
              "at most 2^30 (query token, head) rows per GQA group are supported");
  c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor sinks = prepare_sinks(sinks_in, q_in, Hq, op);
  at::Tensor out = at::zeros(q_in.sizes(), q_in.options());
  dispatch_attn(q_in.scalar_type(), D, op, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int DD = decltype(dim)::value;
    if (Tq == 0 || d.B == 0 || Hq == 0 || d.num_blocks == 0 || d.max_blocks == 0) return;
    auto stream = at::cuda::getCurrentCUDAStream();
    at::Tensor q = dense(q_in);
    at::Tensor kc = k_cache_in, vc = v_cache_in;
    at::Tensor bt = block_table_in.contiguous(), cu_q = cu_q_in.contiguous(),
               sl = seq_lens_in.contiguous();
    if (!cache_readable(kc) || !cache_readable(vc)) gather_cache_blocks(kc, vc, bt, d.num_blocks);
    const int64_t max_keys =
        std::min<int64_t>(d.max_blocks * d.block_size, static_cast<int64_t>(kMaxTokens));
    const int64_t mk = std::min<int64_t>(max_seqlen_k, max_keys);
    const int64_t mq = std::min<int64_t>(max_seqlen_q, Tq);
    const int64_t row_tiles = std::max<int64_t>(1, ceil_div(mq * G, kBr));
    // Split-K: enough blocks for about two waves, at least 4 key tiles per split. The keys a
    // row tile sees are at most max_seqlen_k, and with causal + window at most about
    // window + max_seqlen_q. (Only the grid depends on this estimate, never the result.)
    int64_t span = mk;
    if (causal && window > 0) span = std::min<int64_t>(span, window + mq);
    const int64_t base_blocks = d.B * d.Hkv * row_tiles;
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    int64_t splits = 1;
    if (base_blocks < 2 * sms) {
      splits = std::min<int64_t>({ceil_div(2 * sms, base_blocks),
                                  std::max<int64_t>(1, ceil_div(span, 4 * kBc)), 64});
    }

    FwdParams p{};
    p.q = q.data_ptr();
    p.k = kc.data_ptr();
    p.v = vc.data_ptr();
    p.out = out.data_ptr();
    p.lse = nullptr;
    p.cu_q = cu_q.data_ptr<int>();
    p.cu_k = nullptr;
    p.block_table = bt.data_ptr<int>();
    p.seq_lens = sl.data_ptr<int>();
    p.sinks = sinks.defined() ? sinks.data_ptr<float>() : nullptr;
    p.k_blk = kc.stride(0);
    p.k_tok = kc.stride(1);
    p.k_head = kc.stride(2);
    p.v_blk = vc.stride(0);
    p.v_tok = vc.stride(1);
    p.v_head = vc.stride(2);
    p.Tq = static_cast<int>(Tq);
    p.Tk = 0;
    p.Hq = static_cast<int>(Hq);
    p.Hkv = static_cast<int>(d.Hkv);
    p.group = static_cast<int>(G);
    p.rows_per_token = static_cast<int>(G);
    p.max_blocks = static_cast<int>(d.max_blocks);
    p.block_size = static_cast<int>(d.block_size);
    p.num_cache_blocks = static_cast<int>(kc.size(0));  // the blocks gathered, if they were
    p.max_keys = static_cast<int>(max_keys);
    p.causal = causal;
    p.window = clamp_window(window, max_keys);
    p.num_splits = static_cast<int>(splits);
    p.row_tiles = static_cast<int>(row_tiles);
    p.scale_log2 = static_cast<float>(softmax_scale) * kLog2e;

    at::Tensor out_part, lse_part;
    if (splits > 1) {
      out_part = at::empty({splits, Tq, Hq, DD}, q_in.options().dtype(at::kFloat));
      lse_part = at::full({splits, Tq, Hq}, -std::numeric_limits<float>::infinity(),
                          q_in.options().dtype(at::kFloat));
      p.out_part = out_part.data_ptr<float>();
      p.lse_part = lse_part.data_ptr<float>();
    }
    const size_t smem = (kBr + 2 * kBc) * (DD + 8) * sizeof(T);
    auto kernel = attn_fwd_kernel<T, DD, true>;
    set_smem(kernel, smem);
    dim3 grid(static_cast<unsigned>(row_tiles * splits), static_cast<unsigned>(d.Hkv),
              static_cast<unsigned>(d.B));
    kernel<<<grid, kThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (splits > 1) {
      const int64_t rows = Tq * Hq;
      attn_merge_kernel<T><<<static_cast<unsigned>(ceil_div(rows, kThreads / 32)), kThreads, 0,
                             stream>>>(out_part.data_ptr<float>(), lse_part.data_ptr<float>(),
                                       p.sinks, static_cast<T*>(out.data_ptr()),
                                       static_cast<int>(Tq), static_cast<int>(Hq), DD,
                                       static_cast<int>(splits));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

}  // namespace
}  // namespace ossrl

TORCH_LIBRARY_IMPL(ossrl, CUDA, m) {
  m.impl("varlen_attention", &ossrl::varlen_attention_cuda);
  m.impl("varlen_attention_backward", &ossrl::varlen_attention_backward_cuda);
  m.impl("paged_kv_append", &ossrl::paged_kv_append_cuda);
  m.impl("paged_attention", &ossrl::paged_attention_cuda);
}
