"""LLaVA-PruMerge+ in the vision tower before the projector, batched and without host sync.

Rule (the released PruMerge+ code, per image of N patches):

1. Attention: the [CLS] row of the scoring layer (PruMerge: the last CLIP layer, whose q/k it
   hooks): one softmax of the full-width products q_cls . k_j / sqrt(C), C = heads x head dim,
   over [CLS] + patches (not a mean of per-head softmaxes); a_j for the N patches.
2. Outliers: the c patches with a_j > Q3 + 1.5 (Q3 - Q1), quartiles linearly interpolated
   (numpy's default percentile method).
3. Uniform samples: positions 0, s, 2s, ... below N - 1 with stride s = (N // c) // 3
   (the released int(int(1 / ratio) / 3), ratio = c / N); those that are not outliers are added.
   The kept set is their union, c + |samples \\ outliers| patches.
4. Merge: every kept patch i adds its `neighbours` (32) most key-similar other patches, kept or
   pruned (cosine of the layer's full-width keys), each weighted by its attention, unnormalized:
   x_i + sum_j a_j x_j (merge_tokens(assign="kept", combine="sum"), weight = neighbours * a
   because the assignment weights are uniform 1 / neighbours).
5. Extra token: sum_j a_j x_j over the pruned patches.

Where the released code is not defined, or fixes what this module generalizes:
* it hard-codes 576 patches (samples below 575) and batch 1 (the quartiles pool the whole
  batch, the concatenation fails for B > 1): here any N (samples below N - 1) and per-sample
  quartiles, counts and strides in a batch;
* it fails with no outlier (1 / 0) or with c > N / 3 (stride 0): here c counts at least one
  (the best-attended patch) and the stride is at least 1;
* it returns the tokens as [outliers by attention, samples, extra]; here (the project's
  convention) ascending positions, the extra token at the last pruned patch's position (one of
  the patches it sums; position N - 1 is never a sample, so usually last);
* at most N - 1 neighbours when N <= 32;
* when the released set covers every patch (small N), the released extra token would be a
  zero vector (a sum over no pruned patch): here there is no extra token, the N patches only.

Count (`keep`): None (the default) is the released adaptive count, c + |samples \\ outliers|
patches plus the extra token; a batch gets the largest count of its samples (this reads one
integer back to the host), and a sample with a smaller count fills up with its next patches by
the order below, so each sample matches the released set exactly at batch 1 (prune() calls
the method per image). A fixed keep (fraction or count, sync-free) gives keep_count(keep, N)
tokens in all, the extra token among them, taking outliers, then samples, then the other
patches, by attention within each group. At keep = N (keep=1.0) every patch is kept and still
adds its neighbours (the merge is PruMerge's token update, applied to every kept token; it is
not a stand-in for pruned tokens), and there is no extra token: the output is not the input
features; neighbours=0 turns the merge off.

samples="lattice" replaces step 3 by the best-attended points of an even a x b lattice of the
count's size (baselines.uniform_positions) and the IQR outliers are not forced to one:
tokenkern's earlier PruMerge+ variant, spatially more even than the released stride.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

import tokenkern

from . import fields
from .base import Reduction, gather_tokens, keep_count
from .baselines import uniform_positions
from .inputs import VisionLayer

METHOD = "prumerge+"
SAMPLES = ("stride", "lattice")


@dataclass
class PruMergeConfig:
    keep: float | int | None = None  # None: the released adaptive count per image
    neighbours: int = 32  # kNN merge size (0: no merge)
    layer: int = -1  # CLIP layer whose q/k score the patches (the paper: the last)
    extra_token: bool = True  # the released extra token (attention-weighted sum of the pruned patches)
    samples: str = "stride"  # "stride": the released uniform samples; "lattice": uniform_positions

    def __post_init__(self) -> None:
        if self.keep is not None:
            fields.keep(METHOD, self.keep)
        fields.integer(METHOD, "neighbours", self.neighbours, lo=0)
        fields.integer(METHOD, "layer", self.layer)
        fields.flag(METHOD, "extra_token", self.extra_token)
        fields.choice(METHOD, "samples", self.samples, SAMPLES)


def quartiles(scores: Tensor) -> tuple[Tensor, Tensor]:
    """scores: (B, N) -> (Q1, Q3), each (B,) float32, linearly interpolated between order
    statistics at (N - 1) p (numpy's default percentile method, its lerp rounding included)."""
    s = scores.float().sort(dim=1).values
    n = s.shape[1]

    def at(p: float) -> Tensor:
        pos = (n - 1) * p
        lo = math.floor(pos)
        hi, t = min(lo + 1, n - 1), pos - lo
        a, b = s[:, lo], s[:, hi]
        return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t

    return at(0.25), at(0.75)


def iqr_outliers(scores: Tensor) -> Tensor:
    """(B, N) bool: scores above Q3 + 1.5 (Q3 - Q1) of their row."""
    q1, q3 = quartiles(scores)
    return scores.float() > (q3 + 1.5 * (q3 - q1))[:, None]


def _descending(scores: Tensor) -> Tensor:
    """(B, N) positions by descending score, NaN last, ties to the lower position."""
    key = torch.where(torch.isnan(scores), float("-inf"), scores.float())
    return torch.sort(key, dim=1, descending=True, stable=True).indices


def _rank(order: Tensor) -> Tensor:
    """The inverse permutation of order (B, N): each position's rank."""
    pos = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, pos)


