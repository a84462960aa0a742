// The Python module ossrl._C: importing it registers every op under torch.ops.ossrl. It also
// says how it was built, for `ossrl info`.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
  m.attr("__version__") = OSSRL_VERSION;
#ifdef OSSRL_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("cuda_archs") = OSSRL_CUDA_ARCHS;
}
