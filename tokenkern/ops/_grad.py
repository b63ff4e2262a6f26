"""Autograd of the tokenkern ops (gumbel_topk's lives beside it in tokenkern.ops).

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


def _register_selection(op: str, x_pos: int, n_inputs: int) -> None:
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


_register_selection("topk_gather", x_pos=1, n_inputs=3)
_register_selection("leverage_topk", x_pos=0, n_inputs=6)
_register_selection("attn_topk", x_pos=2, n_inputs=12)

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


def _merge_tokens_setup_context(ctx, inputs, output) -> None:
    x, keep_idx, metric, weight, topm, temperature, combine, query_metric, assign = inputs
    ctx.mark_non_differentiable(output[1])
    # metric=None means "x is the metric": pass it explicitly so that the one-hot replay
    # keeps x's assignment.
    ctx.save_for_backward(keep_idx, x if metric is None else metric, weight, query_metric)
    ctx.n = x.shape[1]
    ctx.options = (topm, temperature, combine, assign)


def _merge_tokens_backward(ctx, grad_merged, _grad_mass):
    if not ctx.needs_input_grad[0]:
        return (None,) * 9
    keep_idx, metric, weight, query_metric = ctx.saved_tensors
    topm, temperature, combine, assign = ctx.options

    def apply(x1: Tensor) -> Tensor:
        return torch.ops.tokenkern.merge_tokens(x1, keep_idx, metric.detach(), _const(weight), topm, temperature,
                                                combine, _const(query_metric), assign)[0]  # fmt: skip

    return (_linear_vjp(apply, grad_merged, ctx.n),) + (None,) * 8


register_autograd("tokenkern::merge_tokens", _merge_tokens_backward, setup_context=_merge_tokens_setup_context)


def _bipartite_merge_setup_context(ctx, inputs, output) -> None:
    x, metric, r, size, protect_first = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(metric, size)
    ctx.n = x.shape[1]
    ctx.options = (r, protect_first)


def _bipartite_merge_backward(ctx, grad_merged, _grad_size):
    if not ctx.needs_input_grad[0]:
        return (None,) * 5
    metric, size = ctx.saved_tensors
    r, protect_first = ctx.options

    def apply(x1: Tensor) -> Tensor:
        return torch.ops.tokenkern.bipartite_merge(x1, metric.detach(), r, _const(size), protect_first)[0]

    return (_linear_vjp(apply, grad_merged, ctx.n),) + (None,) * 4


register_autograd("tokenkern::bipartite_merge", _bipartite_merge_backward, setup_context=_bipartite_merge_setup_context)

# ---------------------------------------------------------------------------- score ops


def _register_refusal(op: str, names: Sequence[str]) -> None:
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


_register_refusal("leverage_scores", ["x"])
_register_refusal("spectral_ipr", ["x"])
_register_refusal("attn_scores", ["q", "k", "lse", "scale", "key_start", "key_end", "query_mask", "key_mask"])
