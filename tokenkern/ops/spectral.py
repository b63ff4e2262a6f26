"""spectral_ipr: the inverse participation ratio of the singular-value energy of each token
matrix (how concentrated its spectrum is), for all singular values or the top rank::

    spectral_ipr(x, rank=-1) -> (B,) float32

    x     (B, N, D) float32/float16/bfloat16, N, D >= 1 (the public function also takes one
          sample (N, D) and returns a 0-dim tensor)
    rank  -1 (all singular values) or 1 <= rank < 2**63; rank >= min(N, D) counts all
    CUDA  a top rank < min(N, D) must fit the kernel's sketch (``sketch_fits`` in
          tokenkern._triton.spectral: with min(N, D) > 128, rank <= 112)

Faces, every one through ``check_spectral_ipr``: the ``torch.library.custom_op`` schema, the
fake kernel, the CPU kernel (``spectral_ipr_cpu``: tokenkern._cpu.spectral, float64 Gram and
eigvalsh), the CUDA kernel (``spectral_ipr_triton``: tokenkern._triton.spectral, imported on
the first CUDA call) and the autograd (an x that requires grad is refused). Spec:
``tokenkern.reference.spectral_ipr``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op

from .._cpu import spectral as cpu_spectral
from . import _args as checks
from ._grad import register_refusal


def check_spectral_ipr(x: object, rank: int, cuda: bool) -> tuple[Tensor, int | None]:
    """Checks spectral_ipr's arguments; returns (x, r): r is None when every singular value
    counts (rank = -1 or rank >= min(N, D)), else the number of top eigenvalues kept. With
    cuda=True also checks that the CUDA kernel's sketch can hold rank."""
    op = "spectral_ipr"
    x = checks.tokens(op, "x", x)
    checks.integer(op, "rank", rank)
    if rank != -1 and rank < 1:
        checks.fail(op, f"rank must be -1 (all singular values) or >= 1, got {rank}")
    if rank > checks.INT64_MAX:
        checks.fail(op, f"rank must be -1 or in [1, 2**63 - 1] (an int64), got {rank}")
    m = min(x.shape[1], x.shape[2])
    if rank == -1 or rank >= m:
        return x, None
    if cuda:
        _cuda_sketch(op, m, rank)
    return x, rank


def _cuda_sketch(op: str, m: int, rank: int) -> None:
    from .._triton.spectral import SPECTRAL_MAX_SKETCH, SPECTRAL_MIN_OVERSAMPLE, sketch_fits

    if not sketch_fits(m, rank):
        top = SPECTRAL_MAX_SKETCH - SPECTRAL_MIN_OVERSAMPLE
        checks.fail(
            op,
            f"rank={rank} with min(N, D)={m} does not fit the CUDA kernel's sketch ({SPECTRAL_MAX_SKETCH} "
            f"columns, rank + {SPECTRAL_MIN_OVERSAMPLE} needed); use rank <= {top}, rank >= min(N, D) "
            "or -1 (all singular values), or a CPU tensor",
        )


def spectral_ipr(x: Tensor, rank: int = -1) -> Tensor:
    """Inverse participation ratio (IPR) of the singular-value energy of each token matrix.

    x: (B, N, D) or (N, D), float32/float16/bfloat16, rows are tokens. With s_1 >= s_2 >= ...
    the singular values of x[b] and r = min(N, D) when rank = -1 or rank >= min(N, D), else
    r = rank: ``p_i = s_i^2 / sum_{j <= r} s_j^2`` and ``IPR = sum_{i <= r} p_i^2``, in
    [1/r, 1] (1: one direction holds all the energy). Returns (B,) float32, or a 0-dim
    tensor for a 2-D x. A zero x[b] gets 0; an x[b] with a NaN or Inf gets NaN.

    All singular values: ``||G||_F^2 / tr(G)^2`` of the Gram matrix G on the smaller side
    (exact up to float32 rounding on CUDA, float64 on CPU). Top rank on CUDA: a randomized
    range finder (sketch ``max(2 rank, rank + 16)`` columns rounded up to a power of two, at
    most 128 and at most min(N, D); 6 power iterations) whose Ritz values slightly
    underestimate the eigenvalues (docs/ops/spectral.md: accuracy); exact up to rounding when the sketch
    covers min(N, D), e.g. min(N, D) <= 128. With min(N, D) > 128 the CUDA op takes
    rank <= 112 (ValueError otherwise). On CPU the top eigenvalues are exact (eigvalsh).
    Not differentiable: with grad mode on, an x that requires grad raises a ValueError (pass
    x.detach()).
    """
    xb, single = checks.batched("spectral_ipr", "x", x)
    check_spectral_ipr(xb, rank, cuda=xb.is_cuda)
    out = torch.ops.tokenkern.spectral_ipr(xb, rank)
    return out[0] if single else out


def spectral_ipr_cpu(x: Tensor, rank: int = -1) -> Tensor:
    """The CPU kernel: x (B, N, D) -> (B,) float32."""
    x, r = check_spectral_ipr(x, rank, cuda=False)
    return cpu_spectral.spectral_ipr(x, r)


_op = custom_op(
    "tokenkern::spectral_ipr", spectral_ipr_cpu, mutates_args=(), schema="(Tensor x, int rank=-1) -> Tensor"
)


@_op.register_fake
def _spectral_ipr_fake(x: Tensor, rank: int = -1) -> Tensor:
    check_spectral_ipr(x, rank, cuda=checks.is_cuda(x))
    return x.new_empty(x.shape[0], dtype=torch.float32)


@_op.register_kernel("cuda")
def spectral_ipr_triton(x: Tensor, rank: int = -1) -> Tensor:
    """The CUDA kernel: x (B, N, D) -> (B,) float32."""
    x, r = check_spectral_ipr(x, rank, cuda=True)
    from .._triton import spectral

    return spectral.spectral_ipr(x, r)


register_refusal("spectral_ipr", ["x"])
