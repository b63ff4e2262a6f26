// CPU kernel of the private op tokenkern::_bipartite_merge_kernel (ToMe's bipartite soft
// matching), which the public op bipartite_merge (tokenkern/ops/merge.py) calls after checking
// every argument and value. Same steps as the CUDA kernels (csrc/cuda/merge_kernels.cuh): float32
// similarities of the A tokens (even positions) with the B tokens (odd positions) by one GEMM per
// sample (cpu/merge_cpu.h), each A token's best match, the r best edges, then every output row
// written by one task, the A tokens merged into a B token summed in ascending order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
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

// Inputs and work buffers of one bipartite_merge call. The float32 rows and similarities live
// for one chunk of samples at a time (slot s = sample b - b0).
struct BipartiteWork {
  BipartiteArgs a;
  int64_t r = 0;
  bool protect_first = false;
  int64_t chunk = 1, b0 = 0;
  int64_t stride_a = 0, stride_b = 0, stride_s = 0;  // floats per slot, multiples of 16
  at::Tensor x, metric, size;
  at::Tensor rows_a, rows_b;  // (chunk, stride) float32 metric rows of set A (n_a x C) and set B (n_b x C)
  at::Tensor inv_a, inv_b;    // (chunk, n_a), (chunk, n_b): their inverse norms
  at::Tensor sims;            // (chunk, stride_s): n_a x n_b similarities
  at::Tensor best;            // (B, n_a) float32: each A token's best cosine
  at::Tensor match;           // (B, n_a) int64: and its B token
  at::Tensor unmerged;        // (B, n_a - r) int64: the unmerged A tokens, ascending
  at::Tensor offsets;         // (B, n_b + 1) int64: B token j's sources in [offsets[j], offsets[j+1])
  at::Tensor src;             // (B, r) int64: the merged A tokens (by index in A), ascending per B token
};

void prepare_sample(BipartiteWork& w, int64_t b) {
  const BipartiteArgs& a = w.a;
  const int64_t slot = b - w.b0;
  float* ra = w.rows_a.data_ptr<float>() + slot * w.stride_a;
  float* rb = w.rows_b.data_ptr<float>() + slot * w.stride_b;
  cpu::load_rows(w.metric, b, a.n_a, [](int64_t i) { return 2 * i; }, ra);
  cpu::load_rows(w.metric, b, a.n_b, [](int64_t j) { return 2 * j + 1; }, rb);
  float* inv_a = w.inv_a.data_ptr<float>() + slot * a.n_a;
  float* inv_b = w.inv_b.data_ptr<float>() + slot * a.n_b;
  for (int64_t i = 0; i < a.n_a; ++i) inv_a[i] = inverse_norm(cpu::sum_squares(ra + i * a.c, a.c));
  for (int64_t j = 0; j < a.n_b; ++j) inv_b[j] = inverse_norm(cpu::sum_squares(rb + j * a.c, a.c));
}

// A tokens [i0, i0 + count) of sample b: best B token by cosine, ties to the lower index.
void match_block(BipartiteWork& w, int64_t b, int64_t i0, int64_t count) {
  const BipartiteArgs& a = w.a;
  const int64_t nb = a.n_b, slot = b - w.b0;
  const float* inv_a = w.inv_a.const_data_ptr<float>() + slot * a.n_a;
  const float* inv_b = w.inv_b.const_data_ptr<float>() + slot * nb;
  float* sims = w.sims.data_ptr<float>() + slot * w.stride_s;
  float* best = w.best.data_ptr<float>() + b * a.n_a;
  int64_t* match = w.match.data_ptr<int64_t>() + b * a.n_a;
  for (int64_t i = i0; i < i0 + count; ++i) {
    if (nb == 0) {
      best[i] = 0.0f;
      match[i] = 0;
      continue;
    }
    float* row = sims + i * nb;
    const float ia = inv_a[i];
    for (int64_t j = 0; j < nb; ++j) row[j] = row[j] * ia * inv_b[j];
    const int64_t j = cpu::argmax_lower(row, nb);
    best[i] = row[j];
    match[i] = j;
  }
}

