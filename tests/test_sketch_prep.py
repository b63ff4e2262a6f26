"""The range finder's first launch (sketch.scale_and_sketch): the per-sample max |x| that scales
every pass, and the Gaussian sketch omega, against torch on CPU through the interpreter."""

import os

import pytest
import torch
from testing import TRITON_DEVICE

from tokenkern._triton import sketch


def _same_max(got: torch.Tensor, want: torch.Tensor) -> bool:
    return torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("b", "n", "d"), [(1, 1, 1), (3, 40, 24), (2, 33, 300), (1, 17, 65)])
def test_abs_max_matches_torch(b, n, d, dtype, gen):
    x = (torch.randn(b, n, d, generator=gen) * 3).to(dtype)
    x[0, -1, -1] = -torch.finfo(dtype).max  # the max is the magnitude, at the last element
    if b > 1:
        x[1, n // 2, d // 2] = float("nan")  # NaN in one sample only
    if b > 2:
        x[2] = torch.finfo(dtype).tiny / 4  # subnormal everywhere
        x[2, 0, 0] = float("-inf")
    amax, _ = sketch.scale_and_sketch(x.to(TRITON_DEVICE), 12, 0, "test")
    want = torch.linalg.vector_norm(x, float("inf"), dim=(1, 2), dtype=torch.float32)
    assert _same_max(amax.cpu(), want), (amax, want)


def test_zero_sample_has_zero_max(gen):
    x = torch.randn(2, 20, 8, generator=gen)
    x[0] = 0.0
    x[0, 3, 3] = -0.0
    amax, _ = sketch.scale_and_sketch(x.to(TRITON_DEVICE), 8, 0, "test")
    assert amax[0].item() == 0.0 and amax[1].item() == x[1].abs().max().item()


@pytest.mark.parametrize(("d", "l"), [(1, 1), (24, 12), (300, 16), (65, 40)])
def test_omega_is_a_shared_deterministic_gaussian(d, l, gen):
    x1 = torch.randn(1, 10, d, generator=gen).to(TRITON_DEVICE)
    x2 = torch.randn(4, 3, d, generator=gen).to(TRITON_DEVICE)
    _, om1 = sketch.scale_and_sketch(x1, l, 5, "test")
    _, om2 = sketch.scale_and_sketch(x2, l, 5, "test")
    _, other = sketch.scale_and_sketch(x1, l, 6, "test")
    width = sketch.sketch_width(l)
    assert om1.shape == (d, width) and om1.dtype == torch.float32
    assert torch.equal(om1, om2)  # depends on (seed, d, l) only, not on x or the batch
    assert bool((om1[:, l:] == 0).all()) and bool(torch.isfinite(om1).all())
    live = om1[:, :l].double().flatten()
    assert not torch.equal(om1[:, :l], other[:, :l])
    if live.numel() >= 1000:  # standard normal: mean and variance within 5 standard errors
        m = live.numel()
        assert abs(live.mean().item()) < 5 / m**0.5
        assert abs(live.var().item() - 1.0) < 5 * (2 / m) ** 0.5


def test_one_launch_and_no_torch_op(gen):
    from tokenkern.kernel_report.triton_report import record_launches

    x = torch.randn(2, 40, 24, generator=gen)
    with record_launches(execute=True) as launches:
        sketch.scale_and_sketch(x.to(TRITON_DEVICE), 12, 0, "test")
    poison = os.environ.get("TOKENKERN_POISON") == "1"  # outputs then start as NaN: fill_ launches
    assert [launch.name for launch in launches if not (poison and launch.name == "torch.fill_")] == ["_prep_kernel"]
