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

Layers: ``layer=K`` means that decoder layers 0 .. K-1 (0-based) see every token, the attention
that layer K-1 computed scores the image tokens, and layers K, K+1, ... see the kept tokens only
(the same convention as fastv and ficoco-l). SparseVLM's released code prunes three times, each
time with the attention of the layer that prunes its own output (``pruning_loc=[2, 6, 15]``,
0-based): here ``layer=(3, 7, 16)``, the default. A single int prunes once.

Keep: with one layer, every image keeps ``keep`` tokens. With the three-step schedule, ``keep``
is SparseVLM's token budget (its "retain 192 / 128 / 96 / 64 tokens" settings of LLaVA-1.5's
576, roughly the count averaged over the layers) and the steps keep the released counts: 192 -> 300, 200, 110;
128 -> 303, 110, 36; 96 -> 238, 48, 26; 64 -> 66, 30, 17 (``RELEASED_STEPS``), as fractions of
the image's tokens; budgets between two released ones interpolate linearly, below 64 scale the
64 row, above 192 interpolate towards keeping everything at keep = 1.0. ``step_counts`` gives
the counts. Later steps score the tokens still there with the same raters.

Also simpler than the paper: ``tokenkern.prune`` offers every valid text token of the prompt
(system prompt and chat markers included) as a rater candidate, where SparseVLM takes the
question's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import tokenkern

from . import fields
from .base import Reduction, keep_counts, rank_within_segments
from .inputs import DecoderLayer

# SparseVLM's released per-step counts (v1.0 defaults) for its budgets, out of 576 image tokens.
RELEASED_STEPS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
_RELEASED_TOKENS = 576


@dataclass
class SparseVLMConfig:
    """keep: a fraction in (0, 1] or a count per image (one layer: what each image keeps; the
    three-step schedule: SparseVLM's budget, see the module doc).
    layer: K or (K1, K2, K3), increasing, each >= 1. layer=K means: decoder layers 0 .. K-1 see
    every token, layer K-1's attention scores, layers K, K+1, ... see the kept tokens. Default
    (3, 7, 16): the released ``pruning_loc=[2, 6, 15]``.
    recycle: merge the dropped image tokens into the kept ones at each step."""

    keep: float | int = 0.25
    layer: int | tuple[int, ...] = (3, 7, 16)
    recycle: bool = False

    def __post_init__(self) -> None:
        fields.keep("sparsevlm", self.keep)
        expected = "a layer K >= 1 (int) or three increasing layers (K1, K2, K3), each >= 1"
        if isinstance(self.layer, tuple | list):
            ok = len(self.layer) == 3 and all(isinstance(k, int) and not isinstance(k, bool) for k in self.layer)
            if not ok or not 1 <= self.layer[0] < self.layer[1] < self.layer[2]:
                fields._fail("sparsevlm", "layer", expected, self.layer)
            self.layer = tuple(self.layer)
        elif isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            fields._fail("sparsevlm", "layer", expected, self.layer)
        fields.flag("sparsevlm", "recycle", self.recycle)

    @property
    def layers(self) -> tuple[int, ...]:
        """The pruning steps, (K,) or (K1, K2, K3)."""
        return self.layer if isinstance(self.layer, tuple) else (self.layer,)


def _released_fractions(budget: Tensor) -> Tensor:
    """budget: (...) float64 fractions in (0, 1] -> (..., 3) the fraction of the image's tokens
    each released step keeps (piecewise linear through RELEASED_STEPS, 0 at 0, 1 at 1)."""
    knots = [0, *sorted(RELEASED_STEPS), _RELEASED_TOKENS]
    rows = [(0, 0, 0), *(RELEASED_STEPS[b] for b in sorted(RELEASED_STEPS)), (_RELEASED_TOKENS,) * 3]
    x = torch.tensor(knots, dtype=torch.float64, device=budget.device) / _RELEASED_TOKENS
    y = torch.tensor(rows, dtype=torch.float64, device=budget.device) / _RELEASED_TOKENS
    hi = torch.searchsorted(x, budget.contiguous()).clamp(1, len(knots) - 1)
    t = ((budget - x[hi - 1]) / (x[hi] - x[hi - 1]))[..., None]
    return y[hi - 1] + t * (y[hi] - y[hi - 1])


