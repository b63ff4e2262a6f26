"""topk_gather on CPU against torch.topk + sort + gather (benchmarks/conftest.py's baseline)."""

from __future__ import annotations

import pytest
import torch
from conftest import torch_topk_gather
from cpu_harness import DTYPES, dtype_id, shapes

import tokenkern

# (B, N, D, k)
SHAPES = shapes(full=[(8, 2880, 1024, 720), (8, 576, 4096, 144), (1, 2880, 4096, 720)], smoke=[(2, 64, 32, 16)])


def check(ours, theirs) -> None:
    assert torch.equal(ours[1], theirs[1])
    assert torch.equal(ours[0], theirs[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-N{}-D{}-k{}".format(*s))
def test_topk_gather(compare, shape, dtype):
    b, n, d, k = shape
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(b, n, generator=gen)
    x = torch.randn(b, n, d, generator=gen).to(dtype)
    compare(
        {"tokenkern": lambda: tokenkern.topk_gather(scores, x, k), "torch": lambda: torch_topk_gather(scores, x, k)},
        check,
        group=f"topk_gather B={b} N={n} D={d} k={k} {dtype_id(dtype)}",
    )
