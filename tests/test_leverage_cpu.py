"""The CPU leverage path's branches (tokenkern._cpu.leverage): the CholeskyQR basis and its
Householder fallback, the unscaled products and the power-of-two rescaled recomputation, each
against the exact float64 SVD (reference.py) and against each other."""

import pytest
import torch
from testing import assert_rel_close, gapped_matrix

from tokenkern import reference
from tokenkern._cpu import leverage as cpu

EPS32 = 2.0**-24
QR = torch.linalg.qr
SCORE_TOL = 1e-3  # tests/test_leverage.py's bound for float32 input on a gapped spectrum


@pytest.fixture
def householder_calls(monkeypatch):
    """Counts the samples handed to Householder QR (torch.linalg.qr) from the test's first
    use of the list on; the input builders below call the original."""
    calls = []
    qr = torch.linalg.qr

    def counting_qr(a, *args, **kwargs):
        calls.append(a.shape[0])
        return qr(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "qr", counting_qr)
    return calls


@pytest.fixture
def scaled_samples(monkeypatch):
    """Counts the samples recomputed from the rescaled x."""
    calls = []
    scaled = cpu._scaled_scores

    def counting(xf, *args):
        calls.append(xf.shape[0])
        return scaled(xf, *args)

    monkeypatch.setattr(cpu, "_scaled_scores", counting)
    return calls


def graded_rows(b, l, m, cond, gen):
    """(B, l, M) float32 rows with singular values logspaced from 1 to 1/cond."""
    u = QR(torch.randn(b, l, l, generator=gen, dtype=torch.float64)).Q
    v = QR(torch.randn(b, m, l, generator=gen, dtype=torch.float64)).Q
    s = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), l, dtype=torch.float64)
    return ((u * s) @ v.mT).float()


def check_basis(q, g, at, cond):
    """q spans the rows of at (float32 rounding amplified by cond, as Householder's), and g is
    q's Gram matrix, within the tolerance that makes cond(q) <= sqrt(3)."""
    q64, g64 = q.double(), g.double()
    eye = torch.eye(q.shape[1], dtype=torch.float64)
    assert torch.isfinite(q).all()
    assert torch.allclose(q64 @ q64.mT, g64, atol=64 * EPS32, rtol=0)
    assert bool((torch.linalg.matrix_norm(g64 - eye) <= cpu._GRAM_TOL).all())
    exact = QR(at.double().mT).Q  # (B, M, l)
    ortho = torch.linalg.solve_triangular(torch.linalg.cholesky(g64), q64, upper=False)  # L^-1 q
    span_err = (ortho.mT @ ortho - exact @ exact.mT).abs().amax().item()
    bound = 16 * q.shape[1] * EPS32 * cond
    assert span_err <= bound, f"span error {span_err:.2e} > {bound:.2e}"


@pytest.mark.parametrize(("l", "m"), [(40, 576), (40, 1024), (17, 17), (1, 64)])
def test_cholesky_qr_basis_spans_the_rows(l, m, householder_calls, gen):
    at = graded_rows(3, l, m, cond=100.0, gen=gen)
    q, g = cpu.well_conditioned_rows(at)
    assert householder_calls == [], "a condition number of 100 is within CholeskyQR's reach"
    check_basis(q, g, at, cond=100.0)


@pytest.mark.parametrize("cond", [1e5, 1e7])
def test_ill_conditioned_basis_falls_back_to_householder(cond, householder_calls, gen):
    at = graded_rows(2, 40, 576, cond=100.0, gen=gen)
    at[1] = graded_rows(1, 40, 576, cond=cond, gen=gen)[0]  # beyond a float32 Gram
    q, g = cpu.well_conditioned_rows(at)
    assert householder_calls == [1], "only the ill-conditioned sample goes to Householder"
    assert torch.equal(g[1], torch.eye(40))
    check_basis(q[:1], g[:1], at[:1], cond=100.0)
    check_basis(q[1:], g[1:], at[1:], cond=cond)


def test_rank_deficient_and_non_finite_bases(householder_calls):
    at = torch.zeros(3, 8, 50)
    at[1, :, 0] = 1.0  # rank one
    at[2, 3, 7] = float("nan")
    q, g = cpu.well_conditioned_rows(at)
    assert householder_calls == [3], "zero, rank-one and NaN rows all need Householder"
    assert torch.isfinite(q[:2]).all() and torch.isnan(q[2]).any()
    # Householder completes a rank-deficient basis to orthonormal rows, which g records.
    assert torch.equal(g, torch.eye(8).expand(3, 8, 8))
    assert torch.allclose(q[:2] @ q[:2].mT, g[:2], atol=64 * EPS32, rtol=0)


