"""Helpers shared by the Triton launchers."""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl  # noqa: F401  (the jit functions below need it in scope)

# CUDA allows 2^31 - 1 programs on grid axis 0 but only 65535 on axes 1 and 2, so every
# launcher flattens its (tile, head, batch, ...) grid onto axis 0.
MAX_PROGRAMS = 2**31 - 1


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def poison_outputs() -> bool:
    """When TOKENKERN_POISON=1, outputs start as NaN (or -1 for integers), so that a test
    catches any element a kernel forgot to write."""
    return os.environ.get("TOKENKERN_POISON", "0") == "1"


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if poison_outputs():
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out


def split_dtype(dtype: torch.dtype) -> bool:
    """Whether a 16-bit operand is multiplied against a float32 one as hi + lo halves
    (two tensor-core products with float32 accumulation keep ~16-22 bits of the float32
    operand) instead of upcasting the 16-bit operand."""
    return dtype in (torch.float16, torch.bfloat16)


def flat_grid(op: str, *sizes: int) -> tuple[int]:
    """The 1-D launch grid of prod(sizes) programs; the kernel recovers each index with
    :func:`unflatten2` / :func:`unflatten3` (sizes[0] varies fastest)."""
    total = math.prod(int(n) for n in sizes)
    if total > MAX_PROGRAMS:
        raise ValueError(
            f"tokenkern.{op}: the launch grid must have at most {MAX_PROGRAMS} programs "
            f"(fewer batch elements or tiles), got {' x '.join(str(n) for n in sizes)} = {total}"
        )
    return (total,)


@triton.jit
def unflatten2(pid, n0):
    """(i0, i1) of program pid in a flat grid of n0 x n1 programs."""
    return pid % n0, pid // n0


@triton.jit
def unflatten3(pid, n0, n1):
    """(i0, i1, i2) of program pid in a flat grid of n0 x n1 x n2 programs."""
    rest = pid // n0
    return pid % n0, rest % n1, rest // n1
