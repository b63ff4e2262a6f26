"""Where things live in each supported transformers VLM class. Integrations know model
classes; nothing below them does."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial

from torch import Tensor, nn

from ..methods.registry import ALL_VLMS


@dataclass
class VLMParts:
    name: str
    core: nn.Module  # the module whose forward receives input_ids and pixel values
    language_model: nn.Module  # the decoder stack (receives inputs_embeds)
    layers: nn.ModuleList  # its decoder layers
    image_token_id: int
    clip_tower: nn.Module | None  # a CLIPVisionModel tower ([CLS] first) feeding the projector (LLaVA-1.5)
    projector: nn.Module | None  # the module that maps tower features to the LLM (LLaVA)
    vision_feature_layer: int | None
    final_norm: nn.Module | None = None  # the decoder's final norm (before the LM head)
    image_newline: nn.Parameter | None = None  # LLaVA-NeXT's row-end token of the high-resolution grid

    @property
    def mrope(self) -> bool:
        """Whether the decoder rotates by M-RoPE (t, h, w) positions (Qwen2-VL, Qwen2.5-VL)."""
        return self.name in MROPE_VLMS

    def attention(self, layer_idx: int) -> nn.Module:
        return self.layers[layer_idx].self_attn

    def rotary(self, layer_idx: int):
        """The model's own apply_rotary_pos_emb for that attention layer."""
        module = sys.modules[type(self.attention(layer_idx)).__module__]
        return module.apply_rotary_pos_emb


SUPPORTED = ALL_VLMS  # the classes parts_of handles (the method registry lists them per method)
MROPE_VLMS = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")


def parts_of(model: nn.Module) -> VLMParts:
    name = type(model).__name__
    if name not in SUPPORTED:
        raise ValueError(f"tokenkern.prune: unsupported model class {name}; supported: {', '.join(SUPPORTED)}")
    core = model.model
    lm = core.language_model
    cfg = model.config
    image_token_id = getattr(cfg, "image_token_id", None)
    if image_token_id is None:
        image_token_id = cfg.image_token_index
    if name == "LlavaForConditionalGeneration":
        tower = core.vision_tower
        clip = tower if type(tower).__name__ == "CLIPVisionModel" else None  # SigLIP has no [CLS]
        feature_layer = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, int) else None
        return VLMParts(name, core, lm, lm.layers, int(image_token_id), clip, core.multi_modal_projector, feature_layer,
                        getattr(lm, "norm", None))  # fmt: skip
    newline = getattr(core, "image_newline", None) if name == "LlavaNextForConditionalGeneration" else None
    return VLMParts(name, core, lm, lm.layers, int(image_token_id), None, None, None, getattr(lm, "norm", None),
                    newline)  # fmt: skip


def clip_layers(tower: nn.Module) -> nn.ModuleList:
    model = getattr(tower, "vision_model", tower)
    return model.encoder.layers


def image_pixels(parts: VLMParts):
    """-> ``pixels(i, args, kwargs) -> Tensor``: the pixel values of image i of a
    get_image_features(*args, **kwargs) call: LLaVA pixel_values[i]; LLaVA-NeXT that image's
    crops (the padding crops of a stacked batch left out); Qwen2-VL / Qwen2.5-VL that image's
    rows of pixel_values (t h w rows per image_grid_thw)."""
    if parts.name == "LlavaNextForConditionalGeneration":
        return partial(_next_pixels, parts.core.config)
    if parts.name in MROPE_VLMS:
        return _qwen_pixels
    return lambda i, args, kwargs: _argument(args, kwargs, 0, "pixel_values")[i]


def _argument(args: tuple, kwargs: dict, index: int, name: str):
    return kwargs[name] if name in kwargs else args[index]


def _next_pixels(config, i: int, args: tuple, kwargs: dict) -> Tensor:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    pixels = _argument(args, kwargs, 0, "pixel_values")
    sizes = _argument(args, kwargs, 1, "image_sizes")
    pinpoints, side = config.image_grid_pinpoints, config.vision_config.image_size
    counts = [image_size_to_num_patches(image_size=s.tolist(), grid_pinpoints=pinpoints, patch_size=side)
              for s in sizes[: i + 1]]  # fmt: skip
    if pixels.dim() == 5:  # (images, crops, C, H, W), padded with zero crops
        return pixels[i, : counts[i]]
    start = sum(counts[:i])  # (all crops, C, H, W), concatenated
    return pixels[start : start + counts[i]]


def _qwen_pixels(i: int, args: tuple, kwargs: dict) -> Tensor:
    pixels = _argument(args, kwargs, 0, "pixel_values")
    rows = _argument(args, kwargs, 1, "image_grid_thw").prod(-1).tolist()
    start = sum(rows[:i])
    return pixels[start : start + rows[i]]
