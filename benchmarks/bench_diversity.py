"""The diversity ops against the torch loops a user writes from each method's released rule.

  maxmin_select (DivPrune)  vs torch_divprune: N x N cosine distance by matmul, then the k-step
                            max-min loop in torch ops (running minimum), sample by sample
  dpp_select (CDPruner)     vs torch_cdpruner: Chen et al.'s fast greedy MAP, k steps in torch
                            ops, batched over the samples
  mmr_select (MMR)          vs torch_mmr: the k-step marginal-relevance loop, batched
  pivot_select (DART)       vs torch_dart: per sample, per pivot, F.cosine_similarity and topk

Every loop is per sample correct (selected tokens excluded, each sample its own indices,
float32 sums, as the ops) so that both sides return the same indices; the first call of the
tokenkern case checks that (a mismatch is accepted only on a sample whose float64 reference
margin is within float32 rounding: a near-tie has two right answers).

Shapes on a GPU: LLaVA-1.5 after the projector (N = 576, D = 4096, k = 64 / 128), LLaVA-NeXT
(N = 2880, k = 320), B in {1, 8}, bf16 (+ float32 at B = 8); DART at L = 650 (576 image tokens
of LLaVA-1.5 in a 650-token prompt), P = 8 pivots, 16 tokens per pivot (DART's 128 budget).
floor_info: read x once, write the indices; compute: the symmetric Gram GEMM (B N^2 D FLOPs,
DART: 2 B P L D) at the documented tensor-core peak. The CPU suite
(benchmarks/cpu/bench_cpu_diversity.py) reuses these loops.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, GEMM_KIND, HAS_CUDA, floor_info

import tokenkern
from tokenkern import reference

LAM = 0.5
# A reference margin (float64) below this is a near-tie: float32 sums over D = 4096 of unit
# vectors round at ~ sqrt(D) * 2^-24 ~ 4e-6; two rounded sides can differ by twice that.
NEAR_TIE = 1e-4

if HAS_CUDA:
    # (B, N, D, k, dtype)
    GREEDY = [(b, n, 4096, k, torch.bfloat16) for b in (1, 8) for n, k in ((576, 64), (576, 128), (2880, 320))]
    GREEDY += [(8, 576, 4096, 128, torch.float32), (8, 2880, 4096, 320, torch.float32)]
    # (B, L, D, P, per_pivot, image start, image tokens, dtype)
    PIVOT = [(b, 650, 4096, 8, 16, 35, 576, dt) for b in (1, 8) for dt in (torch.bfloat16, torch.float32)]
else:  # smoke mode on CPU
    GREEDY = [(2, 64, 32, 8, torch.float32)]
    PIVOT = [(2, 80, 32, 4, 4, 5, 64, torch.float32)]


# ----------------------------------------------------------------------------- inputs


def diverse_tokens(b: int, n: int, d: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """(B, N, D) on DEVICE: a 16-dimensional structure plus full-rank noise, so that cosines
    spread over [-1, 1] (like projector features) and the greedy choices are well separated."""
    low = torch.randn(b, n, 16, generator=gen) @ torch.randn(16, d, generator=gen)
    return (low + 0.3 * torch.randn(b, n, d, generator=gen)).to(dtype).to(DEVICE)


def dart_inputs(b: int, length: int, d: int, n_piv: int, start: int, n_img: int, dtype: torch.dtype,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """x (B, L, D), pivots (B, P): P / 2 image positions, then P / 2 after the image, and
    candidates (B, L): the image positions minus the image pivots."""
    x = diverse_tokens(b, length, d, dtype, gen)
    half = n_piv // 2
    img = torch.stack([start + torch.randperm(n_img, generator=gen)[:half] for _ in range(b)])
    txt = torch.stack([start + n_img + torch.randperm(length - start - n_img, generator=gen)[: n_piv - half]
                       for _ in range(b)])  # fmt: skip
    cand = torch.zeros(b, length, dtype=torch.bool)
    cand[:, start : start + n_img] = True
    cand.scatter_(1, img, False)
    return x, torch.cat([img, txt], dim=1).to(DEVICE), cand.to(DEVICE)


# ------------------------------------------------------------------- the torch loops


def _cosine(x: torch.Tensor) -> torch.Tensor:
    """x: (..., N, D) -> (..., N, N) float32 cosine similarity by one matmul."""
    xn = F.normalize(x.float(), dim=-1)
    return xn @ xn.mT


def torch_divprune(x: torch.Tensor, k: int) -> torch.Tensor:
    """x: (B, N, D) -> (B, k) int64 ascending. DivPrune in torch ops, sample by sample: first
    the token whose nearest other token is farthest, then k - 1 max-min steps."""
    rows = []
    for xs in x:
        dist = 1 - _cosine(xs)
        first = dist.topk(2, dim=0, largest=False).values[1].argmax()
        to_set = dist[first].clone()  # min distance of every token to the selected set
        taken = torch.zeros(xs.shape[0], dtype=torch.bool, device=x.device)
        taken[first] = True
        picks = [first]
        for _ in range(k - 1):
            j = to_set.masked_fill(taken, float("-inf")).argmax()
            taken[j] = True
            to_set = torch.minimum(to_set, dist[j])
            picks.append(j)
        rows.append(torch.stack(picks).sort().values)
    return torch.stack(rows)


def torch_cdpruner(x: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """x: (B, N, D), relevance: (B, N) -> (B, k) int64 ascending. Fast greedy MAP of
    L = diag(r) S diag(r) in torch ops, k steps over the whole batch."""
    r = relevance.float()
    kernel = r[:, :, None] * _cosine(x) * r[:, None, :]
    b, n = r.shape
    rows = torch.arange(b, device=x.device)
    d2 = kernel.diagonal(dim1=1, dim2=2).clone()
    cis = torch.zeros(b, k, n, device=x.device)
    picks = torch.empty(b, k, dtype=torch.int64, device=x.device)
    for i in range(k):
        j = d2.argmax(dim=1)
        proj = torch.einsum("bt,btn->bn", cis[rows, :i, j], cis[:, :i])
        e = (kernel[rows, j] - proj) / d2[rows, j].sqrt()[:, None]
        cis[:, i] = e
        d2 = d2 - e * e
        d2[rows, j] = float("-inf")
        picks[:, i] = j
    return picks.sort(dim=1).values


def torch_mmr(x: torch.Tensor, importance: torch.Tensor, k: int, lam: float = LAM) -> torch.Tensor:
    """x: (B, N, D), importance: (B, N) -> (B, k) int64 ascending. MMR in torch ops, batched."""
    v = importance.float()
    lo, hi = v.amin(dim=1, keepdim=True), v.amax(dim=1, keepdim=True)
    imp = (v - lo) / (hi - lo)
    sim = _cosine(x)
    rows = torch.arange(v.shape[0], device=x.device)
    first = v.argmax(dim=1)
    max_sim = sim[rows, first].clone()  # max similarity of every token to the selected set
    taken = torch.zeros_like(v, dtype=torch.bool)
    taken[rows, first] = True
    picks = [first]
    for _ in range(k - 1):
        j = (lam * imp - (1 - lam) * max_sim).masked_fill(taken, float("-inf")).argmax(dim=1)
        taken[rows, j] = True
        max_sim = torch.maximum(max_sim, sim[rows, j])
        picks.append(j)
    return torch.stack(picks, dim=1).sort(dim=1).values


def torch_dart(x: torch.Tensor, pivots: torch.Tensor, candidates: torch.Tensor, per_pivot: int) -> torch.Tensor:
    """x: (B, L, D), pivots: (B, P), candidates: (B, L) -> (B, P * per_pivot) int64 ascending.
    DART's loop in torch ops: per sample, per pivot, the per_pivot remaining candidates least
    cosine-similar to the pivot leave the candidates."""
    rows = []
    for xs, piv, cand_mask in zip(x, pivots, candidates, strict=True):
        xs = xs.float()
        cand = cand_mask.nonzero().flatten()
        kept = []
        for p in piv.tolist():
            sim = F.cosine_similarity(xs[p][None], xs[cand], dim=-1, eps=1e-8)
            low = sim.topk(per_pivot, largest=False).indices
            kept.append(cand[low])
            rest = torch.ones_like(cand, dtype=torch.bool)
            rest[low] = False
            cand = cand[rest]
        rows.append(torch.cat(kept).sort().values)
    return torch.stack(rows)


# ------------------------------------------------------------------------ the check


def same_indices(margins: Callable[[], torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """check(ours, theirs): equal indices, except on samples whose float64 reference margin
    (margins(), (B,), computed only on a mismatch) is a near-tie; ours is always valid."""

    def check(ours: torch.Tensor, theirs: torch.Tensor) -> None:
        ours, theirs = ours.cpu(), theirs.cpu()
        assert ours.shape == theirs.shape and ours.dtype == torch.int64
        assert bool((ours[:, 1:] > ours[:, :-1]).all()), "indices must be ascending and distinct"
        differ = (ours != theirs).any(dim=1)
        if bool(differ.any()):
            near = margins() < NEAR_TIE
            assert bool(near[differ].all()), f"indices differ on samples {differ.nonzero().flatten().tolist()}"

    return check


def greedy_case(op: str, b: int, n: int, d: int, k: int, dtype: torch.dtype):
    """(inputs, {"tokenkern": fn, "torch": fn}, check) of maxmin_select / dpp_select / mmr_select."""
    gen = torch.Generator().manual_seed(0)
    x = diverse_tokens(b, n, d, dtype, gen)
    w = (0.1 + 0.9 * torch.rand(b, n, generator=gen)).to(DEVICE)  # relevance / importance
    if op == "maxmin_select":
        fns = {"tokenkern": lambda: tokenkern.maxmin_select(x, k), "torch": lambda: torch_divprune(x, k)}
        margins = lambda: reference.maxmin_order(x, k)[1]  # noqa: E731
    elif op == "dpp_select":
        fns = {"tokenkern": lambda: tokenkern.dpp_select(x, w, k), "torch": lambda: torch_cdpruner(x, w, k)}
        margins = lambda: reference.dpp_order(x, w, k)[1]  # noqa: E731
    else:
        fns = {"tokenkern": lambda: tokenkern.mmr_select(x, w, k, LAM), "torch": lambda: torch_mmr(x, w, k)}
        margins = lambda: reference.mmr_order(x, w, k, LAM)[1]  # noqa: E731
    return x, fns, same_indices(margins)


def pivot_case(b: int, length: int, d: int, n_piv: int, per_pivot: int, start: int, n_img: int, dtype: torch.dtype):
    """(x, {"tokenkern": fn, "torch": fn}, check) of pivot_select."""
    gen = torch.Generator().manual_seed(0)
    x, piv, cand = dart_inputs(b, length, d, n_piv, start, n_img, dtype, gen)
    fns = {
        "tokenkern": lambda: tokenkern.pivot_select(x, piv, cand, per_pivot),
        "torch": lambda: torch_dart(x, piv, cand, per_pivot),
    }
    return x, fns, same_indices(lambda: reference.pivot_order(x, piv, cand, per_pivot)[1])


# ------------------------------------------------------------------------ the suite

IMPLS = ("tokenkern", "torch")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["maxmin_select", "dpp_select", "mmr_select"])
@pytest.mark.parametrize(("b", "n", "d", "k", "dtype"), GREEDY, ids=lambda v: str(v).removeprefix("torch."))
def test_greedy_select(run_benchmark, impl, op, b, n, d, k, dtype):
    x, fns, check = greedy_case(op, b, n, d, k, dtype)
    if impl == "tokenkern":
        check(fns["tokenkern"](), fns["torch"]())
    info = {"impl": impl, "B": b, "N": n, "D": d, "k": k, "dtype": str(dtype)}
    info |= floor_info(x.numel() * x.element_size() + b * k * 8, b * n * n * d, GEMM_KIND[dtype])
    run_benchmark(fns[impl], group=f"{op} B={b} N={n} D={d} k={k} {dtype}", **info)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("b", "length", "d", "n_piv", "per_pivot", "start", "n_img", "dtype"), PIVOT,
                         ids=lambda v: str(v).removeprefix("torch."))  # fmt: skip
def test_pivot_select(run_benchmark, impl, b, length, d, n_piv, per_pivot, start, n_img, dtype):
    x, fns, check = pivot_case(b, length, d, n_piv, per_pivot, start, n_img, dtype)
    if impl == "tokenkern":
        check(fns["tokenkern"](), fns["torch"]())
    info = {"impl": impl, "B": b, "L": length, "D": d, "P": n_piv, "per_pivot": per_pivot, "dtype": str(dtype)}
    moved = x.numel() * x.element_size() + b * n_piv * per_pivot * 8
    info |= floor_info(moved, 2 * b * n_piv * length * d, GEMM_KIND[dtype])
    run_benchmark(fns[impl], group=f"pivot_select B={b} L={length} D={d} P={n_piv} per_pivot={per_pivot} {dtype}",
                  **info)  # fmt: skip
