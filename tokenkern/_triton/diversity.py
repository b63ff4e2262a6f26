"""Greedy diversity selection on the GPU: the CUDA kernels of ``tokenkern::maxmin_select``,
``dpp_select``, ``mmr_select`` (two launches each) and ``pivot_select`` (two launches).

maxmin / mmr / dpp:

1. ``_gram_kernel``: the Gram matrix ``G = x x^T`` (B, N, N) float32 as one tensor-core GEMM
   over the upper-triangle tile pairs (each off-diagonal tile is written with its transpose,
   so G is exactly symmetric); it also resets the exchange slots of launch 2.
2. ``_greedy_kernel`` / ``_dpp_kernel``: a persistent grid of C programs per sample, program
   c owning the tokens ``[c W, (c + 1) W)``. Each keeps its tokens' state on chip (max cosine
   to the selected set, or DPP's d^2) and, per greedy step, reads one row of G, updates its
   state and publishes its best candidate as one int64 ``(order key << 32) | (2^31 - 1 -
   index)`` into its slot of the step; every program of the sample waits until the C slots
   of the step are written and takes their maximum: the same winner everywhere, ties to the
   lower index, no float atomics. DPP's Cholesky rows live in a (B, N, k) float32 scratch
   (written by the owner of each token while it is an unselected candidate, read back by it
   at every step and as the winner's k-vector by all). The output is
   compacted ascending at the end (each program counts the winners below its range).

   C = min(ceil(SMs / B), ceil(N / 32), SMs): about one wave over the batch. The C programs
   of a sample wait on each other, so they must be resident together: C <= SMs, and the
   samples' programs are contiguous in the grid, so with in-order dispatch (as CUDA does) a
   waiting sample's missing programs start as soon as earlier samples finish. Under the
   interpreter, which runs programs one after another, C = 1.

   Scratch: G, B N^2 float32 (33 MB per sample at N = 2880; 64 MiB at N = 4096), and for DPP
   the rows c_t, B N k float32.

Cosine: ``S_ij = G_ij / (||x_i|| ||x_j||)`` with ``||x_i||^2 = G_ii``, 0 for a zero-norm token,
``S_ii = 1``. pivot_select: ``_pivot_sim_kernel`` (the P x L cosines of every sample: one
tensor-core product per tile of tokens, x read once) and ``_pivot_pick_kernel`` (one program
per sample: per pivot a threshold search over order keys, P x L work).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .select import selection_key
from .utils import empty, flat_grid, interpreted, next_pow2

SMS = 132  # H100/H200 SMs (the static report records on CPU tensors)
MIN_COLS = 32  # the fewest tokens one greedy program owns
TILE = 4096  # elements of the widest register tile of a greedy program

SENTINEL: tl.constexpr = tl.constexpr(-9223372032559808512)  # (-2^31 + 1) << 32: below every key
# Order classes of a token that is not a live candidate (below every float's order key).
NONCAND: tl.constexpr = tl.constexpr(-2139095042)
TAKEN: tl.constexpr = tl.constexpr(-2139095043)


# ------------------------------------------------------------------------------- helpers


@triton.jit
def _pack(hi, idx):
    """(order key, token index) -> int64 whose max is the highest key, then the lower index."""
    return hi.to(tl.int64) * 4294967296 + (2147483647 - idx.to(tl.int64))


@triton.jit
def _unpack_index(packed):
    return (2147483647 - (packed & 0xFFFFFFFF)).to(tl.int32)


@triton.jit
def _inv_norm(g_diag):
    return tl.where(g_diag > 0, 1.0 / tl.sqrt_rn(tl.where(g_diag > 0, g_diag, 1.0)), 0.0)


@triton.jit
def _exchange(slot_row, c, C, local, CB: tl.constexpr):
    """Publish this program's best packed candidate in slot c, wait for the C slots of the
    step and return their maximum (the same in every program of the sample)."""
    tl.debug_barrier()  # every thread's stores of the step precede the release
    tl.atomic_xchg(slot_row + c, local, sem="release", scope="gpu")
    offs = tl.arange(0, CB)
    ok = offs < C
    vals = tl.load(slot_row + offs, mask=ok, other=0, volatile=True)
    missing = tl.sum(((vals == SENTINEL) & ok).to(tl.int32), 0)
    while missing > 0:
        vals = tl.load(slot_row + offs, mask=ok, other=0, volatile=True)
        missing = tl.sum(((vals == SENTINEL) & ok).to(tl.int32), 0)
    return tl.max(tl.where(ok, vals, SENTINEL), 0)


@triton.jit
def _acquire(slot_row, owner):
    """Synchronize with the release of program ``owner``'s (final) slot: the stores it made
    before publishing (DPP's rows c_t) are visible to every thread of this program after."""
    tl.atomic_add(slot_row + owner, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _store_ascending(out_row, cols, sel, below):
    """Write the selected tokens of this program's range at their ascending positions."""
    s = sel.to(tl.int32)
    pos = below + tl.cumsum(s, 0) - s
    tl.store(out_row + pos, cols.to(tl.int64), mask=sel)


# ------------------------------------------------------------------------------- launch 1


@triton.jit
def _gram_kernel(
    x_ptr,
    g_ptr,
    slot_ptr,
    N,
    D,
    n_tiles,
    n_pairs,
    n_slots,
    slot_chunk,
    x_sb,
    x_sn,
    x_sd,
    BM: tl.constexpr,
    BK: tl.constexpr,
    IEEE: tl.constexpr,
    SLOT_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    # Reset this program's share of the exchange slots.
    for s0 in range(0, slot_chunk, SLOT_BLOCK):
        offs = (pid * slot_chunk + s0 + tl.arange(0, SLOT_BLOCK)).to(tl.int64)
        ok = (offs < n_slots) & (s0 + tl.arange(0, SLOT_BLOCK) < slot_chunk)
        tl.store(slot_ptr + offs, tl.full((SLOT_BLOCK,), SENTINEL, tl.int64), mask=ok)

    pair = pid % n_pairs
    b = (pid // n_pairs).to(tl.int64)
    ti = pair * 0
    for r in range(1, n_tiles):
        ti = tl.where(pair >= r * n_tiles - (r * (r - 1)) // 2, r, ti)
    tj = ti + pair - (ti * n_tiles - (ti * (ti - 1)) // 2)

    ri = ti * BM + tl.arange(0, BM)
    rj = tj * BM + tl.arange(0, BM)
    x_b = x_ptr + b * x_sb
    acc = tl.zeros((BM, BM), tl.float32)
    for k0 in range(0, D, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(
            x_b + ri[:, None] * x_sn + rk[None, :] * x_sd, mask=(ri < N)[:, None] & (rk < D)[None, :], other=0.0
        )
        bt = tl.load(
            x_b + rj[:, None] * x_sn + rk[None, :] * x_sd, mask=(rj < N)[:, None] & (rk < D)[None, :], other=0.0
        )
        if IEEE:
            acc = tl.dot(a, tl.trans(bt), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(bt), acc)
    g_b = g_ptr + b * N * N
    ok = (ri < N)[:, None] & (rj < N)[None, :]
    tl.store(g_b + ri[:, None] * N + rj[None, :], acc, mask=ok)
    tl.store(g_b + rj[None, :] * N + ri[:, None], acc, mask=ok & (ti != tj))


# ------------------------------------------------------------------- launch 2: max-min / mmr


@triton.jit
def _program_columns(g_ptr, c_ptr, N, C, W, c_sb, c_sn, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """Program pid owns columns [c W, c W + W) of sample b (C programs per sample): their
    indices, ownership mask, the sample's Gram, 1/||x_j|| and the candidate mask."""
    pid = tl.program_id(0)
    c = pid % C
    b = (pid // C).to(tl.int64)
    start = c * W
    cols = start + tl.arange(0, BLOCK)
    own = (tl.arange(0, BLOCK) < W) & (cols < N)
    g_b = g_ptr + b * N * N
    inv = _inv_norm(tl.load(g_b + cols * (N + 1), mask=own, other=0.0))
    cand = own
    if HAS_MASK:
        cand = cand & (tl.load(c_ptr + b * c_sb + cols * c_sn, mask=own, other=0) != 0)
    return c, b, start, cols, own, g_b, inv, cand


@triton.jit
def _first_pick_scores(
    g_b, N, cols, own, inv, cand, c_ptr, c_sn, HAS_MASK: tl.constexpr, BR: tl.constexpr, BLOCK: tl.constexpr
):
    """-max_{i candidate, i != j} S_ij of each owned column j (-inf... +inf when j has no
    other candidate): the first max-min pick maximizes it."""
    best = tl.full((BLOCK,), float("-inf"), tl.float32)
    for i0 in range(0, N, BR):
        rows = i0 + tl.arange(0, BR)
        r_ok = rows < N
        if HAS_MASK:
            r_ok = r_ok & (tl.load(c_ptr + rows * c_sn, mask=rows < N, other=0) != 0)
        inv_r = _inv_norm(tl.load(g_b + rows * (N + 1), mask=rows < N, other=0.0))
        ok = r_ok[:, None] & own[None, :] & (rows[:, None] != cols[None, :])
        g = tl.load(g_b + rows[:, None] * N + cols[None, :], mask=ok, other=0.0)
        s = (g * inv_r[:, None]) * inv[None, :]
        best = tl.maximum(best, tl.max(tl.where(ok, s, float("-inf")), 0))
    return -best


@triton.jit
def _greedy_kernel(
    g_ptr,
    c_ptr,
    imp_ptr,
    slot_ptr,
    out_ptr,
    N,
    k,
    C,
    W,
    lam,
    c_sb,
    c_sn,
    i_sb,
    i_sn,
    HAS_MASK: tl.constexpr,
    MMR: tl.constexpr,
    BLOCK: tl.constexpr,
    BR: tl.constexpr,
    NB: tl.constexpr,
    CB: tl.constexpr,
):
    c, b, start, cols, own, g_b, inv, cand = _program_columns(g_ptr, c_ptr, N, C, W, c_sb, c_sn, HAS_MASK, BLOCK)
    slots = slot_ptr + b * k * C

    if MMR:
        # imp = (v - min) / (max - min) over the sample's candidates (0 when max == min).
        rn = tl.arange(0, NB)
        all_ok = rn < N
        if HAS_MASK:
            all_ok = all_ok & (tl.load(c_ptr + b * c_sb + rn * c_sn, mask=rn < N, other=0) != 0)
        v_all = tl.load(imp_ptr + b * i_sb + rn * i_sn, mask=rn < N, other=0.0).to(tl.float32)
        lo = tl.min(tl.where(all_ok, v_all, float("inf")), 0)
        hi = tl.max(tl.where(all_ok, v_all, float("-inf")), 0)
        v = tl.load(imp_ptr + b * i_sb + cols * i_sn, mask=own, other=0.0).to(tl.float32)
        imp = tl.where(hi > lo, (v - lo) / (hi - lo), 0.0)
        score = v
    else:
        score = _first_pick_scores(g_b, N, cols, own, inv, cand, c_ptr + b * c_sb, c_sn, HAS_MASK, BR, BLOCK)

    sel = cols < 0
    mc = tl.full((BLOCK,), float("-inf"), tl.float32)  # max cosine to the selected set
    below = tl.zeros((), tl.int32)
    for t in range(0, k):
        if t > 0:
            if MMR:
                score = lam * imp - (1.0 - lam) * mc
            else:
                score = -mc
        hi_key = tl.where(cand & ~sel, selection_key(score), tl.where(own & ~sel, NONCAND, TAKEN))
        local = tl.max(_pack(hi_key, cols), 0)
        s = _unpack_index(_exchange(slots + t * C, c, C, local, CB))
        sel = sel | (cols == s)
        below += (s < start).to(tl.int32)
        if t + 1 < k:
            inv_s = _inv_norm(tl.load(g_b + s.to(tl.int64) * (N + 1)))
            row = tl.load(g_b + s.to(tl.int64) * N + cols, mask=own, other=0.0)
            mc = tl.maximum(mc, tl.where(cols == s, 1.0, (row * inv_s) * inv))
    _store_ascending(out_ptr + b * k, cols, sel & own, below)


# ------------------------------------------------------------------------ launch 2: DPP


@triton.jit
def _dpp_kernel(
    g_ptr,
    c_ptr,
    r_ptr,
    ct_ptr,
    slot_ptr,
    out_ptr,
    N,
    k,
    C,
    W,
    c_sb,
    c_sn,
    r_sb,
    r_sn,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
    TB: tl.constexpr,
    CB: tl.constexpr,
):
    c, b, start, cols, own, g_b, inv, cand = _program_columns(g_ptr, c_ptr, N, C, W, c_sb, c_sn, HAS_MASK, BLOCK)
    ct_b = ct_ptr + b * N * k  # (N, k): row j holds c_0[j], ..., c_{k-1}[j]
    slots = slot_ptr + b * k * C
    r = tl.load(r_ptr + b * r_sb + cols * r_sn, mask=own, other=0.0).to(tl.float32)
    d2 = tl.where(cand, r * r, float("-inf"))  # diag(L) = r_j S_jj r_j, S_jj = 1

    sel = cols < 0
    below = tl.zeros((), tl.int32)
    for i in range(0, k):
        live = cand & ~sel
        positive = (d2 > 0) & (d2 < float("inf"))
        d2_key = d2.to(tl.int32, bitcast=True)
        hi_key = tl.where(live, tl.where(positive, d2_key, 0), tl.where(own & ~sel, -1, -2))
        best = _exchange(slots + i * C, c, C, tl.max(_pack(hi_key, cols), 0), CB)
        j = _unpack_index(best)
        hi_j = (best >> 32).to(tl.int32)
        _acquire(slots + i * C, j // W)
        sel = sel | (cols == j)
        # Chen et al.: e = (L[j, :] - sum_t c_t[j] c_t) / sqrt(d2[j]); e = 0 past the rank. Only
        # the candidates still unselected: a row c[j'] is read only while j' is the pick.
        live = cand & ~sel
        dot = tl.zeros((BLOCK,), tl.float32)
        for t0 in range(0, i, TB):
            rt = t0 + tl.arange(0, TB)
            t_ok = rt < i
            # (a pick that is no candidate, past their count, has no row: hi_j < 0)
            cj = tl.load(ct_b + j.to(tl.int64) * k + rt, mask=t_ok & (hi_j >= 0), other=0.0, volatile=True)
            tile = tl.load(ct_b + cols[:, None].to(tl.int64) * k + rt[None, :], mask=live[:, None] & t_ok[None, :],
                           other=0.0)  # fmt: skip
            dot += tl.sum(tile * cj[None, :], 1)
        inv_j = _inv_norm(tl.load(g_b + j.to(tl.int64) * (N + 1)))
        row = tl.load(g_b + j.to(tl.int64) * N + cols, mask=live, other=0.0)
        s_row = (row * inv_j) * inv
        r_j = tl.load(r_ptr + b * r_sb + j * r_sn).to(tl.float32)
        d2_j = hi_j.to(tl.float32, bitcast=True)
        e = ((r_j * s_row) * r - dot) / tl.sqrt_rn(tl.where(hi_j > 0, d2_j, 1.0))
        e = tl.where(live & (hi_j > 0), e, 0.0)
        tl.store(ct_b + cols.to(tl.int64) * k + i, e, mask=live)
        d2 = d2 - e * e
        below += (j < start).to(tl.int32)
    _store_ascending(out_ptr + b * k, cols, sel & own, below)


# ---------------------------------------------------------------------------- pivot select


@triton.jit
def _pivot_sim_kernel(
    x_ptr,
    p_ptr,
    sim_ptr,
    L,
    D,
    P,
    n_tiles,
    x_sb,
    x_sn,
    x_sd,
    p_sb,
    p_sp,
    PB: tl.constexpr,
    BL: tl.constexpr,
    BK: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    tile = pid % n_tiles
    b = (pid // n_tiles).to(tl.int64)
    rp = tl.arange(0, PB)
    piv = tl.load(p_ptr + b * p_sb + rp * p_sp, mask=rp < P, other=0)
    piv = tl.minimum(tl.maximum(piv, 0), L - 1)  # an out-of-range pivot: in-range, unspecified
    rl = tile * BL + tl.arange(0, BL)
    x_b = x_ptr + b * x_sb
    acc = tl.zeros((PB, BL), tl.float32)
    n_p = tl.zeros((PB,), tl.float32)
    n_l = tl.zeros((BL,), tl.float32)
    rl64 = rl.to(tl.int64)  # L x D may pass 2^31
    for k0 in range(0, D, BK):
        rk = k0 + tl.arange(0, BK)
        xp = tl.load(x_b + piv[:, None] * x_sn + rk[None, :] * x_sd, mask=(rp < P)[:, None] & (rk < D)[None, :],
                     other=0.0)  # fmt: skip
        xl = tl.load(x_b + rl64[:, None] * x_sn + rk[None, :] * x_sd, mask=(rl < L)[:, None] & (rk < D)[None, :],
                     other=0.0)  # fmt: skip
        if IEEE:
            acc = tl.dot(xp, tl.trans(xl), acc, input_precision="ieee")
        else:
            acc = tl.dot(xp, tl.trans(xl), acc)
        xpf = xp.to(tl.float32)
        xlf = xl.to(tl.float32)
        n_p += tl.sum(xpf * xpf, 1)
        n_l += tl.sum(xlf * xlf, 1)
    den = tl.maximum(tl.sqrt_rn(n_l), 1e-8)[None, :] * tl.maximum(tl.sqrt_rn(n_p), 1e-8)[:, None]
    cos = acc / den
    ok = (rp < P)[:, None] & (rl < L)[None, :]
    tl.store(sim_ptr + b * P * L + rp[:, None] * L + rl[None, :], cos, mask=ok)


@triton.jit
def _pivot_key(sim_row, st_row, offs, L):
    """Order keys of one pivot's round: the remaining candidates by -cos (NaN last), then
    the other unselected tokens, then the selected ones."""
    ok = offs < L
    st = tl.load(st_row + offs, mask=ok, other=0)
    s = tl.load(sim_row + offs, mask=ok, other=0.0)
    key = tl.where(st == 2, selection_key(-s), tl.where(st == 1, NONCAND, TAKEN))
    return tl.where(ok, key, TAKEN - 1), ok


@triton.jit
def _pivot_pick_kernel(
    sim_ptr,
    c_ptr,
    st_ptr,
    out_ptr,
    L,
    P,
    per_pivot,
    c_sb,
    c_sl,
    CHUNK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    st_row = st_ptr + b * L  # 2 = remaining candidate, 1 = other unselected, 0 = selected
    for c0 in range(0, L, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        cand = tl.load(c_ptr + b * c_sb + offs * c_sl, mask=offs < L, other=0) != 0
        tl.store(st_row + offs, tl.where(cand, 2, 1).to(tl.int32), mask=offs < L)
    tl.debug_barrier()
    for p in range(0, P):
        sim_row = sim_ptr + b * P * L + p * L
        # Threshold T: the largest key with #{key >= T} >= per_pivot.
        lo = tl.zeros((), tl.int64) - 2147483648
        hi = tl.zeros((), tl.int64) + 2147483647
        for _ in range(32):
            mid = lo + (hi - lo + 1) // 2
            cnt = tl.zeros((), tl.int32)
            for c0 in range(0, L, CHUNK):
                key, ok = _pivot_key(sim_row, st_row, c0 + tl.arange(0, CHUNK), L)
                cnt += tl.sum(((key >= mid) & ok).to(tl.int32), 0)
            take = cnt >= per_pivot
            lo = tl.where(take, mid, lo)
            hi = tl.where(take, hi, mid - 1)
        n_gt = tl.zeros((), tl.int32)
        for c0 in range(0, L, CHUNK):
            key, ok = _pivot_key(sim_row, st_row, c0 + tl.arange(0, CHUNK), L)
            n_gt += tl.sum(((key > lo) & ok).to(tl.int32), 0)
        ties = per_pivot - n_gt
        eq_seen = tl.zeros((), tl.int32)
        tl.debug_barrier()
        for c0 in range(0, L, CHUNK):
            offs = c0 + tl.arange(0, CHUNK)
            key, ok = _pivot_key(sim_row, st_row, offs, L)
            eq = ((key == lo) & ok).to(tl.int32)
            rank = eq_seen + tl.cumsum(eq, 0) - eq
            pick = ((key > lo) & ok) | ((eq == 1) & (rank < ties))
            eq_seen += tl.sum(eq, 0)
            tl.store(st_row + offs, tl.zeros((CHUNK,), tl.int32), mask=pick)
        tl.debug_barrier()
    seen = tl.zeros((), tl.int32)
    for c0 in range(0, L, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        taken = (tl.load(st_row + offs, mask=offs < L, other=1) == 0) & (offs < L)
        t = taken.to(tl.int32)
        tl.store(out_ptr + b * P * per_pivot + seen + tl.cumsum(t, 0) - t, offs.to(tl.int64), mask=taken)
        seen += tl.sum(t, 0)


# ------------------------------------------------------------------------------- launchers


def sm_count(device: torch.device) -> int:
    """The SMs of a CUDA device (a cached host query, no sync); SMS elsewhere."""
    if device.type != "cuda":
        return SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _ctas_per_sample(batch: int, n: int, sms: int) -> int:
    """Programs per sample of the greedy kernels: about one wave over the batch, >= MIN_COLS
    tokens each, and never more than the SMs. The programs of one sample wait on each other, so
    they must be resident together: with more than one program per sample the kernels launch
    cooperatively (``launch_cooperative_grid``), so CUDA either makes the whole grid resident or
    refuses the launch with an error; it never hangs. The grid is at most SMs + B - 1 programs,
    which needs two resident programs per SM when it exceeds the SMs (the static kernel report
    gives the kernels' occupancy)."""
    if interpreted():
        return 1
    return max(1, min(triton.cdiv(sms, batch), triton.cdiv(n, MIN_COLS), sms))


def _gram(op: str, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """x: (B, N, D) -> G (B, N, N) float32; resets slots (any shape, int64) to SENTINEL."""
    batch, n, d = x.shape
    g = torch.empty(batch, n, n, dtype=torch.float32, device=x.device)
    ieee = x.dtype == torch.float32
    if interpreted():
        bm, bk, warps, stages = min(max(next_pow2(n), 16), 64), min(max(next_pow2(d), 16), 64), 4, 1
    elif ieee:
        bm, bk, warps, stages = 64, 32, 4, 2
    else:
        pairs128 = triton.cdiv(n, 128) * (triton.cdiv(n, 128) + 1) // 2
        bm = 128 if batch * pairs128 >= 2 * sm_count(x.device) else 64
        bk, warps, stages = 64, 8 if bm == 128 else 4, 3
    n_tiles = triton.cdiv(n, bm)
    n_pairs = n_tiles * (n_tiles + 1) // 2
    grid = flat_grid(op, n_pairs, batch)
    chunk = triton.cdiv(slots.numel(), grid[0])
    _gram_kernel[grid](
        x, g, slots, n, d, n_tiles, n_pairs, slots.numel(), chunk, x.stride(0), x.stride(1), x.stride(2),
        BM=bm, BK=bk, IEEE=ieee, SLOT_BLOCK=min(max(next_pow2(chunk), 16), 1024), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return g


def _mask_args(mask: torch.Tensor | None, placeholder: torch.Tensor) -> tuple[torch.Tensor, int, int, bool]:
    if mask is None:
        return placeholder, 0, 0, False
    return mask, mask.stride(0), mask.stride(1), True


def _greedy_layout(op: str, x: torch.Tensor, k: int) -> tuple[int, int, int, torch.Tensor, torch.Tensor]:
    """x: (B, N, D), B >= 1 -> (programs per sample, columns per program, its power-of-two
    block, the (B, k, programs) exchange slots, the Gram G (B, N, N) by the GEMM)."""
    batch, n, _ = x.shape
    cps = _ctas_per_sample(batch, n, sm_count(x.device))
    w = triton.cdiv(n, cps)
    slots = torch.empty(batch, k, cps, dtype=torch.int64, device=x.device)
    return cps, w, max(next_pow2(w), 16), slots, _gram(op, x, slots)


def _greedy(
    op: str, x: torch.Tensor, k: int, mask: torch.Tensor | None, importance: torch.Tensor | None, lam: float
) -> torch.Tensor:
    """maxmin (importance None) or mmr: G by the GEMM, then the greedy kernel."""
    batch, n, _ = x.shape
    out = empty(batch, k, dtype=torch.int64, device=x.device)
    if batch == 0:
        return out
    cps, w, block, slots, g = _greedy_layout(op, x, k)
    m, m_sb, m_sn, has_mask = _mask_args(mask, g)
    imp = importance if importance is not None else g
    _greedy_kernel[flat_grid(op, cps, batch)](
        g, m, imp, slots, out, n, k, cps, w, float(lam), m_sb, m_sn,
        imp.stride(0) if importance is not None else 0, imp.stride(1) if importance is not None else 0,
        HAS_MASK=has_mask, MMR=importance is not None, BLOCK=block, BR=max(1, min(TILE // block, next_pow2(n))),
        NB=max(next_pow2(n), 16) if importance is not None else 16, CB=max(next_pow2(cps), 2), num_warps=4,
        launch_cooperative_grid=cps > 1,
    )  # fmt: skip
    return out


def maxmin_select_triton(x: torch.Tensor, k: int, mask: torch.Tensor | None) -> torch.Tensor:
    """x: (B, N, D) CUDA, mask: (B, N) bool or None -> (B, k) int64 ascending (DivPrune)."""
    return _greedy("maxmin_select", x, k, mask, None, 0.0)


def mmr_select_triton(
    x: torch.Tensor, importance: torch.Tensor, k: int, lam: float, mask: torch.Tensor | None
) -> torch.Tensor:
    """x: (B, N, D), importance: (B, N), mask: (B, N) bool or None -> (B, k) int64 ascending."""
    return _greedy("mmr_select", x, k, mask, importance, lam)


def dpp_select_triton(x: torch.Tensor, relevance: torch.Tensor, k: int, mask: torch.Tensor | None) -> torch.Tensor:
    """x: (B, N, D), relevance: (B, N), mask: (B, N) bool or None -> (B, k) int64 ascending
    (Chen et al.'s fast greedy MAP of L = diag(r) S diag(r))."""
    batch, n, _ = x.shape
    out = empty(batch, k, dtype=torch.int64, device=x.device)
    if batch == 0:
        return out
    cps, w, block, slots, g = _greedy_layout("dpp_select", x, k)
    ct = torch.empty(batch, n, k, dtype=torch.float32, device=x.device)
    m, m_sb, m_sn, has_mask = _mask_args(mask, g)
    tb = max(16, min(next_pow2(k), TILE // block, 32))
    _dpp_kernel[flat_grid("dpp_select", cps, batch)](
        g, m, relevance, ct, slots, out, n, k, cps, w, m_sb, m_sn, relevance.stride(0), relevance.stride(1),
        HAS_MASK=has_mask, BLOCK=block, TB=tb, CB=max(next_pow2(cps), 2), num_warps=4,
        launch_cooperative_grid=cps > 1,
    )  # fmt: skip
    return out


def pivot_select_triton(
    x: torch.Tensor, pivots: torch.Tensor, candidates: torch.Tensor, per_pivot: int
) -> torch.Tensor:
    """x: (B, L, D), pivots: (B, P) int64, candidates: (B, L) bool -> (B, P * per_pivot) int64
    ascending (DART)."""
    batch, length, d = x.shape
    n_piv = pivots.shape[1]
    out = empty(batch, n_piv * per_pivot, dtype=torch.int64, device=x.device)
    if batch == 0:
        return out
    sim = torch.empty(batch, n_piv, length, dtype=torch.float32, device=x.device)
    ieee = x.dtype == torch.float32
    pb = max(next_pow2(n_piv), 16)
    if interpreted():
        bl, bk = min(max(next_pow2(length), 16), 128), min(max(next_pow2(d), 16), 64)
    else:
        bl = 64 if batch * triton.cdiv(length, 64) >= sm_count(x.device) else 32
        bk = 32 if ieee else 64
    n_tiles = triton.cdiv(length, bl)
    _pivot_sim_kernel[flat_grid("pivot_select", n_tiles, batch)](
        x, pivots, sim, length, d, n_piv, n_tiles, x.stride(0), x.stride(1), x.stride(2),
        pivots.stride(0), pivots.stride(1), PB=pb, BL=bl, BK=bk, IEEE=ieee, num_warps=4,
    )  # fmt: skip
    state = torch.empty(batch, length, dtype=torch.int32, device=x.device)
    _pivot_pick_kernel[(batch,)](
        sim, candidates, state, out, length, n_piv, per_pivot, candidates.stride(0), candidates.stride(1),
        CHUNK=min(max(next_pow2(length), 16), 4096), num_warps=8,
    )  # fmt: skip
    return out
