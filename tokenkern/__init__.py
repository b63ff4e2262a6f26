"""tokenkern: fused kernels that score, select and merge visual tokens.

Every function here is a thin wrapper over an op of ``torch.ops.tokenkern`` (see
``tokenkern.ops``); the ops themselves take batched inputs, the wrappers also accept a
single sample where noted. Selection ops return int64 indices sorted ascending, break score
ties by the lower index, and return float32 scores whatever the input dtype.

Arguments: counts, seeds and positions are Python ints (not bools, floats or tensors, 0-d
ones included) within int64 and their documented ranges; scale, temperature and tau are
finite Python numbers within float32's range; flags are bools. These functions check every
argument before dispatching, with the message ``tokenkern.<op>: <argument> must be ...``
(a wrong type raises an error that is both a TypeError and a ValueError). An empty batch
(B = 0) gives empty outputs; empty token, feature or head dimensions are refused unless an
op documents otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops  # registers every op
from .ops import _args as _c

__version__ = "0.1.0"
__all__ = [
    "attn_scores",
    "attn_topk",
    "bipartite_merge",
    "gumbel_topk",
    "leverage_scores",
    "leverage_topk",
    "merge_tokens",
    "prune",
    "spectral_ipr",
    "topk_gather",
]


def _batched(x: Tensor, name: str, op: str) -> tuple[Tensor, bool]:
    if not isinstance(x, Tensor):
        raise ValueError(f"tokenkern.{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 2:
        return x.unsqueeze(0), True
    if x.dim() != 3:
        raise ValueError(f"tokenkern.{op}: {name} must be (N, D) or (B, N, D), got shape {tuple(x.shape)}")
    return x, False


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
    0 <= seed < 2**63. On CUDA the sketch ``min(rank + oversample, N, D)`` must be <= 256 (the
    Jacobi solver's on-chip limit): with min(N, D) > 256 and oversample=8, rank <= 248.
    """
    xb, single = _batched(x, "x", "leverage_scores")
    ops._leverage_sizes("leverage_scores", xb, rank, oversample, power_iters, seed, cuda=xb.is_cuda)
    scores = torch.ops.tokenkern.leverage_scores(xb, rank, oversample, power_iters, seed)
    return scores[0] if single else scores


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
    underestimate the eigenvalues (README: accuracy); exact up to rounding when the sketch
    covers min(N, D), e.g. min(N, D) <= 128. With min(N, D) > 128 the CUDA op takes
    rank <= 112 (ValueError otherwise). On CPU the top eigenvalues are exact (eigvalsh).
    Not differentiable: with grad mode on, an x that requires grad raises a ValueError (pass
    x.detach()).
    """
    xb, single = _batched(x, "x", "spectral_ipr")
    _c.spectral_ipr(xb, rank, cuda=xb.is_cuda)
    out = torch.ops.tokenkern.spectral_ipr(xb, rank)
    return out[0] if single else out


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
    xb, single = _batched(x, "x", "leverage_topk")
    ops._leverage_topk_sizes(xb, k, rank, oversample, power_iters, seed, cuda=xb.is_cuda)
    kept, indices, scores = torch.ops.tokenkern.leverage_topk(xb, k, rank, oversample, power_iters, seed)
    return (kept[0], indices[0], scores[0]) if single else (kept, indices, scores)


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
    _c.topk_gather(scores, x, k)
    return torch.ops.tokenkern.topk_gather(scores, x, k)


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
    as tau -> 0 when the z are distinct. lambda is found without a host sync by a fixed number
    of bisection steps over the floating-point bit patterns (32 for float32), in the shifted
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
    _c.gumbel_topk(batched, k, tau, seed)
    _c.flag("gumbel_topk", "hard", hard)
    out = torch.ops.tokenkern.gumbel_topk(batched, k, tau, seed, hard)
    return out[0] if single else out


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
    single pass over K. Rows whose lse is not finite contribute nothing. See the README for
    obtaining it from FlashAttention, FlexAttention and SDPA (and the base-2 pitfall).

    Not differentiable: with grad mode on, a q, k or lse that requires grad raises a
    ValueError (pass .detach(): scores rank tokens and carry no gradient).
    """
    ops._attn_checked("attn_scores", q, k, lse, scale, key_start, key_end, query_mask, key_mask, causal, reduce)
    return torch.ops.tokenkern.attn_scores(q, k, lse, scale, key_start, key_end, query_mask, key_mask, causal, reduce)


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
    ops._attn_topk_checked(q, k, x, n_keep, lse, scale, key_start, key_end, query_mask, key_mask, causal, reduce)
    return torch.ops.tokenkern.attn_topk(
        q, k, x, n_keep, lse, scale, key_start, key_end, query_mask, key_mask, causal, reduce
    )


