// Torch-free CUDA kernels of merge_tokens and bipartite_merge: raw pointers, sizes and a
// stream. The torch glue (merge_cuda.cu) allocates the
// buffers and calls the launchers at the bottom; a C++ user can do the same (CMake target
// tokenkern_kernels). Per-token math is shared with the CPU ops (common/merge_math.h).
//
// Determinism: every output element is written by one thread, sums run in a fixed order
// (contributions in ascending source order). The one atomic is the similarity tiles' arrival
// counter (topm = 1), which only elects the tile that reduces a row block's partials, in tile
// order: which tile that is does not change the result. Invalid inputs raise
// per-(sample, tile) flags that each CTA of merge_prepare_kernel / edge_select_kernel writes
// unconditionally (no zero fill); later launches OR a sample's flags (common/merge_plan.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "common/merge_math.h"
#include "common/merge_plan.h"
#include "common/merge_select.h"

namespace tokenkern {
namespace cuda {

// A receiver's row is summed kAccTile columns at a time, kAccPerThread float32 accumulators per
// thread in registers.
constexpr int kAccTile = 4096;
constexpr int kAccPerThread = kAccTile / kThreads;
static_assert(kAccPerThread * kThreads == kAccTile && kAccPerThread % 8 == 0,
              "whole 16-byte packets of every element type per thread");

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ------------------------------------------------------------------ 16-byte packets

// Elements of TX in one 16-byte packet (8 for 16-bit types, 4 for float32).
template <typename TX>
constexpr int kPackLen = 16 / static_cast<int>(sizeof(TX));

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Whether every row of d elements from base is made of whole, aligned 16-byte packets.
template <typename TX>
__device__ __forceinline__ bool packed_rows(const TX* base, int64_t d) {
  return d % kPackLen<TX> == 0 && aligned16(base);
}

// The bits of one element (float32 or 16-bit), without taking an address (a punned uint4
// would live in local memory).
template <typename T>
__device__ __forceinline__ T from_bits(uint32_t u);
template <>
__device__ __forceinline__ float from_bits<float>(uint32_t u) {
  return __uint_as_float(u);
}
template <>
__device__ __forceinline__ __half from_bits<__half>(uint32_t u) {
  return __ushort_as_half(static_cast<unsigned short>(u));
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_bits<__nv_bfloat16>(uint32_t u) {
  return __ushort_as_bfloat16(static_cast<unsigned short>(u));
}
__device__ __forceinline__ uint32_t to_bits(float v) { return __float_as_uint(v); }
__device__ __forceinline__ uint32_t to_bits(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t to_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

__device__ __forceinline__ uint32_t word_of(const uint4& raw, int w) {
  return w == 0 ? raw.x : w == 1 ? raw.y : w == 2 ? raw.z : raw.w;
}

// The kPackLen elements of a 16-byte packet (little-endian: element i in the low bits first).
template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, T* v) {
  constexpr int kPerWord = 4 / static_cast<int>(sizeof(T));
#pragma unroll
  for (int i = 0; i < kPackLen<T>; ++i) {
    v[i] = from_bits<T>(word_of(raw, i / kPerWord) >> (32 / kPerWord * (i % kPerWord)));
  }
}

template <typename T>
__device__ __forceinline__ uint4 pack(const T* v) {
  constexpr int kPerWord = 4 / static_cast<int>(sizeof(T));
  uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int i = 0; i < kPackLen<T>; ++i) w[i / kPerWord] |= to_bits(v[i]) << (32 / kPerWord * (i % kPerWord));
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// One 16-byte load of kPackLen elements at p (16-byte aligned), as float32.
template <typename TX>
__device__ __forceinline__ void load_pack(const TX* p, float* out) {
  TX e[kPackLen<TX>];
  unpack(__ldg(reinterpret_cast<const uint4*>(p)), e);
#pragma unroll
  for (int i = 0; i < kPackLen<TX>; ++i) out[i] = to_float(e[i]);
}

// One 16-byte store of kPackLen elements (rounded from float32) at p (16-byte aligned).
template <typename TX>
__device__ __forceinline__ void store_pack(TX* p, const float* in) {
  TX e[kPackLen<TX>];
#pragma unroll
  for (int i = 0; i < kPackLen<TX>; ++i) e[i] = from_float<TX>(in[i]);
  *reinterpret_cast<uint4*>(p) = pack(e);
}

__device__ __forceinline__ unsigned lanes_below() {
  unsigned mask;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(mask));
  return mask;
}

__device__ __forceinline__ int warp_sum(int v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Exclusive prefix sum of `flag` over the threads of the block (in thread order) and the
// block total. All threads must call it. `scratch` holds kThreads / kWarp ints.
__device__ __forceinline__ int block_exclusive_scan(int flag, int* scratch, int* total) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag != 0);
  if (lane == 0) scratch[warp] = __popc(ballot);
  __syncthreads();
  int before = 0, sum = 0;
  for (int w = 0; w < kThreads / kWarp; ++w) {
    before += w < warp ? scratch[w] : 0;
    sum += scratch[w];
  }
  __syncthreads();
  *total = sum;
  return before + __popc(ballot & lanes_below());
}

// Sum of v over the threads of the block. All threads must call it. `scratch` holds kThreads /
// kWarp ints.
__device__ __forceinline__ int64_t block_sum(int v, int* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  int64_t sum = 0;
  for (int w = 0; w < kThreads / kWarp; ++w) sum += scratch[w];
  __syncthreads();
  return sum;
}

// Whether sample b was flagged invalid: the OR of its `tiles` flags (written by an earlier launch).
// All threads of the block must call it.
__device__ __forceinline__ bool sample_invalid_block(const int32_t* flags, int64_t b, int64_t tiles) {
  int bad = 0;
  for (int64_t t = threadIdx.x; t < tiles; t += blockDim.x) bad |= flags[b * tiles + t];
  return __syncthreads_or(bad) != 0;
}

// The same for one warp (all its lanes must call it).
__device__ __forceinline__ bool sample_invalid_warp(const int32_t* flags, int64_t b, int64_t tiles) {
  int bad = 0;
  for (int64_t t = threadIdx.x % kWarp; t < tiles; t += kWarp) bad |= flags[b * tiles + t];
  return __any_sync(0xffffffffu, bad) != 0;
}

// ------------------------------------------------------------------------- preparation

// Grid (merge_tokens_flag_tiles(n), B), one token i per thread: checks weight[b, i] and keep slot
// i (i < k; common/merge_select.h), writes token i to its slot of the dropped list when
// `list_dropped` (dropped mode: the tokens keep does not contain, ascending), zeroes arrival
// counter i of the sample when i < n_counters (similarity_kernel's kSelectBest; n_counters <= n),
// and each CTA writes its (sample, tile) invalid flag. A sample flagged invalid gets NaN outputs.
__global__ void __launch_bounds__(kThreads) merge_prepare_kernel(const int64_t* keep, const float* weight, int64_t n,
                                                                 int64_t k, bool list_dropped, int32_t* dropped,
                                                                 int32_t* counters, int64_t n_counters,
                                                                 int32_t* invalid) {
  const int64_t b = blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t* row = keep + b * k;
  bool bad = false;
  if (i < n) {
    bad = !weight_valid(weight[b * n + i]) || (i < k && !keep_slot_valid(row, i, n));
    if (list_dropped) {
      const int64_t slot = dropped_slot(row, k, i);
      if (slot >= 0 && slot < n - k) dropped[b * (n - k) + slot] = static_cast<int32_t>(i);
    }
  }
  if (i < n_counters) counters[b * n_counters + i] = 0;
  const int any = __syncthreads_or(bad);
  if (threadIdx.x == 0) invalid[b * gridDim.x + blockIdx.x] = any != 0 ? 1 : 0;
}

// Which token row of a (batch, n, c) matrix is row i of a GEMM operand: an index list
// (int32 or int64, (batch, rows)), or i * step + offset.
struct RowMap {
  const int32_t* i32 = nullptr;
  const int64_t* i64 = nullptr;
  int64_t step = 1, offset = 0;
  __device__ __forceinline__ int64_t operator()(int64_t b, int64_t rows, int64_t i) const {
    if (i32 != nullptr) return i32[b * rows + i];
    if (i64 != nullptr) return i64[b * rows + i];
    return i * step + offset;
  }
};

// What a similarity tile does with its values (common/merge_plan.h, SimilarityEpilogue), and where.
struct SimilarityOut {
  SimilarityEpilogue epilogue;
  bool cosine;        // normalize by the rows' norms (summed from the staged tiles)
  bool exclude_self;  // a chooser is not its own candidate (merge_tokens' kept mode)
  float* sims;        // kStore: (batch, rows, cols)
  int32_t* part_key;  // kRowBest, kSelectBest: (batch, rows, column_tiles(cols))
  int32_t* part_idx;
  // kSelectBest only
  int32_t* counters;           // (batch, row blocks), zero on entry (merge_prepare_kernel)
  const int32_t* invalid;      // (batch, flag_tiles), written by merge_prepare_kernel
  int64_t flag_tiles;
  const int32_t* chooser_tok;  // the dropped list (dropped mode) or nullptr (kept mode)
  const float* weight;         // (batch, n)
  int32_t* targets;            // (batch, rows, 1)
  float* coef;                 // (batch, rows, 1)
};

constexpr int kTileK = 32, kPad = 8;  // kTileM x kTileN output tiles: common/merge_plan.h
static_assert(kTileK == kWarp && kTileM == kTileN, "staging layout");
static_assert(kThreads == 4 * kTileM && kTileN % 4 == 0, "row-best layout: four threads per tile row");

// How a k step of kTileK columns of the tile's kTileM rows is staged: in packets of V =
// kPackLen<TM> consecutive elements (one 16-byte load each where the rows allow it, else V
// scalar loads: the same values and the same order of squares). Packet q of the step covers row
// q / kLanesPerRow, columns (q % kLanesPerRow) * V + [0, V); thread t stages packets
// t + u * kThreads, u < kPacks, so the kLanesPerRow adjacent lanes holding a row sum its squares
// by an xor butterfly (the same bits in each of them, whichever tile holds the row).
template <typename TM>
struct Staging {
  static constexpr int V = kPackLen<TM>;
  static constexpr int kLanesPerRow = kTileK / V;
  static constexpr int kPacks = kTileM * kTileK / (V * kThreads);
  static_assert(kTileK % V == 0 && kWarp % kLanesPerRow == 0 && kPacks >= 1 &&
                    kPacks * V * kThreads == kTileM * kTileK,
                "packets of a k step");
  __device__ static int row(int u) { return (static_cast<int>(threadIdx.x) + u * kThreads) / kLanesPerRow; }
  __device__ static int col(int u) { return (static_cast<int>(threadIdx.x) + u * kThreads) % kLanesPerRow * V; }
};
// Token row of each row/column of the output tile (-1 past the end or out of [0, n)).
__device__ __forceinline__ void tile_rows(RowMap qmap, RowMap kmap, int64_t b, int64_t i0, int64_t j0, int64_t n,
                                          int64_t rows, int64_t cols, int64_t* a_rows, int64_t* b_rows) {
  const int tid = threadIdx.x;
  if (tid < kTileM) {
    const int64_t i = i0 + tid;
    const int64_t t = i < rows ? qmap(b, rows, i) : -1;
    a_rows[tid] = (t >= 0 && t < n) ? t : -1;
  } else if (tid < kTileM + kTileN) {
    const int64_t j = j0 + tid - kTileM;
    const int64_t t = j < cols ? kmap(b, cols, j) : -1;
    b_rows[tid - kTileM] = (t >= 0 && t < n) ? t : -1;
  }
  __syncthreads();
}

// Elements [e, e + V) of token row `row` (-1: none) of a (.., c) matrix, zero past c; `packed`:
// c % V == 0 and the base 16-byte aligned, so the packet is one aligned load, all in or all out.
template <typename TM>
__device__ __forceinline__ void load_packet(const TM* base, int64_t row, int64_t e, int64_t c, bool packed,
                                            TM (&v)[kPackLen<TM>]) {
  constexpr int V = kPackLen<TM>;
  if (packed) {
    if (row >= 0 && e < c) {
      unpack(__ldg(reinterpret_cast<const uint4*>(base + row * c + e)), v);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] = from_float<TM>(0.0f);
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < V; ++i) v[i] = (row >= 0 && e + i < c) ? base[row * c + e + i] : from_float<TM>(0.0f);
}

// Adds the squares of a packet, in element order, to sq.
template <typename TM>
__device__ __forceinline__ void add_squares(const TM (&v)[kPackLen<TM>], float& sq) {
#pragma unroll
  for (int i = 0; i < kPackLen<TM>; ++i) {
    const float f = to_float(v[i]);
    sq += f * f;
  }
}

// The inverse norms of the tile's rows and columns (see Staging) into shared inv_a / inv_b.
template <typename TM>
__device__ __forceinline__ void store_inverse_norms(const float* sq_a, const float* sq_b, float* inv_a,
                                                    float* inv_b) {
  using S = Staging<TM>;
#pragma unroll
  for (int u = 0; u < S::kPacks; ++u) {
    float sa = sq_a[u], sb = sq_b[u];
#pragma unroll
    for (int o = 1; o < S::kLanesPerRow; o *= 2) {
      sa += __shfl_xor_sync(0xffffffffu, sa, o);
      sb += __shfl_xor_sync(0xffffffffu, sb, o);
    }
    if (S::col(u) == 0) {
      inv_a[S::row(u)] = inverse_norm(static_cast<double>(sa));
      inv_b[S::row(u)] = inverse_norm(static_cast<double>(sb));
    }
  }
}

// Stages k step e0 of the tile's chooser rows (q) and candidate rows (m) packet by packet (see
// Staging): put(r, e, i, va, vb) stores element i of the packets at row r, column e of each tile
// (the two tile layouts differ); the squares are added to sq_a / sq_b.
template <typename TM, typename Put>
__device__ __forceinline__ void stage_k_step(const TM* qb, const TM* mb, const int64_t* a_rows, const int64_t* b_rows,
                                             int64_t e0, int64_t c, bool packed,
                                             float (&sq_a)[Staging<TM>::kPacks], float (&sq_b)[Staging<TM>::kPacks],
                                             Put&& put) {
  using S = Staging<TM>;
#pragma unroll
  for (int u = 0; u < S::kPacks; ++u) {
    const int r = S::row(u), e = S::col(u);
    TM va[S::V], vb[S::V];
    load_packet(qb, a_rows[r], e0 + e, c, packed, va);
    load_packet(mb, b_rows[r], e0 + e, c, packed, vb);
#pragma unroll
    for (int i = 0; i < S::V; ++i) put(r, e, i, va[i], vb[i]);
    add_squares(va, sq_a[u]);
    add_squares(vb, sq_b[u]);
  }
}

// Tensor-core tile (16-bit inputs, sm_80+): 8 warps x 2 WMMA fragments of 16 x 16.
template <typename TM>
__device__ void similarity_tile_wmma(const TM* q, const TM* m, int64_t b, int64_t n, int64_t c, bool norms,
                                     bool packed, const int64_t* a_rows, const int64_t* b_rows,
                                     float (*c_tile)[kTileN + 4], float* inv_a, float* inv_b) {
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(32) TM a_tile[kTileM][kTileK + kPad];
  __shared__ __align__(32) TM b_tile[kTileN][kTileK + kPad];
  const int warp = threadIdx.x / kWarp;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  for (auto& f : acc) wmma::fill_fragment(f, 0.0f);
  using S = Staging<TM>;
  float sq_a[S::kPacks] = {}, sq_b[S::kPacks] = {};
  const TM* qb = q + b * n * c;
  const TM* mb = m + b * n * c;
  for (int64_t e0 = 0; e0 < c; e0 += kTileK) {
    stage_k_step(qb, mb, a_rows, b_rows, e0, c, packed, sq_a, sq_b, [&](int r, int e, int i, TM va, TM vb) {
      a_tile[r][e + i] = va;
      b_tile[r][e + i] = vb;
    });
    __syncthreads();
    for (int f = 0; f < 2; ++f) {
      const int tile = warp * 2 + f;
      const int fm = (tile / 4) * 16, fn = (tile % 4) * 16;
      for (int kk = 0; kk < kTileK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, TM, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, TM, wmma::col_major> fb;  // b_tile[n][k] is (Q K^T)'s K^T
        wmma::load_matrix_sync(fa, &a_tile[fm][kk], kTileK + kPad);
        wmma::load_matrix_sync(fb, &b_tile[fn][kk], kTileK + kPad);
        wmma::mma_sync(acc[f], fa, fb, acc[f]);
      }
    }
    __syncthreads();
  }
  for (int f = 0; f < 2; ++f) {
    const int tile = warp * 2 + f;
    wmma::store_matrix_sync(&c_tile[(tile / 4) * 16][(tile % 4) * 16], acc[f], kTileN + 4, wmma::mem_row_major);
  }
  if (norms) store_inverse_norms<TM>(sq_a, sq_b, inv_a, inv_b);
  __syncthreads();
}

// float32 FMA tile: 16 x 16 threads x 4 x 4 outputs; the staged tiles are k-major so that a
// warp reads consecutive words.
template <typename TM>
__device__ __forceinline__ void similarity_tile_fma(const TM* q, const TM* m, int64_t b, int64_t n, int64_t c,
                                                    bool norms, bool packed, const int64_t* a_rows,
                                                    const int64_t* b_rows, float (*c_tile)[kTileN + 4], float* inv_a,
                                                    float* inv_b) {
  __shared__ __align__(16) float a_tile[kTileK][kTileM + 4];
  __shared__ __align__(16) float b_tile[kTileK][kTileN + 4];
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  float acc[4][4] = {};
  using S = Staging<TM>;
  float sq_a[S::kPacks] = {}, sq_b[S::kPacks] = {};
  const TM* qb = q + b * n * c;
  const TM* mb = m + b * n * c;
  for (int64_t e0 = 0; e0 < c; e0 += kTileK) {
    stage_k_step(qb, mb, a_rows, b_rows, e0, c, packed, sq_a, sq_b, [&](int r, int e, int i, TM va, TM vb) {
      a_tile[e + i][r] = to_float(va);
      b_tile[e + i][r] = to_float(vb);
    });
    __syncthreads();
    for (int e = 0; e < kTileK; ++e) {
      float av[4], bv[4];
      for (int u = 0; u < 4; ++u) {
        av[u] = a_tile[e][ty * 4 + u];
        bv[u] = b_tile[e][tx * 4 + u];
      }
      for (int u = 0; u < 4; ++u)
        for (int v = 0; v < 4; ++v) acc[u][v] += av[u] * bv[v];
    }
    __syncthreads();
  }
  for (int u = 0; u < 4; ++u)
    for (int v = 0; v < 4; ++v) c_tile[ty * 4 + u][tx * 4 + v] = acc[u][v];
  if (norms) store_inverse_norms<TM>(sq_a, sq_b, inv_a, inv_b);
  __syncthreads();
}

// Best (order key, index) over the valid candidates of partial lists [0, tiles), in order.
__device__ __forceinline__ void reduce_row_best(const int32_t* keys, const int32_t* idx, int64_t tiles,
                                                int32_t* best_key, int32_t* best_j) {
  int32_t bk = INT32_MIN, bj = kNoMatch;
  for (int64_t t = 0; t < tiles; ++t) {
    const int32_t key = __ldcg(keys + t), j = __ldcg(idx + t);  // L2: written by other CTAs
    if (better_match(key, j, bk, bj)) {
      bk = key;
      bj = j;
    }
  }
  *best_key = bk;
  *best_j = bj;
}

// kSelectBest, in the last tile of row block blockIdx.y to arrive: each row's best candidate over
// the partials of every column tile becomes its target (topm = 1: coefficient 1 * its weight).
__device__ void select_best_rows(const SimilarityOut& out, int64_t b, int64_t i0, int64_t n, int64_t rows) {
  __shared__ int last;
  __threadfence();  // this thread's partials are visible device-wide before the ticket
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(out.counters + b * gridDim.y + blockIdx.y, 1) == static_cast<int>(gridDim.x) - 1 ? 1 : 0;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  if (sample_invalid_block(out.invalid, b, out.flag_tiles)) return;  // merge_reduce writes NaN
  const int64_t tiles = gridDim.x;
  for (int r = threadIdx.x; r < kTileM; r += kThreads) {
    const int64_t i = i0 + r;
    if (i >= rows) continue;
    const int64_t row = b * rows + i;
    int32_t key, j;
    reduce_row_best(out.part_key + row * tiles, out.part_idx + row * tiles, tiles, &key, &j);
    if (j == kNoMatch) j = 0;  // no candidate: excluded by the op's topm check
    const int64_t src = out.chooser_tok != nullptr ? out.chooser_tok[row] : j;
    out.targets[row] = j;
    out.coef[row] = 1.0f * out.weight[b * n + src];
  }
}

// The epilogue on the tile's values in c_tile (normalized already when cosine).
__device__ void similarity_epilogue(const SimilarityOut& out, float (*c_tile)[kTileN + 4], const int64_t* a_rows,
                                    const int64_t* b_rows, int64_t b, int64_t i0, int64_t j0, int64_t n,
                                    int64_t rows, int64_t cols) {
  if (out.epilogue == SimilarityEpilogue::kStore) {
    for (int t = threadIdx.x; t < kTileM * kTileN; t += kThreads) {
      const int r = t / kTileN, col = t % kTileN;
      const int64_t i = i0 + r, j = j0 + col;
      if (i < rows && j < cols) out.sims[(b * rows + i) * cols + j] = c_tile[r][col];
    }
    return;
  }
  // Four threads (adjacent lanes) per tile row, kTileN / 4 columns each, ascending.
  const int r = threadIdx.x / 4, part = threadIdx.x % 4;
  int32_t best_key = INT32_MIN, best_j = kNoMatch;
  for (int u = 0; u < kTileN / 4; ++u) {
    const int col = part * (kTileN / 4) + u;
    const int64_t j = j0 + col;
    if (j >= cols || (out.exclude_self && b_rows[col] == a_rows[r])) continue;
    const int32_t key = order_key(c_tile[r][col]);
    if (better_match(key, static_cast<int32_t>(j), best_key, best_j)) {
      best_key = key;
      best_j = static_cast<int32_t>(j);
    }
  }
  for (int o = 1; o < 4; o *= 2) {
    const int32_t ok = __shfl_xor_sync(0xffffffffu, best_key, o);
    const int32_t oj = __shfl_xor_sync(0xffffffffu, best_j, o);
    if (better_match(ok, oj, best_key, best_j)) {
      best_key = ok;
      best_j = oj;
    }
  }
  const int64_t i = i0 + r;
  if (part == 0 && i < rows) {
    const int64_t slot = (b * rows + i) * gridDim.x + blockIdx.x;
    out.part_key[slot] = best_key;
    out.part_idx[slot] = best_j;
  }
  if (out.epilogue == SimilarityEpilogue::kSelectBest) select_best_rows(out, b, i0, n, rows);
}

// sim[b, i, j] = sum_e q[b, qmap(i), e] * m[b, kmap(j), e] in float32 (divided by both rows'
// norms when out.cosine), one 64 x 64 tile per block: tensor cores (WMMA, float32 accumulation)
// for 16-bit inputs on sm_80+, float32 FMA otherwise; then out.epilogue. Rows that map outside
// [0, n) read as 0. Grid (column_tiles(cols), blocks_for(rows, kTileM), batch). Four CTAs per
// SM: without that bound ptxas keeps the float32 instantiation at 48 registers and spills its
// sums of squares (sm_90); with it every instantiation uses 64 and spills nothing.
template <typename TM>
__global__ void __launch_bounds__(kThreads, 4) similarity_kernel(const TM* q, RowMap qmap, const TM* m, RowMap kmap,
                                                              int64_t n, int64_t c, int64_t rows, int64_t cols,
                                                              SimilarityOut out) {
  __shared__ int64_t a_rows[kTileM], b_rows[kTileN];
  __shared__ float inv_a[kTileM], inv_b[kTileN];
  __shared__ __align__(32) float c_tile[kTileM][kTileN + 4];
  const int64_t b = blockIdx.z;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTileM, j0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  tile_rows(qmap, kmap, b, i0, j0, n, rows, cols, a_rows, b_rows);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr bool kTensorCores = !std::is_same<TM, float>::value;
#else
  constexpr bool kTensorCores = false;  // also the host pass, which never runs this body
#endif
  const bool packed = packed_rows(q, c) && packed_rows(m, c);
  if constexpr (kTensorCores) {
    similarity_tile_wmma(q, m, b, n, c, out.cosine, packed, a_rows, b_rows, c_tile, inv_a, inv_b);
  } else {
    similarity_tile_fma(q, m, b, n, c, out.cosine, packed, a_rows, b_rows, c_tile, inv_a, inv_b);
  }
  if (out.cosine) {
    // (s * inv_row) * inv_col: the product order of the former select / best-match kernels.
    for (int t = threadIdx.x; t < kTileM * kTileN; t += kThreads) {
      const int r = t / kTileN, col = t % kTileN;
      c_tile[r][col] = c_tile[r][col] * inv_a[r] * inv_b[col];
    }
    __syncthreads();
  }
  similarity_epilogue(out, c_tile, a_rows, b_rows, b, i0, j0, n, rows, cols);
}

// --------------------------------------------------------------------- target selection

// One warp per chooser row: its topm best candidates (similarity descending, ties to the
// lower candidate index, NaN as -inf), written in ascending candidate order to targets, and
// their coefficients a * w[source] to coef. The similarities come normalized (similarity_kernel).
//   dropped mode: chooser = dropped token, candidates = kept positions 0..K-1
//   kept mode:    chooser = kept token,    candidates = all tokens except the chooser
__global__ void select_targets_kernel(const float* sims, int64_t rows_c, int64_t cols_c, const int32_t* chooser_tok,
                                      const int64_t* keep, int64_t k, int64_t n, bool kept_mode, int64_t topm,
                                      float temperature, const float* weight,
                                      const int32_t* invalid, int64_t flag_tiles, int32_t* targets, float* coef) {
  const int64_t warp_id = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t b = blockIdx.y;
  const int lane = threadIdx.x % kWarp;
  if (warp_id >= rows_c || sample_invalid_warp(invalid, b, flag_tiles)) return;
  const float* row = sims + (b * rows_c + warp_id) * cols_c;
  const int64_t self = kept_mode ? keep[b * k + warp_id] : chooser_tok[b * rows_c + warp_id];
  auto key_of = [&](int64_t j, bool* valid) {
    if (j >= cols_c) {
      *valid = false;
      return int32_t{0};
    }
    *valid = !(kept_mode && j == self);  // kept mode: candidate j is token j
    if (!*valid) return int32_t{0};
    return order_key(row[j]);
  };
  // Threshold: the largest key T with #{key >= T} >= topm.
  int64_t lo = INT32_MIN, hi = INT32_MAX;
  for (int it = 0; it < 32; ++it) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    int cnt = 0;
    for (int64_t j = lane; j < cols_c; j += kWarp) {
      bool valid;
      const int32_t key = key_of(j, &valid);
      cnt += (valid && key >= mid) ? 1 : 0;
    }
    if (warp_sum(cnt) >= topm) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int32_t thr = static_cast<int32_t>(lo);
  int gt = 0;
  for (int64_t j = lane; j < cols_c; j += kWarp) {
    bool valid;
    const int32_t key = key_of(j, &valid);
    gt += (valid && key > thr) ? 1 : 0;
  }
  const int64_t ties = topm - warp_sum(gt);
  int32_t* out_t = targets + (b * rows_c + warp_id) * topm;
  float* out_c = coef + (b * rows_c + warp_id) * topm;
  int64_t eq_before = 0, sel_before = 0;
  for (int64_t j0 = 0; j0 < cols_c; j0 += kWarp) {
    const int64_t j = j0 + lane;
    bool valid;
    const int32_t key = key_of(j, &valid);
    const bool eq = valid && key == thr;
    const unsigned eq_ballot = __ballot_sync(0xffffffffu, eq);
    const bool sel = (valid && key > thr) || (eq && eq_before + __popc(eq_ballot & lanes_below()) < ties);
    const unsigned sel_ballot = __ballot_sync(0xffffffffu, sel);
    if (sel) {
      const int64_t pos = sel_before + __popc(sel_ballot & lanes_below());
      out_t[pos] = static_cast<int32_t>(j);
      out_c[pos] = row[j];
    }
    eq_before += __popc(eq_ballot);
    sel_before += __popc(sel_ballot);
  }
  __syncwarp();
  if (lane == 0) assignment_weights(out_c, topm, temperature, out_c);
  __syncwarp();
  for (int64_t s = lane; s < topm; s += kWarp) {
    const int64_t src = kept_mode ? out_t[s] : self;
    out_c[s] *= weight[b * n + src];
  }
}

// --------------------------------------------------------------------------- reductions

// Thread threadIdx.x holds accumulator slot s of a receiver's kAccTile-column tile for column
//   packed rows: element s % V of 16-byte packet threadIdx.x + (s / V) * kThreads (V = kPackLen)
//   otherwise:   threadIdx.x + s * kThreads
// (columns past the tile's width are idle). Either way each column has one owner that adds the
// contributions in list order, so both layouts give the same bits.

// Accumulates, in order, the contributions listed in shared memory into the receiver's tile,
// each coefficient divided by denom first (see merge_denominator).
template <typename TX>
__device__ __forceinline__ void accumulate(const TX* x, int64_t b, int64_t n, int64_t d, int64_t d0, int64_t width,
                                           const int32_t* src, const float* cs, int count, float denom, bool packed,
                                           float (&acc)[kAccPerThread]) {
  constexpr int V = kPackLen<TX>;
  for (int e = 0; e < count; ++e) {
    const TX* row = x + (b * n + src[e]) * d + d0;
    const float c = cs[e] / denom;
    if (packed) {
#pragma unroll
      for (int u = 0; u < kAccPerThread / V; ++u) {
        const int64_t t = (static_cast<int64_t>(threadIdx.x) + u * kThreads) * V;
        if (t < width) {
          float v[V];
          load_pack(row + t, v);
#pragma unroll
          for (int i = 0; i < V; ++i) acc[u * V + i] += c * v[i];
        }
      }
    } else {
#pragma unroll
      for (int u = 0; u < kAccPerThread; ++u) {
        const int64_t t = static_cast<int64_t>(threadIdx.x) + u * kThreads;
        if (t < width) acc[u] += c * to_float(row[t]);
      }
    }
  }
}

// out[t] = finalize_merge(combine, self[t], w_self, acc, csum) over the receiver's tile.
template <typename TX>
__device__ __forceinline__ void finalize_tile(const TX* self, TX* out, int64_t width, Combine combine, float w_self,
                                              const float (&acc)[kAccPerThread], float csum, bool packed) {
  constexpr int V = kPackLen<TX>;
  if (packed) {
#pragma unroll
    for (int u = 0; u < kAccPerThread / V; ++u) {
      const int64_t t = (static_cast<int64_t>(threadIdx.x) + u * kThreads) * V;
      if (t < width) {
        float v[V];
        load_pack(self + t, v);
#pragma unroll
        for (int i = 0; i < V; ++i) v[i] = finalize_merge(combine, v[i], w_self, acc[u * V + i], csum);
        store_pack(out + t, v);
      }
    }
    return;
  }
#pragma unroll
  for (int u = 0; u < kAccPerThread; ++u) {
    const int64_t t = static_cast<int64_t>(threadIdx.x) + u * kThreads;
    if (t < width) out[t] = from_float<TX>(finalize_merge(combine, to_float(self[t]), w_self, acc[u], csum));
  }
}

// Sum of the coefficients listed in shared memory, in order (every thread gets it).
__device__ __forceinline__ float coefficient_sum(const float* cs, int count, float csum) {
  for (int e = 0; e < count; ++e) csum += cs[e];
  return csum;
}

// Lists the contributions to kept token j (ascending source order) chunk by chunk in shared
// src / cs and calls f(count) on each chunk. All threads of the block must call it.
template <typename F>
__device__ __forceinline__ void for_each_contribution(int64_t b, int64_t j, const int32_t* chooser_tok,
                                                      const int32_t* targets, const float* coef, int64_t rows_c,
                                                      int64_t topm, bool kept_mode, int32_t* src, float* cs,
                                                      int* scratch, F&& f) {
  if (kept_mode) {
    const int32_t* my_t = targets + (b * rows_c + j) * topm;
    const float* my_c = coef + (b * rows_c + j) * topm;
    for (int64_t e0 = 0; e0 < topm; e0 += kThreads) {
      const int64_t e = e0 + threadIdx.x;
      if (e < topm) {
        src[threadIdx.x] = my_t[e];
        cs[threadIdx.x] = my_c[e];
      }
      __syncthreads();
      f(static_cast<int>(topm - e0 < kThreads ? topm - e0 : kThreads));
      __syncthreads();
    }
    return;
  }
  const int64_t entries = rows_c * topm;
  const int32_t* all_t = targets + b * entries;
  const float* all_c = coef + b * entries;
  for (int64_t e0 = 0; e0 < entries; e0 += kThreads) {
    const int64_t e = e0 + threadIdx.x;
    const int match = (e < entries && all_t[e] == j) ? 1 : 0;
    int count;
    const int pos = block_exclusive_scan(match, scratch, &count);
    if (match) {
      src[pos] = chooser_tok[b * rows_c + e / topm];
      cs[pos] = all_c[e];
    }
    __syncthreads();
    f(count);
    __syncthreads();
  }
}

// One block per receiving kept token j: merged[b, j] and mass[b, j].
template <typename TX>
__global__ void merge_reduce_kernel(const TX* x, const int64_t* keep, const float* weight, const int32_t* chooser_tok,
                                    const int32_t* targets, const float* coef, const int32_t* invalid,
                                    int64_t flag_tiles, int64_t n, int64_t d, int64_t k, int64_t rows_c, int64_t topm,
                                    bool kept_mode, Combine combine, TX* merged, float* mass) {
  __shared__ int32_t src[kThreads];
  __shared__ float cs[kThreads];
  __shared__ int scratch[kThreads / kWarp];
  const int64_t j = blockIdx.x, b = blockIdx.y;
  TX* out = merged + (b * k + j) * d;
  const bool packed = packed_rows(x, d) && packed_rows(merged, d);
  if (sample_invalid_block(invalid, b, flag_tiles)) {
    for (int64_t t = threadIdx.x; t < d; t += blockDim.x) out[t] = from_float<TX>(NAN);
    if (threadIdx.x == 0) mass[b * k + j] = NAN;
    return;
  }
  const int64_t self = keep[b * k + j];
  const float w_self = weight[b * n + self];
  float csum = 0.0f;
  for_each_contribution(b, j, chooser_tok, targets, coef, rows_c, topm, kept_mode, src, cs, scratch,
                        [&](int count) { csum = coefficient_sum(cs, count, csum); });
  const float denom = merge_denominator(combine, w_self, csum);
  for (int64_t d0 = 0; d0 < d; d0 += kAccTile) {
    const int64_t width = d - d0 < kAccTile ? d - d0 : kAccTile;
    float acc[kAccPerThread] = {};
    for_each_contribution(b, j, chooser_tok, targets, coef, rows_c, topm, kept_mode, src, cs, scratch,
                          [&](int count) { accumulate(x, b, n, d, d0, width, src, cs, count, denom, packed, acc); });
    finalize_tile(x + (b * n + self) * d + d0, out + d0, width, combine, w_self, acc, csum, packed);
  }
  if (threadIdx.x == 0) mass[b * k + j] = w_self + csum;
}

// --------------------------------------------------------------------- bipartite (ToMe)

// One thread per A token i (position 2i), where edge_select_kernel does not reduce the partials
// itself (common/merge_plan.h, edge_select_reduces): its best B token j (position 2j + 1) by
// cosine, ties to the lower j, from the similarity tiles' partials (kRowBest); writes its order
// key and index.
__global__ void best_match_kernel(const int32_t* part_key, const int32_t* part_idx, int64_t n_a, int64_t tiles,
                                  int32_t* node_key, int32_t* node_idx) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (i >= n_a) return;
  const int64_t row = b * n_a + i;
  int32_t key, j;
  reduce_row_best(part_key + row * tiles, part_idx + row * tiles, tiles, &key, &j);
  node_key[row] = key;
  node_idx[row] = j == kNoMatch ? 0 : j;
}

