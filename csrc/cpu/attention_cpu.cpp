// CPU kernel of attn_scores for few queries per key head (decode, the last token), as the
// private op tokenkern::_attn_scores_kernel (tokenkern/_cpu/attention.py routes those calls
// here; tokenkern/ops/attention.py checks the arguments). The whole op in one call for all
// samples, with the rules of tokenkern.reference.attn_scores.
//
// Work: the kept keys (key_mask) are numbered 0..n_kept-1 and every query sees a prefix of
// them; only the queries that count (valid) and see a key of [key_start, key_end) get rows.
//   1. logits, parallel over (sample, key head, block of keys): each K row is read once, in
//      place (float32/float16/bfloat16, any strides with a unit inner one), converted to
//      float32 exactly and dotted with every query row of the key head's query heads that sees
//      it (AVX-512 where the CPU has it); float32 products and sums, as on the CUDA path.
//   2. probabilities, parallel over (sample, key head, row): the row's softmax over its visible
//      keys (or exp(logit - lse)), kept for the columns of the key range, 0 where not visible.
//   3. column sums, parallel over (sample, block of columns): over key heads, rows and heads
//      in one fixed order.
// Every value is computed by one sequence of operations that depends only on the shapes and
// masks (no atomics, no partial sums that follow the thread partition): results are
// bit-identical on reruns and at any thread count on one machine (a CPU without AVX-512 takes
// the portable loop, whose float32 rounding may differ in the last bits).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <immintrin.h>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "checks.h"

#define ATTN_OP "_attn_scores_kernel"

namespace tokenkern {
namespace {

constexpr int64_t kLanes = 16;      // partial sums of a dot product (one 512-bit register)
constexpr int64_t kKeyBlock = 64;   // keys per logits task
constexpr int64_t kColBlock = 256;  // columns per column-sum task
constexpr int64_t kMinWork = 1 << 14;  // multiply-adds (or exps) below which a phase runs on one thread
constexpr int64_t kScratchFloats = int64_t{1} << 24;  // logits held at once (64 MiB): samples in chunks
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// One sample's plan: kept keys are numbered in position order ("columns"); the rows are the
// queries that count in the mean and see a key of the range.
struct Plan {
  int64_t n_valid = 0;          // valid queries: they count in the mean
  int64_t lo = 0, hi = 0;       // the kept keys of [key_start, key_end): columns [lo, hi)
  int64_t c0 = 0, c1 = 0;       // the columns whose logits are formed
  int64_t end = 0;              // columns [lo, end) of the range are seen by some row
  std::vector<int64_t> keys;    // kept key positions (empty: every key, column c at position c)
  std::vector<int64_t> rows;    // the rows' queries, ascending
  std::vector<int64_t> count;   // each row's visible prefix of the columns (non-decreasing)
};

Plan make_plan(int64_t nq, int64_t nk, const bool* qmask, const bool* kmask, bool causal, int64_t offset,
               int64_t key_start, int64_t key_end, bool with_lse) {
  Plan p;
  int64_t n_kept = nk;
  if (kmask != nullptr) {
    for (int64_t j = 0; j < nk; ++j)
      if (kmask[j]) p.keys.push_back(j);
    n_kept = static_cast<int64_t>(p.keys.size());
  }
  const auto kept_before = [&](int64_t pos) {  // kept keys at positions < pos
    if (kmask == nullptr) return std::clamp<int64_t>(pos, 0, nk);
    return static_cast<int64_t>(std::lower_bound(p.keys.begin(), p.keys.end(), pos) - p.keys.begin());
  };
  p.lo = kept_before(key_start);
  p.hi = kept_before(key_end);
  // Causal: query i sees positions <= i + offset; an offset outside [-(nq + 1), nk] means the
  // same as its bound (no key, or every key, for every query), and keeps i + offset in range.
  offset = std::clamp<int64_t>(offset, -(nq + 1), nk);
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t count = causal ? kept_before(i + offset + 1) : n_kept;
    if (count == 0 || (qmask != nullptr && !qmask[i])) continue;
    ++p.n_valid;
    if (count > p.lo && p.lo < p.hi) {
      p.rows.push_back(i);
      p.count.push_back(count);
    }
  }
  if (!p.rows.empty()) {
    const int64_t last = p.count.back();
    p.end = std::min(p.hi, last);
    p.c0 = with_lse ? p.lo : 0;
    p.c1 = with_lse ? p.end : last;
  }
  return p;
}

// ------------------------------------------------------------------------------ logits

inline __attribute__((always_inline)) float to_float(float x) { return x; }

inline __attribute__((always_inline)) float to_float(c10::BFloat16 x) {  // exact: the high half of a float32
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(float));
  return f;
}

