"""topk_gather: keep the k highest-scoring tokens and gather their rows, in one pass.

The selection rule every selection op of tokenkern shares: the k highest scores (ranked in
float32), ties to the lower index, NaN ranked as -inf, -0.0 as +0.0; the kept indices come
out int64 ascending (the tokens keep their order).

Faces: the public function; the ``torch.library.custom_op`` schema ``tokenkern::topk_gather``,
its fake kernel, its CPU kernel (the private C++ op ``tokenkern::_topk_gather_kernel``,
csrc/cpu/select_cpu.cpp, which asserts only its memory-safety invariants) and its CUDA kernel
(``topk_gather_triton``, tokenkern._triton.select), every one through ``check_topk_gather``
(the single source of the argument rules); the autograd (kept back-propagates to x into the
selected rows). Spec: ``tokenkern.reference.topk_gather``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op, register_fake

from .. import _C  # noqa: F401  (the private CPU kernel op)
from . import _args as checks
from ._grad import register_selection


def check_k(op: str, k: int, n: int) -> None:
    """The kept count of a selection over N tokens: a Python int with 1 <= k <= N."""
    checks.int_range(op, "k", k, 1, n, " (1 <= k <= N)")


def check_topk_gather(scores: object, x: object, k: int) -> None:
    """scores: (B, N) float32, x: (B, N, D) floating on scores' device, 1 <= k <= N."""
    op = "topk_gather"
    scores = checks.tensor(op, "scores", scores)
    x = checks.tensor(op, "x", x)
    checks.ndim(op, "scores", scores, 2, "(B, N)")
    checks.ndim(op, "x", x, 3, "(B, N, D)")
    checks.dtype(op, "scores", scores, (torch.float32,))
    if not x.dtype.is_floating_point:
        checks.fail(op, f"x must be a floating tensor, got {checks.dtype_name(x.dtype)}")
    checks.same_device(op, [("scores", scores), ("x", x)])
    if tuple(scores.shape) != tuple(x.shape[:2]):
        checks.fail(
            op, f"scores (B, N) must match x's first two dimensions, got {tuple(scores.shape)} and {tuple(x.shape)}"
        )
    check_k(op, k, x.shape[1])


def topk_gather(scores: Tensor, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Select the k highest-scoring tokens and gather them in one pass.

    scores: (B, N) (any floating dtype; ranked in float32), x: (B, N, D).
    Returns kept (B, k, D) in x's dtype and indices (B, k) int64 ascending. Ties go to the
    lower index; NaN ranks as -inf; ``kept[b, j] = x[b, indices[b, j]]``.
    Gradients: kept back-propagates to x (into the selected rows); scores only rank and get
    no gradient; indices are not differentiable.
    """
    if isinstance(scores, Tensor) and scores.is_floating_point() and scores.dtype != torch.float32:
        scores = scores.float()
    check_topk_gather(scores, x, k)
    return torch.ops.tokenkern.topk_gather(scores, x, k)


_SCHEMA = "(Tensor scores, Tensor x, int k) -> (Tensor kept, Tensor indices)"


@custom_op("tokenkern::topk_gather", mutates_args=(), device_types="cpu", schema=_SCHEMA)
def topk_gather_cpu(scores: Tensor, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The CPU kernel: scores (B, N) float32, x (B, N, D) -> kept (B, k, D), indices (B, k)."""
    check_topk_gather(scores, x, k)
    return torch.ops.tokenkern._topk_gather_kernel(scores, x, k)


@topk_gather_cpu.register_fake
def _topk_gather_fake(scores: Tensor, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    check_topk_gather(scores, x, k)
    batch = scores.shape[0]
    return x.new_empty(batch, k, x.shape[2]), scores.new_empty(batch, k, dtype=torch.int64)


@topk_gather_cpu.register_kernel("cuda")
def topk_gather_triton(scores: Tensor, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The CUDA kernel: scores (B, N) float32, x (B, N, D) -> kept (B, k, D), indices (B, k)."""
    check_topk_gather(scores, x, k)
    from .._triton.select import topk_gather as launch

    return launch(scores, x, k)


@register_fake("tokenkern::_topk_gather_kernel")
def _topk_gather_kernel_fake(scores: Tensor, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    batch = scores.shape[0]
    return x.new_empty(batch, k, x.shape[2]), scores.new_empty(batch, k, dtype=torch.int64)


register_selection("topk_gather", x_pos=1, n_inputs=3)
