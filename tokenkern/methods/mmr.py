"""MMR (maximal marginal relevance, IDPruner-style): trade each token's importance against its
similarity to the tokens already kept (tokenkern.mmr_select).

Rule: importance min-max normalized per sample (0 when constant); first pick: the most
important token; then repeatedly the first maximum of ``lam * imp_j - (1 - lam) *
max_{s kept} cos(x_s, x_j)`` (lam = 0.5); kept tokens in position order; no merging. In prune()
the importance is the [CLS] attention of the CLIP layer feeding the projector (head mean, as
FasterVLM scores), ``layer`` choosing another one.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

import tokenkern

from . import fields
from .base import Reduction, gather_tokens, keep_count, token_matrix


@dataclass
class MMRConfig:
    """keep: a fraction in (0, 1] or a count; lam: the importance weight in [0, 1]; layer: the
    CLIP layer whose [CLS] attention is the importance in prune() (None: the one feeding the
    projector; negative counts from the end)."""

    keep: float | int = 0.25
    lam: float = 0.5
    layer: int | None = None

    def __post_init__(self) -> None:
        fields.keep("mmr", self.keep)
        fields.number("mmr", "lam", self.lam, 0.0, 1.0)
        fields.optional_integer("mmr", "layer", self.layer)


def mmr(x: Tensor, importance: Tensor, cfg: MMRConfig) -> Reduction:
    """x: (B, N, D) tokens, importance: (B, N) their importance -> Reduction: indices (B, k)
    ascending, tokens (B, k, D), scores (B, N) float32 the importance; k = keep_count(keep, N)."""
    _, n, _ = token_matrix("mmr", x)
    imp = importance.detach() if isinstance(importance, Tensor) else importance  # the op checks it
    idx = tokenkern.mmr_select(x.detach(), imp, keep_count(cfg.keep, n), float(cfg.lam))
    return Reduction(idx, gather_tokens(x, idx), scores=imp.float())
