"""FiCoCo (Han et al., "Filter, Correlate, Compress"), in the vision tower (FiCoCo-V) or the
LLM decoder (FiCoCo-L). The defaults follow the authors' released code (one reduction step).

All scores use the attention logits of one layer averaged over heads,
S[i, j] = mean_h(q_i^h . k_j^h) * scale, without masks (as the released code reads them), in
float32 (float64 for float64 inputs) so that 16-bit activations do not round distinct scores
into ties. Target counts: the released correlate step spreads a token over the entries of its
row above the row's 0.998 quantile, a count that needs a host sync; for distinct logits it is
ceil((n - 1) / 500) for a row of n entries (2 for 577 or 576), a function of the shape alone,
which is what ``topk=None`` uses (it can differ only where logits tie). An int ``topk`` fixes k.

FiCoCo-V (features: the N patches, q/k of [CLS] + patches):
  filter:    s_i = 0.35 * c_i / ||c|| - 0.65 * p_i / ||p||, c_i = S[CLS, i], p_i = mean_j S[i, j]
             over the patches; local penalty (``local_penalty``): on the sqrt(N) x sqrt(N) patch
             grid, cut into 2x2 windows from the top-left corner (an odd last row/column is in no
             window), the lowest s of each window is pushed further down (halved if positive,
             doubled otherwise); the patches with the lowest scores are discarded ([CLS] never is).
  correlate: discarded patch i picks the k keys of largest S[i, j] among ALL 1 + N tokens
             ([CLS], itself and other discarded patches included), weights softmax over those k.
  compress:  x_t <- (x_t + sum_i w_it x_i) / (1 + sum_i w_it) over the kept patches t; a share
             whose target is [CLS] or a discarded patch reaches no kept patch and is dropped (the
             released compress of FiCoCo-L does this; the released FiCoCo-V compress indexes the
             targets into its score-sorted list of kept tokens, which sends each share to an
             unrelated token and fails with an index error once r exceeds about N / 2).
  ``targets="kept"``: the variant in which i picks its k kept patches of largest S[i, j] (with
  softmax weights over them), so that nothing is dropped. The released code spreads the
  reduction over layers 12-23 (r tokens per layer, with a score buffer that persists across
  calls and assumes 576 patches); a call here does one step with the total keep count, on the
  call's own grid. Output order: kept patches in ascending position (the released code orders
  them by score).

FiCoCo-L (LLM layer K, visual tokens only are reduced; v = visual, t = text tokens):
  filter:    R_i = 0.6 * sum_j A_vv[i, j] - 0.4 * mean_t A_vt[i, t] (diagonal included); the
             visual tokens with the highest R_i are discarded; ``protect_first`` keeps visual
             token 0 (the released code never discards position 0 of its visual block, which
             there starts at the sequence start).
  correlate: C = 0.6 * A_vv + 0.4 * A_vt @ A_tv on the raw logits (``correlate="logits"``) or
             with P_vt = softmax over t of A_vt and P_tv = softmax over v of A_tv in place of
             the logits (``correlate="softmax"``); C[i, i] = -inf. Discarded token i picks the
             k tokens of largest C[i, j] among ALL visual tokens, kept or discarded, with
             weights softmax over those k.
  compress:  x_t <- x_t + sum_i w_it x_i over the kept tokens t, from the tokens' values before
             the merge (no chains); shares whose target is a discarded token are dropped, as in
             the released code. ``targets="kept"``: i picks its k kept tokens of largest C instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

import tokenkern

from . import fields
from .base import Reduction, keep_count
from .inputs import DecoderLayer, VisionLayer

TARGETS = ("all", "kept")
CORRELATE = ("logits", "softmax")


@dataclass
class FiCoCoVConfig:
    """keep: patches kept; topk: targets per discarded patch (None: the released quantile count,
    see the module docstring); layer: CLIP layer whose q/k score the patches (None: the one
    feeding the projector); local_penalty: the released 2x2-window penalty of the filter step;
    targets: "all" (released: any token may be picked, shares landing off the kept patches are
    dropped) or "kept" (only kept patches are picked)."""

    keep: float | int = 0.25
    topk: int | None = None
    layer: int | None = None
    local_penalty: bool = True
    targets: str = "all"

    def __post_init__(self) -> None:
        fields.keep("ficoco_v", self.keep)
        fields.optional_integer("ficoco_v", "topk", self.topk, lo=1)
        fields.optional_integer("ficoco_v", "layer", self.layer)
        fields.flag("ficoco_v", "local_penalty", self.local_penalty)
        fields.choice("ficoco_v", "targets", self.targets, TARGETS)


def released_topk(n: int) -> int:
    """Entries of a row of n distinct values above its 0.998 quantile (torch.quantile's linear
    interpolation): (n - 1) - floor(0.998 (n - 1)) = ceil((n - 1) / 500), at least 1."""
    return max(1, -(-(n - 1) // 500))


def _concat_heads(t: Tensor) -> Tensor:
    """(B, H, N, d) -> (B, N, H * d)."""
    return t.transpose(1, 2).flatten(2)


def _head_mean_logits_rows(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """(B, Nq, Nk) = mean over heads of q . k^T * scale (the small matrices FiCoCo scores with),
    in float32, or float64 for float64 inputs."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    return (_concat_heads(q).to(dtype) @ _concat_heads(k).to(dtype).mT) * (scale / q.shape[1])


