"""The plugin's configuration: ``hf_overrides={"tokenkern": {"method": ..., "keep": ..., <fields>}}``
parsed into a :class:`Plan` and checked against the method registry when the engine starts.

vLLM sizes each image's placeholder tokens when it processes the prompt, before the encoder
runs, and holds a KV slot for every prompt token in every layer; so a method is served only if
its kept count is a function of the image's token count alone and it runs before the decoder
(on the vision tower or after the projector), reading nothing but the image.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ...methods import keep_count, registry
from ...methods.divprune import divprune_count

KEY = "tokenkern"  # the hf_overrides key (an attribute of vLLM's hf_config)
CALLER = "vllm"  # messages start with "tokenkern.vllm:"

# The inputs a vLLM encoder can give a recipe: the image's tokens and the scoring CLIP layer.
SERVED_INPUTS = {"features", "vision_layer", "importance"}
SERVED_SITES = ("post_projector", "vision_tower")

_LLM_SIDE = (
    "it runs inside the decoder, and vLLM holds a KV slot for every prompt token in every layer (and with "
    "chunked prefill the query that ranks the image can arrive after the image's chunk)"
)


def _default_count(cfg: object, n: int) -> int:
    return keep_count(cfg.keep, n)


# Methods whose recipe reads more than its inputs name, and why vLLM's encoder cannot give it.
_SEQUENCE_READERS = {
    "dart-embeddings": "its pivots include the prompt's text embeddings and its count depends on whether text follows "
    "the image, and vLLM's vision encoder sees each image alone",
}

# Methods whose count is not keep_count(keep, N); the registry's count_reason says which rule.
_COUNTS: dict[str, Callable[[object, int], int]] = {
    "divprune": lambda cfg, n: divprune_count(cfg.keep, n, cfg.rounding),
}


@dataclass(frozen=True)
class Plan:
    """One engine's pruning: the method's spec and config (keep included)."""

    spec: registry.MethodSpec
    cfg: object

    @property
    def method(self) -> str:
        return self.spec.name

    def kept(self, n: int) -> int:
        """Tokens an image of n tokens keeps (the placeholders vLLM reserves for it)."""
        return _COUNTS.get(self.spec.name, _default_count)(self.cfg, n)


def _fail(message: str) -> None:
    raise ValueError(f"tokenkern.{CALLER}: {message}")


def parse(overrides: object, arch: str) -> Plan | None:
    """The plan of ``hf_config.tokenkern`` for model class ``arch`` (None: no pruning, the stock
    model). Refuses an unknown method, a method not offered on ``arch``, one whose count is not
    fixed before the model runs, one vLLM's encoder cannot feed, and unknown or bad fields."""
    if overrides is None:
        return None
    if not isinstance(overrides, Mapping):
        _fail(f"hf_overrides[{KEY!r}] must be a dict such as {{'method': 'lofi', 'keep': 16}}, got {overrides!r}")
    options = dict(overrides)
    if "method" not in options:
        _fail(f"hf_overrides[{KEY!r}] must name a method (one of {', '.join(served(arch))}), got {overrides!r}")
    spec = registry.get(options.pop("method"), caller=CALLER)
    _check_served(spec, arch)
    cfg = _config(spec, options)
    if not spec.count_is_fixed(cfg):
        _fail(f"{spec.name} cannot run in vLLM: its kept count is not fixed before the model runs "
              f"({spec.count_reason}); vLLM reserves each image's placeholder tokens when it processes the prompt"
              + ("; pass an explicit keep" if spec.fixed_with_keep else ""))  # fmt: skip
    return Plan(spec, cfg)


def _check_served(spec: registry.MethodSpec, arch: str) -> None:
    if spec.site == "llm_layer":
        _fail(f"{spec.name} cannot run in vLLM: {_LLM_SIDE}; use one of {', '.join(served(arch))}")
    if spec.site not in SERVED_SITES:
        _fail(f"{spec.name} cannot run in vLLM: it runs at {spec.site} ({spec.count_reason}), and vLLM reserves "
              f"a fixed number of placeholder tokens per image; use one of {', '.join(served(arch))}")  # fmt: skip
    missing = sorted(set(spec.inputs) - SERVED_INPUTS)
    if missing:
        _fail(f"{spec.name} cannot run in vLLM: it reads {', '.join(missing)}, which vLLM's vision encoder does not "
              f"see (it encodes each image alone); use one of {', '.join(served(arch))}")  # fmt: skip
    if spec.name in _SEQUENCE_READERS:
        _fail(f"{spec.name} cannot run in vLLM: {_SEQUENCE_READERS[spec.name]}; use one of {', '.join(served(arch))}")
    if arch not in spec.models:
        _fail(f"{spec.name} is not offered on {arch} (it runs on {', '.join(spec.models) or 'no model'}); use one of "
              f"{', '.join(served(arch))}")  # fmt: skip


def _config(spec: registry.MethodSpec, options: dict):
    """The method's config from keep and the other fields; its __post_init__ checks the values."""
    names = spec.options()
    unknown = sorted(set(options) - {"keep", *names})
    if unknown:
        valid = ", ".join(names) if names else "none besides keep"
        _fail(f"unknown fields {unknown} for {spec.name}; its fields ({spec.config.__name__}) are: keep, {valid}")
    if "keep" in options and options["keep"] is None:
        options.pop("keep")
    return spec.config(**options)


def served(arch: str) -> tuple[str, ...]:
    """The methods the plugin serves on model class ``arch`` with their default config."""
    out = []
    for name, spec in registry.REGISTRY.items():
        ok = spec.site in SERVED_SITES and arch in spec.models and set(spec.inputs) <= SERVED_INPUTS
        ok = ok and name not in _SEQUENCE_READERS
        if ok and (spec.fixed_count or spec.fixed_with_keep):
            out.append(name)
    return tuple(out)


def plan_of(hf_config: object, arch: str) -> Plan | None:
    """The plan of a vLLM hf_config's ``tokenkern`` attribute (None without one). The config
    is left as vLLM made it (it is serialized and hashed); parsed plans are cached by value."""
    overrides = getattr(hf_config, KEY, None)
    try:
        key = json.dumps(overrides, sort_keys=True)
    except (TypeError, ValueError):
        return parse(overrides, arch)  # not JSON: parse() says what is wrong
    return _parsed(key, arch)


@functools.lru_cache(maxsize=64)
def _parsed(key: str, arch: str) -> Plan | None:
    return parse(json.loads(key), arch)


__all__ = ["KEY", "Plan", "parse", "plan_of", "served"]
