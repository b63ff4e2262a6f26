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


def attn_scores(
    q: Tensor,
    k: Tensor,
    lse: Tensor | None = None,
    scale: float | None = None,
    key_start: int = 0,
    key_end: int = -1,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
    causal: bool = False,
    reduce: str = "mean",
) -> Tensor:
    """Attention mass each key receives, from the materialized float64 softmax.

    q: (B, Hq, Nq, d), k: (B, Hkv, Nk, d), query head h reads key head h // (Hq / Hkv).
    Key j is visible to query i when key_mask[b, j] and, if causal, j <= Nk - Nq + i (the
    queries are the last Nq positions). ``P[b, h, i] = softmax(scale * q[b, h, i] . k^T)`` over
    the visible keys (``exp(scale * q.k - lse)`` when lse is given). A query is valid when
    query_mask[b, i] and it sees at least one key; invalid queries contribute nothing.
    ``scores[b, j - key_start] = sum_h sum_{valid i} P[b, h, i, j]``, divided by
    Hq * (number of valid queries of b) for reduce="mean" (0 when there are none).
    Returns (B, key_end - key_start); key_end = -1 means Nk."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    key_end = nk if key_end == -1 else key_end
    scale = d**-0.5 if scale is None else scale
    kk = k.double().repeat_interleave(hq // hkv, dim=1)
    logits = (q.double() @ kk.mT) * scale
    i = torch.arange(nq)[:, None]
    j = torch.arange(nk)[None, :]
    vis = torch.ones(b, 1, nq, nk, dtype=torch.bool)
    if key_mask is not None:
        vis = vis & key_mask.cpu()[:, None, None, :]
    if causal:
        vis = vis & (j <= nk - nq + i)
    valid = vis.any(dim=-1)
    if query_mask is not None:
        valid = valid & query_mask.cpu()[:, None, :]
    logits = logits.cpu().masked_fill(~vis, float("-inf"))
    if lse is None:
        p = torch.softmax(logits, dim=-1)
    else:
        p = torch.exp(logits - lse.double().cpu()[..., None])
    p = torch.where(vis & valid[..., None], p, 0.0)
    scores = p.sum(dim=(1, 2))
    if reduce == "mean":
        scores = scores / (hq * valid.sum(dim=(1, 2))).clamp(min=1)[:, None]
    return scores[:, key_start:key_end]


def attn_lse(q: Tensor, k: Tensor, scale: float | None = None, key_mask: Tensor | None = None, causal: bool = False):
    """Natural-log log-sum-exp of ``scale * q.k`` over the visible keys, (B, Hq, Nq) float64
    (-inf for a query that sees no key): the ``lse`` the attention ops accept."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    logits = (q.double() @ k.double().repeat_interleave(hq // hkv, dim=1).mT).cpu() * scale
    vis = torch.ones(b, 1, nq, nk, dtype=torch.bool)
    if key_mask is not None:
        vis = vis & key_mask.cpu()[:, None, None, :]
    if causal:
        vis = vis & (torch.arange(nk)[None, :] <= nk - nq + torch.arange(nq)[:, None])
    return torch.logsumexp(logits.masked_fill(~vis, float("-inf")), dim=-1)


def attn_topk(q: Tensor, k: Tensor, x: Tensor, n_keep: int, **kwargs) -> tuple[Tensor, Tensor, Tensor]:
    """attn_scores over the slice [key_start, key_end), then topk_gather over x, whose rows are
    the keys of that slice: x (B, key_end - key_start, D). Indices are relative to key_start."""
    scores = attn_scores(q, k, **kwargs)
    kept, indices = topk_gather(scores, x, n_keep)
    return kept, indices, scores
