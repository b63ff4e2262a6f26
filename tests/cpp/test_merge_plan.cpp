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
  expect(p.count == 7 && launchable(p), "dropped mode: 7 launchable launches");
  expect(p.launch[0].kernel == MergeKernel::kKeepScatter && p.launch[6].kernel == MergeKernel::kMergeReduce,
         "keep_scatter first, merge_reduce last");
  expect(has(p, MergeKernel::kDroppedList) && has(p, MergeKernel::kInverseNorm), "dropped list and norms");

  tc::MergeTokensProblem kept = dropped;
  kept.kept_mode = true;
  kept.cosine = false;
  const LaunchPlan q = tc::merge_tokens_plan(kept);
  expect(q.count == 5 && launchable(q) && !has(q, MergeKernel::kDroppedList) && !has(q, MergeKernel::kInverseNorm),
         "kept mode with a query: no dropped list, no norms");

  tc::MergeTokensProblem all = dropped;
  all.k = all.n;
  const LaunchPlan r = tc::merge_tokens_plan(all);
  expect(r.count == 4 && !has(r, MergeKernel::kSimilarity) && !has(r, MergeKernel::kSelectTargets),
         "K = N: nothing to assign");

  const LaunchPlan b = tc::bipartite_merge_plan(8, 577, 144);
  expect(b.count == 6 && launchable(b), "bipartite: 6 launchable launches");
  expect(b.launch[5].kernel == MergeKernel::kBipartiteOutput && b.launch[5].grid[0] == 577 - 144 &&
             b.launch[5].grid[1] == 8,
         "bipartite output: one block per output row");
  const LaunchPlan one = tc::bipartite_merge_plan(3, 1, 0);
  expect(one.count == 3 && !has(one, MergeKernel::kSimilarity), "N = 1: no similarity");

  expect(tc::launch_chunks(8, 2880) == 1, "headline batches run in one chunk");
  expect(tc::launch_chunks(tc::batch_per_launch(tc::kMaxTokens) + 1, tc::kMaxTokens) == 2, "large batches chunk");
  for (int k = 0; k < tc::kMergeKernelCount; ++k)
    expect(std::strcmp(tc::merge_kernel_name(static_cast<MergeKernel>(k)), "?") != 0, "every kernel has a name");

  if (failures) return 1;
  std::printf("test_merge_plan: OK\n");
  return 0;
}
