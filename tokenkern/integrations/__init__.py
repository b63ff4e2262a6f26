"""Drop-in visual-token pruning for transformers VLMs: ``handle = tokenkern.prune(model, ...)``.

Supported classes: LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration (transformers 5.x).

| method | side | where | models |
|---|---|---|---|
| fastv, sparsevlm, ficoco-l | LLM | from decoder layer K on (option `layer`) | all |
| lofi, random, uniform | vision | each image's features after the projector | all |
| fastervlm, visionzip, prumerge+, ficoco-v | vision | projector input, scored by a CLIP layer | LLaVA-1.5 |

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
decoding steps see the same cache). Kept tokens keep their original position ids (Qwen2-VL's
3-D M-RoPE positions included). Batches with padding work per sample. ``handle.remove()``
restores the model exactly. Output logits of a pruned prefill cover the kept positions only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import methods as M
from ..methods.sparsevlm import image_sizes as sparsevlm_image_sizes
from ..methods.sparsevlm import step_counts as sparsevlm_step_counts
from ..methods.sparsevlm import step_drops as sparsevlm_step_drops
from .adapters import SUPPORTED, VLMParts, clip_layers, parts_of
from .decoder import DecoderPruner, PrefillState
from .sequence import image_ids
from .vision import ClipReducer, PostProjectorReducer, sequence_keep

LLM_METHODS = ("fastv", "sparsevlm", "ficoco-l")
POST_PROJECTOR_METHODS = ("lofi", "random", "uniform")
CLIP_METHODS = ("fastervlm", "visionzip", "prumerge+", "ficoco-v")
METHODS = LLM_METHODS + POST_PROJECTOR_METHODS + CLIP_METHODS
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
_INSTALLED = "_tokenkern_prune_handle"  # the model attribute naming the handle installed on it


@dataclass
class PruneHandle:
    """What tokenkern.prune installed on a model; remove() (or leaving a `with` block) undoes it."""

    model: nn.Module
    method: str
    keep: float | int | None
    parts: list = field(default_factory=list)

    @property
    def decoder(self) -> DecoderPruner:
        """The decoder-side pruner (its `gather` describes the last pruned prefill)."""
        return next(p for p in self.parts if isinstance(p, DecoderPruner))

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


def prune(model: nn.Module, method: str = "fastv", keep: float | int | None = None, **options) -> PruneHandle:
    """Make a transformers VLM prune its visual tokens.

    keep: a fraction in (0, 1] or an absolute token count, per image; None (the default): 0.25,
    except for prumerge+: its released adaptive count, per image. options: the method's
    config fields (e.g. layer=2 and query="last" for fastv; rank for lofi; seed for random;
    contextual_fraction for visionzip; neighbours, extra_token, samples for prumerge+; topk and targets for
    ficoco-v/l, local_penalty for ficoco-v, correlate and protect_first for ficoco-l;
    recycle for sparsevlm). One method per model: remove() the handle before installing another."""
    if method not in METHODS:
        raise ValueError(f"tokenkern.prune: unknown method {method!r}; choose from {', '.join(METHODS)}")
    if keep is None and method != "prumerge+":
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
    handle = PruneHandle(model, method, keep)
    if method in LLM_METHODS:
        selector, layer = _llm_selector(method, keep, options)
        steps = layer if isinstance(layer, tuple) else (layer,)
        if not all(1 <= k < len(parts.layers) for k in steps):
            raise ValueError(f"tokenkern.prune: layer must be in [1, {len(parts.layers) - 1}] (the decoder has "
                             f"{len(parts.layers)} layers), got {layer}")  # fmt: skip
        decoder = DecoderPruner(parts.language_model, parts.layers, steps, selector, parts.rotary(steps[0] - 1),
                                plan=getattr(selector, "plan", None))  # fmt: skip
    else:
        reducer = _vision_reducer(parts, method, keep, options)
        handle.parts.append(reducer)

        def selector(state: PrefillState, reducer=reducer):
            return sequence_keep(state.image, reducer.keeps), None

        decoder = DecoderPruner(parts.language_model, parts.layers, 0, selector)
    handle.parts.append(decoder)
    handle.parts.append(_Hook(parts.core.register_forward_pre_hook(_image_finder(parts, decoder), with_kwargs=True)))
    object.__setattr__(model, _INSTALLED, handle)  # a plain attribute: not a submodule, not in state_dict
    return handle


def _image_finder(parts: VLMParts, decoder: DecoderPruner):
    """Pre-hook on the VLM core: a call with images and input_ids announces the prefill; a
    decoding step of an M-RoPE model whose whole cache was pruned gets its position ids."""

    def hook(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        has_pixels = kwargs.get("pixel_values") is not None
        if input_ids is not None and has_pixels:
            decoder.pending_image = image_ids(input_ids, parts.image_token_id)
        elif has_pixels:
            raise ValueError("tokenkern.prune: pass input_ids (not only inputs_embeds) with the images")
        elif getattr(module, "rope_deltas", None) is not None:
            tokens = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            out = decoder.mrope_decode_positions(module.rope_deltas, tokens, kwargs)
            return None if out is None else (args, out)
        return None

    return hook


def _config(cls, keep, options, names):
    """The method's config from keep and the options it takes (``names``: its fields, which its
    ``__post_init__`` checks); any other option is refused, naming the ones it takes."""
    unknown = sorted(set(options) - set(names))
    if unknown:
        valid = ", ".join(names) if names else "none besides keep"
        raise ValueError(f"tokenkern.prune: unknown options {unknown} for this method; its options "
                         f"({cls.__name__}) are: {valid}")  # fmt: skip
    fields = {n: options.pop(n) for n in names if n in options}
    return cls(keep=keep, **fields)


def _vision_reducer(parts: VLMParts, method: str, keep, options):
    if method in POST_PROJECTOR_METHODS:
        if method == "lofi":
            cfg = _config(M.LoFiConfig, keep, options, ("rank", "oversample", "power_iters", "seed"))
            fn = lambda f: M.lofi(f.float(), cfg)  # noqa: E731
        elif method == "random":
            cfg = _config(M.RandomConfig, keep, options, ("seed",))
            fn = _random_per_image(cfg)
        else:
            cfg = _config(M.UniformConfig, keep, options, ())
            fn = lambda f: M.uniform_select(f, cfg)  # noqa: E731
        return PostProjectorReducer(parts.core, fn)
    if parts.clip_tower is None or parts.projector is None:
        tower = type(getattr(parts.core, "vision_tower", getattr(parts.core, "visual", None))).__name__
        raise ValueError(
            f"tokenkern.prune: {method} reads a CLIP tower's [CLS] attention and is supported on "
            f"LlavaForConditionalGeneration with a CLIPVisionModel tower; this {parts.name} has a {tower} "
            f"tower; use one of {', '.join(POST_PROJECTOR_METHODS + LLM_METHODS)}"
        )
    layers = clip_layers(parts.clip_tower)
    n = len(layers)
    feature_layer = parts.vision_feature_layer if parts.vision_feature_layer is not None else -2
    default_layer = (n + feature_layer) % n if feature_layer < 0 else feature_layer - 1
    per_image = False
    if method == "fastervlm":
        cfg = _config(M.FasterVLMConfig, keep, options, ("layer",))
        fn = lambda f, layer: M.fastervlm(f, layer, cfg)  # noqa: E731
    elif method == "visionzip":
        cfg = _config(M.VisionZipConfig, keep, options, ("contextual_fraction", "layer"))
        fn = lambda f, layer: M.visionzip(f, layer, cfg)  # noqa: E731
    elif method == "prumerge+":
        cfg = _config(M.PruMergeConfig, keep, options, ("neighbours", "layer", "extra_token", "samples"))
        fn = lambda f, layer: M.prumerge_plus(f, layer, cfg)[0]  # noqa: E731
        per_image = cfg.keep is None  # adaptive counts differ per image; alone, each is the released one
    else:
        cfg = _config(M.FiCoCoVConfig, keep, options, ("topk", "layer", "local_penalty", "targets"))
        fn = lambda f, layer: M.ficoco_v(f, layer.q, layer.k, layer.scale, cfg)  # noqa: E731
    layer_idx = default_layer if cfg.layer is None else cfg.layer  # an int: the config checked it
    if not -n <= layer_idx < n:
        raise ValueError(f"tokenkern.prune: layer for {method} must be in [-{n}, {n}) (the vision tower's layers), "
                         f"got {layer_idx}")  # fmt: skip
    return ClipReducer(parts.core, layers, parts.projector, layer_idx % n, fn,
                       per_image=per_image)  # fmt: skip


def _random_per_image(cfg):
    """One generator per device, seeded with cfg.seed when prune() installs the hook: every
    image of every call gets its own draw, and the sequence of draws replays after a new prune()."""
    generators: dict[torch.device, torch.Generator] = {}

    def fn(features: Tensor):
        gen = generators.get(features.device)
        if gen is None:
            gen = generators[features.device] = torch.Generator(device=features.device).manual_seed(cfg.seed)
        return M.random_select(features, cfg, generator=gen)

    return fn


def _llm_selector(method: str, keep, options):
    """-> (select(state) -> (keep mask, merged hidden or None), the decoder layer K or the
    steps (K1, K2, ...))."""
    if method == "fastv":
        cfg = _config(M.FastVConfig, keep, options, ("query", "layer"))

        def select(state: PrefillState):
            layer = M.DecoderLayer(state.q, state.k, state.scale, state.valid, state.image, state.text)
            return M.fastv(layer, cfg)[0], None

        return select, cfg.layer
    if method == "sparsevlm":
        cfg = _config(M.SparseVLMConfig, keep, options, ("recycle", "layer"))
        return _sparsevlm_selector(cfg), cfg.layers
    cfg = _config(M.FiCoCoLConfig, keep, options, ("topk", "layer", "correlate", "targets", "protect_first"))

    def select(state: PrefillState):
        keep_mask = torch.ones_like(state.valid)
        hidden = state.hidden.clone()
        for s in range(state.image.shape[0]):  # visual/text counts may differ per sample
            txt = state.text[s].nonzero().flatten()
            if len(txt) == 0:
                continue
            q, k = state.q[s : s + 1], state.k[s : s + 1]
            for img in state.image[s].unique().tolist():  # keep is per image, merges stay inside it
                if img < 0:
                    continue
                vis = (state.image[s] == img).nonzero().flatten()
                red = M.ficoco_l(hidden[s : s + 1, vis], q[:, :, vis], k[:, :, vis], q[:, :, txt], k[:, :, txt],
                                 state.scale, cfg)  # fmt: skip
                keep_mask[s, vis] = False
                keep_mask[s, vis[red.indices[0]]] = True
                hidden[s, vis[red.indices[0]]] = red.tokens[0].to(hidden.dtype)
        return keep_mask, hidden

    return select, cfg.layer


def _sparsevlm_selector(cfg):
    """SparseVLM's steps: raters and image sizes come from the unpruned prefill (step 0) and
    are carried to the positions each later step sees; each step keeps step_counts of them."""

    def select(state: PrefillState):
        if state.step == 0:
            text_all = (state.image < 0) & state.valid
            state.memo["raters"] = M.raters(state.inputs_embeds, state.image >= 0, text_all)
            state.memo["sizes"] = sparsevlm_image_sizes(state.image)
        rater_mask = state.from_start(state.memo["raters"], False)
        counts = sparsevlm_step_counts(cfg, state.step, state.from_start(state.memo["sizes"]))
        layer = M.DecoderLayer(state.q, state.k, state.scale, state.valid, state.image, state.text)
        keep_mask, _ = M.sparsevlm(layer, rater_mask, cfg, counts=counts)
        hidden = _recycle(state.hidden, state.image, keep_mask) if cfg.recycle else None
        return keep_mask, hidden

    select.plan = lambda state: sparsevlm_step_drops(cfg, state.image)  # sizes every step with one sync
    return select


def _recycle(hidden: Tensor, image: Tensor, keep_mask: Tensor) -> Tensor:
    """SparseVLM recycling as documented in methods.sparsevlm: each dropped image token merges
    into its most similar kept image token of the same image (size-weighted mean)."""
    import tokenkern

    out = hidden.clone()
    for s in range(image.shape[0]):
        for img in image[s].unique().tolist():
            if img < 0:
                continue
            pos = (image[s] == img).nonzero().flatten()
            kept = keep_mask[s, pos].nonzero().flatten()
            if len(kept) == len(pos):
                continue
            merged, _ = tokenkern.merge_tokens(hidden[s : s + 1, pos], kept[None], validate=False)
            out[s, pos[kept]] = merged[0]
    return out


__all__ = ["CLIP_METHODS", "LLM_METHODS", "METHODS", "POST_PROJECTOR_METHODS", "SUPPORTED", "PruneHandle", "prune"]
