// The MoE CUDA ops' binding: grouped_gemm, grouped_gemm_dw (moe/grouped_gemm.cu), moe_route,
// moe_route_given (moe/routing.cu), moe_experts and its backward (moe/experts.cu). The shared
// tiles and GEMM kernels are in moe/tiles.cuh and moe/gemm.cuh; one file per kernel family, so
// each compiles on its own (and in parallel).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace ossrl::moe_cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_cuda(
    const at::Tensor& router_logits, int64_t top_k);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_given_cuda(
    const at::Tensor& router_logits, const at::Tensor& given);

at::Tensor grouped_gemm_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets,
                             const std::optional<at::Tensor>& bias);

std::tuple<at::Tensor, at::Tensor> grouped_gemm_dw_cuda(const at::Tensor& x, const at::Tensor& dy,
                                                        const at::Tensor& offsets,
                                                        bool bias_grad);

std::tuple<at::Tensor, at::Tensor> moe_experts_cuda(
    const at::Tensor& x, const at::Tensor& weights, const at::Tensor& order,
    const at::Tensor& offsets, const at::Tensor& w_gate_up, const at::Tensor& b_gate_up,
    const at::Tensor& w_down, const at::Tensor& b_down, double alpha, double limit);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
moe_experts_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                          const at::Tensor& weights, const at::Tensor& order,
                          const at::Tensor& offsets, const at::Tensor& h,
                          const at::Tensor& w_gate_up, const at::Tensor& w_down,
                          const at::Tensor& b_down, double alpha, double limit);

}  // namespace ossrl::moe_cuda

TORCH_LIBRARY_IMPL(ossrl, CUDA, m) {
  m.impl("moe_route", &ossrl::moe_cuda::moe_route_cuda);
  m.impl("moe_route_given", &ossrl::moe_cuda::moe_route_given_cuda);
  m.impl("grouped_gemm", &ossrl::moe_cuda::grouped_gemm_cuda);
  m.impl("grouped_gemm_dw", &ossrl::moe_cuda::grouped_gemm_dw_cuda);
  m.impl("moe_experts", &ossrl::moe_cuda::moe_experts_cuda);
  m.impl("moe_experts_backward", &ossrl::moe_cuda::moe_experts_backward_cuda);
}
