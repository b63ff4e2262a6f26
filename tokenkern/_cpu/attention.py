"""CPU path of the attention-score ops, in torch: queries in chunks, so at most a bounded
slab of the attention matrix exists at a time (never Nq x Nk for large inputs)."""

from __future__ import annotations

import torch
from torch import Tensor

_SLAB_ELEMENTS = 1 << 22  # logits held at once: B * Hq * chunk * Nk


def attention_scores(
    q: Tensor,
    k: Tensor,
    lse: Tensor | None,
    scale: float,
    key_start: int,
    key_end: int,
    query_mask: Tensor | None,
    key_mask: Tensor | None,
    causal_offset: int | None,
    mean: bool,
) -> Tensor:
    """q: (B, Hq, Nq, d), k: (B, Hkv, Nk, d) and the checked arguments of
    ``tokenkern.ops.attention.KernelArgs`` -> (B, key_end - key_start) float32."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    qf = q.float().view(b, hkv, g, nq, d)
    kt = k.float()[:, :, None].mT  # (B, Hkv, 1, d, Nk)
    lse_g = None if lse is None else lse.view(b, hkv, g, nq)
    keys = torch.arange(nk, device=q.device)
    total = torch.zeros(b, nk, dtype=torch.float32, device=q.device)
    n_valid = torch.zeros(b, dtype=torch.float32, device=q.device)
    chunk = max(1, _SLAB_ELEMENTS // max(1, b * hq * nk))
    for i0 in range(0, nq, chunk):
        rows = torch.arange(i0, min(nq, i0 + chunk), device=q.device)
        vis = torch.ones(b, len(rows), nk, dtype=torch.bool, device=q.device)
        if key_mask is not None:
            vis &= key_mask[:, None, :]
        if causal_offset is not None:
            vis &= keys[None, None, :] <= causal_offset + rows[None, :, None]
        q_ok = vis.any(dim=-1)
        if query_mask is not None:
            q_ok &= query_mask[:, rows]
        n_valid += q_ok.sum(dim=-1)
        vis5 = vis[:, None, None]
        s = (qf[:, :, :, rows] @ kt) * scale
        s = s.masked_fill(~vis5, float("-inf"))
        keep = vis5 & q_ok[:, None, None, :, None]
        if lse_g is None:
            # NaN logits make the row's lse NaN and so poison the row, as the softmax does.
            lse_c = torch.logsumexp(s, dim=-1)
        else:
            lse_c = lse_g[..., rows]
            keep = keep & torch.isfinite(lse_c)[..., None]
        p = torch.where(keep, torch.exp(s - lse_c[..., None]), 0.0)
        total += p.sum(dim=(1, 2, 3))
    if mean:
        total = total / (hq * n_valid).clamp(min=1)[:, None]
    return total[:, key_start:key_end].clone()
