// The attention CUDA ops' binding: varlen_attention and its backward (attention/varlen.cu),
// paged_kv_append and paged_attention (attention/paged.cu). The forward kernel both use is in
// attention/fwd.cuh, the shared helpers in attention/common.cuh.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace ossrl::attention_cuda {

std::tuple<at::Tensor, at::Tensor> varlen_attention_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& cu_q_in, const at::Tensor& cu_k_in, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, int64_t window, const std::optional<at::Tensor>& sinks_in,
    double softmax_scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const at::Tensor& cu_q_in, const at::Tensor& cu_k_in, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, int64_t window, const std::optional<at::Tensor>& sinks_in,
    double softmax_scale);

void paged_kv_append_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& k_in, const at::Tensor& v_in,
                          const at::Tensor& block_table_in, const at::Tensor& cu_in,
                          const at::Tensor& cache_seqlens_in);

at::Tensor paged_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_cache_in,
                                const at::Tensor& v_cache_in, const at::Tensor& block_table_in,
                                const at::Tensor& cu_q_in, const at::Tensor& seq_lens_in,
                                int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
                                int64_t window, const std::optional<at::Tensor>& sinks_in,
                                double softmax_scale);

}  // namespace ossrl::attention_cuda

TORCH_LIBRARY_IMPL(ossrl, CUDA, m) {
  m.impl("varlen_attention", &ossrl::attention_cuda::varlen_attention_cuda);
  m.impl("varlen_attention_backward", &ossrl::attention_cuda::varlen_attention_backward_cuda);
  m.impl("paged_kv_append", &ossrl::attention_cuda::paged_kv_append_cuda);
  m.impl("paged_attention", &ossrl::attention_cuda::paged_attention_cuda);
}
