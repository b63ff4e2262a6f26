"""Randomized-SVD leverage scores on the GPU, with no host synchronization.

Halko-Martinsson-Tropp range finder, batched over B, every stage a Triton kernel:

    omega = gaussian(D, l, seed)                (D, L)   counter-based, shared by the batch
    Y = X @ omega;  Q = orth(Y)                 (B, N, L) one pass over X
    repeat power_iters:                         two passes over X per iteration
        Z = orth(X^T Q);  Q = orth(X Z)
    W = X^T Q                                   (B, D, L) one pass over X
    V_r = top-r eigenvectors of W^T W           (B, L, L) Jacobi, in registers
    scores = rownorm^2(Q V_r)                   (B, N)

``L`` is the sketch width ``l = min(rank + oversample, N, D)`` rounded up to a power of two
(at least 16, for tl.dot); the columns past ``l`` stay exactly zero throughout. ``orth`` is
CholeskyQR2 in float32 with one program per batch element. The passes over X read it in
its own dtype; a 16-bit X is multiplied against the float32 operand split into hi + lo
16-bit halves (two tensor-core products, float32 accumulation), a float32 X uses 3xTF32.

Leverage scores do not depend on the scale of x[b], float32 sums of its squares do: every
pass reads X[b] times 2^-e, the power of two that brings max |x[b]| (one torch reduction)
into [1, 2). The product is exact, so any finite x in the float32 range (subnormal included)
is solved as if it were of unit size; a zero, NaN or Inf sample is read unscaled.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import empty, flat_grid, interpreted, next_pow2, split_dtype, unflatten2

JACOBI_MAX_SWEEPS = 16
# Stop when the squared off-diagonal mass is below this fraction of the squared Frobenius norm.
JACOBI_TOL2 = 1e-13
CHOLESKY_FLOOR = 1e-12


@triton.jit
def _gaussian_kernel(out_ptr, D, l, seed, o_sd, L: tl.constexpr, BLOCK_D: tl.constexpr):
    rd = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)[:, None]
    cj = tl.arange(0, L)[None, :]
    vals = tl.randn(seed, rd * l + cj)
    vals = tl.where(cj < l, vals, 0.0)
    tl.store(out_ptr + rd * o_sd + cj, vals, mask=rd < D)


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


def abs_max(x: torch.Tensor) -> torch.Tensor:
    """x: (B, N, D) -> (B,) float32 max |x[b]| (NaN if x[b] has a NaN): one reduction, no sync."""
    return torch.linalg.vector_norm(x, float("inf"), dim=(1, 2)).float()


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
def _gram(src, M, s_sm, L: tl.constexpr, BLOCK_M: tl.constexpr):
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
        rinv = _cholesky_inverse(_gram(src, M, s_sm, L, BLOCK_M), l, L, FLOOR)
        for m0 in range(0, M, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            t = tl.load(src + rm[:, None] * s_sm + cl[None, :], mask=(rm < M)[:, None], other=0.0)
            qt = tl.dot(t, rinv, input_precision="ieee")
            tl.store(q_ptr + b * q_sb + rm[:, None] * q_sm + cl[None, :], qt, mask=(rm < M)[:, None])


@triton.jit
def _round_robin_partner(idx, t, P):
    """Partner of each player in round t of a round-robin tournament of P (even) players;
    players >= P (padding) sit out (partner = self)."""
    partner = (2 * t - idx + 2 * (P - 1)) % (P - 1)
    partner = tl.where(idx == t, P - 1, partner)
    partner = tl.where(idx == P - 1, t, partner)
    return tl.where(idx < P, partner, idx)


@triton.jit
def _jacobi_round(a, v, partner, idx, L: tl.constexpr):
    """Apply the L/2 disjoint Jacobi rotations that zero a[i, partner(i)]: a <- J^T a J, v <- v J."""
    rows = idx[:, None]
    cols = idx[None, :]
    eye = rows == cols
    d = tl.sum(tl.where(eye, a, 0.0), axis=1)
    a_ip = tl.sum(tl.where(cols == partner[:, None], a, 0.0), axis=1)
    apq = 0.5 * (a_ip + tl.gather(a_ip, partner, 0))
    d_partner = tl.gather(d, partner, 0)
    is_p = idx < partner
    app = tl.where(is_p, d, d_partner)
    aqq = tl.where(is_p, d_partner, d)
    active = (apq != 0.0) & (partner != idx)
    safe = tl.where(active, apq, 1.0)
    tau = (aqq - app) / (2.0 * safe)
    # t = tan(theta), the smaller root of t^2 + 2 tau t - 1 = 0; 1 / (2 tau) once tau^2 overflows.
    big = tl.abs(tau) > 1e18
    tau_small = tl.where(big, 0.0, tau)
    t = tl.where(tau >= 0, 1.0, -1.0) / (tl.abs(tau) + tl.sqrt(1.0 + tau_small * tau_small))
    t = tl.where(big, 0.5 / tl.where(big, tau, 1.0), t)
    c = 1.0 / tl.sqrt(1.0 + t * t)
    s = t * c
    c = tl.where(active, c, 1.0)
    s = tl.where(active, s, 0.0)
    sigma = tl.where(is_p, -s, s)
    row_idx = tl.broadcast_to(partner[:, None], (L, L))
    col_idx = tl.broadcast_to(partner[None, :], (L, L))
    a = c[:, None] * a + sigma[:, None] * tl.gather(a, row_idx, 0)
    a = a * c[None, :] + tl.gather(a, col_idx, 1) * sigma[None, :]
    v = v * c[None, :] + tl.gather(v, col_idx, 1) * sigma[None, :]
    return a, v


@triton.jit
def _top_subspace_kernel(
    w_ptr,
    vsel_ptr,
    eval_ptr,
    D,
    l,
    r,
    w_sb,
    w_sd,
    v_sb,
    e_sb,
    L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MAX_SWEEPS: tl.constexpr,
    TOL2: tl.constexpr,
):
    """Eigenvectors of W^T W (cyclic parallel Jacobi); writes those of the r largest
    eigenvalues (ties: lower index) as columns of vsel, the others as zero columns."""
    b = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, L)
    rows = idx[:, None]
    cols = idx[None, :]
    eye = rows == cols
    a = _gram(w_ptr + b * w_sb, D, w_sd, L, BLOCK_D)
    v = tl.where(eye, 1.0, 0.0)
    players = ((l + 1) // 2) * 2
    total = tl.sum(tl.sum(a * a, axis=1), axis=0)
    for _sweep in range(MAX_SWEEPS):
        off = tl.sum(tl.sum(tl.where(eye, 0.0, a * a), axis=1), axis=0)
        if off > TOL2 * total:
            for t in range(players - 1):
                a, v = _jacobi_round(a, v, _round_robin_partner(idx, t, players), idx, L)
    d = tl.sum(tl.where(eye, a, 0.0), axis=1)
    d_col = tl.sum(tl.where(eye, a, 0.0), axis=0)
    better = ((d_col[None, :] > d[:, None]) | ((d_col[None, :] == d[:, None]) & (cols < rows))) & (cols < l)
    rank = tl.sum(better.to(tl.int32), axis=1)
    keep = (rank < r) & (idx < l)
    tl.store(vsel_ptr + b * v_sb + rows * L + cols, tl.where(keep[None, :], v, 0.0))
    tl.store(eval_ptr + b * e_sb + idx, d)


@triton.jit
def _row_scores_kernel(
    q_ptr, v_ptr, s_ptr, N, n_blocks, q_sb, q_sn, v_sb, s_sb, L: tl.constexpr, BLOCK_N: tl.constexpr
):
    pid, b = unflatten2(tl.program_id(0), n_blocks)
    b = b.to(tl.int64)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cl = tl.arange(0, L)
    qt = tl.load(q_ptr + b * q_sb + rn[:, None] * q_sn + cl[None, :], mask=(rn < N)[:, None], other=0.0)
    vt = tl.load(v_ptr + b * v_sb + cl[:, None] * L + cl[None, :])
    u = tl.dot(qt, vt, input_precision="ieee")
    tl.store(s_ptr + b * s_sb + rn, tl.sum(u * u, axis=1), mask=rn < N)


def _width(l: int) -> int:
    return max(16, next_pow2(l))


def gaussian(d: int, l: int, seed: int, device: torch.device) -> torch.Tensor:
    """(d, L) float32 standard normal sketch, columns >= l zero; entry (i, j) depends only on
    (seed, i * l + j), so every batch element and every launch sees the same sketch."""
    width = _width(l)
    out = empty(d, width, dtype=torch.float32, device=device)
    _gaussian_kernel[(triton.cdiv(d, 64),)](out, d, l, seed, out.stride(0), L=width, BLOCK_D=64)
    return out


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
    )
    return q


def top_subspace(w: torch.Tensor, l: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Jacobi eigen-solve of w^T w for w: (B, M, L) float32 (columns >= l zero).
    Returns vsel (B, L, L), whose columns are the eigenvectors of the r largest eigenvalues
    (ties: lower index) and zero elsewhere, and the eigenvalues (B, L), unordered."""
    batch, m, width = w.shape
    vsel = empty(batch, width, width, dtype=torch.float32, device=w.device)
    evals = empty(batch, width, dtype=torch.float32, device=w.device)
    _top_subspace_kernel[(batch,)](
        w,
        vsel,
        evals,
        m,
        l,
        r,
        w.stride(0),
        w.stride(1),
        vsel.stride(0),
        evals.stride(0),
        L=width,
        BLOCK_D=64,
        MAX_SWEEPS=JACOBI_MAX_SWEEPS,
        TOL2=JACOBI_TOL2,
    )
    return vsel, evals