def _window_penalty(score: Tensor) -> Tensor:
    """score: (B, N), N = side * side patches in row-major order -> score with the lowest entry
    of every 2x2 window (windows from the top-left corner, ties to the first in row-major
    order) halved if positive, doubled otherwise."""
    b, n = score.shape
    side = math.isqrt(n)
    w = side // 2
    if w == 0:
        return score
    windows = score.view(b, side, side)[:, : 2 * w, : 2 * w].reshape(b, w, 2, w, 2).transpose(2, 3)
    lowest = torch.nn.functional.one_hot(windows.reshape(b, w, w, 4).argmin(dim=-1), 4).bool()
    mask = torch.zeros(b, side, side, dtype=torch.bool, device=score.device)
    mask[:, : 2 * w, : 2 * w] = lowest.view(b, w, w, 2, 2).transpose(2, 3).reshape(b, 2 * w, 2 * w)
    return torch.where(mask.view(b, n), torch.where(score > 0, score / 2, score * 2), score)


def _top_weights(logits: Tensor, k: int) -> Tensor:
    """logits: (B, M, C) -> (B, M, C): softmax over the k largest entries of each row (ties to
    the lower column), 0 elsewhere."""
    order = torch.sort(logits, dim=-1, descending=True, stable=True)
    top = torch.softmax(order.values[..., :k], dim=-1)
    return torch.zeros_like(logits).scatter(-1, order.indices[..., :k], top)


def _spread(x: Tensor, keep_idx: Tensor, weights: Tensor, combine: str) -> Tensor:
    """Merge the tokens keep_idx drops into the kept ones with explicit weights.

    x: (B, N, D); keep_idx: (B, K) ascending; weights: (B, N, N), the share of token i (row)
    that token j (column) receives; rows of kept tokens and columns of dropped ones are ignored.
    combine "mean": (x_t + sum_i w_it x_i) / (1 + sum_i w_it); "sum": x_t + sum_i w_it x_i.
    Returns (B, K, D) in x's dtype (a dense matmul: deterministic, no atomics)."""
    b, n, d = x.shape
    dropped = torch.ones(b, n, 1, dtype=torch.bool, device=x.device).scatter(1, keep_idx[..., None], False)
    w = weights.gather(2, keep_idx[:, None, :].expand(b, n, -1)) * dropped  # (B, N, K)
    xf = x.to(w.dtype)
    out = xf.gather(1, keep_idx[..., None].expand(-1, -1, d)) + w.mT @ xf
    if combine == "mean":
        out = out / (1 + w.sum(dim=1))[..., None]
    return out.to(x.dtype)


