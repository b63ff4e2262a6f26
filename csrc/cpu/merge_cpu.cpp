// CPU kernels of the private ops tokenkern::_merge_tokens_kernel and
// tokenkern::_bipartite_merge_kernel, which the public merge ops (tokenkern/ops/merge.py) call
// after checking every argument and value. They follow the same per-token steps as the CUDA
// kernels (csrc/cuda/merge_kernels.cuh) and share their math (csrc/common/merge_math.h):
// choose targets, weight them, then let every receiving token sum its contributions in
// ascending source order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "checks.h"
#include "common/merge_math.h"
#include "common/topk_select.h"
#include "merge_args.h"

namespace tokenkern {
namespace {

// The kernel indexes with keep_idx: every value must be in [0, n) (ascending order is the
// public op's rule; an unsorted row cannot make the kernel read out of bounds).
void assert_keep_in_range(const at::Tensor& keep, int64_t n) {
  const int64_t* p = keep.data_ptr<int64_t>();
  for (int64_t i = 0; i < keep.numel(); ++i) TOKENKERN_ASSERT("_merge_tokens_kernel", p[i] >= 0 && p[i] < n);
}

double dot(const float* a, const float* b, int64_t c) {
  double s = 0.0;
  for (int64_t i = 0; i < c; ++i) s += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  return s;
}

std::vector<float> inverse_norms(const float* m, int64_t rows, int64_t c) {
  std::vector<float> inv(static_cast<size_t>(rows));
  for (int64_t i = 0; i < rows; ++i) inv[i] = inverse_norm(dot(m + i * c, m + i * c, c));
  return inv;
}

// Contributions to the kept tokens, in ascending source order per receiver.
struct Contribution {
  int64_t receiver, source;
  float c;  // a * w[source]
};

// One sample of merge_tokens. x: (N, D), metric/query: (N, C) float32, w: (N), keep: (K).
// Writes merged (K, D) float32 and mass (K).
void merge_one(const float* x, const float* metric, const float* query, const float* w, const int64_t* keep,
               const MergeArgs& a, int64_t topm, float temperature, float* merged, float* mass) {
  const int64_t n = a.n, d = a.d, k = a.k, c = a.c;
  std::vector<int64_t> kept_pos(static_cast<size_t>(n), -1);
  for (int64_t j = 0; j < k; ++j) kept_pos[keep[j]] = j;
  std::vector<float> inv;
  if (a.cosine) inv = inverse_norms(metric, n, c);
  const float* chooser_rows = a.cosine ? metric : query;

  // Contributions, summed per receiving kept token in ascending source order: first their
  // coefficients (csum), then the rows scaled by the normalized coefficients (see
  // merge_denominator).
  std::vector<Contribution> contributions;
  std::vector<float> acc(static_cast<size_t>(k * d), 0.0f), csum(static_cast<size_t>(k), 0.0f);
  const int64_t n_candidates = a.kept_mode ? n - 1 : k;
  std::vector<double> sims(static_cast<size_t>(n_candidates));
  std::vector<int64_t> cand(static_cast<size_t>(n_candidates)), chosen(static_cast<size_t>(topm)),
      scratch(static_cast<size_t>(n_candidates));
  std::vector<float> chosen_sims(static_cast<size_t>(topm)), coef(static_cast<size_t>(topm));

  auto similarity = [&](int64_t chooser, int64_t target) {
    const double s = dot(chooser_rows + chooser * c, metric + target * c, c);
    return a.cosine ? s * inv[chooser] * inv[target] : s;
  };
  auto add = [&](int64_t receiver, int64_t source, float cs) {
    contributions.push_back({receiver, source, cs});
    csum[receiver] += cs;
  };

  if (!a.kept_mode) {
    for (int64_t j = 0; j < k; ++j) cand[j] = keep[j];
    for (int64_t i = 0; i < n; ++i) {
      if (kept_pos[i] >= 0) continue;  // choosers: the dropped tokens, ascending
      for (int64_t j = 0; j < k; ++j) sims[j] = similarity(i, cand[j]);
      topk_indices_ascending(sims.data(), k, topm, chosen.data(), scratch.data());
      for (int64_t s = 0; s < topm; ++s) chosen_sims[s] = static_cast<float>(sims[chosen[s]]);
      assignment_weights(chosen_sims.data(), topm, temperature, coef.data());
      for (int64_t s = 0; s < topm; ++s) add(chosen[s], i, coef[s] * w[i]);
    }
  } else {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t self = keep[j];
      int64_t t = 0;
      for (int64_t i = 0; i < n; ++i) {
        if (i == self) continue;
        cand[t] = i;
        sims[t++] = similarity(self, i);
      }
      topk_indices_ascending(sims.data(), n - 1, topm, chosen.data(), scratch.data());
      for (int64_t s = 0; s < topm; ++s) chosen_sims[s] = static_cast<float>(sims[chosen[s]]);
      assignment_weights(chosen_sims.data(), topm, temperature, coef.data());
      for (int64_t s = 0; s < topm; ++s) add(j, cand[chosen[s]], coef[s] * w[cand[chosen[s]]]);
    }
  }
  std::vector<float> denom(static_cast<size_t>(k));
  for (int64_t j = 0; j < k; ++j) denom[j] = merge_denominator(a.combine, w[keep[j]], csum[j]);
  for (const Contribution& t : contributions) {
    float* r = acc.data() + t.receiver * d;
    const float* xs = x + t.source * d;
    const float cs = t.c / denom[t.receiver];
    for (int64_t e = 0; e < d; ++e) r[e] += cs * xs[e];
  }
  for (int64_t j = 0; j < k; ++j) {
    const int64_t self = keep[j];
    const float ws = w[self];
    for (int64_t e = 0; e < d; ++e) {
      merged[j * d + e] = finalize_merge(a.combine, x[self * d + e], ws, acc[j * d + e], csum[j]);
    }
    mass[j] = ws + csum[j];
  }
}

std::tuple<at::Tensor, at::Tensor> merge_tokens_cpu(const at::Tensor& x, const at::Tensor& keep_idx,
                                                    const std::optional<at::Tensor>& metric,
                                                    const std::optional<at::Tensor>& weight, int64_t topm,
                                                    double temperature, c10::string_view combine,
                                                    const std::optional<at::Tensor>& query_metric,
                                                    c10::string_view assign) {
  const MergeArgs a = merge_tokens_args(x, keep_idx, metric, weight, topm, combine, query_metric, assign);
  const at::Tensor keep = keep_idx.contiguous();
  assert_keep_in_range(keep, a.n);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor mf = metric.has_value() ? metric->to(at::kFloat).contiguous() : xf;
  const at::Tensor qf = query_metric.has_value() ? query_metric->to(at::kFloat).contiguous() : mf;
  const at::Tensor wf =
      weight.has_value() ? weight->to(at::kFloat).contiguous() : at::ones({a.batch, a.n}, xf.options());
  at::Tensor merged = at::empty({a.batch, a.k, a.d}, xf.options());
  at::Tensor mass = at::empty({a.batch, a.k}, xf.options());
  const float temp = static_cast<float>(temperature);
  at::parallel_for(0, a.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      merge_one(xf.data_ptr<float>() + b * a.n * a.d, mf.data_ptr<float>() + b * a.n * a.c,
                qf.data_ptr<float>() + b * a.n * a.c, wf.data_ptr<float>() + b * a.n,
                keep.data_ptr<int64_t>() + b * a.k, a, topm, temp, merged.data_ptr<float>() + b * a.k * a.d,
                mass.data_ptr<float>() + b * a.k);
    }
  });
  return {merged.to(x.scalar_type()), mass};
}

