"""The method registry: one table, name -> MethodSpec. prune(), the demo, the CLI and the docs
read it; nothing else lists method names.

Calling convention: ``spec.recipe(*tensors, cfg)``, the tensors in the order of
``spec.inputs``, and every recipe returns a :class:`~tokenkern.methods.base.Reduction`. The
input names:

* ``features``: (B, N, D) the tokens being reduced (patch tokens without [CLS], or one image's
  features after the projector);
* ``vision_layer``: a :class:`~tokenkern.methods.inputs.VisionLayer`, the q/k of the scoring
  vision-tower layer ([CLS] first);
* ``decoder_layer``: a :class:`~tokenkern.methods.inputs.DecoderLayer`, the q/k of the scoring
  decoder layer over the whole sequence, with the image ids (and ``hidden`` where the method
  merges);
* ``raters``: (B, L) bool, SparseVLM's rater text tokens (``sparsevlm.raters`` of the decoder's
  input embeddings);
* ``keys_mean``: (B, N, d) a block's keys averaged over heads; ``sizes``: (B, N) token sizes;
* ``image_emb``: (B, N, E) CDPruner's CLIP-projected patch features (``visual_projection`` of the
  post-layernormed features the projector reads); ``text_emb``: (B, M, E) the CLIP text tower's
  embeddings of the question (one row per 77-token segment);
* ``importance``: (B, N) a score per token (MMR; prune(): the [CLS] attention of the CLIP layer
  feeding the projector, head mean);
* ``normed_hidden``: (B, L, D) DART's similarity features: the final RMSNorm (with its weight)
  applied to decoder layer K-1's output hidden states.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .baselines import RandomConfig, UniformConfig, random_select, uniform_select
from .cdpruner import CDPrunerConfig, cdpruner
from .dart import DARTConfig, dart, dart_embeddings
from .divprune import DivPruneConfig, divprune
from .fastervlm import FasterVLMConfig, fastervlm
from .fastv import FastVConfig, fastv
from .ficoco import FiCoCoLConfig, FiCoCoVConfig, ficoco_l, ficoco_v
from .lofi import LoFiConfig, lofi
from .mmr import MMRConfig, mmr
from .prumerge import PruMergeConfig, prumerge_plus
from .sparsevlm import SparseVLMConfig, sparsevlm
from .tome import ToMeConfig, tome_merge
from .visionzip import VisionZipConfig, visionzip

# vision_tower: a CLIP layer inside the tower scores the projector's input; post_projector: each
# image's features after the projector; llm_layer: inside the decoder, from layer K on;
# every_block: after every vision-tower block (ToMe).
Site = Literal["vision_tower", "post_projector", "llm_layer", "every_block"]
SITES: tuple[Site, ...] = ("vision_tower", "post_projector", "llm_layer", "every_block")

# The transformers classes tokenkern.prune handles (integrations.adapters.SUPPORTED reads this).
ALL_VLMS = (
    "LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration",
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
)
CLIP_VLMS = ("LlavaForConditionalGeneration",)  # with a CLIPVisionModel tower ([CLS] first)


@dataclass(frozen=True)
class MethodSpec:
    """One registered method.

    name: the method's name (prune's ``method``); recipe: the function (see the module
    docstring for its call); config: its config dataclass (``keep`` plus the options); site:
    where it runs; fixed_count: whether the number of kept tokens is fixed before the model
    runs with the default config; fixed_with_keep: whether an explicit keep fixes it (a method
    whose default count is adaptive); count_reason: why; inputs: what the recipe reads, in
    call order; models: the transformers classes prune() supports it on (empty: not offered
    by prune()); summary: the rule in a line.
    """

    name: str
    recipe: Callable[..., object]
    config: type
    site: Site
    fixed_count: bool
    count_reason: str
    inputs: tuple[str, ...]
    models: tuple[str, ...]
    summary: str
    fixed_with_keep: bool = False

    def count_is_fixed(self, cfg: object) -> bool:
        """Whether the kept count is fixed before the model runs with this config."""
        return self.fixed_count or (self.fixed_with_keep and getattr(cfg, "keep", None) is not None)

    def draws(self) -> bool:
        """Whether the recipe draws at random (takes a ``generator``)."""
        return "generator" in inspect.signature(self.recipe).parameters

    def options(self) -> tuple[str, ...]:
        """The config's fields other than keep, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(self.config) if f.name != "keep")


_SHAPE = "keep_count(keep, N) of the N tokens: a function of the shape alone"
_IN_DECODER = "decided inside the decoder: layers 0 .. K-1 (and their cache) see every token"

