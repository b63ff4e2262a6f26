"""CDPruner in prune(): the CLIP text tower and image projection that its relevance needs.

CDPruner weighs LLaVA's post-projector tokens by their relevance to the question, measured in
the CLIP space the vision tower was trained in: the image side is
``visual_projection(post_layernorm(hidden_states[-2][:, 1:]))`` of the model's own CLIP tower,
the text side the CLIP text embeddings of the raw question. LLaVA's tower is a
CLIPVisionModel without the projection, so prune() takes the CLIP model it pairs with:

    handle = tokenkern.prune(model, "cdpruner", keep=64, text_encoder=clip, tokenizer=tok)
    handle.set_text(["What is on the table?"])      # one question per sample, before each call
    model.generate(**inputs)

text_encoder: a transformers CLIPModel (its text tower, text_projection and
visual_projection) or a CLIPTextModelWithProjection, then with ``visual_projection=`` the
paired CLIPVisionModelWithProjection / CLIPModel (or its nn.Linear). tokenizer: the CLIP
tokenizer (a callable returning ``input_ids``); without it, pass the text embeddings yourself
with ``handle.set_text_embeds(embeds (B, M, E), mask (B, M) bool or None)``. The question is
split into 77-token segments (M rows), each pooled as the CLIP text model pools it. The text
set on the handle is used by the next call with images and then forgotten (a call with images
and no text is refused): a stale question never silently prunes another prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from ..methods import registry
from .adapters import VLMParts, clip_layers
from .vision import _MethodPatch, apply_reduction

CLIP_ARGS = ("text_encoder", "tokenizer", "visual_projection")
SEGMENT = 77  # CLIP's text context length


def needs_text(spec: registry.MethodSpec) -> bool:
    """Whether the method reads CLIP text embeddings (CDPruner)."""
    return "text_emb" in spec.inputs or spec.name == "cdpruner"


def pop_clip_args(spec: registry.MethodSpec, options: dict) -> dict:
    """Takes prune()'s CLIP arguments out of options (they are not config fields)."""
    if not needs_text(spec):
        return {}
    return {name: options.pop(name) for name in CLIP_ARGS if name in options}


def _projection(module: object) -> nn.Module | None:
    if module is None or isinstance(module, nn.Linear):
        return module
    return getattr(module, "visual_projection", None)


def check_clip_args(parts: VLMParts, args: dict) -> None:
    """CDPruner needs a CLIP tower ([CLS] first) feeding a projector, a text encoder and the
    visual projection; refuses anything else, naming what is missing."""
    if parts.clip_tower is None or parts.projector is None:
        raise ValueError("tokenkern.prune: cdpruner measures relevance in a CLIP tower's space and is supported "
                         "on LlavaForConditionalGeneration with a CLIPVisionModel tower; this "
                         f"{parts.name} has none")  # fmt: skip
    enc = args.get("text_encoder")
    if enc is None or not (hasattr(enc, "get_text_features") or hasattr(enc, "text_projection")):
        raise ValueError("tokenkern.prune: text_encoder must be the CLIPModel (or CLIPTextModelWithProjection) "
                         f"that the vision tower pairs with, got {type(enc).__name__}")  # fmt: skip
    proj = _projection(args.get("visual_projection", enc if hasattr(enc, "visual_projection") else None))
    if not isinstance(proj, nn.Module):
        raise ValueError("tokenkern.prune: visual_projection must be the paired CLIPVisionModelWithProjection, "
                         "CLIPModel or its nn.Linear (a CLIPTextModelWithProjection has none), got "
                         f"{type(args.get('visual_projection')).__name__}")  # fmt: skip
    tok = args.get("tokenizer")
    if tok is not None and not callable(tok):
        raise ValueError(f"tokenkern.prune: tokenizer must be a callable CLIP tokenizer, got {type(tok).__name__}")


