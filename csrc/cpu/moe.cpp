// CPU kernels for grouped GEMM, top-k routing and the fused GPT-OSS expert block.
//
// The matrix products go to ATen's BLAS (mm_out/addmm_out on each expert's rows): nothing
// hand-written beats the vendor BLAS here. What is ours is everything around them: routing, the
// gather of routed rows, bias and the clamped SwiGLU, the weighted combine and the backward,
// done in C++ over (expert, row block) work items in parallel, with no Python call per expert.
//
// bf16/fp16 inputs are widened to fp32 once per call and accumulated in fp32; float64 inputs
// are computed in float64 throughout so gradcheck and float64 references work.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "ossrl/check.h"
#include "ossrl/moe_args.h"
#include "ossrl/parallel.h"

namespace ossrl {
namespace {

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A slice [begin, end) of the rows owned by one expert: the unit of parallel work.
struct RowBlock {
  int64_t expert, begin, end;
};

// Splits each expert's rows into blocks small enough to balance the threads and large enough
// to keep BLAS efficient.
std::vector<RowBlock> row_blocks(const int32_t* offsets, int64_t num_experts) {
  const int64_t rows = num_experts ? offsets[num_experts - 1] : 0;
  const int64_t threads = at::get_num_threads();
  const int64_t block = std::clamp<int64_t>((rows + 4 * threads - 1) / (4 * threads), 16, 256);
  std::vector<RowBlock> blocks;
  int64_t start = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    for (int64_t s = start; s < offsets[e]; s += block)
      blocks.push_back({e, s, std::min<int64_t>(s + block, offsets[e])});
    start = offsets[e];
  }
  return blocks;
}

template <typename F>
void parallel_blocks(const std::vector<RowBlock>& blocks, const F& fn) {
  ossrl::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) fn(blocks[b]);
  });
}

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  OSSRL_CHECK(t.device().is_cpu(), op, name, " must be a CPU tensor for the CPU kernel, got ",
              t.device());
}

// ---------------------------------------------------------------------------------------------
// Grouped GEMM

at::Tensor grouped_gemm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets,
                            const std::optional<at::Tensor>& bias) {
  const char* op = "grouped_gemm";
  check_cpu(x, op, "x");
  check_grouped_gemm(x, w, offsets, bias, op);
  const auto acc = acc_type(x.scalar_type());
  const at::Tensor xa = x.to(acc), wa = w.to(acc);
  const at::Tensor ba = bias ? bias->to(acc) : at::Tensor();
  at::Tensor out = at::zeros({x.size(0), w.size(2)}, x.options().dtype(acc));
  const at::Tensor off = offsets.contiguous();
  parallel_blocks(row_blocks(off.data_ptr<int32_t>(), w.size(0)), [&](const RowBlock& b) {
    at::Tensor o = out.narrow(0, b.begin, b.end - b.begin);
    at::Tensor xb = xa.narrow(0, b.begin, b.end - b.begin);
    if (ba.defined())
      at::addmm_out(o, ba[b.expert], xb, wa[b.expert]);
    else
      at::mm_out(o, xb, wa[b.expert]);
  });
  return out.to(x.scalar_type());
}

