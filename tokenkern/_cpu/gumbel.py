"""gumbel_topk in torch: the CPU kernel of the op, and the backward of both paths.

The relaxation (see ``reference.relaxed_topk``): soft_i = sigmoid((z_i - lambda) / tau) with
lambda such that sum_i soft_i = k, in the shifted form d = (z - a) / tau around the anchor a
(the k-th largest z) and u = (lambda - a) / tau, found by bisection over the bit patterns of
z's dtype (32 steps for float32, 64 for float64). The op runs it in float64 on the float32
perturbed scores. The backward is the implicit-function gradient, O(N) per row:
with s'_i = soft_i (1 - soft_i), grad_z = (s' / tau) (g - sum(g s') / sum(s')).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

# float32's smallest normal number: the floor of the uniform draw (the Triton kernel's too).
UNIFORM_FLOOR = 2.0**-126


def noise(batch: int, n: int, seed: int, device: torch.device) -> Tensor:
    """(B, N) float32 Gumbel(0, 1) noise of the CPU kernel: uniform draws of a CPU
    ``torch.Generator`` seeded with ``seed`` in row-major order, then -log(-log(u)).
    (The CUDA kernel draws its noise differently: a sample depends on seed and device type.)"""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.rand(batch, n, generator=gen, dtype=torch.float32)
    g = -torch.log(-torch.log(u.clamp_min(UNIFORM_FLOOR)))
    return g.to(device)


_INT_OF = {torch.float32: (torch.int32, 0x7FFFFFFF, 32), torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF, 64)}


def _key(x: Tensor) -> Tensor:
    """Floats (no NaN) -> integers of the same width whose signed order is the values' order."""
    itype, flip, _ = _INT_OF[x.dtype]
    bits = (x + 0.0).view(itype)  # + 0.0 turns -0.0 into +0.0
    return torch.where(bits < 0, bits ^ flip, bits)


def _unkey(key: Tensor, dtype: torch.dtype) -> Tensor:
    _, flip, _ = _INT_OF[dtype]
    return torch.where(key < 0, key ^ flip, key).view(dtype)


class Relaxation(NamedTuple):
    """The relaxation of a row set: x = d - u (B, N), soft_i = sigmoid(x_i); ``top`` (B, N)
    bool, the hard mask; ``degenerate`` (B, 1) bool, the rows without a finite lambda (they
    take the hard mask)."""

    x: Tensor
    top: Tensor
    degenerate: Tensor


def _scaled(z: Tensor, anchor: Tensor, tau: float) -> Tensor:
    """d = (z - anchor) / tau, with the difference clamped to the dtype's range (so that no
    0 * inf appears for huge tau) and the infinities of z kept exactly."""
    big = torch.finfo(z.dtype).max
    d = (z - anchor).clamp(-big, big) / tau
    return torch.where(torch.isinf(z), z, d)


def hard_mask_of(z: Tensor, k: int) -> Tensor:
    """(B, N) mask in z's dtype of the k largest z per row (ties to the lower index, NaN as
    -inf), any floating dtype."""
    z = torch.where(torch.isnan(z), float("-inf"), z)
    order = torch.sort(z, dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(z).scatter_(1, order, 1.0)


def _excess(x: Tensor, top: Tensor) -> Tensor:
    """sum_i sigmoid(x_i) - k with top the hard mask (k ones), summed as sigmoid(x_i) off top
    and -sigmoid(-x_i) on it: small terms, so nothing cancels when soft is nearly hard."""
    return torch.where(top, -torch.sigmoid(-x), torch.sigmoid(x)).sum(-1, keepdim=True)


def relax(z: Tensor, k: int, tau: float) -> Relaxation:
    """z: (B, N) float32 or float64 (NaN as -inf) -> the relaxation, in z's dtype."""
    z = torch.where(torch.isnan(z), float("-inf"), z)
    n = z.shape[-1]
    itype, _, steps = _INT_OF[z.dtype]
    pinf = (z == float("inf")).sum(-1, keepdim=True)
    alive = (z > float("-inf")).sum(-1, keepdim=True)
    degenerate = (pinf >= k) | (alive <= k)
    top = hard_mask_of(z, k) > 0
    anchor = torch.where(degenerate, 0.0, z.topk(k, dim=-1).values[:, k - 1 :])
    d = _scaled(z, anchor, tau)
    # Bracket: at min(finite d) - log N the sum exceeds k, at log N it is below k.
    big = torch.finfo(z.dtype).max
    hi_u = torch.full_like(anchor, math.log(n))
    dmin = torch.where(torch.isfinite(d), d, float("inf")).amin(-1, keepdim=True)
    lo_u = torch.minimum((dmin - math.log(n)).clamp(-big, big), hi_u)
    lo, hi = _key(lo_u).long(), _key(hi_u).long()
    e_lo = torch.full_like(hi_u, float("inf"))
    e_hi = torch.full_like(hi_u, float("-inf"))
    for _ in range(steps):
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        e = _excess(d - _unkey(mid.to(itype), z.dtype), top)
        take = e >= 0
        lo, e_lo = torch.where(take, mid, lo), torch.where(take, e, e_lo)
        hi, e_hi = torch.where(take, hi, mid), torch.where(take, e_hi, e)
    u = _unkey(torch.where(e_lo <= -e_hi, lo, hi).to(itype), z.dtype)
    return Relaxation(d - u, top, degenerate)


def relaxed_topk(z: Tensor, k: int, tau: float) -> Tensor:
    """soft (B, N) in z's dtype (float32 or float64); NaN counts as -inf."""
    r = relax(z, k, tau)
    return torch.where(r.degenerate, r.top.to(z.dtype), torch.sigmoid(r.x))


def relaxed_topk_backward(z: Tensor, k: int, tau: float, grad: Tensor) -> Tensor:
    """d(sum grad * relaxed_topk(z, k, tau)) / dz, in z's dtype (0 where z is not finite and
    in rows without a finite lambda)."""
    r = relax(z, k, tau)
    grad = grad.to(z.dtype)
    sp = torch.sigmoid(r.x) * torch.sigmoid(-r.x)  # s (1 - s) without cancelling near s = 1
    total = sp.sum(-1, keepdim=True)
    c = (grad * sp).sum(-1, keepdim=True) / torch.where(total > 0, total, 1.0)
    gz = sp * (grad - c) / tau
    return torch.where(r.degenerate | (total == 0), 0.0, gz)


def hard_mask(z: Tensor, k: int) -> Tensor:
    """(B, N) float32 mask of the k largest scores per row (the topk_gather rule: ties to the
    lower index, NaN as -inf), selected by the topk_gather op."""
    _, indices = torch.ops.tokenkern.topk_gather(z, z.unsqueeze(-1), k)
    return torch.zeros_like(z).scatter_(1, indices, 1.0)


def gumbel_topk(logits: Tensor, k: int, tau: float, seed: int, hard: bool) -> Tensor:
    batch, n = logits.shape
    z = logits.float() + noise(batch, n, seed, logits.device)
    return hard_mask(z, k) if hard else relaxed_topk(z.double(), k, tau).float()


def gumbel_topk_backward(grad: Tensor, logits: Tensor, z: Tensor, k: int, tau: float) -> Tensor:
    """Gradient w.r.t. logits in logits' dtype, from the perturbed scores z (float32),
    computed in float64."""
    return relaxed_topk_backward(z.double(), k, tau, grad.double()).to(logits.dtype)
