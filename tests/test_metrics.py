"""spectral_ipr (CPU kernel, and the CUDA kernel, which runs on CPU tensors through the Triton
interpreter when there is no GPU) against the float64 SVD of reference.py."""

import re

import pytest
import torch
from testing import BACKENDS, HAS_CUDA, assert_rel_close

import tokenkern
from tokenkern import ops, reference

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


def ipr_of(backend, x, rank=-1):
    if backend == "cpu":
        return torch.ops.tokenkern.spectral_ipr(x, rank)
    if HAS_CUDA:
        return torch.ops.tokenkern.spectral_ipr(x.cuda(), rank).cpu()
    return ops.spectral_ipr_triton(x, rank)


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
    fn = {"cpu": torch.ops.tokenkern.spectral_ipr, "triton": ops.spectral_ipr_triton}.get(face)
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
        ops.spectral_ipr_triton(x, 120)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = torch.empty(1, 200, 150, device="cuda")
        with pytest.raises(ValueError, match=re.escape(message)):
            torch.ops.tokenkern.spectral_ipr(fake, 120)
        assert torch.ops.tokenkern.spectral_ipr(fake, 112).shape == (1,)
    check_ipr(torch.ops.tokenkern.spectral_ipr(x, 120), x, 120, 1e-6)
