"""The specification: a plain-torch definition of every op, written for clarity and run in
float64 by the tests (their oracle). Nothing here is fast."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def topk_gather(scores: Tensor, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """scores: (B, N), x: (B, N, D) -> kept (B, k, D), indices (B, k) int64.

    The k highest scores per row; ties go to the lower index; NaN ranks as -inf; indices are
    returned ascending and ``kept[b, j] = x[b, indices[b, j]]``."""
    key = scores.double()
    key = torch.where(torch.isnan(key), float("-inf"), key)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :k]
    indices = order.sort(dim=-1).values
    kept = x.gather(1, indices[..., None].expand(-1, -1, x.shape[-1]))
    return kept, indices


def leverage_scores(x: Tensor, rank: int = 32, oversample: int = 8, power_iters: int = 2, seed: int = 0) -> Tensor:
    """x: (B, N, D) -> (B, N) float64: ``||U_r[i, :]||^2`` for the top-r left singular
    vectors U_r of x[b], r = min(rank, N, D). Exact SVD; the sketch arguments are accepted
    for signature parity and ignored."""
    x64 = x.double()
    r = min(rank, x.shape[-2], x.shape[-1])
    u = torch.linalg.svd(x64, full_matrices=False).U[..., :r]
    return (u * u).sum(-1)


def leverage_topk(
    x: Tensor, k: int, rank: int = 32, oversample: int = 8, power_iters: int = 2, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact leverage scores, then topk_gather: (kept (B, k, D), indices (B, k), scores (B, N))."""
    scores = leverage_scores(x, rank)
    kept, indices = topk_gather(scores, x, k)
    return kept, indices, scores


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
    """Attention mass each key receives, from the materialized float64 softmax.

    q: (B, Hq, Nq, d), k: (B, Hkv, Nk, d), query head h reads key head h // (Hq / Hkv).
    Key j is visible to query i when key_mask[b, j] and, if causal, j <= Nk - Nq + i (the
    queries are the last Nq positions). ``P[b, h, i] = softmax(scale * q[b, h, i] . k^T)`` over
    the visible keys (``exp(scale * q.k - lse)`` when lse is given; a row whose given lse is
    not finite is all zero). A NaN logit of a visible pair makes its softmax row NaN, so it
    poisons every key that row sees (only that key's entry with an lse). A query is valid when
    query_mask[b, i] and it sees at least one key; invalid queries contribute nothing.
    ``scores[b, j - key_start] = sum_h sum_{valid i} P[b, h, i, j]``, divided by
    Hq * (number of valid queries of b) for reduce="mean" (0 when there are none).
    Returns (B, key_end - key_start); key_end = -1 means Nk."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    key_end = nk if key_end == -1 else key_end
    scale = d**-0.5 if scale is None else scale
    kk = k.double().repeat_interleave(hq // hkv, dim=1)
    logits = (q.double() @ kk.mT) * scale
    vis = _visible(b, nq, nk, key_mask, causal)
    valid = vis.any(dim=-1)
    if query_mask is not None:
        valid = valid & query_mask.cpu()[:, None, :]
    logits = logits.cpu().masked_fill(~vis, float("-inf"))
    if lse is None:
        p = torch.softmax(logits, dim=-1)
    else:
        lse64 = lse.double().cpu()[..., None]
        p = torch.where(torch.isfinite(lse64), torch.exp(logits - lse64), 0.0)
    p = torch.where(vis & valid[..., None], p, 0.0)
    scores = p.sum(dim=(1, 2))
    if reduce == "mean":
        scores = scores / (hq * valid.sum(dim=(1, 2))).clamp(min=1)[:, None]
    return scores[:, key_start:key_end]


def attn_lse(q: Tensor, k: Tensor, scale: float | None = None, key_mask: Tensor | None = None, causal: bool = False):
    """Natural-log log-sum-exp of ``scale * q.k`` over the visible keys, (B, Hq, Nq) float64
    (-inf for a query that sees no key): the ``lse`` the attention ops accept."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    logits = (q.double() @ k.double().repeat_interleave(hq // hkv, dim=1).mT).cpu() * scale
    vis = _visible(b, nq, nk, key_mask, causal)
    return torch.logsumexp(logits.masked_fill(~vis, float("-inf")), dim=-1)