// Samples [b0, b0 + count): prepare, one similarity GEMM per sample (at::mm, which threads
// itself), then every A token's best match over blocks of A tokens.
void match_tokens(BipartiteWork& w, int64_t b0, int64_t count) {
  const BipartiteArgs& a = w.a;
  w.b0 = b0;
  at::parallel_for(b0, b0 + count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) prepare_sample(w, b);
  });
  for (int64_t s = 0; s < count; ++s) {
    cpu::similarity_block(w.rows_a.const_data_ptr<float>() + s * w.stride_a, a.n_a,
                          w.rows_b.const_data_ptr<float>() + s * w.stride_b, a.n_b, a.c,
                          w.sims.data_ptr<float>() + s * w.stride_s);
  }
  const int64_t blocks = cpu::ceil_div(a.n_a, kRowBlock);
  at::parallel_for(0, count * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i0 = (t % blocks) * kRowBlock;
      match_block(w, b0 + t / blocks, i0, std::min(kRowBlock, a.n_a - i0));
    }
  });
}

// Per sample: the r best edges (token 0 excluded when protected), the unmerged A list and each
// B token's merged A tokens (a counting pass, ascending).
void pick_edges(BipartiteWork& w, int64_t b) {
  const BipartiteArgs& a = w.a;
  const int64_t na = a.n_a, nb = a.n_b, r = w.r;
  const float* best = w.best.const_data_ptr<float>() + b * na;
  const int64_t* match = w.match.const_data_ptr<int64_t>() + b * na;
  std::vector<char> merged(static_cast<size_t>(na), 0);
  if (r > 0) {
    const int64_t first = w.protect_first ? 1 : 0;
    std::vector<int64_t> chosen(static_cast<size_t>(r)), scratch(static_cast<size_t>(na - first));
    topk_indices_ascending(best + first, na - first, r, chosen.data(), scratch.data());
    for (int64_t t = 0; t < r; ++t) merged[chosen[t] + first] = 1;
  }
  int64_t* unmerged = w.unmerged.data_ptr<int64_t>() + b * (na - r);
  int64_t* offsets = w.offsets.data_ptr<int64_t>() + b * (nb + 1);
  int64_t* src = w.src.data_ptr<int64_t>() + b * std::max<int64_t>(r, 1);
  std::fill(offsets, offsets + nb + 1, int64_t{0});
  int64_t u = 0;
  for (int64_t i = 0; i < na; ++i) {
    if (merged[i]) {
      ++offsets[match[i] + 1];
    } else {
      unmerged[u++] = i;
    }
  }
  for (int64_t j = 0; j < nb; ++j) offsets[j + 1] += offsets[j];
  std::vector<int64_t> fill(offsets, offsets + std::max<int64_t>(nb, 1));
  for (int64_t i = 0; i < na; ++i) {
    if (merged[i]) src[fill[match[i]]++] = i;
  }
}

// Output rows [row0, row0 + count) of sample b: the unmerged A tokens first (copied), then every
// B token with its merged A tokens (size-weighted mean, ascending A order).
template <typename T>
void output_block(const BipartiteWork& w, int64_t b, int64_t row0, int64_t count, std::vector<float>& acc, T* out,
                  float* out_size) {
  const BipartiteArgs& a = w.a;
  const int64_t d = a.d, n = a.n, r = w.r, n_unm = a.n_a - r, rows = n - r;
  const T* x = w.x.const_data_ptr<T>() + b * n * d;
  const float* size = w.size.const_data_ptr<float>() + b * n;
  const int64_t* unmerged = w.unmerged.const_data_ptr<int64_t>() + b * n_unm;
  const int64_t* offsets = w.offsets.const_data_ptr<int64_t>() + b * (a.n_b + 1);
  const int64_t* src = w.src.const_data_ptr<int64_t>() + b * std::max<int64_t>(r, 1);
  for (int64_t row = row0; row < row0 + count; ++row) {
    T* o = out + (b * rows + row) * d;
    if (row < n_unm) {
      const int64_t tok = 2 * unmerged[row];
      std::memcpy(o, x + tok * d, static_cast<size_t>(d) * sizeof(T));
      out_size[b * rows + row] = size[tok];
      continue;
    }
    const int64_t j = row - n_unm, self = 2 * j + 1;
    const int64_t* s = src + offsets[j];
    const int64_t n_src = offsets[j + 1] - offsets[j];
    const float s_self = size[self];
    float csum = 0.0f;
    for (int64_t e = 0; e < n_src; ++e) csum += size[2 * s[e]];
    const float denom = merge_denominator(Combine::kMean, s_self, csum);
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t e = 0; e < n_src; ++e) cpu::axpy_row(size[2 * s[e]] / denom, x + 2 * s[e] * d, acc.data(), d);
    const T* xs = x + self * d;
    for (int64_t e = 0; e < d; ++e) {
      o[e] = static_cast<T>(finalize_merge(Combine::kMean, static_cast<float>(xs[e]), s_self, acc[e], csum));
    }
    out_size[b * rows + row] = s_self + csum;
  }
}

