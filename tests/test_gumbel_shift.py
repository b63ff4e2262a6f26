"""gumbel_topk_soft and the backward from its shift: the same soft values and the same gradient,
bit for bit, as the forward without a shift and the backward that searches the threshold again,
on both kernels (Triton via the interpreter on CPU), degenerate rows included."""

import re

import pytest
import torch
from testing import BACKENDS, TRITON_DEVICE

import tokenkern
from tokenkern.ops.gumbel import gumbel_topk_backward_cuda, gumbel_topk_soft_triton, gumbel_topk_triton

# (B, N, k, tau): a nearly hard and a smooth relaxation, k = 1, k = N (degenerate), a row past
# one Triton chunk.
SHAPES = [(3, 37, 9, 0.05), (2, 64, 16, 2.0), (2, 10, 1, 0.5), (2, 12, 12, 1.0), (1, 4100, 700, 0.5)]


def _faces(backend: str):
    """(soft forward with shift, soft forward, backward) of one kernel."""
    if backend == "cpu":
        return (
            torch.ops.tokenkern.gumbel_topk_soft,
            lambda x, k, tau, seed: torch.ops.tokenkern.gumbel_topk(x, k, tau, seed, False),
            torch.ops.tokenkern.gumbel_topk_backward,
        )
    return (
        gumbel_topk_soft_triton,
        lambda x, k, tau, seed: gumbel_topk_triton(x, k, tau, seed, False),
        gumbel_topk_backward_cuda,
    )


def _logits(b: int, n: int, gen: torch.Generator, special: bool) -> torch.Tensor:
    x = torch.randn(b, n, generator=gen) * 3
    if special:  # infinities and NaN: the general path and rows without a finite lambda
        x[0, :3] = float("inf")
        x[-1, 1] = float("nan")
        x[-1, 2:5] = float("-inf")
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("special", [False, True], ids=["finite", "special"])
@pytest.mark.parametrize(("b", "n", "k", "tau"), SHAPES)
def test_backward_from_shift_is_bit_identical(backend, special, b, n, k, tau, gen):
    if backend == "triton" and n > 1000 and TRITON_DEVICE == "cpu" and special:
        pytest.skip("one long-row case is enough under the interpreter")
    soft_with_shift, soft, backward = _faces(backend)
    dev = "cpu" if backend == "cpu" else TRITON_DEVICE
    logits = _logits(b, n, gen, special).to(dev)
    grad = torch.randn(b, n, generator=gen).to(dev)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    out, shift = soft_with_shift(logits, k, tau, seed)
    assert shift.shape == (b, 2) and shift.dtype == torch.float64 and not shift.isnan().any()
    assert torch.equal(out, soft(logits, k, tau, seed))
    want = backward(grad, logits, k, tau, seed)
    got = backward(grad, logits, k, tau, seed, shift)
    assert not got.isnan().any()
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_soft_gradient_matches_the_op(dtype, gen):
    logits = (torch.randn(4, 50, generator=gen) * 2).to(dtype).requires_grad_()
    weight = torch.randn(4, 50, generator=gen)
    (got,) = torch.autograd.grad((tokenkern.gumbel_topk(logits, 11, 0.5, 5, hard=False) * weight).sum(), logits)
    (want,) = torch.autograd.grad((torch.ops.tokenkern.gumbel_topk(logits, 11, 0.5, 5, False) * weight).sum(), logits)
    assert got.dtype == dtype and torch.equal(got, want)


def test_compiled_soft_gradient(gen):
    logits = torch.randn(2, 30, generator=gen).requires_grad_()
    weight = torch.randn(2, 30, generator=gen)

    def loss(x):
        return (tokenkern.gumbel_topk(x, 7, 0.5, 3, hard=False) * weight).sum()

    torch._dynamo.reset()
    (got,) = torch.autograd.grad(torch.compile(loss, fullgraph=True)(logits), logits)
    (want,) = torch.autograd.grad(loss(logits), logits)
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("message", "shift"),
    [
        ("shift must be a float64 tensor of shape (2, 2)", torch.zeros(2, 2)),
        ("shift must be a float64 tensor of shape (2, 2)", torch.zeros(3, 2, dtype=torch.float64)),
    ],
)
def test_bad_shift(message, shift):
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match=re.escape(message)):
        torch.ops.tokenkern.gumbel_topk_backward(torch.ones(2, 10), x, 2, 1.0, 0, shift)
