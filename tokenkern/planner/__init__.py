"""Inference-compute planner: for a fixed FLOPs budget, which LLM size and how many visual
tokens?

Li, Goyal, Semedo, Kolter, "Inference Optimal VLMs Need Only One Visual Token but Larger
Models" (arXiv 2411.03312) show that for visual reasoning the inference-optimal VLM is usually
the largest LLM that fits, fed very few visual tokens. This package makes that decision for
concrete models:

* ``specs``: ``LLMSpec`` / ``VisionSpec`` / ``ProjectorSpec`` / ``VLMSpec``, from explicit sizes or
  ``transformers`` configs (``VLMSpec.from_config``);
* ``presets``: LLaVA-1.5-7B/13B, Qwen2-VL-2B/7B and the paper's LLaVA + Qwen1.5 family;
* ``cost``: FLOPs (vision tower, projector, prefill with the quadratic attention term, decode
  steps) and memory (weights, KV cache) of one request;
* ``scaling``: parametric error laws (``PowerLaw``, ``AdditivePowerLaw``, ``DEFAULT_LAW``) and
  ``fit_power_law``;
* ``planning``: ``plan(budget_flops, candidates, ...)`` -> ``PlanResult`` (all candidates, the
  Pareto frontier, the optimum);
* ``report``: ``format_table`` and ``plot_png``; ``python -m tokenkern plan`` prints both.

The planner is pure Python (numpy for fitting, matplotlib for the plot): it needs no GPU.

Example::

    from tokenkern.planner import plan, format_table
    result = plan(2e12, ["llava-qwen1.5-0.5b", "llava-qwen1.5-7b"], text_tokens=50)
    print(format_table(result))
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
from .planning import DEFAULT_VISUAL_TOKENS, Candidate, PlanResult, pareto_frontier, plan
from .presets import LLMS, PAPER_FAMILY, PRESET_NAMES, get_preset
from .report import format_table, plot_png
from .scaling import (
    DEFAULT_LAW,
    LI2024_VISUAL_REASONING,
    LI2024_VISUAL_REASONING_POINTS,
    AdditivePowerLaw,
    PowerLaw,
    ScalingLaw,
    fit_power_law,
)
from .specs import LLMSpec, ProjectorSpec, VisionSpec, VLMSpec

__all__ = [
    "DEFAULT_LAW",
    "DEFAULT_VISUAL_TOKENS",
    "LI2024_VISUAL_REASONING",
    "LI2024_VISUAL_REASONING_POINTS",
    "LLMS",
    "PAPER_FAMILY",
    "PRESET_NAMES",
    "AdditivePowerLaw",
    "Candidate",
    "Cost",
    "FlopBreakdown",
    "LLMSpec",
    "MemoryBreakdown",
    "PlanResult",
    "PowerLaw",
    "ProjectorSpec",
    "ScalingLaw",
    "VLMSpec",
    "VisionSpec",
    "fit_power_law",
    "format_table",
    "get_preset",
    "kv_cache_bytes",
    "llm_decode_flops",
    "llm_decode_step_flops",
    "llm_forward_flops",
    "llm_prefill_flops",
    "pareto_frontier",
    "plan",
    "plot_png",
    "projector_flops",
    "vision_flops",
    "vlm_cost",
]
