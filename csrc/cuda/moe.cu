// CUDA kernels for grouped GEMM, top-k routing and the fused GPT-OSS expert block.
//
// Tiling, and why:
// * Every GEMM here is one templated tensor-core kernel: 128x128 output tile per block of 256
//   threads (8 warps as 2 x 4, a 64x32 tile per warp), K step 32, a 4-stage cp.async pipeline
//   (3 for fp32), mma.sync m16n8k16 with fp32 accumulation and ldmatrix fragment loads. That is
//   a well-trodden shape that reaches a good fraction of H100 bf16 peak without TMA/wgmma,
//   and every index in it can be checked by reading. fp32 inputs run the same kernel with the
//   same tiles and per-thread accumulator layout, but FMA instead of mma (no TF32 rounding:
//   fp32 results match the CPU kernels to fp32 rounding).
// * Shared-memory rows are padded by 16 bytes instead of swizzled: ldmatrix (8 rows of 16
//   bytes) and cp.async stay conflict-free and the addressing stays plain row * ld + col.
// * Every global load is bounds-checked per 16-byte chunk (cp.async with zero-fill) or, when a
//   matrix is not 16-byte aligned / a multiple of 8 columns, per element (scalar fallback),
//   so K, N and row counts need not be multiples of the tiles.
// * Grouped (per-expert row ranges) GEMM without host synchronisation: the offsets stay on
//   the device. A one-block kernel clamps them into [0, rows], makes them non-decreasing (max
//   scan) and counts each expert's 128-row tiles (`sched`). The GEMM grid is sized from host
//   bounds (sum_e ceil(n_e/128) <= (rows + E*127)/128 row tiles, times ceil(N/128)); each
//   block binary-searches its (expert, row tile) in sched and exits when past the real tiles.
//   The 1-D grid is rasterised in groups of 16 row tiles x all column tiles, so that a wave of
//   blocks re-reads activations and weights from L2 rather than HBM.
// * Operand A rows can be read through the routing order (token = order[r] / k): the gather
//   is part of the A tile load, no gathered copy of x is made. Epilogues are fused: bias,
//   the clamped SwiGLU (writes h and a), the routing weight with a scatter to flat
//   (token, slot) rows of an fp32 buffer, and the SwiGLU backward.
// * Combining the k slots of a token is a separate deterministic kernel (fixed slot order, no
//   atomics): slot rows live in an fp32 (T*k, H) buffer; an inverse permutation of `order`
//   tells which slots were written (rows past offsets[-1] are dropped), so the buffer needs no
//   clearing. Reductions over rows (bias gradients, the routing-weight gradient) also use
//   fixed-order partial sums: results are bitwise reproducible.
// * Weight gradients are variable-K grouped GEMMs (dw[e] = P_e^T Q_e over the expert's rows):
//   grid (M tiles x N tiles, E); experts without rows write zeros.
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
// (zero-filled at or past col_end). vec: 16-byte cp.async, which the host allows only when
// src is 16-byte aligned and ld, col_end (and col0) are multiples of kVec, so that a chunk is
// either wholly inside or wholly outside the matrix. Otherwise: element-wise checked loads.
template <typename T, int ROWS, int COLS, typename RowFn>
__device__ __forceinline__ void load_tile(T* s, int lds, const T* src, int64_t ld,
                                          const RowFn& src_row, int col0, int col_end, bool vec) {
  constexpr int V = Cfg<T>::kVec;
  constexpr int kChunksPerRow = COLS / V;
  static_assert(COLS % V == 0 && (ROWS * kChunksPerRow) % kThreads == 0, "tile shape");
  constexpr int kIters = ROWS * kChunksPerRow / kThreads;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int c = static_cast<int>(threadIdx.x) + it * kThreads;
    const int i = c / kChunksPerRow;
    const int j = (c % kChunksPerRow) * V;
    const int64_t row = src_row(i);
    const int col = col0 + j;
    T* dst = s + i * lds + j;
    if (vec) {
      const bool ok = row >= 0 && col < col_end;
      cp_async16(dst, ok ? src + row * ld + col : src, ok);
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

// ---------------------------------------------------------------------------------------------
// Row-grouped GEMM: out rows r of expert e = A[row(r)] @ B_e (+ epilogue).

enum Epi : int {
  kEpiStore = 0,      // out[r, n] = acc + bias[e, n]                          (T, ld ldo)
  kEpiSwiglu = 1,     // h[r, n] = acc + bias; a[r, n/2] = swiglu(gate, up)    (N = 2I)
  kEpiScatter = 2,    // y[f, n] = w_f * (acc + bias), f = order[r]            (fp32)
  kEpiSwigluBwd = 3,  // g = acc (N = I): dh, w_f * a, and <g, a> partial sums per row
};

struct RowGemm {
  const void* a;           // A (rows, K), row stride lda, unit column stride
  int64_t lda;
  const int32_t* order;    // routed flat indices (per row r), or null
  int a_gather;            // A row of r is order[r] / topk (else r)
  int topk, flat_total;    // flat indices are valid in [0, flat_total)
  const void* b;           // B_e = b + e * b_se; N-major: (K, N) row stride b_ld;
  int64_t b_se, b_ld;      // K-major: stored (N, K) row stride b_ld
  int M, N, K;             // rows of A/out (routed rows), columns, reduction
  const int32_t* sched;
  int E;
  int mtiles, ntiles;      // grid = mtiles (bound on row tiles) x ntiles (column tiles)
  int vec_a, vec_b;
  int epi;
  const void* bias;        // (E, N) contiguous, or null
  void* out;               // see Epi
  int64_t ldo;
  void* out2;              // kEpiSwiglu: a (M, N/2); kEpiSwigluBwd: w_f * a (M, N)
  const void* h;           // kEpiSwigluBwd: h (M, 2N)
  const float* wts;        // routing weights by flat index (kEpiScatter may pass null: 1)
  float* partial;          // kEpiSwigluBwd: (M, ntiles) fp32
  float alpha, limit;
};

__device__ __forceinline__ float swiglu_fwd(float gate, float up, float alpha, float limit) {
  const float g = gate > limit ? limit : gate;  // min(gate, limit), NaN propagates
  const float u = up > limit ? limit : (up < -limit ? -limit : up);
  const float sg = 1.f / (1.f + expf(-alpha * g));
  return (u + 1.f) * g * sg;
}

struct SwigluGrad {
  float a, dgate, dup;
};

// Gradients of a = (u + 1) * g * sigmoid(alpha g) at (gate, up) for upstream da; clamp masks
// follow torch.clamp (bounds inclusive).
__device__ __forceinline__ SwigluGrad swiglu_bwd(float gate, float up, float da, float alpha,
                                                 float limit) {
  const float g = gate > limit ? limit : gate;
  const float u = up > limit ? limit : (up < -limit ? -limit : up);
  const float sg = 1.f / (1.f + expf(-alpha * g));
  SwigluGrad r;
  r.a = (u + 1.f) * g * sg;
  r.dgate = gate <= limit ? da * (u + 1.f) * (sg + g * alpha * sg * (1.f - sg)) : 0.f;
  r.dup = (up >= -limit && up <= limit) ? da * g * sg : 0.f;
  return r;
}

// 2 blocks per SM for 16-bit types (<= 128 registers); fp32's SIMT path gets more registers.
template <typename T>
constexpr int kMinBlocks = sizeof(T) == 2 ? 2 : 1;

template <typename T, bool B_KMAJ>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>) row_gemm_kernel(const RowGemm p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int s_src[kBM];    // A row read by tile row i (-1: zero row)
  __shared__ int s_flat[kBM];   // flat index of tile row i (-1: none or invalid)
  __shared__ float s_red[4][kBM];

  // Grouped rasterisation of the 1-D grid: consecutive blocks take kGroupM row tiles times
  // every column tile, so the A rows and B columns a wave touches stay in L2.
  const int per_group = kGroupM * p.ntiles;
  const int group = static_cast<int>(blockIdx.x) / per_group;
  const int in_group = static_cast<int>(blockIdx.x) % per_group;
  const int first_m = group * kGroupM;
  const int group_m = min(kGroupM, p.mtiles - first_m);
  const int mtile = first_m + in_group % group_m;
  const int ntile = in_group / group_m;
  TileRows tr;
  if (!find_tile(p.sched, p.E, mtile, tr)) return;  // uniform over the block
  const int n0 = ntile * kBN;
  const int N = p.N, K = p.K;

  for (int i = threadIdx.x; i < kBM; i += kThreads) {
    int f = -1, src = -1;
    if (i < tr.rows) {
      const int r = tr.row0 + i;
      if (p.order) {
        const int v = p.order[r];
        if (v >= 0 && v < p.flat_total) f = v;
      }
      src = p.a_gather ? (f >= 0 ? f / p.topk : -1) : r;
    }
    s_src[i] = src;
    s_flat[i] = f;
  }
  __syncthreads();

  const T* A = static_cast<const T*>(p.a);
  const T* B = static_cast<const T*>(p.b) + static_cast<int64_t>(tr.e) * p.b_se;
  const int64_t lda = p.lda, b_ld = p.b_ld;
  const bool vec_a = p.vec_a, vec_b = p.vec_b;
  T* smem = reinterpret_cast<T*>(smem_raw);
  float acc[4][4][4];
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[mi][ni][q] = 0.f;

  const int ktiles = (K + kBK - 1) / kBK;
  gemm_mainloop<T, true, B_KMAJ>(acc, smem, ktiles, [&](T* sa, T* sb, int kt) {
    const int k0 = kt * kBK;
    load_tile<T, kBM, kBK>(
        sa, OpTile<T, true, kBM>::kLd, A, lda, [&](int i) -> int64_t { return s_src[i]; }, k0,
        K, vec_a);
    if constexpr (B_KMAJ) {
      load_tile<T, kBN, kBK>(
          sb, OpTile<T, true, kBN>::kLd, B, b_ld,
          [&](int i) -> int64_t { return n0 + i < N ? n0 + i : -1; }, k0, K, vec_b);
    } else {
      load_tile<T, kBK, kBN>(
          sb, OpTile<T, false, kBN>::kLd, B, b_ld,
          [&](int i) -> int64_t { return k0 + i < K ? k0 + i : -1; }, n0, N, vec_b);
    }
  });

  const AccPos pos;
  const int e = tr.e;
  const T* bias = p.bias ? static_cast<const T*>(p.bias) + static_cast<int64_t>(e) * N : nullptr;

  if (p.epi == kEpiStore) {
    T* out = static_cast<T*>(p.out);
    const bool paired = (p.ldo % 2) == 0;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          const int row = pos.row(mi, h), n = n0 + pos.col(ni);
          if (row >= tr.rows || n >= N) continue;
          const bool second = n + 1 < N;
          float v0 = acc[mi][ni][2 * h], v1 = acc[mi][ni][2 * h + 1];
          if (bias) {
            v0 += static_cast<float>(bias[n]);
            if (second) v1 += static_cast<float>(bias[n + 1]);
          }
          store2(out + static_cast<int64_t>(tr.row0 + row) * p.ldo + n, v0, v1, second, paired);
        }
  } else if (p.epi == kEpiSwiglu) {
    // N = 2I is even and n is even, so (n, n+1) = (gate_i, up_i) with i = n/2, both in range.
    T* hout = static_cast<T*>(p.out);
    T* aout = static_cast<T*>(p.out2);
    const int I = N / 2;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          const int row = pos.row(mi, h), n = n0 + pos.col(ni);
          if (row >= tr.rows || n >= N) continue;
          const int64_t r = tr.row0 + row;
          float gate = acc[mi][ni][2 * h], up = acc[mi][ni][2 * h + 1];
          if (bias) {
            gate += static_cast<float>(bias[n]);
            up += static_cast<float>(bias[n + 1]);
          }
          store2(hout + r * N + n, gate, up, true, true);
          aout[r * I + n / 2] = T(swiglu_fwd(gate, up, p.alpha, p.limit));
        }
  } else if (p.epi == kEpiScatter) {
    float* y = static_cast<float*>(p.out);  // (flat_total, N)
    const bool paired = (N % 2) == 0;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = pos.row(mi, h);
        if (row >= tr.rows) continue;
        const int f = s_flat[row];
        if (f < 0) continue;
        const float w = p.wts ? p.wts[f] : 1.f;
        float* yrow = y + static_cast<int64_t>(f) * N;
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          const int n = n0 + pos.col(ni);
          if (n >= N) continue;
          const bool second = n + 1 < N;
          float v0 = acc[mi][ni][2 * h], v1 = acc[mi][ni][2 * h + 1];
          if (bias) {
            v0 += static_cast<float>(bias[n]);
            if (second) v1 += static_cast<float>(bias[n + 1]);
          }
          v0 *= w;
          v1 *= w;
          if (second && paired) {
            *reinterpret_cast<float2*>(yrow + n) = make_float2(v0, v1);
          } else {
            yrow[n] = v0;
            if (second) yrow[n + 1] = v1;
          }
        }
      }
  } else {  // kEpiSwigluBwd: acc = g (columns i of I = N)
    const T* hin = static_cast<const T*>(p.h);
    T* dh = static_cast<T*>(p.out);
    T* aw = static_cast<T*>(p.out2);
    float rowdot[4][2];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        rowdot[mi][h] = 0.f;
        const int row = pos.row(mi, h);
        if (row >= tr.rows) continue;
        const int64_t r = tr.row0 + row;
        const int f = s_flat[row];
        const float w = f >= 0 ? p.wts[f] : 0.f;
        const T* hr = hin + r * 2 * N;
        T* dhr = dh + r * 2 * N;
        T* awr = aw + r * N;
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int i = n0 + pos.col(ni) + j;
            if (i >= N) continue;
            const float gr = acc[mi][ni][2 * h + j];
            const SwigluGrad s = swiglu_bwd(static_cast<float>(hr[2 * i]),
                                            static_cast<float>(hr[2 * i + 1]), w * gr, p.alpha,
                                            p.limit);
            rowdot[mi][h] += gr * s.a;
            dhr[2 * i] = T(s.dgate);
            dhr[2 * i + 1] = T(s.dup);
            awr[i] = T(w * s.a);
          }
        }
      }
    // Per-row sum over this block's columns, in a fixed order: the 4 lanes of a quad share a
    // row (butterfly), then the 4 warps along N (s_red), summed in warp order.
    const int lane = threadIdx.x & 31, warp_n = (threadIdx.x >> 5) & 3;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float v = rowdot[mi][h];
        v += __shfl_xor_sync(kFull, v, 1);
        v += __shfl_xor_sync(kFull, v, 2);
        if ((lane & 3) == 0) s_red[warp_n][pos.row(mi, h)] = v;
      }
    __syncthreads();
    for (int i = threadIdx.x; i < tr.rows; i += kThreads)
      p.partial[static_cast<int64_t>(tr.row0 + i) * p.ntiles + ntile] =
          ((s_red[0][i] + s_red[1][i]) + s_red[2][i]) + s_red[3][i];
  }
}

