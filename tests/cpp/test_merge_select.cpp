// Host test of csrc/common/merge_select.h: the per-token formulations by which the CUDA merge
// kernels build their lists in parallel (merge_prepare_kernel's dropped list, edge_select_kernel's
// r best edges and unmerged list), run here as the kernels run them (tile by tile, counts before
// the tile plus an exclusive scan inside it) and compared with serial formulations and with the CPU
// ops' rules (the bitmap dropped list of merge_cpu.cpp, topk_indices_ascending of bipartite_cpu.cpp);
// and the similarity tiles' row-best partials (better_match) against the serial first argmax.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "common/merge_math.h"
#include "common/merge_select.h"
#include "common/topk_select.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what, int64_t n, int64_t k, int64_t extra = -1) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s (n=%lld, k/r=%lld, %lld)\n", what, static_cast<long long>(n),
                 static_cast<long long>(k), static_cast<long long>(extra));
    ++failures;
  }
}

using tokenkern::EdgeCut;

// ------------------------------------------------------------------ dropped list

// The CPU op's dropped list (merge_cpu.cpp, prepare_sample): the tokens keep does not contain, ascending.
std::vector<int64_t> dropped_serial(const std::vector<int64_t>& keep, int64_t n) {
  std::vector<char> kept(static_cast<size_t>(n), 0);
  for (const int64_t v : keep) kept[v] = 1;
  std::vector<int64_t> out;
  for (int64_t i = 0; i < n; ++i)
    if (!kept[i]) out.push_back(i);
  return out;
}

// merge_prepare_kernel's list: every token writes itself to dropped_slot (bounded to [0, n - k)).
std::vector<int64_t> dropped_parallel(const std::vector<int64_t>& keep, int64_t n) {
  const int64_t k = static_cast<int64_t>(keep.size());
  std::vector<int64_t> out(static_cast<size_t>(n - k), -1);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t slot = tokenkern::dropped_slot(keep.data(), k, i);
    if (slot >= 0 && slot < n - k) {
      expect(out[slot] == -1, "dropped slot written twice", n, k, i);
      out[slot] = i;
    }
  }
  return out;
}

std::vector<int64_t> random_keep(std::mt19937& rng, int64_t n, int64_t k) {
  std::vector<int64_t> all(static_cast<size_t>(n));
  std::iota(all.begin(), all.end(), int64_t{0});
  std::shuffle(all.begin(), all.end(), rng);
  all.resize(static_cast<size_t>(k));
  std::sort(all.begin(), all.end());
  return all;
}

bool row_valid(const std::vector<int64_t>& keep, int64_t n) {
  for (int64_t t = 0; t < static_cast<int64_t>(keep.size()); ++t)
    if (!tokenkern::keep_slot_valid(keep.data(), t, n)) return false;
  return true;
}

void test_dropped_list(std::mt19937& rng) {
  for (int trial = 0; trial < 600; ++trial) {
    const int64_t n = trial < 40 ? 1 + trial % 5 : 1 + static_cast<int64_t>(rng() % 900);
    int64_t k;
    switch (trial % 5) {
      case 0: k = n; break;        // every token kept: nothing dropped
      case 1: k = 0; break;        // nothing kept: every token dropped, slot = index
      case 2: k = n > 1 ? n - 1 : 1; break;
      case 3: k = 1; break;
      default: k = static_cast<int64_t>(rng() % static_cast<unsigned>(n + 1));
    }
    const std::vector<int64_t> keep = random_keep(rng, n, k);
    expect(row_valid(keep, n), "an ascending row in range is valid", n, k);
    expect(dropped_parallel(keep, n) == dropped_serial(keep, n), "dropped list differs from the CPU op's", n, k);
    for (int64_t j = 0; j < k; ++j)
      expect(tokenkern::dropped_slot(keep.data(), k, keep[j]) == -1, "a kept token has a dropped slot", n, k, j);
    for (int64_t i = 0; i <= n; ++i) {
      const auto below = std::lower_bound(keep.begin(), keep.end(), i) - keep.begin();
      expect(tokenkern::kept_below(keep.data(), k, i) == below, "kept_below is not the lower bound", n, k, i);
    }
  }
  // Rows that are not strictly ascending in [0, n) are flagged; their slots stay in [i - k, i].
  for (int trial = 0; trial < 300; ++trial) {
    const int64_t n = 2 + static_cast<int64_t>(rng() % 300);
    const int64_t k = 2 + static_cast<int64_t>(rng() % static_cast<unsigned>(n - 1));
    std::vector<int64_t> keep = random_keep(rng, n, k);
    const int64_t t = static_cast<int64_t>(rng() % static_cast<unsigned>(k));
    switch (trial % 5) {
      case 0: keep[t] = t > 0 ? keep[t - 1] : keep[1]; break;  // duplicate
      case 1: std::swap(keep[t], keep[t > 0 ? t - 1 : 1]); break;  // descending pair
      case 2: keep[t] = n + static_cast<int64_t>(rng() % 5); break;  // out of range
      case 3: keep[t] = -1 - static_cast<int64_t>(rng() % 5); break;  // negative
      default: std::shuffle(keep.begin(), keep.end(), rng);
    }
    if (trial % 5 == 4 && std::is_sorted(keep.begin(), keep.end())) continue;
    expect(!row_valid(keep, n), "a bad keep row is not flagged", n, k, trial % 5);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t slot = tokenkern::dropped_slot(keep.data(), k, i);
      expect(slot == -1 || (slot >= i - k && slot <= i), "dropped slot out of [i - k, i] for a bad row", n, k, i);
    }
  }
  expect(tokenkern::weight_valid(0.0f) && tokenkern::weight_valid(1e38f) && !tokenkern::weight_valid(-1e-30f) &&
             !tokenkern::weight_valid(std::numeric_limits<float>::quiet_NaN()) &&
             !tokenkern::weight_valid(std::numeric_limits<float>::infinity()),
         "weight_valid: finite and >= 0", 0, 0);
}

