"""gumbel_topk on CPU against the plain torch a user would write from the same rule.

The baseline: z = float32(logits) + Gumbel noise from the same CPU generator stream (so both
sides perturb identically); the threshold lambda of soft = sigmoid((z - lambda) / tau),
sum soft = k, by 64 vectorized float64 bisection steps on lambda over [min z - 30 tau,
max z + 30 tau] without grad; one Newton step on lambda with grad (the implicit-function
gradient through autograd, as benchmarks/bench_gumbel.py writes it); the hard mask by topk +
scatter and the straight-through form hard + (soft - soft.detach()). The forward-only hard
case is what a user writes for a sample without gradients: noise, topk, scatter.

Cases: soft forward (no grad), hard forward (no grad), straight-through forward + backward
(hard=True) and soft forward + backward, at the selector shapes of benchmarks/bench_gumbel.py.
"""

from __future__ import annotations

import pytest
import torch
from bench_gumbel import bisect_threshold
from cpu_harness import DTYPES, dtype_id, shapes

import tokenkern

# (B, N, k)
SHAPES = shapes(full=[(64, 576, 144), (64, 2880, 720), (8, 2880, 720)], smoke=[(2, 64, 16)])
TAU = 0.5
SEED = 3
CASES = ("soft", "hard", "hard+backward", "soft+backward")


def torch_perturbed(logits: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(logits.shape, generator=gen).clamp_min(2.0**-126)
    return logits.float() - torch.log(-torch.log(u))


def torch_relaxed_topk(z: torch.Tensor, k: int, tau: float, steps: int = 64) -> torch.Tensor:
    """soft (B, N) float32 for z (B, N) float32, gradients by autograd (float64 inside)."""
    z = z.double()
    lam = bisect_threshold(z, k, tau, steps, margin=30)
    s = torch.sigmoid((z - lam) / tau)
    ds = s * (1 - s) / tau
    lam = lam + (s.sum(-1, keepdim=True) - k) / ds.sum(-1, keepdim=True)  # Newton: the exact gradient
    return torch.sigmoid((z - lam) / tau).float()


def torch_hard_mask(z: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(z).scatter_(1, z.detach().topk(k, dim=-1).indices, 1.0)


def torch_gumbel_topk(logits: torch.Tensor, k: int, tau: float, seed: int, hard: bool) -> torch.Tensor:
    z = torch_perturbed(logits, seed)
    soft = torch_relaxed_topk(z, k, tau)
    return torch_hard_mask(z, k) + (soft - soft.detach()) if hard else soft


def check(case: str):
    def agree(ours: torch.Tensor, theirs: torch.Tensor) -> None:
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        if case == "hard":
            assert torch.equal(ours, theirs)
            return
        # float32 outputs (bf16 gradients for bf16 logits) of the same relaxation.
        eps = torch.finfo(ours.dtype).eps
        err = (ours.double() - theirs.double()).abs().max()
        assert err <= 4 * eps * theirs.double().abs().max(), err

    return agree


def fns(case: str, logits: torch.Tensor, weight: torch.Tensor, k: int) -> dict:
    hard = case.startswith("hard")
    ours = lambda x: tokenkern.gumbel_topk(x, k, TAU, SEED, hard)  # noqa: E731
    if case == "hard":
        theirs = lambda x: torch_hard_mask(torch_perturbed(x, SEED), k)  # noqa: E731
    else:
        theirs = lambda x: torch_gumbel_topk(x, k, TAU, SEED, hard)  # noqa: E731

    def forward(fn):
        def run():
            with torch.no_grad():
                return fn(logits)

        return run

    def forward_backward(fn):
        def run():
            (grad,) = torch.autograd.grad((fn(logits) * weight).sum(), logits)
            return grad

        return run

    wrap = forward_backward if case.endswith("backward") else forward
    return {"tokenkern": wrap(ours), "torch": wrap(theirs)}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-N{}-k{}".format(*s))
def test_gumbel_topk(compare, shape, dtype, case):
    b, n, k = shape
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(b, n, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(b, n, generator=gen)
    compare(
        fns(case, logits, weight, k),
        check(case),
        group=f"gumbel_topk {case} B={b} N={n} k={k} tau={TAU} {dtype_id(dtype)}",
    )
