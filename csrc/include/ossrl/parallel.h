// at::parallel_for that carries the caller's thread-local state (dispatch keys, grad mode) into
// the worker threads. Kernels run below autograd; OpenMP workers would otherwise see autograd
// keys again and ATen calls made there (mm_out on a weight that requires grad) would fail.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

namespace ossrl {

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& fn) {
  const at::ThreadLocalState state;
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    at::ThreadLocalStateGuard guard(state);
    fn(b, e);
  });
}

}  // namespace ossrl