// ------------------------------------------------------------------ edge selection

struct Edges {
  std::vector<char> merged;       // per A token
  std::vector<int64_t> unmerged;  // ascending
  bool operator==(const Edges& o) const { return merged == o.merged && unmerged == o.unmerged; }
};

// Serial: sort the candidates by key (descending), ties by index; the first r are merged.
Edges edges_serial(const std::vector<int32_t>& keys, int64_t r, int64_t first) {
  const int64_t n_a = static_cast<int64_t>(keys.size());
  std::vector<int64_t> order;
  for (int64_t i = first; i < n_a; ++i) order.push_back(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return keys[a] > keys[b]; });
  Edges e{std::vector<char>(static_cast<size_t>(n_a), 0), {}};
  for (int64_t t = 0; t < r; ++t) e.merged[order[t]] = 1;
  for (int64_t i = 0; i < n_a; ++i)
    if (!e.merged[i]) e.unmerged.push_back(i);
  return e;
}

// The CPU op's rule (bipartite_cpu.cpp, pick_edges): topk_indices_ascending over the candidates' values.
std::vector<char> merged_cpu_op(const std::vector<float>& best, int64_t r, int64_t first) {
  const int64_t n_a = static_cast<int64_t>(best.size());
  std::vector<char> merged(static_cast<size_t>(n_a), 0);
  if (r == 0) return merged;
  std::vector<int64_t> chosen(static_cast<size_t>(r)), scratch(static_cast<size_t>(n_a - first));
  tokenkern::topk_indices_ascending(best.data() + first, n_a - first, r, chosen.data(), scratch.data());
  for (const int64_t t : chosen) merged[t + first] = 1;
  return merged;
}

// edge_select_kernel's formulation, tile by tile: the cut from counts over all candidates, then per
// tile the counts over the candidates before it plus an exclusive scan inside it.
Edges edges_parallel(const std::vector<int32_t>& keys, int64_t r, int64_t first, int64_t tile) {
  const int64_t n_a = static_cast<int64_t>(keys.size());
  auto count = [&](int64_t end, auto pred) {
    int64_t c = 0;
    for (int64_t j = first; j < end; ++j) c += pred(keys[j]) ? 1 : 0;
    return c;
  };
  const EdgeCut cut = tokenkern::edge_cut(
      r, [&](int32_t t) { return count(n_a, [t](int32_t key) { return key >= t; }); },
      [&](int32_t t) { return count(n_a, [t](int32_t key) { return key > t; }); });
  Edges e{std::vector<char>(static_cast<size_t>(n_a), 0), std::vector<int64_t>(static_cast<size_t>(n_a - r), -1)};
  for (int64_t i0 = 0; i0 < n_a; i0 += tile) {
    int64_t gt_before = 0, eq_before = 0;
    if (r > 0 && i0 > first) {
      gt_before = count(i0, [&](int32_t key) { return key > cut.key; });
      eq_before = count(i0, [&](int32_t key) { return key == cut.key; });
    }
    for (int64_t i = i0; i < std::min(i0 + tile, n_a); ++i) {  // the tile's threads, scan order
      const bool cand = r > 0 && i >= first;
      const int32_t key = cand ? keys[i] : 0;
      const bool m = tokenkern::edge_merged(key, cand, eq_before, cut);
      e.merged[i] = m ? 1 : 0;
      if (!m) {
        const int64_t slot = tokenkern::unmerged_slot(i, tokenkern::merged_before(gt_before, eq_before, cut));
        const bool in_range = slot >= 0 && slot < n_a - r;
        expect(in_range && e.unmerged[slot] == -1, "unmerged slot out of range or written twice", n_a, r, i);
        if (in_range) e.unmerged[slot] = i;
      }
      gt_before += (cand && key > cut.key) ? 1 : 0;
      eq_before += (cand && key == cut.key) ? 1 : 0;
    }
  }
  return e;
}

