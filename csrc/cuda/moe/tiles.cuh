// The MoE CUDA kernels' tile configuration, PTX wrappers (cp.async, ldmatrix, mma.sync), the GEMM
// building blocks (shared-memory tile loads, fragment loads, accumulator positions) and the expert
// schedule; moe/gemm.cuh builds the grouped GEMM kernels from them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include "ossrl/cuda_arch.h"
#include "ossrl/check.h"
#include "ossrl/moe_args.h"

namespace ossrl {
namespace {

// ---------------------------------------------------------------------------------------------
// Tile configuration

constexpr int kBM = 128;  // output rows per block (and rows per scheduling tile)
constexpr int kBN = 128;  // output columns per block
constexpr int kBK = 32;   // reduction step per pipeline stage
constexpr int kThreads = 256;
constexpr int kGroupM = 16;  // row-GEMM rasterisation: 16 row tiles sweep the column tiles
constexpr unsigned kFull = 0xffffffffu;

template <typename T>
struct Cfg {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte chunk
  static constexpr int kPad = kVec;                                // row padding (16 bytes)
  static constexpr int kStages = sizeof(T) == 2 ? 4 : 3;
};

// One operand's shared-memory tile for one stage. KMAJ: stored [MN][kBK] (reduction index
// contiguous); otherwise [kBK][MN].
template <typename T, bool KMAJ, int MN>
struct OpTile {
  static constexpr int kLd = KMAJ ? kBK + Cfg<T>::kPad : MN + Cfg<T>::kPad;
  static constexpr int kElems = KMAJ ? MN * kLd : kBK * kLd;
};

template <typename T, bool A_KMAJ, bool B_KMAJ>
constexpr size_t smem_bytes() {
  return static_cast<size_t>(Cfg<T>::kStages) *
         (OpTile<T, A_KMAJ, kBM>::kElems + OpTile<T, B_KMAJ, kBN>::kElems) * sizeof(T);
}

// ---------------------------------------------------------------------------------------------
// PTX wrappers

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = pred ? 16 : 0;  // 0: nothing is read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes)
               : "memory");
}
// BYTES (4 or 8) bytes, through L1: the pair path of load_tile (cp.async.cg takes only 16).
template <int BYTES>
__device__ __forceinline__ void cp_async_small(void* smem, const void* gmem, bool pred) {
  static_assert(BYTES == 4 || BYTES == 8, "cp.async.ca copies 4, 8 or 16 bytes");
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = pred ? BYTES : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(s), "l"(gmem), "n"(BYTES),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// D += A(16x16, row) * B(16x8, col), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(std::is_same_v<T, c10::Half>, "mma16816: bf16 or fp16");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// ---------------------------------------------------------------------------------------------
// GEMM building blocks

// Copies a ROWS x COLS tile into shared memory (row-major, leading dimension lds) from a
// row-major global matrix `src` with row stride `ld`: tile row i is global row src_row(i)
// (negative: no such row, zero-filled) and tile column j is global column col0 + j
// (zero-filled at or past col_end); src_row may also take (i, it), it being the thread's
// iteration (tile_row gives its i), for rows fetched ahead. width (copy_width on the host):
// kCopy16, 16-byte cp.async, when src is 16-byte aligned and ld, col_end (and col0) are
// multiples of kVec, so that a chunk is wholly inside or wholly outside the matrix; kCopyPair,
// cp.async of element pairs, when the same holds for pairs (even sizes, a pair-aligned src), so
// that shapes that are not multiples of 8 stay asynchronous; kCopyElem: element-wise checked
// loads (odd sizes).
enum CopyWidth : int { kCopyElem = 0, kCopyPair = 1, kCopy16 = 2 };

template <typename T, int COLS>
constexpr int load_tile_iters(int rows) {
  return rows * (COLS / Cfg<T>::kVec) / kThreads;
}
// The tile row that this thread's iteration `it` of load_tile<T, ROWS, COLS> copies.
template <typename T, int COLS>
__device__ __forceinline__ int tile_row(int it) {
  return (static_cast<int>(threadIdx.x) + it * kThreads) / (COLS / Cfg<T>::kVec);
}

template <typename T, int ROWS, int COLS, typename RowFn>
__device__ __forceinline__ void load_tile(T* s, int lds, const T* src, int64_t ld,
                                          const RowFn& src_row, int col0, int col_end, int width) {
  constexpr int V = Cfg<T>::kVec;
  constexpr int kChunksPerRow = COLS / V;
  static_assert(COLS % V == 0 && (ROWS * kChunksPerRow) % kThreads == 0, "tile shape");
  constexpr int kIters = ROWS * kChunksPerRow / kThreads;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int c = static_cast<int>(threadIdx.x) + it * kThreads;
    const int i = c / kChunksPerRow;
    const int j = (c % kChunksPerRow) * V;
    int64_t row;
    if constexpr (std::is_invocable_v<RowFn, int, int>)
      row = src_row(i, it);  // rows the caller fetched ahead, by this thread's iteration
    else
      row = src_row(i);
    const int col = col0 + j;
    T* dst = s + i * lds + j;
    if (width == kCopy16) {
      const bool ok = row >= 0 && col < col_end;
      cp_async16(dst, ok ? src + row * ld + col : src, ok);
    } else if (width == kCopyPair) {
#pragma unroll
      for (int q = 0; q < V; q += 2) {
        const bool ok = row >= 0 && col + q < col_end;  // col + q and col_end even: both or neither
        cp_async_small<2 * sizeof(T)>(dst + q, ok ? src + row * ld + col + q : src, ok);
      }
    } else {
#pragma unroll
      for (int q = 0; q < V; ++q)
        dst[q] = (row >= 0 && col + q < col_end) ? src[row * ld + col + q] : T(0.f);
    }
  }
}

