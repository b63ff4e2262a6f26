"""attn_topk / attn_scores on CPU against the eager attention a user writes from the rule:
q kᵀ·scale in the input dtype, the causal mask, softmax, the mean over heads and queries,
the image-key slice (benchmarks/bench_attention.py's ``eager_attn_topk``, plus top-k and
gather for attn_topk).

attn_topk: prefill shapes (Nq = Nk, causal, no lse): LLaVA-1.5 FastV (650 positions, image
keys 35..611), LLaVA-NeXT (2950, 35..2915) and Qwen2-VL's GQA (28 query / 4 key heads).
attn_scores: the README's call, the last prompt token's attention with the lse of the
attention that already ran (Nq = 1), at LLaVA-1.5 and LLaVA-NeXT lengths."""

from __future__ import annotations

import pytest
import torch
from bench_attention import eager_attn_scores, eager_attn_topk
from cpu_harness import DTYPES, dtype_id, shapes

import tokenkern
from tokenkern import reference

# name: (B, Hq, Hkv, Nq, Nk, d, key_start, key_end)
PREFILL = shapes(
    full={
        "fastv-llava1.5": (1, 32, 32, 650, 650, 128, 35, 611),
        "llava-next": (1, 32, 32, 2950, 2950, 128, 35, 2915),
        "qwen2vl-gqa": (1, 28, 4, 1300, 1300, 128, 15, 1215),
    },
    smoke={"small": (1, 4, 4, 40, 40, 32, 5, 33), "gqa-small": (1, 4, 2, 40, 40, 32, 5, 33)},
)
LAST_TOKEN = shapes(
    full={"llava1.5-last": (1, 32, 32, 1, 650, 128, 35, 611), "llava-next-last": (1, 32, 32, 1, 2950, 128, 35, 2915)},
    smoke={"small-last": (1, 4, 4, 1, 40, 32, 5, 33)},
)
D_X = 4096  # hidden size of the gathered tokens (LLaVA's LLM)


def tolerance(dtype: torch.dtype) -> float:
    """Relative error allowed between the two sides: the eager side rounds the bf16 logits to
    bf16 (2^-9 relative), tokenkern forms them in float32."""
    return 1e-5 if dtype == torch.float32 else 3e-2


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(shape, dtype):
    b, hq, hkv, nq, nk, d, ks, ke = shape
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, nq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=gen).to(dtype)
    x = torch.randn(b, ke - ks, D_X, generator=gen).to(dtype)
    return q, k, x


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(PREFILL))
def test_attn_topk(compare, name, dtype):
    shape = PREFILL[name]
    q, k, x = inputs(shape, dtype)
    ks, ke = shape[6], shape[7]
    n_keep = (ke - ks) // 4

    def check(ours, theirs) -> None:
        kept, idx, scores = ours
        assert rel_error(scores, theirs[2]) <= tolerance(dtype)
        ref_kept, ref_idx = reference.topk_gather(scores, x, n_keep)
        assert torch.equal(idx, ref_idx) and torch.equal(kept, ref_kept)

    compare(
        {
            "tokenkern": lambda: tokenkern.attn_topk(q, k, x, n_keep, key_start=ks, key_end=ke, causal=True),
            "torch": lambda: eager_attn_topk(q, k, x, n_keep, ks, ke, True),
        },
        check,
        group=f"attn_topk {name} causal prefill {dtype_id(dtype)}",
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(LAST_TOKEN))
def test_attn_scores_last_token_lse(compare, name, dtype):
    shape = LAST_TOKEN[name]
    q, k, _ = inputs(shape, dtype)
    ks, ke = shape[6], shape[7]
    lse = reference.attn_lse(q, k, causal=True).float()  # what the attention forward returned

    def check(ours, theirs) -> None:
        assert rel_error(ours, theirs) <= tolerance(dtype)

    compare(
        {
            "tokenkern": lambda: tokenkern.attn_scores(q, k, lse=lse, key_start=ks, key_end=ke, causal=True),
            "torch": lambda: eager_attn_scores(q, k, ks, ke, True),
        },
        check,
        group=f"attn_scores {name} lse {dtype_id(dtype)}",
    )
