"""Argument checks shared by every face of an op (fake, CPU and CUDA kernels), so that a
bad call fails the same way, with a message naming the argument, wherever it runs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fail(op: str, message: str) -> None:
    raise ValueError(f"tokenkern.{op}: {message}")


def tensor(op: str, name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value  # type: ignore[return-value]


def ndim(op: str, name: str, t: torch.Tensor, dims: int, layout: str) -> None:
    if t.dim() != dims:
        fail(op, f"{name} must be {layout}, got shape {tuple(t.shape)}")


def dtype(op: str, name: str, t: torch.Tensor, allowed: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    if t.dtype not in allowed:
        names = " or ".join(dtype_name(d) for d in allowed)
        fail(op, f"{name} must have dtype {names}, got {dtype_name(t.dtype)}")


def dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def same_device(op: str, named: Sequence[tuple[str, torch.Tensor | None]]) -> None:
    present = [(n, t) for n, t in named if t is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            fail(op, f"{name} is on {t.device} but {first_name} is on {first.device}")


def int_range(op: str, name: str, value: int, lo: int, hi: int | None = None, what: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        fail(op, f"{name} must be an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        fail(op, f"{name} must be {bound}{what}, got {value}")


def tokens(op: str, name: str, x: object) -> torch.Tensor:
    """A (B, N, D) float32/float16/bfloat16 token matrix with N, D >= 1."""
    x = tensor(op, name, x)
    ndim(op, name, x, 3, "(B, N, D)")
    dtype(op, name, x)
    if x.shape[1] < 1 or x.shape[2] < 1:
        fail(op, f"{name} must have N >= 1 tokens and D >= 1 features, got shape {tuple(x.shape)}")
    return x


def svd_sketch(op: str, n: int, d: int, rank: int, oversample: int, power_iters: int, seed: int) -> tuple[int, int]:
    """Checks the randomized-SVD arguments; returns (r, l): the rank kept and the sketch width."""
    int_range(op, "rank", rank, 1)
    int_range(op, "oversample", oversample, 0)
    int_range(op, "power_iters", power_iters, 0)
    int_range(op, "seed", seed, 0, 2**63 - 1)
    r = min(rank, n, d)
    return r, min(r + oversample, n, d)


def topk_gather(scores: object, x: object, k: int) -> None:
    op = "topk_gather"
    scores = tensor(op, "scores", scores)
    x = tensor(op, "x", x)
    ndim(op, "scores", scores, 2, "(B, N)")
    ndim(op, "x", x, 3, "(B, N, D)")
    dtype(op, "scores", scores, (torch.float32,))
    if not x.dtype.is_floating_point:
        fail(op, f"x must be a floating tensor, got {dtype_name(x.dtype)}")
    same_device(op, [("scores", scores), ("x", x)])
    if tuple(scores.shape) != tuple(x.shape[:2]):
        fail(op, f"scores (B, N) must match x's first two dimensions, got {tuple(scores.shape)} and {tuple(x.shape)}")
    int_range(op, "k", k, 1, x.shape[1], " (1 <= k <= N)")
