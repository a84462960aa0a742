// See include/ossrl/cuda_arch.h. The probe kernel is compiled for the same architectures as every
// other kernel of the extension, so it has an image for a device exactly when they all do.
#include <array>
#include <atomic>

#include <cuda_runtime.h>

#include <c10/util/Exception.h>

#include "ossrl/cuda_arch.h"

namespace ossrl::cuda {
namespace {

__global__ void probe_kernel() {}

constexpr int kMaxDevices = 64;
std::array<std::atomic<int>, kMaxDevices> verdict{};  // 1: the device runs this build's kernels

}  // namespace

void require_kernel_image(const at::Tensor& t, const char* op) {
  const int dev = t.get_device();
  if (dev < 0) return;  // not a CUDA tensor: the op's own device checks say so
  if (dev < kMaxDevices && verdict[dev].load(std::memory_order_relaxed) == 1) return;
  int prev = 0;
  cudaGetDevice(&prev);
  if (prev != dev) cudaSetDevice(dev);
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, probe_kernel);
  cudaDeviceProp prop;
  const bool have_prop = cudaGetDeviceProperties(&prop, dev) == cudaSuccess;
  if (prev != dev) cudaSetDevice(prev);
  if (err == cudaSuccess) {
    if (dev < kMaxDevices) verdict[dev].store(1, std::memory_order_relaxed);
    return;
  }
  cudaGetLastError();  // the error is reported here, not left for the next CUDA call to find
  const int major = have_prop ? prop.major : -1, minor = have_prop ? prop.minor : -1;
  TORCH_CHECK(false, "ossrl.", op, ": this build has no kernels for ", have_prop ? prop.name : "this GPU", " (sm_",
              major, minor, "): it was compiled for CUDA architectures '", OSSRL_CUDA_ARCHS,
              "'. Build from source with OSSRL_CUDA_ARCHS=\"", major, minor, "\" (or with ", major, minor,
              " added to the list; CUDA said: ", cudaGetErrorString(err), ")");
}

}  // namespace ossrl::cuda