// Grid (bipartite_flag_tiles(n), B), one A token i per thread. Every CTA finds the sample's cut
// (the r-th best key, common/merge_select.h) by block-wide counts over all n_a node keys, then
// for its A tokens writes merged[i] and, for the unmerged ones, their slot of the unmerged list
// (ascending; n_a - r entries): the same r tokens (best keys, ties to the lower index, token 0
// excluded when protected) as a serial selection. With `reduce_partials` (edge_select_reduces)
// every CTA reduces the similarity partials of all of them into shared memory and writes node_idx
// of its own; else best_match_kernel has written node_key / node_idx, held in shared memory up to
// kKeyTile A tokens. It also checks the sizes of tokens 2i and 2i + 1 and writes the CTA's
// (sample, tile) invalid flag.
__global__ void __launch_bounds__(kThreads) edge_select_kernel(const int32_t* part_key, const int32_t* part_idx,
                                                               int64_t tiles, bool reduce_partials,
                                                               const int32_t* node_key, int32_t* node_idx,
                                                               const float* size, int64_t n,
                                                               int64_t n_a, int64_t r, bool protect_first,
                                                               uint8_t* merged, int32_t* unmerged, int32_t* invalid) {
  __shared__ int32_t smem_keys[kKeyTile];
  __shared__ int scratch[kThreads / kWarp];
  const int64_t b = blockIdx.y;
  const int64_t first = protect_first ? 1 : 0;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kThreads, i = i0 + threadIdx.x;
  const int32_t* keys = node_key + b * n_a;  // read only when r > 0 (no keys exist when n_b = 0)
  if (r > 0 && n_a <= kKeyTile) {
    for (int64_t j = threadIdx.x; j < n_a; j += kThreads) {
      const int64_t row = b * n_a + j;
      if (!reduce_partials) {
        smem_keys[j] = keys[j];
        continue;
      }
      int32_t key, best;
      reduce_row_best(part_key + row * tiles, part_idx + row * tiles, tiles, &key, &best);
      smem_keys[j] = key;
      if (j >= i0 && j < i0 + kThreads) node_idx[row] = best == kNoMatch ? 0 : best;
    }
    __syncthreads();
    keys = smem_keys;
  }
  // #{candidates j in [first, end) with pred(keys[j])}, block-wide.
  auto count = [&](int64_t end, auto pred) {
    int c = 0;
    for (int64_t j = first + threadIdx.x; j < end; j += kThreads) c += pred(keys[j]) ? 1 : 0;
    return block_sum(c, scratch);
  };
  const EdgeCut cut = edge_cut(
      r, [&](int32_t t) { return count(n_a, [t](int32_t key) { return key >= t; }); },
      [&](int32_t t) { return count(n_a, [t](int32_t key) { return key > t; }); });
  int64_t gt_before = 0, eq_before = 0;
  if (r > 0 && i0 > first) {
    gt_before = count(i0, [&](int32_t key) { return key > cut.key; });
    eq_before = count(i0, [&](int32_t key) { return key == cut.key; });
  }
  const bool cand = r > 0 && i >= first && i < n_a;
  const int32_t key = cand ? keys[i] : 0;
  int tile_gt, tile_eq;
  gt_before += block_exclusive_scan(cand && key > cut.key, scratch, &tile_gt);
  eq_before += block_exclusive_scan(cand && key == cut.key, scratch, &tile_eq);
  bool bad = false;
  if (i < n_a) {
    const bool m = edge_merged(key, cand, eq_before, cut);
    merged[b * n_a + i] = m ? 1 : 0;
    if (!m) {
      unmerged[b * (n_a - r) + unmerged_slot(i, merged_before(gt_before, eq_before, cut))] = static_cast<int32_t>(i);
    }
    bad = !weight_valid(size[b * n + 2 * i]) || (2 * i + 1 < n && !weight_valid(size[b * n + 2 * i + 1]));
  }
  const int any = __syncthreads_or(bad);
  if (threadIdx.x == 0) invalid[b * gridDim.x + blockIdx.x] = any != 0 ? 1 : 0;
}

