// Packed variable-length attention (causal / sliding window / GQA / sinks) and the paged KV cache,
// on the CPU. Schemas: csrc/ops.cpp; semantics: python/ossrl/ops/attention.py.
//
// Masks. Query i of a sequence with Lq queries and Lk keys sits at key position p = i + Lk - Lq
// (bottom-right alignment). It sees key j when lo(p) <= j < hi(p), with
//   hi = causal ? min(Lk, p + 1) : Lk          (causal bounds the right side)
//   lo = window > 0 ? max(0, p - window + 1) : 0 (the window bounds the left side)
// so causal + window W is p - W < j <= p (GPT-OSS), and window without causal is FlashAttention's
// window_size = (W - 1, -1). lo and hi are non-decreasing in p, which every loop below relies on.
//
// Every call first converts the operands its tiles read into fp32 (fp64 for fp64 inputs) layouts
// (K^T as (Hkv, D, Tk) columns, V/K/Q/dO as (H, T, D) rows): one linear pass, after which a tile
// is a pointer. Memory is linear in the tokens; nothing is ever T x T.
//
// Forward: one task per (sequence, query head, block of kBQ queries). A task scales its query
// block once and streams only the key tiles its rows can see (fully masked tiles are never
// touched): S = Qs K^T, per-row masks, online softmax (running max m, running sum l,
// unnormalised O), then the sink joins the denominator:
//   lse = log(exp(sink) + sum_j exp(s_j)),  out = O * exp(m - lse).
// A row that sees no key gets out = 0 and lse = sink (or -inf without sinks).
// Backward (FlashAttention-2: P = exp(S - lse) recomputed from the saved lse, D_i = dO_i . O_i,
// dS = P * (dP - D_i)). With enough (sequence, kv head) pairs for the threads, one task per pair
// computes dQ, dK and dV together. Otherwise two passes: one task per (key tile, kv head) owns
// dK and dV of its keys and visits the query rows of every head of the group that see them; then
// one task per (sequence, query head, query block) owns dQ. No task writes what another writes:
// no atomics, no per-thread copies of the gradients.
// Paged attention: one task per (sequence, kv head, chunk of queries, key split); a task's rows
// are (query, head of the group) pairs, so each key tile is loaded once for the whole group. Long
// key ranges are split so that a single sequence still keeps every thread busy; the splits are
// merged with their log-sum-exp afterwards.
// Tasks are handed out dynamically, the most expensive first (causal work is triangular).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <ossrl/check.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace ossrl {
namespace {

constexpr const char* kFwdOp = "varlen_attention";
constexpr const char* kBwdOp = "varlen_attention_backward";
constexpr const char* kAppendOp = "paged_kv_append";
constexpr const char* kPagedOp = "paged_attention";

constexpr int64_t kBQ = 64;  // query rows per tile
constexpr int64_t kBK = 64;  // keys per tile

// The hot loops are compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at load time
// (the extension itself is built for baseline x86-64).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define OSSRL_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define OSSRL_MULTIVERSION
#endif
#define OSSRL_INLINE inline __attribute__((always_inline))

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors only live inside inlined code
#endif

// ---------------------------------------------------------------------------------------------
// Small dense kernels on contiguous fp32/fp64 tiles (64-byte GCC vectors).

template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(64)));
};
template <typename T>
using vec_t = typename VecOf<T>::type;

