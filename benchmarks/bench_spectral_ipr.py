"""spectral_ipr against the torch ways of getting the same number: torch.linalg.svdvals of x
(what a user would write) and the float32 Gram matrix + torch.linalg.eigvalsh (top rank)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, HAS_CUDA

import tokenkern

SHAPES = [(b, n, d) for b in (1, 8) for n in (576, 2880) for d in (1024, 4096)] if HAS_CUDA else [(2, 96, 64)]
RANKS = (-1, 32)


def ipr_from_energy(energy: torch.Tensor) -> torch.Tensor:
    p = energy / energy.sum(-1, keepdim=True)
    return (p * p).sum(-1)


def torch_svdvals(x: torch.Tensor, rank: int) -> torch.Tensor:
    s = torch.linalg.svdvals(x.float())
    return ipr_from_energy((s * s)[..., :rank] if rank > 0 else s * s)


def torch_gram_eigvalsh(x: torch.Tensor, rank: int) -> torch.Tensor:
    xf = x.float()
    g = xf @ xf.mT if x.shape[1] <= x.shape[2] else xf.mT @ xf
    lam = torch.linalg.eigvalsh(g).flip(-1).clamp_min(0)
    return ipr_from_energy(lam[..., :rank] if rank > 0 else lam)


IMPLS = {
    "tokenkern": tokenkern.spectral_ipr,
    "torch_svdvals": torch_svdvals,
    "torch_gram_eigvalsh": torch_gram_eigvalsh,
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize(("b", "n", "d"), SHAPES)
def test_spectral_ipr(run_benchmark, impl, rank, b, n, d):
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    x = torch.randn(b, n, d, device=DEVICE).to(dtype)
    fn = IMPLS[impl]
    info = {"impl": impl, "B": b, "N": n, "D": d, "rank": rank, "dtype": str(dtype)}
    run_benchmark(lambda: fn(x, rank), group=f"spectral_ipr rank={rank} B={b} N={n} D={d}", **info)