def _visible(b: int, nq: int, nk: int, key_mask: Tensor | None, causal: bool) -> Tensor:
    """(B, 1, Nq, Nk) bool: vis[b, 0, i, j] when key j is visible to query i (see attn_scores)."""
    vis = torch.ones(b, 1, nq, nk, dtype=torch.bool)
    if key_mask is not None:
        vis = vis & key_mask.cpu()[:, None, None, :]
    if causal:
        vis = vis & (torch.arange(nk)[None, :] <= nk - nq + torch.arange(nq)[:, None])
    return vis


def attn_topk(q: Tensor, k: Tensor, x: Tensor, n_keep: int, **kwargs) -> tuple[Tensor, Tensor, Tensor]:
    """attn_scores over the slice [key_start, key_end), then topk_gather over x, whose rows are
    the keys of that slice: x (B, key_end - key_start, D). Indices are relative to key_start."""
    scores = attn_scores(q, k, **kwargs)
    kept, indices = topk_gather(scores, x, n_keep)
    return kept, indices, scores


def _rank_desc(values: Tensor) -> Tensor:
    """Indices that order `values` best first: descending, NaN as -inf, ties to the lower index."""
    key = torch.where(torch.isnan(values), float("-inf"), values)
    return torch.sort(key, descending=True, stable=True).indices


def _assignment_weights(sims: Tensor, temperature: float) -> Tensor:
    m = sims.numel()
    if m == 1:
        return torch.ones(1, dtype=torch.float64)
    if temperature == 0:
        return torch.full((m,), 1.0 / m, dtype=torch.float64)
    return torch.softmax(sims / temperature, dim=0)


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
) -> tuple[Tensor, Tensor]:
    """Merge the dropped tokens into the kept ones. Returns merged (B, K, D), mass (B, K), float64.

    x: (B, N, D); keep_idx: (B, K) ascending unique in [0, N); the dropped set is the
    complement. Similarity of a chooser token i to a candidate j: the cosine of metric rows
    (metric defaults to x), or ``query_metric[i] . metric[j]`` when query_metric is given.
    assign="dropped": each dropped token i picks its topm most similar kept tokens T_i;
    assign="kept": each kept token j picks its topm most similar other tokens (any, kept or
    dropped) and receives them. Ties go to the lower index. Assignment weights a: 1 when
    topm=1, else softmax(sim / temperature) over the chosen (uniform 1/topm when temperature
    is 0). With c = a * weight[source] summed per receiving kept token j (csum_j):
      mean:     merged_j = (w_j x_j + sum c x) / (w_j + csum_j)   (x_j when csum_j = 0)
      sum:      merged_j = x_j + sum c x
      add_mean: merged_j = x_j + sum c x / csum_j                (x_j when csum_j = 0)
    and mass_j = w_j + csum_j."""
    b, n, d = x.shape
    k = keep_idx.shape[1]
    xd = x.double().cpu()
    m = (x if metric is None else metric).double().cpu()
    w = torch.ones(b, n, dtype=torch.float64) if weight is None else weight.double().cpu()
    merged = torch.empty(b, k, d, dtype=torch.float64)
    mass = torch.empty(b, k, dtype=torch.float64)
    for s in range(b):
        keep = keep_idx[s].cpu()
        if query_metric is None:
            mn = m[s] / m[s].norm(dim=-1, keepdim=True).clamp_min(1e-12)
            sim = mn @ mn.T
        else:
            sim = query_metric[s].double().cpu() @ m[s].T
        acc = torch.zeros(k, d, dtype=torch.float64)
        csum = torch.zeros(k, dtype=torch.float64)
        if assign == "dropped":
            dropped = torch.ones(n, dtype=torch.bool)
            dropped[keep] = False
            for i in dropped.nonzero().flatten().tolist():
                chosen = _rank_desc(sim[i, keep])[:topm]
                weights = _assignment_weights(sim[i, keep][chosen], temperature)
                for pos, a in zip(chosen.tolist(), weights.tolist(), strict=True):
                    acc[pos] += a * w[s, i] * xd[s, i]
                    csum[pos] += a * w[s, i]
        else:
            for pos, t in enumerate(keep.tolist()):
                others = torch.tensor([i for i in range(n) if i != t], dtype=torch.long)
                chosen = others[_rank_desc(sim[t, others])[:topm]]
                weights = _assignment_weights(sim[t, chosen], temperature)
                for i, a in zip(chosen.tolist(), weights.tolist(), strict=True):
                    acc[pos] += a * w[s, i] * xd[s, i]
                    csum[pos] += a * w[s, i]
        self_x, self_w = xd[s, keep], w[s, keep]
        none = (csum == 0)[:, None]
        if combine == "mean":
            out = (self_w[:, None] * self_x + acc) / (self_w + csum).clamp_min(1e-300)[:, None]
            out = torch.where(none | ((self_w + csum) == 0)[:, None], self_x, out)
        elif combine == "sum":
            out = self_x + acc
        else:
            out = torch.where(none, self_x, self_x + acc / csum.clamp_min(1e-300)[:, None])
        merged[s], mass[s] = out, self_w + csum
    return merged, mass


