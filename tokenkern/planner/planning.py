"""The inference-compute planner: which (LLM, visual token count) to run under a FLOPs budget."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from .cost import FlopBreakdown, LMHead, MemoryBreakdown, vlm_cost
from .presets import PAPER_FAMILY, get_preset
from .scaling import DEFAULT_LAW, ScalingLaw
from .specs import LLMSpec, VLMSpec

# The visual token counts of the scaling-law paper's sweep.
DEFAULT_VISUAL_TOKENS: tuple[int, ...] = (1, 4, 16, 36, 64, 144, 576)


@dataclass(frozen=True)
class Candidate:
    """One evaluated (model, visual tokens) pair.

    Attributes:
        spec: the VLM.
        visual_tokens: visual tokens per image the LLM sees (after token reduction).
        n_params: LLM parameters (the ``N`` the scaling law takes).
        flops: FLOPs of one request by stage; ``flops.total`` is budgeted.
        memory: weights and KV-cache bytes of a batch of ``batch`` requests.
        error: the scaling law's predicted error.
        within_budget: ``flops.total <= budget`` (and memory within its budget, if one was given).
    """

    spec: VLMSpec
    visual_tokens: int
    n_params: int
    flops: FlopBreakdown
    memory: MemoryBreakdown
    error: float
    within_budget: bool

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def total_flops(self) -> int:
        return self.flops.total


def _frontier_key(c: Candidate) -> tuple[Any, ...]:
    return (c.total_flops, c.error, c.name, c.visual_tokens)


def _optimum_key(c: Candidate) -> tuple[Any, ...]:
    return (c.error, c.total_flops, c.name, c.visual_tokens)


def pareto_frontier(candidates: Iterable[Candidate]) -> tuple[Candidate, ...]:
    """Candidates not dominated in (FLOPs, error): ascending FLOPs, strictly decreasing error.
    Among equal (FLOPs, error) pairs the first by name, then visual tokens, is kept."""
    frontier: list[Candidate] = []
    best = math.inf
    for c in sorted(candidates, key=_frontier_key):
        if c.error < best:
            frontier.append(c)
            best = c.error
    return tuple(frontier)


@dataclass(frozen=True)
class PlanResult:
    """What ``plan`` found.

    Attributes:
        budget_flops: the FLOPs budget per request.
        candidates: every evaluated pair, sorted by (FLOPs, error, name, visual tokens).
        frontier: the Pareto frontier of all candidates (minimum error for a given compute),
            ascending FLOPs; the part with ``within_budget`` is the frontier under the budget.
        optimum: the minimum-error candidate within budget (ties: fewer FLOPs, then name, then
            fewer tokens); ``None`` if nothing fits.
        settings: the request shape and accounting options used.
        law: description of the scaling law.
    """

    budget_flops: float
    candidates: tuple[Candidate, ...]
    frontier: tuple[Candidate, ...]
    optimum: Candidate | None
    settings: dict[str, Any]
    law: str

    def feasible(self) -> tuple[Candidate, ...]:
        return tuple(c for c in self.candidates if c.within_budget)


def _as_spec(candidate: VLMSpec | LLMSpec | str | Any, image_size: int | tuple[int, int] | None) -> VLMSpec:
    if isinstance(candidate, VLMSpec):
        return candidate.with_image_size(image_size) if image_size is not None and candidate.vision else candidate
    if isinstance(candidate, LLMSpec):
        return VLMSpec.from_llm(candidate)
    if isinstance(candidate, str):
        return get_preset(candidate, image_size=image_size)
    if hasattr(candidate, "model_type"):  # a transformers config
        return VLMSpec.from_config(candidate, image_size=image_size)
    raise TypeError(
        f"plan: a candidate must be a VLMSpec, LLMSpec, preset name or transformers config, got {candidate!r}"
    )


def plan(
    budget_flops: float,
    candidates: Sequence[VLMSpec | LLMSpec | str | Any] | VLMSpec | LLMSpec | str = PAPER_FAMILY,
    *,
    visual_tokens: Sequence[int] | int = DEFAULT_VISUAL_TOKENS,
    text_tokens: int = 50,
    decode_tokens: int = 0,
    law: ScalingLaw = DEFAULT_LAW,
    batch: int = 1,
    lm_head: LMHead = "last",
    include_vision: bool = True,
    causal_skip: bool = False,
    image_size: int | tuple[int, int] | None = None,
    memory_budget_bytes: float | None = None,
    bytes_per_param: int = 2,
    kv_bytes_per_element: int = 2,
) -> PlanResult:
    """Enumerate (LLM, visual tokens) pairs, cost them, score them with ``law`` and pick the
    inference-optimal one under ``budget_flops``.

    Args:
        budget_flops: FLOPs allowed per request, counted as in ``tokenkern.planner.cost``
            (matmul FLOPs, multiply-add = 2); ``batch`` only scales the memory.
        candidates: models (or one model): preset names (``PRESET_NAMES``), ``VLMSpec``,
            ``LLMSpec`` (LLM only) or ``transformers`` configs. Default: the scaling-law paper's
            family.
        visual_tokens: visual token counts (or one count) to try per model; counts above a model's native
            token count (what its vision tower + projector produce) are skipped.
        text_tokens: prompt text tokens ``Q`` in the prefill (0: text cached or absent).
        decode_tokens: decode steps after the prefill.
        law: ``law(n_params, visual_tokens) -> error`` (``DEFAULT_LAW``: see
            ``tokenkern.planner.scaling``).
        batch, lm_head, include_vision, causal_skip, bytes_per_param, kv_bytes_per_element:
            accounting options, see ``tokenkern.planner.cost.vlm_cost``.
        image_size: crop size in pixels for every model with a vision tower (default: each
            model's own).
        memory_budget_bytes: if given, a candidate must also fit weights + the KV cache of
            ``batch`` requests in it.

    Returns:
        A ``PlanResult``. Deterministic: same arguments, same result.
    """
    if not (isinstance(budget_flops, int | float) and budget_flops > 0 and math.isfinite(budget_flops)):
        raise ValueError(f"plan: budget_flops must be a positive finite number, got {budget_flops!r}")
    if isinstance(visual_tokens, int):
        visual_tokens = [visual_tokens]
    if not isinstance(visual_tokens, Iterable) or any(
        not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in visual_tokens
    ):
        raise ValueError(f"plan: visual_tokens must be an int or a sequence of ints >= 1, got {visual_tokens!r}")
    tokens = sorted(set(visual_tokens))
    if not tokens:
        raise ValueError("plan: visual_tokens is empty")
    if isinstance(candidates, str | VLMSpec | LLMSpec) or hasattr(candidates, "model_type"):
        candidates = [candidates]
    specs = [_as_spec(c, image_size) for c in candidates]
    if not specs:
        raise ValueError("plan: no candidates")
    evaluated: list[Candidate] = []
    for spec in specs:
        native = spec.native_visual_tokens
        n_params = spec.llm.params()
        for v in tokens:
            if native is not None and v > native:
                continue
            # FLOPs of one request (the budget's unit); memory of the whole batch.
            cost = vlm_cost(
                spec,
                v,
                text_tokens,
                decode_tokens,
                batch=batch,
                lm_head=lm_head,
                include_vision=include_vision,
                causal_skip=causal_skip,
                bytes_per_param=bytes_per_param,
                kv_bytes_per_element=kv_bytes_per_element,
            )
            error = float(law(n_params, v))
            if not math.isfinite(error):
                raise ValueError(f"plan: the scaling law returned {error} for {spec.name}, V={v}")
            flops = FlopBreakdown(*(getattr(cost.flops, f.name) // batch for f in fields(FlopBreakdown)))
            fits = flops.total <= budget_flops
            if memory_budget_bytes is not None:
                fits = fits and cost.memory.total <= memory_budget_bytes
            evaluated.append(Candidate(spec, v, n_params, flops, cost.memory, error, fits))
    evaluated.sort(key=_frontier_key)
    feasible = [c for c in evaluated if c.within_budget]
    optimum = min(feasible, key=_optimum_key) if feasible else None
    settings = {
        "text_tokens": text_tokens,
        "decode_tokens": decode_tokens,
        "batch": batch,
        "lm_head": lm_head,
        "include_vision": include_vision,
        "causal_skip": causal_skip,
        "memory_budget_bytes": memory_budget_bytes,
        "visual_tokens": tuple(tokens),
    }
    describe = getattr(law, "describe", None)
    law_text = describe() if callable(describe) else getattr(law, "__name__", repr(law))
    return PlanResult(
        budget_flops=float(budget_flops),
        candidates=tuple(evaluated),
        frontier=pareto_frontier(evaluated),
        optimum=optimum,
        settings=settings,
        law=law_text,
    )
