"""merge_tokens and bipartite_merge: the C++ CPU kernels (and the CUDA kernels when a GPU is
present) against the float64 definitions in reference.py, invariants and bad input."""

import re

import pytest
import torch
from testing import HAS_CUDA, REL_TOL, assert_rel_close

import tokenkern
from tokenkern import reference

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


def random_keep(gen, b, n, k):
    return torch.stack([torch.randperm(n, generator=gen)[:k].sort().values for _ in range(b)])


def run(device, *args, **kw):
    moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    kw = {n: (v.to(device) if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
    out = torch.ops.tokenkern.merge_tokens(*moved, **kw)
    return tuple(t.cpu() for t in out)


def check(device, x, keep, tol=None, **kw):
    merged, mass = run(device, x, keep, **kw)
    ref, ref_mass = reference.merge_tokens(x, keep, **kw)
    assert merged.dtype == x.dtype and mass.dtype == torch.float32
    assert_rel_close(merged, ref, tol or REL_TOL[x.dtype], "merged")
    assert_rel_close(mass, ref_mass, 1e-6, "mass")
    return merged, mass


# (N, K, D, C): N in {2, 17, 576, 577, 2880}, K from 1 to N, D in {64, 1024, 4096}. The
# metric is a separate low-dimensional tensor where D is large, so that the CPU similarity
# loops stay fast; metric=None (metric = x) is covered at small D.
SHAPES = [
    (2, 1, 64, None),
    (2, 2, 64, None),
    (17, 1, 64, None),
    (17, 9, 1024, 32),
    (17, 17, 64, None),
    (576, 144, 64, None),
    (576, 57, 4096, 16),
    (577, 577, 64, 8),
    (577, 300, 1024, 16),
    (2880, 288, 64, 8),
    (2880, 720, 4096, 8),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("n", "k", "d", "c"), SHAPES)
def test_matches_reference(device, n, k, d, c, gen):
    b = 2
    for _ in range(50):
        x = torch.randn(b, n, d, generator=gen)
        keep = random_keep(gen, b, n, k)
        metric = None if c is None else torch.randn(b, n, c, generator=gen)
        if selection_gap(x if metric is None else metric, keep) > tie_gap(d if c is None else c):
            break
    else:
        pytest.fail("50 draws in a row had a near-tie: the gap bound is wrong")
    weight = torch.rand(b, n, generator=gen) + 0.1
    check(device, x, keep, metric=metric, weight=weight)


@pytest.mark.parametrize("device", DEVICES)
def test_exact_ties_go_to_the_lower_kept_index(device, gen):
    """Kept tokens 1 and 3 have the same metric row, which every dropped token also has: each
    dropped token is equally similar to both and merges into the lower one (kept slot 0)."""
    x = torch.randn(1, 6, 4, generator=gen)
    row = torch.randn(1, 1, 3, generator=gen)
    metric = row.expand(1, 6, 3).clone()
    metric[0, 5] = -row[0, 0]
    keep = torch.tensor([[1, 3, 5]])
    merged, mass = run(device, x, keep, metric=metric)
    assert torch.equal(mass, torch.tensor([[4.0, 1.0, 1.0]]))
    want = torch.stack([x[0, [0, 1, 2, 4]].double().mean(0), x[0, 3].double(), x[0, 5].double()])
    assert_rel_close(merged[0], want, REL_TOL[torch.float32], "merged")
    ref, _ = reference.merge_tokens(x, keep, metric=metric)
    assert_rel_close(merged, ref, REL_TOL[torch.float32], "merged vs reference")


def tie_gap(c: int) -> float:
    """The similarity gap below which float32 kernels may rank two kept tokens either way:
    each cosine carries at most about (C + 4) float32 roundings of relative size 2^-24 (a
    C-term dot product and the normalization), and |cosine| <= 1, so two cosines can swap
    order only when they differ by less than twice that."""
    return 2 * (c + 4) * 2.0**-24


def bipartite_gap(metric: torch.Tensor, r: int, protect_first: bool) -> float:
    """bipartite_merge's counterpart of selection_gap: over every sample, the smaller of the
    float64 gaps between each A token's two most cosine-similar B tokens and between the r-th and
    (r + 1)-th best matches of the merge candidates (inf where a set has fewer than two)."""
    unit = torch.nn.functional.normalize(metric.double(), dim=-1)
    a, b = unit[:, 0::2], unit[:, 1::2]
    if b.shape[1] == 0:
        return float("inf")
    scores = a @ b.transpose(1, 2)
    gap = float("inf")
    if b.shape[1] >= 2:
        top = scores.topk(2, dim=-1).values
        gap = (top[..., 0] - top[..., 1]).min().item()
    best = scores.amax(-1)[:, int(protect_first) :]
    if 0 < r < best.shape[1]:
        cut = best.topk(r + 1, dim=-1).values
        gap = min(gap, (cut[:, r - 1] - cut[:, r]).min().item())
    return gap


def bipartite_inputs(gen, b: int, n: int, d: int, c: int, r: int, protect_first: bool):
    """x, metric, size with no near-tie in the matches or at the cut (see bipartite_gap)."""
    for _ in range(50):
        metric = torch.randn(b, n, c, generator=gen)
        if bipartite_gap(metric, r, protect_first) > tie_gap(c):
            break
    else:
        pytest.fail("50 draws in a row had a near-tie: the gap bound is wrong")
    return torch.randn(b, n, d, generator=gen), metric, torch.rand(b, n, generator=gen) + 0.5


RULES = [
    dict(),
    dict(combine="sum"),
    dict(combine="add_mean"),
    dict(topm=3),
    dict(topm=3, temperature=0.1),
    dict(topm=5, temperature=2.0, combine="sum"),
    dict(topm=4, temperature=0.5, combine="add_mean"),
    dict(assign="kept"),
    dict(assign="kept", combine="add_mean"),
    dict(assign="kept", topm=6, combine="sum"),
    dict(assign="kept", topm=3, temperature=0.3),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", RULES, ids=lambda r: "-".join(f"{k}={v}" for k, v in r.items()) or "default")
@pytest.mark.parametrize("query", [False, True])
def test_rules_match_reference(device, rule, query, gen):
    b, n, k, d, c = 3, 120, 30, 48, 16
    topm, assign = rule.get("topm", 1), rule.get("assign", "dropped")
    for _ in range(50):
        keep = random_keep(gen, b, n, k)
        metric = torch.randn(b, n, c, generator=gen)
        q = torch.randn(b, n, c, generator=gen) if query else None
        if selection_gap(metric, keep, topm, assign, q) > tie_gap(c):
            break
    else:
        pytest.fail("50 draws in a row had a near-tie: the gap bound is wrong")
    x = torch.randn(b, n, d, generator=gen)
    kw = dict(rule, metric=metric, weight=torch.rand(b, n, generator=gen))
    if query:
        kw["query_metric"] = q
    check(device, x, keep, **kw)


def selection_gap(
    metric: torch.Tensor, keep: torch.Tensor, topm: int = 1, assign: str = "dropped", query=None
) -> float:
    """Over every chooser, the float64 gap between its topm-th and (topm + 1)-th candidates (the
    selection's boundary; inf where there are no more), in units of the largest |similarity| bound
    (1 for cosines, max |q_i| |m_j| for query . metric). Inputs whose gap is within rounding have
    two right answers, so the reference comparisons draw inputs without such near-ties; exact ties
    and their rule (the lower index) are tested separately."""
    if query is None:
        a = b = torch.nn.functional.normalize(metric.double(), dim=-1)
        scale = 1.0
    else:
        a, b = query.double(), metric.double()
        scale = (a.norm(dim=-1).amax() * b.norm(dim=-1).amax()).item()
    sims = a @ b.transpose(1, 2)
    gap = float("inf")
    for s in range(metric.shape[0]):
        if assign == "kept":
            rows = sims[s, keep[s]].clone()
            rows[torch.arange(keep.shape[1]), keep[s]] = -float("inf")  # not its own candidate
        else:
            dropped = torch.ones(metric.shape[1], dtype=torch.bool)
            dropped[keep[s]] = False
            rows = sims[s, dropped][:, keep[s]]
        if rows.shape[0] == 0 or rows.shape[1] <= topm:
            continue
        top = rows.topk(topm + 1, dim=1).values
        gap = min(gap, (top[:, topm - 1] - top[:, topm]).min().item() / scale)
    return gap


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(device, dtype, gen):
    x = torch.randn(2, 200, 64, generator=gen).to(dtype)
    keep = random_keep(gen, 2, 200, 50)
    metric = torch.randn(2, 200, 16, generator=gen).to(dtype)
    check(device, x, keep, metric=metric, topm=2, temperature=0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_total_mass_is_conserved(device, gen):
    x = torch.randn(2, 300, 32, generator=gen)
    keep = random_keep(gen, 2, 300, 40)
    w = torch.rand(2, 300, generator=gen)
    for kw in (dict(), dict(topm=4, temperature=0.2), dict(topm=7)):
        _, mass = run(device, x, keep, weight=w, **kw)
        assert torch.allclose(mass.sum(-1).double(), w.double().sum(-1), rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_identical_tokens_merge_to_themselves(device, gen):
    token = torch.randn(1, 1, 40, generator=gen)
    x = token.expand(2, 90, 40).contiguous()
    keep = random_keep(gen, 2, 90, 9)
    metric = torch.randn(2, 90, 8, generator=gen)
    for combine in ("mean", "add_mean"):
        w = torch.rand(2, 90, generator=gen)
        merged, _ = run(device, x, keep, metric=metric, weight=w, topm=3, combine=combine)
        if combine == "mean":
            assert torch.allclose(merged, token.expand_as(merged), rtol=1e-6, atol=1e-6)
        else:
            assert torch.allclose(merged, 2 * token.expand_as(merged), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("combine", ["mean", "sum", "add_mean"])
def test_keeping_everything_is_the_identity(device, combine, gen):
    x = torch.randn(2, 33, 16, generator=gen)
    w = torch.rand(2, 33, generator=gen)
    keep = torch.arange(33).expand(2, 33).contiguous()
    merged, mass = run(device, x, keep, weight=w, combine=combine)
    assert torch.equal(merged, x) and torch.equal(mass, w)


@pytest.mark.parametrize("device", DEVICES)
def test_permuting_dropped_tokens_changes_nothing(device, gen):
    n, k = 150, 20
    x = torch.randn(1, n, 24, generator=gen)
    metric = torch.randn(1, n, 8, generator=gen)
    w = torch.rand(1, n, generator=gen)
    keep = random_keep(gen, 1, n, k)
    dropped = torch.ones(n, dtype=torch.bool)
    dropped[keep[0]] = False
    slots = dropped.nonzero().flatten()
    perm = torch.arange(n)
    perm[slots] = slots[torch.randperm(len(slots), generator=gen)]
    a = run(device, x, keep, metric=metric, weight=w, topm=2, temperature=0.4)
    bb = run(device, x[:, perm], keep, metric=metric[:, perm], weight=w[:, perm], topm=2, temperature=0.4)
    assert torch.allclose(a[0], bb[0], rtol=1e-5, atol=1e-6) and torch.allclose(a[1], bb[1], rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device, gen):
    x = torch.randn(2, 500, 64, generator=gen)
    keep = random_keep(gen, 2, 500, 50)
    kw = dict(metric=torch.randn(2, 500, 8, generator=gen), topm=3, temperature=0.7)
    first, second = run(device, x, keep, **kw), run(device, x, keep, **kw)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def _unaligned(t: torch.Tensor) -> torch.Tensor:
    """t's values in a contiguous tensor whose data starts one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", [dict(), dict(topm=3, temperature=0.5), dict(assign="kept", topm=1)])
def test_unaligned_rows_give_the_same_bits(device, dtype, rule, gen):
    """The CUDA kernels read 16-byte aligned rows in packets and others element by element, in the
    same order: the results are the same bits."""
    b, n, k, d, c = 2, 150, 40, 64, 32
    x = torch.randn(b, n, d, generator=gen).to(dtype).to(device)
    metric = torch.randn(b, n, c, generator=gen).to(dtype).to(device)
    keep = random_keep(gen, b, n, k).to(device)
    want = torch.ops.tokenkern.merge_tokens(x, keep, metric=metric, **rule)
    got = torch.ops.tokenkern.merge_tokens(_unaligned(x), keep, metric=_unaligned(metric), **rule)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    out = torch.ops.tokenkern.bipartite_merge(x, metric, 30)
    out_unaligned = torch.ops.tokenkern.bipartite_merge(_unaligned(x), _unaligned(metric), 30)
    assert torch.equal(out[0], out_unaligned[0]) and torch.equal(out[1], out_unaligned[1])


@pytest.mark.parametrize("device", DEVICES)
def test_widths_that_are_not_whole_packets(device, gen):
    """D and C that no 16-byte packet divides: the element-by-element path against the reference."""
    b, n, k, d, c = 2, 130, 33, 37, 13
    for _ in range(50):
        x = torch.randn(b, n, d, generator=gen)
        keep = random_keep(gen, b, n, k)
        metric = torch.randn(b, n, c, generator=gen)
        if selection_gap(metric, keep) > tie_gap(c):
            break
    else:
        pytest.fail("50 draws in a row had a near-tie: the gap bound is wrong")
    check(device, x, keep, metric=metric, weight=torch.rand(b, n, generator=gen) + 0.1)
    x, metric, size = bipartite_inputs(gen, b, n, d, c, 40, False)
    out, out_size = (t.cpu() for t in torch.ops.tokenkern.bipartite_merge(x.to(device), metric.to(device), 40,
                                                                          size.to(device)))  # fmt: skip
    ref, ref_size = reference.bipartite_merge(x, metric, 40, size)
    assert_rel_close(out, ref, 1e-5)
    assert_rel_close(out_size, ref_size, 1e-6)


def test_zero_weights_keep_the_token():
    x = torch.randn(1, 6, 4)
    merged, mass = torch.ops.tokenkern.merge_tokens(x, torch.tensor([[0, 3]]), weight=torch.zeros(1, 6))
    assert torch.equal(merged, x[:, [0, 3]]) and bool((mass == 0).all())


# ---------------------------------------------------------------------- bipartite_merge


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("n", "r"), [(2, 0), (2, 1), (17, 5), (17, 9), (577, 200), (576, 288), (2880, 1000)])
@pytest.mark.parametrize("protect_first", [False, True])
def test_bipartite_matches_reference(device, n, r, protect_first, gen):
    mergeable = (n + 1) // 2 - int(protect_first)
    r = min(r, mergeable)
    x, metric, size = bipartite_inputs(gen, 2, n, 32, 16, r, protect_first)
    out, out_size = (
        t.cpu()
        for t in torch.ops.tokenkern.bipartite_merge(x.to(device), metric.to(device), r, size.to(device), protect_first)
    )
    ref, ref_size = reference.bipartite_merge(x, metric, r, size, protect_first)
    assert out.shape == (2, n - r, 32)
    assert_rel_close(out, ref, 1e-5)
    assert_rel_close(out_size, ref_size, 1e-6)
    assert torch.allclose(out_size.sum(-1).double(), size.double().sum(-1))
    if protect_first:
        assert torch.equal(out[:, 0], x[:, 0])


@pytest.mark.skipif(not HAS_CUDA, reason="the CUDA path with best_match_kernel")
@pytest.mark.parametrize("n", [4098, 8194])
@pytest.mark.parametrize("protect_first", [False, True])
def test_bipartite_with_best_match_matches_the_cpu_op(n, protect_first, gen):
    """4098 tokens: too many similarity partials (2049 x 33) for every CUDA edge-selection block
    to reduce, so best_match_kernel does first; 8194: also more A tokens (4097) than the edge
    selection holds in shared memory. The float32 CPU op (checked against the float64 reference
    at up to 2880 tokens above; the reference's loops are too slow here) is the oracle: same
    matches, outputs within float32 rounding."""
    r = n // 3
    x, metric, size = bipartite_inputs(gen, 2, n, 32, 8, r, protect_first)
    got = [t.cpu() for t in torch.ops.tokenkern.bipartite_merge(x.cuda(), metric.cuda(), r, size.cuda(), protect_first)]
    want = torch.ops.tokenkern.bipartite_merge(x, metric, r, size, protect_first)
    assert_rel_close(got[0], want[0], 1e-5)
    assert_rel_close(got[1], want[1], 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_bipartite_r0_is_a_reordering(device, gen):
    x = torch.randn(1, 9, 4, generator=gen)
    out, size = (t.cpu() for t in torch.ops.tokenkern.bipartite_merge(x.to(device), x.to(device), 0))
    assert torch.equal(out, x[:, [0, 2, 4, 6, 8, 1, 3, 5, 7]]) and bool((size == 1).all())


# ---------------------------------------------------------------------------- bad input


def _merge_bad_calls():
    x = torch.randn(2, 10, 4)
    keep = torch.tensor([[0, 3, 7], [1, 2, 9]])
    return [
        ("keep_idx rows must be strictly ascending", (x, torch.tensor([[3, 0, 7], [1, 2, 9]])), {}),
        ("keep_idx rows must be strictly ascending", (x, torch.tensor([[0, 3, 3], [1, 2, 9]])), {}),
        ("keep_idx values must be in [0, N=10)", (x, torch.tensor([[0, 3, 10], [1, 2, 9]])), {}),
        ("keep_idx values must be in [0, N=10)", (x, torch.tensor([[-1, 3, 7], [1, 2, 9]])), {}),
        ("keep_idx must have dtype int64, got int32", (x, keep.int()), {}),
        ("keep_idx has batch size 1 but x has 2", (x, keep[:1]), {}),
        ("keep_idx must keep K in [1, N=10] tokens, got K=0", (x, keep[:, :0]), {}),
        ("keep_idx must be (B, K)", (x, keep[0]), {}),
        ("x must be (B, N, D)", (x[0], keep), {}),
        ("x must have dtype float32 or float16 or bfloat16, got float64", (x.double(), keep), {}),
        ("metric must be (B, N, C)", (x, keep), {"metric": torch.randn(2, 9, 4)}),
        ("metric must be (B, N, C)", (x, keep), {"metric": torch.randn(2, 10)}),
        ("query_metric must be (B, N, C)", (x, keep), {"query_metric": torch.randn(2, 10, 3)}),
        ("weight must be (B, N)", (x, keep), {"weight": torch.rand(2, 11)}),
        ("weight must be non-negative", (x, keep), {"weight": -torch.rand(2, 10)}),
        ("topm must be in [1, 3]", (x, keep), {"topm": 0}),
        ("topm must be in [1, 3]", (x, keep), {"topm": 4}),
        ("topm must be in [1, 9]", (x, keep), {"topm": 10, "assign": "kept"}),
        ("temperature must be finite and >= 0", (x, keep), {"temperature": -1.0}),
        ("combine must be one of ('mean', 'sum', 'add_mean'), got 'max'", (x, keep), {"combine": "max"}),
        ("assign must be one of ('dropped', 'kept')", (x, keep), {"assign": "both"}),
    ]


VALUE_CHECKS = ("strictly ascending", "values must be in", "non-negative")


@pytest.mark.parametrize("face", ["cpu", "fake", "wrapper"])
@pytest.mark.parametrize("case", range(len(_merge_bad_calls())))
def test_merge_bad_input(face, case):
    message, args, kwargs = _merge_bad_calls()[case]
    if face == "fake":
        if any(v in message for v in VALUE_CHECKS):
            pytest.skip("value checks read data: the fake kernel cannot make them")
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(ValueError, match=re.escape(message)):
            torch.ops.tokenkern.merge_tokens(*args, **kwargs)
        return
    fn = tokenkern.merge_tokens if face == "wrapper" else torch.ops.tokenkern.merge_tokens
    with pytest.raises(ValueError, match=re.escape(message)):
        fn(*args, **kwargs)


def _bipartite_bad_calls():
    x = torch.randn(2, 10, 4)
    return [
        ("r must be in [0, 5]", (x, x, -1), {}),
        ("r must be in [0, 5]", (x, x, 6), {}),
        (
            "r must be in [0, 4] (the number of set-A tokens that can merge, token 0 protected)",
            (x, x, 5),
            {"protect_first": True},
        ),
        ("r must be in [0, 0]", (x[:, :1], x[:, :1], 1), {}),
        ("metric must be (B, N, C)", (x, x[:, :9], 1), {}),
        ("size must be (B, N)", (x, x, 1), {"size": torch.ones(2, 9)}),
        ("size must be non-negative", (x, x, 1), {"size": -torch.ones(2, 10)}),
        ("x must be (B, N, D)", (x[0], x, 1), {}),
    ]


@pytest.mark.parametrize("face", ["cpu", "fake"])
@pytest.mark.parametrize("case", range(len(_bipartite_bad_calls())))
def test_bipartite_bad_input(face, case):
    message, args, kwargs = _bipartite_bad_calls()[case]
    if face == "fake":
        if "non-negative" in message:
            pytest.skip("value check")
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(ValueError, match=re.escape(message)):
            torch.ops.tokenkern.bipartite_merge(*args, **kwargs)
        return
    with pytest.raises(ValueError, match=re.escape(message)):
        torch.ops.tokenkern.bipartite_merge(*args, **kwargs)


@pytest.mark.skipif(not HAS_CUDA, reason="the sync-free CUDA op poisons invalid samples instead of raising")
def test_cuda_invalid_keep_idx_gives_nan_not_a_crash():
    x = torch.randn(2, 10, 4, device="cuda")
    keep = torch.tensor([[0, 3, 7], [5, 2, 99]], device="cuda")
    merged, mass = torch.ops.tokenkern.merge_tokens(x, keep)
    assert torch.isfinite(merged[0]).all() and torch.isnan(merged[1]).all() and torch.isnan(mass[1]).all()
    with pytest.raises(ValueError, match=r"keep_idx rows must be strictly ascending|keep_idx values must be in"):
        tokenkern.merge_tokens(x, keep)


@pytest.mark.skipif(not HAS_CUDA, reason="the sync-free CUDA op poisons invalid samples instead of raising")
@pytest.mark.parametrize("where", [0, 300, 599])
def test_cuda_invalid_values_in_any_tile_poison_only_their_sample(where, gen):
    """The invalid flags are one per (sample, 256-token tile): a bad value in any tile of a sample
    poisons that sample and no other."""
    n = 600
    x = torch.randn(3, n, 8, generator=gen)
    metric = torch.randn(3, n, 8, generator=gen)
    w = torch.rand(3, n, generator=gen) + 0.5
    w[1, where] = float("nan")
    keep = torch.arange(0, n, 2).repeat(3, 1)  # K = 300: keep slots in two tiles
    keep[2, 280] = keep[2, 279]  # not strictly ascending, in the second tile
    merged, mass = tokenkern.merge_tokens(x.cuda(), keep.cuda(), metric=metric.cuda(), weight=w.cuda(), validate=False)
    ref, ref_mass = reference.merge_tokens(x[:1].double(), keep[:1], metric=metric[:1].double(), weight=w[:1].double())
    assert_rel_close(merged[:1].cpu(), ref, REL_TOL[torch.float32])
    assert_rel_close(mass[:1].cpu(), ref_mass, REL_TOL[torch.float32])
    assert torch.isnan(merged[1:]).all() and torch.isnan(mass[1:]).all()

    n = 1100  # 550 A tokens: three edge_select tiles
    x = torch.randn(2, n, 8, generator=gen)
    metric = torch.randn(2, n, 8, generator=gen)
    size = torch.rand(2, n, generator=gen) + 0.5
    size[1, 2 * where + 1] = -1.0  # a B token's size, in tile where // 256 of the A tokens
    out, out_size = tokenkern.bipartite_merge(x.cuda(), metric.cuda(), 300, size.cuda(), validate=False)
    ref, ref_size = reference.bipartite_merge(x[:1].double(), metric[:1].double(), 300, size[:1].double())
    assert_rel_close(out[:1].cpu(), ref, REL_TOL[torch.float32])
    assert_rel_close(out_size[:1].cpu(), ref_size, REL_TOL[torch.float32])
    assert torch.isnan(out[1]).all() and torch.isnan(out_size[1]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_zero_width(device, gen):
    x = torch.randn(0, 10, 4, device=device)
    merged, mass = torch.ops.tokenkern.merge_tokens(x, torch.zeros(0, 3, dtype=torch.long, device=device))
    assert merged.shape == (0, 3, 4) and mass.shape == (0, 3)
    out, size = torch.ops.tokenkern.bipartite_merge(x, x, 2)
    assert out.shape == (0, 8, 4) and size.shape == (0, 8)
    # D = 0: nothing to average, but the masses still add up.
    empty = torch.randn(1, 10, 0, device=device)
    metric = torch.randn(1, 10, 3, generator=gen).to(device)
    keep = torch.tensor([[1, 5]], device=device)
    merged, mass = torch.ops.tokenkern.merge_tokens(empty, keep, metric=metric)
    assert merged.shape == (1, 2, 0) and torch.allclose(mass.sum().cpu(), torch.tensor(10.0))
