"""CPU kernels written in torch (the C++ CPU kernels live in csrc/cpu)."""
