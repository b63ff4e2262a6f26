"""attn_scores and attn_topk: the softmax attention mass each key receives (without the
attention matrix), and the n_keep best keys' tokens gathered.

Faces: the public functions, the ``torch.library.custom_op`` schemas, the fake kernels, the
CPU kernel (``tokenkern._cpu.attention``: torch, and the private C++ op
``tokenkern::_attn_scores_kernel`` for few queries) and the CUDA kernel
(``tokenkern._triton.attention``, registered as ``attn_scores_triton`` / ``attn_topk_triton``).
Every face reads its arguments through ``kernel_args``: one check, one resolution of the
defaults and of the causal rule, whatever runs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.library import custom_op, register_fake

from .._cpu import attention as cpu_attention
from . import _args as checks
from ._grad import register_refusal, register_selection

REDUCTIONS = ("mean", "sum")
MAX_HEAD_DIM = 256

# The arguments after q, k (attn_scores) and after q, k, x, n_keep (attn_topk), in schema form.
_ARGS_SCHEMA = (
    "Tensor? lse=None, float? scale=None, int key_start=0, int key_end=-1, "
    'Tensor? query_mask=None, Tensor? key_mask=None, bool causal=False, str reduce="mean"'
)


class KernelArgs(NamedTuple):
    """The arguments after q and k, checked and resolved as both kernels take them
    (``attention_scores(q, k, **args._asdict())``)."""

    lse: Tensor | None
    scale: float  # d^-0.5 when not given
    key_start: int
    key_end: int  # -1 resolved to Nk
    query_mask: Tensor | None
    key_mask: Tensor | None
    # None when not causal. Causal: key j is visible to query i iff j <= i + causal_offset,
    # with causal_offset = Nk - Nq (the queries are the last Nq of the Nk positions).
    causal_offset: int | None
    mean: bool  # reduce == "mean"


def kernel_args(
    op: str,
    q: object,
    k: object,
    lse: object = None,
    scale: float | None = None,
    key_start: int = 0,
    key_end: int = -1,
    query_mask: object = None,
    key_mask: object = None,
    causal: bool = False,
    reduce: str = "mean",
) -> KernelArgs:
    """Checks the attention arguments (messages name ``op``) and resolves them for the
    kernels. The defaults are the schema's: the dispatcher leaves out trailing arguments
    that equal their default."""
    q, k = _qk(op, q, k)
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    checks.same_device(op, [("q", q), ("k", k), ("lse", lse), ("query_mask", query_mask), ("key_mask", key_mask)])
    if lse is not None:
        lse = checks.tensor(op, "lse", lse)
        if tuple(lse.shape) != (b, hq, nq):
            checks.fail(op, f"lse must be (B, Hq, Nq) = {(b, hq, nq)}, got {tuple(lse.shape)}")
        checks.dtype(op, "lse", lse, (torch.float32,))
    _mask(op, "query_mask", query_mask, "(B, Nq)", (b, nq))
    _mask(op, "key_mask", key_mask, "(B, Nk)", (b, nk))
    end = _key_end(op, key_start, key_end, nk)
    if scale is not None:
        checks.number(op, "scale", scale)
    checks.flag(op, "causal", causal)
    if reduce not in REDUCTIONS:
        checks.fail(op, f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    return KernelArgs(
        lse=lse,
        scale=d**-0.5 if scale is None else float(scale),
        key_start=key_start,
        key_end=end,
        query_mask=query_mask,
        key_mask=key_mask,
        causal_offset=nk - nq if causal else None,
        mean=reduce == "mean",
    )


def _qk(op: str, q: object, k: object) -> tuple[Tensor, Tensor]:
    """q: (B, Hq, Nq, d), k: (B, Hkv, Nk, d) of one floating dtype, Hkv | Hq, 1 <= d <= 256."""
    q = checks.tensor(op, "q", q)
    k = checks.tensor(op, "k", k)
    checks.ndim(op, "q", q, 4, "(B, Hq, Nq, d)")
    checks.ndim(op, "k", k, 4, "(B, Hkv, Nk, d)")
    checks.dtype(op, "q", q)
    if k.dtype != q.dtype:
        checks.fail(op, f"k must have q's dtype {checks.dtype_name(q.dtype)}, got {checks.dtype_name(k.dtype)}")
    b, hq, nq, d = q.shape
    kb, hkv, nk, kd = k.shape
    if kb != b:
        checks.fail(op, f"k has batch size {kb} but q has {b}")
    if kd != d:
        checks.fail(op, f"k has head dim {kd} but q has {d}")
    if not 1 <= d <= MAX_HEAD_DIM:
        checks.fail(op, f"head dim d must be in [1, {MAX_HEAD_DIM}], got {d}")
    if hq < 1 or hkv < 1:
        checks.fail(op, f"q and k must have at least one head each, got Hq={hq}, Hkv={hkv}")
    if hq % hkv != 0:
        checks.fail(op, f"query heads Hq={hq} must be a multiple of key heads Hkv={hkv}")
    if nq < 1 or nk < 1:
        checks.fail(op, f"q and k need at least one position each, got Nq={nq}, Nk={nk}")
    return q, k


def _mask(op: str, name: str, mask: object, layout: str, shape: tuple[int, int]) -> None:
    if mask is None:
        return
    mask = checks.tensor(op, name, mask)
    if tuple(mask.shape) != shape:
        checks.fail(op, f"{name} must be {layout} = {shape}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        checks.fail(op, f"{name} must have dtype bool, got {checks.dtype_name(mask.dtype)}")


def _key_end(op: str, key_start: int, key_end: int, nk: int) -> int:
    """0 <= key_start < key_end <= Nk; returns key_end with -1 resolved to Nk."""
    checks.int_range(op, "key_start", key_start, 0, nk - 1, f" (0 <= key_start < Nk={nk})")
    checks.integer(op, "key_end", key_end)
    end = nk if key_end == -1 else key_end
    if not key_start < end <= nk:
        checks.fail(op, f"key_end must be -1 or in ({key_start}, {nk}] (key_start < key_end <= Nk), got {key_end}")
    return end


def _topk_args(q: Tensor, k: Tensor, x: object, n_keep: int, *args, **kwargs) -> KernelArgs:
    """kernel_args of attn_topk, plus x: (B, key_end - key_start, D) and 1 <= n_keep <= that."""
    op = "attn_topk"
    a = kernel_args(op, q, k, *args, **kwargs)
    n = a.key_end - a.key_start
    x = checks.tensor(op, "x", x)
    checks.ndim(op, "x", x, 3, "(B, key_end - key_start, D)")
    if x.shape[0] != q.shape[0] or x.shape[1] != n:
        expected = f"({q.shape[0]}, {n}, D)"
        checks.fail(op, f"x must be (B, key_end - key_start, D) = {expected}, got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        checks.fail(op, f"x must be a floating tensor, got {checks.dtype_name(x.dtype)}")
    checks.same_device(op, [("q", q), ("x", x)])
    checks.keep_count(op, "n_keep", n_keep, n)
    return a


# ---------------------------------------------------------------------------- public API


def attn_scores(
    q: Tensor,
    k: Tensor,
    lse: Tensor | None = None,
    scale: float | None = None,
    key_start: int = 0,
    key_end: int = -1,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
    causal: bool = False,
    reduce: str = "mean",
) -> Tensor:
    """Softmax attention mass each key receives, without materializing the attention matrix.

    q: (B, Hq, Nq, d), k: (B, Hkv, Nk, d), Hq a multiple of Hkv (GQA/MQA: query head h reads
    key head h // (Hq / Hkv)), head dim 1..256, float32/float16/bfloat16.
    Key j is visible to query i when ``key_mask[b, j]`` (default all) and, if causal,
    ``j <= Nk - Nq + i`` (the queries are the last Nq positions). ``P = softmax(scale * q.k)``
    over the visible keys (scale defaults to d^-0.5). A query is valid when
    ``query_mask[b, i]`` (default all) and it sees at least one key.
    Returns (B, key_end - key_start) float32:
    ``sum_h sum_{valid i} P[b, h, i, j]`` for j in [key_start, key_end) (key_end=-1: Nk),
    divided by Hq x (number of valid queries of b) when reduce="mean". The softmax is
    normalized over the full key row; the slice only picks the columns returned.
    NaN follows the float64 softmax: a NaN in q or in a visible key's k makes the rows of the
    valid queries it reaches NaN, so every key they see scores NaN (with lse, a NaN in k[j]
    reaches key j only), and a NaN in a masked key or an invalid query is ignored.
    The logits ``scale * q.k`` (and q.k) are formed in float32 and must stay below 1e37 in
    magnitude; without lse, any such logits give the exact softmax (e.g. one-hot rows at
    scale=1e10), while a caller's lse brings its float32 rounding (|lse| x 6e-8) into the
    exponent.

    lse: optional (B, Hq, Nq) float32 natural-log log-sum-exp of ``scale * q.k`` over the
    visible keys, as returned by the attention that already ran. With it, the op makes a
    single pass over K. Rows whose lse is not finite contribute nothing. docs/integrations.md
    ("Reusing the attention's log-sum-exp") shows how to obtain it from FlashAttention,
    FlexAttention and SDPA (and the base-2 pitfall).

    Not differentiable: with grad mode on, a q, k or lse that requires grad raises a
    ValueError (pass .detach(): scores rank tokens and carry no gradient).
    """
    args = (q, k, lse, scale, key_start, key_end, query_mask, key_mask, causal, reduce)
    kernel_args("attn_scores", *args)
    return torch.ops.tokenkern.attn_scores(*args)


def attn_topk(
    q: Tensor,
    k: Tensor,
    x: Tensor,
    n_keep: int,
    lse: Tensor | None = None,
    scale: float | None = None,
    key_start: int = 0,
    key_end: int = -1,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
    causal: bool = False,
    reduce: str = "mean",
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`attn_scores` over keys [key_start, key_end), then :func:`topk_gather` of the
    n_keep best. x: (B, key_end - key_start, D), the tokens of that key range (e.g. the image
    tokens). Returns kept (B, n_keep, D), indices (B, n_keep) int64 ascending and relative to
    key_start (add key_start for sequence positions), scores (B, key_end - key_start) float32.
    Gradients: kept back-propagates to x; q, k and lse only rank and get no gradient; indices
    and scores are not differentiable.
    """
    args = (q, k, x, n_keep, lse, scale, key_start, key_end, query_mask, key_mask, causal, reduce)
    _topk_args(*args)
    return torch.ops.tokenkern.attn_topk(*args)


# ------------------------------------------------------------------------------ attn_scores


def _scores_cpu(q: Tensor, k: Tensor, *args, **kwargs) -> Tensor:
    return cpu_attention.attention_scores(q, k, **kernel_args("attn_scores", q, k, *args, **kwargs)._asdict())


_scores_op = custom_op(
    "tokenkern::attn_scores", _scores_cpu, mutates_args=(), schema=f"(Tensor q, Tensor k, {_ARGS_SCHEMA}) -> Tensor"
)


@_scores_op.register_fake
def _scores_fake(q: Tensor, k: Tensor, *args, **kwargs) -> Tensor:
    a = kernel_args("attn_scores", q, k, *args, **kwargs)
    return q.new_empty(q.shape[0], a.key_end - a.key_start, dtype=torch.float32)


@_scores_op.register_kernel("cuda")
def attn_scores_triton(q: Tensor, k: Tensor, *args, **kwargs) -> Tensor:
    a = kernel_args("attn_scores", q, k, *args, **kwargs)
    from .._triton.attention import attention_scores

    return attention_scores(q, k, **a._asdict())


@register_fake("tokenkern::_attn_scores_kernel")
def _scores_kernel_fake(
    q: Tensor, k: Tensor, lse: Tensor | None, scale: float, key_start: int, key_end: int, *args: object
) -> Tensor:
    """The C++ CPU kernel of few queries (tokenkern._cpu.attention): (B, key_end - key_start)."""
    return q.new_empty(q.shape[0], key_end - key_start, dtype=torch.float32)


register_refusal("attn_scores", ["q", "k", "lse", "scale", "key_start", "key_end", "query_mask", "key_mask"])

# -------------------------------------------------------------------------------- attn_topk


def _topk_cpu(q: Tensor, k: Tensor, x: Tensor, n_keep: int, *args, **kwargs) -> tuple[Tensor, Tensor, Tensor]:
    a = _topk_args(q, k, x, n_keep, *args, **kwargs)
    scores = cpu_attention.attention_scores(q, k, **a._asdict())
    kept, indices = torch.ops.tokenkern.topk_gather(scores, x, n_keep)
    return kept, indices, scores


_topk_op = custom_op(
    "tokenkern::attn_topk",
    _topk_cpu,
    mutates_args=(),
    schema=f"(Tensor q, Tensor k, Tensor x, int n_keep, {_ARGS_SCHEMA}) "
    "-> (Tensor kept, Tensor indices, Tensor scores)",
)


@_topk_op.register_fake
def _topk_fake(q: Tensor, k: Tensor, x: Tensor, n_keep: int, *args, **kwargs) -> tuple[Tensor, Tensor, Tensor]:
    a = _topk_args(q, k, x, n_keep, *args, **kwargs)
    b = q.shape[0]
    return (
        x.new_empty(b, n_keep, x.shape[2]),
        x.new_empty(b, n_keep, dtype=torch.int64),
        x.new_empty(b, a.key_end - a.key_start, dtype=torch.float32),
    )


@_topk_op.register_kernel("cuda")
def attn_topk_triton(q: Tensor, k: Tensor, x: Tensor, n_keep: int, *args, **kwargs) -> tuple[Tensor, Tensor, Tensor]:
    a = _topk_args(q, k, x, n_keep, *args, **kwargs)
    from .._triton.attention import attention_topk

    return attention_topk(q, k, x, n_keep, **a._asdict())


register_selection("attn_topk", x_pos=2, n_inputs=12)
