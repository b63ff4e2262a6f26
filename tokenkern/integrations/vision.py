"""Vision-side selection: reduce each image's tokens before they enter the decoder.

Two places, depending on what the method reads:
* after the projector (LoFi, random, uniform): the per-image features returned by the model's
  get_image_features;
* inside a CLIP tower (FasterVLM, VisionZip, PruMerge+, FiCoCo-V, LLaVA-1.5): the input of the
  projector, scored with the q/k of one CLIP attention layer (captured by hooks; the tower runs
  its usual attention).

The features keep their full per-image length (merged values at the kept positions), so the
model's own placeholder bookkeeping is untouched; the per-image keep masks are handed to the
decoder pruner, which drops the other positions at the decoder input.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial, wraps

import torch
from torch import Tensor, nn

from ..methods import Reduction, VisionLayer
from .capture import QKCapture
from .diversity import per_segment


def apply_reduction(features: Tensor, red: Reduction) -> tuple[Tensor, Tensor]:
    """features: (B, N, D) -> (features with the reduced tokens written at their positions,
    keep mask (B, N))."""
    out = features.clone()
    out.scatter_(1, red.indices[..., None].expand(-1, -1, features.shape[-1]), red.tokens.to(features.dtype))
    keep = torch.zeros(features.shape[:2], dtype=torch.bool, device=features.device)
    keep.scatter_(1, red.indices, True)
    return out, keep


class PostProjectorReducer:
    """Wraps core.get_image_features; `method(features (B, n, D)) -> Reduction` per image.
    segments: optional ``segments(features (n, D), image index, the call's args, kwargs) ->
    (n,) int64`` splitting an image into parts reduced separately (-1: always kept), e.g.
    LLaVA-NeXT's crops and newline tokens. pixels: optional ``pixels(image index, args,
    kwargs) -> Tensor``, that image's pixel values, then passed as ``method(features,
    pixels=...)`` (a draw seeded by the image's content)."""

    def __init__(self, core: nn.Module, method: Callable[..., Reduction], segments: Callable | None = None,
                 pixels: Callable | None = None):  # fmt: skip
        self.core = core
        self.method = method
        self.segments = segments
        self.pixels = pixels
        self.keeps: list[Tensor] = []
        self._patch = _MethodPatch(core, "get_image_features", self._wrapped)
        self._original = self._patch.original

    def _wrapped(self, *args, **kwargs):
        out = self._original(*args, **kwargs)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        new, keeps = [], []
        for i, f in enumerate(feats):
            seg = None if self.segments is None else self.segments(f, i, args, kwargs)
            method = self.method if self.pixels is None else partial(self.method, pixels=self.pixels(i, args, kwargs))
            red = method(f[None]) if seg is None else per_segment(method, f[None], seg)
            reduced, keep = apply_reduction(f[None], red)
            new.append(reduced[0])
            keeps.append(keep[0])
        self.keeps = keeps
        if hasattr(out, "pooler_output"):
            out.pooler_output = type(feats)(new) if isinstance(feats, list | tuple) else torch.stack(new)
            return out
        return type(feats)(new) if isinstance(feats, list | tuple) else torch.stack(new)

    def remove(self) -> None:
        self._patch.remove()


class _MethodPatch:
    """Replaces a method on one instance (an instance attribute shadows the class's) and puts
    back exactly what was there. The replacement reports the original's signature:
    transformers' generate() (5.19 on) calls get_image_features itself before the prefill,
    passing only the arguments that signature names."""

    def __init__(self, obj, name: str, replacement):
        self.obj, self.name = obj, name
        self.previous = obj.__dict__.get(name)
        self.original = getattr(obj, name)
        self.replacement = _with_signature(replacement, self.original)
        setattr(obj, name, self.replacement)

    def remove(self) -> None:
        if self.obj.__dict__.get(self.name) is self.replacement:
            if self.previous is None:
                delattr(self.obj, self.name)
            else:
                setattr(self.obj, self.name, self.previous)


def _with_signature(replacement: Callable, original: Callable) -> Callable:
    """replacement, called as is, with original's name, docstring and inspect.signature."""

    @wraps(original)
    def patched(*args, **kwargs):
        return replacement(*args, **kwargs)

    return patched


class ClipReducer:
    """For a CLIP tower feeding a projector (LLaVA-1.5): captures the q/k of CLIP layer
    `layer_idx` while get_image_features runs and reduces the projector's input with
    `method(features (B, N, C), VisionLayer) -> Reduction`, on the whole batch of images or,
    with per_image (a method whose count depends on each image), on one image at a time."""

    def __init__(self, core: nn.Module, clip_layers: nn.ModuleList, projector: nn.Module, layer_idx: int,
                 method: Callable[[Tensor, VisionLayer], Reduction], per_image: bool = False):  # fmt: skip
        self.core = core
        self.per_image = per_image
        attn = clip_layers[layer_idx].self_attn
        self.capture = QKCapture(attn, attn.head_dim)
        self.scale = float(attn.scale)
        self.method = method
        self.keeps: list[Tensor] = []
        self._patch = _MethodPatch(core, "get_image_features", self._wrapped)
        self._original = self._patch.original
        self._hook = projector.register_forward_pre_hook(self._reduce_input)

    def _wrapped(self, *args, **kwargs):
        self.capture.arm()
        try:
            return self._original(*args, **kwargs)
        finally:
            self.capture.armed = False

    def _reduce_input(self, module, args):
        if not self.capture.armed:
            return None
        feats = args[0]  # (B_img, N, C): patch features, [CLS] already dropped
        q, k = self.capture.take()
        if feats.shape[1] != q.shape[2] - 1:
            raise ValueError(
                "tokenkern.prune: this method needs the projector input to be the N patch tokens of a "
                f"[CLS] + N tower (vision_feature_select_strategy='default'); got {feats.shape[1]} tokens "
                f"for a tower of {q.shape[2]}"
            )
        if self.per_image:
            parts = [self._reduce(feats[i : i + 1], q[i : i + 1], k[i : i + 1]) for i in range(feats.shape[0])]
            reduced, keep = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        else:
            reduced, keep = self._reduce(feats, q, k)
        self.keeps = list(keep)
        return (reduced, *args[1:])

    def _reduce(self, feats: Tensor, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return apply_reduction(feats, self.method(feats, VisionLayer(q=q, k=k, scale=self.scale)))

    def remove(self) -> None:
        self._hook.remove()
        self.capture.remove()
        self._patch.remove()


def sequence_keep(image: Tensor, keeps: list[Tensor]) -> Tensor:
    """image: (B, L) image id per token (-1 elsewhere); keeps: per-image (n_i,) masks in the
    order the model scatters image features (row-major). -> keep mask (B, L)."""
    keep = torch.ones_like(image, dtype=torch.bool)
    flat = torch.cat(keeps) if keeps else torch.zeros(0, dtype=torch.bool, device=image.device)
    slots = image >= 0
    if flat.numel() != int(slots.sum().item()):
        raise ValueError(
            f"tokenkern.prune: {flat.numel()} reduced image tokens for {int(slots.sum().item())} placeholders"
        )
    keep[slots] = flat.to(image.device)
    return keep
