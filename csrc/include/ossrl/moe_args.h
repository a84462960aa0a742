// Argument checks of the GPT-OSS expert block, shared by the CPU and CUDA kernels so both
// accept and reject exactly the same inputs with the same messages. Device-specific checks
// (which device, and reading order/offsets values, which only the CPU can do without a host
// synchronisation) stay with each kernel.
#pragma once
#include <optional>
#include <utility>

#include "ossrl/check.h"

namespace ossrl {

// grouped_gemm(x (T,K), w (E,K,N), offsets (E,), bias (E,N)?).
inline void check_grouped_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets,
                        const std::optional<at::Tensor>& bias, const char* op) {
  check_dim(x, 2, op, "x");
  check_dim(w, 3, op, "w");
  check_float(x, op, "x");
  check_same_dtype(w, x, op, "w", "x");
  check_same_device(w, x, op, "w", "x");
  check_same_device(offsets, x, op, "offsets", "x");
  OSSRL_CHECK(w.size(1) == x.size(1), op, "w.shape[1] (", w.size(1),
              ") must equal x.shape[1] (", x.size(1), "): w is (E, K, N) and x is (T, K)");
  check_offsets(offsets, w.size(0), x.size(0), op);
  if (bias) {
    check_dim(*bias, 2, op, "bias");
    check_same_dtype(*bias, x, op, "bias", "x");
    check_same_device(*bias, x, op, "bias", "x");
    OSSRL_CHECK(bias->size(0) == w.size(0) && bias->size(1) == w.size(2), op,
                "bias must be (E, N) = (", w.size(0), ", ", w.size(2), "), got ", bias->sizes());
  }
}

// grouped_gemm_dw(x (T,K), dy (T,N), offsets (E,)): returns E.
inline int64_t check_grouped_gemm_dw(const at::Tensor& x, const at::Tensor& dy,
                                     const at::Tensor& offsets, const char* op) {
  check_dim(x, 2, op, "x");
  check_dim(dy, 2, op, "dy");
  check_float(x, op, "x");
  check_same_dtype(dy, x, op, "dy", "x");
  check_same_device(dy, x, op, "dy", "x");
  check_same_device(offsets, x, op, "offsets", "x");
  OSSRL_CHECK(dy.size(0) == x.size(0), op, "dy must have as many rows as x (", x.size(0),
              "), got ", dy.size(0));
  check_dim(offsets, 1, op, "offsets");
  check_offsets(offsets, offsets.size(0), x.size(0), op);
  return offsets.size(0);
}

struct ExpertShapes {
  int64_t T, H, I, E, k;
};

inline ExpertShapes check_expert_shapes(const at::Tensor& x, const at::Tensor& weights,
                                        const at::Tensor& order, const at::Tensor& offsets,
                                        const at::Tensor& w_gate_up, const at::Tensor* b_gate_up,
                                        const at::Tensor& w_down, const at::Tensor& b_down,
                                        const char* op) {
  check_dim(x, 2, op, "x");
  check_float(x, op, "x");
  check_dim(weights, 2, op, "routing.weights");
  check_aux_dtype(weights, x, op, "routing.weights", "x");
  check_dim(order, 1, op, "routing.order");
  check_int32(order, op, "routing.order");
  check_dim(w_gate_up, 3, op, "w_gate_up");
  check_dim(w_down, 3, op, "w_down");
  check_dim(b_down, 2, op, "b_down");
  for (auto [t, name] : {std::pair{&w_gate_up, "w_gate_up"}, {&w_down, "w_down"},
                         {&b_down, "b_down"}})
    check_same_dtype(*t, x, op, name, "x");
  for (auto [t, name] : {std::pair{&weights, "routing.weights"}, {&order, "routing.order"},
                         {&offsets, "routing.offsets"}, {&w_gate_up, "w_gate_up"},
                         {&w_down, "w_down"}, {&b_down, "b_down"}})
    check_same_device(*t, x, op, name, "x");

  ExpertShapes a;
  a.T = x.size(0);
  a.H = x.size(1);
  a.E = w_gate_up.size(0);
  a.k = weights.size(1);
  OSSRL_CHECK(weights.size(0) == a.T, op, "routing.weights must be (T, k) with T = x.shape[0] = ",
              a.T, ", got ", weights.sizes());
  OSSRL_CHECK(order.size(0) == a.T * a.k, op, "routing.order must have T*k = ", a.T * a.k,
              " entries, got ", order.size(0));
  OSSRL_CHECK(w_gate_up.size(1) == a.H && w_gate_up.size(2) % 2 == 0, op,
              "w_gate_up must be (E, H, 2I) with H = x.shape[1] = ", a.H, ", got ",
              w_gate_up.sizes());
  a.I = w_gate_up.size(2) / 2;
  if (b_gate_up) {  // the backward does not need it
    check_dim(*b_gate_up, 2, op, "b_gate_up");
    check_same_dtype(*b_gate_up, x, op, "b_gate_up", "x");
    check_same_device(*b_gate_up, x, op, "b_gate_up", "x");
    OSSRL_CHECK(b_gate_up->size(0) == a.E && b_gate_up->size(1) == 2 * a.I, op,
                "b_gate_up must be (E, 2I) = (", a.E, ", ", 2 * a.I, "), got ",
                b_gate_up->sizes());
  }
  OSSRL_CHECK(w_down.size(0) == a.E && w_down.size(1) == a.I && w_down.size(2) == a.H, op,
              "w_down must be (E, I, H) = (", a.E, ", ", a.I, ", ", a.H, "), got ",
              w_down.sizes());
  OSSRL_CHECK(b_down.size(0) == a.E && b_down.size(1) == a.H, op, "b_down must be (E, H) = (",
              a.E, ", ", a.H, "), got ", b_down.sizes());
  check_offsets(offsets, a.E, a.T * a.k, op, "routed rows (T*k)");  // values: on the CPU only
  return a;
}

// moe_route(router_logits (T,E), top_k): the shapes; returns E.
inline int64_t check_route(const at::Tensor& router_logits, int64_t top_k, const char* op) {
  check_dim(router_logits, 2, op, "router_logits");
  check_float(router_logits, op, "router_logits");
  const int64_t E = router_logits.size(1);
  OSSRL_CHECK_VALUE(E > 0, op, "router_logits must have at least one expert column");
  OSSRL_CHECK_VALUE(top_k >= 1 && top_k <= E, op, "top_k must be in [1, E=", E, "], got ", top_k);
  return E;
}

// moe_route_given(router_logits (T,E), experts (T,k) int32): the shapes; returns {T, E, k}. The
// ids' values are checked on the host by the CPU kernel, by a device-side assert on CUDA.
struct GivenShapes {
  int64_t T, E, k;
};
inline GivenShapes check_route_given(const at::Tensor& router_logits, const at::Tensor& experts,
                                     const char* op) {
  check_dim(router_logits, 2, op, "router_logits");
  check_float(router_logits, op, "router_logits");
  check_dim(experts, 2, op, "experts");
  OSSRL_CHECK(experts.scalar_type() == at::kInt, op, "experts must be int32, got ", experts.scalar_type());
  check_same_device(experts, router_logits, op, "experts", "router_logits");
  const int64_t T = router_logits.size(0), E = router_logits.size(1), k = experts.size(1);
  OSSRL_CHECK(experts.size(0) == T, op, "experts must have one row per token (", T, "), got ",
              experts.size(0));
  OSSRL_CHECK_VALUE(E > 0 && k >= 1 && k <= E, op, "experts must have 1 to E=", E, " slots, got ", k);
  return {T, E, k};
}

}  // namespace ossrl
