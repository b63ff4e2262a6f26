"""Drop-in visual-token pruning for transformers VLMs: ``handle = tokenkern.prune(model, ...)``.

Supported classes: LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration (transformers 5.x).

The methods, where each runs and the models it is offered on come from the method registry
(tokenkern.methods.registry): ``llm_layer`` methods (fastv, sparsevlm, ficoco-l) from decoder
layer K on (option `layer`), on every supported class; ``post_projector`` methods (lofi,
random, uniform) on each image's features after the projector, on every supported class;
``vision_tower`` methods (fastervlm, visionzip, prumerge+, ficoco-v) on the projector input,
scored by a CLIP layer, on LLaVA-1.5 with a CLIP tower. ToMe (``every_block``) is not offered.
The options of a method are its config dataclass's fields besides keep.

Diversity methods (tokenkern.integrations.diversity, .relevance): dart in the decoder from
layer K, its similarity on the final norm of layer K-1's output (a fraction keep: a budget
per sample); dart-embeddings on each image's decoder input embeddings, the sample's text after
its images as text pivots; divprune after the projector, per crop on LLaVA-NeXT (newline tokens
kept); mmr on LLaVA-1.5 with the [CLS] attention as importance; cdpruner on LLaVA-1.5 with the
paired CLIP model (``text_encoder=``, ``tokenizer=``, ``visual_projection=``) and the question
set per call (``handle.set_text`` / ``handle.set_text_embeds``).

Option `layer` (the methods' config field) picks the layer. LLM-side methods: ``layer=K`` means
that decoder layers 0 .. K-1 (0-based) see every token, the attention that layer K-1 computed
scores the image tokens, and layers K, K+1, ... see the kept tokens only. Defaults follow the
released code: fastv 2 (FastV's K), sparsevlm (3, 7, 16) (three steps; SparseVLM's
``pruning_loc=[2, 6, 15]``), ficoco-l 6 (FiCoCo-L's ``control_encoding_layer=4``: layer 5's
attention). Vision-side methods: the CLIP layer (default: the layer that feeds the projector,
the model's vision_feature_layer; prumerge+: the last).

The model keeps its attention implementation (SDPA, FlashAttention 2 or eager): scores come
from tokenkern's ops on the q/k that the layer computed anyway, captured by hooks. Pruning
happens at prefill; generate() works (the KV cache of the pruned layers holds only kept tokens;
decoding steps see the same cache). Batches with padding work per sample. ``handle.remove()``
restores the model exactly. Output logits of a pruned prefill cover the kept positions only.

Positions (option ``positions``): ``"packed"`` gives the decoder what the model computes when
handed only the kept image features (as if input_ids had k placeholders per image): position
ids consecutive over the kept sequence and decoding steps continuing from the kept length, per
sample; ``"original"``: the kept tokens keep their original position ids (Qwen2-VL's 3-D M-RoPE
positions included). None follows the released code: packed for a method that reduces the
image before the decoder on LLaVA-1.5 / LLaVA-NeXT (the released code hands LLaVA fewer
features, as vLLM does); original for an LLM-side method (layers 0 .. K-1 saw the original
positions) and on Qwen2-VL / Qwen2.5-VL (the kept tokens keep their M-RoPE positions, as vLLM's
EVS does), where packed is refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import methods as M
from ..methods import registry
from ..methods.baselines import image_seed
from ..methods.sparsevlm import image_sizes as sparsevlm_image_sizes
from ..methods.sparsevlm import step_counts as sparsevlm_step_counts
from ..methods.sparsevlm import step_drops as sparsevlm_step_drops
from . import diversity, relevance
from .adapters import MROPE_VLMS, SUPPORTED, VLMParts, clip_layers, image_pixels, parts_of
from .decoder import DecoderPruner, PrefillState
from .sequence import image_ids
from .vision import ClipReducer, PostProjectorReducer, sequence_keep

# Post-projector methods that LLaVA-NeXT runs per crop (the base crop and each high-resolution
# crop on its own, newline tokens kept).
PER_CROP = ("divprune",)
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
POSITIONS = ("packed", "original")
_INSTALLED = "_tokenkern_prune_handle"  # the model attribute naming the handle installed on it


@dataclass
class PruneHandle:
    """What tokenkern.prune installed on a model; remove() (or leaving a `with` block) undoes it."""

    model: nn.Module
    method: str
    keep: float | int | None
    parts: list = field(default_factory=list)
    positions: str = "original"  # "packed" or "original": what the decoder's position ids are

    @property
    def decoder(self) -> DecoderPruner:
        """The decoder-side pruner (its `gather` describes the last pruned prefill)."""
        return next(p for p in self.parts if isinstance(p, DecoderPruner))

    def set_text(self, texts: str | list[str]) -> None:
        """CDPruner: the question of every sample of the next call with images (encoded by the
        CLIP text tower given to prune(); see tokenkern.integrations.relevance)."""
        self._text_part().set_text(texts)

    def set_text_embeds(self, embeds: Tensor, mask: Tensor | None = None) -> None:
        """CDPruner: embeds (B, M, E) the CLIP text embeddings of every sample's question (mask
        (B, M) bool: its valid rows), for the next call with images."""
        self._text_part().set_text_embeds(embeds, mask)

    def _text_part(self):
        part = next((p for p in self.parts if isinstance(p, relevance.TextRelevanceReducer)), None)
        if part is None:
            raise ValueError(f"tokenkern.prune: {self.method} reads no text; set_text is for cdpruner")
        return part

    def remove(self) -> None:
        for part in reversed(self.parts):
            part.remove()
        self.parts = []
        if getattr(self.model, _INSTALLED, None) is self:
            delattr(self.model, _INSTALLED)

    def __enter__(self) -> PruneHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class _Hook:
    def __init__(self, handle):
        self.handle = handle

    def remove(self) -> None:
        self.handle.remove()


def prune(
    model: nn.Module, method: str = "fastv", keep: float | int | None = None, *, positions: str | None = None,
    **options,
) -> PruneHandle:  # fmt: skip
    """Make a transformers VLM prune its visual tokens.

    keep: a fraction in (0, 1] or an absolute token count, per image; None (the default): 0.25,
    except for a method whose config's keep defaults to None (prumerge+: its released adaptive
    count, per image). positions: "packed" (the decoder gets the position ids it computes when
    handed only the kept image features: consecutive over the kept sequence, decoding steps
    continuing from the kept length, per sample; vision-side methods on LLaVA-1.5 / LLaVA-NeXT
    only), "original" (the kept tokens keep their original position ids, M-RoPE ones included)
    or None: the released code's choice (resolve_positions). options: the method's config
    fields besides keep (``tokenkern.methods.registry.options(method)``; e.g. layer=2 and
    query="last" for fastv; rank for lofi; seed for random, whose draw per image is seeded by
    ``methods.baselines.image_seed(seed, its pixels)``; recycle for sparsevlm). One method per
    model: remove() the handle before installing another."""
    spec = registry.get(method, caller="prune")
    if keep is None and _default_keep(spec) is not None:
        keep = 0.25
    if keep is not None:
        M.keep_count(keep, 1)  # validates keep
    parts = parts_of(model)
    installed = getattr(model, _INSTALLED, None)
    if installed is not None:
        raise ValueError(f"tokenkern.prune: the model already prunes with {installed.method!r}; call remove() on "
                         "that handle (or leave its with-block) before installing another method")  # fmt: skip
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"tokenkern.prune: attention implementation {impl!r} is not supported; use one of "
                         f"{ATTENTION_IMPLEMENTATIONS}")  # fmt: skip
    _check_offered(spec, parts)
    positions = resolve_positions(spec.name, parts.name, positions)
    packed = positions == "packed"
    clip_args = relevance.pop_clip_args(spec, options)
    cfg = _config(spec, keep, options)
    on_embeddings = _on_embeddings(spec)
    if relevance.needs_text(spec):
        relevance.check_clip_args(parts, clip_args)
    handle = PruneHandle(model, method, keep, positions=positions)
    if on_embeddings:

        def selector(state: PrefillState):
            return diversity.dart_on_embeddings(spec.recipe, state.inputs_embeds, state.image, state.valid, cfg), None

        decoder = DecoderPruner(parts.language_model, parts.layers, 0, selector, packed=packed)
    elif spec.site == "llm_layer":
        selector = _llm_selector(spec, cfg, parts)
        steps = _steps(cfg)
        if not all(1 <= k < len(parts.layers) for k in steps):
            raise ValueError(f"tokenkern.prune: layer must be in [1, {len(parts.layers) - 1}] (the decoder has "
                             f"{len(parts.layers)} layers), got {cfg.layer}")  # fmt: skip
        decoder = DecoderPruner(parts.language_model, parts.layers, steps, selector, parts.rotary(steps[0] - 1),
                                plan=getattr(selector, "plan", None))  # fmt: skip
    else:
        reducer = _vision_reducer(parts, spec, cfg, clip_args, handle)
        handle.parts.append(reducer)

        def selector(state: PrefillState, reducer=reducer):
            return sequence_keep(state.image, reducer.keeps), None

        decoder = DecoderPruner(parts.language_model, parts.layers, 0, selector, packed=packed)
    handle.parts.append(decoder)
    finder = _image_finder(parts, decoder, [p for p in handle.parts if hasattr(p, "finish_pending")])
    handle.parts.append(_Hook(parts.core.register_forward_pre_hook(finder, with_kwargs=True)))
    object.__setattr__(model, _INSTALLED, handle)  # a plain attribute: not a submodule, not in state_dict
    return handle


def resolve_positions(method: str, model: str, positions: str | None = None) -> str:
    """The position ids prune(model, method, positions=positions) gives the decoder: "packed"
    or "original". model: the transformers class name (e.g. "LlavaForConditionalGeneration").
    None resolves to the released code's choice: "packed" for a method that reduces the image
    before the decoder (registry site vision_tower or post_projector) on a 1-D RoPE model
    (LLaVA-1.5, LLaVA-NeXT); "original" for an LLM-side method (site llm_layer) and on an
    M-RoPE model (Qwen2-VL, Qwen2.5-VL), where "packed" is refused."""
    spec = registry.get(method, caller="prune")
    inside = spec.site == "llm_layer"
    mrope = model in MROPE_VLMS
    if positions is None:
        return "original" if inside or mrope else "packed"
    if positions not in POSITIONS:
        raise ValueError(f"tokenkern.prune: positions must be 'packed', 'original' or None, got {positions!r}")
    if positions == "packed" and inside:
        raise ValueError(f"tokenkern.prune: positions must be 'original' (or None) for {spec.name}, which prunes "
                         "inside the decoder (layers 0 .. K-1 saw the original positions), got 'packed'")  # fmt: skip
    if positions == "packed" and mrope:
        raise ValueError(f"tokenkern.prune: positions must be 'original' (or None) on {model}: the kept tokens keep "
                         "their M-RoPE (t, h, w) positions, got 'packed'")  # fmt: skip
    return positions


def _default_keep(spec: registry.MethodSpec):
    """The config's default keep (0.25 for a config without keep: prune() refuses it later)."""
    return {f.name: f.default for f in dataclasses.fields(spec.config)}.get("keep", 0.25)