// ---------------------------------------------------------------------------------------------
// Variable-K grouped GEMM: out[e] (M, N) = sum over rows r of expert e of P[prow(r)]^T Q[qrow(r)].

struct VarKGemm {
  const void* p;  // P (rows, M), row stride ldp
  int64_t ldp;
  const void* q;  // Q (rows, N), row stride ldq
  int64_t ldq;
  int p_gather, q_gather;  // row r read as order[r] / topk (else r)
  const int32_t* order;
  int topk, flat_total;
  const int32_t* sched;
  int E, M, N, mtiles;
  int vec_p, vec_q;
  void* out;  // (E, M, N) contiguous
};

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>) vark_gemm_kernel(const VarKGemm p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int e = blockIdx.y;
  const int m0 = (blockIdx.x % p.mtiles) * kBM;
  const int n0 = (blockIdx.x / p.mtiles) * kBN;
  const int r0 = p.sched[e], r1 = p.sched[e + 1];  // r0 <= r1 (clamped max-scan)
  const int M = p.M, N = p.N;
  const T* P = static_cast<const T*>(p.p);
  const T* Q = static_cast<const T*>(p.q);
  const int64_t ldp = p.ldp, ldq = p.ldq;
  const bool p_gather = p.p_gather, q_gather = p.q_gather, vec_p = p.vec_p, vec_q = p.vec_q;
  const int32_t* order = p.order;
  const int topk = p.topk, flat_total = p.flat_total;
  auto map_row = [&](int r, bool gather) -> int64_t {
    if (r >= r1) return -1;
    if (!gather) return r;
    const int f = order[r];
    return (f >= 0 && f < flat_total) ? f / topk : -1;
  };

  T* smem = reinterpret_cast<T*>(smem_raw);
  float acc[4][4][4];
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[mi][ni][q] = 0.f;

  const int ktiles = (r1 - r0 + kBK - 1) / kBK;
  gemm_mainloop<T, false, false>(acc, smem, ktiles, [&](T* sa, T* sb, int kt) {
    const int rb = r0 + kt * kBK;
    load_tile<T, kBK, kBM>(
        sa, OpTile<T, false, kBM>::kLd, P, ldp,
        [&](int i) -> int64_t { return map_row(rb + i, p_gather); }, m0, M, vec_p);
    load_tile<T, kBK, kBN>(
        sb, OpTile<T, false, kBN>::kLd, Q, ldq,
        [&](int i) -> int64_t { return map_row(rb + i, q_gather); }, n0, N, vec_q);
  });

  const AccPos pos;
  T* out = static_cast<T*>(p.out) + static_cast<int64_t>(e) * M * N;
  const bool paired = (N % 2) == 0;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int m = m0 + pos.row(mi, h), n = n0 + pos.col(ni);
        if (m >= M || n >= N) continue;
        store2(out + static_cast<int64_t>(m) * N + n, acc[mi][ni][2 * h],
               acc[mi][ni][2 * h + 1], n + 1 < N, paired);
      }
}