def ficoco_v(features: Tensor, layer: VisionLayer, cfg: FiCoCoVConfig) -> Reduction:
    """features: (B, N, D) patch tokens; layer: the scoring layer (q, k: (B, H, 1 + N, d),
    [CLS] first). Keeps keep_count(keep, N) patches; N must be a square (patch grid) with
    local_penalty."""
    q, k, scale = layer.q, layer.k, layer.scale
    n = features.shape[1]
    if cfg.local_penalty and math.isqrt(n) ** 2 != n:
        raise ValueError(f"tokenkern.ficoco_v: the patch count N of features must be a square (a square patch "
                         f"grid) with local_penalty=True, got {n}")  # fmt: skip
    keep = keep_count(cfg.keep, n)
    logits = _head_mean_logits_rows(q, k, scale)  # (B, 1+N, 1+N); N x N, never per head
    c = torch.nn.functional.normalize(logits[:, 0, 1:], dim=-1)
    p = torch.nn.functional.normalize(logits[:, 1:, 1:].mean(dim=-1), dim=-1)
    score = 0.35 * c - 0.65 * p
    if cfg.local_penalty:
        score = _window_penalty(score)
    _, keep_idx = tokenkern.topk_gather(score, features, keep)
    if cfg.targets == "all":
        topk = min(released_topk(n + 1) if cfg.topk is None else cfg.topk, n + 1)
        # Softmax over the top-k of all 1 + N keys, then only the patch columns can receive.
        weights = _top_weights(logits[:, 1:], topk)[:, :, 1:]
        merged = _spread(features, keep_idx, weights, "mean")
        return Reduction(keep_idx, merged, scores=score.float())
    topk = min(released_topk(n + 1) if cfg.topk is None else cfg.topk, keep)
    query_metric = _concat_heads(q[:, :, 1:]) * (scale / q.shape[1])
    merged, _ = tokenkern.merge_tokens(
        features, keep_idx, metric=_concat_heads(k[:, :, 1:]), query_metric=query_metric,
        topm=topk, temperature=1.0, combine="mean", validate=False,
    )  # fmt: skip
    return Reduction(keep_idx, merged, scores=score.float())


@dataclass
class FiCoCoLConfig:
    """keep: visual tokens kept; topk: targets per discarded token (None: the released quantile
    count); correlate: "logits" (released) or "softmax"; targets: "all" (released) or "kept";
    protect_first: never discard visual token 0 (released); layer: see below."""

    keep: float | int = 0.25
    topk: int | None = None
    correlate: str = "logits"
    targets: str = "all"
    protect_first: bool = True
    # layer=K: decoder layers 0 .. K-1 (0-based) see every token, layer K-1's attention scores
    # and its output is reduced, layers K, K+1, ... see the reduced tokens (as fastv, sparsevlm).
    # The released control_encoding_layer=4 first reduces inside layer 5 with layer 5's attention
    # (between its attention and its MLP): K = 6 scores with that attention; layer 5's MLP still
    # sees every token here.
    layer: int = 6

    def __post_init__(self) -> None:
        fields.keep("ficoco_l", self.keep)
        fields.optional_integer("ficoco_l", "topk", self.topk, lo=1)
        fields.choice("ficoco_l", "correlate", self.correlate, CORRELATE)
        fields.choice("ficoco_l", "targets", self.targets, TARGETS)
        fields.flag("ficoco_l", "protect_first", self.protect_first)
        fields.integer("ficoco_l", "layer", self.layer, lo=1)

    @property
    def layers(self) -> tuple[int, ...]:
        """The pruning steps: (K,)."""
        return (self.layer,)


