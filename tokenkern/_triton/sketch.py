"""Randomized range finder (Halko-Martinsson-Tropp) on the GPU, with no host synchronization:
the stages shared by the leverage-score and spectral-IPR kernels.

    omega = gaussian(D, l, seed)                (D, L) shared by the batch; cached (gaussian.py)
    Y = X @ omega, G(Y), max|X[b]|; Q1, T = orth(Y)  (B, N, l) one pass over X (one launch)
    repeat power_iters:                         two passes over X per iteration, a launch each
        Z1, Tz = orth(X^T Q1, T);  Q1, T = orth(X Z1, Tz)   (CholeskyQR2 of P' T)
    G(W), W = (X^T Q1) T                        (B, l (l + 1) / 2) one pass over X; W is not stored
                                                (ritz_pass: each sample's last program then runs
                                                the Rayleigh-Ritz step on G(W), small.py)

``L`` is the sketch width ``l`` rounded up to a power of two (at least 16, for tl.dot): the
register tiles are L wide, their columns past ``l`` exactly zero throughout, and the tall
float32 operands the passes write (Y, Z, Q1: (B, M, l)) are stored l wide, so the next pass
reads (and every program of it re-reads from L2) l / L of a padded operand's bytes. The
passes over X read it in its own dtype; a 16-bit X is multiplied against the float32
operand split into hi + lo 16-bit halves (two tensor-core products, float32 accumulation), a
float32 X uses 3xTF32.

orth is CholeskyQR2 in float32 over many programs, with no per-sample phase: every pass also
writes the Gram P^T P of its output P (exact float32 products), as partials of GRAM_ROWS rows
that the sample's last program (ticket.py) sums in a fixed order into the packed Gram G(P)
(upper triangle of the l x l part) and then R1^-1 from G(P). orth runs as a trailing phase
of the pass's own launch (tiles of M rows x B programs after the pass's in the grid, each
waiting for its sample's pass to be done: ticket.wait_for): it stores Q1 = P R1^-1 in place
of P and the partial Grams of Q1; the sample's last program turns them into T = R2^-1
(Q1^T Q1 = R2^T R2). (``orthonormalize``, the stand-alone orth kernel, forms R1^-1 in every
program instead; the bits are the same.) The orthonormal basis Q = Q1 T is never formed: the next
pass reads Q1 (P' = X^T Q1, so X^T Q = P' T) and the next orth takes T along: the Gram of
P' T is T^T G(P') T and Q1' = P' (T R1^-1). Q1 is orthonormal to ~u cond(P)^2, so T is well
conditioned and that reassociation is benign for the power iterations. Not so for the Ritz
values: T^T G(W1) T carries the first-order rounding of G(W1) times |T|^2 (a rank-one x then
leaks ~1e-5 of its energy into the other Ritz values), so the last pass applies T to each
tile of W1 = X^T Q1 before its Gram: G(W) of W = W1 T, whose eigenvalues are the Ritz values.
The leverage scores use Q1 (T V_r). Scratch per pass: (B, M / GRAM_ROWS,
l (l + 1) / 2) float32 partial Grams (about |P| l / (2 GRAM_ROWS)), per orth at most
ORTH_MAX_TILES partials per sample, plus G (B, l (l + 1) / 2) and T (B, L, L).

Determinism: every sum runs in a fixed order (no float atomics; the arrival counters are
int32). The partial-Gram rows (GRAM_ROWS, for pass blocks of 32 or 64) and orth's tiles
depend on M only, not on the batch.

Scale: every pass reads X[b] times 2^-e, the power of two that brings max |x[b]| into
[1, 2). The product is exact (for float16 x: for the entries above 2^-14 max |x[b]|; smaller
ones round to float16's subnormal grid, an error below 2^-25 max |x[b]| each), so any finite
x in the float32 range (subnormal included) is solved as if it were of unit size; a zero, NaN
or Inf sample is read unscaled. The callers' results (leverage scores, the IPR) do not
depend on that scale. The first pass finds it as it goes, without a launch (and a read of
X) of its own: each program scales its rows by the power of two of their running max,
multiplying its partial sums by the (exact) ratio when that max grows, so its tile comes out
at its own block's scale 2^-e_p; the sample's last program brings the Gram partials, and
orth the rows of Y, to 2^-e = min_p 2^-e_p. Barring underflow these are the bits of a pass at
2^-e (for float16 x, entries below 2^-14 of their block's max but not of max |x[b]| are read
exactly instead of rounded). Scaling the unscaled output of a pass instead would not be
equivalent: unscaled float32 sums overflow for large bf16/float32 x and lose bits to
underflow for tiny x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gaussian import gaussian_sketch
from .small import JACOBI_MAX_SWEEPS, JACOBI_TOL2, ritz_ipr_tile, small_matmul, top_subspace_tile
from .ticket import arrive, counters, load_partial, signal, wait_for
from .utils import empty, flat_grid, interpreted, next_pow2, split_dtype, unflatten2

CHOLESKY_FLOOR = 1e-12
# The orth kernel holds four L x L float32 matrices per program (the Cholesky factor, its
# inverse, the chunk product and the partial Gram): at L = 64 four warps spill ~3 KB per
# thread (sm_90) and eight sit at the 255-register cap; sixteen need ~100 registers.
ORTH_WARPS = 16
# A pass with a trailing orth phase (one launch) runs both at the warps the orth phase and
# the last program's Cholesky need: at eight the launch spills 400-900 bytes (sm_90), at
# sixteen it needs 86-112 registers and none. At L = 128 each L x L matrix is 32 registers a
# thread even at sixteen warps, and the launch spills 5.5-13 KB per thread (sm_90); at
# ORTH_PASS_WARPS_WIDE (thirty-two) 0.26-2.9 KB.
ORTH_PASS_WARPS = ORTH_WARPS
ORTH_PASS_WARPS_WIDE = 32
# The passes over X: each program owns an output tile of out-block rows (x_mm) or columns
# (xt_mm) of X by L and sums over the other side of X in REDUCE_BLOCK chunks. The out block
# is halved from PASS_MAX_BLOCK down to PASS_MIN_BLOCK until B x blocks reach FILL_CTAS (the
# SMs of an H100/H200). Only the tile shrinks, not the sums (same chunks, same order), so
# the results are the same bit for bit whatever the block. Every program reads the whole
# (D, l) / (N, l) float32 operand from L2: per pass that is (programs x |operand|), L / 8
# times x's bytes at block 16 (16-bit x), hence the floor of 32.
REDUCE_BLOCK = 64
# A float32 X (3xTF32: hi and lo halves of both tiles in registers) takes tiles of F32_BLOCK
# on both sides: at 64 x 64 the passes spill up to ~1.6 KB per thread on sm_90 (make
# kernel-sweep), at 32 x 32 none at L <= 64. Its bytes per tile row are those of a 16-bit X at 64.
F32_BLOCK = 32
# The last pass also multiplies its (64, L) tile by T (L, L): at four warps that spills on sm_90.
T_PASS_WARPS = 8
PASS_MAX_BLOCK = 64
PASS_MIN_BLOCK = 32
FILL_CTAS = 132
# The passes' Gram partials cover GRAM_ROWS output rows each (a 64-row tile writes two), so
# their sums do not depend on the block either.
GRAM_ROWS = 32
# orth: each program owns a tile of at least ORTH_MIN_BLOCK rows (ORTH_CHUNK at a time), and
# the tile doubles until a sample has at most ORTH_MAX_TILES of them (a fixed function of M:
# the partial Grams, and so the bits, do not depend on the batch). At 128 rows (two chunks)
# the pass with a trailing orth phase spills on sm_90 (112 bytes; 64 or 256 rows: none).
ORTH_MIN_BLOCK = 256
ORTH_CHUNK = 64
ORTH_MAX_TILES = 16
SUM_BLOCK = 1024
# The first pass's last program reduces the per-block maxima of x[b] NC at a time. Its max
# of each x tile, next to the 64-row tile at four warps, spills on sm_90.
MAX_CHUNK = 256
FIND_SCALE_WARPS = 8
# The last pass's Rayleigh-Ritz step (ritz_pass): which one, and the widest sketch whose l x l
# eigen-solver the pass's last program holds next to the pass (at L = 64 the launch needs 186-204
# registers at eight warps, sm_90, no spills; wider sketches take a launch of their own).
FINISH_TOP_SUBSPACE = 1
FINISH_IPR = 2
FUSED_FINISH_MAX_WIDTH = 64


@triton.jit
def pow2_inverse(amax):
    """2^-e for 2^e <= amax < 2^(e+1) (at most 2^127, at least 2^-126); 1 when amax is 0,
    Inf or NaN. Built from the exponent bits: exact, and multiplying by it is exact."""
    biased = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    inv = (tl.minimum(tl.maximum(254 - biased, 1), 254) << 23).to(tl.float32, bitcast=True)
    return tl.where((amax > 0.0) & (amax < float("inf")), inv, 1.0)


@triton.jit
def scale_tile(t, inv):
    """t * inv in t's own dtype (exact for a power of two inv, barring underflow)."""
    return (t.to(tl.float32) * inv).to(t.dtype)


