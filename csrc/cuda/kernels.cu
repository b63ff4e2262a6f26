// The torch-free kernel library (CMake target tokenkern_kernels): explicit instantiations of
// the launchers for every supported (x, metric) dtype pair, for C++/CUDA users who link it.
#include "cuda/merge_kernels.cuh"

namespace tokenkern {
namespace cuda {

#define TOKENKERN_INSTANTIATE(TX, TM)                                                                          \
  template cudaError_t merge_tokens<TX, TM>(const MergeTokensProblem&, const TX*, const int64_t*, const TM*,    \
                                            const TM*, const float*, TX*, float*, const MergeTokensScratch&,     \
                                            cudaStream_t);                                                       \
  template cudaError_t bipartite_merge<TX, TM>(int64_t, int64_t, int64_t, int64_t, int64_t, bool, const TX*,     \
                                               const TM*, const float*, TX*, float*, const BipartiteScratch&,    \
                                               cudaStream_t);

#define TOKENKERN_INSTANTIATE_X(TX)      \
  TOKENKERN_INSTANTIATE(TX, float)       \
  TOKENKERN_INSTANTIATE(TX, __half)      \
  TOKENKERN_INSTANTIATE(TX, __nv_bfloat16)

TOKENKERN_INSTANTIATE_X(float)
TOKENKERN_INSTANTIATE_X(__half)
TOKENKERN_INSTANTIATE_X(__nv_bfloat16)

#undef TOKENKERN_INSTANTIATE_X
#undef TOKENKERN_INSTANTIATE

}  // namespace cuda
}  // namespace tokenkern
