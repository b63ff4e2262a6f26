"""gumbel_topk's threshold relaxation soft_i = sigmoid((z_i - lambda) / tau), sum soft = k:
bounded in [0, 1] where the successive-softmax form was not, exact at the extremes (separated
scores, tiny temperatures down to the documented bound, huge logits), the bound itself, and
the backward (CPU and Triton) as the implicit-function gradient of that forward."""

import math
import re

import pytest
import torch
from test_gumbel import EPS32, assert_within, grad_bound, noise_of, soft_bound
from testing import BACKENDS, TRITON_DEVICE

from tokenkern import reference
from tokenkern._cpu import gumbel as cpu_gumbel
from tokenkern.ops import gumbel as gumbel_ops
from tokenkern.ops.gumbel import gumbel_topk_backward_cuda, gumbel_topk_triton

# float32 Gumbel noise lies in [-log(-log(2^-126)), -log(-log(1 - 2^-24))] = [-4.47, 16.64].
NOISE_SPAN = 4.47 + 16.64
MIN_TAU = 2.0**-126


def forward(backend: str, logits: torch.Tensor, k: int, tau: float, seed: int, hard: bool) -> torch.Tensor:
    if backend == "cpu":
        return torch.ops.tokenkern.gumbel_topk(logits, k, tau, seed, hard)
    return gumbel_topk_triton(logits.to(TRITON_DEVICE), k, tau, seed, hard).cpu()


def backward(backend: str, grad: torch.Tensor, logits: torch.Tensor, k: int, tau: float, seed: int) -> torch.Tensor:
    if backend == "cpu":
        return torch.ops.tokenkern.gumbel_topk_backward(grad, logits, k, tau, seed)
    dev = TRITON_DEVICE
    return gumbel_topk_backward_cuda(grad.to(dev), logits.to(dev), k, tau, seed).cpu()


def separated_logits(b: int, n: int, gen: torch.Generator, spacing: float = 50.0) -> torch.Tensor:
    """Rows of distinct multiples of ``spacing`` in random order: after the noise every gap
    between two perturbed scores is at least spacing - NOISE_SPAN."""
    return torch.stack([torch.randperm(n, generator=gen) for _ in range(b)]).float() * spacing


def check_soft(backend: str, logits: torch.Tensor, k: int, tau: float, seed: int) -> torch.Tensor:
    """soft in [0, 1], equal to the reference within the backend's bound, rows summing to k
    within the sum of the bounds."""
    soft = forward(backend, logits, k, tau, seed, hard=False)
    noise = noise_of(backend, *logits.shape, seed)
    ref = reference.gumbel_topk(logits, k, tau, noise, hard=False)
    bound = soft_bound(backend, reference.perturbed_scores(logits, noise), k, tau, ref)
    assert_within(soft, ref, bound, f"soft (tau={tau})")
    assert bool(((soft >= 0) & (soft <= 1)).all()), "soft outside [0, 1]"
    err = (soft.double().sum(-1) - k).abs()
    assert bool((err <= bound.sum(-1) + 1e-12).all()), err.max()
    return soft


# ------------------------------------------------------------------- the old counterexamples


def test_relaxation_stays_in_unit_interval_where_successive_softmax_did_not(gen):
    """tau = 1, z = [0, -100], k = 2 gave [1.5, 0.5]; near-ties at k = 3 gave 1.5; random
    rows at small tau gave 2.15. Reference and CPU kernel (float32 and float64)."""
    cases = [
        (torch.tensor([[0.0, -100.0]]), 2, 1.0),
        (torch.tensor([[0.0, -100.0, -200.0]]), 2, 1.0),
        (1e-3 * torch.randn(4, 20, generator=gen), 3, 1.0),
        (100 * torch.randn(4, 50, generator=gen), 7, 1e-3),
        (torch.randn(4, 50, generator=gen), 7, 0.01),
    ]
    for z, k, tau in cases:
        for soft in (
            reference.relaxed_topk(z.double(), k, tau),
            cpu_gumbel.relaxed_topk(z.double(), k, tau),
            cpu_gumbel.relaxed_topk(z, k, tau),
        ):
            assert bool(((soft >= 0) & (soft <= 1)).all()), (z, k, tau, soft.max())
            tol = 8 * EPS32 * k if soft.dtype == torch.float32 else 1e-12 * k
            assert bool(((soft.double().sum(-1) - k).abs() <= tol).all())
    assert torch.equal(
        reference.relaxed_topk(torch.tensor([[0.0, -100.0]], dtype=torch.float64), 2, 1.0),
        torch.ones(1, 2, dtype=torch.float64),
    )
    soft = reference.relaxed_topk(torch.tensor([[0.0, -100.0, -200.0]], dtype=torch.float64), 2, 1.0)
    # lambda ~ -150: the third score gets sigmoid(-50), the first two the rest (1 in float64).
    assert soft[0, 0] == 1 and soft[0, 1] == 1 and abs(soft[0, 2].item() / math.exp(-50) - 1) < 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("scale", "tau"), [(100.0, 1e-3), (1e-3, 1.0), (2.0, 0.05), (2.0, 30.0)])