// ---------------------------------------------------------------------------------------------
// Small kernels

// Grouped column sums (bias gradients), two deterministic passes. Pass 1: per scheduling tile
// (<= 128 rows of one expert), partial[tile, n] = sum over its rows of w(r) * src[row(r), n].
struct ColSum {
  const void* src;
  int64_t ld;
  int gather;            // row r read as order[r] / topk
  const int32_t* order;  // needed when gather or wts
  int topk, flat_total;
  const float* wts;      // row weight by flat index, or null
  const int32_t* sched;
  int E, N;
  float* partial;
};

template <typename T>
__global__ void colsum_partial_kernel(const ColSum p) {
  TileRows tr;
  if (!find_tile(p.sched, p.E, blockIdx.x, tr)) return;
  const int n = blockIdx.y * kThreads + threadIdx.x;
  if (n >= p.N) return;
  const T* src = static_cast<const T*>(p.src);
  float s = 0.f;
  for (int i = 0; i < tr.rows; ++i) {
    const int r = tr.row0 + i;
    int64_t row = r;
    float w = 1.f;
    if (p.gather || p.wts) {
      const int f = p.order[r];
      if (f < 0 || f >= p.flat_total) continue;
      if (p.gather) row = f / p.topk;
      if (p.wts) w = p.wts[f];
    }
    s += w * static_cast<float>(src[row * p.ld + n]);
  }
  p.partial[static_cast<int64_t>(blockIdx.x) * p.N + n] = s;
}

