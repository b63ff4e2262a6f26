"""ToMe (Bolya et al., "Token Merging"): in every vision-tower block, after attention, merge r
tokens by bipartite soft matching on the layer's keys averaged over heads, with size-weighted
averages (tokenkern.bipartite_merge), protecting [CLS]; later blocks use proportional
attention, adding log(size) of each key to the attention logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import tokenkern

from . import fields
from .base import Reduction


@dataclass
class ToMeConfig:
    """r: tokens merged per block, an int >= 0 (capped per block at half of the mergeable
    tokens); protect_cls, proportional_attention: bools."""

    r: int = 8
    protect_cls: bool = True
    proportional_attention: bool = True

    def __post_init__(self) -> None:
        fields.integer("tome", "r", self.r, lo=0)
        fields.flag("tome", "protect_cls", self.protect_cls)
        fields.flag("tome", "proportional_attention", self.proportional_attention)


def tome_merge(x: Tensor, keys_mean: Tensor, size: Tensor, cfg: ToMeConfig) -> Reduction:
    """One block's merge. x: (B, N, C) block output, keys_mean: (B, N, d) the block's keys
    averaged over heads, size: (B, N) -> Reduction with tokens (B, N - r', C) and sizes
    (B, N - r'), r' = min(r, mergeable), [CLS] first when protected, in bipartite_merge's
    order; indices None (a merged token stands for no single position)."""
    n = x.shape[1]
    mergeable = (n - (1 if cfg.protect_cls else 0)) // 2  # ToMe's cap: at most half of the rest
    r = max(0, min(cfg.r, mergeable))
    if r == 0:
        return Reduction(None, x, sizes=size)
    merged, new_size = tokenkern.bipartite_merge(x, keys_mean, r, size, cfg.protect_cls, validate=False)
    return Reduction(None, merged, sizes=new_size)


def attention_bias(size: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, 1, 1, N) additive attention bias log(size) (proportional attention)."""
    return size.log().to(dtype)[:, None, None, :]