template <typename T>
OSSRL_INLINE void vload(vec_t<T>& v, const T* p) {
  std::memcpy(&v, p, sizeof(v));
}
template <typename T>
OSSRL_INLINE void vstore(T* p, const vec_t<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// C[R x NV*W] (+)= op(A)[R x k] B[k x NV*W], the accumulators held in registers;
// op(A)[r][p] = TA ? A[p * lda + r] : A[r * lda + p].
template <typename T, int R, int NV, bool TA>
OSSRL_INLINE void micro(const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
                        int64_t k, bool accumulate) {
  constexpr int W = 64 / sizeof(T);
  vec_t<T> c[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      if (accumulate) vload(c[r][v], C + r * ldc + v * W);
      else c[r][v] = vec_t<T>{};
    }
  for (int64_t p = 0; p < k; ++p) {
    vec_t<T> b[NV];
    for (int v = 0; v < NV; ++v) vload(b[v], B + p * ldb + v * W);
    for (int r = 0; r < R; ++r) {
      const T a = TA ? A[p * lda + r] : A[r * lda + p];
      for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) vstore(C + r * ldc + v * W, c[r][v]);
}

template <typename T, int R, int NV, bool TA>
OSSRL_INLINE void gemm_cols(const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
                            int64_t m, int64_t k, bool accumulate) {
  const int64_t row_step = TA ? 1 : lda;
  int64_t i = 0;
  for (; i + R <= m; i += R)
    micro<T, R, NV, TA>(A + i * row_step, lda, B, ldb, C + i * ldc, ldc, k, accumulate);
  for (; i < m; ++i) micro<T, 1, NV, TA>(A + i * row_step, lda, B, ldb, C + i * ldc, ldc, k, accumulate);
}

// C[m x n] = (accumulate ? C : 0) + op(A)[m x k] B[k x n], row-major with leading dimensions;
// op(A) = A, or A^T when TA (A then stored k x m).
template <typename T, bool TA>
OSSRL_INLINE void gemm_impl(const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
                            int64_t m, int64_t n, int64_t k, bool accumulate) {
  constexpr int W = 64 / sizeof(T);
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W)
    gemm_cols<T, 4, 4, TA>(A, lda, B + j, ldb, C + j, ldc, m, k, accumulate);
  if (j + 2 * W <= n) {
    gemm_cols<T, 8, 2, TA>(A, lda, B + j, ldb, C + j, ldc, m, k, accumulate);
    j += 2 * W;
  }
  if (j + W <= n) {
    gemm_cols<T, 8, 1, TA>(A, lda, B + j, ldb, C + j, ldc, m, k, accumulate);
    j += W;
  }
  if (j < n) {
    for (int64_t i = 0; i < m; ++i) {
      T* c = C + i * ldc;
      if (!accumulate)
        for (int64_t jj = j; jj < n; ++jj) c[jj] = T(0);
      for (int64_t p = 0; p < k; ++p) {
        const T a = TA ? A[p * lda + i] : A[i * lda + p];
        const T* b = B + p * ldb;
        for (int64_t jj = j; jj < n; ++jj) c[jj] += a * b[jj];
      }
    }
  }
}

#define OSSRL_GEMM(NAME, T, TA)                                                                  \
  OSSRL_MULTIVERSION void NAME(const T* A, int64_t lda, const T* B, int64_t ldb, T* C,          \
                               int64_t ldc, int64_t m, int64_t n, int64_t k, bool accumulate) {  \
    gemm_impl<T, TA>(A, lda, B, ldb, C, ldc, m, n, k, accumulate);                               \
  }
OSSRL_GEMM(gemm, float, false)
OSSRL_GEMM(gemm, double, false)
OSSRL_GEMM(gemm_at, float, true)   // C (+)= A^T B
OSSRL_GEMM(gemm_at, double, true)
#undef OSSRL_GEMM

// exp for fp32 rows: Cody-Waite reduction by ln 2 and a degree-7 Taylor polynomial on
// |r| <= ln2/2 (relative error ~1e-7); arguments below -87 (masked entries, -inf) give 0.
using vf32 = vec_t<float>;
typedef int32_t vi32 __attribute__((vector_size(64)));
constexpr float kExpLo = -87.0f, kExpHi = 88.0f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f, kRound = 12582912.0f;  // 1.5 * 2^23

// In place.
OSSRL_INLINE void vexp(vf32& x) {
  const vi32 under = x < kExpLo;
  x = x < kExpLo ? vf32{} + kExpLo : x;
  x = x > kExpHi ? vf32{} + kExpHi : x;
  const vf32 n = (x * kLog2e + kRound) - kRound;
  const vf32 r = (x - n * kLn2Hi) - n * kLn2Lo;
  vf32 p = vf32{} + 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi32 bits = (__builtin_convertvector(n, vi32) + 127) << 23;
  vf32 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const vf32 res = p * scale;
  x = under ? vf32{} : res;
}

OSSRL_INLINE float sexp(float x) {
  if (!(x >= kExpLo)) return std::isnan(x) ? x : 0.0f;
  x = std::min(x, kExpHi);
  const float n = (x * kLog2e + kRound) - kRound;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * std::bit_cast<float>(bits);
}

// x[j] = exp(x[j] - shift) in place; returns the sum.
OSSRL_MULTIVERSION float exp_shift_sum(float* x, int64_t n, float shift) {
  constexpr int W = 16;
  vf32 acc{};
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    vf32 e;
    vload(e, x + j);
    e -= shift;
    vexp(e);
    vstore(x + j, e);
    acc += e;
  }
  float sum = 0.0f;
  for (int v = 0; v < W; ++v) sum += acc[v];
  for (; j < n; ++j) {
    x[j] = sexp(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

// max of x[0..n), n >= 1.
OSSRL_MULTIVERSION float row_max(const float* x, int64_t n) {
  constexpr int W = 16;
  float mx = x[0];
  int64_t j = 0;
  if (n >= W) {
    vf32 acc;
    vload(acc, x);
    for (j = W; j + W <= n; j += W) {
      vf32 e;
      vload(e, x + j);
      acc = e > acc ? e : acc;
    }
    for (int v = 0; v < W; ++v) mx = std::max(mx, acc[v]);
  }
  for (; j < n; ++j) mx = std::max(mx, x[j]);
  return mx;
}

double row_max(const double* x, int64_t n) {
  double mx = x[0];
  for (int64_t j = 1; j < n; ++j) mx = std::max(mx, x[j]);
  return mx;
}

double exp_shift_sum(double* x, int64_t n, double shift) {
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// ---------------------------------------------------------------------------------------------
// Geometry, masks and scheduling.

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

struct Mask {
  bool causal;
  int64_t window;  // > 0, or <= 0 for none
  // Visible keys [lo, hi) of the query at key position p in a sequence of lk keys.
  OSSRL_INLINE void range(int64_t p, int64_t lk, int64_t& lo, int64_t& hi) const {
    hi = causal ? std::min(lk, p + 1) : lk;
    if (hi < 0) hi = 0;
    lo = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
    if (lo > hi) lo = hi;
  }
};

struct Seq {
  int64_t qs, lq, ks, lk;  // first query token, queries, first key token (varlen), keys
};

// Below this many query-key pairs of work per thread, waking threads costs more than it saves.
constexpr int64_t kMinPairsPerThread = 16384;

// Runs make_worker()(t) for every task t in [0, cost.size()), tasks handed out dynamically; each
// thread builds one worker (its scratch buffers) and reuses it. cost: query-key pairs per task.
template <typename MakeWorker>
void run_tasks(const std::vector<int64_t>& cost, const MakeWorker& make_worker) {
  const int64_t n = static_cast<int64_t>(cost.size());
  if (n <= 0) return;
  int64_t total = 0;
  for (int64_t c : cost) total += c;
  const int64_t threads =
      std::clamp<int64_t>(std::min<int64_t>(total / kMinPairsPerThread, n), 1, at::get_num_threads());
  if (threads == 1) {
    auto work = make_worker();
    for (int64_t t = 0; t < n; ++t) work(t);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto work = make_worker();
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < n;) work(t);
  });
}

// Sorts task indices by decreasing cost (longest first keeps the dynamic schedule balanced).
inline std::vector<int64_t> order_by_cost(const std::vector<int64_t>& cost) {
  std::vector<int64_t> idx(cost.size());
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int64_t>(i);
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  return idx;
}

// A (tokens, heads, D) tensor seen through its strides.
template <typename scalar_t>
struct View3 {
  scalar_t* p;
  int64_t s0, s1, s2;
  explicit View3(const at::Tensor& t)
      : p(static_cast<scalar_t*>(t.data_ptr())), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
  OSSRL_INLINE scalar_t* row(int64_t t, int64_t h) const { return p + t * s0 + h * s1; }
};

template <typename scalar_t, typename acc_t>
OSSRL_INLINE void load_row(acc_t* dst, const scalar_t* src, int64_t s, int64_t D, acc_t mul) {
  if (s == 1) {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(src[d]) * mul;
  } else {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(src[d * s]) * mul;
  }
}
template <typename scalar_t, typename acc_t>
OSSRL_INLINE void load_col(acc_t* dst, int64_t ld, const scalar_t* src, int64_t s, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d * ld] = static_cast<acc_t>(src[d * s]);
}
template <typename scalar_t, typename acc_t>
OSSRL_INLINE void store_row(scalar_t* dst, const acc_t* src, int64_t D, acc_t mul) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(src[d] * mul);
}

// lse/out of one row from its running max m, running sum l and the sink.
template <typename acc_t>
OSSRL_INLINE void finish_row(acc_t m, acc_t l, bool has_sink, acc_t sink, acc_t& lse, acc_t& oscale) {
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  if (has_sink) {
    const acc_t M = std::max(m, sink);
    const acc_t em = m == -kInf ? acc_t(0) : std::exp(m - M);
    const acc_t L = l * em + std::exp(sink - M);
    lse = M + std::log(L);
    oscale = em / L;
  } else if (l > acc_t(0)) {
    lse = m + std::log(l);
    oscale = acc_t(1) / l;
  } else {
    lse = -kInf;
    oscale = acc_t(0);
  }
}

// ---------------------------------------------------------------------------------------------
// Operands converted once per call into fp32 (fp64) layouts the tile loops read directly: rows
// (H, T, D) and transposed columns (H, D, ld). Linear in the number of tokens.

// An uninitialised buffer (every element read is written first).
template <typename T>
std::unique_ptr<T[]> buffer(int64_t n) {
  return std::unique_ptr<T[]>(new T[std::max<int64_t>(n, 1)]);
}

// A leading dimension for the transposed layout: a multiple of 16 elements, and an odd multiple,
// so that the D rows of a tile do not all fall into the same cache sets.
inline int64_t transposed_ld(int64_t T) {
  int64_t ld = (T + 15) / 16 * 16;
  if ((ld / 16) % 2 == 0) ld += 16;
  return ld;
}

// One conversion: rows[(h*T + t)*D + d] and/or cols[(h*D + d)*ld + t] = src[t, h, d] * mul
// (either may be null).
template <typename scalar_t, typename acc_t>
struct Convert {
  View3<scalar_t> src;
  int64_t T, H, D;
  acc_t mul;
  acc_t* rows;
  acc_t* cols;
  int64_t ld;
};