// dw[e] = x_e^T dy_e and db[e] = sum of dy_e over the rows of expert e (already in the
// accumulation dtype). Shared by grouped_gemm's backward and moe_experts' backward.
void grouped_dw_acc(const at::Tensor& xa, const at::Tensor& dya, const int32_t* offsets,
                    int64_t num_experts, at::Tensor& dw, at::Tensor* db) {
  ossrl::parallel_for(0, num_experts, 1, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t begin = e ? offsets[e - 1] : 0, rows = offsets[e] - begin;
      at::Tensor dwe = dw[e];
      if (rows == 0) {
        dwe.zero_();
        if (db) (*db)[e].zero_();
        continue;
      }
      at::mm_out(dwe, xa.narrow(0, begin, rows).t(), dya.narrow(0, begin, rows));
      if (db) {
        at::Tensor dbe = (*db)[e];
        at::sum_out(dbe, dya.narrow(0, begin, rows), {0});
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> grouped_gemm_dw_cpu(const at::Tensor& x, const at::Tensor& dy,
                                                       const at::Tensor& offsets, bool bias_grad) {
  const char* op = "grouped_gemm_dw";
  check_cpu(x, op, "x");
  const int64_t num_experts = check_grouped_gemm_dw(x, dy, offsets, op);
  const auto acc = acc_type(x.scalar_type());
  at::Tensor dw = at::empty({num_experts, x.size(1), dy.size(1)}, x.options().dtype(acc));
  at::Tensor db = bias_grad ? at::empty({num_experts, dy.size(1)}, x.options().dtype(acc))
                            : at::empty({0}, x.options());
  const at::Tensor off = offsets.contiguous();
  grouped_dw_acc(x.to(acc), dy.to(acc), off.data_ptr<int32_t>(), num_experts, dw,
                 bias_grad ? &db : nullptr);
  return {dw.to(x.scalar_type()), db.to(x.scalar_type())};
}

// ---------------------------------------------------------------------------------------------
// Routing

// Orders candidate experts: larger logit first, ties to the lower id, NaN above everything (as
// torch.topk does) so the order is a strict weak ordering whatever the input.
template <typename T>
bool ranks_before(T a, int32_t ia, T b, int32_t ib) {
  const bool na = std::isnan(static_cast<double>(a)), nb = std::isnan(static_cast<double>(b));
  if (na || nb) return na && (!nb || ia < ib);
  if (a != b) return a > b;
  return ia < ib;
}

// Stable counting sort of the flat (token, slot) indices by expert: (order, inclusive offsets).
std::tuple<at::Tensor, at::Tensor> sort_by_expert(const at::Tensor& experts, int64_t E) {
  const int64_t n = experts.numel();
  const int32_t* ex = experts.data_ptr<int32_t>();
  at::Tensor order = at::empty({n}, experts.options());
  at::Tensor offsets = at::zeros({E}, experts.options());
  int32_t* ord = order.data_ptr<int32_t>();
  int32_t* off = offsets.data_ptr<int32_t>();
  for (int64_t f = 0; f < n; ++f) ++off[ex[f]];
  std::vector<int64_t> next(E);
  int64_t run = 0;
  for (int64_t e = 0; e < E; ++e) {
    next[e] = run;
    run += off[e];
    off[e] = static_cast<int32_t>(run);
  }
  for (int64_t f = 0; f < n; ++f) ord[next[ex[f]]++] = static_cast<int32_t>(f);
  return {order, offsets};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_cpu(
    const at::Tensor& router_logits, int64_t top_k) {
  const char* op = "moe_route";
  check_cpu(router_logits, op, "router_logits");
  const int64_t T = router_logits.size(0), E = check_route(router_logits, top_k, op);
  const auto acc = acc_type(router_logits.scalar_type());
  const at::Tensor logits = router_logits.contiguous();
  at::Tensor weights = at::empty({T, top_k}, logits.options().dtype(acc));
  at::Tensor experts = at::empty({T, top_k}, logits.options().dtype(at::kInt));
  int32_t* ex = experts.data_ptr<int32_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_route", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* lg = logits.data_ptr<scalar_t>();
    acc_t* wt = weights.data_ptr<acc_t>();
    ossrl::parallel_for(0, T, 256, [&](int64_t t0, int64_t t1) {
      std::vector<int32_t> idx(E);
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* row = lg + t * E;
        std::iota(idx.begin(), idx.end(), 0);
        std::partial_sort(idx.begin(), idx.begin() + top_k, idx.end(), [&](int32_t a, int32_t b) {
          return ranks_before(row[a], a, row[b], b);
        });
        const acc_t top = static_cast<acc_t>(row[idx[0]]);
        acc_t sum = 0;
        for (int64_t j = 0; j < top_k; ++j) {
          const acc_t p = std::exp(static_cast<acc_t>(row[idx[j]]) - top);
          wt[t * top_k + j] = p;
          sum += p;
          ex[t * top_k + j] = idx[j];
        }
        for (int64_t j = 0; j < top_k; ++j) wt[t * top_k + j] /= sum;
      }
    });
  });

  auto [order, offsets] = sort_by_expert(experts, E);
  return {weights, experts, order, offsets};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_given_cpu(
    const at::Tensor& router_logits, const at::Tensor& experts_in) {
  const char* op = "moe_route_given";
  check_cpu(router_logits, op, "router_logits");
  const GivenShapes gs = check_route_given(router_logits, experts_in, op);
  const int64_t T = gs.T, E = gs.E, k = gs.k;
  const at::Tensor experts = experts_in.contiguous().clone();
  const int32_t* ex = experts.data_ptr<int32_t>();
  for (int64_t t = 0; t < T; ++t) {  // every id in range, none twice in a row (the kernels rely on it)
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = ex[t * k + j];
      OSSRL_CHECK_VALUE(e >= 0 && e < E, op, "experts[", t, ", ", j, "] = ", e, " is out of range [0, ", E, ")");
      for (int64_t i = 0; i < j; ++i)
        OSSRL_CHECK_VALUE(ex[t * k + i] != e, op, "expert ", e, " appears twice in experts[", t, "]");
    }
  }
  const auto acc = acc_type(router_logits.scalar_type());
  const at::Tensor logits = router_logits.contiguous();
  at::Tensor weights = at::empty({T, k}, logits.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_route_given", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* lg = logits.data_ptr<scalar_t>();
    acc_t* wt = weights.data_ptr<acc_t>();
    ossrl::parallel_for(0, T, 256, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* row = lg + t * E;
        acc_t top = static_cast<acc_t>(row[ex[t * k]]);
        for (int64_t j = 1; j < k; ++j) top = std::max(top, static_cast<acc_t>(row[ex[t * k + j]]));
        acc_t sum = 0;
        for (int64_t j = 0; j < k; ++j) {
          const acc_t p = std::exp(static_cast<acc_t>(row[ex[t * k + j]]) - top);
          wt[t * k + j] = p;
          sum += p;
        }
        for (int64_t j = 0; j < k; ++j) wt[t * k + j] /= sum;
      }
    });
  });
  auto [order, offsets] = sort_by_expert(experts, E);
  return {weights, experts, order, offsets};
}

