"""Attention mass received per key, without materializing the Nq x Nk attention matrix.

Two kernels, each output element owned by one program (deterministic, no atomics):

1. ``_lse_kernel`` (only when the caller has no lse): one program per (query block, query
   head, batch) streams the key blocks with an online max/sum and writes the log-sum-exp of
   the scaled logits over the visible keys, (B, Hq, Nq), in base 2 (no natural-log round
   trip, which would shift logits of 1e10 by whole units).
2. ``_colsum_kernel``: one program per (key block of the requested slice, head group, batch)
   loops over the group's query heads (loading each key head's tile once), and the query
   blocks, and adds exp(s - lse) over visible (query, key) pairs. It computes S^T = K Q^T, so
   keys are rows and the (keys x queries) tile accumulates in registers over heads and query
   blocks, reduced over queries once after the loops: a fixed summation order, and the head
   sum needs no kernel of its own. For ``mean`` it divides by Hq x (number of valid queries
   of the batch element). Causal programs skip the query blocks that cannot see their keys.
   attn_scores runs it with one head group (each program owns its output columns). attn_topk
   splits the query heads into ``head_groups`` contiguous ranges when the batch is small (so
   the grid reaches ~2 x 132 programs), each group writing its (B, groups, N) float32 partial
   sums, which topk_gather's kernel adds in group order before it selects: with a caller's lse
   this is the only pass over K, and attn_topk is this kernel plus topk_gather.

Scores are computed in base 2: ``exp(scale * q.k - lse) = exp2(scale * log2(e) * q.k - log2(e) * lse)``.
A key is visible to query i when key_mask allows it and, if causal, ``j <= i + causal_offset``
(``tokenkern.ops.attention.KernelArgs``: the op passes Nk - Nq). A query is valid when
query_mask allows it and at least one key is visible to it.

NaN follows the float64 softmax: a NaN logit of a visible (query, key) pair makes the
kernel's lse of that row NaN, hence every visible entry of the row; masked keys and invalid
queries never reach the sums. All grids are flat (axis 0), so any batch size launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .select import MAX_CHUNK, topk_gather, topk_gather_parts
from .utils import empty, flat_grid, interpreted, next_pow2, unflatten3

LOG2E = 1.4426950408889634
SMS = 132  # streaming multiprocessors of an H100/H200 SXM
# The fewest (query head, query block) tiles one column-sum program streams when the heads are
# split over programs: below it a program's fixed costs (key mask, valid-query count, partial
# row) outweigh its share, and the tile loop is too short for the software pipeline.
MIN_TILES = 4


@triton.jit
def _lse_kernel(
    q_ptr, k_ptr, km_ptr, lse_ptr,
    Nq, Nk, G, D, qk_scale, n_blocks, Hq, causal_offset,
    q_sb, q_sh, q_sn, q_sd,
    k_sb, k_sh, k_sn, k_sd,
    km_sb, km_sn,
    l_sb, l_sh, l_sn,
    HAS_KMASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, BASE2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m, h, b = unflatten3(tl.program_id(0), n_blocks, Hq)
    b = b.to(tl.int64)
    hk = h // G
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    q = tl.load(
        q_ptr + b * q_sb + h * q_sh + rm[:, None] * q_sn + rd[None, :] * q_sd,
        mask=(rm < Nq)[:, None] & (rd < D)[None, :],
        other=0.0,
    )
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    hi = Nk
    if CAUSAL:
        hi = tl.minimum(Nk, causal_offset + (pid_m + 1) * BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        kt = tl.load(
            k_ptr + b * k_sb + hk * k_sh + rn[:, None] * k_sn + rd[None, :] * k_sd,
            mask=(rn < Nk)[:, None] & (rd < D)[None, :],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * qk_scale
        vis = (rn < Nk)[None, :] & (rm < Nq)[:, None]
        if HAS_KMASK:
            vis &= (tl.load(km_ptr + b * km_sb + rn * km_sn, mask=rn < Nk, other=0) != 0)[None, :]
        if CAUSAL:
            vis &= rn[None, :] <= causal_offset + rm[:, None]
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m_i = m_new
    # A NaN logit of a visible key makes l_i (or m_i) NaN, and so the lse: the row is poisoned.
    lse2 = tl.where(l_i == 0, float("-inf"), m_i + tl.log2(l_i))
    if not BASE2:
        lse2 = lse2 * 0.6931471805599453
    tl.store(lse_ptr + b * l_sb + h * l_sh + rm * l_sn, lse2, mask=rm < Nq)


@triton.jit
def _valid_queries(qm_ptr, km_ptr, b, Nq, Nk, causal_offset, qm_sb, qm_sn, km_sb, km_sn,
                   HAS_QMASK: tl.constexpr, HAS_KMASK: tl.constexpr, CAUSAL: tl.constexpr,
                   CHUNK: tl.constexpr):  # fmt: skip
    """The number of valid queries of batch element b (a query sees >= 1 key)."""
    # Position of the first key any query may see (Nk if none).
    first = 0
    if HAS_KMASK:
        first_vec = tl.full((CHUNK,), Nk, tl.int32)
        for j0 in range(0, Nk, CHUNK):
            j = j0 + tl.arange(0, CHUNK)
            km = tl.load(km_ptr + b * km_sb + j * km_sn, mask=j < Nk, other=0) != 0
            first_vec = tl.minimum(first_vec, tl.where(km, j, Nk))
        first = tl.min(first_vec)
    n_valid = tl.zeros((CHUNK,), tl.int32)
    for i0 in range(0, Nq, CHUNK):
        i = i0 + tl.arange(0, CHUNK)
        ok = i < Nq
        if HAS_QMASK:
            ok &= tl.load(qm_ptr + b * qm_sb + i * qm_sn, mask=i < Nq, other=0) != 0
        if CAUSAL:
            ok &= first <= causal_offset + i
        else:
            ok &= first < Nk
        n_valid += ok.to(tl.int32)
    return tl.sum(n_valid)


@triton.jit
def _colsum_kernel(
    q_ptr, k_ptr, lse_ptr, qm_ptr, km_ptr, out_ptr,
    Nq, Nk, Hkv, G, D, key_start, n_cols, qk_scale, n_blocks, n_groups, causal_offset,
    q_sb, q_sh, q_sn, q_sd,
    k_sb, k_sh, k_sn, k_sd,
    l_sb, l_sh, l_sn,
    qm_sb, qm_sn, km_sb, km_sn, o_sb, o_sg,
    HAS_QMASK: tl.constexpr, HAS_KMASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    LSE_GIVEN: tl.constexpr, MEAN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    pid_n, grp, b = unflatten3(tl.program_id(0), n_blocks, n_groups)
    b = b.to(tl.int64)
    # This program's query heads [h_lo, h_hi): group grp of n_groups near-equal ranges.
    h_lo = (grp * (Hkv * G)) // n_groups
    h_hi = ((grp + 1) * (Hkv * G)) // n_groups
    col0 = pid_n * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    rn = key_start + cols
    col_ok = cols < n_cols
    rd = tl.arange(0, BLOCK_D)
    kvis = col_ok
    if HAS_KMASK:
        kvis &= tl.load(km_ptr + b * km_sb + rn * km_sn, mask=col_ok, other=0) != 0
    lo = 0
    if CAUSAL:
        # First query that sees the block's first key, rounded down to a block boundary.
        lo = (tl.maximum(key_start + col0 - causal_offset, 0) // BLOCK_M) * BLOCK_M
    # S^T = K Q^T: keys are rows, so each step's sum over queries stays along a row; the
    # (keys x queries) tile accumulates over heads and query blocks and is reduced once.
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for hk in range(h_lo // G, (h_hi - 1) // G + 1):
        kt = tl.load(
            k_ptr + b * k_sb + hk * k_sh + rn[:, None] * k_sn + rd[None, :] * k_sd,
            mask=col_ok[:, None] & (rd < D)[None, :],
            other=0.0,
        )
        for h in range(tl.maximum(h_lo, hk * G), tl.minimum(h_hi, hk * G + G)):
            for m0 in range(lo, Nq, BLOCK_M):
                rm = m0 + tl.arange(0, BLOCK_M)
                q_ok = rm < Nq
                qt = tl.load(
                    q_ptr + b * q_sb + h * q_sh + rm[:, None] * q_sn + rd[None, :] * q_sd,
                    mask=q_ok[:, None] & (rd < D)[None, :],
                    other=0.0,
                )
                lse2 = tl.load(lse_ptr + b * l_sb + h * l_sh + rm * l_sn, mask=q_ok, other=0.0)
                if LSE_GIVEN:
                    # The caller's natural-log lse; its rows that are not finite contribute nothing.
                    lse2 = lse2 * 1.4426950408889634
                    q_ok &= (lse2 == lse2) & (tl.abs(lse2) < float("inf"))
                if HAS_QMASK:
                    q_ok &= tl.load(qm_ptr + b * qm_sb + rm * qm_sn, mask=rm < Nq, other=0) != 0
                s = tl.dot(kt, tl.trans(qt), input_precision=PRECISION) * qk_scale
                vis = kvis[:, None] & q_ok[None, :]
                if CAUSAL:
                    vis &= rn[:, None] <= causal_offset + rm[None, :]
                t = s - lse2[None, :]
                if not LSE_GIVEN:
                    # The kernel's own base-2 lse bounds every logit of its row (t <= 0 up to
                    # rounding, which at large logits could overflow exp2); NaN passes through.
                    t = tl.where(t > 0, 0.0, t)
                acc += tl.where(vis, tl.exp2(t), 0.0)
    out = tl.sum(acc, axis=1)
    if MEAN:
        n_valid = _valid_queries(qm_ptr, km_ptr, b, Nq, Nk, causal_offset, qm_sb, qm_sn, km_sb, km_sn,
                                 HAS_QMASK, HAS_KMASK, CAUSAL, CHUNK)  # fmt: skip
        denom = n_valid * (Hkv * G)
        out = tl.where(denom > 0, out / tl.maximum(denom, 1).to(tl.float32), 0.0)
    tl.store(out_ptr + b * o_sb + grp * o_sg + cols, out, mask=col_ok)


def _blocks(d: int, itemsize: int = 2) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D). The interpreter runs programs one by one: larger blocks.
    Float32 q and k (``itemsize`` 4) at BLOCK_D >= 256 take query tiles of 16: with 64 the lse
    kernel's staged tiles need 256 KiB of shared memory on sm_90, more than a block may have,
    and with 32 its 3xTF32 halves of the query tile spill ~20 KB per thread (make kernel-sweep)."""
    block_d = max(16, next_pow2(d))
    if interpreted():
        return 128, 128, block_d
    if block_d >= 256:
        return (16 if itemsize >= 4 else 64), 32, block_d
    return 64, 64, block_d


