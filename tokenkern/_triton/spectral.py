"""Spectral inverse participation ratio of token matrices on the GPU, with no host synchronization.

For x[b]: (N, D) with singular values s_i, the eigenvalues of the Gram matrix on the smaller
side, G = x x^T (N <= D) or x^T x (m = min(N, D) rows), are lam_i = s_i^2, and

    IPR = sum_i p_i^2,  p_i = lam_i / sum_j lam_j.

All singular values (r = None): ``IPR = ||G||_F^2 / tr(G)^2``, no eigen-solve needed.

    _gram_tiles_kernel   one program per (tile row ti, tile column tj, sample) with ti <= tj:
                         the 64 x 64 tile of G in float32 (16-bit x: exact products on the
                         tensor cores; float32 x: 3xTF32), reduced to three numbers: the
                         largest |entry| a_t, the sum of (entry / a_t)^2 (times 2 off the
                         diagonal: the mirrored tile is not computed) and the tile's trace.
                         Programs with ti > tj write zeros. Scaling by a_t keeps the squares
                         from overflowing for any G float32 can hold.
    _gram_reduce_kernel  one program per sample sums the partials in a fixed order:
                         ``IPR = (A / tr)^2 * sum_t (a_t / A)^2 s_t`` with A = max_t a_t <= tr.

Each output is owned by one program and summed in a fixed order: no atomics, bit-for-bit
deterministic, and the batch is per sample. The IPR does not depend on the scale of x[b]:
both paths read x[b] times the exact power of two 2^-e that brings max |x[b]| into [1, 2)
(sketch.py), so that no sum of squares overflows or underflows for any finite x.

Top r (1 <= r < m): the randomized range finder of sketch.py on x (Gaussian sketch of width
l = ``spectral_sketch(m, r)``, ``POWER_ITERS`` power iterations with CholeskyQR2
re-orthonormalization, skipped when the sketch spans all m directions), Rayleigh-Ritz by the
Jacobi solver of leverage.py without eigenvectors (the l Ritz values approximate lam_1..lam_l
from below) and the IPR of the r largest Ritz values, in one kernel, ``_ritz_ipr_kernel``. A
sample whose x[b] has a NaN or Inf (its max |x[b]|, which scales the passes, is then NaN or
Inf) gets NaN. The sketch must fit the solver's registers
(``SPECTRAL_MAX_SKETCH`` columns) with ``SPECTRAL_MIN_OVERSAMPLE`` columns past r, unless it
covers all m directions (then it is exact).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .leverage import JACOBI_MAX_SWEEPS, JACOBI_TOL2, JACOBI_WARPS, jacobi_eigen, top_r_mask
from .sketch import abs_max, congruence, load_square, load_sym, pow2_inverse, range_finder, scale_tile, sketch_width
from .utils import empty, flat_grid, interpreted, unflatten3

# The top-r sketch must fit the register-resident eigen-solver: at most SPECTRAL_MAX_SKETCH
# columns, at least r + SPECTRAL_MIN_OVERSAMPLE of them unless it spans all min(N, D).
SPECTRAL_MAX_SKETCH = 128
SPECTRAL_MIN_OVERSAMPLE = 16
# Power iterations of the top-r path. On flat (Gaussian) spectra the IPR error falls from
# ~1e-3 at 4 to ~5e-4 at 6 for r = 32; on decaying spectra it is far smaller (docs/ops/spectral.md: accuracy).
POWER_ITERS = 6
SKETCH_SEED = 0
BLOCK_M = 64
BLOCK_K = 64


@triton.jit
def _gram_tiles_kernel(
    x_ptr,
    amax_ptr,
    part_ptr,
    M,
    K,
    x_sb,
    s_m,
    s_k,
    p_sb,
    NT,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IS_F32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Tile (ti, tj) of G = A A^T for A[i, k] = x[b, i * s_m + k * s_k] / 2^e: (M, K)."""
    ti, tj, b = unflatten3(tl.program_id(0), NT, NT)
    b = b.to(tl.int64)
    inv = pow2_inverse(tl.load(amax_ptr + b))
    slot = part_ptr + b * p_sb + (ti * NT + tj) * 3
    ri = ti * BLOCK_M + tl.arange(0, BLOCK_M)
    rj = tj * BLOCK_M + tl.arange(0, BLOCK_M)
    base = x_ptr + b * x_sb
    acc = tl.zeros((BLOCK_M, BLOCK_M), tl.float32)
    # Tiles below the diagonal are mirrors: their programs run no iteration and write zeros.
    k_end = tl.where(ti <= tj, K, 0)
    for k0 in range(0, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            base + ri[:, None].to(tl.int64) * s_m + rk[None, :].to(tl.int64) * s_k,
            mask=(ri < M)[:, None] & (rk < K)[None, :],
            other=0.0,
        )
        a = scale_tile(a, inv)
        c = tl.load(
            base + rk[:, None].to(tl.int64) * s_k + rj[None, :].to(tl.int64) * s_m,
            mask=(rk < K)[:, None] & (rj < M)[None, :],
            other=0.0,
        )
        c = scale_tile(c, inv)
        if IS_F32:
            acc = tl.dot(a, c, acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a, c, acc)
    mag = tl.abs(acc)
    bad = tl.sum(tl.sum(((acc != acc) | (mag == float("inf"))).to(tl.int32), axis=1), axis=0)
    amax = tl.max(tl.max(mag, axis=1), axis=0)
    scaled = acc / tl.where(amax > 0.0, amax, 1.0)
    ssq = tl.sum(tl.sum(scaled * scaled, axis=1), axis=0)
    ssq = tl.where(ti < tj, 2.0 * ssq, ssq)
    ssq = tl.where(bad > 0, float("nan"), ssq)
    diag = (ri[:, None] == rj[None, :]) & (ti == tj)
    trace = tl.sum(tl.sum(tl.where(diag, acc, 0.0), axis=1), axis=0)
    tl.store(slot, amax)
    tl.store(slot + 1, ssq)
    tl.store(slot + 2, trace)


