#!/usr/bin/env bash
# Compile-checks every CUDA source with nvcc, warnings as errors, for each architecture in
# $CUDA_ARCHS (default "80 90"), on a machine without a GPU:
#   - the torch-free kernels (csrc/cuda/*.cuh, through their instantiations in
#     csrc/cuda/*_kernels.cu) via CMake;
#   - the torch glue (csrc/cuda/*_cuda.cu) with -c against the installed torch's headers.
#     A CPU build of torch lacks the generated c10/cuda/impl/cuda_cmake_macros.h; a stand-in
#     with the same content is provided so the glue can be parsed and compiled (not linked).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
ARCHS=${CUDA_ARCHS:-"80 90"}
if [ ! -x "$NVCC" ]; then
  echo "check-cuda: nvcc not found (set NVCC=...); CUDA sources NOT compile-checked" >&2
  exit 0
fi
glue=$(ls csrc/cuda/*_cuda.cu 2>/dev/null || true)
kernels=$(ls csrc/cuda/*_kernels.cu 2>/dev/null || true)
if [ -z "$kernels" ] && [ -z "$glue" ]; then
  echo "check-cuda: no CUDA sources"
  exit 0
fi
build=build/check-cuda
mkdir -p "$build"
if [ -n "$kernels" ]; then
  cmake -S . -B "$build/cmake" -DCMAKE_CUDA_COMPILER="$NVCC" -DTOKENKERN_REQUIRE_CUDA=ON \
    -DTOKENKERN_BUILD_TESTS=OFF -DCMAKE_CUDA_ARCHITECTURES="${ARCHS// /;}" >/dev/null
  cmake --build "$build/cmake" -j2
fi
if [ -n "$glue" ]; then
  torch_inc=$($PY -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-isystem ' + p for p in include_paths()))")
  py_inc=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  shim="$build/shim"
  mkdir -p "$shim/c10/cuda/impl"
  if ! $PY -c "import torch, os, sys; sys.exit(not os.path.exists(os.path.join(os.path.dirname(torch.__file__), 'include/c10/cuda/impl/cuda_cmake_macros.h')))"; then
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$shim/c10/cuda/impl/cuda_cmake_macros.h"
  fi
  for src in $glue; do
    for arch in $ARCHS; do
      echo "check-cuda: $src (sm_$arch)"
      "$NVCC" -c "$src" -o "$build/$(basename "$src" .cu).sm_$arch.o" -std=c++20 \
        -gencode "arch=compute_$arch,code=sm_$arch" --expt-relaxed-constexpr \
        -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=1 \
        -Icsrc -isystem "$shim" $torch_inc -isystem "$py_inc" \
        --Werror all-warnings -Xcompiler=-Wall,-Wextra,-Wno-unused-parameter,-Werror
    done
  done
fi
echo "check-cuda: OK"