def bipartite_merge(
    x: Tensor, metric: Tensor, r: int, size: Tensor | None = None, protect_first: bool = False
) -> tuple[Tensor, Tensor]:
    """ToMe's bipartite soft matching with size-weighted merging, float64.

    Tokens alternate into set A (even positions) and set B (odd positions). Each A token's
    match is its most cosine-similar B token (ties: lower index); the r A tokens with the most
    similar matches (ties: lower index) merge into their matches by size-weighted average
    (``(s_b x_b + sum s_a x_a) / (s_b + sum s_a)``), sizes add. protect_first keeps token 0
    (e.g. [CLS]) out of merging. Output order: the unmerged A tokens in ascending position,
    then every B token in position order -> merged (B, N - r, D), size (B, N - r)."""
    b, n, _ = x.shape
    xd, mn = x.double().cpu(), metric.double().cpu()
    mn = mn / mn.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sz = torch.ones(b, n, dtype=torch.float64) if size is None else size.double().cpu()
    outs, sizes = [], []
    for s in range(b):
        a_idx, b_idx = torch.arange(0, n, 2), torch.arange(1, n, 2)
        scores = mn[s, a_idx] @ mn[s, b_idx].T
        best = torch.stack([_rank_desc(row)[0] for row in scores]) if len(b_idx) else torch.zeros(len(a_idx))
        node_max = torch.stack([scores[i, best[i]] for i in range(len(a_idx))]) if len(b_idx) else best
        first = 1 if protect_first else 0
        merged_a = (_rank_desc(node_max[first:])[:r] + first).tolist()
        unmerged = [i for i in range(len(a_idx)) if i not in merged_a]
        rows = [xd[s, a_idx[i]] for i in unmerged]
        row_sizes = [sz[s, a_idx[i]] for i in unmerged]
        for j in range(len(b_idx)):
            src = [i for i in sorted(merged_a) if int(best[i]) == j]
            total = sz[s, b_idx[j]] + sum(sz[s, a_idx[i]] for i in src)
            num = sz[s, b_idx[j]] * xd[s, b_idx[j]] + sum(sz[s, a_idx[i]] * xd[s, a_idx[i]] for i in src)
            rows.append(num / total if src and total > 0 else xd[s, b_idx[j]])
            row_sizes.append(total)
        outs.append(torch.stack(rows))
        sizes.append(torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in row_sizes]))
    return torch.stack(outs), torch.stack(sizes)


def spectral_ipr(x: Tensor, rank: int = -1) -> Tensor:
    """x: (B, N, D) -> (B,) float64 inverse participation ratio of the singular-value energy.

    With s_1 >= s_2 >= ... >= s_m the singular values of x[b] (m = min(N, D)) and
    r = m when rank = -1 or rank >= m, else r = rank:
    ``p_i = s_i^2 / sum_{j <= r} s_j^2`` for i <= r and ``IPR = sum_{i <= r} p_i^2``, in
    [1/r, 1] (1: one direction holds all the energy; 1/r: the energy is spread evenly).
    A sample whose top-r energy is zero (x[b] = 0) gets 0; a sample with a NaN or Inf gets NaN.
    """
    xd = x.double().cpu()
    finite = torch.isfinite(xd).flatten(1).all(dim=1)
    s2 = torch.linalg.svdvals(torch.where(finite[:, None, None], xd, 0.0)) ** 2
    m = s2.shape[-1]
    r = m if rank == -1 or rank >= m else rank
    lam = s2[..., :r]
    total = lam.sum(-1)
    ipr = (lam**2).sum(-1) / torch.where(total > 0, total, 1.0) ** 2
    ipr = torch.where(total > 0, ipr, 0.0)
    return torch.where(finite, ipr, float("nan"))