def _colsum_blocks(
    batch: int, n_cols: int, nq: int, block_d: int, split: bool, itemsize: int = 2
) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the column-sum kernel; query tiles of 16 for a few
    queries (decode). ``split`` (the heads may be split over programs, ``head_groups``):
    128-wide key tiles, the groups fill the GPU at any batch. Otherwise 128-wide tiles while
    they still give >= 132 programs (one per SM of an H100/H200), narrower ones when the
    batch is small. Float32 q and k (``itemsize`` 4, 3xTF32: hi and lo halves of both tiles in
    registers) take 64-wide key tiles, query tiles of at most 32 and eight warps at any batch:
    128-wide key tiles need 256 KiB of shared memory on sm_90, more than a block may have, and
    the others spill (up to ~1.3 KB per thread at 64 x 64 or 32 x 32 and four warps; none at
    32 x 64 and eight: make kernel-sweep); at BLOCK_D >= 256, 16 x 32 (~0.6 KB, was ~24 KB)."""
    if interpreted():
        return 128, 128, 4
    block_m = 16 if nq <= 16 else 64
    if itemsize >= 4:
        return (16, 32, 8) if block_d >= 256 else (min(block_m, 32), 64, 8)
    if block_d >= 256:
        return min(block_m, 32), 32, 4
    if split:
        return block_m, 128, 8
    for block_n in (128, 64):
        if triton.cdiv(n_cols, block_n) * batch >= SMS:
            return block_m, block_n, 8 if block_n == 128 else 4
    return block_m, 32, 4


def head_groups(batch: int, n_blocks: int, hq: int, nq: int, block_m: int) -> int:
    """Column-sum programs per (key block, batch element), each summing a contiguous range of
    the query heads: enough for >= 2 x 132 programs, while each program still streams at
    least MIN_TILES (head, query block) tiles; 1 once the key blocks and the batch alone give
    2 x 132."""
    most = max(1, min(hq, hq * triton.cdiv(nq, block_m) // MIN_TILES))
    return min(most, triton.cdiv(2 * SMS, max(1, n_blocks * batch)))


def _mask_strides(mask: torch.Tensor | None) -> tuple[torch.Tensor | None, int, int]:
    if mask is None:
        return None, 0, 0
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return m, m.stride(0), m.stride(1)


def attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    key_mask: torch.Tensor | None,
    causal_offset: int | None,
    blocks: tuple[int, int, int] | None = None,
    base2: bool = False,
) -> torch.Tensor:
    """(B, Hq, Nq) float32 log-sum-exp of ``scale * q.k`` over the visible keys (-inf for a
    query that sees none, NaN for one with a NaN logit), in natural log, or in base 2
    (``log2 sum 2^(scale * log2(e) * q.k)``) when base2."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    block_m, block_n, block_d = blocks or _blocks(d, q.element_size())
    lse = empty(b, hq, nq, dtype=torch.float32, device=q.device)
    km, km_sb, km_sn = _mask_strides(key_mask)
    n_blocks = triton.cdiv(nq, block_m)
    _lse_kernel[flat_grid("attn_scores", n_blocks, hq, b)](
        q, k, km if km is not None else q, lse,
        nq, nk, hq // hkv, d, scale * LOG2E, n_blocks, hq, causal_offset or 0,
        *q.stride(), *k.stride(),
        km_sb, km_sn,
        *lse.stride(),
        HAS_KMASK=km is not None, CAUSAL=causal_offset is not None, PRECISION=_precision(q), BASE2=base2,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
    )  # fmt: skip
    return lse


