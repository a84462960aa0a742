// Argument checks shared by every op. Each failure names the op and the argument, so a user
// sees "ossrl.grouped_gemm: offsets must be int32" rather than a crash or a stride error.
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <initializer_list>
#include <utility>
#include <string>

namespace ossrl {

// Shape, dtype and device problems: RuntimeError. Bad values inside a tensor: ValueError.
#define OSSRL_CHECK(cond, op, ...) TORCH_CHECK(cond, "ossrl.", op, ": ", __VA_ARGS__)
#define OSSRL_CHECK_VALUE(cond, op, ...) TORCH_CHECK_VALUE(cond, "ossrl.", op, ": ", __VA_ARGS__)

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  OSSRL_CHECK(t.dim() == dim, op, name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  auto s = t.scalar_type();
  OSSRL_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, op,
              name, " must be float32, float16, bfloat16 or float64 (CPU), got ", s);
  OSSRL_CHECK(!(s == at::kDouble && t.is_cuda()), op, name,
              " is float64: the CUDA kernels take float32, float16 or bfloat16");
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op,
                             const char* name, const char* ref_name) {
  OSSRL_CHECK(t.scalar_type() == ref.scalar_type(), op, name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type());
}

// Weights that sit next to activations (routing weights, sinks): fp32 or the activations' dtype.
inline void check_aux_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op,
                            const char* name, const char* ref_name) {
  OSSRL_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == ref.scalar_type(), op, name,
              " must be float32 or the dtype of ", ref_name, " (", ref.scalar_type(), "), got ",
              t.scalar_type());
}

inline void check_int32(const at::Tensor& t, const char* op, const char* name) {
  OSSRL_CHECK(t.scalar_type() == at::kInt, op, name, " must be int32, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* name, const char* ref_name) {
  OSSRL_CHECK(t.device() == ref.device(), op, name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* op,
                       const char* name, const char* what) {
  OSSRL_CHECK(t.size(dim) == expected, op, name, ".shape[", dim, "] must equal ", what, " (",
              expected, "), got shape ", t.sizes());
}

// offsets: int32 (E,), inclusive cumulative row ends, non-decreasing, last <= rows.
// Values are checked only on the CPU: on CUDA reading them would synchronise the host, so the
// kernels clamp every offset into [0, rows] instead and never read out of bounds.
inline void check_offsets(const at::Tensor& offsets, int64_t num_groups, int64_t rows,
                          const char* op, const char* rows_name = "rows of x") {
  check_int32(offsets, op, "offsets");
  check_dim(offsets, 1, op, "offsets");
  OSSRL_CHECK(offsets.size(0) == num_groups, op, "offsets must have one entry per expert (",
              num_groups, "), got ", offsets.size(0));
  if (!offsets.is_cpu()) return;
  auto o = offsets.contiguous();
  const int32_t* p = o.data_ptr<int32_t>();
  int64_t prev = 0;
  for (int64_t e = 0; e < num_groups; ++e) {
    OSSRL_CHECK_VALUE(p[e] >= prev, op, "offsets must be non-decreasing and >= 0, got offsets[",
                      e, "] = ", p[e], " after ", prev);
    prev = p[e];
  }
  OSSRL_CHECK_VALUE(prev <= rows, op, "offsets[-1] = ", prev, " exceeds the ", rows, " ",
                    rows_name);
}

// cu_seqlens: int32 (B+1,) starts of packed sequences: [0] == 0, non-decreasing, [-1] == total.
// Values are checked only on the CPU, as for offsets.
inline void check_cu_seqlens(const at::Tensor& cu, int64_t total, const char* op,
                             const char* name, const char* total_name) {
  check_int32(cu, op, name);
  check_dim(cu, 1, op, name);
  OSSRL_CHECK(cu.size(0) >= 1, op, name, " must have B+1 >= 1 entries, got none");
  if (!cu.is_cpu()) return;
  auto c = cu.contiguous();
  const int32_t* p = c.data_ptr<int32_t>();
  const int64_t n = c.size(0);
  OSSRL_CHECK_VALUE(p[0] == 0, op, name, "[0] must be 0, got ", p[0]);
  for (int64_t i = 1; i < n; ++i) {
    OSSRL_CHECK_VALUE(p[i] >= p[i - 1], op, name, " must be non-decreasing, got ", name, "[", i,
                      "] = ", p[i], " after ", p[i - 1]);
  }
  OSSRL_CHECK_VALUE(p[n - 1] == total, op, name, "[-1] = ", p[n - 1], " must equal ", total_name,
                    " (", total, ")");
}

// A K and a V cache that paged_kv_append writes into: every write must land in memory of its own.
// A broadcast (stride-0) cache, or K and V caches that are one tensor, would let one token's write
// overwrite another's. (Cheap: no values read, so the CUDA op makes the same check.)
inline void check_separate_caches(const at::Tensor& k_cache, const at::Tensor& v_cache, const char* op) {
  for (auto [c, name] : {std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"}})
    OSSRL_CHECK(at::has_internal_overlap(*c) != at::MemOverlap::Yes, op, name,
                " has elements that share memory (a stride of 0?): appends into it would overwrite each other");
  const auto kv = at::get_overlap_status(k_cache, v_cache);
  OSSRL_CHECK(kv != at::MemOverlapStatus::Full && kv != at::MemOverlapStatus::Partial, op,
              "k_cache and v_cache share memory: they must be two separate caches");
}

}  // namespace ossrl