// One pipeline stage of MMAs on the block tile: acc[mi][ni] is the 16x8 accumulator of the
// warp's m-subtile mi (rows wm + 16 mi ..) and n-subtile ni (columns wn + 8 ni ..), laid out as
// the mma.m16n8 C fragment: thread (g = lane/4, t = lane%4) holds rows g and g+8, columns 2t and
// 2t+1 (acc[..][0..1]: row g; acc[..][2..3]: row g+8).
template <typename T, bool A_KMAJ, bool B_KMAJ>
__device__ __forceinline__ void compute_stage(float (&acc)[4][4][4], const T* sA, const T* sB) {
  constexpr int LDA = OpTile<T, A_KMAJ, kBM>::kLd;
  constexpr int LDB = OpTile<T, B_KMAJ, kBN>::kLd;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
  if constexpr (std::is_same_v<T, float>) {
    // SIMT: the same accumulator positions as the mma fragments, so the epilogues are shared.
    const int g = lane >> 2, t = lane & 3;
#pragma unroll 4
    for (int kk = 0; kk < kBK; ++kk) {
      float av[4][2], bv[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int m = wm + mi * 16 + g + 8 * h;
          av[mi][h] = A_KMAJ ? sA[m * LDA + kk] : sA[kk * LDA + m];
        }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int n = wn + ni * 8 + 2 * t + j;
          bv[ni][j] = B_KMAJ ? sB[n * LDB + kk] : sB[kk * LDB + n];
        }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          acc[mi][ni][0] += av[mi][0] * bv[ni][0];
          acc[mi][ni][1] += av[mi][0] * bv[ni][1];
          acc[mi][ni][2] += av[mi][1] * bv[ni][0];
          acc[mi][ni][3] += av[mi][1] * bv[ni][1];
        }
    }
  } else {
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 16) {
      uint32_t af[4][4], bf[4][2];
      // ldmatrix.x4: lanes 8j..8j+7 give the row addresses of 8x8 matrix j; register j of every
      // lane receives matrix j (thread lane: row lane/4, columns 2(lane%4)+{0,1}; with .trans
      // the transposed element). A fragment registers: 0 = (rows 0-7, k 0-7), 1 = (rows 8-15,
      // k 0-7), 2 = (rows 0-7, k 8-15), 3 = (rows 8-15, k 8-15).
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const int m = wm + mi * 16;
        if constexpr (A_KMAJ) {  // stored [m][k]: matrix j at rows m + 8(j&1), cols k + 8(j>>1)
          ldmatrix_x4(af[mi], sA + (m + (lane & 15)) * LDA + ks + (lane >> 4) * 8);
        } else {  // stored [k][m]: matrix j at rows k + 8(j>>1), cols m + 8(j&1), transposed
          ldmatrix_x4_trans(af[mi],
                            sA + (ks + (lane >> 4) * 8 + (lane & 7)) * LDA + m + ((lane >> 3) & 1) * 8);
        }
      }
      // B fragments of two n8 subtiles per ldmatrix.x4: registers 0,1 = (k 0-7, k 8-15) of
      // columns n..n+7; registers 2,3 = the same for columns n+8..n+15.
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        const int n = wn + nj * 16;
        uint32_t r[4];
        if constexpr (B_KMAJ) {  // stored [n][k]: matrix j at rows n + 8(j>>1), cols k + 8(j&1)
          ldmatrix_x4(r, sB + (n + (lane >> 4) * 8 + (lane & 7)) * LDB + ks + ((lane >> 3) & 1) * 8);
        } else {  // stored [k][n]: matrix j at rows k + 8(j&1), cols n + 8(j>>1), transposed
          ldmatrix_x4_trans(r, sB + (ks + ((lane >> 3) & 1) * 8 + (lane & 7)) * LDB + n + (lane >> 4) * 8);
        }
        bf[2 * nj][0] = r[0];
        bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2];
        bf[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma16816<T>(acc[mi][ni], af[mi], bf[ni]);
    }
  }
}

