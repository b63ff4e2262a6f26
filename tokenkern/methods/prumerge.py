"""LLaVA-PruMerge+ in the vision tower before the projector, batched and without host sync.

Rule: the [CLS] attention of the scoring layer (PruMerge: the last CLIP layer, whose q/k it
hooks) ranks the patches; as in the released code it is a single softmax of the full-width
products q_cls . k_j / sqrt(C), C = heads x head dim, not a mean of per-head softmaxes.
Outliers by the interquartile rule (attention > Q3 + 1.5 IQR, per
sample, linear-interpolated quartiles) are kept first, then spatially uniform patches
(PruMerge+'s extra samples), then the next best by attention, up to the keep count. Each kept
patch then adds its `neighbours` most key-similar other patches (cosine of the layer's
full-width keys), each weighted by its [CLS] attention: x_i + sum_j attn_j x_j
(merge_tokens(assign="kept", combine="sum"), with weight = neighbours * attn because the
assignment weights are uniform 1/neighbours).

PruMerge picks an adaptive number of tokens (outliers + samples) per image; a batch needs one
count, so the count is `keep` here, and `adaptive_count` gives PruMerge+'s own count per sample
(a tensor) for callers who want it. PruMerge's extra token (sum of attn x over the pruned
patches) is returned in `extra` when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import tokenkern

from .base import Reduction, gather_tokens, keep_count
from .baselines import uniform_positions
from .inputs import VisionLayer


@dataclass
class PruMergeConfig:
    keep: float | int = 0.25
    neighbours: int = 32
    layer: int = -1  # CLIP layer whose q/k score the patches (the paper: the last)
    extra_token: bool = False


def iqr_outliers(scores: Tensor) -> Tensor:
    """(B, N) bool: scores above Q3 + 1.5 (Q3 - Q1) of their row."""
    q = torch.quantile(scores.float(), torch.tensor([0.25, 0.75], device=scores.device), dim=1)
    q1, q3 = q[0], q[1]
    return scores > (q3 + 1.5 * (q3 - q1))[:, None]


def adaptive_count(scores: Tensor) -> Tensor:
    """PruMerge+'s own token count per sample, (B,) int64, as an upper bound: the IQR outliers
    plus one uniform sample every int(int(1 / ratio) / 3) positions, ratio = outliers / N
    (samples that coincide with outliers are counted twice)."""
    n = scores.shape[1]
    outliers = iqr_outliers(scores).sum(dim=1).clamp(min=1)
    step = torch.clamp((n / outliers).floor() / 3, min=1).floor()
    return torch.clamp(outliers + (n / step).ceil().long(), max=n)


def prumerge_plus(features: Tensor, layer: VisionLayer, cfg: PruMergeConfig) -> tuple[Reduction, Tensor | None]:
    """features: (B, N, D); layer: the scoring layer. -> (Reduction of keep_count(keep, N)
    merged tokens, extra token (B, 1, D) or None)."""
    b, n, _ = features.shape
    k = keep_count(cfg.keep, n)
    attn = layer.cls_attention_full_width()  # (B, N)
    uniform = torch.zeros(b, n, dtype=torch.bool, device=features.device)
    uniform[:, uniform_positions(n, k, features.device)] = True
    # Priority tiers: outliers (2), uniform samples (1), the rest (0); attention breaks ties.
    outlier = iqr_outliers(attn)
    tier = 2 * outlier.long() + (uniform & ~outlier).long()
    by_attn = torch.sort(attn, dim=1, descending=True, stable=True).indices
    by_tier = torch.sort(tier.gather(1, by_attn), dim=1, descending=True, stable=True).indices
    keep_idx = by_attn.gather(1, by_tier)[:, :k].sort(dim=1).values
    nn_k = min(cfg.neighbours, n - 1)
    if nn_k >= 1:
        merged, _ = tokenkern.merge_tokens(
            features, keep_idx, metric=layer.flat_keys(), weight=nn_k * attn, topm=nn_k,
            combine="sum", assign="kept", validate=False,
        )  # fmt: skip
    else:
        merged = gather_tokens(features, keep_idx)
    extra = None
    if cfg.extra_token:
        pruned = torch.ones(b, n, device=features.device).scatter_(1, keep_idx, 0.0)
        extra = (pruned * attn)[:, None, :].to(features.dtype) @ features  # (B, 1, D)
    return Reduction(keep_idx, merged, scores=attn), extra
