"""Gumbel top-k (the CUDA kernel of ``tokenkern::gumbel_topk``).

One program owns one row of logits. It draws the Gumbel noise of every element from
``(seed, b * N + i)`` with Philox (``tl.rand``), forms the perturbed scores
``z = float32(logits) + g`` and then either

- HARD: selects the k largest z (the topk_gather rule: ties to the lower index, NaN as
  -inf) with the same threshold search as topk_gather and writes the 0/1 mask, or
- SOFT: runs the k steps of the successive-softmax relaxation (``reference.relaxed_topk``)
  and writes ``soft = sum_j alpha_j``.

When the row fits one chunk (N <= 4096) everything stays in registers: one read of the
logits and one write of the output. Longer rows keep z in a scratch row (the output row
itself for HARD) and make two passes per relaxation step (online max and sum, then the
update). The hard forward of ``gumbel_topk(hard=True)`` needs no relaxation: its gradient
is computed in the backward from the same noise, redrawn bit for bit.

The backward (``gumbel_topk_backward``) is one program per row as well: it redraws the noise,
runs the k relaxation steps keeping z_j every ceil(sqrt(k)) steps in a scratch buffer, then walks
the segments in reverse, recomputing each segment's alphas into a second scratch buffer and
back-propagating through them (the algorithm of ``_cpu.gumbel.relaxed_topk_backward``, in one
launch instead of ~10 k torch kernels). About 2 sqrt(k) x N floats of scratch per row. Rows
longer than one chunk fall back to that torch backward.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .topk_gather import MAX_CHUNK, selection_key, topk_threshold
from .utils import empty, next_pow2

_NOISE_BLOCK = 1024


@triton.jit
def gumbel_noise(seed, offsets):
    """Gumbel(0, 1) noise, float32: -log(-log(max(u, 2^-126))) for u = tl.rand(seed, offsets)."""
    u = tl.maximum(tl.rand(seed, offsets), 1.1754943508222875e-38)
    return -tl.log(-tl.log(u))


@triton.jit
def _perturb(l_row, l_sn, noise_row, b, N, seed, offs, STORE_NOISE: tl.constexpr):
    valid = offs < N
    g = gumbel_noise(seed, b * N + offs)
    if STORE_NOISE:
        tl.store(noise_row + offs, g, mask=valid)
    return tl.load(l_row + offs * l_sn, mask=valid, other=0.0).to(tl.float32) + g


@triton.jit
def _gumbel_topk_kernel(
    l_ptr,
    out_ptr,
    noise_ptr,
    z_ptr,
    N,
    k,
    inv_tau,
    seed,
    l_sb,
    l_sn,
    CHUNK: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
    HARD: tl.constexpr,
    STORE_NOISE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    l_row = l_ptr + b * l_sb
    out_row = out_ptr + b * N
    noise_row = noise_ptr + b * N
    z_row = z_ptr + b * N  # scratch z (out_row itself for HARD)
    tiny = 1.1754943508222875e-38

    if SINGLE_CHUNK:
        offs = tl.arange(0, CHUNK)
        valid = offs < N
        z = _perturb(l_row, l_sn, noise_row, b, N, seed, offs, STORE_NOISE)
        if HARD:
            tl.store(z_row + offs, z, mask=valid)
            tl.debug_barrier()
            thr = topk_threshold(z_row, 1, N, k, CHUNK, True)
            key = selection_key(z)
            gt = (key > thr) & valid
            eq = ((key == thr) & valid).to(tl.int32)
            ties = k - tl.sum(gt.to(tl.int32), 0)
            rank = tl.cumsum(eq, 0) - eq
            sel = gt | ((eq == 1) & (rank < ties))
            tl.store(out_row + offs, sel.to(tl.float32), mask=valid)
        else:
            z = tl.where(valid & (z == z), z, float("-inf"))
            soft = tl.zeros((CHUNK,), tl.float32)
            for _ in range(0, k):
                t = z * inv_tau
                e = tl.exp(t - tl.max(t, 0))
                alpha = e / tl.sum(e, 0)
                soft += alpha
                z = z + tl.log(tl.maximum(1.0 - alpha, tiny))
            tl.store(out_row + offs, soft, mask=valid)
    else:
        for c0 in range(0, N, CHUNK):
            offs = c0 + tl.arange(0, CHUNK)
            valid = offs < N
            z = _perturb(l_row, l_sn, noise_row, b, N, seed, offs, STORE_NOISE)
            if not HARD:
                z = tl.where(z == z, z, float("-inf"))
                tl.store(out_row + offs, tl.zeros((CHUNK,), tl.float32), mask=valid)
            tl.store(z_row + offs, z, mask=valid)
        tl.debug_barrier()
        if HARD:
            thr = topk_threshold(z_row, 1, N, k, CHUNK, False)
            gt_total = tl.zeros((), tl.int32)
            for c0 in range(0, N, CHUNK):
                offs = c0 + tl.arange(0, CHUNK)
                key = selection_key(tl.load(z_row + offs, mask=offs < N, other=0.0))
                gt_total += tl.sum(((key > thr) & (offs < N)).to(tl.int32), 0)
            ties = k - gt_total
            eq_seen = tl.zeros((), tl.int32)
            tl.debug_barrier()
            for c0 in range(0, N, CHUNK):
                offs = c0 + tl.arange(0, CHUNK)
                valid = offs < N
                key = selection_key(tl.load(z_row + offs, mask=valid, other=0.0))
                gt = (key > thr) & valid
                eq = ((key == thr) & valid).to(tl.int32)
                rank = eq_seen + tl.cumsum(eq, 0) - eq
                sel = gt | ((eq == 1) & (rank < ties))
                eq_seen += tl.sum(eq, 0)
                tl.store(out_row + offs, sel.to(tl.float32), mask=valid)
        else:
            for _ in range(0, k):
                # Online max and sum of exp(z / tau) over the row.
                m = tl.full((), float("-inf"), tl.float32)
                s = tl.zeros((), tl.float32)
                for c0 in range(0, N, CHUNK):
                    offs = c0 + tl.arange(0, CHUNK)
                    t = tl.load(z_row + offs, mask=offs < N, other=float("-inf")) * inv_tau
                    m_new = tl.maximum(m, tl.max(t, 0))
                    rescale = tl.where(m_new == m, 1.0, tl.exp(m - m_new))
                    s = s * rescale + tl.sum(tl.where(t == float("-inf"), 0.0, tl.exp(t - m_new)), 0)
                    m = m_new
                for c0 in range(0, N, CHUNK):
                    offs = c0 + tl.arange(0, CHUNK)
                    valid = offs < N
                    z = tl.load(z_row + offs, mask=valid, other=float("-inf"))
                    alpha = tl.where(z == float("-inf"), 0.0, tl.exp(z * inv_tau - m)) / s
                    tl.store(out_row + offs, tl.load(out_row + offs, mask=valid) + alpha, mask=valid)
                    tl.store(z_row + offs, z + tl.log(tl.maximum(1.0 - alpha, tiny)), mask=valid)
                tl.debug_barrier()


@triton.jit
def _softmax_row(z, inv_tau):
    t = z * inv_tau
    e = tl.exp(t - tl.max(t, 0))
    return e / tl.sum(e, 0)


@triton.jit
def _gumbel_topk_backward_kernel(
    l_ptr,
    g_ptr,
    out_ptr,
    ckpt_ptr,
    alpha_ptr,
    N,
    k,
    seg,
    n_ckpt,
    inv_tau,
    seed,
    l_sb,
    l_sn,
    g_sb,
    g_sn,
    CHUNK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, CHUNK)
    valid = offs < N
    tiny = 1.1754943508222875e-38
    ckpt_row = ckpt_ptr + b * n_ckpt * N
    alpha_row = alpha_ptr + b * seg * N

    z = _perturb(l_ptr + b * l_sb, l_sn, l_ptr, b, N, seed, offs, False)
    z = tl.where(valid & (z == z), z, float("-inf"))
    grad = tl.load(g_ptr + b * g_sb + offs * g_sn, mask=valid, other=0.0).to(tl.float32)

    # Forward: z_j at the start of every segment.
    for j in range(0, k):
        if j % seg == 0:
            tl.store(ckpt_row + (j // seg) * N + offs, z, mask=valid)
        z = z + tl.log(tl.maximum(1.0 - _softmax_row(z, inv_tau), tiny))
    tl.debug_barrier()

    # Reverse: gz holds dL/dz_{j+1} while step j is processed.
    gz = tl.zeros((CHUNK,), tl.float32)
    for ci in range(0, n_ckpt):
        c = n_ckpt - 1 - ci
        start = c * seg
        stop = tl.minimum(k, start + seg)
        z = tl.load(ckpt_row + c * N + offs, mask=valid, other=float("-inf"))
        for j in range(start, stop):
            alpha = _softmax_row(z, inv_tau)
            tl.store(alpha_row + (j - start) * N + offs, alpha, mask=valid)
            z = z + tl.log(tl.maximum(1.0 - alpha, tiny))
        tl.debug_barrier()
        for jj in range(0, stop - start):
            j = stop - 1 - jj
            alpha = tl.load(alpha_row + (j - start) * N + offs, mask=valid, other=0.0)
            g_alpha = grad
            if j + 1 < k:
                # z_{j+1} = z_j + log(max(1 - alpha_j, tiny)): clamped entries pass nothing.
                one_minus = 1.0 - alpha
                g_alpha = g_alpha - tl.where(one_minus >= tiny, gz / one_minus, 0.0)
            g_t = alpha * (g_alpha - tl.sum(alpha * g_alpha, 0))
            gz = gz + g_t * inv_tau
        tl.debug_barrier()
    tl.store(out_ptr + b * N + offs, gz, mask=valid)


@triton.jit
def _noise_kernel(out_ptr, total, seed, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, gumbel_noise(seed, offs), mask=offs < total)


def _num_warps(chunk: int) -> int:
    return 4 if chunk <= 1024 else 8


def gumbel_topk(
    logits: torch.Tensor, k: int, tau: float, seed: int, hard: bool, return_noise: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits: (B, N) floating -> (out (B, N) float32, noise (B, N) float32 or None).
    out is the hard 0/1 mask when ``hard`` and the relaxation ``soft`` otherwise; the noise
    (what the kernel drew) is returned when ``return_noise``."""
    batch, n = logits.shape
    out = empty(batch, n, dtype=torch.float32, device=logits.device)
    noise_out = empty(batch, n, dtype=torch.float32, device=logits.device) if return_noise else None
    if batch == 0:
        return out, noise_out
    chunk = min(max(next_pow2(n), 16), MAX_CHUNK)
    single = n <= chunk
    z = out if hard or single else empty(batch, n, dtype=torch.float32, device=logits.device)
    _gumbel_topk_kernel[(batch,)](
        logits,
        out,
        out if noise_out is None else noise_out,
        z,
        n,
        k,
        1.0 / tau,
        seed,
        logits.stride(0),
        logits.stride(1),
        CHUNK=chunk,
        SINGLE_CHUNK=single,
        HARD=hard,
        STORE_NOISE=return_noise,
        num_warps=_num_warps(chunk),
    )
    return out, noise_out