def released_groups(scores: Tensor) -> tuple[Tensor, Tensor]:
    """scores: (B, N) [CLS] attention -> (outlier (B, N) bool: the c best by score, c >= 1;
    sample (B, N) bool: the released stride samples that are not outliers)."""
    b, n = scores.shape
    c = iqr_outliers(scores).sum(dim=1).clamp(min=1)  # (B,)
    outlier = _rank(_descending(scores)) < c[:, None]
    step = ((n // c) // 3).clamp(min=1)  # (B,)
    pos = torch.arange(n, device=scores.device).expand(b, n)
    sample = (pos % step[:, None] == 0) & (pos < n - 1) & ~outlier
    return outlier, sample


def adaptive_count(scores: Tensor) -> Tensor:
    """The released PruMerge+ patch count per sample, (B,) int64: outliers plus the stride
    samples that are not outliers (the extra token not counted). scores: (B, N) attention."""
    outlier, sample = released_groups(scores)
    return (outlier | sample).sum(dim=1)


def _kept_patches(scores: Tensor, tier: Tensor, k: int) -> Tensor:
    """The k positions first by tier (descending), then by score: (B, k) ascending."""
    by_score = _descending(scores)
    by_tier = torch.sort(tier.gather(1, by_score), dim=1, descending=True, stable=True).indices
    return by_score.gather(1, by_tier)[:, :k].sort(dim=1).values


def _patch_count(cfg: PruMergeConfig, attn: Tensor, n: int) -> tuple[int, bool]:
    """-> (patches kept, whether the extra token takes one more slot)."""
    if cfg.keep is None:
        k = int(adaptive_count(attn).max()) if attn.shape[0] else 1  # the one host read of keep=None
        return k, cfg.extra_token and k < n
    total = keep_count(cfg.keep, n)
    extra = cfg.extra_token and 1 < total < n
    return total - int(extra), extra


def _tiers(attn: Tensor, cfg: PruMergeConfig, k: int) -> Tensor:
    """(B, N) int64 priority: 2 outliers, 1 uniform samples, 0 the rest."""
    if cfg.samples == "stride":
        outlier, sample = released_groups(attn)
        return 2 * outlier.long() + sample.long()
    b, n = attn.shape
    outlier = iqr_outliers(attn)
    uniform = torch.zeros(b, n, dtype=torch.bool, device=attn.device)
    uniform[:, uniform_positions(n, k, attn.device)] = True
    return 2 * outlier.long() + (uniform & ~outlier).long()


def _knn_merge(features: Tensor, layer: VisionLayer, attn: Tensor, keep_idx: Tensor, neighbours: int) -> Tensor:
    """features: (B, N, D), keep_idx: (B, k) -> (B, k, D): x_i + sum over i's neighbours of a_j x_j."""
    nn_k = min(neighbours, features.shape[1] - 1)
    if nn_k < 1:
        return gather_tokens(features, keep_idx)
    merged, _ = tokenkern.merge_tokens(
        features, keep_idx, metric=layer.flat_keys(), weight=nn_k * attn, topm=nn_k,
        combine="sum", assign="kept", validate=False,
    )  # fmt: skip
    return merged


def _add_extra(features: Tensor, attn: Tensor, keep_idx: Tensor, merged: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Adds the extra token at the last pruned position (every row has one).
    -> (indices (B, k + 1) ascending, tokens (B, k + 1, D), extra (B, 1, D))."""
    b, n, _ = features.shape
    pruned = torch.ones(b, n, dtype=torch.bool, device=features.device).scatter_(1, keep_idx, False)
    extra = ((pruned * attn.float())[:, None, :] @ features.float()).to(features.dtype)  # (B, 1, D)
    pos = torch.arange(n, device=features.device).expand(b, n)
    slot = torch.where(pruned, pos, -1).max(dim=1, keepdim=True).values  # (B, 1)
    idx, order = torch.cat([keep_idx, slot], dim=1).sort(dim=1)
    tokens = gather_tokens(torch.cat([merged, extra], dim=1), order)
    return idx, tokens, extra


def prumerge_plus(features: Tensor, layer: VisionLayer, cfg: PruMergeConfig) -> Reduction:
    """features: (B, N, D) patch tokens; layer: the scoring layer (q, k: (B, H, 1 + N, d)).
    -> Reduction of the kept tokens, merged, with the extra token at its slot when there is
    one; ``extra``: that extra token (B, 1, D), or None. See the module docstring for the count."""
    attn = layer.cls_attention_full_width()  # (B, N)
    k, with_extra = _patch_count(cfg, attn, features.shape[1])
    keep_idx = _kept_patches(attn, _tiers(attn, cfg, k), k)
    merged = _knn_merge(features, layer, attn, keep_idx, cfg.neighbours)
    if not with_extra:
        return Reduction(keep_idx, merged, scores=attn)
    idx, tokens, extra = _add_extra(features, attn, keep_idx, merged)
    return Reduction(idx, tokens, scores=attn, extra=extra)
