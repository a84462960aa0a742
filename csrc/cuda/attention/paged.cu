// The paged KV cache on CUDA: appending keys and values into cache blocks, and attention over them
// (the forward kernel of attention/fwd.cuh reading K/V through the block table).
#include "fwd.cuh"

namespace ossrl::attention_cuda {

// ------------------------------------------------------------------------------------------
// Paged KV append
// ------------------------------------------------------------------------------------------

// One block per new token: find its sequence by binary search over cu_seqlens, then copy its
// Hkv*D keys and values to logical position cache_seqlens[b] + i through the block table.
// Out-of-range positions or block ids are skipped (the CPU op raises for them).
template <typename S>
__global__ void paged_append_kernel(S* __restrict__ kc, S* __restrict__ vc,
                                    const S* __restrict__ k, const S* __restrict__ v,
                                    const int* __restrict__ block_table,
                                    const int* __restrict__ cu, const int* __restrict__ cache_lens,
                                    int B, int max_blocks, int block_size, int num_blocks, int Hkv,
                                    int D, int64_t kc_blk, int64_t kc_tok, int64_t kc_head,
                                    int64_t kc_d, int64_t vc_blk, int64_t vc_tok, int64_t vc_head,
                                    int64_t vc_d) {
  const int t = blockIdx.x;
  // Smallest b with cu[b+1] > t.
  int lo = 0, hi = B;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (cu[mid + 1] > t) hi = mid;
    else lo = mid + 1;
  }
  const int b = lo;
  if (b >= B || cu[b] > t) return;
  const int64_t pos = static_cast<int64_t>(cache_lens[b]) + (t - cu[b]);
  if (pos < 0 || pos >= static_cast<int64_t>(max_blocks) * block_size) return;
  const int blk = block_table[static_cast<int64_t>(b) * max_blocks + pos / block_size];
  if (blk < 0 || blk >= num_blocks) return;
  const int64_t slot = pos % block_size;
  const int64_t src = static_cast<int64_t>(t) * Hkv * D;
  for (int e = threadIdx.x; e < Hkv * D; e += blockDim.x) {
    const int hh = e / D, d = e % D;
    kc[blk * kc_blk + slot * kc_tok + hh * kc_head + d * kc_d] = k[src + e];
    vc[blk * vc_blk + slot * vc_tok + hh * vc_head + d * vc_d] = v[src + e];
  }
}


// ---- paged KV cache ----

struct PagedDims {
  int64_t num_blocks, block_size, Hkv, D, B, max_blocks;
};

PagedDims check_cache(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& block_table, const at::Tensor& ref, const char* ref_name) {
  check_dim(k_cache, 4, op, "k_cache");
  check_float(k_cache, op, "k_cache");
  OSSRL_CHECK(v_cache.sizes() == k_cache.sizes(), op, "v_cache has shape ", v_cache.sizes(),
              " but k_cache has shape ", k_cache.sizes());
  check_same_dtype(v_cache, k_cache, op, "v_cache", "k_cache");
  check_same_device(k_cache, ref, op, "k_cache", ref_name);
  check_same_device(v_cache, k_cache, op, "v_cache", "k_cache");
  check_int32(block_table, op, "block_table");
  check_dim(block_table, 2, op, "block_table");
  check_same_device(block_table, k_cache, op, "block_table", "k_cache");
  PagedDims d{k_cache.size(0), k_cache.size(1), k_cache.size(2), k_cache.size(3),
              block_table.size(0), block_table.size(1)};
  OSSRL_CHECK(d.block_size > 0, op, "k_cache block_size (dim 1) must be > 0");
  OSSRL_CHECK(d.num_blocks < (int64_t(1) << 31), op, "too many cache blocks");
  OSSRL_CHECK(d.B <= 65535, op, "at most 65535 sequences per call on CUDA, got ", d.B);
  return d;
}