def row_scores(q: torch.Tensor, vsel: torch.Tensor) -> torch.Tensor:
    """||q[b, i] @ vsel[b]||^2 for q: (B, N, L), vsel: (B, L, L) -> (B, N) float32."""
    batch, n, width = q.shape
    scores = empty(batch, n, dtype=torch.float32, device=q.device)
    n_blocks = triton.cdiv(n, 64)
    _row_scores_kernel[flat_grid("leverage_scores", n_blocks, batch)](
        q,
        vsel,
        scores,
        n,
        n_blocks,
        q.stride(0),
        q.stride(1),
        vsel.stride(0),
        scores.stride(0),
        L=width,
        BLOCK_N=64,
    )
    return scores


class _Passes:
    """The two bandwidth-bound products over X / 2^e (see the module docstring), with the
    block sizes for this X. ``op`` names the calling op in launch errors."""

    BLOCK_N = 64
    BLOCK_D = 64

    def __init__(self, x: torch.Tensor, l: int, op: str = "leverage_scores"):
        self.x = x
        self.op = op
        self.amax = abs_max(x)
        self.batch, self.n, self.d = x.shape
        self.width = _width(l)
        self.split = split_dtype(x.dtype)
        self.precision = "ieee" if interpreted() else "tf32x3"

    def x_mm(self, z: torch.Tensor) -> torch.Tensor:
        """X @ z for z of shape (B, D, L), or (D, L) shared by the batch -> (B, N, L)."""
        x = self.x
        y = empty(self.batch, self.n, self.width, dtype=torch.float32, device=x.device)
        z_sb = 0 if z.dim() == 2 else z.stride(0)
        n_blocks = triton.cdiv(self.n, self.BLOCK_N)
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
            BLOCK_N=self.BLOCK_N,
            BLOCK_D=self.BLOCK_D,
            SPLIT=self.split,
            PRECISION=self.precision,
        )
        return y

    def xt_mm(self, q: torch.Tensor) -> torch.Tensor:
        """X^T @ q for q: (B, N, L) -> (B, D, L)."""
        x = self.x
        z = empty(self.batch, self.d, self.width, dtype=torch.float32, device=x.device)
        n_blocks = triton.cdiv(self.d, self.BLOCK_D)
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
            BLOCK_N=self.BLOCK_N,
            BLOCK_D=self.BLOCK_D,
            SPLIT=self.split,
            PRECISION=self.precision,
        )
        return z


def leverage_scores(x: torch.Tensor, r: int, l: int, power_iters: int, seed: int) -> torch.Tensor:
    """x: (B, N, D) -> (B, N) float32 leverage scores of the top-r left singular subspace,
    estimated from a sketch of width l (r <= l <= min(N, D))."""
    passes = _Passes(x, l)
    q = orthonormalize(passes.x_mm(gaussian(passes.d, l, seed, x.device)), l)
    for _ in range(power_iters):
        z = orthonormalize(passes.xt_mm(q), l)
        q = orthonormalize(passes.x_mm(z), l)
    vsel, _ = top_subspace(passes.xt_mm(q), l, r)
    return row_scores(q, vsel)
