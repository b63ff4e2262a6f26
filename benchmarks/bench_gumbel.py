"""gumbel_topk (forward + backward, straight-through) against the same relaxation written with
torch ops (the threshold lambda by bisection without grad, then one Newton step that carries the
implicit-function gradient through autograd)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, HAS_CUDA

import tokenkern

SHAPES = [(b, n, k) for b in (8, 64) for n in (576, 2880) for k in (n // 10, n // 4)] if HAS_CUDA else [(4, 256, 26)]
TAU = 0.5


@torch.no_grad()
def bisect_threshold(z: torch.Tensor, k: int, tau: float, steps: int, margin: float) -> torch.Tensor:
    """z: (B, N) -> lam (B, 1) with sum sigmoid((z - lam) / tau) = k, by `steps` bisection steps
    over [min z - margin tau, max z + margin tau], in z's dtype."""
    lo = z.amin(-1, keepdim=True) - margin * tau
    hi = z.amax(-1, keepdim=True) + margin * tau
    for _ in range(steps):
        mid = (lo + hi) / 2
        above = torch.sigmoid((z - mid) / tau).sum(-1, keepdim=True) > k
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return (lo + hi) / 2


def torch_gumbel_topk(logits: torch.Tensor, k: int, tau: float, seed: int, steps: int = 40) -> torch.Tensor:
    gen = torch.Generator(device=logits.device).manual_seed(seed)
    u = torch.rand(logits.shape, generator=gen, device=logits.device).clamp_min(2.0**-126)
    z = logits.float() - torch.log(-torch.log(u))
    lam = bisect_threshold(z, k, tau, steps, margin=20)
    s = torch.sigmoid((z - lam) / tau)
    ds = s * (1 - s) / tau
    lam = lam + (s.sum(-1, keepdim=True) - k) / ds.sum(-1, keepdim=True).clamp_min(1e-30)  # Newton: exact grad
    soft = torch.sigmoid((z - lam) / tau)
    hard = torch.zeros_like(z).scatter_(1, z.detach().topk(k, dim=-1).indices, 1.0)
    return hard + (soft - soft.detach())


@pytest.mark.parametrize("impl", ["tokenkern", "torch"])
@pytest.mark.parametrize(("b", "n", "k"), SHAPES)
def test_gumbel_topk_forward_backward(run_benchmark, impl, b, n, k):
    logits = torch.randn(b, n, device=DEVICE, requires_grad=True)
    weight = torch.randn(b, n, device=DEVICE)

    def step():
        mask = tokenkern.gumbel_topk(logits, k, TAU, 0) if impl == "tokenkern" else torch_gumbel_topk(logits, k, TAU, 0)
        (grad,) = torch.autograd.grad((mask * weight).sum(), logits)
        return grad

    info = {"impl": impl, "B": b, "N": n, "k": k, "tau": TAU}
    run_benchmark(step, group=f"gumbel_topk fwd+bwd B={b} N={n} k={k}", **info)
