"""The range finder's scale and sketch: the first pass over x finds max |x[b]| as it goes
(sketch.ScaledPasses.sketch) and gives the bits of a pass at that scale; the Gaussian sketch
omega is a cached constant of (D, l, seed) (gaussian.py). Against torch on CPU through the
interpreter."""

import os

import pytest
import torch
from testing import TRITON_DEVICE

from tokenkern._triton import gaussian, sketch


def _first_pass(x: torch.Tensor, l: int, out_block: int | None = None):
    passes = sketch.ScaledPasses(x.to(TRITON_DEVICE), l, "test", out_block=out_block, find_scale=True)
    omega = gaussian.gaussian_sketch(x.shape[2], l, sketch.sketch_width(l), 0, passes.x.device, "test")
    return passes, omega, passes.sketch(omega)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("b", "n", "d"), [(1, 1, 1), (3, 40, 24), (2, 300, 70), (1, 17, 65)])
def test_first_pass_max_matches_torch(b, n, d, dtype, gen):
    x = (torch.randn(b, n, d, generator=gen) * 3).to(dtype)
    x[0, -1, -1] = -torch.finfo(dtype).max  # the max is the magnitude, at the last element
    if b > 1:
        x[1, n // 2, d // 2] = float("nan")  # NaN in one sample only
    if b > 2:
        x[2] = torch.finfo(dtype).tiny / 4  # subnormal everywhere
        x[2, 0, 0] = float("-inf")
    passes, _, _ = _first_pass(x, 12)
    want = torch.linalg.vector_norm(x, float("inf"), dim=(1, 2), dtype=torch.float32)
    want = torch.where(want.isnan(), float("inf"), want)  # a NaN sample's max is Inf (non-finite is what counts)
    assert torch.equal(passes.amax.cpu(), want), (passes.amax, want)


def test_zero_sample_has_zero_max(gen):
    x = torch.randn(2, 20, 8, generator=gen)
    x[0] = 0.0
    x[0, 3, 3] = -0.0
    passes, _, (y, _, _) = _first_pass(x, 8)
    assert passes.amax[0].item() == 0.0 and passes.amax[1].item() == x[1].abs().max().item()
    assert bool((y[0] == 0).all())


def test_found_scale_gives_the_bits_of_a_pass_at_that_scale(gen):
    """Blocks of rows 2^40 apart, and a block whose max grows 2^10 per chunk of columns (its
    partial sums rescaled as it goes): Y brought to the sample's scale, its Gram and orth's
    output are those of a pass that knew max |x| in advance, bit for bit (powers of two)."""
    b, n, d, l, block = 2, 100, 200, 12, 32
    x = torch.randn(b, n, d, generator=gen)
    x[:, :32] *= 2.0**20
    x[:, 32:64] *= 2.0**-20
    x[0, 64:96] *= torch.exp2(10.0 * (torch.arange(d) // sketch.reduce_block(x.dtype)))
    passes, omega, (y, g, row_scale) = _first_pass(x, l, out_block=block)
    fixed = sketch.ScaledPasses(x.to(TRITON_DEVICE), l, "test", out_block=block)
    y_fixed, g_fixed = fixed.x_mm(omega, gram=True)
    assert torch.equal(passes.amax, fixed.amax)
    assert torch.equal(g, g_fixed)
    amax, bmax, scale_block = row_scale
    assert scale_block == block and bmax.shape == (b, -(-n // block))
    want_bmax = torch.stack([x[:, i : i + block].abs().amax(dim=(1, 2)) for i in range(0, n, block)], dim=1)
    assert torch.equal(bmax.cpu(), want_bmax)
    ratio = torch.exp2(torch.floor(torch.log2(bmax.cpu())) - torch.floor(torch.log2(amax.cpu()))[:, None])
    assert torch.equal(y.cpu() * ratio.repeat_interleave(block, dim=1)[:, :n, None], y_fixed.cpu())
    counters = fixed.counters
    q, t = sketch.orthonormalize(y, g, l, counters, "test", row_scale=row_scale)
    q_fixed, t_fixed = sketch.orthonormalize(y_fixed, g_fixed, l, counters, "test")
    assert torch.equal(q, q_fixed) and torch.equal(t, t_fixed)


@pytest.mark.parametrize(("d", "l"), [(1, 1), (24, 12), (300, 16), (65, 40)])
def test_omega_is_a_shared_deterministic_gaussian(d, l):
    width = sketch.sketch_width(l)
    dev = torch.device(TRITON_DEVICE)
    om = gaussian.gaussian_sketch(d, l, width, 5, dev, "test")
    assert gaussian.gaussian_sketch(d, l, width, 5, dev, "test") is om  # cached
    other = gaussian.gaussian_sketch(d, l, width, 6, dev, "test")
    previous = gaussian.isolated_sketches()
    try:
        fresh = gaussian.gaussian_sketch(d, l, width, 5, dev, "test")
    finally:
        gaussian.restore_sketches(previous)
    assert fresh is not om and torch.equal(fresh, om)  # depends on (seed, d, l) only
    assert om.shape == (d, width) and om.dtype == torch.float32
    assert bool((om[:, l:] == 0).all()) and bool(torch.isfinite(om).all())
    assert not torch.equal(om[:, :l], other[:, :l])
    live = om[:, :l].double().flatten()
    if live.numel() >= 1000:  # standard normal: mean and variance within 5 standard errors
        m = live.numel()
        assert abs(live.mean().item()) < 5 / m**0.5
        assert abs(live.var().item() - 1.0) < 5 * (2 / m) ** 0.5


def test_sketch_cache_is_bounded_and_most_recently_used():
    dev = torch.device(TRITON_DEVICE)
    previous = gaussian.isolated_sketches()
    try:
        first = gaussian.gaussian_sketch(8, 4, 16, 0, dev, "test")
        for seed in range(1, gaussian.SKETCH_CACHE_SIZE):
            gaussian.gaussian_sketch(8, 4, 16, seed, dev, "test")
        assert gaussian.gaussian_sketch(8, 4, 16, 0, dev, "test") is first  # now the most recent
        gaussian.gaussian_sketch(8, 4, 16, 99, dev, "test")  # evicts seed 1, the least recent
        assert gaussian.gaussian_sketch(8, 4, 16, 0, dev, "test") is first
        assert len(gaussian._SKETCHES) == gaussian.SKETCH_CACHE_SIZE
    finally:
        gaussian.restore_sketches(previous)


def test_sketch_is_one_launch_once_and_the_first_pass_reads_x_once(gen):
    from tokenkern.kernel_report.triton_report import record_launches

    x = torch.randn(2, 40, 24, generator=gen).to(TRITON_DEVICE)
    poison = os.environ.get("TOKENKERN_POISON") == "1"  # outputs then start as NaN: fill_ launches
    with record_launches(execute=True) as launches:
        _first_pass(x, 12)
        first = [launch.name for launch in launches if not (poison and launch.name == "torch.fill_")]
        del launches[:]
        _first_pass(x, 12)
        second = [launch.name for launch in launches if not (poison and launch.name == "torch.fill_")]
    assert first == ["_gaussian_kernel", "_x_mm_kernel"]
    assert second == ["_x_mm_kernel"]