@triton.jit
def _max_partials(ptr, n, NC: tl.constexpr):
    """max of the n non-negative partial maxima at ptr (written by other programs of this
    launch; none NaN), NC at a time."""
    rc = tl.arange(0, NC)
    best = tl.zeros((NC,), tl.float32)
    for c0 in range(0, n, NC):
        best = tl.maximum(best, load_partial(ptr + c0 + rc, mask=c0 + rc < n, other=0.0))
    return tl.max(best, axis=0)


def abs_max(x: torch.Tensor) -> torch.Tensor:
    """x: (B, N, D) -> (B,) float32 max |x[b]| (NaN if x[b] has a NaN): one reduction, no sync.
    The float32 result type makes it one kernel on CUDA (a 16-bit x is cast inside the
    reduction, not by a copy of the result); the max is exact either way."""
    return torch.linalg.vector_norm(x, float("inf"), dim=(1, 2), dtype=torch.float32)


@triton.jit
def _cols(width: tl.constexpr, L: tl.constexpr):
    """(1, L) mask of the first ``width`` columns of a tall operand: its row stride, a
    constexpr, as the operands are contiguous (B, M, width) tensors. A constexpr keeps the
    mask constant over aligned groups of columns, so the loads and stores stay vectorized."""
    return (tl.arange(0, L) < width)[None, :]


