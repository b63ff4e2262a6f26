"""Per-image reduction inside a vLLM encoder: one image at a time (its result never depends on
which other images share the encoder batch), the kept tokens packed in ascending position order
(the order ``prune(..., positions="packed")`` hands them to the decoder).

Model-agnostic: the model classes call these with the tensors their encoder computed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...methods import Reduction, VisionLayer
from ...methods.base import gather_tokens
from .config import Plan


def packed(red: Reduction) -> Tensor:
    """(B, k, D) the reduction's tokens in ascending order of their positions among the N."""
    return gather_tokens(red.tokens, red.indices.argsort(dim=1))


def image_generator(plan: Plan, pixels: Tensor, device: torch.device) -> torch.Generator:
    """The generator of one image's draw: seeded with a function of (cfg.seed, the image's
    pixels), so that a request replays whatever else the engine ran before or beside it."""
    from ...methods.baselines import image_seed

    return torch.Generator(device=device).manual_seed(image_seed(plan.cfg.seed, pixels))


def _check_count(plan: Plan, tokens: Tensor, n: int) -> Tensor:
    want = plan.kept(n)
    if tokens.shape[1] != want:  # a shape, known without a sync
        raise RuntimeError(f"tokenkern.vllm: {plan.method} kept {tokens.shape[1]} of {n} tokens where the prompt "
                           f"reserved {want} placeholders")  # fmt: skip
    return tokens


def post_projector(plan: Plan, features: Tensor, pixels: Tensor | None) -> Tensor:
    """features: (B, N, D) the projector's output, one row per image; pixels: (B, ...) the
    images (read by methods that draw). -> (B, k, D), k = plan.kept(N), reduced in float32 and
    returned in the features' dtype."""
    out = []
    for i in range(features.shape[0]):
        x = features[i : i + 1].float()
        if plan.spec.draws():
            red = plan.spec.recipe(x, plan.cfg, generator=image_generator(plan, pixels[i], x.device))
        else:
            red = plan.spec.recipe(x, plan.cfg)
        out.append(packed(red))
    return _check_count(plan, torch.cat(out).to(features.dtype), features.shape[1])


def vision_tower(plan: Plan, features: Tensor, q: Tensor, k: Tensor, scale: float) -> Tensor:
    """features: (B, N, C) the projector's input (patch tokens, [CLS] dropped); q, k:
    (B, H, 1 + N, d) the scoring CLIP layer's queries and keys ([CLS] first), all heads.
    -> (B, k, C) the kept (merged) tokens."""
    if q.shape[2] != features.shape[1] + 1:
        raise ValueError(f"tokenkern.vllm: {plan.method} needs the projector input to be the N patch tokens of a "
                         f"[CLS] + N tower (vision_feature_select_strategy='default'); got {features.shape[1]} "
                         f"tokens for a tower of {q.shape[2]}")  # fmt: skip
    out = []
    for i in range(features.shape[0]):
        layer = VisionLayer(q=q[i : i + 1], k=k[i : i + 1], scale=scale)
        inputs = {"features": features[i : i + 1], "vision_layer": layer}
        if "importance" in plan.spec.inputs:  # MMR: the layer's [CLS] attention (as prune() gives it)
            inputs["importance"] = layer.cls_attention()
        red = plan.spec.recipe(*(inputs[name] for name in plan.spec.inputs), plan.cfg)
        out.append(packed(red).to(features.dtype))
    return _check_count(plan, torch.cat(out), features.shape[1])