def _check_offered(spec: registry.MethodSpec, parts: VLMParts) -> None:
    """Refuses a method the registry does not offer on this model (a CLIP-tower method on a
    model without a CLIP tower feeding a projector)."""
    offered = [n for n in registry.names() if parts.name in registry.get(n).models]
    if spec.site == "vision_tower" and (parts.clip_tower is None or parts.projector is None
                                        or parts.name not in spec.models):  # fmt: skip
        tower = type(getattr(parts.core, "vision_tower", getattr(parts.core, "visual", None))).__name__
        others = [n for n in offered if registry.get(n).site != "vision_tower"]
        raise ValueError(
            f"tokenkern.prune: {spec.name} reads a CLIP tower's [CLS] attention and is supported on "
            f"{', '.join(spec.models)} with a CLIPVisionModel tower; this {parts.name} has a {tower} "
            f"tower; use one of {', '.join(others)}"
        )
    if parts.name not in spec.models:
        raise ValueError(f"tokenkern.prune: method must be one of {', '.join(offered)} on {parts.name} ({spec.name} "
                         f"runs at {spec.site}, which prune() does not patch), got {spec.name!r}")  # fmt: skip


def _image_finder(parts: VLMParts, decoder: DecoderPruner, deferred: list):
    """Pre-hook on the VLM core: a call with images and input_ids announces the prefill (and
    lets each reducer in deferred finish the features it left unreduced for want of the image
    ids: encoded by generate() before this call); a decoding step of an M-RoPE model whose
    whole cache was pruned gets its position ids."""

    def hook(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        has_pixels = _has_images(kwargs)
        if input_ids is not None and has_pixels:
            decoder.pending_image = image_ids(input_ids, parts.image_token_id)
            for reducer in deferred:
                reducer.finish_pending()
        elif has_pixels:
            raise ValueError("tokenkern.prune: pass input_ids (not only inputs_embeds) with the images")
        elif getattr(module, "rope_deltas", None) is not None:
            tokens = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            out = decoder.mrope_decode_positions(module.rope_deltas, tokens, kwargs)
            return None if out is None else (args, out)
        return None

    return hook


def _has_images(kwargs: dict) -> bool:
    """Whether a VLM core call carries images: pixel_values, or (transformers 5.19 on, whose
    generate() encodes the images before the prefill) the image entry of mm_encoder_outputs."""
    encoded = kwargs.get("mm_encoder_outputs") or {}
    return kwargs.get("pixel_values") is not None or encoded.get("image") is not None


def _config(spec: registry.MethodSpec, keep, options: dict):
    """The method's config from keep and the options, which must be its config's fields besides
    keep (its ``__post_init__`` checks their values); any other option is refused, naming them."""
    names = spec.options()
    unknown = sorted(set(options) - set(names))
    if unknown:
        valid = ", ".join(names) if names else "none besides keep"
        raise ValueError(f"tokenkern.prune: unknown options {unknown} for {spec.name}; its options "
                         f"({spec.config.__name__}) are: {valid}")  # fmt: skip
    return spec.config(keep=keep, **options)


def _vision_reducer(parts: VLMParts, spec: registry.MethodSpec, cfg, clip_args: dict, handle: PruneHandle):
    if relevance.needs_text(spec):
        return relevance.TextRelevanceReducer(parts, spec, cfg, clip_args, handle)
    if spec.site == "post_projector":
        segments = _next_crops(parts) if spec.name in PER_CROP else None
        pixels = image_pixels(parts) if spec.draws() else None
        return PostProjectorReducer(parts.core, _post_projector_fn(spec, cfg), segments, pixels)
    layers = clip_layers(parts.clip_tower)
    n = len(layers)
    feature_layer = parts.vision_feature_layer if parts.vision_feature_layer is not None else -2
    default_layer = (n + feature_layer) % n if feature_layer < 0 else feature_layer - 1
    layer_idx = default_layer if cfg.layer is None else cfg.layer  # an int: the config checked it
    if not -n <= layer_idx < n:
        raise ValueError(f"tokenkern.prune: layer for {spec.name} must be in [-{n}, {n}) (the vision tower's "
                         f"layers), got {layer_idx}")  # fmt: skip

    def fn(features: Tensor, layer: M.VisionLayer) -> M.Reduction:
        inputs = {"features": features, "vision_layer": layer}
        if "importance" in spec.inputs:  # MMR: the [CLS] attention of the layer (FasterVLM's score)
            inputs["importance"] = layer.cls_attention()
        return spec.recipe(*(inputs[name] for name in spec.inputs), cfg)

    # An adaptive count differs per image: alone, each image gets the released count.
    return ClipReducer(parts.core, layers, parts.projector, layer_idx % n, fn, per_image=not spec.count_is_fixed(cfg))


def _next_crops(parts: VLMParts):
    """LLaVA-NeXT: the crop of every token of image i (diversity.next_crop_ids), from the
    image_sizes of the get_image_features call; None on the other models."""
    if parts.name != "LlavaNextForConditionalGeneration":
        return None

    def segments(features: Tensor, i: int, args: tuple, kwargs: dict) -> Tensor:
        sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
        return diversity.next_crop_ids(parts.core.config, features.shape[0], sizes[i].tolist())

    return segments


def _post_projector_fn(spec: registry.MethodSpec, cfg):
    """features (1, n, D) of one image -> Reduction. Features are reduced in float32. A recipe
    that draws (takes a generator) gets, per image, ``fn(features, pixels=that image's pixel
    values)`` and a generator seeded with image_seed(cfg.seed, pixels): the draw is a function
    of the seed and the image's content alone, whatever the batch, the image's place in it or
    the call (a serving engine replays it)."""
    if not spec.draws():
        return lambda features: spec.recipe(features.float(), cfg)

    def fn(features: Tensor, pixels: Tensor) -> M.Reduction:
        gen = torch.Generator(device=features.device).manual_seed(image_seed(cfg.seed, pixels))
        return spec.recipe(features.float(), cfg, generator=gen)

    return fn


def _decoder_layer(state: PrefillState) -> M.DecoderLayer:
    return M.DecoderLayer(state.q, state.k, state.scale, state.valid, state.image, state.text, hidden=state.hidden)


def _steps(cfg) -> tuple[int, ...]:
    """The decoder layers at which an LLM-side method prunes: cfg.layers, else (cfg.layer,)."""
    layers = getattr(cfg, "layers", None)
    return tuple(layers) if layers is not None else (cfg.layer,)


def _on_embeddings(spec: registry.MethodSpec) -> bool:
    """Whether the method runs on the decoder's input embeddings (dart-embeddings, DART's
    fixed-count form): each image is reduced before the LLM, with the embeddings of the
    sample's tokens after its last image as the text pivots' candidates."""
    return spec.recipe is M.dart_embeddings


def _llm_selector(spec: registry.MethodSpec, cfg, parts: VLMParts):
    """-> select(state) -> (keep mask, merged hidden or None), from the recipe's Reduction (or
    its (keep mask, scores) pair). Inputs by name: ``decoder_layer`` (the captured layer K-1)
    and ``normed_hidden`` (layer K-1's output hidden states after the decoder's final norm, DART's
    similarity features)."""
    if "raters" in spec.inputs:
        return _rater_selector(spec, cfg)
    unknown = set(spec.inputs) - {"decoder_layer", "normed_hidden"}
    if unknown:
        raise ValueError(f"tokenkern.prune: {spec.name} reads {sorted(unknown)}, which prune() does not provide "
                         "inside the decoder")  # fmt: skip

    def select(state: PrefillState):
        inputs = {"decoder_layer": _decoder_layer(state)}
        if "normed_hidden" in spec.inputs:
            inputs["normed_hidden"] = _final_norm(parts, state.hidden)
        args = [inputs[name] for name in spec.inputs]
        if "normed_hidden" in spec.inputs:  # DART: its budget is a count; a fraction sizes it per sample
            return diversity.dart_in_decoder(spec.recipe, *args, cfg), None
        red = spec.recipe(*args, cfg)
        return red.keep_mask, red.tokens

    return select


def _final_norm(parts: VLMParts, hidden: Tensor) -> Tensor:
    """hidden: (B, L, D) a decoder layer's output -> the decoder's final norm of it (with its
    weight), as the LM head would see it."""
    if parts.final_norm is None:
        raise ValueError(f"tokenkern.prune: this {parts.name}'s decoder has no final norm (`norm`)")
    return parts.final_norm(hidden)


def _rater_selector(spec: registry.MethodSpec, cfg):
    """SparseVLM's steps: raters and image sizes come from the unpruned prefill (step 0) and
    are carried to the positions each later step sees; each step keeps step_counts of them."""

    def select(state: PrefillState):
        if state.step == 0:
            text_all = (state.image < 0) & state.valid
            state.memo["raters"] = M.raters(state.inputs_embeds, state.image >= 0, text_all)
            state.memo["sizes"] = sparsevlm_image_sizes(state.image)
        rater_mask = state.from_start(state.memo["raters"], False)
        counts = sparsevlm_step_counts(cfg, state.step, state.from_start(state.memo["sizes"]))
        red = spec.recipe(_decoder_layer(state), rater_mask, cfg, counts=counts)
        return red.keep_mask, red.tokens

    select.plan = lambda state: sparsevlm_step_drops(cfg, state.image)  # sizes every step with one sync
    return select


__all__ = ["POSITIONS", "SUPPORTED", "PruneHandle", "prune", "resolve_positions"]
