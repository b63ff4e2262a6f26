"""CPU path of spectral_ipr: the Gram matrix of the smaller side in float64, its Frobenius norm
and trace for all singular values, torch.linalg.eigvalsh for the top r (exact).

x is read twice: the cast to float64 and the Gram product (at::bmm, deterministic for a fixed
thread count). Finiteness comes from the Gram's diagonal: a float64 sum of squares of float32
values cannot overflow, so G[i, i] is finite exactly when row (or column) i of x is."""

from __future__ import annotations

import torch
from torch import Tensor


def spectral_ipr(x: Tensor, r: int | None) -> Tensor:
    """x: (B, N, D) -> (B,) float32. r: the number of top eigenvalues kept, None for all.
    A sample with a NaN or Inf gets NaN; a zero sample gets 0."""
    xd = x.double()
    g = torch.bmm(xd, xd.mT) if x.shape[1] <= x.shape[2] else torch.bmm(xd.mT, xd)
    diag = g.diagonal(dim1=-2, dim2=-1)
    finite = torch.isfinite(diag).all(dim=-1)
    if r is None:
        total = diag.sum(-1)
        squares = (g * g).sum(dim=(-2, -1))
    else:
        g = torch.where(finite[:, None, None], g, 0.0)  # eigvalsh must not see a NaN
        lam = torch.linalg.eigvalsh(g)[..., -r:].clamp_min(0.0)
        total = lam.sum(-1)
        squares = (lam * lam).sum(-1)
    ok = finite & (total > 0)
    ipr = torch.where(ok, squares / torch.where(ok, total, 1.0) ** 2, 0.0)
    return torch.where(finite, ipr, float("nan")).float()
