// Per-element rules by which the CUDA merge kernels (csrc/cuda/merge_kernels.cuh) validate their
// inputs and build their token lists in parallel: every thread derives its own token's list slot
// from counts, with no serial scan over a sample. The C++ host tests (tests/cpp/test_merge_select.cpp)
// run the same functions on CPU against serial formulations and the CPU ops' rules. Torch-free.
#pragma once

#include <cstdint>

#include "common/host_device.h"
#include "common/merge_math.h"

namespace tokenkern {

// ------------------------------------------------------------------ merge_tokens

// A token weight (merge_tokens) or size (bipartite_merge) is valid when finite and >= 0 (NaN is not).
TOKENKERN_HD bool weight_valid(float w) { return w >= 0.0f && w <= kFloatMax; }

// Slot t of the keep row keep[0, k) is valid when its token is in [0, n) and above slot t - 1:
// a row with every slot valid is strictly ascending.
TOKENKERN_HD bool keep_slot_valid(const int64_t* keep, int64_t t, int64_t n) {
  const int64_t v = keep[t];
  return v >= 0 && v < n && (t == 0 || keep[t - 1] < v);
}

// Entries of the ascending row keep[0, k) below token i (a lower bound, by bisection).
TOKENKERN_HD int64_t kept_below(const int64_t* keep, int64_t k, int64_t i) {
  int64_t lo = 0, hi = k;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (keep[mid] < i) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Slot of token i in the dropped list (the tokens that keep[0, k) does not contain, ascending; the
// chooser order of merge_tokens' dropped mode): i minus the kept tokens below i, or -1 when i is
// kept. For a strictly ascending keep row the slots of the n - k dropped tokens are 0 .. n - k - 1;
// for any other row the result is some value in [i - k, i] (callers bound it before writing).
TOKENKERN_HD int64_t dropped_slot(const int64_t* keep, int64_t k, int64_t i) {
  const int64_t below = kept_below(keep, k, i);
  return (below < k && keep[below] == i) ? -1 : i - below;
}

// ------------------------------------------------------------------ best match

// A best-match candidate: order key (common/merge_math.h) and column index; kNoMatch marks none.
constexpr int32_t kNoMatch = 2147483647;

// Whether candidate (key, j) beats the best so far (best_key, best_j): a larger key, or the same
// key at a lower index; anything beats kNoMatch, kNoMatch beats nothing. The similarity tiles scan
// their columns with it and reduce the per-tile partials with it: any order of the reduction gives
// the serial argmax (first index of the largest key).
TOKENKERN_HD bool better_match(int32_t key, int32_t j, int32_t best_key, int32_t best_j) {
  if (j == kNoMatch) return false;
  return best_j == kNoMatch || key > best_key || (key == best_key && j < best_j);
}

// --------------------------------------------------------------- bipartite_merge

// The cut of bipartite_merge's edge selection: of the candidate A tokens (all, or all but token 0
// when it is protected), the r with the best order keys are merged, ties to the lower index. A
// candidate is merged when its key is above `key`, or equal to it and among the first `ties`
// candidates (by index) with that key. r = 0: nothing passes (no key is above INT32_MAX).
struct EdgeCut {
  int32_t key;   // the r-th best candidate key
  int64_t ties;  // how many candidates with that key are merged (>= 1 when r >= 1)
};

// The cut for r >= 0 from counts over the candidates: count_ge(t) = #{key >= t}, count_gt(t) =
// #{key > t} (int64). key = the largest t with count_ge(t) >= r (a 32-step bisection over int32).
// Every call of the counts is made by every caller alike (the CUDA kernel's counts are block-wide).
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename CountGe, typename CountGt>
TOKENKERN_HD EdgeCut edge_cut(int64_t r, CountGe&& count_ge, CountGt&& count_gt) {
  if (r <= 0) return EdgeCut{INT32_MAX, 0};
  int64_t lo = INT32_MIN, hi = INT32_MAX;
  for (int it = 0; it < 32; ++it) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (count_ge(static_cast<int32_t>(mid)) >= r) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int32_t key = static_cast<int32_t>(lo);
  return EdgeCut{key, r - count_gt(key)};
}

// Whether A token i is merged: `candidate` (i is not the protected token 0), its key, and eq_before
// = #{candidates j < i with key == cut.key}.
TOKENKERN_HD bool edge_merged(int32_t key, bool candidate, int64_t eq_before, const EdgeCut& cut) {
  return candidate && (key > cut.key || (key == cut.key && eq_before < cut.ties));
}

// Merged A tokens below i, from gt_before / eq_before = #{candidates j < i with key > / == cut.key}.
TOKENKERN_HD int64_t merged_before(int64_t gt_before, int64_t eq_before, const EdgeCut& cut) {
  return gt_before + (eq_before < cut.ties ? eq_before : cut.ties);
}

// Slot of an unmerged A token i in the unmerged list (ascending): i minus the merged tokens below it.
TOKENKERN_HD int64_t unmerged_slot(int64_t i, int64_t merged_below) { return i - merged_below; }

}  // namespace tokenkern
