"""gumbel_topk's CPU kernel, the branches of its own: the hard mask by the k-th largest value
(ties across the k-th place, NaN, infinities), the relaxation of rows whose sum overflows,
the root search's step count, and bit-identical reruns."""

import pytest
import torch
from test_gumbel import assert_within, soft_bound

from tokenkern import reference
from tokenkern._cpu import gumbel as cpu_gumbel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "k"), [(1, 1), (9, 4), (64, 16), (577, 144), (300, 300)])
def test_hard_mask_matches_the_reference_with_ties(dtype, n, k, gen):
    """Scores on a coarse grid: ties across the k-th place in most rows (the lower index
    wins), rows without a tie there, and NaN / +-inf entries."""
    z = torch.randint(-4, 5, (6, n), generator=gen).to(dtype) * 0.5
    z[1] = torch.randperm(n, generator=gen).to(dtype)  # distinct: no tie
    z[2, ::3] = float("nan")
    z[3, 1::4] = float("inf")
    z[4, ::2] = float("-inf")
    want = reference.hard_topk_mask(z, k)
    got = cpu_gumbel.hard_mask_of(z, k)
    assert got.dtype == dtype
    assert torch.equal(got.double(), want)
    if dtype == torch.float32:
        assert torch.equal(cpu_gumbel.hard_mask(z, k).double(), want)


def test_relaxation_of_rows_whose_sum_overflows(gen):
    """Finite float64 scores near the dtype's limit (their sum overflows, the kernel takes its
    general path) against the reference, within the CPU kernel's bound once rounded to
    float32 (as the op returns it)."""
    z = torch.randn(3, 40, generator=gen, dtype=torch.float64)
    z[:, :3] = torch.tensor([1.0e308, 1.5e308, -1.7e308], dtype=torch.float64)
    for tau in (1.0, 1e300):
        got = cpu_gumbel.relaxed_topk(z, 5, tau)
        want = reference.relaxed_topk(z, 5, tau)
        assert_within(got.float(), want, soft_bound("cpu", z, 5, tau, want), f"soft (tau={tau})")
        assert bool(((got.sum(-1) - 5).abs() <= 1e-12).all())


class _Counted:
    """Counts the excess evaluations of the root search (each is one pass over the rows
    still searching)."""

    def __init__(self) -> None:
        self.calls = 0
        self.inner = cpu_gumbel._excess_and_slope

    def __call__(self, *args):
        self.calls += 1
        return self.inner(*args)


@pytest.mark.parametrize("tau", [0.05, 0.5, 2.0, 1e-3])
@pytest.mark.parametrize(("b", "n", "k"), [(16, 576, 144), (4, 2880, 720), (8, 50, 1)])
def test_root_search_takes_few_steps(monkeypatch, b, n, k, tau, gen):
    """Newton steps on the bit patterns reach the final bracket in far fewer evaluations than
    the 64 halvings of plain bisection: at most 24 for perturbed Gaussian scores (typically
    8 to 12), whatever tau."""
    counted = _Counted()
    monkeypatch.setattr(cpu_gumbel, "_excess_and_slope", counted)
    logits = torch.randn(b, n, generator=gen) * 2
    z = (logits + cpu_gumbel.noise(b, n, int(torch.randint(0, 2**62, (1,), generator=gen)), logits.device)).double()
    soft = cpu_gumbel.relaxed_topk(z, k, tau)
    assert counted.calls <= 24, counted.calls
    want = reference.relaxed_topk(z, k, tau)
    assert_within(soft.float(), want, soft_bound("cpu", z, k, tau, want), f"soft (tau={tau})")


@pytest.mark.parametrize("hard", [True, False])
def test_reruns_are_bit_identical(hard, gen):
    logits = torch.randn(5, 700, generator=gen)
    first = cpu_gumbel.gumbel_topk(logits, 100, 0.4, 11, hard)
    assert torch.equal(first, cpu_gumbel.gumbel_topk(logits, 100, 0.4, 11, hard))
    z = cpu_gumbel.perturbed_scores(logits, 11)
    grad = torch.randn(5, 700, generator=gen)
    g1 = cpu_gumbel.gumbel_topk_backward(grad, logits, z, 100, 0.4)
    assert torch.equal(g1, cpu_gumbel.gumbel_topk_backward(grad, logits, z, 100, 0.4))


def test_perturbed_scores_are_logits_plus_the_noise(gen):
    logits = torch.randn(3, 33, generator=gen).to(torch.bfloat16)
    noise = cpu_gumbel.noise(3, 33, 9, logits.device)
    assert torch.equal(cpu_gumbel.perturbed_scores(logits, 9), logits.float() + noise)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_hard_mask_where_nan_ties_with_minus_infinity(dtype):
    """Rows whose k-th place is taken at -inf rank, where NaN (as -inf) ties with -inf entries
    and the lower index wins: the selection's k-th value alone cannot tell these apart."""
    nan, inf = float("nan"), float("inf")
    rows = [
        ([-inf, nan, -inf], 2),  # exactly k entries >= the k-th value -inf, but NaN at 1 wins
        ([nan, -inf], 1),
        ([-inf, nan], 1),
        ([nan, 1.0, 2.0], 2),
        ([5.0, -inf, nan, -inf], 2),
        ([nan, nan, nan], 2),
        ([inf, nan, inf, 3.0], 2),
        ([-inf, -inf, -inf], 3),
    ]
    for values, k in rows:
        z = torch.tensor([values], dtype=dtype)
        want = reference.hard_topk_mask(z, k)
        got = cpu_gumbel.hard_mask_of(z, k)
        assert got.dtype == dtype
        assert torch.equal(got.double(), want), (values, k, got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("b", "n", "k"), [(64, 576, 144), (3, 2880, 720), (5, 7, 7), (4, 1, 1)])
def test_hard_mask_matches_topk_on_distinct_scores(dtype, b, n, k, gen):
    """Distinct scores (no tie): the mask is the index set of torch.topk, exactly k per row."""
    z = torch.randn(b, n, generator=gen, dtype=dtype)
    got = cpu_gumbel.hard_mask_of(z, k)
    want = torch.zeros_like(z).scatter_(1, z.topk(k, dim=-1).indices, 1.0)
    assert torch.equal(got, want)
    assert torch.equal(got.sum(-1), torch.full((b,), float(k), dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_perturbed_scores_are_float32_logits_plus_the_noise(dtype, gen):
    logits = (torch.randn(4, 129, generator=gen) * 3).to(dtype)
    noise = cpu_gumbel.noise(4, 129, 21, logits.device)
    assert torch.equal(cpu_gumbel.perturbed_scores(logits, 21), logits.float() + noise)
