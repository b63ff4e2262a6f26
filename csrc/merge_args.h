// Sizes of a merge kernel call and the invariants the CPU and CUDA kernels rely on.
//
// One source for each merge validation rule: the public ops tokenkern::merge_tokens and
// tokenkern::bipartite_merge are torch.library.custom_ops declared in tokenkern/ops/merge.py,
// whose fake, CPU and CUDA faces check every argument there (with the user-facing messages)
// before calling the private kernel ops _merge_tokens_kernel / _bipartite_merge_kernel
// (csrc/tokenkern.cpp). The functions below restate none of those messages: they only unpack
// the sizes and assert, with TOKENKERN_ASSERT, what memory safety needs (shapes, dtypes,
// devices, counts in range), so that a direct call of a private op with bad input raises
// instead of reading out of bounds. Value checks (keep_idx ascending, weights finite >= 0,
// masses within float32) live in Python only; the CPU kernel additionally asserts keep_idx in
// range because it indexes with it, and the CUDA kernels write NaN for a sample whose keep_idx
// or weights are invalid.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "checks.h"
#include "common/merge_math.h"

namespace tokenkern {

struct MergeArgs {
  int64_t batch, n, d, k, c;
  Combine combine;
  bool kept_mode;  // assign == "kept": each kept token pulls its topm nearest tokens
  bool cosine;     // no query_metric: cosine similarity of metric rows
};

inline bool is_merge_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// A (batch, n, ...) tensor of `dims` dimensions, a merge dtype, on x's device.
inline bool is_bn_operand(const at::Tensor& t, int64_t dims, int64_t batch, int64_t n, const at::Tensor& x) {
  return t.dim() == dims && t.size(0) == batch && t.size(1) == n && is_merge_dtype(t.scalar_type()) &&
         t.device() == x.device();
}

inline MergeArgs merge_tokens_args(const at::Tensor& x, const at::Tensor& keep_idx,
                                   const std::optional<at::Tensor>& metric, const std::optional<at::Tensor>& weight,
                                   int64_t topm, c10::string_view combine,
                                   const std::optional<at::Tensor>& query_metric, c10::string_view assign) {
#define MERGE_ASSERT(cond) TOKENKERN_ASSERT("_merge_tokens_kernel", cond)
  MERGE_ASSERT(x.dim() == 3 && is_merge_dtype(x.scalar_type()));
  MergeArgs a{};
  a.batch = x.size(0);
  a.n = x.size(1);
  a.d = x.size(2);
  MERGE_ASSERT(keep_idx.dim() == 2 && keep_idx.scalar_type() == at::kLong && keep_idx.size(0) == a.batch);
  MERGE_ASSERT(keep_idx.device() == x.device());
  a.k = keep_idx.size(1);
  MERGE_ASSERT(a.k >= 1 && a.k <= a.n);
  const at::Tensor& m = metric.has_value() ? *metric : x;
  MERGE_ASSERT(is_bn_operand(m, 3, a.batch, a.n, x));
  a.c = m.size(2);
  a.cosine = !query_metric.has_value();
  if (query_metric.has_value()) {
    MERGE_ASSERT(is_bn_operand(*query_metric, 3, a.batch, a.n, x) && query_metric->size(2) == a.c);
    MERGE_ASSERT(query_metric->scalar_type() == m.scalar_type());  // the CUDA kernels read both as one type
  }
  if (weight.has_value()) MERGE_ASSERT(is_bn_operand(*weight, 2, a.batch, a.n, x));
  MERGE_ASSERT(combine == "mean" || combine == "sum" || combine == "add_mean");
  a.combine = combine == "mean" ? Combine::kMean : combine == "sum" ? Combine::kSum : Combine::kAddMean;
  MERGE_ASSERT(assign == "dropped" || assign == "kept");
  a.kept_mode = assign == "kept";
  MERGE_ASSERT(topm >= 1 && topm <= (a.kept_mode ? a.n - 1 : a.k));
#undef MERGE_ASSERT
  return a;
}

struct BipartiteArgs {
  int64_t batch, n, d, c, n_a, n_b;
};

inline BipartiteArgs bipartite_merge_args(const at::Tensor& x, const at::Tensor& metric, int64_t r,
                                          const std::optional<at::Tensor>& size, bool protect_first) {
#define BIPARTITE_ASSERT(cond) TOKENKERN_ASSERT("_bipartite_merge_kernel", cond)
  BIPARTITE_ASSERT(x.dim() == 3 && is_merge_dtype(x.scalar_type()));
  BipartiteArgs a{};
  a.batch = x.size(0);
  a.n = x.size(1);
  a.d = x.size(2);
  BIPARTITE_ASSERT(is_bn_operand(metric, 3, a.batch, a.n, x));
  a.c = metric.size(2);
  if (size.has_value()) BIPARTITE_ASSERT(is_bn_operand(*size, 2, a.batch, a.n, x));
  a.n_a = (a.n + 1) / 2;
  a.n_b = a.n / 2;
  BIPARTITE_ASSERT(r >= 0 && r <= (a.n_b == 0 ? 0 : a.n_a - (protect_first ? 1 : 0)));
#undef BIPARTITE_ASSERT
  return a;
}

}  // namespace tokenkern
