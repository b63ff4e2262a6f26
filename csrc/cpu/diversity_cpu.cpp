// CPU kernels of the diversity family (tokenkern/ops/diversity.py): the float32 cosine
// similarities of maxmin_select, dpp_select and mmr_select (tokenkern::_cosine_sim_kernel) and
// the greedy loops of the four ops, as the private ops tokenkern::_<op>_kernel. The public ops
// check the arguments and values; these kernels assert only what their memory accesses rely
// on, and stay in range whatever the values (a sample short of candidates is padded with the
// lowest-index unselected tokens).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "checks.h"

namespace tokenkern {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// NaN ranks as -inf.
inline float rank_key(float v) { return std::isnan(v) ? -kInf : v; }

// torch.minimum / torch.maximum: NaN propagates (a NaN a is kept: no comparison with it holds).
// Branch-free selects, so that the loops over a row vectorize.
inline float nan_min(float a, float b) { return (b < a || std::isnan(b)) ? b : a; }
inline float nan_max(float a, float b) { return (b > a || std::isnan(b)) ? b : a; }

// One sample's bookkeeping: candidates not yet selected (avail) and tokens selected (taken).
struct Picker {
  std::vector<char> avail, taken;
  std::vector<int64_t> picks;

  Picker(const bool* mask, int64_t n, int64_t k) : avail(n), taken(n, 0) {
    for (int64_t j = 0; j < n; ++j) avail[j] = mask == nullptr ? 1 : static_cast<char>(mask[j]);
    picks.reserve(static_cast<size_t>(k));
  }

  int64_t size() const { return static_cast<int64_t>(avail.size()); }

  // The first maximum of key over the available candidates; -1 if there is none.
  int64_t first_max(const float* key) const {
    int64_t best = -1;
    float best_key = -kInf;
    for (int64_t j = 0; j < size(); ++j) {
      if (!avail[j]) continue;
      const float v = rank_key(key[j]);
      if (best < 0 || v > best_key) best = j, best_key = v;
    }
    return best;
  }

  // The lowest-index available candidate, else the lowest-index token not yet selected
  // (the padding of a sample short of candidates); -1 if every token is selected.
  int64_t lowest() const {
    for (int64_t j = 0; j < size(); ++j)
      if (avail[j]) return j;
    for (int64_t j = 0; j < size(); ++j)
      if (!taken[j]) return j;
    return -1;
  }

  void take(int64_t j) {
    avail[j] = 0;
    taken[j] = 1;
    picks.push_back(j);
  }

  void write_sorted(int64_t* out) {
    std::sort(picks.begin(), picks.end());
    std::copy(picks.begin(), picks.end(), out);
  }
};

const bool* mask_ptr(const std::optional<at::Tensor>& mask) {
  return mask.has_value() ? mask->data_ptr<bool>() : nullptr;
}

// sim: (B, N, N) float32 CPU, exactly symmetric (as _cosine_sim_kernel's: the kernels read row j
// for S_jt, and two mutual nearest neighbours then tie exactly), scores: (B, N) float32 CPU (if
// defined), mask: (B, N) bool CPU.
#define ASSERT_GREEDY_ARGS(op, sim, scores, mask, k)                                                 \
  do {                                                                                               \
    TOKENKERN_ASSERT(op, sim.dim() == 3 && sim.size(1) == sim.size(2));                              \
    TOKENKERN_ASSERT(op, sim.scalar_type() == at::kFloat && sim.device().is_cpu());                  \
    TOKENKERN_ASSERT(op, k >= 1 && k <= sim.size(1));                                                \
    if (scores.defined()) {                                                                          \
      TOKENKERN_ASSERT(op, scores.dim() == 2 && scores.size(0) == sim.size(0));                      \
      TOKENKERN_ASSERT(op, scores.size(1) == sim.size(1));                                           \
      TOKENKERN_ASSERT(op, scores.scalar_type() == at::kFloat && scores.device().is_cpu());          \
    }                                                                                                \
    if (mask.has_value()) {                                                                          \
      TOKENKERN_ASSERT(op, mask->dim() == 2 && mask->size(0) == sim.size(0));                        \
      TOKENKERN_ASSERT(op, mask->size(1) == sim.size(1));                                            \
      TOKENKERN_ASSERT(op, mask->scalar_type() == at::kBool && mask->device().is_cpu());             \
    }                                                                                                \
  } while (0)

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// -------------------------------------------------------------------------- similarities

// Rows of one panel of a sample's similarity matrix: one single-threaded GEMM of these rows of u
// with the rows from the panel's first on (the upper triangle: about half the FLOPs of u u^T).
constexpr int64_t kPanelRows = 128;

// sum_t v_t^2 in float32, over 16 interleaved partial sums (a fixed order, so that it vectorizes).
float sum_squares(const float* v, int64_t d) {
  constexpr int64_t kLanes = 16;
  float acc[kLanes] = {};
  int64_t t = 0;
  for (; t + kLanes <= d; t += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += v[t + l] * v[t + l];
  for (int64_t l = 0; t < d; ++t, ++l) acc[l] += v[t] * v[t];
  for (int64_t w = kLanes / 2; w > 0; w /= 2)
    for (int64_t l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// x: (rows, d) -> u: (rows, d) float32 unit rows x / ||x||; a row whose norm is not > 0 (zero
// or NaN) is 0, as in reference.cosine_matrix.
template <typename scalar_t>
void unit_rows(const scalar_t* x, int64_t rows, int64_t d, float* u) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* xi = x + i * d;
      float* ui = u + i * d;
      for (int64_t t = 0; t < d; ++t) ui[t] = static_cast<float>(xi[t]);
      const float norm = std::sqrt(sum_squares(ui, d));
      if (norm > 0.0f) {
        for (int64_t t = 0; t < d; ++t) ui[t] /= norm;
      } else {
        std::fill(ui, ui + d, 0.0f);
      }
    }
  });
}

