"""The selection family on the GPU: fused top-k selection + row gather (the CUDA kernel of
``tokenkern::topk_gather``), and the threshold search that gumbel_topk reuses.

One program owns ``BLOCK_ROWS`` consecutive source rows of one batch element. Every
program finds the same k-th largest score by a 32-step binary search over order-preserving
integer keys, counts how many selected rows precede its block, and copies its own selected
rows to their output slots. Each output element is written by exactly one program, so the
result is deterministic, and the kept indices come out ascending without a sort.

Selection rule: the k highest scores, ties to the lower index, NaN ranks as -inf,
-0.0 ranks as +0.0.

The scores may come as P partial rows (``topk_gather_parts``, attn_topk's column sums split
over head groups): every program adds them in part order (0, 1, ...), so all programs rank
the same float32 sums, and each writes the summed scores of its own rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import empty, flat_grid, interpreted, next_pow2, unflatten2

MAX_CHUNK = 4096  # the most elements of a row one program loads at a time


@triton.jit
def selection_key(s):
    """float32 -> int32 whose signed order is the selection order of the scores."""
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    # NaN takes the key of -inf (0xFF800000 ^ 0x7FFFFFFF as a signed int32).
    return tl.where(s != s, -2139095041, key)


@triton.jit
def _row_scores(s_row, s_sn, s_sp, n_parts, offs, valid):
    """Scores at offs: the sum of the row's n_parts partial rows, added in part order."""
    s = tl.load(s_row + offs * s_sn, mask=valid, other=0.0)
    for p in range(1, n_parts):
        s += tl.load(s_row + p * s_sp + offs * s_sn, mask=valid, other=0.0)
    return s


@triton.jit
def _count_at_least(s_row, s_sn, s_sp, n_parts, N, mid, keys, CHUNK: tl.constexpr, SINGLE_CHUNK: tl.constexpr):
    if SINGLE_CHUNK:
        offs = tl.arange(0, CHUNK)
        cnt = tl.sum(((keys >= mid) & (offs < N)).to(tl.int32))
    else:
        cnt = tl.zeros((), tl.int32)
        for c0 in range(0, N, CHUNK):
            offs = c0 + tl.arange(0, CHUNK)
            s = _row_scores(s_row, s_sn, s_sp, n_parts, offs, offs < N)
            cnt += tl.sum(((selection_key(s) >= mid) & (offs < N)).to(tl.int32))
    return cnt


@triton.jit
def topk_threshold(s_row, s_sn, s_sp, n_parts, N, k, keys, CHUNK: tl.constexpr, SINGLE_CHUNK: tl.constexpr):
    """Key T of the k-th best score of one row: the largest T with #{key >= T} >= k.
    keys: the row's selection keys when SINGLE_CHUNK (else unused, the row is re-read)."""
    lo = tl.zeros((), tl.int64) - 2147483648
    hi = tl.zeros((), tl.int64) + 2147483647
    for _ in range(32):
        mid = lo + (hi - lo + 1) // 2
        cnt = _count_at_least(s_row, s_sn, s_sp, n_parts, N, mid, keys, CHUNK, SINGLE_CHUNK)
        take = cnt >= k
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid - 1)
    return lo


