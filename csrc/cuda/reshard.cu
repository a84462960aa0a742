// multi_tensor_copy_ on CUDA: dsts[i].copy_(srcs[i]) for every i in one kernel launch.
//
// The host checks the arguments (validate_multi_tensor_copy, shared with the CPU kernel), then
// describes each pair that needs copying by a fixed-size descriptor: pointers, dtypes, and the
// sizes and strides of its dimensions after coalescing (at most kMaxDims; a pair with more is
// split along its outer dimensions into several descriptors). Each descriptor owns a run of
// "block items" (a prefix over the pairs); one grid-stride loop over blocks covers all items of
// all pairs, so a block always works on a single descriptor (uniform control flow):
//   kVec16:       same dtype, both sides contiguous and 16-byte aligned: 16-byte loads/stores;
//   kContigCast:  a cast, both sides contiguous: groups of 4 elements (vector loads/stores when
//                 aligned);
//   kTile:        a transposing pair (the destination runs along one dim, the source along
//                 another): 32x32 tiles through shared memory, both sides coalesced;
//   kGeneric:     anything else: one element per thread, offsets from its coalesced index.
// A few descriptors travel by value in the kernel parameters; more go through a pinned host
// buffer copied asynchronously on the current stream. Every index is checked against its
// descriptor's element count, so no thread reads or writes outside its pair.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ossrl/cuda_arch.h"
#include "ossrl/check.h"