// Rows [i0, i1) of one sample's S = u u^T (u: (n, d) float32), from column i0 on: one GEMM,
// then copied to the mirror columns (S_ji is S_ij bit for bit: a GEMM need not round both
// alike) and S_ii = 1. Writes only S[i0:i1, i0:] and the strict lower triangle of S[i0:, i0:i1].
void sim_panel(const at::Tensor& u, float* s, int64_t n, int64_t i0, int64_t i1) {
  at::Tensor out = at::from_blob(s + i0 * n + i0, {i1 - i0, n - i0}, {n, 1}, u.options());
  at::mm_out(out, u.narrow(0, i0, i1 - i0), u.narrow(0, i0, n - i0).t());
  constexpr int64_t kBlock = 16;  // mirror in column blocks: 16 destination rows stay in cache
  for (int64_t j0 = i0; j0 < n; j0 += kBlock) {
    const int64_t j1 = std::min(n, j0 + kBlock);
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = std::max(j0, i + 1); j < j1; ++j) s[j * n + i] = s[i * n + j];
  }
  for (int64_t i = i0; i < i1; ++i) s[i * n + i] = 1.0f;
}

// x: (B, N, D) float32/float16/bfloat16 -> S (B, N, N) float32: the cosine similarities of the
// module docstring of tokenkern/ops/diversity.py, exactly symmetric, S_ii = 1.
//
// The panels (all samples' first panels, the largest, first) go to the threads from a shared
// counter, each one GEMM run by the thread that takes it: BLAS runs single-threaded inside a
// parallel region, so a panel's values depend only on its rows of u (never on the thread that
// runs it, the thread count or the batch around it) and every rerun gives the same S.
at::Tensor cosine_sim_kernel(const at::Tensor& x) {
  TOKENKERN_ASSERT("_cosine_sim_kernel", x.dim() == 3 && x.device().is_cpu());
  const auto dt = x.scalar_type();
  TOKENKERN_ASSERT("_cosine_sim_kernel", dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16);
  const at::Tensor xc = x.contiguous();
  const int64_t batch = xc.size(0), n = xc.size(1), d = xc.size(2);
  // Each sample's unit rows start on a 64-byte boundary: the GEMMs see one sample's memory
  // layout wherever it sits in the batch.
  constexpr int64_t kAlign = 16;
  const int64_t stride = (n * d + kAlign - 1) / kAlign * kAlign;
  at::Tensor u = at::empty({batch, stride}, xc.options().dtype(at::kFloat));
  float* u_ptr = u.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "_cosine_sim_kernel", [&] {
    const scalar_t* x_ptr = xc.data_ptr<scalar_t>();
    for (int64_t b = 0; b < batch; ++b) unit_rows(x_ptr + b * n * d, n, d, u_ptr + b * stride);
  });
  at::Tensor sim = at::empty({batch, n, n}, u.options());
  const int64_t panels = (n + kPanelRows - 1) / kPanelRows;
  const int64_t tasks = batch * panels;  // task t: panel t / batch of sample t % batch
  float* s_ptr = sim.data_ptr<float>();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::max<int64_t>(1, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) {
      const int64_t b = t % batch, i0 = (t / batch) * kPanelRows;
      const at::Tensor ub = at::from_blob(u_ptr + b * stride, {n, d}, u.options());
      sim_panel(ub, s_ptr + b * n * n, n, i0, std::min(n, i0 + kPanelRows));
    }
  });
  return sim;
}