// Runs all the conversions in one parallel region (tokens in chunks of 256); then, if given,
// after(job, t0, t1) on each chunk it converted.
template <typename scalar_t, typename acc_t, typename After>
void convert_all(const std::vector<Convert<scalar_t, acc_t>>& jobs, const After& after) {
  constexpr int64_t kChunk = 256;
  std::vector<int64_t> first(jobs.size() + 1, 0);
  for (size_t i = 0; i < jobs.size(); ++i) first[i + 1] = first[i] + (jobs[i].T + kChunk - 1) / kChunk;
  int64_t elems = 0;
  for (const auto& j : jobs) elems += j.T * j.H * j.D;
  const int64_t grain = std::max<int64_t>(1, first.back() * (1 << 18) / std::max<int64_t>(elems, 1));
  at::parallel_for(0, first.back(), grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const size_t i = std::upper_bound(first.begin(), first.end(), c) - first.begin() - 1;
      const auto& j = jobs[i];
      const int64_t t0 = (c - first[i]) * kChunk, t1 = std::min(j.T, t0 + kChunk);
      for (int64_t h = 0; h < j.H; ++h) {
        if (j.rows)
          for (int64_t t = t0; t < t1; ++t)
            load_row(j.rows + (h * j.T + t) * j.D, j.src.row(t, h), j.src.s2, j.D, j.mul);
        if (j.cols)
          for (int64_t d = 0; d < j.D; ++d) {
            acc_t* col = j.cols + (h * j.D + d) * j.ld;
            const scalar_t* x = j.src.p + h * j.src.s1 + d * j.src.s2;
            for (int64_t t = t0; t < t1; ++t) col[t] = static_cast<acc_t>(x[t * j.src.s0]) * j.mul;
          }
      }
      after(i, t0, t1);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Forward tile engine, shared by varlen and paged attention.

template <typename acc_t>
struct FwdScratch {
  int64_t D;
  std::vector<acc_t> qs, kt, v, s, o, m, l;
  std::vector<int64_t> lo, hi;
  FwdScratch(int64_t rows, int64_t D_, bool tiles)
      : D(D_), qs(rows * D_), kt(tiles ? D_ * kBK : 0), v(tiles ? kBK * D_ : 0), s(rows * kBK),
        o(rows * D_), m(rows), l(rows), lo(rows), hi(rows) {}
};

// Keys [kb, kb + nk) of a tile: K^T (D x nk, leading dimension ldkt) and V (nk x D, ldv).
template <typename acc_t>
struct KeyTile {
  const acc_t* kt;
  int64_t ldkt;
  const acc_t* v;
  int64_t ldv;
};

// Rows [0, nrows) of w.qs (scaled queries) with visible ranges w.lo/w.hi, both non-decreasing in
// the row index, attend to keys [kbeg, kend), a tile of kBK at a time from tile(kb, nk). Leaves the
// running max/sum/unnormalised output in w.m, w.l, w.o.
template <typename acc_t, typename Tile>
void attend_rows(FwdScratch<acc_t>& w, int64_t nrows, int64_t kbeg, int64_t kend, const Tile& tile) {
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  const int64_t D = w.D;
  std::fill_n(w.m.data(), nrows, -kInf);
  std::fill_n(w.l.data(), nrows, acc_t(0));
  std::fill_n(w.o.data(), nrows * D, acc_t(0));
  for (int64_t kb = kbeg; kb < kend; kb += kBK) {
    const int64_t nk = std::min(kBK, kend - kb);
    int64_t ra = 0, rb = nrows;
    while (ra < nrows && !(w.hi[ra] > kb && w.lo[ra] < kb + nk)) ++ra;
    while (rb > ra && !(w.hi[rb - 1] > kb && w.lo[rb - 1] < kb + nk)) --rb;
    if (ra >= rb) continue;
    const KeyTile<acc_t> t = tile(kb, nk);
    gemm(w.qs.data() + ra * D, D, t.kt, t.ldkt, w.s.data() + ra * kBK, kBK, rb - ra, nk, D, false);
    for (int64_t r = ra; r < rb; ++r) {
      acc_t* srow = w.s.data() + r * kBK;
      const int64_t c0 = std::max<int64_t>(w.lo[r] - kb, 0);
      const int64_t c1 = std::min<int64_t>(w.hi[r] - kb, nk);
      if (c0 >= c1) {
        std::fill_n(srow, nk, acc_t(0));
        continue;
      }
      const acc_t mx = row_max(srow + c0, c1 - c0);
      const acc_t mold = w.m[r];
      const acc_t mnew = std::max(mold, mx);
      if (mnew == -kInf) {  // only -inf scores so far (infinite inputs): nothing to add
        std::fill_n(srow, nk, acc_t(0));
        continue;
      }
      std::fill_n(srow, c0, acc_t(0));
      std::fill(srow + c1, srow + nk, acc_t(0));
      const acc_t sum = exp_shift_sum(srow + c0, c1 - c0, mnew);
      if (mold == -kInf) {
        w.l[r] = sum;
      } else {
        const acc_t alpha = std::exp(mold - mnew);
        if (alpha != acc_t(1)) {
          acc_t* orow = w.o.data() + r * D;
          for (int64_t d = 0; d < D; ++d) orow[d] *= alpha;
        }
        w.l[r] = w.l[r] * alpha + sum;
      }
      w.m[r] = mnew;
    }
    gemm(w.s.data() + ra * kBK, kBK, t.v, t.ldv, w.o.data() + ra * D, D, rb - ra, D, nk, true);
  }
}

// ---------------------------------------------------------------------------------------------
// Argument checks.

std::vector<int32_t> int_values(const at::Tensor& t) {
  auto c = t.contiguous();
  const int32_t* p = c.data_ptr<int32_t>();
  return std::vector<int32_t>(p, p + c.numel());
}

void check_window(int64_t window, const char* op) {
  OSSRL_CHECK_VALUE(window != 0, op, "window must be positive (keys per query, itself included) ",
                    "or negative for no window, got 0");
}

// sinks: (Hq,) float32 or q.dtype, on q's device. Returns the values in double, or empty.
std::vector<double> check_sinks(const std::optional<at::Tensor>& sinks, const at::Tensor& q,
                                int64_t Hq, const char* op) {
  if (!sinks.has_value()) return {};
  const at::Tensor& s = *sinks;
  check_same_device(s, q, op, "sinks", "q");
  check_aux_dtype(s, q, op, "sinks", "q");
  check_dim(s, 1, op, "sinks");
  check_size(s, 0, Hq, op, "sinks", "the number of query heads");
  auto d = s.to(at::kDouble).contiguous();
  const double* p = d.data_ptr<double>();
  return std::vector<double>(p, p + Hq);
}

struct VarlenGeom {
  int64_t Tq, Tk, Hq, Hkv, D;
  std::vector<Seq> seqs;
};

VarlenGeom check_varlen(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q, int64_t max_k,
                        int64_t window) {
  check_dim(q, 3, op, "q");
  check_dim(k, 3, op, "k");
  check_dim(v, 3, op, "v");
  check_float(q, op, "q");
  check_same_dtype(k, q, op, "k", "q");
  check_same_dtype(v, q, op, "v", "q");
  check_same_device(k, q, op, "k", "q");
  check_same_device(v, q, op, "v", "q");
  check_same_device(cu_q, q, op, "cu_seqlens_q", "q");
  check_same_device(cu_k, q, op, "cu_seqlens_k", "q");
  VarlenGeom g;
  g.Tq = q.size(0);
  g.Hq = q.size(1);
  g.D = q.size(2);
  g.Tk = k.size(0);
  g.Hkv = k.size(1);
  OSSRL_CHECK(g.Hkv >= 1 && g.Hq >= 1, op, "q and k need at least one head, got q ", q.sizes(),
              " and k ", k.sizes());
  OSSRL_CHECK(g.Hq % g.Hkv == 0, op, "the query heads (", g.Hq,
              ") must be a multiple of the key/value heads (", g.Hkv, ")");
  OSSRL_CHECK(g.D >= 1, op, "head dim must be positive, got q ", q.sizes());
  check_size(k, 2, g.D, op, "k", "the head dim of q");
  check_size(v, 2, g.D, op, "v", "the head dim of q");
  check_size(v, 0, g.Tk, op, "v", "the number of key tokens in k");
  check_size(v, 1, g.Hkv, op, "v", "the number of key/value heads in k");
  check_window(window, op);
  check_cu_seqlens(cu_q, g.Tq, op, "cu_seqlens_q", "the number of query tokens q.shape[0]");
  check_cu_seqlens(cu_k, g.Tk, op, "cu_seqlens_k", "the number of key tokens k.shape[0]");
  OSSRL_CHECK(cu_q.size(0) == cu_k.size(0), op, "cu_seqlens_q and cu_seqlens_k must have the same ",
              "length (B+1), got ", cu_q.size(0), " and ", cu_k.size(0));
  const auto cq = int_values(cu_q), ck = int_values(cu_k);
  const int64_t B = static_cast<int64_t>(cq.size()) - 1;
  g.seqs.resize(B);
  for (int64_t b = 0; b < B; ++b) {
    Seq s{cq[b], cq[b + 1] - cq[b], ck[b], ck[b + 1] - ck[b]};
    OSSRL_CHECK_VALUE(s.lq <= max_q, op, "max_seqlen_q (", max_q, ") is smaller than sequence ", b,
                      "'s ", s.lq, " queries");
    OSSRL_CHECK_VALUE(s.lk <= max_k, op, "max_seqlen_k (", max_k, ") is smaller than sequence ", b,
                      "'s ", s.lk, " keys");
    g.seqs[b] = s;
  }
  return g;
}

at::ScalarType lse_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// ---------------------------------------------------------------------------------------------
// varlen forward

template <typename scalar_t>
void varlen_fwd_impl(const VarlenGeom& g, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const Mask& mask, const std::vector<double>& sinks,
                     double softmax_scale, at::Tensor& out, at::Tensor& lse) {
  using acc_t = acc_of<scalar_t>;
  const View3<scalar_t> Q(q), K(k), V(v), O(out);
  acc_t* L = lse.data_ptr<acc_t>();
  const int64_t D = g.D, G = g.Hq / g.Hkv, Tq = g.Tq;
  const acc_t scale = static_cast<acc_t>(softmax_scale);
  const bool has_sink = !sinks.empty();

  struct Task {
    int64_t b, h, i0;
  };
  std::vector<Task> tasks;
  std::vector<int64_t> cost;
  for (int64_t b = 0; b < static_cast<int64_t>(g.seqs.size()); ++b) {
    const Seq& s = g.seqs[b];
    for (int64_t i0 = 0; i0 < s.lq; i0 += kBQ) {
      const int64_t nq = std::min(kBQ, s.lq - i0);
      int64_t lo0, hi0, lo1, hi1;
      mask.range(i0 + s.lk - s.lq, s.lk, lo0, hi0);
      mask.range(i0 + nq - 1 + s.lk - s.lq, s.lk, lo1, hi1);
      for (int64_t h = 0; h < g.Hq; ++h) {
        tasks.push_back({b, h, i0});
        cost.push_back(nq * (std::max<int64_t>(hi1 - lo0, 0) + 4));
      }
    }
  }
  const auto order = order_by_cost(cost);

  // K^T and V of every kv head in fp32 (fp64), read in place by the tiles.
  const int64_t Tk = g.Tk, ldt = transposed_ld(Tk);
  auto kt_all = buffer<acc_t>(g.Hkv * D * ldt), v_all = buffer<acc_t>(g.Hkv * Tk * D);
  convert_all<scalar_t, acc_t>({{K, Tk, g.Hkv, D, acc_t(1), nullptr, kt_all.get(), ldt},
                               {V, Tk, g.Hkv, D, acc_t(1), v_all.get(), nullptr, 0}},
                              [](size_t, int64_t, int64_t) {});

  run_tasks(cost, [&] {
    return [&, w = FwdScratch<acc_t>(kBQ, D, false)](int64_t t) mutable {
      const Task& task = tasks[order[t]];
      const Seq& s = g.seqs[task.b];
      const int64_t h = task.h, hk = h / G, i0 = task.i0, nq = std::min(kBQ, s.lq - i0);
      const int64_t off = s.lk - s.lq;
      for (int64_t r = 0; r < nq; ++r) {
        load_row(w.qs.data() + r * D, Q.row(s.qs + i0 + r, h), Q.s2, D, scale);
        mask.range(i0 + r + off, s.lk, w.lo[r], w.hi[r]);
      }
      const acc_t* kt_h = kt_all.get() + hk * D * ldt + s.ks;
      const acc_t* v_h = v_all.get() + (hk * Tk + s.ks) * D;
      auto tile = [&](int64_t kb, int64_t) { return KeyTile<acc_t>{kt_h + kb, ldt, v_h + kb * D, D}; };
      attend_rows(w, nq, w.lo[0], w.hi[nq - 1], tile);
      const acc_t sink = has_sink ? static_cast<acc_t>(sinks[h]) : acc_t(0);
      for (int64_t r = 0; r < nq; ++r) {
        acc_t row_lse, oscale;
        finish_row(w.m[r], w.l[r], has_sink, sink, row_lse, oscale);
        L[h * Tq + s.qs + i0 + r] = row_lse;
        store_row(O.row(s.qs + i0 + r, h), w.o.data() + r * D, D, oscale);
      }
    };
  });
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
    int64_t window, const std::optional<at::Tensor>& sinks, double softmax_scale) {
  const auto g = check_varlen(kFwdOp, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, window);
  const auto sink_values = check_sinks(sinks, q, g.Hq, kFwdOp);
  auto out = at::empty({g.Tq, g.Hq, g.D}, q.options());
  auto lse = at::empty({g.Hq, g.Tq}, q.options().dtype(lse_dtype(q)));
  const Mask mask{causal, window};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "varlen_attention", [&] {
    varlen_fwd_impl<scalar_t>(g, q, k, v, mask, sink_values, softmax_scale, out, lse);
  });
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------
// varlen backward

template <typename acc_t>
struct BwdScratch {
  std::vector<acc_t> s, dp, dk, dv, dq;
  std::vector<int64_t> lo, hi;
  explicit BwdScratch(int64_t D)
      : s(kBQ * kBK), dp(kBQ * kBK), dk(kBK * D), dv(kBK * D), dq(kBQ * D), lo(kBQ), hi(kBQ) {}
};

// First query row of [0, lq) whose value of f is true, f monotone (false then true).
template <typename F>
int64_t first_row(int64_t lq, const F& f) {
  int64_t a = 0, b = lq;
  while (a < b) {
    const int64_t mid = a + (b - a) / 2;
    if (f(mid)) b = mid;
    else a = mid + 1;
  }
  return a;
}

// From S (scores of rows [ra, rb) against keys [kb, kb+nk)) and dP, computes in place
// P = exp(S - lse) (0 where masked) and dS = P * (dP - D_i).
template <typename acc_t>
void probs_and_dscores(BwdScratch<acc_t>& w, const acc_t* lse, const acc_t* dvec, int64_t ra,
                       int64_t rb, int64_t kb, int64_t nk) {
  for (int64_t r = ra; r < rb; ++r) {
    acc_t* srow = w.s.data() + r * kBK;
    acc_t* dprow = w.dp.data() + r * kBK;
    const int64_t c0 = std::max<int64_t>(w.lo[r] - kb, 0);
    const int64_t c1 = std::min<int64_t>(w.hi[r] - kb, nk);
    if (c0 >= c1 || std::isinf(lse[r])) {
      std::fill_n(srow, nk, acc_t(0));
      std::fill_n(dprow, nk, acc_t(0));
      continue;
    }
    std::fill_n(srow, c0, acc_t(0));
    std::fill(srow + c1, srow + nk, acc_t(0));
    exp_shift_sum(srow + c0, c1 - c0, lse[r]);
    const acc_t di = dvec[r];
    for (int64_t j = 0; j < nk; ++j) dprow[j] = srow[j] * (dprow[j] - di);
  }
}

template <typename scalar_t>
void varlen_bwd_impl(const VarlenGeom& g, const at::Tensor& dout, const at::Tensor& q,
                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                     const at::Tensor& lse, const Mask& mask, const std::vector<double>& sinks,
                     double softmax_scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                     at::Tensor& dsinks) {
  using acc_t = acc_of<scalar_t>;
  const View3<scalar_t> Q(q), K(k), V(v), O(out), dO(dout), dQ(dq), dK(dk), dV(dv);
  const acc_t* L = lse.data_ptr<acc_t>();
  const int64_t D = g.D, G = g.Hq / g.Hkv, Tq = g.Tq, Tk = g.Tk, Hq = g.Hq, Hkv = g.Hkv;
  const acc_t scale = static_cast<acc_t>(softmax_scale);
  const int64_t B = static_cast<int64_t>(g.seqs.size());

  // Operands in fp32 (fp64): scaled queries and dO as (Hq, Tq, D) rows; K as rows and K^T, V^T
  // as (Hkv, D, ldt) columns. D_i = dO_i . O_i, laid out like lse.
  const int64_t ldt = transposed_ld(Tk);
  auto qs_all = buffer<acc_t>(Hq * Tq * D), do_all = buffer<acc_t>(Hq * Tq * D),
       k_all = buffer<acc_t>(Hkv * Tk * D), kt_all = buffer<acc_t>(Hkv * D * ldt),
       vt_all = buffer<acc_t>(Hkv * D * ldt), Dvec = buffer<acc_t>(Hq * Tq);
  // D_i is computed right after dO's chunk is converted (job 1).
  convert_all<scalar_t, acc_t>({{Q, Tq, Hq, D, scale, qs_all.get(), nullptr, 0},
                               {dO, Tq, Hq, D, acc_t(1), do_all.get(), nullptr, 0},
                               {K, Tk, Hkv, D, acc_t(1), k_all.get(), kt_all.get(), ldt},
                               {V, Tk, Hkv, D, acc_t(1), nullptr, vt_all.get(), ldt}},
                              [&](size_t job, int64_t t0, int64_t t1) {
                                if (job != 1) return;
                                for (int64_t h = 0; h < Hq; ++h)
                                  for (int64_t t = t0; t < t1; ++t) {
                                    const scalar_t* o = O.row(t, h);
                                    const acc_t* go = do_all.get() + (h * Tq + t) * D;
                                    acc_t acc = 0;
                                    for (int64_t d = 0; d < D; ++d) acc += static_cast<acc_t>(o[d * O.s2]) * go[d];
                                    Dvec[h * Tq + t] = acc;
                                  }
                              });

  if (!sinks.empty()) {
    acc_t* ds = dsinks.data_ptr<acc_t>();
    at::parallel_for(0, Hq, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(Tq, 1)), [&](int64_t h0, int64_t h1) {
      for (int64_t h = h0; h < h1; ++h) {
        double acc = 0;
        for (int64_t t = 0; t < Tq; ++t) {
          const double l = L[h * Tq + t];
          if (!std::isinf(l)) acc -= std::exp(sinks[h] - l) * Dvec[h * Tq + t];
        }
        ds[h] = static_cast<acc_t>(acc);
      }
    });
  }

  auto row_ranges = [&](BwdScratch<acc_t>& w, const Seq& s, int64_t i0, int64_t nq) {
    for (int64_t r = 0; r < nq; ++r) mask.range(i0 + r + s.lk - s.lq, s.lk, w.lo[r], w.hi[r]);
  };

  // Key blocks of kBK keys (aligned to the start of each sequence) and the query rows that see
  // them: hi(i) > j0 and lo(i) < j0 + nk.
  struct KeyBlock {
    int64_t b, j0, nk, i_begin, i_end;
  };
  std::vector<KeyBlock> blocks;
  std::vector<int64_t> seq_cost(B, 0);
  for (int64_t b = 0; b < B; ++b) {
    const Seq& s = g.seqs[b];
    const int64_t off = s.lk - s.lq;
    for (int64_t j0 = 0; j0 < s.lk; j0 += kBK) {
      const int64_t nk = std::min(kBK, s.lk - j0);
      const int64_t i_begin = first_row(s.lq, [&](int64_t i) {
        int64_t lo, hi;
        mask.range(i + off, s.lk, lo, hi);
        return hi > j0;
      });
      const int64_t i_end = std::max(i_begin, first_row(s.lq, [&](int64_t i) {
        int64_t lo, hi;
        mask.range(i + off, s.lk, lo, hi);
        return lo >= j0 + nk;
      }));
      blocks.push_back({b, j0, nk, i_begin, i_end});
      seq_cost[b] += G * nk * (i_end - i_begin + 4);
    }
  }

  // dK, dV of one key block of kv head hk (written out), from every query row and head of the
  // group that sees it; with dq_acc, also dQ += dS K into dq_acc ((Hq, Tq, D), unscaled).
  auto key_block = [&](BwdScratch<acc_t>& w, const KeyBlock& kb, int64_t hk, acc_t* dq_acc) {
    const Seq& s = g.seqs[kb.b];
    const int64_t j0 = kb.j0, nk = kb.nk, col = s.ks + j0;
    const acc_t* kt = kt_all.get() + hk * D * ldt + col;
    const acc_t* vt = vt_all.get() + hk * D * ldt + col;
    const acc_t* krows = k_all.get() + (hk * Tk + col) * D;
    std::fill_n(w.dk.data(), nk * D, acc_t(0));
    std::fill_n(w.dv.data(), nk * D, acc_t(0));
    for (int64_t i0 = kb.i_begin; i0 < kb.i_end; i0 += kBQ) {
      const int64_t nq = std::min(kBQ, kb.i_end - i0);
      row_ranges(w, s, i0, nq);
      for (int64_t gi = 0; gi < G; ++gi) {
        const int64_t h = hk * G + gi, row0 = h * Tq + s.qs + i0;
        const acc_t* qs = qs_all.get() + row0 * D;
        const acc_t* go = do_all.get() + row0 * D;
        gemm(qs, D, kt, ldt, w.s.data(), kBK, nq, nk, D, false);
        gemm(go, D, vt, ldt, w.dp.data(), kBK, nq, nk, D, false);
        probs_and_dscores(w, L + row0, Dvec.get() + row0, 0, nq, j0, nk);
        gemm_at(w.s.data(), kBK, go, D, w.dv.data(), D, nk, D, nq, true);   // dV += P^T dO
        gemm_at(w.dp.data(), kBK, qs, D, w.dk.data(), D, nk, D, nq, true);  // dK += dS^T Qs
        if (dq_acc) gemm(w.dp.data(), kBK, krows, D, dq_acc + row0 * D, D, nq, D, nk, true);  // dQ += dS K
      }
    }
    for (int64_t j = 0; j < nk; ++j) {
      store_row(dK.row(col + j, hk), w.dk.data() + j * D, D, acc_t(1));
      store_row(dV.row(col + j, hk), w.dv.data() + j * D, D, acc_t(1));
    }
  };

  // With enough independent (sequence, kv head) pairs to keep every thread busy, one task per
  // pair computes dQ, dK and dV together (S and dP computed once); otherwise dK/dV and dQ are
  // computed in two passes with finer tasks (S and dP computed twice). Both sum dQ over the same
  // key tiles in the same order, so the results are identical bit for bit.
  int64_t total_cost = 0, max_cost = 0;
  for (int64_t c : seq_cost) {
    total_cost += c * Hkv;
    max_cost = std::max(max_cost, c);
  }
  const int64_t threads = at::get_num_threads();
  if (threads == 1 || max_cost * 2 * threads <= total_cost) {
    auto dq_acc = buffer<acc_t>(Hq * Tq * D);
    std::vector<int64_t> first_block(B + 1, 0), cost(B * Hkv);
    for (const KeyBlock& kb : blocks) ++first_block[kb.b + 1];
    for (int64_t b = 0; b < B; ++b) {
      first_block[b + 1] += first_block[b];
      for (int64_t hk = 0; hk < Hkv; ++hk) cost[b * Hkv + hk] = seq_cost[b];
    }
    const auto order = order_by_cost(cost);
    run_tasks(cost, [&] {
      return [&, w = BwdScratch<acc_t>(D)](int64_t t) mutable {
        const int64_t b = order[t] / Hkv, hk = order[t] % Hkv;
        const Seq& s = g.seqs[b];
        for (int64_t h = hk * G; h < (hk + 1) * G; ++h)
          std::fill_n(dq_acc.get() + (h * Tq + s.qs) * D, s.lq * D, acc_t(0));
        for (int64_t i = first_block[b]; i < first_block[b + 1]; ++i) key_block(w, blocks[i], hk, dq_acc.get());
        for (int64_t h = hk * G; h < (hk + 1) * G; ++h)
          for (int64_t i = 0; i < s.lq; ++i)
            store_row(dQ.row(s.qs + i, h), dq_acc.get() + (h * Tq + s.qs + i) * D, D, scale);
      };
    });
    return;
  }

  // Pass 1: dK, dV; one task per (key block, kv head).
  {
    std::vector<int64_t> cost(blocks.size() * Hkv);
    for (size_t i = 0; i < blocks.size(); ++i)
      for (int64_t hk = 0; hk < Hkv; ++hk)
        cost[i * Hkv + hk] = G * blocks[i].nk * (blocks[i].i_end - blocks[i].i_begin + 4);
    const auto order = order_by_cost(cost);
    run_tasks(cost, [&] {
      return [&, w = BwdScratch<acc_t>(D)](int64_t t) mutable {
        key_block(w, blocks[order[t] / Hkv], order[t] % Hkv, nullptr);
      };
    });
  }

  // Pass 2: dQ; one task per (sequence, query head, query block), over the same key tiles.
  {
    struct Task {
      int64_t b, h, i0;
    };
    std::vector<Task> tasks;
    std::vector<int64_t> cost;
    for (int64_t b = 0; b < B; ++b) {
      const Seq& s = g.seqs[b];
      for (int64_t i0 = 0; i0 < s.lq; i0 += kBQ) {
        const int64_t nq = std::min(kBQ, s.lq - i0);
        int64_t lo0, hi0, lo1, hi1;
        mask.range(i0 + s.lk - s.lq, s.lk, lo0, hi0);
        mask.range(i0 + nq - 1 + s.lk - s.lq, s.lk, lo1, hi1);
        for (int64_t h = 0; h < Hq; ++h) {
          tasks.push_back({b, h, i0});
          cost.push_back(nq * (std::max<int64_t>(hi1 - lo0, 0) + 4));
        }
      }
    }
    const auto order = order_by_cost(cost);
    run_tasks(cost, [&] {
      return [&, w = BwdScratch<acc_t>(D)](int64_t t) mutable {
        const Task& task = tasks[order[t]];
        const Seq& s = g.seqs[task.b];
        const int64_t h = task.h, hk = h / G, i0 = task.i0, nq = std::min(kBQ, s.lq - i0);
        const int64_t row0 = h * Tq + s.qs + i0;
        const acc_t* qs = qs_all.get() + row0 * D;
        const acc_t* go = do_all.get() + row0 * D;
        row_ranges(w, s, i0, nq);
        std::fill_n(w.dq.data(), nq * D, acc_t(0));
        const int64_t kend = w.hi[nq - 1];
        for (int64_t kb = w.lo[0] / kBK * kBK; kb < kend; kb += kBK) {
          const int64_t nk = std::min(kBK, s.lk - kb);
          int64_t ra = 0, rb = nq;
          while (ra < nq && !(w.hi[ra] > kb && w.lo[ra] < kb + nk)) ++ra;
          while (rb > ra && !(w.hi[rb - 1] > kb && w.lo[rb - 1] < kb + nk)) --rb;
          if (ra >= rb) continue;
          const int64_t m = rb - ra, col = s.ks + kb;
          gemm(qs + ra * D, D, kt_all.get() + hk * D * ldt + col, ldt, w.s.data() + ra * kBK, kBK, m, nk, D, false);
          gemm(go + ra * D, D, vt_all.get() + hk * D * ldt + col, ldt, w.dp.data() + ra * kBK, kBK, m, nk, D, false);
          probs_and_dscores(w, L + row0, Dvec.get() + row0, ra, rb, kb, nk);
          gemm(w.dp.data() + ra * kBK, kBK, k_all.get() + (hk * Tk + col) * D, D, w.dq.data() + ra * D, D, m, D,
               nk, true);  // dQ += dS K
        }
        for (int64_t r = 0; r < nq; ++r)
          store_row(dQ.row(s.qs + i0 + r, h), w.dq.data() + r * D, D, scale);
      };
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
    int64_t window, const std::optional<at::Tensor>& sinks, double softmax_scale) {
  const auto g = check_varlen(kBwdOp, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, window);
  const auto sink_values = check_sinks(sinks, q, g.Hq, kBwdOp);
  for (auto [t, name] : {std::pair{&grad_out, "grad_out"}, std::pair{&out, "out"}}) {
    check_same_device(*t, q, kBwdOp, name, "q");
    check_same_dtype(*t, q, kBwdOp, name, "q");
    OSSRL_CHECK(t->sizes() == q.sizes(), kBwdOp, name, " must have the shape of q ", q.sizes(),
                ", got ", t->sizes());
  }
  check_same_device(lse, q, kBwdOp, "lse", "q");
  OSSRL_CHECK(lse.scalar_type() == lse_dtype(q), kBwdOp, "lse must be ", lse_dtype(q),
              " (as the forward returns it), got ", lse.scalar_type());
  OSSRL_CHECK(lse.dim() == 2 && lse.size(0) == g.Hq && lse.size(1) == g.Tq, kBwdOp,
              "lse must have shape (Hq, Tq) = (", g.Hq, ", ", g.Tq, "), got ", lse.sizes());
  auto dq = at::empty({g.Tq, g.Hq, g.D}, q.options());
  auto dk = at::empty({g.Tk, g.Hkv, g.D}, k.options());
  auto dv = at::empty({g.Tk, g.Hkv, g.D}, v.options());
  auto dsinks = at::empty({sinks.has_value() ? g.Hq : 0}, q.options().dtype(lse_dtype(q)));
  const auto lse_c = lse.contiguous();
  const Mask mask{causal, window};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "varlen_attention_backward", [&] {
    varlen_bwd_impl<scalar_t>(g, grad_out, q, k, v, out, lse_c, mask, sink_values, softmax_scale,
                              dq, dk, dv, dsinks);
  });
  return {dq, dk, dv, dsinks};
}

// ---------------------------------------------------------------------------------------------
// Paged KV cache

struct PagedGeom {
  int64_t num_blocks, block_size, Hkv, D, max_blocks;
};

PagedGeom check_cache(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& block_table, int64_t B) {
  check_dim(k_cache, 4, op, "k_cache");
  check_float(k_cache, op, "k_cache");
  OSSRL_CHECK(v_cache.sizes() == k_cache.sizes(), op, "v_cache must have the shape of k_cache ",
              k_cache.sizes(), ", got ", v_cache.sizes());
  check_same_dtype(v_cache, k_cache, op, "v_cache", "k_cache");
  check_same_device(v_cache, k_cache, op, "v_cache", "k_cache");
  check_same_device(block_table, k_cache, op, "block_table", "k_cache");
  check_int32(block_table, op, "block_table");
  check_dim(block_table, 2, op, "block_table");
  check_size(block_table, 0, B, op, "block_table", "the number of sequences");
  PagedGeom pg{k_cache.size(0), k_cache.size(1), k_cache.size(2), k_cache.size(3), block_table.size(1)};
  OSSRL_CHECK(pg.block_size >= 1 && pg.Hkv >= 1 && pg.D >= 1, op,
              "k_cache must be (num_blocks, block_size, Hkv, D) with positive block_size, Hkv and D, "
              "got ", k_cache.sizes());
  return pg;
}

// Entries [first, last] of row b of the block table must name existing blocks.
void check_blocks(const char* op, const std::vector<int32_t>& bt, const PagedGeom& pg, int64_t b,
                  int64_t first, int64_t last) {
  for (int64_t i = first; i <= last; ++i) {
    const int32_t blk = bt[b * pg.max_blocks + i];
    OSSRL_CHECK_VALUE(blk >= 0 && blk < pg.num_blocks, op, "block_table[", b, ", ", i, "] = ", blk,
                      " is out of range [0, ", pg.num_blocks, ")");
  }
}

template <typename scalar_t>
struct PagedView {
  scalar_t* p;
  int64_t s0, s1, s2, s3, block_size, max_blocks;
  const int32_t* bt;
  PagedView(const at::Tensor& c, const std::vector<int32_t>& table, int64_t max_blocks_)
      : p(static_cast<scalar_t*>(c.data_ptr())), s0(c.stride(0)), s1(c.stride(1)), s2(c.stride(2)),
        s3(c.stride(3)), block_size(c.size(1)), max_blocks(max_blocks_), bt(table.data()) {}
  // Token j of sequence b, kv head hk.
  OSSRL_INLINE scalar_t* row(int64_t b, int64_t j, int64_t hk) const {
    const int64_t blk = bt[b * max_blocks + j / block_size];
    return p + blk * s0 + (j % block_size) * s1 + hk * s2;
  }
};

void paged_kv_append_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& block_table,
                         const at::Tensor& cu_seqlens, const at::Tensor& cache_seqlens) {
  const char* op = kAppendOp;
  check_int32(cache_seqlens, op, "cache_seqlens");
  check_dim(cache_seqlens, 1, op, "cache_seqlens");
  const int64_t B = cache_seqlens.size(0);
  const auto pg = check_cache(op, k_cache, v_cache, block_table, B);
  check_dim(k, 3, op, "k");
  check_dim(v, 3, op, "v");
  check_same_dtype(k, k_cache, op, "k", "k_cache");
  check_same_dtype(v, k_cache, op, "v", "k_cache");
  for (auto [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}, std::pair{&cu_seqlens, "cu_seqlens"},
                         std::pair{&cache_seqlens, "cache_seqlens"}})
    check_same_device(*t, k_cache, op, name, "k_cache");
  OSSRL_CHECK(k.size(1) == pg.Hkv && k.size(2) == pg.D, op, "k must be (T, Hkv, D) = (T, ", pg.Hkv,
              ", ", pg.D, ") to match k_cache, got ", k.sizes());
  OSSRL_CHECK(v.sizes() == k.sizes(), op, "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  const int64_t T = k.size(0);
  check_cu_seqlens(cu_seqlens, T, op, "cu_seqlens", "the number of new tokens k.shape[0]");
  check_size(cu_seqlens, 0, B + 1, op, "cu_seqlens", "len(cache_seqlens) + 1");
  check_separate_caches(k_cache, v_cache, op);
  const auto cu = int_values(cu_seqlens), start = int_values(cache_seqlens), bt = int_values(block_table);
  const int64_t capacity = pg.max_blocks * pg.block_size;
  std::vector<std::pair<int32_t, int64_t>> written;  // (block, sequence) of every block an append writes
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = cu[b + 1] - cu[b];
    OSSRL_CHECK_VALUE(start[b] >= 0, op, "cache_seqlens[", b, "] = ", start[b], " is negative");
    OSSRL_CHECK_VALUE(start[b] + n <= capacity, op, "sequence ", b, " would hold ", start[b] + n,
                      " tokens, more than its block_table row holds (", pg.max_blocks, " blocks of ",
                      pg.block_size, ")");
    if (n == 0) continue;
    const int64_t first = start[b] / pg.block_size, last = (start[b] + n - 1) / pg.block_size;
    check_blocks(op, bt, pg, b, first, last);
    for (int64_t i = first; i <= last; ++i) written.emplace_back(bt[b * pg.max_blocks + i], b);
  }
  // Two sequences may read a shared block, never both write into it (on CUDA they would race;
  // the CUDA op does not check this: it would need the block table on the host).
  std::sort(written.begin(), written.end());
  for (size_t i = 1; i < written.size(); ++i)
    OSSRL_CHECK_VALUE(written[i].first != written[i - 1].first || written[i].second == written[i - 1].second, op,
                      "sequences ", written[i - 1].second, " and ", written[i].second, " both append into block ",
                      written[i].first, " of the cache");
  if (T == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "paged_kv_append", [&] {
    const PagedView<scalar_t> KC(k_cache, bt, pg.max_blocks), VC(v_cache, bt, pg.max_blocks);
    const View3<scalar_t> Kn(k), Vn(v);
    const int64_t D = pg.D;
    at::parallel_for(0, T, std::max<int64_t>(1, (1 << 16) / (pg.Hkv * D)), [&](int64_t t0, int64_t t1) {
      int64_t b = std::upper_bound(cu.begin(), cu.end(), static_cast<int32_t>(t0)) - cu.begin() - 1;
      for (int64_t t = t0; t < t1; ++t) {
        while (t >= cu[b + 1]) ++b;
        const int64_t pos = start[b] + (t - cu[b]);
        for (int64_t h = 0; h < pg.Hkv; ++h) {
          scalar_t* kd = KC.row(b, pos, h);
          scalar_t* vd = VC.row(b, pos, h);
          const scalar_t* ks = Kn.row(t, h);
          const scalar_t* vs = Vn.row(t, h);
          for (int64_t d = 0; d < D; ++d) {
            kd[d * KC.s3] = ks[d * Kn.s2];
            vd[d * VC.s3] = vs[d * Vn.s2];
          }
        }
      }
    });
  });
}

template <typename scalar_t>
void paged_fwd_impl(const at::Tensor& q, const PagedGeom& pg, const at::Tensor& k_cache,
                    const at::Tensor& v_cache, const std::vector<int32_t>& bt,
                    const std::vector<Seq>& seqs, const Mask& mask, const std::vector<double>& sinks,
                    double softmax_scale, at::Tensor& out) {
  using acc_t = acc_of<scalar_t>;
  const View3<scalar_t> Q(q), O(out);
  const PagedView<scalar_t> KC(k_cache, bt, pg.max_blocks), VC(v_cache, bt, pg.max_blocks);
  const int64_t Hq = q.size(1), Hkv = pg.Hkv, G = Hq / Hkv, D = pg.D;
  const acc_t scale = static_cast<acc_t>(softmax_scale);
  const bool has_sink = !sinks.empty();
  const int64_t qc = std::max<int64_t>(1, kBQ / G);  // queries per chunk
  const int64_t rows_max = qc * G;

  // Chunks of (sequence, kv head, queries) and their key splits.
  struct Chunk {
    int64_t b, hk, i0, nq, kbeg, kend, split, first_task, nsplit, part;  // part: first partial slot or -1
  };
  std::vector<Chunk> chunks;
  int64_t total_work = 0;
  for (int64_t b = 0; b < static_cast<int64_t>(seqs.size()); ++b) {
    const Seq& s = seqs[b];
    for (int64_t i0 = 0; i0 < s.lq; i0 += qc) {
      const int64_t nq = std::min(qc, s.lq - i0);
      int64_t lo0, hi0, lo1, hi1;
      mask.range(i0 + s.lk - s.lq, s.lk, lo0, hi0);
      mask.range(i0 + nq - 1 + s.lk - s.lq, s.lk, lo1, hi1);
      for (int64_t hk = 0; hk < Hkv; ++hk) {
        chunks.push_back({b, hk, i0, nq, lo0, std::max(lo0, hi1), 0, 0, 1, -1});
        total_work += nq * G * std::max<int64_t>(hi1 - lo0, 0);
      }
    }
  }
  const int64_t threads = at::get_num_threads();
  const int64_t target_tasks = std::max<int64_t>(4 * threads, 1);
  constexpr int64_t kMinSplit = 4 * kBK;
  std::vector<int64_t> task_chunk, task_kb, task_ke, cost;
  int64_t parts = 0;
  for (int64_t c = 0; c < static_cast<int64_t>(chunks.size()); ++c) {
    Chunk& ch = chunks[c];
    const int64_t range = ch.kend - ch.kbeg;
    const int64_t work = ch.nq * G * range;
    int64_t want = total_work > 0 ? (target_tasks * work + total_work - 1) / total_work : 1;
    want = std::clamp<int64_t>(want, 1, std::max<int64_t>(1, range / kMinSplit));
    const int64_t split = std::max<int64_t>(kBK, ((range + want - 1) / want + kBK - 1) / kBK * kBK);
    ch.split = split;
    ch.nsplit = range > 0 ? (range + split - 1) / split : 1;
    ch.first_task = static_cast<int64_t>(task_chunk.size());
    if (ch.nsplit > 1) {
      ch.part = parts;
      parts += ch.nsplit;
    }
    for (int64_t sidx = 0; sidx < ch.nsplit; ++sidx) {
      const int64_t kb = ch.kbeg + sidx * split;
      task_chunk.push_back(c);
      task_kb.push_back(kb);
      task_ke.push_back(std::min(ch.kend, kb + split));
      cost.push_back(ch.nq * G * (std::min(ch.kend, kb + split) - kb + 4));
    }
  }
  // Partial results of split chunks: running max, sum and unnormalised output per row.
  std::vector<acc_t> part_m(parts * rows_max), part_l(parts * rows_max), part_o(parts * rows_max * D);

  const auto order = order_by_cost(cost);
  run_tasks(cost, [&] {
    return [&, w = FwdScratch<acc_t>(rows_max, D, true)](int64_t t) mutable {
      const int64_t task = order[t];
      const Chunk& ch = chunks[task_chunk[task]];
      const Seq& s = seqs[ch.b];
      const int64_t off = s.lk - s.lq, nrows = ch.nq * G;
      for (int64_t qi = 0; qi < ch.nq; ++qi)
        for (int64_t gi = 0; gi < G; ++gi) {
          const int64_t r = qi * G + gi;
          load_row(w.qs.data() + r * D, Q.row(s.qs + ch.i0 + qi, ch.hk * G + gi), Q.s2, D, scale);
          mask.range(ch.i0 + qi + off, s.lk, w.lo[r], w.hi[r]);
        }
      auto tile = [&](int64_t kb, int64_t nk) {
        for (int64_t j = 0; j < nk; ++j) {
          load_col(w.kt.data() + j, kBK, KC.row(ch.b, kb + j, ch.hk), KC.s3, D);
          load_row(w.v.data() + j * D, VC.row(ch.b, kb + j, ch.hk), VC.s3, D, acc_t(1));
        }
        return KeyTile<acc_t>{w.kt.data(), kBK, w.v.data(), D};
      };
      attend_rows(w, nrows, task_kb[task], task_ke[task], tile);
      if (ch.nsplit == 1) {
        for (int64_t r = 0; r < nrows; ++r) {
          const int64_t h = ch.hk * G + r % G;
          acc_t row_lse, oscale;
          finish_row(w.m[r], w.l[r], has_sink, has_sink ? static_cast<acc_t>(sinks[h]) : acc_t(0),
                     row_lse, oscale);
          store_row(O.row(s.qs + ch.i0 + r / G, h), w.o.data() + r * D, D, oscale);
        }
      } else {
        const int64_t slot = ch.part + (task - ch.first_task);
        std::copy_n(w.m.data(), nrows, part_m.data() + slot * rows_max);
        std::copy_n(w.l.data(), nrows, part_l.data() + slot * rows_max);
        std::copy_n(w.o.data(), nrows * D, part_o.data() + slot * rows_max * D);
      }
    };
  });

  // Merge the splits with their log-sum-exp, the sink joining the denominator.
  std::vector<int64_t> split_chunks;
  for (int64_t c = 0; c < static_cast<int64_t>(chunks.size()); ++c)
    if (chunks[c].nsplit > 1) split_chunks.push_back(c);
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, static_cast<int64_t>(split_chunks.size()), 16, [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> acc(D);
    for (int64_t ci = c0; ci < c1; ++ci) {
      const Chunk& ch = chunks[split_chunks[ci]];
      const Seq& s = seqs[ch.b];
      for (int64_t r = 0; r < ch.nq * G; ++r) {
        acc_t M = -kInf;
        for (int64_t sp = 0; sp < ch.nsplit; ++sp) M = std::max(M, part_m[(ch.part + sp) * rows_max + r]);
        acc_t l = 0;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        if (M != -kInf) {
          for (int64_t sp = 0; sp < ch.nsplit; ++sp) {
            const int64_t slot = ch.part + sp;
            const acc_t ms = part_m[slot * rows_max + r];
            if (ms == -kInf) continue;
            const acc_t e = std::exp(ms - M);
            l += part_l[slot * rows_max + r] * e;
            const acc_t* o = part_o.data() + (slot * rows_max + r) * D;
            for (int64_t d = 0; d < D; ++d) acc[d] += o[d] * e;
          }
        }
        const int64_t h = ch.hk * G + r % G;
        acc_t row_lse, oscale;
        finish_row(M, l, has_sink, has_sink ? static_cast<acc_t>(sinks[h]) : acc_t(0), row_lse, oscale);
        store_row(O.row(s.qs + ch.i0 + r / G, h), acc.data(), D, oscale);
      }
    }
  });
}

