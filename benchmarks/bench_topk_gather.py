"""topk_gather (fused select + gather) against torch.topk + sort + gather."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, HAS_CUDA, torch_topk_gather

import tokenkern

SHAPES = [(b, n, d) for b in (1, 8) for n in (576, 2880) for d in (1024, 4096)] if HAS_CUDA else [(2, 576, 256)]


IMPLS = {"tokenkern": tokenkern.topk_gather, "torch": torch_topk_gather}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize(("b", "n", "d"), SHAPES)
def test_topk_gather(run_benchmark, impl, b, n, d):
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    x = torch.randn(b, n, d, device=DEVICE).to(dtype)
    scores = torch.rand(b, n, device=DEVICE)
    k = n // 4
    fn = IMPLS[impl]
    info = {"impl": impl, "B": b, "N": n, "D": d, "k": k, "dtype": str(dtype)}
    run_benchmark(lambda: fn(scores, x, k), group=f"topk_gather B={b} N={n} D={d}", **info)
