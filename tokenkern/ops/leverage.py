"""Leverage scores (LoFi): the SVD leverage score of every token, and the top-k tokens by it.

The whole contract at a glance::

    leverage_scores(x, rank=32, oversample=8, power_iters=2, seed=0) -> scores
    leverage_topk(x, k, rank=32, oversample=8, power_iters=2, seed=0) -> (kept, indices, scores)

    x            (B, N, D) float32/float16/bfloat16, N, D >= 1; the public functions also
                 take one sample (N, D) and drop the batch dimension of the outputs
    k            1 <= k <= N
    rank         1 <= rank <= SVD_MAX_RANK (65536); r = min(rank, N, D) is the rank kept
    oversample   0 <= oversample <= SVD_MAX_OVERSAMPLE (65536); the sketch has width
                 l = min(r + oversample, N, D)
    power_iters  0 <= power_iters <= SVD_MAX_POWER_ITERS (32)
    seed         0 <= seed < 2**63 (the Gaussian sketch)
    CUDA only    l <= LEVERAGE_MAX_SKETCH (128, tokenkern._triton.leverage: the kernels'
                 shared memory at sketch width 256 exceeds a block's)

    scores       (B, N) float32, scores[b, i] = ||U_r[i, :]||^2 (each row sums to r); NaN
                 for a sample with a NaN or Inf
    kept         (B, k, D) in x's dtype, kept[b, j] = x[b, indices[b, j]]
    indices      (B, k) int64 ascending (the topk_gather rule, tokenkern.ops.select)

Faces, every one through ``check_leverage`` (``check_leverage_topk``), so a bad argument
fails with the same message wherever it runs::

    schema     torch.library.custom_op "tokenkern::leverage_scores" / "tokenkern::leverage_topk"
    fake       shapes only (torch.compile, FakeTensorMode); checks the CUDA limit for CUDA x
    CPU        leverage_scores_cpu / leverage_topk_cpu: tokenkern._cpu.leverage (torch,
               float32) and the C++ topk_gather
    CUDA       leverage_scores_triton / leverage_topk_triton: tokenkern._triton.leverage and
               tokenkern._triton.select (Triton, imported on the first CUDA call; no host sync)
    autograd   leverage_scores refuses an x that requires grad (scores carry no gradient);
               leverage_topk: kept back-propagates to x with the selection held constant
    spec       tokenkern.reference.leverage_scores / leverage_topk (exact SVD)
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op

from .._cpu import leverage as cpu_leverage
from . import _args as checks
from ._grad import register_refusal, register_selection
from .select import check_k

# Documented maxima of the counts. rank and oversample are clamped to min(N, D) anyway; the
# bounds only refuse nonsense early. power_iters is a loop count.
SVD_MAX_RANK = 65536
SVD_MAX_OVERSAMPLE = 65536
SVD_MAX_POWER_ITERS = 32

_ARGS_SCHEMA = "int rank=32, int oversample=8, int power_iters=2, int seed=0"

# ------------------------------------------------------------------------------ checks


def svd_sketch(
    op: str, n: int, d: int, rank: int, oversample: int, power_iters: int, seed: int, cuda: bool = False
) -> tuple[int, int]:
    """Checks the randomized-SVD arguments of an (N, D) token matrix; returns (r, l): the rank
    kept and the sketch width. With cuda=True also l <= LEVERAGE_MAX_SKETCH."""
    checks.int_range(op, "rank", rank, 1)
    checks.at_most(op, "rank", rank, SVD_MAX_RANK, "the documented maximum; the rank is clamped to min(N, D)")
    checks.int_range(op, "oversample", oversample, 0)
    checks.at_most(op, "oversample", oversample, SVD_MAX_OVERSAMPLE, "the documented maximum")
    checks.int_range(op, "power_iters", power_iters, 0)
    checks.at_most(op, "power_iters", power_iters, SVD_MAX_POWER_ITERS, "the documented maximum")
    checks.int_range(op, "seed", seed, 0, checks.INT64_MAX)
    r = min(rank, n, d)
    l = min(r + oversample, n, d)
    if cuda:
        _cuda_sketch(op, n, d, rank, oversample, l)
    return r, l


def _cuda_sketch(op: str, n: int, d: int, rank: int, oversample: int, l: int) -> None:
    from .._triton.leverage import LEVERAGE_MAX_SKETCH as top

    if l <= top:
        return
    if oversample < top:
        fix = f"use rank <= {top - oversample} with oversample={oversample}"
    else:
        fix = f"use oversample < {top} and rank <= {top} - oversample"
    checks.fail(
        op,
        f"rank + oversample must be <= {top} on CUDA when min(N, D) > {top} (the sketch; at width {2 * top} the "
        f"kernels need more shared memory than a block has), got rank={rank}, oversample={oversample} "
        f"with min(N, D)={min(n, d)}; {fix}, or a CPU tensor",
    )


def check_leverage(
    op: str, x: object, rank: int, oversample: int, power_iters: int, seed: int, cuda: bool
) -> tuple[Tensor, int, int]:
    """x: (B, N, D) tokens and the sketch arguments (messages name op); returns (x, r, l)."""
    x = checks.tokens(op, "x", x)
    r, l = svd_sketch(op, x.shape[1], x.shape[2], rank, oversample, power_iters, seed, cuda)
    return x, r, l


def check_leverage_topk(
    x: object, k: int, rank: int, oversample: int, power_iters: int, seed: int, cuda: bool
) -> tuple[Tensor, int, int]:
    """check_leverage of leverage_topk, plus 1 <= k <= N; returns (x, r, l)."""
    x, r, l = check_leverage("leverage_topk", x, rank, oversample, power_iters, seed, cuda)
    check_k("leverage_topk", k, x.shape[1])
    return x, r, l


# -------------------------------------------------------------------------- public API


def leverage_scores(x: Tensor, rank: int = 32, oversample: int = 8, power_iters: int = 2, seed: int = 0) -> Tensor:
    """SVD leverage score of every token (the LoFi importance).

    x: (B, N, D) or (N, D), float32/float16/bfloat16, rows are tokens.
    Returns scores: (B, N) or (N,) float32, ``scores[b, i] = ||U_r[i, :]||^2`` for the top
    ``r = min(rank, N, D)`` left singular vectors of x[b] (each row sums to r), estimated by
    a randomized SVD: Gaussian sketch of width ``r + oversample`` drawn from ``seed``,
    ``power_iters`` power iterations. A sample containing NaN or Inf gets NaN scores.
    Not differentiable: with grad mode on, an x that requires grad raises a ValueError (pass
    x.detach(): scores rank tokens and carry no gradient).

    Ranges: 1 <= rank <= 65536, 0 <= oversample <= 65536, 0 <= power_iters <= 32,
    0 <= seed < 2**63. On CUDA the sketch ``min(rank + oversample, N, D)`` must be <= 128 (the
    kernels' shared memory): with min(N, D) > 128 and oversample=8, rank <= 120.
    """
    xb, single = checks.batched("leverage_scores", "x", x)
    check_leverage("leverage_scores", xb, rank, oversample, power_iters, seed, cuda=xb.is_cuda)
    scores = torch.ops.tokenkern.leverage_scores(xb, rank, oversample, power_iters, seed)
    return scores[0] if single else scores


def leverage_topk(
    x: Tensor, k: int, rank: int = 32, oversample: int = 8, power_iters: int = 2, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the k tokens with the highest leverage scores (LoFi pruning).

    x: (B, N, D) or (N, D). Returns ``(kept, indices, scores)``: kept (B, k, D) in x's dtype,
    indices (B, k) int64 ascending, scores (B, N) float32 (batch dimension dropped for a 2-D
    x). See :func:`leverage_scores` for the score and :func:`topk_gather` for the selection
    rule.
    Gradients: kept back-propagates to x (into the selected rows; the selection is a
    constant); indices and scores are not differentiable.
    """
    xb, single = checks.batched("leverage_topk", "x", x)
    check_leverage_topk(xb, k, rank, oversample, power_iters, seed, cuda=xb.is_cuda)
    kept, indices, scores = torch.ops.tokenkern.leverage_topk(xb, k, rank, oversample, power_iters, seed)
    return (kept[0], indices[0], scores[0]) if single else (kept, indices, scores)


# --------------------------------------------------------------------- leverage_scores


def leverage_scores_cpu(x: Tensor, rank: int = 32, oversample: int = 8, power_iters: int = 2, seed: int = 0) -> Tensor:
    """The CPU kernel: x (B, N, D) -> scores (B, N) float32."""
    x, r, l = check_leverage("leverage_scores", x, rank, oversample, power_iters, seed, cuda=False)
    return cpu_leverage.leverage_scores(x, r, l, power_iters, seed)


_scores_op = custom_op(
    "tokenkern::leverage_scores", leverage_scores_cpu, mutates_args=(), schema=f"(Tensor x, {_ARGS_SCHEMA}) -> Tensor"
)


@_scores_op.register_fake
def _leverage_scores_fake(
    x: Tensor, rank: int = 32, oversample: int = 8, power_iters: int = 2, seed: int = 0
) -> Tensor:
    check_leverage("leverage_scores", x, rank, oversample, power_iters, seed, cuda=checks.is_cuda(x))
    return x.new_empty(x.shape[0], x.shape[1], dtype=torch.float32)


@_scores_op.register_kernel("cuda")
def leverage_scores_triton(
    x: Tensor, rank: int = 32, oversample: int = 8, power_iters: int = 2, seed: int = 0
) -> Tensor:
    """The CUDA kernel: x (B, N, D) -> scores (B, N) float32."""
    x, r, l = check_leverage("leverage_scores", x, rank, oversample, power_iters, seed, cuda=True)
    from .._triton import leverage

    return leverage.leverage_scores(x, r, l, power_iters, seed)


register_refusal("leverage_scores", ["x"])

# ----------------------------------------------------------------------- leverage_topk


def leverage_topk_cpu(
    x: Tensor, k: int, rank: int = 32, oversample: int = 8, power_iters: int = 2, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """The CPU kernel: x (B, N, D) -> kept (B, k, D), indices (B, k), scores (B, N)."""
    x, r, l = check_leverage_topk(x, k, rank, oversample, power_iters, seed, cuda=False)
    scores = cpu_leverage.leverage_scores(x, r, l, power_iters, seed)
    kept, indices = torch.ops.tokenkern.topk_gather(scores, x, k)
    return kept, indices, scores


_topk_op = custom_op(
    "tokenkern::leverage_topk",
    leverage_topk_cpu,
    mutates_args=(),
    schema=f"(Tensor x, int k, {_ARGS_SCHEMA}) -> (Tensor kept, Tensor indices, Tensor scores)",
)


@_topk_op.register_fake
def _leverage_topk_fake(
    x: Tensor, k: int, rank: int = 32, oversample: int = 8, power_iters: int = 2, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    check_leverage_topk(x, k, rank, oversample, power_iters, seed, cuda=checks.is_cuda(x))
    batch, n, d = x.shape
    return (
        x.new_empty(batch, k, d),
        x.new_empty(batch, k, dtype=torch.int64),
        x.new_empty(batch, n, dtype=torch.float32),
    )


@_topk_op.register_kernel("cuda")
def leverage_topk_triton(
    x: Tensor, k: int, rank: int = 32, oversample: int = 8, power_iters: int = 2, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """The CUDA kernel: x (B, N, D) -> kept (B, k, D), indices (B, k), scores (B, N)."""
    x, r, l = check_leverage_topk(x, k, rank, oversample, power_iters, seed, cuda=True)
    from .._triton import leverage
    from .._triton.select import topk_gather

    scores = leverage.leverage_scores(x, r, l, power_iters, seed)
    kept, indices = topk_gather(scores, x, k)
    return kept, indices, scores


register_selection("leverage_topk", x_pos=0, n_inputs=6)