# ------------------------------------------------------------------------------ gumbel_topk

# float32's smallest normal number: the floor of the uniform draw.
GUMBEL_TINY = 2.0**-126


def gumbel_from_uniform(u: Tensor) -> Tensor:
    """Gumbel(0, 1) noise from uniform draws u in [0, 1): ``g = -log(-log(max(u, tiny)))``."""
    return -torch.log(-torch.log(u.clamp_min(GUMBEL_TINY)))


def perturbed_scores(logits: Tensor, noise: Tensor) -> Tensor:
    """The perturbed scores z = logits + g, formed in float32 as the op forms them (so that
    the hard mask of the reference and of the kernels rank the very same numbers)."""
    return logits.float() + noise.float()


def float_key(x: Tensor) -> Tensor:
    """float64 (no NaN) -> int64 whose signed order is the order of the values (-0.0 as +0.0)."""
    bits = (x + 0.0).view(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)


def key_float(key: Tensor) -> Tensor:
    """The inverse of ``float_key``."""
    return torch.where(key < 0, key ^ 0x7FFFFFFFFFFFFFFF, key).view(torch.float64)


def relaxed_topk_degenerate(z: Tensor, k: int) -> Tensor:
    """(B, 1) bool: the rows of z (B, N) (NaN as -inf) where no finite threshold lambda gives
    sum_i sigmoid((z_i - lambda) / tau) = k: at least k entries are +inf, or at most k are
    above -inf (k = N among them)."""
    pinf = (z == float("inf")).sum(-1, keepdim=True)
    alive = (z > float("-inf")).sum(-1, keepdim=True)
    return (pinf >= k) | (alive <= k)


def relaxed_topk_excess(x: Tensor, top: Tensor) -> Tensor:
    """sum_i sigmoid(x_i) - k for x: (B, N) and top (B, N) bool, k ones per row (the hard
    mask), as sum_{i not top} sigmoid(x_i) - sum_{i top} sigmoid(-x_i): no term is near 1, so
    nothing cancels when the relaxation is nearly hard (the plain sum rounds to k over a wide
    range of thresholds, and the root found would be anywhere in it)."""
    return torch.where(top, -torch.sigmoid(-x), torch.sigmoid(x)).sum(-1, keepdim=True)


def relaxed_topk_shift(d: Tensor, top: Tensor) -> Tensor:
    """d: (B, N) float64 scaled scores (z - anchor) / tau with d = 0 at the k-th largest z,
    top: (B, N) bool, the hard top-k mask. Returns u (B, 1) with sum_i sigmoid(d_i - u) = k,
    found by 64 bisection steps over the float64 bit patterns (every float64 between the
    bracket ends, in order: 64 halvings reach two neighbouring floats), then the end with the
    smaller |excess| (``relaxed_topk_excess``). Bracket: at u = min(finite d) - log N every
    finite entry has sigmoid >= N / (N + 1), so the sum exceeds k when more than k entries
    are above -inf; at u = log N the entries from the k-th down (d <= 0) have sigmoid <=
    1 / (N + 1), so the sum is below k."""
    n = d.shape[-1]
    big = torch.finfo(torch.float64).max
    hi_u = torch.full((*d.shape[:-1], 1), math.log(n), dtype=torch.float64, device=d.device)
    dmin = torch.where(torch.isfinite(d), d, float("inf")).amin(-1, keepdim=True)
    lo_u = torch.minimum((dmin - math.log(n)).clamp(-big, big), hi_u)
    lo, hi = float_key(lo_u), float_key(hi_u)
    e_lo = torch.full_like(hi_u, float("inf"))
    e_hi = torch.full_like(hi_u, float("-inf"))
    for _ in range(64):
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        e = relaxed_topk_excess(d - key_float(mid), top)
        take = e >= 0
        lo, e_lo = torch.where(take, mid, lo), torch.where(take, e, e_lo)
        hi, e_hi = torch.where(take, hi, mid), torch.where(take, e_hi, e)
    return key_float(torch.where(e_lo <= -e_hi, lo, hi))


