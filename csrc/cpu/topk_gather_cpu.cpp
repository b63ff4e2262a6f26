// CPU kernel of tokenkern::topk_gather.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>
#include <vector>

#include "checks.h"
#include "common/topk_select.h"

namespace tokenkern {
namespace {

void check_topk_gather_args(const at::Tensor& scores, const at::Tensor& x, int64_t k) {
  TOKENKERN_CHECK("topk_gather", scores.dim() == 2, "scores must be (B, N), got shape ", scores.sizes());
  TOKENKERN_CHECK("topk_gather", x.dim() == 3, "x must be (B, N, D), got shape ", x.sizes());
  TOKENKERN_CHECK("topk_gather", scores.scalar_type() == at::kFloat,
                  "scores must have dtype float32, got ", dtype_name(scores.scalar_type()));
  TOKENKERN_CHECK("topk_gather", at::isFloatingType(x.scalar_type()),
                  "x must be a floating tensor, got ", dtype_name(x.scalar_type()));
  TOKENKERN_CHECK("topk_gather", scores.device() == x.device(), "x is on ", x.device(),
                  " but scores is on ", scores.device());
  TOKENKERN_CHECK("topk_gather", scores.size(0) == x.size(0) && scores.size(1) == x.size(1),
                  "scores (B, N) must match x's first two dimensions, got ", scores.sizes(), " and ",
                  x.sizes());
  const int64_t n = scores.size(1);
  TOKENKERN_CHECK("topk_gather", k >= 1 && k <= n, "k must be in [1, ", n, "] (1 <= k <= N), got ", k);
}

std::tuple<at::Tensor, at::Tensor> topk_gather_cpu(const at::Tensor& scores, const at::Tensor& x,
                                                   int64_t k) {
  check_topk_gather_args(scores, x, k);
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
    for (int64_t b = begin; b < end; ++b) {
      int64_t* row_idx = idx_ptr + b * k;
      topk_indices_ascending(s_ptr + b * n, n, k, row_idx, scratch.data());
      for (int64_t j = 0; j < k; ++j) {
        std::memcpy(kept_bytes + (b * k + j) * row_bytes, x_bytes + (b * n + row_idx[j]) * row_bytes,
                    static_cast<size_t>(row_bytes));
      }
    }
  });
  return {kept, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenkern, CPU, m) { m.impl("topk_gather", &topk_gather_cpu); }

}  // namespace tokenkern