// Pass 2: out[e, n] = sum of the partials of expert e's tiles, in tile order (0 without rows).
template <typename T>
__global__ void colsum_reduce_kernel(const float* __restrict__ partial,
                                     const int32_t* __restrict__ sched, int E, int N,
                                     T* __restrict__ out) {
  const int e = blockIdx.y;
  const int n = blockIdx.x * kThreads + threadIdx.x;
  if (n >= N) return;
  const int32_t* ts = sched + E + 1;
  float s = 0.f;
  for (int b = ts[e]; b < ts[e + 1]; ++b) s += partial[static_cast<int64_t>(b) * N + n];
  out[static_cast<int64_t>(e) * N + n] = T(s);
}

// Zeroes rows [bounds[E], rows) of out (rows past offsets[-1]).
template <typename T>
__global__ void zero_tail_kernel(T* __restrict__ out, int64_t ld, int rows, int N,
                                 const int32_t* __restrict__ end_ptr) {
  const int end = *end_ptr;
  for (int r = end + blockIdx.x; r < rows; r += gridDim.x)
    for (int n = threadIdx.x; n < N; n += blockDim.x) out[static_cast<int64_t>(r) * ld + n] = T(0.f);
}

// inv[order[r]] = r for routed rows r < bounds[E] (inv pre-filled with -1). It is also the check
// the CPU kernels make on the host (there it would cost a synchronisation): an entry outside
// [0, T*k) or given twice (two rows would then race on one output row) is a device-side assert,
// as an out-of-range index is in torch's own CUDA indexing.
__global__ void build_inv_kernel(const int32_t* __restrict__ order, int rows,
                                 const int32_t* __restrict__ end_ptr, int flat_total,
                                 int32_t* __restrict__ inv) {
  const int r = blockIdx.x * kThreads + threadIdx.x;
  if (r >= rows || r >= *end_ptr) return;
  const int f = order[r];
  CUDA_KERNEL_ASSERT(f >= 0 && f < flat_total &&
                     "moe_experts: a routing.order entry is not a flat (token, slot) index in [0, T*k)");
  if (f < 0 || f >= flat_total) return;
  const int before = atomicCAS(inv + f, -1, r);
  CUDA_KERNEL_ASSERT(before == -1 && "moe_experts: a routing.order entry appears more than once");
}

// out[t, n] = sum over slots j (in order) of y[t*k + j, n], for the slots that were routed.
template <typename T>
__global__ void combine_kernel(const float* __restrict__ y, const int32_t* __restrict__ inv,
                               int topk, int N, T* __restrict__ out) {
  const int64_t t = blockIdx.x;
  for (int n = threadIdx.x; n < N; n += blockDim.x) {
    float s = 0.f;
    for (int j = 0; j < topk; ++j) {
      const int64_t f = t * topk + j;
      if (inv[f] >= 0) s += y[f * N + n];
    }
    out[t * N + n] = T(s);
  }
}

// dweights[f] = sum_j partial[r, j] + <grad_out[f / k], b_down[e]> for the routed row r of f
// (0 when f was not routed). One warp per flat index; fixed-order lane sums and butterfly.
template <typename T>
__global__ void dweights_kernel(const float* __restrict__ partial, int ntiles,
                                const int32_t* __restrict__ inv, const int32_t* __restrict__ sched,
                                int E, const T* __restrict__ grad_out,
                                const T* __restrict__ b_down, int topk, int H, int flat_total,
                                float* __restrict__ dw) {
  const int lane = threadIdx.x & 31;
  const int f = blockIdx.x * (kThreads / 32) + (threadIdx.x >> 5);
  if (f >= flat_total) return;  // whole warp
  const int r = inv[f];
  if (r < 0) {
    if (lane == 0) dw[f] = 0.f;
    return;
  }
  const int e = expert_of_row(sched, E, r);
  const T* go = grad_out + static_cast<int64_t>(f / topk) * H;
  const T* bd = b_down + static_cast<int64_t>(e) * H;
  float s = 0.f;
  for (int c = lane; c < H; c += 32) s += static_cast<float>(go[c]) * static_cast<float>(bd[c]);
  for (int j = lane; j < ntiles; j += 32) s += partial[static_cast<int64_t>(r) * ntiles + j];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(kFull, s, off);
  if (lane == 0) dw[f] = s;
}

// ---- routing ----

// Larger logit first, ties to the lower id, NaN above everything (ties among NaN: lower id):
// the CPU kernel's order, a strict total order on (value, id).
__device__ __forceinline__ bool ranks_before(float a, int ia, float b, int ib) {
  const bool na = isnan(a), nb = isnan(b);
  if (na || nb) return na && (!nb || ia < ib);
  if (a != b) return a > b;
  return ia < ib;
}

