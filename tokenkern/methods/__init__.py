"""Published token-reduction methods as short compositions of tokenkern ops.

Each recipe is a function plus a config dataclass; its docstring states the paper's rule (where
it runs, the query, the score, the keep count, the merge). Recipes take tensors that the model
already computed (the q/k of one attention layer, hidden states or features) and return a
:class:`Reduction` (kept indices and kept/merged tokens, or a keep mask over the sequence for
the LLM-side methods); they work on batches.

One registry (:mod:`tokenkern.methods.registry`) lists every method: its recipe, config, where
it runs, whether its kept count is fixed before the model runs, the inputs it reads and the
models prune() supports it on. prune(), the demo and the CLI read it. The table below is
``registry.table()`` (tests check that they agree):

| name | where | count fixed | inputs | function |
|---|---|---|---|---|
| fastv | llm_layer | no | decoder_layer | fastv.fastv |
| sparsevlm | llm_layer | no | decoder_layer, raters | sparsevlm.sparsevlm |
| ficoco-l | llm_layer | no | decoder_layer | ficoco.ficoco_l |
| dart | llm_layer | no | decoder_layer, normed_hidden | dart.dart |
| fastervlm | vision_tower | yes | features, vision_layer | fastervlm.fastervlm |
| visionzip | vision_tower | yes | features, vision_layer | visionzip.visionzip |
| prumerge+ | vision_tower | with an explicit keep | features, vision_layer | prumerge.prumerge_plus |
| ficoco-v | vision_tower | yes | features, vision_layer | ficoco.ficoco_v |
| mmr | vision_tower | yes | features, importance | mmr.mmr |
| lofi | post_projector | yes | features | lofi.lofi |
| divprune | post_projector | yes | features | divprune.divprune |
| cdpruner | post_projector | yes | features, image_emb, text_emb | cdpruner.cdpruner |
| dart-embeddings | post_projector | yes | features | dart.dart_embeddings |
| tome | every_block | no | features, keys_mean, sizes | tome.tome_merge |
| random | post_projector | yes | features | baselines.random_select |
| uniform | post_projector | yes | features | baselines.uniform_select |

Where: ``vision_tower``: a CLIP layer scores the projector's input; ``post_projector``: each
image's features after the projector; ``llm_layer``: inside the decoder from layer K on;
``every_block``: after every vision-tower block. One keep rule for all: :func:`keep_count`.
"""

from . import registry
from .base import Reduction, keep_count, keep_counts, segment_topk_mask
from .baselines import RandomConfig, UniformConfig, random_select, uniform_select
from .cdpruner import CDPrunerConfig, cdpruner, cdpruner_relevance
from .dart import DARTConfig, dart, dart_embeddings, dart_kept
from .divprune import DivPruneConfig, divprune, divprune_count
from .fastervlm import FasterVLMConfig, fastervlm
from .fastv import FastVConfig, fastv, fastv_scores
from .ficoco import FiCoCoLConfig, FiCoCoVConfig, ficoco_l, ficoco_l_tokens, ficoco_v
from .inputs import DecoderLayer, VisionLayer
from .lofi import LoFiConfig, lofi
from .mmr import MMRConfig, mmr
from .prumerge import PruMergeConfig, adaptive_count, prumerge_plus
from .registry import MethodSpec
from .sparsevlm import SparseVLMConfig, raters, sparsevlm
from .tome import ToMeConfig, tome_merge
from .visionzip import VisionZipConfig, visionzip

__all__ = [
    "CDPrunerConfig",
    "DARTConfig",
    "DecoderLayer",
    "DivPruneConfig",
    "FastVConfig",
    "FasterVLMConfig",
    "FiCoCoLConfig",
    "FiCoCoVConfig",
    "LoFiConfig",
    "MMRConfig",
    "MethodSpec",
    "PruMergeConfig",
    "RandomConfig",
    "Reduction",
    "SparseVLMConfig",
    "ToMeConfig",
    "UniformConfig",
    "VisionLayer",
    "VisionZipConfig",
    "adaptive_count",
    "cdpruner",
    "cdpruner_relevance",
    "dart",
    "dart_embeddings",
    "dart_kept",
    "divprune",
    "divprune_count",
    "fastervlm",
    "fastv",
    "fastv_scores",
    "ficoco_l",
    "ficoco_l_tokens",
    "ficoco_v",
    "keep_count",
    "keep_counts",
    "lofi",
    "mmr",
    "prumerge_plus",
    "random_select",
    "raters",
    "registry",
    "segment_topk_mask",
    "sparsevlm",
    "tome_merge",
    "uniform_select",
    "visionzip",
]
