// Host test of csrc/common/merge_plan.h: the launch plan the CUDA merge launchers follow.
#include <cstdio>
#include <cstring>

#include "common/merge_plan.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what);
    ++failures;
  }
}

using tokenkern::cuda::LaunchPlan;
using tokenkern::cuda::MergeKernel;

bool has(const LaunchPlan& plan, MergeKernel k) {
  for (int i = 0; i < plan.count; ++i)
    if (plan.launch[i].kernel == k) return true;
  return false;
}

// Every launch has a non-empty grid within the hardware limits and 256 threads.
bool launchable(const LaunchPlan& plan) {
  for (int i = 0; i < plan.count; ++i) {
    const auto& l = plan.launch[i];
    if (l.grid[0] < 1 || l.grid[0] > tokenkern::cuda::kMaxGridX) return false;
    for (int a = 1; a < 3; ++a)
      if (l.grid[a] < 1 || l.grid[a] > tokenkern::cuda::kMaxGridYZ) return false;
    if (l.threads != tokenkern::cuda::kThreads || l.dynamic_smem != 0) return false;
  }
  return plan.count >= 1 && plan.count <= tokenkern::cuda::kMaxMergeLaunches;
}

}  // namespace

int main() {
  namespace tc = tokenkern::cuda;
  const tc::MergeTokensProblem dropped{8, 2880, 4096, 720, 4096, 1, 0.0f, tokenkern::Combine::kMean, false, true};
  const LaunchPlan p = tc::merge_tokens_plan(dropped);
  expect(p.count == 3 && launchable(p), "dropped mode, topm = 1: 3 launchable launches");
  expect(p.launch[0].kernel == MergeKernel::kPrepare && p.launch[1].kernel == MergeKernel::kSimilarity &&
             p.launch[2].kernel == MergeKernel::kMergeReduce,
         "topm = 1: prepare, similarity (selecting in its epilogue), merge_reduce");
  expect(p.launch[0].grid[0] == tc::merge_tokens_flag_tiles(2880) && tc::merge_tokens_flag_tiles(2880) == 12 &&
             p.launch[0].grid[1] == 8,
         "merge_prepare: one CTA per 256 tokens of every sample");
  expect(tc::merge_tokens_epilogue(dropped) == tc::SimilarityEpilogue::kSelectBest &&
             tc::merge_tokens_sims_per_sample(dropped) == 0 &&
             tc::merge_tokens_partials_per_sample(dropped) == 2160 * tc::column_tiles(720) &&
             tc::merge_tokens_counters_per_sample(dropped) == p.launch[1].grid[1] &&
             p.launch[1].grid[0] == tc::column_tiles(720),
         "topm = 1: no similarity matrix; one partial per (row, column tile), one counter per row block");
  expect(tc::merge_tokens_counters_per_sample(dropped) <= dropped.n, "merge_prepare zeroes every counter");

  tc::MergeTokensProblem top4 = dropped;
  top4.topm = 4;
  const LaunchPlan t = tc::merge_tokens_plan(top4);
  expect(t.count == 4 && launchable(t) && t.launch[2].kernel == MergeKernel::kSelectTargets &&
             tc::merge_tokens_epilogue(top4) == tc::SimilarityEpilogue::kStore &&
             tc::merge_tokens_sims_per_sample(top4) == 2160 * 720 && tc::merge_tokens_partials_per_sample(top4) == 0 &&
             tc::merge_tokens_counters_per_sample(top4) == 0,
         "topm > 1: the similarity matrix and select_targets");

  tc::MergeTokensProblem kept = dropped;
  kept.kept_mode = true;
  kept.cosine = false;
  const LaunchPlan q = tc::merge_tokens_plan(kept);
  expect(q.count == 3 && launchable(q) && q.launch[0].kernel == MergeKernel::kPrepare &&
             !has(q, MergeKernel::kSelectTargets),
         "kept mode with a query, topm = 1: prepare (validation only), similarity, merge_reduce");

  tc::MergeTokensProblem all = dropped;
  all.k = all.n;
  const LaunchPlan r = tc::merge_tokens_plan(all);
  expect(r.count == 2 && !has(r, MergeKernel::kSimilarity) && !has(r, MergeKernel::kSelectTargets) &&
             tc::merge_tokens_counters_per_sample(all) == 0,
         "K = N: nothing to assign");

  const LaunchPlan b = tc::bipartite_merge_plan(8, 577, 144);
  expect(b.count == 3 && launchable(b) && !has(b, MergeKernel::kBestMatch),
         "bipartite, n_a <= kKeyTile: 3 launchable launches (edge_select reduces the partials)");
  expect(b.launch[2].kernel == MergeKernel::kBipartiteOutput && b.launch[2].grid[0] == 577 - 144 &&
             b.launch[2].grid[1] == 8,
         "bipartite output: one block per output row");
  expect(b.launch[1].kernel == MergeKernel::kEdgeSelect && b.launch[1].grid[0] == 2 &&
             tc::bipartite_flag_tiles(577) == 2 && b.launch[1].grid[1] == 8,
         "edge select: one CTA per 256 A tokens of every sample");
  const int64_t big = 2 * tc::kKeyTile + 2;  // n_a = kKeyTile + 1
  const LaunchPlan bb = tc::bipartite_merge_plan(2, big, 10);
  expect(bb.count == 4 && launchable(bb) && bb.launch[1].kernel == MergeKernel::kBestMatch &&
             bb.launch[1].grid[0] * tc::kThreads >= tc::kKeyTile + 1,
         "bipartite, n_a > kKeyTile: best_match reduces the partials, one thread per A token");
  // edge_select reduces the partials itself up to kEdgeReducePartials per sample: n_a * column
  // tiles = 2048 * 32 at N = 4096, 2049 * 33 at N = 4098.
  expect(tc::edge_select_reduces(2880) && tc::edge_select_reduces(577) && tc::edge_select_reduces(4096) &&
             !tc::edge_select_reduces(4098) && !tc::edge_select_reduces(2 * tc::kKeyTile) &&
             !tc::edge_select_reduces(big),
         "edge_select_reduces: the partials-per-sample bound");
  expect(tc::bipartite_merge_plan(2, 4096, 10).count == 3 && tc::bipartite_merge_plan(2, 4098, 10).count == 4,
         "bipartite: best_match exactly when edge_select does not reduce");
  const LaunchPlan one = tc::bipartite_merge_plan(3, 1, 0);
  expect(one.count == 2 && launchable(one) && !has(one, MergeKernel::kSimilarity), "N = 1: no similarity");

  expect(tc::launch_chunks(8, 2880) == 1, "headline batches run in one chunk");
  expect(tc::launch_chunks(tc::batch_per_launch(tc::kMaxTokens) + 1, tc::kMaxTokens) == 2, "large batches chunk");
  for (int k = 0; k < tc::kMergeKernelCount; ++k)
    expect(std::strcmp(tc::merge_kernel_name(static_cast<MergeKernel>(k)), "?") != 0, "every kernel has a name");

  if (failures) return 1;
  std::printf("test_merge_plan: OK\n");
  return 0;
}
