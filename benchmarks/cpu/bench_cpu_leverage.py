"""leverage_topk on CPU against what a user would write: torch.svd_lowrank (float32, same rank,
oversample and power iterations) + squared row norms + topk + sort + gather
(benchmarks/bench_leverage.py's ``lowrank_topk``).

The input has a gapped spectrum (rank-32 signal over noise, like token matrices), so that both
randomized SVDs find the same top-32 subspace and their scores can be compared before timing."""

from __future__ import annotations

import pytest
import torch
from bench_leverage import OVERSAMPLE, POWER_ITERS, RANK, lowrank_topk
from cpu_harness import DTYPES, dtype_id, shapes

import tokenkern

# (B, N, D, k): the two shapes, then the README headline (batch cut to 2 for time).
SHAPES = shapes(
    full=[(8, 576, 1024, 144), (2, 2880, 1024, 720), (2, 2880, 4096, 720)],
    smoke=[(2, 96, 64, 24)],
)
SCORE_TOL = 1e-3  # relative, scores of two randomized SVDs of a rank-32 signal over 1% noise
OVERLAP = 0.99  # the kept sets may differ only at near-ties


def gapped_tokens(b: int, n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """(B, N, D) float32: a rank-RANK signal with uneven row weights plus 1% Gaussian noise."""
    rows = torch.randn(b, n, RANK, generator=gen) * torch.rand(b, n, 1, generator=gen).add(0.2)
    signal = rows @ torch.randn(b, RANK, d, generator=gen)
    return signal + 0.01 * signal.std() * torch.randn(b, n, d, generator=gen)


def check(ours, theirs) -> None:
    kept, idx, scores = ours
    ref_kept, ref_idx, ref_scores = theirs
    err = ((scores - ref_scores).norm(dim=-1) / ref_scores.norm(dim=-1)).max().item()
    assert err <= SCORE_TOL, f"scores differ from svd_lowrank's by {err:.2e} (relative)"
    k = idx.shape[-1]
    for mine, ref in zip(idx.tolist(), ref_idx.tolist(), strict=True):
        overlap = len(set(mine) & set(ref)) / k
        assert overlap >= OVERLAP, f"kept-set overlap {overlap:.3f} < {OVERLAP}"
    assert kept.dtype == ref_kept.dtype and kept.shape == ref_kept.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-N{}-D{}-k{}".format(*s))
def test_leverage_topk(compare, shape, dtype):
    b, n, d, k = shape
    x = gapped_tokens(b, n, d, torch.Generator().manual_seed(0)).to(dtype)
    compare(
        {
            "tokenkern": lambda: tokenkern.leverage_topk(x, k, RANK, OVERSAMPLE, POWER_ITERS),
            "torch": lambda: lowrank_topk(x, k),
        },
        check,
        group=f"leverage_topk B={b} N={n} D={d} k={k} {dtype_id(dtype)}",
    )
