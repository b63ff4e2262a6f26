// Argument checks of merge_tokens and bipartite_merge, shared by the CPU and CUDA glue.
// Static checks (shapes, dtypes, ranges of scalar arguments) run everywhere; value checks of
// index/weight tensors (keep_idx ascending and in range, weights finite and >= 0, masses within
// float32) run on the CPU only (on CUDA they would need a host sync; the CUDA kernels instead
// write NaN to the outputs of a sample whose keep_idx or weights are invalid). The messages
// mirror tokenkern/_checks.py.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>

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

// 0 (uniform weights) or a positive normal float32 (the kernels' temperature is a float:
// never a silent 0 or inf); mirrors _checks.temperature_arg.
inline void check_temperature(double temperature) {
  TOKENKERN_CHECK("merge_tokens", std::isfinite(temperature) && std::fabs(temperature) <= 3.4028234663852886e+38,
                  "temperature must be a finite number with |temperature| <= 3.4028235e+38 (float32), got ",
                  temperature);
  TOKENKERN_CHECK("merge_tokens", temperature == 0.0 || temperature >= 1.1754943508222875e-38,
                  "temperature must be finite and >= 0: 0 or in [1.1754944e-38, 3.4028235e+38] (float32), got ",
                  temperature);
}

inline MergeArgs check_merge_tokens(const at::Tensor& x, const at::Tensor& keep_idx,
                                    const std::optional<at::Tensor>& metric,
                                    const std::optional<at::Tensor>& weight, int64_t topm,
                                    double temperature, c10::string_view combine,
                                    const std::optional<at::Tensor>& query_metric,
                                    c10::string_view assign) {
  MergeArgs a{};
  TOKENKERN_CHECK("merge_tokens", x.dim() == 3, "x must be (B, N, D), got shape ", x.sizes());
  TOKENKERN_CHECK("merge_tokens", is_merge_dtype(x.scalar_type()),
                  "x must have dtype float32 or float16 or bfloat16, got ", dtype_name(x.scalar_type()));
  a.batch = x.size(0);
  a.n = x.size(1);
  a.d = x.size(2);
  TOKENKERN_CHECK("merge_tokens", keep_idx.dim() == 2, "keep_idx must be (B, K), got shape ", keep_idx.sizes());
  TOKENKERN_CHECK("merge_tokens", keep_idx.scalar_type() == at::kLong, "keep_idx must have dtype int64, got ",
                  dtype_name(keep_idx.scalar_type()));
  TOKENKERN_CHECK("merge_tokens", keep_idx.size(0) == a.batch, "keep_idx has batch size ", keep_idx.size(0),
                  " but x has ", a.batch);
  a.k = keep_idx.size(1);
  TOKENKERN_CHECK("merge_tokens", a.k >= 1 && a.k <= a.n, "keep_idx must keep K in [1, N=", a.n,
                  "] tokens, got K=", a.k);
  TOKENKERN_CHECK("merge_tokens", keep_idx.device() == x.device(), "keep_idx is on ", keep_idx.device(),
                  " but x is on ", x.device());
  const at::Tensor& m = metric.has_value() ? *metric : x;
  TOKENKERN_CHECK("merge_tokens", m.dim() == 3 && m.size(0) == a.batch && m.size(1) == a.n,
                  "metric must be (B, N, C) with x's B and N = (", a.batch, ", ", a.n, ", C), got shape ", m.sizes());
  TOKENKERN_CHECK("merge_tokens", is_merge_dtype(m.scalar_type()),
                  "metric must have dtype float32 or float16 or bfloat16, got ", dtype_name(m.scalar_type()));
  TOKENKERN_CHECK("merge_tokens", m.device() == x.device(), "metric is on ", m.device(), " but x is on ", x.device());
  a.c = m.size(2);
  TOKENKERN_CHECK("merge_tokens", a.c >= 1, "metric must have C >= 1 features, got shape ", m.sizes());
  a.cosine = !query_metric.has_value();
  if (query_metric.has_value()) {
    const at::Tensor& q = *query_metric;
    TOKENKERN_CHECK("merge_tokens", q.dim() == 3 && q.size(0) == a.batch && q.size(1) == a.n && q.size(2) == a.c,
                    "query_metric must be (B, N, C) = (", a.batch, ", ", a.n, ", ", a.c, "), got shape ", q.sizes());
    TOKENKERN_CHECK("merge_tokens", q.scalar_type() == m.scalar_type(), "query_metric must have metric's dtype ",
                    dtype_name(m.scalar_type()), ", got ", dtype_name(q.scalar_type()));
    TOKENKERN_CHECK("merge_tokens", q.device() == x.device(), "query_metric is on ", q.device(), " but x is on ",
                    x.device());
  }
  if (weight.has_value()) {
    const at::Tensor& w = *weight;
    TOKENKERN_CHECK("merge_tokens", w.dim() == 2 && w.size(0) == a.batch && w.size(1) == a.n,
                    "weight must be (B, N) = (", a.batch, ", ", a.n, "), got shape ", w.sizes());
    TOKENKERN_CHECK("merge_tokens", is_merge_dtype(w.scalar_type()),
                    "weight must have dtype float32 or float16 or bfloat16, got ", dtype_name(w.scalar_type()));
    TOKENKERN_CHECK("merge_tokens", w.device() == x.device(), "weight is on ", w.device(), " but x is on ", x.device());
  }
  if (combine == "mean") {
    a.combine = Combine::kMean;
  } else if (combine == "sum") {
    a.combine = Combine::kSum;
  } else if (combine == "add_mean") {
    a.combine = Combine::kAddMean;
  } else {
    TOKENKERN_CHECK("merge_tokens", false, "combine must be one of ('mean', 'sum', 'add_mean'), got '",
                    std::string(combine), "'");
  }
  TOKENKERN_CHECK("merge_tokens", assign == "dropped" || assign == "kept",
                  "assign must be one of ('dropped', 'kept'), got '", std::string(assign), "'");
  a.kept_mode = assign == "kept";
  const int64_t candidates = a.kept_mode ? a.n - 1 : a.k;
  TOKENKERN_CHECK("merge_tokens", topm >= 1 && topm <= candidates, "topm must be in [1, ", candidates, "] (",
                  a.kept_mode ? "1 <= topm <= N - 1 with assign='kept'" : "1 <= topm <= K", "), got ", topm);
  check_temperature(temperature);
  return a;
}

