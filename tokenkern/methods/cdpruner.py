"""CDPruner (Zhang et al., "Beyond Attention or Similarity"): keep the image tokens that a
conditional DPP picks: diverse features, weighted by their relevance to the instruction.

Rule: ``S = cos(F_i, F_j)`` on the projector's outputs F (B, N, D), in float32; relevance from
CLIP: ``rel_i = mean_m(-cos(I_i, T_m))`` (the minus sign is the released code's) with I (B, N, E)
the CLIP-projected patch features (``visual_projection(post_layernorm(hidden_states[-2][:,
1:]))``) and T (B, M, E) the CLIP text embeddings of the question (one row per 77-token
segment); ``r = (rel - min + 1e-6) / (max - min)``; the kernel ``L = diag(r) S diag(r)``;
fast greedy MAP for k steps (tokenkern.dpp_select); kept tokens in position order.

Per sample: min and max are each sample's own (the released code takes them over the whole
batch, so that a sample's result depends on the others; at batch 1, the released case, the two
agree); a sample whose relevance is constant gets r = 1e-6 everywhere (the released code
divides by 0). ``theta`` (None: off, as released) is the released θ variant that is commented
out there: ``r <- exp(alpha r)``, ``alpha = theta / (2 (1 - theta))``. text_mask (B, M) bool
marks the valid text rows where samples have different numbers of segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import tokenkern

from ..ops._args import fail_type
from . import fields
from .base import Reduction, gather_tokens, keep_count, token_matrix


@dataclass
class CDPrunerConfig:
    """keep: a fraction in (0, 1] or a count (published: 64 / 128 / 192 of 576); theta: None
    (off) or the relevance weight in [0, 1) of the exp variant."""

    keep: float | int = 128
    theta: float | None = None

    def __post_init__(self) -> None:
        fields.keep("cdpruner", self.keep)
        if self.theta is not None:
            fields.number("cdpruner", "theta", self.theta, 0.0, 1.0, hi_open=True)


def _unit(t: Tensor) -> Tensor:
    """Rows of t in float32 divided by their norm (a zero row stays zero)."""
    t = t.float()
    norm = torch.linalg.vector_norm(t, dim=-1, keepdim=True)
    return torch.where(norm > 0, t / torch.where(norm > 0, norm, 1.0), 0.0)


def _check(name: str, t: object, b: int, n: int | None, width: int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        fail_type("cdpruner", f"{name} must be a torch.Tensor, got {type(t).__name__}")
    ok = t.dim() == 3 and t.shape[0] == b and (n is None or t.shape[1] == n) and (width is None or t.shape[2] == width)
    if not ok or not t.is_floating_point() or t.shape[1] < 1:
        shape = "(B, N, E) with B, N of x" if n is not None else "(B, M, E) floating with M >= 1 and E of image_emb"
        raise ValueError(f"tokenkern.cdpruner: {name} must be {shape}, got {tuple(t.shape)} {t.dtype}")
    return t


def cdpruner_relevance(
    image_emb: Tensor, text_emb: Tensor, theta: float | None = None, text_mask: Tensor | None = None
) -> Tensor:
    """image_emb: (B, N, E), text_emb: (B, M, E), text_mask: (B, M) bool or None -> (B, N) float32
    r: the min-max normalized (per sample) mean negative cosine, exp(alpha r) with theta."""
    cos = torch.einsum("bne,bme->bnm", _unit(image_emb), _unit(text_emb))
    if text_mask is None:
        rel = -cos.mean(dim=-1)
    else:
        w = text_mask.to(cos.dtype)[:, None, :]
        rel = -(cos * w).sum(dim=-1) / w.sum(dim=-1).clamp(min=1.0)
    lo = rel.min(dim=1, keepdim=True).values
    span = rel.max(dim=1, keepdim=True).values - lo
    r = (rel - lo + 1e-6) / torch.where(span > 0, span, 1.0)
    if theta is not None:
        r = torch.exp(theta / (2 * (1 - theta)) * r)
    return r


def cdpruner(
    x: Tensor, image_emb: Tensor, text_emb: Tensor, cfg: CDPrunerConfig, text_mask: Tensor | None = None
) -> Reduction:
    """x: (B, N, D) image tokens after the projector; image_emb: (B, N, E) their CLIP-projected
    features; text_emb: (B, M, E) the CLIP text embeddings; text_mask: (B, M) bool or None ->
    Reduction: indices (B, k) ascending, tokens (B, k, D), scores (B, N) the relevance r;
    k = keep_count(keep, N)."""
    b, n, _ = token_matrix("cdpruner", x)
    image_emb = _check("image_emb", image_emb, b, n)
    text_emb = _check("text_emb", text_emb, b, None, image_emb.shape[2])
    if text_mask is not None and (not isinstance(text_mask, Tensor) or text_mask.dtype != torch.bool
                                  or tuple(text_mask.shape) != tuple(text_emb.shape[:2])):  # fmt: skip
        got = (tuple(text_mask.shape), text_mask.dtype) if isinstance(text_mask, Tensor) else type(text_mask).__name__
        raise ValueError(f"tokenkern.cdpruner: text_mask must be (B, M) bool matching text_emb, got {got}")
    r = cdpruner_relevance(image_emb.detach(), text_emb.detach(), cfg.theta, text_mask)
    idx = tokenkern.dpp_select(x.detach(), r, keep_count(cfg.keep, n))
    return Reduction(idx, gather_tokens(x, idx), scores=r)
