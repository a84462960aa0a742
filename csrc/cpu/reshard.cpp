// multi_tensor_copy_ on the CPU: dsts[i].copy_(srcs[i]) for every i in one fused parallel pass.
//
// The argument checks and the dimension coalescing live here and are shared with
// csrc/cuda/reshard.cu (it declares validate_multi_tensor_copy and coalesce_copy_dims; this file
// is always compiled whenever that one is, since both belong to the "reshard" area).
//
// Semantics, identical on both devices:
//   * len(dsts) == len(srcs); dsts[i].shape == srcs[i].shape exactly (no broadcasting);
//   * every tensor on one device; strided layout; any strides (transposed, sliced, interleaved
//     views such as w[..., ::2]);
//   * same dtype of any type (a bitwise copy), or a cast between float32, float16, bfloat16 and
//     float64 with the rounding of Tensor.copy_;
//   * destinations must not overlap each other or themselves, and no destination may overlap a
//     source unless the pair is identical (same memory, shape, strides and dtype: then nothing is
//     written). Overlap is decided exactly, so gate = w[..., ::2] and up = w[..., 1::2] can be
//     written together.
//   * everything is checked before any byte is written.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/bit_cast.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#include "ossrl/check.h"

namespace ossrl::reshard {

namespace {

constexpr const char* kOp = "multi_tensor_copy_";

bool is_cast_float(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble;
}

int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}
int64_t ceil_div(int64_t a, int64_t b) {  // b > 0
  return -floor_div(-a, b);
}

// The bytes a tensor may touch: [lo, hi) as addresses. Strides are never negative in torch.
struct Extent {
  int64_t lo = 0;
  int64_t hi = 0;
};

Extent extent_of(const at::Tensor& t) {
  const int64_t isz = static_cast<int64_t>(t.element_size());
  int64_t span = 0;
  for (int64_t d = 0; d < t.dim(); ++d) span += (t.size(d) - 1) * t.stride(d);
  Extent e;
  e.lo = static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.data_ptr()));
  e.hi = e.lo + (span + 1) * isz;
  return e;
}

// Exact test of whether two strided tensors (non-empty) share a byte. An element of a at byte
// address pa and one of b at pb overlap iff pa - pb lies in [-isz_a + 1, isz_b - 1], i.e.
// sum_k v_k * stride_k lies in a target interval, with one integer variable per distinct byte
// stride (a's indices positive, b's negative). A depth-first search from the largest stride
// down prunes on the reachable range of the remaining variables and on their gcd, so layouts
// such as the even/odd columns of one tensor are separated at once. Returns 0 (disjoint),
// 1 (overlap) or 2 (undecided within the search budget: treated as an overlap).
struct Var {
  int64_t stride;  // bytes, > 0
  int64_t lo;
  int64_t hi;
};

struct OverlapSearch {
  std::vector<Var> vars;
  std::vector<int64_t> min_rest, max_rest, gcd_rest;
  int64_t budget = 1 << 16;

  int dfs(size_t k, int64_t tlo, int64_t thi) {
    if (k == vars.size()) return (tlo <= 0 && 0 <= thi) ? 1 : 0;
    if (thi < min_rest[k] || tlo > max_rest[k]) return 0;
    const int64_t g = gcd_rest[k];
    if (floor_div(thi, g) * g < tlo) return 0;
    if (--budget < 0) return 2;
    const Var& v = vars[k];
    const int64_t vlo = std::max(v.lo, ceil_div(tlo - max_rest[k + 1], v.stride));
    const int64_t vhi = std::min(v.hi, floor_div(thi - min_rest[k + 1], v.stride));
    int undecided = 0;
    for (int64_t x = vlo; x <= vhi; ++x) {
      int r = dfs(k + 1, tlo - x * v.stride, thi - x * v.stride);
      if (r == 1) return 1;
      if (r == 2) {
        undecided = 2;
        break;
      }
    }
    return undecided;
  }
};