// One block per output row: the unmerged A tokens first (copied), then every B token with
// the A tokens merged into it (size-weighted mean, ascending A order).
template <typename TX>
__global__ void __launch_bounds__(kThreads, 3)
    bipartite_output_kernel(const TX* x, const float* size, const uint8_t* merged, const int32_t* node_idx,
                            const int32_t* unmerged, const int32_t* invalid, int64_t flag_tiles, int64_t n, int64_t d,
                            int64_t n_a, int64_t r, TX* out, float* out_size) {
  __shared__ int32_t src[kThreads];
  __shared__ float cs[kThreads];
  __shared__ int scratch[kThreads / kWarp];
  const int64_t row = blockIdx.x, b = blockIdx.y;
  const int64_t rows = n - r, n_unm = n_a - r;
  TX* o = out + (b * rows + row) * d;
  if (sample_invalid_block(invalid, b, flag_tiles)) {
    for (int64_t t = threadIdx.x; t < d; t += blockDim.x) o[t] = from_float<TX>(NAN);
    if (threadIdx.x == 0) out_size[b * rows + row] = NAN;
    return;
  }
  const bool packed = packed_rows(x, d) && packed_rows(out, d);
  if (row < n_unm) {
    const int64_t tok = 2 * static_cast<int64_t>(unmerged[b * n_unm + row]);
    const TX* xr = x + (b * n + tok) * d;
    if (packed) {
      constexpr int V = kPackLen<TX>;
      for (int64_t t = static_cast<int64_t>(threadIdx.x) * V; t < d; t += kThreads * V) {
        *reinterpret_cast<uint4*>(o + t) = *reinterpret_cast<const uint4*>(xr + t);
      }
    } else {
      for (int64_t t = threadIdx.x; t < d; t += blockDim.x) o[t] = xr[t];
    }
    if (threadIdx.x == 0) out_size[b * rows + row] = size[b * n + tok];
    return;
  }
  const int64_t j = row - n_unm;
  const int64_t self = 2 * j + 1;
  const float s_self = size[b * n + self];
  // The A tokens merged into B token j, ascending, chunk by chunk in shared src / cs.
  auto for_each_source = [&](auto&& f) {
    for (int64_t i0 = 0; i0 < n_a; i0 += kThreads) {
      const int64_t i = i0 + threadIdx.x;
      const int match = (i < n_a && merged[b * n_a + i] && node_idx[b * n_a + i] == j) ? 1 : 0;
      int count;
      const int pos = block_exclusive_scan(match, scratch, &count);
      if (match) {
        src[pos] = static_cast<int32_t>(2 * i);
        cs[pos] = size[b * n + 2 * i];
      }
      __syncthreads();
      f(count);
      __syncthreads();
    }
  };
  float csum = 0.0f;
  for_each_source([&](int count) { csum = coefficient_sum(cs, count, csum); });
  const float denom = merge_denominator(Combine::kMean, s_self, csum);
  for (int64_t d0 = 0; d0 < d; d0 += kAccTile) {
    const int64_t width = d - d0 < kAccTile ? d - d0 : kAccTile;
    float acc[kAccPerThread] = {};
    for_each_source([&](int count) { accumulate(x, b, n, d, d0, width, src, cs, count, denom, packed, acc); });
    finalize_tile(x + (b * n + self) * d + d0, o + d0, width, Combine::kMean, s_self, acc, csum, packed);
  }
  if (threadIdx.x == 0) out_size[b * rows + row] = s_self + csum;
}

