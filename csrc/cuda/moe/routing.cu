// CUDA top-k routing (softmax over the top k router logits, a stable counting sort of the (token,
// slot) pairs by expert) and routing to given experts (routing replay).
#include "gemm.cuh"

namespace ossrl::moe_cuda {

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
// Routing

void sort_by_expert_cuda(const at::Tensor& experts, int64_t E, at::Tensor& order, at::Tensor& offsets,
                         cudaStream_t stream, const char* op);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_cuda(
    const at::Tensor& router_logits, int64_t top_k) {
  ossrl::cuda::require_kernel_image(router_logits, "moe_route");
  const char* op = "moe_route";
  check_cuda(router_logits, op, "router_logits");
  const int64_t T = router_logits.size(0), E = check_route(router_logits, top_k, op);
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
  const GivenShapes gs = check_route_given(router_logits, given, op);
  const int64_t T = gs.T, E = gs.E, k = gs.k;
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

}  // namespace ossrl::moe_cuda
