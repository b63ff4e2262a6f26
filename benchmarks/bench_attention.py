"""attn_topk (attention mass received + fused top-k gather) against:
  eager          matmul, softmax, sum, topk, gather (what FastV/VisionZip code does)
  compiled       torch.compile of that eager code
  flash_colreduce  flash_colreduce.flash_colreduce (PyPI flash-colreduce), where it applies
                 (no GQA, no masks), + topk + gather
  sdpa_forward   one scaled_dot_product_attention forward on the same q, k, v (reference
                 cost for the lse path)
tokenkern runs twice: two-pass (no lse) and single pass with the lse of an SDPA/FlashAttention
forward.

Goals on H100/H200, bf16: >= 1.5x faster than flash-colreduce on every shape both support;
>= 10x faster than eager at Nk >= 2880 with Nq = Nk; with lse, <= 0.6x one SDPA forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, HAS_CUDA, torch_topk_gather

import tokenkern
from tokenkern import reference


def eager_attn_scores(q, k, key_start, key_end, causal):
    """q kᵀ·scale in the input dtype, the causal mask, softmax, the mean over heads and
    queries, the image-key slice: what a user writes from the rule."""
    hq, hkv = q.shape[1], k.shape[1]
    s = (q @ k.repeat_interleave(hq // hkv, dim=1).mT).float() * q.shape[-1] ** -0.5
    if causal:
        nq, nk = q.shape[2], k.shape[2]
        keep = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, dim=-1).mean(dim=(1, 2))[:, key_start:key_end]


def eager_attn_topk(q, k, x, n_keep, key_start, key_end, causal):
    scores = eager_attn_scores(q, k, key_start, key_end, causal)
    return *torch_topk_gather(scores, x, n_keep), scores


_compiled = torch.compile(eager_attn_topk, dynamic=False)


def colreduce_attn_topk(q, k, x, n_keep, key_start, key_end, causal):
    from flash_colreduce import flash_colreduce

    scores = flash_colreduce(q, k, "sum", is_causal=causal).float().sum(dim=1) / (q.shape[1] * q.shape[2])
    scores = scores[:, key_start:key_end]
    return *torch_topk_gather(scores, x, n_keep), scores


# name: (B, Hq, Hkv, Nq, Nk, d, key_start, key_end, D of x, causal)
if HAS_CUDA:
    SHAPES = {}
    for b in (1, 8):
        for nq in (1, 650):
            SHAPES[f"fastv-llava1.5-B{b}-Nq{nq}"] = (b, 32, 32, nq, 650, 128, 35, 611, 4096, True)
        for nq in (1, 2950):
            SHAPES[f"llava-next-B{b}-Nq{nq}"] = (b, 32, 32, nq, 2950, 128, 35, 2915, 4096, True)
        SHAPES[f"clip-vitl-cls-B{b}"] = (b, 16, 16, 1, 577, 64, 1, 577, 1024, False)
        for nq in (1, 1300):
            SHAPES[f"qwen2vl-gqa-B{b}-Nq{nq}"] = (b, 28, 4, nq, 1300, 128, 15, 1215, 3584, True)
    DTYPE = torch.bfloat16
else:  # smoke mode on CPU
    SHAPES = {"fastv-small": (1, 4, 4, 16, 96, 32, 8, 72, 64, True), "gqa-small": (1, 4, 2, 1, 96, 32, 8, 72, 64, True)}
    DTYPE = torch.float32

IMPLS = ["tokenkern", "tokenkern_lse", "eager", "compiled", "flash_colreduce", "sdpa_forward"]


def _skip_reason(impl: str, hq: int, hkv: int) -> str | None:
    if impl == "flash_colreduce" and not HAS_CUDA:
        return "flash_colreduce runs on CUDA only"
    if impl == "flash_colreduce" and hq != hkv:
        return f"flash_colreduce has no GQA (Hq={hq}, Hkv={hkv})"
    return None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_attn_topk(run_benchmark, impl, shape):
    b, hq, hkv, nq, nk, d, ks, ke, dx, causal = SHAPES[shape]
    reason = _skip_reason(impl, hq, hkv)
    if reason:
        pytest.skip(reason)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(b, hq, nq, d, device=DEVICE, generator=gen).to(DTYPE)
    k = torch.randn(b, hkv, nk, d, device=DEVICE, generator=gen).to(DTYPE)
    x = torch.randn(b, ke - ks, dx, device=DEVICE, generator=gen).to(DTYPE)
    n_keep = (ke - ks) // 4
    info = dict(impl=impl, shape=shape, B=b, Hq=hq, Hkv=hkv, Nq=nq, Nk=nk, d=d, key_range=[ks, ke], causal=causal,
                n_keep=n_keep, dtype=str(DTYPE))  # fmt: skip
    if impl == "tokenkern":
        fn = lambda: tokenkern.attn_topk(q, k, x, n_keep, key_start=ks, key_end=ke, causal=causal)  # noqa: E731
    elif impl == "tokenkern_lse":
        lse = reference.attn_lse(q, k, causal=causal).float().to(DEVICE) if not HAS_CUDA else _sdpa_lse(q, k, causal)
        fn = lambda: tokenkern.attn_topk(q, k, x, n_keep, lse=lse, key_start=ks, key_end=ke, causal=causal)  # noqa: E731
    elif impl == "eager":
        fn = lambda: eager_attn_topk(q, k, x, n_keep, ks, ke, causal)  # noqa: E731
    elif impl == "compiled":
        fn = lambda: _compiled(q, k, x, n_keep, ks, ke, causal)  # noqa: E731
    elif impl == "flash_colreduce":
        fn = lambda: colreduce_attn_topk(q, k, x, n_keep, ks, ke, causal)  # noqa: E731
    else:
        v = torch.randn_like(k)
        g = hq // hkv
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal and nq == nk, enable_gqa=g > 1)  # noqa: E731
    run_benchmark(fn, group=f"attn_topk {shape}", **info)


def _sdpa_lse(q, k, causal):
    """The lse a FlashAttention-backed SDPA forward returns (natural log, (B, H, Nq)). A single
    causal query (the last position) sees every key: no mask."""
    hq, hkv, nq, nk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    assert nq in (1, nk), "SDPA's causal mask is top-left aligned: only Nq = 1 or Nq = Nk match"
    kk = k.repeat_interleave(hq // hkv, dim=1)
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, kk, torch.zeros_like(kk), 0.0, causal and nq > 1)
    return out[1].float()
