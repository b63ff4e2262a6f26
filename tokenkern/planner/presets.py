"""Presets: public VLM sizes, written out from their published ``config.json`` files.

Vision towers:

* CLIP ViT-L/14-336 (``openai/clip-vit-large-patch14-336``, the ``vision_config`` of every
  ``llava-hf/llava-1.5-*`` config): 24 layers, width 1024, MLP 4096, 16 heads, patch 14,
  336x336 px -> 576 patches + [CLS]; LLaVA uses the penultimate layer without [CLS], but all
  24 layers run.
* Qwen2-VL ViT (``vision_config`` of ``Qwen/Qwen2-VL-*``): depth 32, width 1280, mlp_ratio 4,
  16 heads, patch 14, temporal patch 2 (Conv3d stem), 2x2 spatial merge in the projector.
  Dynamic resolution: the presets use 448x448 px (1024 patches -> 256 visual tokens);
  ``get_preset(name, image_size=...)`` changes it (multiples of 28 px).

LLMs (``text_config`` / ``config.json``):

==================  ======  =====  ======  =====  =======  =======  =====
LLM                 layers  width  MLP     heads  kv-heads  vocab    tied
==================  ======  =====  ======  =====  =======  =======  =====
Vicuna-7B v1.5      32      4096   11008   32     32       32064    no
Vicuna-13B v1.5     40      5120   13824   40     40       32064    no
Qwen2-VL-2B LLM     28      1536   8960    12     2        151936   yes
Qwen2-VL-7B LLM     28      3584   18944   28     4        152064   no
Qwen1.5-0.5B        24      1024   2816    16     16       151936   yes
Qwen1.5-1.8B        24      2048   5504    16     16       151936   no
Qwen1.5-4B          40      2560   6912    20     20       151936   no
Qwen1.5-7B          32      4096   11008   32     32       151936   no
Qwen1.5-14B         40      5120   13696   40     40       152064   no
==================  ======  =====  ======  =====  =======  =======  =====

(Vicuna vocab 32064 as in ``llava-hf/llava-1.5-*-hf``, which adds the image and pad tokens.)
Llama-family LLMs have no biases; Qwen-family LLMs have q/k/v biases. All use SwiGLU MLPs.

``llava-qwen1.5-*`` is the model family of the scaling-law paper (arXiv 2411.03312): CLIP
ViT-L/14-336, LLaVA's two-layer MLP projector and a Qwen1.5 LLM; ``DEFAULT_LAW`` was fitted on it.
"""

from __future__ import annotations

from collections.abc import Callable

from .specs import LLMSpec, ProjectorSpec, VisionSpec, VLMSpec

CLIP_VIT_L_336 = VisionSpec(
    name="clip-vit-l/14-336", layers=24, hidden=1024, intermediate=4096, heads=16, patch_size=14, image_size=336
)


def qwen2_vl_vision(image_size: int | tuple[int, int] = 448) -> VisionSpec:
    return VisionSpec(
        name="qwen2-vl-vit",
        layers=32,
        hidden=1280,
        intermediate=5120,
        heads=16,
        patch_size=14,
        image_size=image_size,
        temporal_patch=2,
        class_token=False,
        learned_positions=False,
        pre_norm=False,
        post_norm=False,
    )


def _vicuna(name: str, layers: int, hidden: int, intermediate: int, heads: int) -> LLMSpec:
    return LLMSpec(name, layers, hidden, intermediate, heads, heads, vocab=32064)


def _qwen(
    name: str, layers: int, hidden: int, intermediate: int, heads: int, kv: int, vocab: int, tied: bool
) -> LLMSpec:
    return LLMSpec(name, layers, hidden, intermediate, heads, kv, vocab=vocab, qkv_bias=True, tie_embeddings=tied)


LLMS: dict[str, LLMSpec] = {
    "vicuna-7b": _vicuna("vicuna-7b", 32, 4096, 11008, 32),
    "vicuna-13b": _vicuna("vicuna-13b", 40, 5120, 13824, 40),
    "qwen2-vl-2b-llm": _qwen("qwen2-vl-2b-llm", 28, 1536, 8960, 12, 2, 151936, True),
    "qwen2-vl-7b-llm": _qwen("qwen2-vl-7b-llm", 28, 3584, 18944, 28, 4, 152064, False),
    "qwen1.5-0.5b": _qwen("qwen1.5-0.5b", 24, 1024, 2816, 16, 16, 151936, True),
    "qwen1.5-1.8b": _qwen("qwen1.5-1.8b", 24, 2048, 5504, 16, 16, 151936, False),
    "qwen1.5-4b": _qwen("qwen1.5-4b", 40, 2560, 6912, 20, 20, 151936, False),
    "qwen1.5-7b": _qwen("qwen1.5-7b", 32, 4096, 11008, 32, 32, 151936, False),
    "qwen1.5-14b": _qwen("qwen1.5-14b", 40, 5120, 13696, 40, 40, 152064, False),
}


def _llava(name: str, llm: LLMSpec) -> VLMSpec:
    projector = ProjectorSpec(in_features=CLIP_VIT_L_336.hidden, hidden_features=llm.hidden, out_features=llm.hidden)
    return VLMSpec(name=name, llm=llm, vision=CLIP_VIT_L_336, projector=projector)


def _qwen2_vl(name: str, llm: LLMSpec, image_size: int | tuple[int, int] = 448) -> VLMSpec:
    vision = qwen2_vl_vision(image_size)
    projector = ProjectorSpec(
        in_features=4 * vision.hidden,
        hidden_features=4 * vision.hidden,
        out_features=llm.hidden,
        merge=4,
        norm_features=vision.hidden,
    )
    return VLMSpec(name=name, llm=llm, vision=vision, projector=projector, drop_class_token=False)


_PRESETS: dict[str, Callable[[], VLMSpec]] = {
    "llava-1.5-7b": lambda: _llava("llava-1.5-7b", LLMS["vicuna-7b"]),
    "llava-1.5-13b": lambda: _llava("llava-1.5-13b", LLMS["vicuna-13b"]),
    "qwen2-vl-2b": lambda: _qwen2_vl("qwen2-vl-2b", LLMS["qwen2-vl-2b-llm"]),
    "qwen2-vl-7b": lambda: _qwen2_vl("qwen2-vl-7b", LLMS["qwen2-vl-7b-llm"]),
    **{
        f"llava-{size}": (lambda size=size: _llava(f"llava-{size}", LLMS[size]))
        for size in ("qwen1.5-0.5b", "qwen1.5-1.8b", "qwen1.5-4b", "qwen1.5-7b", "qwen1.5-14b")
    },
}

PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)
# The scaling-law paper's family: the CLI's default candidates.
PAPER_FAMILY: tuple[str, ...] = tuple(n for n in PRESET_NAMES if n.startswith("llava-qwen1.5-"))


def get_preset(name: str, image_size: int | tuple[int, int] | None = None) -> VLMSpec:
    """The preset VLM ``name`` (one of ``PRESET_NAMES``); ``image_size`` overrides the crop
    size in pixels (Qwen2-VL: any multiple of 28; CLIP: a multiple of 14)."""
    try:
        spec = _PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESET_NAMES)}") from None
    if image_size is not None:
        spec = spec.with_image_size(image_size)
    return spec