def step_counts(cfg: SparseVLMConfig, step: int, size: Tensor) -> Tensor:
    """size: (...) int64 token count of an image (0: not an image token) -> (...) int64 the tokens
    that image keeps after pruning step `step` (0-based); sync-free."""
    if len(cfg.layers) == 1:
        return keep_counts(cfg.keep, size)
    n = size.double()
    budget = torch.full_like(n, float(cfg.keep)) if isinstance(cfg.keep, float) else cfg.keep / n.clamp(min=1)
    frac = _released_fractions(budget.clamp(max=1.0))[..., step]
    return torch.minimum(torch.floor(frac * n + 0.5).long().clamp(min=1), size)


def step_drops(cfg: SparseVLMConfig, image: Tensor) -> Tensor:
    """image: (B, L) image id per token of the unpruned sequence -> (steps, B) int64: the image
    tokens each pruning step drops in each sample (sync-free; sizes the steps in advance)."""
    sizes = image_sizes(image)
    first = image >= 0
    first[:, 1:] &= image[:, 1:] != image[:, :-1]  # one position per image (images are runs)
    kept = torch.stack([torch.where(first, step_counts(cfg, s, sizes), 0).sum(dim=1) for s in range(len(cfg.layers))])
    before = torch.cat([(image >= 0).sum(dim=1)[None], kept[:-1]])
    return before - kept


def image_sizes(image: Tensor) -> Tensor:
    """image: (B, L) image id per token (-1 elsewhere) -> (B, L) int64 the size of each token's
    image, 0 elsewhere."""
    b, length = image.shape
    counts = torch.zeros(b, length + 1, dtype=torch.long, device=image.device)
    counts.scatter_add_(1, image + 1, torch.ones_like(image))
    return torch.where(image >= 0, counts.gather(1, image + 1), 0)


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


def recycle(hidden: Tensor, image: Tensor, keep_mask: Tensor) -> Tensor:
    """SparseVLM recycling (this module's simplification): every dropped image token merges
    into its most cosine-similar kept token of the same image, each kept token becoming the
    mean of itself and the tokens that joined it (tokenkern.merge_tokens' defaults).
    hidden: (B, L, D); image: (B, L) image ids (-1 elsewhere); keep_mask: (B, L) bool ->
    (B, L, D), equal to hidden except at the kept image tokens that received. Loops over the
    samples and images on the host (their sizes differ)."""
    out = hidden.clone()
    for s in range(image.shape[0]):
        for img in image[s].unique().tolist():
            if img < 0:
                continue
            pos = (image[s] == img).nonzero().flatten()
            kept = keep_mask[s, pos].nonzero().flatten()
            if len(kept) == len(pos):
                continue
            merged, _ = tokenkern.merge_tokens(hidden[s : s + 1, pos], kept[None], validate=False)
            out[s, pos[kept]] = merged[0]
    return out


def sparsevlm(layer: DecoderLayer, rater_mask: Tensor, cfg: SparseVLMConfig, counts: Tensor | None = None) -> Reduction:
    """One pruning step. rater_mask: (B, L) bool; counts: (B, L) int64 the tokens each position's
    image keeps at this step (step_counts of the image's original size); None: keep_count(keep,
    image size). -> a sequence Reduction: keep_mask (B, L), scores (B, L), and with
    cfg.recycle the hidden states (layer.hidden, required then) with the dropped image tokens
    merged into the kept ones (see ``recycle``); tokens None without recycling. Samples whose
    raters are empty fall back to all text tokens as raters."""
    if cfg.recycle and layer.hidden is None:
        raise ValueError("tokenkern.sparsevlm: layer.hidden must be the (B, L, D) hidden states with recycle=True, "
                         "got None")  # fmt: skip
    text = layer.text if layer.text is not None else ~layer.image_mask
    has_raters = rater_mask.any(dim=1, keepdim=True)
    queries = torch.where(has_raters, rater_mask, text) & layer.valid
    q, k = layer.q.detach(), layer.k.detach()  # scores rank tokens: no gradient
    lse = None if layer.lse is None else layer.lse.detach()
    scores = tokenkern.attn_scores(
        q, k, lse=lse, scale=layer.scale, query_mask=queries, key_mask=layer.valid, causal=True
    )
    rank, size = rank_within_segments(scores, layer.image)
    counts = keep_counts(cfg.keep, size) if counts is None else counts
    keep = (layer.image_mask & (rank < counts)) | ~layer.image_mask
    tokens = recycle(layer.hidden, layer.image, keep) if cfg.recycle else None
    return Reduction(None, tokens, scores=scores, keep_mask=keep)
