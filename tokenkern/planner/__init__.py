"""Inference-compute planner: for a fixed FLOPs budget, which LLM size and how many visual
tokens?

* ``specs``: ``LLMSpec`` / ``VisionSpec`` / ``ProjectorSpec`` / ``VLMSpec``, from explicit sizes or
  ``transformers`` configs (``VLMSpec.from_config``);
* ``presets``: LLaVA-1.5-7B/13B, Qwen2-VL-2B/7B and the LLaVA + Qwen1.5 family of the
  scaling-law paper (arXiv 2411.03312);
* ``cost``: FLOPs (vision tower, projector, prefill with the quadratic attention term, decode
  steps) and memory (weights, KV cache) of one request.

Pure Python: it needs no GPU.
"""

from .cost import (
    Cost,
    FlopBreakdown,
    MemoryBreakdown,
    kv_cache_bytes,
    llm_decode_flops,
    llm_decode_step_flops,
    llm_forward_flops,
    llm_prefill_flops,
    projector_flops,
    vision_flops,
    vlm_cost,
)
from .presets import LLMS, PAPER_FAMILY, PRESET_NAMES, get_preset
from .specs import LLMSpec, ProjectorSpec, VisionSpec, VLMSpec

__all__ = [
    "LLMS",
    "PAPER_FAMILY",
    "PRESET_NAMES",
    "Cost",
    "FlopBreakdown",
    "LLMSpec",
    "MemoryBreakdown",
    "ProjectorSpec",
    "VLMSpec",
    "VisionSpec",
    "get_preset",
    "kv_cache_bytes",
    "llm_decode_flops",
    "llm_decode_step_flops",
    "llm_forward_flops",
    "llm_prefill_flops",
    "projector_flops",
    "vision_flops",
    "vlm_cost",
]
