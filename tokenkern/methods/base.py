"""Shared pieces of the method recipes: the result type, keep counts and per-image top-k.

Everything here is batched and free of host synchronization: counts and quotas stay tensors.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops._args import fail_type


@dataclass
class Reduction:
    """What every method recipe returns. Two layouts, by where the method runs:

    Token sets (vision tower, after the projector: N tokens per sample in, k out):
      indices: (B, k) int64, ascending positions of the kept tokens among the N (None for
               ToMe, whose merged tokens stand for no single position);
      tokens:  (B, k, D) the kept tokens, merged where the method merges.
    Sequences (LLM layer: the whole sequence of L positions, text and image tokens):
      indices: None (the kept count differs per sample; the integration sizes it);
      tokens:  (B, L, D) the hidden states with merged values at the kept positions, or None
               when the method only selects;
      keep_mask: (B, L) bool, True at every kept position (text and padding included).
    Either layout:
      sizes:  (B, k) float32 mass of each output token (1 + what was merged in), or None;
      scores: (B, N) or (B, L) float32 the method's score of every token, or None;
      extra:  (B, 1, D) PruMerge+'s extra token (already among tokens, at its slot), or None.
    """

    indices: Tensor | None
    tokens: Tensor | None
    sizes: Tensor | None = None
    scores: Tensor | None = None
    keep_mask: Tensor | None = None
    extra: Tensor | None = None


def keep_count(keep: float | int, n: int) -> int:
    """Tokens kept out of n >= 1: a float in (0, 1] is a fraction (rounded half up), an int an
    absolute count; clamped to [1, n] (a count above n keeps all n). The one rule of every
    method, prune() and tokenkern.selectors; n = 0 (no tokens to keep from) is refused. numpy
    scalars count as the Python numbers they hold."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise ValueError(f"tokenkern.keep_count: keep must be a fraction in (0, 1] or a positive count, got {keep!r}")
    if isinstance(n, bool) or not isinstance(n, int | torch.SymInt) or n < 1:
        raise ValueError(f"tokenkern.keep_count: n must be a token count >= 1, got {n!r}")
    if not isinstance(keep, numbers.Integral):
        keep = float(keep)
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"tokenkern.keep_count: keep as a fraction must be in (0, 1], got {keep}")
        return max(1, min(n, int(keep * n + 0.5)))
    if keep < 1:
        raise ValueError(f"tokenkern.keep_count: keep as a count must be >= 1, got {keep}")
    return min(int(keep), n)


def token_matrix(method: str, x: object) -> tuple[int, int, int]:
    """Checks a method's token input x: (B, N, D) tensor with N >= 1 (B = 0, an empty batch,
    is allowed); returns (B, N, D)."""
    if not isinstance(x, Tensor):
        fail_type(method, f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"tokenkern.{method}: x must be (B, N, D), got shape {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError(f"tokenkern.{method}: x must have N >= 1 tokens, got shape {tuple(x.shape)}")
    b, n, d = x.shape
    return b, n, d


def keep_counts(keep: float | int, n: Tensor) -> Tensor:
    """keep_count for a tensor of token counts (int64), elementwise and sync-free; 0 stays 0."""
    if isinstance(keep, float):
        k = torch.floor(keep * n.double() + 0.5).long()
    else:
        k = torch.full_like(n, int(keep))
    return torch.minimum(k.clamp(min=1), n)


def rank_within_segments(scores: Tensor, segments: Tensor) -> tuple[Tensor, Tensor]:
    """For scores (B, L) and segment ids (B, L) (-1 = not a candidate), the rank of every
    position within its segment (0 = best; descending score, NaN as -inf, ties to the lower
    position) and the size of its segment. Returns (rank, segment_size), both (B, L) int64;
    meaningless where segments < 0."""
    b, length = scores.shape
    key = torch.where(torch.isnan(scores), float("-inf"), scores.float())
    by_score = torch.sort(key, dim=1, descending=True, stable=True).indices
    by_segment = torch.sort(segments.gather(1, by_score), dim=1, stable=True).indices
    order = by_score.gather(1, by_segment)  # grouped by segment, best first within each
    seg_sorted = segments.gather(1, order)
    pos = torch.arange(length, device=scores.device).expand(b, length)
    change = torch.ones_like(seg_sorted, dtype=torch.bool)
    change[:, 1:] = seg_sorted[:, 1:] != seg_sorted[:, :-1]
    start = torch.cummax(torch.where(change, pos, 0), dim=1).values
    counts = torch.zeros(b, length + 1, dtype=torch.long, device=scores.device)  # segment ids are < length
    counts.scatter_add_(1, (segments + 1).clamp(min=0), torch.ones_like(segments))
    rank = torch.empty_like(pos).scatter_(1, order, pos - start)
    size = counts.gather(1, (segments + 1).clamp(min=0))
    return rank, size


def segment_topk_mask(scores: Tensor, segments: Tensor, keep: float | int) -> Tensor:
    """(B, L) bool: in every segment (segments >= 0, e.g. one per image), its keep_count(keep,
    size) best positions by score (ties to the lower position, NaN as -inf)."""
    rank, size = rank_within_segments(scores, segments)
    return (segments >= 0) & (rank < keep_counts(keep, size))


def gather_tokens(x: Tensor, indices: Tensor) -> Tensor:
    """x: (B, N, D), indices: (B, k) -> (B, k, D)."""
    return x.gather(1, indices[..., None].expand(-1, -1, x.shape[-1]))


def mask_to_indices(mask: Tensor, k: int) -> Tensor:
    """(B, N) bool with exactly k True per row -> (B, k) int64 ascending positions."""
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    key = torch.where(mask, pos, mask.shape[1] + pos)
    return key.sort(dim=1).values[:, :k] % mask.shape[1]
