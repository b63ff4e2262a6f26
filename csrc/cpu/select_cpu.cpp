// CPU kernel of tokenkern::topk_gather (the select family; tokenkern/ops/select.py), as the
// private op tokenkern::_topk_gather_kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "checks.h"
#include "common/topk_select.h"

namespace tokenkern {
namespace {

constexpr int64_t kGatherRows = 64;  // kept rows per copy task

// The public op tokenkern::topk_gather (tokenkern/ops/select.py) checks the arguments; this
// private kernel asserts only what its memory accesses rely on.
void assert_topk_gather_args(const at::Tensor& scores, const at::Tensor& x, int64_t k) {
  TOKENKERN_ASSERT("_topk_gather_kernel", scores.dim() == 2 && x.dim() == 3);
  TOKENKERN_ASSERT("_topk_gather_kernel", scores.scalar_type() == at::kFloat);
  TOKENKERN_ASSERT("_topk_gather_kernel", scores.device().is_cpu() && x.device().is_cpu());
  TOKENKERN_ASSERT("_topk_gather_kernel", scores.size(0) == x.size(0) && scores.size(1) == x.size(1));
  TOKENKERN_ASSERT("_topk_gather_kernel", k >= 1 && k <= scores.size(1));
}

std::tuple<at::Tensor, at::Tensor> topk_gather_cpu(const at::Tensor& scores, const at::Tensor& x,
                                                   int64_t k) {
  assert_topk_gather_args(scores, x, k);
  const at::Tensor s = scores.contiguous();
  const at::Tensor xc = x.contiguous();
  const int64_t batch = s.size(0), n = s.size(1), d = xc.size(2);
  at::Tensor indices = at::empty({batch, k}, s.options().dtype(at::kLong));
  at::Tensor kept = at::empty({batch, k, d}, xc.options());
  const float* s_ptr = s.data_ptr<float>();
  int64_t* idx_ptr = indices.data_ptr<int64_t>();
  const auto* x_bytes = static_cast<const char*>(xc.data_ptr());
  auto* kept_bytes = static_cast<char*>(kept.data_ptr());
  const int64_t row_bytes = d * static_cast<int64_t>(xc.element_size());

  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> scratch(static_cast<size_t>(n));
    for (int64_t b = begin; b < end; ++b) topk_indices_ascending(s_ptr + b * n, n, k, idx_ptr + b * k, scratch.data());
  });
  // The copy over (sample, block of kept rows), so that a small batch still fills the threads.
  const int64_t blocks = (k + kGatherRows - 1) / kGatherRows;
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / blocks, j0 = (t % blocks) * kGatherRows, j1 = std::min(k, j0 + kGatherRows);
      for (int64_t j = j0; j < j1; ++j) {
        std::memcpy(kept_bytes + (b * k + j) * row_bytes, x_bytes + (b * n + idx_ptr[b * k + j]) * row_bytes,
                    static_cast<size_t>(row_bytes));
      }
    }
  });
  return {kept, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenkern, CPU, m) { m.impl("_topk_gather_kernel", &topk_gather_cpu); }

}  // namespace tokenkern
