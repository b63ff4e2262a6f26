"""Visual-token pruning inside vLLM, as a ``vllm.general_plugins`` entry point (``tokenkern``).

Installing tokenkern in vLLM's environment registers :func:`register`, which vLLM runs in every
process it starts. It replaces the model classes below with subclasses that prune when the
model's hf_config carries a ``tokenkern`` key and are the stock classes otherwise::

    LLM(model=DIR, hf_overrides={"tokenkern": {"method": "lofi", "keep": 16, "rank": 8}})
    vllm serve DIR --hf-overrides '{"tokenkern": {"method": "fastervlm", "keep": 0.25}}'

``keep``: a count per image or a fraction of each image's tokens (rounded as prune() rounds);
the other keys are the method's config fields, checked when the engine starts. Served: the
methods whose kept count is fixed before the model runs and that read only the image
(:func:`tokenkern.integrations.vllm.config.served`); the others are refused with the reason.
"""

from __future__ import annotations

# vLLM architecture name -> the subclass that prunes (imported lazily by vLLM's registry).
MODELS = {
    "LlavaForConditionalGeneration": "tokenkern.integrations.vllm.llava:TokenkernLlavaForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "tokenkern.integrations.vllm.qwen:TokenkernQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": (
        "tokenkern.integrations.vllm.qwen:TokenkernQwen2_5_VLForConditionalGeneration"
    ),
}


def register() -> None:
    """The plugin's entry point: registers the pruning subclasses under the stock architecture
    names (safe to call more than once, as vLLM does once per process)."""
    from vllm import ModelRegistry

    for arch, target in MODELS.items():
        ModelRegistry.register_model(arch, target)


__all__ = ["MODELS", "register"]
