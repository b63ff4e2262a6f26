"""CPU path of the leverage-score ops: the same randomized SVD as the Triton path, in torch."""

from __future__ import annotations

import torch
from torch import Tensor


def pow2_inverse(x: Tensor) -> Tensor:
    """x: (B, N, D) finite -> (B,) the power of two 2^-e that brings max |x[b]| into [1, 2)
    (clamped to [2^-126, 2^127]). Leverage scores are scale-invariant and multiplying by a
    power of two is exact, so float32 sums of squares never overflow or underflow."""
    _, e = torch.frexp(x.abs().amax(dim=(1, 2)))  # max |x[b]| = m 2^e, m in [0.5, 1)
    return torch.ldexp(torch.ones(x.shape[0], dtype=x.dtype, device=x.device), (1 - e).clamp(-126, 127))


def leverage_scores(x: Tensor, r: int, l: int, power_iters: int, seed: int) -> Tensor:
    """x: (B, N, D) -> (B, N) float32. A sample whose x has a NaN or Inf gets NaN scores."""
    d = x.shape[2]
    xf = x.float()
    finite = torch.isfinite(xf).flatten(1).all(dim=1)
    xf = torch.where(finite[:, None, None], xf, 0.0)
    xf = xf * pow2_inverse(xf)[:, None, None]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(d, l, generator=gen, dtype=torch.float32).to(x.device)
    q = torch.linalg.qr(xf @ omega).Q
    for _ in range(power_iters):
        z = torch.linalg.qr(xf.mT @ q).Q
        q = torch.linalg.qr(xf @ z).Q
    w = xf.mT @ q
    _, vecs = torch.linalg.eigh(w.mT @ w)
    u = q @ vecs[..., l - r :]
    scores = (u * u).sum(-1)
    return torch.where(finite[:, None], scores, float("nan"))
