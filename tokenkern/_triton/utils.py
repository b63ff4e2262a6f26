"""Helpers shared by the Triton launchers."""

from __future__ import annotations

import os

import torch


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