at::Tensor paged_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& block_table,
                               const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens,
                               int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
                               int64_t window, const std::optional<at::Tensor>& sinks,
                               double softmax_scale) {
  const char* op = kPagedOp;
  check_dim(q, 3, op, "q");
  check_float(q, op, "q");
  check_int32(seq_lens, op, "seq_lens");
  check_dim(seq_lens, 1, op, "seq_lens");
  const int64_t B = seq_lens.size(0);
  for (auto [t, name] : {std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"},
                         std::pair{&block_table, "block_table"}, std::pair{&cu_seqlens_q, "cu_seqlens_q"},
                         std::pair{&seq_lens, "seq_lens"}})
    check_same_device(*t, q, op, name, "q");
  const auto pg = check_cache(op, k_cache, v_cache, block_table, B);
  check_same_dtype(k_cache, q, op, "k_cache", "q");
  const int64_t Tq = q.size(0), Hq = q.size(1);
  OSSRL_CHECK(Hq >= 1 && Hq % pg.Hkv == 0, op, "the query heads (", Hq,
              ") must be a positive multiple of the key/value heads of the cache (", pg.Hkv, ")");
  check_size(q, 2, pg.D, op, "q", "the head dim of k_cache");
  check_window(window, op);
  const auto sink_values = check_sinks(sinks, q, Hq, op);
  check_cu_seqlens(cu_seqlens_q, Tq, op, "cu_seqlens_q", "the number of query tokens q.shape[0]");
  check_size(cu_seqlens_q, 0, B + 1, op, "cu_seqlens_q", "len(seq_lens) + 1");
  const auto cq = int_values(cu_seqlens_q), lens = int_values(seq_lens), bt = int_values(block_table);
  const int64_t capacity = pg.max_blocks * pg.block_size;
  const Mask mask{causal, window};
  std::vector<Seq> seqs(B);
  for (int64_t b = 0; b < B; ++b) {
    Seq s{cq[b], cq[b + 1] - cq[b], 0, lens[b]};
    OSSRL_CHECK_VALUE(s.lk >= 0, op, "seq_lens[", b, "] = ", s.lk, " is negative");
    OSSRL_CHECK_VALUE(s.lk <= capacity, op, "seq_lens[", b, "] = ", s.lk, " exceeds what its ",
                      "block_table row holds (", pg.max_blocks, " blocks of ", pg.block_size, ")");
    OSSRL_CHECK_VALUE(s.lq <= max_seqlen_q, op, "max_seqlen_q (", max_seqlen_q,
                      ") is smaller than sequence ", b, "'s ", s.lq, " queries");
    OSSRL_CHECK_VALUE(s.lk <= max_seqlen_k, op, "max_seqlen_k (", max_seqlen_k,
                      ") is smaller than sequence ", b, "'s ", s.lk, " keys");
    if (s.lq > 0) {  // only the blocks the queries can see are read, so only those are checked
      int64_t lo0, hi0, lo1, hi1;
      mask.range(s.lk - s.lq, s.lk, lo0, hi0);
      mask.range(s.lk - 1, s.lk, lo1, hi1);
      if (hi1 > lo0) check_blocks(op, bt, pg, b, lo0 / pg.block_size, (hi1 - 1) / pg.block_size);
    }
    seqs[b] = s;
  }
  auto out = at::empty({Tq, Hq, pg.D}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "paged_attention", [&] {
    paged_fwd_impl<scalar_t>(q, pg, k_cache, v_cache, bt, seqs, mask, sink_values, softmax_scale, out);
  });
  return out;
}

}  // namespace
}  // namespace ossrl

TORCH_LIBRARY_IMPL(ossrl, CPU, m) {
  m.impl("varlen_attention", &ossrl::varlen_attention_cpu);
  m.impl("varlen_attention_backward", &ossrl::varlen_attention_backward_cpu);
  m.impl("paged_kv_append", &ossrl::paged_kv_append_cpu);
  m.impl("paged_attention", &ossrl::paged_attention_cpu);
}
