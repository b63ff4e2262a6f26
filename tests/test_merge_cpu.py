"""The CPU merge kernels' guarantees: bit-identical reruns, a sample's result independent of the
rest of the batch, bfloat16 inputs against the float64 reference, and exact ties to the lower
index in bipartite_merge."""

import pytest
import torch
from testing import REL_TOL, assert_rel_close

import tokenkern
from tokenkern import reference

MODES = [
    dict(),
    dict(metric=16),
    dict(metric=16, topm=3, temperature=0.2, combine="sum"),
    dict(metric=16, topm=2, combine="add_mean"),
    dict(metric=16, query=True),
    dict(metric=16, assign="kept", topm=4, combine="sum"),
]


def random_keep(gen, b, n, k):
    return torch.stack([torch.randperm(n, generator=gen)[:k].sort().values for _ in range(b)])


def merge_inputs(gen, b, n, k, d, mode, dtype=torch.float32):
    x = torch.randn(b, n, d, generator=gen).to(dtype)
    keep = random_keep(gen, b, n, k)
    kw = {key: v for key, v in mode.items() if key not in ("metric", "query")}
    if "metric" in mode:
        kw["metric"] = torch.randn(b, n, mode["metric"], generator=gen).to(dtype)
        if mode.get("query"):
            kw["query_metric"] = torch.randn(b, n, mode["metric"], generator=gen).to(dtype)
    kw["weight"] = torch.rand(b, n, generator=gen) + 0.1
    return x, keep, kw


def slice_kw(kw, s):
    return {key: (v[s : s + 1] if isinstance(v, torch.Tensor) else v) for key, v in kw.items()}


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()) or "metric=x")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_tokens_reruns_and_batch_invariance(mode, dtype, gen):
    """Every sample spans several selection and output blocks (N - K > 64 choosers, K > 16)."""
    b, n, k, d = 3, 230, 70, 48
    x, keep, kw = merge_inputs(gen, b, n, k, d, mode, dtype)
    first = tokenkern.merge_tokens(x, keep, **kw)
    again = tokenkern.merge_tokens(x, keep, **kw)
    for got, want in zip(again, first, strict=True):
        assert torch.equal(got, want)
    for s in range(b):
        alone = tokenkern.merge_tokens(x[s : s + 1].clone(), keep[s : s + 1].clone(), **slice_kw(kw, s))
        for got, want in zip(alone, first, strict=True):
            assert torch.equal(got[0], want[s])


@pytest.mark.parametrize("protect_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bipartite_merge_reruns_and_batch_invariance(protect_first, dtype, gen):
    b, n, d, r = 3, 301, 40, 60
    x = torch.randn(b, n, d, generator=gen).to(dtype)
    metric = torch.randn(b, n, 24, generator=gen).to(dtype)
    size = torch.rand(b, n, generator=gen) + 0.5
    first = tokenkern.bipartite_merge(x, metric, r, size, protect_first)
    again = tokenkern.bipartite_merge(x, metric, r, size, protect_first)
    for got, want in zip(again, first, strict=True):
        assert torch.equal(got, want)
    for s in range(b):
        alone = tokenkern.bipartite_merge(
            x[s : s + 1].clone(), metric[s : s + 1].clone(), r, size[s : s + 1].clone(), protect_first
        )
        for got, want in zip(alone, first, strict=True):
            assert torch.equal(got[0], want[s])


def best_gap(metric: torch.Tensor, keep: torch.Tensor) -> float:
    """The smallest float64 gap, over every dropped token, between its best and second-best
    kept token by cosine (inputs closer than rounding have two right answers)."""
    unit = torch.nn.functional.normalize(metric.double(), dim=-1)
    gap = float("inf")
    for s in range(metric.shape[0]):
        dropped = torch.ones(metric.shape[1], dtype=torch.bool)
        dropped[keep[s]] = False
        top = (unit[s, dropped] @ unit[s, keep[s]].T).topk(2, dim=1).values
        gap = min(gap, (top[:, 0] - top[:, 1]).min().item())
    return gap


def test_merge_tokens_bfloat16_matches_reference(gen):
    """bfloat16 x and metric (converted row by row to float32): within bfloat16 output rounding.
    The metric values are exact in float32, so only float32 rounding of the C-term similarities
    (about (C + 4) * 2^-24 each) can swap two kept tokens: such draws are skipped."""
    b, n, k, d, c = 2, 300, 60, 64, 16
    for _ in range(50):
        metric = torch.randn(b, n, c, generator=gen).bfloat16()
        keep = random_keep(gen, b, n, k)
        if best_gap(metric, keep) > 2 * (c + 4) * 2.0**-24:
            break
    else:
        pytest.fail("50 draws in a row had a near-tie")
    x = torch.randn(b, n, d, generator=gen).bfloat16()
    weight = torch.rand(b, n, generator=gen) + 0.1
    merged, mass = tokenkern.merge_tokens(x, keep, metric=metric, weight=weight)
    ref, ref_mass = reference.merge_tokens(x, keep, metric=metric, weight=weight)
    assert merged.dtype == torch.bfloat16
    assert_rel_close(merged, ref, REL_TOL[torch.bfloat16], "merged")
    assert_rel_close(mass, ref_mass, 1e-6, "mass")


def test_bipartite_exact_ties_go_to_the_lower_index(gen):
    """B tokens 1 and 3 share a metric row that A tokens 2 and 4 also have: both match B token 1
    (the lower), and they tie for the one merge (r = 1), which A token 2 (the lower) wins; A token
    0 (a random row) matches less well."""
    d = 5
    x = torch.randn(1, 6, d, generator=gen)
    row = torch.randn(3, generator=gen)
    metric = torch.randn(1, 6, 3, generator=gen)
    metric[0, 1] = metric[0, 3] = metric[0, 2] = metric[0, 4] = row
    metric[0, 5] = -row
    merged, size = tokenkern.bipartite_merge(x, metric, 1)
    # Outputs: unmerged A tokens 0 and 4, then B tokens 1 (with A token 2 merged in), 3, 5.
    want = torch.stack([x[0, 0], x[0, 4], (x[0, 1] + x[0, 2]) / 2, x[0, 3], x[0, 5]])
    assert torch.equal(size, torch.tensor([[1.0, 1.0, 2.0, 1.0, 1.0]]))
    torch.testing.assert_close(merged[0], want, rtol=1e-6, atol=1e-6)