std::tuple<at::Tensor, at::Tensor> bipartite_merge_cpu(const at::Tensor& x, const at::Tensor& metric, int64_t r,
                                                       const std::optional<at::Tensor>& size, bool protect_first) {
  BipartiteWork w;
  w.a = bipartite_merge_args(x, metric, r, size, protect_first);
  const BipartiteArgs& a = w.a;
  w.r = r;
  w.protect_first = protect_first;
  w.x = x.contiguous();
  w.metric = metric.contiguous();
  const auto f32 = w.x.options().dtype(at::kFloat);
  w.size = size.has_value() ? size->to(at::kFloat).contiguous() : at::ones({a.batch, a.n}, f32);
  at::Tensor out = at::empty({a.batch, a.n - r, a.d}, w.x.options());
  at::Tensor out_size = at::empty({a.batch, a.n - r}, f32);
  if (a.batch == 0 || a.n == 0) return {out, out_size};
  const auto i64 = f32.dtype(at::kLong);
  w.stride_a = cpu::aligned_stride(a.n_a * a.c);
  w.stride_b = cpu::aligned_stride(a.n_b * a.c);
  w.stride_s = cpu::aligned_stride(a.n_a * a.n_b);
  w.chunk = cpu::samples_per_chunk(w.stride_a + w.stride_b + w.stride_s, a.batch);
  w.rows_a = at::empty({w.chunk, w.stride_a}, f32);
  w.rows_b = at::empty({w.chunk, w.stride_b}, f32);
  w.sims = at::empty({w.chunk, w.stride_s}, f32);
  w.inv_a = at::empty({w.chunk, a.n_a}, f32);
  w.inv_b = at::empty({w.chunk, std::max<int64_t>(a.n_b, 1)}, f32);
  w.best = at::empty({a.batch, a.n_a}, f32);
  w.match = at::empty({a.batch, a.n_a}, i64);
  w.unmerged = at::empty({a.batch, std::max<int64_t>(a.n_a - r, 1)}, i64);
  w.offsets = at::empty({a.batch, a.n_b + 1}, i64);
  w.src = at::empty({a.batch, std::max<int64_t>(r, 1)}, i64);
  for (int64_t b0 = 0; b0 < a.batch; b0 += w.chunk) match_tokens(w, b0, std::min(w.chunk, a.batch - b0));
  at::parallel_for(0, a.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) pick_edges(w, b);
  });
  const int64_t rows = a.n - r, out_blocks = cpu::ceil_div(rows, kOutBlock);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.x.scalar_type(), "tokenkern_bipartite_merge", [&] {
    at::parallel_for(0, a.batch * out_blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(static_cast<size_t>(a.d));
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / out_blocks, row0 = (t % out_blocks) * kOutBlock;
        output_block<scalar_t>(w, b, row0, std::min(kOutBlock, rows - row0), acc, out.data_ptr<scalar_t>(),
                               out_size.data_ptr<float>());
      }
    });
  });
  return {out, out_size};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenkern, CPU, m) { m.impl("_bipartite_merge_kernel", &bipartite_merge_cpu); }

}  // namespace tokenkern
