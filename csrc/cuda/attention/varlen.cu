// Packed varlen attention on CUDA (windows, GQA, learned sinks): the forward's host side (the kernel
// is in attention/fwd.cuh) and the backward, kernels and host.
#include "fwd.cuh"

namespace ossrl::attention_cuda {

// ------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------

// D_i = rowsum(dO_i * O_i) into dvec (Hq, Tq); dsinks[h] += -sum_i exp(sink_h - lse_i) D_i.
// Block = (64 tokens, one head); warp w handles tokens t0 + 16w .. t0 + 16w + 15.
template <typename T>
__global__ void __launch_bounds__(kThreads) attn_bwd_pre_kernel(
    const T* __restrict__ dout, const T* __restrict__ out, const float* __restrict__ lse,
    const float* __restrict__ sinks, float* __restrict__ dvec, float* __restrict__ dsinks, int Tq,
    int Hq, int D) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int h = blockIdx.y;
  const int t0 = blockIdx.x * 64 + warp * 16;
  float sink_part = 0.f;
  for (int k = 0; k < 16; ++k) {
    const int t = t0 + k;
    if (t >= Tq) break;  // warp-uniform
    const int64_t base = (static_cast<int64_t>(t) * Hq + h) * D;
    float s = 0.f;
    for (int d = lane; d < D; d += 32) s += to_float(dout[base + d]) * to_float(out[base + d]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) {
      dvec[static_cast<int64_t>(h) * Tq + t] = s;
      if (sinks) {
        const float l = lse[static_cast<int64_t>(h) * Tq + t];
        if (l != -INFINITY) sink_part -= expf(sinks[h] - l) * s;
      }
    }
  }
  if (sinks) {
    __shared__ float red[kThreads / 32];
    if (lane == 0) red[warp] = sink_part;
    __syncthreads();
    if (threadIdx.x == 0) {
      float tot = 0.f;
      for (int w = 0; w < kThreads / 32; ++w) tot += red[w];
      atomicAdd(dsinks + h, tot);
    }
  }
}

struct BwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* dout;
  const float* lse;   // (Hq, Tq)
  const float* dvec;  // (Hq, Tq)
  float* dq_acc;      // (Tq, Hq, D) fp32, zero-initialised; unscaled
  void* dk;           // (Tk, Hkv, D)
  void* dv;
  const int* cu_q;
  const int* cu_k;
  int Tq, Tk, Hq, Hkv, group, causal, window;
  float scale_log2, scale;
};

