// Every ossrl op schema, in one place. Kernels live in csrc/cpu/<area>.cpp and
// csrc/cuda/<area>.cu; Python wrappers (autograd, fake tensors, docs) in python/ossrl/ops/.
#include <torch/library.h>

TORCH_LIBRARY(ossrl, m) {
  // ---- grouped GEMM / MoE (csrc/*/moe.*) ----
  // out[r] = x[r] @ w[e] + bias[e] for offsets[e-1] <= r < offsets[e]; rows >= offsets[-1] are 0.
  m.def("grouped_gemm(Tensor x, Tensor w, Tensor offsets, Tensor? bias=None) -> Tensor");
  // Variable-K weight gradient: dw[e] = x[rows of e]^T @ dy[rows of e]; db[e] = sum of dy rows
  // (db is empty when bias_grad is false).
  m.def("grouped_gemm_dw(Tensor x, Tensor dy, Tensor offsets, bool bias_grad) -> (Tensor, Tensor)");
  // Top-k routing: (weights fp32 (T,k), experts int32 (T,k), order int32 (T*k,), offsets (E,)).
  m.def("moe_route(Tensor router_logits, int top_k) -> (Tensor, Tensor, Tensor, Tensor)");
  // Routing to given experts (T,k) int32 (routing replay): weights are the softmax of the logits
  // at those experts, in slot order; the same four outputs as moe_route.
  m.def("moe_route_given(Tensor router_logits, Tensor experts) -> (Tensor, Tensor, Tensor, Tensor)");
  // The GPT-OSS expert block. Returns (out (T,H), h (T*k, 2I)): h is the gate/up projection in
  // routed (sorted) row order, kept for the backward.
  m.def(
      "moe_experts(Tensor x, Tensor weights, Tensor order, Tensor offsets, Tensor w_gate_up, "
      "Tensor b_gate_up, Tensor w_down, Tensor b_down, float alpha, float limit) -> (Tensor, Tensor)");
  // Returns (dx, dweights, dw_gate_up, db_gate_up, dw_down, db_down).
  m.def(
      "moe_experts_backward(Tensor grad_out, Tensor x, Tensor weights, Tensor order, "
      "Tensor offsets, Tensor h, Tensor w_gate_up, Tensor w_down, Tensor b_down, float alpha, "
      "float limit) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- attention (csrc/*/attention.*) ----
  // window < 0 means no window; softmax_scale is resolved by the Python wrapper.
  // Returns (out (Tq,Hq,D), lse (Hq,Tq) fp32 (fp64 for fp64 inputs), the log of the softmax
  // denominator sink included). A window without causal bounds only the left side (j > p - W).
  m.def(
      "varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, bool causal, int window, Tensor? sinks, "
      "float softmax_scale) -> (Tensor, Tensor)");
  // Returns (dq, dk, dv, dsinks); dsinks is (Hq,) fp32 (fp64 for fp64), empty when sinks is None.
  m.def(
      "varlen_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
      "bool causal, int window, Tensor? sinks, float softmax_scale) -> (Tensor, Tensor, Tensor, Tensor)");
  // Paged KV cache: k_cache/v_cache (num_blocks, block_size, Hkv, D); block_table (B, max_blocks)
  // int32. Appends packed new keys/values (cu_seqlens (B+1,)) after cache_seqlens[b] tokens.
  m.def(
      "paged_kv_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, "
      "Tensor block_table, Tensor cu_seqlens, Tensor cache_seqlens) -> ()");
  // New queries q (Tq,Hq,D) packed by cu_seqlens_q attend to the first seq_lens[b] cached tokens
  // of their sequence; they are the last tokens of it (bottom-right causal alignment).
  m.def(
      "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
      "Tensor cu_seqlens_q, Tensor seq_lens, int max_seqlen_q, int max_seqlen_k, bool causal, "
      "int window, Tensor? sinks, float softmax_scale) -> Tensor");

  // The ATen composite the CUDA attention ops fall back to (float32, other head dims), exposed
  // on the CPU only so that the tests can compare it with the kernels (csrc/attention_composite.cpp).
  m.def(
      "_varlen_attention_composite(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, bool causal, int window, Tensor? sinks, float softmax_scale) -> (Tensor, Tensor)");
  m.def(
      "_varlen_attention_backward_composite(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, bool causal, int window, Tensor? sinks, "
      "float softmax_scale) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_paged_attention_composite(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
      "Tensor cu_seqlens_q, Tensor seq_lens, bool causal, int window, Tensor? sinks, "
      "float softmax_scale) -> Tensor");

  // ---- resharding (csrc/*/reshard.*) ----
  // dsts[i].copy_(srcs[i]) for every i in one fused pass, casting dtype, strided destinations.
  m.def("multi_tensor_copy_(Tensor(a!)[] dsts, Tensor[] srcs) -> ()");
}