namespace ossrl::reshard {

// Defined in csrc/cpu/reshard.cpp (always compiled with this file: same area).
std::vector<int64_t> validate_multi_tensor_copy(at::TensorList dsts, at::TensorList srcs);
int64_t coalesce_copy_dims(const at::Tensor& dst, const at::Tensor& src, int64_t* sizes,
                           int64_t* dst_strides, int64_t* src_strides);

namespace {

constexpr const char* kOp = "multi_tensor_copy_";
constexpr int kMaxDims = 4;
constexpr int kInline = 8;  // descriptors passed by value (kernel parameters stay < 4 KiB)
constexpr int kThreads = 256;
constexpr int kPer = 4;                               // per thread per block item
constexpr int64_t kPerItem = int64_t(kThreads) * kPer;  // elements / groups / 16-byte chunks
constexpr int kTileDim = 32;                          // kTile: 32 x 32 elements per block item

enum Code : int8_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3, kRaw = 4 };
enum Mode : int8_t { kGeneric = 0, kVec16 = 1, kContigCast = 2, kTile = 3 };

struct Desc {
  char* dst;
  const char* src;
  int64_t start;  // first block item of this descriptor
  int64_t items;  // number of block items
  int64_t numel;  // elements
  int64_t tiles_r, tiles_c;  // kTile: tiles along dims ndim-2 and ndim-1
  int64_t sizes[kMaxDims];   // outermost first; only the first ndim are used
  int64_t ds[kMaxDims];      // element strides of dst
  int64_t ss[kMaxDims];      // element strides of src
  int32_t ndim;
  int32_t dsz, ssz;  // element sizes in bytes
  int8_t dt, st;     // Code
  int8_t mode;       // Mode
  int8_t aligned;    // kContigCast: 4-element groups may use vector accesses
  int8_t small;      // numel < 2^31: 32-bit index arithmetic
};

struct InlineTable {
  Desc d[kInline];
  int32_t n;
};

struct GlobalTable {
  const Desc* d;
  int32_t n;
};

// ---- elements as raw bits, and conversions (rounding as Tensor.copy_: through c10 types) ----

__device__ __forceinline__ uint64_t load_raw(const char* p, int32_t size) {
  switch (size) {
    case 1: return *reinterpret_cast<const uint8_t*>(p);
    case 2: return *reinterpret_cast<const uint16_t*>(p);
    case 4: return *reinterpret_cast<const uint32_t*>(p);
    default: return *reinterpret_cast<const uint64_t*>(p);
  }
}

__device__ __forceinline__ void store_raw(char* p, int32_t size, uint64_t v) {
  switch (size) {
    case 1: *reinterpret_cast<uint8_t*>(p) = static_cast<uint8_t>(v); break;
    case 2: *reinterpret_cast<uint16_t*>(p) = static_cast<uint16_t>(v); break;
    case 4: *reinterpret_cast<uint32_t*>(p) = static_cast<uint32_t>(v); break;
    default: *reinterpret_cast<uint64_t*>(p) = v; break;
  }
}

__device__ __forceinline__ float raw_to_float(uint64_t v, int8_t code) {
  switch (code) {
    case kF16:
      return static_cast<float>(c10::Half(static_cast<uint16_t>(v), c10::Half::from_bits()));
    case kBF16:
      return static_cast<float>(
          c10::BFloat16(static_cast<uint16_t>(v), c10::BFloat16::from_bits()));
    default: return __uint_as_float(static_cast<uint32_t>(v));
  }
}

__device__ __forceinline__ uint64_t float_to_raw(float v, int8_t code) {
  switch (code) {
    case kF16: return c10::Half(v).x;
    case kBF16: return c10::BFloat16(v).x;
    case kF64: return static_cast<uint64_t>(__double_as_longlong(static_cast<double>(v)));
    default: return __float_as_uint(v);
  }
}

// The destination bits of one source element (given as raw bits): a cast when the dtypes differ
// (double -> float -> half/bf16, as ATen does), the bits themselves otherwise.
__device__ __forceinline__ uint64_t convert_bits(uint64_t raw, int8_t dt, int8_t st) {
  if (dt == kRaw) return raw;
  if (st == kF64) {
    const double x = __longlong_as_double(static_cast<long long>(raw));
    if (dt == kF64) return raw;
    return float_to_raw(static_cast<float>(x), dt);
  }
  return float_to_raw(raw_to_float(raw, st), dt);
}

// One element, any supported size (16-byte elements are same-dtype copies in two halves).
__device__ __forceinline__ void copy_elem(char* d, const char* s, int32_t dsz, int32_t ssz,
                                          int8_t dt, int8_t st) {
  if (ssz == 16) {
    reinterpret_cast<uint64_t*>(d)[0] = reinterpret_cast<const uint64_t*>(s)[0];
    reinterpret_cast<uint64_t*>(d)[1] = reinterpret_cast<const uint64_t*>(s)[1];
    return;
  }
  store_raw(d, dsz, convert_bits(load_raw(s, ssz), dt, st));
}

// ---- block items, one per mode (descriptor fields are read once into registers) ----

__device__ __forceinline__ void vec16_item(const Desc& ds, int64_t local) {
  char* const dst = ds.dst;
  const char* const src = ds.src;
  const int64_t nbytes = ds.numel * ds.dsz;
  uint4 v[kPer];
  int64_t off[kPer];
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    off[j] = (local * kPerItem + j * kThreads + threadIdx.x) * 16;
    if (off[j] + 16 <= nbytes) v[j] = __ldg(reinterpret_cast<const uint4*>(src + off[j]));
  }
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    if (off[j] + 16 <= nbytes) {
      *reinterpret_cast<uint4*>(dst + off[j]) = v[j];
    } else {
      for (int64_t b = off[j]; b < nbytes; ++b) dst[b] = src[b];  // the tail, < 16 bytes
    }
  }
}

// 4 consecutive source elements of size ssz from one aligned vector load, as raw bits.
__device__ __forceinline__ void load4(const char* s, int32_t ssz, uint64_t r[4]) {
  if (ssz == 2) {
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(s));
    r[0] = u.x & 0xffffu;
    r[1] = u.x >> 16;
    r[2] = u.y & 0xffffu;
    r[3] = u.y >> 16;
  } else if (ssz == 4) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(s));
    r[0] = u.x;
    r[1] = u.y;
    r[2] = u.z;
    r[3] = u.w;
  } else {
    const uint4 a = __ldg(reinterpret_cast<const uint4*>(s));
    const uint4 b = __ldg(reinterpret_cast<const uint4*>(s) + 1);
    r[0] = a.x | (uint64_t(a.y) << 32);
    r[1] = a.z | (uint64_t(a.w) << 32);
    r[2] = b.x | (uint64_t(b.y) << 32);
    r[3] = b.z | (uint64_t(b.w) << 32);
  }
}

