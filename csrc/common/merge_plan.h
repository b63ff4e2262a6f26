// Launch plan of the merge kernels (csrc/cuda/merge_kernels.cuh): which kernels one launch
// chunk of merge_tokens / bipartite_merge runs, in order, with their grids and block sizes.
// Host-only, torch-free and CUDA-free: the CUDA launchers launch exactly these rows, and the
// CPU op tokenkern::_merge_launch_plan (csrc/cpu/merge_plan_cpu.cpp) returns them to the static
// kernel report (tokenkern/kernel_report/cuda_report.py), so grids are stated once, here.
#pragma once

#include <cstdint>

#include "common/merge_math.h"

namespace tokenkern {
namespace cuda {

constexpr int kThreads = 256;  // every merge kernel runs 256-thread blocks (the block scans assume it)
constexpr int kWarp = 32;
constexpr int kTileM = 64, kTileN = 64;  // similarity tile: chooser rows x candidate columns

// Grid limits: axis x 2^31 - 1 blocks, axes y and z 65535.
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;
// Largest token count N: the similarity tiles of one sample span grid axis y (up to N rows of
// kTileM). The launchers return cudaErrorInvalidValue above it (the torch glue raises first).
constexpr int64_t kMaxTokens = kMaxGridYZ * kTileM;

inline int64_t blocks_for(int64_t items, int64_t per_block) { return (items + per_block - 1) / per_block; }

// Samples per launch: the batch sits on grid axis y or z. Larger batches run in chunks.
inline int64_t batch_per_launch(int64_t /*n*/) { return kMaxGridYZ; }

// Launch chunks of a call over `batch` samples of n tokens.
inline int64_t launch_chunks(int64_t batch, int64_t n) { return blocks_for(batch, batch_per_launch(n)); }

struct MergeTokensProblem {
  int64_t batch, n, d, k, c, topm;
  float temperature;
  Combine combine;
  bool kept_mode, cosine;
  // Chooser rows: the dropped tokens (dropped mode) or the kept tokens (kept mode).
  int64_t chooser_rows() const { return kept_mode ? k : n - k; }
  // Candidates: the kept tokens (dropped mode) or every token (kept mode).
  int64_t candidates() const { return kept_mode ? n : k; }
};

// Every kernel of merge_kernels.cuh; the ids are part of the _merge_launch_plan op's output.
enum class MergeKernel : int32_t {
  kPrepare = 0,
  kSimilarity = 1,
  kSelectTargets = 2,
  kMergeReduce = 3,
  kBestMatch = 4,
  kEdgeSelect = 5,
  kBipartiteOutput = 6,
};
constexpr int kMergeKernelCount = 7;

inline const char* merge_kernel_name(MergeKernel k) {
  switch (k) {
    case MergeKernel::kPrepare: return "merge_prepare_kernel";
    case MergeKernel::kSimilarity: return "similarity_kernel";
    case MergeKernel::kSelectTargets: return "select_targets_kernel";
    case MergeKernel::kMergeReduce: return "merge_reduce_kernel";
    case MergeKernel::kBestMatch: return "best_match_kernel";
    case MergeKernel::kEdgeSelect: return "edge_select_kernel";
    case MergeKernel::kBipartiteOutput: return "bipartite_output_kernel";
  }
  return "?";
}

// Invalid-input flags: merge_prepare_kernel (merge_tokens' first launch) and edge_select_kernel
// (bipartite_merge's, before the output kernel, the only reader) check the values of a tile of
// kThreads tokens (A tokens for bipartite_merge) per CTA and write one flag per (sample, tile),
// every flag unconditionally, so the buffer needs no zero fill; the kernels launched after them
// OR a sample's flags. Flags per sample:
inline int64_t merge_tokens_flag_tiles(int64_t n) { return blocks_for(n, kThreads); }
inline int64_t bipartite_flag_tiles(int64_t n) { return blocks_for((n + 1) / 2, kThreads); }

struct Launch {
  MergeKernel kernel;
  int64_t grid[3];
  int64_t threads;
  int64_t dynamic_smem;  // bytes
};

// Most launches of one chunk of either op (merge_tokens with topm > 1; bipartite_merge when
// edge_select_kernel does not reduce the similarity partials itself).
constexpr int kMaxMergeLaunches = 4;

struct LaunchPlan {
  Launch launch[kMaxMergeLaunches] = {};
  int count = 0;
  void add(MergeKernel kernel, int64_t x, int64_t y = 1, int64_t z = 1) {
    launch[count++] = Launch{kernel, {x, y, z}, kThreads, 0};
  }
};

// The similarity tiles' epilogue (similarity_kernel): the cosine normalization (row norms summed
// from the staged tiles: no norm kernel) and then
//   kStore:      the (normalized) similarity matrix, for select_targets_kernel (topm > 1);
//   kRowBest:    each tile row's best column (order key, index; ties to the lower index) as one
//                partial per (row, column tile), reduced by edge_select_kernel (bipartite_merge);
//   kSelectBest: kRowBest, then the last tile of each row block to arrive (arrival counters
//                zeroed by merge_prepare_kernel) reduces its rows' partials into the targets and
//                coefficients: merge_tokens with topm = 1 runs no select_targets_kernel.
enum class SimilarityEpilogue : int32_t { kStore = 0, kRowBest = 1, kSelectBest = 2 };

inline SimilarityEpilogue merge_tokens_epilogue(const MergeTokensProblem& p) {
  return p.topm == 1 ? SimilarityEpilogue::kSelectBest : SimilarityEpilogue::kStore;
}

// Column tiles of a similarity matrix with `cols` columns: the partials per row of kRowBest.
inline int64_t column_tiles(int64_t cols) { return blocks_for(cols, kTileN); }

// bipartite node keys of a sample that edge_select_kernel holds in shared memory (above it, it
// reads them from global memory).
constexpr int64_t kKeyTile = 4096;
// Every CTA of edge_select_kernel needs all of its sample's node keys: it reduces the similarity
// tiles' partials itself (one launch fewer) when they fit in shared memory and are at most this
// many per sample (at most 256 per thread, each CTA reading all of them); else
// best_match_kernel reduces each A token's partials once first.
constexpr int64_t kEdgeReducePartials = int64_t{1} << 16;

inline bool edge_select_reduces(int64_t n) {
  const int64_t n_a = (n + 1) / 2, n_b = n / 2;
  return n_a <= kKeyTile && n_a * column_tiles(n_b) <= kEdgeReducePartials;
}

// Elements per sample of merge_tokens' epilogue-dependent scratch (0 where the epilogue needs none):
// the similarity matrix (kStore), the row-best partials and the arrival counters (kSelectBest).
inline int64_t merge_tokens_sims_per_sample(const MergeTokensProblem& p) {
  return merge_tokens_epilogue(p) == SimilarityEpilogue::kStore ? p.chooser_rows() * p.candidates() : 0;
}
inline int64_t merge_tokens_partials_per_sample(const MergeTokensProblem& p) {
  return merge_tokens_epilogue(p) == SimilarityEpilogue::kSelectBest ? p.chooser_rows() * column_tiles(p.candidates())
                                                                      : 0;
}
inline int64_t merge_tokens_counters_per_sample(const MergeTokensProblem& p) {
  return merge_tokens_epilogue(p) == SimilarityEpilogue::kSelectBest ? blocks_for(p.chooser_rows(), kTileM) : 0;
}

// One chunk of merge_tokens (p.batch samples, at most batch_per_launch(p.n)).
inline LaunchPlan merge_tokens_plan(const MergeTokensProblem& p) {
  LaunchPlan plan;
  const int64_t rows_c = p.chooser_rows(), cols_c = p.candidates();
  plan.add(MergeKernel::kPrepare, merge_tokens_flag_tiles(p.n), p.batch);
  if (rows_c > 0) {
    plan.add(MergeKernel::kSimilarity, column_tiles(cols_c), blocks_for(rows_c, kTileM), p.batch);
    if (merge_tokens_epilogue(p) == SimilarityEpilogue::kStore) {
      plan.add(MergeKernel::kSelectTargets, blocks_for(rows_c * kWarp, kThreads), p.batch);
    }
  }
  plan.add(MergeKernel::kMergeReduce, p.k, p.batch);
  return plan;
}

// One chunk of bipartite_merge: `batch` samples of n tokens, r of the n_a = ceil(n / 2)
// even-position tokens merged into the n_b = floor(n / 2) odd-position ones.
inline LaunchPlan bipartite_merge_plan(int64_t batch, int64_t n, int64_t r) {
  LaunchPlan plan;
  const int64_t n_a = (n + 1) / 2, n_b = n / 2;
  if (n_b > 0) {
    plan.add(MergeKernel::kSimilarity, column_tiles(n_b), blocks_for(n_a, kTileM), batch);
    if (!edge_select_reduces(n)) plan.add(MergeKernel::kBestMatch, blocks_for(n_a, kThreads), batch);
  }
  plan.add(MergeKernel::kEdgeSelect, bipartite_flag_tiles(n), batch);
  plan.add(MergeKernel::kBipartiteOutput, n - r, batch);
  return plan;
}

}  // namespace cuda
}  // namespace tokenkern
