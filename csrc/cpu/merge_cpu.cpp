// CPU kernel of the private op tokenkern::_merge_tokens_kernel, which the public op
// merge_tokens (tokenkern/ops/merge.py) calls after checking every argument and value. It
// follows the same per-token steps as the CUDA kernels (csrc/cuda/merge_kernels.cuh) and shares
// their math (csrc/common/merge_math.h): float32 similarities of each chooser with every
// candidate (one GEMM per sample, cpu/merge_cpu.h), target selection per chooser row, then every
// receiving token sums its contributions in ascending source order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "checks.h"
#include "common/merge_math.h"
#include "common/topk_select.h"
#include "cpu/merge_cpu.h"
#include "merge_args.h"

namespace tokenkern {
namespace {

using cpu::kOutBlock;
using cpu::kRowBlock;

// The kernel indexes with keep_idx and lists the N - K tokens it drops: every value must be in
// [0, n) and unique within its row (ascending order is the public op's rule; an unsorted row
// cannot make the kernel read out of bounds).
void assert_keep_valid(const at::Tensor& keep, int64_t n) {
  const int64_t* p = keep.const_data_ptr<int64_t>();
  const int64_t k = keep.size(1);
  std::vector<char> seen(static_cast<size_t>(n));
  for (int64_t b = 0; b < keep.size(0); ++b) {
    std::fill(seen.begin(), seen.end(), 0);
    for (const int64_t* v = p + b * k; v < p + (b + 1) * k; ++v) {
      TOKENKERN_ASSERT("_merge_tokens_kernel", *v >= 0 && *v < n);
      TOKENKERN_ASSERT("_merge_tokens_kernel", !seen[*v]);
      seen[*v] = 1;
    }
  }
}

// Inputs and work buffers of one merge_tokens call. Choosers: the dropped tokens (ascending) or,
// with assign="kept", the kept tokens; candidates: the kept tokens or all tokens. The float32
// rows and similarities live for one chunk of samples at a time (slot s = sample b - b0).
struct MergeTokensWork {
  MergeArgs a;
  int64_t topm = 1;
  float temperature = 0.0f;
  int64_t rows = 0;  // choosers per sample
  int64_t cols = 0;  // candidates per sample (with assign="kept", the chooser itself too)
  int64_t chunk = 1, b0 = 0;
  int64_t rows_stride = 0, cand_stride = 0, sims_stride = 0;  // floats per slot, multiples of 16
  at::Tensor x, keep, metric, query, weight;
  at::Tensor choosers;  // (B, rows) int64: token of each chooser
  at::Tensor rows_f;    // (chunk, rows_stride) float32: the choosers' rows (rows x C) of query or metric
  at::Tensor cand;      // (chunk, cand_stride) float32: the candidates' metric rows (cols x C)
  at::Tensor inv_rows;  // (chunk, rows), (chunk, cols) float32: inverse metric norms (cosine)
  at::Tensor inv_cand;
  at::Tensor sims;      // (chunk, sims_stride) float32: rows x cols similarities
  at::Tensor targets;   // (B, rows * topm) int64: kept slot (dropped mode) or source token (kept mode)
  at::Tensor coef;      // (B, rows * topm) float32: a * weight[source]
  at::Tensor offsets;   // (B, K + 1) int64: dropped mode, receiver j's contributions in [offsets[j], offsets[j+1])
  at::Tensor src;       // (B, rows * topm) int64: their source tokens, ascending per receiver
  at::Tensor src_coef;  // (B, rows * topm) float32: their coefficients
};

// Sample b: the chooser list and the float32 rows and inverse norms of choosers and candidates.
void prepare_sample(MergeTokensWork& w, int64_t b) {
  const MergeArgs& a = w.a;
  const int64_t slot = b - w.b0;
  const int64_t* keep = w.keep.const_data_ptr<int64_t>() + b * a.k;
  int64_t* choosers = w.choosers.data_ptr<int64_t>() + b * w.rows;
  if (a.kept_mode) {
    std::copy(keep, keep + a.k, choosers);
  } else {
    std::vector<char> kept(static_cast<size_t>(a.n), 0);
    for (int64_t j = 0; j < a.k; ++j) kept[keep[j]] = 1;
    int64_t t = 0;
    for (int64_t i = 0; i < a.n; ++i) {
      if (!kept[i]) choosers[t++] = i;
    }
  }
  float* rows = w.rows_f.data_ptr<float>() + slot * w.rows_stride;
  float* cand = w.cand.data_ptr<float>() + slot * w.cand_stride;
  cpu::load_rows(a.cosine ? w.metric : w.query, b, w.rows, [choosers](int64_t i) { return choosers[i]; }, rows);
  if (a.kept_mode) {
    cpu::load_rows(w.metric, b, a.n, [](int64_t i) { return i; }, cand);
  } else {
    cpu::load_rows(w.metric, b, a.k, [keep](int64_t j) { return keep[j]; }, cand);
  }
  if (!a.cosine) return;
  float* inv_rows = w.inv_rows.data_ptr<float>() + slot * w.rows;
  float* inv_cand = w.inv_cand.data_ptr<float>() + slot * w.cols;
  for (int64_t i = 0; i < w.rows; ++i) inv_rows[i] = inverse_norm(cpu::sum_squares(rows + i * a.c, a.c));
  for (int64_t j = 0; j < w.cols; ++j) inv_cand[j] = inverse_norm(cpu::sum_squares(cand + j * a.c, a.c));
}

// Scratch of one task of select_block.
struct SelectScratch {
  std::vector<float> row_ex, chosen_sims, weights;
  std::vector<int64_t> chosen, scratch;
  explicit SelectScratch(const MergeTokensWork& w)
      : row_ex(static_cast<size_t>(w.cols)),
        chosen_sims(static_cast<size_t>(w.topm)),
        weights(static_cast<size_t>(w.topm)),
        chosen(static_cast<size_t>(w.topm)),
        scratch(static_cast<size_t>(w.cols)) {}
};

// Chooser rows [i0, i0 + count) of sample b: top-m targets and coefficients from their
// similarity rows.
void select_block(MergeTokensWork& w, int64_t b, int64_t i0, int64_t count, SelectScratch& s) {
  const MergeArgs& a = w.a;
  const int64_t cols = w.cols, topm = w.topm, slot = b - w.b0;
  const int64_t* choosers = w.choosers.const_data_ptr<int64_t>() + b * w.rows;
  const float* inv_rows = a.cosine ? w.inv_rows.const_data_ptr<float>() + slot * w.rows : nullptr;
  const float* inv_cand = a.cosine ? w.inv_cand.const_data_ptr<float>() + slot * cols : nullptr;
  const float* weight = w.weight.const_data_ptr<float>() + b * a.n;
  float* sims = w.sims.data_ptr<float>() + slot * w.sims_stride;
  int64_t* targets = w.targets.data_ptr<int64_t>() + b * w.rows * topm;
  float* coef = w.coef.data_ptr<float>() + b * w.rows * topm;
  for (int64_t r = i0; r < i0 + count; ++r) {
    float* row = sims + r * cols;
    const int64_t self = choosers[r];
    if (a.cosine) {
      const float inv_self = inv_rows[r];
      for (int64_t j = 0; j < cols; ++j) row[j] = row[j] * inv_self * inv_cand[j];
    }
    // Candidate t of the selection: kept slot t, or (kept mode) token t with the chooser skipped.
    const float* cand_sims = row;
    int64_t n_cand = cols;
    if (a.kept_mode) {
      std::copy(row, row + self, s.row_ex.data());
      std::copy(row + self + 1, row + cols, s.row_ex.data() + self);
      cand_sims = s.row_ex.data();
      n_cand = cols - 1;
    }
    if (topm == 1) {
      s.chosen[0] = cpu::argmax_lower(cand_sims, n_cand);
    } else {
      topk_indices_ascending(cand_sims, n_cand, topm, s.chosen.data(), s.scratch.data());
    }
    for (int64_t m = 0; m < topm; ++m) s.chosen_sims[m] = cand_sims[s.chosen[m]];
    assignment_weights(s.chosen_sims.data(), topm, w.temperature, s.weights.data());
    for (int64_t m = 0; m < topm; ++m) {
      const int64_t t = s.chosen[m];
      const int64_t source = a.kept_mode ? (t < self ? t : t + 1) : self;
      targets[r * topm + m] = a.kept_mode ? source : t;
      coef[r * topm + m] = s.weights[m] * weight[source];
    }
  }
}

// Samples [b0, b0 + count): prepare, one similarity GEMM per sample (at::mm, which threads
// itself), then the target selection over blocks of chooser rows.
void select_targets(MergeTokensWork& w, int64_t b0, int64_t count) {
  const MergeArgs& a = w.a;
  w.b0 = b0;
  at::parallel_for(b0, b0 + count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) prepare_sample(w, b);
  });
  for (int64_t s = 0; s < count; ++s) {
    cpu::similarity_block(w.rows_f.const_data_ptr<float>() + s * w.rows_stride, w.rows,
                          w.cand.const_data_ptr<float>() + s * w.cand_stride, w.cols, a.c,
                          w.sims.data_ptr<float>() + s * w.sims_stride);
  }
  const int64_t blocks = cpu::ceil_div(w.rows, kRowBlock);
  at::parallel_for(0, count * blocks, 1, [&](int64_t begin, int64_t end) {
    SelectScratch scratch(w);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = b0 + t / blocks, i0 = (t % blocks) * kRowBlock;
      select_block(w, b, i0, std::min(kRowBlock, w.rows - i0), scratch);
    }
  });
}

