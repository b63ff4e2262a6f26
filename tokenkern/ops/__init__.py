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

from .. import _C  # noqa: F401  (loads the C++ op schemas and kernels)
from .._cpu import attention as cpu_attention
from .._cpu import gumbel as cpu_gumbel
from .._cpu import leverage as cpu_leverage
from .._cpu import spectral as cpu_spectral
from . import _args as checks

# --------------------------------------------------------------------------- topk_gather


@register_fake("tokenkern::topk_gather")
def _topk_gather_fake(scores: Tensor, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    checks.topk_gather(scores, x, k)
    batch = scores.shape[0]
    return x.new_empty(batch, k, x.shape[2]), scores.new_empty(batch, k, dtype=torch.int64)


def topk_gather_triton(scores: Tensor, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    checks.topk_gather(scores, x, k)
    from .._triton.topk_gather import topk_gather

    return topk_gather(scores, x, k)


register_kernel("tokenkern::topk_gather", "cuda", topk_gather_triton)

# ----------------------------------------------------------------------- leverage scores

_LEVERAGE_ARGS = "int rank=32, int oversample=8, int power_iters=2, int seed=0"


def _leverage_sizes(op: str, x: object, rank: int, oversample: int, power_iters: int, seed: int, cuda: bool):
    x = checks.tokens(op, "x", x)
    r, l = checks.svd_sketch(op, x.shape[1], x.shape[2], rank, oversample, power_iters, seed, cuda)
    return x, r, l


def _is_cuda(x: object) -> bool:
    return isinstance(x, Tensor) and x.device.type == "cuda"


@custom_op("tokenkern::leverage_scores", mutates_args=(), schema=f"(Tensor x, {_LEVERAGE_ARGS}) -> Tensor")
def leverage_scores(x: Tensor, rank: int = 32, oversample: int = 8, power_iters: int = 2, seed: int = 0) -> Tensor:
    x, r, l = _leverage_sizes("leverage_scores", x, rank, oversample, power_iters, seed, cuda=False)
    return cpu_leverage.leverage_scores(x, r, l, power_iters, seed)


@leverage_scores.register_fake
def _leverage_scores_fake(x, rank=32, oversample=8, power_iters=2, seed=0):
    _leverage_sizes("leverage_scores", x, rank, oversample, power_iters, seed, cuda=_is_cuda(x))
    return x.new_empty(x.shape[0], x.shape[1], dtype=torch.float32)


@leverage_scores.register_kernel("cuda")
def leverage_scores_triton(x, rank=32, oversample=8, power_iters=2, seed=0):
    x, r, l = _leverage_sizes("leverage_scores", x, rank, oversample, power_iters, seed, cuda=True)
    from .._triton import leverage

    return leverage.leverage_scores(x, r, l, power_iters, seed)


def _leverage_topk_sizes(x, k, rank, oversample, power_iters, seed, cuda: bool):
    x, r, l = _leverage_sizes("leverage_topk", x, rank, oversample, power_iters, seed, cuda)
    checks.int_range("leverage_topk", "k", k, 1, x.shape[1], " (1 <= k <= N)")
    return x, r, l


@custom_op(
    "tokenkern::leverage_topk",
    mutates_args=(),
    schema=f"(Tensor x, int k, {_LEVERAGE_ARGS}) -> (Tensor kept, Tensor indices, Tensor scores)",
)
def leverage_topk(
    x: Tensor, k: int, rank: int = 32, oversample: int = 8, power_iters: int = 2, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    x, r, l = _leverage_topk_sizes(x, k, rank, oversample, power_iters, seed, cuda=False)
    scores = cpu_leverage.leverage_scores(x, r, l, power_iters, seed)
    kept, indices = torch.ops.tokenkern.topk_gather(scores, x, k)
    return kept, indices, scores


@leverage_topk.register_fake
def _leverage_topk_fake(x, k, rank=32, oversample=8, power_iters=2, seed=0):
    _leverage_topk_sizes(x, k, rank, oversample, power_iters, seed, cuda=_is_cuda(x))
    batch, n, d = x.shape
    return (
        x.new_empty(batch, k, d),
        x.new_empty(batch, k, dtype=torch.int64),
        x.new_empty(batch, n, dtype=torch.float32),
    )


@leverage_topk.register_kernel("cuda")
def leverage_topk_triton(x, k, rank=32, oversample=8, power_iters=2, seed=0):
    x, r, l = _leverage_topk_sizes(x, k, rank, oversample, power_iters, seed, cuda=True)
    from .._triton import leverage
    from .._triton.topk_gather import topk_gather

    scores = leverage.leverage_scores(x, r, l, power_iters, seed)
    kept, indices = topk_gather(scores, x, k)
    return kept, indices, scores


# ------------------------------------------------------------------------- spectral IPR


@custom_op("tokenkern::spectral_ipr", mutates_args=(), schema="(Tensor x, int rank=-1) -> Tensor")
def spectral_ipr(x: Tensor, rank: int = -1) -> Tensor:
    x, r = checks.spectral_ipr(x, rank, cuda=False)
    return cpu_spectral.spectral_ipr(x, r)


@spectral_ipr.register_fake
def _spectral_ipr_fake(x, rank=-1):
    checks.spectral_ipr(x, rank, cuda=_is_cuda(x))
    return x.new_empty(x.shape[0], dtype=torch.float32)


@spectral_ipr.register_kernel("cuda")
def spectral_ipr_triton(x, rank=-1):
    x, r = checks.spectral_ipr(x, rank, cuda=True)
    from .._triton import spectral

    l = None if r is None else checks.spectral_sketch(min(x.shape[1], x.shape[2]), r)
    return spectral.spectral_ipr(x, r, l)


# ---------------------------------------------------------------------- attention scores

_ATTN_ARGS = (
    "Tensor? lse=None, float? scale=None, int key_start=0, int key_end=-1, "
    'Tensor? query_mask=None, Tensor? key_mask=None, bool causal=False, str reduce="mean"'
)


def _attn_checked(op, q, k, lse, scale, key_start, key_end, query_mask, key_mask, causal, reduce):
    end, sc = checks.attention(op, q, k, lse, scale, key_start, key_end, query_mask, key_mask, causal, reduce)
    return dict(lse=lse, scale=sc, key_start=key_start, key_end=end, query_mask=query_mask, key_mask=key_mask,
                causal=causal, mean=reduce == "mean")  # fmt: skip


@custom_op("tokenkern::attn_scores", mutates_args=(), schema=f"(Tensor q, Tensor k, {_ATTN_ARGS}) -> Tensor")
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
    args = _attn_checked("attn_scores", q, k, lse, scale, key_start, key_end, query_mask, key_mask, causal, reduce)
    return cpu_attention.attention_scores(q, k, **args)


@attn_scores.register_fake
def _attn_scores_fake(q, k, lse=None, scale=None, key_start=0, key_end=-1, query_mask=None, key_mask=None,
                      causal=False, reduce="mean"):  # fmt: skip
    args = _attn_checked("attn_scores", q, k, lse, scale, key_start, key_end, query_mask, key_mask, causal, reduce)
    return q.new_empty(q.shape[0], args["key_end"] - key_start, dtype=torch.float32)


@attn_scores.register_kernel("cuda")
def attn_scores_triton(q, k, lse=None, scale=None, key_start=0, key_end=-1, query_mask=None, key_mask=None,
                       causal=False, reduce="mean"):  # fmt: skip
    args = _attn_checked("attn_scores", q, k, lse, scale, key_start, key_end, query_mask, key_mask, causal, reduce)
    from .._triton.attention import attention_scores

    return attention_scores(q, k, **args)


def _attn_topk_checked(q, k, x, n_keep, *rest):
    args = _attn_checked("attn_topk", q, k, *rest)
    n = args["key_end"] - args["key_start"]
    x = checks.tensor("attn_topk", "x", x)
    checks.ndim("attn_topk", "x", x, 3, "(B, key_end - key_start, D)")
    if x.shape[0] != q.shape[0] or x.shape[1] != n:
        expected = f"({q.shape[0]}, {n}, D)"
        checks.fail("attn_topk", f"x must be (B, key_end - key_start, D) = {expected}, got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        checks.fail("attn_topk", f"x must be a floating tensor, got {checks.dtype_name(x.dtype)}")
    checks.same_device("attn_topk", [("q", q), ("x", x)])
    checks.keep_count("attn_topk", "n_keep", n_keep, n)
    return args


@custom_op(
    "tokenkern::attn_topk",
    mutates_args=(),
    schema=f"(Tensor q, Tensor k, Tensor x, int n_keep, {_ATTN_ARGS}) -> (Tensor kept, Tensor indices, Tensor scores)",
)
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
    args = _attn_topk_checked(q, k, x, n_keep, lse, scale, key_start, key_end, query_mask, key_mask, causal, reduce)
    scores = cpu_attention.attention_scores(q, k, **args)
    kept, indices = torch.ops.tokenkern.topk_gather(scores, x, n_keep)
    return kept, indices, scores


@attn_topk.register_fake
def _attn_topk_fake(q, k, x, n_keep, lse=None, scale=None, key_start=0, key_end=-1, query_mask=None,
                    key_mask=None, causal=False, reduce="mean"):  # fmt: skip
    args = _attn_topk_checked(q, k, x, n_keep, lse, scale, key_start, key_end, query_mask, key_mask, causal, reduce)
    b = q.shape[0]
    return (
        x.new_empty(b, n_keep, x.shape[2]),
        x.new_empty(b, n_keep, dtype=torch.int64),
        x.new_empty(b, args["key_end"] - key_start, dtype=torch.float32),
    )


@attn_topk.register_kernel("cuda")
def attn_topk_triton(q, k, x, n_keep, lse=None, scale=None, key_start=0, key_end=-1, query_mask=None,
                     key_mask=None, causal=False, reduce="mean"):  # fmt: skip
    args = _attn_topk_checked(q, k, x, n_keep, lse, scale, key_start, key_end, query_mask, key_mask, causal, reduce)
    from .._triton.attention import attention_scores
    from .._triton.topk_gather import topk_gather

    scores = attention_scores(q, k, **args)
    kept, indices = topk_gather(scores, x, n_keep)
    return kept, indices, scores


# ---------------------------------------------------------------------------- gumbel_topk


@custom_op(
    "tokenkern::gumbel_topk",
    mutates_args=(),
    schema="(Tensor logits, int k, float tau, int seed, bool hard=True) -> Tensor",
)
def gumbel_topk(logits: Tensor, k: int, tau: float, seed: int, hard: bool = True) -> Tensor:
    checks.gumbel_topk(logits, k, tau, seed)
    return cpu_gumbel.gumbel_topk(logits, k, tau, seed, hard)


@gumbel_topk.register_fake
def _gumbel_topk_fake(logits, k, tau, seed, hard=True):
    checks.gumbel_topk(logits, k, tau, seed)
    return logits.new_empty(logits.shape, dtype=torch.float32)


@gumbel_topk.register_kernel("cuda")
def gumbel_topk_triton(logits, k, tau, seed, hard=True):
    checks.gumbel_topk(logits, k, tau, seed)
    from .._triton import gumbel

    return gumbel.gumbel_topk(logits, k, float(tau), seed, hard)[0]


def gumbel_topk_triton_with_noise(logits, k, tau, seed, hard=True) -> tuple[Tensor, Tensor]:
    """The CUDA kernel, also returning the noise it drew (for the tests)."""
    checks.gumbel_topk(logits, k, tau, seed)
    from .._triton import gumbel

    return gumbel.gumbel_topk(logits, k, float(tau), seed, hard, return_noise=True)


@custom_op(
    "tokenkern::gumbel_topk_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor logits, int k, float tau, int seed) -> Tensor",
)
def gumbel_topk_backward(grad: Tensor, logits: Tensor, k: int, tau: float, seed: int) -> Tensor:
    """Gradient of gumbel_topk w.r.t. logits (either value of hard): the vector-Jacobian
    product of the relaxation at the same perturbed scores, whose noise is drawn again from
    seed exactly as the forward drew it."""
    checks.gumbel_topk_backward(grad, logits, k, tau, seed)
    z = logits.float() + cpu_gumbel.noise(logits.shape[0], logits.shape[1], seed, logits.device)
    return cpu_gumbel.gumbel_topk_backward(grad, logits, z, k, tau)


@gumbel_topk_backward.register_fake
def _gumbel_topk_backward_fake(grad, logits, k, tau, seed):
    checks.gumbel_topk_backward(grad, logits, k, tau, seed)
    return torch.empty_like(logits)


@gumbel_topk_backward.register_kernel("cuda")
def gumbel_topk_backward_cuda(grad, logits, k, tau, seed):
    checks.gumbel_topk_backward(grad, logits, k, tau, seed)
    from .._triton import gumbel

    return gumbel.gumbel_topk_backward(grad, logits, k, float(tau), seed).to(logits.dtype)


def _gumbel_topk_setup_context(ctx, inputs, output):
    logits, k, tau, seed = inputs[:4]
    ctx.save_for_backward(logits)
    ctx.k, ctx.tau, ctx.seed = k, tau, seed


def _gumbel_topk_autograd(ctx, grad):
    (logits,) = ctx.saved_tensors
    grad_logits = torch.ops.tokenkern.gumbel_topk_backward(grad, logits, ctx.k, ctx.tau, ctx.seed)
    return grad_logits, None, None, None, None


gumbel_topk.register_autograd(_gumbel_topk_autograd, setup_context=_gumbel_topk_setup_context)


# ------------------------------------------------------------------------ merge ops (C++)


@register_fake("tokenkern::merge_tokens")
def _merge_tokens_fake(x, keep_idx, metric=None, weight=None, topm=1, temperature=0.0, combine="mean",
                       query_metric=None, assign="dropped"):  # fmt: skip
    k, d = checks.merge_tokens(x, keep_idx, metric, weight, topm, temperature, combine, query_metric, assign)
    return x.new_empty(x.shape[0], k, d), x.new_empty(x.shape[0], k, dtype=torch.float32)


@register_fake("tokenkern::bipartite_merge")
def _bipartite_merge_fake(x, metric, r, size=None, protect_first=False):
    n = checks.bipartite_merge(x, metric, r, size, protect_first)
    return x.new_empty(x.shape[0], n - r, x.shape[2]), x.new_empty(x.shape[0], n - r, dtype=torch.float32)

from . import _grad  # noqa: E402, F401  (autograd of every other op)