// ----------------------------------------------------------------------------- launchers
// Each chunk launches exactly the rows of its launch plan (common/merge_plan.h), in order: the
// grids are stated there once, and the static kernel report reads the same plan.

inline dim3 grid_of(const Launch& l) {
  return dim3(static_cast<unsigned>(l.grid[0]), static_cast<unsigned>(l.grid[1]), static_cast<unsigned>(l.grid[2]));
}

// Scratch buffers the caller allocates (element counts in the comments).
struct MergeTokensScratch {
  int32_t* invalid;   // batch * merge_tokens_flag_tiles(n), no fill needed
  int32_t* dropped;   // batch * (n - k)
  float* sims;        // batch * merge_tokens_sims_per_sample(p)
  int32_t* part_key;  // batch * merge_tokens_partials_per_sample(p)
  int32_t* part_idx;  // batch * merge_tokens_partials_per_sample(p)
  int32_t* counters;  // batch * merge_tokens_counters_per_sample(p), no fill needed
  int32_t* targets;   // batch * chooser_rows * topm
  float* coef;        // batch * chooser_rows * topm
};

// merged: (batch, k, d) TX, mass: (batch, k) float32. x, metric, query: contiguous; weight:
// (batch, n) float32; keep: (batch, k) int64. query == nullptr means cosine of metric rows.
// Returns the first launch error.
template <typename TX, typename TM>
void merge_tokens_chunk(const MergeTokensProblem& p, const TX* x, const int64_t* keep, const TM* metric,
                        const TM* query, const float* weight, TX* merged, float* mass, const MergeTokensScratch& s,
                        cudaStream_t stream) {
  const int64_t rows_c = p.chooser_rows(), cols_c = p.candidates();
  RowMap qmap, kmap;
  if (p.kept_mode) {
    qmap.i64 = keep;  // choosers: the kept tokens; candidates: all tokens
  } else {
    qmap.i32 = s.dropped;  // choosers: the dropped tokens; candidates: the kept tokens
    kmap.i64 = keep;
  }
  const TM* chooser = query != nullptr ? query : metric;
  const int64_t flag_tiles = merge_tokens_flag_tiles(p.n);
  const int64_t n_counters = merge_tokens_counters_per_sample(p);
  SimilarityOut out{};
  out.epilogue = merge_tokens_epilogue(p);
  out.cosine = p.cosine;
  out.exclude_self = p.kept_mode;
  out.sims = s.sims;
  out.part_key = s.part_key;
  out.part_idx = s.part_idx;
  out.counters = s.counters;
  out.invalid = s.invalid;
  out.flag_tiles = flag_tiles;
  out.chooser_tok = p.kept_mode ? nullptr : s.dropped;
  out.weight = weight;
  out.targets = s.targets;
  out.coef = s.coef;
  const LaunchPlan plan = merge_tokens_plan(p);
  for (int i = 0; i < plan.count; ++i) {
    const Launch& l = plan.launch[i];
    const dim3 grid = grid_of(l);
    const unsigned threads = static_cast<unsigned>(l.threads);
    const size_t smem = static_cast<size_t>(l.dynamic_smem);
    switch (l.kernel) {
      case MergeKernel::kPrepare:
        merge_prepare_kernel<<<grid, threads, smem, stream>>>(keep, weight, p.n, p.k, !p.kept_mode, s.dropped,
                                                              s.counters, n_counters, s.invalid);
        break;
      case MergeKernel::kSimilarity:
        similarity_kernel<TM><<<grid, threads, smem, stream>>>(chooser, qmap, metric, kmap, p.n, p.c, rows_c, cols_c,
                                                               out);
        break;
      case MergeKernel::kSelectTargets:
        select_targets_kernel<<<grid, threads, smem, stream>>>(s.sims, rows_c, cols_c, s.dropped, keep, p.k, p.n,
                                                               p.kept_mode, p.topm, p.temperature, weight, s.invalid,
                                                               flag_tiles, s.targets, s.coef);
        break;
      case MergeKernel::kMergeReduce:
        merge_reduce_kernel<TX><<<grid, threads, smem, stream>>>(x, keep, weight, s.dropped, s.targets, s.coef,
                                                                 s.invalid, flag_tiles, p.n, p.d, p.k, rows_c, p.topm,
                                                                 p.kept_mode, p.combine, merged, mass);
        break;
      default:
        break;  // not a merge_tokens kernel
    }
  }
}

