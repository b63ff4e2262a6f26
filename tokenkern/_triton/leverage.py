"""Randomized-SVD leverage scores on the GPU, with no host synchronization.

The range finder of :mod:`.sketch` (Gaussian sketch of width l, power iterations with
CholeskyQR2, the basis Q = Q1 T and the Gram of W = X^T Q, all on X / 2^e), then, every
stage a Triton kernel:

    V_r = top-r eigenvectors of W^T W           (B, L, L) Jacobi, in registers
    scores = rownorm^2(Q1 (T V_r))              (B, N); V_r of T^T (W1^T W1) T, W1 = X^T Q1

``L`` is the sketch width ``l = min(rank + oversample, N, D)`` rounded up to a power of two
(at least 16, for tl.dot); the columns past ``l`` stay exactly zero throughout. Leverage
scores do not depend on the scale of x[b], float32 sums of its squares do: hence the exact
power-of-two scaling of the range finder.

The Jacobi eigen-solver (``top_subspace``, also the Rayleigh-Ritz step of the spectral IPR)
holds L x L float32 matrices on chip: ``LEVERAGE_MAX_SKETCH`` bounds l on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sketch import load_square, load_sym, range_finder, sketch_width, small_matmul
from .utils import empty, flat_grid, unflatten2

# The sketch width l is padded to a power of two L (>= 16); the Jacobi solver holds L x L
# float32 matrices on chip, and at L = 512 it needs more shared memory than an H100/H200 block
# has (227 KiB). So l = min(rank + oversample, N, D) <= 256 on CUDA.
LEVERAGE_MAX_SKETCH = 256
JACOBI_MAX_SWEEPS = 16
# Stop when the squared off-diagonal mass is below this fraction of the squared Frobenius norm.
JACOBI_TOL2 = 1e-13
# Warps of the L x L kernels: with four, the Jacobi solver and the (64, L) @ (L, L) row-score
# product spill at L = 64 (sm_90, 255-register cap); eight hold them in registers.
JACOBI_WARPS = 8
ROW_SCORES_WARPS = 8


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
def _top_subspace_kernel(
    g_ptr,
    t_ptr,
    vsel_ptr,
    eval_ptr,
    l,
    r,
    v_sb,
    e_sb,
    L: tl.constexpr,
    MAX_SWEEPS: tl.constexpr,
    TOL2: tl.constexpr,
):
    """Eigenvectors V of the packed symmetric G[b] (cyclic parallel Jacobi); writes T[b] V_r,
    V_r those of the r largest eigenvalues (ties: lower index) as columns and zero columns for
    the others."""
    b = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, L)
    rows = idx[:, None]
    cols = idx[None, :]
    tt = t_ptr + b * L * L
    d, v = jacobi_eigen(load_sym(g_ptr + b * (l * (l + 1) // 2), l, L), l, L, MAX_SWEEPS, TOL2, True)
    keep = top_r_mask(d, l, r, L)
    vsel = small_matmul(load_square(tt, L), tl.where(keep[None, :], v, 0.0), L)
    tl.store(vsel_ptr + b * v_sb + rows * L + cols, vsel)
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


def top_subspace(g: torch.Tensor, t: torch.Tensor, l: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Jacobi eigen-solve of the symmetric l x l matrices G packed in g: (B, l (l + 1) / 2)
    float32 (sketch.pack_symmetric; the range finder's G(W) = t^T G(W1) t), with t: (B, L, L)
    (L = sketch_width(l); zero past l but for a unit diagonal). Returns t @ vsel (B, L, L), vsel
    the eigenvectors of the r largest eigenvalues (ties: lower index) as columns and zero
    elsewhere, and the eigenvalues (B, L), unordered."""
    batch = g.shape[0]
    width = sketch_width(l)
    vsel = empty(batch, width, width, dtype=torch.float32, device=g.device)
    evals = empty(batch, width, dtype=torch.float32, device=g.device)
    _top_subspace_kernel[(batch,)](
        g,
        t,
        vsel,
        evals,
        l,
        r,
        vsel.stride(0),
        evals.stride(0),
        L=width,
        MAX_SWEEPS=JACOBI_MAX_SWEEPS,
        TOL2=JACOBI_TOL2,
        num_warps=JACOBI_WARPS,
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
        num_warps=ROW_SCORES_WARPS,
    )
    return scores


def leverage_scores(x: torch.Tensor, r: int, l: int, power_iters: int, seed: int) -> torch.Tensor:
    """x: (B, N, D) -> (B, N) float32 leverage scores of the top-r left singular subspace,
    estimated from a sketch of width l (r <= l <= min(N, D))."""
    _, q, t, g = range_finder(x, l, seed, power_iters, "leverage_scores")
    vsel, _ = top_subspace(g, t, l, r)
    return row_scores(q, vsel)
