"""Triton kernels and their launchers (the CUDA path of the Python-registered ops).

Each launcher works on any device Triton can run on: CUDA tensors on a GPU, and CPU
tensors under ``TRITON_INTERPRET=1`` (that is how the tests run these kernels on CPU).
"""
