// Attention in ATen ops for any device, dtype and head dim (csrc/attention_composite.cpp): the
// CUDA ops' fallback where their kernels have no instantiation. Arguments are checked by the op
// that calls it; an undefined `sinks` means none; window < 0 means no window.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace ossrl::composite {

std::tuple<at::Tensor, at::Tensor> varlen_attention(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, const at::Tensor& cu_q,
                                                    const at::Tensor& cu_k, bool causal, int64_t window,
                                                    const at::Tensor& sinks, double scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_q, const at::Tensor& cu_k,
    bool causal, int64_t window, const at::Tensor& sinks, double scale);

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_table, const at::Tensor& cu_q, const at::Tensor& seq_lens,
                           bool causal, int64_t window, const at::Tensor& sinks, double scale);

}  // namespace ossrl::composite