template <int D>
struct BwdCfg {
  static constexpr int Br = D >= 128 ? 32 : 64;  // query rows per step (register budget)
  static constexpr int LDS = D + 8;
  static constexpr int LDP = kBc + 8;            // dS tile row stride
  static constexpr int RG = Br / 16;             // dQ = dS K: warps as RG row groups x CG col groups
  static constexpr int CG = 4 / RG;
  static constexpr int DC = D / CG;              // dQ columns per warp
  static constexpr size_t smem_bytes(size_t elem) {
    return (2 * kBc * LDS + 2 * Br * LDS + Br * LDP) * elem + 2 * Br * sizeof(float);
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_bwd_kernel(const BwdParams p) {
  using Cfg = BwdCfg<D>;
  constexpr int Br = Cfg::Br, LDS = Cfg::LDS, LDP = Cfg::LDP, CPR = D / 8;
  static_assert(Cfg::RG * Cfg::CG == 4 && Cfg::DC % 16 == 0, "bad dQ warp layout");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBc * LDS;
  T* sQ = sV + kBc * LDS;
  T* sdO = sQ + Br * LDS;
  T* sdS = sdO + Br * LDS;  // [query][key]
  float* sLse = reinterpret_cast<float*>(sdS + Br * LDP);  // lse * log2(e)
  float* sDv = sLse + Br;

  const T* __restrict__ q = static_cast<const T*>(p.q);
  const T* __restrict__ kp = static_cast<const T*>(p.k);
  const T* __restrict__ vp = static_cast<const T*>(p.v);
  const T* __restrict__ dop = static_cast<const T*>(p.dout);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, tq = lane & 3;
  const int b = blockIdx.z, hkv = blockIdx.y;
  int qs, Lq, ks, Lk;
  seq_bounds(p.cu_q, b, p.Tq, qs, Lq);
  seq_bounds(p.cu_k, b, p.Tk, ks, Lk);
  const int off = Lk - Lq;
  const bool causal = p.causal != 0;
  const int window = p.window;

  for (int kb = blockIdx.x; kb * kBc < Lk; kb += gridDim.x) {
    const int j0 = kb * kBc, j1 = min(Lk, j0 + kBc);
    // Query rows that see at least one key of [j0, j1):
    //   causal: p = i + off >= j0;  window: p - window < j1 - 1, i.e. i < j1 - 1 + window - off.
    const int i_lo = causal ? max(0, j0 - off) : 0;
    int i_hi = Lq;
    if (window >= 0) {
      const int64_t lim = static_cast<int64_t>(j1) - 1 + window - off;
      i_hi = static_cast<int>(std::min<int64_t>(Lq, std::max<int64_t>(lim, 0)));
    }

    __syncthreads();  // the previous key block is done with shared memory
    for (int c = tid; c < kBc * CPR; c += kThreads) {
      const int r = c / CPR, col = (c % CPR) * 8;
      const int j = j0 + r;
      const bool ok = j < j1;
      const int64_t o = ok ? (static_cast<int64_t>(ks + j) * p.Hkv + hkv) * D + col : 0;
      cp_async16(sK + r * LDS + col, kp + o, ok);
      cp_async16(sV + r * LDS + col, vp + o, ok);
    }
    cp_async_commit();

    float dK[D / 8][4], dV[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dK[dt][e] = dV[dt][e] = 0.f;

    for (int hh = 0; hh < p.group; ++hh) {
      const int h = hkv * p.group + hh;
      for (int i0 = i_lo; i0 < i_hi; i0 += Br) {
        __syncthreads();  // the previous step is done with sQ / sdO / sdS / sLse / sDv
        for (int c = tid; c < Br * CPR; c += kThreads) {
          const int r = c / CPR, col = (c % CPR) * 8;
          const int i = i0 + r;
          const bool ok = i < i_hi;
          const int64_t o = ok ? (static_cast<int64_t>(qs + i) * p.Hq + h) * D + col : 0;
          cp_async16(sQ + r * LDS + col, q + o, ok);
          cp_async16(sdO + r * LDS + col, dop + o, ok);
        }
        cp_async_commit();
        for (int r = tid; r < Br; r += kThreads) {
          const int i = i0 + r;
          const bool ok = i < i_hi;
          const int64_t o = static_cast<int64_t>(h) * p.Tq + qs + i;
          sLse[r] = ok ? p.lse[o] * kLog2e : 0.f;
          sDv[r] = ok ? p.dvec[o] : 0.f;
        }
        cp_async_wait<0>();
        __syncthreads();

        const int last_i = min(i0 + Br, i_hi) - 1;
        const bool need_mask = (i0 + Br > i_hi) || (j0 + kBc > j1) ||
                               (causal && j1 - 1 > i0 + off) ||
                               (window >= 0 && j0 <= last_i + off - window);

        // S^T (16 keys of this warp x Br queries) = K Q^T.
        float sT[Br / 8][4];
#pragma unroll
        for (int nt = 0; nt < Br / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) sT[nt][e] = 0.f;
#pragma unroll
        for (int kc = 0; kc < D / 16; ++kc) {
          uint32_t ka[4];
          ldsm_x4(ka, addr_a(sK, LDS, warp * 16, kc * 16, lane));
#pragma unroll
          for (int np = 0; np < Br / 16; ++np) {
            uint32_t qb[4];
            ldsm_x4(qb, addr_b_nk(sQ, LDS, np * 16, kc * 16, lane));
            mma16816<T>(sT[2 * np], ka, qb[0], qb[1]);
            mma16816<T>(sT[2 * np + 1], ka, qb[2], qb[3]);
          }
        }
        // P^T: element (key jl = warp*16 + g + 8*(e>>1), query il = nt*8 + 2*tq + (e&1)).
#pragma unroll
        for (int nt = 0; nt < Br / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int il = nt * 8 + 2 * tq + (e & 1);
            float pv = exp2f(sT[nt][e] * p.scale_log2 - sLse[il]);
            if (need_mask) {
              const int i = i0 + il;
              const int j = j0 + warp * 16 + g + 8 * (e >> 1);
              if (!(i < i_hi && j < j1 && visible(j, i + off, causal, window))) pv = 0.f;
            }
            sT[nt][e] = pv;
          }
        }
        // dV += P^T dO  (A = P^T from the C fragments, as in the forward; B = dO stored [i][d]).
#pragma unroll
        for (int kk = 0; kk < Br / 16; ++kk) {
          uint32_t a[4];
          a[0] = pack2<T>(sT[2 * kk][0], sT[2 * kk][1]);
          a[1] = pack2<T>(sT[2 * kk][2], sT[2 * kk][3]);
          a[2] = pack2<T>(sT[2 * kk + 1][0], sT[2 * kk + 1][1]);
          a[3] = pack2<T>(sT[2 * kk + 1][2], sT[2 * kk + 1][3]);
#pragma unroll
          for (int dp = 0; dp < D / 16; ++dp) {
            uint32_t ob[4];
            ldsm_x4_t(ob, addr_b_kn(sdO, LDS, kk * 16, dp * 16, lane));
            mma16816<T>(dV[2 * dp], a, ob[0], ob[1]);
            mma16816<T>(dV[2 * dp + 1], a, ob[2], ob[3]);
          }
        }
        // dP^T = V dO^T, then dS^T = P^T * (dP^T - D_i), in place.
        float dsT[Br / 8][4];
#pragma unroll
        for (int nt = 0; nt < Br / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) dsT[nt][e] = 0.f;
#pragma unroll
        for (int kc = 0; kc < D / 16; ++kc) {
          uint32_t va[4];
          ldsm_x4(va, addr_a(sV, LDS, warp * 16, kc * 16, lane));
#pragma unroll
          for (int np = 0; np < Br / 16; ++np) {
            uint32_t ob[4];
            ldsm_x4(ob, addr_b_nk(sdO, LDS, np * 16, kc * 16, lane));
            mma16816<T>(dsT[2 * np], va, ob[0], ob[1]);
            mma16816<T>(dsT[2 * np + 1], va, ob[2], ob[3]);
          }
        }
#pragma unroll
        for (int nt = 0; nt < Br / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int il = nt * 8 + 2 * tq + (e & 1);
            dsT[nt][e] = sT[nt][e] * (dsT[nt][e] - sDv[il]);
          }
        // dK += dS^T Q  (scaled by softmax_scale at the end); B = Q stored [i][d].
#pragma unroll
        for (int kk = 0; kk < Br / 16; ++kk) {
          uint32_t a[4];
          a[0] = pack2<T>(dsT[2 * kk][0], dsT[2 * kk][1]);
          a[1] = pack2<T>(dsT[2 * kk][2], dsT[2 * kk][3]);
          a[2] = pack2<T>(dsT[2 * kk + 1][0], dsT[2 * kk + 1][1]);
          a[3] = pack2<T>(dsT[2 * kk + 1][2], dsT[2 * kk + 1][3]);
#pragma unroll
          for (int dp = 0; dp < D / 16; ++dp) {
            uint32_t qb[4];
            ldsm_x4_t(qb, addr_b_kn(sQ, LDS, kk * 16, dp * 16, lane));
            mma16816<T>(dK[2 * dp], a, qb[0], qb[1]);
            mma16816<T>(dK[2 * dp + 1], a, qb[2], qb[3]);
          }
        }
        // dS (queries as rows) to shared memory for dQ.
#pragma unroll
        for (int nt = 0; nt < Br / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int il = nt * 8 + 2 * tq + (e & 1);
            const int jl = warp * 16 + g + 8 * (e >> 1);
            sdS[il * LDP + jl] = from_float<T>(dsT[nt][e]);
          }
        __syncthreads();

        // dQ[i0.., h] += dS K: warp (rg, cg) does rows rg*16..+15, columns cg*DC..+DC-1.
        {
          const int rg = warp % Cfg::RG, cg = warp / Cfg::RG;
          float dq[Cfg::DC / 8][4];
#pragma unroll
          for (int dt = 0; dt < Cfg::DC / 8; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) dq[dt][e] = 0.f;
#pragma unroll
          for (int kk = 0; kk < kBc / 16; ++kk) {
            uint32_t a[4];
            ldsm_x4(a, addr_a(sdS, LDP, rg * 16, kk * 16, lane));
#pragma unroll
            for (int dp = 0; dp < Cfg::DC / 16; ++dp) {
              uint32_t kb2[4];
              ldsm_x4_t(kb2, addr_b_kn(sK, LDS, kk * 16, cg * Cfg::DC + dp * 16, lane));
              mma16816<T>(dq[2 * dp], a, kb2[0], kb2[1]);
              mma16816<T>(dq[2 * dp + 1], a, kb2[2], kb2[3]);
            }
          }
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            const int i = i0 + rg * 16 + g + hr * 8;
            if (i >= i_hi) continue;
            float* dst = p.dq_acc + (static_cast<int64_t>(qs + i) * p.Hq + h) * D + cg * Cfg::DC;
#pragma unroll
            for (int dt = 0; dt < Cfg::DC / 8; ++dt) {
              const int col = dt * 8 + 2 * tq;
              atomicAdd(dst + col, dq[dt][2 * hr]);
              atomicAdd(dst + col + 1, dq[dt][2 * hr + 1]);
            }
          }
        }
      }
    }
    cp_async_wait<0>();  // the K/V copies, in case no query step waited for them

    // dK, dV rows of this warp's keys.
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int j = j0 + warp * 16 + g + hr * 8;
      if (j >= j1) continue;
      const int64_t o = (static_cast<int64_t>(ks + j) * p.Hkv + hkv) * D;
      T* dkr = static_cast<T*>(p.dk) + o;
      T* dvr = static_cast<T*>(p.dv) + o;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        const int col = dt * 8 + 2 * tq;
        *reinterpret_cast<uint32_t*>(dkr + col) =
            pack2<T>(dK[dt][2 * hr] * p.scale, dK[dt][2 * hr + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(dvr + col) = pack2<T>(dV[dt][2 * hr], dV[dt][2 * hr + 1]);
      }
    }
  }
}


// ---- varlen_attention ----

std::tuple<at::Tensor, at::Tensor> varlen_attention_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& cu_q_in, const at::Tensor& cu_k_in, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, int64_t window, const std::optional<at::Tensor>& sinks_in,
    double softmax_scale) {
  ossrl::cuda::require_kernel_image(q_in, "varlen_attention");
  const char* op = "varlen_attention";
  const AttnDims d = check_varlen(op, q_in, k_in, v_in, cu_q_in, cu_k_in, max_seqlen_q,
                                  max_seqlen_k, window);
  c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor sinks = prepare_sinks(sinks_in, q_in, d.Hq, op);
  if (!kernels_take(q_in.scalar_type(), d.D))
    return composite::varlen_attention(q_in, k_in, v_in, cu_q_in, cu_k_in, causal, window,
                                       given(sinks_in), softmax_scale);
  at::Tensor out = at::zeros(q_in.sizes(), q_in.options());
  at::Tensor lse = at::full({d.Hq, d.Tq}, -std::numeric_limits<float>::infinity(),
                            q_in.options().dtype(at::kFloat));
  dispatch_attn(q_in.scalar_type(), d.D, op, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    if (d.Tq == 0 || d.B == 0 || d.Hq == 0) return;
    at::Tensor q = dense(q_in), k = dense(k_in), v = dense(v_in);
    at::Tensor cu_q = cu_q_in.contiguous(), cu_k = cu_k_in.contiguous();
    FwdParams p{};
    p.q = q.data_ptr();
    p.k = k.data_ptr();
    p.v = v.data_ptr();
    p.out = out.data_ptr();
    p.lse = lse.data_ptr<float>();
    p.cu_q = cu_q.data_ptr<int>();
    p.cu_k = cu_k.data_ptr<int>();
    p.sinks = sinks.defined() ? sinks.data_ptr<float>() : nullptr;
    p.k_tok = p.v_tok = d.Hkv * D;
    p.k_head = p.v_head = D;
    p.Tq = static_cast<int>(d.Tq);
    p.Tk = static_cast<int>(d.Tk);
    p.Hq = static_cast<int>(d.Hq);
    p.Hkv = static_cast<int>(d.Hkv);
    p.group = static_cast<int>(d.Hq / d.Hkv);
    p.rows_per_token = 1;
    p.causal = causal;
    p.window = clamp_window(window, d.Tk);
    p.num_splits = 1;
    const int64_t tiles = std::max<int64_t>(1, ceil_div(std::min<int64_t>(max_seqlen_q, d.Tq), kBr));
    p.row_tiles = static_cast<int>(tiles);
    p.scale_log2 = static_cast<float>(softmax_scale) * kLog2e;
    const size_t smem = (kBr + 2 * kBc) * (D + 8) * sizeof(T);
    auto kernel = attn_fwd_kernel<T, D, false>;
    set_smem(kernel, smem);
    dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(d.Hq),
              static_cast<unsigned>(d.B));
    kernel<<<grid, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

// ---- varlen_attention_backward ----

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const at::Tensor& cu_q_in, const at::Tensor& cu_k_in, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, int64_t window, const std::optional<at::Tensor>& sinks_in,
    double softmax_scale) {
  ossrl::cuda::require_kernel_image(grad_out, "varlen_attention_backward");
  const char* op = "varlen_attention_backward";
  const AttnDims d = check_varlen(op, q_in, k_in, v_in, cu_q_in, cu_k_in, max_seqlen_q,
                                  max_seqlen_k, window);
  OSSRL_CHECK(grad_out.sizes() == q_in.sizes(), op, "grad_out must have q's shape ", q_in.sizes(),
              ", got ", grad_out.sizes());
  OSSRL_CHECK(out_in.sizes() == q_in.sizes(), op, "out must have q's shape ", q_in.sizes(),
              ", got ", out_in.sizes());
  check_same_dtype(grad_out, q_in, op, "grad_out", "q");
  check_same_dtype(out_in, q_in, op, "out", "q");
  check_same_device(grad_out, q_in, op, "grad_out", "q");
  check_same_device(out_in, q_in, op, "out", "q");
  check_dim(lse_in, 2, op, "lse");
  const auto lse_type = q_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  OSSRL_CHECK(lse_in.scalar_type() == lse_type, op, "lse must be ", lse_type, ", got ",
              lse_in.scalar_type());
  OSSRL_CHECK(lse_in.size(0) == d.Hq && lse_in.size(1) == d.Tq, op, "lse must have shape (",
              d.Hq, ", ", d.Tq, "), got ", lse_in.sizes());
  check_same_device(lse_in, q_in, op, "lse", "q");
  c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor sinks = prepare_sinks(sinks_in, q_in, d.Hq, op);
  if (!kernels_take(q_in.scalar_type(), d.D))
    return composite::varlen_attention_backward(grad_out, q_in, k_in, v_in, out_in, lse_in, cu_q_in,
                                                cu_k_in, causal, window, given(sinks_in), softmax_scale);

  at::Tensor dk = at::zeros(k_in.sizes(), k_in.options());
  at::Tensor dv = at::zeros(v_in.sizes(), v_in.options());
  at::Tensor dsinks = sinks.defined() ? at::zeros({d.Hq}, q_in.options().dtype(at::kFloat))
                                      : at::empty({0}, q_in.options().dtype(at::kFloat));
  at::Tensor dq;
  dispatch_attn(q_in.scalar_type(), d.D, op, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    if (d.Tq == 0 || d.B == 0 || d.Hq == 0) {
      dq = at::zeros(q_in.sizes(), q_in.options());
      return;
    }
    auto stream = at::cuda::getCurrentCUDAStream();
    at::Tensor q = dense(q_in), k = dense(k_in), v = dense(v_in);
    at::Tensor dout = grad_out.contiguous(), out = out_in.contiguous();
    at::Tensor dO = dense(dout);
    at::Tensor lse = lse_in.contiguous();
    at::Tensor cu_q = cu_q_in.contiguous(), cu_k = cu_k_in.contiguous();
    at::Tensor dvec = at::empty({d.Hq, d.Tq}, q_in.options().dtype(at::kFloat));
    at::Tensor dq_acc = at::zeros({d.Tq, d.Hq, D}, q_in.options().dtype(at::kFloat));

    {
      dim3 grid(static_cast<unsigned>(ceil_div(d.Tq, 64)), static_cast<unsigned>(d.Hq));
      attn_bwd_pre_kernel<T><<<grid, kThreads, 0, stream>>>(
          static_cast<const T*>(dO.data_ptr()), static_cast<const T*>(out.data_ptr()),
          lse.data_ptr<float>(), sinks.defined() ? sinks.data_ptr<float>() : nullptr,
          dvec.data_ptr<float>(), sinks.defined() ? dsinks.data_ptr<float>() : nullptr,
          static_cast<int>(d.Tq), static_cast<int>(d.Hq), D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (d.Tk > 0) {
      BwdParams p{};
      p.q = q.data_ptr();
      p.k = k.data_ptr();
      p.v = v.data_ptr();
      p.dout = dO.data_ptr();
      p.lse = lse.data_ptr<float>();
      p.dvec = dvec.data_ptr<float>();
      p.dq_acc = dq_acc.data_ptr<float>();
      p.dk = dk.data_ptr();
      p.dv = dv.data_ptr();
      p.cu_q = cu_q.data_ptr<int>();
      p.cu_k = cu_k.data_ptr<int>();
      p.Tq = static_cast<int>(d.Tq);
      p.Tk = static_cast<int>(d.Tk);
      p.Hq = static_cast<int>(d.Hq);
      p.Hkv = static_cast<int>(d.Hkv);
      p.group = static_cast<int>(d.Hq / d.Hkv);
      p.causal = causal;
      p.window = clamp_window(window, d.Tk);
      p.scale = static_cast<float>(softmax_scale);
      p.scale_log2 = static_cast<float>(softmax_scale) * kLog2e;
      const size_t smem = BwdCfg<D>::smem_bytes(sizeof(T));
      auto kernel = attn_bwd_kernel<T, D>;
      set_smem(kernel, smem);
      const int64_t tiles =
          std::max<int64_t>(1, ceil_div(std::min<int64_t>(max_seqlen_k, d.Tk), kBc));
      dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(d.Hkv),
                static_cast<unsigned>(d.B));
      kernel<<<grid, kThreads, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    dq = dq_acc.mul_(softmax_scale).to(q_in.scalar_type());
  });
  return {dq, dk, dv, dsinks};
}

}  // namespace ossrl::attention_cuda
