"""CPU path of spectral_ipr: the Gram matrix of the smaller side in float64, its Frobenius norm
and trace for all singular values, torch.linalg.eigvalsh for the top r (exact)."""

from __future__ import annotations

import torch
from torch import Tensor


def spectral_ipr(x: Tensor, r: int | None) -> Tensor:
    """x: (B, N, D) -> (B,) float32. r: the number of top eigenvalues kept, None for all.
    A sample with a NaN or Inf gets NaN; a zero sample gets 0."""
    xd = x.double()
    finite = torch.isfinite(xd).flatten(1).all(dim=1)
    xd = torch.where(finite[:, None, None], xd, 0.0)
    g = xd @ xd.mT if x.shape[1] <= x.shape[2] else xd.mT @ xd
    if r is None:
        total = g.diagonal(dim1=-2, dim2=-1).sum(-1)
        squares = (g * g).sum(dim=(-2, -1))
    else:
        lam = torch.linalg.eigvalsh(g)[..., -r:].clamp_min(0.0)
        total = lam.sum(-1)
        squares = (lam * lam).sum(-1)
    ipr = torch.where(total > 0, squares / torch.where(total > 0, total, 1.0) ** 2, 0.0)
    return torch.where(finite, ipr, float("nan")).float()
