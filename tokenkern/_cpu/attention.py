"""CPU path of the attention-score ops. Many queries (prefill): in torch, one sample at a
time, its queries in blocks of rows and its key heads in groups, so at most a bounded slab of
the attention matrix exists at a time (never Nq x Nk for large inputs).

Only work that can reach the result is done. Masked keys and invalid queries are dropped
before any product (index_select: padding costs nothing, and no boolean visibility tensor is
built per slab). Then every query sees a prefix of the kept keys, growing with the query when
causal, so a block of rows forms the logits of its longest prefix only and masks just the
causal staircase inside it. Without lse a slab is then one in-place softmax, and its columns
in [key_start, key_end) are summed over heads and rows; with lse only the columns of that
range are formed, and exp(s - lse) summed. Queries that see no key of the range are skipped
(they still count in the mean).

Few queries per key head (decode, the last token: at most _KERNEL_ROWS query rows per key
head, Nq * Hq / Hkv) run the whole call, every sample, in the C++ kernel
``tokenkern::_attn_scores_kernel`` (csrc/cpu/attention_cpu.cpp): q and k read in place, each
K row once for all the query rows that share it, logits in float32, one fixed summation order
whatever the thread count. Only the rest takes the path below.

Logits accumulate in float32, as on the CUDA path: fp16/bf16 inputs are converted to float32
exactly (K once when several row blocks share it, else in cache-sized pieces) for
torch.baddbmm.

Determinism: the slabs, their shapes and the order in which their column sums are added
depend only on the input shapes and masks, and MKL's sgemm under torch.baddbmm and torch's
softmax and reductions are deterministic for a fixed shape, alignment and thread count: reruns
are bit-identical on one machine at one thread count.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (the C++ kernel of few queries)

_BLOCK_ROWS = 64  # query rows per slab: the causal staircase wastes ~BLOCK_ROWS / (2 Nq)
_SLAB_ELEMENTS = 1 << 20  # logits held at once (4 MiB, about the L2 caches); key heads grouped to fit
_CONVERT_ELEMENTS = 1 << 18  # fp16/bf16 keys converted at once when a single block of rows reads them
# Query rows per key head (Nq * Hq / Hkv) up to which the C++ kernel runs the call: it reads
# each K row once for all of them, while blocked GEMMs win once the rows share enough work.
_KERNEL_ROWS = 16


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
    if q.shape[2] * (q.shape[1] // k.shape[1]) <= _KERNEL_ROWS:
        return torch.ops.tokenkern._attn_scores_kernel(
            q, k, lse, scale, key_start, key_end, query_mask, key_mask, causal_offset, mean
        )
    out = torch.zeros(q.shape[0], key_end - key_start, dtype=torch.float32, device=q.device)
    for b in range(q.shape[0]):
        _sample_scores(
            out[b],
            q[b],
            k[b],
            None if lse is None else lse[b],
            scale,
            (key_start, key_end),
            None if query_mask is None else query_mask[b],
            None if key_mask is None else key_mask[b],
            causal_offset,
            mean,
        )
    return out


def _sample_scores(
    out: Tensor,
    q: Tensor,
    k: Tensor,
    lse: Tensor | None,
    scale: float,
    key_range: tuple[int, int],
    query_mask: Tensor | None,
    key_mask: Tensor | None,
    causal_offset: int | None,
    mean: bool,
) -> None:
    """One sample: q (Hq, Nq, d), k (Hkv, Nk, d), lse (Hq, Nq) or None, masks (Nq,) and (Nk,);
    writes out (key_end - key_start,)."""
    hq, nq, d = q.shape
    hkv, nk = k.shape[0], k.shape[1]
    keys = None if key_mask is None else key_mask.nonzero().flatten()  # kept key positions
    count = _visible_counts(nq, nk, keys, causal_offset)  # query i sees kept keys [0, count[i])
    valid = count > 0 if query_mask is None else (count > 0) & query_mask
    n_valid = int(valid.sum())
    lo, hi = key_range if keys is None else _kept_range(keys, *key_range)
    if n_valid == 0 or lo >= hi:
        return
    rows = valid.nonzero().flatten()
    first = int(torch.searchsorted(count[rows], lo, right=True))  # the rows before see no key in range
    if first == len(rows):
        return
    rows, count = rows[first:], count[rows[first:]].tolist()
    # Keys [k0, k1) of the kept ones are all that is read: the longest prefix, or its part in range.
    k0, k1 = (0, count[-1]) if lse is None else (lo, min(hi, count[-1]))
    kk = k[:, k0:k1] if keys is None else k.index_select(1, keys[k0:k1])
    g = hq // hkv
    # (Hkv, R, G, d): the rows of one key head's query heads side by side, so that a block of
    # rows is a (heads, rows * G, d) view for the GEMM, without repeating k; float32 (exactly).
    qr = _rows(q, rows).float()
    qr = qr.view(hkv, g, -1, d).permute(0, 2, 1, 3)
    qr = qr.contiguous() if g > 1 else qr
    lr = None if lse is None else _rows(lse, rows).view(hkv, g, -1).permute(0, 2, 1)
    total = _column_sums(qr, kk, lr, [c - k0 for c in count], first, scale, lo - k0, hi - k0)
    if mean:
        total /= hq * n_valid
    if keys is None:
        out.copy_(total)
    else:
        out.index_copy_(0, keys[lo:hi] - key_range[0], total)


def _visible_counts(nq: int, nk: int, keys: Tensor | None, causal_offset: int | None) -> Tensor:
    """(Nq,) int64: how many kept keys each query sees (always the first ones)."""
    n_kept = nk if keys is None else keys.numel()
    if causal_offset is None:
        return torch.full((nq,), n_kept, dtype=torch.int64)
    last = torch.arange(nq) + causal_offset  # the last position query i sees
    if keys is None:
        return (last + 1).clamp(0, nk)
    return torch.searchsorted(keys, last, right=True)


def _kept_range(keys: Tensor, key_start: int, key_end: int) -> tuple[int, int]:
    """The kept keys in [key_start, key_end), as a range [lo, hi) of kept-key indices."""
    lo, hi = torch.searchsorted(keys, torch.tensor([key_start, key_end])).tolist()
    return lo, hi


def _rows(x: Tensor, rows: Tensor) -> Tensor:
    """x[:, rows] for x (H, N, ...): a view when rows is a contiguous range (no padding)."""
    start, n = int(rows[0]), rows.numel()
    if int(rows[-1]) - start + 1 == n:
        return x[:, start : start + n]
    return x.index_select(1, rows)


def _column_sums(
    qr: Tensor, kk: Tensor, lr: Tensor | None, count: list[int], first: int, scale: float, lo: int, hi: int
) -> Tensor:
    """(hi - lo,) float32: the sums over heads and rows of P at keys [lo, hi) (indices into
    the keys read, kk). qr: (Hkv, R, G, d) float32, kk: (Hkv, n_read, d), lr: (Hkv, R, G);
    count: each row's visible prefix (non-decreasing, > lo), minus the first key read; first:
    the rows' offset among the valid queries (blocks are aligned to it)."""
    hkv, r, g, d = qr.shape
    width = kk.shape[1]
    block = max(1, min(r, _BLOCK_ROWS, _SLAB_ELEMENTS // (g * width)))
    # Blocks sit at multiples of `block` among the valid queries, whatever the key range.
    starts = list(range(-(first % block), r, block))
    # fp16/bf16 keys: several blocks convert them once and share torch.baddbmm's threading (one
    # GEMM per key head and block would fork as often); one block converts them per head group
    # into a buffer that stays in cache.
    convert_per_group = kk.dtype != torch.float32 and len(starts) == 1
    if kk.dtype != torch.float32 and not convert_per_group:
        kk = kk.float()
    n_groups = -(-hkv // max(1, _SLAB_ELEMENTS // (block * g * width)))
    if convert_per_group:
        n_groups = max(n_groups, -(-hkv // max(1, _CONVERT_ELEMENTS // (width * d))))
    heads = -(-hkv // n_groups)  # key heads per slab, in equal groups
    buf = torch.empty(heads * block * g * width, dtype=torch.float32, device=qr.device)
    kbuf = torch.empty(heads * width * d, dtype=torch.float32, device=qr.device) if convert_per_group else None
    partial = torch.zeros(len(starts) * n_groups, hi - lo, dtype=torch.float32, device=qr.device)
    if lr is None:
        # A NaN row (from a non-finite q or k) is NaN at its masked entries too: only then are
        # they zeroed again after the softmax.
        clean = bool(torch.isfinite(qr).all()) and bool(torch.isfinite(kk).all())
    else:
        clean = bool(torch.isfinite(lr).all())
    slot = 0
    for r0 in starts:
        r0, r1 = max(r0, 0), min(r, r0 + block)
        c0, c1 = (0, count[r1 - 1]) if lr is None else (lo, min(hi, count[r1 - 1]))
        stair = _staircase(count[r0:r1], max(c0, count[r0]), c1, qr.device)
        for h0 in range(0, hkv, heads):
            h1 = min(hkv, h0 + heads)
            shape = (h1 - h0, (r1 - r0) * g, c1 - c0)
            s = buf[: shape[0] * shape[1] * shape[2]].view(shape)
            q_blk = qr[h0:h1, r0:r1].reshape(shape[0], -1, d)
            k_blk = kk[h0:h1, c0:c1]
            if kbuf is not None:
                k_blk = kbuf[: k_blk.numel()].view(k_blk.shape).copy_(k_blk)
            torch.baddbmm(s, q_blk, k_blk.mT, beta=0.0, alpha=scale, out=s)
            s4 = s.view(h1 - h0, r1 - r0, g, c1 - c0)
            tail = None if stair is None else s4[..., c1 - c0 - stair.shape[-1] :]
            if lr is None:
                if tail is not None:
                    tail.masked_fill_(stair, float("-inf"))
                torch.ops.aten._softmax.out(s, -1, False, out=s)
                if tail is not None and not clean:
                    tail.masked_fill_(stair, 0.0)
                if lo < min(hi, c1):
                    torch.sum(s[..., lo : min(hi, c1)], dim=(0, 1), out=partial[slot, : min(hi, c1) - lo])
            else:
                s4.sub_(lr[h0:h1, r0:r1, :, None]).exp_()
                if tail is not None:
                    tail.masked_fill_(stair, 0.0)
                if not clean:  # rows whose lse is not finite contribute nothing
                    s4.masked_fill_(~torch.isfinite(lr[h0:h1, r0:r1, :, None]), 0.0)
                torch.sum(s, dim=(0, 1), out=partial[slot, : c1 - c0])
            slot += 1
    return partial.sum(dim=0)


def _staircase(count: list[int], c0: int, c1: int, device: torch.device) -> Tensor | None:
    """(rows, 1, c1 - c0) bool: True where key c0 + j lies beyond the row's visible prefix
    count[row]; None when every row sees all of [c0, c1)."""
    if c0 >= c1 or count[0] >= c1:
        return None
    cols = torch.arange(c0, c1, device=device)
    return (cols[None, :] >= torch.tensor(count, device=device)[:, None])[:, None, :]