def relaxed_topk(z: Tensor, k: int, tau: float) -> Tensor:
    """Threshold relaxation of the top-k mask of the scores z (B, N), in float64 (the tests
    run it on z of float32 values), differentiable in z. NaN scores count as -inf.

        soft_i = sigmoid((z_i - lambda) / tau),  lambda such that sum_i soft_i = k.

    soft is in [0, 1] and sums to k by construction; with distinct scores it tends to the hard
    top-k mask as tau -> 0 (lambda lies between the k-th and (k+1)-th largest z); the gradient
    is that of the implicit lambda(z): with s'_i = soft_i (1 - soft_i),
    ``d soft_i / d z_m = (s'_i / tau) (delta_im - s'_m / sum_n s'_n)``.

    Computed in the shifted form: with the anchor a = the k-th largest z (finite whenever a
    finite lambda exists) and d = (z - a) / tau, u = (lambda - a) / tau solves
    sum_i sigmoid(d_i - u) = k (``relaxed_topk_shift``); z / tau alone is never formed, so huge
    |z| / tau loses nothing near lambda. One Newton step u + excess / sum s' (s' detached)
    leaves the value at the root and gives autograd the implicit gradient. +inf entries get 1
    and -inf entries 0. Rows without a finite lambda (``relaxed_topk_degenerate``: at least k
    entries are +inf, or at most k are above -inf, e.g. k = N) get the hard mask, the limit of
    the relaxation there, with gradient 0."""
    z = torch.where(torch.isnan(z), float("-inf"), z)
    degenerate = relaxed_topk_degenerate(z, k)
    top = hard_topk_mask(z.detach(), k) > 0
    with torch.no_grad():
        anchor = torch.where(degenerate, 0.0, z.topk(k, dim=-1).values[:, k - 1 :])
    d = (z - anchor) / tau
    u = relaxed_topk_shift(d.detach(), top)
    x = (d - u).detach()
    sp = torch.sigmoid(x) * torch.sigmoid(-x)
    total = sp.sum(-1, keepdim=True)
    excess = relaxed_topk_excess(d - u, top)
    u = u + torch.where(total > 0, excess / torch.where(total > 0, total, 1.0), 0.0)
    x = d - u
    # 1 - sigmoid(-x) above 0: the same value, and autograd's s (1 - s) from the small side.
    soft = torch.where(x > 0, 1 - torch.sigmoid(-x), torch.sigmoid(x))
    return torch.where(degenerate, top.double(), soft)


def hard_topk_mask(z: Tensor, k: int) -> Tensor:
    """(B, N) float64 mask with ones at the k largest scores of each row (ties to the lower
    index, NaN as -inf: the topk_gather rule)."""
    _, indices = topk_gather(z, z[..., None], k)
    return torch.zeros(z.shape, dtype=torch.float64, device=z.device).scatter_(1, indices, 1.0)


def gumbel_topk(logits: Tensor, k: int, tau: float, noise: Tensor, hard: bool = True) -> Tensor:
    """The op given its noise g (B, N) (the op draws g from (seed, row, column); the tests
    read the noise the kernel drew and pass it here).

    z = float32(logits) + g; soft = relaxed_topk(z, k, tau) computed in float64 from z with
    gradients flowing to logits; hard = hard_topk_mask(z, k). Returns, in float64,
    ``hard + (soft - soft.detach())`` when hard (exactly the value of hard, the gradient of
    soft: a straight-through estimator) and soft otherwise."""
    z32 = perturbed_scores(logits.detach(), noise)
    # Differentiable float64 copy of z: the values of z32, gradient 1 to finite logits.
    ld = logits.double()
    z = torch.where(torch.isfinite(ld), z32.double() + (ld - ld.detach()), z32.double())
    soft = relaxed_topk(z, k, tau)
    if not hard:
        return soft
    return hard_topk_mask(z32, k) + (soft - soft.detach())  # exactly hard in value


