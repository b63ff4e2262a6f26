// Host test of csrc/common/topk_select.h against a brute-force ranking.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

#include "common/topk_select.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what, int64_t n, int64_t k) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s (n=%lld, k=%lld)\n", what, static_cast<long long>(n),
                 static_cast<long long>(k));
    ++failures;
  }
}

// Index i is selected iff fewer than k entries rank strictly before it.
std::vector<int64_t> brute_force(const std::vector<float>& s, int64_t k) {
  const int64_t n = static_cast<int64_t>(s.size());
  std::vector<int64_t> out;
  for (int64_t i = 0; i < n; ++i) {
    int64_t before = 0;
    const double ki = tokenkern::selection_key(s[i]);
    for (int64_t j = 0; j < n; ++j) {
      const double kj = tokenkern::selection_key(s[j]);
      before += (kj > ki || (kj == ki && j < i)) ? 1 : 0;
    }
    if (before < k) out.push_back(i);
  }
  return out;
}

void check(const std::vector<float>& s, int64_t k) {
  const int64_t n = static_cast<int64_t>(s.size());
  std::vector<int64_t> out(static_cast<size_t>(k)), scratch(static_cast<size_t>(n));
  tokenkern::topk_indices_ascending(s.data(), n, k, out.data(), scratch.data());
  expect(out == brute_force(s, k), "selection differs from brute force", n, k);
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> small(0, 3);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t n : {1, 2, 7, 64, 577}) {
    std::vector<float> distinct(static_cast<size_t>(n)), ties(static_cast<size_t>(n));
    for (auto& v : distinct) v = normal(rng);
    for (auto& v : ties) v = static_cast<float>(small(rng));
    for (int64_t k : {int64_t{1}, n / 3 + 1, n}) {
      if (k > n) continue;
      check(distinct, k);
      check(ties, k);
    }
  }
  const std::vector<float> special = {0.0f, -0.0f, nan, -inf, inf, 1.0f, -1.0f, nan, 0.0f, -inf};
  for (int64_t k = 1; k <= 10; ++k) check(special, k);
  // NaN ranks as -inf. With k = 8 the last slots go to the entries tied at -inf (indices 2,
  // 3, 7, 9) by lower index, and 0.0 at index 8 outranks them all: {0,1,2,3,4,5,6,8}.
  std::vector<int64_t> out(8), scratch(10);
  tokenkern::topk_indices_ascending(special.data(), 10, 8, out.data(), scratch.data());
  expect(out == std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 8}, "special values", 10, 8);
  if (failures == 0) std::printf("test_topk_select: all passed\n");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
