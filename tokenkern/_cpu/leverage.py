"""CPU path of the leverage-score ops: the randomized SVD of the Triton path, in torch.

x (B, N, D) is read only by the ``2 * power_iters + 2`` products with the thin bases (torch.bmm
in float32, a 16-bit x cast once; at::bmm is deterministic for a fixed thread count, and with
one thread a sample's products do not depend on the batch around it). The bases are held as rows,
(B, l, M), the layout in which both products run at full GEMM speed. Each basis is rebuilt by
one CholeskyQR pass checked by its own Gram matrix (``well_conditioned_rows``), with
Householder QR for the samples where a float32 Gram is too inaccurate; the second CholeskyQR
pass of the final basis is folded into the l x l Rayleigh-Ritz problem.

x is not rescaled up front: multiplying by a power of two is exact, so an x in a moderate range
gives the scores of the scaled x. A sample whose final Gram matrix is not finite (NaN or Inf in
x, or an overflow) or so small that float32 may have underflowed is recomputed from x scaled by
the power of two that brings max |x| into [1, 2); NaN/Inf samples get NaN scores.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# A basis whose Gram matrix is within this Frobenius distance of the identity has condition
# number <= sqrt(3): products with it lose no more than an orthonormal basis would, and one more
# CholeskyQR pass (folded into the small factors) orthonormalizes it to float32 rounding.
_GRAM_TOL = 0.5


def pow2_inverse(x: Tensor) -> Tensor:
    """x: (B, N, D) finite -> (B,) the power of two 2^-e that brings max |x[b]| into [1, 2)
    (clamped to [2^-126, 2^127]). Leverage scores are scale-invariant and multiplying by a
    power of two is exact, so float32 sums of squares never overflow or underflow."""
    _, e = torch.frexp(x.abs().amax(dim=(1, 2)))  # max |x[b]| = m 2^e, m in [0.5, 1)
    return torch.ldexp(torch.ones(x.shape[0], dtype=x.dtype, device=x.device), (1 - e).clamp(-126, 127))


def sketch(d: int, l: int, seed: int) -> Tensor:
    """The Gaussian sketch: (D, l) float32 drawn from seed by the CPU generator."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(d, l, generator=gen, dtype=torch.float32)


def gram_floor(n: int, d: int) -> float:
    """The smallest trace of the final l x l Gram matrix of an (n, d) sample computed from x as
    it is. tr(G) <= ||x||_F^2 <= n d max|x|^2, so above it max|x| >= 2^-38: every float32
    quantity that matters in the scaled computation stays a normal number (Gram entries down
    to 2^-50 of the scaled Gram, far below its rounding)."""
    return n * d * math.ldexp(1.0, -76)


def _gram(at: Tensor) -> Tensor:
    """at: (B, l, M) -> (B, l, l) = at at^T."""
    return torch.bmm(at, at.mT)


def _cholesky_inverse_factor(gram: Tensor) -> tuple[Tensor, Tensor]:
    """gram: (B, l, l) float32 -> (L^-1 (B, l, l) float32, ok (B,) bool) with gram = L L^T,
    factored in float64."""
    low, info = torch.linalg.cholesky_ex(gram.double())
    eye = torch.eye(gram.shape[-1], dtype=torch.float64).expand_as(low)
    return torch.linalg.solve_triangular(low, eye, upper=False).float(), info == 0


def well_conditioned_rows(at: Tensor) -> tuple[Tensor, Tensor]:
    """at: (B, l, M) float32, l <= M -> (q (B, l, M), g (B, l, l)): rows spanning those of at
    with Gram g = q q^T within _GRAM_TOL of the identity (cond(q) <= sqrt(3)).

    One CholeskyQR pass (q = L^-1 at, at at^T = L L^T) whose result is checked by its own
    Gram matrix, the first half of CholeskyQR2: the second half, L2^-1 with g = L2 L2^T, is
    applied to the small factors by the caller (``_scores``), or not at all for the bases the
    power iterations only multiply by x. The span is that of at to float32 rounding (as
    Householder's: eps * cond(at)). A sample whose Cholesky breaks down or whose q is too far
    from orthonormal (at too ill-conditioned for a float32 Gram) gets Householder QR (g = I)."""
    l = at.shape[1]
    eye = torch.eye(l, dtype=at.dtype)
    inv, ok = _cholesky_inverse_factor(_gram(at))
    q = torch.bmm(inv, at)
    g = _gram(q)
    bad = ~(ok & (torch.linalg.matrix_norm(g - eye) <= _GRAM_TOL))  # NaN compares False: bad
    if bool(bad.any()):
        idx = bad.nonzero().flatten()
        q[idx] = torch.linalg.qr(at[idx].mT).Q.mT
        g[idx] = eye
    return q, g