// Dropped mode, per sample: each receiving kept slot's contributions, ascending source, by a
// counting pass over the choosers' targets.
void group_by_receiver(MergeTokensWork& w, int64_t b) {
  const int64_t entries = w.rows * w.topm, k = w.a.k;
  const int64_t* targets = w.targets.const_data_ptr<int64_t>() + b * entries;
  const float* coef = w.coef.const_data_ptr<float>() + b * entries;
  const int64_t* choosers = w.choosers.const_data_ptr<int64_t>() + b * w.rows;
  int64_t* offsets = w.offsets.data_ptr<int64_t>() + b * (k + 1);
  int64_t* src = w.src.data_ptr<int64_t>() + b * entries;
  float* src_coef = w.src_coef.data_ptr<float>() + b * entries;
  std::fill(offsets, offsets + k + 1, int64_t{0});
  for (int64_t e = 0; e < entries; ++e) ++offsets[targets[e] + 1];
  for (int64_t j = 0; j < k; ++j) offsets[j + 1] += offsets[j];
  std::vector<int64_t> fill(offsets, offsets + k);
  for (int64_t e = 0; e < entries; ++e) {
    const int64_t pos = fill[targets[e]]++;
    src[pos] = choosers[e / w.topm];
    src_coef[pos] = coef[e];
  }
}

