// CUDA grouped GEMM over per-expert row ranges (offsets on the device, no host synchronisation)
// and its variable-K weight gradient; the kernels are in moe/gemm.cuh, and the CUTLASS sm90 ones
// that OSSRL_MOE_GEMM=cutlass selects in moe/grouped_gemm_sm90.cu.
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "gemm.cuh"
#include "grouped_gemm_sm90.h"

namespace ossrl::moe_cuda {

namespace {
std::atomic<int64_t> sm90_calls{0};
}  // namespace

bool cutlass_selected(const char* op) {
  const char* v = std::getenv("OSSRL_MOE_GEMM");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "mma") == 0) return false;
  TORCH_CHECK(std::strcmp(v, "cutlass") == 0, "ossrl.", op,
              ": OSSRL_MOE_GEMM must be 'mma' (the default) or 'cutlass', not '", v, "'");
#ifndef OSSRL_WITH_SM90_GEMM
  TORCH_CHECK(false, "ossrl.", op,
              ": OSSRL_MOE_GEMM=cutlass, but this build has no CUTLASS sm90 kernels (they are built "
              "when OSSRL_CUDA_ARCHS includes 90a and the nvidia-cutlass headers are found: "
              "third_party/README.md)");
#endif
  return true;
}

bool sm90_applies(const at::Tensor& x, std::initializer_list<int64_t> dims,
                  std::initializer_list<const void*> ptrs) {
  if (x.scalar_type() != at::kBFloat16 && x.scalar_type() != at::kHalf) return false;
  if (at::cuda::getDeviceProperties(x.get_device())->major != 9) return false;
  for (const int64_t d : dims)
    if (d % 8 != 0) return false;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

void count_sm90_call() { sm90_calls.fetch_add(1, std::memory_order_relaxed); }

int64_t sm90_gemm_calls() { return sm90_calls.load(std::memory_order_relaxed); }

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

  // (K > 0: a CUTLASS problem with K = 0 would issue no MMA to clear its accumulators)
  if (cutlass_selected(op) && K > 0 &&
      sm90_applies(x, {K, N},
                   {xc.data_ptr(), wc.data_ptr(), bc.defined() ? bc.data_ptr() : nullptr})) {
    sm90::grouped_gemm(xc, wc, kmaj, bc, s.ptr(), out, stream);
    count_sm90_call();
    dispatch_float(x.scalar_type(), op,
                   [&](auto tag) { launch_zero_tail<decltype(tag)>(out, s, E, stream); });
    return out;
  }
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
    p.vec_a = copy_width<S>(p.a, {K});
    p.vec_b = kmaj ? copy_width<S>(p.b, {K * N, K}) : copy_width<S>(p.b, {K * N, N});
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

  const bool cutlass =
      cutlass_selected(op) && sm90_applies(x, {K, N}, {xc.data_ptr(), dyc.data_ptr()});
  if (cutlass) {
    sm90::grouped_gemm_dw(xc, dyc, s.ptr(), dw, stream);
    count_sm90_call();
  }
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using S = decltype(tag);
    if (!cutlass) {
      VarKGemm p{};
      p.p = xc.data_ptr();
      p.ldp = K;
      p.q = dyc.data_ptr();
      p.ldq = N;
      p.sched = s.ptr();
      p.E = static_cast<int>(E);
      p.M = static_cast<int>(K);
      p.N = static_cast<int>(N);
      p.vec_p = copy_width<S>(p.p, {K});
      p.vec_q = copy_width<S>(p.q, {N});
      p.out = dw.data_ptr();
      launch_vark_gemm<S>(p, stream);
    }
    if (bias_grad) {
      launch_colsum<S>(colsum_of(dyc.data_ptr(), N, N, s, E), s, db, stream);
    }
  });
  return {dw, db};
}

}  // namespace ossrl::moe_cuda