def _precision(q: torch.Tensor) -> str:
    return "ieee" if interpreted() or q.dtype != torch.float32 else "tf32x3"


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor | None,
    scale: float,
    key_start: int,
    key_end: int,
    query_mask: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    causal_offset: int | None,
    mean: bool,
    blocks: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Checked arguments in (``tokenkern.ops.attention.KernelArgs``), (B, key_end - key_start)
    float32 attention mass out. One program owns each output column block (one head group):
    finishing partial sums would take a launch of its own.
    ``blocks`` overrides (BLOCK_M, BLOCK_N, BLOCK_D) (tests exercise the GPU sizes)."""
    args = (q, k, lse, scale, key_start, key_end, query_mask, key_mask, causal_offset, mean)
    return column_sums(*args, blocks=blocks, groups=1)[:, 0]


def attention_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    x: torch.Tensor,
    n_keep: int,
    lse: torch.Tensor | None,
    scale: float,
    key_start: int,
    key_end: int,
    query_mask: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    causal_offset: int | None,
    mean: bool,
    blocks: tuple[int, int, int] | None = None,
    groups: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """attn_topk's CUDA kernel: x (B, key_end - key_start, D) -> kept (B, n_keep, D), indices
    (B, n_keep) int64 ascending, scores (B, key_end - key_start) float32.

    The column sums run in ``groups`` head groups (default ``head_groups``; 1 for rows longer
    than one topk_gather chunk, whose threshold search re-reads the row); topk_gather's kernel
    adds the (B, groups, N) partial sums in group order, writes the scores and selects, so
    the call stays at 3 launches (2 with lse)."""
    args = (q, k, lse, scale, key_start, key_end, query_mask, key_mask, causal_offset, mean)
    if groups is None and key_end - key_start > MAX_CHUNK:
        groups = 1
    parts = column_sums(*args, blocks=blocks, groups=groups)
    if parts.shape[1] == 1:
        scores = parts[:, 0]
        kept, indices = topk_gather(scores, x, n_keep)
        return kept, indices, scores
    return topk_gather_parts(parts, x, n_keep)


def column_sums(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor | None,
    scale: float,
    key_start: int,
    key_end: int,
    query_mask: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    causal_offset: int | None,
    mean: bool,
    blocks: tuple[int, int, int] | None = None,
    groups: int | None = None,
) -> torch.Tensor:
    """(B, groups, key_end - key_start) float32: group g's attention mass over its query heads
    (already divided by the mean's Hq x valid queries), so the scores are the sum over groups
    (with groups=1, the scores themselves). ``groups`` None: ``head_groups`` picks it;
    ``blocks`` overrides (BLOCK_M, BLOCK_N, BLOCK_D) and implies 4 warps."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    n_cols = key_end - key_start
    block_m, block_n, block_d = blocks or _blocks(d, q.element_size())
    lse_given = lse is not None
    if lse is None:
        # Kept in base 2: a natural-log round trip would shift large logits by whole units.
        lse = attention_lse(q, k, scale, key_mask, causal_offset, (block_m, block_n, block_d), base2=True)
    qm, qm_sb, qm_sn = _mask_strides(query_mask)
    km, km_sb, km_sn = _mask_strides(key_mask)
    if blocks is None:
        block_m, block_n, num_warps = _colsum_blocks(b, n_cols, nq, block_d, groups != 1, q.element_size())
    else:
        num_warps = 4
    n_blocks = triton.cdiv(n_cols, block_n)
    if groups is None:
        groups = head_groups(b, n_blocks, hq, nq, block_m)
    if not 1 <= groups <= hq:
        raise ValueError(f"tokenkern.attn_scores: groups must be in [1, Hq={hq}], got {groups}")
    out = empty(b, groups, n_cols, dtype=torch.float32, device=q.device)
    _colsum_kernel[flat_grid("attn_scores", n_blocks, groups, b)](
        q, k, lse, qm if qm is not None else q, km if km is not None else q, out,
        nq, nk, hkv, hq // hkv, d, key_start, n_cols, scale * LOG2E, n_blocks, groups, causal_offset or 0,
        *q.stride(), *k.stride(), *lse.stride(),
        qm_sb, qm_sn, km_sb, km_sn, out.stride(0), out.stride(1),
        HAS_QMASK=qm is not None, HAS_KMASK=km is not None, CAUSAL=causal_offset is not None,
        PRECISION=_precision(q), LSE_GIVEN=lse_given, MEAN=mean,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, CHUNK=1024,
        num_warps=num_warps,
    )  # fmt: skip
    return out
