"""Spectral inverse participation ratio of token matrices on the GPU, with no host synchronization.

For x[b]: (N, D) with singular values s_i, the eigenvalues of the Gram matrix on the smaller
side, G = x x^T (N <= D) or x^T x (m = min(N, D) rows), are lam_i = s_i^2, and

    IPR = sum_i p_i^2,  p_i = lam_i / sum_j lam_j.

All singular values (r = None): ``IPR = ||G||_F^2 / tr(G)^2``, no eigen-solve, in one launch
that reads x once:

    _gram_ipr_kernel     one program per 64 x 64 tile (ti, tj), ti <= tj, of G and sample: the
                         upper triangle folded onto a (NT + 1) / 2 x (NT + 1) grid (tile rows r
                         and NT - 1 - r share a grid row; for odd NT the middle grid row's
                         second half is idle). The tile is accumulated in float32 (16-bit x:
                         exact products on the tensor cores; float32 x: 3xTF32) and reduced to
                         (a_t = max |entry|, s_t = sum (entry / a_t)^2 (times 2 off the
                         diagonal: the mirrored tile is not computed), trace_t, q_t). The
                         program that arrives last for its sample (ticket.py) combines the
                         sample's partials in tile order: bit-for-bit the same whichever
                         program it is.

Scale, without a pass over x to find max |x[b]|: a tile streams its two row blocks in K
chunks and keeps its accumulator at 2^(-2 q), 2^q <= the largest |x| of the chunks seen so
far < 2^(q + 1) (from the exponent bits of each chunk). The chunk is read times 2^-q (exact:
scale_tile) and, when a chunk raises q, the accumulator is first multiplied by the exact
power of two 2^(2 (q_old - q_new)). So every scaled entry is below 4 whatever x's scale
(unscaled float32 squares overflow for |x| > 2^64 and lose bits below 2^-63), and x * 2^e
gives the same bits as x while no entry leaves the normal range. Rounding: a power-of-two
scaling is exact but for results below 2^-126, which the global scale of a pre-pass would
have flushed too (it scales by 2^-Q with Q >= every tile's q). The combine works in the frame
2^(-2Q), Q = max_t q_t: ``||G||_F^2 = sum_t (a_t 2^(2 (q_t - Q)))^2 s_t`` and
``tr G = sum_t trace_t 2^(2 (q_t - Q))``, the factors built from exponent bits and 0 below
2^-126. That flush is negligible: the diagonal tile of the row block holding the max has an
entry >= 1 in that frame (>= 2^-44 for a subnormal max), so tr G and ||G||_F^2 are at least
that, while a flushed tile's entries are < K 2^-125 (K products below 4, times < 2^-126).
A NaN or Inf in x[b] reaches its diagonal tile (as a NaN/Inf entry): that sample gets NaN,
the others are unaffected.

Top r (1 <= r < m): the randomized range finder of sketch.py on x (Gaussian sketch of width
l = ``spectral_sketch(m, r)``, ``POWER_ITERS`` power iterations with CholeskyQR2
re-orthonormalization, skipped when the sketch spans all m directions), Rayleigh-Ritz by the
Jacobi solver of small.py without eigenvectors (the l Ritz values approximate lam_1..lam_l
from below) and the IPR of the r largest Ritz values, run by the last pass's last program of
each sample (sketch.ritz_pass; a sketch wider than 64: a launch of its own, ``_ritz_ipr_kernel``). A
sample whose x[b] has a NaN or Inf (its max |x[b]|, which scales the passes, is then NaN or
Inf) gets NaN. The sketch must fit the solver's registers
(``SPECTRAL_MAX_SKETCH`` columns) with ``SPECTRAL_MIN_OVERSAMPLE`` columns past r, unless it
covers all m directions (then it is exact).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sketch import FINISH_IPR, fused_finish, load_sym, range_finder, scale_tile, sketch_width
from .small import JACOBI_MAX_SWEEPS, JACOBI_TOL2, JACOBI_WARPS, ritz_ipr_tile
from .ticket import arrive, counters, load_partial
from .utils import empty, flat_grid, interpreted, unflatten2

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
# Partials per step of the last program's combine.
COMBINE_BLOCK = 256
# The Gram tile kernel holds a 64 x 64 float32 accumulator and both x tiles in registers while
# it finds their max exponent: with 4 warps that is ~210 registers (bf16, sm_90) and spills at
# float32; 8 warps: 88 (bf16) / 215 (float32), no spills, as many warps per SM as 4 warps had.
GRAM_WARPS = 8


@triton.jit
def _exp2i(e):
    """2^e in float32 for an int32 e, from the exponent bits: exact for -126 <= e <= 127,
    0 for e < -126 (where it scales a contribution that is negligible, see full_ipr)."""
    return ((tl.minimum(tl.maximum(e, -127), 127) + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _chunk_exponent(t):
    """floor(log2 max |t|) for a tile of x, clamped to [-127, 126], from the exponent bits (an
    integer max: no NaN comparisons): a zero or subnormal max counts as -127 (float16: -14, so
    that 2^-q stays within what scale_tile keeps exact); an Inf or NaN as 126 (float16: 16),
    at least any finite value's."""
    if t.dtype == tl.float16:
        top = tl.max(tl.max(t.to(tl.int16, bitcast=True) & 0x7FFF, axis=1), axis=0).to(tl.int32)
        q = tl.maximum(top >> 10, 1) - 15
    else:
        if t.dtype == tl.bfloat16:
            top = tl.max(tl.max(t.to(tl.int16, bitcast=True) & 0x7FFF, axis=1), axis=0).to(tl.int32) >> 7
        else:
            top = tl.max(tl.max(t.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1), axis=0) >> 23
        q = tl.minimum(tl.maximum(top - 127, -127), 126)
    return q


