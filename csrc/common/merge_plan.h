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

// Samples per launch: the batch sits on grid axis y or z, and inverse_norm_kernel puts one
// warp per token of the chunk on axis x. Larger batches run in chunks.
inline int64_t batch_per_launch(int64_t n) {
  const int64_t by_x = kMaxGridX / blocks_for((n > 0 ? n : 1) * kWarp, kThreads);
  return by_x < kMaxGridYZ ? (by_x > 0 ? by_x : 1) : kMaxGridYZ;
}

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
  kInverseNorm = 1,
  kSimilarity = 2,
  kSelectTargets = 3,
  kMergeReduce = 4,
  kBestMatch = 5,
  kEdgeSelect = 6,
  kBipartiteOutput = 7,
};
constexpr int kMergeKernelCount = 8;

inline const char* merge_kernel_name(MergeKernel k) {
  switch (k) {
    case MergeKernel::kPrepare: return "merge_prepare_kernel";
    case MergeKernel::kInverseNorm: return "inverse_norm_kernel";
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

// Most launches of one chunk of either op.
constexpr int kMaxMergeLaunches = 5;

struct LaunchPlan {
  Launch launch[kMaxMergeLaunches] = {};
  int count = 0;
  void add(MergeKernel kernel, int64_t x, int64_t y = 1, int64_t z = 1) {
    launch[count++] = Launch{kernel, {x, y, z}, kThreads, 0};
  }
};

// One chunk of merge_tokens (p.batch samples, at most batch_per_launch(p.n)).
inline LaunchPlan merge_tokens_plan(const MergeTokensProblem& p) {
  LaunchPlan plan;
  const int64_t rows_c = p.chooser_rows(), cols_c = p.candidates();
  plan.add(MergeKernel::kPrepare, merge_tokens_flag_tiles(p.n), p.batch);
  if (p.cosine) plan.add(MergeKernel::kInverseNorm, blocks_for(p.batch * p.n * kWarp, kThreads));
  if (rows_c > 0) {
    plan.add(MergeKernel::kSimilarity, blocks_for(cols_c, kTileN), blocks_for(rows_c, kTileM), p.batch);
    plan.add(MergeKernel::kSelectTargets, blocks_for(rows_c * kWarp, kThreads), p.batch);
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
    plan.add(MergeKernel::kInverseNorm, blocks_for(batch * n * kWarp, kThreads));
    plan.add(MergeKernel::kSimilarity, blocks_for(n_b, kTileN), blocks_for(n_a, kTileM), batch);
    plan.add(MergeKernel::kBestMatch, blocks_for(n_a * kWarp, kThreads), batch);
  }
  plan.add(MergeKernel::kEdgeSelect, bipartite_flag_tiles(n), batch);
  plan.add(MergeKernel::kBipartiteOutput, n - r, batch);
  return plan;
}

}  // namespace cuda
}  // namespace tokenkern
