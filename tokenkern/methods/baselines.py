"""The baselines every paper compares with: random and uniform (evenly spaced) selection."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import tokenkern

from .base import Reduction, gather_tokens, keep_count


@dataclass
class RandomConfig:
    keep: float | int = 0.25
    seed: int = 0


def random_select(x: Tensor, cfg: RandomConfig) -> Reduction:
    """Keep k = keep_count(keep, N) tokens drawn uniformly without replacement, independently
    per sample, from a generator seeded with cfg.seed on x's device. x: (B, N, D)."""
    b, n, _ = x.shape
    gen = torch.Generator(device=x.device).manual_seed(cfg.seed)
    scores = torch.rand(b, n, generator=gen, device=x.device)
    kept, idx = tokenkern.topk_gather(scores, x, keep_count(cfg.keep, n))
    return Reduction(idx, kept, scores=scores)


@dataclass
class UniformConfig:
    keep: float | int = 0.25


def uniform_positions(n: int, k: int, device: torch.device | str = "cpu") -> Tensor:
    """k evenly spaced positions of n: the centers floor((j + 1/2) n / k), ascending, unique."""
    j = torch.arange(k, device=device, dtype=torch.float64)
    return torch.floor((j + 0.5) * n / k).long()


def uniform_select(x: Tensor, cfg: UniformConfig) -> Reduction:
    """Keep k evenly spaced tokens (in raster order for a patch grid). x: (B, N, D)."""
    b, n, _ = x.shape
    idx = uniform_positions(n, keep_count(cfg.keep, n), x.device).expand(b, -1).contiguous()
    return Reduction(idx, gather_tokens(x, idx))