// float32 dot product of q (float32) and one K row (converted exactly on the fly) over kLanes
// interleaved partial sums, added pairwise at the end: a fixed order that the compiler maps
// onto one vector register (the tail is a masked step of the same lanes).
template <typename T>
inline __attribute__((always_inline)) float dot(const float* a, const T* b, int64_t d) {
  float acc[kLanes] = {};
  int64_t t = 0;
  for (; t + kLanes <= d; t += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += a[t + l] * to_float(b[t + l]);
  if (t < d) {
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += t + l < d ? a[t + l] * to_float(b[t + l]) : 0.0f;
  }
  for (int64_t l = 0; l < 8; ++l) acc[l] += acc[l + 8];
  for (int64_t l = 0; l < 4; ++l) acc[l] += acc[l + 4];
  for (int64_t l = 0; l < 2; ++l) acc[l] += acc[l + 2];
  return acc[0] + acc[1];
}

// The logits of columns [c_begin, c_end) for n_rows query rows q (n_rows, d) float32, row u
// of query p.rows[u / g] whose visible prefix is count[u / g] (non-decreasing):
// s[u * s_row + c - c0] = scale * q[u] . K[column c], for the visible pairs only. k: the key
// head's rows, k_row elements apart; keys: column -> position (nullptr: identity). fp16 rows
// are converted into buf first (bf16 and fp32 are read as they are).
template <typename T>
inline __attribute__((always_inline)) void block_logits(const T* k, int64_t k_row, const int64_t* keys,
                                                        int64_t c_begin, int64_t c_end, int64_t c0, const float* q,
                                                        const int64_t* count, int64_t g, int64_t n_rows, int64_t d,
                                                        float scale, float* s, int64_t s_row, float* buf) {
  const int64_t n_queries = n_rows / g;
  int64_t first = 0;  // the first query row that sees column c
  for (int64_t c = c_begin; c < c_end; ++c) {
    while (first < n_queries && count[first] <= c) ++first;
    const T* kr = k + (keys == nullptr ? c : keys[c]) * k_row;
    if constexpr (std::is_same_v<T, c10::Half>) {
      for (int64_t t = 0; t < d; ++t) buf[t] = c10::detail::fp16_ieee_to_fp32_value(kr[t].x);
      for (int64_t u = first * g; u < n_rows; ++u) s[u * s_row + c - c0] = scale * dot(q + u * d, buf, d);
    } else {
      for (int64_t u = first * g; u < n_rows; ++u) s[u * s_row + c - c0] = scale * dot(q + u * d, kr, d);
    }
  }
}

// ------------------------------------------------------------------- AVX-512 logits

// GCC 12 flags the intrinsics' own _mm256_undefined_* placeholders as maybe uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

// The lanes added pairwise, as dot() adds them: l + (l + 8), then + 4, + 2, + 1.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline float hsum(__m512 v) {
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));
}