// ------------------------------------------------------------------------------ max-min

// The NaN-propagating maximum of v[0:n] (exact in any order), over 16 lanes so that it vectorizes.
float row_nan_max(const float* v, int64_t n) {
  constexpr int64_t kLanes = 16;
  float acc[kLanes];
  std::fill(acc, acc + kLanes, -kInf);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] = nan_max(acc[l], v[j + l]);
  for (int64_t l = 0; j < n; ++j, ++l) acc[l] = nan_max(acc[l], v[j]);
  float m = -kInf;
  for (int64_t l = 0; l < kLanes; ++l) m = nan_max(m, acc[l]);
  return m;
}


// DivPrune: first pick = the candidate whose nearest other candidate is farthest; then the
// candidate farthest from the selected set. Distances d = 1 - S.
void maxmin_one(const float* s, const bool* mask, int64_t n, int64_t k, int64_t* out) {
  Picker pk(mask, n, k);
  std::vector<float> key(static_cast<size_t>(n), -kInf);
  int64_t count = 0;
  for (int64_t j = 0; j < n; ++j) count += pk.avail[j];
  int64_t first = -1;
  if (count >= 2) {
    // min_j fl(1 - S_ij) = fl(1 - max_j S_ij): rounding is monotone (NaN propagates in both).
    std::vector<float> other(static_cast<size_t>(n));  // S_ij for the candidates j, else -inf
    for (int64_t i = 0; i < n; ++i) {
      if (!pk.avail[i]) continue;
      const float* row = s + i * n;
      for (int64_t j = 0; j < n; ++j) other[j] = pk.avail[j] ? row[j] : -kInf;
      other[i] = -kInf;
      key[i] = 1.0f - row_nan_max(other.data(), n);
    }
    first = pk.first_max(key.data());
  } else {
    first = pk.lowest();
  }
  pk.take(first);
  std::vector<float> to_set(static_cast<size_t>(n));  // min distance to the selected set
  for (int64_t j = 0; j < n; ++j) to_set[j] = 1.0f - s[first * n + j];
  for (int64_t step = 1; step < k; ++step) {
    int64_t j = pk.first_max(to_set.data());
    if (j < 0) j = pk.lowest();
    pk.take(j);
    const float* row = s + j * n;
    for (int64_t t = 0; t < n; ++t) to_set[t] = nan_min(to_set[t], 1.0f - row[t]);
  }
  pk.write_sorted(out);
}

at::Tensor maxmin_select_kernel(const at::Tensor& sim, const std::optional<at::Tensor>& mask, int64_t k) {
  ASSERT_GREEDY_ARGS("_maxmin_select_kernel", sim, at::Tensor(), mask, k);
  const at::Tensor s = sim.contiguous();
  const std::optional<at::Tensor> m = contiguous(mask);
  const int64_t batch = s.size(0), n = s.size(1);
  at::Tensor out = at::empty({batch, k}, s.options().dtype(at::kLong));
  const float* s_ptr = s.data_ptr<float>();
  const bool* m_ptr = mask_ptr(m);
  int64_t* o_ptr = out.data_ptr<int64_t>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      maxmin_one(s_ptr + b * n * n, m_ptr ? m_ptr + b * n : nullptr, n, k, o_ptr + b * k);
  });
  return out;
}

// ---------------------------------------------------------------------------------- DPP

// e[0:n] -= a * v[0:n] (distinct rows of one buffer: restrict lets the loop vectorize).
void subtract_scaled(float* __restrict e, const float* __restrict v, float a, int64_t n) {
  for (int64_t t = 0; t < n; ++t) e[t] -= a * v[t];
}

