"""prune() glue for the diversity methods: DART's budget from a fraction, DART on the decoder's
input embeddings, and LLaVA-NeXT's per-crop selection (DivPrune). CDPruner's CLIP text tower
is in relevance.py.

* DART in the decoder takes a budget M (a count). A fraction ``keep`` gives each sample
  ``M = keep_count(keep, its image tokens)``; samples with different budgets run as separate
  recipe calls (each sample's result is what it gets alone, so nothing changes).
* DART on embeddings (method ``dart-embeddings``): before the LLM, on the assembled input
  embeddings of each image (``methods.dart_embeddings``), with the embeddings of the sample's
  tokens after its last image as the text pivots' candidates; M = keep_count(keep, N) per image.
* LLaVA-NeXT: each image's features are the base crop, then the high-resolution crops stitched
  into one unpadded grid with a newline token closing every row. A per-crop method runs on the
  base crop and on each high-resolution crop (the grid positions it covers) separately, with
  keep applying to each, and the newline tokens are always kept.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import methods as M
from .sequence import text_after_first_image

Recipe = Callable[..., M.Reduction]


def _rows(layer: M.DecoderLayer, rows: Tensor) -> M.DecoderLayer:
    """The samples `rows` (int64 indices) of a DecoderLayer."""
    pick = lambda t: None if t is None else t[rows]  # noqa: E731
    return M.DecoderLayer(layer.q[rows], layer.k[rows], layer.scale, layer.valid[rows], layer.image[rows],
                          pick(layer.text), pick(layer.lse), pick(layer.hidden))  # fmt: skip


def dart_in_decoder(recipe: Recipe, layer: M.DecoderLayer, hidden: Tensor, cfg) -> Tensor:
    """DART's keep mask (B, L) over the sequence; a fraction keep is a budget per sample (one
    host sync sizes the budgets; the CPU and CUDA paths alike)."""
    if not isinstance(cfg.keep, float):
        return recipe(layer, hidden, cfg).keep_mask
    counts = (layer.image_mask & layer.valid).sum(dim=1).tolist()
    budgets = [M.keep_count(cfg.keep, n) if n else 1 for n in counts]
    keep = torch.ones_like(layer.valid)
    for budget in sorted(set(budgets)):
        rows = torch.tensor([i for i, m in enumerate(budgets) if m == budget], device=layer.valid.device)
        sub = type(cfg)(**{**vars(cfg), "keep": budget})
        keep[rows] = recipe(_rows(layer, rows), hidden[rows], sub).keep_mask
    return keep


def dart_on_embeddings(recipe: Recipe, embeds: Tensor, image: Tensor, valid: Tensor, cfg) -> Tensor:
    """embeds: (B, L, D) the decoder's input embeddings, image: (B, L) image ids, valid: (B, L)
    -> keep mask (B, L): every image reduced by recipe(x (1, N, D), cfg, text=...) on its own,
    every other position kept. Loops over samples and images (host syncs; prefill only)."""
    keep = torch.ones_like(valid)
    after_first = text_after_first_image(image, valid)
    pos = torch.arange(image.shape[1], device=image.device)
    for b in range(image.shape[0]):
        ids = image[b]
        if not bool((ids >= 0).any()):
            continue
        last = int(torch.where(ids >= 0, pos, -1).max())
        text = embeds[b, after_first[b] & (pos > last)][None]
        for i in range(int(ids.max()) + 1):
            where = (ids == i).nonzero().flatten()
            red = recipe(embeds[b, where][None], cfg, text=text if text.shape[1] else None)
            keep[b, where] = False
            keep[b, where[red.indices[0]]] = True
    return keep


def next_crop_ids(config, n: int, image_size) -> Tensor:
    """(n,) int64: the crop of every token of one packed LLaVA-NeXT image of n tokens: 0 for the
    base crop, 1 + r * cols + c for high-resolution crop (r, c) of the stitched grid, -1 for a
    newline token. config: the LlavaNextConfig; image_size: the image's (H, W)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    base = side * side + (config.vision_feature_select_strategy == "full")
    if n == base + 1:  # no high-resolution crops: the base crop and one newline
        return torch.cat([torch.zeros(base, dtype=torch.long), torch.full((1,), -1)])
    rows, cols = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, vision.image_size)
    r = torch.arange(rows * side)[:, None] // side
    c = torch.arange(cols * side)[None, :] // side
    grid = unpad_image((1 + r * cols + c)[None].double(), image_size)[0].long()
    grid = torch.cat([grid, torch.full((grid.shape[0], 1), -1)], dim=1).flatten()
    out = torch.cat([torch.zeros(base, dtype=torch.long), grid])
    if out.numel() != n:
        raise ValueError(f"tokenkern.prune: a LLaVA-NeXT image of {n} tokens does not match its crop layout "
                         f"({out.numel()} tokens)")  # fmt: skip
    return out


def per_segment(fn: Callable[[Tensor], M.Reduction], features: Tensor, segments: Tensor) -> M.Reduction:
    """features: (1, n, D); segments: (n,) int64 segment of every token, -1 = always kept ->
    one Reduction: fn on each segment's tokens (1, n_s, D), the always-kept tokens added."""
    kept = [(segments < 0).nonzero().flatten().to(features.device)]
    values = [features[0, kept[0]]]
    for s in segments.unique().tolist():
        if s < 0:
            continue
        where = (segments == s).nonzero().flatten().to(features.device)
        red = fn(features[:, where])
        kept.append(where[red.indices[0]])
        values.append(red.tokens[0].to(features.dtype))
    idx = torch.cat(kept)
    order = idx.argsort()
    return M.Reduction(idx[order][None], torch.cat(values)[order][None])
