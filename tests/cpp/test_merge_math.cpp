// Host test of csrc/common/merge_math.h: the per-token math the CPU and CUDA merge ops share.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <vector>

#include "common/merge_math.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what);
    ++failures;
  }
}

bool close(double a, double b, double tol = 1e-6) { return std::fabs(a - b) <= tol * (1.0 + std::fabs(b)); }

}  // namespace

int main() {
  using tokenkern::Combine;
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();

  // order_key: the order of the floats, NaN with -inf, -0.0 with +0.0.
  const std::vector<float> ascending = {-inf, -3.5f, -1e-30f, 0.0f, 1e-30f, 2.0f, inf};
  for (size_t i = 1; i < ascending.size(); ++i) {
    expect(tokenkern::order_key(ascending[i - 1]) < tokenkern::order_key(ascending[i]), "order_key is monotone");
  }
  expect(tokenkern::order_key(nan) == tokenkern::order_key(-inf), "NaN ranks as -inf");
  expect(tokenkern::order_key(-0.0f) == tokenkern::order_key(0.0f), "-0.0 ranks as +0.0");

  // assignment_weights: 1 for one target, uniform at temperature 0, else a softmax.
  float w1[1];
  const float s1[1] = {0.3f};
  tokenkern::assignment_weights(s1, 1, 0.7f, w1);
  expect(w1[0] == 1.0f, "one target gets weight 1");
  float wu[4];
  const float s4[4] = {0.9f, -0.2f, 0.5f, 0.1f};
  tokenkern::assignment_weights(s4, 4, 0.0f, wu);
  for (float v : wu) expect(v == 0.25f, "temperature 0 is uniform");
  float ws[4];
  tokenkern::assignment_weights(s4, 4, 0.5f, ws);
  double z = 0.0;
  for (float s : s4) z += std::exp(static_cast<double>(s) / 0.5);
  for (int i = 0; i < 4; ++i) expect(close(ws[i], std::exp(static_cast<double>(s4[i]) / 0.5) / z), "softmax weights");
  float in_place[4] = {0.9f, -0.2f, 0.5f, 0.1f};
  tokenkern::assignment_weights(in_place, 4, 0.5f, in_place);
  for (int i = 0; i < 4; ++i) expect(in_place[i] == ws[i], "in place gives the same weights");

  // merge_denominator + finalize_merge: the rules in normalized form (acc = sum (c / denominator) x).
  auto merged = [](Combine combine, float self, float w_self, float raw_acc, float csum) {
    return tokenkern::finalize_merge(combine, self, w_self,
                                     raw_acc / tokenkern::merge_denominator(combine, w_self, csum), csum);
  };
  expect(tokenkern::merge_denominator(Combine::kMean, 3.0f, 1.0f) == 4.0f, "mean divides by the mass");
  expect(tokenkern::merge_denominator(Combine::kAddMean, 3.0f, 2.0f) == 2.0f, "add_mean divides by csum");
  expect(tokenkern::merge_denominator(Combine::kSum, 3.0f, 2.0f) == 1.0f, "sum does not divide");
  expect(tokenkern::merge_denominator(Combine::kMean, 0.0f, 0.0f) == 1.0f, "zero mass: no division by 0");
  expect(close(merged(Combine::kMean, 2.0f, 3.0f, 4.0f, 1.0f), (3.0 * 2.0 + 4.0) / 4.0), "mean");
  expect(merged(Combine::kMean, 2.0f, 3.0f, 0.0f, 0.0f) == 2.0f, "mean, nothing merged: x exactly");
  expect(merged(Combine::kMean, 2.0f, 0.0f, 0.0f, 0.0f) == 2.0f, "mean, zero mass: x");
  expect(merged(Combine::kSum, 2.0f, 3.0f, 4.0f, 1.0f) == 6.0f, "sum");
  expect(close(merged(Combine::kAddMean, 2.0f, 3.0f, 4.0f, 2.0f), 4.0), "add_mean");
  expect(merged(Combine::kAddMean, 2.0f, 3.0f, 0.0f, 0.0f) == 2.0f, "add_mean, nothing merged");
  // Huge weights: w x would overflow float32, the normalized form does not.
  const float big = 1e38f;
  const float acc_n = big / tokenkern::merge_denominator(Combine::kMean, big, big) * 100.0f;
  expect(close(tokenkern::finalize_merge(Combine::kMean, 300.0f, big, acc_n, big), 200.0, 1e-5),
         "mean of huge weights stays finite");
  expect(std::isnan(tokenkern::finalize_merge(Combine::kMean, 1.0f, 3e38f, 0.5f, 3e38f)),
         "an overflowing mass gives NaN, not a silent value");
  expect(std::isnan(tokenkern::finalize_merge(Combine::kAddMean, 1.0f, 1.0f, 0.5f, inf)), "overflowing csum: NaN");

  // inverse_norm: a zero row stays finite.
  expect(close(tokenkern::inverse_norm(4.0), 0.5), "1 / sqrt(4)");
  expect(std::isfinite(tokenkern::inverse_norm(0.0)), "zero row");

  if (failures == 0) std::printf("test_merge_math: all passed\n");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
