"""DivPrune (Alvar et al., CVPR 2025): keep a maximally diverse subset of the image tokens after
the projector, by greedy max-min cosine distance (tokenkern.maxmin_select).

Rule: distance ``1 - cos(x_i, x_j)``; first pick: the token whose nearest other token is
farthest; then repeatedly the token farthest from the kept set (the max of its min distance),
first maximum on ties; kept tokens in position order; no merging. The count: the released code
keeps ``round(ratio * N)`` with Python's round (halves to even: 0.25 of 26 keeps 6), the
default ``rounding="released"``; ``rounding="half_up"`` uses keep_count (7), the rule of every
other method. Either is clamped to [1, N]; an int keep is a count.

Differences from the released code, on inputs it mishandles: each sample is reduced on its own
(it applies sample 0's indices to every sample), a kept token is never picked again (repeated
tokens gave duplicates) and a zero-norm token has distance 1 to every token (it gave NaN, which
won the argmax).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from torch import Tensor

import tokenkern

from . import fields
from .base import Reduction, gather_tokens, keep_count, token_matrix


@dataclass
class DivPruneConfig:
    """keep: a fraction in (0, 1] or a count; rounding: "released" (Python's round of keep * N,
    halves to even) or "half_up" (keep_count) for a fraction."""

    keep: float | int = 0.1
    rounding: str = "released"

    def __post_init__(self) -> None:
        fields.keep("divprune", self.keep)
        fields.choice("divprune", "rounding", self.rounding, ("released", "half_up"))


def divprune_count(keep: float | int, n: int, rounding: str = "released") -> int:
    """Tokens DivPrune keeps of n: an int keep is a count (clamped to n); a fraction gives
    round(keep * n) (rounding="released", halves to even) or keep_count (rounding="half_up"),
    clamped to [1, n]."""
    if rounding == "half_up" or isinstance(keep, numbers.Integral):
        return keep_count(keep, n)
    keep_count(keep, n)  # the same argument checks
    return max(1, min(n, round(float(keep) * n)))


def divprune(x: Tensor, cfg: DivPruneConfig) -> Reduction:
    """x: (B, N, D) image tokens after the projector -> Reduction: indices (B, k) ascending,
    tokens (B, k, D) = x at indices, k = divprune_count(keep, N)."""
    _, n, _ = token_matrix("divprune", x)
    idx = tokenkern.maxmin_select(x.detach(), divprune_count(cfg.keep, n, cfg.rounding))
    return Reduction(idx, gather_tokens(x, idx))