// One warp per token: k passes, each picking the best expert ranked after the previous pick;
// then the softmax over the k picked logits.
template <typename T>
__global__ void route_topk_kernel(const T* __restrict__ logits, int ntok, int E, int k,
                                  float* __restrict__ weights, int32_t* __restrict__ experts) {
  const int lane = threadIdx.x & 31;
  const int t = blockIdx.x * (kThreads / 32) + (threadIdx.x >> 5);
  if (t >= ntok) return;  // whole warp
  const T* row = logits + static_cast<int64_t>(t) * E;
  float* wrow = weights + static_cast<int64_t>(t) * k;
  int32_t* erow = experts + static_cast<int64_t>(t) * k;
  float pv = 0.f;
  int pe = -1;  // previous pick
  for (int p = 0; p < k; ++p) {
    float bv = 0.f;
    int be = -1;  // -1: none yet
    for (int e = lane; e < E; e += 32) {
      const float v = static_cast<float>(row[e]);
      if (pe >= 0 && !ranks_before(pv, pe, v, e)) continue;  // already picked
      if (be < 0 || ranks_before(v, e, bv, be)) {
        bv = v;
        be = e;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(kFull, bv, off);
      const int oe = __shfl_xor_sync(kFull, be, off);
      if (oe >= 0 && (be < 0 || ranks_before(ov, oe, bv, be))) {
        bv = ov;
        be = oe;
      }
    }
    // be >= 0: k <= E leaves at least one expert ranked after the previous pick.
    if (lane == 0) {
      erow[p] = be;
      wrow[p] = bv;
    }
    pv = bv;
    pe = be;
  }
  __syncwarp();
  const float top = wrow[0];
  float s = 0.f;
  for (int p = lane; p < k; p += 32) s += expf(wrow[p] - top);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(kFull, s, off);
  __syncwarp();
  for (int p = lane; p < k; p += 32) wrow[p] = expf(wrow[p] - top) / s;
}

// Routing replay: the experts are given (one row per token; the host checks shapes only, values
// would need a synchronisation: an id outside [0, E) is a device-side assert, then clamped); the weights are the softmax of the logits at
// those experts, in slot order. One thread per token: k is small (4 for GPT-OSS).
template <typename T>
__global__ void route_given_kernel(const T* __restrict__ logits, const int32_t* __restrict__ given, int ntok,
                                   int E, int k, float* __restrict__ weights, int32_t* __restrict__ experts) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= ntok) return;
  const T* row = logits + static_cast<int64_t>(t) * E;
  const int32_t* g = given + static_cast<int64_t>(t) * k;
  float* wrow = weights + static_cast<int64_t>(t) * k;
  int32_t* erow = experts + static_cast<int64_t>(t) * k;
  float top = -INFINITY;
  for (int p = 0; p < k; ++p) {
    CUDA_KERNEL_ASSERT(g[p] >= 0 && g[p] < E && "moe_route_given: an expert id is outside [0, num_experts)");
    for (int q = 0; q < p; ++q)
      CUDA_KERNEL_ASSERT(g[q] != g[p] && "moe_route_given: a token's expert appears twice");
    const int e = min(max(g[p], 0), E - 1);
    erow[p] = e;
    top = fmaxf(top, static_cast<float>(row[e]));
  }
  float s = 0.f;
  for (int p = 0; p < k; ++p) {
    const float v = expf(static_cast<float>(row[erow[p]]) - top);
    wrow[p] = v;
    s += v;
  }
  for (int p = 0; p < k; ++p) wrow[p] /= s;
}

// Stable counting sort of the flat (token, slot) indices by expert, in chunks of kRouteChunk
// flat indices: counts[e * nchunks + c] = occurrences of e in chunk c; then (one block) their
// exclusive prefix over chunks per expert and over experts; then each chunk writes its indices
// in order. Chunk order + in-chunk order = flat order, so the sort is stable.
constexpr int kRouteChunk = 1024;

__global__ void route_count_kernel(const int32_t* __restrict__ experts, int total, int E,
                                   int nchunks, int32_t* __restrict__ counts) {
  __shared__ int32_t s[kRouteChunk];
  const int c0 = blockIdx.x * kRouteChunk;
  const int n = min(kRouteChunk, total - c0);
  for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = experts[c0 + i];
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int c = 0;
    for (int i = 0; i < n; ++i) c += s[i] == e;
    counts[static_cast<int64_t>(e) * nchunks + blockIdx.x] = c;
  }
}

__device__ __forceinline__ int warp_inclusive_scan(int v, int lane) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int y = __shfl_up_sync(kFull, v, off);
    if (lane >= off) v += y;
  }
  return v;
}

// One block of 1024 threads. counts becomes the exclusive prefix within each expert; excl[e]
// = first position of expert e; offsets[e] = inclusive end.
__global__ void route_scan_kernel(int32_t* __restrict__ counts, int E, int nchunks,
                                  int32_t* __restrict__ totals, int32_t* __restrict__ excl,
                                  int32_t* __restrict__ offsets) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int e = warp; e < E; e += nwarps) {
    int32_t* ce = counts + static_cast<int64_t>(e) * nchunks;
    int running = 0;
    for (int c0 = 0; c0 < nchunks; c0 += 32) {
      const int c = c0 + lane;
      const int v = c < nchunks ? ce[c] : 0;
      const int incl = warp_inclusive_scan(v, lane);
      if (c < nchunks) ce[c] = running + incl - v;
      running += __shfl_sync(kFull, incl, 31);
    }
    if (lane == 0) totals[e] = running;
  }
  __syncthreads();  // totals (global) visible to the whole block
  if (warp == 0) {
    int running = 0;
    for (int e0 = 0; e0 < E; e0 += 32) {
      const int e = e0 + lane;
      const int v = e < E ? totals[e] : 0;
      const int incl = warp_inclusive_scan(v, lane);
      if (e < E) {
        excl[e] = running + incl - v;
        offsets[e] = running + incl;
      }
      running += __shfl_sync(kFull, incl, 31);
    }
  }
}

__global__ void route_scatter_kernel(const int32_t* __restrict__ experts, int total, int E,
                                     int nchunks, const int32_t* __restrict__ counts,
                                     const int32_t* __restrict__ excl,
                                     int32_t* __restrict__ order) {
  __shared__ int32_t s[kRouteChunk];
  const int c0 = blockIdx.x * kRouteChunk;
  const int n = min(kRouteChunk, total - c0);
  for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = experts[c0 + i];
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int pos = excl[e] + counts[static_cast<int64_t>(e) * nchunks + blockIdx.x];
    for (int i = 0; i < n; ++i)
      if (s[i] == e) order[pos++] = c0 + i;
  }
}

// ---------------------------------------------------------------------------------------------
// Host helpers

template <typename F>
void dispatch_float(at::ScalarType s, const char* op, const F& f) {
  switch (s) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: OSSRL_CHECK(false, op, "unsupported dtype ", s);
  }
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  OSSRL_CHECK(t.is_cuda(), op, name, " must be a CUDA tensor for the CUDA kernel, got ",
              t.device());
}

void check_int_range(int64_t v, const char* op, const char* what) {
  OSSRL_CHECK(v <= INT_MAX, op, what, " (", v, ") exceeds the CUDA kernels' 32-bit index range");
}

template <typename T>
bool vec_ok(const void* ptr, std::initializer_list<int64_t> multiples) {
  constexpr int V = Cfg<T>::kVec;
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  for (int64_t m : multiples)
    if (m % V != 0) return false;
  return true;
}