def ficoco_l(layer: DecoderLayer, cfg: FiCoCoLConfig) -> Reduction:
    """FiCoCo-L on a decoder layer over the sequence (B, L): every image of every sample is
    reduced on its own (keep is per image, merges stay inside the image) by ficoco_l_tokens,
    with the sample's text tokens (layer.text, the instruction) as the text block; a sample
    without text tokens keeps everything. layer.hidden (B, L, D) is required: it is what the
    merges apply to. -> a sequence Reduction: keep_mask (B, L), tokens (B, L, D) the hidden
    states with the merged values at the kept image tokens; scores None (each image's
    redundancy is in ficoco_l_tokens' result). Loops over samples and images on the host
    (their token counts differ)."""
    if layer.hidden is None:
        raise ValueError("tokenkern.ficoco_l: layer.hidden must be the (B, L, D) hidden states, got None")
    if layer.text is None:
        raise ValueError("tokenkern.ficoco_l: layer.text must be the (B, L) text token mask, got None")
    hidden = layer.hidden
    keep_mask = torch.ones_like(layer.valid)
    out = hidden.clone()
    for s in range(layer.image.shape[0]):
        txt = layer.text[s].nonzero().flatten()
        if len(txt) == 0:
            continue
        q, k = layer.q[s : s + 1], layer.k[s : s + 1]
        for img in layer.image[s].unique().tolist():
            if img < 0:
                continue
            vis = (layer.image[s] == img).nonzero().flatten()
            red = ficoco_l_tokens(hidden[s : s + 1, vis], q[:, :, vis], k[:, :, vis], q[:, :, txt], k[:, :, txt],
                                  layer.scale, cfg)  # fmt: skip
            keep_mask[s, vis] = False
            keep_mask[s, vis[red.indices[0]]] = True
            out[s, vis[red.indices[0]]] = red.tokens[0].to(out.dtype)
    return Reduction(None, out, keep_mask=keep_mask)


def ficoco_l_tokens(
    visual: Tensor, q: Tensor, k: Tensor, q_text: Tensor, k_text: Tensor, scale: float, cfg: FiCoCoLConfig
) -> Reduction:
    """FiCoCo-L on one block of visual tokens (one image) and its text tokens.
    visual: (B, V, D) decoder hidden states of the visual tokens; q, k: (B, H, V, d) their
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
    redundancy = 0.6 * a_vv.sum(dim=-1) - 0.4 * a_vt.mean(dim=-1)
    # Discard the most redundant (highest score): keep the lowest.
    key = -redundancy
    if cfg.protect_first:
        key = torch.cat([torch.full_like(key[:, :1], math.inf), key[:, 1:]], dim=1)
    kept, keep_idx = tokenkern.topk_gather(key, visual, keep)
    if keep == v:
        return Reduction(keep_idx, kept, scores=redundancy.float())
    if cfg.correlate == "softmax":
        x_vt, x_tv = torch.softmax(a_vt, dim=-1), torch.softmax(a_tv, dim=-1)  # over text / visual keys
    else:
        x_vt, x_tv = a_vt, a_tv
    if cfg.targets == "all":
        corr = 0.6 * a_vv + 0.4 * (x_vt @ x_tv)
        corr = corr.masked_fill(torch.eye(v, dtype=torch.bool, device=corr.device), -math.inf)
        topk = min(released_topk(v) if cfg.topk is None else cfg.topk, v - 1)
        merged = _spread(visual, keep_idx, _top_weights(corr, topk), "sum")
        return Reduction(keep_idx, merged, scores=redundancy.float())
    # C = 0.6 A_vv + 0.4 X_vt X_tv as one dot product: [0.6 q scale/H, 0.4 X_vt] . [k, X_tv^T].
    query_metric = torch.cat([0.6 * _concat_heads(q).float() * (scale / q.shape[1]), 0.4 * x_vt.float()], dim=-1)
    metric = torch.cat([_concat_heads(k).float(), x_tv.float().mT], dim=-1)
    topk = min(released_topk(v) if cfg.topk is None else cfg.topk, keep)
    merged, _ = tokenkern.merge_tokens(
        visual, keep_idx, metric=metric, query_metric=query_metric, topm=topk,
        temperature=1.0, combine="sum", validate=False,
    )  # fmt: skip
    return Reduction(keep_idx, merged, scores=redundancy.float())