int tensors_overlap(const at::Tensor& a, const at::Tensor& b) {
  const Extent ea = extent_of(a), eb = extent_of(b);
  if (ea.hi <= eb.lo || eb.hi <= ea.lo) return 0;
  const int64_t isa = static_cast<int64_t>(a.element_size());
  const int64_t isb = static_cast<int64_t>(b.element_size());
  OverlapSearch s;
  auto add = [&](int64_t stride, int64_t lo, int64_t hi) {
    for (auto& v : s.vars) {
      if (v.stride == stride) {
        v.lo += lo;
        v.hi += hi;
        return;
      }
    }
    s.vars.push_back({stride, lo, hi});
  };
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != 0) add(a.stride(d) * isa, 0, a.size(d) - 1);
  for (int64_t d = 0; d < b.dim(); ++d)
    if (b.size(d) > 1 && b.stride(d) != 0) add(b.stride(d) * isb, -(b.size(d) - 1), 0);
  std::sort(s.vars.begin(), s.vars.end(),
            [](const Var& x, const Var& y) { return x.stride > y.stride; });
  const size_t n = s.vars.size();
  s.min_rest.assign(n + 1, 0);
  s.max_rest.assign(n + 1, 0);
  s.gcd_rest.assign(n + 1, 1);
  int64_t g = 0;
  for (size_t k = n; k-- > 0;) {
    s.min_rest[k] = s.min_rest[k + 1] + s.vars[k].lo * s.vars[k].stride;
    s.max_rest[k] = s.max_rest[k + 1] + s.vars[k].hi * s.vars[k].stride;
    g = std::gcd(g, s.vars[k].stride);
    s.gcd_rest[k] = g;
  }
  const int64_t delta = eb.lo - ea.lo;  // b0 - a0
  return s.dfs(0, delta - isa + 1, delta + isb - 1);
}

// A destination must not write one element twice: after sorting its dimensions by stride each
// stride must exceed the span of all smaller ones (the layout of every view torch can make
// without expand/as_strided tricks).
bool has_internal_overlap(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;  // max offset reachable with the smaller strides
  for (auto [stride, size] : dims) {
    if (stride <= span) return true;
    span += stride * (size - 1);
  }
  return false;
}

bool identical(const at::Tensor& a, const at::Tensor& b) {
  return a.data_ptr() == b.data_ptr() && a.scalar_type() == b.scalar_type() &&
         a.sizes() == b.sizes() && a.strides() == b.strides();
}

}  // namespace