// The rank formulation: merged iff fewer than r candidates rank before it (better key, or equal
// key and lower index).
std::vector<char> merged_by_rank(const std::vector<int32_t>& keys, int64_t r, int64_t first) {
  const int64_t n_a = static_cast<int64_t>(keys.size());
  std::vector<char> merged(static_cast<size_t>(n_a), 0);
  for (int64_t i = first; i < n_a; ++i) {
    int64_t rank = 0;
    for (int64_t j = first; j < n_a; ++j) rank += (keys[j] > keys[i] || (keys[j] == keys[i] && j < i)) ? 1 : 0;
    merged[i] = rank < r ? 1 : 0;
  }
  return merged;
}

float random_value(std::mt19937& rng, int style) {
  constexpr float kNan = std::numeric_limits<float>::quiet_NaN(), kInf = std::numeric_limits<float>::infinity();
  switch (style) {
    case 0: return std::normal_distribution<float>()(rng);
    case 1: return static_cast<float>(static_cast<int>(rng() % 4)) * 0.25f;  // heavy ties
    case 2: {  // specials: NaN ranks as -inf, -0.0 ties with +0.0
      const float pick[] = {kNan, -kInf, kInf, -0.0f, 0.0f, 1.0f, -1.0f};
      return pick[rng() % 7];
    }
    default: return 0.5f;  // all equal
  }
}

void test_edges(std::mt19937& rng) {
  for (int trial = 0; trial < 800; ++trial) {
    const int64_t n_a = trial < 30 ? 1 + trial % 6 : 1 + static_cast<int64_t>(rng() % 700);
    const int64_t first = (trial / 2) % 2 == 1 && n_a > 1 ? 1 : 0;
    const int64_t mergeable = n_a - first;
    int64_t r;
    switch (trial % 4) {
      case 0: r = 0; break;
      case 1: r = mergeable; break;
      case 2: r = mergeable > 0 ? 1 : 0; break;
      default: r = static_cast<int64_t>(rng() % static_cast<unsigned>(mergeable + 1));
    }
    const int style = (trial / 4) % 4;
    std::vector<float> best(static_cast<size_t>(n_a));
    std::vector<int32_t> keys(static_cast<size_t>(n_a));
    for (int64_t i = 0; i < n_a; ++i) {
      best[i] = random_value(rng, style);
      keys[i] = tokenkern::order_key(best[i]);
    }
    const Edges serial = edges_serial(keys, r, first);
    expect(serial.merged == merged_cpu_op(best, r, first), "serial selection differs from the CPU op's", n_a, r);
    expect(serial.merged == merged_by_rank(keys, r, first), "rank formulation differs", n_a, r);
    for (const int64_t tile : {int64_t{256}, int64_t{7}, int64_t{1}}) {
      expect(edges_parallel(keys, r, first, tile) == serial, "tiled formulation differs from serial", n_a, r, tile);
    }
    const int64_t n_merged = std::count(serial.merged.begin(), serial.merged.end(), 1);
    expect(n_merged == r && (first == 0 || !serial.merged[0]), "r merged, token 0 protected", n_a, r, first);
  }
}

// ------------------------------------------------------------------ best match

// Serial: the first column of the largest order key among the allowed ones (-1: none allowed), as
// the CPU ops pick a single target (first argmax, NaN as -inf).
int64_t best_serial(const std::vector<int32_t>& keys, const std::vector<char>& allowed) {
  int64_t best = -1;
  for (int64_t j = 0; j < static_cast<int64_t>(keys.size()); ++j)
    if (allowed[j] && (best < 0 || keys[j] > keys[best])) best = j;
  return best;
}

