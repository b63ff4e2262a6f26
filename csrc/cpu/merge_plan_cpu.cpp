// CPU ops tokenkern::_merge_tokens_launch_plan and tokenkern::_bipartite_merge_launch_plan: the
// launch plan the CUDA merge launchers follow (csrc/common/merge_plan.h), for the static kernel
// report. They need no GPU and no CUDA build: the plan is host code.
//
// Output: (kMaxMergeLaunches, 7) int64, one row per launch of the first launch chunk in launch
// order, columns (kernel id, grid x, grid y, grid z, threads, dynamic shared bytes, chunks);
// rows past the plan hold kernel id -1 and zeros. `chunks` is the number of batch chunks the
// call runs (each repeats the rows; the last chunk may hold fewer samples).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "checks.h"
#include "common/merge_plan.h"

namespace tokenkern {
namespace {

constexpr int64_t kPlanColumns = 7;

at::Tensor plan_tensor(const cuda::LaunchPlan& plan, int64_t chunks) {
  at::Tensor out = at::zeros({cuda::kMaxMergeLaunches, kPlanColumns}, at::kLong);
  int64_t* row = out.data_ptr<int64_t>();
  for (int i = 0; i < cuda::kMaxMergeLaunches; ++i, row += kPlanColumns) {
    if (i >= plan.count) {
      row[0] = -1;
      continue;
    }
    const cuda::Launch& l = plan.launch[i];
    row[0] = static_cast<int64_t>(l.kernel);
    row[1] = l.grid[0];
    row[2] = l.grid[1];
    row[3] = l.grid[2];
    row[4] = l.threads;
    row[5] = l.dynamic_smem;
    row[6] = chunks;
  }
  return out;
}

// "tokenkern.<op>: <name> must be <rule>, got <value>" as ValueError.
#define PLAN_CHECK(op, name, cond, rule, value) TOKENKERN_CHECK(op, cond, name, " must be ", rule, ", got ", value)

at::Tensor merge_tokens_launch_plan(int64_t batch, int64_t n, int64_t d, int64_t k, int64_t c, int64_t topm,
                                    bool kept_mode, bool cosine) {
#define OP "_merge_tokens_launch_plan"
  PLAN_CHECK(OP, "batch", batch >= 1, ">= 1", batch);
  PLAN_CHECK(OP, "n", n >= 1 && n <= cuda::kMaxTokens, "in [1, " + std::to_string(cuda::kMaxTokens) + "]", n);
  PLAN_CHECK(OP, "d", d >= 1, ">= 1", d);
  PLAN_CHECK(OP, "c", c >= 1, ">= 1", c);
  PLAN_CHECK(OP, "k", k >= 1 && k <= n, "in [1, n=" + std::to_string(n) + "]", k);
  const int64_t candidates = kept_mode ? n - 1 : k;
  PLAN_CHECK(OP, "topm", topm >= 1 && topm <= candidates, "in [1, " + std::to_string(candidates) + "]", topm);
#undef OP
  const int64_t chunk = cuda::batch_per_launch(n);
  cuda::MergeTokensProblem p{batch < chunk ? batch : chunk, n, d, k, c, topm, 0.0f, Combine::kMean, kept_mode, cosine};
  return plan_tensor(cuda::merge_tokens_plan(p), cuda::launch_chunks(batch, n));
}

at::Tensor bipartite_merge_launch_plan(int64_t batch, int64_t n, int64_t d, int64_t c, int64_t r) {
#define OP "_bipartite_merge_launch_plan"
  PLAN_CHECK(OP, "batch", batch >= 1, ">= 1", batch);
  PLAN_CHECK(OP, "n", n >= 1 && n <= cuda::kMaxTokens, "in [1, " + std::to_string(cuda::kMaxTokens) + "]", n);
  PLAN_CHECK(OP, "d", d >= 1, ">= 1", d);
  PLAN_CHECK(OP, "c", c >= 1, ">= 1", c);
  const int64_t mergeable = n / 2 == 0 ? 0 : (n + 1) / 2;
  PLAN_CHECK(OP, "r", r >= 0 && r <= mergeable, "in [0, " + std::to_string(mergeable) + "]", r);
#undef OP
  const int64_t chunk = cuda::batch_per_launch(n);
  return plan_tensor(cuda::bipartite_merge_plan(batch < chunk ? batch : chunk, n, r), cuda::launch_chunks(batch, n));
}

}  // namespace

// No tensor arguments, hence no backend to dispatch on: registered for every backend; the
// result is a CPU tensor.
TORCH_LIBRARY_IMPL(tokenkern, CompositeExplicitAutograd, m) {
  m.impl("_merge_tokens_launch_plan", &merge_tokens_launch_plan);
  m.impl("_bipartite_merge_launch_plan", &bipartite_merge_launch_plan);
}

}  // namespace tokenkern