// block_logits with AVX-512: per row, four keys at a time (four independent FMA chains over d
// in steps of 16, the last one masked), each summed by hsum.
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void block_logits_avx512(
    const T* k, int64_t k_row, const int64_t* keys, int64_t c_begin, int64_t c_end, int64_t c0, const float* q,
    const int64_t* count, int64_t g, int64_t n_rows, int64_t d, float scale, float* s, int64_t s_row) {
  const auto row = [&](int64_t c) { return k + (keys == nullptr ? c : keys[c]) * k_row; };
  for (int64_t u = 0; u < n_rows; ++u) {
    const float* qu = q + u * d;
    float* su = s + u * s_row - c0;
    const int64_t stop = std::min(c_end, count[u / g]);
    int64_t c = c_begin;
    for (; c + 4 <= stop; c += 4) {
      const T *k0 = row(c), *k1 = row(c + 1), *k2 = row(c + 2), *k3 = row(c + 3);
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t t = 0; t < d; t += 16) {
        const __mmask16 m = d - t >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (d - t)) - 1);
        const __m512 qv = load16(qu + t, m);
        a0 = _mm512_fmadd_ps(qv, load16(k0 + t, m), a0);
        a1 = _mm512_fmadd_ps(qv, load16(k1 + t, m), a1);
        a2 = _mm512_fmadd_ps(qv, load16(k2 + t, m), a2);
        a3 = _mm512_fmadd_ps(qv, load16(k3 + t, m), a3);
      }
      su[c] = scale * hsum(a0);
      su[c + 1] = scale * hsum(a1);
      su[c + 2] = scale * hsum(a2);
      su[c + 3] = scale * hsum(a3);
    }
    for (; c < stop; ++c) {
      const T* k0 = row(c);
      __m512 a0 = _mm512_setzero_ps();
      for (int64_t t = 0; t < d; t += 16) {
        const __mmask16 m = d - t >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (d - t)) - 1);
        a0 = _mm512_fmadd_ps(load16(qu + t, m), load16(k0 + t, m), a0);
      }
      su[c] = scale * hsum(a0);
    }
  }
}

#pragma GCC diagnostic pop

// TOKENKERN_PORTABLE_CPU=1 takes the portable loop on any CPU (how its tests reach it).
bool use_avx512() {
  const char* portable = std::getenv("TOKENKERN_PORTABLE_CPU");
  if (portable != nullptr && std::strcmp(portable, "1") == 0) return false;
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

const bool kHasAvx512 = use_avx512();

// The logits of a block of columns: AVX-512 where the CPU has it (chosen once per process, so
// every call on one machine rounds alike), else the portable loop.
template <typename T>
void logits(const T* k, int64_t k_row, const int64_t* keys, int64_t c_begin, int64_t c_end, int64_t c0,
            const float* q, const int64_t* count, int64_t g, int64_t n_rows, int64_t d, float scale, float* s,
            int64_t s_row, float* buf) {
  if (kHasAvx512) {
    block_logits_avx512(k, k_row, keys, c_begin, c_end, c0, q, count, g, n_rows, d, scale, s, s_row);
  } else {
    block_logits(k, k_row, keys, c_begin, c_end, c0, q, count, g, n_rows, d, scale, s, s_row, buf);
  }
}

// ----------------------------------------------------------------------------- softmax

// One row's probabilities at the columns [lo, end) of the range (0 where not visible), in
// place over its logits s (column c at s[c - c0]); count: its visible prefix. Without lse
// (lse == nullptr): the softmax over columns [0, count), whose NaN row (a NaN logit, or a
// maximum that is not finite: the float64 softmax's NaN) is NaN at its visible entries. With
// lse: exp(logit - lse), all 0 when lse is not finite.
void row_probabilities(float* s, int64_t c0, int64_t count, int64_t lo, int64_t end, const float* lse) {
  const int64_t seen = std::min(count, end);
  float m = 0.0f, inv = 1.0f;
  bool poisoned = false, dropped = false;
  if (lse == nullptr) {
    m = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < count; ++c) {
      const float v = s[c - c0];
      poisoned |= std::isnan(v);
      m = std::max(m, v);
    }
    poisoned |= !std::isfinite(m);
    if (!poisoned) {
      float sum = 0.0f;
      for (int64_t c = 0; c < count; ++c) sum += (s[c - c0] = std::exp(s[c - c0] - m));
      inv = 1.0f / sum;
    }
  } else {
    m = *lse;
    dropped = !std::isfinite(m);
  }
  for (int64_t c = lo; c < end; ++c) {
    float& v = s[c - c0];
    if (c >= seen || dropped) {
      v = 0.0f;
    } else if (poisoned) {
      v = kNaN;
    } else {
      v = lse == nullptr ? v * inv : std::exp(v - m);
    }
  }
}

