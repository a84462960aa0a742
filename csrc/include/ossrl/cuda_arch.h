// The GPU a CUDA op is about to run on must have a kernel image in this build: machine code for
// its architecture, or PTX the driver can compile for it. Without this check the first launch
// fails with CUDA's "no kernel image is available", which names neither the op nor the fix.
#pragma once

#include <ATen/core/Tensor.h>

namespace ossrl::cuda {

// Throws a clear error (the op, the GPU's sm_XY, the architectures built, how to rebuild) when
// the device of `t` cannot run this build's kernels. Cached per device: a table lookup after the
// first call.
void require_kernel_image(const at::Tensor& t, const char* op);

}  // namespace ossrl::cuda