@triton.jit
def _tile_of(p, NT):
    """Program p of a sample -> (ti, tj, live): row r of the (NT + 1) / 2 x (NT + 1) grid
    holds tile row r of the upper triangle (NT - r tiles) and then tile row NT - 1 - r
    (r + 1 tiles). With NT odd the middle row would repeat itself: those programs are idle."""
    r = p // (NT + 1)
    c = p % (NT + 1)
    first = c < NT - r
    ti = tl.where(first, r, NT - 1 - r)
    tj = tl.where(first, r + c, c - 1)
    return ti, tj, first | (NT - 1 - r > r)


@triton.jit
def _gram_ipr_kernel(
    x_ptr,
    part_ptr,
    cnt_ptr,
    out_ptr,
    M,
    K,
    x_sb,
    s_m,
    s_k,
    p_sb,
    NT,
    P,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    IS_F32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Tile (ti, tj) of G = A A^T for A[i, k] = x[b, i * s_m + k * s_k]: (M, K), at the
    tile's own scale; the last of the sample's P programs to finish writes out[b]."""
    p, b = unflatten2(tl.program_id(0), P)
    b = b.to(tl.int64)
    ti, tj, live = _tile_of(p, NT)
    ri = ti * BLOCK_M + tl.arange(0, BLOCK_M)
    rj = tj * BLOCK_M + tl.arange(0, BLOCK_M)
    base = x_ptr + b * x_sb
    acc = tl.zeros((BLOCK_M, BLOCK_M), tl.float32)
    # acc holds the tile times 2^(-2 q): 2^q <= max |x| over the chunks seen so far (both row
    # blocks) < 2^(q + 1), q clamped to [-127, 126] (subnormal maxima; 2^-q stays normal).
    q = tl.full((), -127, tl.int32)
    for k0 in range(0, tl.where(live, K, 0), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            base + ri[:, None].to(tl.int64) * s_m + rk[None, :].to(tl.int64) * s_k,
            mask=(ri < M)[:, None] & (rk < K)[None, :],
            other=0.0,
        )
        c = tl.load(
            base + rk[:, None].to(tl.int64) * s_k + rj[None, :].to(tl.int64) * s_m,
            mask=(rk < K)[:, None] & (rj < M)[None, :],
            other=0.0,
        )
        q_new = tl.maximum(q, tl.maximum(_chunk_exponent(a), _chunk_exponent(c)))
        acc = acc * _exp2i(2 * (q - q_new))  # an exact power of two: 1 unless the max grew
        q = q_new
        inv = _exp2i(-q)
        a = scale_tile(a, inv)
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
    slot = part_ptr + b * p_sb + p * 4
    tl.store(slot, amax)
    tl.store(slot + 1, ssq)
    tl.store(slot + 2, trace)
    tl.store(slot + 3, q.to(tl.float32))
    if arrive(cnt_ptr + b, P):
        _combine(part_ptr + b * p_sb, out_ptr + b, P, BLOCK_T)


@triton.jit
def _combine(part_ptr, out_ptr, P, BLOCK_T: tl.constexpr):
    """out = ||G||_F^2 / tr(G)^2 from the P partials (a_t, s_t, trace_t, q_t) of one sample,
    in tile order, in the frame 2^(-2Q) of the largest q_t: ||G||_F^2 = sum_t a_t'^2 s_t."""
    top = tl.full((BLOCK_T,), -127, tl.int32)
    for t0 in range(0, P, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        top = tl.maximum(top, load_partial(part_ptr + rt * 4 + 3, mask=rt < P, other=-127.0).to(tl.int32))
    big = tl.max(top, axis=0)
    fro = tl.zeros((BLOCK_T,), tl.float32)
    trace = tl.zeros((BLOCK_T,), tl.float32)
    bad = tl.zeros((BLOCK_T,), tl.int32)
    for t0 in range(0, P, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        live = rt < P
        a = load_partial(part_ptr + rt * 4, mask=live, other=0.0)
        s = load_partial(part_ptr + rt * 4 + 1, mask=live, other=0.0)
        tr = load_partial(part_ptr + rt * 4 + 2, mask=live, other=0.0)
        qt = load_partial(part_ptr + rt * 4 + 3, mask=live, other=-127.0).to(tl.int32)
        f = _exp2i(2 * (qt - big))
        af = a * f
        fro += af * af * s
        trace += tr * f
        bad += ((s != s) | (a != a) | (tl.abs(a) == float("inf"))).to(tl.int32)
    f_all = tl.sum(fro, axis=0)
    tr_all = tl.sum(trace, axis=0)
    den = tl.where(tr_all > 0.0, tr_all, 1.0)
    ipr = tl.where(tr_all > 0.0, f_all / den / den, 0.0)
    finite = (tl.sum(bad, axis=0) == 0) & (tl.abs(tr_all) < float("inf")) & (tr_all == tr_all)
    tl.store(out_ptr, tl.where(finite, ipr, float("nan")))


@triton.jit
def _ritz_ipr_kernel(
    g_ptr,
    amax_ptr,
    out_ptr,
    l,
    r,
    L: tl.constexpr,
    MAX_SWEEPS: tl.constexpr,
    TOL2: tl.constexpr,
):
    """IPR of the r largest of the l Ritz values of sample b: the eigenvalues of the packed
    Gram G[b] = W^T W of W = X^T Q (Jacobi, no eigenvectors; negative rounding clamped to 0);
    NaN where x[b] has a NaN or Inf (its max |x[b]| is then NaN or Inf)."""
    b = tl.program_id(0).to(tl.int64)
    g = load_sym(g_ptr + b * (l * (l + 1) // 2), l, L)
    tl.store(out_ptr + b, ritz_ipr_tile(g, tl.load(amax_ptr + b), l, r, L, MAX_SWEEPS, TOL2))


def full_ipr(x: torch.Tensor) -> torch.Tensor:
    """x: (B, N, D) -> (B,) float32 IPR over all singular values, through the Gram matrix of
    the smaller side: one launch, x read once."""
    batch, n, d = x.shape
    if n <= d:
        m, k, s_m, s_k = n, d, x.stride(1), x.stride(2)
    else:
        m, k, s_m, s_k = d, n, x.stride(2), x.stride(1)
    nt = triton.cdiv(m, BLOCK_M)
    programs = (nt + 1) // 2 * (nt + 1)
    part = empty(batch, programs, 4, dtype=torch.float32, device=x.device)
    out = empty(batch, dtype=torch.float32, device=x.device)
    _gram_ipr_kernel[flat_grid("spectral_ipr", programs, batch)](
        x,
        part,
        counters(batch, x.device),
        out,
        m,
        k,
        x.stride(0),
        s_m,
        s_k,
        part.stride(0),
        nt,
        programs,
        BLOCK_M=BLOCK_M,
        BLOCK_K=BLOCK_K,
        BLOCK_T=COMBINE_BLOCK,
        IS_F32=x.dtype == torch.float32,
        PRECISION="ieee" if interpreted() else "tf32x3",
        num_warps=GRAM_WARPS,
    )
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


def ritz_ipr(g: torch.Tensor, amax: torch.Tensor, l: int, r: int) -> torch.Tensor:
    """The IPR of the r largest eigenvalues of the packed Gram g (B, l (l + 1) / 2) (the range
    finder's G(W)), NaN where amax (B,) is not finite: one launch, one program per sample."""
    batch = g.shape[0]
    out = empty(batch, dtype=torch.float32, device=g.device)
    _ritz_ipr_kernel[(batch,)](
        g,
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


def topr_ipr(x: torch.Tensor, r: int) -> torch.Tensor:
    """x: (B, N, D) -> (B,) float32 IPR of the r largest squared singular values, estimated
    from a sketch of width l = spectral_sketch(min(N, D), r) (r < l <= min(N, D);
    l = min(N, D) is exact up to rounding). r must fit (``sketch_fits``). The Rayleigh-Ritz
    step runs in the last pass's last programs when the sketch fits there (``fused_finish``)."""
    n, d = x.shape[1:]
    l = spectral_sketch(min(n, d), r)
    power_iters = 0 if l == min(n, d) else POWER_ITERS
    if fused_finish(l):
        *_, (ipr,) = range_finder(x, l, SKETCH_SEED, power_iters, "spectral_ipr", FINISH_IPR, r)
        return ipr
    amax, _, _, g, _ = range_finder(x, l, SKETCH_SEED, power_iters, "spectral_ipr")
    return ritz_ipr(g, amax, l, r)


def spectral_ipr(x: torch.Tensor, r: int | None) -> torch.Tensor:
    """x: (B, N, D) -> (B,) float32; r: the number of top eigenvalues kept, None for all."""
    return full_ipr(x) if r is None else topr_ipr(x, r)
