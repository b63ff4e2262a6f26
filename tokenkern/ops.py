"""The op registry: every op of the ``tokenkern`` namespace gets its fake kernel (for
torch.compile), its CPU kernel and its CUDA kernel here.

Ops with C++ kernels are declared in csrc/tokenkern.cpp; this module adds their fake
kernels and, where the CUDA kernel is a Triton one, that kernel. Ops written in
Python/Triton are declared here with ``torch.library.custom_op``. Triton is imported only
when a CUDA kernel first runs, so importing tokenkern never needs Triton or a GPU.

The ``*_triton`` functions are the CUDA kernels as registered; the tests also call them on
CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op, register_fake, register_kernel

from . import _C  # noqa: F401  (loads the C++ op schemas and kernels)
from . import _checks as checks
from ._cpu import leverage as cpu_leverage

# --------------------------------------------------------------------------- topk_gather


@register_fake("tokenkern::topk_gather")
def _topk_gather_fake(scores: Tensor, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    checks.topk_gather(scores, x, k)
    batch = scores.shape[0]
    return x.new_empty(batch, k, x.shape[2]), scores.new_empty(batch, k, dtype=torch.int64)


def topk_gather_triton(scores: Tensor, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    checks.topk_gather(scores, x, k)
    from ._triton.topk_gather import topk_gather

    return topk_gather(scores, x, k)


register_kernel("tokenkern::topk_gather", "cuda", topk_gather_triton)

# ----------------------------------------------------------------------- leverage scores

_LEVERAGE_ARGS = "int rank=32, int oversample=8, int power_iters=2, int seed=0"


def _leverage_sizes(op: str, x: object, rank: int, oversample: int, power_iters: int, seed: int):
    x = checks.tokens(op, "x", x)
    r, l = checks.svd_sketch(op, x.shape[1], x.shape[2], rank, oversample, power_iters, seed)
    return x, r, l


@custom_op("tokenkern::leverage_scores", mutates_args=(), schema=f"(Tensor x, {_LEVERAGE_ARGS}) -> Tensor")
def leverage_scores(x: Tensor, rank: int = 32, oversample: int = 8, power_iters: int = 2, seed: int = 0) -> Tensor:
    x, r, l = _leverage_sizes("leverage_scores", x, rank, oversample, power_iters, seed)
    return cpu_leverage.leverage_scores(x, r, l, power_iters, seed)


@leverage_scores.register_fake
def _leverage_scores_fake(x, rank=32, oversample=8, power_iters=2, seed=0):
    _leverage_sizes("leverage_scores", x, rank, oversample, power_iters, seed)
    return x.new_empty(x.shape[0], x.shape[1], dtype=torch.float32)


@leverage_scores.register_kernel("cuda")
def leverage_scores_triton(x, rank=32, oversample=8, power_iters=2, seed=0):
    x, r, l = _leverage_sizes("leverage_scores", x, rank, oversample, power_iters, seed)
    from ._triton import leverage

    return leverage.leverage_scores(x, r, l, power_iters, seed)


@custom_op(
    "tokenkern::leverage_topk",
    mutates_args=(),
    schema=f"(Tensor x, int k, {_LEVERAGE_ARGS}) -> (Tensor kept, Tensor indices, Tensor scores)",
)
def leverage_topk(
    x: Tensor, k: int, rank: int = 32, oversample: int = 8, power_iters: int = 2, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    x, r, l = _leverage_sizes("leverage_topk", x, rank, oversample, power_iters, seed)
    checks.int_range("leverage_topk", "k", k, 1, x.shape[1], " (1 <= k <= N)")
    scores = cpu_leverage.leverage_scores(x, r, l, power_iters, seed)
    kept, indices = torch.ops.tokenkern.topk_gather(scores, x, k)
    return kept, indices, scores


@leverage_topk.register_fake
def _leverage_topk_fake(x, k, rank=32, oversample=8, power_iters=2, seed=0):
    _leverage_sizes("leverage_topk", x, rank, oversample, power_iters, seed)
    checks.int_range("leverage_topk", "k", k, 1, x.shape[1], " (1 <= k <= N)")
    batch, n, d = x.shape
    return (
        x.new_empty(batch, k, d),
        x.new_empty(batch, k, dtype=torch.int64),
        x.new_empty(batch, n, dtype=torch.float32),
    )


@leverage_topk.register_kernel("cuda")
def leverage_topk_triton(x, k, rank=32, oversample=8, power_iters=2, seed=0):
    x, r, l = _leverage_sizes("leverage_topk", x, rank, oversample, power_iters, seed)
    checks.int_range("leverage_topk", "k", k, 1, x.shape[1], " (1 <= k <= N)")
    from ._triton import leverage
    from ._triton.topk_gather import topk_gather

    scores = leverage.leverage_scores(x, r, l, power_iters, seed)
    kept, indices = topk_gather(scores, x, k)
    return kept, indices, scores
