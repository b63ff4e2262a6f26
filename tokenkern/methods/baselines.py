"""The baselines every paper compares with: random and uniform (evenly spaced) selection."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

import tokenkern

from ..ops import _args as _checks
from . import fields
from .base import Reduction, gather_tokens, keep_count, token_matrix


@dataclass
class RandomConfig:
    """seed in [0, 2**63 - 1]."""

    keep: float | int = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        fields.keep("random", self.keep)
        fields.integer("random", "seed", self.seed, 0, _checks.INT64_MAX)


def image_seed(seed: int, pixels: Tensor) -> int:
    """A generator seed in [0, 2**63 - 1] that is a function of (seed, the image's content)
    only: the 8-byte BLAKE2b digest of the seed, the shape of ``pixels`` and its values rounded
    to bfloat16 (so that float32 pixels and the bf16 copy a bf16 model receives give the same
    seed). A serving engine replays the draw of an image whatever the batch, call or cache it
    meets it in. pixels: any shape, floating point (one image: its crops or rows included)."""
    _checks.int_range("image_seed", "seed", seed, 0, _checks.INT64_MAX)
    _checks.tensor("image_seed", "pixels", pixels)
    if not pixels.is_floating_point():
        _checks.fail_type("image_seed", f"pixels must be a floating-point tensor, got {pixels.dtype}")
    values = pixels.detach().to(torch.bfloat16).contiguous().cpu().view(torch.int16)
    digest = hashlib.blake2b(digest_size=8)
    digest.update(seed.to_bytes(8, "little"))
    digest.update(repr(tuple(pixels.shape)).encode())
    digest.update(values.numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


def random_select(x: Tensor, cfg: RandomConfig, generator: torch.Generator | None = None) -> Reduction:
    """Keep k = keep_count(keep, N) tokens drawn uniformly without replacement, independently
    per sample, from ``generator`` (on x's device) or else a new one seeded with cfg.seed.
    x: (B, N, D), N >= 1 (B = 0 gives an empty Reduction)."""
    b, n, _ = token_matrix("random", x)
    gen = generator if generator is not None else torch.Generator(device=x.device).manual_seed(cfg.seed)
    scores = torch.rand(b, n, generator=gen, device=x.device)
    kept, idx = tokenkern.topk_gather(scores, x, keep_count(cfg.keep, n))
    return Reduction(idx, kept, scores=scores)


@dataclass
class UniformConfig:
    keep: float | int = 0.25

    def __post_init__(self) -> None:
        fields.keep("uniform", self.keep)


def _spread(n: int, k: int, device) -> Tensor:
    """k evenly spaced positions of n: the centers floor((j + 1/2) n / k), ascending, unique."""
    j = torch.arange(k, device=device, dtype=torch.float64)
    return torch.floor((j + 0.5) * n / k).long()


def uniform_positions(n: int, k: int, device: torch.device | str = "cpu") -> Tensor:
    """k spatially uniform positions of n tokens, ascending and unique. When n is a square
    (a patch grid) they lie on an a x b lattice of evenly spaced rows and columns
    (a = round(sqrt(k)), a b >= k, thinned evenly to k); otherwise evenly spaced in order.
    Needs 1 <= k <= n."""
    _checks.int_range("uniform_positions", "n", n, 1)
    _checks.int_range("uniform_positions", "k", k, 1, n, " (1 <= k <= n)")
    side = round(n**0.5)
    if side * side != n or k >= n:
        return _spread(n, k, device)
    a = max(1, min(side, round(k**0.5)))
    b = min(side, -(-k // a))
    rows = _spread(side, a, device)
    cols = _spread(side, b, device)
    lattice = (rows[:, None] * side + cols[None, :]).flatten()
    if lattice.numel() < k:  # b was capped by the grid: fill from the evenly spaced order
        extra = _spread(n, k, device)
        lattice = torch.unique(torch.cat([lattice, extra]))
    return lattice[_spread(lattice.numel(), k, device)].sort().values


def uniform_select(x: Tensor, cfg: UniformConfig) -> Reduction:
    """Keep k spatially uniform tokens (uniform_positions). x: (B, N, D), N >= 1 (B = 0 gives
    an empty Reduction)."""
    b, n, _ = token_matrix("uniform", x)
    idx = uniform_positions(n, keep_count(cfg.keep, n), x.device).expand(b, -1).contiguous()
    return Reduction(idx, gather_tokens(x, idx))