// The expert schedule of `offsets` over `rows` rows, and the number of scheduling tiles the
// grids must cover.
struct Sched {
  at::Tensor t;  // int32 (2E+2,)
  int64_t max_tiles;
  const int32_t* ptr() const { return t.data_ptr<int32_t>(); }
};

Sched make_sched(const at::Tensor& offsets, int64_t E, int64_t rows, cudaStream_t stream,
                 const char* op) {
  Sched s;
  s.t = at::empty({2 * E + 2}, offsets.options());
  // sum_e ceil(n_e / BM) <= floor((rows + E * (BM - 1)) / BM)
  s.max_tiles = (rows + E * (kBM - 1)) / kBM;
  check_int_range(s.max_tiles, op, "number of row tiles");
  prepare_sched_kernel<<<1, kThreads, 0, stream>>>(offsets.data_ptr<int32_t>(),
                                                   static_cast<int>(E), static_cast<int>(rows),
                                                   s.t.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return s;
}

// Raises a kernel's dynamic shared memory limit once per device (the first call, normally
// outside any CUDA graph capture); `done` is a per-kernel bit mask of devices.
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes, std::atomic<uint64_t>& done) {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const uint64_t bit = dev < 64 ? (uint64_t{1} << dev) : 0;
  if (bit && (done.load(std::memory_order_acquire) & bit)) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  done.fetch_or(bit, std::memory_order_release);
}

