// TOKENKERN_HD marks the inline math that both the CPU ops and the CUDA kernels compile.
#pragma once

#if defined(__CUDACC__)
#define TOKENKERN_HD __host__ __device__ __forceinline__
#else
#define TOKENKERN_HD inline
#endif
