"""LLaVA-1.5 (``LlavaForConditionalGeneration``) with visual-token pruning, as a subclass of
vLLM's own class. Without a ``tokenkern`` key in the hf_config every method is the stock one.

Two hooks, one contract: ``PrunedLlavaProcessingInfo.get_num_image_tokens`` reserves
``plan.kept(N)`` placeholders per image when the prompt is processed, and
``_process_image_input`` returns exactly that many embeddings per image (vLLM's
``_merge_multimodal_embeddings`` checks the count). Decoder positions are the placeholders'
consecutive ones: the kept tokens are packed, as the released vision-side code hands LLaVA
fewer image features.
"""

from __future__ import annotations

import torch
from torch import Tensor
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImagePixelInputs,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
    _get_num_hidden_layers,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from . import reduce
from .clip import ClipQK, encoder_layers
from .config import CALLER, Plan, plan_of

ARCH = "LlavaForConditionalGeneration"


class PrunedLlavaProcessingInfo(LlavaProcessingInfo):
    """Reserves plan.kept(N) placeholder tokens for an image of N tokens."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        plan = plan_of(self.get_hf_config(), ARCH)
        return n if plan is None else plan.kept(n)


def _processing_info(ctx):
    """The stock info, or the pruned one when the config has a plan (parsed and checked here:
    the engine's front end builds this first, so a bad config fails before any worker starts)."""
    info = _build_llava_or_pixtral_hf_info(ctx)
    plan = plan_of(ctx.get_hf_config(), ARCH)
    if plan is None:
        return info
    if type(info) is not LlavaProcessingInfo:
        raise ValueError(f"tokenkern.{CALLER}: pruning is supported on LLaVA with a CLIP or SigLIP tower, not on "
                         f"{type(info).__name__}")  # fmt: skip
    hf_config = ctx.get_hf_config()
    if plan.spec.site == "vision_tower":
        _check_clip(plan, hf_config, type(hf_config.vision_config).__name__)
        _clip_layer_index(plan, hf_config, _get_num_hidden_layers(hf_config))
    return PrunedLlavaProcessingInfo(ctx)


def _check_clip(plan: Plan, hf_config, tower: str) -> None:
    """The CLIP methods read a [CLS] token: a CLIP tower whose [CLS] the projector input drops."""
    strategy = hf_config.vision_feature_select_strategy
    if tower not in ("CLIPVisionConfig", "CLIPVisionModel") or strategy != "default":
        raise ValueError(f"tokenkern.{CALLER}: {plan.method} reads a CLIP tower's [CLS] attention; this model has a "
                         f"{tower} tower with vision_feature_select_strategy={strategy!r}")  # fmt: skip


def _clip_layer_index(plan: Plan, hf_config, built: int) -> int:
    """The built CLIP layer whose q/k score the patches: the method's ``layer`` (counted from
    the end of the full tower when negative) or the one feeding the projector."""
    n = hf_config.vision_config.num_hidden_layers
    feature_layer = hf_config.vision_feature_layer
    if not isinstance(feature_layer, int):
        raise ValueError(f"tokenkern.{CALLER}: {plan.method} needs one vision_feature_layer, got {feature_layer!r}")
    default = (n + feature_layer) % n if feature_layer < 0 else feature_layer - 1
    layer = getattr(plan.cfg, "layer", None)
    idx = default if layer is None else layer
    if not -n <= idx < n:
        raise ValueError(f"tokenkern.{CALLER}: layer for {plan.method} must be in [-{n}, {n}) (the vision tower's "
                         f"layers), got {idx}")  # fmt: skip
    idx %= n
    if idx >= built:
        raise ValueError(f"tokenkern.{CALLER}: layer for {plan.method} must be one of the {built} CLIP layers vLLM "
                         f"builds (it stops at vision_feature_layer={feature_layer}), i.e. in [{-n}, {built - n - 1}] "
                         f"or [0, {built - 1}], got {layer}")  # fmt: skip
    return idx


@MULTIMODAL_REGISTRY.register_processor(
    _build_llava_or_pixtral_hf_processor, info=_processing_info, dummy_inputs=LlavaDummyInputsBuilder
)
class TokenkernLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA, pruning each image's tokens to plan.kept(N) when the config has a plan."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokenkern_plan = plan_of(self.config, ARCH)
        self.tokenkern_capture: ClipQK | None = None
        if self.tokenkern_plan is not None and self.tokenkern_plan.spec.site == "vision_tower":
            self.tokenkern_capture = self._capture(self.tokenkern_plan)

    def _capture(self, plan: Plan) -> ClipQK:
        tower = self.vision_tower
        _check_clip(plan, self.config, type(tower).__name__)
        layers = encoder_layers(tower)
        return ClipQK(layers[_clip_layer_index(plan, self.config, len(layers))].self_attn)

    def _process_image_input(self, image_input) -> Tensor | tuple[Tensor, ...]:
        plan = self.tokenkern_plan
        # Precomputed image_embeds are served as given (their count is the embeddings').
        if plan is None or not isinstance(image_input, LlavaImagePixelInputs):
            return super()._process_image_input(image_input)
        if self.tokenkern_capture is None:
            features = _stacked(super()._process_image_input(image_input))
            return reduce.post_projector(plan, features, image_input["pixel_values"])
        self.tokenkern_capture.arm()
        try:
            features = _stacked(self._process_image_pixels(image_input))
        finally:
            self.tokenkern_capture.armed = False
        q, k = self.tokenkern_capture.take()
        kept = reduce.vision_tower(plan, features, q, k, self.tokenkern_capture.scale)
        return self.multi_modal_projector(kept)


def _stacked(x: Tensor | tuple[Tensor, ...] | list[Tensor]) -> Tensor:
    """(B, N, D): CLIP images all have the tower's size, so their features stack."""
    return x if isinstance(x, Tensor) else torch.stack(list(x))
