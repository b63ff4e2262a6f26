"""merge_tokens and bipartite_merge on CPU against the plain torch of the same rules: normalize +
bmm + argmax + scatter_reduce (bench_merge.torch_merge_mean) and ToMe's bipartite soft matching
+ merge_wavg (bench_merge.tome_merge_wavg; with [CLS] protected: its class_token variant)."""

from __future__ import annotations

import pytest
import torch
from bench_merge import tome_merge_wavg, torch_merge_mean
from cpu_harness import DTYPES, dtype_id, shapes

import tokenkern

# merge_tokens (B, N, K, D), metric = x, topm 1, combine mean, random weights.
MERGE_SHAPES = shapes(full=[(8, 576, 144, 1024), (2, 2880, 720, 1024)], smoke=[(2, 40, 10, 32)])
# bipartite_merge (B, N, D, r, protect_first), 64-wide metric, unit sizes.
BIPARTITE_SHAPES = shapes(full=[(8, 577, 1024, 144, True), (2, 2880, 1024, 720, False)], smoke=[(2, 41, 32, 10, True)])


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """Both sides accumulate in float32 in different orders; 16-bit outputs may round one ulp apart."""
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=2**-7)


def check_merge(dtype: torch.dtype):
    def check(ours, theirs) -> None:
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours[0].float(), theirs[0].float(), **tolerance(dtype))

    return check


def check_bipartite(dtype: torch.dtype, n_unmerged: int):
    """ToMe without a protected token lists the unmerged A tokens by score, tokenkern by position:
    compare that block as sets of rows (ordered by a weighted sum of each row)."""

    def rows(t: torch.Tensor) -> torch.Tensor:
        head = t[:, :n_unmerged].float()
        order = (head.double() * torch.linspace(1, 2, head.shape[-1], dtype=torch.float64)).sum(-1).argsort(dim=-1)
        return torch.cat([head.gather(1, order[..., None].expand_as(head)), t[:, n_unmerged:].float()], 1)

    def check(ours, theirs) -> None:
        torch.testing.assert_close(ours[1][:, n_unmerged:], theirs[1][:, n_unmerged:])
        torch.testing.assert_close(ours[1].sum(-1), theirs[1].sum(-1))
        torch.testing.assert_close(rows(ours[0]), rows(theirs[0]), **tolerance(dtype))

    return check


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", MERGE_SHAPES, ids=lambda s: "B{}-N{}-K{}-D{}".format(*s))
def test_merge_tokens(compare, shape, dtype):
    b, n, k, d = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, d, generator=gen).to(dtype)
    keep = torch.rand(b, n, generator=gen).topk(k, dim=-1).indices.sort(dim=-1).values
    weight = torch.rand(b, n, generator=gen)
    compare(
        {
            "tokenkern": lambda: tokenkern.merge_tokens(x, keep, weight=weight),
            "torch": lambda: torch_merge_mean(x, keep, x, weight),
        },
        check_merge(dtype),
        group=f"merge_tokens B={b} N={n} K={k} D={d} {dtype_id(dtype)}",
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", BIPARTITE_SHAPES, ids=lambda s: "B{}-N{}-D{}-r{}-protect{}".format(*s))
def test_bipartite_merge(compare, shape, dtype):
    b, n, d, r, protect = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, d, generator=gen).to(dtype)
    metric = torch.randn(b, n, 64, generator=gen).to(dtype)
    size = torch.ones(b, n)
    compare(
        {
            "tokenkern": lambda: tokenkern.bipartite_merge(x, metric, r, size, protect_first=protect),
            "torch": lambda: tome_merge_wavg(x, metric, r, size, class_token=protect),
        },
        check_bipartite(dtype, (n + 1) // 2 - r),
        group=f"bipartite_merge B={b} N={n} D={d} r={r}{' [CLS]' if protect else ''} {dtype_id(dtype)}",
    )
