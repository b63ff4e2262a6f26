"""LoFi (Sun et al., "Silent Hazards of Token Reduction"): keep the tokens with the highest SVD
leverage scores of the token matrix, after the projector. Training-free; the leverage score of
token i is ||U_r[i]||^2 for the top-r left singular vectors of the (N, D) token matrix."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

import tokenkern

from ..ops import _args as _checks
from ..ops import leverage as _leverage
from . import fields
from .base import Reduction, keep_count, token_matrix


@dataclass
class LoFiConfig:
    """rank in [1, 65536], oversample in [0, 65536], power_iters in [0, 32], seed in
    [0, 2**63 - 1] (see tokenkern.leverage_scores; on CUDA also rank + oversample <= 128 when
    min(N, D) > 128)."""

    keep: float | int = 0.25
    rank: int = 32
    oversample: int = 8
    power_iters: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        fields.keep("lofi", self.keep)
        fields.integer("lofi", "rank", self.rank, 1, _leverage.SVD_MAX_RANK)
        fields.integer("lofi", "oversample", self.oversample, 0, _leverage.SVD_MAX_OVERSAMPLE)
        fields.integer("lofi", "power_iters", self.power_iters, 0, _leverage.SVD_MAX_POWER_ITERS)
        fields.integer("lofi", "seed", self.seed, 0, _checks.INT64_MAX)


def lofi(x: Tensor, cfg: LoFiConfig) -> Reduction:
    """x: (B, N, D) image tokens (after the projector), N >= 1 -> the keep_count(keep, N) tokens
    with the largest leverage scores (tokenkern.leverage_topk), in ascending position order.
    B = 0 gives an empty Reduction."""
    _, n, _ = token_matrix("lofi", x)
    kept, idx, scores = tokenkern.leverage_topk(
        x, keep_count(cfg.keep, n), cfg.rank, cfg.oversample, cfg.power_iters, cfg.seed
    )
    return Reduction(idx, kept, scores=scores)
