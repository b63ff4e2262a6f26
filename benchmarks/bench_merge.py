"""merge_tokens and bipartite_merge against torch implementations of the same rules.

merge_tokens (combine="mean", topm=1, metric = x, size weights): vs
  torch_scatter  cosine similarity by bmm, argmax, then scatter_reduce/index_add sums
bipartite_merge: vs
  tome           ToMe's merge_wavg with bipartite soft matching (scatter_reduce)

Goal on H100/H200, bf16: merge_tokens within 2x of its floor, the larger of the HBM floor (read
x and metric once, write the merged tokens once, at the copy bandwidth measured in the same run)
and the compute floor of the similarity GEMM (2 B (N - K) K D FLOPs at the documented
tensor-core peak): extra_info hbm_floor_us, compute_floor_us, floor_us; and >= 5x faster than
the torch implementation (bipartite_merge: than ToMe's)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, GEMM_KIND, HAS_CUDA, floor_info

import tokenkern

if HAS_CUDA:
    SHAPES = [(8, n, n // div, d) for n in (576, 2880) for div in (4, 10) for d in (1024, 4096)]
    DTYPE = torch.bfloat16
else:  # smoke mode on CPU
    SHAPES = [(1, 576, 144, 64)]
    DTYPE = torch.float32


def torch_merge_mean(x, keep, metric, weight):
    """The merge_tokens rule (mean, topm=1) in plain torch."""
    b, n, d = x.shape
    k = keep.shape[1]
    m = torch.nn.functional.normalize(metric.float(), dim=-1)
    sim = m @ m.gather(1, keep[..., None].expand(-1, -1, m.shape[-1])).mT  # (B, N, K)
    target = sim.argmax(dim=-1)  # (B, N)
    is_kept = torch.zeros(b, n, dtype=torch.bool, device=x.device).scatter_(1, keep, True)
    w = torch.where(is_kept, 0.0, weight)  # kept tokens contribute through their own row below
    num = torch.zeros(b, k, d, device=x.device).scatter_reduce(
        1, target[..., None].expand(-1, -1, d), w[..., None] * x.float(), reduce="sum"
    )
    den = torch.zeros(b, k, device=x.device).scatter_reduce(1, target, w, reduce="sum")
    wk = weight.gather(1, keep)
    num += wk[..., None] * x.float().gather(1, keep[..., None].expand(-1, -1, d))
    return (num / (wk + den)[..., None]).to(x.dtype), wk + den


def tome_merge_wavg(x, metric, r, size, class_token: bool = False):
    """ToMe's bipartite_soft_matching + merge_wavg; class_token: its protected [CLS] (token 0's
    score row is -inf, the unmerged A tokens are sorted by position)."""
    m = torch.nn.functional.normalize(metric.float(), dim=-1)
    scores = m[:, ::2] @ m[:, 1::2].mT
    if class_token:
        scores[:, 0, :] = -torch.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    if class_token:
        unm_idx = unm_idx.sort(dim=-1).values
    dst_idx = node_idx.gather(1, src_idx)

    def merge(t):
        c = t.shape[-1]
        src, dst = t[:, ::2], t[:, 1::2]
        unm = src.gather(1, unm_idx[..., None].expand(-1, -1, c))
        moved = src.gather(1, src_idx[..., None].expand(-1, -1, c))
        return torch.cat([unm, dst.scatter_reduce(1, dst_idx[..., None].expand(-1, -1, c), moved, reduce="sum")], 1)

    s = size[..., None]
    merged = merge(x.float() * s)
    s = merge(s)
    return (merged / s).to(x.dtype), s[..., 0]


@pytest.mark.parametrize("impl", ["tokenkern", "torch_scatter"])
@pytest.mark.parametrize(("b", "n", "k", "d"), SHAPES)
def test_merge_tokens(run_benchmark, impl, b, n, k, d):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(b, n, d, device=DEVICE, generator=gen).to(DTYPE)
    keep = torch.rand(b, n, device=DEVICE, generator=gen).topk(k, dim=-1).indices.sort(dim=-1).values
    weight = torch.rand(b, n, device=DEVICE, generator=gen)
    info = dict(impl=impl, B=b, N=n, K=k, D=d, metric="x", dtype=str(DTYPE))
    moved = (b * n * d + b * k * d) * x.element_size()  # read x (= metric) once, write merged once
    info |= floor_info(moved, 2 * b * (n - k) * k * d, GEMM_KIND[DTYPE])  # + the similarity GEMM
    if impl == "tokenkern":
        fn = lambda: tokenkern.merge_tokens(x, keep, weight=weight, validate=False)  # noqa: E731
    else:
        fn = lambda: torch_merge_mean(x, keep, x, weight)  # noqa: E731
    run_benchmark(fn, group=f"merge_tokens B={b} N={n} K={k} D={d}", **info)


@pytest.mark.parametrize("impl", ["tokenkern", "tome"])
@pytest.mark.parametrize(("b", "n", "k", "d"), SHAPES)
def test_bipartite_merge(run_benchmark, impl, b, n, k, d):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(b, n, d, device=DEVICE, generator=gen).to(DTYPE)
    metric = torch.randn(b, n, 64, device=DEVICE, generator=gen).to(DTYPE)
    size = torch.ones(b, n, device=DEVICE)
    r = min(n - k, (n + 1) // 2)
    info = dict(impl=impl, B=b, N=n, r=r, D=d, C=64, dtype=str(DTYPE))
    moved = (b * n * (d + 64) + b * (n - r) * d) * x.element_size()  # read x and metric once, write merged
    info |= floor_info(moved, 2 * b * ((n + 1) // 2) * (n // 2) * 64, GEMM_KIND[DTYPE])
    if impl == "tokenkern":
        fn = lambda: tokenkern.bipartite_merge(x, metric, r, size, validate=False)  # noqa: E731
    else:
        fn = lambda: tome_merge_wavg(x, metric, r, size)  # noqa: E731
    run_benchmark(fn, group=f"bipartite_merge B={b} N={n} r={r} D={d}", **info)
