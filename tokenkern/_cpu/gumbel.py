"""gumbel_topk in torch: the CPU kernel of the op, and the backward of both paths.

The relaxation (see ``reference.relaxed_topk``): z_1 = z, alpha_j = softmax(z_j / tau),
z_{j+1} = z_j + log(max(1 - alpha_j, tiny)), soft = sum_j alpha_j, for j = 1..k.

Its backward is a reverse pass over the k steps. It needs every alpha_j, in reverse order;
instead of keeping k x (B, N) of them, the forward is recomputed keeping z_j every
ceil(sqrt(k)) steps, and each segment is recomputed again during the reverse pass: about
2 sqrt(k) x (B, N) floats of memory for three forward-sized passes of work.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..reference import GUMBEL_TINY


def noise(batch: int, n: int, seed: int, device: torch.device) -> Tensor:
    """(B, N) float32 Gumbel(0, 1) noise of the CPU kernel: uniform draws of a CPU
    ``torch.Generator`` seeded with ``seed`` in row-major order, then -log(-log(u)).
    (The CUDA kernel draws its noise differently: a sample depends on seed and device type.)"""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.rand(batch, n, generator=gen, dtype=torch.float32)
    g = -torch.log(-torch.log(u.clamp_min(GUMBEL_TINY)))
    return g.to(device)


def _step(z: Tensor, tau: float) -> Tensor:
    return torch.softmax(z / tau, dim=-1)


def _next(z: Tensor, alpha: Tensor) -> Tensor:
    return z + torch.log(torch.clamp_min(1 - alpha, GUMBEL_TINY))


def _clean(z: Tensor) -> Tensor:
    return torch.where(torch.isnan(z), float("-inf"), z)


def relaxed_topk(z: Tensor, k: int, tau: float) -> Tensor:
    """soft = sum of the k successive softmaxes of z (B, N), in z's dtype; NaN counts as -inf."""
    z = _clean(z)
    soft = torch.zeros_like(z)
    for j in range(k):
        alpha = _step(z, tau)
        soft += alpha
        if j + 1 < k:
            z = _next(z, alpha)
    return soft


def relaxed_topk_backward(z: Tensor, k: int, tau: float, grad: Tensor) -> Tensor:
    """d(sum grad * relaxed_topk(z, k, tau)) / dz, in z's dtype (0 where z is NaN)."""
    z = _clean(z)
    grad = grad.to(z.dtype)
    seg = math.isqrt(k - 1) + 1  # ceil(sqrt(k))
    checkpoints = []
    zj = z
    for j in range(k):
        if j % seg == 0:
            checkpoints.append(zj)
        if j + 1 < k:
            zj = _next(zj, _step(zj, tau))
    gz = torch.zeros_like(z)  # dL/dz_{j+1} while step j is processed
    for c in reversed(range(len(checkpoints))):
        start, stop = c * seg, min(k, (c + 1) * seg)
        alphas = []
        zj = checkpoints[c]
        for j in range(start, stop):
            alphas.append(_step(zj, tau))
            if j + 1 < stop:
                zj = _next(zj, alphas[-1])
        for j in reversed(range(start, stop)):
            alpha = alphas[j - start]
            g_alpha = grad
            if j + 1 < k:
                # z_{j+1} = z_j + log(clamp_min(1 - alpha_j, tiny)): clamped entries pass nothing.
                one_minus = 1 - alpha
                g_alpha = g_alpha - torch.where(one_minus >= GUMBEL_TINY, gz / one_minus, 0.0)
            # alpha_j = softmax(z_j / tau); z_j also flows on to z_{j+1} unchanged.
            g_t = alpha * (g_alpha - (alpha * g_alpha).sum(-1, keepdim=True))
            gz = gz + g_t / tau
    return gz


def hard_mask(z: Tensor, k: int) -> Tensor:
    """(B, N) float32 mask of the k largest scores per row (the topk_gather rule: ties to the
    lower index, NaN as -inf), selected by the topk_gather op."""
    _, indices = torch.ops.tokenkern.topk_gather(z, z.unsqueeze(-1), k)
    return torch.zeros_like(z).scatter_(1, indices, 1.0)


def gumbel_topk(logits: Tensor, k: int, tau: float, seed: int, hard: bool) -> Tensor:
    batch, n = logits.shape
    z = logits.float() + noise(batch, n, seed, logits.device)
    return hard_mask(z, k) if hard else relaxed_topk(z, k, tau)


def gumbel_topk_backward(grad: Tensor, logits: Tensor, z: Tensor, k: int, tau: float) -> Tensor:
    """Gradient w.r.t. logits in logits' dtype, from the perturbed scores z (float32)."""
    return relaxed_topk_backward(z, k, tau, grad.float()).to(logits.dtype)
