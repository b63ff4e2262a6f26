// Building blocks of the CPU merge kernels (merge_cpu.cpp, bipartite_cpu.cpp).
//
// Determinism: a sample's similarities come from one float32 GEMM (at::mm: MKL's sgemm on x86
// builds, which threads itself) of the same shape whatever the batch, on 64-byte aligned
// buffers, called outside any at::parallel_for region; every output row is then written by one
// task that sums its contributions in ascending source order (no float atomics). Reruns on the
// same machine and thread count are bit-identical, and a sample's result does not depend on
// the rest of the batch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>

#include "common/merge_math.h"
#include "common/topk_select.h"

namespace tokenkern {
namespace cpu {

constexpr int64_t kRowBlock = 64;                   // chooser rows per selection task
constexpr int64_t kOutBlock = 16;                   // output rows per accumulation task
constexpr int64_t kAlignFloats = 16;                // 64 bytes
constexpr int64_t kChunkFloats = int64_t{1} << 23;  // float32 work buffers of a batch chunk: 32 MiB

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Elements of a per-sample slice of `count` floats, rounded up so that every slice starts
// 64-byte aligned.
inline int64_t aligned_stride(int64_t count) {
  return ceil_div(std::max<int64_t>(count, 1), kAlignFloats) * kAlignFloats;
}

// Samples per chunk when each needs `floats` of work buffers: as many as fit kChunkFloats, at
// least 1, at most batch.
inline int64_t samples_per_chunk(int64_t floats, int64_t batch) {
  return std::max<int64_t>(1, std::min(batch, kChunkFloats / std::max<int64_t>(floats, 1)));
}

// rows(i) for i in [0, count) of sample b of the contiguous (B, N, C) tensor t, as float32 rows
// of out (count x C).
template <typename RowFn>
void load_rows(const at::Tensor& t, int64_t b, int64_t count, RowFn rows, float* out) {
  const int64_t n = t.size(1), c = t.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "tokenkern_load_rows", [&] {
    const scalar_t* base = t.const_data_ptr<scalar_t>() + b * n * c;
    for (int64_t i = 0; i < count; ++i) {
      const scalar_t* src = base + rows(i) * c;
      float* dst = out + i * c;
      for (int64_t e = 0; e < c; ++e) dst[e] = static_cast<float>(src[e]);
    }
  });
}

// Sum of squares of a float32 row in a fixed order (16 interleaved partial sums, then a fixed
// pairwise reduction), so that the compiler can vectorize it without reassociating.
inline float sum_squares(const float* v, int64_t c) {
  constexpr int kLanes = 16;
  float part[kLanes] = {};
  const int64_t body = c / kLanes * kLanes;
  for (int64_t e = 0; e < body; e += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += v[e + l] * v[e + l];
  }
  for (int64_t e = body; e < c; ++e) part[e - body] += v[e] * v[e];
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) part[l] += part[l + w];
  }
  return part[0];
}

// sims (rows x cols, row-major) = a (rows x c) . t (cols x c)^T in float32.
inline void similarity_block(const float* a, int64_t rows, const float* t, int64_t cols, int64_t c, float* sims) {
  if (rows == 0 || cols == 0) return;
  if (c == 0) {
    std::fill(sims, sims + rows * cols, 0.0f);
    return;
  }
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor ta = at::from_blob(const_cast<float*>(a), {rows, c}, opts);
  const at::Tensor tt = at::from_blob(const_cast<float*>(t), {cols, c}, opts);
  at::Tensor out = at::from_blob(sims, {rows, cols}, opts);
  at::mm_out(out, ta, tt.t());
}

// The index of the best of v[0, n) (n >= 1): the highest order_key, ties to the lower index
// (the rule of topk_indices_ascending with k = 1). Per block of 16: the keys and their max (loops
// the compiler vectorizes); only a block that raises the running max is scanned for its first
// index reaching it.
inline int64_t argmax_lower(const float* v, int64_t n) {
  constexpr int64_t kBlock = 16;
  int32_t keys[kBlock];
  int32_t top = INT32_MIN;
  int64_t arg = 0;
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t len = std::min(kBlock, n - j0);
    int32_t block_top = INT32_MIN;
    if (len == kBlock) {
      for (int64_t l = 0; l < kBlock; ++l) keys[l] = order_key(v[j0 + l]);
      for (int64_t l = 0; l < kBlock; ++l) block_top = std::max(block_top, keys[l]);
    } else {
      for (int64_t l = 0; l < len; ++l) {
        keys[l] = order_key(v[j0 + l]);
        block_top = std::max(block_top, keys[l]);
      }
    }
    if (block_top > top) {  // strictly: an equal max in a later block loses the tie
      top = block_top;
      int64_t l = 0;
      while (keys[l] != block_top) ++l;
      arg = j0 + l;
    }
  }
  return arg;
}

// acc[e] += a * x[e], e in [0, d).
template <typename T>
inline void axpy_row(float a, const T* __restrict__ x, float* __restrict__ acc, int64_t d) {
  for (int64_t e = 0; e < d; ++e) acc[e] += a * static_cast<float>(x[e]);
}

}  // namespace cpu
}  // namespace tokenkern
