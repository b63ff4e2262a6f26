"""FiCoCo (Han et al., "Filter, Correlate, Compress"), in the vision tower (FiCoCo-V) or the
LLM decoder (FiCoCo-L).

All scores use the attention logits of one layer averaged over heads,
S[i, j] = mean_h(q_i^h . k_j^h) * scale, read as a dot product of concatenated per-head
features so that the op never materializes the head-by-head attention.

FiCoCo-V (rule as intended by the paper; the released code has known indexing bugs):
  filter:    redundancy score of patch i = 0.35 * c_i / ||c|| - 0.65 * p_i / ||p||, with
             c_i = S[CLS, i] and p_i = mean_j S[i, j] over the patches; the patches with the
             lowest scores are discarded ([CLS] is never discarded).
  correlate: each discarded patch spreads over its `topk` kept patches of largest S[i, j],
             with weights softmax(S[i, j]) renormalized over those (temperature 1).
  compress:  x_t <- (x_t + sum_i w_it x_i) / (1 + sum_i w_it)  (merge_tokens, combine="mean").
  The paper spreads the reduction over several layers (r tokens per layer); a call here does
  one step with the total keep count, and the k of the correlate step is fixed (the paper
  derives it from a 0.998 quantile with a host sync).

FiCoCo-L (LLM layer K, visual tokens only are reduced):
  filter:    S_i = 0.6 * sum_j A_vv[i, j] - 0.4 * mean_t A_vt[i, t]; the visual tokens with the
             highest S_i are discarded (A = head-mean logits without masks, as the released code
             reads them; v = visual, t = text tokens).
  correlate: C = 0.6 * A_vv + 0.4 * P_vt @ P_tv with P_vt = softmax over t of A_vt and
             P_tv = softmax over v of A_tv; each discarded token spreads over its `topk` kept
             tokens of largest C with weights softmax(C) renormalized over them.
  compress:  x_t <- x_t + sum_i w_it x_i  (merge_tokens, combine="sum").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import tokenkern

from .base import Reduction, keep_count


@dataclass
class FiCoCoVConfig:
    keep: float | int = 0.25
    topk: int = 2
    layer: int | None = None  # CLIP layer whose q/k score the patches; None: the one feeding the projector


def _concat_heads(t: Tensor) -> Tensor:
    """(B, H, N, d) -> (B, N, H * d)."""
    return t.transpose(1, 2).flatten(2)


def _head_mean_logits_rows(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """(B, Nq, Nk) float32 = mean over heads of q . k^T * scale (the small matrices FiCoCo scores
    with; float32 so that 16-bit activations do not round distinct scores into ties)."""
    return (_concat_heads(q).float() @ _concat_heads(k).float().mT) * (scale / q.shape[1])


def ficoco_v(features: Tensor, q: Tensor, k: Tensor, scale: float, cfg: FiCoCoVConfig) -> Reduction:
    """features: (B, N, D) patch tokens; q, k: (B, H, 1 + N, d) of the layer, [CLS] first."""
    n = features.shape[1]
    keep = keep_count(cfg.keep, n)
    logits = _head_mean_logits_rows(q, k, scale)  # (B, 1+N, 1+N); N x N, never per head
    c = logits[:, 0, 1:]
    p = logits[:, 1:, 1:].mean(dim=-1)
    score = 0.35 * c / c.norm(dim=-1, keepdim=True) - 0.65 * p / p.norm(dim=-1, keepdim=True)
    _, keep_idx = tokenkern.topk_gather(score.float(), features, keep)
    topk = min(cfg.topk, keep)
    query_metric = _concat_heads(q[:, :, 1:]) * (scale / q.shape[1])
    merged, _ = tokenkern.merge_tokens(
        features, keep_idx, metric=_concat_heads(k[:, :, 1:]), query_metric=query_metric,
        topm=topk, temperature=1.0, combine="mean", validate=False,
    )  # fmt: skip
    return Reduction(keep_idx, merged, scores=score.float())


@dataclass
class FiCoCoLConfig:
    keep: float | int = 0.25
    topk: int = 2
    layer: int = 4  # prune after this many decoder layers (scores from layer K - 1)


def ficoco_l(
    visual: Tensor, q: Tensor, k: Tensor, q_text: Tensor, k_text: Tensor, scale: float, cfg: FiCoCoLConfig
) -> Reduction:
    """visual: (B, V, D) decoder hidden states of the visual tokens; q, k: (B, H, V, d) their
    queries and keys at the layer; q_text, k_text: (B, H, T, d) those of the text tokens (the
    instruction); keys may have fewer heads (GQA: query head h reads key head h // (H / Hkv)).
    Reduces the V visual tokens to keep_count(keep, V)."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        k_text = k_text.repeat_interleave(q.shape[1] // k_text.shape[1], dim=1)
    v = visual.shape[1]
    keep = keep_count(cfg.keep, v)
    a_vv = _head_mean_logits_rows(q, k, scale)  # (B, V, V)
    a_vt = _head_mean_logits_rows(q, k_text, scale)  # (B, V, T)
    a_tv = _head_mean_logits_rows(q_text, k, scale)  # (B, T, V)
    redundancy = (0.6 * a_vv.sum(dim=-1) - 0.4 * a_vt.mean(dim=-1)).float()
    # Discard the most redundant (highest score): keep the lowest.
    kept, keep_idx = tokenkern.topk_gather(-redundancy, visual, keep)
    if keep == v:
        return Reduction(keep_idx, kept, scores=redundancy)
    p_vt = torch.softmax(a_vt.float(), dim=-1)  # visual -> text, over the text keys
    p_tv = torch.softmax(a_tv.float(), dim=-1)  # text -> visual, over the visual keys
    # C = 0.6 A_vv + 0.4 P_vt P_tv as one dot product: [0.6 q scale/H, 0.4 P_vt] . [k, P_tv^T].
    query_metric = torch.cat([0.6 * _concat_heads(q).float() * (scale / q.shape[1]), 0.4 * p_vt], dim=-1)
    metric = torch.cat([_concat_heads(k).float(), p_tv.mT], dim=-1)
    merged, _ = tokenkern.merge_tokens(
        visual, keep_idx, metric=metric, query_metric=query_metric, topm=min(cfg.topk, keep),
        temperature=1.0, combine="sum", validate=False,
    )  # fmt: skip
    return Reduction(keep_idx, merged, scores=redundancy)