// The multi-stage cp.async pipeline over `ktiles` reduction steps. load(sA, sB, kt) fills one
// stage with reduction step kt. Group accounting: one commit per prologue slot and per
// iteration (empty groups included), so at iteration kt wait_group<S-2> leaves at most S-2
// groups pending, i.e. step kt has landed. The stage refilled at iteration kt held step kt-1,
// which every thread finished computing before the __syncthreads just above.
template <typename T, bool A_KMAJ, bool B_KMAJ, typename LoadFn>
__device__ __forceinline__ void gemm_mainloop(float (&acc)[4][4][4], T* smem, int ktiles,
                                              const LoadFn& load) {
  constexpr int S = Cfg<T>::kStages;
  constexpr int SA = OpTile<T, A_KMAJ, kBM>::kElems;
  constexpr int SB = OpTile<T, B_KMAJ, kBN>::kElems;
  T* sA = smem;
  T* sB = smem + S * SA;
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < ktiles) load(sA + s * SA, sB + s * SB, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<S - 2>();
    __syncthreads();
    const int nk = kt + S - 1;
    if (nk < ktiles) load(sA + (nk % S) * SA, sB + (nk % S) * SB, nk);
    cp_async_commit();
    compute_stage<T, A_KMAJ, B_KMAJ>(acc, sA + (kt % S) * SA, sB + (kt % S) * SB);
  }
  cp_async_wait<0>();
  __syncthreads();
}

// Accumulator element positions inside the block tile (see compute_stage).
struct AccPos {
  int wm, wn, g, t;
  __device__ __forceinline__ AccPos() {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    wm = (warp >> 2) * 64;
    wn = (warp & 3) * 32;
    g = lane >> 2;
    t = lane & 3;
  }
  __device__ __forceinline__ int row(int mi, int h) const { return wm + mi * 16 + g + 8 * h; }
  __device__ __forceinline__ int col(int ni) const { return wn + ni * 8 + 2 * t; }
};

template <typename T>
struct alignas(2 * sizeof(T)) Pair {
  T x, y;
};

// Stores v0 at p[0] and, if `second`, v1 at p[1]; one 2-element store when `paired` (the
// caller guarantees p is then 2-element aligned).
template <typename T>
__device__ __forceinline__ void store2(T* p, float v0, float v1, bool second, bool paired) {
  if (second && paired) {
    *reinterpret_cast<Pair<T>*>(p) = Pair<T>{T(v0), T(v1)};
  } else {
    p[0] = T(v0);
    if (second) p[1] = T(v1);
  }
}

// ---------------------------------------------------------------------------------------------
// Expert schedule: sched[0..E] = clamped, non-decreasing row bounds (bounds[0] = 0,
// bounds[e+1] = end of expert e); sched[E+1 .. 2E+1] = first 128-row tile of each expert
// (tile_start[E] = number of real tiles).

__global__ void prepare_sched_kernel(const int32_t* __restrict__ offsets, int E, int rows,
                                     int32_t* __restrict__ sched) {
  __shared__ int32_t buf[kThreads];
  int prev = 0, tiles = 0;  // meaningful in thread 0 only
  if (threadIdx.x == 0) {
    sched[0] = 0;
    sched[E + 1] = 0;
  }
  for (int base = 0; base < E; base += kThreads) {
    const int n = min(kThreads, E - base);
    if (static_cast<int>(threadIdx.x) < n) buf[threadIdx.x] = offsets[base + threadIdx.x];
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int i = 0; i < n; ++i) {
        int o = buf[i];
        o = o < prev ? prev : o;  // non-decreasing (and >= 0, as prev starts at 0)
        o = o > rows ? rows : o;  // never past the rows that exist
        tiles += (o - prev + kBM - 1) / kBM;
        sched[base + i + 1] = o;
        sched[E + 1 + base + i + 1] = tiles;
        prev = o;
      }
    }
    __syncthreads();
  }
}

struct TileRows {
  int e, row0, rows;
};

// The expert and row range of scheduling tile `tile`; false when past the real tiles.
__device__ __forceinline__ bool find_tile(const int32_t* sched, int E, int tile, TileRows& tr) {
  const int32_t* bounds = sched;
  const int32_t* ts = sched + E + 1;
  if (tile >= ts[E]) return false;
  // Largest e with ts[e] <= tile: then ts[e+1] > tile, so tile belongs to expert e (experts
  // without tiles share their ts value with the next expert and are skipped).
  int lo = 0, hi = E - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (ts[mid] <= tile) lo = mid; else hi = mid - 1;
  }
  tr.e = lo;
  tr.row0 = bounds[lo] + (tile - ts[lo]) * kBM;
  tr.rows = min(kBM, bounds[lo + 1] - tr.row0);
  return true;
}

// The expert whose row range holds routed row r (r < bounds[E]).
__device__ __forceinline__ int expert_of_row(const int32_t* bounds, int E, int r) {
  int lo = 0, hi = E - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (bounds[mid] <= r) lo = mid; else hi = mid - 1;
  }
  return lo;
}

}  // namespace
}  // namespace ossrl
