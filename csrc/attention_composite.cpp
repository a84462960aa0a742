// Attention written with ATen ops only (matmul, masks, logsumexp), for any device, dtype and head
// dim: what the CUDA ops fall back to where their kernels have no instantiation (float32 and
// float64 inputs, head dims other than 64 and 128). It is exact math, not fast: one sequence at a
// time, the (Hq, Lq, Lk) score matrix in float32 (float64 for float64 inputs), and the sequence
// lengths read on the host (a synchronisation the kernels avoid). On the CPU it is registered as
// private ops (_varlen_attention_composite, ...) so that the tests compare it with the CPU
// kernels and a float64 reference; the CUDA kernels' checks run before it, so it trusts its
// arguments.
#include "ossrl/attention_composite.h"

#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace ossrl::composite {
namespace {

at::ScalarType acc_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::vector<int64_t> host_ints(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kCPU, at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

// (Lq, Lk) bool: the keys each query sees, bottom-right aligned (query i is token Lk - Lq + i).
at::Tensor visible(int64_t lq, int64_t lk, bool causal, int64_t window, const at::TensorOptions& o) {
  const at::Tensor p = at::arange(lq, o.dtype(at::kLong)).unsqueeze(1) + (lk - lq);
  const at::Tensor j = at::arange(lk, o.dtype(at::kLong)).unsqueeze(0);
  at::Tensor m = at::ones({lq, lk}, o.dtype(at::kBool));
  if (causal) m = m.logical_and(j <= p);
  if (window > 0) m = m.logical_and(j > p - window);
  return m;
}

// Scores of one sequence, masked, with the sink column last when there are sinks:
// (Hq, Lq, Lk [+1]) in the accumulation type. qb (Lq, Hq, D), kb (Lk, Hkv, D).
at::Tensor scores(const at::Tensor& qb, const at::Tensor& kb, bool causal, int64_t window,
                  const at::Tensor& sinks, double scale, at::ScalarType acc) {
  const int64_t hq = qb.size(1), g = hq / kb.size(1), lq = qb.size(0), lk = kb.size(0);
  const at::Tensor qh = qb.to(acc).permute({1, 0, 2});
  const at::Tensor kh = kb.to(acc).repeat_interleave(g, 1).permute({1, 2, 0});  // (Hq, D, Lk)
  at::Tensor s = at::matmul(qh, kh).mul_(scale);
  s.masked_fill_(visible(lq, lk, causal, window, qb.options()).logical_not(), -INFINITY);
  if (sinks.defined()) s = at::cat({s, sinks.to(acc).reshape({hq, 1, 1}).expand({hq, lq, 1})}, -1);
  return s;
}

// exp(s - lse) with rows that see nothing (lse = -inf) all zero.
at::Tensor probs(const at::Tensor& s, const at::Tensor& lse) {
  const at::Tensor l = lse.unsqueeze(-1);
  return at::where(at::isinf(l).logical_and(l < 0), at::zeros({}, s.options()), at::exp(s - l));
}

std::tuple<at::Tensor, at::Tensor> attend(const at::Tensor& q, const std::vector<at::Tensor>& ks,
                                          const std::vector<at::Tensor>& vs, const std::vector<int64_t>& cq,
                                          bool causal, int64_t window, const at::Tensor& sinks, double scale) {
  const auto acc = acc_type(q);
  const int64_t hq = q.size(1);
  at::Tensor out = at::zeros(q.sizes(), q.options());
  at::Tensor lse = at::full({hq, q.size(0)}, -INFINITY, q.options().dtype(acc));
  for (size_t b = 0; b + 1 < cq.size(); ++b) {
    const int64_t q0 = cq[b], lq = cq[b + 1] - cq[b];
    if (lq == 0) continue;
    const at::Tensor qb = q.narrow(0, q0, lq);
    const at::Tensor s = scores(qb, ks[b], causal, window, sinks, scale, acc);
    const at::Tensor l = at::logsumexp(s, -1);  // (Hq, Lq): -inf where nothing is visible
    const int64_t lk = ks[b].size(0), g = hq / ks[b].size(1);
    const at::Tensor p = probs(s, l).narrow(-1, 0, lk);
    const at::Tensor vh = vs[b].to(acc).repeat_interleave(g, 1).permute({1, 0, 2});  // (Hq, Lk, D)
    out.narrow(0, q0, lq).copy_(at::matmul(p, vh).permute({1, 0, 2}));
    lse.narrow(1, q0, lq).copy_(l);
  }
  return {out, lse};
}

void split(const at::Tensor& k, const at::Tensor& v, const std::vector<int64_t>& ck, std::vector<at::Tensor>& ks,
           std::vector<at::Tensor>& vs) {
  for (size_t b = 0; b + 1 < ck.size(); ++b) {
    ks.push_back(k.narrow(0, ck[b], ck[b + 1] - ck[b]));
    vs.push_back(v.narrow(0, ck[b], ck[b + 1] - ck[b]));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> varlen_attention(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, const at::Tensor& cu_q,
                                                    const at::Tensor& cu_k, bool causal, int64_t window,
                                                    const at::Tensor& sinks, double scale) {
  std::vector<at::Tensor> ks, vs;
  split(k, v, host_ints(cu_k), ks, vs);
  return attend(q, ks, vs, host_ints(cu_q), causal, window, sinks, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_q, const at::Tensor& cu_k,
    bool causal, int64_t window, const at::Tensor& sinks, double scale) {
  // P = exp(S - lse), D_i = dO_i . O_i, dS = P (dO V^T - D), dQ = scale dS K, dK = scale dS^T Q,
  // dV = P^T dO (summed over each KV head's query heads), d(sink_h) = -sum_i P_sink(h, i) D_i.
  const auto acc = acc_type(q);
  const auto cq = host_ints(cu_q), ck = host_ints(cu_k);
  const int64_t hq = q.size(1), hkv = k.size(1), g = hq / hkv, d = q.size(2);
  at::Tensor dq = at::zeros(q.sizes(), q.options()), dk = at::zeros(k.sizes(), k.options()),
             dv = at::zeros(v.sizes(), v.options());
  at::Tensor dsinks = at::zeros({sinks.defined() ? hq : 0}, q.options().dtype(acc));
  for (size_t b = 0; b + 1 < cq.size(); ++b) {
    const int64_t q0 = cq[b], lq = cq[b + 1] - cq[b], k0 = ck[b], lk = ck[b + 1] - ck[b];
    if (lq == 0) continue;
    const at::Tensor qb = q.narrow(0, q0, lq), kb = k.narrow(0, k0, lk), vb = v.narrow(0, k0, lk);
    const at::Tensor p_all = probs(scores(qb, kb, causal, window, sinks, scale, acc), lse.narrow(1, q0, lq).to(acc));
    const at::Tensor p = p_all.narrow(-1, 0, lk);                                          // (Hq, Lq, Lk)
    const at::Tensor dO = grad_out.narrow(0, q0, lq).to(acc).permute({1, 0, 2});            // (Hq, Lq, D)
    const at::Tensor o = out.narrow(0, q0, lq).to(acc).permute({1, 0, 2});
    const at::Tensor di = (dO * o).sum(-1, true);                                           // (Hq, Lq, 1)
    const at::Tensor vh = vb.to(acc).repeat_interleave(g, 1).permute({1, 0, 2});            // (Hq, Lk, D)
    const at::Tensor kh = kb.to(acc).repeat_interleave(g, 1).permute({1, 0, 2});
    const at::Tensor ds = p * (at::matmul(dO, vh.transpose(1, 2)) - di);                    // (Hq, Lq, Lk)
    dq.narrow(0, q0, lq).copy_(at::matmul(ds, kh).mul_(scale).permute({1, 0, 2}));
    const at::Tensor qh = qb.to(acc).permute({1, 0, 2});
    const at::Tensor dkh = at::matmul(ds.transpose(1, 2), qh).mul_(scale).view({hkv, g, lk, d}).sum(1);
    const at::Tensor dvh = at::matmul(p.transpose(1, 2), dO).view({hkv, g, lk, d}).sum(1);
    dk.narrow(0, k0, lk).add_(dkh.permute({1, 0, 2}));
    dv.narrow(0, k0, lk).add_(dvh.permute({1, 0, 2}));
    if (sinks.defined()) dsinks.sub_((p_all.select(-1, lk) * di.squeeze(-1)).sum(-1));
  }
  return {dq, dk, dv, dsinks};
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_table, const at::Tensor& cu_q, const at::Tensor& seq_lens,
                           bool causal, int64_t window, const at::Tensor& sinks, double scale) {
  const auto lens = host_ints(seq_lens);
  // clamped like the kernel's reads: a bad entry reads some block, never outside the cache
  const at::Tensor bt = block_table.to(at::kLong).clamp(0, std::max<int64_t>(k_cache.size(0) - 1, 0));
  const int64_t bs = k_cache.size(1), max_tokens = block_table.size(1) * bs;
  std::vector<at::Tensor> ks, vs;
  for (size_t b = 0; b < lens.size(); ++b) {  // the first seq_lens[b] tokens of the sequence's blocks
    const int64_t n = std::min(std::max<int64_t>(lens[b], 0), max_tokens), nblk = (n + bs - 1) / bs;
    const at::Tensor blocks = bt.select(0, static_cast<int64_t>(b)).narrow(0, 0, nblk);
    ks.push_back(k_cache.index_select(0, blocks).flatten(0, 1).narrow(0, 0, n));
    vs.push_back(v_cache.index_select(0, blocks).flatten(0, 1).narrow(0, 0, n));
  }
  return std::get<0>(attend(q, ks, vs, host_ints(cu_q), causal, window, sinks, scale));
}

}  // namespace ossrl::composite

namespace {

at::Tensor opt(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

std::tuple<at::Tensor, at::Tensor> varlen_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& cu_q, const at::Tensor& cu_k, bool causal,
                                             int64_t window, const std::optional<at::Tensor>& sinks, double scale) {
  return ossrl::composite::varlen_attention(q, k, v, cu_q, cu_k, causal, window, opt(sinks), scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_backward_op(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_q, const at::Tensor& cu_k, bool causal,
    int64_t window, const std::optional<at::Tensor>& sinks, double scale) {
  return ossrl::composite::varlen_attention_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, causal, window,
                                                     opt(sinks), scale);
}

at::Tensor paged_op(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& block_table, const at::Tensor& cu_q, const at::Tensor& seq_lens, bool causal,
                    int64_t window, const std::optional<at::Tensor>& sinks, double scale) {
  return ossrl::composite::paged_attention(q, k_cache, v_cache, block_table, cu_q, seq_lens, causal, window,
                                           opt(sinks), scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(ossrl, CPU, m) {
  m.impl("_varlen_attention_composite", &varlen_op);
  m.impl("_varlen_attention_backward_composite", &varlen_backward_op);
  m.impl("_paged_attention_composite", &paged_op);
}
