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
  expect(p.count == 5 && launchable(p), "dropped mode: 5 launchable launches");
  expect(p.launch[0].kernel == MergeKernel::kPrepare && p.launch[4].kernel == MergeKernel::kMergeReduce,
         "merge_prepare first, merge_reduce last");
  expect(p.launch[0].grid[0] == tc::merge_tokens_flag_tiles(2880) && tc::merge_tokens_flag_tiles(2880) == 12 &&
             p.launch[0].grid[1] == 8,
         "merge_prepare: one CTA per 256 tokens of every sample");
  expect(has(p, MergeKernel::kInverseNorm), "norms");

  tc::MergeTokensProblem kept = dropped;
  kept.kept_mode = true;
  kept.cosine = false;
  const LaunchPlan q = tc::merge_tokens_plan(kept);
  expect(q.count == 4 && launchable(q) && q.launch[0].kernel == MergeKernel::kPrepare &&
             !has(q, MergeKernel::kInverseNorm),
         "kept mode with a query: prepare (validation only), no norms");

  tc::MergeTokensProblem all = dropped;
  all.k = all.n;
  const LaunchPlan r = tc::merge_tokens_plan(all);
  expect(r.count == 3 && !has(r, MergeKernel::kSimilarity) && !has(r, MergeKernel::kSelectTargets),
         "K = N: nothing to assign");

  const LaunchPlan b = tc::bipartite_merge_plan(8, 577, 144);
  expect(b.count == 5 && launchable(b), "bipartite: 5 launchable launches");
  expect(b.launch[4].kernel == MergeKernel::kBipartiteOutput && b.launch[4].grid[0] == 577 - 144 &&
             b.launch[4].grid[1] == 8,
         "bipartite output: one block per output row");
  expect(b.launch[3].kernel == MergeKernel::kEdgeSelect && b.launch[3].grid[0] == 2 &&
             tc::bipartite_flag_tiles(577) == 2 && b.launch[3].grid[1] == 8,
         "edge select: one CTA per 256 A tokens of every sample");
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