// Stores 4 consecutive destination elements of size dsz with one aligned vector store.
__device__ __forceinline__ void store4(char* d, int32_t dsz, const uint64_t r[4]) {
  if (dsz == 2) {
    *reinterpret_cast<uint2*>(d) =
        make_uint2(static_cast<uint32_t>(r[0] | (r[1] << 16)), static_cast<uint32_t>(r[2] | (r[3] << 16)));
  } else if (dsz == 4) {
    *reinterpret_cast<uint4*>(d) = make_uint4(static_cast<uint32_t>(r[0]), static_cast<uint32_t>(r[1]),
                                              static_cast<uint32_t>(r[2]), static_cast<uint32_t>(r[3]));
  } else {
    reinterpret_cast<uint4*>(d)[0] = make_uint4(static_cast<uint32_t>(r[0]), static_cast<uint32_t>(r[0] >> 32),
                                                static_cast<uint32_t>(r[1]), static_cast<uint32_t>(r[1] >> 32));
    reinterpret_cast<uint4*>(d)[1] = make_uint4(static_cast<uint32_t>(r[2]), static_cast<uint32_t>(r[2] >> 32),
                                                static_cast<uint32_t>(r[3]), static_cast<uint32_t>(r[3] >> 32));
  }
}

__device__ __forceinline__ void cast_item(const Desc& ds, int64_t local) {
  char* const dst = ds.dst;
  const char* const src = ds.src;
  const int64_t numel = ds.numel;
  const int32_t dsz = ds.dsz, ssz = ds.ssz;
  const int8_t dt = ds.dt, st = ds.st;
  const bool aligned = ds.aligned;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int64_t e0 = (local * kPerItem + j * kThreads + threadIdx.x) * 4;
    if (e0 >= numel) break;
    const int64_t cnt = numel - e0 < 4 ? numel - e0 : 4;
    char* d = dst + e0 * dsz;
    const char* s = src + e0 * ssz;
    if (cnt == 4 && aligned) {
      uint64_t r[4];
      load4(s, ssz, r);
#pragma unroll
      for (int k = 0; k < 4; ++k) r[k] = convert_bits(r[k], dt, st);
      store4(d, dsz, r);
    } else {
      for (int64_t k = 0; k < cnt; ++k) copy_elem(d + k * dsz, s + k * ssz, dsz, ssz, dt, st);
    }
  }
}

__device__ __forceinline__ void generic_item(const Desc& ds, int64_t local) {
  char* const dst = ds.dst;
  const char* const src = ds.src;
  const int64_t numel = ds.numel;
  const int32_t dsz = ds.dsz, ssz = ds.ssz, nd = ds.ndim;
  const int8_t dt = ds.dt, st = ds.st;
  const bool small = ds.small;
  int64_t n[kMaxDims], dstr[kMaxDims], sstr[kMaxDims];
#pragma unroll
  for (int k = 0; k < kMaxDims; ++k) {
    n[k] = k < nd ? ds.sizes[k] : 1;
    dstr[k] = k < nd ? ds.ds[k] : 0;
    sstr[k] = k < nd ? ds.ss[k] : 0;
  }
#pragma unroll 1  // (unrolling this with the divisions below makes cicc take minutes)
  for (int j = 0; j < kPer; ++j) {
    const int64_t e = local * kPerItem + j * kThreads + threadIdx.x;
    if (e >= numel) break;
    int64_t doff = 0, soff = 0;
    if (small) {  // 32-bit division when the pair has < 2^31 elements
      uint32_t rem = static_cast<uint32_t>(e);
#pragma unroll
      for (int k = kMaxDims - 1; k >= 0; --k) {
        const uint32_t nk = static_cast<uint32_t>(n[k]);
        const uint32_t i = rem % nk;
        rem /= nk;
        doff += static_cast<int64_t>(i) * dstr[k];
        soff += static_cast<int64_t>(i) * sstr[k];
      }
    } else {
      int64_t rem = e;
#pragma unroll
      for (int k = kMaxDims - 1; k >= 0; --k) {
        const int64_t i = rem % n[k];
        rem /= n[k];
        doff += i * dstr[k];
        soff += i * sstr[k];
      }
    }
    copy_elem(dst + doff * dsz, src + soff * ssz, dsz, ssz, dt, st);
  }
}