// merged[b, j] and mass[b, j] for the kept slots [j0, j0 + count) of sample b.
template <typename T>
void reduce_block(const MergeTokensWork& w, int64_t b, int64_t j0, int64_t count, std::vector<float>& acc,
                  T* merged, float* mass) {
  const MergeArgs& a = w.a;
  const int64_t d = a.d, entries = w.rows * w.topm;
  const T* x = w.x.const_data_ptr<T>() + b * a.n * d;
  const int64_t* keep = w.keep.const_data_ptr<int64_t>() + b * a.k;
  const float* weight = w.weight.const_data_ptr<float>() + b * a.n;
  for (int64_t j = j0; j < j0 + count; ++j) {
    const int64_t* src;
    const float* cs;
    int64_t n_src;
    if (a.kept_mode) {
      src = w.targets.const_data_ptr<int64_t>() + b * entries + j * w.topm;
      cs = w.coef.const_data_ptr<float>() + b * entries + j * w.topm;
      n_src = w.topm;
    } else {
      const int64_t* offsets = w.offsets.const_data_ptr<int64_t>() + b * (a.k + 1);
      src = w.src.const_data_ptr<int64_t>() + b * entries + offsets[j];
      cs = w.src_coef.const_data_ptr<float>() + b * entries + offsets[j];
      n_src = offsets[j + 1] - offsets[j];
    }
    float csum = 0.0f;
    for (int64_t s = 0; s < n_src; ++s) csum += cs[s];
    const int64_t self = keep[j];
    const float w_self = weight[self];
    const float denom = merge_denominator(a.combine, w_self, csum);
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t s = 0; s < n_src; ++s) cpu::axpy_row(cs[s] / denom, x + src[s] * d, acc.data(), d);
    const T* xs = x + self * d;
    T* out = merged + (b * a.k + j) * d;
    for (int64_t e = 0; e < d; ++e) {
      out[e] = static_cast<T>(finalize_merge(a.combine, static_cast<float>(xs[e]), w_self, acc[e], csum));
    }
    mass[b * a.k + j] = w_self + csum;
  }
}

