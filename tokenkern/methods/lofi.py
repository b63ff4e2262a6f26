"""LoFi (Sun et al., "Silent Hazards of Token Reduction"): keep the tokens with the highest SVD
leverage scores of the token matrix, after the projector. Training-free; the leverage score of
token i is ||U_r[i]||^2 for the top-r left singular vectors of the (N, D) token matrix."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

import tokenkern

from .base import Reduction, keep_count


@dataclass
class LoFiConfig:
    keep: float | int = 0.25
    rank: int = 32
    oversample: int = 8
    power_iters: int = 2
    seed: int = 0


def lofi(x: Tensor, cfg: LoFiConfig) -> Reduction:
    """x: (B, N, D) image tokens (after the projector) -> the keep_count(keep, N) tokens with the
    largest leverage scores (tokenkern.leverage_topk), in ascending position order."""
    kept, idx, scores = tokenkern.leverage_topk(
        x, keep_count(cfg.keep, x.shape[1]), cfg.rank, cfg.oversample, cfg.power_iters, cfg.seed
    )
    return Reduction(idx, kept, scores=scores)