// One 32x32 tile of a transposing pair. Dim ndim-2 ("rows") is contiguous in the source, dim
// ndim-1 ("columns") in the destination: a warp reads 32 consecutive source elements of one
// column, the block transposes them through shared memory, and a warp writes 32 consecutive
// destination elements of one row. Called by every thread of the block (it synchronises).
__device__ __forceinline__ void tile_item(const Desc& ds, int64_t local,
                                          uint64_t (*tile)[kTileDim + 1]) {
  char* const dst = ds.dst;
  const char* const src = ds.src;
  const int32_t dsz = ds.dsz, ssz = ds.ssz, nd = ds.ndim;
  const int8_t dt = ds.dt, st = ds.st;
  const int64_t nr = ds.sizes[nd - 2], nc = ds.sizes[nd - 1];
  const int64_t dsr = ds.ds[nd - 2], dsc = ds.ds[nd - 1], ssr = ds.ss[nd - 2], ssc = ds.ss[nd - 1];
  const int64_t tiles_c = ds.tiles_c;
  const int64_t per_outer = ds.tiles_r * tiles_c;
  int64_t o = local / per_outer;
  const int64_t rem = local - o * per_outer;
  const int64_t r0 = (rem / tiles_c) * kTileDim, c0 = (rem % tiles_c) * kTileDim;
  int64_t doff = 0, soff = 0;
#pragma unroll
  for (int k = kMaxDims - 3; k >= 0; --k) {
    if (k < nd - 2) {
      const int64_t i = o % ds.sizes[k];
      o /= ds.sizes[k];
      doff += i * ds.ds[k];
      soff += i * ds.ss[k];
    }
  }
  const int lane = threadIdx.x % kTileDim, wy = threadIdx.x / kTileDim;  // 32 x 8 threads
  constexpr int kRowsPerPass = kThreads / kTileDim;
#pragma unroll
  for (int j = 0; j < kTileDim / kRowsPerPass; ++j) {  // load: lanes along rows (source-contiguous)
    const int64_t r = r0 + lane, c = c0 + wy + j * kRowsPerPass;
    if (r < nr && c < nc) tile[c - c0][lane] = load_raw(src + (soff + r * ssr + c * ssc) * ssz, ssz);
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kTileDim / kRowsPerPass; ++j) {  // store: lanes along columns (dst-contiguous)
    const int64_t r = r0 + wy + j * kRowsPerPass, c = c0 + lane;
    if (r < nr && c < nc) {
      store_raw(dst + (doff + r * dsr + c * dsc) * dsz, dsz, convert_bits(tile[lane][r - r0], dt, st));
    }
  }
  __syncthreads();  // the tile is free for the next item
}

// The descriptor holding block item b: the last t with d[t].start <= b.
template <typename Table>
__device__ __forceinline__ int find_desc(const Table& table, int64_t b) {
  int lo = 0, hi = table.n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table.d[mid].start <= b) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Grid-stride over block items. Everything that decides control flow (b, t, mode) depends on
