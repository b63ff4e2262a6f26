"""The specification: a plain-torch definition of every op, written for clarity and run in
float64 by the tests (their oracle). Nothing here is fast."""

from __future__ import annotations

import torch
from torch import Tensor


def topk_gather(scores: Tensor, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """scores: (B, N), x: (B, N, D) -> kept (B, k, D), indices (B, k) int64.

    The k highest scores per row; ties go to the lower index; NaN ranks as -inf; indices are
    returned ascending and ``kept[b, j] = x[b, indices[b, j]]``."""
    key = scores.double()
    key = torch.where(torch.isnan(key), float("-inf"), key)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :k]
    indices = order.sort(dim=-1).values
    kept = x.gather(1, indices[..., None].expand(-1, -1, x.shape[-1]))
    return kept, indices


def leverage_scores(x: Tensor, rank: int = 32, oversample: int = 8, power_iters: int = 2, seed: int = 0) -> Tensor:
    """x: (B, N, D) -> (B, N) float64: ``||U_r[i, :]||^2`` for the top-r left singular
    vectors U_r of x[b], r = min(rank, N, D). Exact SVD; the sketch arguments are accepted
    for signature parity and ignored."""
    x64 = x.double()
    r = min(rank, x.shape[-2], x.shape[-1])
    u = torch.linalg.svd(x64, full_matrices=False).U[..., :r]
    return (u * u).sum(-1)


def leverage_topk(
    x: Tensor, k: int, rank: int = 32, oversample: int = 8, power_iters: int = 2, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact leverage scores, then topk_gather: (kept (B, k, D), indices (B, k), scores (B, N))."""
    scores = leverage_scores(x, rank)
    kept, indices = topk_gather(scores, x, k)
    return kept, indices, scores
