"""spectral_ipr (CPU kernel, and the CUDA kernel, which runs on CPU tensors through the Triton
interpreter when there is no GPU) against the float64 SVD of reference.py; the consistency
metrics of tokenkern.metrics against direct float64 computations."""

import functools
import math
import re

import pytest
import torch
from testing import BACKENDS, HAS_CUDA, assert_rel_close, on_backend

import tokenkern
from tokenkern import metrics, reference
from tokenkern.ops.spectral import spectral_ipr_triton

# ------------------------------------------------------------------------------ spectral_ipr


@pytest.fixture(autouse=True, scope="module")
def _one_lapack_thread():
    """The float64 oracles (svdvals, eigvalsh) are small: one thread. With two, MKL's OpenMP
    barriers can stall for seconds per call on a machine whose cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# All singular values: ||G||_F^2 / tr(G)^2 with G accumulated in float32 over <= 1024 products
# (exact for 16-bit x): each entry carries ~sqrt(K) * 2^-24 ~ 2e-6 relative rounding, the ratio
# about twice that. The CPU kernel works in float64; its error is the float32 output rounding.
FULL_TOL = {"cpu": 1e-6, "triton": 1e-5}
# Top r on CUDA when the sketch spans all min(N, D) directions (min(N, D) <= 128): exact up to
# float32 rounding of CholeskyQR2 + Jacobi.
SPAN_TOL = 1e-5
# Top r on CUDA with min(N, D) > 128 on a flat (Gaussian) spectrum, the worst case for the range
# finder: documented bound for rank <= 64 (measured ~2e-4 at rank 8).
FLAT_TOL = 1e-3


ipr_of = functools.partial(on_backend, "spectral_ipr")


def check_ipr(out, x, rank, tol):
    ref = reference.spectral_ipr(x, rank)  # of x as rounded to its dtype
    assert out.dtype == torch.float32 and out.shape == (x.shape[0],)
    for i in range(x.shape[0]):
        assert_rel_close(out[i], ref[i], tol, f"IPR of sample {i} (rank {rank})")


# (B, N, D, dtype): N in {1, 17, 256, 577}, D in {1, 64, 384, 1024}, B in {1, 8} for both kernels.
FULL_TRITON = [
    (8, 17, 64, torch.float32),
    (1, 577, 384, torch.float16),
    (1, 256, 1024, torch.float32),
    (8, 256, 1, torch.float16),
    (1, 1, 384, torch.float32),
    (1, 577, 64, torch.float32),
] + ([(8, 577, 1024, torch.bfloat16), (8, 577, 1024, torch.float32)] if HAS_CUDA else [])
FULL_CPU = [(b, n, d, torch.float32) for b in (1,) for n in (1, 17, 256, 577) for d in (1, 64, 384, 1024)] + [
    (8, 256, 384, torch.float16),
    (8, 17, 1024, torch.float32),
]


@pytest.mark.parametrize(
    ("backend", "b", "n", "d", "dtype"), [("triton", *c) for c in FULL_TRITON] + [("cpu", *c) for c in FULL_CPU]
)
def test_all_singular_values_match_svd(backend, b, n, d, dtype, gen):
    x = torch.randn(b, n, d, generator=gen) * torch.exp(torch.randn(b, 1, d, generator=gen))
    x = x.to(dtype)
    check_ipr(ipr_of(backend, x), x, -1, FULL_TOL[backend] if dtype != torch.bfloat16 else 2e-5)


# All singular values at extreme scales. Each Gram tile scales x by the power of two of the
# running max |x| of its two row blocks (exact), so x * 2^e is computed as x is and the error
# is FULL_TOL's: float32 rounding of sums of <= 200 products here. A subnormal or 16-bit x is
# compared with the reference of x as rounded to its dtype (scaling it is exact too).
def _sides(b: int, m: int, k: int, tall: bool, gen: torch.Generator) -> torch.Tensor:
    """(B, M, K) float64 (M <= K: the Gram matrix is M x M) with rows of random scale; as
    (B, K, M) when tall (N > D: G = x^T x, its rows are the features)."""
    x = torch.randn(b, m, k, generator=gen, dtype=torch.float64) * torch.exp(torch.randn(b, m, 1, generator=gen))
    return x.mT if tall else x


EXTREME = [(e, torch.float32) for e in (-140, -126, -100, -60, 60, 100, 125)] + [
    (e, torch.float16) for e in (-22, -16, 12, 14)
]
if HAS_CUDA:
    EXTREME += [(e, torch.bfloat16) for e in (-130, -100, 100, 125)]


@pytest.mark.parametrize("tall", [False, True])
@pytest.mark.parametrize(("e", "dtype"), EXTREME)
def test_all_singular_values_at_extreme_scales(e, dtype, tall, gen):
    """max |x| = 2^e (x * 2^-140 is all subnormal float32, x * 2^-22 all subnormal float16)."""
    x64 = _sides(2, 150, 200, tall, gen)
    x = (x64 / x64.abs().amax(dim=(1, 2), keepdim=True) * 2.0**e).to(dtype)
    tol = FULL_TOL["triton"] if dtype != torch.bfloat16 else 2e-5
    check_ipr(ipr_of("triton", x), x, -1, tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tall", [False, True])
@pytest.mark.parametrize("gap", [10, 60, 200])
def test_row_blocks_of_wildly_different_size(backend, gap, tall, gen):
    """Rows 0..63 (one tile row of the Gram matrix) 2^gap times larger than the rest; at
    gap = 10 both matter, at 200 the small block is ~2^-400 of the energy (float32 range)."""
    x64 = _sides(2, 150, 200, False, gen)
    x64 = x64 / x64.abs().amax(dim=(1, 2), keepdim=True)
    x64[:, :64] *= 2.0 ** min(gap, 100)
    x64[:, 64:] *= 2.0 ** (min(gap, 100) - gap)
    x = (x64.mT if tall else x64).float()
    check_ipr(ipr_of(backend, x), x, -1, FULL_TOL[backend])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tall", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_in_one_sample_of_many_tiles(backend, bad, tall, gen):
    """min(N, D) = 150: 3 x 3 Gram tiles; the bad entry is in the last tile row of sample 1."""
    x = _sides(3, 150, 200, tall, gen).float()
    (x[1].mT if tall else x[1])[140, 3] = bad
    out = ipr_of(backend, x)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
    check_ipr(out[[0, 2]], x[[0, 2]], -1, FULL_TOL[backend])


# (backend, B, N, D, rank, dtype, tol): ranks 1, 8, 32; the sketch spanning min(N, D) and not.
TOP_CASES = [
    ("triton", 2, 17, 1024, 8, torch.float16, SPAN_TOL),
    ("triton", 1, 577, 64, 32, torch.float32, SPAN_TOL),
    ("triton", 1, 17, 64, 1, torch.float32, SPAN_TOL),
    ("triton", 1, 256, 384, 8, torch.float32, FLAT_TOL),
] + [
    ("cpu", b, n, d, rank, dt, 1e-6)
    for (b, n, d) in ((1, 577, 1024), (8, 256, 384), (8, 17, 64), (1, 577, 384))
    for rank in (1, 8, 32)
    for dt in (torch.float32, torch.float16)
]
if HAS_CUDA:
    TOP_CASES += [
        ("triton", 8, 577, 1024, rank, dt, FLAT_TOL)
        for rank in (8, 32, 64)
        for dt in (torch.float32, torch.float16, torch.bfloat16)
    ]


@pytest.mark.parametrize(("backend", "b", "n", "d", "rank", "dtype", "tol"), TOP_CASES)
def test_top_rank_matches_svd(backend, b, n, d, rank, dtype, tol, gen):
    x = torch.randn(b, n, d, generator=gen).to(dtype)  # flat spectrum: the range finder's worst case
    check_ipr(ipr_of(backend, x, rank), x, rank, tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_known_spectrum(backend, gen):
    """x = U diag(s) V^T with s^2 = (4, 1, 1, 0, ...): IPR = 18/36 over all, 17/25 over the top 2,
    1 over the top 1; checked against the numbers, not against reference.py."""
    u = torch.linalg.qr(torch.randn(2, 40, 3, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(2, 12, 3, generator=gen, dtype=torch.float64)).Q
    x = ((u * torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)) @ v.mT).float()
    for rank, want in ((-1, 0.5), (2, 17 / 25), (1, 1.0), (3, 0.5), (50, 0.5)):
        out = ipr_of(backend, x, rank)
        assert torch.allclose(out.double(), torch.full((2,), want, dtype=torch.float64), rtol=1e-5, atol=0), (rank, out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_inputs(backend, gen):
    zero = torch.zeros(2, 30, 12)
    for rank in (-1, 4):
        assert torch.equal(ipr_of(backend, zero, rank), torch.zeros(2)), f"zero matrix, rank {rank}"
    # One token or one feature: a single singular value, IPR 1 whatever the rank.
    for x in (torch.randn(3, 1, 64, generator=gen), torch.randn(3, 50, 1, generator=gen)):
        for rank in (-1, 1, 5):
            assert torch.allclose(ipr_of(backend, x, rank), torch.ones(3), rtol=0, atol=1e-6)
    # Rank one: all the energy in one direction.
    x = torch.randn(2, 40, 1, generator=gen) @ torch.randn(2, 1, 14, generator=gen)
    for rank in (-1, 1, 8):
        assert torch.allclose(ipr_of(backend, x, rank), torch.ones(2), rtol=0, atol=1e-5)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("bad", "rank"), [(NAN, -1), (INF, -1), (-INF, -1), (NAN, 4), (-INF, 4)])
def test_non_finite_sample_gets_nan(backend, bad, rank, gen):
    x = torch.randn(2, 20, 12, generator=gen)
    x[1, 5, 7] = bad
    out = ipr_of(backend, x, rank)
    assert torch.isnan(out[1]) and torch.isfinite(out[0])
    assert torch.equal(out[:1], ipr_of(backend, x[:1], rank))  # samples are independent


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank", [-1, 4])
def test_batch_equals_per_sample_and_deterministic(backend, rank, gen):
    x = torch.randn(2, 20, 12, generator=gen)
    batched = ipr_of(backend, x, rank)
    for i in range(2):  # bit for bit: also shows that a repeated call gives the same bits
        assert torch.equal(batched[i : i + 1], ipr_of(backend, x[i : i + 1], rank))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_and_layout(backend, gen):
    x = torch.randn(2, 70, 24, generator=gen)
    ref = ipr_of(backend, x)
    # Powers of two scale every product exactly: ||G||_F^2 (~1e71 here) must not overflow while
    # tr(G) = ||x||_F^2 (~1e37) fits float32, nor anything underflow at the bottom (~1e-45).
    for e in (56, -40):
        assert torch.equal(ipr_of(backend, x * 2.0**e), ref), e
    xs = x[:1, :, :12]
    top = ipr_of(backend, xs, 4)
    for e in (20, -20):
        assert_rel_close(ipr_of(backend, xs * 2.0**e, 4), top, 1e-6, f"top 4, x * 2^{e}")
    # Strided x (the side of G is picked from the shape, the strides are followed).
    xt = torch.randn(2, 24, 70, generator=gen).transpose(1, 2)
    assert_rel_close(ipr_of(backend, xt), ipr_of(backend, xt.contiguous()), 1e-6)
    # rank >= min(N, D) is all of them.
    assert torch.equal(ipr_of(backend, x, 24), ref)
    assert torch.equal(ipr_of(backend, x, 25), ref)


def test_wrapper_accepts_a_single_sample(gen):
    x = torch.randn(30, 20, generator=gen)
    out = tokenkern.spectral_ipr(x, rank=5)
    assert out.shape == () and out == tokenkern.spectral_ipr(x[None], rank=5)[0]
    with pytest.raises(ValueError, match=re.escape("x must be (N, D) or (B, N, D)")):
        tokenkern.spectral_ipr(x[0])


BAD_CALLS = [
    ("x must be (B, N, D)", lambda x: ((x[0],), {})),
    ("x must have dtype float32 or float16 or bfloat16, got int64", lambda x: ((x.long(),), {})),
    ("x must have dtype float32 or float16 or bfloat16, got float64", lambda x: ((x.double(),), {})),
    ("x must have N >= 1 tokens and D >= 1 features", lambda x: ((x[:, :0],), {})),
    ("x must have N >= 1 tokens and D >= 1 features", lambda x: ((x[:, :, :0],), {})),
    ("rank must be -1 (all singular values) or >= 1, got 0", lambda x: ((x,), {"rank": 0})),
    ("rank must be -1 (all singular values) or >= 1, got -2", lambda x: ((x,), {"rank": -2})),
]


@pytest.mark.parametrize("face", ["cpu", "triton", "fake"])
@pytest.mark.parametrize(("message", "make"), BAD_CALLS)
def test_bad_input(face, message, make):
    args, kwargs = make(torch.randn(2, 10, 8))
    fn = {"cpu": torch.ops.tokenkern.spectral_ipr, "triton": spectral_ipr_triton}.get(face)
    if face == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(ValueError, match=re.escape(message)):
            torch.ops.tokenkern.spectral_ipr(*args, **kwargs)
        return
    with pytest.raises(ValueError, match=re.escape("tokenkern.spectral_ipr: " + message)):
        fn(*args, **kwargs)


def test_cuda_sketch_limit(gen):
    """min(N, D) > 128 and rank > 112 does not fit the CUDA kernel's 128-column sketch: the CUDA
    kernel and the fake kernel of a CUDA tensor refuse it; the CPU kernel computes it."""
    x = torch.randn(1, 200, 150, generator=gen)
    message = "rank=120 with min(N, D)=150 does not fit the CUDA kernel's sketch"
    with pytest.raises(ValueError, match=re.escape(message)):
        spectral_ipr_triton(x, 120)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = torch.empty(1, 200, 150, device="cuda")
        with pytest.raises(ValueError, match=re.escape(message)):
            torch.ops.tokenkern.spectral_ipr(fake, 120)
        assert torch.ops.tokenkern.spectral_ipr(fake, 112).shape == (1,)
    check_ipr(torch.ops.tokenkern.spectral_ipr(x, 120), x, 120, 1e-6)


# --------------------------------------------------------------------------- logits metrics


def softmax64(logits):
    z = logits.double()
    e = torch.exp(z - z.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def direct_kl(lf, lp):
    """sum over p > 0 of p log(p / q), float64, from explicitly normalized probabilities."""
    p, q = softmax64(lf), softmax64(lp)
    return torch.where(p > 0, p * torch.log(p / q), 0.0).sum(-1)


def direct_js(lf, lp):
    p, q = softmax64(lf), softmax64(lp)
    m = (p + q) / 2
    kl = lambda a: torch.where(a > 0, a * torch.log(a / m), 0.0).sum(-1)  # noqa: E731
    return (kl(p) + kl(q)) / 2


def first_argmax(logits):
    """Top-1 class by a plain scan: the first index of the maximum."""
    rows = logits.reshape(-1, logits.shape[-1]).tolist()
    return torch.tensor([max(range(len(r)), key=lambda c, r=r: (r[c], -c)) for r in rows]).reshape(logits.shape[:-1])


def logit_pair(gen, shape, noise, dtype=torch.float32):
    lf = torch.randn(*shape, generator=gen) * 3
    lp = lf + noise * torch.randn(*shape, generator=gen)
    return lf.to(dtype), lp.to(dtype)


def test_top1_and_flip_rate_match_direct(gen):
    lf, lp = logit_pair(gen, (4, 9, 6), 1.5)
    same = (first_argmax(lf) == first_argmax(lp)).double()
    assert 0 < same.mean() < 1, "the case should have both agreements and flips"
    assert torch.equal(metrics.top1_agreement(lf, lp, reduction="none"), same)
    assert metrics.top1_agreement(lf, lp).item() == same.mean().item()
    assert torch.equal(metrics.flip_rate(lf, lp, reduction="none"), 1 - same)
    # Ties go to the lower index.
    tie_f, tie_p = torch.tensor([[1.0, 3.0, 3.0]]), torch.tensor([[3.0, 3.0, 1.0]])
    assert metrics.top1_agreement(tie_f, tie_p).item() == 0.0
    assert metrics.top1_agreement(tie_f, tie_f.flip(-1).flip(-1)).item() == 1.0
    # With labels: the correctness flips.
    labels = torch.randint(0, 6, (4, 9), generator=gen)
    right_f, right_p = first_argmax(lf) == labels, first_argmax(lp) == labels
    want = (right_f != right_p).double()
    assert torch.equal(metrics.flip_rate(lf, lp, labels, reduction="none"), want)
    assert metrics.flip_rate(lf, lp, labels).item() == pytest.approx(want.mean().item(), abs=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("noise", [1.0, 1e-2])
def test_kl_and_js_match_float64_direct(dtype, noise, gen):
    lf, lp = logit_pair(gen, (3, 5, 400), noise, dtype)
    kl = metrics.kl_divergence(lf, lp, reduction="none")
    js = metrics.js_divergence(lf, lp, reduction="none")
    assert kl.dtype == js.dtype == torch.float64 and kl.shape == (3, 5)
    # Computed in float64 from the (exactly upcast) inputs: agreement to ~1e-12 relative.
    assert_rel_close(kl, direct_kl(lf, lp), 1e-10, "KL")
    assert_rel_close(js, direct_js(lf, lp), 1e-10, "JS")
    assert metrics.kl_divergence(lf, lp).item() == pytest.approx(direct_kl(lf, lp).mean().item(), rel=1e-10)
    assert metrics.js_divergence(lf, lp).item() == pytest.approx(direct_js(lf, lp).mean().item(), rel=1e-10)


def test_tiny_divergences_are_resolved(gen):
    """Near-identical fp16-sized logits: KL ~ 1e-9 must still be right to 1e-6 relative (a
    float32 computation would be off by ~1e-7 absolute, i.e. entirely wrong)."""
    lf = torch.randn(4, 1000, generator=gen, dtype=torch.float64) * 4
    lp = lf + 1e-4 * torch.randn(4, 1000, generator=gen, dtype=torch.float64)
    kl = metrics.kl_divergence(lf, lp, reduction="none")
    assert bool((kl < 1e-7).all()) and bool((kl > 0).all())
    assert_rel_close(kl, direct_kl(lf, lp), 1e-6, "tiny KL")
    assert_rel_close(metrics.js_divergence(lf, lp, reduction="none"), direct_js(lf, lp), 1e-6, "tiny JS")


def test_properties(gen):
    lf, lp = logit_pair(gen, (6, 7, 30), 2.0)
    # Identical runs.
    assert metrics.top1_agreement(lf, lf).item() == 1.0
    assert metrics.flip_rate(lf, lf).item() == 0.0
    assert metrics.kl_divergence(lf, lf).item() == 0.0
    assert metrics.js_divergence(lf, lf).item() == 0.0
    emb = torch.randn(6, 7, 16, generator=gen)
    assert metrics.embedding_cosine(emb, emb).item() == pytest.approx(1.0, abs=1e-12)
    tokens = torch.randn(2, 40, 16, generator=gen)
    assert torch.equal(metrics.ipr_change(tokens, tokens, reduction="none"), torch.zeros(2))
    # JS is symmetric and in [0, ln 2]; KL >= 0, also at large logit scales.
    for scale in (1.0, 30.0):
        a, b = lf * scale, lp * scale
        js_ab = metrics.js_divergence(a, b, reduction="none")
        assert torch.equal(js_ab, metrics.js_divergence(b, a, reduction="none"))
        assert bool((js_ab >= 0).all()) and bool((js_ab <= math.log(2)).all())
        assert bool((metrics.kl_divergence(a, b, reduction="none") >= 0).all())
    # Disjoint supports: JS reaches ln 2, KL is infinite.
    neg = float("-inf")
    p = torch.tensor([[0.0, 1.0, neg, neg]])
    q = torch.tensor([[neg, neg, 2.0, 0.0]])
    assert metrics.js_divergence(p, q).item() == pytest.approx(math.log(2), rel=1e-12)
    assert metrics.kl_divergence(p, q).item() == float("inf")


def test_masked_classes(gen):
    """-inf logits are classes with probability 0: they add nothing, unless only the reduced
    run gives them zero mass (KL = inf); JS stays finite."""
    lf = torch.randn(3, 12, generator=gen)
    lp = lf + 0.5 * torch.randn(3, 12, generator=gen)
    lf[:, :3] = float("-inf")  # P has no mass there, Q does: finite
    kl = metrics.kl_divergence(lf, lp, reduction="none")
    assert torch.isfinite(kl).all()
    assert_rel_close(kl, direct_kl(lf, lp), 1e-10)
    assert_rel_close(metrics.js_divergence(lf, lp, reduction="none"), direct_js(lf, lp), 1e-10)
    lp[1, 5] = float("-inf")  # Q has no mass where P has some
    kl = metrics.kl_divergence(lf, lp, reduction="none")
    assert kl[1].item() == float("inf") and torch.isfinite(kl[[0, 2]]).all()
    assert torch.isfinite(metrics.js_divergence(lf, lp, reduction="none")).all()


def test_masks_reductions_and_bad_rows(gen):
    lf, lp = logit_pair(gen, (2, 6, 10), 1.0)
    mask = torch.rand(2, 6, generator=gen) > 0.4
    mask[0, 0] = True
    for f in (metrics.top1_agreement, metrics.flip_rate, metrics.kl_divergence, metrics.js_divergence):
        per = f(lf, lp, reduction="none")
        assert f(lf, lp, mask=mask).item() == pytest.approx(per[mask].mean().item(), rel=1e-12)
        masked = f(lf, lp, mask=mask, reduction="none")
        assert torch.isnan(masked[~mask]).all() and torch.equal(masked[mask], per[mask])
        assert torch.isnan(f(lf, lp, mask=torch.zeros_like(mask)))  # nothing counted
    # A row without a distribution: NaN there, and in a mean that counts it.
    bad = lf.clone()
    bad[1, 2, 4] = float("nan")
    bad[0, 3] = float("-inf")
    for f in (metrics.top1_agreement, metrics.flip_rate, metrics.kl_divergence, metrics.js_divergence):
        per = f(bad, lp, reduction="none")
        assert torch.isnan(per[1, 2]) and torch.isnan(per[0, 3])
        assert int(torch.isnan(per).sum()) == 2
        assert torch.isnan(f(lp, bad))
        assert torch.isnan(f(lp, bad, mask=torch.ones(2, 6, dtype=torch.bool)))
        keep = torch.ones(2, 6, dtype=torch.bool)
        keep[1, 2] = keep[0, 3] = False
        assert torch.isfinite(f(bad, lp, mask=keep))


def test_embedding_cosine(gen):
    a = torch.randn(3, 5, 16, generator=gen)
    b = a + torch.randn(3, 5, 16, generator=gen)
    ad, bd = a.double(), b.double()
    want = (ad * bd).sum(-1) / (ad.norm(dim=-1) * bd.norm(dim=-1))
    got = metrics.embedding_cosine(a, b, reduction="none")
    assert_rel_close(got, want, 1e-12)
    assert metrics.embedding_cosine(a, b).item() == pytest.approx(want.mean().item(), rel=1e-12)
    assert metrics.embedding_cosine(a, -a).item() == pytest.approx(-1.0, abs=1e-12)
    # No overflow or underflow of the norms.
    big = torch.randn(4, 8, dtype=torch.float64, generator=gen)
    other = torch.randn(4, 8, dtype=torch.float64, generator=gen)
    ref = metrics.embedding_cosine(big, other, reduction="none")
    for s in (1e200, 1e-200):
        assert_rel_close(metrics.embedding_cosine(big * s, other * s, reduction="none"), ref, 1e-12)
    z = torch.zeros(2, 8)
    one = torch.ones(2, 8)
    assert torch.equal(metrics.embedding_cosine(z, z, reduction="none"), torch.ones(2, dtype=torch.float64))
    assert torch.equal(metrics.embedding_cosine(z, one, reduction="none"), torch.zeros(2, dtype=torch.float64))
    one[1, 0] = float("inf")
    assert torch.isnan(metrics.embedding_cosine(one, one, reduction="none")[1])


def test_ipr_change_matches_reference(gen):
    full = torch.randn(3, 40, 16, generator=gen) * torch.exp(torch.randn(3, 1, 16, generator=gen))
    keep = torch.randperm(40, generator=gen)[:12]
    pruned = full[:, keep]
    want = reference.spectral_ipr(pruned) - reference.spectral_ipr(full)
    got = metrics.ipr_change(full, pruned, reduction="none")
    assert got.shape == (3,) and torch.allclose(got.double(), want, rtol=0, atol=1e-6)
    assert metrics.ipr_change(full, pruned).item() == pytest.approx(want.mean().item(), abs=1e-6)
    want8 = reference.spectral_ipr(pruned, 8) - reference.spectral_ipr(full, 8)
    assert torch.allclose(metrics.ipr_change(full, pruned, rank=8, reduction="none").double(), want8, atol=1e-6)
    # Single samples, float64 tokens, and padded rows masked out (zero rows: same spectrum).
    assert metrics.ipr_change(full[0].double(), pruned[0]).item() == pytest.approx(want[0].item(), abs=1e-6)
    padded = torch.cat([pruned, torch.randn(3, 5, 16, generator=gen)], dim=1)
    mask = torch.ones(3, 17, dtype=torch.bool)
    mask[:, 12:] = False
    got_masked = metrics.ipr_change(full, padded, mask_pruned=mask, reduction="none")
    assert torch.allclose(got_masked.double(), want, atol=1e-6)


_Z = torch.zeros(2, 3)
_T = torch.zeros(2, 5, 4)
METRIC_BAD_CALLS = [
    (metrics.kl_divergence, (_Z, torch.zeros(2, 4)), {}, "must have the same shape"),
    (metrics.kl_divergence, (_Z.long(), _Z), {}, "logits_full must be a floating tensor"),
    (metrics.js_divergence, ([0.0, 1.0], torch.zeros(2)), {}, "logits_full must be a torch.Tensor"),
    (metrics.top1_agreement, (_Z, _Z), {"mask": torch.ones(3).bool()}, "mask must have the positions' shape (2,)"),
    (metrics.top1_agreement, (_Z, _Z), {"mask": torch.ones(2)}, "mask must be a bool tensor, got float32"),
    (metrics.flip_rate, (_Z, _Z), {"labels": torch.zeros(2)}, "labels must be an int64 or int32 tensor"),
    (metrics.flip_rate, (_Z, _Z), {"labels": torch.zeros(3).long()}, "labels must have the positions' shape (2,)"),
    (metrics.kl_divergence, (_Z, _Z), {"reduction": "sum"}, "reduction must be one of"),
    (metrics.embedding_cosine, (torch.zeros(2, 0), torch.zeros(2, 0)), {}, "emb_full must have E >= 1"),
    (metrics.ipr_change, (_T, torch.zeros(3, 2, 4)), {}, "must share B and D"),
    (metrics.ipr_change, (torch.zeros(5), torch.zeros(5)), {}, "tokens_full must have at least 2 dimension(s)"),
    (metrics.ipr_change, (_T, _T), {"mask_full": _Z.bool()}, "mask_full must be a bool tensor of shape (2, 5)"),
    (metrics.ipr_change, (_T, _T), {"rank": 0}, "rank must be -1"),
]


@pytest.mark.parametrize(("f", "args", "kwargs", "message"), METRIC_BAD_CALLS)
def test_metric_bad_input(f, args, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        f(*args, **kwargs)


# -------------------------------------------------------------------------------- compare()

W = torch.linspace(-1, 1, 24 * 5).reshape(24, 5)


def model_full(x):
    return {"logits": x @ W, "embedding": x[:, :8], "tokens": x.reshape(-1, 6, 4)}


def model_pruned(x):
    # A perturbed head, a perturbed embedding and the first 3 of the 6 tokens.
    logits = x @ W + 0.3 * torch.sin(7 * x[:, :5])
    return {"logits": logits, "embedding": x[:, :8] + 0.2 * x[:, 8:16], "tokens": x.reshape(-1, 6, 4)[:, :3]}


def test_compare_table(gen):
    batches = [torch.randn(3, 24, generator=gen), torch.randn(2, 24, generator=gen)]
    labels = [torch.randint(0, 5, (3,), generator=gen), torch.randint(0, 5, (2,), generator=gen)]
    report = metrics.compare(model_full, model_pruned, batches, labels=labels)
    y = torch.cat(labels)
    # The direct values use the very outputs compare() sees, batch by batch: a float32 matmul over
    # the concatenation may round differently (another BLAS blocking), which no metric should hide.
    outs_f = [model_full(b) for b in batches]
    outs_p = [model_pruned(b) for b in batches]
    f = {key: torch.cat([o[key] for o in outs_f]) for key in outs_f[0]}
    p = {key: torch.cat([o[key] for o in outs_p]) for key in outs_p[0]}
    pf, pp = first_argmax(f["logits"]), first_argmax(p["logits"])
    ef, ep = f["embedding"].double(), p["embedding"].double()
    ipr_f = reference.spectral_ipr(f["tokens"])
    ipr_p = reference.spectral_ipr(p["tokens"])
    want = {
        "top1_agreement": (pf == pp).double().mean().item(),
        "flip_rate": (pf != pp).double().mean().item(),
        "flip_rate_labels": ((pf == y) != (pp == y)).double().mean().item(),
        "accuracy_full": (pf == y).double().mean().item(),
        "accuracy_pruned": (pp == y).double().mean().item(),
        "kl_divergence": direct_kl(f["logits"], p["logits"]).mean().item(),
        "js_divergence": direct_js(f["logits"], p["logits"]).mean().item(),
        "embedding_cosine": ((ef * ep).sum(-1) / (ef.norm(dim=-1) * ep.norm(dim=-1))).mean().item(),
        "ipr_full": ipr_f.mean().item(),
        "ipr_pruned": ipr_p.mean().item(),
        "ipr_change": (ipr_p - ipr_f).mean().item(),
    }
    got = report.as_dict()
    assert list(got) == list(want)  # the documented row order
    for name, value in want.items():
        # From identical float32 outputs both sides compute in float64: sums of <= 5 x 5 terms of
        # magnitude <= ~10 differ by at most ~100 ulps (~1e-14). The IPRs are the float32 op's
        # output (relative rounding 2^-24 ~ 6e-8 per value) against the float64 reference.
        tol = 1e-6 if name.startswith("ipr") else 1e-12
        assert got[name] == pytest.approx(value, rel=tol, abs=tol), name
        assert report[name] == got[name]
    assert report.samples == 5 and report.positions == 5
    assert report.per_sample["kl_divergence"].shape == (5,)
    assert torch.allclose(report.per_sample["ipr_change"], (ipr_p - ipr_f), atol=1e-6)
    # The text table: a title, a header, a rule, one aligned line per metric.
    lines = str(report).splitlines()
    assert lines[0] == "consistency: 5 samples, 5 positions"
    assert lines[1].split() == ["metric", "value", "unit", "meaning"]
    assert len(lines) == 3 + len(want)
    value_end = len(lines[2].split("  ")[0]) + 2 + len(lines[2].split("  ")[1])
    for line, (name, value) in zip(lines[3:], want.items(), strict=True):
        assert line.split()[0] == name
        assert float(line.split()[1]) == pytest.approx(value, rel=1e-5, abs=1e-9)
        assert line[:value_end].endswith(line.split()[1]), "values are right-aligned in one column"
    assert "nats" in lines[3 + list(want).index("kl_divergence")]


def test_compare_sequences_with_masks_and_plain_logits(gen):
    """(B, T, V) next-token logits with padding masks; functions that return bare logits."""
    lf = torch.randn(4, 7, 11, generator=gen)
    lp = lf + torch.randn(4, 7, 11, generator=gen)
    mask = torch.rand(4, 7, generator=gen) > 0.3
    mask[:, 0] = True
    mask_p = mask.clone()
    mask_p[0, 0] = False  # the reduced run drops one more position: the masks are ANDed
    both = mask & mask_p
    batches = [0, 1]  # each batch selects two samples
    report = metrics.compare(
        lambda i: {"logits": lf[2 * i : 2 * i + 2], "mask": mask[2 * i : 2 * i + 2]},
        lambda i: {"logits": lp[2 * i : 2 * i + 2], "mask": mask_p[2 * i : 2 * i + 2]},
        batches,
    )
    got = report.as_dict()
    assert list(got) == ["top1_agreement", "flip_rate", "kl_divergence", "js_divergence"]
    assert got["kl_divergence"] == pytest.approx(direct_kl(lf, lp)[both].mean().item(), rel=1e-12)
    agree = (first_argmax(lf) == first_argmax(lp)).double()
    assert got["top1_agreement"] == pytest.approx(agree[both].mean().item(), rel=1e-12)
    assert report.positions == int(both.sum()) and report.samples == 4
    per = report.per_sample["js_divergence"]
    want = torch.stack([direct_js(lf[i], lp[i])[both[i]].mean() for i in range(4)])
    assert torch.allclose(per, want, rtol=1e-12)
    plain = metrics.compare(lambda t: t, lambda t: t + 0.0, lf)  # one tensor = one batch
    assert plain["kl_divergence"] == 0.0 and plain["top1_agreement"] == 1.0 and plain.positions == 28
    # One tensor of labels for all batches.
    y = torch.randint(0, 11, (4, 7), generator=gen)
    with_labels = metrics.compare(lambda i: lf[2 * i : 2 * i + 2], lambda i: lp[2 * i : 2 * i + 2], [0, 1], labels=y)
    want_flips = ((first_argmax(lf) == y) != (first_argmax(lp) == y)).double().mean().item()
    assert with_labels["flip_rate_labels"] == pytest.approx(want_flips, rel=1e-12)


def test_compare_rejects_inconsistent_outputs():
    x = torch.randn(2, 24)
    with pytest.raises(ValueError, match=re.escape("the runs returned different keys")):
        metrics.compare(model_full, lambda b: {"logits": b @ W}, [x])
    with pytest.raises(ValueError, match=re.escape("must return a logits tensor or a mapping with key 'logits'")):
        metrics.compare(model_full, lambda b: [b], [x])
    with pytest.raises(ValueError, match=re.escape("unknown keys ['probs']")):
        metrics.compare(lambda b: {"logits": b, "probs": b}, lambda b: {"logits": b, "probs": b}, [x])
    with pytest.raises(ValueError, match=re.escape("must have the same shape")):
        metrics.compare(lambda b: b, lambda b: b[:, :3], [x])
    with pytest.raises(ValueError, match=re.escape("labels has 3 rows but the batches had 2 samples")):
        metrics.compare(lambda b: b, lambda b: b, [x], labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=re.escape("labels has 2 batches but inputs had 1")):
        metrics.compare(lambda b: b, lambda b: b, [x], labels=[torch.zeros(2, dtype=torch.long)] * 2)
    with pytest.raises(ValueError, match=re.escape("batch 0: labels must be an integer tensor")):
        metrics.compare(lambda b: b, lambda b: b, [x], labels=[[0, 1]])
    with pytest.raises(ValueError, match=re.escape("batch 0: labels must be an integer tensor")):
        metrics.compare(lambda b: b, lambda b: b, [x], labels=[torch.zeros(2)])
    with pytest.raises(ValueError, match=re.escape("batch 0: tokens_full (B, N, D) and tokens_pruned (B, K, D)")):
        metrics.compare(
            lambda b: {"logits": b, "tokens": torch.randn(1, 6, 4)},
            lambda b: {"logits": b, "tokens": torch.randn(2, 3, 4)},
            [x],
        )
    with pytest.raises(ValueError, match=re.escape("batch 0: embedding_pruned must be (B=2, E)")):
        metrics.compare(lambda b: {"logits": b, "embedding": b}, lambda b: {"logits": b, "embedding": b[:1]}, [x])


def test_compare_masks_embeddings_tokens_and_accepts_a_none_mask(gen):
    """Per-position embeddings count where the mask does; a sample whose tokens_mask leaves no
    row has a NaN IPR (no spectrum), in compare and in ipr_change; a None mask means all."""
    lf = torch.randn(2, 3, 5, generator=gen)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    emb = torch.randn(2, 3, 4, generator=gen)
    emb_p = emb.clone()
    emb_p[0, 2] = -emb[0, 2]  # differs only at the masked position
    tokens = torch.randn(2, 6, 4, generator=gen)
    tmask = torch.ones(2, 6, dtype=torch.bool)
    tmask[1] = False
    report = metrics.compare(
        lambda _: {"logits": lf, "mask": mask, "embedding": emb, "tokens": tokens, "tokens_mask": tmask},
        lambda _: {
            "logits": lf,
            "mask": None,
            "embedding": emb_p,
            "tokens": tokens[:, :3],
            "tokens_mask": tmask[:, :3],
        },
        [0],
    )
    assert report["embedding_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(report.per_sample["embedding_cosine"], torch.ones(2, dtype=torch.float64), atol=1e-6)
    ipr = report.per_sample["ipr_change"]
    assert torch.isfinite(ipr[0]) and torch.isnan(ipr[1]) and math.isnan(report["ipr_change"])
    want0 = reference.spectral_ipr(tokens[:1, :3]) - reference.spectral_ipr(tokens[:1])
    assert ipr[0].item() == pytest.approx(want0.item(), abs=1e-6)
    got = metrics.ipr_change(tokens, tokens[:, :3], mask_full=tmask, reduction="none")
    assert torch.isfinite(got[0]) and torch.isnan(got[1])