// similarity_kernel's row-best epilogue and its reductions: per column tile of `tile` columns,
// `parts` threads scan tile / parts ascending columns each and combine by xor shuffles (1, 2, ...);
// the per-tile partials are then reduced in tile order (reduce_row_best) or in reverse order.
int64_t best_tiled(const std::vector<int32_t>& keys, const std::vector<char>& allowed, int64_t tile, int parts,
                   bool reverse) {
  using tokenkern::better_match;
  using tokenkern::kNoMatch;
  const int64_t cols = static_cast<int64_t>(keys.size());
  std::vector<int32_t> part_key, part_idx;
  for (int64_t j0 = 0; j0 < cols; j0 += tile) {
    std::vector<int32_t> k(static_cast<size_t>(parts), std::numeric_limits<int32_t>::min());
    std::vector<int32_t> idx(static_cast<size_t>(parts), kNoMatch);
    for (int part = 0; part < parts; ++part) {
      for (int64_t u = 0; u < tile / parts; ++u) {
        const int64_t j = j0 + part * (tile / parts) + u;
        if (j >= cols || !allowed[j]) continue;
        if (better_match(keys[j], static_cast<int32_t>(j), k[part], idx[part])) {
          k[part] = keys[j];
          idx[part] = static_cast<int32_t>(j);
        }
      }
    }
    for (int o = 1; o < parts; o *= 2) {  // every lane takes its xor partner's pre-round value
      const std::vector<int32_t> k0 = k, i0 = idx;
      for (int part = 0; part < parts; ++part) {
        if (better_match(k0[part ^ o], i0[part ^ o], k[part], idx[part])) {
          k[part] = k0[part ^ o];
          idx[part] = i0[part ^ o];
        }
      }
    }
    for (int part = 1; part < parts; ++part)
      expect(k[part] == k[0] && idx[part] == idx[0], "lanes of a row disagree after the shuffles", cols, tile, part);
    part_key.push_back(k[0]);
    part_idx.push_back(idx[0]);
  }
  if (reverse) {
    std::reverse(part_key.begin(), part_key.end());
    std::reverse(part_idx.begin(), part_idx.end());
  }
  int32_t bk = std::numeric_limits<int32_t>::min(), bj = kNoMatch;
  for (size_t t = 0; t < part_key.size(); ++t) {
    if (better_match(part_key[t], part_idx[t], bk, bj)) {
      bk = part_key[t];
      bj = part_idx[t];
    }
  }
  return bj == kNoMatch ? -1 : bj;
}

void test_best_match(std::mt19937& rng) {
  for (int trial = 0; trial < 1500; ++trial) {
    const int64_t cols = trial < 40 ? 1 + trial % 8 : 1 + static_cast<int64_t>(rng() % 500);
    const int style = trial % 4;
    std::vector<int32_t> keys(static_cast<size_t>(cols));
    std::vector<char> allowed(static_cast<size_t>(cols), 1);
    for (int64_t j = 0; j < cols; ++j) keys[j] = tokenkern::order_key(random_value(rng, style));
    switch ((trial / 4) % 4) {
      case 1: allowed[rng() % cols] = 0; break;  // kept mode: the chooser itself
      case 2:  // whole column tiles without a candidate
        for (int64_t j = 0; j < cols; ++j) allowed[j] = (j / 64) % 2 == 1 ? 1 : 0;
        break;
      case 3: std::fill(allowed.begin(), allowed.end(), 0); break;  // none: kNoMatch survives
      default: break;
    }
    const int64_t want = best_serial(keys, allowed);
    for (const bool reverse : {false, true}) {
      expect(best_tiled(keys, allowed, 64, 4, reverse) == want, "64-column tiles, 4 lanes", cols, want, reverse);
      expect(best_tiled(keys, allowed, 8, 2, reverse) == want, "8-column tiles, 2 lanes", cols, want, reverse);
      expect(best_tiled(keys, allowed, 1, 1, reverse) == want, "1-column tiles", cols, want, reverse);
    }
  }
  using tokenkern::better_match;
  using tokenkern::kNoMatch;
  const int32_t lo = std::numeric_limits<int32_t>::min();
  expect(better_match(lo, 0, lo, kNoMatch) && !better_match(5, kNoMatch, lo, kNoMatch) &&
             !better_match(5, kNoMatch, 1, 3) && better_match(1, 2, 1, 3) && !better_match(1, 4, 1, 3) &&
             better_match(2, 9, 1, 3),
         "better_match: anything beats none, none beats nothing, ties to the lower index", 0, 0);
}

}  // namespace

int main() {
  std::mt19937 rng(2212);
  test_dropped_list(rng);
  test_edges(rng);
  test_best_match(rng);
  if (failures) {
    std::fprintf(stderr, "test_merge_select: %d failures\n", failures);
    return 1;
  }
  std::printf("test_merge_select: OK\n");
  return 0;
}