def exact_scores(x):
    return reference.leverage_scores(x)


@pytest.mark.parametrize(("b", "n", "d"), [(2, 576, 1024), (2, 2880, 256), (1, 577, 384)])
def test_cholesky_path_matches_exact_svd(b, n, d, householder_calls, scaled_samples, gen):
    x = gapped_matrix(b, n, d, rank=32, gen=gen)[0].float()
    householder_calls.clear()
    scores = torch.ops.tokenkern.leverage_scores(x)
    assert householder_calls == [] and scaled_samples == []
    assert_rel_close(scores, exact_scores(x), SCORE_TOL)


def test_householder_path_matches_exact_svd(householder_calls, gen):
    """A spectrum spanning 1e6 (massive-activation-like outlier directions) makes the sketch too
    ill-conditioned for a float32 Gram: the Householder branch runs and the scores still match."""
    x64, _ = gapped_matrix(2, 576, 1024, rank=32, gen=gen)
    u, s, vh = torch.linalg.svd(x64, full_matrices=False)
    s[:, :4] *= 1e4  # four outlier directions, 1e4 above the rest of the top 32
    x = ((u * s[:, None, :]) @ vh).float()
    householder_calls.clear()
    scores = torch.ops.tokenkern.leverage_scores(x)
    assert householder_calls, "the outlier spectrum should need the Householder branch"
    assert_rel_close(scores, exact_scores(x), SCORE_TOL)


@pytest.mark.parametrize("exponent", [-120, -60, -20, 20, 60, 100])
def test_power_of_two_scale_gives_the_same_scores(exponent, scaled_samples, gen):
    x = gapped_matrix(2, 300, 200, rank=32, gen=gen)[0].float()
    x /= x.abs().amax()
    ref = torch.ops.tokenkern.leverage_scores(x)
    scaled = torch.ops.tokenkern.leverage_scores(x * 2.0**exponent)
    assert torch.isfinite(scaled).all()
    assert_rel_close(scaled, ref.double(), 64 * EPS32)
    # Moderate scales run on x as it is. max|x| = 2^e bounds the final Gram's trace by
    # [2^(2e), n d 2^(2e)]: below gram_floor for e <= -60, past float32 for e >= 100, so those go
    # through the rescaled recomputation (2^60 may overflow or not, depending on the spectrum).
    if abs(exponent) <= 20:
        assert scaled_samples == []
    elif exponent != 60:
        assert scaled_samples == [2]
    assert_rel_close(scaled, exact_scores(x), SCORE_TOL)


def test_mixed_batch_equals_per_sample(scaled_samples, gen):
    x = gapped_matrix(4, 200, 96, rank=32, gen=gen)[0].float()
    x[1] *= 2.0**100  # overflows float32 Gram sums: rescaled
    x[2] *= 2.0**-70  # below the Gram floor: rescaled
    x[3, 5, 9] = float("inf")
    scores = torch.ops.tokenkern.leverage_scores(x)
    assert scaled_samples == [3]
    assert torch.isnan(scores[3]).all() and torch.isfinite(scores[:3]).all()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-for-bit batch independence is documented for one thread
    try:
        alone = torch.ops.tokenkern.leverage_scores(x)
        for i in range(3):
            assert torch.equal(alone[i], torch.ops.tokenkern.leverage_scores(x[i : i + 1])[0]), i
    finally:
        torch.set_num_threads(threads)
    assert_rel_close(scores[:3], exact_scores(x[:3]), SCORE_TOL)


def test_gram_floor_bounds_max_abs(gen):
    """tr(G) >= gram_floor(n, d) implies max|x| >= 2^-38 (tr(G) <= ||x||_F^2 <= n d max|x|^2)."""
    n, d = 50, 30
    x = torch.full((n, d), 2.0**-38, dtype=torch.float64)
    assert (x * x).sum().item() == pytest.approx(cpu.gram_floor(n, d), rel=1e-12)


def test_reruns_and_16_bit_inputs_are_deterministic(gen):
    x = gapped_matrix(3, 400, 128, rank=32, gen=gen)[0].float()
    a = torch.ops.tokenkern.leverage_scores(x, rank=16, oversample=8, power_iters=3, seed=11)
    b = torch.ops.tokenkern.leverage_scores(x, rank=16, oversample=8, power_iters=3, seed=11)
    assert torch.equal(a, b)
    xb = x.bfloat16()
    assert torch.equal(torch.ops.tokenkern.leverage_scores(xb), torch.ops.tokenkern.leverage_scores(xb.float())), (
        "a 16-bit x is cast to float32 once, then the same path"
    )
