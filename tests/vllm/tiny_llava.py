"""A tiny LLaVA-1.5 checkpoint directory built offline: float32 random weights (CLIP tower +
Llama decoder), a byte-level BPE tokenizer made with the `tokenizers` library and hand-written
processor configs. Both vLLM and transformers load it with `from_pretrained`-style calls.

Run as a script to write one: ``python tests/vllm/tiny_llava.py DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import tiny_tokenizer
import torch

IMAGE_SIZE = 56
PATCH = 7
GRID = IMAGE_SIZE // PATCH  # 8 x 8 = 64 patch tokens per image
TOKENS_PER_IMAGE = GRID * GRID
SPECIALS = ("<s>", "</s>", "<pad>", "<image>")
BOS, EOS, PAD, IMAGE = range(256, 256 + len(SPECIALS))
VOCAB = 264  # 256 bytes + the specials, padded to a multiple of 8
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _tokenizer():
    return tiny_tokenizer.byte_level(
        SPECIALS, bos_token="<s>", eos_token="</s>", pad_token="<pad>", extra_special_tokens={"image_token": "<image>"}
    )


def _config():
    import transformers

    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=IMAGE_SIZE,
        patch_size=PATCH, projection_dim=32,
    )  # fmt: skip
    # Wider-than-default init: peaked logits keep greedy decoding away from near-ties.
    text = transformers.LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=VOCAB, max_position_embeddings=512, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        initializer_range=0.1, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE, vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=TOKENS_PER_IMAGE, tie_word_embeddings=False,
    )  # fmt: skip


def _processor(tokenizer):
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True, do_resize=True, do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )  # fmt: skip
    return LlavaProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, image_token="<image>",
    )  # fmt: skip


def _vllm_keys(path: Path) -> None:
    """vLLM's LLaVA loader reads the CLIP tower as ``vision_tower.vision_model.*``; transformers
    5 saves ``vision_tower.*`` (and reads both)."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    state = load_file(file)
    prefix = "vision_tower."
    renamed = {
        (prefix + "vision_model." + k[len(prefix) :] if k.startswith(prefix) and ".vision_model." not in k else k): v
        for k, v in state.items()
    }
    save_file(renamed, file, metadata={"format": "pt"})


def build(path: str | Path, seed: int = 0) -> Path:
    """Writes the checkpoint into ``path`` (created) and returns it."""
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(_config()).eval()
    model.save_pretrained(path, safe_serialization=True)
    _vllm_keys(path)
    _processor(_tokenizer()).save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": BOS, "eos_token_id": EOS}))
    return path


def random_image(seed: int) -> object:
    """A random RGB PIL image of IMAGE_SIZE x IMAGE_SIZE pixels (deterministic in seed)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


if __name__ == "__main__":
    print(build(sys.argv[1]))
