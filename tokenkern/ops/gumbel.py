"""gumbel_topk: a Gumbel top-k sample of the tokens, with gradients through a threshold
relaxation, and gumbel_topk_backward, its gradient.

Faces: the public function, the ``torch.library.custom_op`` schemas, the fake kernels, the
CPU kernel (``tokenkern._cpu.gumbel``, torch) and the CUDA kernel
(``tokenkern._triton.gumbel``, registered as ``gumbel_topk_triton``,
``gumbel_topk_soft_triton`` and ``gumbel_topk_backward_cuda``), and the autograd of
gumbel_topk and of gumbel_topk_soft (the soft forward that also returns each row's threshold,
``shift``, so that the backward does not search it again). Every face checks its
arguments with ``check`` / ``check_backward``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.library import custom_op

from .._cpu import gumbel as cpu_gumbel
from . import _args as checks

# The smallest temperature the ops accept: the CUDA kernel scales score differences by 1/tau
# in float32, so tau must be a normal float32 (GPUs flush subnormals) whose reciprocal is
# finite; 2^-126 is the smallest such number (its reciprocal, 2^126, is below float32's 2^128).
GUMBEL_MIN_TAU = 2.0**-126


def check(logits: object, k: int, tau: float, seed: int, hard: bool = True) -> None:
    """logits: (B, N) floating with N >= 1, 1 <= k <= N, tau finite and >= GUMBEL_MIN_TAU,
    0 <= seed < 2^63, hard a bool."""
    op = "gumbel_topk"
    logits = checks.tensor(op, "logits", logits)
    checks.ndim(op, "logits", logits, 2, "(B, N)")
    if not logits.dtype.is_floating_point:
        checks.fail(op, f"logits must be a floating tensor, got {checks.dtype_name(logits.dtype)}")
    if logits.shape[1] < 1:
        checks.fail(op, f"logits must have N >= 1 tokens, got shape {tuple(logits.shape)}")
    checks.int_range(op, "k", k, 1, logits.shape[1], " (1 <= k <= N)")
    if isinstance(tau, bool) or not isinstance(tau, float | int) or not (math.isfinite(tau) and tau > 0):
        checks.fail(op, f"tau must be a finite number > 0, got {tau!r}")
    if tau < GUMBEL_MIN_TAU:
        checks.fail(op, f"tau must be >= 2^-126 (~1.18e-38, so that 1/tau is a finite float32), got {tau!r}")
    checks.int_range(op, "seed", seed, 0, checks.INT64_MAX)
    checks.flag(op, "hard", hard)


def check_backward(grad: object, logits: object, k: int, tau: float, seed: int, shift: object = None) -> None:
    """check of the forward's arguments, plus grad: a floating tensor of logits' shape, and
    shift: None or the (B, 2) float64 tensor of ``gumbel_topk_soft``, on logits' device."""
    check(logits, k, tau, seed)
    op = "gumbel_topk_backward"
    if shift is not None:
        shift = checks.tensor(op, "shift", shift)
        want = (logits.shape[0], 2)  # type: ignore[union-attr]
        if tuple(shift.shape) != want or shift.dtype != torch.float64:
            checks.fail(
                op,
                f"shift must be a float64 tensor of shape {want}, got {checks.dtype_name(shift.dtype)} "
                f"of shape {tuple(shift.shape)}",
            )
        checks.same_device(op, [("logits", logits), ("shift", shift)])  # type: ignore[list-item]
    grad = checks.tensor(op, "grad", grad)
    if tuple(grad.shape) != tuple(logits.shape):  # type: ignore[union-attr]
        checks.fail(op, f"grad must have logits' shape {tuple(logits.shape)}, got {tuple(grad.shape)}")  # type: ignore[union-attr]
    if not grad.dtype.is_floating_point:
        checks.fail(op, f"grad must be a floating tensor, got {checks.dtype_name(grad.dtype)}")
    checks.same_device(op, [("logits", logits), ("grad", grad)])  # type: ignore[list-item]


# ---------------------------------------------------------------------------- public API