@triton.jit
def _topk_gather_kernel(
    s_ptr,
    x_ptr,
    kept_ptr,
    idx_ptr,
    scores_ptr,
    N,
    D,
    k,
    n_parts,
    s_sb,
    s_sp,
    s_sn,
    x_sb,
    x_sn,
    x_sd,
    o_sb,
    o_sk,
    o_sd,
    i_sb,
    i_sk,
    sc_sb,
    n_blocks,
    CHUNK: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WRITE_SCORES: tl.constexpr,
):
    pid, b = unflatten2(tl.program_id(0), n_blocks)
    b = b.to(tl.int64)
    s_row = s_ptr + b * s_sb
    keys = tl.zeros((CHUNK,), tl.int32)
    if SINGLE_CHUNK:
        offs = tl.arange(0, CHUNK)
        keys = selection_key(_row_scores(s_row, s_sn, s_sp, n_parts, offs, offs < N))
    thr = topk_threshold(s_row, s_sn, s_sp, n_parts, N, k, keys, CHUNK, SINGLE_CHUNK)

    # Selected rows before this block, and how many ties the threshold admits.
    start = pid * BLOCK_ROWS
    if SINGLE_CHUNK:
        offs = tl.arange(0, CHUNK)
        valid = offs < N
        gt = (keys > thr) & valid
        before = offs < start
        gt_total = tl.sum(gt.to(tl.int32))
        gt_before = tl.sum((gt & before).to(tl.int32))
        eq_before = tl.sum(((keys == thr) & valid & before).to(tl.int32))
    else:
        gt_total = tl.zeros((), tl.int32)
        gt_before = tl.zeros((), tl.int32)
        eq_before = tl.zeros((), tl.int32)
        for c0 in range(0, N, CHUNK):
            offs = c0 + tl.arange(0, CHUNK)
            valid = offs < N
            key = selection_key(_row_scores(s_row, s_sn, s_sp, n_parts, offs, valid))
            gt = (key > thr) & valid
            eq = (key == thr) & valid
            before = offs < start
            gt_total += tl.sum(gt.to(tl.int32))
            gt_before += tl.sum((gt & before).to(tl.int32))
            eq_before += tl.sum((eq & before).to(tl.int32))
    ties_taken = k - gt_total

    rows = start + tl.arange(0, BLOCK_ROWS)
    valid = rows < N
    s_own = _row_scores(s_row, s_sn, s_sp, n_parts, rows, valid)
    if WRITE_SCORES:
        tl.store(scores_ptr + b * sc_sb + rows, s_own, mask=valid)
    key = selection_key(s_own)
    gt = ((key > thr) & valid).to(tl.int32)
    eq = ((key == thr) & valid).to(tl.int32)
    eq_rank = eq_before + tl.cumsum(eq, 0) - eq
    sel = (gt == 1) | ((eq == 1) & (eq_rank < ties_taken))
    sel_i = sel.to(tl.int32)
    pos = gt_before + tl.minimum(eq_before, ties_taken) + tl.cumsum(sel_i, 0) - sel_i
    pos = pos.to(tl.int64)

    tl.store(idx_ptr + b * i_sb + pos * i_sk, rows.to(tl.int64), mask=sel)
    src = x_ptr + b * x_sb + rows.to(tl.int64)[:, None] * x_sn
    dst = kept_ptr + b * o_sb + pos[:, None] * o_sk
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = sel[:, None] & (cols < D)[None, :]
        tile = tl.load(src + cols[None, :] * x_sd, mask=m)
        tl.store(dst + cols[None, :] * o_sd, tile, mask=m)


def topk_gather(
    scores: torch.Tensor, x: torch.Tensor, k: int, block_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """scores: (B, N) float32, x: (B, N, D) -> kept (B, k, D), indices (B, k) int64 ascending.
    ``block_rows`` (a power of two) overrides the rows owned by one program."""
    kept, indices, _ = _launch(scores[:, None], x, k, block_rows, None, write_scores=False)
    return kept, indices


def topk_gather_parts(
    parts: torch.Tensor, x: torch.Tensor, k: int, block_rows: int | None = None, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_gather of the scores ``parts.sum(1)``, added in part order (0, 1, ...) in float32.
    parts: (B, P, N) float32, x: (B, N, D) -> kept (B, k, D), indices (B, k) int64 ascending,
    scores (B, N) float32. Every program re-reads the row (P times N floats), and rows longer
    than one chunk (4096) are re-read by each of the threshold search's 32 steps: meant for
    few parts of rows of one chunk. ``chunk`` (a power of two) overrides the chunk (tests)."""
    return _launch(parts, x, k, block_rows, chunk, write_scores=True)


def _launch(
    parts: torch.Tensor, x: torch.Tensor, k: int, block_rows: int | None, chunk: int | None, write_scores: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, n_parts, n = parts.shape
    d = x.shape[2]
    kept = empty(batch, k, d, dtype=x.dtype, device=x.device)
    indices = empty(batch, k, dtype=torch.int64, device=x.device)
    scores = empty(batch, n, dtype=torch.float32, device=x.device) if write_scores else parts[:, 0]
    if batch == 0:
        return kept, indices, scores
    chunk = chunk or min(max(next_pow2(n), 16), MAX_CHUNK)
    # The interpreter runs programs one after another: fewer, larger ones there.
    if block_rows is None:
        block_rows = 1024 if interpreted() else 32
    block_d = min(max(next_pow2(d), 16), 128)
    n_blocks = triton.cdiv(n, block_rows)
    _topk_gather_kernel[flat_grid("topk_gather", n_blocks, batch)](
        parts,
        x,
        kept,
        indices,
        scores,
        n,
        d,
        k,
        n_parts,
        parts.stride(0),
        parts.stride(1),
        parts.stride(2),
        x.stride(0),
        x.stride(1),
        x.stride(2),
        kept.stride(0),
        kept.stride(1),
        kept.stride(2),
        indices.stride(0),
        indices.stride(1),
        scores.stride(0),
        n_blocks,
        CHUNK=chunk,
        SINGLE_CHUNK=n <= chunk,
        BLOCK_ROWS=block_rows,
        BLOCK_D=block_d,
        WRITE_SCORES=write_scores,
    )
    return kept, indices, scores
