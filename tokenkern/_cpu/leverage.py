"""CPU path of the leverage-score ops: the same randomized SVD as the Triton path, in torch."""

from __future__ import annotations

import torch
from torch import Tensor


def leverage_scores(x: Tensor, r: int, l: int, power_iters: int, seed: int) -> Tensor:
    """x: (B, N, D) -> (B, N) float32. A sample whose x has a NaN or Inf gets NaN scores."""
    d = x.shape[2]
    xf = x.float()
    finite = torch.isfinite(xf).flatten(1).all(dim=1)
    xf = torch.where(finite[:, None, None], xf, 0.0)
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
