"""Sequence bookkeeping for pruning inside a decoder: which positions are image tokens, the
gather that drops pruned positions, and the matching transforms of masks and positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..methods.base import mask_to_indices


def image_ids(input_ids: Tensor, image_token_id: int) -> Tensor:
    """(B, L) int64: the index (0, 1, ... per sample) of the image each placeholder token belongs
    to (one contiguous run of placeholders per image), -1 for every other token."""
    is_img = input_ids == image_token_id
    starts = is_img.clone()
    starts[:, 1:] &= ~is_img[:, :-1]
    run = torch.cumsum(starts.long(), dim=1) - 1
    return torch.where(is_img, run, -1)


def text_after_first_image(image: Tensor, valid: Tensor) -> Tensor:
    """(B, L) bool: valid non-image tokens after the first image token of the sample."""
    seen = torch.cummax((image >= 0).long(), dim=1).values.bool()
    return seen & (image < 0) & valid


@dataclass
class Gather:
    """Positions kept in a pruned prefill: idx (B, L') into the original length L, left-padded
    where a sample keeps fewer than L' positions; valid (B, L') False at that padding.
    padded: whether valid has a False (known on the host, so that the pruned layers' masks
    need no further sync)."""

    idx: Tensor
    valid: Tensor
    length: int
    padded: bool

    @property
    def kept_length(self) -> int:
        return self.idx.shape[1]

    @staticmethod
    def from_mask(keep: Tensor, valid: Tensor, sizes: tuple[int, bool] | None = None) -> Gather:
        """keep, valid: (B, L) bool (positions to keep; the original padding). One host sync
        sizes the result and tells whether it is padded, unless `sizes` gives both: (the most
        positions a sample keeps, whether a sample keeps fewer or keeps a padding position)."""
        counts = keep.sum(dim=1)
        if sizes is None:
            # Padded: a sample keeps fewer than the most, or keeps a position that was padding.
            max_count = counts.max()
            padded_any = (counts < max_count).any() | (keep & ~valid).any()
            kept, padded = torch.stack([max_count, padded_any.long()]).tolist()
        else:
            kept, padded = sizes
        b, length = keep.shape
        # Kept positions first in order, then the others; rotate each row so that the padding
        # (taken from the unkept positions) comes first: left padding.
        order = mask_to_indices(keep, length)
        shift = kept - counts  # padding slots at the front of each row
        slot = torch.arange(kept, device=keep.device).expand(b, kept)
        src = torch.where(slot >= shift[:, None], slot - shift[:, None], counts[:, None] + slot)
        src = src.clamp(max=length - 1)
        idx = order.gather(1, src)
        real = slot >= shift[:, None]
        return Gather(idx, real & valid.gather(1, idx), length, bool(padded))

    def then(self, inner: Gather) -> Gather:
        """The gather that applies `inner` (which indexes this gather's kept positions) after
        this one: its positions index the unpruned sequence."""
        return Gather(self.idx.gather(1, inner.idx), inner.valid, self.length, inner.padded)

    def tokens(self, x: Tensor, dim: int = 1) -> Tensor:
        """Gather along `dim` (the sequence dimension) of x; a batch dimension of 1 (e.g. rotary
        tables shared by the batch) is broadcast first."""
        if x.shape[0] != self.idx.shape[0]:
            x = x.expand(self.idx.shape[0], *x.shape[1:])
        shape = [1] * x.dim()
        shape[0] = self.idx.shape[0]
        shape[dim] = self.idx.shape[1]
        index = self.idx.view(shape).expand(*[x.shape[i] if i != dim else self.idx.shape[1] for i in range(x.dim())])
        return x.gather(dim, index)

    def positions(self, position_ids: Tensor) -> Tensor:
        """position_ids (..., B or 1, L) -> (..., B, L'): gathered along the last dimension."""
        b = self.idx.shape[0]
        lead = position_ids.shape[:-2]
        p = position_ids.expand(*lead, b, self.length)
        return p.gather(-1, self.idx.expand(*lead, b, self.kept_length))

    def columns(self, extra: int, device: torch.device) -> Tensor:
        """(B, L' + extra) key columns after prefill: the kept prefix, then `extra` new ones."""
        b = self.idx.shape[0]
        new = torch.arange(self.length, self.length + extra, device=device).expand(b, extra)
        return torch.cat([self.idx, new], dim=1)

    def column_valid(self, extra: int) -> Tensor:
        b = self.idx.shape[0]
        return torch.cat([self.valid, torch.ones(b, extra, dtype=torch.bool, device=self.valid.device)], dim=1)


def transform_mask(
    mask: Tensor | None, rows: Tensor | None, cols: Tensor, col_valid: Tensor, padded: bool, causal_rows: bool
):
    """Carry a layer's attention mask over to the pruned sequence.

    mask: None (causal SDPA without padding), a 4-D mask (B or 1, 1, Q, K) (bool = attend, or
    additive float), or a 2-D key-padding mask (B, K). rows: (B, Q') query positions kept
    (prefill) or None (decode); cols: (B, K') key positions kept; col_valid: (B, K') False at
    added padding; padded: whether col_valid has a False (Gather.padded: no sync here).
    causal_rows: whether a new mask must be causal (prefill)."""
    b, kk = cols.shape
    if mask is None:
        if not padded:
            return None
        q = rows.shape[1] if rows is not None else 1
        allowed = col_valid[:, None, None, :].expand(b, 1, q, kk)
        if causal_rows:
            allowed = allowed & torch.ones(q, kk, dtype=torch.bool, device=cols.device).tril(kk - q)
        return allowed
    if mask.dim() == 2:
        return mask.gather(1, cols) * col_valid.to(mask.dtype)
    m = mask.expand(b, *mask.shape[1:])
    if rows is not None:
        m = m.gather(2, rows[:, None, :, None].expand(b, m.shape[1], rows.shape[1], m.shape[3]))
    m = m.gather(3, cols[:, None, None, :].expand(b, m.shape[1], m.shape[2], kk))
    if m.dtype == torch.bool:
        return m & col_valid[:, None, None, :]
    return m.masked_fill(~col_valid[:, None, None, :], torch.finfo(m.dtype).min)