# ------------------------------------------------------------------ diversity selection
#
# Shared conventions (maxmin_select, dpp_select, mmr_select): the cosine similarity of
# tokens i != j is S_ij = u_i . u_j with u_i = x_i / ||x_i|| (u_i = 0 for a zero-norm token,
# so it has similarity 0 with every other token) and S_ii = 1 for every token; S is exactly
# symmetric (S_ji is S_ij); the cosine distance is 1 - S (0 on the diagonal).
# mask: (B, N) bool, True = candidate (None: all).
# "First maximum" means the lowest index among the maxima; NaN ranks as -inf. A sample with
# fewer candidates than it must select raises ValueError. The selected indices are returned
# int64 ascending, (B, k).
#
# The *_order functions run the same greedy loops and also return the picks in the order they
# were made and each sample's margin: the smallest gap, over the steps, between the winning
# key and the best other available key (inf when there was never a competitor). Inputs whose
# margin is within float32 rounding have more than one right answer.


def cosine_matrix(x: Tensor) -> Tensor:
    """x: (B, N, D) -> S (B, N, N) float64 (see the conventions above; S_ii = 1)."""
    x64 = x.double().cpu()
    norm = x64.norm(dim=-1, keepdim=True)
    u = torch.where(norm > 0, x64 / torch.where(norm > 0, norm, 1.0), 0.0)
    s = u @ u.mT
    s = torch.triu(s) + torch.triu(s, 1).mT  # exactly symmetric: S_ji is S_ij
    s.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    return s


def _candidates(op: str, mask: Tensor | None, b: int, n: int, need: int) -> Tensor:
    """(B, N) bool candidates on the CPU; ValueError if a sample has fewer than need."""
    cand = torch.ones(b, n, dtype=torch.bool) if mask is None else mask.cpu().bool()
    counts = cand.sum(dim=1)
    if bool((counts < need).any()):
        s = int(torch.nonzero(counts < need)[0, 0])
        raise ValueError(f"tokenkern.{op}: mask must leave >= {need} candidates per sample, "
                         f"got {int(counts[s])} in sample {s}")  # fmt: skip
    return cand


def _first_max(key: Tensor, avail: Tensor, twin: Tensor | None = None) -> tuple[int, float]:
    """The index of the largest key among avail (bool, not empty), NaN as -inf, the lowest
    index among equal maxima; and its gap to the best other available key (inf if none),
    leaving out twin[winner] (a token whose key is the winner's by symmetry) if given."""
    idx = avail.nonzero().flatten()
    vals = key[idx]
    vals = torch.where(torch.isnan(vals), float("-inf"), vals)
    best = int(torch.argmax(vals))  # argmax returns the first maximum
    others = torch.ones(len(idx), dtype=torch.bool)
    others[best] = False
    if twin is not None:
        others &= idx != twin[idx[best]]
    gap = float(vals[best] - vals[others].max()) if bool(others.any()) else math.inf
    return int(idx[best]), (gap if not math.isnan(gap) else 0.0)


def _sorted_rows(orders: list[list[int]]) -> Tensor:
    return torch.tensor([sorted(o) for o in orders], dtype=torch.int64).reshape(len(orders), -1)