def noise(batch: int, n: int, seed: int, device: torch.device) -> torch.Tensor:
    """(B, N) float32: the noise ``gumbel_topk`` draws for these (seed, B, N), bit for bit."""
    out = empty(batch, n, dtype=torch.float32, device=device)
    total = batch * n
    if total:
        _noise_kernel[(triton.cdiv(total, _NOISE_BLOCK),)](out, total, seed, BLOCK=_NOISE_BLOCK)
    return out


def gumbel_topk_backward(grad: torch.Tensor, logits: torch.Tensor, k: int, tau: float, seed: int) -> torch.Tensor:
    """grad, logits: (B, N) -> d(sum grad * gumbel_topk(logits, k, tau, seed)) / d logits, float32,
    through the relaxation (either value of hard). One fused launch for N <= 4096; longer rows
    use the torch backward on the same noise."""
    batch, n = logits.shape
    if n > MAX_CHUNK:
        from .._cpu import gumbel as cpu_gumbel

        z = logits.float() + noise(batch, n, seed, logits.device)
        return cpu_gumbel.relaxed_topk_backward(z, k, tau, grad.float())
    out = empty(batch, n, dtype=torch.float32, device=logits.device)
    if batch == 0:
        return out
    seg = math.isqrt(k - 1) + 1  # ceil(sqrt(k))
    n_ckpt = -(-k // seg)
    ckpt = torch.empty(batch, n_ckpt, n, dtype=torch.float32, device=logits.device)
    alphas = torch.empty(batch, seg, n, dtype=torch.float32, device=logits.device)
    chunk = max(next_pow2(n), 16)
    _gumbel_topk_backward_kernel[(batch,)](
        logits,
        grad,
        out,
        ckpt,
        alphas,
        n,
        k,
        seg,
        n_ckpt,
        1.0 / tau,
        seed,
        logits.stride(0),
        logits.stride(1),
        grad.stride(0),
        grad.stride(1),
        CHUNK=chunk,
        num_warps=_num_warps(chunk),
    )
    return out