// Checks every argument and returns the indices of the pairs that need copying (non-empty and
// not identical). Throws before anything is written. Shared with the CUDA kernel.
std::vector<int64_t> validate_multi_tensor_copy(at::TensorList dsts, at::TensorList srcs) {
  const int64_t n = static_cast<int64_t>(dsts.size());
  OSSRL_CHECK(dsts.size() == srcs.size(), kOp, "got ", dsts.size(), " destinations but ",
              srcs.size(), " sources");
  std::vector<int64_t> todo;
  if (n == 0) return todo;
  OSSRL_CHECK(dsts[0].defined(), kOp, "dsts[0] is undefined");
  const at::Device device = dsts[0].device();
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& d = dsts[i];
    const at::Tensor& s = srcs[i];
    OSSRL_CHECK(d.defined() && s.defined(), kOp, "dsts[", i, "] and srcs[", i,
                "] must be defined tensors");
    OSSRL_CHECK(d.layout() == at::kStrided && s.layout() == at::kStrided, kOp, "dsts[", i,
                "] and srcs[", i, "] must be strided (dense) tensors, got layouts ", d.layout(),
                " and ", s.layout());
    OSSRL_CHECK(!d.is_quantized() && !s.is_quantized(), kOp, "dsts[", i, "] and srcs[", i,
                "] must not be quantized tensors");
    OSSRL_CHECK(d.device() == device, kOp, "dsts[", i, "] is on ", d.device(),
                " but dsts[0] is on ", device);
    OSSRL_CHECK(s.device() == device, kOp, "srcs[", i, "] is on ", s.device(),
                " but dsts[0] is on ", device);
    OSSRL_CHECK(d.sizes() == s.sizes(), kOp, "dsts[", i, "] has shape ", d.sizes(),
                " but srcs[", i, "] has shape ", s.sizes(), " (no broadcasting)");
    const auto dt = d.scalar_type(), st = s.scalar_type();
    OSSRL_CHECK(dt == st || (is_cast_float(dt) && is_cast_float(st)), kOp,
                "cannot cast srcs[", i, "] (", st, ") to dsts[", i, "] (", dt,
                "): casts are supported between float32, float16, bfloat16 and float64; "
                "other dtypes must match");
    OSSRL_CHECK(!has_internal_overlap(d), kOp, "dsts[", i,
                "] has elements that share memory (an expanded or self-overlapping view, "
                "shape ", d.sizes(), ", strides ", d.strides(), ")");
    if (d.numel() > 0 && !identical(d, s)) todo.push_back(i);
  }

  // Overlaps: sweep the byte extents of every non-empty destination and every source of a pair
  // that will be written, in address order; test the pairs whose extents intersect exactly.
  struct Item {
    Extent e;
    int64_t index;
    bool is_dst;
    bool written;
  };
  std::vector<Item> items;
  std::vector<char> written(n, 0);
  for (int64_t i : todo) written[i] = 1;
  for (int64_t i = 0; i < n; ++i) {
    if (dsts[i].numel() == 0) continue;
    items.push_back({extent_of(dsts[i]), i, true, written[i] != 0});
    if (written[i]) items.push_back({extent_of(srcs[i]), i, false, true});
  }
  std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    return a.e.lo < b.e.lo || (a.e.lo == b.e.lo && a.index < b.index);
  });
  std::vector<size_t> active;
  for (size_t k = 0; k < items.size(); ++k) {
    const Item& cur = items[k];
    active.erase(std::remove_if(active.begin(), active.end(),
                                [&](size_t a) { return items[a].e.hi <= cur.e.lo; }),
                 active.end());
    for (size_t a : active) {
      const Item& prev = items[a];
      if (!prev.is_dst && !cur.is_dst) continue;  // sources may overlap each other
      const Item& dst = cur.is_dst ? cur : prev;
      const Item& other = cur.is_dst ? prev : cur;
      if (!other.is_dst && !dst.written) continue;  // an untouched (identical) destination
      const at::Tensor& dt = dsts[dst.index];
      const at::Tensor& ot = other.is_dst ? dsts[other.index] : srcs[other.index];
      const int r = tensors_overlap(dt, ot);
      if (r == 0) continue;
      const char* how = r == 1 ? " overlaps " : " may overlap (layout too irregular to prove "
                                                "otherwise) ";
      if (other.is_dst) {
        const int64_t i = std::min(dst.index, other.index), j = std::max(dst.index, other.index);
        OSSRL_CHECK(false, kOp, "dsts[", i, "]", how, "dsts[", j,
                    "]: destinations must be disjoint");
      }
      OSSRL_CHECK(false, kOp, "dsts[", dst.index, "]", how, "srcs[", other.index,
                  "]: a destination may share memory with a source only when the pair is "
                  "identical (same memory, shape, strides and dtype)");
    }
    active.push_back(k);
  }
  return todo;
}

// Coalesces the dimensions of a (dst, src) pair of equal shape into as few as possible, ordered
// outermost first by destination stride, so writes run along the innermost dimension. Writes
// at most dst.dim() (and at least 1) entries to each array; returns their number.
int64_t coalesce_copy_dims(const at::Tensor& dst, const at::Tensor& src, int64_t* sizes,
                           int64_t* dst_strides, int64_t* src_strides) {
  struct Dim {
    int64_t size, ds, ss;
  };
  std::vector<Dim> dims;
  for (int64_t d = 0; d < dst.dim(); ++d)
    if (dst.size(d) != 1) dims.push_back({dst.size(d), dst.stride(d), src.stride(d)});
  std::stable_sort(dims.begin(), dims.end(), [](const Dim& a, const Dim& b) {
    return a.ds > b.ds || (a.ds == b.ds && a.ss > b.ss);
  });
  if (dims.empty()) dims.push_back({1, 1, 1});
  // Merge from the innermost outwards.
  std::vector<Dim> out;
  for (size_t k = dims.size(); k-- > 0;) {
    const Dim& d = dims[k];
    if (!out.empty()) {
      Dim& inner = out.back();
      if (d.ds == inner.ds * inner.size && d.ss == inner.ss * inner.size) {
        inner.size *= d.size;
        continue;
      }
    }
    out.push_back(d);
  }
  const int64_t nd = static_cast<int64_t>(out.size());
  for (int64_t k = 0; k < nd; ++k) {  // out is innermost first
    const Dim& d = out[nd - 1 - k];
    sizes[k] = d.size;
    dst_strides[k] = d.ds;
    src_strides[k] = d.ss;
  }
  return nd;
}

