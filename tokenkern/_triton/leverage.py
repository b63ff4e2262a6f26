"""Randomized-SVD leverage scores on the GPU, with no host synchronization.

The range finder of :mod:`.sketch` (Gaussian sketch of width l, power iterations with
CholeskyQR2, the basis Q = Q1 T and the Gram of W = X^T Q, all on X / 2^e), then, every
stage a Triton kernel:

    V_r = top-r eigenvectors of W^T W           (B, L, L) Jacobi, in registers, run by the last
                                                pass's last program of each sample (L <= 64;
                                                wider: a launch of its own, _top_subspace_kernel)
    scores = rownorm^2(Q1 (T V_r))              (B, N); V_r of T^T (W1^T W1) T, W1 = X^T Q1

``L`` is the sketch width ``l = min(rank + oversample, N, D)`` rounded up to a power of two
(at least 16, for tl.dot); the columns past ``l`` stay exactly zero throughout. Leverage
scores do not depend on the scale of x[b], float32 sums of its squares do: hence the exact
power-of-two scaling of the range finder.

The Jacobi eigen-solver (small.py; also the Rayleigh-Ritz step of the spectral IPR) holds
L x L float32 matrices on chip, and the passes and row scores hold L-wide tiles:
``LEVERAGE_MAX_SKETCH`` bounds l on CUDA (their shared memory at L = 256 exceeds a block's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sketch import (
    FINISH_TOP_SUBSPACE,
    _cols,
    _contiguous_rows,
    fused_finish,
    load_square,
    load_sym,
    range_finder,
    sketch_width,
)
from .small import JACOBI_MAX_SWEEPS, JACOBI_TOL2, JACOBI_WARPS, top_subspace_tile
from .utils import empty, flat_grid, unflatten2

# The sketch width l is padded to a power of two L (>= 16); the Jacobi solver holds L x L
# float32 matrices on chip, and at L = 256 it, the passes and the row scores each need more
# shared memory than an H100/H200 block may have (227 KiB; 256-640 KiB compiled for sm_90,
# make kernel-sweep). So l = min(rank + oversample, N, D) <= 128 on CUDA.
LEVERAGE_MAX_SKETCH = 128
# The (64, L) @ (L, L) row-score product spills at four warps at L = 64 (sm_90); eight hold it.
# At L = 128 they spill 27 KB per thread; (32, L) row tiles at eight warps hold it.
ROW_SCORES_WARPS = 8
ROW_SCORES_WIDE_BLOCK = 32


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
    g = load_sym(g_ptr + b * (l * (l + 1) // 2), l, L)
    vsel, d = top_subspace_tile(g, load_square(tt, L), l, r, L, MAX_SWEEPS, TOL2)
    tl.store(vsel_ptr + b * v_sb + rows * L + cols, vsel)
    tl.store(eval_ptr + b * e_sb + idx, d)


@triton.jit
def _row_scores_kernel(
    q_ptr, v_ptr, s_ptr, N, n_blocks, q_sb, q_sn: tl.constexpr, v_sb, s_sb, L: tl.constexpr, BLOCK_N: tl.constexpr
):
    """s[b, i] = ||q[b, i] @ v[b]||^2, q rows of q_sn contiguous columns (a constexpr: the
    column mask stays vectorizable), zero-padded to L."""
    pid, b = unflatten2(tl.program_id(0), n_blocks)
    b = b.to(tl.int64)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cl = tl.arange(0, L)
    qt = tl.load(
        q_ptr + b * q_sb + rn[:, None] * q_sn + cl[None, :], mask=(rn < N)[:, None] & _cols(q_sn, L), other=0.0
    )
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
    """||q[b, i] @ vsel[b, :l]||^2 for q: (B, N, l), vsel: (B, L, L) -> (B, N) float32."""
    q = _contiguous_rows(q)
    batch, n, _ = q.shape
    width = vsel.shape[-1]
    scores = empty(batch, n, dtype=torch.float32, device=q.device)
    block_n = 64 if width <= 64 else ROW_SCORES_WIDE_BLOCK
    n_blocks = triton.cdiv(n, block_n)
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
        BLOCK_N=block_n,
        num_warps=ROW_SCORES_WARPS,
    )
    return scores


def leverage_scores(x: torch.Tensor, r: int, l: int, power_iters: int, seed: int) -> torch.Tensor:
    """x: (B, N, D) -> (B, N) float32 leverage scores of the top-r left singular subspace,
    estimated from a sketch of width l (r <= l <= min(N, D))."""
    if fused_finish(l):  # the last pass's last programs solve the eigenproblem
        _, q, _, _, (vsel, _) = range_finder(x, l, seed, power_iters, "leverage_scores", FINISH_TOP_SUBSPACE, r)
    else:
        _, q, t, g, _ = range_finder(x, l, seed, power_iters, "leverage_scores")
        vsel, _ = top_subspace(g, t, l, r)
    return row_scores(q, vsel)