// blockIdx only, so the __syncthreads in tile_item is reached by the whole block.
template <typename Table>
__device__ __forceinline__ void run_items(const Table& table, int64_t total) {
  __shared__ uint64_t tile[kTileDim][kTileDim + 1];
  int t = 0;
  int64_t lo = 0, hi = 0;  // block-item range of descriptor t
  for (int64_t b = blockIdx.x; b < total; b += gridDim.x) {
    if (b < lo || b >= hi) {
      t = find_desc(table, b);
      lo = table.d[t].start;
      hi = lo + table.d[t].items;
      if (b < lo || b >= hi) continue;  // cannot happen with a consistent table
    }
    const Desc& ds = table.d[t];
    const int64_t local = b - lo;
    switch (ds.mode) {
      case kVec16: vec16_item(ds, local); break;
      case kContigCast: cast_item(ds, local); break;
      case kTile: tile_item(ds, local, tile); break;
      default: generic_item(ds, local); break;
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    multi_copy_inline_kernel(const __grid_constant__ InlineTable table, int64_t total) {
  run_items(table, total);
}

__global__ void __launch_bounds__(kThreads)
    multi_copy_global_kernel(const GlobalTable table, int64_t total) {
  run_items(table, total);
}

// ---- host: descriptors ----

int8_t code_of(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default: return -1;
  }
}

bool aligned_to(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Appends the descriptors of one pair (after coalescing), splitting outer dimensions beyond
// kMaxDims into separate descriptors.
void add_pair(std::vector<Desc>& out, int64_t& total, const at::Tensor& d, const at::Tensor& s,
              int64_t index) {
  const int64_t cap = std::max<int64_t>(d.dim(), 1);
  std::vector<int64_t> sizes(cap), ds(cap), ss(cap);
  const int64_t nd = coalesce_copy_dims(d, s, sizes.data(), ds.data(), ss.data());
  OSSRL_CHECK(nd >= 1 && nd <= cap, kOp, "internal error coalescing dsts[", index, "]");
  const int64_t dsz = d.element_size(), ssz = s.element_size();
  const bool same = d.scalar_type() == s.scalar_type();
  int8_t dt = kRaw, st = kRaw;
  if (!same) {
    dt = code_of(d.scalar_type());
    st = code_of(s.scalar_type());
    OSSRL_CHECK(dt >= 0 && st >= 0, kOp, "unsupported cast from srcs[", index, "] (",
                s.scalar_type(), ") to dsts[", index, "] (", d.scalar_type(), ")");
  }
  OSSRL_CHECK((dsz == 1 || dsz == 2 || dsz == 4 || dsz == 8 || dsz == 16) && (same || dsz <= 8),
              kOp, "unsupported element size ", dsz, " for dsts[", index, "]");

  // A transposing pair (destination contiguous along the innermost dim, the source along
  // another) goes through tiles: that other dim moves next to the innermost.
  bool tiled = false;
  if (nd >= 2 && ds[nd - 1] == 1 && ss[nd - 1] != 1 && sizes[nd - 1] >= 8 && dsz <= 8 &&
      ssz <= 8) {
    for (int64_t k = nd - 2; k >= 0 && !tiled; --k) {
      if (ss[k] == 1 && sizes[k] >= 8) {
        for (auto* v : {&sizes, &ds, &ss}) {
          const int64_t x = (*v)[k];
          for (int64_t j = k; j < nd - 2; ++j) (*v)[j] = (*v)[j + 1];
          (*v)[nd - 2] = x;
        }
        tiled = true;
      }
    }
  }

  // Outer dimensions beyond kMaxDims become separate descriptors.
  const int64_t outer = std::max<int64_t>(nd - kMaxDims, 0);
  int64_t outer_count = 1;
  for (int64_t k = 0; k < outer; ++k) outer_count *= sizes[k];
  std::vector<int64_t> oidx(outer, 0);
  char* dbase = static_cast<char*>(d.data_ptr());
  const char* sbase = static_cast<const char*>(s.data_ptr());
  for (int64_t o = 0; o < outer_count; ++o) {
    int64_t doff = 0, soff = 0;
    for (int64_t k = 0; k < outer; ++k) {
      doff += oidx[k] * ds[k];
      soff += oidx[k] * ss[k];
    }
    Desc x;
    std::memset(&x, 0, sizeof(x));
    x.dst = dbase + doff * dsz;
    x.src = sbase + soff * ssz;
    x.ndim = static_cast<int32_t>(nd - outer);
    x.numel = 1;
    for (int64_t k = 0; k < x.ndim; ++k) {
      x.sizes[k] = sizes[outer + k];
      x.ds[k] = ds[outer + k];
      x.ss[k] = ss[outer + k];
      x.numel *= x.sizes[k];
    }
    x.dsz = static_cast<int32_t>(dsz);
    x.ssz = static_cast<int32_t>(ssz);
    x.dt = dt;
    x.st = st;
    x.small = x.numel < (int64_t(1) << 31);
    const bool contig = x.ndim == 1 && x.ds[0] == 1 && x.ss[0] == 1;
    if (contig && same && aligned_to(x.dst, 16) && aligned_to(x.src, 16)) {
      x.mode = kVec16;
      x.items = ceil_div(ceil_div(x.numel * dsz, 16), kPerItem);
    } else if (contig && !same) {
      x.mode = kContigCast;
      x.items = ceil_div(ceil_div(x.numel, 4), kPerItem);
      x.aligned = aligned_to(x.dst, 4 * dsz) && aligned_to(x.src, 4 * ssz);
    } else if (tiled) {
      x.mode = kTile;
      x.tiles_r = ceil_div(x.sizes[x.ndim - 2], kTileDim);
      x.tiles_c = ceil_div(x.sizes[x.ndim - 1], kTileDim);
      int64_t outer_tiles = 1;
      for (int k = 0; k < x.ndim - 2; ++k) outer_tiles *= x.sizes[k];
      x.items = outer_tiles * x.tiles_r * x.tiles_c;
    } else {
      x.mode = kGeneric;
      x.items = ceil_div(x.numel, kPerItem);
    }
    x.start = total;
    total += x.items;
    out.push_back(x);
    for (int64_t k = outer - 1; k >= 0; --k) {  // next outer index
      if (++oidx[k] < sizes[k]) break;
      oidx[k] = 0;
    }
  }
}

void multi_tensor_copy_cuda(at::TensorList dsts, at::TensorList srcs) {
  const std::vector<int64_t> todo = validate_multi_tensor_copy(dsts, srcs);
  if (todo.empty()) return;
  ossrl::cuda::require_kernel_image(dsts[0], "multi_tensor_copy");
  OSSRL_CHECK(dsts[0].is_cuda(), kOp, "the CUDA kernel got tensors on ", dsts[0].device());
  const c10::cuda::CUDAGuard guard(dsts[0].device());

  std::vector<Desc> descs;
  descs.reserve(todo.size());
  int64_t total = 0;  // block items
  for (int64_t i : todo) add_pair(descs, total, dsts[i], srcs[i], i);
  if (total == 0) return;
  OSSRL_CHECK(descs.size() < static_cast<size_t>(INT32_MAX), kOp, "too many tensors");

  auto stream = at::cuda::getCurrentCUDAStream();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(total, int64_t(sms) * 8)));

  // Under CUDA-graph capture a copy from pinned host memory would be replayed from a buffer the
  // host allocator has since reused: there the descriptors go by value, kInline per launch
  // (kernel parameters are part of the graph).
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (descs.size() <= static_cast<size_t>(kInline) || capture != cudaStreamCaptureStatusNone) {
    for (size_t first = 0; first < descs.size(); first += kInline) {
      const size_t n = std::min<size_t>(kInline, descs.size() - first);
      InlineTable table;
      std::memset(&table, 0, sizeof(table));
      std::copy(descs.begin() + first, descs.begin() + first + n, table.d);
      const int64_t base = table.d[0].start;  // this launch's block items, counted from 0
      for (size_t i = 0; i < n; ++i) table.d[i].start -= base;
      const int64_t items = table.d[n - 1].start + table.d[n - 1].items;
      table.n = static_cast<int32_t>(n);
      const int grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(items, int64_t(sms) * 8)));
      multi_copy_inline_kernel<<<grid, kThreads, 0, stream>>>(table, items);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return;
  }
  // The descriptor table: filled in pinned host memory, copied asynchronously on the current
  // stream (copy_ with non_blocking issues cudaMemcpyAsync and records the stream on the
  // pinned block, so the caching host allocator does not reuse it before the copy is done; the
  // device buffer is stream-ordered by the caching allocator).
  const int64_t bytes = static_cast<int64_t>(descs.size() * sizeof(Desc));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), descs.data(), static_cast<size_t>(bytes));
  at::Tensor dev = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(dsts[0].device()));
  dev.copy_(host, /*non_blocking=*/true);
  const GlobalTable table{reinterpret_cast<const Desc*>(dev.data_ptr()),
                          static_cast<int32_t>(descs.size())};
  multi_copy_global_kernel<<<blocks, kThreads, 0, stream>>>(table, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace ossrl::reshard

TORCH_LIBRARY_IMPL(ossrl, CUDA, m) {
  m.impl("multi_tensor_copy_", &ossrl::reshard::multi_tensor_copy_cuda);
}
