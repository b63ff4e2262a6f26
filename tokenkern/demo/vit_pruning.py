"""Vision-side methods applied inside the real DINOv2 ViT-S/14 (tokenkern.demo.dinov2).

The tower runs normally up to block `layer`; the method then reduces the 256 patch tokens
using that block's q/k (computed from its own projections, as the block itself does) and the
hidden states; the remaining blocks run on [CLS] + the kept tokens. ToMe instead merges r
tokens after every block from `layer` on, with proportional attention.

To decode a saliency map from a pruned run, every patch position takes the final feature of
the output token that represents it: itself if kept, else the kept token most similar to it
(cosine of hidden states at the pruning block), or for ToMe the token its merges ended in.

Every method runs with the inputs its registry spec names: DivPrune and DART on embeddings
(``dart-embeddings``: pivots and similarity on the block's hidden states, image pivots only,
there being no text; its budget is sized so that it keeps keep_count(keep, N) tokens, or the
nearest multiple of its pivots below) read the tokens alone; MMR's importance is the [CLS] attention; CDPruner,
which needs a CLIP text embedding of a question, is conditioned on the image's own [CLS]
token here (a stand-in: DINOv2 has no text tower).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import methods as M
from ..methods import registry
from .dinov2 import Dinov2Saliency

VISION_METHODS = registry.vision_names()  # every method reducing vision tokens, in table order
# The demo's option choices besides keep (a 256-patch grid: PruMerge+ merges 8 neighbours).
DEMO_OPTIONS = {"prumerge+": {"neighbours": 8}}


@dataclass
class PrunedRun:
    method: str
    keep: float
    tokens: int  # patch tokens after reduction
    seconds: float  # median wall time of the forward pass
    cls: Tensor  # (B, C) final [CLS] embedding
    saliency: Tensor  # (B, 1, H, W)
    kept: Tensor | None  # (B, k) kept patch indices (None for ToMe)
    final: Tensor  # (B, tokens, C) final patch tokens


class Forward(NamedTuple):
    cls: Tensor  # (B, C) final [CLS] embedding
    saliency: Tensor  # (B, 1, H, W)
    kept: Tensor | None  # (B, k) kept patch indices (None for ToMe)
    tokens: int  # patch tokens after the reduction
    final: Tensor  # (B, tokens, C) final (normalized) patch tokens of the reduced sequence


def _layer_qk(block, x: Tensor) -> tuple[Tensor, Tensor]:
    q, k, _ = block.attn.qkv(block.norm1(x))
    return q, k


def _reduce(method: str, x: Tensor, q: Tensor, k: Tensor, keep: float, seed: int) -> M.Reduction:
    """x: (B, 1 + N, C) hidden states after the pruning block; q, k: that block's (B, H, 1+N, d).
    The method's recipe from the registry, called with the inputs its spec names."""
    spec = registry.get(method, caller="demo")
    if spec.site not in ("vision_tower", "post_projector"):
        raise ValueError(f"tokenkern.demo: method must be one of {VISION_METHODS} other than tome (it merges in "
                         f"every block: pruned_forward), got {method!r}")  # fmt: skip
    options = dict(DEMO_OPTIONS.get(method, {}))
    if "seed" in spec.options():
        options["seed"] = seed
    layer = M.VisionLayer(q=q, k=k, scale=q.shape[-1] ** -0.5)
    inputs = {"features": x[:, 1:], "vision_layer": layer}
    if "importance" in spec.inputs:  # MMR: the [CLS] attention, as prune() gives it on a CLIP tower
        inputs["importance"] = layer.cls_attention()
    if "text_emb" in spec.inputs:
        # CDPruner conditions on CLIP text; DINOv2 has no text tower: the demo conditions on the
        # image's own [CLS] token instead (relevance -cos(patch, [CLS]) in the block's space).
        inputs["image_emb"], inputs["text_emb"] = x[:, 1:], x[:, :1]
    if spec.recipe is M.dart_embeddings:
        keep = _dart_budget(keep, x.shape[1] - 1, spec.config().image_pivots)
    return spec.recipe(*(inputs[name] for name in spec.inputs), spec.config(keep=keep, **options))


def _dart_budget(keep: float, n: int, pivots: int) -> int:
    """DART keeps its pivots plus a multiple of them: the budget M whose kept count
    ``pivots + pivots (M // pivots)`` is the most not above keep_count(keep, n), so that every
    method of the table keeps (about) the same number of tokens."""
    return max(1, M.keep_count(keep, n) - pivots)


