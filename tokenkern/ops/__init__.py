"""The ops of the ``torch.ops.tokenkern`` namespace, one module per op family:

    select     topk_gather
    leverage   leverage_scores, leverage_topk
    spectral   spectral_ipr
    attention  attn_scores, attn_topk
    gumbel     gumbel_topk (and its backward op)
    merge      merge_tokens, bipartite_merge
    diversity  maxmin_select, dpp_select, pivot_select, mmr_select

Each family module holds the public function(s) with their shape docstrings, the schema
(``torch.library.custom_op``, or the fake kernel of an op declared in csrc/tokenkern.cpp), the
fake kernel, the CPU and CUDA dispatch, the autograd registration and that op's own argument
checks. Generic argument checks are in ``_args``, generic autograd helpers in ``_grad``.
Triton is imported only when a CUDA kernel first runs, so importing tokenkern never needs
Triton or a GPU. The ``*_triton`` functions are the CUDA kernels as registered; the tests also
call them on CPU tensors under ``TRITON_INTERPRET=1``.
"""

import torch  # noqa: F401  (loads libtorch, which _C links against)

from .. import _C  # noqa: F401  (loads the C++ op schemas and kernels)
from .attention import attn_scores, attn_topk
from .diversity import dpp_select, maxmin_select, mmr_select, pivot_select
from .gumbel import gumbel_topk
from .leverage import leverage_scores, leverage_topk
from .merge import bipartite_merge, merge_tokens
from .select import topk_gather
from .spectral import spectral_ipr

__all__ = [
    "attn_scores",
    "attn_topk",
    "bipartite_merge",
    "dpp_select",
    "gumbel_topk",
    "leverage_scores",
    "leverage_topk",
    "maxmin_select",
    "merge_tokens",
    "mmr_select",
    "pivot_select",
    "spectral_ipr",
    "topk_gather",
]
