"""FastV (Chen et al.): after LLM layer K, drop the image tokens that receive the least
attention.

Layers: ``layer=K`` means that decoder layers 0 .. K-1 (0-based) see every token, the attention
that layer K-1 computed scores the image tokens, and layers K, K+1, ... see the kept tokens only
(the same convention as sparsevlm and ficoco-l). This is FastV's own K: its released code
(``fast_v_agg_layer`` / ``fastv_k``) reads the attention of layer K-1 and drops tokens from
layer K on.

Rule: take the softmax attention of the last prompt token (query="last", FastV's released
query: the last position of the prompt) or of all instruction tokens after the image
(query="text") over the whole sequence, average it over heads (and queries), and keep the
top-k image tokens of every image (k = keep_count(keep, tokens of that image)); text tokens
are always kept. FastV's defaults: K = 2 and R = 50% dropped, i.e. keep = 0.5 (the released
code keeps round(N (1 - R)) of the N image tokens; keep_count rounds halves up). Scores come
from tokenkern.attn_scores on the layer's q/k (or its lse): no eager attention, no attention
matrix. A batch row that is all padding keeps its layout (it has no image tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

import tokenkern

from . import fields
from .base import Reduction, segment_topk_mask
from .inputs import DecoderLayer


@dataclass
class FastVConfig:
    """keep: a fraction in (0, 1] or a count per image. layer: K >= 1; layer=K means decoder
    layers 0 .. K-1 see every token, layer K-1's attention scores, layers K, K+1, ... see the
    kept tokens (FastV's K). query: "last" (the last prompt token) or "text"."""

    keep: float | int = 0.5
    layer: int = 2
    query: str = "last"

    def __post_init__(self) -> None:
        fields.keep("fastv", self.keep)
        fields.integer("fastv", "layer", self.layer, lo=1)
        if self.query not in ("last", "text"):
            raise ValueError(f"tokenkern.fastv: query must be 'last' or 'text', got {self.query!r}")

    @property
    def layers(self) -> tuple[int, ...]:
        """The pruning steps: (K,)."""
        return (self.layer,)


def fastv_scores(layer: DecoderLayer, query: str = "last") -> Tensor:
    """(B, L) float32: attention received by every position from the chosen queries."""
    if query == "last":
        q_last, keys, lse = layer.last_query()
        lse = None if lse is None else lse.detach()
        return tokenkern.attn_scores(q_last.detach(), layer.k.detach(), lse=lse, scale=layer.scale, key_mask=keys)
    if query == "text":
        if layer.text is None:
            raise ValueError("tokenkern.fastv: query='text' needs the text token mask")
        lse = None if layer.lse is None else layer.lse.detach()
        return tokenkern.attn_scores(
            layer.q.detach(), layer.k.detach(), lse=lse, scale=layer.scale, query_mask=layer.text & layer.valid,
            key_mask=layer.valid, causal=True,
        )  # fmt: skip
    raise ValueError(f"tokenkern.fastv: query must be 'last' or 'text', got {query!r}")


def fastv(layer: DecoderLayer, cfg: FastVConfig) -> Reduction:
    """layer: the scoring decoder layer over the sequence (B, L). -> a sequence Reduction:
    keep_mask (B, L) bool (all non-image tokens plus each image's top-k), scores (B, L); no
    merge (tokens None)."""
    scores = fastv_scores(layer, cfg.query)
    keep = segment_topk_mask(scores, layer.image, cfg.keep) | ~layer.image_mask
    return Reduction(None, None, scores=scores, keep_mask=keep)
