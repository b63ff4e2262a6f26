"""The range finder's phases inside its passes, against their stand-alone launches, bit for
bit: orth as a trailing phase of the pass that wrote its input (sketch.ScaledPasses.sketch_orth
/ xt_mm_orth / x_mm_orth vs the pass and sketch.orthonormalize; the counters and done flags left
at zero), and the Rayleigh-Ritz step run by the last pass's last programs (ritz_pass vs
leverage.top_subspace and spectral.ritz_ipr). Through the interpreter, which runs a phase's
programs after the pass's (as a GPU dispatches them)."""

import pytest
import torch
from testing import TRITON_DEVICE

from tokenkern._triton import gaussian, leverage, sketch, spectral


@pytest.mark.parametrize(
    ("dtype", "b", "n", "d", "l"),
    [(torch.float32, 2, 300, 200, 12), (torch.float16, 1, 700, 130, 40), (torch.float32, 3, 40, 600, 16)],
)
def test_orth_phase_gives_the_bits_of_pass_then_orth(dtype, b, n, d, l, gen):
    x = torch.randn(b, n, d, generator=gen) * 3
    x[:, : n // 3] *= 2.0**12  # row blocks at different scales: Y is brought to the sample's
    x = x.to(dtype).to(TRITON_DEVICE)
    omega = gaussian.gaussian_sketch(d, l, sketch.sketch_width(l), 0, x.device, "test")
    apart = sketch.ScaledPasses(x, l, "test", find_scale=True)
    fused = sketch.ScaledPasses(x, l, "test", find_scale=True)
    # several orth programs per sample somewhere (700 rows, 600 columns), one elsewhere
    assert max(-(-m // sketch.orth_block(m)) for m in (n, d)) > 1

    y, g, row_scale = apart.sketch(omega)
    q_want, t_want = sketch.orthonormalize(y, g, l, apart.counters, "test", row_scale=row_scale)
    q, t = fused.sketch_orth(omega)
    assert torch.equal(fused.amax, apart.amax)
    assert torch.equal(q, q_want) and torch.equal(t, t_want)

    z, gz = apart.xt_mm(q_want, gram=True)
    z_want, tz_want = sketch.orthonormalize(z, gz, l, apart.counters, "test", tin=t_want)
    z, tz = fused.xt_mm_orth(q, t)
    assert torch.equal(z, z_want) and torch.equal(tz, tz_want)

    p, gp = apart.x_mm(z_want, gram=True)
    q_want, t_want = sketch.orthonormalize(p, gp, l, apart.counters, "test", tin=tz_want)
    q, t = fused.x_mm_orth(z, tz)
    assert torch.equal(q, q_want) and torch.equal(t, t_want)
    assert torch.isfinite(q).all() and torch.isfinite(t).all()
    # the passes' counters, the done flags and orth's counters are left as found
    assert bool((fused.counters[: 3 * b] == 0).all())


@pytest.mark.parametrize(("b", "n", "d", "l", "r"), [(2, 300, 200, 12, 5), (1, 90, 700, 40, 32), (1, 64, 64, 64, 8)])
def test_last_pass_finish_gives_the_bits_of_its_own_launch(b, n, d, l, r, gen):
    """The Rayleigh-Ritz step run by the last pass's last program of each sample (leverage's
    top subspace, spectral's top-r IPR) gives the bits of the stand-alone kernels."""
    x = (torch.randn(b, n, d, generator=gen) * torch.logspace(0, -2, d)).to(TRITON_DEVICE)
    assert sketch.fused_finish(l)
    amax, q, t, g, finished = sketch.range_finder(x, l, 3, 1, "test")
    assert finished is None
    vsel_want, evals_want = leverage.top_subspace(g, t, l, r)
    _, q2, t2, g2, (vsel, evals) = sketch.range_finder(x, l, 3, 1, "test", sketch.FINISH_TOP_SUBSPACE, r)
    assert torch.equal(q2, q) and torch.equal(t2, t) and torch.equal(g2, g)
    assert torch.equal(vsel, vsel_want) and torch.equal(evals, evals_want)
    amax3, _, _, g3, (ipr,) = sketch.range_finder(x, l, 3, 1, "test", sketch.FINISH_IPR, r)
    assert torch.equal(g3, g) and torch.equal(amax3, amax)
    want = spectral.ritz_ipr(g, amax, l, r)
    assert torch.isfinite(want).all() and torch.equal(ipr, want)
