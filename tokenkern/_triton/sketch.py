"""Randomized range finder (Halko-Martinsson-Tropp) on the GPU, with no host synchronization:
the stages shared by the leverage-score and spectral-IPR kernels.

    omega, amax = gaussian(D, l, seed), max|X[b]|  (D, L), (B,)  one launch; omega shared by the batch
    Y = X @ omega;  Q = orth(Y)                 (B, N, L) one pass over X
    repeat power_iters:                         two passes over X per iteration
        Z = orth(X^T Q);  Q = orth(X Z)
    W = X^T Q                                   (B, D, L) one pass over X

``L`` is the sketch width ``l`` rounded up to a power of two (at least 16, for tl.dot); the
columns past ``l`` stay exactly zero throughout. ``orth`` is CholeskyQR2 in float32 with one
program per batch element. The passes over X read it in its own dtype; a 16-bit X is
multiplied against the float32 operand split into hi + lo 16-bit halves (two tensor-core
products, float32 accumulation), a float32 X uses 3xTF32.

Scale: every pass reads X[b] times 2^-e, the power of two that brings max |x[b]| (one torch
reduction) into [1, 2). The product is exact (for float16 x: for the entries above
2^-14 max |x[b]|; smaller ones round to float16's subnormal grid, an error below
2^-25 max |x[b]| each), so any finite x in the float32 range (subnormal included) is solved
as if it were of unit size; a zero, NaN or Inf sample is read unscaled. The callers' results
(leverage scores, the IPR) do not depend on that scale. Scaling the output of the first pass
instead (to find 2^-e within it) would not be equivalent: unscaled float32 sums overflow for
large bf16/float32 x and lose bits to underflow for tiny x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ticket import arrive, counters, load_partial
from .utils import empty, flat_grid, interpreted, next_pow2, split_dtype, unflatten2

CHOLESKY_FLOOR = 1e-12
# CholeskyQR holds three L x L float32 matrices per program: at L = 64 four warps spill ~3 KB
# per thread (sm_90) and eight sit at the 255-register cap; sixteen need ~100 registers.
CHOLQR_WARPS = 16
# The passes over X: each program owns an output tile of out-block rows (x_mm) or columns
# (xt_mm) of X by L and sums over the other side of X in REDUCE_BLOCK chunks. The out block
# is halved from PASS_MAX_BLOCK down to PASS_MIN_BLOCK until B x blocks reach FILL_CTAS (the
# SMs of an H100/H200). Only the tile shrinks, not the sums (same chunks, same order), so
# the results are the same bit for bit whatever the block. Every program reads the whole
# (D, L) / (N, L) float32 operand from L2: per pass that is (programs x |operand|), L / 8
# times x's bytes at block 16 (16-bit x), hence the floor of 32.
REDUCE_BLOCK = 64
PASS_MAX_BLOCK = 64
PASS_MIN_BLOCK = 32
FILL_CTAS = 132
# The prep launch (scale and sketch): rows of x per max-reduction program, and rows of omega
# (and columns of the x tile) per program.
PREP_ROWS = 16
GAUSSIAN_BLOCK = 64


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
def _prep_kernel(
    x_ptr,
    part_ptr,
    amax_ptr,
    count_ptr,
    omega_ptr,
    N,
    D,
    l,
    seed,
    n_chunks,
    amax_programs,
    x_sb,
    x_sn,
    x_sd,
    o_sd,
    L: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NC: tl.constexpr,
):
    """Programs [0, amax_programs): max |x[b]| over ROWS rows of sample b each (partial in
    part[b, chunk]); the last to arrive of a sample writes amax[b] (NaN if x[b] has a NaN).
    The programs after them write omega, BLOCK_D rows each (as _gaussian_kernel)."""
    pid = tl.program_id(0)
    if pid < amax_programs:
        chunk, b = unflatten2(pid, n_chunks)
        b = b.to(tl.int64)
        rn = chunk * ROWS + tl.arange(0, ROWS)
        rows = x_ptr + b * x_sb + rn[:, None].to(tl.int64) * x_sn
        top = tl.zeros((ROWS, BLOCK_D), tl.float32)
        nan = tl.zeros((ROWS, BLOCK_D), tl.int32)
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            t = tl.load(rows + rd[None, :].to(tl.int64) * x_sd, mask=(rn < N)[:, None] & (rd < D)[None, :], other=0.0)
            t = tl.abs(t.to(tl.float32))
            nan |= (t != t).to(tl.int32)
            top = tl.maximum(top, tl.where(t != t, 0.0, t))
        part = tl.max(tl.max(top, axis=1), axis=0)
        part = tl.where(tl.max(tl.max(nan, axis=1), axis=0) > 0, float("nan"), part)
        tl.store(part_ptr + b * n_chunks + chunk, part)
        if arrive(count_ptr + b, n_chunks):
            rc = tl.arange(0, NC)
            best = tl.zeros((NC,), tl.float32)
            bad = tl.zeros((NC,), tl.int32)
            for c0 in range(0, n_chunks, NC):
                p = load_partial(part_ptr + b * n_chunks + c0 + rc, mask=c0 + rc < n_chunks, other=0.0)
                bad |= (p != p).to(tl.int32)
                best = tl.maximum(best, tl.where(p != p, 0.0, p))
            total = tl.where(tl.max(bad, axis=0) > 0, float("nan"), tl.max(best, axis=0))
            tl.store(amax_ptr + b, total)
    else:
        rd = (pid - amax_programs) * BLOCK_D + tl.arange(0, BLOCK_D)[:, None]
        cj = tl.arange(0, L)[None, :]
        vals = tl.randn(seed, rd * l + cj)
        vals = tl.where(cj < l, vals, 0.0)
        tl.store(omega_ptr + rd * o_sd + cj, vals, mask=rd < D)


def abs_max(x: torch.Tensor) -> torch.Tensor:
    """x: (B, N, D) -> (B,) float32 max |x[b]| (NaN if x[b] has a NaN): one reduction, no sync.
    The float32 result type makes it one kernel on CUDA (a 16-bit x is cast inside the
    reduction, not by a copy of the result); the max is exact either way."""
    return torch.linalg.vector_norm(x, float("inf"), dim=(1, 2), dtype=torch.float32)


def scale_and_sketch(x: torch.Tensor, l: int, seed: int, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (B, N, D) -> (abs_max(x) (B,), omega (D, L)) in one launch. omega: float32 standard
    normal, columns >= l zero; entry (i, j) depends only on (seed, i * l + j), so every batch
    element and every launch sees the same sketch. PREP_ROWS
    rows of x per program, the per-sample max finished by the last program of the sample
    (ticket.py), the sketch written by GAUSSIAN_BLOCK-row programs after them."""
    batch, n, d = x.shape
    width = sketch_width(l)
    n_chunks = triton.cdiv(n, PREP_ROWS)
    amax = empty(batch, dtype=torch.float32, device=x.device)
    part = empty(batch, n_chunks, dtype=torch.float32, device=x.device)
    omega = empty(d, width, dtype=torch.float32, device=x.device)
    amax_programs = batch * n_chunks
    grid = flat_grid(op, amax_programs + triton.cdiv(d, GAUSSIAN_BLOCK))
    _prep_kernel[grid](
        x,
        part,
        amax,
        counters(batch, x.device),
        omega,
        n,
        d,
        l,
        seed,
        n_chunks,
        amax_programs,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        omega.stride(0),
        L=width,
        ROWS=PREP_ROWS,
        BLOCK_D=GAUSSIAN_BLOCK,
        NC=256,
    )
    return amax, omega


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
def _x_mm_kernel(
    x_ptr,
    amax_ptr,
    z_ptr,
    y_ptr,
    N,
    D,
    n_blocks,
    x_sb,
    x_sn,
    x_sd,
    z_sb,
    z_sd,
    y_sb,
    y_sn,
    L: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Y[b] = (X[b] / 2^e) @ Z[b]: (N, D) @ (D, L), one program per BLOCK_N rows."""
    pid, b = unflatten2(tl.program_id(0), n_blocks)
    b = b.to(tl.int64)
    inv = pow2_inverse(tl.load(amax_ptr + b))
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cl = tl.arange(0, L)
    acc = tl.zeros((BLOCK_N, L), tl.float32)
    x_rows = x_ptr + b * x_sb + rn[:, None].to(tl.int64) * x_sn
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        xt = tl.load(x_rows + rd[None, :] * x_sd, mask=(rn < N)[:, None] & (rd < D)[None, :], other=0.0)
        xt = scale_tile(xt, inv)
        zt = tl.load(z_ptr + b * z_sb + rd[:, None] * z_sd + cl[None, :], mask=(rd < D)[:, None], other=0.0)
        acc = _dot_x_f32(xt, zt, acc, SPLIT, PRECISION)
    tl.store(y_ptr + b * y_sb + rn[:, None] * y_sn + cl[None, :], acc, mask=(rn < N)[:, None])


@triton.jit
def _xt_mm_kernel(
    x_ptr,
    amax_ptr,
    q_ptr,
    z_ptr,
    N,
    D,
    n_blocks,
    x_sb,
    x_sn,
    x_sd,
    q_sb,
    q_sn,
    z_sb,
    z_sd,
    L: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Z[b] = (X[b] / 2^e)^T @ Q[b]: (D, N) @ (N, L), one program per BLOCK_D columns of X."""
    pid, b = unflatten2(tl.program_id(0), n_blocks)
    b = b.to(tl.int64)
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
        qt = tl.load(q_ptr + b * q_sb + rn[:, None] * q_sn + cl[None, :], mask=(rn < N)[:, None], other=0.0)
        acc = _dot_x_f32(xt, qt, acc, SPLIT, PRECISION)
    tl.store(z_ptr + b * z_sb + rd[:, None] * z_sd + cl[None, :], acc, mask=(rd < D)[:, None])


@triton.jit
def gram(src, M, s_sm, L: tl.constexpr, BLOCK_M: tl.constexpr):
    """A^T A of an (M, L) float32 matrix, in exact float32 products."""
    g = tl.zeros((L, L), tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        t = tl.load(src + rm[:, None] * s_sm + tl.arange(0, L)[None, :], mask=(rm < M)[:, None], other=0.0)
        g = tl.dot(tl.trans(t), t, g, input_precision="ieee")
    return g


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
def _cholqr_kernel(
    y_ptr,
    q_ptr,
    M,
    l,
    y_sb,
    y_sm,
    q_sb,
    q_sm,
    L: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PASSES: tl.constexpr,
    FLOOR: tl.constexpr,
):
    """Q[b] = orth(Y[b]) by CholeskyQR repeated PASSES times, one program per batch element."""
    b = tl.program_id(0).to(tl.int64)
    cl = tl.arange(0, L)
    for p in tl.static_range(PASSES):
        if p == 0:
            src = y_ptr + b * y_sb
            s_sm = y_sm
        else:
            src = q_ptr + b * q_sb
            s_sm = q_sm
        rinv = _cholesky_inverse(gram(src, M, s_sm, L, BLOCK_M), l, L, FLOOR)
        for m0 in range(0, M, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            t = tl.load(src + rm[:, None] * s_sm + cl[None, :], mask=(rm < M)[:, None], other=0.0)
            qt = tl.dot(t, rinv, input_precision="ieee")
            tl.store(q_ptr + b * q_sb + rm[:, None] * q_sm + cl[None, :], qt, mask=(rm < M)[:, None])


def pass_block(extent: int, batch: int) -> int:
    """The output-tile block of a pass over ``extent`` rows (or columns) of each of ``batch``
    samples: the largest of 64, 32 whose grid fills FILL_CTAS programs, else the smallest."""
    block = PASS_MAX_BLOCK
    while block > PASS_MIN_BLOCK and batch * triton.cdiv(extent, block) < FILL_CTAS:
        block //= 2
    return block


def sketch_width(l: int) -> int:
    """L: the sketch width l as the kernels hold it (a power of two, at least 16)."""
    return max(16, next_pow2(l))


def orthonormalize(y: torch.Tensor, l: int) -> torch.Tensor:
    """CholeskyQR2 of y: (B, M, L) float32 whose columns >= l are zero."""
    q = torch.empty_like(y)
    _cholqr_kernel[(y.shape[0],)](
        y,
        q,
        y.shape[1],
        l,
        y.stride(0),
        y.stride(1),
        q.stride(0),
        q.stride(1),
        L=y.shape[2],
        BLOCK_M=64,
        PASSES=2,
        FLOOR=CHOLESKY_FLOOR,
        num_warps=CHOLQR_WARPS,
    )
    return q


class ScaledPasses:
    """The two bandwidth-bound products over X / 2^e (see the module docstring), with the
    block sizes for this X (``pass_block``; ``out_block`` forces the output-tile block of
    both passes). ``op`` names the calling op in launch errors."""

    def __init__(
        self, x: torch.Tensor, l: int, op: str, out_block: int | None = None, amax: torch.Tensor | None = None
    ):
        self.x = x
        self.op = op
        self.amax = abs_max(x) if amax is None else amax
        self.batch, self.n, self.d = x.shape
        self.width = sketch_width(l)
        self.split = split_dtype(x.dtype)
        self.precision = "ieee" if interpreted() else "tf32x3"
        self.block_n = out_block or pass_block(self.n, self.batch)
        self.block_d = out_block or pass_block(self.d, self.batch)

    def x_mm(self, z: torch.Tensor) -> torch.Tensor:
        """X @ z for z of shape (B, D, L), or (D, L) shared by the batch -> (B, N, L)."""
        x = self.x
        y = empty(self.batch, self.n, self.width, dtype=torch.float32, device=x.device)
        z_sb = 0 if z.dim() == 2 else z.stride(0)
        n_blocks = triton.cdiv(self.n, self.block_n)
        _x_mm_kernel[flat_grid(self.op, n_blocks, self.batch)](
            x,
            self.amax,
            z,
            y,
            self.n,
            self.d,
            n_blocks,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            z_sb,
            z.stride(-2),
            y.stride(0),
            y.stride(1),
            L=self.width,
            BLOCK_N=self.block_n,
            BLOCK_D=REDUCE_BLOCK,
            SPLIT=self.split,
            PRECISION=self.precision,
        )
        return y

    def xt_mm(self, q: torch.Tensor) -> torch.Tensor:
        """X^T @ q for q: (B, N, L) -> (B, D, L)."""
        x = self.x
        z = empty(self.batch, self.d, self.width, dtype=torch.float32, device=x.device)
        n_blocks = triton.cdiv(self.d, self.block_d)
        _xt_mm_kernel[flat_grid(self.op, n_blocks, self.batch)](
            x,
            self.amax,
            q,
            z,
            self.n,
            self.d,
            n_blocks,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            q.stride(0),
            q.stride(1),
            z.stride(0),
            z.stride(1),
            L=self.width,
            BLOCK_N=REDUCE_BLOCK,
            BLOCK_D=self.block_d,
            SPLIT=self.split,
            PRECISION=self.precision,
        )
        return z


def range_finder(
    x: torch.Tensor, l: int, seed: int, power_iters: int, op: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (B, N, D) -> (amax, Q, W): max |x[b]| (B,) (NaN or Inf exactly where x[b] has a
    NaN or Inf), the orthonormal basis Q of the range after power_iters power iterations
    (B, N, L) and W = X^T Q (B, D, L), both float32 and of the scaled X (columns >= l zero).
    The Ritz values of X on Q are the eigenvalues of W^T W."""
    amax, omega = scale_and_sketch(x, l, seed, op)
    passes = ScaledPasses(x, l, op, amax=amax)
    y = passes.x_mm(omega)
    q = orthonormalize(y, l)
    for _ in range(power_iters):
        z = orthonormalize(passes.xt_mm(q), l)
        q = orthonormalize(passes.x_mm(z), l)
    return amax, q, passes.xt_mm(q)