_SPECS = (
    MethodSpec("fastv", fastv, FastVConfig, "llm_layer", False,
               f"{_IN_DECODER}; each image keeps keep_count(keep, its tokens) from layer K on",
               ("decoder_layer",), ALL_VLMS, "last prompt token's attention, top-k per image"),
    MethodSpec("sparsevlm", sparsevlm, SparseVLMConfig, "llm_layer", False,
               f"{_IN_DECODER}; the three-step schedule shrinks the images again at each step",
               ("decoder_layer", "raters"), ALL_VLMS, "rater text tokens' attention, top-k per image"),
    MethodSpec("ficoco-l", ficoco_l, FiCoCoLConfig, "llm_layer", False,
               f"{_IN_DECODER}; each image keeps keep_count(keep, its tokens) from layer K on",
               ("decoder_layer",), ALL_VLMS, "redundancy filter, correlate, merge into the kept"),
    MethodSpec("dart", dart, DARTConfig, "llm_layer", False,
               f"{_IN_DECODER}; each sample keeps 4 + 8 (keep // 8) image tokens (all when fewer) from layer K on",
               ("decoder_layer", "normed_hidden"), ALL_VLMS, "L1-key-norm pivots, least similar tokens per pivot"),
    MethodSpec("fastervlm", fastervlm, FasterVLMConfig, "vision_tower", True, _SHAPE,
               ("features", "vision_layer"), CLIP_VLMS, "[CLS] attention (head mean), top-k"),
    MethodSpec("visionzip", visionzip, VisionZipConfig, "vision_tower", True, _SHAPE,
               ("features", "vision_layer"), CLIP_VLMS, "[CLS]-attention dominant + merged contextual"),
    MethodSpec("prumerge+", prumerge_plus, PruMergeConfig, "vision_tower", False,
               "the default (keep=None) is the released adaptive count, from the IQR outliers of each image's "
               "[CLS] attention; an explicit keep fixes keep_count(keep, N)",
               ("features", "vision_layer"), CLIP_VLMS, "IQR outliers + stride samples, kNN merge, extra token",
               fixed_with_keep=True),
    MethodSpec("ficoco-v", ficoco_v, FiCoCoVConfig, "vision_tower", True, _SHAPE,
               ("features", "vision_layer"), CLIP_VLMS, "filter by [CLS] and redundancy, merge into the kept"),
    MethodSpec("mmr", mmr, MMRConfig, "vision_tower", True, _SHAPE,
               ("features", "importance"), CLIP_VLMS, "[CLS]-attention importance vs. similarity to the kept"),
    MethodSpec("lofi", lofi, LoFiConfig, "post_projector", True, _SHAPE,
               ("features",), ALL_VLMS, "SVD leverage scores of the token matrix, top-k"),
    MethodSpec("divprune", divprune, DivPruneConfig, "post_projector", True,
               "round(keep N) of the N tokens (Python's round, as released): a function of the shape alone",
               ("features",), ALL_VLMS, "max-min cosine diversity (greedy farthest token)"),
    MethodSpec("cdpruner", cdpruner, CDPrunerConfig, "post_projector", True, _SHAPE,
               ("features", "image_emb", "text_emb"), CLIP_VLMS, "conditional DPP: CLIP text relevance x similarity"),
    MethodSpec("dart-embeddings", dart_embeddings, DARTConfig, "post_projector", True,
               "4 + 8 (M // 8) of the N tokens (4 + 4 (M // 4) without text), M = keep_count(keep, N), all N "
               "when fewer: a function of the shape alone",
               ("features",), ALL_VLMS, "DART on the input embeddings: L1-norm pivots, least similar per pivot"),
    MethodSpec("tome", tome_merge, ToMeConfig, "every_block", False,
               "r tokens merge in every block (capped at half of the mergeable ones): the count shrinks block "
               "by block as the tower runs",
               ("features", "keys_mean", "sizes"), (), "bipartite matching on the keys, weighted merge"),
    MethodSpec("random", random_select, RandomConfig, "post_projector", True, _SHAPE,
               ("features",), ALL_VLMS, "uniformly random subset (seeded)"),
    MethodSpec("uniform", uniform_select, UniformConfig, "post_projector", True, _SHAPE,
               ("features",), ALL_VLMS, "evenly spaced positions (a lattice on a square grid)"),
)  # fmt: skip

REGISTRY: dict[str, MethodSpec] = {spec.name: spec for spec in _SPECS}


def names(site: Site | None = None) -> tuple[str, ...]:
    """The registered method names (all, or those running at ``site``), in table order."""
    if site is not None and site not in SITES:
        raise ValueError(f"tokenkern.methods.names: site must be one of {SITES} or None, got {site!r}")
    return tuple(name for name, spec in REGISTRY.items() if site is None or spec.site == site)


def vision_names() -> tuple[str, ...]:
    """The methods that reduce vision tokens before the LLM (every site but llm_layer): what
    the DINOv2 demo runs."""
    return tuple(name for name, spec in REGISTRY.items() if spec.site != "llm_layer")


def get(name: str, caller: str = "methods.get") -> MethodSpec:
    """The spec of method ``name``; an unknown name is refused, naming the valid ones (the
    message starts with ``tokenkern.<caller>``)."""
    spec = REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"tokenkern.{caller}: unknown method {name!r}: method must be one of "
                         f"{', '.join(REGISTRY)}, got {name!r}")  # fmt: skip
    return spec


def options(name: str) -> tuple[str, ...]:
    """The options method ``name`` takes besides keep: its config dataclass's other fields."""
    return get(name).options()


def table() -> str:
    """The method table (markdown) generated from the registry: name, where it runs, whether
    the kept count is fixed before the model runs, inputs, recipe."""
    rows = ["| name | where | count fixed | inputs | function |", "|---|---|---|---|---|"]
    for spec in REGISTRY.values():
        fixed = "yes" if spec.fixed_count else ("with an explicit keep" if spec.fixed_with_keep else "no")
        fn = f"{spec.recipe.__module__.rsplit('.', 1)[-1]}.{spec.recipe.__name__}"
        rows.append(f"| {spec.name} | {spec.site} | {fixed} | {', '.join(spec.inputs)} | {fn} |")
    return "\n".join(rows)
