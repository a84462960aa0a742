// Hopper-native grouped GEMMs (see grouped_gemm_sm90.h) on CUTLASS's persistent, warp-specialised
// ptr-array kernel: TMA loads into a multi-stage shared-memory pipeline, wgmma from shared
// memory, one producer warp and two consumer warpgroups per 128x128 tile, and TMA stores from
// the epilogue. This file is compiled for sm_90a only (wgmma and TMA exist nowhere else).
//
// Why it is shaped so:
// * A one-thread-per-expert kernel writes each expert's problem size, operand pointers and
//   strides from the device-side row bounds, and CUTLASS gets no host copy of the problem sizes:
//   its tile scheduler reads them on the device and it patches the TMA descriptors per group on
//   the device, so there is still no host synchronisation (and a CUDA graph can capture it).
// * An expert without rows gets an empty problem and so no tiles. Its weight gradient (a K = 0
//   problem, which would issue no MMA to clear the accumulators) is zeroed by its own kernel.
// * The ptr-array epilogue has no bias operation, so the bias is an epilogue visitor tree of our
//   own: acc + a row broadcast read through an array of per-expert bias pointers (no array, no
//   bias). The output is rounded once, from fp32.
// * No gather: CUTLASS's TMA loads need each expert's A rows contiguous. grouped_gemm and its
//   two gradients have them; moe_experts gathers its routed rows first (experts_sm90.cu).
// * The host encodes placeholder TMA descriptors; the device rewrites them per expert, so the
//   alignment rules CUTLASS cannot check without host problem sizes are the caller's
//   (sm90_applies).
#include "grouped_gemm_sm90.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

namespace ossrl::moe_cuda::sm90 {
namespace {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

template <typename T, typename LayoutA, typename LayoutB>
struct Config {
  using Tile = Shape<_128, _128, _64>;
  using Cluster = Shape<_1, _1, _1>;  // experts' row counts differ: no multicast partner to share
  static constexpr int kAlign = 8;    // elements per 16 bytes, the TMA's alignment
  using Bias = fusion::Sm90RowBroadcast<0, Tile, T*, float, Stride<_0, _1, _0>, kAlign>;
  using Add = fusion::Sm90Compute<cutlass::plus, T, float, cutlass::FloatRoundStyle::round_to_nearest>;
  using Fusion = fusion::Sm90EVT<Add, fusion::Sm90AccFetch, Bias>;  // acc + bias, rounded once
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor*,
      kAlign, T, cutlass::layout::RowMajor*, kAlign,
      cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, T, LayoutA*, kAlign, T, LayoutB*, kAlign,
      float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;
  using Problem = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Problem, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using Shape3 = typename Problem::UnderlyingProblemShape;
};

// A ptr-array stride has one dynamic mode, the leading dimension; the others are static.
template <typename S>
__host__ __device__ S leading_dim(int64_t ld) {
  S s{};
  if constexpr (is_static_v<decltype(get<0>(S{}))>)
    get<1>(s) = ld;
  else
    get<0>(s) = ld;
  return s;
}

// The per-expert arguments CUTLASS reads on the device.
template <typename C, typename T>
struct Table {
  typename C::Shape3* shape;
  const T** a;
  const T** b;
  T** d;
  const T** bias;
  typename C::StrideA* sa;
  typename C::StrideB* sb;
  typename C::StrideD* sd;
};

// What the GEMM of expert e is, from its rows [bounds[e], bounds[e+1]):
//   forward:     (m, N, K):  A = a rows (ld K), B = b[e] (ld ldb), D = d rows (ld N)
//   weight grad: (K, N, m):  A = a rows^T (ld K), B = b rows (ld N), D = d[e] (ld N)
template <typename C, typename T, bool kWeightGrad>
__global__ void fill_table_kernel(Table<C, T> t, const int32_t* __restrict__ bounds, int E,
                                  int64_t K, int64_t N, int64_t ldb, const T* a, const T* b,
                                  const T* bias, T* d) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= E) return;
  const int64_t r0 = bounds[e], m = bounds[e + 1] - r0;
  if constexpr (kWeightGrad) {
    t.shape[e] = typename C::Shape3{m > 0 ? static_cast<int>(K) : 0, static_cast<int>(N),
                                    static_cast<int>(m)};
    t.a[e] = a + r0 * K;
    t.b[e] = b + r0 * N;
    t.d[e] = d + e * K * N;
  } else {
    t.shape[e] = typename C::Shape3{static_cast<int>(m), static_cast<int>(N), static_cast<int>(K)};
    t.a[e] = a + r0 * K;
    t.b[e] = b + e * K * N;
    t.d[e] = d + r0 * N;
  }
  if (bias) t.bias[e] = bias + e * N;
  t.sa[e] = leading_dim<typename C::StrideA>(K);
  t.sb[e] = leading_dim<typename C::StrideB>(kWeightGrad ? N : ldb);
  t.sd[e] = leading_dim<typename C::StrideD>(N);
}

__global__ void zero_empty_experts_kernel(uint16_t* __restrict__ dw, int64_t per_expert,
                                          const int32_t* __restrict__ bounds, int E) {
  for (int e = blockIdx.y; e < E; e += gridDim.y) {
    if (bounds[e + 1] > bounds[e]) continue;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < per_expert;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)
      dw[e * per_expert + i] = 0;  // +0.0 in bf16 and fp16 alike
  }
}

