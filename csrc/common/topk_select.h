// Top-k selection shared by the CPU ops and the C++ host tests. Torch-free.
//
// Rule (the project's selection convention): the k highest scores win, ties go to the
// lower index, NaN ranks as -inf, and the winners are returned in ascending index order.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>

namespace tokenkern {

template <typename T>
inline double selection_key(T value) {
  const double v = static_cast<double>(value);
  return std::isnan(v) ? -std::numeric_limits<double>::infinity() : v;
}

// Writes the indices of the k best of scores[0, n) into out[0, k), ascending.
// scratch must hold n values. Requires 1 <= k <= n.
template <typename T>
void topk_indices_ascending(const T* scores, int64_t n, int64_t k, int64_t* out,
                            int64_t* scratch) {
  std::iota(scratch, scratch + n, int64_t{0});
  if (k < n) {
    auto better = [scores](int64_t a, int64_t b) {
      const double ka = selection_key(scores[a]);
      const double kb = selection_key(scores[b]);
      return ka > kb || (ka == kb && a < b);
    };
    std::nth_element(scratch, scratch + k, scratch + n, better);
    std::sort(scratch, scratch + k);
  }
  std::copy(scratch, scratch + k, out);
}

}  // namespace tokenkern