// Chen et al.'s fast greedy MAP of L_ij = r_i S_ij r_j; c holds the rows e of earlier steps.
void dpp_one(const float* s, const float* r, const bool* mask, int64_t n, int64_t k, int64_t* out) {
  Picker pk(mask, n, k);
  std::vector<float> d2(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) d2[j] = pk.avail[j] ? r[j] * s[j * n + j] * r[j] : -kInf;
  std::vector<float> c(static_cast<size_t>(k * n), 0.0f);
  for (int64_t i = 0; i < k; ++i) {
    int64_t j = pk.first_max(d2.data());
    float* e = c.data() + i * n;
    const bool usable = j >= 0 && d2[j] > 0.0f && std::isfinite(d2[j]);
    if (usable) {
      const float scale = 1.0f / std::sqrt(d2[j]);
      const float* row = s + j * n;
      for (int64_t t = 0; t < n; ++t) e[t] = r[j] * row[t] * r[t];
      for (int64_t u = 0; u < i; ++u) {
        const float* cu = c.data() + u * n;
        subtract_scaled(e, cu, cu[j], n);
      }
      for (int64_t t = 0; t < n; ++t) {
        e[t] *= scale;
        d2[t] -= e[t] * e[t];
      }
    } else {
      j = pk.lowest();  // the rank is exhausted: e = 0
    }
    pk.take(j);
  }
  pk.write_sorted(out);
}

at::Tensor dpp_select_kernel(const at::Tensor& sim, const at::Tensor& relevance,
                             const std::optional<at::Tensor>& mask, int64_t k) {
  ASSERT_GREEDY_ARGS("_dpp_select_kernel", sim, relevance, mask, k);
  TOKENKERN_ASSERT("_dpp_select_kernel", relevance.defined());
  const at::Tensor s = sim.contiguous();
  const at::Tensor r = relevance.contiguous();
  const std::optional<at::Tensor> m = contiguous(mask);
  const int64_t batch = s.size(0), n = s.size(1);
  at::Tensor out = at::empty({batch, k}, s.options().dtype(at::kLong));
  const float* s_ptr = s.data_ptr<float>();
  const float* r_ptr = r.data_ptr<float>();
  const bool* m_ptr = mask_ptr(m);
  int64_t* o_ptr = out.data_ptr<int64_t>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      dpp_one(s_ptr + b * n * n, r_ptr + b * n, m_ptr ? m_ptr + b * n : nullptr, n, k, o_ptr + b * k);
  });
  return out;
}

// ---------------------------------------------------------------------------------- MMR

// Maximal marginal relevance: importance min-max normalized over the candidates.
void mmr_one(const float* s, const float* v, const bool* mask, int64_t n, int64_t k, float lam, int64_t* out) {
  Picker pk(mask, n, k);
  float lo = kInf, hi = -kInf;
  for (int64_t j = 0; j < n; ++j) {
    if (!pk.avail[j]) continue;
    lo = nan_min(lo, v[j]);
    hi = nan_max(hi, v[j]);
  }
  std::vector<float> imp(static_cast<size_t>(n), 0.0f);
  if (hi > lo) {
    for (int64_t j = 0; j < n; ++j) imp[j] = (v[j] - lo) / (hi - lo);
  } else if (std::isnan(lo) || std::isnan(hi)) {
    std::fill(imp.begin(), imp.end(), std::numeric_limits<float>::quiet_NaN());
  }
  int64_t first = pk.first_max(v);
  if (first < 0) first = pk.lowest();
  pk.take(first);
  std::vector<float> to_set(static_cast<size_t>(n));  // max similarity to the selected set
  std::copy(s + first * n, s + first * n + n, to_set.begin());
  std::vector<float> key(static_cast<size_t>(n));
  for (int64_t step = 1; step < k; ++step) {
    for (int64_t t = 0; t < n; ++t) key[t] = lam * imp[t] - (1.0f - lam) * to_set[t];
    int64_t j = pk.first_max(key.data());
    if (j < 0) j = pk.lowest();
    pk.take(j);
    const float* row = s + j * n;
    for (int64_t t = 0; t < n; ++t) to_set[t] = nan_max(to_set[t], row[t]);
  }
  pk.write_sorted(out);
}

