"""leverage_topk against (1) exact torch.linalg.svd + topk + gather and (2) torch.svd_lowrank
+ topk + gather, at rank 32 and k = N/4.

Goal on an H100/H200 (bf16, B=8, N=2880, D=4096): >= 20x faster than the exact path,
>= 5x faster than svd_lowrank, and within 3x of the HBM floor of the passes over x
(2 * power_iters + 2 reads of x at the copy bandwidth measured in the same run, or their GEMM
FLOPs at the documented tensor-core peak if larger: extra_info hbm_floor_us, compute_floor_us,
floor_us)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, GEMM_KIND, HAS_CUDA, floor_info, torch_topk_gather

import tokenkern

RANK, OVERSAMPLE, POWER_ITERS = 32, 8, 2

if HAS_CUDA:
    SHAPES = [(b, n, d) for b in (1, 8) for n in (576, 2880) for d in (1024, 4096)]
    DTYPES = [torch.bfloat16, torch.float32]
else:  # smoke mode on CPU
    SHAPES = [(1, 576, 1024)]
    DTYPES = [torch.float32]


def exact_topk(x: torch.Tensor, k: int):
    u = torch.linalg.svd(x.float(), full_matrices=False).U[..., :RANK]
    scores = (u * u).sum(-1)
    return *torch_topk_gather(scores, x, k), scores


def lowrank_topk(x: torch.Tensor, k: int):
    u, _, _ = torch.svd_lowrank(x.float(), q=RANK + OVERSAMPLE, niter=POWER_ITERS)
    u = u[..., :RANK]
    scores = (u * u).sum(-1)
    return *torch_topk_gather(scores, x, k), scores


IMPLS = {
    "tokenkern": lambda x, k: tokenkern.leverage_topk(x, k, RANK, OVERSAMPLE, POWER_ITERS),
    "exact_svd": exact_topk,
    "svd_lowrank": lowrank_topk,
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("b", "n", "d"), SHAPES)
def test_leverage_topk(run_benchmark, impl, dtype, b, n, d):
    x = torch.randn(b, n, d, device=DEVICE).to(dtype)
    k = n // 4
    passes = 2 * POWER_ITERS + 2
    info = {"impl": impl, "B": b, "N": n, "D": d, "k": k, "rank": RANK, "dtype": str(dtype), "passes_over_x": passes}
    # each pass over x is a (N x D) by (D or N x l) product, l = rank + oversample
    gemm_flops = passes * 2 * b * n * d * (RANK + OVERSAMPLE)
    info |= floor_info(passes * x.numel() * x.element_size(), gemm_flops, GEMM_KIND[dtype])
    fn = IMPLS[impl]
    run_benchmark(lambda: fn(x, k), group=f"leverage_topk B={b} N={n} D={d} {dtype}", **info)
