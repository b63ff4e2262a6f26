"""A tiny Qwen2-VL checkpoint directory built offline: float32 random weights (ViT with 2x2 patch
merger + Qwen2 decoder with M-RoPE), a byte-level BPE tokenizer made with the `tokenizers`
library and hand-written processor configs. Both vLLM and transformers load it.

Images are resized to multiples of 28 pixels (14-pixel patches, 2x2 merged): a W x H image has
(W / 28) x (H / 28) merged tokens. Run as a script to write one: ``python tests/vllm/tiny_qwen.py DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import tiny_tokenizer
import torch

SPECIALS = ("<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
EOS, VISION_START, VISION_END, IMAGE, VIDEO = range(256, 256 + len(SPECIALS))
VOCAB = 264  # 256 bytes + the specials, padded to a multiple of 8
UNIT = 28  # pixels per merged token side (patch 14, merge 2)
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>"


def _tokenizer():
    return tiny_tokenizer.byte_level(
        SPECIALS, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
    )  # fmt: skip


def _config():
    import transformers

    vision = dict(depth=2, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=2, in_channels=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)  # fmt: skip
    # head_dim 64 (vLLM's CPU attention sizes); mrope_section sums to head_dim / 2. Wider-than-
    # default init: peaked logits keep greedy decoding away from near-ties.
    text = dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=VOCAB, max_position_embeddings=512, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS,
        initializer_range=0.1, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 10000.0},
    )  # fmt: skip
    return transformers.Qwen2VLConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE, video_token_id=VIDEO,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, tie_word_embeddings=False,
    )  # fmt: skip


def _processor(tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": UNIT * UNIT, "longest_edge": 64 * UNIT * UNIT}  # 1 .. 64 merged tokens
    common = dict(size=size, patch_size=14, merge_size=2, temporal_patch_size=2, image_mean=MEAN, image_std=STD)
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**common), tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**common),
    )  # fmt: skip


def build(path: str | Path, seed: int = 0) -> Path:
    """Writes the checkpoint into ``path`` (created) and returns it."""
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = transformers.Qwen2VLForConditionalGeneration(_config()).eval()
    model.save_pretrained(path, safe_serialization=True)
    _processor(_tokenizer()).save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": EOS, "eos_token_id": EOS}))
    return path


def random_image(seed: int, width: int, height: int) -> object:
    """A random RGB PIL image (deterministic in seed); multiples of 28 pixels are kept as given."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


if __name__ == "__main__":
    print(build(sys.argv[1]))