struct BipartiteArgs {
  int64_t batch, n, d, c, n_a, n_b;
};

inline BipartiteArgs check_bipartite_merge(const at::Tensor& x, const at::Tensor& metric, int64_t r,
                                           const std::optional<at::Tensor>& size, bool protect_first) {
  BipartiteArgs a{};
  TOKENKERN_CHECK("bipartite_merge", x.dim() == 3, "x must be (B, N, D), got shape ", x.sizes());
  TOKENKERN_CHECK("bipartite_merge", is_merge_dtype(x.scalar_type()),
                  "x must have dtype float32 or float16 or bfloat16, got ", dtype_name(x.scalar_type()));
  a.batch = x.size(0);
  a.n = x.size(1);
  a.d = x.size(2);
  TOKENKERN_CHECK("bipartite_merge", metric.dim() == 3 && metric.size(0) == a.batch && metric.size(1) == a.n,
                  "metric must be (B, N, C) with x's B and N = (", a.batch, ", ", a.n, ", C), got shape ",
                  metric.sizes());
  TOKENKERN_CHECK("bipartite_merge", is_merge_dtype(metric.scalar_type()),
                  "metric must have dtype float32 or float16 or bfloat16, got ", dtype_name(metric.scalar_type()));
  TOKENKERN_CHECK("bipartite_merge", metric.device() == x.device(), "metric is on ", metric.device(),
                  " but x is on ", x.device());
  a.c = metric.size(2);
  TOKENKERN_CHECK("bipartite_merge", a.c >= 1, "metric must have C >= 1 features, got shape ", metric.sizes());
  if (size.has_value()) {
    const at::Tensor& s = *size;
    TOKENKERN_CHECK("bipartite_merge", s.dim() == 2 && s.size(0) == a.batch && s.size(1) == a.n,
                    "size must be (B, N) = (", a.batch, ", ", a.n, "), got shape ", s.sizes());
    TOKENKERN_CHECK("bipartite_merge", is_merge_dtype(s.scalar_type()),
                    "size must have dtype float32 or float16 or bfloat16, got ", dtype_name(s.scalar_type()));
    TOKENKERN_CHECK("bipartite_merge", s.device() == x.device(), "size is on ", s.device(), " but x is on ",
                    x.device());
  }
  a.n_a = (a.n + 1) / 2;
  a.n_b = a.n / 2;
  const int64_t mergeable = a.n_b == 0 ? 0 : a.n_a - (protect_first ? 1 : 0);
  TOKENKERN_CHECK("bipartite_merge", r >= 0 && r <= mergeable, "r must be in [0, ", mergeable,
                  "] (the number of set-A tokens that can merge", protect_first ? ", token 0 protected" : "",
                  "), got ", r);
  return a;
}

}  // namespace tokenkern