void paged_kv_append_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& k_in, const at::Tensor& v_in,
                          const at::Tensor& block_table_in, const at::Tensor& cu_in,
                          const at::Tensor& cache_seqlens_in) {
  ossrl::cuda::require_kernel_image(k_cache, "paged_kv_append");
  const char* op = "paged_kv_append";
  check_dim(k_in, 3, op, "k");
  check_dim(v_in, 3, op, "v");
  OSSRL_CHECK(k_cache.is_cuda(), op, "k_cache must be a CUDA tensor here, got ",
              k_cache.device());
  const PagedDims d = check_cache(op, k_cache, v_cache, block_table_in, k_cache, "k_cache");
  // Cheap (no host sync), as on the CPU: every write needs memory of its own. Two sequences
  // appending into one block are not checked here (that needs the block table on the host).
  check_separate_caches(k_cache, v_cache, op);
  check_same_dtype(k_in, k_cache, op, "k", "k_cache");
  check_same_dtype(v_in, k_cache, op, "v", "k_cache");
  check_same_device(k_in, k_cache, op, "k", "k_cache");
  check_same_device(v_in, k_cache, op, "v", "k_cache");
  OSSRL_CHECK(v_in.sizes() == k_in.sizes(), op, "v has shape ", v_in.sizes(), " but k has shape ",
              k_in.sizes());
  OSSRL_CHECK(k_in.size(1) == d.Hkv && k_in.size(2) == d.D, op, "k must have shape (T, ", d.Hkv,
              ", ", d.D, ") to match the cache, got ", k_in.sizes());
  check_cu(cu_in, k_in.size(0), k_cache, op, "cu_seqlens", "the number of new tokens k.shape[0]",
           "k_cache");
  OSSRL_CHECK(cu_in.size(0) == d.B + 1, op, "cu_seqlens must have B+1 = ", d.B + 1,
              " entries (B = block_table.shape[0]), got ", cu_in.size(0));
  check_int32(cache_seqlens_in, op, "cache_seqlens");
  check_dim(cache_seqlens_in, 1, op, "cache_seqlens");
  check_same_device(cache_seqlens_in, k_cache, op, "cache_seqlens", "k_cache");
  check_size(cache_seqlens_in, 0, d.B, op, "cache_seqlens", "the number of sequences");
  const int64_t Tn = k_in.size(0);
  OSSRL_CHECK(Tn < (int64_t(1) << 31) - 1, op, "too many new tokens");
  if (Tn == 0 || d.B == 0 || d.Hkv * d.D == 0 || d.num_blocks == 0 || d.max_blocks == 0) return;
  c10::cuda::CUDAGuard guard(k_cache.device());
  at::Tensor k = k_in.contiguous(), v = v_in.contiguous();
  at::Tensor bt = block_table_in.contiguous(), cu = cu_in.contiguous(),
             cl = cache_seqlens_in.contiguous();
  const int threads = static_cast<int>(std::min<int64_t>(256, ceil_div(d.Hkv * d.D, 32) * 32));
  auto launch = [&](auto zero) {
    using S = decltype(zero);
    paged_append_kernel<S><<<static_cast<unsigned>(Tn), threads, 0,
                             at::cuda::getCurrentCUDAStream()>>>(
        static_cast<S*>(k_cache.data_ptr()), static_cast<S*>(v_cache.data_ptr()),
        static_cast<const S*>(k.data_ptr()), static_cast<const S*>(v.data_ptr()),
        bt.data_ptr<int>(), cu.data_ptr<int>(), cl.data_ptr<int>(), static_cast<int>(d.B),
        static_cast<int>(d.max_blocks), static_cast<int>(d.block_size),
        static_cast<int>(d.num_blocks), static_cast<int>(d.Hkv), static_cast<int>(d.D),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  // A bitwise copy: the dtypes are equal.
  if (k_cache.element_size() == 2) launch(uint16_t{});
  else if (k_cache.element_size() == 4) launch(uint32_t{});
  else launch(uint64_t{});
}

// Whether the forward kernel can read a K/V cache in place: unit stride in the head dim, 16-byte
// aligned rows.
bool cache_readable(const at::Tensor& c) {
  const int64_t es = c.element_size();
  return c.stride(3) == 1 && (c.stride(0) * es) % 16 == 0 && (c.stride(1) * es) % 16 == 0 &&
         (c.stride(2) * es) % 16 == 0 && reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0;
}

// A cache it cannot: only the blocks the table names are copied (B x max_blocks of them, in table
// order, not the whole cache), and the table becomes their positions. Entries past a sequence's
// length are never read; clamped, they copy some block harmlessly. No host synchronisation.
void gather_cache_blocks(at::Tensor& kc, at::Tensor& vc, at::Tensor& bt, int64_t num_blocks) {
  const at::Tensor idx = bt.to(at::kLong).flatten().clamp(0, num_blocks - 1);
  kc = kc.index_select(0, idx).contiguous();
  vc = vc.index_select(0, idx).contiguous();
  bt = at::arange(idx.numel(), bt.options()).view(bt.sizes());
}

at::Tensor paged_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_cache_in,
                                const at::Tensor& v_cache_in, const at::Tensor& block_table_in,
                                const at::Tensor& cu_q_in, const at::Tensor& seq_lens_in,
                                int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
                                int64_t window, const std::optional<at::Tensor>& sinks_in,
                                double softmax_scale) {
  ossrl::cuda::require_kernel_image(q_in, "paged_attention");
  const char* op = "paged_attention";
  check_dim(q_in, 3, op, "q");
  check_float(q_in, op, "q");
  OSSRL_CHECK(q_in.is_cuda(), op, "q must be a CUDA tensor here, got ", q_in.device());
  const PagedDims d = check_cache(op, k_cache_in, v_cache_in, block_table_in, q_in, "q");
  check_same_dtype(k_cache_in, q_in, op, "k_cache", "q");
  const int64_t Tq = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2);
  OSSRL_CHECK(D == d.D, op, "q has head dim ", D, " but the cache has ", d.D);
  OSSRL_CHECK(d.Hkv > 0 && Hq % d.Hkv == 0, op, "the number of query heads (", Hq,
              ") must be a multiple of the number of cached key/value heads (", d.Hkv, ")");
  check_window(window, op);
  check_cu(cu_q_in, Tq, q_in, op, "cu_seqlens_q", "the number of query tokens q.shape[0]", "q");
  OSSRL_CHECK(cu_q_in.size(0) == d.B + 1, op, "cu_seqlens_q must have B+1 = ", d.B + 1,
              " entries (B = block_table.shape[0]), got ", cu_q_in.size(0));
  check_int32(seq_lens_in, op, "seq_lens");
  check_dim(seq_lens_in, 1, op, "seq_lens");
  check_same_device(seq_lens_in, q_in, op, "seq_lens", "q");
  check_size(seq_lens_in, 0, d.B, op, "seq_lens", "the number of sequences");
  OSSRL_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, op,
              "max_seqlen_q and max_seqlen_k must be >= 0");
  const int64_t G = Hq / std::max<int64_t>(d.Hkv, 1);
  OSSRL_CHECK(Tq * std::max<int64_t>(G, 1) < kMaxTokens, op,
              "at most 2^30 (query token, head) rows per GQA group are supported");
  c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor sinks = prepare_sinks(sinks_in, q_in, Hq, op);
  if (!kernels_take(q_in.scalar_type(), D))
    return composite::paged_attention(q_in, k_cache_in, v_cache_in, block_table_in, cu_q_in, seq_lens_in,
                                      causal, window, given(sinks_in), softmax_scale);
  at::Tensor out = at::zeros(q_in.sizes(), q_in.options());
  dispatch_attn(q_in.scalar_type(), D, op, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int DD = decltype(dim)::value;
    if (Tq == 0 || d.B == 0 || Hq == 0 || d.num_blocks == 0 || d.max_blocks == 0) return;
    auto stream = at::cuda::getCurrentCUDAStream();
    at::Tensor q = dense(q_in);
    at::Tensor kc = k_cache_in, vc = v_cache_in;
    at::Tensor bt = block_table_in.contiguous(), cu_q = cu_q_in.contiguous(),
               sl = seq_lens_in.contiguous();
    if (!cache_readable(kc) || !cache_readable(vc)) gather_cache_blocks(kc, vc, bt, d.num_blocks);
    const int64_t max_keys =
        std::min<int64_t>(d.max_blocks * d.block_size, static_cast<int64_t>(kMaxTokens));
    const int64_t mk = std::min<int64_t>(max_seqlen_k, max_keys);
    const int64_t mq = std::min<int64_t>(max_seqlen_q, Tq);
    const int64_t row_tiles = std::max<int64_t>(1, ceil_div(mq * G, kBr));
    // Split-K: enough blocks for about two waves, at least 4 key tiles per split. The keys a
    // row tile sees are at most max_seqlen_k, and with causal + window at most about
    // window + max_seqlen_q. (Only the grid depends on this estimate, never the result.)
    int64_t span = mk;
    if (causal && window > 0) span = std::min<int64_t>(span, window + mq);
    const int64_t base_blocks = d.B * d.Hkv * row_tiles;
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    int64_t splits = 1;
    if (base_blocks < 2 * sms) {
      splits = std::min<int64_t>({ceil_div(2 * sms, base_blocks),
                                  std::max<int64_t>(1, ceil_div(span, 4 * kBc)), 64});
    }

    FwdParams p{};
    p.q = q.data_ptr();
    p.k = kc.data_ptr();
    p.v = vc.data_ptr();
    p.out = out.data_ptr();
    p.lse = nullptr;
    p.cu_q = cu_q.data_ptr<int>();
    p.cu_k = nullptr;
    p.block_table = bt.data_ptr<int>();
    p.seq_lens = sl.data_ptr<int>();
    p.sinks = sinks.defined() ? sinks.data_ptr<float>() : nullptr;
    p.k_blk = kc.stride(0);
    p.k_tok = kc.stride(1);
    p.k_head = kc.stride(2);
    p.v_blk = vc.stride(0);
    p.v_tok = vc.stride(1);
    p.v_head = vc.stride(2);
    p.Tq = static_cast<int>(Tq);
    p.Tk = 0;
    p.Hq = static_cast<int>(Hq);
    p.Hkv = static_cast<int>(d.Hkv);
    p.group = static_cast<int>(G);
    p.rows_per_token = static_cast<int>(G);
    p.max_blocks = static_cast<int>(d.max_blocks);
    p.block_size = static_cast<int>(d.block_size);
    p.num_cache_blocks = static_cast<int>(kc.size(0));  // the blocks gathered, if they were
    p.max_keys = static_cast<int>(max_keys);
    p.causal = causal;
    p.window = clamp_window(window, max_keys);
    p.num_splits = static_cast<int>(splits);
    p.row_tiles = static_cast<int>(row_tiles);
    p.scale_log2 = static_cast<float>(softmax_scale) * kLog2e;

    at::Tensor out_part, lse_part;
    if (splits > 1) {
      out_part = at::empty({splits, Tq, Hq, DD}, q_in.options().dtype(at::kFloat));
      lse_part = at::full({splits, Tq, Hq}, -std::numeric_limits<float>::infinity(),
                          q_in.options().dtype(at::kFloat));
      p.out_part = out_part.data_ptr<float>();
      p.lse_part = lse_part.data_ptr<float>();
    }
    const size_t smem = (kBr + 2 * kBc) * (DD + 8) * sizeof(T);
    auto kernel = attn_fwd_kernel<T, DD, true>;
    set_smem(kernel, smem);
    dim3 grid(static_cast<unsigned>(row_tiles * splits), static_cast<unsigned>(d.Hkv),
              static_cast<unsigned>(d.B));
    kernel<<<grid, kThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (splits > 1) {
      const int64_t rows = Tq * Hq;
      attn_merge_kernel<T><<<static_cast<unsigned>(ceil_div(rows, kThreads / 32)), kThreads, 0,
                             stream>>>(out_part.data_ptr<float>(), lse_part.data_ptr<float>(),
                                       p.sinks, static_cast<T*>(out.data_ptr()),
                                       static_cast<int>(Tq), static_cast<int>(Hq), DD,
                                       static_cast<int>(splits));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

}  // namespace ossrl::attention_cuda
