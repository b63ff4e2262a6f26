"""leverage_scores / leverage_topk: CPU kernel (torch) and CUDA kernel (Triton; on CPU via
the interpreter) against the exact float64 SVD of reference.py."""

import functools
import re

import pytest
import torch
from testing import (
    BACKENDS,
    HAS_CUDA,
    TRITON_DEVICE,
    assert_rel_close,
    assert_valid_indices,
    gapped_matrix,
    on_backend,
    same_sets,
    separated_k,
)

import tokenkern
from tokenkern import reference
from tokenkern._triton import leverage as triton_leverage
from tokenkern._triton import sketch as triton_sketch
from tokenkern.ops.leverage import leverage_scores_triton, leverage_topk_triton

SCORE_TOL = 1e-3  # the bound for float32 input on a gapped spectrum


scores_of = functools.partial(on_backend, "leverage_scores")


def topk_of(backend, x, k, **kw):
    if backend == "cpu":
        return torch.ops.tokenkern.leverage_topk(x, k, **kw)
    if HAS_CUDA:
        return tuple(t.cpu() for t in torch.ops.tokenkern.leverage_topk(x.cuda(), k, **kw))
    return leverage_topk_triton(x, k, **kw)


# (backend, B, N, D, dtype): every N in {1, 17, 576, 577}, D in {64, 384, 1024} and B in
# {1, 8} for both kernels; the full cross product runs on the (fast) CPU kernel.
TRITON_CASES = [
    (1, 577, 384, torch.float32),
    (1, 576, 1024, torch.float16),
    (8, 17, 64, torch.float32),
    (1, 577, 64, torch.float16),
    (1, 1, 384, torch.float32),
] + ([(8, 576, 1024, torch.bfloat16)] if HAS_CUDA else [])
CPU_CASES = [
    (b, n, d, dt)
    for b in (1, 8)
    for n in (1, 17, 576, 577)
    for d in (64, 384, 1024)
    for dt in (torch.float32, torch.float16)
]
CASES = [("triton", *c) for c in TRITON_CASES] + [("cpu", *c) for c in CPU_CASES]


@pytest.mark.parametrize(("backend", "b", "n", "d", "dtype"), CASES)
def test_gapped_spectrum_matches_exact_svd(backend, b, n, d, dtype, gen):
    x64, _ = gapped_matrix(b, n, d, rank=32, gen=gen)
    x = x64.to(dtype)
    exact = reference.leverage_scores(x)  # of the matrix as rounded to dtype
    k = max(1, n // 4)
    kept, idx, scores = topk_of(backend, x, k)
    r = min(32, n, d)
    assert scores.dtype == torch.float32 and scores.shape == (b, n)
    tol = SCORE_TOL if dtype != torch.bfloat16 else 1e-2
    for i in range(b):
        assert_rel_close(scores[i], exact[i], tol, f"scores of sample {i}")
        err = (scores[i].double() - exact[i]).abs().max().item()
        bound = tol * exact[i].max().item()
        assert err <= bound, f"sample {i}: max abs error {err:.2e} > {bound:.2e}"
        # The top-k set is the exact one wherever the exact scores leave room for that error.
        ks = separated_k(exact[i], 2 * bound, near=k)
        if ks is None:
            assert r == n, "a gapped spectrum with r < N should have a separated k"
            continue
        mine = reference.topk_gather(scores[i : i + 1], x[i : i + 1], ks)[1]
        assert same_sets(mine, reference.topk_gather(exact[i : i + 1], x[i : i + 1], ks)[1]), f"k={ks}"
    assert_rel_close(scores.sum(-1), torch.full((b,), float(r), dtype=torch.float64), 1e-4, "score sums")
    # The op's own selection is the selection rule applied to the scores it returns.
    assert_valid_indices(idx, n, k)
    ref_kept, ref_idx = reference.topk_gather(scores, x, k)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(kept, ref_kept)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_equals_per_sample(backend, gen):
    x = torch.randn(3, 200, 64, generator=gen)
    batched = scores_of(backend, x, rank=8, oversample=4)
    for i in range(3):
        single = scores_of(backend, x[i : i + 1], rank=8, oversample=4)
        assert torch.allclose(batched[i : i + 1], single, rtol=1e-5, atol=1e-6)


def test_widest_cuda_sketch_matches_exact_svd(gen):
    """The Triton face at the widest sketch CUDA allows (l = 120 + 8 = 128): the Jacobi solver's
    own launch and the row scores' 32-row tiles, on a gapped spectrum of rank 120."""
    x64, exact = gapped_matrix(1, 300, 200, rank=120, gen=gen)
    x = x64.float()
    scores = leverage_scores_triton(x, rank=120, oversample=8)
    assert_rel_close(scores[0], reference.leverage_scores(x, 120)[0], SCORE_TOL, "l = 128")
    assert_rel_close(scores[0], exact[0], SCORE_TOL, "l = 128, the float64 matrix")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("n", "d", "rank"), [(1, 64, 32), (17, 64, 32), (40, 12, 32), (30, 64, 30)])