@triton.jit
def _gram_reduce_kernel(part_ptr, out_ptr, T, p_sb, BLOCK_T: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base = part_ptr + b * p_sb
    top = tl.zeros((BLOCK_T,), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        top = tl.maximum(top, tl.load(base + rt * 3, mask=rt < T, other=0.0))
    big = tl.max(top, axis=0)
    inv = 1.0 / tl.where(big > 0.0, big, 1.0)
    ssq = tl.zeros((BLOCK_T,), tl.float32)
    trace = tl.zeros((BLOCK_T,), tl.float32)
    bad = tl.zeros((BLOCK_T,), tl.int32)
    for t0 in range(0, T, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        live = rt < T
        a = tl.load(base + rt * 3, mask=live, other=0.0)
        s = tl.load(base + rt * 3 + 1, mask=live, other=0.0)
        tr = tl.load(base + rt * 3 + 2, mask=live, other=0.0)
        ratio = a * inv
        ssq += ratio * ratio * s
        trace += tr
        bad += ((s != s) | (a != a) | (tl.abs(a) == float("inf"))).to(tl.int32)
    s_all = tl.sum(ssq, axis=0)
    tr_all = tl.sum(trace, axis=0)
    q = big / tl.where(tr_all > 0.0, tr_all, 1.0)
    ipr = tl.where(tr_all > 0.0, q * q * s_all, 0.0)
    finite = (tl.sum(bad, axis=0) == 0) & (tl.abs(tr_all) < float("inf")) & (tr_all == tr_all)
    tl.store(out_ptr + b, tl.where(finite, ipr, float("nan")))


@triton.jit
def _ritz_ipr_kernel(
    g_ptr,
    t_ptr,
    amax_ptr,
    out_ptr,
    l,
    r,
    L: tl.constexpr,
    MAX_SWEEPS: tl.constexpr,
    TOL2: tl.constexpr,
):
    """IPR of the r largest of the l Ritz values of sample b: the eigenvalues of
    T[b]^T G[b] T[b] = W^T W, G[b] the packed Gram of W1 (Jacobi, no eigenvectors; negative
    rounding clamped to 0); NaN where x[b] has a NaN or Inf (its max |x[b]| is then NaN or
    Inf)."""
    b = tl.program_id(0).to(tl.int64)
    g = congruence(load_sym(g_ptr + b * (l * (l + 1) // 2), l, L), load_square(t_ptr + b * L * L, L), L)
    e, _ = jacobi_eigen(g, l, L, MAX_SWEEPS, TOL2, False)
    keep = top_r_mask(e, l, r, L)
    lam = tl.where(keep, tl.maximum(e, 0.0), 0.0)
    total = tl.sum(lam, axis=0)
    p = lam / tl.where(total > 0.0, total, 1.0)
    ipr = tl.where(total > 0.0, tl.sum(p * p, axis=0), 0.0)
    amax = tl.load(amax_ptr + b)
    nan_eigen = tl.sum(tl.where(keep & (e != e), 1, 0), axis=0)
    finite = (amax == amax) & (amax < float("inf")) & (nan_eigen == 0) & (tl.abs(total) < float("inf"))
    tl.store(out_ptr + b, tl.where(finite, ipr, float("nan")))


def full_ipr(x: torch.Tensor) -> torch.Tensor:
    """x: (B, N, D) -> (B,) float32 IPR over all singular values, through the Gram matrix of
    the smaller side."""
    batch, n, d = x.shape
    if n <= d:
        m, k, s_m, s_k = n, d, x.stride(1), x.stride(2)
    else:
        m, k, s_m, s_k = d, n, x.stride(2), x.stride(1)
    nt = triton.cdiv(m, BLOCK_M)
    part = empty(batch, nt * nt, 3, dtype=torch.float32, device=x.device)
    is_f32 = x.dtype == torch.float32
    _gram_tiles_kernel[flat_grid("spectral_ipr", nt, nt, batch)](
        x,
        abs_max(x),
        part,
        m,
        k,
        x.stride(0),
        s_m,
        s_k,
        part.stride(0),
        nt,
        BLOCK_M=BLOCK_M,
        BLOCK_K=BLOCK_K,
        IS_F32=is_f32,
        PRECISION="ieee" if interpreted() else "tf32x3",
    )
    out = empty(batch, dtype=torch.float32, device=x.device)
    _gram_reduce_kernel[(batch,)](part, out, nt * nt, part.stride(0), BLOCK_T=256)
    return out


def spectral_sketch(m: int, r: int) -> int:
    """Sketch width of the top-r path for 1 <= r < m = min(N, D): twice the rank and at
    least r + 16, rounded up to a power of two, at most 128 and at most m (l = m is exact)."""
    want = max(2 * r, r + SPECTRAL_MIN_OVERSAMPLE)
    return min(m, 1 << (want - 1).bit_length(), SPECTRAL_MAX_SKETCH)


def sketch_fits(m: int, r: int) -> bool:
    """Whether the top-r path can take rank r < m = min(N, D): its sketch spans all m
    directions or leaves SPECTRAL_MIN_OVERSAMPLE columns past r."""
    l = spectral_sketch(m, r)
    return l == m or l >= r + SPECTRAL_MIN_OVERSAMPLE


def topr_ipr(x: torch.Tensor, r: int) -> torch.Tensor:
    """x: (B, N, D) -> (B,) float32 IPR of the r largest squared singular values, estimated
    from a sketch of width l = spectral_sketch(min(N, D), r) (r < l <= min(N, D);
    l = min(N, D) is exact up to rounding). r must fit (``sketch_fits``)."""
    batch, n, d = x.shape
    l = spectral_sketch(min(n, d), r)
    power_iters = 0 if l == min(n, d) else POWER_ITERS
    amax, _, t, g = range_finder(x, l, SKETCH_SEED, power_iters, "spectral_ipr")
    out = empty(batch, dtype=torch.float32, device=x.device)
    _ritz_ipr_kernel[(batch,)](
        g,
        t,
        amax,
        out,
        l,
        r,
        L=sketch_width(l),
        MAX_SWEEPS=JACOBI_MAX_SWEEPS,
        TOL2=JACOBI_TOL2,
        num_warps=JACOBI_WARPS,
    )
    return out


def spectral_ipr(x: torch.Tensor, r: int | None) -> torch.Tensor:
    """x: (B, N, D) -> (B,) float32; r: the number of top eigenvalues kept, None for all."""
    return full_ipr(x) if r is None else topr_ipr(x, r)
