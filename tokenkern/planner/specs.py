"""Model specs: the sizes of a VLM that its inference cost depends on.

A VLM here is ``vision tower -> projector -> LLM``: the vision tower turns each image crop into
patch tokens, the projector maps them (after an optional spatial merge) into the LLM's embedding
space, token reduction keeps V of them, and the LLM runs a prefill over ``text + V`` tokens and
then one decode step per generated token.

The specs are plain frozen dataclasses of integers, built from explicit sizes, from a
``transformers`` config (``from_config``; no ``transformers`` import is needed, the config's
attributes are read), or from a preset (``tokenkern.planner.presets``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

_LLAMA_LIKE = {"llama", "mistral"}
_QWEN2_LIKE = {"qwen2", "qwen2_vl_text", "qwen2_vl", "qwen2_5_vl_text"}


def _check_positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class LLMSpec:
    """Sizes of a decoder-only LLM of the Llama / Qwen2 family (RMSNorm, RoPE, no absolute
    position table).

    Attributes:
        name: label used in tables and plots.
        layers: decoder layers.
        hidden: model width ``h``.
        intermediate: MLP width ``I``.
        heads: query heads ``Hq``.
        kv_heads: key/value heads ``Hkv`` (GQA when ``Hkv < Hq``; ``Hq % Hkv == 0``).
        vocab: vocabulary size (embedding rows and LM-head outputs).
        head_dim: per-head width ``d``; ``None`` means ``hidden // heads``.
        gated_mlp: SwiGLU (gate, up, down: three ``h x I`` matmuls) if True, else a plain
            two-matmul MLP.
        qkv_bias / o_bias / mlp_bias: biases on the q/k/v, output and MLP projections (Qwen2:
            q/k/v only; Llama: ``attention_bias`` sets all four, ``mlp_bias`` the MLP).
        tie_embeddings: the LM head shares the input embedding matrix.
    """

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int | None = None
    gated_mlp: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        _check_positive(self, "layers", "hidden", "intermediate", "heads", "kv_heads", "vocab")
        if self.head_dim is not None:
            _check_positive(self, "head_dim")
        if self.heads % self.kv_heads:
            raise ValueError(f"LLMSpec: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    @property
    def dh(self) -> int:
        """Per-head width ``d``."""
        return self.head_dim if self.head_dim is not None else self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        """Width of the query (and attention output) projection, ``Hq * d``."""
        return self.heads * self.dh

    @property
    def kv_dim(self) -> int:
        """Width of the key and of the value projection, ``Hkv * d``."""
        return self.kv_heads * self.dh

    def layer_params(self) -> int:
        """Parameters of one decoder layer (projections, biases, two RMSNorm weights)."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        attn = h * q + 2 * h * kv + q * h
        if self.qkv_bias:
            attn += q + 2 * kv
        if self.o_bias:
            attn += h
        n_mlp = 3 if self.gated_mlp else 2
        mlp = n_mlp * h * i
        if self.mlp_bias:
            mlp += (n_mlp - 1) * i + h
        return attn + mlp + 2 * h

    def params(self) -> int:
        """All parameters: embeddings, layers, final norm and (untied) LM head."""
        embed = self.vocab * self.hidden
        head = 0 if self.tie_embeddings else self.vocab * self.hidden
        return embed + self.layers * self.layer_params() + self.hidden + head

    @classmethod
    def from_config(cls, config: Any, name: str | None = None) -> LLMSpec:
        """From a ``transformers`` LLM config (``LlamaConfig``, ``MistralConfig``, ``Qwen2Config``,
        ``Qwen2VLTextConfig``) or a VLM config, whose ``text_config`` is used."""
        top = config
        if getattr(config, "text_config", None) is not None:
            config = config.text_config
        model_type = getattr(config, "model_type", "")
        if model_type in _LLAMA_LIKE:
            attn_bias = bool(getattr(config, "attention_bias", False))
            qkv_bias, o_bias, mlp_bias = attn_bias, attn_bias, bool(getattr(config, "mlp_bias", False))
            head_dim = getattr(config, "head_dim", None)
        elif model_type in _QWEN2_LIKE:
            qkv_bias, o_bias, mlp_bias = True, False, False
            head_dim = None  # Qwen2 attention always uses hidden // heads
        else:
            raise ValueError(
                f"LLMSpec.from_config: unsupported model_type {model_type!r} "
                f"(supported: {sorted(_LLAMA_LIKE | _QWEN2_LIKE)}); build an LLMSpec from explicit sizes"
            )
        tie = getattr(top, "tie_word_embeddings", None)
        if tie is None:
            tie = getattr(config, "tie_word_embeddings", False)
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        if head_dim == config.hidden_size // heads:
            head_dim = None  # the default: keep specs from configs and from sizes comparable
        return cls(
            name=name or getattr(config, "_name_or_path", "") or model_type,
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=heads,
            kv_heads=kv_heads,
            vocab=config.vocab_size,
            head_dim=head_dim,
            gated_mlp=True,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            tie_embeddings=bool(tie),
        )


