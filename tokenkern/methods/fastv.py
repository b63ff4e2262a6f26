"""FastV (Chen et al.): after LLM layer K, drop the image tokens that receive the least
attention.

Rule: at layer K - 1 (the attention that already ran), take the softmax attention of the
last prompt token (query="last", FastV's default) or of all instruction tokens after the image
(query="text") over the whole sequence, average it over heads (and queries), and keep the
top-k image tokens of every image (k = keep_count(keep, tokens of that image)); text tokens
are always kept. FastV's defaults: K = 2, keep 50%. Scores come from tokenkern.attn_scores on
the layer's q/k (or its lse): no eager attention, no attention matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

import tokenkern

from .base import segment_topk_mask
from .inputs import DecoderLayer


@dataclass
class FastVConfig:
    keep: float | int = 0.5
    layer: int = 2  # prune after this many decoder layers (scores from layer K - 1)
    query: str = "last"  # "last" or "text"

    def __post_init__(self) -> None:
        if self.query not in ("last", "text"):
            raise ValueError(f"tokenkern.fastv: query must be 'last' or 'text', got {self.query!r}")


def fastv_scores(layer: DecoderLayer, query: str = "last") -> Tensor:
    """(B, L) float32: attention received by every position from the chosen queries."""
    if query == "last":
        q_last, keys, lse = layer.last_query()
        return tokenkern.attn_scores(q_last, layer.k, lse=lse, scale=layer.scale, key_mask=keys)
    if query == "text":
        if layer.text is None:
            raise ValueError("tokenkern.fastv: query='text' needs the text token mask")
        return tokenkern.attn_scores(
            layer.q, layer.k, lse=layer.lse, scale=layer.scale, query_mask=layer.text & layer.valid,
            key_mask=layer.valid, causal=True,
        )  # fmt: skip
    raise ValueError(f"tokenkern.fastv: query must be 'last' or 'text', got {query!r}")


def fastv(layer: DecoderLayer, cfg: FastVConfig) -> tuple[Tensor, Tensor]:
    """-> (keep mask (B, L) bool over the sequence: all non-image tokens plus each image's
    top-k; scores (B, L))."""
    scores = fastv_scores(layer, cfg.query)
    keep = segment_topk_mask(scores, layer.image, cfg.keep) | ~layer.image_mask
    return keep, scores
