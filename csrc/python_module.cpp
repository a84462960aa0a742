// The Python module ossrl._C: importing it registers every op under torch.ops.ossrl. It also
// says how it was built, for `ossrl info`.
#include <pybind11/pybind11.h>

#include <cstdint>

#ifdef OSSRL_WITH_SM90_GEMM
namespace ossrl::moe_cuda {
int64_t sm90_gemm_calls();  // csrc/cuda/moe/grouped_gemm.cu
}
#endif

PYBIND11_MODULE(_C, m) {
  m.attr("__version__") = OSSRL_VERSION;
#ifdef OSSRL_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("cuda_archs") = OSSRL_CUDA_ARCHS;
  // The CUTLASS sm90 grouped GEMMs (OSSRL_MOE_GEMM=cutlass); the count of calls that ran them
  // lets a test or benchmark tell them from the fallback to the mma.sync kernels.
#ifdef OSSRL_WITH_SM90_GEMM
  m.attr("with_sm90_gemm") = true;
  m.def("sm90_gemm_calls", &ossrl::moe_cuda::sm90_gemm_calls);
#else
  m.attr("with_sm90_gemm") = false;
  m.def("sm90_gemm_calls", []() -> int64_t { return 0; });
#endif
}