@triton.jit
def _dot_x_f32(a, b, acc, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """acc += a @ b for a tile of X (its own dtype) and a float32 tile."""
    if SPLIT:
        b_hi = b.to(a.dtype)
        b_lo = (b - b_hi.to(tl.float32)).to(a.dtype)
        acc = tl.dot(a, b_hi, acc)
        acc = tl.dot(a, b_lo, acc)
    else:
        acc = tl.dot(a.to(tl.float32), b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _sym_offsets(l, L: tl.constexpr):
    """Offsets of the packed upper triangle of an l x l symmetric matrix (entries i <= j < l,
    row-major: l (l + 1) / 2 floats) for every (i, j) of its L x L register tile, the mask of
    the stored entries and that of the ones inside l x l."""
    idx = tl.arange(0, L)
    i = idx[:, None]
    j = idx[None, :]
    lo = tl.minimum(i, j)
    hi = tl.maximum(i, j)
    off = lo * l - (lo * (lo - 1)) // 2 + (hi - lo)
    return off, (i <= j) & (j < l), hi < l


@triton.jit
def store_sym(ptr, g, l, L: tl.constexpr):
    """Store the upper triangle of the symmetric (L, L) g, columns >= l dropped, packed."""
    off, stored, _ = _sym_offsets(l, L)
    tl.store(ptr + off, g, mask=stored)


@triton.jit
def load_sym(ptr, l, L: tl.constexpr, PARTIAL: tl.constexpr = False):
    """The (L, L) symmetric matrix of a packed triangle (zero past l); PARTIAL: written by
    another program of this launch before its ``arrive``."""
    off, _, inside = _sym_offsets(l, L)
    if PARTIAL:
        return load_partial(ptr + off, mask=inside, other=0.0)
    return tl.load(ptr + off, mask=inside, other=0.0)


@triton.jit
def _gram_epilogue(acc, b, pid, n_blocks, l, part_ptr, gram_ptr, cnt_ptr, bmax_ptr, amax_ptr, done_ptr, tin_ptr,
                   factor_ptr, L: tl.constexpr, BLOCK: tl.constexpr, SLOTS: tl.constexpr, SUM_BLOCK: tl.constexpr,
                   FIND_SCALE: tl.constexpr, NC: tl.constexpr, ORTH: tl.constexpr, FLOOR: tl.constexpr,
                   HAS_TIN: tl.constexpr):  # fmt: skip
    """Write the Gram of the pass's output tile acc (BLOCK, L) as SLOTS packed partials (one
    per BLOCK / SLOTS rows); the sample's last program sums all of them in slot order into
    its packed Gram. FIND_SCALE: each tile is of X / 2^e_p, e_p from its own block's max
    bmax[b, p]; the last program first writes amax[b] = max_p bmax[b, p] and brings every
    partial to the sample's 2^-e (exact powers of two: the bits of a pass at that scale).
    ORTH (a trailing orth phase follows): the last program then writes orth's right factor
    Tin R1^-1 (_orth_factor) to factor[b] and raises done[b], which the phase waits for.
    Returns whether this program was its sample's last."""
    pack = l * (l + 1) // 2
    n_slots = n_blocks * SLOTS
    slot = part_ptr + (b * n_slots + pid * SLOTS) * pack
    if SLOTS == 2:
        halves = tl.permute(tl.reshape(acc, (2, BLOCK // 2, L)), (1, 2, 0))
        a0, a1 = tl.split(halves)
        store_sym(slot, tl.dot(tl.trans(a0), a0, input_precision="ieee"), l, L)
        store_sym(slot + pack, tl.dot(tl.trans(a1), a1, input_precision="ieee"), l, L)
    else:
        store_sym(slot, tl.dot(tl.trans(acc), acc, input_precision="ieee"), l, L)
    last = arrive(cnt_ptr + b, n_blocks)
    if last:
        base = part_ptr + b * n_slots * pack
        if FIND_SCALE:
            amax = _max_partials(bmax_ptr + b * n_blocks, n_blocks, NC)
            tl.store(amax_ptr + b, amax)
            inv = pow2_inverse(amax)
        for c0 in range(0, pack, SUM_BLOCK):
            rc = c0 + tl.arange(0, SUM_BLOCK)
            live = rc < pack
            total = tl.zeros((SUM_BLOCK,), tl.float32)
            for s in range(n_slots):
                part = load_partial(base + s * pack + rc, mask=live, other=0.0)
                if FIND_SCALE:
                    f = inv / pow2_inverse(load_partial(bmax_ptr + b * n_blocks + s // SLOTS))
                    part = part * f * f
                total += part
            tl.store(gram_ptr + b * pack + rc, total, mask=live)
        if ORTH:
            tl.debug_barrier()  # G's stores precede every thread's loads of it
            cl = tl.arange(0, L)
            rinv = _orth_factor(gram_ptr + b * pack, tin_ptr + b * L * L, l, L, FLOOR, HAS_TIN, True)
            tl.store(factor_ptr + b * L * L + cl[:, None] * L + cl[None, :], rinv)
            signal(done_ptr + b)
    return last


@triton.jit
def _x_mm_program(pid, b, x_ptr, amax_ptr, z_ptr, out_ptr, part_ptr, gram_ptr, cnt_ptr, done_ptr, tin_ptr, factor_ptr,
                  N, D, l, n_blocks, x_sb, x_sn, x_sd, z_sb, z_sd: tl.constexpr, o_sb, o_sn: tl.constexpr, bmax_ptr,
                  L: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
                  STORE_OUT: tl.constexpr, GRAM: tl.constexpr, SLOTS: tl.constexpr, SUM_BLOCK: tl.constexpr,
                  FIND_SCALE: tl.constexpr, NC: tl.constexpr, ORTH: tl.constexpr, FLOOR: tl.constexpr,
                  HAS_TIN: tl.constexpr):  # fmt: skip
    """Program (pid, b) of _x_mm_kernel's pass."""
    if FIND_SCALE:
        inv = tl.full((), 1.0, tl.float32)
        top = tl.full((), 0.0, tl.float32)
    else:
        inv = pow2_inverse(tl.load(amax_ptr + b))
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cl = tl.arange(0, L)
    acc = tl.zeros((BLOCK_N, L), tl.float32)
    x_rows = x_ptr + b * x_sb + rn[:, None].to(tl.int64) * x_sn
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        xt = tl.load(x_rows + rd[None, :] * x_sd, mask=(rn < N)[:, None] & (rd < D)[None, :], other=0.0)
        if FIND_SCALE:
            a = tl.abs(xt.to(tl.float32))  # a NaN counts as Inf (only finiteness matters)
            top = tl.maximum(top, tl.max(tl.max(tl.where(a == a, a, float("inf")), axis=1), axis=0))
            new_inv = pow2_inverse(top)
            acc = acc * (new_inv / inv)
            inv = new_inv
        xt = scale_tile(xt, inv)
        zt = tl.load(
            z_ptr + b * z_sb + rd[:, None] * z_sd + cl[None, :], mask=(rd < D)[:, None] & _cols(z_sd, L), other=0.0
        )
        acc = _dot_x_f32(xt, zt, acc, SPLIT, PRECISION)
    if STORE_OUT:
        tl.store(out_ptr + b * o_sb + rn[:, None] * o_sn + cl[None, :], acc, mask=(rn < N)[:, None] & _cols(o_sn, L))
    if FIND_SCALE:
        tl.store(bmax_ptr + b * n_blocks + pid, top)
    if GRAM:
        _gram_epilogue(acc, b, pid, n_blocks, l, part_ptr, gram_ptr, cnt_ptr, bmax_ptr, amax_ptr, done_ptr, tin_ptr,
                       factor_ptr, L, BLOCK_N, SLOTS, SUM_BLOCK, FIND_SCALE, NC, ORTH, FLOOR, HAS_TIN)  # fmt: skip


@triton.jit
def _x_mm_kernel(
    x_ptr,
    amax_ptr,
    z_ptr,
    out_ptr,
    part_ptr,
    gram_ptr,
    cnt_ptr,
    N,
    D,
    l,
    n_blocks,
    x_sb,
    x_sn,
    x_sd,
    z_sb,
    z_sd: tl.constexpr,
    o_sb,
    o_sn: tl.constexpr,
    bmax_ptr,
    batch,
    tin_ptr,
    opart_ptr,
    ot_ptr,
    n_tiles,
    L: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    STORE_OUT: tl.constexpr,
    GRAM: tl.constexpr,
    SLOTS: tl.constexpr,
    SUM_BLOCK: tl.constexpr,
    FIND_SCALE: tl.constexpr,
    NC: tl.constexpr,
    ORTH: tl.constexpr,
    O_BLOCK: tl.constexpr,
    O_CHUNK: tl.constexpr,
    FLOOR: tl.constexpr,
    O_HAS_T: tl.constexpr,
):
    """P[b] = (X[b] / 2^e) @ Z[b]: (N, D) @ (D, L), one program per
    BLOCK_N rows; with GRAM also the packed Gram P[b]^T P[b] (see _gram_epilogue).
    FIND_SCALE (the first pass, with GRAM): 2^e is not known yet. Each program scales by
    the power of two of the running max |x| of its rows, rescaling its sums (exactly) when
    that max grows, so its tile of P and its block max bmax[b, pid] come out at its own
    block's 2^-e_p; the last program writes amax[b] and G(P) at the sample's scale.
    ORTH (with GRAM and STORE_OUT): n_tiles x batch programs follow the pass's and, once
    their sample's pass is done, orthonormalize P in place (_orth_program: Q1 = P (Tin
    R1^-1), T[b] into ot; Tin with O_HAS_T; Y brought to the sample's scale with FIND_SCALE).
    The counters: the pass's at cnt[b], the done flags at cnt[batch + b], the orth phase's
    at cnt[2 batch + b]."""
    prog = tl.program_id(0)
    if ORTH:
        if prog < n_blocks * batch:
            pid, b = unflatten2(prog, n_blocks)
            _x_mm_program(pid, b.to(tl.int64), x_ptr, amax_ptr, z_ptr, out_ptr, part_ptr, gram_ptr, cnt_ptr,
                          cnt_ptr + batch, tin_ptr, ot_ptr, N, D, l, n_blocks, x_sb, x_sn, x_sd, z_sb, z_sd, o_sb, o_sn,
                          bmax_ptr, L, BLOCK_N, BLOCK_D, SPLIT, PRECISION, STORE_OUT, GRAM, SLOTS, SUM_BLOCK,
                          FIND_SCALE, NC, True, FLOOR, O_HAS_T)  # fmt: skip
        else:
            pid, b = unflatten2(prog - n_blocks * batch, n_tiles)
            _orth_program(pid, b.to(tl.int64), out_ptr, out_ptr, gram_ptr, tin_ptr, opart_ptr, ot_ptr,
                          cnt_ptr + 2 * batch, cnt_ptr + batch, amax_ptr, bmax_ptr, N, l, n_tiles, BLOCK_N, n_blocks,
                          o_sb, o_sn, o_sb, o_sn, L, O_BLOCK, O_CHUNK, FLOOR, O_HAS_T, FIND_SCALE,
                          True)  # fmt: skip
    else:
        pid, b = unflatten2(prog, n_blocks)
        _x_mm_program(pid, b.to(tl.int64), x_ptr, amax_ptr, z_ptr, out_ptr, part_ptr, gram_ptr, cnt_ptr, cnt_ptr,
                      tin_ptr, ot_ptr, N, D, l, n_blocks, x_sb, x_sn, x_sd, z_sb, z_sd, o_sb, o_sn, bmax_ptr, L,
                      BLOCK_N, BLOCK_D, SPLIT, PRECISION, STORE_OUT, GRAM, SLOTS, SUM_BLOCK, FIND_SCALE, NC, False,
                      FLOOR, False)  # fmt: skip


@triton.jit
def _ritz_finish(b, l, r, gram_ptr, t_ptr, amax_ptr, vsel_ptr, eval_ptr, L: tl.constexpr, FINISH: tl.constexpr,
                 MAX_SWEEPS: tl.constexpr, TOL2: tl.constexpr):  # fmt: skip
    """The Rayleigh-Ritz step on G(W)[b], by the last pass's last program of sample b once it
    has written G(W)[b] (the eigen-solver of the leverage / spectral ops without a launch of
    its own; one program per sample, as that launch had). FINISH 1 (leverage): T[b] V_r and
    the eigenvalues into vsel (B, L, L) and evals (B, L) (small.top_subspace_tile); 2
    (spectral): the IPR of the r largest Ritz values into evals (B,) (small.ritz_ipr_tile)."""
    tl.debug_barrier()  # G's stores precede every thread's loads of it
    g = load_sym(gram_ptr + b * (l * (l + 1) // 2), l, L, True)
    idx = tl.arange(0, L)
    if FINISH == 1:
        vsel, d = top_subspace_tile(g, load_square(t_ptr + b * L * L, L), l, r, L, MAX_SWEEPS, TOL2)
        tl.store(vsel_ptr + b * L * L + idx[:, None] * L + idx[None, :], vsel)
        tl.store(eval_ptr + b * L + idx, d)
    else:
        tl.store(eval_ptr + b, ritz_ipr_tile(g, tl.load(amax_ptr + b), l, r, L, MAX_SWEEPS, TOL2))


@triton.jit
def _xt_mm_program(pid, b, x_ptr, amax_ptr, q_ptr, out_ptr, part_ptr, gram_ptr, cnt_ptr, done_ptr, tin_ptr, factor_ptr,
                   N, D, l, n_blocks, x_sb, x_sn, x_sd, q_sb, q_sn: tl.constexpr, o_sb, o_sd: tl.constexpr, t_ptr,
                   L: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
                   STORE_OUT: tl.constexpr, GRAM: tl.constexpr, SLOTS: tl.constexpr, SUM_BLOCK: tl.constexpr,
                   HAS_T: tl.constexpr, ORTH: tl.constexpr, FLOOR: tl.constexpr, HAS_TIN: tl.constexpr,
                   vsel_ptr, eval_ptr, r, FINISH: tl.constexpr, MAX_SWEEPS: tl.constexpr,
                   TOL2: tl.constexpr):  # fmt: skip
    """Program (pid, b) of _xt_mm_kernel's pass."""
    inv = pow2_inverse(tl.load(amax_ptr + b))
    rd = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    cl = tl.arange(0, L)
    acc = tl.zeros((BLOCK_D, L), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        xt = tl.load(
            x_ptr + b * x_sb + rn[None, :].to(tl.int64) * x_sn + rd[:, None] * x_sd,
            mask=(rd < D)[:, None] & (rn < N)[None, :],
            other=0.0,
        )
        xt = scale_tile(xt, inv)
        qt = tl.load(
            q_ptr + b * q_sb + rn[:, None] * q_sn + cl[None, :], mask=(rn < N)[:, None] & _cols(q_sn, L), other=0.0
        )
        acc = _dot_x_f32(xt, qt, acc, SPLIT, PRECISION)
    if HAS_T:
        acc = tl.dot(acc, load_square(t_ptr + b * L * L, L), input_precision=PRECISION)
    if STORE_OUT:
        tl.store(out_ptr + b * o_sb + rd[:, None] * o_sd + cl[None, :], acc, mask=(rd < D)[:, None] & _cols(o_sd, L))
    if GRAM:
        last = _gram_epilogue(acc, b, pid, n_blocks, l, part_ptr, gram_ptr, cnt_ptr, cnt_ptr, amax_ptr, done_ptr,
                              tin_ptr, factor_ptr, L, BLOCK_D, SLOTS, SUM_BLOCK, False, 1, ORTH, FLOOR,
                              HAS_TIN)  # fmt: skip
        if FINISH != 0:
            if last:
                _ritz_finish(b, l, r, gram_ptr, t_ptr, amax_ptr, vsel_ptr, eval_ptr, L, FINISH, MAX_SWEEPS, TOL2)


@triton.jit
def _xt_mm_kernel(
    x_ptr,
    amax_ptr,
    q_ptr,
    out_ptr,
    part_ptr,
    gram_ptr,
    cnt_ptr,
    N,
    D,
    l,
    n_blocks,
    x_sb,
    x_sn,
    x_sd,
    q_sb,
    q_sn: tl.constexpr,
    o_sb,
    o_sd: tl.constexpr,
    t_ptr,
    batch,
    tin_ptr,
    opart_ptr,
    ot_ptr,
    n_tiles,
    vsel_ptr,
    eval_ptr,
    r,
    L: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    STORE_OUT: tl.constexpr,
    GRAM: tl.constexpr,
    SLOTS: tl.constexpr,
    SUM_BLOCK: tl.constexpr,
    HAS_T: tl.constexpr,
    ORTH: tl.constexpr,
    O_BLOCK: tl.constexpr,
    O_CHUNK: tl.constexpr,
    FLOOR: tl.constexpr,
    O_HAS_T: tl.constexpr,
    FINISH: tl.constexpr,
    MAX_SWEEPS: tl.constexpr,
    TOL2: tl.constexpr,
):
    """P[b] = (X[b] / 2^e)^T @ Q[b]: (D, N) @ (N, L), one program per
    BLOCK_D columns of X, times T[b] (L, L) with HAS_T (applied to the tile before its Gram:
    the Gram of P T, not T^T G(P) T, whose rounding T would amplify); with GRAM also the
    packed Gram P[b]^T P[b]. ORTH (with GRAM and STORE_OUT, not HAS_T): a trailing orth
    phase, as _x_mm_kernel's. FINISH (the last pass, with GRAM, not ORTH): the sample's last
    program then runs the Rayleigh-Ritz step on the Gram (_ritz_finish)."""
    prog = tl.program_id(0)
    if ORTH:
        if prog < n_blocks * batch:
            pid, b = unflatten2(prog, n_blocks)
            _xt_mm_program(pid, b.to(tl.int64), x_ptr, amax_ptr, q_ptr, out_ptr, part_ptr, gram_ptr, cnt_ptr,
                           cnt_ptr + batch, tin_ptr, ot_ptr, N, D, l, n_blocks, x_sb, x_sn, x_sd, q_sb, q_sn, o_sb,
                           o_sd, t_ptr, L, BLOCK_N, BLOCK_D, SPLIT, PRECISION, STORE_OUT, GRAM, SLOTS, SUM_BLOCK,
                           HAS_T, True, FLOOR, O_HAS_T, vsel_ptr, eval_ptr, r, 0, MAX_SWEEPS, TOL2)  # fmt: skip
        else:
            pid, b = unflatten2(prog - n_blocks * batch, n_tiles)
            _orth_program(pid, b.to(tl.int64), out_ptr, out_ptr, gram_ptr, tin_ptr, opart_ptr, ot_ptr,
                          cnt_ptr + 2 * batch, cnt_ptr + batch, amax_ptr, amax_ptr, D, l, n_tiles, D, 1,
                          o_sb, o_sd, o_sb, o_sd, L, O_BLOCK, O_CHUNK, FLOOR, O_HAS_T, False,
                          True)  # fmt: skip
    else:
        pid, b = unflatten2(prog, n_blocks)
        _xt_mm_program(pid, b.to(tl.int64), x_ptr, amax_ptr, q_ptr, out_ptr, part_ptr, gram_ptr, cnt_ptr, cnt_ptr,
                       tin_ptr, ot_ptr, N, D, l, n_blocks, x_sb, x_sn, x_sd, q_sb, q_sn, o_sb, o_sd, t_ptr, L, BLOCK_N,
                       BLOCK_D, SPLIT, PRECISION, STORE_OUT, GRAM, SLOTS, SUM_BLOCK, HAS_T, False, FLOOR, False,
                       vsel_ptr, eval_ptr, r, FINISH, MAX_SWEEPS, TOL2)  # fmt: skip


@triton.jit
def _cholesky_inverse(g, l, L: tl.constexpr, FLOOR: tl.constexpr):
    """R^-1 for the upper Cholesky factor R of g (g = R^T R). Columns >= l get a unit pivot.
    A column whose pivot falls to FLOOR * max(diag g) or below (numerically dependent on the
    ones before it) keeps that floor as pivot and eliminates nothing, so a rank-deficient
    input yields small finite columns instead of NaN."""
    idx = tl.arange(0, L)
    rows = idx[:, None]
    cols = idx[None, :]
    eye = rows == cols
    floor = tl.max(tl.sum(tl.where(eye, g, 0.0), axis=1)) * FLOOR + 1e-30
    a = g + tl.where(eye & (cols >= l), 1.0, 0.0)
    r = tl.zeros((L, L), tl.float32)
    for kk in range(L):
        arow = tl.sum(tl.where(rows == kk, a, 0.0), axis=0)
        akk = tl.sum(tl.where(idx == kk, arow, 0.0))
        independent = akk > floor
        piv = tl.sqrt(tl.where(independent, akk, floor))
        # A dependent column is not eliminated: its Q column is its (tiny) residual / piv.
        rrow = tl.where(idx > kk, arow / piv, 0.0) * independent.to(tl.float32)
        rrow = tl.where(idx == kk, piv, rrow)
        r = tl.where(rows == kk, rrow[None, :], r)
        a = a - rrow[:, None] * rrow[None, :]
    rinv = tl.zeros((L, L), tl.float32)
    for ii in range(L):
        i = L - 1 - ii
        ri = tl.sum(tl.where(rows == i, r, 0.0), axis=0)
        rii = tl.sum(tl.where(idx == i, ri, 0.0))
        off = tl.where(idx > i, ri, 0.0)
        acc = tl.sum(off[:, None] * rinv, axis=0)
        new_row = (tl.where(idx == i, 1.0, 0.0) - acc) / rii
        rinv = tl.where(rows == i, new_row[None, :], rinv)
    return rinv


@triton.jit
def load_square(ptr, L: tl.constexpr):
    """The (L, L) row-major float32 matrix at ptr."""
    cl = tl.arange(0, L)
    return tl.load(ptr + cl[:, None] * L + cl[None, :])


@triton.jit
def congruence(g, t, L: tl.constexpr):
    """T^T g T for (L, L) g and T: the Gram of P T from that of P. T is well conditioned (the
    second CholeskyQR factor of a nearly orthonormal Q1), so this is as accurate as g."""
    return small_matmul(t, small_matmul(g, t, L), L, True)


@triton.jit
def _orth_factor(g_ptr, tin_ptr, l, L: tl.constexpr, FLOOR: tl.constexpr, HAS_T: tl.constexpr,
                 PARTIAL: tl.constexpr):  # fmt: skip
    """orth's right factor Tin R1^-1 (L, L), R1 the Cholesky factor of Tin^T G Tin for the
    packed G at g_ptr (Tin at tin_ptr with HAS_T, else the identity). PARTIAL: G was written
    by another program of this launch."""
    g = load_sym(g_ptr, l, L, PARTIAL)
    if HAS_T:
        g = congruence(g, load_square(tin_ptr, L), L)
    rinv = _cholesky_inverse(g, l, L, FLOOR)
    if HAS_T:
        rinv = small_matmul(load_square(tin_ptr, L), rinv, L)
    return rinv


@triton.jit
def _orth_program(pid, b, p_ptr, q_ptr, g_ptr, tin_ptr, part_ptr, t_ptr, cnt_ptr, done_ptr, amax_ptr, bmax_ptr, M, l,
                  n_tiles, scale_block, n_scale_blocks, p_sb, p_sm: tl.constexpr, q_sb, q_sm: tl.constexpr,
                  L: tl.constexpr, BLOCK: tl.constexpr,
                  CHUNK: tl.constexpr, FLOOR: tl.constexpr, HAS_T: tl.constexpr, ROW_SCALE: tl.constexpr,
                  FUSED: tl.constexpr):  # fmt: skip
    """Program (pid, b) of orth (see _orth_kernel). FUSED: a trailing phase of the pass that
    wrote P, G and the scales in this launch: it waits for done[b], raised by the pass's last
    program of b once it has written the right factor Tin R1^-1 to t[b] (computed once per
    sample, not by every program), reads them from L2, and its own last program lowers
    done[b] again and overwrites t[b] with T (every program of b has read the factor)."""
    pack = l * (l + 1) // 2
    cl = tl.arange(0, L)
    if FUSED:
        wait_for(done_ptr + b)
        rinv = load_partial(t_ptr + b * L * L + cl[:, None] * L + cl[None, :])
    else:
        rinv = _orth_factor(g_ptr + b * pack, tin_ptr + b * L * L, l, L, FLOOR, HAS_T, False)
    if ROW_SCALE:
        if FUSED:
            inv = pow2_inverse(load_partial(amax_ptr + b))
        else:
            inv = pow2_inverse(tl.load(amax_ptr + b))
    g2 = tl.zeros((L, L), tl.float32)
    for m0 in range(0, BLOCK, CHUNK):
        rm = pid * BLOCK + m0 + tl.arange(0, CHUNK)
        live = (rm < M)[:, None]
        offs = p_ptr + b * p_sb + rm[:, None] * p_sm + cl[None, :]
        if FUSED:
            t = load_partial(offs, mask=live & _cols(p_sm, L), other=0.0)
        else:
            t = tl.load(offs, mask=live & _cols(p_sm, L), other=0.0)
        qt = tl.dot(t, rinv, input_precision="ieee")
        if ROW_SCALE:  # exact: the same bits as scaling t
            boffs = bmax_ptr + b * n_scale_blocks + rm // scale_block
            if FUSED:
                bm = load_partial(boffs, mask=rm < M, other=0.0)
            else:
                bm = tl.load(boffs, mask=rm < M, other=0.0)
            qt = qt * (inv / pow2_inverse(bm))[:, None]
        tl.store(q_ptr + b * q_sb + rm[:, None] * q_sm + cl[None, :], qt, mask=live & _cols(q_sm, L))
        g2 = tl.dot(tl.trans(qt), qt, g2, input_precision="ieee")
    store_sym(part_ptr + (b * n_tiles + pid) * pack, g2, l, L)
    if arrive(cnt_ptr + b, n_tiles):
        if FUSED:  # every program of the sample is past its wait
            tl.atomic_xchg(done_ptr + b, 0, sem="relaxed", scope="gpu")
        g = tl.zeros((L, L), tl.float32)
        for s in range(n_tiles):
            g += load_sym(part_ptr + (b * n_tiles + s) * pack, l, L, True)
        tinv = _cholesky_inverse(g, l, L, FLOOR)
        tl.store(t_ptr + b * L * L + cl[:, None] * L + cl[None, :], tinv)


@triton.jit
def _orth_kernel(
    p_ptr,
    q_ptr,
    g_ptr,
    tin_ptr,
    part_ptr,
    t_ptr,
    cnt_ptr,
    amax_ptr,
    bmax_ptr,
    M,
    l,
    n_tiles,
    scale_block,
    n_scale_blocks,
    p_sb,
    p_sm: tl.constexpr,
    q_sb,
    q_sm: tl.constexpr,
    L: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
    FLOOR: tl.constexpr,
    HAS_T: tl.constexpr,
    ROW_SCALE: tl.constexpr,
):
    """CholeskyQR2 of P[b] = P'[b] Tin[b] (Tin = I unless HAS_T) from P' (M, L) and its packed
    Gram G[b], one program per BLOCK rows: Q1 = P' (Tin R1^-1) (R1 from Tin^T G Tin,
    recomputed by every program of the sample) is stored (q_ptr may be p_ptr), and the
    sample's last program turns the partial Grams of Q1 into T[b] = R2^-1
    (Q1^T Q1 = R2^T R2): the orthonormal basis is Q1 T[b]. ROW_SCALE: P' is the output of
    the first pass (FIND_SCALE), its rows in blocks of scale_block each at its own block's
    scale; they are brought to the sample's (bmax, amax as _gram_epilogue) as they are read.
    The passes run this as a trailing phase of their own launch (ORTH); this kernel is the
    stand-alone orth."""
    pid, b = unflatten2(tl.program_id(0), n_tiles)
    _orth_program(pid, b.to(tl.int64), p_ptr, q_ptr, g_ptr, tin_ptr, part_ptr, t_ptr, cnt_ptr, cnt_ptr, amax_ptr,
                  bmax_ptr, M, l, n_tiles, scale_block, n_scale_blocks, p_sb, p_sm, q_sb, q_sm, L, BLOCK, CHUNK, FLOOR,
                  HAS_T, ROW_SCALE, False)  # fmt: skip


def reduce_block(dtype: torch.dtype) -> int:
    """The chunk a pass over an X of this dtype sums over (REDUCE_BLOCK, F32_BLOCK for float32)."""
    return REDUCE_BLOCK if split_dtype(dtype) else F32_BLOCK


def pass_block(extent: int, batch: int, widest: int = PASS_MAX_BLOCK) -> int:
    """The output-tile block of a pass over ``extent`` rows (or columns) of each of ``batch``
    samples: the largest power of two from ``widest`` (64; F32_BLOCK for a float32 X) down to
    PASS_MIN_BLOCK whose grid fills FILL_CTAS programs, else the smallest."""
    block = widest
    while block > PASS_MIN_BLOCK and batch * triton.cdiv(extent, block) < FILL_CTAS:
        block //= 2
    return block


def sketch_width(l: int) -> int:
    """L: the sketch width l as the kernels hold it (a power of two, at least 16)."""
    return max(16, next_pow2(l))


def packed_size(l: int) -> int:
    """Floats of a packed symmetric l x l matrix (its upper triangle): l (l + 1) / 2."""
    return l * (l + 1) // 2


def pack_symmetric(h: torch.Tensor, l: int) -> torch.Tensor:
    """(B, L, L) symmetric -> (B, l (l + 1) / 2): the upper triangle of h[:, :l, :l] in the
    kernels' packed layout (row-major, i <= j)."""
    i, j = torch.triu_indices(l, l, device=h.device)
    return h[:, i, j].contiguous()


def _contiguous_rows(t: torch.Tensor) -> torch.Tensor:
    """t with rows of contiguous columns (row stride = columns): the kernels take a tall
    operand's row stride as its width (``_cols``)."""
    return t if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] else t.contiguous()


def orth_block(m: int) -> int:
    """Rows per program of orth for M rows: ORTH_MIN_BLOCK doubled until M needs at most
    ORTH_MAX_TILES programs per sample (independent of the batch)."""
    block = ORTH_MIN_BLOCK
    while triton.cdiv(m, block) > ORTH_MAX_TILES:
        block *= 2
    return block


def orthonormalize(
    p: torch.Tensor,
    g: torch.Tensor,
    l: int,
    counters: torch.Tensor,
    op: str,
    inplace: bool = False,
    tin: torch.Tensor | None = None,
    row_scale: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CholeskyQR2 of p tin (tin: (B, L, L), well conditioned; None: the identity) for
    p: (B, M, l) float32 (or (B, M, w >= l), columns >= l zero) given the packed Gram g of p
    (B, l (l + 1) / 2) -> (Q1 (B, M, l) (p itself with inplace), T (B, L, L)), Q1 T[:, :l, :l]
    orthonormal, T upper triangular (the identity past l).
    row_scale: (amax (B,), bmax (B, M / block), block) when p is the first pass's output at
    block scale (ScaledPasses.sketch); Q1 is then at the sample's scale.
    counters: >= B int32 zeros (left zero). Scratch: (B, tiles, l (l + 1) / 2) float32
    partial Grams of Q1, at most ORTH_MAX_TILES per sample."""
    p = _contiguous_rows(p)
    batch, m, _ = p.shape
    width = sketch_width(l)
    q = p if inplace else empty(batch, m, l, dtype=torch.float32, device=p.device)
    block = orth_block(m)
    n_tiles = triton.cdiv(m, block)
    part = empty(batch, n_tiles, packed_size(l), dtype=torch.float32, device=p.device)
    t = empty(batch, width, width, dtype=torch.float32, device=p.device)
    amax, bmax, scale_block = (counters, counters, m) if row_scale is None else row_scale
    _orth_kernel[flat_grid(op, n_tiles, batch)](
        p,
        q,
        g,
        t if tin is None else tin,
        part,
        t,
        counters,
        amax,
        bmax,
        m,
        l,
        n_tiles,
        scale_block,
        triton.cdiv(m, scale_block),
        p.stride(0),
        p.stride(1),
        q.stride(0),
        q.stride(1),
        L=width,
        BLOCK=block,
        CHUNK=ORTH_CHUNK,
        FLOOR=CHOLESKY_FLOOR,
        HAS_T=tin is not None,
        ROW_SCALE=row_scale is not None,
        num_warps=ORTH_WARPS,
    )
    return q, t


class ScaledPasses:
    """The two bandwidth-bound products over X / 2^e (see the module docstring), with the
    block sizes for this X (``pass_block``; ``out_block`` forces the output-tile block of
    both passes) and the arrival counters of the stream (ticket.py). ``op`` names the
    calling op in launch errors."""

    def __init__(
        self,
        x: torch.Tensor,
        l: int,
        op: str,
        out_block: int | None = None,
        amax: torch.Tensor | None = None,
        find_scale: bool = False,
    ):
        self.x = x
        self.l = l
        self.op = op
        self.batch, self.n, self.d = x.shape
        if find_scale:
            # Written by the first pass (``sketch``), read by every later one.
            self.amax = empty(self.batch, dtype=torch.float32, device=x.device)
        else:
            self.amax = abs_max(x) if amax is None else amax
        self.width = sketch_width(l)
        self.split = split_dtype(x.dtype)
        self.precision = "ieee" if interpreted() else "tf32x3"
        self.reduce = reduce_block(x.dtype)  # also the widest output tile: 64 x 64 or 32 x 32 tiles
        self.block_n = out_block or pass_block(self.n, self.batch, self.reduce)
        self.block_d = out_block or pass_block(self.d, self.batch, self.reduce)
        self.counters = counters(3 * self.batch, x.device)  # the passes', done flags, orth's

    def _run(self, kernel, s, extent, block, gram, store, tin=None, orth=False,
             **blocks) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
        x = self.x
        dev = x.device
        n_blocks = triton.cdiv(extent, block)
        slots = 2 if block > GRAM_ROWS else 1
        pack = packed_size(self.l)
        out = empty(self.batch, extent, self.l, dtype=torch.float32, device=dev) if store else None
        part = empty(self.batch, n_blocks * slots, pack, dtype=torch.float32, device=dev) if gram else None
        g = empty(self.batch, pack, dtype=torch.float32, device=dev) if gram else None
        unused = self.counters  # the pointer of a disabled stage (never read or written)
        s = _contiguous_rows(s)
        s_sb = 0 if s.dim() == 2 else s.stride(0)
        t, opart, n_tiles, o_block = None, None, 0, ORTH_MIN_BLOCK
        if orth:
            o_block = orth_block(extent)
            n_tiles = triton.cdiv(extent, o_block)
            opart = empty(self.batch, n_tiles, pack, dtype=torch.float32, device=dev)
            t = empty(self.batch, self.width, self.width, dtype=torch.float32, device=dev)
            blocks["num_warps"] = ORTH_PASS_WARPS if self.width <= 64 else ORTH_PASS_WARPS_WIDE
        kernel[flat_grid(self.op, n_blocks + n_tiles, self.batch)](
            x,
            self.amax,
            s,
            unused if out is None else out,
            unused if part is None else part,
            unused if g is None else g,
            self.counters,
            self.n,
            self.d,
            self.l,
            n_blocks,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            s_sb,
            s.stride(-2),
            0 if out is None else out.stride(0),
            0 if out is None else out.stride(1),
            batch=self.batch,
            tin_ptr=unused if tin is None else tin,
            opart_ptr=unused if opart is None else opart,
            ot_ptr=unused if t is None else t,
            n_tiles=max(n_tiles, 1),
            L=self.width,
            SPLIT=self.split,
            PRECISION=self.precision,
            STORE_OUT=store,
            GRAM=gram,
            SLOTS=slots,
            SUM_BLOCK=SUM_BLOCK,
            ORTH=orth,
            O_BLOCK=o_block,
            O_CHUNK=ORTH_CHUNK,
            FLOOR=CHOLESKY_FLOOR,
            O_HAS_T=tin is not None,
            **blocks,
        )
        return out, g, t

    def x_mm(
        self, z: torch.Tensor, gram: bool = False, store: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """X @ z for z of shape (B, D, w), or (D, w) shared by the batch (w >= l, columns >= l
        zero) -> (P: (B, N, l), None when not store; the packed Gram of P, (B, l (l + 1) / 2),
        when gram). Scratch with gram: (B, N / GRAM_ROWS, l (l + 1) / 2) float32 partial Grams."""
        return self._run(_x_mm_kernel, z, self.n, self.block_n, gram, store, BLOCK_N=self.block_n,
                         BLOCK_D=self.reduce, bmax_ptr=self.counters, FIND_SCALE=False, NC=1)[:2]  # fmt: skip

    def x_mm_orth(self, z: torch.Tensor, tin: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """CholeskyQR2 of (X @ z) tin in one launch (orthonormalize's Q1 (B, N, l) and T
        (B, L, L), the same bits): the pass, then its trailing orth phase. Scratch: the
        pass's and orth's partial Grams."""
        q, _, t = self._run(_x_mm_kernel, z, self.n, self.block_n, True, True, tin, True, BLOCK_N=self.block_n,
                            BLOCK_D=self.reduce, bmax_ptr=self.counters, FIND_SCALE=False, NC=1)  # fmt: skip
        return q, t

    def sketch(self, omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, int]]:
        """The first pass, for passes built with find_scale: X @ omega for omega (D, L) while
        finding the scale -> (Y (B, N, l), each block of ``block_n`` rows at its own block's
        scale; the packed Gram of Y at the sample's scale; the row scale of Y for ``orth``).
        Writes ``amax`` (max |x[b]|, Inf where x[b] has a NaN or Inf). Scratch: the block maxima
        (B, N / block_n) float32."""
        bmax = self._block_maxima()
        y, g, _ = self._run(_x_mm_kernel, omega, self.n, self.block_n, True, True, **self._find_scale(bmax))
        return y, g, (self.amax, bmax, self.block_n)

    def sketch_orth(self, omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``sketch`` and the CholeskyQR2 of Y (Q1 at the sample's scale, T) in one launch: the
        bits of sketch + orthonormalize with its row scale."""
        q, _, t = self._run(_x_mm_kernel, omega, self.n, self.block_n, True, True, None, True,
                            **self._find_scale(self._block_maxima()))  # fmt: skip
        return q, t

    def _block_maxima(self) -> torch.Tensor:
        return empty(self.batch, triton.cdiv(self.n, self.block_n), dtype=torch.float32, device=self.x.device)

    def _find_scale(self, bmax: torch.Tensor) -> dict:
        return dict(BLOCK_N=self.block_n, BLOCK_D=self.reduce, FIND_SCALE=True, NC=MAX_CHUNK, bmax_ptr=bmax,
                    num_warps=FIND_SCALE_WARPS)  # fmt: skip

    def xt_mm(
        self, q: torch.Tensor, gram: bool = False, store: bool = True, t: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """X^T @ q (@ t for t: (B, L, L)) for q: (B, N, w) -> (P (B, D, l) unless not store,
        packed Gram of P if gram), as x_mm."""
        return self._run(_xt_mm_kernel, q, self.d, self.block_d, gram, store, BLOCK_N=self.reduce,
                         BLOCK_D=self.block_d, t_ptr=self.counters if t is None else t,
                         HAS_T=t is not None, num_warps=T_PASS_WARPS if t is not None else 4,
                         **self._no_finish())[:2]  # fmt: skip

    def ritz_pass(self, q: torch.Tensor, t: torch.Tensor, finish: int, r: int) -> tuple[torch.Tensor, ...]:
        """The last pass: the packed Gram G of W = (X^T q) t (W not stored), then by each
        sample's last program the Rayleigh-Ritz step on it: finish FINISH_TOP_SUBSPACE ->
        (G, t V_r (B, L, L), the eigenvalues (B, L)), FINISH_IPR -> (G, the IPR of the r
        largest Ritz values (B,)). The width must fit (``fused_finish``)."""
        dev = self.x.device
        if finish == FINISH_TOP_SUBSPACE:
            vsel = empty(self.batch, self.width, self.width, dtype=torch.float32, device=dev)
            evals = empty(self.batch, self.width, dtype=torch.float32, device=dev)
        else:
            vsel, evals = None, empty(self.batch, dtype=torch.float32, device=dev)
        _, g, _ = self._run(_xt_mm_kernel, q, self.d, self.block_d, True, False, BLOCK_N=self.reduce,
                            BLOCK_D=self.block_d, t_ptr=t, HAS_T=True, num_warps=T_PASS_WARPS,
                            vsel_ptr=self.counters if vsel is None else vsel, eval_ptr=evals, r=r, FINISH=finish,
                            MAX_SWEEPS=JACOBI_MAX_SWEEPS, TOL2=JACOBI_TOL2)  # fmt: skip
        return (g, vsel, evals) if vsel is not None else (g, evals)

    def _no_finish(self) -> dict:
        return dict(vsel_ptr=self.counters, eval_ptr=self.counters, r=0, FINISH=0, MAX_SWEEPS=JACOBI_MAX_SWEEPS,
                    TOL2=JACOBI_TOL2)  # fmt: skip

    def xt_mm_orth(self, q: torch.Tensor, tin: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """CholeskyQR2 of (X^T @ q) tin in one launch, as x_mm_orth: (Q1 (B, D, l), T)."""
        z, _, t = self._run(_xt_mm_kernel, q, self.d, self.block_d, True, True, tin, True, BLOCK_N=self.reduce,
                            BLOCK_D=self.block_d, t_ptr=self.counters, HAS_T=False, **self._no_finish())  # fmt: skip
        return z, t


def fused_finish(l: int) -> bool:
    """Whether the last pass can run the Rayleigh-Ritz step of a sketch of width l itself
    (``ScaledPasses.ritz_pass``): up to FUSED_FINISH_MAX_WIDTH; wider ones take a launch of
    their own (leverage.top_subspace, spectral's _ritz_ipr_kernel)."""
    return sketch_width(l) <= FUSED_FINISH_MAX_WIDTH


def range_finder(
    x: torch.Tensor, l: int, seed: int, power_iters: int, op: str, finish: int = 0, r: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """x: (B, N, D) -> (amax, Q1, T, G, finished): max |x[b]| (B,) (Inf exactly where x[b] has a NaN
    or Inf); the orthonormal basis Q = Q1 T[:l, :l] of the range after power_iters power
    iterations as Q1 (B, N, l) and T (B, L, L); the packed Gram G (B, l (l + 1) / 2) of
    W = X^T Q = (X^T Q1) T (T applied to each tile of the last pass before its Gram; W is
    never stored). All float32 and of the scaled X (T the identity past l). The Ritz values of X
    on Q are the eigenvalues of G. finish (FINISH_TOP_SUBSPACE, FINISH_IPR; 0: none; the width
    must fit, ``fused_finish``): the last pass also runs that Rayleigh-Ritz step with rank r,
    ``finished`` is what ``ScaledPasses.ritz_pass`` returns past G (None without finish)."""
    omega = gaussian_sketch(x.shape[2], l, sketch_width(l), seed, x.device, op)
    passes = ScaledPasses(x, l, op, find_scale=True)
    q, t = passes.sketch_orth(omega)
    for _ in range(power_iters):
        z, tz = passes.xt_mm_orth(q, t)  # X^T Q = (X^T Q1) t
        q, t = passes.x_mm_orth(z, tz)
    if finish:
        g, *finished = passes.ritz_pass(q, t, finish, r)
        return passes.amax, q, t, g, tuple(finished)
    _, g = passes.xt_mm(q, gram=True, store=False, t=t)
    return passes.amax, q, t, g, None