def merge_tokens(
    x: Tensor,
    keep_idx: Tensor,
    metric: Tensor | None = None,
    weight: Tensor | None = None,
    topm: int = 1,
    temperature: float = 0.0,
    combine: str = "mean",
    query_metric: Tensor | None = None,
    assign: str = "dropped",
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Merge the tokens that keep_idx drops into the ones it keeps.

    x: (B, N, D) float32/float16/bfloat16; keep_idx: (B, K) int64, ascending, unique, in
    [0, N) (1 <= K <= N). metric: (B, N, C), default x; weight: (B, N) non-negative, default 1
    (ToMe sizes, [CLS] attention, ...). Returns merged (B, K, D) in x's dtype and mass (B, K)
    float32; accumulation is float32 and bit-for-bit deterministic.

    Each dropped token i picks its ``topm`` most similar kept tokens (cosine of metric rows;
    ties to the lower index) with weights a: 1 when topm=1, else softmax(sim / temperature)
    over them (uniform 1/topm when temperature=0). With c = a * weight[i] summed per kept
    token j (csum_j): ``combine="mean"`` gives ``(w_j x_j + sum c x_i) / (w_j + csum_j)``,
    ``"sum"`` gives ``x_j + sum c x_i``, and ``mass_j = w_j + csum_j``.

    Extensions (defaults leave the rule above unchanged):
      combine="add_mean": ``x_j + sum c x_i / csum_j`` (VisionZip's contextual tokens);
      query_metric (B, N, C): similarity ``query_metric[i] . metric[j]`` instead of the
        cosine (attention logits: FiCoCo's correlate step);
      assign="kept": each kept token j pulls its topm most similar other tokens (kept or
        dropped) instead (PruMerge's k-nearest-neighbour merge).

    Gradients: merged back-propagates to x exactly, with the assignment and its weights held
    constant (a stop-gradient: metric, query_metric and weight, or x itself when metric is
    None, carry no gradient through them); mass is not differentiable.

    weight must be finite, and every mass must fit float32 (<= 3.4e38): a larger total is
    refused (rescale weight). The kernels scale each contribution by 1 / mass (1 / csum for
    add_mean) before the sum, so no intermediate overflows where the result fits.

    validate: on CUDA, check keep_idx and weight values first and the masses after (host
    syncs). Without it the op itself never syncs and writes NaN for a sample whose keep_idx
    or weight is invalid (an overflowing mass comes back inf); the CPU op always raises.
    Empty dims: B = 0 gives empty outputs; D = 0 (with a metric) gives (B, K, 0) and the masses.
    """
    _c.merge_tokens(x, keep_idx, metric, weight, topm, temperature, combine, query_metric, assign)
    _c.flag("merge_tokens", "validate", validate)
    check_values = validate and x.is_cuda
    if check_values:
        _c.merge_values("merge_tokens", keep_idx, x.shape[1], {"weight": weight})
    merged, mass = torch.ops.tokenkern.merge_tokens(
        x, keep_idx, metric, weight, topm, temperature, combine, query_metric, assign
    )
    if check_values:
        _c.merge_mass("merge_tokens", "weight", mass)
    return merged, mass


def bipartite_merge(
    x: Tensor,
    metric: Tensor,
    r: int,
    size: Tensor | None = None,
    protect_first: bool = False,
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """ToMe's bipartite soft matching: merge r tokens away.

    x: (B, N, D), metric: (B, N, C) (ToMe: the layer's keys averaged over heads), size:
    (B, N) token sizes (default 1). Tokens alternate into set A (even positions) and B (odd);
    each A token's match is its most cosine-similar B token; the r A tokens with the best
    matches merge into them by size-weighted average and the sizes add. protect_first keeps
    token 0 ([CLS]) unmerged. Ties go to the lower index. Gradients: merged back-propagates to
    x with the matching and the sizes held constant (metric and size get no gradient); the
    size output is not differentiable.

    Returns merged (B, N - r, D) in x's dtype and size (B, N - r) float32, in this order:
    the N_A - r unmerged A tokens by ascending position, then all B tokens by position (ToMe's
    ``[unmerged A, B]`` order; ToMe itself sorts the unmerged A tokens only when it protects
    the class token). size must be finite and non-negative, and the merged sizes must fit
    float32 (<= 3.4e38; a larger total is refused). B = 0 or N = 0 (r = 0) give empty outputs.

    validate: on CUDA, check that size is finite and non-negative first, and the merged sizes
    after (host syncs); without it a sample with an invalid size comes back NaN.
    """
    _c.bipartite_merge(x, metric, r, size, protect_first)
    _c.flag("bipartite_merge", "validate", validate)
    check_values = validate and x.is_cuda
    if check_values:
        _c.merge_values("bipartite_merge", None, 0, {"size": size})
    merged, out_size = torch.ops.tokenkern.bipartite_merge(x, metric, r, size, protect_first)
    if check_values:
        _c.merge_mass("bipartite_merge", "size", out_size)
    return merged, out_size


def prune(model, method: str = "fastv", keep: float | int | None = None, **options):
    """Make a transformers VLM prune its visual tokens; returns a handle whose remove()
    restores the model. keep None: 0.25, or prumerge+'s released adaptive count. See
    :mod:`tokenkern.integrations` for methods, options and models."""
    from .integrations import prune as _prune

    return _prune(model, method, keep, **options)
