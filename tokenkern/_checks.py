"""Argument checks shared by every face of an op (fake, CPU and CUDA kernels), so that a
bad call fails the same way, with a message naming the argument, wherever it runs."""

from __future__ import annotations

import math
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


REDUCTIONS = ("mean", "sum")


def attention(
    op: str,
    q: object,
    k: object,
    lse: object,
    scale: float | None,
    key_start: int,
    key_end: int,
    query_mask: object,
    key_mask: object,
    causal: bool,
    reduce: str,
) -> tuple[int, float]:
    """Checks the attention-score arguments; returns (key_end resolved, scale resolved)."""
    q = tensor(op, "q", q)
    k = tensor(op, "k", k)
    ndim(op, "q", q, 4, "(B, Hq, Nq, d)")
    ndim(op, "k", k, 4, "(B, Hkv, Nk, d)")
    dtype(op, "q", q)
    if k.dtype != q.dtype:
        fail(op, f"k must have q's dtype {dtype_name(q.dtype)}, got {dtype_name(k.dtype)}")
    b, hq, nq, d = q.shape
    kb, hkv, nk, kd = k.shape
    if kb != b:
        fail(op, f"k has batch size {kb} but q has {b}")
    if kd != d:
        fail(op, f"k has head dim {kd} but q has {d}")
    if not 1 <= d <= 256:
        fail(op, f"head dim d must be in [1, 256], got {d}")
    if hkv < 1 or hq % hkv != 0:
        fail(op, f"query heads Hq={hq} must be a multiple of key heads Hkv={hkv}")
    if nq < 1 or nk < 1:
        fail(op, f"q and k need at least one position each, got Nq={nq}, Nk={nk}")
    same_device(op, [("q", q), ("k", k), ("lse", lse), ("query_mask", query_mask), ("key_mask", key_mask)])
    if lse is not None:
        lse = tensor(op, "lse", lse)
        if tuple(lse.shape) != (b, hq, nq):
            fail(op, f"lse must be (B, Hq, Nq) = {(b, hq, nq)}, got {tuple(lse.shape)}")
        dtype(op, "lse", lse, (torch.float32,))
    for name, mask, n in (("query_mask", query_mask, nq), ("key_mask", key_mask, nk)):
        if mask is None:
            continue
        mask = tensor(op, name, mask)
        if tuple(mask.shape) != (b, n):
            layout = "(B, Nq)" if name == "query_mask" else "(B, Nk)"
            fail(op, f"{name} must be {layout} = {(b, n)}, got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            fail(op, f"{name} must have dtype bool, got {dtype_name(mask.dtype)}")
    int_range(op, "key_start", key_start, 0, nk - 1, f" (0 <= key_start < Nk={nk})")
    end = nk if key_end == -1 else key_end
    if not isinstance(key_end, int) or not key_start < end <= nk:
        fail(op, f"key_end must be -1 or in ({key_start}, {nk}] (key_start < key_end <= Nk), got {key_end}")
    if scale is not None and not (isinstance(scale, float | int) and math.isfinite(scale)):
        fail(op, f"scale must be a finite number or None, got {scale!r}")
    if reduce not in REDUCTIONS:
        fail(op, f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    return end, (d**-0.5 if scale is None else float(scale))


def keep_count(op: str, name: str, value: int, n: int) -> None:
    int_range(op, name, value, 1, n, f" (1 <= {name} <= {n})")