namespace {

// ---- the CPU copy ----

constexpr int64_t kTile = 32;  // transposing pairs are copied in kTile x kTile blocks

struct Pair {
  char* dst;
  const char* src;
  at::ScalarType dt, st;
  int64_t numel;
  int64_t ndim;
  std::vector<int64_t> sizes, ds, ss;  // elements; outermost first
  bool tiled = false;  // dims [ndim-2, ndim-1]: src contiguous along the first, dst along the last
  int64_t units = 0;   // elements, or tiles when tiled
  int64_t unit = 1;    // work per unit (kTile * kTile when tiled), for the parallel split
};

// A transposing pair: the destination runs along its innermost dim while the source runs along
// another one. Moves that dim next to the innermost so both can be walked in tiles; returns
// whether it did. Only worth it when both sides are long enough to fill a tile.
bool make_tiled(Pair& p) {
  const int64_t nd = p.ndim;
  if (nd < 2 || p.ds[nd - 1] != 1 || p.ss[nd - 1] == 1 || p.sizes[nd - 1] < 8) return false;
  int64_t k = -1;
  for (int64_t j = nd - 2; j >= 0; --j) {
    if (p.ss[j] == 1 && p.sizes[j] >= 8) {
      k = j;
      break;
    }
  }
  if (k < 0) return false;
  for (auto* v : {&p.sizes, &p.ds, &p.ss}) {  // rotate dim k to position nd - 2
    const int64_t x = (*v)[k];
    for (int64_t j = k; j < nd - 2; ++j) (*v)[j] = (*v)[j + 1];
    (*v)[nd - 2] = x;
  }
  p.tiled = true;
  return true;
}

template <int N>
struct Bytes {
  unsigned char b[N];
};

template <typename T>
void copy_run_same(char* d, int64_t dstride, const char* s, int64_t sstride, int64_t n) {
  T* dp = reinterpret_cast<T*>(d);
  const T* sp = reinterpret_cast<const T*>(s);
  if (dstride == 1 && sstride == 1) {
    std::memcpy(dp, sp, static_cast<size_t>(n) * sizeof(T));
    return;
  }
  for (int64_t k = 0; k < n; ++k) dp[k * dstride] = sp[k * sstride];
}

inline uint16_t float_to_bf16_bits(float f) {  // c10's round-to-nearest-even, NaN -> 0x7FC0
  const uint32_t u = c10::bit_cast<uint32_t>(f);
  const uint32_t r = (u + UINT32_C(0x7FFF) + ((u >> 16) & 1)) >> 16;
  return (u & UINT32_C(0x7FFFFFFF)) > UINT32_C(0x7F800000) ? UINT16_C(0x7FC0)
                                                           : static_cast<uint16_t>(r);
}

template <typename D, typename S>
void copy_run_cast(char* d, int64_t dstride, const char* s, int64_t sstride, int64_t n) {
  D* dp = reinterpret_cast<D*>(d);
  const S* sp = reinterpret_cast<const S*>(s);
  if constexpr (std::is_same_v<D, c10::BFloat16> && std::is_same_v<S, float>) {
    uint16_t* du = reinterpret_cast<uint16_t*>(d);
    if (dstride == 1 && sstride == 1) {
      for (int64_t k = 0; k < n; ++k) du[k] = float_to_bf16_bits(sp[k]);
    } else {
      for (int64_t k = 0; k < n; ++k) du[k * dstride] = float_to_bf16_bits(sp[k * sstride]);
    }
  } else {
    // static_cast reproduces Tensor.copy_ (double -> bf16/fp16 goes through float, as ATen does).
    if (dstride == 1 && sstride == 1) {
      for (int64_t k = 0; k < n; ++k) dp[k] = static_cast<D>(sp[k]);
    } else {
      for (int64_t k = 0; k < n; ++k) dp[k * dstride] = static_cast<D>(sp[k * sstride]);
    }
  }
}

using RunFn = void (*)(char*, int64_t, const char*, int64_t, int64_t);

template <typename D>
RunFn pick_cast_src(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return &copy_run_cast<D, float>;
    case at::kDouble: return &copy_run_cast<D, double>;
    case at::kHalf: return &copy_run_cast<D, c10::Half>;
    case at::kBFloat16: return &copy_run_cast<D, c10::BFloat16>;
    default: return nullptr;
  }
}