def gumbel_topk(logits: Tensor, k: int, tau: float = 1.0, seed: int = 0, hard: bool = True) -> Tensor:
    """Sample a k-subset of tokens by Gumbel top-k, with gradients through a relaxation.

    logits: (B, N) or (N,), any floating dtype. Returns a float32 mask of logits' shape.

    The perturbed scores ``z = float32(logits) + g`` add Gumbel(0, 1) noise g drawn from
    ``(seed, b, i)``; the draw depends on seed and on the device type (the CPU and CUDA
    kernels use different generators), and is the same on every call with the same seed.
    ``hard=True``: the value is the hard mask, exactly k ones per row at the k largest z (ties
    to the lower index, NaN as -inf), and the gradient is that of the soft relaxation
    (straight-through). ``hard=False``: the value is the threshold relaxation
    ``soft_i = sigmoid((z_i - lambda) / tau)`` with lambda (per row) such that
    ``sum_i soft_i = k``: in [0, 1] and summing to k by construction, tending to the hard mask
    as tau -> 0 when the z are distinct. On CUDA lambda is found without a host sync by a fixed
    number of bisection steps over the floating-point bit patterns (32 for float32); on CPU by
    safeguarded Newton steps over the same bit patterns to the same bracketing root (its last
    bits may differ from the reference's; docs/ops/gumbel.md), both in the shifted
    form ``(z - a) / tau`` around the k-th largest z (never z / tau alone, so huge |z| / tau
    loses nothing). +inf entries get 1 and -inf/NaN entries 0; a row without a finite lambda
    (at least k entries +inf, or at most k above -inf, e.g. k = N) gets the hard mask and
    gradient 0 (``reference.relaxed_topk``). tau must be finite and >= 2^-126 (the kernels
    scale by 1/tau in float32). The gradient w.r.t. logits is the exact one of the
    relaxation, by the implicit function theorem: for an incoming gradient ``w`` and
    ``s' = soft (1 - soft)``, ``grad_z = (s' / tau) * (w - sum(w s') / sum(s'))``; it comes
    back in logits' dtype.
    """
    single = isinstance(logits, Tensor) and logits.dim() == 1
    batched = logits.unsqueeze(0) if single else logits
    check(batched, k, tau, seed, hard)
    if hard:
        out = torch.ops.tokenkern.gumbel_topk(batched, k, tau, seed, hard)
    else:  # the soft forward keeps each row's threshold for the backward
        out = torch.ops.tokenkern.gumbel_topk_soft(batched, k, tau, seed)[0]
    return out[0] if single else out


# ------------------------------------------------------------------------------ gumbel_topk


def _gumbel_topk_cpu(logits: Tensor, k: int, tau: float, seed: int, hard: bool = True) -> Tensor:
    check(logits, k, tau, seed, hard)
    return cpu_gumbel.gumbel_topk(logits, k, tau, seed, hard)


_gumbel_topk_op = custom_op(
    "tokenkern::gumbel_topk",
    _gumbel_topk_cpu,
    mutates_args=(),
    schema="(Tensor logits, int k, float tau, int seed, bool hard=True) -> Tensor",
)


@_gumbel_topk_op.register_fake
def _gumbel_topk_fake(logits: Tensor, k: int, tau: float, seed: int, hard: bool = True) -> Tensor:
    check(logits, k, tau, seed, hard)
    return logits.new_empty(logits.shape, dtype=torch.float32)


@_gumbel_topk_op.register_kernel("cuda")
def gumbel_topk_triton(logits: Tensor, k: int, tau: float, seed: int, hard: bool = True) -> Tensor:
    check(logits, k, tau, seed, hard)
    from .._triton import gumbel

    return gumbel.gumbel_topk(logits, k, float(tau), seed, hard)[0]


def gumbel_topk_triton_with_noise(
    logits: Tensor, k: int, tau: float, seed: int, hard: bool = True
) -> tuple[Tensor, Tensor | None]:
    """The CUDA kernel, also returning the (B, N) float32 noise it drew (for the tests)."""
    check(logits, k, tau, seed, hard)
    from .._triton import gumbel

    return gumbel.gumbel_topk(logits, k, float(tau), seed, hard, return_noise=True)


# ------------------------------------------------------------------------- gumbel_topk_soft


def _gumbel_topk_soft_cpu(logits: Tensor, k: int, tau: float, seed: int) -> tuple[Tensor, Tensor]:
    """gumbel_topk(hard=False) and shift (B, 2) float64, each row's (anchor, u) of the
    relaxation (for gumbel_topk_backward, which then needs no search)."""
    check(logits, k, tau, seed, False)
    return cpu_gumbel.gumbel_topk_soft(logits, k, tau, seed)