def test_full_rank_range_is_exact(backend, n, d, rank, gen):
    """When r + oversample covers min(N, D) the sketch spans the whole range: exact scores."""
    x = torch.randn(2, n, d, generator=gen)
    scores = scores_of(backend, x, rank=rank)
    assert_rel_close(scores, reference.leverage_scores(x, rank), 1e-5)
    if n <= d:
        assert torch.allclose(scores, torch.ones_like(scores), atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_gives_nan_scores_and_valid_indices(backend, bad, gen):
    x = torch.randn(2, 60, 48, generator=gen)
    x[1, 7, 3] = bad
    _, idx, scores = topk_of(backend, x, 10, rank=8)
    assert torch.isnan(scores[1]).all()
    assert torch.isfinite(scores[0]).all()
    assert_valid_indices(idx, 60, 10)
    assert idx[1].tolist() == list(range(10))  # all tie at NaN (= -inf): lowest indices
    assert torch.equal(scores[0], scores_of(backend, x[:1], rank=8)[0])  # samples are independent


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_and_rank_one_inputs_stay_finite(backend, gen):
    x = torch.zeros(2, 50, 40)
    x[1] = torch.randn(50, 1, generator=gen) @ torch.randn(1, 40, generator=gen)
    _, idx, scores = topk_of(backend, x, 5, rank=8)
    assert torch.isfinite(scores).all()
    assert_valid_indices(idx, 50, 5)
    # The rank-one sample's leading direction is exact whatever completes U_r.
    u1 = torch.linalg.svd(x[1].double()).U[:, 0] ** 2
    assert bool((scores[1].double() >= u1 - 1e-4).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_per_seed(backend, gen):
    x = torch.randn(2, 120, 80, generator=gen)
    a = scores_of(backend, x, rank=8, seed=3)
    b = scores_of(backend, x, rank=8, seed=3)
    assert torch.equal(a, b)


def test_wrapper_accepts_a_single_sample(gen):
    x = torch.randn(100, 64, generator=gen)
    kept, idx, scores = tokenkern.leverage_topk(x, 10, rank=8)
    assert kept.shape == (10, 64) and idx.shape == (10,) and scores.shape == (100,)
    assert torch.equal(tokenkern.leverage_scores(x, rank=8), scores)
    with pytest.raises(ValueError, match=re.escape("x must be (N, D) or (B, N, D)")):
        tokenkern.leverage_topk(x[0], 1)
    with pytest.raises(ValueError, match=re.escape("x must be a torch.Tensor")):
        tokenkern.leverage_topk(x.tolist(), 1)


BAD_CALLS = [
    ("x must be (B, N, D)", lambda x: ((x[0], 2), {})),
    ("x must have dtype float32 or float16 or bfloat16, got int64", lambda x: ((x.long(), 2), {})),
    ("x must have dtype float32 or float16 or bfloat16, got float64", lambda x: ((x.double(), 2), {})),
    ("x must have N >= 1", lambda x: ((x[:, :0], 1), {})),
    ("k must be in [1, 10]", lambda x: ((x, 0), {})),
    ("k must be in [1, 10]", lambda x: ((x, 11), {})),
    ("rank must be >= 1", lambda x: ((x, 2), {"rank": 0})),
    ("oversample must be >= 0", lambda x: ((x, 2), {"oversample": -1})),
    ("power_iters must be >= 0", lambda x: ((x, 2), {"power_iters": -2})),
    ("seed must be in", lambda x: ((x, 2), {"seed": -1})),
]


@pytest.mark.parametrize("face", ["cpu", "triton", "fake"])
@pytest.mark.parametrize(("message", "make"), BAD_CALLS)
def test_bad_input(face, message, make):
    args, kwargs = make(torch.randn(2, 10, 8))
    if face == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True):
            call = lambda: torch.ops.tokenkern.leverage_topk(*args, **kwargs)  # noqa: E731
            with pytest.raises(ValueError, match=re.escape(message)):
                call()
        return
    fn = torch.ops.tokenkern.leverage_topk if face == "cpu" else leverage_topk_triton
    with pytest.raises(ValueError, match=re.escape(message)):
        fn(*args, **kwargs)
    if "k must" not in message:  # leverage_scores has no k
        sargs = (args[0],)
        sfn = torch.ops.tokenkern.leverage_scores if face == "cpu" else leverage_scores_triton
        with pytest.raises(ValueError, match=re.escape(message.replace("leverage_topk", "leverage_scores"))):
            sfn(*sargs, **kwargs)


def test_rank_above_min_n_d_is_clamped(gen):
    x = torch.randn(1, 20, 10, generator=gen)
    scores = torch.ops.tokenkern.leverage_scores(x, rank=500)
    assert torch.allclose(scores.sum(), torch.tensor(10.0), atol=1e-4)


# ------------------------------------------------------- the small problems of the GPU path


@pytest.mark.parametrize(("l", "r"), [(1, 1), (10, 7), (17, 17), (40, 32), (64, 32)])
def test_jacobi_top_subspace_matches_eigh(l, r, gen):
    width = max(16, 1 << (l - 1).bit_length())
    # Samples 0, 1: w = Q1 diag(sigma) Q2^T with a factor-2 drop of sigma after the r-th, so the
    # top-r subspace is separated by a known eigengap (random spectra can have gaps near zero,
    # where the projector is not determined by float32 arithmetic).
    sigma = torch.logspace(0, -2, l, dtype=torch.float64)
    sigma[r:] *= 0.5
    q1 = torch.linalg.qr(torch.randn(3, 150, l, generator=gen, dtype=torch.float64)).Q
    q2 = torch.linalg.qr(torch.randn(3, l, l, generator=gen, dtype=torch.float64)).Q
    w = torch.zeros(3, 150, width)
    w[..., :l] = (q1 * sigma) @ q2.mT
    w[2, :, : l // 2] = w[2, :, :1]  # repeated columns: a rank-deficient Gram matrix
    # A well-conditioned upper-triangular right factor t (as the range finder's T): the
    # solver works on the Gram of w t (the range finder's G(W), W = W1 T) and returns t @ vsel.
    t = torch.eye(width).repeat(3, 1, 1)
    t[:, :l, :l] += 0.1 * torch.randn(3, l, l, generator=gen).triu() / l**0.5
    w = w @ t
    g = triton_sketch.pack_symmetric(w.mT @ w, l)  # float32, as the kernels' Gram
    vt, evals = triton_leverage.top_subspace(g.to(TRITON_DEVICE), t.to(TRITON_DEVICE), l, r)
    vsel = torch.linalg.solve(t.double(), vt.cpu().double()).float()  # exact enough: cond(t) ~ 1
    vsel, evals = vsel.cpu().double(), evals.cpu().double()
    h = (w.mT @ w).double()[:, :l, :l]
    e, v = torch.linalg.eigh(h)
    assert torch.allclose(evals[:, :l].sort(-1).values, e, atol=1e-5 * e[..., -1:].abs().max())
    assert bool((vsel[:, l:, :] == 0).all()) and bool((vsel[:, :, l:] == 0).all())
    proj = vsel @ vsel.mT
    for b in range(2):  # separated spectra: the projector is unique
        ref = v[b, :, l - r :] @ v[b, :, l - r :].mT
        # Davis-Kahan: ||P - P_ref|| <= sqrt(2) eps / (gap - eps) for a symmetric perturbation
        # of norm eps; float32 Jacobi rotations have a backward error of about l u ||H||.
        eps = 2 * l * 2.0**-24 * e[b, -1].item()
        gap = e[b, l - r].item() - (e[b, l - r - 1].item() if r < l else 0.0)
        tol = 2**0.5 * eps / (gap - eps)
        assert (proj[b, :l, :l] - ref).abs().max() <= tol, ((proj[b, :l, :l] - ref).abs().max(), tol)
    # Whatever the degeneracy, vsel has r orthonormal columns.
    assert torch.allclose(vsel.mT @ vsel, torch.diag_embed((vsel.norm(dim=1) > 0.5).double()), atol=1e-5)
    assert int((vsel[2].norm(dim=0) > 0.5).sum()) == r


@pytest.mark.parametrize(("l", "m"), [(3, 300), (16, 300), (40, 300), (40, 2100)])
def test_cholesky_qr_orthonormalizes(l, m, gen):
    """orthonormalize returns Q1 and T: the basis Q1 T is orthonormal (float64 check) and
    spans y, also when y is ill-conditioned (column scales 1 .. 1e-3) or has a dependent
    column (finite, no NaN); m = 2100 splits each sample over several programs."""
    width = max(16, 1 << (l - 1).bit_length())
    y = torch.zeros(2, m, width)
    y[..., :l] = torch.randn(2, m, l, generator=gen) * torch.logspace(0, -3, l)
    y[1, :, l - 1] = y[1, :, 0]  # a dependent column must not produce NaN
    g = triton_sketch.pack_symmetric(y.mT @ y, l)
    counters = torch.zeros(2, dtype=torch.int32, device=TRITON_DEVICE)
    q1, t = triton_sketch.orthonormalize(y.to(TRITON_DEVICE), g.to(TRITON_DEVICE), l, counters, "test")
    assert triton_sketch.orth_block(m) * triton_sketch.ORTH_MAX_TILES >= m
    assert bool((counters == 0).all())  # the arrival counters are left as found
    q1, t = q1.cpu().double(), t.cpu().double()
    assert torch.isfinite(q1).all() and torch.isfinite(t).all()
    assert q1.shape == (2, m, l) and torch.equal(t[:, l:, l:], torch.eye(width - l).expand(2, -1, -1))
    assert bool((t[:, :l, l:] == 0).all()) and bool((t[:, l:, :l] == 0).all())
    q = q1 @ t[:, :l, :l]
    eye = torch.eye(l, dtype=torch.float64)
    # CholeskyQR2 in float32: ||Q^T Q - I|| ~ m u (sums of m products), far below 1e-5.
    assert torch.allclose(q[0].mT @ q[0], eye, atol=1e-5)
    # Same span as y.
    proj = q[0] @ q[0].mT
    assert torch.allclose(proj @ y[0, :, :l].double(), y[0, :, :l].double(), atol=1e-4)


@pytest.mark.parametrize(("extent", "batch", "block"), [(576, 8, 32), (1024, 8, 32), (2880, 8, 64), (2880, 1, 32),
                                                        (4096, 1, 32), (16, 1, 32), (4096, 8, 64)])  # fmt: skip
def test_pass_block_fills_the_sms(extent, batch, block):
    assert triton_sketch.pass_block(extent, batch) == block
    assert triton_sketch.pass_block(extent, batch, triton_sketch.F32_BLOCK) == triton_sketch.F32_BLOCK
    ctas = batch * -(-extent // block)
    # the largest block that reaches FILL_CTAS programs, the smallest block when none does
    assert ctas >= triton_sketch.FILL_CTAS or block == triton_sketch.PASS_MIN_BLOCK
    assert block == triton_sketch.PASS_MAX_BLOCK or batch * -(-extent // (2 * block)) < triton_sketch.FILL_CTAS


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pass_blocks_give_the_same_bits(dtype, gen):
    """The output-tile block of the passes over x (chosen from the shape) splits the outputs,
    never the sums: every block gives the same bits, and they are X / 2^e times the operand
    (its l first columns stored: (B, M, l))."""
    b, n, d, width, l = 2, 77, 100, 16, 12
    x = (torch.randn(b, n, d, generator=gen) * 3).to(dtype)
    z = torch.randn(b, d, width, generator=gen)
    q = torch.randn(b, n, width, generator=gen)
    outs = []
    for block in (64, 32, 16):
        passes = triton_sketch.ScaledPasses(x.to(TRITON_DEVICE), l, "leverage_scores", out_block=block)
        assert (passes.block_n, passes.block_d) == (block, block)
        outs.append([t[0].cpu() for t in (passes.x_mm(z.to(TRITON_DEVICE)), passes.x_mm(z[0].to(TRITON_DEVICE)),
                                          passes.xt_mm(q.to(TRITON_DEVICE)))])  # fmt: skip
    if HAS_CUDA:  # the interpreter's tl.dot is numpy's, whose summation order may follow the shape
        for other in outs[1:]:
            for mine, first in zip(other, outs[0], strict=True):
                assert torch.equal(mine, first)
    # 2^-e brings max |x[b]| into [1, 2); the float32 operand is exact (float32 x) or split
    # into hi + lo halves (2^-22 relative), summed in float32 over d <= 100 terms (d 2^-24).
    scale = torch.exp2(-torch.floor(torch.log2(x.double().abs().amax(dim=(1, 2)))))[:, None, None]
    xs = x.double() * scale
    tol = 2.0**-22 + d * 2.0**-24
    for block, (y, y_shared, w) in zip((64, 32, 16), outs, strict=True):
        assert y.shape == y_shared.shape == (b, n, l) and w.shape == (b, d, l)
        assert_rel_close(y, (xs @ z.double())[..., :l], tol, f"x_mm, block {block}")
        assert_rel_close(y_shared, (xs @ z[0].double())[..., :l], tol, f"x_mm, shared operand, block {block}")
        assert_rel_close(w, (xs.mT @ q.double())[..., :l], 2.0**-22 + n * 2.0**-24, f"xt_mm, block {block}")
