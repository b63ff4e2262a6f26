"""Small dense linear algebra on chip: L x L float32 register tiles (L a power of two, the
sketch width of the range finder), shared by the range finder's orthonormalization and the
Rayleigh-Ritz finishes of the leverage-score and spectral-IPR ops.

    small_matmul      a @ b (or a^T @ b) as L rank-one updates
    jacobi_eigen      eigenvalues (and vectors) of a symmetric tile: cyclic parallel Jacobi,
                      L / 2 disjoint rotations per round (round-robin pairing)
    top_r_mask        which of l values are the r largest (ties: lower index)
    top_subspace_tile T V_r for the eigenvectors V_r of the r largest eigenvalues
    ritz_ipr_tile     the IPR of the r largest eigenvalues of a Gram tile

These are register-level functions; the kernels that load and store their tiles call them,
either a launch of their own per sample or the last program of a sample in the pass that
wrote the tile (sketch.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

JACOBI_MAX_SWEEPS = 16
# Stop when the squared off-diagonal mass is below this fraction of the squared Frobenius norm.
JACOBI_TOL2 = 1e-13
# Warps of the L x L kernels: with four, the Jacobi solver and the (64, L) @ (L, L) row-score
# product spill at L = 64 (sm_90, 255-register cap); eight hold them in registers.
JACOBI_WARPS = 8


@triton.jit
def small_matmul(a, b, L: tl.constexpr, TRANS_A: tl.constexpr = False):
    """a @ b (a^T @ b with TRANS_A) of (L, L) float32 register tiles as L rank-one updates
    in k order: float32 products and sums like an ieee tl.dot, but it holds only the two
    operands and the result (an L x L FMA tl.dot next to a Cholesky spills)."""
    idx = tl.arange(0, L)
    rows = idx[:, None]
    cols = idx[None, :]
    c = tl.zeros((L, L), tl.float32)
    for k in range(L):
        if TRANS_A:
            ak = tl.sum(tl.where(rows == k, a, 0.0), axis=0)
        else:
            ak = tl.sum(tl.where(cols == k, a, 0.0), axis=1)
        bk = tl.sum(tl.where(rows == k, b, 0.0), axis=0)
        c += ak[:, None] * bk[None, :]
    return c


@triton.jit
def _round_robin_partner(idx, t, P):
    """Partner of each player in round t of a round-robin tournament of P (even) players;
    players >= P (padding) sit out (partner = self)."""
    partner = (2 * t - idx + 2 * (P - 1)) % (P - 1)
    partner = tl.where(idx == t, P - 1, partner)
    partner = tl.where(idx == P - 1, t, partner)
    return tl.where(idx < P, partner, idx)


@triton.jit
def _jacobi_round(a, v, partner, idx, L: tl.constexpr, VECTORS: tl.constexpr):
    """Apply the L/2 disjoint Jacobi rotations that zero a[i, partner(i)]: a <- J^T a J, and
    v <- v J when VECTORS."""
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
    if VECTORS:
        v = v * c[None, :] + tl.gather(v, col_idx, 1) * sigma[None, :]
    return a, v


@triton.jit
def jacobi_eigen(a, l, L: tl.constexpr, MAX_SWEEPS: tl.constexpr, TOL2: tl.constexpr, VECTORS: tl.constexpr):
    """Eigen-decomposition of the symmetric L x L float32 a (cyclic parallel Jacobi over the
    first l rows and columns): (eigenvalues (L,), unordered; eigenvectors as the columns of v,
    the identity unless VECTORS)."""
    idx = tl.arange(0, L)
    eye = idx[:, None] == idx[None, :]
    v = tl.where(eye, 1.0, 0.0)
    players = ((l + 1) // 2) * 2
    total = tl.sum(tl.sum(a * a, axis=1), axis=0)
    for _sweep in range(MAX_SWEEPS):
        off = tl.sum(tl.sum(tl.where(eye, 0.0, a * a), axis=1), axis=0)
        if off > TOL2 * total:
            for t in range(players - 1):
                a, v = _jacobi_round(a, v, _round_robin_partner(idx, t, players), idx, L, VECTORS)
    return tl.sum(tl.where(eye, a, 0.0), axis=1), v


@triton.jit
def top_r_mask(d, l, r, L: tl.constexpr):
    """Which of the first l entries of d (L,) are its r largest (ties: lower index)."""
    idx = tl.arange(0, L)
    rows = idx[:, None]
    cols = idx[None, :]
    better = ((d[None, :] > d[:, None]) | ((d[None, :] == d[:, None]) & (cols < rows))) & (cols < l)
    rank = tl.sum(better.to(tl.int32), axis=1)
    return (rank < r) & (idx < l)


@triton.jit
def top_subspace_tile(g, t, l, r, L: tl.constexpr, MAX_SWEEPS: tl.constexpr, TOL2: tl.constexpr):
    """For the symmetric (L, L) g (zero past l) and t (L, L): (t @ V_r, the eigenvalues (L,),
    unordered), V_r the eigenvectors of the r largest eigenvalues (ties: lower index) as columns
    and zero columns for the others."""
    d, v = jacobi_eigen(g, l, L, MAX_SWEEPS, TOL2, True)
    keep = top_r_mask(d, l, r, L)
    return small_matmul(t, tl.where(keep[None, :], v, 0.0), L), d


@triton.jit
def ritz_ipr_tile(g, amax, l, r, L: tl.constexpr, MAX_SWEEPS: tl.constexpr, TOL2: tl.constexpr):
    """IPR of the r largest of the l Ritz values, the eigenvalues of the Gram tile g = W^T W
    (Jacobi, no eigenvectors; negative rounding clamped to 0); NaN unless amax (max |x[b]|)
    and the eigenvalues are finite."""
    e, _ = jacobi_eigen(g, l, L, MAX_SWEEPS, TOL2, False)
    keep = top_r_mask(e, l, r, L)
    lam = tl.where(keep, tl.maximum(e, 0.0), 0.0)
    total = tl.sum(lam, axis=0)
    p = lam / tl.where(total > 0.0, total, 1.0)
    ipr = tl.where(total > 0.0, tl.sum(p * p, axis=0), 0.0)
    nan_eigen = tl.sum(tl.where(keep & (e != e), 1, 0), axis=0)
    finite = (amax == amax) & (amax < float("inf")) & (nan_eigen == 0) & (tl.abs(total) < float("inf"))
    return tl.where(finite, ipr, float("nan"))