@dataclass(frozen=True)
class VisionSpec:
    """Sizes of a ViT vision tower (pre-norm blocks: LayerNorm, MHA, LayerNorm, plain MLP).

    Attributes:
        name: label.
        layers: transformer blocks that run (``transformers`` runs all of them even when an
            earlier layer's output is the one used, e.g. LLaVA's ``vision_feature_layer=-2``).
        hidden: width.
        intermediate: MLP width.
        heads: attention heads.
        patch_size: square patch side in pixels.
        image_size: ``(height, width)`` in pixels of one crop (an int means square).
        in_channels: image channels.
        temporal_patch: frames per patch (Qwen2-VL's Conv3d stem uses 2: a still image is
            repeated to two frames); the stem's kernel is ``in_channels x temporal_patch x p x p``.
        class_token: a [CLS] token is prepended (CLIP).
        learned_positions: a learned absolute position table (CLIP) instead of RoPE (Qwen2-VL).
        pre_norm / post_norm: a LayerNorm before the first / after the last block (CLIP).
        crops: crops per image run through the tower (LLaVA-NeXT "anyres": base + tiles).
    """

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    patch_size: int
    image_size: int | tuple[int, int]
    in_channels: int = 3
    temporal_patch: int = 1
    class_token: bool = True
    learned_positions: bool = True
    pre_norm: bool = True
    post_norm: bool = True
    crops: int = 1

    def __post_init__(self) -> None:
        _check_positive(self, "layers", "hidden", "intermediate", "heads", "patch_size", "in_channels")
        _check_positive(self, "temporal_patch", "crops")
        hh, ww = self.image_hw
        if hh % self.patch_size or ww % self.patch_size or hh <= 0 or ww <= 0:
            raise ValueError(f"VisionSpec: image_size {self.image_size} must be positive multiples of patch_size")

    @property
    def image_hw(self) -> tuple[int, int]:
        s = self.image_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    @property
    def patches(self) -> int:
        """Patch tokens of one crop, ``(H / p) * (W / p)``."""
        hh, ww = self.image_hw
        return (hh // self.patch_size) * (ww // self.patch_size)

    @property
    def tokens_per_crop(self) -> int:
        """Sequence length inside the tower for one crop: patches (+ [CLS])."""
        return self.patches + int(self.class_token)

    def params(self) -> int:
        h, i = self.hidden, self.intermediate
        stem = h * self.in_channels * self.temporal_patch * self.patch_size**2  # conv, no bias
        extra = h * int(self.class_token) + (self.tokens_per_crop * h if self.learned_positions else 0)
        norms = 2 * h * (int(self.pre_norm) + int(self.post_norm))
        block = (4 * h * h + 4 * h) + (2 * h * i + i + h) + 4 * h
        return stem + extra + norms + self.layers * block

    def with_image_size(self, image_size: int | tuple[int, int]) -> VisionSpec:
        return dataclasses.replace(self, image_size=image_size)

    @classmethod
    def from_config(
        cls, config: Any, name: str | None = None, image_size: int | tuple[int, int] | None = None
    ) -> VisionSpec:
        """From a ``CLIPVisionConfig`` or a ``Qwen2VLVisionConfig`` (a VLM config's
        ``vision_config`` is used). ``image_size`` is required for Qwen2-VL (dynamic resolution)."""
        if getattr(config, "vision_config", None) is not None:
            config = config.vision_config
        model_type = getattr(config, "model_type", "")
        if model_type in {"qwen2_vl", "qwen2_vl_vision"}:
            if image_size is None:
                raise ValueError("VisionSpec.from_config: Qwen2-VL has no fixed resolution; pass image_size=(H, W)")
            return cls(
                name=name or "qwen2-vl-vit",
                layers=config.depth,
                hidden=config.embed_dim,
                intermediate=int(config.embed_dim * config.mlp_ratio),
                heads=config.num_heads,
                patch_size=config.patch_size,
                image_size=image_size,
                in_channels=getattr(config, "in_channels", 3),
                temporal_patch=config.temporal_patch_size,
                class_token=False,
                learned_positions=False,
                pre_norm=False,
                post_norm=False,
            )
        if model_type == "clip_vision_model":
            return cls(
                name=name or model_type,
                layers=config.num_hidden_layers,
                hidden=config.hidden_size,
                intermediate=config.intermediate_size,
                heads=config.num_attention_heads,
                patch_size=config.patch_size,
                image_size=image_size if image_size is not None else config.image_size,
                in_channels=getattr(config, "num_channels", 3),
            )
        raise ValueError(
            f"VisionSpec.from_config: unsupported vision model_type {model_type!r} "
            "(supported: clip_vision_model, qwen2_vl); build a VisionSpec from explicit sizes"
        )


@dataclass(frozen=True)
class ProjectorSpec:
    """The vision-to-LLM projector: an optional LayerNorm, then ``Linear(in, hidden)``,
    activation, ``Linear(hidden, out)``, applied to each merged token.

    LLaVA's ``mlp2x_gelu``: ``in = vision hidden``, ``hidden = out = LLM hidden``, ``merge = 1``.
    Qwen2-VL's patch merger: LayerNorm over the vision width, then ``merge = 4`` neighbouring
    patches (2x2) concatenated, ``in = hidden = 4 * vision hidden``, ``out = LLM hidden``.

    Attributes:
        in_features: width of one merged input token.
        hidden_features: width between the two linears.
        out_features: LLM width.
        merge: vision tokens concatenated into one projector input.
        bias: the two linears have biases.
        norm_features: width of the LayerNorm before the merge (0 = none).
    """

    in_features: int
    hidden_features: int
    out_features: int
    merge: int = 1
    bias: bool = True
    norm_features: int = 0

    def __post_init__(self) -> None:
        _check_positive(self, "in_features", "hidden_features", "out_features", "merge")

    def params(self) -> int:
        n = self.in_features * self.hidden_features + self.hidden_features * self.out_features
        if self.bias:
            n += self.hidden_features + self.out_features
        return n + 2 * self.norm_features


@dataclass(frozen=True)
class VLMSpec:
    """A VLM: LLM plus an optional vision tower and projector.

    With ``vision=None`` the visual tokens are taken as given embeddings (only the LLM is
    costed). ``drop_class_token``: the [CLS] output is not passed on (LLaVA's
    ``vision_feature_select_strategy="default"``). ``image_newline``: a learned separator
    embedding of the LLM's width (LLaVA-NeXT), counted in the parameters only.
    """

    name: str
    llm: LLMSpec
    vision: VisionSpec | None = None
    projector: ProjectorSpec | None = None
    drop_class_token: bool = True
    image_newline: bool = False

    def __post_init__(self) -> None:
        if (self.vision is None) != (self.projector is None):
            raise ValueError("VLMSpec: give both vision and projector, or neither")
        if self.projector is not None and self.projector.out_features != self.llm.hidden:
            raise ValueError(
                f"VLMSpec {self.name}: projector out_features {self.projector.out_features} "
                f"!= LLM hidden {self.llm.hidden}"
            )
        if self.vision is not None and self.projector is not None and self.projector.merge > 1:
            side = round(self.projector.merge**0.5)
            hh, ww = self.vision.image_hw
            p = self.vision.patch_size
            if side * side != self.projector.merge or (hh // p) % side or (ww // p) % side:
                raise ValueError(
                    f"VLMSpec {self.name}: a {self.projector.merge}-token spatial merge needs a square merge and a "
                    f"patch grid divisible by {side}; image {hh}x{ww} px at patch {p} gives {hh // p}x{ww // p}"
                )

    @property
    def projector_input_tokens(self) -> int:
        """Vision tokens handed to the projector, over all crops of one image."""
        if self.vision is None:
            return 0
        per_crop = self.vision.tokens_per_crop
        if self.vision.class_token and self.drop_class_token:
            per_crop -= 1
        return per_crop * self.vision.crops

    @property
    def native_visual_tokens(self) -> int | None:
        """Visual tokens per image before token reduction (after the projector's merge);
        ``None`` without a vision tower. LLaVA-NeXT's per-row newline tokens are not included."""
        if self.vision is None or self.projector is None:
            return None
        return self.projector_input_tokens // self.projector.merge

    def params(self) -> int:
        """All parameters (vision tower, projector, LLM)."""
        n = self.llm.params() + (self.llm.hidden if self.image_newline else 0)
        if self.vision is not None and self.projector is not None:
            n += self.vision.params() + self.projector.params()
        return n

    def with_image_size(self, image_size: int | tuple[int, int]) -> VLMSpec:
        if self.vision is None:
            raise ValueError(f"VLMSpec {self.name} has no vision tower")
        return dataclasses.replace(self, vision=self.vision.with_image_size(image_size))

    @classmethod
    def from_llm(cls, llm: LLMSpec) -> VLMSpec:
        return cls(name=llm.name, llm=llm)

    @classmethod
    def from_config(
        cls,
        config: Any,
        name: str | None = None,
        image_size: int | tuple[int, int] | None = None,
        crops: int | None = None,
    ) -> VLMSpec:
        """From a ``LlavaConfig``, ``LlavaNextConfig`` or ``Qwen2VLConfig``; a plain LLM config
        (``LlamaConfig``, ``Qwen2Config``) gives an LLM-only spec.

        ``image_size``: pixels of one crop (required for Qwen2-VL). ``crops``: LLaVA-NeXT crops
        per image; default ``1 + tiles`` of the largest ``image_grid_pinpoints`` entry.
        """
        model_type = getattr(config, "model_type", "")
        if getattr(config, "vision_config", None) is None:
            llm = LLMSpec.from_config(config, name=name)
            return cls.from_llm(llm)
        llm = LLMSpec.from_config(config)
        label = name or getattr(config, "_name_or_path", "") or model_type
        if model_type in {"llava", "llava_next"}:
            vision = VisionSpec.from_config(config.vision_config, image_size=image_size)
            if model_type == "llava_next":
                if crops is None:
                    side_h, side_w = vision.image_hw
                    tiles = max((int(h) // side_h) * (int(w) // side_w) for h, w in config.image_grid_pinpoints)
                    crops = 1 + tiles
                vision = dataclasses.replace(vision, crops=crops)
            layers = config.vision_feature_layer
            n_layers = 1 if isinstance(layers, int) else len(layers)
            projector = ProjectorSpec(
                in_features=vision.hidden * n_layers,
                hidden_features=llm.hidden,
                out_features=llm.hidden,
                bias=bool(getattr(config, "multimodal_projector_bias", True)),
            )
            drop = getattr(config, "vision_feature_select_strategy", "default") == "default"
            return cls(
                name=label,
                llm=llm,
                vision=vision,
                projector=projector,
                drop_class_token=drop,
                image_newline=model_type == "llava_next",
            )
        if model_type == "qwen2_vl":
            if image_size is None:
                raise ValueError("VLMSpec.from_config: Qwen2-VL has no fixed resolution; pass image_size=(H, W)")
            vision = VisionSpec.from_config(config.vision_config, image_size=image_size)
            merge = config.vision_config.spatial_merge_size**2
            projector = ProjectorSpec(
                in_features=vision.hidden * merge,
                hidden_features=vision.hidden * merge,
                out_features=llm.hidden,
                merge=merge,
                norm_features=vision.hidden,
            )
            return cls(name=label, llm=llm, vision=vision, projector=projector, drop_class_token=False)
        raise ValueError(
            f"VLMSpec.from_config: unsupported model_type {model_type!r} "
            "(supported: llava, llava_next, qwen2_vl, or an LLM config)"
        )