def maxmin_order(x: Tensor, k: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """maxmin_select's picks in pick order (B, k) int64 and margins (B,) float64."""
    b, n, _ = x.shape
    cand = _candidates("maxmin_select", mask, b, n, k)
    dist = 1.0 - cosine_matrix(x)
    orders, margins = [], []
    for s in range(b):
        d = dist[s]
        avail = cand[s].clone()
        if int(avail.sum()) == 1:
            first, gap = _first_max(torch.zeros(n, dtype=torch.float64), avail)
        else:
            others = torch.where(cand[s][None, :] & ~torch.eye(n, dtype=torch.bool), d, float("inf"))
            nearest = others.min(dim=1)
            # A token and its nearest neighbour tie when they are each other's nearest (d is
            # symmetric): an exact tie, the lower index.
            mutual = nearest.values[nearest.indices] == nearest.values
            twin = torch.where(mutual, nearest.indices, -1)
            first, gap = _first_max(nearest.values, avail, twin)
        picks, gaps = [first], [gap]
        avail[first] = False
        to_set = d[first].clone()  # min distance of every token to the selected set
        for _ in range(k - 1):
            j, gap = _first_max(to_set, avail)
            picks.append(j)
            gaps.append(gap)
            avail[j] = False
            to_set = torch.minimum(to_set, d[j])
        orders.append(picks)
        margins.append(min(gaps))
    return torch.tensor(orders, dtype=torch.int64), torch.tensor(margins, dtype=torch.float64)


def maxmin_select(x: Tensor, k: int, mask: Tensor | None = None) -> Tensor:
    """DivPrune's max-min diversity selection. x: (B, N, D), mask: (B, N) bool or None ->
    (B, k) int64 ascending.

    Cosine distance d = 1 - S (conventions above). Over the candidates of each sample: the
    first pick is the candidate whose nearest OTHER candidate is farthest (argmax_i
    min_{j != i} d_ij; a single candidate is picked itself); every next pick is the
    unselected candidate farthest from the selected set (argmax_j min_{s selected} d_sj).
    First maximum on ties; selected tokens are never picked again."""
    return maxmin_order(x, k, mask)[0].sort(dim=1).values


def dpp_order(x: Tensor, relevance: Tensor, k: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """dpp_select's picks in pick order (B, k) int64 and margins (B,) float64 (a pick whose
    d2 is > 0 also counts d2 itself as a gap: the distance to the rank-exhausted branch)."""
    b, n, _ = x.shape
    cand = _candidates("dpp_select", mask, b, n, k)
    r = relevance.double().cpu()
    kernel = r[:, :, None] * cosine_matrix(x) * r[:, None, :]
    orders, margins = [], []
    for s in range(b):
        lk = kernel[s]
        avail = cand[s].clone()
        d2 = torch.where(avail, lk.diagonal(), float("-inf"))
        rows = torch.zeros(k, n, dtype=torch.float64)
        picks, gaps = [], []
        for i in range(k):
            j, gap = _first_max(d2, avail)
            if d2[j] > 0 and math.isfinite(d2[j]):
                e = (lk[j] - rows[:i].T @ rows[:i, j]) / torch.sqrt(d2[j])
                gaps += [gap, float(d2[j])]
            else:  # the kernel's numerical rank is exhausted
                j = int(avail.nonzero()[0, 0])
                e = torch.zeros(n, dtype=torch.float64)
            rows[i] = e
            d2 = d2 - e * e
            avail[j] = False
            picks.append(j)
        orders.append(picks)
        margins.append(min(gaps, default=math.inf))
    return torch.tensor(orders, dtype=torch.int64), torch.tensor(margins, dtype=torch.float64)


def dpp_select(x: Tensor, relevance: Tensor, k: int, mask: Tensor | None = None) -> Tensor:
    """CDPruner's DPP selection: Chen et al.'s (2018) fast greedy MAP inference of the kernel
    ``L_ij = r_i S_ij r_j``. x: (B, N, D), relevance r: (B, N), mask: (B, N) bool or None ->
    (B, k) int64 ascending.

    Per sample: d2 = diag(L) (-inf at non-candidates), then k times: j = the first maximum
    of d2 over the unselected candidates; if d2[j] > 0 and finite,
    ``e = (L[j, :] - sum_t c_t[j] c_t) / sqrt(d2[j])`` (c_t: the earlier rows e), else (the
    kernel's numerical rank is exhausted) j = the lowest-index unselected candidate and
    e = 0; then d2 -= e**2 and j is selected (never picked again)."""
    return dpp_order(x, relevance, k, mask)[0].sort(dim=1).values


def pivot_cosine(x: Tensor, p: int) -> Tensor:
    """x: (L, D) -> (L,) float64 ``cos(x_p, x_j) = x_p . x_j / (max(||x_p||, 1e-8) *
    max(||x_j||, 1e-8))`` (torch.nn.functional.cosine_similarity with eps 1e-8)."""
    x64 = x.double().cpu()
    norm = x64.norm(dim=-1).clamp_min(1e-8)
    return (x64 @ x64[p]) / (norm * norm[p])


def pivot_order(x: Tensor, pivots: Tensor, candidates: Tensor, per_pivot: int) -> tuple[Tensor, Tensor]:
    """pivot_select's picks in pick order (B, P * per_pivot) int64 (pivot by pivot, each
    pivot's picks least similar first) and margins (B,) float64: the smallest gap, over the
    pivots, between the last similarity taken and the next one left (what decides the set)."""
    b = x.shape[0]
    orders, margins = [], []
    for s in range(b):
        remaining = candidates[s].cpu().bool().clone()
        picks: list[int] = []
        gaps = []
        for p in pivots[s].cpu().tolist():
            avail = remaining.nonzero().flatten()
            if len(avail) < per_pivot:
                raise ValueError(f"tokenkern.pivot_select: candidates must leave >= {per_pivot} tokens "
                                 f"for every pivot, got {len(avail)} in sample {s}")  # fmt: skip
            sim = pivot_cosine(x[s], p)[avail]
            sim = torch.where(torch.isnan(sim), float("inf"), sim)  # NaN ranks last
            ranked = torch.sort(sim, stable=True)
            chosen = avail[ranked.indices[:per_pivot]]
            if len(avail) > per_pivot:
                gaps.append(float(ranked.values[per_pivot] - ranked.values[per_pivot - 1]))
            remaining[chosen] = False
            picks += chosen.tolist()
        orders.append(picks)
        margins.append(min(gaps, default=math.inf))
    return torch.tensor(orders, dtype=torch.int64), torch.tensor(margins, dtype=torch.float64)


def pivot_select(x: Tensor, pivots: Tensor, candidates: Tensor, per_pivot: int) -> Tensor:
    """DART's duplication-aware selection around pivot tokens. x: (B, L, D), pivots: (B, P)
    int64 positions in [0, L), in pivot order, candidates: (B, L) bool ->
    (B, P * per_pivot) int64 ascending.

    Per sample, for each pivot p in the given order: the per_pivot remaining candidates least
    cosine-similar to x[p] (pivot_cosine; ties to the lower index) are selected and removed
    from the candidates. Returns the union of the selections; the pivots themselves are
    selected only if they are candidates and get picked."""
    return pivot_order(x, pivots, candidates, per_pivot)[0].sort(dim=1).values


def mmr_order(
    x: Tensor, importance: Tensor, k: int, lam: float = 0.5, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """mmr_select's picks in pick order (B, k) int64 and margins (B,) float64."""
    b, n, _ = x.shape
    cand = _candidates("mmr_select", mask, b, n, k)
    sim = cosine_matrix(x)
    v = importance.double().cpu()
    orders, margins = [], []
    for s in range(b):
        avail = cand[s].clone()
        lo, hi = v[s][avail].min(), v[s][avail].max()
        imp = (v[s] - lo) / (hi - lo) if hi > lo else torch.zeros(n, dtype=torch.float64)
        first, _ = _first_max(v[s], avail)  # compares the inputs themselves: no rounding
        picks, gaps = [first], [math.inf]
        avail[first] = False
        to_set = sim[s, first].clone()  # max similarity of every token to the selected set
        for _ in range(k - 1):
            j, gap = _first_max(lam * imp - (1 - lam) * to_set, avail)
            picks.append(j)
            gaps.append(gap)
            avail[j] = False
            to_set = torch.maximum(to_set, sim[s, j])
        orders.append(picks)
        margins.append(min(gaps))
    return torch.tensor(orders, dtype=torch.int64), torch.tensor(margins, dtype=torch.float64)


def mmr_select(x: Tensor, importance: Tensor, k: int, lam: float = 0.5, mask: Tensor | None = None) -> Tensor:
    """Maximal marginal relevance. x: (B, N, D), importance: (B, N), mask: (B, N) bool or
    None -> (B, k) int64 ascending.

    Per sample, importance is min-max normalized over the candidates, imp = (v - min) /
    (max - min) (0 everywhere when max == min); the first pick is the first maximum of importance;
    every next pick the first maximum over the unselected candidates of
    ``lam * imp_j - (1 - lam) * max_{s selected} S_sj``."""
    return mmr_order(x, importance, k, lam, mask)[0].sort(dim=1).values
