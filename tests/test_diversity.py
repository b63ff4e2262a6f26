"""The diversity ops on the CPU (torch similarities + the C++ greedy loops): maxmin_select
(DivPrune), dpp_select (CDPruner), pivot_select (DART), mmr_select, against the float64
reference and against the released rules on hand-made cases."""

import math
import re

import pytest
import testing
import torch
from testing import assert_valid_indices

import tokenkern
from tokenkern import reference
from tokenkern.ops import diversity

U = 2.0**-24  # float32 unit roundoff
DRAWS = 50


def raises(message: str, error: type[Exception] = ValueError):
    return pytest.raises(error, match=re.escape(message))


def cos_err(d: int) -> float:
    """|float32 cosine - exact|: a D-term dot product of unit rows (sum |u_i v_i| <= 1) and
    the normalization, about D + 4 roundings, plus one for 1 - S."""
    return (d + 6) * U


def draw(make, margin, tol, what: str):
    """Inputs from make() whose greedy margins (the reference's gap between the winning key and
    the runner-up at every step) exceed tol(inputs): a near-tie has two right answers, so the
    reference comparison skips them (exact ties are tested on their own)."""
    for _ in range(DRAWS):
        inputs = make()
        if bool((margin(*inputs) > tol(*inputs)).all()):
            return inputs
    pytest.fail(f"{what}: {DRAWS} draws in a row had a near-tie (seed {testing.test_seed()}): the bound is wrong")


def random_mask(gen, b: int, n: int, need: int, p: float = 0.3) -> torch.Tensor:
    """(B, N) bool with about a fraction p of the tokens off, at least `need` on."""
    mask = torch.rand(b, n, generator=gen) >= p
    for s in range(b):
        if int(mask[s].sum()) < need:
            mask[s, torch.randperm(n, generator=gen)[:need]] = True
    return mask


# ---------------------------------------------------------------- vs the float64 reference

MAXMIN_SHAPES = [(2, 1, 4), (2, 2, 4), (17, 1, 16), (17, 17, 8), (64, 16, 32), (576, 64, 16), (577, 32, 16),
                 (2880, 64, 16)]  # fmt: skip