at::Tensor mmr_select_kernel(const at::Tensor& sim, const at::Tensor& importance,
                             const std::optional<at::Tensor>& mask, int64_t k, double lam) {
  ASSERT_GREEDY_ARGS("_mmr_select_kernel", sim, importance, mask, k);
  TOKENKERN_ASSERT("_mmr_select_kernel", importance.defined());
  const at::Tensor s = sim.contiguous();
  const at::Tensor v = importance.contiguous();
  const std::optional<at::Tensor> m = contiguous(mask);
  const int64_t batch = s.size(0), n = s.size(1);
  at::Tensor out = at::empty({batch, k}, s.options().dtype(at::kLong));
  const float* s_ptr = s.data_ptr<float>();
  const float* v_ptr = v.data_ptr<float>();
  const bool* m_ptr = mask_ptr(m);
  int64_t* o_ptr = out.data_ptr<int64_t>();
  const float lam_f = static_cast<float>(lam);
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      mmr_one(s_ptr + b * n * n, v_ptr + b * n, m_ptr ? m_ptr + b * n : nullptr, n, k, lam_f, o_ptr + b * k);
  });
  return out;
}

// -------------------------------------------------------------------------------- pivots

// DART: per pivot (in order), the per_pivot remaining candidates of lowest similarity to
// it (NaN last, ties to the lower index) leave the candidates and are selected.
void pivot_one(const float* sim, const bool* cand, int64_t n_piv, int64_t length, int64_t per_pivot,
               int64_t* out) {
  Picker pk(cand, length, n_piv * per_pivot);
  std::vector<int64_t> pool;
  pool.reserve(static_cast<size_t>(length));
  for (int64_t p = 0; p < n_piv; ++p) {
    const float* row = sim + p * length;
    pool.clear();
    for (int64_t j = 0; j < length; ++j)
      if (pk.avail[j]) pool.push_back(j);
    const auto key = [row](int64_t j) { return std::isnan(row[j]) ? kInf : row[j]; };
    const auto better = [&key](int64_t a, int64_t b) {
      const float ka = key(a), kb = key(b);
      return ka < kb || (ka == kb && a < b);
    };
    const int64_t take = std::min<int64_t>(per_pivot, static_cast<int64_t>(pool.size()));
    std::partial_sort(pool.begin(), pool.begin() + take, pool.end(), better);
    for (int64_t t = 0; t < take; ++t) pk.take(pool[t]);
    for (int64_t t = take; t < per_pivot; ++t) pk.take(pk.lowest());  // short of candidates
  }
  pk.write_sorted(out);
}

at::Tensor pivot_select_kernel(const at::Tensor& sim, const at::Tensor& candidates, int64_t per_pivot) {
  TOKENKERN_ASSERT("_pivot_select_kernel", sim.dim() == 3 && candidates.dim() == 2);
  TOKENKERN_ASSERT("_pivot_select_kernel", sim.scalar_type() == at::kFloat && sim.device().is_cpu());
  TOKENKERN_ASSERT("_pivot_select_kernel", candidates.scalar_type() == at::kBool && candidates.device().is_cpu());
  TOKENKERN_ASSERT("_pivot_select_kernel", candidates.size(0) == sim.size(0) && candidates.size(1) == sim.size(2));
  TOKENKERN_ASSERT("_pivot_select_kernel", per_pivot >= 1 && sim.size(1) * per_pivot <= sim.size(2));
  const at::Tensor s = sim.contiguous();
  const at::Tensor c = candidates.contiguous();
  const int64_t batch = s.size(0), n_piv = s.size(1), length = s.size(2);
  const int64_t count = n_piv * per_pivot;
  at::Tensor out = at::empty({batch, count}, s.options().dtype(at::kLong));
  const float* s_ptr = s.data_ptr<float>();
  const bool* c_ptr = c.data_ptr<bool>();
  int64_t* o_ptr = out.data_ptr<int64_t>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      pivot_one(s_ptr + b * n_piv * length, c_ptr + b * length, n_piv, length, per_pivot, o_ptr + b * count);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenkern, CPU, m) {
  m.impl("_cosine_sim_kernel", &cosine_sim_kernel);
  m.impl("_maxmin_select_kernel", &maxmin_select_kernel);
  m.impl("_dpp_select_kernel", &dpp_select_kernel);
  m.impl("_mmr_select_kernel", &mmr_select_kernel);
  m.impl("_pivot_select_kernel", &pivot_select_kernel);
}

}  // namespace tokenkern