def _range_rows(xf: Tensor, omega: Tensor, power_iters: int) -> tuple[Tensor, Tensor]:
    """xf: (B, N, D) float32, omega: (D, l) -> well_conditioned_rows of the range of
    (x x^T)^power_iters x omega: (q (B, l, N), g (B, l, l)), the basis rebuilt after every
    product with x or x^T."""
    b = xf.shape[0]
    # A batched product per sample: with one thread, a sample's result is that of its own call.
    rows = omega.mT.contiguous().expand(b, -1, -1)  # (B, l, D): the faster operand layout
    qt, g = well_conditioned_rows(torch.bmm(xf, rows.mT).mT)
    for _ in range(power_iters):
        zt, _ = well_conditioned_rows(torch.bmm(qt, xf))  # (B, l, D): rows of Q^T x
        qt, g = well_conditioned_rows(torch.bmm(xf, zt.mT).mT)  # (B, l, N): rows of (x Z)^T
    return qt, g


def _scores(xf: Tensor, omega: Tensor, r: int, power_iters: int) -> tuple[Tensor, Tensor]:
    """xf: (B, N, D) float32 -> (scores (B, N) float32, ok (B,) bool): the top-r leverage
    scores of the Rayleigh-Ritz step on the range basis; ok is False where the Gram matrix of
    Q^T x is not finite or below gram_floor (those scores are meaningless).

    With the basis q (rows, Gram g = L L^T) the orthonormal basis is L^-1 q, so the Ritz
    problem is eigh(L^-1 (q x)(q x)^T L^-T) and U_r^T = V_r^T L^-1 q."""
    _, n, d = xf.shape
    qt, g = _range_rows(xf, omega, power_iters)
    l = qt.shape[1]
    eye = torch.eye(l, dtype=torch.float32)
    inv, _ = _cholesky_inverse_factor(g)  # g is within _GRAM_TOL of I: the factor exists
    wt = torch.bmm(qt, xf)  # (B, l, D)
    gram = _gram(wt)
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    ok = torch.isfinite(gram).flatten(1).all(dim=1) & torch.isfinite(trace) & (trace >= gram_floor(n, d))
    if r < l:
        inv64 = inv.double()
        ritz = inv64 @ torch.where(ok[:, None, None], gram, eye).double() @ inv64.mT
        vecs = torch.linalg.eigh(ritz).eigenvectors[..., l - r :]  # (B, l, r)
        inv = (vecs.mT @ inv64).float()  # (B, r, l)
    ut = torch.bmm(inv, qt)  # (B, r, N) = U_r^T
    return (ut * ut).sum(1), ok


def _scaled_scores(xf: Tensor, omega: Tensor, r: int, power_iters: int) -> Tensor:
    """xf: (B, N, D) float32 -> (B, N): scores of x scaled by pow2_inverse (NaN/Inf samples:
    NaN)."""
    finite = torch.isfinite(xf).flatten(1).all(dim=1)
    xs = torch.where(finite[:, None, None], xf, 0.0)
    scores, _ = _scores(xs * pow2_inverse(xs)[:, None, None], omega, r, power_iters)
    return torch.where(finite[:, None], scores, float("nan"))


def leverage_scores(x: Tensor, r: int, l: int, power_iters: int, seed: int) -> Tensor:
    """x: (B, N, D) -> (B, N) float32. A sample whose x has a NaN or Inf gets NaN scores."""
    xf = x.float()
    omega = sketch(x.shape[2], l, seed).to(x.device)
    scores, ok = _scores(xf, omega, r, power_iters)
    if not bool(ok.all()):
        idx = (~ok).nonzero().flatten()
        scores[idx] = _scaled_scores(xf[idx], omega, r, power_iters)
    return scores