def _nearest_kept(x: Tensor, kept: Tensor) -> Tensor:
    """For every patch, the position (0..k-1) of the most cosine-similar kept patch (itself when
    kept). x: (B, N, C) patch hidden states, kept: (B, k)."""
    xn = F.normalize(x.float(), dim=-1)
    kn = xn.gather(1, kept[..., None].expand(-1, -1, xn.shape[-1]))
    owner = (xn @ kn.mT).argmax(dim=-1)
    owner.scatter_(1, kept, torch.arange(kept.shape[1], device=x.device).expand_as(kept))
    return owner


@torch.no_grad()
def pruned_forward(
    model: Dinov2Saliency, pixels: Tensor, method: str, keep: float, layer: int = 4, seed: int = 0
) -> Forward:
    """Blocks [0, layer) see every token; the method reduces the patches using block layer - 1's
    q/k and output; blocks [layer, 12) see [CLS] + the reduced tokens."""
    vit = model.backbone
    grid = vit.grid(pixels)
    x = vit.embed(pixels)
    for block in vit.blocks[: layer - 1]:
        x = block(x)
    n = x.shape[1] - 1
    if registry.get(method, caller="demo").site == "every_block":
        return _tome_forward(model, pixels, x, keep, layer)
    scoring = vit.blocks[layer - 1]
    q, k = _layer_qk(scoring, x)
    x = scoring(x)
    red = _reduce(method, x, q, k, keep, seed)
    owner = _nearest_kept(x[:, 1:], red.indices)
    y = torch.cat([x[:, :1], red.tokens.to(x.dtype)], dim=1)
    for block in vit.blocks[layer:]:
        y = block(y)
    final = vit.norm(y)
    patch_feats = final[:, 1:].gather(1, owner[..., None].expand(-1, -1, final.shape[-1]))
    sal = model.decoder(patch_feats, grid, tuple(pixels.shape[-2:]))
    assert red.indices.shape[1] < n or keep >= 1.0
    return Forward(final[:, 0], sal, red.indices, red.indices.shape[1], final[:, 1:])


def _tome_forward(model: Dinov2Saliency, pixels: Tensor, x: Tensor, keep: float, layer: int):
    vit = model.backbone
    grid = vit.grid(pixels)
    n = x.shape[1] - 1
    x = vit.blocks[layer - 1](x)
    # Which patches each token covers rides along as extra channels: merges average them.
    eye = torch.eye(n, device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1)
    src = torch.cat([torch.zeros_like(eye[:, :1]), eye], dim=1)  # (B, 1 + N, N); [CLS] covers none
    size = torch.ones(x.shape[:2], device=x.device)
    target = M.keep_count(keep, n)
    blocks = vit.blocks[layer:]
    r = -(-(n - target) // len(blocks))  # enough per block to reach the target by the last one
    for block in blocks:
        r_here = min(r, x.shape[1] - 1 - target)
        if r_here > 0:
            _, keys, _ = block.attn.qkv(block.norm1(x))
            c = x.shape[-1]
            red = M.tome_merge(torch.cat([x, src], dim=-1), keys.mean(dim=1), size, M.ToMeConfig(r=r_here))
            x, src, size = red.tokens[..., :c], red.tokens[..., c:], red.sizes
        x = block(x, attn_bias=M.tome.attention_bias(size, x.dtype))
    final = vit.norm(x)
    owner = src[:, 1:].argmax(dim=1)  # (B, N): the output token holding most of each patch
    patch_feats = final[:, 1:].gather(1, owner[..., None].expand(-1, -1, final.shape[-1]))
    sal = model.decoder(patch_feats, grid, tuple(pixels.shape[-2:]))
    return Forward(final[:, 0], sal, None, x.shape[1] - 1, final[:, 1:])


def run_method(model: Dinov2Saliency, pixels: Tensor, method: str, keep: float, layer: int = 4, repeats: int = 3):
    """Times pruned_forward (median of `repeats`) and returns a PrunedRun."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = pruned_forward(model, pixels, method, keep, layer)
        times.append(time.perf_counter() - t0)
    return PrunedRun(
        method, keep, out.tokens, sorted(times)[len(times) // 2], out.cls, out.saliency, out.kept, out.final
    )


@torch.no_grad()
def full_forward(model: Dinov2Saliency, pixels: Tensor, repeats: int = 3) -> PrunedRun:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = model.backbone(pixels)
        sal = model.decoder(tokens[:, 1:], model.backbone.grid(pixels), tuple(pixels.shape[-2:]))
        times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2]
    return PrunedRun("none", 1.0, tokens.shape[1] - 1, seconds, tokens[:, 0], sal, None, tokens[:, 1:])