// ----------------------------------------------------------------------------------- op

// Parallel over [0, n) tasks of `work` units each; on one thread when the whole is small.
template <typename F>
void parallel_tasks(int64_t n, int64_t work, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, work));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) f(t);
  });
}

template <typename scalar_t>
void load_rows(const at::Tensor& q, int64_t b, const Plan& p, int64_t hkv, int64_t g, float* dst) {
  // dst (n_rows, d) float32: row u = r * g + t is query p.rows[r] of query head hkv * g + t.
  const scalar_t* base = q.data_ptr<scalar_t>() + b * q.stride(0);
  const int64_t d = q.size(3);
  const int64_t n_rows = static_cast<int64_t>(p.rows.size());
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int64_t t = 0; t < g; ++t) {
      const scalar_t* src = base + (hkv * g + t) * q.stride(1) + p.rows[r] * q.stride(2);
      float* row = dst + (r * g + t) * d;
      for (int64_t e = 0; e < d; ++e) row[e] = static_cast<float>(src[e * q.stride(3)]);
    }
  }
}

void assert_args(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& lse, int64_t key_start,
                 int64_t key_end, const std::optional<at::Tensor>& query_mask,
                 const std::optional<at::Tensor>& key_mask) {
  TOKENKERN_ASSERT(ATTN_OP, q.dim() == 4 && k.dim() == 4);
  TOKENKERN_ASSERT(ATTN_OP, q.device().is_cpu() && k.device().is_cpu());
  const auto dt = q.scalar_type();
  TOKENKERN_ASSERT(ATTN_OP, dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16);
  TOKENKERN_ASSERT(ATTN_OP, k.scalar_type() == dt);
  TOKENKERN_ASSERT(ATTN_OP, k.size(0) == q.size(0) && k.size(3) == q.size(3));
  TOKENKERN_ASSERT(ATTN_OP, k.size(1) >= 1 && q.size(1) % k.size(1) == 0);
  TOKENKERN_ASSERT(ATTN_OP, q.size(2) >= 1 && k.size(2) >= 1 && q.size(3) >= 1);
  TOKENKERN_ASSERT(ATTN_OP, 0 <= key_start && key_start < key_end && key_end <= k.size(2));
  if (lse.has_value()) {
    TOKENKERN_ASSERT(ATTN_OP, lse->dim() == 3 && lse->scalar_type() == at::kFloat && lse->device().is_cpu());
    TOKENKERN_ASSERT(ATTN_OP, lse->size(0) == q.size(0) && lse->size(1) == q.size(1) && lse->size(2) == q.size(2));
  }
  if (query_mask.has_value()) {
    TOKENKERN_ASSERT(ATTN_OP, query_mask->dim() == 2 && query_mask->scalar_type() == at::kBool);
    TOKENKERN_ASSERT(ATTN_OP, query_mask->device().is_cpu());
    TOKENKERN_ASSERT(ATTN_OP, query_mask->size(0) == q.size(0) && query_mask->size(1) == q.size(2));
  }
  if (key_mask.has_value()) {
    TOKENKERN_ASSERT(ATTN_OP, key_mask->dim() == 2 && key_mask->scalar_type() == at::kBool);
    TOKENKERN_ASSERT(ATTN_OP, key_mask->device().is_cpu());
    TOKENKERN_ASSERT(ATTN_OP, key_mask->size(0) == k.size(0) && key_mask->size(1) == k.size(2));
  }
}

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// Samples [b0, b1) of the op: out rows b0..b1-1 (zero on entry).
void run_chunk(const at::Tensor& q, const at::Tensor& k, const float* lse, const std::vector<Plan>& plans,
               int64_t b0, int64_t b1, float scale, bool mean, int64_t key_start, at::Tensor& out) {
  const int64_t hq = q.size(1), nq = q.size(2), d = q.size(3);
  const int64_t hkv = k.size(1), nk = k.size(2), g = hq / hkv;
  const int64_t nb = b1 - b0, rows_per_head = g * nq;  // scratch rows of one (sample, key head)
  // Scratch: logits, then probabilities, of row u of (sample, key head), column c at c - c0.
  std::vector<float> qbuf(static_cast<size_t>(nb * hkv * rows_per_head * d));
  std::vector<float> scratch(static_cast<size_t>(nb * hkv * rows_per_head * nk));
  const auto q_at = [&](int64_t bl, int64_t h) { return qbuf.data() + (bl * hkv + h) * rows_per_head * d; };
  const auto s_at = [&](int64_t bl, int64_t h) { return scratch.data() + (bl * hkv + h) * rows_per_head * nk; };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "_attn_scores_kernel", [&] {
    for (int64_t bl = 0; bl < nb; ++bl)
      for (int64_t h = 0; h < hkv; ++h) load_rows<scalar_t>(q, b0 + bl, plans[b0 + bl], h, g, q_at(bl, h));
  });

  // 1. logits.
  const int64_t blocks = (nk + kKeyBlock - 1) / kKeyBlock;
  const auto dt = k.scalar_type();
  const auto* k_bytes = static_cast<const char*>(k.data_ptr());
  const int64_t elem = k.element_size();
  parallel_tasks(nb * hkv * blocks, kKeyBlock * d * (rows_per_head + 1), [&](int64_t task) {
    const int64_t bl = task / (hkv * blocks), h = (task / blocks) % hkv, blk = task % blocks;
    const Plan& p = plans[b0 + bl];
    const int64_t c_begin = p.c0 + blk * kKeyBlock, c_end = std::min(p.c1, c_begin + kKeyBlock);
    if (c_begin >= c_end) return;
    const char* kh = k_bytes + ((b0 + bl) * k.stride(0) + h * k.stride(1)) * elem;
    const int64_t* keys = p.keys.empty() ? nullptr : p.keys.data();
    const int64_t n_rows = g * static_cast<int64_t>(p.rows.size());
    float buf[256];  // one converted K row (d <= 256)
    const float sc = scale;
    if (dt == at::kFloat) {
      logits(reinterpret_cast<const float*>(kh), k.stride(2), keys, c_begin, c_end, p.c0, q_at(bl, h),
                 p.count.data(), g, n_rows, d, sc, s_at(bl, h), nk, buf);
    } else if (dt == at::kBFloat16) {
      logits(reinterpret_cast<const c10::BFloat16*>(kh), k.stride(2), keys, c_begin, c_end, p.c0, q_at(bl, h),
                  p.count.data(), g, n_rows, d, sc, s_at(bl, h), nk, buf);
    } else {
      logits(reinterpret_cast<const c10::Half*>(kh), k.stride(2), keys, c_begin, c_end, p.c0, q_at(bl, h),
                 p.count.data(), g, n_rows, d, sc, s_at(bl, h), nk, buf);
    }
  });

  // 2. probabilities.
  parallel_tasks(nb * hkv * rows_per_head, 4 * nk, [&](int64_t task) {
    const int64_t bl = task / (hkv * rows_per_head), h = (task / rows_per_head) % hkv, u = task % rows_per_head;
    const Plan& p = plans[b0 + bl];
    const int64_t r = u / g;
    if (r >= static_cast<int64_t>(p.rows.size())) return;
    const float* row_lse = lse == nullptr ? nullptr : lse + ((b0 + bl) * hq + h * g + u % g) * nq + p.rows[r];
    row_probabilities(s_at(bl, h) + u * nk, p.c0, p.count[r], p.lo, p.end, row_lse);
  });

  // 3. column sums, over key heads, then rows, then the heads of a key head.
  const int64_t col_blocks = (nk + kColBlock - 1) / kColBlock;
  float* out_ptr = out.data_ptr<float>();
  const int64_t width = out.size(1);
  parallel_tasks(nb * col_blocks, kColBlock * hq * nq, [&](int64_t task) {
    const int64_t bl = task / col_blocks, blk = task % col_blocks;
    const Plan& p = plans[b0 + bl];
    const int64_t c_begin = p.lo + blk * kColBlock, c_end = std::min(p.end, c_begin + kColBlock);
    if (c_begin >= c_end) return;
    const int64_t n = c_end - c_begin, n_rows = g * static_cast<int64_t>(p.rows.size());
    float acc[kColBlock] = {};
    for (int64_t h = 0; h < hkv; ++h) {
      const float* s = s_at(bl, h) + c_begin - p.c0;
      for (int64_t u = 0; u < n_rows; ++u)
        for (int64_t j = 0; j < n; ++j) acc[j] += s[u * nk + j];
    }
    const float denom = static_cast<float>(hq * p.n_valid);
    float* o = out_ptr + (b0 + bl) * width;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t c = c_begin + j;
      o[(p.keys.empty() ? c : p.keys[c]) - key_start] = mean ? acc[j] / denom : acc[j];
    }
  });
}

