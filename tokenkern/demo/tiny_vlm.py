"""A small LLaVA (CLIP tower + Llama decoder) with random weights, built from a config: the
shape of the real thing, nothing to download."""

from __future__ import annotations

import torch

IMAGE_TOKEN = 127


def tiny_llava(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=56, patch_size=7
    )
    text = transformers.LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
        vocab_size=128, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    cfg = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, vision_feature_layer=-2
    )
    return transformers.LlavaForConditionalGeneration(cfg).eval()


def prompt_batch(gen: torch.Generator, image_tokens: int = 64):
    """Two left-padded prompts of different lengths, one image each."""
    prompts = [
        [1, 5, 6, 7] + [IMAGE_TOKEN] * image_tokens + [8, 9, 10, 11, 12],
        [1, 13] + [IMAGE_TOKEN] * image_tokens + [14, 15],
    ]
    length = max(map(len, prompts))
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = torch.tensor(p)
        mask[i, length - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 56, 56, generator=gen)}