_gumbel_topk_soft_op = custom_op(
    "tokenkern::gumbel_topk_soft",
    _gumbel_topk_soft_cpu,
    mutates_args=(),
    schema="(Tensor logits, int k, float tau, int seed) -> (Tensor, Tensor)",
)


@_gumbel_topk_soft_op.register_fake
def _gumbel_topk_soft_fake(logits: Tensor, k: int, tau: float, seed: int) -> tuple[Tensor, Tensor]:
    check(logits, k, tau, seed, False)
    return (
        logits.new_empty(logits.shape, dtype=torch.float32),
        logits.new_empty((logits.shape[0], 2), dtype=torch.float64),
    )


@_gumbel_topk_soft_op.register_kernel("cuda")
def gumbel_topk_soft_triton(logits: Tensor, k: int, tau: float, seed: int) -> tuple[Tensor, Tensor]:
    check(logits, k, tau, seed, False)
    from .._triton import gumbel

    shift = logits.new_empty((logits.shape[0], 2), dtype=torch.float64)
    return gumbel.gumbel_topk(logits, k, float(tau), seed, False, shift=shift)[0], shift


# --------------------------------------------------------------------- gumbel_topk_backward


def _gumbel_topk_backward_cpu(
    grad: Tensor, logits: Tensor, k: int, tau: float, seed: int, shift: Tensor | None = None
) -> Tensor:
    """Gradient of gumbel_topk w.r.t. logits (either value of hard): the vector-Jacobian
    product of the relaxation at the same perturbed scores, whose noise is drawn again from
    seed exactly as the forward drew it; with the forward's shift (gumbel_topk_soft) the
    threshold is not searched again."""
    check_backward(grad, logits, k, tau, seed, shift)
    z = cpu_gumbel.perturbed_scores(logits, seed)
    return cpu_gumbel.gumbel_topk_backward(grad, logits, z, k, tau, shift)


_gumbel_topk_backward_op = custom_op(
    "tokenkern::gumbel_topk_backward",
    _gumbel_topk_backward_cpu,
    mutates_args=(),
    schema="(Tensor grad, Tensor logits, int k, float tau, int seed, Tensor? shift=None) -> Tensor",
)


@_gumbel_topk_backward_op.register_fake
def _gumbel_topk_backward_fake(
    grad: Tensor, logits: Tensor, k: int, tau: float, seed: int, shift: Tensor | None = None
) -> Tensor:
    check_backward(grad, logits, k, tau, seed, shift)
    return torch.empty_like(logits)


@_gumbel_topk_backward_op.register_kernel("cuda")
def gumbel_topk_backward_cuda(
    grad: Tensor, logits: Tensor, k: int, tau: float, seed: int, shift: Tensor | None = None
) -> Tensor:
    check_backward(grad, logits, k, tau, seed, shift)
    from .._triton import gumbel

    return gumbel.gumbel_topk_backward(grad, logits, k, float(tau), seed, shift).to(logits.dtype)


# -------------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output) -> None:
    logits, k, tau, seed = inputs[:4]
    ctx.save_for_backward(logits)
    ctx.k, ctx.tau, ctx.seed = k, tau, seed


def _backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
    (logits,) = ctx.saved_tensors
    grad_logits = torch.ops.tokenkern.gumbel_topk_backward(grad, logits, ctx.k, ctx.tau, ctx.seed)
    return grad_logits, None, None, None, None


_gumbel_topk_op.register_autograd(_backward, setup_context=_setup_context)


def _setup_soft_context(ctx, inputs, output) -> None:
    logits, k, tau, seed = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.k, ctx.tau, ctx.seed = k, tau, seed


def _soft_backward(ctx, grad: Tensor, _grad_shift: Tensor | None) -> tuple[Tensor, None, None, None]:
    logits, shift = ctx.saved_tensors
    grad_logits = torch.ops.tokenkern.gumbel_topk_backward(grad, logits, ctx.k, ctx.tau, ctx.seed, shift)
    return grad_logits, None, None, None


_gumbel_topk_soft_op.register_autograd(_soft_backward, setup_context=_setup_soft_context)