@pytest.mark.parametrize(("n", "k", "d"), MAXMIN_SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_maxmin_matches_reference(n, k, d, masked, gen):
    def make():
        x = torch.randn(2, n, d, generator=gen)
        return x, k, random_mask(gen, 2, n, k) if masked else None

    x, k, mask = draw(make, lambda *a: reference.maxmin_order(*a)[1], lambda *a: 2 * cos_err(d), "maxmin")
    out = tokenkern.maxmin_select(x, k, mask)
    assert_valid_indices(out, n, k)
    assert torch.equal(out, reference.maxmin_select(x, k, mask))
    if mask is not None:
        assert bool(mask.gather(1, out).all())


def dpp_bound(x: torch.Tensor, r: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(B,) float64: how far a float32 residual d2 can be from the exact one, for the picks of
    order. The float32 cosines and the greedy's Cholesky rows make the exact rows of a kernel
    L + dL with |dL_ij| <= eps r_i r_j, eps = (D + k + 8) u; a residual is the Schur complement
    ``d2_j = [w; -1]^T L [w; -1]`` over S + j (w = L_SS^-1 L_Sj), so it moves by at most
    ``(k + 1) eps r_j^2 (1 + ||S_SS^-1 S_Sj||^2)``, and ||S_SS^-1 S_Sj|| <= ||S_Sj|| /
    lambda_min(S_SS) over the final selected set (interlacing bounds the earlier ones)."""
    b, _, d = x.shape
    k = order.shape[1]
    sim = reference.cosine_matrix(x)
    out = []
    for s in range(b):
        sel = order[s]
        lam = torch.linalg.eigvalsh(sim[s][sel][:, sel]).min().item()
        block = sim[s][sel].clone()
        block[torch.arange(k), sel] = 0.0
        col = block.norm(dim=0).max().item()
        eps = (d + k + 8) * U
        rmax = r[s].double().abs().max().item()
        out.append((k + 1) * eps * rmax**2 * (1 + (col / lam) ** 2) if lam > 0 else math.inf)
    return torch.tensor(out, dtype=torch.float64)


DPP_SHAPES = [(2, 1, 4), (2, 2, 4), (17, 5, 16), (33, 8, 32), (64, 12, 32), (576, 8, 16)]


@pytest.mark.parametrize(("n", "k", "d"), DPP_SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_dpp_matches_reference(n, k, d, masked, gen):
    def make():
        x = torch.randn(2, n, d, generator=gen)
        r = torch.rand(2, n, generator=gen) * 0.9 + 0.1
        return x, r, k, random_mask(gen, 2, n, k) if masked else None

    def tol(x, r, k, mask):
        return 2 * dpp_bound(x, r, reference.dpp_order(x, r, k, mask)[0])

    x, r, k, mask = draw(make, lambda *a: reference.dpp_order(*a)[1], tol, "dpp")
    out = tokenkern.dpp_select(x, r, k, mask)
    assert_valid_indices(out, n, k)
    assert torch.equal(out, reference.dpp_select(x, r, k, mask))


@pytest.mark.parametrize(("n", "k", "d"), [(2, 1, 4), (17, 17, 8), (64, 16, 32), (576, 64, 16)])
@pytest.mark.parametrize("lam", [0.0, 0.5, 0.8])
def test_mmr_matches_reference(n, k, d, lam, gen):
    def make():
        x = torch.randn(2, n, d, generator=gen)
        return x, torch.randn(2, n, generator=gen), k, lam, random_mask(gen, 2, n, k)

    # imp carries ~4 roundings (two differences, a division), lam * imp and the sum 2 more.
    bound = 2 * ((1 - lam) * cos_err(d) + lam * 4 * U + 2 * U)
    x, imp, k, lam, mask = draw(make, lambda *a: reference.mmr_order(*a)[1], lambda *a: bound, "mmr")
    out = tokenkern.mmr_select(x, imp, k, lam, mask)
    assert_valid_indices(out, n, k)
    assert torch.equal(out, reference.mmr_select(x, imp, k, lam, mask))


PIVOT_SHAPES = [(1, 1, 2, 4), (3, 2, 17, 8), (8, 16, 700, 64), (8, 24, 2000, 16)]  # (P, per_pivot, L, D)


@pytest.mark.parametrize(("p", "per", "length", "d"), PIVOT_SHAPES)
def test_pivot_matches_reference(p, per, length, d, gen):
    def make():
        x = torch.randn(2, length, d, generator=gen) * torch.rand(2, length, 1, generator=gen).add(0.5)
        pivots = torch.stack([torch.randperm(length, generator=gen)[:p] for _ in range(2)])
        cand = random_mask(gen, 2, length, p * per, p=0.2)
        cand.scatter_(1, pivots, False)
        return x, pivots, cand, per

    def ok(x, pivots, cand, per):
        short = int(cand.sum(1).min()) < pivots.shape[1] * per
        return torch.full((2,), -1.0) if short else reference.pivot_order(x, pivots, cand, per)[1]

    x, pivots, cand, per = draw(make, ok, lambda *a: 2 * cos_err(d), "pivot")
    out = tokenkern.pivot_select(x, pivots, cand, per)
    assert_valid_indices(out, length, p * per)
    assert torch.equal(out, reference.pivot_select(x, pivots, cand, per))
    assert bool(cand.gather(1, out).all())


# ------------------------------------------------------------------------ released rules


def test_divprune_first_pick_is_the_largest_nearest_neighbour_distance():
    """On a circle: tokens at 0, 10, 20 and 200 degrees. Nearest-neighbour angles: 10, 10, 10
    and 160 (token 3 to token 0), so the lone token 3 goes first; then the token farthest
    from it, 2 (180 degrees, against 160 and 170); then the one farthest from {3, 2}: token 0
    (20 degrees from token 2) beats token 1 (10)."""
    deg = torch.tensor([0.0, 10.0, 20.0, 200.0]) * math.pi / 180
    x = torch.stack([deg.cos(), deg.sin()], dim=-1)[None]
    order, _ = reference.maxmin_order(x, 2)
    assert order.tolist() == [[3, 2]]
    assert tokenkern.maxmin_select(x, 1).tolist() == [[3]]
    assert tokenkern.maxmin_select(x, 2).tolist() == [[2, 3]]
    assert tokenkern.maxmin_select(x, 3).tolist() == [[0, 2, 3]]


def test_divprune_never_returns_duplicates_and_ties_go_low():
    """Tokens a, b, a, b with a orthogonal to b: every nearest-neighbour distance is 0 (the
    duplicate), so the first pick is token 0; then b at distance 1 (tokens 1 and 3 tie: 1);
    then the rest are at distance 0 from the set (tie: the lowest unselected, 2)."""
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])
    x = torch.stack([a, b, a, b])[None]
    assert tokenkern.maxmin_select(x, 2).tolist() == [[0, 1]]
    assert tokenkern.maxmin_select(x, 3).tolist() == [[0, 1, 2]]
    assert tokenkern.maxmin_select(x, 4).tolist() == [[0, 1, 2, 3]]
    assert torch.equal(tokenkern.maxmin_select(x, 3), reference.maxmin_select(x, 3))


def test_dpp_is_chens_greedy_by_hand():
    """x0 = (1, 0, 0), x1 = (0.6, 0.8, 0), x2 = (0, 0, 1), r = (1, 1, 0.9): d2 = (1, 1, 0.81),
    pick 0 (tie: lower); e = L[0] = (1, 0.6, 0), d2 = (., 0.64, 0.81): pick 2 although token 1
    is more relevant; e = (0, 0, 0.9), d2 = (., 0.64, .): pick 1."""
    x = torch.tensor([[[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]]])
    r = torch.tensor([[1.0, 1.0, 0.9]])
    assert tokenkern.dpp_select(x, r, 1).tolist() == [[0]]
    assert tokenkern.dpp_select(x, r, 2).tolist() == [[0, 2]]
    assert reference.dpp_order(x, r, 3)[0].tolist() == [[0, 2, 1]]
    r2 = torch.tensor([[1.0, 1.0, 0.7]])  # 0.49 < 0.64: now token 1 wins the second step
    assert tokenkern.dpp_select(x, r2, 2).tolist() == [[0, 1]]


def test_dpp_exhausted_rank_takes_the_lowest_unselected_candidate():
    """Tokens e1, e1, e1, e2 (r = 1): pick 0, then 3 (d2 = 1; the duplicates' d2 is exactly
    0), then the rank is exhausted: the lowest unselected candidate, 1 (with a mask: 2)."""
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    x = torch.stack([e1, e1, e1, e2])[None]
    r = torch.ones(1, 4)
    assert tokenkern.dpp_select(x, r, 3).tolist() == [[0, 1, 3]]
    mask = torch.tensor([[True, False, True, True]])
    assert tokenkern.dpp_select(x, r, 3, mask).tolist() == [[0, 2, 3]]
    zero = torch.zeros(1, 4)  # L = 0: every step is the rank-exhausted one
    assert tokenkern.dpp_select(x, zero, 3).tolist() == [[0, 1, 2]]
    for out in (tokenkern.dpp_select(x, r, 4), tokenkern.dpp_select(x, zero, 4)):
        assert out.tolist() == [[0, 1, 2, 3]]
    assert torch.equal(tokenkern.dpp_select(x, r, 3), reference.dpp_select(x, r, 3))


def test_dart_pivot_order_changes_the_result():
    """Pivots 0 = (1, 0) and 1 = (0, 1); token 2 = (-1, -0.9) is the least similar to both,
    so the first pivot takes it and the second takes its runner-up: token 4 = (1, -0.5) for
    pivot 1, token 3 = (-0.5, 1) for pivot 0."""
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, -0.9], [-0.5, 1.0], [1.0, -0.5], [0.3, 0.3]]])
    cand = torch.tensor([[False, False, True, True, True, True]])
    assert tokenkern.pivot_select(x, torch.tensor([[0, 1]]), cand, 1).tolist() == [[2, 4]]
    assert tokenkern.pivot_select(x, torch.tensor([[1, 0]]), cand, 1).tolist() == [[2, 3]]
    assert tokenkern.pivot_select(x, torch.tensor([[1, 0]]), cand, 2).tolist() == [[2, 3, 4, 5]]
    for piv in ([[0, 1]], [[1, 0]]):
        piv = torch.tensor(piv)
        assert torch.equal(tokenkern.pivot_select(x, piv, cand, 1), reference.pivot_select(x, piv, cand, 1))


def test_dart_cosine_is_torch_cosine_similarity(gen):
    x = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    x[3] = 1e-12  # below eps: cosine_similarity clamps each norm at 1e-8
    want = torch.nn.functional.cosine_similarity(x[2][None], x, dim=-1, eps=1e-8)
    assert torch.allclose(reference.pivot_cosine(x, 2), want, rtol=1e-12, atol=0)


def test_pivot_ties_go_to_the_lower_index():
    """Tokens 1..4 all equally (dis)similar to the pivot: the lower two are taken."""
    x = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [-2.0, 0.0], [-1.0, 0.0], [-3.0, 0.0]]])
    cand = torch.tensor([[False, True, True, True, True]])
    assert tokenkern.pivot_select(x, torch.tensor([[0]]), cand, 2).tolist() == [[1, 2]]


def test_mmr_first_pick_is_the_most_important_and_lam_one_is_topk(gen):
    x = torch.randn(2, 40, 8, generator=gen)
    imp = torch.stack([torch.randperm(40, generator=gen) for _ in range(2)]).float()  # 1 apart: no near-tie
    top1 = imp.argmax(dim=1, keepdim=True)
    assert torch.equal(tokenkern.mmr_select(x, imp, 1), top1)
    want = imp.topk(10, dim=1).indices.sort(dim=1).values  # lam = 1: importance only
    assert torch.equal(tokenkern.mmr_select(x, imp, 10, lam=1.0), want)


# ----------------------------------------------------------------- masks, zeros, batches


def test_zero_norm_tokens_are_distance_one_from_everything(gen):
    """Zero rows: no NaN, exactly k distinct tokens, the reference's choice (a zero-norm token
    is 1 away from every other token, like an orthogonal one)."""
    x = torch.randn(2, 30, 8, generator=gen)
    x[0, [3, 7, 20]] = 0.0
    x[1] = 0.0
    x[1, 5] = 1.0
    r = torch.rand(2, 30, generator=gen) + 0.5
    for k in (1, 5, 30):
        out = tokenkern.maxmin_select(x, k)
        assert_valid_indices(out, 30, k)
        assert torch.equal(out[1], reference.maxmin_select(x[1:], k)[0])
        assert_valid_indices(tokenkern.dpp_select(x, r, k), 30, k)
        assert_valid_indices(tokenkern.mmr_select(x, r, k), 30, k)
    # Sample 1: all tokens are at distance 1 from each other: picks go in index order.
    assert tokenkern.maxmin_select(x[1:], 4).tolist() == [[0, 1, 2, 3]]
    cand = torch.ones(2, 30, dtype=torch.bool)
    pivots = torch.tensor([[3, 7], [0, 5]])  # zero-norm pivots (and one ones-row): every cosine is 0
    out = tokenkern.pivot_select(x, pivots, cand, 4)
    assert_valid_indices(out, 30, 8)
    assert torch.equal(out, reference.pivot_select(x, pivots, cand, 4))


def test_nan_and_inf_inputs_still_give_k_distinct_candidates(gen):
    """Non-finite values rank as -inf: never an out-of-range, repeated or masked-out index."""
    x = torch.randn(2, 20, 8, generator=gen)
    x[0, 4] = float("nan")
    x[1, :, 0] = float("inf")
    r = torch.rand(2, 20, generator=gen)
    r[0, :5] = float("nan")
    mask = random_mask(gen, 2, 20, 7)
    cand = mask.clone()
    cand[:, :2] = False
    outs = [
        (tokenkern.maxmin_select(x, 7, mask), mask),
        (tokenkern.dpp_select(x, r, 7, mask), mask),
        (tokenkern.mmr_select(x, r, 7, 0.5, mask), mask),
        (tokenkern.pivot_select(x, torch.tensor([[0], [1]]), cand, 5), cand),
    ]
    for out, allowed in outs:
        assert_valid_indices(out, 20, out.shape[1])
        assert bool(allowed.gather(1, out).all())


def test_a_single_candidate_is_the_first_pick(gen):
    x = torch.randn(1, 9, 4, generator=gen)
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[0, 6] = True
    assert tokenkern.maxmin_select(x, 1, mask).tolist() == [[6]]
    assert tokenkern.dpp_select(x, torch.rand(1, 9, generator=gen) + 0.1, 1, mask).tolist() == [[6]]
    assert tokenkern.mmr_select(x, torch.randn(1, 9, generator=gen), 1, 0.5, mask).tolist() == [[6]]


def _calls(gen, b: int, n: int):
    x = torch.randn(b, n, 16, generator=gen)
    r = torch.rand(b, n, generator=gen) + 0.2
    mask = random_mask(gen, b, n, 10)
    pivots = torch.stack([torch.randperm(n, generator=gen)[:3] for _ in range(b)])
    cand = random_mask(gen, b, n, 12, p=0.1)
    cand = cand & ~torch.zeros(b, n, dtype=torch.bool).scatter(1, pivots, True)
    return [
        (lambda s: tokenkern.maxmin_select(x[s], 10, mask[s])),
        (lambda s: tokenkern.dpp_select(x[s], r[s], 10, mask[s])),
        (lambda s: tokenkern.mmr_select(x[s], r[s], 10, 0.3, mask[s])),
        (lambda s: tokenkern.pivot_select(x[s], pivots[s], cand[s], 4)),
    ]


def test_batch_invariance_and_determinism(gen):
    """Each sample gets what it gets alone, with other samples' masks around it, every time."""
    b = 5
    for call in _calls(gen, b, 60):
        whole = call(slice(None))
        again = call(slice(None))
        assert torch.equal(whole, again)
        for s in range(b):
            assert torch.equal(whole[s : s + 1], call(slice(s, s + 1)))


def test_cpu_batches_past_one_similarity_block(gen, monkeypatch):
    """The CPU face builds the N x N similarities a few samples at a time: the blocks join up."""
    x = torch.randn(5, 20, 8, generator=gen)
    r = torch.rand(5, 20, generator=gen) + 0.1
    mask = random_mask(gen, 5, 20, 6)
    want = [tokenkern.maxmin_select(x, 6, mask), tokenkern.dpp_select(x, r, 6, mask), tokenkern.mmr_select(x, r, 6)]
    monkeypatch.setattr(diversity, "_CPU_SIM_FLOATS", 2 * 20 * 20)  # 2 samples per block
    got = [tokenkern.maxmin_select(x, 6, mask), tokenkern.dpp_select(x, r, 6, mask), tokenkern.mmr_select(x, r, 6)]
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_an_empty_batch_gives_empty_outputs():
    x = torch.randn(0, 12, 6)
    s = torch.randn(0, 12)
    assert tokenkern.maxmin_select(x, 3).shape == (0, 3)
    assert tokenkern.dpp_select(x, s, 3).shape == (0, 3)
    assert tokenkern.mmr_select(x, s, 3).shape == (0, 3)
    piv = torch.zeros(0, 2, dtype=torch.long)
    assert tokenkern.pivot_select(x, piv, torch.zeros(0, 12, dtype=torch.bool), 3).shape == (0, 6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype, gen):
    """16-bit inputs are read exactly as float32: the reference on the same rounded inputs."""
    n, k, d = 200, 24, 16

    def make():
        x = torch.randn(2, n, d, generator=gen).to(dtype)
        return x, torch.rand(2, n, generator=gen).add(0.1).to(dtype), k

    x, r, k = draw(make, lambda x, r, k: reference.maxmin_order(x, k)[1], lambda *a: 2 * cos_err(d), "half maxmin")
    assert torch.equal(tokenkern.maxmin_select(x, k), reference.maxmin_select(x, k))
    x, r, kk = draw(
        lambda: (*make()[:2], 6),
        lambda x, r, k: reference.dpp_order(x, r, k)[1],
        lambda x, r, k: 2 * dpp_bound(x, r, reference.dpp_order(x, r, k)[0]),
        "half dpp",
    )
    assert torch.equal(tokenkern.dpp_select(x, r, kk), reference.dpp_select(x, r, kk))


# ------------------------------------------------------------------------------ bad input


def test_bad_inputs_name_the_argument(gen):
    x = torch.randn(2, 10, 4, generator=gen)
    r = torch.rand(2, 10, generator=gen)
    cand = torch.ones(2, 10, dtype=torch.bool)
    piv = torch.tensor([[0, 1], [2, 3]])
    cases = [
        ("tokenkern.maxmin_select: x must be (B, N, D), got shape (10, 4)", lambda: tokenkern.maxmin_select(x[0], 2)),
        ("tokenkern.maxmin_select: k must be in [1, 10]", lambda: tokenkern.maxmin_select(x, 11)),
        ("tokenkern.maxmin_select: k must be in [1, 10]", lambda: tokenkern.maxmin_select(x, 0)),
        ("tokenkern.maxmin_select: mask must have dtype bool, got float32",
         lambda: tokenkern.maxmin_select(x, 2, r)),
        ("tokenkern.maxmin_select: mask (B, N) must match x's first two dimensions",
         lambda: tokenkern.maxmin_select(x, 2, cand[:, :9])),
        ("tokenkern.maxmin_select: mask must leave >= 5 candidates per sample (k), got 3 in sample 1",
         lambda: tokenkern.maxmin_select(x, 5, torch.arange(10).expand(2, 10) < torch.tensor([[6], [3]]))),
        ("tokenkern.maxmin_select: x must have dtype float32 or float16 or bfloat16, got float64",
         lambda: tokenkern.maxmin_select(x.double(), 2)),
        ("tokenkern.maxmin_select: x.shape[1] must be <= 4096",
         lambda: tokenkern.maxmin_select(torch.zeros(1, 4097, 1), 2)),
        ("tokenkern.dpp_select: relevance (B, N) must match x's first two dimensions",
         lambda: tokenkern.dpp_select(x, r[:1], 2)),
        ("tokenkern.dpp_select: relevance must be a torch.Tensor, got list",
         lambda: tokenkern.dpp_select(x, r.tolist(), 2)),
        ("tokenkern.dpp_select: mask must leave >= 3 candidates per sample (k), got 0 in sample 0",
         lambda: tokenkern.dpp_select(x, r, 3, ~cand)),
        ("tokenkern.mmr_select: lam must be in [0, 1], got 1.5", lambda: tokenkern.mmr_select(x, r, 2, 1.5)),
        ("tokenkern.mmr_select: importance must be (B, N), got shape (2, 10, 1)",
         lambda: tokenkern.mmr_select(x, r[..., None], 2)),
        ("tokenkern.pivot_select: pivots must have dtype int64, got int32",
         lambda: tokenkern.pivot_select(x, piv.int(), cand, 2)),
        ("tokenkern.pivot_select: pivots must be positions in [0, 10) (L = x.shape[1]), got 10",
         lambda: tokenkern.pivot_select(x, torch.tensor([[0, 10], [1, 2]]), cand, 2)),
        ("tokenkern.pivot_select: pivots must be positions in [0, 10) (L = x.shape[1]), got -1",
         lambda: tokenkern.pivot_select(x, torch.tensor([[0, 1], [-1, 2]]), cand, 2)),
        ("tokenkern.pivot_select: per_pivot must be <= L / P = 10 / 2",
         lambda: tokenkern.pivot_select(x, piv, cand, 6)),
        ("tokenkern.pivot_select: per_pivot must be in [1, 10]", lambda: tokenkern.pivot_select(x, piv, cand, 0)),
        ("tokenkern.pivot_select: candidates must have dtype bool", lambda: tokenkern.pivot_select(x, piv, r, 2)),
        ("tokenkern.pivot_select: candidates must leave >= 8 candidates per sample (P * per_pivot), got 5",
         lambda: tokenkern.pivot_select(x, piv, torch.arange(10).expand(2, 10) < 5, 4)),
        ("tokenkern.pivot_select: pivots must be (B, P) with B = x.shape[0] and P >= 1",
         lambda: tokenkern.pivot_select(x, piv[:, :0], cand, 2)),
    ]  # fmt: skip
    for message, call in cases:
        with raises(message):
            call()
    with raises("tokenkern.maxmin_select: k must be a Python int", TypeError):
        tokenkern.maxmin_select(x, True)
    with raises("tokenkern.pivot_select: per_pivot must be a Python int", TypeError):
        tokenkern.pivot_select(x, piv, cand, 2.0)


def test_the_op_faces_check_like_the_wrappers(gen):
    """torch.ops.tokenkern.<op> and the fake kernels refuse what the wrappers refuse."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(2, 10, 4, generator=gen)
    with raises("tokenkern.maxmin_select: k must be in [1, 10]"):
        torch.ops.tokenkern.maxmin_select(x, 11, None)
    with FakeTensorMode(allow_non_fake_inputs=True):
        with raises("tokenkern.dpp_select: relevance (B, N) must match"):
            torch.ops.tokenkern.dpp_select(x, torch.rand(1, 10), 2, None)


def test_indices_carry_no_gradient(gen):
    x = torch.randn(1, 8, 4, generator=gen, requires_grad=True)
    with raises("tokenkern.maxmin_select: not differentiable in x; pass x.detach()"):
        tokenkern.maxmin_select(x, 2)
    r = torch.rand(1, 8, generator=gen, requires_grad=True)
    with raises("tokenkern.dpp_select: not differentiable in relevance"):
        tokenkern.dpp_select(x.detach(), r, 2)
    assert tokenkern.maxmin_select(x.detach(), 2).shape == (1, 2)


# --------------------------------------------------------------- opcheck, torch.compile


def _op_cases(gen):
    x = torch.randn(2, 24, 8, generator=gen)
    h = x.half()
    r = torch.rand(2, 24, generator=gen) + 0.1
    mask = random_mask(gen, 2, 24, 6)
    pivots = torch.tensor([[5, 0], [23, 7]])
    cand = torch.ones(2, 24, dtype=torch.bool).scatter(1, pivots, False)
    return [
        (torch.ops.tokenkern.maxmin_select.default, (x, 6, mask)),
        (torch.ops.tokenkern.maxmin_select.default, (h, 24, None)),
        (torch.ops.tokenkern.dpp_select.default, (x, r, 6, mask)),
        (torch.ops.tokenkern.dpp_select.default, (h, r.half(), 6, None)),
        (torch.ops.tokenkern.mmr_select.default, (x, r, 6, 0.25, mask)),
        (torch.ops.tokenkern.pivot_select.default, (x, pivots, cand, 5)),
        (torch.ops.tokenkern.pivot_select.default, (h, pivots, cand, 1)),
    ]


def test_opcheck(gen):
    for op, args in _op_cases(gen):
        torch.library.opcheck(op, args)


def test_compile_fullgraph(gen):
    def f(x, r, mask, pivots, cand):
        return (
            tokenkern.maxmin_select(x, 6, mask),
            tokenkern.dpp_select(x, r, 6, mask),
            tokenkern.mmr_select(x, r, 6, 0.5, mask),
            tokenkern.pivot_select(x, pivots, cand, 5),
        )

    x = torch.randn(2, 24, 8, generator=gen)
    r = torch.rand(2, 24, generator=gen) + 0.1
    pivots = torch.tensor([[5, 0], [23, 7]])
    cand = torch.ones(2, 24, dtype=torch.bool).scatter(1, pivots, False)
    args = (x, r, random_mask(gen, 2, 24, 6), pivots, cand)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    for got, want in zip(compiled(*args), f(*args), strict=True):
        assert torch.equal(got, want)
