"""The range finder's orth as a trailing phase of the pass that wrote its input (one launch:
sketch.ScaledPasses.sketch_orth / xt_mm_orth / x_mm_orth): the bits of the pass followed by the
stand-alone orth (sketch.orthonormalize), and the counters and done flags left at zero. Through
the interpreter, which runs the phase's programs after the pass's (as a GPU dispatches them)."""

import pytest
import torch
from testing import TRITON_DEVICE

from tokenkern._triton import gaussian, sketch


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
