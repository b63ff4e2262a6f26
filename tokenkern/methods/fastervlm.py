"""FasterVLM: rank the patch tokens by the [CLS] attention of the vision tower's penultimate
layer (the layer whose output feeds the projector in LLaVA), averaged over heads; keep the
top-k before the projector. No merging."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

import tokenkern

from . import fields
from .base import Reduction, keep_count
from .inputs import VisionLayer


@dataclass
class FasterVLMConfig:
    """keep: a fraction in (0, 1] or a count; layer: an int, the CLIP layer whose q/k score the
    patches (negative counts from the end), or None: the one feeding the projector."""

    keep: float | int = 0.25
    layer: int | None = None

    def __post_init__(self) -> None:
        fields.keep("fastervlm", self.keep)
        fields.optional_integer("fastervlm", "layer", self.layer)


def fastervlm(features: Tensor, layer: VisionLayer, cfg: FasterVLMConfig) -> Reduction:
    """features: (B, N, D) patch tokens ([CLS] excluded); layer: the scoring layer (q/k with
    [CLS] at 0). Keeps keep_count(keep, N) tokens by head-mean [CLS] attention."""
    scores = layer.cls_attention()
    kept, idx = tokenkern.topk_gather(scores, features, keep_count(cfg.keep, features.shape[1]))
    return Reduction(idx, kept, scores=scores)
