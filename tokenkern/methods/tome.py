"""ToMe (Bolya et al., "Token Merging"): in every vision-tower block, after attention, merge r
tokens by bipartite soft matching on the layer's keys averaged over heads, with size-weighted
averages (tokenkern.bipartite_merge), protecting [CLS]; later blocks use proportional
attention, adding log(size) of each key to the attention logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import tokenkern


@dataclass
class ToMeConfig:
    r: int = 8  # tokens merged per block
    protect_cls: bool = True
    proportional_attention: bool = True


def tome_merge(x: Tensor, keys_mean: Tensor, size: Tensor, cfg: ToMeConfig) -> tuple[Tensor, Tensor]:
    """x: (B, N, C) block output, keys_mean: (B, N, d) the block's keys averaged over heads,
    size: (B, N) -> (x, size) with min(r, mergeable) fewer tokens, [CLS] first when protected."""
    n = x.shape[1]
    mergeable = (n - (1 if cfg.protect_cls else 0)) // 2  # ToMe's cap: at most half of the rest
    r = max(0, min(cfg.r, mergeable))
    if r == 0:
        return x, size
    return tokenkern.bipartite_merge(x, keys_mean, r, size, cfg.protect_cls, validate=False)


def attention_bias(size: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, 1, 1, N) additive attention bias log(size) (proportional attention)."""
    return size.log().to(dtype)[:, None, None, :]