def test_soft_matches_reference(backend, scale, tau, gen):
    """Large logits at small tau (the 2.15 case), near-ties, a peaked and a flat temperature."""
    logits = torch.randn(3, 50, generator=gen) * scale
    check_soft(backend, logits, 8, tau, int(torch.randint(0, 2**62, (1,), generator=gen)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("n", "k"), [(16, 4), (300, 37)])
@pytest.mark.parametrize("tau", [1e-3, 1e-20, MIN_TAU])
def test_separated_scores_give_the_hard_mask_exactly(backend, n, k, tau, gen):
    """Gaps >= 28.9 against tau <= 1e-3: lambda sits between the k-th and (k+1)-th score,
    every |z - lambda| / tau >= 14450 and every sigmoid is exactly 0 or 1 (float32 and
    float64 alike): soft is the hard mask itself."""
    logits = separated_logits(2, n, gen)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    soft = forward(backend, logits, k, tau, seed, hard=False)
    hard = forward(backend, logits, k, tau, seed, hard=True)
    assert torch.equal(soft, hard), (soft - hard).abs().max()
    assert bool((soft.sum(-1) == k).all())
    ref = reference.gumbel_topk(logits, k, tau, noise_of(backend, 2, n, seed), hard=False)
    assert torch.equal(soft.double(), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_rows_separated(backend, gen):
    """Rows past one 4096-element chunk (the Triton kernels loop over chunks)."""
    logits = separated_logits(1, 4100, gen)
    logits[0, 4099] = 50.0 * 4100  # the largest score in the last chunk, the next ones anywhere
    soft = forward(backend, logits, 3, 1e-6, 5, hard=False)
    hard = forward(backend, logits, 3, 1e-6, 5, hard=True)
    assert torch.equal(soft, hard) and hard[0, 4099] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_rows_match_reference(backend, gen):
    logits = torch.randn(2, 5000, generator=gen) * 2
    check_soft(backend, logits, 700, 0.3, 17)


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_tends_to_hard_as_tau_shrinks(backend, gen):
    """Gaps >= 28.9 between perturbed scores: max |soft - hard| shrinks with tau, is still
    nonzero at tau = 1 (sigmoid(-14.45) ~ 5e-7 is a float32) and 0 at tau = 0.1
    (sigmoid(-144) underflows)."""
    logits = separated_logits(2, 40, gen)
    hard = forward(backend, logits, 10, 1.0, 3, hard=True)
    taus = (10.0, 3.0, 1.0, 0.1)
    errs = [(forward(backend, logits, 10, tau, 3, hard=False) - hard).abs().max().item() for tau in taus]
    assert errs[0] > errs[1] > errs[2] > 0 and errs[3] == 0, errs


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_tiny_tau_finite(backend, gen):
    """Logits ~ 100 with tau = 1e-3, 1e-30 and the smallest tau accepted: finite, in [0, 1],
    within the bound of the reference, summing to k (whatever ties the draw has)."""
    logits = torch.randn(2, 16, generator=gen) * 100
    for tau in (1e-3, 1e-30, MIN_TAU):
        soft = check_soft(backend, logits, 4, tau, 3)
        assert bool(torch.isfinite(soft).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_ties_share_the_boundary(backend):
    """1e9 + g rounds back to 1e9: every z ties, so soft = k / N for each (sigmoid(-u) with
    N sigmoid(-u) = k), at any tau."""
    logits = torch.full((2, 12), 1e9)
    for tau in (1.0, 1e-30):
        soft = forward(backend, logits, 5, tau, 1, hard=False)
        assert bool(((soft.double() - 5 / 12).abs() <= 8 * EPS32).all()), soft


# ------------------------------------------------------------------------------------ tau


BAD_TAUS = [1e-38, 2.0**-127, 5e-324]


@pytest.mark.parametrize("tau", BAD_TAUS)
@pytest.mark.parametrize("face", ["cpu", "fake", "triton", "backward"])
def test_tau_below_the_bound_is_refused(face, tau):
    x = torch.randn(2, 10, device="meta" if face == "fake" else "cpu")
    message = "tokenkern.gumbel_topk: tau must be >= 2^-126 (~1.18e-38, so that 1/tau is a finite float32), "
    message += f"got {tau!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        if face == "triton":
            gumbel_topk_triton(x, 3, tau, 0)
        elif face == "backward":
            torch.ops.tokenkern.gumbel_topk_backward(torch.ones(2, 10), x, 3, tau, 0)
        else:
            torch.ops.tokenkern.gumbel_topk(x, 3, tau, 0)


def test_the_bound_is_float32_representable():
    assert gumbel_ops.GUMBEL_MIN_TAU == MIN_TAU
    inv = torch.tensor(1 / MIN_TAU, dtype=torch.float32)
    assert math.isfinite(inv.item()) and torch.tensor(MIN_TAU, dtype=torch.float32).item() == MIN_TAU
    assert not math.isfinite(torch.tensor(1 / 2.0**-128.5, dtype=torch.float32).item())


# -------------------------------------------------------------------------------- backward


@pytest.mark.parametrize(("n", "k", "tau"), [(9, 4, 0.05), (20, 10, 0.2), (30, 7, 0.02), (50, 3, 1e-3)])
def test_handwritten_backward_is_the_vjp_float64(n, k, tau, gen):
    """In float64 the hand-written backward (s' / tau) (g - sum(g s') / sum(s')) is autograd
    through the reference (whose Newton step carries the implicit gradient), to rounding."""
    z = torch.randn(2, n, generator=gen, dtype=torch.float64) * 2
    grad = torch.randn(2, n, generator=gen, dtype=torch.float64)
    x = z.clone().requires_grad_()
    (want,) = torch.autograd.grad(reference.relaxed_topk(x, k, tau), x, grad)
    got = cpu_gumbel.relaxed_topk_backward(z, k, tau, grad)
    assert_within(got, want, 1e-10 * want.abs().amax(-1, keepdim=True), "hand-written backward")


def test_gradcheck_reference_small_tau_and_ties(gen):
    """Finite differences of the reference near ties and at a peaked temperature."""
    z = torch.randn(2, 10, generator=gen, dtype=torch.float64)
    z[:, 1] = z[:, 0] + 1e-3
    z.requires_grad_()
    for tau in (0.05, 0.5):
        assert torch.autograd.gradcheck(lambda t, tau=tau: reference.relaxed_topk(t, 4, tau), (z,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_of_the_row_sum_is_zero(backend, gen):
    """sum soft = k for every z, so the gradient of the row sum (incoming gradient 1) is 0 to
    rounding: |sum_i s'_i / tau (1 - 1)| with c = sum s' / sum s' = 1 in exact arithmetic."""
    logits = torch.randn(2, 60, generator=gen)
    got = backward(backend, torch.ones(2, 60), logits, 9, 0.5, 4)
    assert bool((got.abs() <= 16 * EPS32 / 0.5).all()), got.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("scale", "tau"), [(2.0, 0.2), (2.0, 0.05), (100.0, 1e-3)])
def test_op_backward_small_tau_matches_reference(backend, scale, tau, gen):
    logits = torch.randn(2, 50, generator=gen) * scale
    grad = torch.randn(2, 50, generator=gen).double()
    got = backward(backend, grad.float(), logits, 8, tau, 7)
    noise = noise_of(backend, 2, 50, 7)
    x = logits.double().requires_grad_()
    (want,) = torch.autograd.grad(reference.gumbel_topk(x, 8, tau, noise, hard=False), x, grad)
    z = reference.perturbed_scores(logits, noise)
    assert_within(got, want, grad_bound(backend, z, 8, tau, grad, want), "d logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_separated_is_zero(backend, gen):
    """Exactly saturated sigmoids have no gradient, even at tau = 2^-126 (no 0 * inf)."""
    logits = separated_logits(2, 16, gen)
    for tau in (1e-3, MIN_TAU):
        got = backward(backend, torch.randn(2, 16, generator=gen), logits, 4, tau, 2)
        assert torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_finite_where_forward_is(backend, gen):
    """Scores far apart against tau (the sigmoids underflow), random large logits at tiny
    tau: the forward is finite, and so is the backward."""
    z_gap = torch.tensor([90.0, 100.0, 110.0])
    logits = -torch.rand(3, 12, generator=gen) * 5 - z_gap[:, None]
    logits[:, 0] = NOISE_SPAN  # the first score leads by z_gap / tau
    for lg, tau in ((logits, 1.0), (torch.randn(2, 16, generator=gen) * 100, 1e-3)):
        soft = forward(backend, lg, 4, tau, 1, hard=False)
        got = backward(backend, torch.randn(lg.shape, generator=gen), lg, 4, tau, 1)
        assert bool(torch.isfinite(soft).all()) and bool(torch.isfinite(got).all())
