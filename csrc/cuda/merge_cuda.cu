// Torch glue of the private CUDA ops tokenkern::_merge_tokens_kernel and
// tokenkern::_bipartite_merge_kernel: dtype dispatch, buffers from the caching allocator, the
// current stream, launch error checks. The public merge ops (tokenkern/ops/merge.py) check
// every argument before calling them; here only the invariants of merge_args.h are asserted.
// No host sync: value errors in keep_idx / weight / size (which the public ops raise on CPU,
// and on CUDA with validate=True) turn the outputs of the affected sample into NaN here, and a
// mass that overflows float32 comes back inf.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cuda/merge_kernels.cuh"
#include "merge_args.h"

namespace tokenkern {
namespace {

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<cuda type>{}) for a float32 / float16 / bfloat16 tensor dtype.
template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat:
      f(Tag<float>{});
      break;
    case at::kHalf:
      f(Tag<__half>{});
      break;
    case at::kBFloat16:
      f(Tag<__nv_bfloat16>{});
      break;
    default:
      TORCH_CHECK_VALUE(false, "tokenkern: unsupported dtype ", dtype_name(t));
  }
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "tokenkern.", op, ": kernel launch failed: ", cudaGetErrorString(status));
}

at::Tensor float_weights(const std::optional<at::Tensor>& w, const at::Tensor& x, int64_t batch, int64_t n) {
  if (!w.has_value()) return at::ones({batch, n}, x.options().dtype(at::kFloat));
  return w->to(at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor> merge_tokens_cuda(const at::Tensor& x, const at::Tensor& keep_idx,
                                                     const std::optional<at::Tensor>& metric,
                                                     const std::optional<at::Tensor>& weight, int64_t topm,
                                                     double temperature, c10::string_view combine,
                                                     const std::optional<at::Tensor>& query_metric,
                                                     c10::string_view assign) {
  const MergeArgs a = merge_tokens_args(x, keep_idx, metric, weight, topm, combine, query_metric, assign);
  TOKENKERN_ASSERT("_merge_tokens_kernel", x.is_cuda() && a.n <= cuda::kMaxTokens);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor keep = keep_idx.contiguous();
  const at::Tensor mc = metric.has_value() ? metric->contiguous() : xc;
  const at::Tensor qc = query_metric.has_value() ? query_metric->contiguous() : at::Tensor();
  const at::Tensor wf = float_weights(weight, xc, a.batch, a.n);

  cuda::MergeTokensProblem p{a.batch, a.n, a.d, a.k, a.c, topm, static_cast<float>(temperature), a.combine,
                             a.kept_mode, a.cosine};
  const int64_t rows_c = p.chooser_rows();
  const auto i32 = xc.options().dtype(at::kInt);
  const auto f32 = xc.options().dtype(at::kFloat);
  // Written in full by the first kernel: no fills (merge_kernels.cuh).
  at::Tensor invalid = at::empty({a.batch, cuda::merge_tokens_flag_tiles(a.n)}, i32);
  at::Tensor dropped = at::empty({a.batch, a.n - a.k}, i32);
  at::Tensor sims = at::empty({a.batch * cuda::merge_tokens_sims_per_sample(p)}, f32);
  at::Tensor part_key = at::empty({a.batch * cuda::merge_tokens_partials_per_sample(p)}, i32);
  at::Tensor part_idx = at::empty_like(part_key);
  // Zeroed by the first kernel.
  at::Tensor counters = at::empty({a.batch * cuda::merge_tokens_counters_per_sample(p)}, i32);
  at::Tensor targets = at::empty({a.batch, rows_c, topm}, i32);
  at::Tensor coef = at::empty({a.batch, rows_c, topm}, f32);
  at::Tensor merged = at::empty({a.batch, a.k, a.d}, xc.options());
  at::Tensor mass = at::empty({a.batch, a.k}, f32);

  cuda::MergeTokensScratch s{ptr<int32_t>(invalid),  ptr<int32_t>(dropped),  ptr<float>(sims),
                             ptr<int32_t>(part_key), ptr<int32_t>(part_idx), ptr<int32_t>(counters),
                             ptr<int32_t>(targets),  ptr<float>(coef)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(xc.scalar_type(), [&](auto tx) {
    using TX = typename decltype(tx)::type;
    dispatch_float(mc.scalar_type(), [&](auto tm) {
      using TM = typename decltype(tm)::type;
      const TM* query = qc.defined() ? ptr<const TM>(qc) : nullptr;
      check_launch(cuda::merge_tokens<TX, TM>(p, ptr<const TX>(xc), ptr<const int64_t>(keep), ptr<const TM>(mc),
                                              query, ptr<const float>(wf), ptr<TX>(merged), ptr<float>(mass), s,
                                              stream),
                   "merge_tokens");
    });
  });
  return {merged, mass};
}

std::tuple<at::Tensor, at::Tensor> bipartite_merge_cuda(const at::Tensor& x, const at::Tensor& metric, int64_t r,
                                                        const std::optional<at::Tensor>& size, bool protect_first) {
  const BipartiteArgs a = bipartite_merge_args(x, metric, r, size, protect_first);
  TOKENKERN_ASSERT("_bipartite_merge_kernel", x.is_cuda() && a.n <= cuda::kMaxTokens);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor mc = metric.contiguous();
  const at::Tensor sf = float_weights(size, xc, a.batch, a.n);
  const auto i32 = xc.options().dtype(at::kInt);
  const auto f32 = xc.options().dtype(at::kFloat);
  at::Tensor invalid = at::empty({a.batch, cuda::bipartite_flag_tiles(a.n)}, i32);  // written by edge_select
  at::Tensor part_key = at::empty({a.batch, a.n_a, cuda::column_tiles(a.n_b)}, i32);
  at::Tensor part_idx = at::empty_like(part_key);
  at::Tensor node_key = at::empty({a.batch, a.n_a}, i32);
  at::Tensor node_idx = at::empty({a.batch, a.n_a}, i32);
  at::Tensor merged_flag = at::empty({a.batch, a.n_a}, xc.options().dtype(at::kByte));
  at::Tensor unmerged = at::empty({a.batch, a.n_a - r}, i32);
  at::Tensor out = at::empty({a.batch, a.n - r, a.d}, xc.options());
  at::Tensor out_size = at::empty({a.batch, a.n - r}, f32);
  cuda::BipartiteScratch s{ptr<int32_t>(invalid),  ptr<int32_t>(part_key),    ptr<int32_t>(part_idx),
                           ptr<int32_t>(node_key), ptr<int32_t>(node_idx),    ptr<uint8_t>(merged_flag),
                           ptr<int32_t>(unmerged)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(xc.scalar_type(), [&](auto tx) {
    using TX = typename decltype(tx)::type;
    dispatch_float(mc.scalar_type(), [&](auto tm) {
      using TM = typename decltype(tm)::type;
      check_launch(cuda::bipartite_merge<TX, TM>(a.batch, a.n, a.d, a.c, r, protect_first, ptr<const TX>(xc),
                                                 ptr<const TM>(mc), ptr<const float>(sf), ptr<TX>(out),
                                                 ptr<float>(out_size), s, stream),
                   "bipartite_merge");
    });
  });
  return {out, out_size};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenkern, CUDA, m) {
  m.impl("_merge_tokens_kernel", &merge_tokens_cuda);
  m.impl("_bipartite_merge_kernel", &bipartite_merge_cuda);
}

}  // namespace tokenkern
