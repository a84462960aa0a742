// Shared by the MoE CUDA kernel files (moe/grouped_gemm.cu, moe/routing.cu, moe/experts.cu): the
// tile configuration, PTX wrappers, the row-grouped and variable-K GEMM kernels with their fused
// epilogues, the small kernels, and the host helpers that launch them. Everything is in an
// anonymous namespace: each file compiles the templates it uses.
//
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
// * Shared-memory rows are padded by 16 bytes instead of swizzled, so the addressing stays plain
//   row * ld + col and ldmatrix (8 rows of 16 bytes) is conflict-free; the cp.async stores of
//   the K-major 32-column tiles are 2-way bank-conflicted (80-byte rows: a phase of 8 chunks
//   spans 160 bytes). A swizzle would clear both (benchmarks/NOTES.md); not yet done.
// * Every global load is bounds-checked per 16-byte chunk (cp.async with zero-fill); a matrix
//   that is not 16-byte aligned / a multiple of 8 columns is copied by element pairs (cp.async
//   of 4 or 8 bytes) when its sizes are even, and per element otherwise (scalar fallback), so
//   K, N and row counts need not be multiples of the tiles.
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
//   (token, slot) rows of a buffer, and the SwiGLU backward.
// * Combining the k slots of a token is a separate deterministic kernel (fixed slot order, no
//   atomics, fp32 sums): slot rows live in a (T*k, H) buffer of the input dtype (an fp32 buffer
//   had cost 755 MB of traffic per layer at 16k tokens, k=4, H=2880; bf16 halves it, at one
//   rounding of each weighted slot, as torch's own index_add combine rounds); an inverse
//   permutation of `order` tells which slots were written (rows past offsets[-1] are dropped),
//   so the buffer needs no clearing. Reductions over rows (bias gradients, the routing-weight
//   gradient) also use fixed-order partial sums: results are bitwise reproducible.
// * Weight gradients are variable-K grouped GEMMs (dw[e] = P_e^T Q_e over the expert's rows):
//   grid (M tiles x N tiles, E); experts without rows write zeros.
#pragma once

#include "tiles.cuh"

namespace ossrl {
namespace {
// ---------------------------------------------------------------------------------------------
// Row-grouped GEMM: out rows r of expert e = A[row(r)] @ B_e (+ epilogue).

enum Epi : int {
  kEpiStore = 0,      // out[r, n] = acc + bias[e, n]                          (T, ld ldo)
  kEpiSwiglu = 1,     // h[r, n] = acc + bias; a[r, n/2] = swiglu(gate, up)    (N = 2I)
  kEpiScatter = 2,    // y[f, n] = w_f * (acc + bias), f = order[r]            (input dtype)
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
  int vec_a, vec_b;        // CopyWidth of A and B (copy_width)
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
  const int vec_a = p.vec_a, vec_b = p.vec_b;
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
    T* y = static_cast<T*>(p.out);  // (flat_total, N) in the input dtype
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
        T* yrow = y + static_cast<int64_t>(f) * N;
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
          store2(yrow + n, v0 * w, v1 * w, second, paired);
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
  int vec_p, vec_q;  // CopyWidth of P and Q (copy_width)
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
  const bool p_gather = p.p_gather, q_gather = p.q_gather;
  const int vec_p = p.vec_p, vec_q = p.vec_q;
  const int32_t* order = p.order;
  const int topk = p.topk, flat_total = p.flat_total;
  auto map_row = [&](int r, bool gather) -> int64_t {
    if (r >= r1) return -1;
    if (!gather) return r;
    const int f = order[r];
    return (f >= 0 && f < flat_total) ? f / topk : -1;
  };
  // The rows a thread copies for step kt+1 are looked up while step kt is issued, so that the
  // read of order[] (a dependent global load) is in flight during a stage's MMAs instead of
  // stalling the cp.async that needs it. P and Q tiles are both kBK x 128: the same tile rows.
  static_assert(kBM == kBN, "P and Q tiles share their row mapping");
  constexpr int kIt = load_tile_iters<T, kBM>(kBK);
  int64_t prow[kIt], qrow[kIt];
  auto fetch_rows = [&](int kt) {
#pragma unroll
    for (int it = 0; it < kIt; ++it) {
      const int r = r0 + kt * kBK + tile_row<T, kBM>(it);
      prow[it] = map_row(r, p_gather);
      qrow[it] = map_row(r, q_gather);
    }
  };
  fetch_rows(0);

  T* smem = reinterpret_cast<T*>(smem_raw);
  float acc[4][4][4];
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[mi][ni][q] = 0.f;

  const int ktiles = (r1 - r0 + kBK - 1) / kBK;
  // gemm_mainloop calls load with kt = 0, 1, 2, ... in turn.
  gemm_mainloop<T, false, false>(acc, smem, ktiles, [&](T* sa, T* sb, int kt) {
    load_tile<T, kBK, kBM>(
        sa, OpTile<T, false, kBM>::kLd, P, ldp, [&](int, int it) { return prow[it]; }, m0, M,
        vec_p);
    load_tile<T, kBK, kBN>(
        sb, OpTile<T, false, kBN>::kLd, Q, ldq, [&](int, int it) { return qrow[it]; }, n0, N,
        vec_q);
    fetch_rows(kt + 1);
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
__global__ void combine_kernel(const T* __restrict__ y, const int32_t* __restrict__ inv,
                               int topk, int N, T* __restrict__ out) {
  const int64_t t = blockIdx.x;
  for (int n = threadIdx.x; n < N; n += blockDim.x) {
    float s = 0.f;
    for (int j = 0; j < topk; ++j) {
      const int64_t f = t * topk + j;
      if (inv[f] >= 0) s += static_cast<float>(y[f * N + n]);
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

// How load_tile may copy a matrix at ptr whose row strides and column counts are `multiples`
// (elements): 16-byte chunks, element pairs, or single elements.
template <typename T>
int copy_width(const void* ptr, std::initializer_list<int64_t> multiples) {
  constexpr int V = Cfg<T>::kVec;
  const auto all_multiples_of = [&](int64_t q) {
    for (int64_t m : multiples)
      if (m % q != 0) return false;
    return true;
  };
  const auto address = reinterpret_cast<uintptr_t>(ptr);
  if (address % 16 == 0 && all_multiples_of(V)) return kCopy16;
  if (address % (2 * sizeof(T)) == 0 && all_multiples_of(2)) return kCopyPair;
  return kCopyElem;
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
// The column sums per expert of a (rows, N) matrix with row stride ld, over the schedule s; the
// caller sets the gather / weight fields where rows are read through the routing.
inline ColSum colsum_of(const void* src, int64_t ld, int64_t N, const Sched& s, int64_t E) {
  ColSum c{};
  c.src = src;
  c.ld = ld;
  c.sched = s.ptr();
  c.E = static_cast<int>(E);
  c.N = static_cast<int>(N);
  return c;
}

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
      static_cast<const T*>(y.data_ptr()), inv.data_ptr<int32_t>(), static_cast<int>(topk),
      static_cast<int>(N),
      static_cast<T*>(out.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace ossrl
