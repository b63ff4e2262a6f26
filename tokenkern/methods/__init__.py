"""Published token-reduction methods as short compositions of tokenkern ops.

Each recipe is a function plus a config dataclass; its docstring states the paper's rule (where
it runs, the query, the score, the keep count, the merge). Recipes take tensors that the model
already computed (the q/k of one attention layer, hidden states or features) and return kept
indices and kept/merged tokens; they never call .item() and work on batches.

| name | where | function |
|---|---|---|
| fastv | LLM layer K | fastv.fastv |
| sparsevlm | LLM layer K | sparsevlm.sparsevlm |
| ficoco-l | LLM layer K | ficoco.ficoco_l |
| fastervlm | vision tower, penultimate layer | fastervlm.fastervlm |
| visionzip | vision tower, penultimate layer | visionzip.visionzip |
| prumerge+ | vision tower, last layer | prumerge.prumerge_plus |
| ficoco-v | vision tower, layer l | ficoco.ficoco_v |
| tome | every vision-tower block | tome.tome_merge |
| lofi | after the projector | lofi.lofi |
| random, uniform | anywhere | baselines |
"""

from .base import Reduction, keep_count, keep_counts, segment_topk_mask
from .baselines import RandomConfig, UniformConfig, random_select, uniform_select
from .fastervlm import FasterVLMConfig, fastervlm
from .fastv import FastVConfig, fastv, fastv_scores
from .ficoco import FiCoCoLConfig, FiCoCoVConfig, ficoco_l, ficoco_v
from .inputs import DecoderLayer, VisionLayer
from .lofi import LoFiConfig, lofi
from .prumerge import PruMergeConfig, adaptive_count, prumerge_plus
from .sparsevlm import SparseVLMConfig, raters, sparsevlm
from .tome import ToMeConfig, tome_merge
from .visionzip import VisionZipConfig, visionzip

LLM_SIDE = ("fastv", "sparsevlm", "ficoco-l")
VISION_SIDE = ("fastervlm", "visionzip", "prumerge+", "ficoco-v", "tome", "lofi", "random", "uniform")

__all__ = [
    "LLM_SIDE",
    "VISION_SIDE",
    "DecoderLayer",
    "FastVConfig",
    "FasterVLMConfig",
    "FiCoCoLConfig",
    "FiCoCoVConfig",
    "LoFiConfig",
    "PruMergeConfig",
    "RandomConfig",
    "Reduction",
    "SparseVLMConfig",
    "ToMeConfig",
    "UniformConfig",
    "VisionLayer",
    "VisionZipConfig",
    "adaptive_count",
    "fastervlm",
    "fastv",
    "fastv_scores",
    "ficoco_l",
    "ficoco_v",
    "keep_count",
    "keep_counts",
    "lofi",
    "prumerge_plus",
    "random_select",
    "raters",
    "segment_topk_mask",
    "sparsevlm",
    "tome_merge",
    "uniform_select",
    "visionzip",
]
