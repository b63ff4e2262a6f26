"""Autograd helpers shared by the op families; each family module registers its own ops'
autograd with them (gumbel_topk's backward is its own op, in tokenkern.ops.gumbel).

The rule: an output linear in the tokens x (kept tokens, merged tokens) gets its exact
backward, with the selection or the merge assignment held constant (a stop-gradient through
scores, q/k, metric, query_metric, weight and size, and through x itself where it serves as
the metric). Index, score and mass outputs are non-differentiable; arguments that only rank
tokens get no gradient. The pure score ops (leverage_scores, spectral_ipr, attn_scores) have
no such output: called with grad mode on and an input that requires grad, they raise a
ValueError at call time instead of failing later inside backward().
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.library import register_autograd

from . import _args as checks

# Largest one-hot block (elements) built at once to read off a merge's linear map.
_ONE_HOT_ELEMENTS = 1 << 24

# ----------------------------------------------------------------------------- selection


def _scatter_rows(grad: Tensor, indices: Tensor, n: int) -> Tensor:
    """grad: (B, k, D), indices: (B, k) unique per row -> (B, n, D): grad's rows at indices,
    zeros elsewhere (the adjoint of gathering rows)."""
    b, _, d = grad.shape
    return grad.new_zeros(b, n, d).scatter(1, indices[..., None].expand(-1, -1, d), grad)


def register_selection(op: str, x_pos: int, n_inputs: int) -> None:
    """An op returning (kept, indices, *scores) with kept[b, j] = x[b, indices[b, j]]:
    gradient to x only (input x_pos of n_inputs)."""

    def setup_context(ctx, inputs, output) -> None:
        x = inputs[x_pos]
        indices = output[1]
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(indices)
        ctx.n = x.shape[1]

    def backward(ctx, grad_kept, *_):
        grads: list[Tensor | None] = [None] * n_inputs
        if ctx.needs_input_grad[x_pos]:
            (indices,) = ctx.saved_tensors
            grads[x_pos] = _scatter_rows(grad_kept, indices, ctx.n)
        return tuple(grads)

    register_autograd(f"tokenkern::{op}", backward, setup_context=setup_context)


# -------------------------------------------------------------------------------- merges


def _one_hot_block(b: int, n: int, start: int, width: int, device: torch.device) -> Tensor:
    """(B, n, width) float32: row i is the unit vector e_{i - start} for i in
    [start, start + width), zero otherwise."""
    rows = torch.arange(n, device=device)[:, None]
    cols = torch.arange(start, start + width, device=device)[None, :]
    return (rows == cols).to(torch.float32).expand(b, n, width).contiguous()


def _linear_vjp(apply: Callable[[Tensor], Tensor], grad: Tensor, n: int) -> Tensor:
    """Backward of merged = M x, where apply(x') runs the op on (B, n, C) tokens x' with the
    same assignment. grad: (B, K, D) -> M^T grad (B, n, D) in grad's dtype.

    M is read off in column blocks, M[:, :, block] = apply(one-hot rows of the block), so at
    most _ONE_HOT_ELEMENTS one-hot floats (and B K width floats of M) exist at a time."""
    b, _, d = grad.shape
    g = grad.float()
    width = max(1, _ONE_HOT_ELEMENTS // max(1, b * n))
    parts = [grad.new_zeros(b, 0, d, dtype=torch.float32)]  # n = 0: no block
    for start in range(0, n, width):
        block = _one_hot_block(b, n, start, min(width, n - start), grad.device)
        parts.append(apply(block).mT @ g)  # (B, width, K) @ (B, K, D)
    return torch.cat(parts, dim=1).to(grad.dtype)


def _const(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


# ---------------------------------------------------------------------------- score ops


def register_refusal(op: str, names: Sequence[str]) -> None:
    """A pure score op: with grad mode on, an input (named in names, in schema order) that
    requires grad is refused at call time (torch runs setup_context only in that case)."""

    def setup_context(ctx, inputs, output) -> None:
        for name, value in zip(names, inputs, strict=False):
            if isinstance(value, Tensor) and value.requires_grad:
                checks.fail(op, f"not differentiable in {name}; pass {name}.detach() "
                                "(scores rank tokens and carry no gradient)")  # fmt: skip

    def backward(ctx, *grads):
        raise RuntimeError(f"tokenkern.{op}: not differentiable")  # setup_context refused first

    register_autograd(f"tokenkern::{op}", backward, setup_context=setup_context)