RunFn pick_run(at::ScalarType dt, at::ScalarType st, int64_t itemsize) {
  if (dt == st) {
    switch (itemsize) {
      case 1: return &copy_run_same<uint8_t>;
      case 2: return &copy_run_same<uint16_t>;
      case 4: return &copy_run_same<uint32_t>;
      case 8: return &copy_run_same<uint64_t>;
      case 16: return &copy_run_same<Bytes<16>>;
      default: return nullptr;
    }
  }
  switch (dt) {
    case at::kFloat: return pick_cast_src<float>(st);
    case at::kDouble: return pick_cast_src<double>(st);
    case at::kHalf: return pick_cast_src<c10::Half>(st);
    case at::kBFloat16: return pick_cast_src<c10::BFloat16>(st);
    default: return nullptr;
  }
}

// Copies elements [begin, end) (row-major over the coalesced dims) of one pair.
void copy_range(const Pair& p, RunFn run, int64_t begin, int64_t end) {
  const int64_t nd = p.ndim;
  const int64_t dsz = c10::elementSize(p.dt), ssz = c10::elementSize(p.st);
  int64_t idx[64];
  int64_t rem = begin, doff = 0, soff = 0;
  for (int64_t k = nd - 1; k >= 0; --k) {
    idx[k] = rem % p.sizes[k];
    rem /= p.sizes[k];
    doff += idx[k] * p.ds[k];
    soff += idx[k] * p.ss[k];
  }
  const int64_t inner = nd - 1;
  int64_t left = end - begin;
  while (left > 0) {
    const int64_t len = std::min(p.sizes[inner] - idx[inner], left);
    run(p.dst + doff * dsz, p.ds[inner], p.src + soff * ssz, p.ss[inner], len);
    left -= len;
    if (left == 0) break;
    // advance: the inner dim wraps to 0, carry outwards
    doff -= idx[inner] * p.ds[inner];
    soff -= idx[inner] * p.ss[inner];
    idx[inner] = 0;
    for (int64_t k = inner - 1; k >= 0; --k) {
      ++idx[k];
      doff += p.ds[k];
      soff += p.ss[k];
      if (idx[k] < p.sizes[k]) break;
      doff -= idx[k] * p.ds[k];
      soff -= idx[k] * p.ss[k];
      idx[k] = 0;
    }
  }
}

// Copies tiles [u0, u1) of a tiled pair: tile rows follow dim ndim-2 (the source's contiguous
// dim), tile columns dim ndim-1 (the destination's); each tile row is one strided run, and the
// kTile source cache lines it touches stay in L1 for the next rows.
void copy_tiles(const Pair& p, RunFn run, int64_t u0, int64_t u1) {
  const int64_t nd = p.ndim;
  const int64_t nr = p.sizes[nd - 2], nc = p.sizes[nd - 1];
  const int64_t tr = (nr + kTile - 1) / kTile, tc = (nc + kTile - 1) / kTile;
  const int64_t dsz = c10::elementSize(p.dt), ssz = c10::elementSize(p.st);
  for (int64_t u = u0; u < u1; ++u) {
    int64_t o = u / (tr * tc);
    const int64_t rem = u % (tr * tc);
    const int64_t r0 = (rem / tc) * kTile, c0 = (rem % tc) * kTile;
    int64_t doff = 0, soff = 0;
    for (int64_t k = nd - 3; k >= 0; --k) {
      const int64_t i = o % p.sizes[k];
      o /= p.sizes[k];
      doff += i * p.ds[k];
      soff += i * p.ss[k];
    }
    const int64_t rn = std::min(kTile, nr - r0), cn = std::min(kTile, nc - c0);
    for (int64_t r = r0; r < r0 + rn; ++r) {
      run(p.dst + (doff + r * p.ds[nd - 2] + c0 * p.ds[nd - 1]) * dsz, p.ds[nd - 1],
          p.src + (soff + r * p.ss[nd - 2] + c0 * p.ss[nd - 1]) * ssz, p.ss[nd - 1], cn);
    }
  }
}

