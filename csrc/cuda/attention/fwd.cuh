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
// - dtypes: these kernels take bfloat16 and float16 with head dim 64 or 128; float32 and other
//   head dims go to the ATen composite (csrc/attention_composite.cpp), float64 is refused.
//
// This header: the forward kernel, for varlen and paged attention alike, and the merge of
// split-K partial results. attention/varlen.cu and attention/paged.cu launch it.
#pragma once

#include "common.cuh"

namespace ossrl {
namespace {

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

}  // namespace
}  // namespace ossrl