template <typename TX, typename TM>
cudaError_t merge_tokens(const MergeTokensProblem& p, const TX* x, const int64_t* keep, const TM* metric,
                         const TM* query, const float* weight, TX* merged, float* mass, const MergeTokensScratch& s,
                         cudaStream_t stream) {
  if (p.n > kMaxTokens) return cudaErrorInvalidValue;
  const int64_t rows_c = p.chooser_rows();
  const int64_t sims = merge_tokens_sims_per_sample(p), partials = merge_tokens_partials_per_sample(p);
  const int64_t counters = merge_tokens_counters_per_sample(p);
  const int64_t chunk = batch_per_launch(p.n);
  for (int64_t b0 = 0; b0 < p.batch; b0 += chunk) {
    MergeTokensProblem q = p;
    q.batch = p.batch - b0 < chunk ? p.batch - b0 : chunk;
    const MergeTokensScratch sc{s.invalid + b0 * merge_tokens_flag_tiles(p.n),
                                s.dropped + b0 * (p.n - p.k),
                                s.sims + b0 * sims,
                                s.part_key + b0 * partials,
                                s.part_idx + b0 * partials,
                                s.counters + b0 * counters,
                                s.targets + b0 * rows_c * p.topm,
                                s.coef + b0 * rows_c * p.topm};
    merge_tokens_chunk<TX, TM>(q, x + b0 * p.n * p.d, keep + b0 * p.k, metric + b0 * p.n * p.c,
                               query != nullptr ? query + b0 * p.n * p.c : nullptr, weight + b0 * p.n,
                               merged + b0 * p.k * p.d, mass + b0 * p.k, sc, stream);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

struct BipartiteScratch {
  int32_t* invalid;   // batch * bipartite_flag_tiles(n), no fill needed
  int32_t* part_key;  // batch * n_a * column_tiles(n_b): the similarity tiles' row bests
  int32_t* part_idx;  // batch * n_a * column_tiles(n_b)
  int32_t* node_key;  // batch * n_a (written by best_match_kernel only)
  int32_t* node_idx;  // batch * n_a
  uint8_t* merged;    // batch * n_a
  int32_t* unmerged;  // batch * (n_a - r)
};

// out: (batch, n - r, d) TX, out_size: (batch, n - r) float32. x, metric contiguous; size:
// (batch, n) float32. Returns the first launch error.
template <typename TX, typename TM>
void bipartite_merge_chunk(int64_t batch, int64_t n, int64_t d, int64_t c, int64_t r, bool protect_first,
                           const TX* x, const TM* metric, const float* size, TX* out, float* out_size,
                           const BipartiteScratch& s, cudaStream_t stream) {
  const int64_t n_a = (n + 1) / 2, n_b = n / 2;
  const int64_t tiles = column_tiles(n_b);
  RowMap a_rows, b_rows;  // set A: even positions, set B: odd positions
  a_rows.step = 2;
  b_rows.step = 2;
  b_rows.offset = 1;
  SimilarityOut sim{};
  sim.epilogue = SimilarityEpilogue::kRowBest;
  sim.cosine = true;
  sim.part_key = s.part_key;
  sim.part_idx = s.part_idx;
  const LaunchPlan plan = bipartite_merge_plan(batch, n, r);
  for (int i = 0; i < plan.count; ++i) {
    const Launch& l = plan.launch[i];
    const dim3 grid = grid_of(l);
    const unsigned threads = static_cast<unsigned>(l.threads);
    const size_t smem = static_cast<size_t>(l.dynamic_smem);
    switch (l.kernel) {
      case MergeKernel::kSimilarity:
        similarity_kernel<TM><<<grid, threads, smem, stream>>>(metric, a_rows, metric, b_rows, n, c, n_a, n_b, sim);
        break;
      case MergeKernel::kBestMatch:
        best_match_kernel<<<grid, threads, smem, stream>>>(s.part_key, s.part_idx, n_a, tiles, s.node_key,
                                                           s.node_idx);
        break;
      case MergeKernel::kEdgeSelect:
        edge_select_kernel<<<grid, threads, smem, stream>>>(s.part_key, s.part_idx, tiles, edge_select_reduces(n),
                                                            s.node_key, s.node_idx, size, n, n_a, r, protect_first,
                                                            s.merged, s.unmerged, s.invalid);
        break;
      case MergeKernel::kBipartiteOutput:
        bipartite_output_kernel<TX><<<grid, threads, smem, stream>>>(x, size, s.merged, s.node_idx, s.unmerged,
                                                                     s.invalid, bipartite_flag_tiles(n), n, d, n_a,
                                                                     r, out, out_size);
        break;
      default:
        break;  // not a bipartite_merge kernel
    }
  }
}

template <typename TX, typename TM>
cudaError_t bipartite_merge(int64_t batch, int64_t n, int64_t d, int64_t c, int64_t r, bool protect_first,
                            const TX* x, const TM* metric, const float* size, TX* out, float* out_size,
                            const BipartiteScratch& s, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (n > kMaxTokens) return cudaErrorInvalidValue;
  const int64_t n_a = (n + 1) / 2, n_b = n / 2;
  const int64_t partials = n_a * column_tiles(n_b);
  const int64_t chunk = batch_per_launch(n);
  for (int64_t b0 = 0; b0 < batch; b0 += chunk) {
    const int64_t nb = batch - b0 < chunk ? batch - b0 : chunk;
    const BipartiteScratch sc{s.invalid + b0 * bipartite_flag_tiles(n), s.part_key + b0 * partials,
                              s.part_idx + b0 * partials,                s.node_key + b0 * n_a,
                              s.node_idx + b0 * n_a,                     s.merged + b0 * n_a,
                              s.unmerged + b0 * (n_a - r)};
    bipartite_merge_chunk<TX, TM>(nb, n, d, c, r, protect_first, x + b0 * n * d, metric + b0 * n * c, size + b0 * n,
                                  out + b0 * (n - r) * d, out_size + b0 * (n - r), sc, stream);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace tokenkern