template <typename T, bool B_KMAJ>
void launch_row_gemm(RowGemm p, int64_t max_tiles, cudaStream_t stream) {
  if (max_tiles <= 0 || p.N <= 0 || p.M <= 0) return;
  const int64_t ntiles = (p.N + kBN - 1) / kBN;
  TORCH_CHECK(max_tiles * ntiles + kGroupM * ntiles <= INT_MAX,
              "ossrl: grouped GEMM too large for the CUDA kernel's grid");
  p.mtiles = static_cast<int>(max_tiles);
  p.ntiles = static_cast<int>(ntiles);
  constexpr size_t smem = smem_bytes<T, true, B_KMAJ>();
  auto kernel = row_gemm_kernel<T, B_KMAJ>;
  static std::atomic<uint64_t> smem_done{0};
  allow_smem(kernel, smem, smem_done);
  kernel<<<static_cast<unsigned>(max_tiles * ntiles), kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_vark_gemm(VarKGemm p, cudaStream_t stream) {
  if (p.E <= 0 || p.M <= 0 || p.N <= 0) return;
  const int64_t mt = (p.M + kBM - 1) / kBM, nt = (p.N + kBN - 1) / kBN;
  TORCH_CHECK(mt * nt <= INT_MAX && p.E <= 65535,
              "ossrl: weight gradient too large for the CUDA grouped GEMM grid");
  p.mtiles = static_cast<int>(mt);
  constexpr size_t smem = smem_bytes<T, false, false>();
  auto kernel = vark_gemm_kernel<T>;
  static std::atomic<uint64_t> smem_done{0};
  allow_smem(kernel, smem, smem_done);
  kernel<<<dim3(static_cast<unsigned>(mt * nt), static_cast<unsigned>(p.E)), kThreads, smem,
           stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out[e] = sum over expert e's rows of (weight *) src rows; out (E, N) of T.
template <typename T>
void launch_colsum(ColSum p, const Sched& s, at::Tensor& out, cudaStream_t stream) {
  const int64_t E = p.E, N = p.N;
  if (E == 0 || N == 0) return;
  TORCH_CHECK(E <= 65535, "ossrl: too many experts for the CUDA bias-gradient kernel");
  const int64_t nb = (N + kThreads - 1) / kThreads;
  at::Tensor partial = at::empty({std::max<int64_t>(s.max_tiles, 1), N},
                                 out.options().dtype(at::kFloat));
  p.partial = partial.data_ptr<float>();
  if (s.max_tiles > 0) {
    colsum_partial_kernel<T><<<dim3(static_cast<unsigned>(s.max_tiles), static_cast<unsigned>(nb)),
                               kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  colsum_reduce_kernel<T><<<dim3(static_cast<unsigned>(nb), static_cast<unsigned>(E)), kThreads,
                            0, stream>>>(p.partial, p.sched, p.E, p.N,
                                         static_cast<T*>(out.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_zero_tail(at::Tensor& out, const Sched& s, int64_t E, cudaStream_t stream) {
  const int64_t rows = out.size(0), N = out.size(1);
  if (rows == 0 || N == 0) return;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(rows, 1024));
  zero_tail_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<T*>(out.data_ptr()), N,
                                                     static_cast<int>(rows), static_cast<int>(N),
                                                     s.ptr() + E);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// inv (flat_total,) int32: the routed row of each flat index, -1 if none.
at::Tensor make_inv(const at::Tensor& order, const Sched& s, int64_t E, int64_t flat_total,
                    cudaStream_t stream) {
  at::Tensor inv = at::full({flat_total}, -1, order.options());
  const int64_t rows = order.size(0);
  if (rows > 0) {
    build_inv_kernel<<<static_cast<unsigned>((rows + kThreads - 1) / kThreads), kThreads, 0,
                       stream>>>(order.data_ptr<int32_t>(), static_cast<int>(rows), s.ptr() + E,
                                 static_cast<int>(flat_total), inv.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return inv;
}

template <typename T>
void launch_combine(const at::Tensor& y, const at::Tensor& inv, int64_t topk, at::Tensor& out,
                    cudaStream_t stream) {
  const int64_t T_ = out.size(0), N = out.size(1);
  if (T_ == 0 || N == 0) return;
  combine_kernel<T><<<static_cast<unsigned>(T_), kThreads, 0, stream>>>(
      y.data_ptr<float>(), inv.data_ptr<int32_t>(), static_cast<int>(topk), static_cast<int>(N),
      static_cast<T*>(out.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// grouped_gemm / grouped_gemm_dw

at::Tensor grouped_gemm_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets,
                             const std::optional<at::Tensor>& bias) {
  ossrl::cuda::require_kernel_image(x, "grouped_gemm");
  const char* op = "grouped_gemm";
  check_cuda(x, op, "x");
  check_grouped_gemm(x, w, offsets, bias, op);
  const int64_t T = x.size(0), K = x.size(1), E = w.size(0), N = w.size(2);
  check_int_range(T, op, "x.shape[0]");
  check_int_range(K, op, "x.shape[1]");
  check_int_range(N, op, "w.shape[2]");
  check_int_range(E, op, "w.shape[0]");

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({T, N}, x.options());
  if (T == 0 || N == 0) return out;
  if (E == 0) return out.zero_();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const at::Tensor xc = x.contiguous();
  const at::Tensor off = offsets.contiguous();
  // The backward passes w.transpose(1, 2): read that K-contiguous layout directly.
  const bool kmaj = !w.is_contiguous() && w.transpose(1, 2).is_contiguous();
  const at::Tensor wc = kmaj ? w : w.contiguous();
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  const Sched s = make_sched(off, E, T, stream, op);

  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using S = decltype(tag);
    RowGemm p{};
    p.a = xc.data_ptr();
    p.lda = K;
    p.b = wc.data_ptr();
    p.b_se = K * N;
    p.b_ld = kmaj ? K : N;
    p.M = static_cast<int>(T);
    p.N = static_cast<int>(N);
    p.K = static_cast<int>(K);
    p.sched = s.ptr();
    p.E = static_cast<int>(E);
    p.vec_a = vec_ok<S>(p.a, {K});
    p.vec_b = kmaj ? vec_ok<S>(p.b, {K * N, K}) : vec_ok<S>(p.b, {K * N, N});
    p.epi = kEpiStore;
    p.bias = bc.defined() ? bc.data_ptr() : nullptr;
    p.out = out.data_ptr();
    p.ldo = N;
    if (kmaj)
      launch_row_gemm<S, true>(p, s.max_tiles, stream);
    else
      launch_row_gemm<S, false>(p, s.max_tiles, stream);
    launch_zero_tail<S>(out, s, E, stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> grouped_gemm_dw_cuda(const at::Tensor& x, const at::Tensor& dy,
                                                        const at::Tensor& offsets,
                                                        bool bias_grad) {
  ossrl::cuda::require_kernel_image(x, "grouped_gemm_dw");
  const char* op = "grouped_gemm_dw";
  check_cuda(x, op, "x");
  const int64_t E = check_grouped_gemm_dw(x, dy, offsets, op);
  const int64_t T = x.size(0), K = x.size(1), N = dy.size(1);
  check_int_range(T, op, "x.shape[0]");
  check_int_range(K, op, "x.shape[1]");
  check_int_range(N, op, "dy.shape[1]");
  check_int_range(E, op, "offsets.shape[0]");

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dw = at::empty({E, K, N}, x.options());
  at::Tensor db = bias_grad ? at::empty({E, N}, x.options()) : at::empty({0}, x.options());
  if (E == 0) return {dw, db};
  if (T == 0) {
    dw.zero_();
    db.zero_();
    return {dw, db};
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor xc = x.contiguous(), dyc = dy.contiguous(), off = offsets.contiguous();
  const Sched s = make_sched(off, E, T, stream, op);

  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using S = decltype(tag);
    VarKGemm p{};
    p.p = xc.data_ptr();
    p.ldp = K;
    p.q = dyc.data_ptr();
    p.ldq = N;
    p.sched = s.ptr();
    p.E = static_cast<int>(E);
    p.M = static_cast<int>(K);
    p.N = static_cast<int>(N);
    p.vec_p = vec_ok<S>(p.p, {K});
    p.vec_q = vec_ok<S>(p.q, {N});
    p.out = dw.data_ptr();
    launch_vark_gemm<S>(p, stream);
    if (bias_grad) {
      ColSum c{};
      c.src = dyc.data_ptr();
      c.ld = N;
      c.sched = s.ptr();
      c.E = static_cast<int>(E);
      c.N = static_cast<int>(N);
      launch_colsum<S>(c, s, db, stream);
    }
  });
  return {dw, db};
}

// ---------------------------------------------------------------------------------------------
// Routing

void sort_by_expert_cuda(const at::Tensor& experts, int64_t E, at::Tensor& order, at::Tensor& offsets,
                         cudaStream_t stream, const char* op);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_cuda(
    const at::Tensor& router_logits, int64_t top_k) {
  ossrl::cuda::require_kernel_image(router_logits, "moe_route");
  const char* op = "moe_route";
  check_cuda(router_logits, op, "router_logits");
  check_dim(router_logits, 2, op, "router_logits");
  check_float(router_logits, op, "router_logits");
  const int64_t T = router_logits.size(0), E = router_logits.size(1);
  OSSRL_CHECK_VALUE(E > 0, op, "router_logits must have at least one expert column");
  OSSRL_CHECK_VALUE(top_k >= 1 && top_k <= E, op, "top_k must be in [1, E=", E, "], got ",
                    top_k);
  check_int_range(T * top_k, op, "T * top_k");
  check_int_range(E, op, "number of experts");

  const c10::cuda::CUDAGuard guard(router_logits.device());
  const auto iopts = router_logits.options().dtype(at::kInt);
  at::Tensor weights = at::empty({T, top_k}, router_logits.options().dtype(at::kFloat));
  at::Tensor experts = at::empty({T, top_k}, iopts);
  at::Tensor order = at::empty({T * top_k}, iopts);
  at::Tensor offsets = at::empty({E}, iopts);
  if (T == 0) return {weights, experts, order, offsets.zero_()};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor logits = router_logits.contiguous();

  dispatch_float(logits.scalar_type(), op, [&](auto tag) {
    using S = decltype(tag);
    const unsigned grid = static_cast<unsigned>((T + kThreads / 32 - 1) / (kThreads / 32));
    route_topk_kernel<S><<<grid, kThreads, 0, stream>>>(
        static_cast<const S*>(logits.data_ptr()), static_cast<int>(T), static_cast<int>(E),
        static_cast<int>(top_k), weights.data_ptr<float>(), experts.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  sort_by_expert_cuda(experts, E, order, offsets, stream, op);
  return {weights, experts, order, offsets};
}

// Stable sort of the flat (token, slot) indices by expert, on the device (count, scan, scatter).
void sort_by_expert_cuda(const at::Tensor& experts, int64_t E, at::Tensor& order, at::Tensor& offsets,
                         cudaStream_t stream, const char* op) {
  const auto iopts = experts.options();
  const int64_t total = experts.numel();
  const int64_t nchunks = (total + kRouteChunk - 1) / kRouteChunk;
  check_int_range(E * nchunks, op, "routing count table");
  at::Tensor counts = at::empty({E * nchunks}, iopts);
  at::Tensor totals = at::empty({E}, iopts), excl = at::empty({E}, iopts);
  route_count_kernel<<<static_cast<unsigned>(nchunks), kThreads, 0, stream>>>(
      experts.data_ptr<int32_t>(), static_cast<int>(total), static_cast<int>(E),
      static_cast<int>(nchunks), counts.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  route_scan_kernel<<<1, 1024, 0, stream>>>(counts.data_ptr<int32_t>(), static_cast<int>(E),
                                            static_cast<int>(nchunks), totals.data_ptr<int32_t>(),
                                            excl.data_ptr<int32_t>(), offsets.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  route_scatter_kernel<<<static_cast<unsigned>(nchunks), kThreads, 0, stream>>>(
      experts.data_ptr<int32_t>(), static_cast<int>(total), static_cast<int>(E),
      static_cast<int>(nchunks), counts.data_ptr<int32_t>(), excl.data_ptr<int32_t>(),
      order.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_given_cuda(
    const at::Tensor& router_logits, const at::Tensor& given) {
  ossrl::cuda::require_kernel_image(router_logits, "moe_route_given");
  const char* op = "moe_route_given";
  check_cuda(router_logits, op, "router_logits");
  check_dim(router_logits, 2, op, "router_logits");
  check_float(router_logits, op, "router_logits");
  check_dim(given, 2, op, "experts");
  OSSRL_CHECK(given.scalar_type() == at::kInt, op, "experts must be int32, got ", given.scalar_type());
  check_same_device(given, router_logits, op, "experts", "router_logits");
  const int64_t T = router_logits.size(0), E = router_logits.size(1), k = given.size(1);
  OSSRL_CHECK(given.size(0) == T, op, "experts must have one row per token (", T, "), got ", given.size(0));
  OSSRL_CHECK_VALUE(E > 0 && k >= 1 && k <= E, op, "experts must have 1 to E=", E, " slots, got ", k);
  check_int_range(T * k, op, "T * k");
  check_int_range(E, op, "number of experts");
  const c10::cuda::CUDAGuard guard(router_logits.device());
  const auto iopts = router_logits.options().dtype(at::kInt);
  at::Tensor weights = at::empty({T, k}, router_logits.options().dtype(at::kFloat));
  at::Tensor experts = at::empty({T, k}, iopts);
  at::Tensor order = at::empty({T * k}, iopts);
  at::Tensor offsets = at::empty({E}, iopts);
  if (T == 0) return {weights, experts, order, offsets.zero_()};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor logits = router_logits.contiguous(), g = given.contiguous();
  dispatch_float(logits.scalar_type(), op, [&](auto tag) {
    using S = decltype(tag);
    route_given_kernel<S><<<static_cast<unsigned>((T + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        static_cast<const S*>(logits.data_ptr()), g.data_ptr<int32_t>(), static_cast<int>(T), static_cast<int>(E),
        static_cast<int>(k), weights.data_ptr<float>(), experts.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  sort_by_expert_cuda(experts, E, order, offsets, stream, op);
  return {weights, experts, order, offsets};
}

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
  at::Tensor act = at::empty({R, I}, x.options());                 // swiglu(h), routed order
  at::Tensor slots = at::empty({R, H}, x.options().dtype(at::kFloat));  // w_f * y at flat f

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
      p.vec_a = vec_ok<S>(p.a, {H});
      p.vec_b = vec_ok<S>(p.b, {H * 2 * I, 2 * I});
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
      p.vec_a = vec_ok<S>(p.a, {I});
      p.vec_b = vec_ok<S>(p.b, {I * H, H});
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

  at::Tensor dh = at::empty({R, 2 * I}, x.options());  // routed order; rows past the end unused
  at::Tensor aw = at::empty({R, I}, x.options());      // w_f * swiglu(h_r)
  const int64_t ntI = (I + kBN - 1) / kBN;
  at::Tensor dots = at::empty({R, std::max<int64_t>(ntI, 1)}, x.options().dtype(at::kFloat));
  at::Tensor dw_flat = at::empty({R}, x.options().dtype(at::kFloat));
  at::Tensor dslots = at::empty({R, H}, x.options().dtype(at::kFloat));

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
      p.vec_a = vec_ok<S>(p.a, {H});
      p.vec_b = vec_ok<S>(p.b, {I * H, H});
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
        p.vec_a = vec_ok<S>(p.a, {2 * I});
        p.vec_b = vec_ok<S>(p.b, {H * 2 * I, 2 * I});
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
    g.vec_p = vec_ok<S>(g.p, {H});
    g.vec_q = vec_ok<S>(g.q, {2 * I});
    g.out = dwgu.data_ptr();
    launch_vark_gemm<S>(g, stream);
    ColSum c{};
    c.src = dh.data_ptr();
    c.ld = 2 * I;
    c.sched = s.ptr();
    c.E = static_cast<int>(E);
    c.N = static_cast<int>(2 * I);
    launch_colsum<S>(c, s, dbgu, stream);

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
    d.vec_p = vec_ok<S>(d.p, {I});
    d.vec_q = vec_ok<S>(d.q, {H});
    d.out = dwd.data_ptr();
    launch_vark_gemm<S>(d, stream);
    ColSum cb{};
    cb.src = go.data_ptr();
    cb.ld = H;
    cb.gather = 1;
    cb.order = ordc.data_ptr<int32_t>();
    cb.topk = static_cast<int>(k);
    cb.flat_total = static_cast<int>(R);
    cb.wts = wf.data_ptr<float>();
    cb.sched = s.ptr();
    cb.E = static_cast<int>(E);
    cb.N = static_cast<int>(H);
    launch_colsum<S>(cb, s, dbd, stream);
  });
  dweights.copy_(dw_flat.view(weights.sizes()));
  return {dx, dweights, dwgu, dbgu, dwd, dbd};
}

}  // namespace

TORCH_LIBRARY_IMPL(ossrl, CUDA, m) {
  m.impl("grouped_gemm", &grouped_gemm_cuda);
  m.impl("grouped_gemm_dw", &grouped_gemm_dw_cuda);
  m.impl("moe_route", &moe_route_cuda);
  m.impl("moe_route_given", &moe_route_given_cuda);
  m.impl("moe_experts", &moe_experts_cuda);
  m.impl("moe_experts_backward", &moe_experts_backward_cuda);
}

}  // namespace ossrl