std::tuple<at::Tensor, at::Tensor> merge_tokens_cpu(const at::Tensor& x, const at::Tensor& keep_idx,
                                                    const std::optional<at::Tensor>& metric,
                                                    const std::optional<at::Tensor>& weight, int64_t topm,
                                                    double temperature, c10::string_view combine,
                                                    const std::optional<at::Tensor>& query_metric,
                                                    c10::string_view assign) {
  MergeTokensWork w;
  w.a = merge_tokens_args(x, keep_idx, metric, weight, topm, combine, query_metric, assign);
  const MergeArgs& a = w.a;
  w.keep = keep_idx.contiguous();
  assert_keep_valid(w.keep, a.n);
  w.x = x.contiguous();
  w.metric = metric.has_value() ? metric->contiguous() : w.x;
  w.query = query_metric.has_value() ? query_metric->contiguous() : w.metric;
  const auto f32 = w.x.options().dtype(at::kFloat);
  w.weight = weight.has_value() ? weight->to(at::kFloat).contiguous() : at::ones({a.batch, a.n}, f32);
  w.topm = topm;
  w.temperature = static_cast<float>(temperature);
  w.rows = a.kept_mode ? a.k : a.n - a.k;
  w.cols = a.kept_mode ? a.n : a.k;
  at::Tensor merged = at::empty({a.batch, a.k, a.d}, w.x.options());
  at::Tensor mass = at::empty({a.batch, a.k}, f32);
  if (a.batch == 0) return {merged, mass};
  const auto i64 = f32.dtype(at::kLong);
  w.choosers = at::empty({a.batch, std::max<int64_t>(w.rows, 1)}, i64);
  w.rows_stride = cpu::aligned_stride(w.rows * a.c);
  w.cand_stride = cpu::aligned_stride(w.cols * a.c);
  w.sims_stride = cpu::aligned_stride(w.rows * w.cols);
  w.chunk = cpu::samples_per_chunk(w.rows_stride + w.cand_stride + w.sims_stride, a.batch);
  w.rows_f = at::empty({w.chunk, w.rows_stride}, f32);
  w.cand = at::empty({w.chunk, w.cand_stride}, f32);
  w.sims = at::empty({w.chunk, w.sims_stride}, f32);
  w.inv_rows = at::empty({w.chunk, std::max<int64_t>(w.rows, 1)}, f32);
  w.inv_cand = at::empty({w.chunk, std::max<int64_t>(w.cols, 1)}, f32);
  const int64_t entries = std::max<int64_t>(w.rows * topm, 1);
  w.targets = at::empty({a.batch, entries}, i64);
  w.coef = at::empty({a.batch, entries}, f32);
  if (!a.kept_mode) {
    w.offsets = at::empty({a.batch, a.k + 1}, i64);
    w.src = at::empty({a.batch, entries}, i64);
    w.src_coef = at::empty({a.batch, entries}, f32);
  }
  for (int64_t b0 = 0; b0 < a.batch; b0 += w.chunk) select_targets(w, b0, std::min(w.chunk, a.batch - b0));
  if (!a.kept_mode) {
    at::parallel_for(0, a.batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) group_by_receiver(w, b);
    });
  }
  const int64_t out_blocks = cpu::ceil_div(a.k, kOutBlock);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.x.scalar_type(), "tokenkern_merge_tokens", [&] {
    at::parallel_for(0, a.batch * out_blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(static_cast<size_t>(a.d));
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / out_blocks, j0 = (t % out_blocks) * kOutBlock;
        reduce_block<scalar_t>(w, b, j0, std::min(kOutBlock, a.k - j0), acc, merged.data_ptr<scalar_t>(),
                               mass.data_ptr<float>());
      }
    });
  });
  return {merged, mass};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenkern, CPU, m) { m.impl("_merge_tokens_kernel", &merge_tokens_cpu); }

}  // namespace tokenkern