// ---------------------------------------------------------------------------------------------
// The GPT-OSS expert block

// gate = h[2i], up = h[2i+1]; a = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha g) with
// g = min(gate, limit).
template <typename T>
inline T swiglu(T gate, T up, T alpha, T limit, T* sig_out = nullptr) {
  const T g = std::min(gate, limit);
  const T u = std::clamp(up, -limit, limit);
  const T s = T(1) / (T(1) + std::exp(-alpha * g));
  if (sig_out) *sig_out = s;
  return (u + T(1)) * g * s;
}

struct ExpertArgs : ExpertShapes {
  at::Tensor order, offsets;  // contiguous
  int64_t routed;
};

// Validates everything moe_experts and its backward share; returns the sizes.
ExpertArgs check_experts(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& order,
                         const at::Tensor& offsets, const at::Tensor& w_gate_up,
                         const at::Tensor* b_gate_up, const at::Tensor& w_down,
                         const at::Tensor& b_down, const char* op) {
  check_cpu(x, op, "x");
  ExpertArgs a;
  static_cast<ExpertShapes&>(a) =
      check_expert_shapes(x, weights, order, offsets, w_gate_up, b_gate_up, w_down, b_down, op);
  a.offsets = offsets.contiguous();
  a.order = order.contiguous();
  a.routed = a.E ? a.offsets.data_ptr<int32_t>()[a.E - 1] : 0;
  const int32_t* ord = a.order.data_ptr<int32_t>();
  // Each (token, slot) at most once: a repeated entry would add its row twice here and race on
  // CUDA (where the same check is a device-side assert: on the host it would cost a synchronisation).
  std::vector<uint8_t> seen(static_cast<size_t>(a.T * a.k), 0);
  for (int64_t r = 0; r < a.routed; ++r) {
    OSSRL_CHECK_VALUE(ord[r] >= 0 && ord[r] < a.T * a.k, op, "routing.order[", r, "] = ", ord[r],
                      " is not a flat (token, slot) index in [0, T*k = ", a.T * a.k, ")");
    OSSRL_CHECK_VALUE(!seen[ord[r]], op, "routing.order[", r, "] = ", ord[r],
                      " appears more than once (each (token, slot) is routed once)");
    seen[ord[r]] = 1;
  }
  return a;
}

