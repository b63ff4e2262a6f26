"""Builds tokenkern._C: the C++ CPU ops always, the CUDA ops when torch is a CUDA build
and nvcc is found.

Environment:
  TOKENKERN_FORCE_CUDA=1   build the CUDA ops even if detection says no
  TOKENKERN_SKIP_CUDA=1    never build the CUDA ops
  TORCH_CUDA_ARCH_LIST     architectures to build for (default "8.0;9.0+PTX")
  TOKENKERN_DEBUG=1        -O0 -g
"""

from __future__ import annotations

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


def want_cuda() -> bool:
    if _flag("TOKENKERN_SKIP_CUDA"):
        return False
    if _flag("TOKENKERN_FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def get_extensions():
    debug = _flag("TOKENKERN_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # torch >= 2.6 can be used through the limited Python API (torch/library.h only).
    limited = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 6)
    cxx = [*opt, "-std=c++20", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    if limited:
        cxx.append("-DPy_LIMITED_API=0x030A0000")
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    sources += sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, CSRC)]

    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        # The torch glue; csrc/cuda/*_kernels.cu only instantiate the kernels for CMake users.
        sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*_cuda.cu")))
        ext = CUDAExtension(
            "tokenkern._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("TOKENKERN_WITH_CUDA", "1")],  # read by csrc/tokenkern.cpp: _C.WITH_CUDA
            extra_compile_args={
                "cxx": cxx,
                "nvcc": [*opt, "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"],
            },
            py_limited_api=limited,
        )
    else:
        ext = CppExtension(
            "tokenkern._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            py_limited_api=limited,
        )
    return [ext], limited


ext_modules, limited = get_extensions()

setup(
    packages=find_packages(include=["tokenkern", "tokenkern.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if limited else {},
)