// One sample of bipartite_merge: A = even positions, B = odd positions. Output rows: the
// unmerged A tokens in ascending position, then every B token in order.
void bipartite_one(const float* x, const float* metric, const float* size, const BipartiteArgs& a, int64_t r,
                   bool protect_first, float* out, float* out_size) {
  const int64_t d = a.d, c = a.c, na = a.n_a, nb = a.n_b;
  const std::vector<float> inv = inverse_norms(metric, a.n, c);
  std::vector<double> best(static_cast<size_t>(na));
  std::vector<int64_t> match(static_cast<size_t>(na), 0);
  for (int64_t i = 0; i < na; ++i) {
    double top = 0.0;
    int64_t arg = -1;
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t ia = 2 * i, jb = 2 * j + 1;
      const double s = dot(metric + ia * c, metric + jb * c, c) * inv[ia] * inv[jb];
      if (arg < 0 || selection_key(s) > selection_key(top)) {
        top = s;
        arg = j;
      }
    }
    best[i] = top;
    match[i] = arg < 0 ? 0 : arg;
  }
  // The r best edges among the mergeable A tokens (token 0 excluded when protected).
  const int64_t first = protect_first ? 1 : 0;
  std::vector<char> merged_a(static_cast<size_t>(na), 0);
  if (r > 0) {
    std::vector<int64_t> chosen(static_cast<size_t>(r)), scratch(static_cast<size_t>(na - first));
    topk_indices_ascending(best.data() + first, na - first, r, chosen.data(), scratch.data());
    for (int64_t t = 0; t < r; ++t) merged_a[chosen[t] + first] = 1;
  }
  int64_t row = 0;
  for (int64_t i = 0; i < na; ++i) {
    if (merged_a[i]) continue;
    std::copy(x + 2 * i * d, x + (2 * i + 1) * d, out + row * d);
    out_size[row++] = size[2 * i];
  }
  std::vector<float> acc(static_cast<size_t>(d));
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t self = 2 * j + 1;
    std::fill(acc.begin(), acc.end(), 0.0f);
    float csum = 0.0f;
    for (int64_t i = 0; i < na; ++i) {
      if (merged_a[i] && match[i] == j) csum += size[2 * i];
    }
    const float denom = merge_denominator(Combine::kMean, size[self], csum);
    for (int64_t i = 0; i < na; ++i) {
      if (!merged_a[i] || match[i] != j) continue;
      const float cs = size[2 * i] / denom;
      for (int64_t e = 0; e < d; ++e) acc[e] += cs * x[2 * i * d + e];
    }
    for (int64_t e = 0; e < d; ++e) {
      out[row * d + e] = finalize_merge(Combine::kMean, x[self * d + e], size[self], acc[e], csum);
    }
    out_size[row++] = size[self] + csum;
  }
}

