"""spectral_ipr on CPU against what a user would write: torch.linalg.svdvals of the float32
sample, then sum(s^4) / sum(s^2)^2 over all or the top-r singular values
(benchmarks/bench_spectral_ipr.py's ``torch_svdvals``)."""

from __future__ import annotations

import pytest
import torch
from bench_spectral_ipr import torch_svdvals
from cpu_harness import DTYPES, dtype_id, shapes

import tokenkern

# (B, N, D): the leverage shapes of the issue (a 2880 x 4096 svdvals takes seconds a call).
SHAPES = shapes(full=[(8, 576, 1024), (2, 2880, 1024)], smoke=[(2, 96, 64)])
RANKS = (-1, 32)
TOL = 1e-5  # relative; float32 svdvals against the float64 Gram


def check(ours, theirs) -> None:
    err = ((ours.double() - theirs.double()).abs() / theirs.double().abs()).max().item()
    assert err <= TOL, f"IPR differs from svdvals' by {err:.2e} (relative)"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("rank", RANKS, ids=lambda r: f"rank{r}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-N{}-D{}".format(*s))
def test_spectral_ipr(compare, shape, rank, dtype):
    b, n, d = shape
    x = torch.randn(b, n, d, generator=torch.Generator().manual_seed(0)).to(dtype)
    compare(
        {"tokenkern": lambda: tokenkern.spectral_ipr(x, rank), "torch": lambda: torch_svdvals(x, rank)},
        check,
        group=f"spectral_ipr rank={rank} B={b} N={n} D={d} {dtype_id(dtype)}",
    )