@torch.no_grad()
def encode_text(text_encoder: nn.Module, tokenizer, texts: list[str]) -> tuple[Tensor, Tensor]:
    """texts: B questions -> (embeds (B, M, E), mask (B, M) bool): every question's 77-token
    segments through the CLIP text tower, padded to the longest."""
    device = next(text_encoder.parameters()).device
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    rows = []
    for text in texts:
        ids = list(tokenizer(text)["input_ids"])
        chunks = [ids[i : i + SEGMENT] for i in range(0, max(len(ids), 1), SEGMENT)]
        input_ids = torch.tensor([c + [pad] * (SEGMENT - len(c)) for c in chunks], device=device)
        attn = torch.tensor([[1] * len(c) + [0] * (SEGMENT - len(c)) for c in chunks], device=device)
        if hasattr(text_encoder, "get_text_features"):
            out = text_encoder.get_text_features(input_ids=input_ids, attention_mask=attn)
            emb = out.pooler_output if hasattr(out, "pooler_output") else out
        else:
            emb = text_encoder(input_ids=input_ids, attention_mask=attn).text_embeds
        rows.append(emb.float())
    m = max(r.shape[0] for r in rows)
    embeds = torch.zeros(len(rows), m, rows[0].shape[-1], device=device)
    mask = torch.zeros(len(rows), m, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        embeds[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = True
    return embeds, mask


class TextRelevanceReducer:
    """Wraps get_image_features of a LLaVA with a CLIP tower: captures the tower's
    hidden_states[-2] (the output of its second-to-last layer), projects the patch tokens into
    CLIP space and reduces every image's post-projector features with
    ``recipe(features, image_emb, text_emb, cfg, text_mask=...)``, the text being its sample's
    (images come in sample order; the handle's decoder knows the pending prefill's image ids)."""

    def __init__(self, parts: VLMParts, spec: registry.MethodSpec, cfg, args: dict, handle) -> None:
        self.recipe, self.cfg, self.handle = spec.recipe, cfg, handle
        enc = args["text_encoder"]
        self.text_encoder, self.tokenizer = enc, args.get("tokenizer")
        self.projection = _projection(args.get("visual_projection", enc))
        tower = getattr(parts.clip_tower, "vision_model", parts.clip_tower)
        self.post_layernorm = tower.post_layernorm
        self.keeps: list[Tensor] = []
        self.text: tuple[Tensor, Tensor | None] | None = None
        self._armed = False
        self._hidden: Tensor | None = None
        self._pending: Callable[[], object] | None = None
        layers = clip_layers(parts.clip_tower)
        self._hook = layers[len(layers) - 2].register_forward_hook(self._grab)
        self._patch = _MethodPatch(parts.core, "get_image_features", self._wrapped)
        self._original = self._patch.original

    def set_text(self, texts: str | list[str]) -> None:
        """The question of every sample of the next call (a str: one sample)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"tokenkern.prune: set_text takes a question str or a list of them, got {texts!r}")
        if self.tokenizer is None:
            raise ValueError("tokenkern.prune: set_text needs prune(..., tokenizer=<the CLIP tokenizer>); or pass "
                             "the embeddings with set_text_embeds")  # fmt: skip
        self.text = encode_text(self.text_encoder, self.tokenizer, texts)

    def set_text_embeds(self, embeds: Tensor, mask: Tensor | None = None) -> None:
        """embeds: (B, M, E) CLIP text embeddings of every sample's question (M segments), mask
        (B, M) bool its valid rows (None: all), for the next call."""
        if not isinstance(embeds, Tensor) or embeds.dim() != 3:
            got = tuple(embeds.shape) if isinstance(embeds, Tensor) else type(embeds).__name__
            raise ValueError(f"tokenkern.prune: text embeds must be (B, M, E), got {got}")
        self.text = (embeds, mask)

    def _grab(self, module, args, output) -> None:
        if self._armed:
            self._hidden = output[0] if isinstance(output, tuple) else output

    def _wrapped(self, *args, **kwargs):
        if self.text is None:
            raise ValueError("tokenkern.prune: cdpruner needs the question of every sample: call "
                             "handle.set_text([...]) (or set_text_embeds) before each call with images")  # fmt: skip
        (text, mask), self.text = self.text, None
        self._armed, self._hidden, self._pending = True, None, None
        try:
            out = self._original(*args, **kwargs)
        finally:
            self._armed = False
        hidden, self._hidden = self._hidden, None
        image_emb = self.projection(self.post_layernorm(hidden[:, 1:]))
        if text.shape[0] > 1 and self.handle.decoder.pending_image is None and hasattr(out, "pooler_output"):
            # generate() of transformers 5.19 on encodes the images before the prefill: each image's
            # sample is known once the core's forward gets input_ids (finish_pending).
            self._pending = partial(self._reduce, out, image_emb, text, mask)
            return out
        return self._reduce(out, image_emb, text, mask)

    def finish_pending(self) -> None:
        """Reduces the features an earlier get_image_features call returned unreduced (their
        ModelOutput, now in the forward's mm_encoder_outputs, in place), the prefill's image
        ids now known; nothing when there are none."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending()

    def _reduce(self, out, image_emb: Tensor, text: Tensor, mask: Tensor | None):
        """out: get_image_features' output (its features: (n_img, N, D) or a list of (N, D));
        image_emb: (n_img, N, E) CLIP patch embeddings; text: (B, M, E). -> out, reduced."""
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        owners = self._owners(len(feats), text.shape[0])
        new, keeps = [], []
        for i, f in enumerate(feats):
            if image_emb.shape[1] != f.shape[0]:
                raise ValueError(f"tokenkern.prune: cdpruner needs one CLIP patch per projector output token "
                                 f"(vision_feature_select_strategy='default'); got {image_emb.shape[1]} patches for "
                                 f"{f.shape[0]} tokens")  # fmt: skip
            s = owners[i]
            red = self.recipe(f[None].float(), image_emb[i : i + 1].float(), text[s : s + 1].to(f.device).float(),
                              self.cfg, text_mask=None if mask is None else mask[s : s + 1])  # fmt: skip
            reduced, keep = apply_reduction(f[None], red)
            new.append(reduced[0])
            keeps.append(keep[0])
        self.keeps = keeps
        stacked = type(feats)(new) if isinstance(feats, list | tuple) else torch.stack(new)
        if hasattr(out, "pooler_output"):
            out.pooler_output = stacked
            return out
        return stacked

    def _owners(self, n_images: int, n_texts: int) -> list[int]:
        """The sample of every image (images come in sample order); one text serves every image."""
        if n_texts == 1:
            return [0] * n_images
        image = self.handle.decoder.pending_image
        if image is None:
            raise ValueError("tokenkern.prune: cdpruner needs input_ids with the images")
        counts = ((image.max(dim=1).values + 1).clamp(min=0)).tolist()
        if len(counts) != n_texts:
            raise ValueError(f"tokenkern.prune: set_text got {n_texts} questions for a batch of {len(counts)}")
        return [s for s, c in enumerate(counts) for _ in range(c)]

    def remove(self) -> None:
        self._hook.remove()
        self._patch.remove()
