"""What the recipes read from the model that already ran (no method ever re-runs attention
eagerly): the q/k of one attention layer and the tokens being reduced."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class VisionLayer:
    """One vision-tower attention layer with a [CLS] token at position 0.

    q, k: (B, H, 1 + N, d) the layer's queries and keys (before the softmax scale);
    scale: the softmax scale (d^-0.5 for CLIP/DINOv2).
    """

    q: Tensor
    k: Tensor
    scale: float

    def cls_attention(self) -> Tensor:
        """(B, N) float32: the [CLS] query's softmax attention over the patch keys, mean over
        heads (normalized over [CLS] + patches, as the tower computed it)."""
        import tokenkern

        return tokenkern.attn_scores(self.q[:, :, :1].detach(), self.k.detach(), scale=self.scale, key_start=1)

    def cls_attention_full_width(self) -> Tensor:
        """(B, N) float32: PruMerge's [CLS] attention: one softmax of the full-width products
        ``q_cls . k_j / sqrt(H d)`` (the heads' q and k concatenated, as the released code
        reads them off q_proj / k_proj), normalized over [CLS] + patches."""
        b, h, n1, d = self.k.shape
        q = self.q[:, :, 0].float().reshape(b, 1, h * d)
        k = self.k.float().transpose(1, 2).reshape(b, n1, h * d)
        logits = (q @ k.mT)[:, 0] * (h * d) ** -0.5
        return torch.softmax(logits, dim=-1)[:, 1:]

    def mean_keys(self) -> Tensor:
        """(B, N, d) the patch keys averaged over heads (ToMe / VisionZip's similarity metric)."""
        return self.k[:, :, 1:].mean(dim=1)

    def flat_keys(self) -> Tensor:
        """(B, N, H * d) the patch keys of all heads side by side (PruMerge's full-width keys)."""
        return self.k[:, :, 1:].transpose(1, 2).flatten(2)


@dataclass
class DecoderLayer:
    """One LLM decoder attention layer over the whole sequence (text and image tokens).

    q: (B, Hq, L, d), k: (B, Hkv, L, d) after RoPE; scale: the softmax scale;
    valid: (B, L) bool, False at padding; image: (B, L) int64 image id of every image token
    (0, 1, ... per sample) and -1 elsewhere; text: (B, L) bool, the text tokens after the
    first image (the instruction), used by methods that score with text queries; lse: optional
    (B, Hq, L) float32 log-sum-exp of the layer's scaled logits per query, as the attention
    that ran returned it (FlashAttention/FlexAttention/SDPA): the scores then take one pass;
    hidden: optional (B, L, D) hidden states that the reduction applies to (the input of the
    first layer that sees the kept tokens), needed by the methods that merge (ficoco-l,
    sparsevlm with recycle).
    """

    q: Tensor
    k: Tensor
    scale: float
    valid: Tensor
    image: Tensor
    text: Tensor | None = None
    lse: Tensor | None = None
    hidden: Tensor | None = None

    @property
    def image_mask(self) -> Tensor:
        return self.image >= 0

    def last_query(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """The query of each sample's last valid position, (B, Hq, 1, d), the matching key mask
        (B, L) (valid keys up to that position; left or right padding both work) and its lse
        (B, Hq, 1) when the layer's lse is known. A row with no valid position (all padding) gets
        its position 0 and an empty key mask: that query sees nothing."""
        b, _, length, _ = self.q.shape
        pos = torch.arange(length, device=self.q.device).expand(b, length)
        last = torch.where(self.valid, pos, -1).max(dim=1).values  # (B,), -1 for an all-padding row
        at = last.clamp(min=0)
        q_last = self.q.gather(2, at[:, None, None, None].expand(-1, self.q.shape[1], 1, self.q.shape[3]))
        lse = None
        if self.lse is not None:
            lse = self.lse.gather(2, at[:, None, None].expand(-1, self.lse.shape[1], 1)).contiguous()
        return q_last, self.valid & (pos <= last[:, None]), lse