void multi_tensor_copy_cpu(at::TensorList dsts, at::TensorList srcs) {
  const std::vector<int64_t> todo = validate_multi_tensor_copy(dsts, srcs);
  if (todo.empty()) return;
  OSSRL_CHECK(dsts[0].is_cpu(), kOp, "the CPU kernel got tensors on ", dsts[0].device());

  std::vector<Pair> pairs;
  std::vector<RunFn> runs;
  std::vector<int64_t> starts;  // prefix over numel
  pairs.reserve(todo.size());
  int64_t total = 0;
  for (int64_t i : todo) {
    const at::Tensor& d = dsts[i];
    const at::Tensor& s = srcs[i];
    Pair p;
    p.dst = static_cast<char*>(d.data_ptr());
    p.src = static_cast<const char*>(s.data_ptr());
    p.dt = d.scalar_type();
    p.st = s.scalar_type();
    p.numel = d.numel();
    const int64_t cap = std::max<int64_t>(d.dim(), 1);
    p.sizes.resize(cap);
    p.ds.resize(cap);
    p.ss.resize(cap);
    p.ndim = coalesce_copy_dims(d, s, p.sizes.data(), p.ds.data(), p.ss.data());
    OSSRL_CHECK(p.ndim <= 64, kOp, "dsts[", i, "] has more than 64 dimensions");
    RunFn run = pick_run(p.dt, p.st, d.element_size());
    OSSRL_CHECK(run != nullptr, kOp, "unsupported dtypes for dsts[", i, "] (", p.dt,
                ") and srcs[", i, "] (", p.st, ")");
    if (make_tiled(p)) {
      const int64_t nd = p.ndim;
      int64_t outer = 1;
      for (int64_t k = 0; k < nd - 2; ++k) outer *= p.sizes[k];
      p.units = outer * ((p.sizes[nd - 2] + kTile - 1) / kTile) *
                ((p.sizes[nd - 1] + kTile - 1) / kTile);
      p.unit = kTile * kTile;
    } else {
      p.units = p.numel;
      p.unit = 1;
    }
    starts.push_back(total);
    total += p.units * p.unit;  // work, in element-sized units
    pairs.push_back(std::move(p));
    runs.push_back(run);
  }
  starts.push_back(total);

  // One parallel pass over the work of all pairs. A range [begin, end) of work owns the units
  // whose first work index falls inside it, so every unit is copied exactly once.
  constexpr int64_t kGrain = 1 << 15;
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    size_t t = static_cast<size_t>(
        std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1);
    for (; t < pairs.size() && starts[t] < end; ++t) {
      const Pair& p = pairs[t];
      const int64_t lo = std::max(begin, starts[t]) - starts[t];
      const int64_t hi = std::min(end, starts[t + 1]) - starts[t];
      const int64_t u0 = (lo + p.unit - 1) / p.unit, u1 = std::min((hi + p.unit - 1) / p.unit, p.units);
      if (u0 >= u1) continue;
      if (p.tiled) {
        copy_tiles(p, runs[t], u0, u1);
      } else {
        copy_range(p, runs[t], u0, u1);
      }
    }
  });
}

}  // namespace
}  // namespace ossrl::reshard

TORCH_LIBRARY_IMPL(ossrl, CPU, m) {
  m.impl("multi_tensor_copy_", &ossrl::reshard::multi_tensor_copy_cpu);
}