void check(cutlass::Status status, const char* what) {
  TORCH_CHECK(status == cutlass::Status::kSuccess, "ossrl: CUTLASS sm90 grouped GEMM ", what,
              " failed: ", cutlassGetStatusString(status));
}

template <typename T, typename LayoutA, typename LayoutB, bool kWeightGrad>
void run(const at::Tensor& a, const at::Tensor& b, int64_t ldb, const at::Tensor& bias,
         const int32_t* bounds, int64_t E, int64_t K, int64_t N, at::Tensor& d,
         cudaStream_t stream) {
  using C = Config<T, LayoutA, LayoutB>;
  // One allocation holds the table, each array on its own 128-byte boundary.
  int64_t bytes = 0;
  auto take = [&](size_t each) {
    const int64_t at = bytes;
    bytes += (static_cast<int64_t>(each) * E + 127) / 128 * 128;
    return at;
  };
  const int64_t o_shape = take(sizeof(typename C::Shape3)), o_a = take(sizeof(void*)),
                o_b = take(sizeof(void*)), o_d = take(sizeof(void*)), o_bias = take(sizeof(void*)),
                o_sa = take(sizeof(typename C::StrideA)), o_sb = take(sizeof(typename C::StrideB)),
                o_sd = take(sizeof(typename C::StrideD));
  at::Tensor table = at::empty({bytes}, a.options().dtype(at::kByte));
  auto* base = static_cast<char*>(table.data_ptr());
  Table<C, T> t{reinterpret_cast<typename C::Shape3*>(base + o_shape),
                reinterpret_cast<const T**>(base + o_a),
                reinterpret_cast<const T**>(base + o_b),
                reinterpret_cast<T**>(base + o_d),
                reinterpret_cast<const T**>(base + o_bias),
                reinterpret_cast<typename C::StrideA*>(base + o_sa),
                reinterpret_cast<typename C::StrideB*>(base + o_sb),
                reinterpret_cast<typename C::StrideD*>(base + o_sd)};
  const T* bias_ptr = bias.defined() ? static_cast<const T*>(bias.data_ptr()) : nullptr;
  constexpr int kThreads = 128;
  fill_table_kernel<C, T, kWeightGrad><<<static_cast<unsigned>((E + kThreads - 1) / kThreads),
                                         kThreads, 0, stream>>>(
      t, bounds, static_cast<int>(E), K, N, ldb, static_cast<const T*>(a.data_ptr()),
      static_cast<const T*>(b.data_ptr()), bias_ptr, static_cast<T*>(d.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  cutlass::KernelHardwareInfo hw;
  hw.device_id = d.get_device();
  hw.sm_count = at::cuda::getDeviceProperties(hw.device_id)->multiProcessorCount;
  typename C::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {static_cast<int>(E), t.shape, nullptr},
      {t.a, t.sa, t.b, t.sb},
      {{{}, {bias_ptr ? t.bias : nullptr, T(0), {}}, {}}, nullptr, nullptr, t.d, t.sd},
      hw};
  typename C::Gemm gemm;
  check(gemm.can_implement(args), "can_implement");
  at::Tensor work = at::empty({static_cast<int64_t>(C::Gemm::get_workspace_size(args))},
                              a.options().dtype(at::kByte));
  check(gemm.initialize(args, work.data_ptr(), stream), "initialize");
  check(gemm.run(stream), "run");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename F>
void dispatch(at::ScalarType dtype, const char* op, F&& f) {
  if (dtype == at::kBFloat16)
    f(cutlass::bfloat16_t{});
  else if (dtype == at::kHalf)
    f(cutlass::half_t{});
  else
    TORCH_CHECK(false, "ossrl.", op, ": the CUTLASS sm90 kernels take bfloat16 or float16, not ",
                dtype);
}

}  // namespace

void grouped_gemm(const at::Tensor& x, const at::Tensor& w, bool w_kmajor, const at::Tensor& bias,
                  const int32_t* bounds, at::Tensor& out, cudaStream_t stream) {
  const int64_t E = w.size(0), K = x.size(1), N = w.size(2);
  using Row = cutlass::layout::RowMajor;
  using Col = cutlass::layout::ColumnMajor;
  dispatch(x.scalar_type(), "grouped_gemm", [&](auto tag) {
    using T = decltype(tag);
    if (w_kmajor)
      run<T, Row, Col, false>(x, w, K, bias, bounds, E, K, N, out, stream);
    else
      run<T, Row, Row, false>(x, w, N, bias, bounds, E, K, N, out, stream);
  });
}

void grouped_gemm_dw(const at::Tensor& x, const at::Tensor& dy, const int32_t* bounds,
                     at::Tensor& dw, cudaStream_t stream) {
  const int64_t E = dw.size(0), K = x.size(1), N = dy.size(1);
  using Row = cutlass::layout::RowMajor;
  using Col = cutlass::layout::ColumnMajor;
  dispatch(x.scalar_type(), "grouped_gemm_dw", [&](auto tag) {
    using T = decltype(tag);
    run<T, Col, Row, true>(x, dy, N, at::Tensor(), bounds, E, K, N, dw, stream);
  });
  const int64_t per_expert = K * N;
  if (per_expert == 0) return;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((per_expert + 255) / 256, 64)),
                  static_cast<unsigned>(std::min<int64_t>(E, 65535)));
  zero_empty_experts_kernel<<<grid, 256, 0, stream>>>(static_cast<uint16_t*>(dw.data_ptr()),
                                                      per_expert, bounds, static_cast<int>(E));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace ossrl::moe_cuda::sm90