// q: (B, Hq, Nq, d), k: (B, Hkv, Nk, d) float32/float16/bfloat16 (any strides), lse: (B, Hq, Nq)
// float32, query_mask: (B, Nq) bool, key_mask: (B, Nk) bool, causal_offset: key j is visible to
// query i iff j <= i + causal_offset (none: not causal) -> (B, key_end - key_start) float32.
at::Tensor attn_scores_cpu(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& lse,
                           double scale, int64_t key_start, int64_t key_end,
                           const std::optional<at::Tensor>& query_mask, const std::optional<at::Tensor>& key_mask,
                           std::optional<int64_t> causal_offset, bool mean) {
  assert_args(q, k, lse, key_start, key_end, query_mask, key_mask);
  TOKENKERN_ASSERT(ATTN_OP, q.size(3) <= 256);
  const at::Tensor kc = k.stride(3) == 1 ? k : k.contiguous();
  const auto lse_c = contiguous(lse);
  const auto qm = contiguous(query_mask);
  const auto km = contiguous(key_mask);
  const int64_t batch = q.size(0), hq = q.size(1), nq = q.size(2), nk = k.size(2);
  std::vector<Plan> plans(static_cast<size_t>(batch));
  for (int64_t b = 0; b < batch; ++b) {
    plans[b] = make_plan(nq, nk, qm.has_value() ? qm->data_ptr<bool>() + b * nq : nullptr,
                         km.has_value() ? km->data_ptr<bool>() + b * nk : nullptr, causal_offset.has_value(),
                         causal_offset.value_or(0), key_start, key_end, lse.has_value());
  }
  at::Tensor out = at::zeros({batch, key_end - key_start}, q.options().dtype(at::kFloat));
  const float* lse_ptr = lse_c.has_value() ? lse_c->data_ptr<float>() : nullptr;
  const int64_t per_sample = hq * nq * nk;
  const int64_t chunk = std::max<int64_t>(1, kScratchFloats / per_sample);
  for (int64_t b0 = 0; b0 < batch; b0 += chunk) {
    run_chunk(q, kc, lse_ptr, plans, b0, std::min(batch, b0 + chunk), static_cast<float>(scale), mean, key_start,
              out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenkern, CPU, m) { m.impl("_attn_scores_kernel", &attn_scores_cpu); }

}  // namespace tokenkern
