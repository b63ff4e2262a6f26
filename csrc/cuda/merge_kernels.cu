// Explicit instantiations of the merge launchers of merge_kernels.cuh for every supported
// (x, metric) dtype pair: the merge part of the torch-free kernel library (CMake target
// tokenkern_kernels, built from csrc/cuda/*_kernels.cu) for C++/CUDA users who link it. The
// Python extension does not compile this file (its glue, merge_cuda.cu, instantiates what it uses).
#include "cuda/merge_kernels.cuh"

namespace tokenkern {
namespace cuda {

#define TOKENKERN_INSTANTIATE_MERGE(TX, TM)                                                                          \
  template cudaError_t merge_tokens<TX, TM>(const MergeTokensProblem&, const TX*, const int64_t*, const TM*,         \
                                            const TM*, const float*, TX*, float*, const MergeTokensScratch&,         \
                                            cudaStream_t);                                                           \
  template cudaError_t bipartite_merge<TX, TM>(int64_t, int64_t, int64_t, int64_t, int64_t, bool, const TX*,         \
                                               const TM*, const float*, TX*, float*, const BipartiteScratch&,        \
                                               cudaStream_t);

#define TOKENKERN_INSTANTIATE_MERGE_X(TX)      \
  TOKENKERN_INSTANTIATE_MERGE(TX, float)       \
  TOKENKERN_INSTANTIATE_MERGE(TX, __half)      \
  TOKENKERN_INSTANTIATE_MERGE(TX, __nv_bfloat16)

TOKENKERN_INSTANTIATE_MERGE_X(float)
TOKENKERN_INSTANTIATE_MERGE_X(__half)
TOKENKERN_INSTANTIATE_MERGE_X(__nv_bfloat16)

#undef TOKENKERN_INSTANTIATE_MERGE_X
#undef TOKENKERN_INSTANTIATE_MERGE

}  // namespace cuda
}  // namespace tokenkern