// out[t] = sum over slots j of rows[t*k + j]: the deterministic combine of routed rows.
template <typename acc_t>
void combine_slots(const acc_t* rows, acc_t* out, int64_t T, int64_t k, int64_t H) {
  ossrl::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      acc_t* o = out + t * H;
      std::fill(o, o + H, acc_t(0));
      for (int64_t j = 0; j < k; ++j) {
        const acc_t* r = rows + (t * k + j) * H;
        for (int64_t c = 0; c < H; ++c) o[c] += r[c];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> moe_experts_cpu(
    const at::Tensor& x, const at::Tensor& weights, const at::Tensor& order,
    const at::Tensor& offsets, const at::Tensor& w_gate_up, const at::Tensor& b_gate_up,
    const at::Tensor& w_down, const at::Tensor& b_down, double alpha, double limit) {
  auto a = check_experts(x, weights, order, offsets, w_gate_up, &b_gate_up, w_down, b_down,
                         "moe_experts");
  const auto acc = acc_type(x.scalar_type());
  const auto opts = x.options().dtype(acc);
  const at::Tensor xa = x.to(acc), wgu = w_gate_up.to(acc), bgu = b_gate_up.to(acc);
  const at::Tensor wd = w_down.to(acc), bd = b_down.to(acc);
  const at::Tensor wflat = weights.to(acc).reshape({-1}).contiguous();
  const at::Tensor tokens = at::div(a.order.to(at::kLong), a.k, "trunc");
  at::Tensor h = at::zeros({a.T * a.k, 2 * a.I}, opts);
  at::Tensor slots = at::zeros({a.T * a.k, a.H}, opts);  // weighted y at flat (token, slot)
  at::Tensor out = at::empty({a.T, a.H}, opts);

  AT_DISPATCH_FLOATING_TYPES(acc, "moe_experts", [&] {
    const scalar_t al = static_cast<scalar_t>(alpha), li = static_cast<scalar_t>(limit);
    const int32_t* ord = a.order.data_ptr<int32_t>();
    const scalar_t* wv = wflat.data_ptr<scalar_t>();
    scalar_t* sl = slots.data_ptr<scalar_t>();
    parallel_blocks(row_blocks(a.offsets.data_ptr<int32_t>(), a.E), [&](const RowBlock& b) {
      const int64_t n = b.end - b.begin, I = a.I, H = a.H;
      at::Tensor hb = h.narrow(0, b.begin, n);
      at::addmm_out(hb, bgu[b.expert], xa.index_select(0, tokens.narrow(0, b.begin, n)),
                    wgu[b.expert]);
      at::Tensor act = at::empty({n, I}, opts);
      const scalar_t* hp = hb.data_ptr<scalar_t>();
      scalar_t* ap = act.data_ptr<scalar_t>();
      for (int64_t i = 0; i < n * I; ++i) ap[i] = swiglu(hp[2 * i], hp[2 * i + 1], al, li);
      const at::Tensor y = at::addmm(bd[b.expert], act, wd[b.expert]);
      const scalar_t* yp = y.data_ptr<scalar_t>();
      for (int64_t r = 0; r < n; ++r) {
        const int64_t f = ord[b.begin + r];
        for (int64_t c = 0; c < H; ++c) sl[f * H + c] = wv[f] * yp[r * H + c];
      }
    });
    combine_slots(sl, out.data_ptr<scalar_t>(), a.T, a.k, a.H);
  });
  return {out.to(x.scalar_type()), h.to(x.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
moe_experts_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                         const at::Tensor& weights, const at::Tensor& order,
                         const at::Tensor& offsets, const at::Tensor& h,
                         const at::Tensor& w_gate_up, const at::Tensor& w_down,
                         const at::Tensor& b_down, double alpha, double limit) {
  const char* op = "moe_experts_backward";
  auto a = check_experts(x, weights, order, offsets, w_gate_up, nullptr, w_down, b_down, op);
  OSSRL_CHECK(grad_out.sizes() == x.sizes(), op, "grad_out must have the shape of x ",
              x.sizes(), ", got ", grad_out.sizes());
  OSSRL_CHECK(h.dim() == 2 && h.size(0) == a.T * a.k && h.size(1) == 2 * a.I, op,
              "h must be (T*k, 2I) = (", a.T * a.k, ", ", 2 * a.I, "), got ", h.sizes());
  const auto acc = acc_type(x.scalar_type());
  const auto opts = x.options().dtype(acc);
  const at::Tensor xa = x.to(acc), ga = grad_out.to(acc), ha = h.to(acc).contiguous();
  const at::Tensor wgu = w_gate_up.to(acc), wd = w_down.to(acc), bd = b_down.to(acc);
  const at::Tensor wflat = weights.to(acc).reshape({-1}).contiguous();
  const at::Tensor tokens = at::div(a.order.to(at::kLong), a.k, "trunc");
  const int64_t R = a.routed, H = a.H, I = a.I;

  // Per routed row, in sorted order: gathered inputs, activations and output/hidden grads.
  at::Tensor xs = at::empty({R, H}, opts), act = at::empty({R, I}, opts);
  at::Tensor dy = at::empty({R, H}, opts), dh = at::empty({R, 2 * I}, opts);
  at::Tensor dslots = at::zeros({a.T * a.k, H}, opts);  // dx contributions at flat positions
  at::Tensor dweights = at::zeros({a.T * a.k}, opts);

  AT_DISPATCH_FLOATING_TYPES(acc, "moe_experts_backward", [&] {
    const scalar_t al = static_cast<scalar_t>(alpha), li = static_cast<scalar_t>(limit);
    const int32_t* ord = a.order.data_ptr<int32_t>();
    const scalar_t* wv = wflat.data_ptr<scalar_t>();
    scalar_t* dwp = dweights.data_ptr<scalar_t>();
    scalar_t* dsl = dslots.data_ptr<scalar_t>();
    parallel_blocks(row_blocks(a.offsets.data_ptr<int32_t>(), a.E), [&](const RowBlock& b) {
      const int64_t n = b.end - b.begin, e = b.expert;
      const at::Tensor tok = tokens.narrow(0, b.begin, n);
      at::Tensor xb = xs.narrow(0, b.begin, n);
      at::index_select_out(xb, xa, 0, tok);
      const at::Tensor gout = ga.index_select(0, tok);  // dL/dout of each row's token
      const at::Tensor g = at::mm(gout, wd[e].t());     // dL/d(a) before the routing weight
      const at::Tensor bias_dot = at::mv(gout, bd[e]);
      const scalar_t* gp = g.data_ptr<scalar_t>();
      const scalar_t* gop = gout.data_ptr<scalar_t>();
      const scalar_t* bdp = bias_dot.data_ptr<scalar_t>();
      const scalar_t* hp = ha.data_ptr<scalar_t>() + b.begin * 2 * I;
      scalar_t* ap = act.data_ptr<scalar_t>() + b.begin * I;
      scalar_t* dyp = dy.data_ptr<scalar_t>() + b.begin * H;
      scalar_t* dhp = dh.data_ptr<scalar_t>() + b.begin * 2 * I;
      for (int64_t r = 0; r < n; ++r) {
        const int64_t f = ord[b.begin + r];
        const scalar_t w = wv[f];
        scalar_t dot = 0;
        for (int64_t i = 0; i < I; ++i) {
          const int64_t ri = r * I + i;
          const scalar_t gate = hp[2 * ri], up = hp[2 * ri + 1];
          scalar_t s;
          const scalar_t act_v = swiglu(gate, up, al, li, &s);
          ap[ri] = act_v;
          dot += gp[ri] * act_v;
          const scalar_t da = w * gp[ri];
          const scalar_t gc = std::min(gate, li), uc = std::clamp(up, -li, li);
          dhp[2 * ri] = gate <= li ? da * (uc + 1) * (s + gc * al * s * (1 - s)) : scalar_t(0);
          dhp[2 * ri + 1] = (up >= -li && up <= li) ? da * gc * s : scalar_t(0);
        }
        dwp[f] = dot + bdp[r];
        for (int64_t c = 0; c < H; ++c) dyp[r * H + c] = w * gop[r * H + c];
      }
      const at::Tensor dxb = at::mm(dh.narrow(0, b.begin, n), wgu[e].t());
      const scalar_t* dxp = dxb.data_ptr<scalar_t>();
      for (int64_t r = 0; r < n; ++r) {
        const int64_t f = ord[b.begin + r];
        std::copy(dxp + r * H, dxp + (r + 1) * H, dsl + f * H);
      }
    });
  });

  at::Tensor dx = at::empty({a.T, H}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "moe_experts_combine", [&] {
    combine_slots(dslots.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), a.T, a.k, H);
  });
  at::Tensor dwgu = at::empty({a.E, H, 2 * I}, opts), dbgu = at::empty({a.E, 2 * I}, opts);
  at::Tensor dwd = at::empty({a.E, I, H}, opts), dbd = at::empty({a.E, H}, opts);
  const int32_t* off = a.offsets.data_ptr<int32_t>();
  grouped_dw_acc(xs, dh, off, a.E, dwgu, &dbgu);
  grouped_dw_acc(act, dy, off, a.E, dwd, &dbd);
  const auto dt = x.scalar_type();
  return {dx.to(dt),
          dweights.view(weights.sizes()).to(weights.scalar_type()),
          dwgu.to(dt),
          dbgu.to(dt),
          dwd.to(dt),
          dbd.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ossrl, CPU, m) {
  m.impl("grouped_gemm", &grouped_gemm_cpu);
  m.impl("grouped_gemm_dw", &grouped_gemm_dw_cpu);
  m.impl("moe_route", &moe_route_cpu);
  m.impl("moe_route_given", &moe_route_given_cpu);
  m.impl("moe_experts", &moe_experts_cpu);
  m.impl("moe_experts_backward", &moe_experts_backward_cpu);
}

}  // namespace ossrl