std::tuple<at::Tensor, at::Tensor> bipartite_merge_cpu(const at::Tensor& x, const at::Tensor& metric, int64_t r,
                                                       const std::optional<at::Tensor>& size, bool protect_first) {
  const BipartiteArgs a = bipartite_merge_args(x, metric, r, size, protect_first);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor mf = metric.to(at::kFloat).contiguous();
  const at::Tensor sf =
      size.has_value() ? size->to(at::kFloat).contiguous() : at::ones({a.batch, a.n}, xf.options());
  at::Tensor out = at::empty({a.batch, a.n - r, a.d}, xf.options());
  at::Tensor out_size = at::empty({a.batch, a.n - r}, xf.options());
  at::parallel_for(0, a.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      bipartite_one(xf.data_ptr<float>() + b * a.n * a.d, mf.data_ptr<float>() + b * a.n * a.c,
                    sf.data_ptr<float>() + b * a.n, a, r, protect_first,
                    out.data_ptr<float>() + b * (a.n - r) * a.d, out_size.data_ptr<float>() + b * (a.n - r));
    }
  });
  return {out.to(x.scalar_type()), out_size};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenkern, CPU, m) {
  m.impl("_merge_tokens_kernel", &merge_tokens_cpu);
  m.impl("_bipartite_merge_kernel", &bipartite_merge_cpu);
}

}  // namespace tokenkern
