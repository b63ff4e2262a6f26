"""SparseVLM (Zhang et al.): text "raters" score the image tokens inside the LLM.

Rule: raters are chosen once from the decoder's input embeddings: M = softmax over the text
tokens of (V T^T) (raw dot products of visual and text embeddings), averaged over the visual
tokens; the text tokens with M above its mean are the raters. At the pruning layer, an image
token's score is the softmax attention it receives from the raters, averaged over raters and
heads (tokenkern.attn_scores with query_mask = raters); each image keeps its top-k.
recycle=True merges every dropped image token into its most similar kept image token of the
same sample (cosine of hidden states, size-weighted mean: tokenkern.merge_tokens) instead of
SparseVLM's DPC-kNN clustering of the recycled tokens into extra tokens — a documented
simplification that keeps the token count equal to the keep count.

Also simpler than the paper: ``tokenkern.prune`` offers every valid text token of the prompt
(system prompt and chat markers included) as a rater candidate, where SparseVLM takes the
question's tokens, and prunes once at layer K, where SparseVLM prunes progressively over several
layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import tokenkern

from .base import segment_topk_mask
from .inputs import DecoderLayer


@dataclass
class SparseVLMConfig:
    keep: float | int = 0.25
    layer: int = 2  # prune after this many decoder layers (scores from layer K - 1)
    recycle: bool = False


def raters(embeds: Tensor, image_mask: Tensor, text_mask: Tensor) -> Tensor:
    """embeds: (B, L, H) decoder input embeddings; image_mask, text_mask: (B, L) bool.
    -> (B, L) bool, the rater text tokens (M > mean(M) over the sample's text tokens)."""
    e = embeds.float()
    logits = e @ e.mT  # (B, L, L): rows visual, columns text below
    logits = logits.masked_fill(~text_mask[:, None, :], float("-inf"))
    m = torch.softmax(logits, dim=-1)
    m = torch.where(image_mask[:, :, None], m, 0.0).sum(dim=1) / image_mask.sum(dim=1, keepdim=True).clamp(min=1)
    n_text = text_mask.sum(dim=1, keepdim=True).clamp(min=1)
    mean = torch.where(text_mask, m, 0.0).sum(dim=1, keepdim=True) / n_text
    return text_mask & (m > mean)


def sparsevlm(layer: DecoderLayer, rater_mask: Tensor, cfg: SparseVLMConfig) -> tuple[Tensor, Tensor]:
    """-> (keep mask (B, L) over the sequence, scores (B, L)). Samples whose raters are empty
    fall back to all text tokens as raters."""
    text = layer.text if layer.text is not None else ~layer.image_mask
    has_raters = rater_mask.any(dim=1, keepdim=True)
    queries = torch.where(has_raters, rater_mask, text) & layer.valid
    scores = tokenkern.attn_scores(
        layer.q, layer.k, lse=layer.lse, scale=layer.scale, query_mask=queries, key_mask=layer.valid, causal=True
    )
    keep = segment_topk_mask(scores, layer.image, cfg.keep) | ~layer.image_mask
    return keep, scores
