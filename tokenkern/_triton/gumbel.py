"""Gumbel top-k (the CUDA kernel of ``tokenkern::gumbel_topk``).

Each row is split over S programs (a flat grid of S x B programs, s fastest); program (b, s) writes
only its slice of the row's output but computes the row's statistics (threshold, ties, anchor,
u, the backward's sums) from the whole row in one fixed order, so every program of a row gets
the same values bit for bit and the result does not depend on S. A program draws the Gumbel
noise of every element from
``(seed, b * N + i)`` with Philox (``tl.rand``), forms the perturbed scores
``z = float32(logits) + g`` and then either

- HARD: selects the k largest z (the topk_gather rule: ties to the lower index, NaN as
  -inf; the threshold key found 4 bits per step, 16 candidates at a time) and writes the
  0/1 mask, or
- SOFT: writes the threshold relaxation ``soft_i = sigmoid((z_i - lambda) / tau)``,
  ``sum_i soft_i = k`` (``reference.relaxed_topk``), in the shifted form around the anchor
  a = the k-th largest z (found by the topk_gather threshold search): d = (z - a) / tau and
  u = (lambda - a) / tau, found by 32 bisection steps over the float32 bit patterns between
  ``min(finite d) - log N`` and ``log N`` (32 halvings reach two neighbouring floats from any
  float32 bracket). Each step evaluates the excess ``sum sigmoid(d - u) - k`` as small terms
  (``-sigmoid(u - d)`` on the top-k, ``sigmoid(d - u)`` off it; a tie group at the anchor
  split by the top-k contributes ``sigmoid(d - u) - ties / m`` each), so that it does not
  round to 0 over a wide range of u when soft is nearly hard. Rows without a finite lambda
  (at least k entries +inf, or at most k above -inf) get the hard mask. All float32, fp32
  sums.

When the row fits one chunk (N <= 4096) it stays in registers: one read of the logits and
one write of the program's slice of the output. Longer rows loop over chunks in every pass and
recompute z (logits + noise, bit for bit) each time. The hard forward of
``gumbel_topk(hard=True)`` needs no relaxation: its gradient is computed in the backward from
the same noise, redrawn bit for bit.

The backward (``gumbel_topk_backward``) splits rows the same way: it redraws the noise,
finds the same (a, u) (or reads them from the (B, 2) ``shift`` the soft forward wrote, which
skips the selection and the bisection) and writes the implicit-function gradient
``(s' / tau) (g - sum(g s') / sum(s'))``, s' = soft (1 - soft), 0 in rows without a finite
lambda. One launch, any N (rows past a chunk loop over chunks).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .select import MAX_CHUNK, selection_key
from .utils import empty, flat_grid, interpreted, next_pow2, unflatten2

_NOISE_BLOCK = 1024
_TARGET_PROGRAMS = 132  # the SMs of an H100 / H200 SXM
_MIN_SPAN = 16  # the fewest outputs a program owns when a row is split
_MAX_SPLITS = 65535  # programs per row
FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)


@triton.jit
def gumbel_noise(seed, offsets):
    """Gumbel(0, 1) noise, float32: -log(-log(max(u, 2^-126))) for u = tl.rand(seed, offsets)."""
    u = tl.maximum(tl.rand(seed, offsets), 1.1754943508222875e-38)
    return -tl.log(-tl.log(u))


@triton.jit
def _perturb(l_row, l_sn, noise_row, b, N, seed, offs, own, STORE_NOISE: tl.constexpr):
    """z = float32(logits) + g over offs (0 + g past N); the noise is stored where ``own``."""
    valid = offs < N
    g = gumbel_noise(seed, b * N + offs)
    if STORE_NOISE:
        tl.store(noise_row + offs, g, mask=own)
    return tl.load(l_row + offs * l_sn, mask=valid, other=0.0).to(tl.float32) + g


@triton.jit
def _clean_z(l_row, l_sn, b, N, seed, offs):
    """z of a soft or backward chunk, recomputed from the logits: NaN and lanes past N as -inf."""
    z = _perturb(l_row, l_sn, l_row, b, N, seed, offs, offs < 0, False)
    return tl.where((offs < N) & (z == z), z, float("-inf"))


@triton.jit
def _key_float(key):
    """The inverse of ``selection_key`` (key: int64 holding an int32 key) -> float32."""
    k32 = key.to(tl.int32)
    return tl.where(k32 < 0, k32 ^ 0x7FFFFFFF, k32).to(tl.float32, bitcast=True)


@triton.jit
def _scaled(z, anchor, inv_tau):
    """d = (z - anchor) / tau: the difference clamped to float32's range (no 0 * inf for a
    huge tau), the infinities of z kept exactly. z without NaN."""
    diff = tl.minimum(tl.maximum(z - anchor, -FLT_MAX), FLT_MAX)
    return tl.where((z == float("inf")) | (z == float("-inf")), z, diff * inv_tau)


@triton.jit
def _sigmoid_parts(x):
    """x without NaN -> (r, e r) = (sigmoid(|x|), sigmoid(-|x|)), e = exp(-|x|) in [0, 1]."""
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return r, e * r


@triton.jit
def _excess_terms(x, key, thr, ties, m):
    """Per-element terms of sum_i sigmoid(x_i) - k: -sigmoid(-x) above the threshold key
    (the top-k), sigmoid(x) below it; at the threshold (m ties, ``ties`` of them in the top-k)
    -sigmoid(-x) when all are, sigmoid(x) - ties / m otherwise (then not saturated)."""
    big, small = _sigmoid_parts(x)
    pos = x >= 0
    s = tl.where(pos, big, small)
    s_neg = tl.where(pos, small, big)
    at = tl.where(ties == m, -s_neg, s - ties.to(tl.float32) / m.to(tl.float32))
    return tl.where(key > thr, -s_neg, tl.where(key == thr, at, s))


@triton.jit
def _row_stats(z, valid):
    """(#{z = +inf}, #{z > -inf}, min finite z) of z (CHUNK,) without NaN."""
    pinf = tl.sum(((z == float("inf")) & valid).to(tl.int32), 0)
    alive = tl.sum(((z > float("-inf")) & valid).to(tl.int32), 0)
    finite = valid & (z > float("-inf")) & (z < float("inf"))
    return pinf, alive, tl.min(tl.where(finite, z, float("inf")), 0)


@triton.jit
def _tie_counts(z, valid, thr):
    key = selection_key(z)
    n_gt = tl.sum(((key > thr) & valid).to(tl.int32), 0)
    return n_gt, tl.sum(((key == thr) & valid).to(tl.int32), 0)


@triton.jit
def _digit_counts(key, valid, prefix, shift):
    """(16,) int32: #{valid keys >= T_d}, T_d = the candidate thresholds prefix + d 2^shift
    (as unsigned keys key + 2^31; prefix is 0 below bit shift + 4), d = 0..15, for a chunk of
    at most 65535 keys. Four packed int64 sums (16 bits per candidate) instead of sixteen."""
    rel = ((key.to(tl.int64) + 2147483648) >> shift) - (prefix >> shift)
    top = tl.where(valid, tl.minimum(tl.maximum(rel, -1), 15), -1)  # key >= T_d iff top >= d
    d = tl.arange(0, 16)
    cnt = tl.zeros((16,), tl.int32)
    for q in tl.static_range(4):
        n = tl.minimum(tl.maximum(top - 4 * q + 1, 0), 4)  # candidates 4q..4q+3 the key reaches
        packed = tl.where(n == 1, 1, tl.where(n == 2, 0x10001, tl.where(n == 3, 0x100010001, 0)))
        packed = tl.where(n == 4, 0x1000100010001, packed).to(tl.int64)
        total = tl.sum(packed, 0)
        cnt += tl.where(d // 4 == q, ((total >> (16 * (d % 4))) & 0xFFFF).to(tl.int32), 0)
    return cnt


@triton.jit
def _threshold(l_row, l_sn, b, N, seed, k, key, CHUNK: tl.constexpr, SINGLE_CHUNK: tl.constexpr):
    """Key T of the k-th best z of the row (the largest T with #{key >= T} >= k, the
    topk_gather threshold), 4 bits per step: 8 steps of 16 candidates. key: the row's keys in
    registers (SINGLE_CHUNK), else recomputed from the logits in every step."""
    prefix = tl.zeros((), tl.int64)
    d = tl.arange(0, 16)
    for step in range(8):
        shift = 28 - 4 * step
        if SINGLE_CHUNK:
            cnt = _digit_counts(key, tl.arange(0, CHUNK) < N, prefix, shift)
        else:
            cnt = tl.zeros((16,), tl.int32)
            for c0 in range(0, N, CHUNK):
                offs = c0 + tl.arange(0, CHUNK)
                zc = _perturb(l_row, l_sn, l_row, b, N, seed, offs, offs < 0, False)
                cnt += _digit_counts(selection_key(zc), offs < N, prefix, shift)
        prefix += tl.max(tl.where(cnt >= k, d, 0), 0).to(tl.int64) << shift
    return prefix - 2147483648


@triton.jit
def _excess(
    l_row, l_sn, b, seed, z, N, anchor, inv_tau, u, thr, ties, m, CHUNK: tl.constexpr, SINGLE_CHUNK: tl.constexpr
):
    """sum_i sigmoid(d_i - u) - k of the row: z in registers (SINGLE_CHUNK) or recomputed."""
    if SINGLE_CHUNK:
        offs = tl.arange(0, CHUNK)
        t = _excess_terms(_scaled(z, anchor, inv_tau) - u, selection_key(z), thr, ties, m)
        total = tl.sum(tl.where(offs < N, t, 0.0), 0)
    else:
        total = tl.zeros((), tl.float32)
        for c0 in range(0, N, CHUNK):
            offs = c0 + tl.arange(0, CHUNK)
            zc = _clean_z(l_row, l_sn, b, N, seed, offs)
            t = _excess_terms(_scaled(zc, anchor, inv_tau) - u, selection_key(zc), thr, ties, m)
            total += tl.sum(tl.where(offs < N, t, 0.0), 0)
    return total


@triton.jit
def _relaxation(
    l_row, l_sn, b, seed, z, N, k, inv_tau, log_n, pinf, alive, zmin, CHUNK: tl.constexpr, SINGLE_CHUNK: tl.constexpr
):
    """The row's relaxation: (anchor, u, thr, ties, m, degenerate). z (NaN cleaned to -inf) is
    in registers when SINGLE_CHUNK, else recomputed from the logits; pinf, alive, zmin from
    ``_row_stats``."""
    if SINGLE_CHUNK:
        valid = tl.arange(0, CHUNK) < N
        thr = _threshold(l_row, l_sn, b, N, seed, k, selection_key(z), CHUNK, True)
        n_gt, m = _tie_counts(z, valid, thr)
    else:
        thr = _threshold(l_row, l_sn, b, N, seed, k, selection_key(z), CHUNK, False)
        n_gt = tl.zeros((), tl.int32)
        m = tl.zeros((), tl.int32)
        for c0 in range(0, N, CHUNK):
            offs = c0 + tl.arange(0, CHUNK)
            c_gt, c_m = _tie_counts(_clean_z(l_row, l_sn, b, N, seed, offs), offs < N, thr)
            n_gt += c_gt
            m += c_m
    ties = k - n_gt
    degenerate = (pinf >= k) | (alive <= k)
    anchor = tl.where(degenerate, 0.0, _key_float(thr))
    # Bracket: at min(finite d) - log N the sum exceeds k, at log N it is below k.
    hi_u = tl.zeros((), tl.float32) + log_n
    dmin = tl.minimum(tl.maximum(zmin - anchor, -FLT_MAX), FLT_MAX) * inv_tau
    lo_u = tl.minimum(tl.maximum(dmin - log_n, -FLT_MAX), hi_u)
    lo = selection_key(lo_u).to(tl.int64)
    hi = selection_key(hi_u).to(tl.int64)
    e_lo = tl.full((), float("inf"), tl.float32)
    e_hi = tl.full((), float("-inf"), tl.float32)
    for _ in range(32):
        mid = lo + (hi - lo) // 2
        e = _excess(l_row, l_sn, b, seed, z, N, anchor, inv_tau, _key_float(mid), thr, ties, m, CHUNK, SINGLE_CHUNK)
        take = e >= 0
        lo = tl.where(take, mid, lo)
        e_lo = tl.where(take, e, e_lo)
        hi = tl.where(take, hi, mid)
        e_hi = tl.where(take, e_hi, e)
    u = _key_float(tl.where(e_lo <= -e_hi, lo, hi))
    return anchor, u, thr, ties, m, degenerate


@triton.jit
def _soft_or_hard(z, offs, anchor, inv_tau, u, thr, ties, eq_seen, degenerate):
    """The output of a soft chunk: sigmoid(d - u), or the hard mask in degenerate rows
    (eq_seen: threshold ties in earlier chunks)."""
    key = selection_key(z)
    eq = ((key == thr) & (offs >= 0)).to(tl.int32)
    rank = eq_seen + tl.cumsum(eq, 0) - eq
    sel = (key > thr) | ((eq == 1) & (rank < ties))
    x = _scaled(z, anchor, inv_tau) - u
    big, small = _sigmoid_parts(x)
    return tl.where(degenerate, sel.to(tl.float32), tl.where(x >= 0, big, small)), tl.sum(eq, 0)


@triton.jit
def _store_shift(shift_row, anchor, u, first):
    """The row's (anchor, u), float32 values into the float64 shift row (by its first program)."""
    tl.store(shift_row, anchor.to(tl.float64), mask=first)
    tl.store(shift_row + 1, u.to(tl.float64), mask=first)


@triton.jit
def _load_shift(shift_row, pinf, alive, k):
    """(anchor, u, degenerate) from a shift row written by ``_store_shift``."""
    anchor = tl.load(shift_row).to(tl.float32)
    u = tl.load(shift_row + 1).to(tl.float32)
    return anchor, u, (pinf >= k) | (alive <= k)


@triton.jit
def _owned(N, S):
    """(b, start, end): the row of this program of the flat S x B grid and [start, end), the
    slice of that row it writes."""
    s, b = unflatten2(tl.program_id(0), S)
    span = tl.cdiv(N, S)
    start = s * span
    return b.to(tl.int64), start, tl.minimum(start + span, N)


@triton.jit
def _gumbel_topk_kernel(
    l_ptr,
    out_ptr,
    noise_ptr,
    shift_ptr,
    N,
    k,
    inv_tau,
    log_n,
    seed,
    l_sb,
    l_sn,
    S,
    CHUNK: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
    HARD: tl.constexpr,
    STORE_NOISE: tl.constexpr,
    STORE_SHIFT: tl.constexpr,
):
    b, start, end = _owned(N, S)
    l_row = l_ptr + b * l_sb
    out_row = out_ptr + b * N
    noise_row = noise_ptr + b * N

    if HARD:
        if SINGLE_CHUNK:
            offs = tl.arange(0, CHUNK)
            valid = offs < N
            own = (offs >= start) & (offs < end)
            z = _perturb(l_row, l_sn, noise_row, b, N, seed, offs, own, STORE_NOISE)
            key = selection_key(z)
            thr = _threshold(l_row, l_sn, b, N, seed, k, key, CHUNK, True)
            gt = (key > thr) & valid
            eq = ((key == thr) & valid).to(tl.int32)
            ties = k - tl.sum(gt.to(tl.int32), 0)
            rank = tl.cumsum(eq, 0) - eq
            sel = gt | ((eq == 1) & (rank < ties))
            tl.store(out_row + offs, sel.to(tl.float32), mask=own)
        else:
            thr = _threshold(l_row, l_sn, b, N, seed, k, tl.zeros((CHUNK,), tl.int32), CHUNK, False)
            gt_total = tl.zeros((), tl.int32)
            for c0 in range(0, N, CHUNK):
                offs = c0 + tl.arange(0, CHUNK)
                key = selection_key(_perturb(l_row, l_sn, l_row, b, N, seed, offs, offs < 0, False))
                gt_total += tl.sum(((key > thr) & (offs < N)).to(tl.int32), 0)
            ties = k - gt_total
            eq_seen = tl.zeros((), tl.int32)
            for c0 in range(0, end, CHUNK):
                offs = c0 + tl.arange(0, CHUNK)
                valid = offs < N
                own = (offs >= start) & (offs < end)
                key = selection_key(_perturb(l_row, l_sn, noise_row, b, N, seed, offs, own, STORE_NOISE))
                gt = (key > thr) & valid
                eq = ((key == thr) & valid).to(tl.int32)
                rank = eq_seen + tl.cumsum(eq, 0) - eq
                sel = gt | ((eq == 1) & (rank < ties))
                eq_seen += tl.sum(eq, 0)
                tl.store(out_row + offs, sel.to(tl.float32), mask=own)
    else:
        if SINGLE_CHUNK:
            offs = tl.arange(0, CHUNK)
            valid = offs < N
            own = (offs >= start) & (offs < end)
            z = _perturb(l_row, l_sn, noise_row, b, N, seed, offs, own, STORE_NOISE)
            z = tl.where(valid & (z == z), z, float("-inf"))
            pinf, alive, zmin = _row_stats(z, valid)
            anchor, u, thr, ties, _m, degen = _relaxation(
                l_row, l_sn, b, seed, z, N, k, inv_tau, log_n, pinf, alive, zmin, CHUNK, True
            )
            if STORE_SHIFT:
                _store_shift(shift_ptr + 2 * b, anchor, u, start == 0)
            soft, _ = _soft_or_hard(z, tl.where(valid, offs, -1), anchor, inv_tau, u, thr, ties, 0, degen)
            tl.store(out_row + offs, soft, mask=own)
        else:
            pinf = tl.zeros((), tl.int32)
            alive = tl.zeros((), tl.int32)
            zmin = tl.full((), float("inf"), tl.float32)
            for c0 in range(0, N, CHUNK):
                offs = c0 + tl.arange(0, CHUNK)
                valid = offs < N
                own = (offs >= start) & (offs < end)
                z = _perturb(l_row, l_sn, noise_row, b, N, seed, offs, own, STORE_NOISE)
                z = tl.where(valid & (z == z), z, float("-inf"))
                c_pinf, c_alive, c_min = _row_stats(z, valid)
                pinf += c_pinf
                alive += c_alive
                zmin = tl.minimum(zmin, c_min)
            z0 = tl.zeros((CHUNK,), tl.float32)
            anchor, u, thr, ties, _m, degen = _relaxation(
                l_row, l_sn, b, seed, z0, N, k, inv_tau, log_n, pinf, alive, zmin, CHUNK, False
            )
            if STORE_SHIFT:
                _store_shift(shift_ptr + 2 * b, anchor, u, start == 0)
            eq_seen = tl.zeros((), tl.int32)
            for c0 in range(0, end, CHUNK):
                offs = c0 + tl.arange(0, CHUNK)
                valid = offs < N
                z = _clean_z(l_row, l_sn, b, N, seed, offs)
                soft, c_eq = _soft_or_hard(z, tl.where(valid, offs, -1), anchor, inv_tau, u, thr, ties, eq_seen, degen)
                eq_seen += c_eq
                tl.store(out_row + offs, soft, mask=(offs >= start) & (offs < end))


@triton.jit
def _grad_parts(z, g, anchor, inv_tau, u):
    """s' = sigmoid(x) sigmoid(-x) at x = d - u, and g s' (0 where g is padding)."""
    big, small = _sigmoid_parts(_scaled(z, anchor, inv_tau) - u)
    sp = big * small
    return sp, g * sp


@triton.jit
def _gumbel_topk_backward_kernel(
    l_ptr,
    g_ptr,
    out_ptr,
    N,
    k,
    inv_tau,
    log_n,
    seed,
    l_sb,
    l_sn,
    g_sb,
    g_sn,
    shift_ptr,
    S,
    CHUNK: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
):
    b, start, end = _owned(N, S)
    l_row = l_ptr + b * l_sb
    g_row = g_ptr + b * g_sb
    out_row = out_ptr + b * N

    if SINGLE_CHUNK:
        offs = tl.arange(0, CHUNK)
        valid = offs < N
        z = _clean_z(l_row, l_sn, b, N, seed, offs)
        pinf, alive, zmin = _row_stats(z, valid)
        if HAS_SHIFT:
            anchor, u, degen = _load_shift(shift_ptr + 2 * b, pinf, alive, k)
        else:
            anchor, u, _thr, _ties, _m, degen = _relaxation(
                l_row, l_sn, b, seed, z, N, k, inv_tau, log_n, pinf, alive, zmin, CHUNK, True
            )
        g = tl.load(g_row + offs * g_sn, mask=valid, other=0.0).to(tl.float32)
        sp, gsp = _grad_parts(z, g, anchor, inv_tau, u)
        total = tl.sum(sp, 0)
        c = tl.sum(gsp, 0) / tl.where(total > 0, total, 1.0)
        dz = tl.where(degen | (total == 0), 0.0, sp * inv_tau * (g - c))
        tl.store(out_row + offs, dz, mask=(offs >= start) & (offs < end))
    else:
        pinf = tl.zeros((), tl.int32)
        alive = tl.zeros((), tl.int32)
        zmin = tl.full((), float("inf"), tl.float32)
        for c0 in range(0, N, CHUNK):
            offs = c0 + tl.arange(0, CHUNK)
            c_pinf, c_alive, c_min = _row_stats(_clean_z(l_row, l_sn, b, N, seed, offs), offs < N)
            pinf += c_pinf
            alive += c_alive
            zmin = tl.minimum(zmin, c_min)
        if HAS_SHIFT:
            anchor, u, degen = _load_shift(shift_ptr + 2 * b, pinf, alive, k)
        else:
            z0 = tl.zeros((CHUNK,), tl.float32)
            anchor, u, _thr, _ties, _m, degen = _relaxation(
                l_row, l_sn, b, seed, z0, N, k, inv_tau, log_n, pinf, alive, zmin, CHUNK, False
            )
        total = tl.zeros((), tl.float32)
        gs_total = tl.zeros((), tl.float32)
        for c0 in range(0, N, CHUNK):
            offs = c0 + tl.arange(0, CHUNK)
            valid = offs < N
            z = _clean_z(l_row, l_sn, b, N, seed, offs)
            g = tl.load(g_row + offs * g_sn, mask=valid, other=0.0).to(tl.float32)
            sp, gsp = _grad_parts(z, g, anchor, inv_tau, u)
            total += tl.sum(sp, 0)
            gs_total += tl.sum(gsp, 0)
        c = gs_total / tl.where(total > 0, total, 1.0)
        for c0 in range(start, end, CHUNK):
            offs = c0 + tl.arange(0, CHUNK)
            valid = offs < end
            z = _clean_z(l_row, l_sn, b, N, seed, offs)
            g = tl.load(g_row + offs * g_sn, mask=valid, other=0.0).to(tl.float32)
            sp, _gsp = _grad_parts(z, g, anchor, inv_tau, u)
            dz = tl.where(degen | (total == 0), 0.0, sp * inv_tau * (g - c))
            tl.store(out_row + offs, dz, mask=valid)


@triton.jit
def _noise_kernel(out_ptr, total, seed, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, gumbel_noise(seed, offs), mask=offs < total)


def _num_warps(chunk: int) -> int:
    return 4 if chunk <= 1024 else 8


def _chunk(n: int) -> int:
    return min(max(next_pow2(n), 16), MAX_CHUNK)


def splits(batch: int, n: int) -> int:
    """Programs per row: enough for ``_TARGET_PROGRAMS`` programs in all, each owning at
    least ``_MIN_SPAN`` outputs; 2 under the interpreter (it runs programs one by one and
    every program searches the whole row)."""
    if interpreted():
        return min(2, max(n, 1))
    return max(1, min(triton.cdiv(_TARGET_PROGRAMS, max(batch, 1)), n // _MIN_SPAN))


def _check_splits(op: str, value: int | None, batch: int, n: int) -> int:
    if value is None:
        return splits(batch, n)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_SPLITS:
        raise ValueError(f"tokenkern.{op}: n_splits must be an int in [1, {_MAX_SPLITS}], got {value!r}")
    return value


def gumbel_topk(
    logits: torch.Tensor,
    k: int,
    tau: float,
    seed: int,
    hard: bool,
    return_noise: bool = False,
    shift: torch.Tensor | None = None,
    n_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits: (B, N) floating -> (out (B, N) float32, noise (B, N) float32 or None).
    out is the hard 0/1 mask when ``hard`` and the relaxation ``soft`` otherwise; the noise
    (what the kernel drew) is returned when ``return_noise``. shift: (B, 2) float64 or None;
    when given (soft only), each row's (anchor, u) is written into it, for the backward.
    n_splits: programs per row (None: ``splits(B, N)``); the result does not depend on it."""
    batch, n = logits.shape
    n_splits = _check_splits("gumbel_topk", n_splits, batch, n)
    out = empty(batch, n, dtype=torch.float32, device=logits.device)
    noise_out = empty(batch, n, dtype=torch.float32, device=logits.device) if return_noise else None
    if batch == 0:
        return out, noise_out
    store_shift = shift is not None and not hard
    chunk = _chunk(n)
    _gumbel_topk_kernel[flat_grid("gumbel_topk", n_splits, batch)](
        logits,
        out,
        out if noise_out is None else noise_out,
        shift if store_shift else out,
        n,
        k,
        1.0 / tau,
        math.log(n),
        seed,
        logits.stride(0),
        logits.stride(1),
        n_splits,
        CHUNK=chunk,
        SINGLE_CHUNK=n <= chunk,
        HARD=hard,
        STORE_NOISE=return_noise,
        STORE_SHIFT=store_shift,
        num_warps=_num_warps(chunk),
    )
    return out, noise_out


def noise(batch: int, n: int, seed: int, device: torch.device) -> torch.Tensor:
    """(B, N) float32: the noise ``gumbel_topk`` draws for these (seed, B, N), bit for bit."""
    out = empty(batch, n, dtype=torch.float32, device=device)
    total = batch * n
    if total:
        _noise_kernel[(triton.cdiv(total, _NOISE_BLOCK),)](out, total, seed, BLOCK=_NOISE_BLOCK)
    return out


def gumbel_topk_backward(
    grad: torch.Tensor,
    logits: torch.Tensor,
    k: int,
    tau: float,
    seed: int,
    shift: torch.Tensor | None = None,
    n_splits: int | None = None,
) -> torch.Tensor:
    """grad, logits: (B, N) -> d(sum grad * gumbel_topk(logits, k, tau, seed)) / d logits, float32,
    through the relaxation (either value of hard). One launch, ``n_splits`` programs per row
    (None: ``splits(B, N)``). shift: (B, 2) float64, the (anchor, u) the soft forward wrote,
    skips the search; None runs it."""
    batch, n = logits.shape
    n_splits = _check_splits("gumbel_topk_backward", n_splits, batch, n)
    out = empty(batch, n, dtype=torch.float32, device=logits.device)
    if batch == 0:
        return out
    chunk = _chunk(n)
    _gumbel_topk_backward_kernel[flat_grid("gumbel_topk_backward", n_splits, batch)](
        logits,
        grad,
        out,
        n,
        k,
        1.0 / tau,
        math.log(n),
        seed,
        logits.stride(0),
        logits.stride(1),
        grad.stride(0),
        grad.stride(1),
        out if shift is None else shift,
        n_splits,
        CHUNK=chunk,
        SINGLE_CHUNK=n <= chunk,
        HAS_SHIFT=shift is not None,
        num_warps=_num_warps(chunk),
    )
    return out
