// Per-token math of the merge ops, shared by csrc/cpu/merge_cpu.cpp and the CUDA kernels of
// csrc/cuda/merge_kernels.cuh. Torch-free.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/host_device.h"

namespace tokenkern {

// Combine rules of merge_tokens (see finalize_merge).
enum class Combine : int32_t { kMean = 0, kSum = 1, kAddMean = 2 };

// 1 / max(||row||, kNormEps): the cosine of a zero row with anything is 0.
constexpr float kNormEps = 1e-12f;

TOKENKERN_HD float inverse_norm(double sum_squares) {
  const double norm = sqrt(sum_squares);
  return static_cast<float>(1.0 / (norm > kNormEps ? norm : static_cast<double>(kNormEps)));
}

// Order-preserving 32-bit key of a similarity: NaN ranks as -inf, -0.0 as +0.0.
// Larger key = better; equal keys tie and go to the lower index.
TOKENKERN_HD int32_t order_key(float v) {
  if (v != v) v = -INFINITY;
  if (v == 0.0f) v = 0.0f;
  int32_t bits;
  memcpy(&bits, &v, sizeof(bits));
  return bits < 0 ? (bits ^ 0x7FFFFFFF) : bits;
}

// Assignment weights a_ij of a dropped token over its m chosen targets, from their
// similarities: 1 when m == 1; uniform 1/m when temperature == 0; otherwise
// softmax(sim / temperature) (max-subtracted, float32).
TOKENKERN_HD void assignment_weights(const float* sims, int64_t m, float temperature, float* out) {
  if (m == 1) {
    out[0] = 1.0f;
    return;
  }
  if (temperature == 0.0f) {
    const float u = 1.0f / static_cast<float>(m);
    for (int64_t s = 0; s < m; ++s) out[s] = u;
    return;
  }
  float top = -INFINITY;
  for (int64_t s = 0; s < m; ++s) top = sims[s] > top ? sims[s] : top;
  float total = 0.0f;
  for (int64_t s = 0; s < m; ++s) {
    out[s] = expf((sims[s] - top) / temperature);
    total += out[s];
  }
  for (int64_t s = 0; s < m; ++s) out[s] /= total;
}

// The merge rules, per receiving kept token j with self value x_j, weight w_j and the
// contributions c_s x_s (c_s = a_s w_s, csum = sum_s c_s):
//   mean:     (w_j x_j + sum c x) / (w_j + csum); x_j exactly when nothing was merged in or
//             the mass is 0
//   sum:      x_j + sum c x
//   add_mean: x_j + sum c x / csum, or x_j when nothing was merged in (VisionZip's contextual
//             tokens)
// They are evaluated in normalized form, free of intermediate overflow: every coefficient is
// divided by merge_denominator first (acc = sum_s (c_s / denominator) x_s), so that for mean
// and add_mean every partial sum stays within max |x| (a convex combination) even when the
// weights are huge. A mass past float32's range (which the CPU op refuses) makes the element
// NaN instead of a silent wrong value.
constexpr float kFloatMax = 3.40282347e+38f;

TOKENKERN_HD float merge_denominator(Combine combine, float w_self, float csum) {
  switch (combine) {
    case Combine::kSum:
      return 1.0f;
    case Combine::kAddMean:
      return csum > 0.0f ? csum : 1.0f;
    default: {
      const float mass = w_self + csum;
      return (csum > 0.0f && mass > 0.0f) ? mass : 1.0f;
    }
  }
}

// One element of merged_j from x_j, w_j, the normalized sum acc and csum (see above).
TOKENKERN_HD float finalize_merge(Combine combine, float self, float w_self, float acc, float csum) {
  switch (combine) {
    case Combine::kSum:
      return self + acc;
    case Combine::kAddMean:
      if (!(csum > 0.0f)) return self;
      return csum <= kFloatMax ? self + acc : NAN;
    default: {
      const float mass = w_self + csum;
      if (!(csum > 0.0f && mass > 0.0f)) return self;
      return mass <= kFloatMax ? (w_self / mass) * self + acc : NAN;
    }
  }
}

}  // namespace tokenkern
