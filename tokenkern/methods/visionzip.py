"""VisionZip (dominant + contextual tokens), in the vision tower before the projector.

Rule: the [CLS] query's attention over the patches in the scoring layer (LLaVA: the
penultimate layer), summed over heads, picks `dominant` tokens. Of the R remaining patches
(in position order), `contextual` targets are taken at a uniform step (positions
0, s, 2s, ... of the remaining list, s = max(1, R // contextual)); every other remaining patch
joins its most similar target by cosine similarity of the layer's head-mean keys, and a
contextual token is its target plus the mean of the patches that joined it
(merge_tokens(combine="add_mean")). The output holds dominant + contextual tokens, in position
order (VisionZip concatenates [dominant, contextual]; the set is the same). VisionZip also keeps
the [CLS] token among the dominant ones; here the patch features alone are reduced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import tokenkern

from . import fields
from .base import Reduction, gather_tokens, keep_count, mask_to_indices
from .inputs import VisionLayer


@dataclass
class VisionZipConfig:
    """keep: a fraction in (0, 1] or a count (dominant + contextual); contextual_fraction in
    [0, 1]: the contextual share of the kept tokens (at least one token stays dominant); layer:
    an int, the CLIP layer whose q/k score the patches (negative counts from the end), or None:
    the one feeding the projector."""

    keep: float | int = 64 / 576  # VisionZip's 64-token setting
    contextual_fraction: float = 10 / 64  # 54 dominant + 10 contextual of 64
    layer: int | None = None

    def __post_init__(self) -> None:
        fields.keep("visionzip", self.keep)
        fields.number("visionzip", "contextual_fraction", self.contextual_fraction, 0.0, 1.0)
        fields.optional_integer("visionzip", "layer", self.layer)


def split_counts(total: int, contextual_fraction: float) -> tuple[int, int]:
    contextual = min(total - 1, int(total * contextual_fraction + 0.5)) if total > 1 else 0
    return total - contextual, contextual


def visionzip(features: Tensor, layer: VisionLayer, cfg: VisionZipConfig) -> Reduction:
    """features: (B, N, D) patch tokens; layer: the scoring layer. -> keep_count(keep, N) tokens."""
    b, n, _ = features.shape
    dominant, contextual = split_counts(keep_count(cfg.keep, n), cfg.contextual_fraction)
    scores = layer.cls_attention()
    dom_tokens, dom_idx = tokenkern.topk_gather(scores, features, dominant)
    if contextual == 0:
        return Reduction(dom_idx, dom_tokens, scores=scores)
    is_dom = torch.zeros(b, n, dtype=torch.bool, device=features.device).scatter_(1, dom_idx, True)
    rest = n - dominant
    rest_idx = mask_to_indices(~is_dom, rest)  # (B, R) remaining positions, ascending
    step = max(1, rest // contextual)
    targets = torch.arange(0, rest, step, device=features.device)[:contextual]
    merged, _ = tokenkern.merge_tokens(
        gather_tokens(features, rest_idx),
        targets.expand(b, -1).contiguous(),
        metric=gather_tokens(layer.mean_keys(), rest_idx),
        combine="add_mean",
        validate=False,
    )
    idx = torch.cat([dom_idx, rest_idx[:, targets]], dim=1)
    tokens = torch.cat([dom_tokens, merged], dim=1)
    order = idx.argsort(dim=1)
    return Reduction(idx.gather(1, order), gather_tokens(tokens, order), scores=scores)
