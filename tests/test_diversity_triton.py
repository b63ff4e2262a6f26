"""The diversity family's CUDA kernels (tokenkern._triton.diversity; CPU tensors under
TRITON_INTERPRET=1 without a GPU) against the float64 reference.

Greedy selections have near-ties: two candidates whose scores differ by less than the
float32 rounding of the kernel have two right answers. ``replay`` re-runs the greedy in
float64 along the kernel's own choices: at every step one of the kernel's tokens must be
within ``tol`` (derived from the float32 sums) of the best remaining score, and when no
step had a near-tie the result must equal the reference exactly.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable, Iterator

import pytest
import testing
import torch
from testing import HAS_CUDA, TRITON_DEVICE, assert_valid_indices

from tokenkern import reference
from tokenkern._triton import diversity as kernels
from tokenkern.ops import diversity as ops

U = 2.0**-24  # float32 unit roundoff


def run(op: str, *args):
    """The op's CUDA face: on the GPU when there is one, else the kernels interpreted."""
    if HAS_CUDA:
        args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    out = getattr(ops, f"{op}_triton")(*args)
    return out.cpu()


def cos_tol(d: int) -> float:
    """Bound on the float32 error of one cosine (D-term fp32 dot of unit vectors, plus the
    normalization), twice: the difference of two scores."""
    return 4 * (d + 8) * U


# ---------------------------------------------------------------------------- the replay


def replay(score: Callable[[list[int]], torch.Tensor], chosen: torch.Tensor, avail: torch.Tensor, tol: float):
    """Greedy in float64 along the kernel's choices. score(picks) -> (N,) float64 scores of
    the next step; chosen: the kernel's (k,) indices; avail: (N,) bool candidates.
    Returns (picks, near_tie)."""
    chosen_set = set(chosen.tolist())
    live = avail.clone()
    picks: list[int] = []
    near_tie = False
    for _ in range(len(chosen_set)):
        sc = score(picks)
        idx = live.nonzero().flatten()
        assert len(idx) > 0, "no candidate left"
        vals = torch.where(torch.isnan(sc[idx]), float("-inf"), sc[idx])
        best = vals.max()
        close = idx[vals >= best - tol].tolist()
        near_tie |= len(close) > 1
        ours = [j for j in close if j in chosen_set]
        assert ours, (
            f"step {len(picks)}: the kernel's tokens miss the best remaining score {best.item():.6g} "
            f"(by more than {tol:.2g}); within tol: {close} (seed {testing.test_seed()})"
        )
        j = max(ours, key=lambda i: (sc[i].item(), -i))
        picks.append(j)
        live[j] = False
    return picks, near_tie


def maxmin_score(x: torch.Tensor, avail: torch.Tensor) -> Callable[[list[int]], torch.Tensor]:
    dist = 1.0 - reference.cosine_matrix(x[None])[0]
    n = x.shape[0]

    def score(picks: list[int]) -> torch.Tensor:
        if not picks:
            if int(avail.sum()) == 1:
                return torch.zeros(n, dtype=torch.float64)
            others = torch.where(avail[None, :] & ~torch.eye(n, dtype=torch.bool), dist, float("inf"))
            return others.min(dim=1).values
        return dist[picks].min(dim=0).values

    return score


def mmr_score(x: torch.Tensor, v: torch.Tensor, lam: float, avail: torch.Tensor) -> Callable:
    sim = reference.cosine_matrix(x[None])[0]
    v = v.double()
    lo, hi = v[avail].min(), v[avail].max()
    imp = (v - lo) / (hi - lo) if hi > lo else torch.zeros_like(v)

    def score(picks: list[int]) -> torch.Tensor:
        if not picks:
            return v
        return lam * imp - (1 - lam) * sim[picks].max(dim=0).values

    return score


def dpp_score(x: torch.Tensor, r: torch.Tensor, avail: torch.Tensor) -> Callable:
    """d^2 after the picks (Chen et al.), as the reference computes it; past the numerical
    rank the lowest-index remaining candidate scores 1, every other token 0."""
    r = r.double()
    lk = r[:, None] * reference.cosine_matrix(x[None])[0] * r[None, :]

    def score(picks: list[int]) -> torch.Tensor:
        d2 = torch.where(avail, lk.diagonal(), float("-inf"))
        rows: list[torch.Tensor] = []
        for j in picks:
            if d2[j] > 0 and torch.isfinite(d2[j]):
                e = (lk[j] - sum((c[j] * c for c in rows), torch.zeros_like(d2))) / torch.sqrt(d2[j])
            else:
                e = torch.zeros_like(d2)
            rows.append(e)
            d2 = d2 - e * e
        live = avail.clone()
        live[picks] = False
        best = torch.where(live, d2, float("-inf")).max()
        if not (best > 0 and torch.isfinite(best)):
            out = torch.zeros_like(d2)
            out[int(live.nonzero()[0, 0])] = 1.0
            return out
        return d2

    return score


def check_greedy(out: torch.Tensor, ref: torch.Tensor, scores: list[Callable], avails: torch.Tensor, tol: float):
    n = avails.shape[1]
    assert_valid_indices(out, n, ref.shape[1])
    assert bool((out[:, 1:] > out[:, :-1]).all()), f"not strictly ascending: {out}"
    for s, score in enumerate(scores):
        _, near_tie = replay(score, out[s], avails[s], tol)
        if not near_tie:
            assert torch.equal(out[s], ref[s]), f"sample {s}: {out[s].tolist()} != {ref[s].tolist()}"


def _inputs(gen, b, n, d, dtype, masked):
    x = torch.randn(b, n, d, generator=gen).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(b, n, generator=gen) > 0.3
        mask[:, 0] = True  # at least one candidate
    return x, mask


def _avail(mask, b, n):
    return torch.ones(b, n, dtype=torch.bool) if mask is None else mask


SHAPES = [(1, 1, 4, 1), (2, 37, 16, 9), (1, 130, 24, 40), (3, 70, 32, 70)]


# ------------------------------------------------------------------- against the reference


@pytest.mark.parametrize(("b", "n", "d", "k"), SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_maxmin_matches_reference(b, n, d, k, masked, gen):
    x, mask = _inputs(gen, b, n, d, torch.float32, masked)
    avail = _avail(mask, b, n)
    k = min(k, int(avail.sum(dim=1).min()))
    out = run("maxmin_select", x, k, mask)
    ref = reference.maxmin_select(x, k, mask)
    check_greedy(out, ref, [maxmin_score(x[s], avail[s]) for s in range(b)], avail, cos_tol(d))


@pytest.mark.parametrize(("b", "n", "d", "k"), SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_mmr_matches_reference(b, n, d, k, masked, gen):
    x, mask = _inputs(gen, b, n, d, torch.float32, masked)
    avail = _avail(mask, b, n)
    k = min(k, int(avail.sum(dim=1).min()))
    imp = torch.randn(b, n, generator=gen)
    lam = 0.25 + 0.5 * float(torch.rand((), generator=gen))
    out = run("mmr_select", x, imp, k, lam, mask)
    ref = reference.mmr_select(x, imp, k, lam, mask)
    tol = cos_tol(d) + 32 * U
    check_greedy(out, ref, [mmr_score(x[s], imp[s], lam, avail[s]) for s in range(b)], avail, tol)


@pytest.mark.parametrize(("b", "n", "d", "k"), [(1, 1, 4, 1), (2, 37, 48, 9), (1, 130, 64, 24), (3, 70, 40, 16)])
@pytest.mark.parametrize("masked", [False, True])
def test_dpp_matches_reference(b, n, d, k, masked, gen):
    x, mask = _inputs(gen, b, n, d, torch.float32, masked)
    avail = _avail(mask, b, n)
    k = min(k, int(avail.sum(dim=1).min()))
    r = 0.5 + 0.5 * torch.rand(b, n, generator=gen)
    out = run("dpp_select", x, r, k, mask)
    ref = reference.dpp_select(x, r, k, mask)
    # d > k: the kernel stays full rank; each Cholesky step adds one cosine error and a k-term
    # float32 sum, amplified by 1 / sqrt(d2) (d2 >= ~0.1 here).
    tol = 16 * k * cos_tol(d)
    check_greedy(out, ref, [dpp_score(x[s], r[s], avail[s]) for s in range(b)], avail, tol)


@pytest.mark.parametrize("dtype", [torch.float16, *([torch.bfloat16] if HAS_CUDA else [])])
def test_half_inputs_accumulate_in_float32(dtype, gen):
    b, n, d, k = 2, 50, 40, 12
    x, _ = _inputs(gen, b, n, d, dtype, False)
    avail = _avail(None, b, n)
    out = run("maxmin_select", x, k, None)
    check_greedy(out, reference.maxmin_select(x, k), [maxmin_score(x[s], avail[s]) for s in range(b)], avail,
                 cos_tol(d))  # fmt: skip
    r = 0.5 + 0.5 * torch.rand(b, n, generator=gen)
    out = run("dpp_select", x, r.to(dtype), k, None)
    ref = reference.dpp_select(x, r.to(dtype), k)
    check_greedy(out, ref, [dpp_score(x[s], r[s].to(dtype), avail[s]) for s in range(b)], avail, 16 * k * cos_tol(d))


def pivot_check(out, x, pivots, cand, per_pivot, tol):
    """Replay of pivot_select along the kernel's result: each pivot's per_pivot picks are the
    kernel's remaining tokens least similar to the pivot, none of the other remaining tokens
    more than tol less similar. Returns whether a near-tie occurred."""
    near_tie = False
    for s in range(x.shape[0]):
        ours = set(out[s].tolist())
        remaining = cand[s].clone()
        for p in pivots[s].tolist():
            sim = reference.pivot_cosine(x[s], p)
            sim = torch.where(torch.isnan(sim), float("inf"), sim)
            mine = [j for j in remaining.nonzero().flatten().tolist() if j in ours]
            mine.sort(key=lambda j: (sim[j].item(), j))
            assert len(mine) >= per_pivot, f"sample {s}: too few of the kernel's tokens remain for pivot {p}"
            take = mine[:per_pivot]
            others = [j for j in remaining.nonzero().flatten().tolist() if j not in set(take)]
            worst = max(sim[j].item() for j in take)
            if others:
                closest = min(sim[j].item() for j in others)
                assert worst <= closest + tol, (
                    f"sample {s}, pivot {p}: {worst} > {closest} + {tol} (seed {testing.test_seed()})"
                )
                near_tie |= closest <= worst + tol
            remaining[take] = False
    return near_tie


@pytest.mark.parametrize(("b", "length", "d", "n_piv", "per_pivot"), [(1, 5, 3, 1, 1), (2, 97, 24, 3, 7),
                                                                      (3, 260, 40, 8, 16)])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pivot_matches_reference(b, length, d, n_piv, per_pivot, dtype, gen):
    x = torch.randn(b, length, d, generator=gen).to(dtype)
    pivots = torch.stack([torch.randperm(length, generator=gen)[:n_piv] for _ in range(b)])
    cand = torch.rand(b, length, generator=gen) > 0.2
    cand[:, : n_piv * per_pivot + 1] = True  # enough candidates
    cand.scatter_(1, pivots, False)
    out = run("pivot_select", x, pivots, cand, per_pivot)
    assert_valid_indices(out, length, n_piv * per_pivot)
    assert bool((out[:, 1:] > out[:, :-1]).all())
    assert bool(cand.gather(1, out).all()), "a non-candidate was selected"
    if not pivot_check(out, x, pivots, cand, per_pivot, cos_tol(d)):
        assert torch.equal(out, reference.pivot_select(x, pivots, cand, per_pivot))


def test_pivot_order_changes_the_result():
    # Token 1 is the least similar to both pivots: the first pivot in the order takes it, the
    # second its next choice (3 for pivot 0, 4 for pivot 2).
    x = torch.tensor([[1.0, 0.0], [-1.0, -1.0], [0.0, 1.0], [-0.6, 0.8], [0.8, -0.6]])[None]
    cand = torch.tensor([[False, True, False, True, True]])
    a = run("pivot_select", x, torch.tensor([[0, 2]]), cand, 1)
    b = run("pivot_select", x, torch.tensor([[2, 0]]), cand, 1)
    assert torch.equal(a, reference.pivot_select(x, torch.tensor([[0, 2]]), cand, 1))
    assert torch.equal(b, reference.pivot_select(x, torch.tensor([[2, 0]]), cand, 1))
    assert a.tolist() == [[1, 4]] and b.tolist() == [[1, 3]]


# ------------------------------------------------------------------------------ exact ties


def _one_hot_pairs(gen, n_dirs: int, d: int):
    """2 n_dirs tokens in shuffled order, each of n_dirs one-hot directions twice (once
    scaled by 2): every cosine is exactly 0 or 1 in float32 as in float64."""
    base = torch.zeros(2 * n_dirs, d)
    dirs = torch.arange(n_dirs).repeat(2)
    base[torch.arange(2 * n_dirs), dirs] = torch.cat([torch.ones(n_dirs), 2 * torch.ones(n_dirs)])
    perm = torch.randperm(2 * n_dirs, generator=gen)
    return base[perm][None], dirs[perm]


def _first_occurrences(dirs: torch.Tensor, k: int) -> list[int]:
    seen, firsts = set(), []
    for i, v in enumerate(dirs.tolist()):
        if v not in seen:
            seen.add(v)
            firsts.append(i)
    rest = [i for i in range(len(dirs)) if i not in set(firsts)]
    return sorted((firsts + rest)[:k])


@pytest.mark.parametrize("k", [1, 5, 11, 16])
def test_exact_ties_go_to_the_lower_index(k, gen):
    # Duplicates (cosine exactly 1) are never taken while another direction remains, and
    # every tie (all distances 1, all d2 1) goes to the lower index; k > 8 exhausts the 8
    # directions (DPP: d2 = 0 exactly, the lowest-index fallback).
    x, dirs = _one_hot_pairs(gen, 8, 12)
    want = [_first_occurrences(dirs, k)]
    assert run("maxmin_select", x, k, None).tolist() == want
    assert run("dpp_select", x, torch.ones(1, 16), k, None).tolist() == want
    assert run("mmr_select", x, torch.ones(1, 16), k, 0.5, None).tolist() == want
    for op in ("maxmin_select", "dpp_select"):
        ref = getattr(reference, op)(x, k) if op == "maxmin_select" else reference.dpp_select(x, torch.ones(1, 16), k)
        assert ref.tolist() == want


def test_pivot_exact_ties_go_to_the_lower_index():
    x = torch.zeros(1, 12, 4)
    x[0, 0, 0] = 1.0  # the pivot
    x[0, 1:, 1] = 1.0  # every other token: cosine exactly 0 with the pivot
    cand = torch.ones(1, 12, dtype=torch.bool)
    cand[0, 0] = False
    out = run("pivot_select", x, torch.tensor([[0]]), cand, 5)
    assert out.tolist() == [[1, 2, 3, 4, 5]] == reference.pivot_select(x, torch.tensor([[0]]), cand, 5).tolist()


# ------------------------------------------------------------------------- special inputs


def test_zero_norm_tokens(gen):
    b, n, d, k = 2, 40, 16, 20
    x = torch.randn(b, n, d, generator=gen)
    x[0, [3, 17, 30]] = 0.0
    x[1, :10] = 0.0
    avail = _avail(None, b, n)
    out = run("maxmin_select", x, k, None)
    check_greedy(out, reference.maxmin_select(x, k), [maxmin_score(x[s], avail[s]) for s in range(b)], avail,
                 cos_tol(d))  # fmt: skip
    r = 0.5 + 0.5 * torch.rand(b, n, generator=gen)
    out = run("dpp_select", x, r, k, None)
    check_greedy(out, reference.dpp_select(x, r, k), [dpp_score(x[s], r[s], avail[s]) for s in range(b)], avail,
                 16 * k * cos_tol(d))  # fmt: skip
    imp = torch.randn(b, n, generator=gen)
    out = run("mmr_select", x, imp, k, 0.5, None)
    check_greedy(out, reference.mmr_select(x, imp, k), [mmr_score(x[s], imp[s], 0.5, avail[s]) for s in range(b)],
                 avail, cos_tol(d) + 32 * U)  # fmt: skip
    piv = run("pivot_select", x, torch.tensor([[3, 0], [0, 12]]), torch.ones(b, n, dtype=torch.bool), 5)
    assert_valid_indices(piv, n, 10)


def test_fewer_candidates_pad_with_the_lowest_unselected_tokens(gen):
    # The CUDA faces check no values (no host sync): every candidate, then the lowest-index
    # other tokens, all distinct.
    n, k = 30, 10
    x = torch.randn(1, n, 8, generator=gen)
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, [4, 9, 21]] = True
    want = [[0, 1, 2, 3, 4, 5, 6, 7, 9, 21]]
    assert run("maxmin_select", x, k, mask).tolist() == want
    assert run("dpp_select", x, torch.rand(1, n, generator=gen) + 0.5, k, mask).tolist() == want
    assert run("mmr_select", x, torch.randn(1, n, generator=gen), k, 0.5, mask).tolist() == want
    none = torch.zeros(1, n, dtype=torch.bool)
    assert run("maxmin_select", x, k, none).tolist() == [list(range(k))]
    out = run("pivot_select", x, torch.tensor([[0, 1]]), mask, 3)
    assert out.tolist() == [[0, 1, 2, 4, 9, 21]]  # pivot 0 takes the 3 candidates, pivot 1 pads


def test_out_of_range_pivots_give_in_range_indices(gen):
    x = torch.randn(2, 20, 8, generator=gen)
    out = run("pivot_select", x, torch.tensor([[-5, 3], [19, 400]]), torch.ones(2, 20, dtype=torch.bool), 4)
    assert_valid_indices(out, 20, 8)
    assert bool((out[:, 1:] > out[:, :-1]).all())


@pytest.mark.parametrize("op", ["maxmin_select", "dpp_select", "mmr_select", "pivot_select"])
def test_batch_invariance_and_determinism(op, gen):
    b, n, d, k = 3, 45, 24, 12
    x = torch.randn(b, n, d, generator=gen)
    mask = torch.rand(b, n, generator=gen) > 0.25
    mask[:, :k] = True
    extra = {
        "maxmin_select": lambda s: (k, mask[s]),
        "dpp_select": lambda s: (0.5 + torch.arange(n)[None].expand(b, n)[s] / n, k, mask[s]),
        "mmr_select": lambda s: (torch.cos(torch.arange(n) * 1.0)[None].expand(b, n)[s], k, 0.5, mask[s]),
        "pivot_select": lambda s: (torch.tensor([[1, 7]]).expand(b, 2)[s], mask[s], 4),
    }[op]
    whole = run(op, x, *extra(slice(None)))
    assert torch.equal(whole, run(op, x, *extra(slice(None))))
    for s in range(b):
        assert torch.equal(whole[s : s + 1], run(op, x[s : s + 1], *extra(slice(s, s + 1)))), f"sample {s}"


def test_empty_batch():
    x = torch.randn(0, 5, 4)
    assert run("maxmin_select", x, 2, None).shape == (0, 2)
    assert run("dpp_select", x, torch.ones(0, 5), 2, None).shape == (0, 2)
    assert run(
        "pivot_select", x, torch.zeros(0, 1, dtype=torch.int64), torch.ones(0, 5, dtype=torch.bool), 2
    ).shape == (
        0,
        2,
    )


# ------------------------------------------------------------- several programs per sample


@contextlib.contextmanager
def concurrent_programs() -> Iterator[None]:
    """Run each interpreted launch's programs in concurrent threads (the greedy kernels'
    programs of one sample wait on each other, which the interpreter's one-after-another
    loop cannot). Uses the Triton interpreter's internals; skips where they differ."""
    from triton.runtime import interpreter as itp

    builder = itp.interpreter_builder
    needed = (hasattr(itp, "GridExecutor"), hasattr(itp, "_patch_lang"), hasattr(itp, "_implicit_cvt"))
    if not all(needed) or not hasattr(itp.GridExecutor, "_init_args_hst"):
        pytest.skip("this Triton's interpreter has other internals")
    local = threading.local()
    cls = type(builder)

    def call(self, *args_dev, **kwargs):
        names = inspect.getfullargspec(self.fn).args
        kwargs = {k: v for k, v in kwargs.items() if k in names}
        args_hst, kwargs_hst = self._init_args_hst(args_dev, kwargs)  # CPU tensors: shared storage
        scope = itp._patch_lang(self.fn)
        try:
            args = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
            args = {n: a if n in self.constexprs else itp._implicit_cvt(a) for n, a in args.items()}
            grid = tuple(self.grid) + (1,) * (3 - len(self.grid))
            builder.set_grid_dim(*grid)
            errors: list[BaseException] = []

            def program(idx):
                local.idx = idx
                try:
                    self.fn(**args)
                except BaseException as err:  # re-raised below
                    errors.append(err)

            threads = [threading.Thread(target=program, args=((i, 0, 0),)) for i in range(grid[0])]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
        finally:
            scope.restore()

    old_call = itp.GridExecutor.__call__
    cls.grid_idx = property(lambda self: local.idx, lambda self, v: setattr(local, "idx", v))
    itp.GridExecutor.__call__ = call
    try:
        yield
    finally:
        itp.GridExecutor.__call__ = old_call
        del cls.grid_idx


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU every run uses several programs per sample")
@pytest.mark.parametrize("programs", [2, 3])
def test_several_programs_per_sample_give_the_same_result(programs, monkeypatch, gen):
    b, n, d, k = 2, 41, 16, 13
    x = torch.randn(b, n, d, generator=gen)
    mask = torch.rand(b, n, generator=gen) > 0.2
    mask[:, :k] = True
    r = 0.5 + 0.5 * torch.rand(b, n, generator=gen)
    calls = [
        ("maxmin_select", (x, k, mask)),
        ("dpp_select", (x, r, k, mask)),
        ("mmr_select", (x, r, k, 0.5, None)),
    ]
    alone = [run(op, *args) for op, args in calls]
    monkeypatch.setattr(kernels, "_ctas_per_sample", lambda batch, n_tokens, sms: programs)
    with concurrent_programs():
        split = [run(op, *args) for op, args in calls]
    for (op, _), a, s in zip(calls, alone, split, strict=True):
        assert torch.equal(a, s), f"{op}: {programs} programs per sample: {s.tolist()} != {a.tolist()}"


def test_launch_grid_fills_the_gpu():
    # Off the interpreter the greedy kernels run ceil(SMs / B) programs per sample (>= 32
    # tokens each, <= SMs), so B x programs >= 132 at the headline shapes.
    assert TRITON_DEVICE in ("cpu", "cuda")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "interpreted", lambda: False)
        assert kernels._ctas_per_sample(8, 2880, 132) * 8 >= 132
        assert kernels._ctas_per_sample(8, 576, 132) * 8 >= 132
        assert kernels._ctas_per_sample(1, 2880, 132) > 1
        assert kernels._ctas_per_sample(200, 576, 132) == 1
        assert kernels._ctas_per_sample(1, 4096, 16) == 16  # a small GPU: one sample's programs stay resident


@pytest.mark.parametrize(
    ("op", "kernel_names"),
    [
        ("maxmin_select", ["_gram_kernel", "_greedy_kernel"]),
        ("dpp_select", ["_gram_kernel", "_dpp_kernel"]),
        ("mmr_select", ["_gram_kernel", "_greedy_kernel"]),
        ("pivot_select", ["_pivot_sim_kernel", "_pivot_pick_kernel"]),
    ],
)
def test_two_launches_and_no_torch_kernels(op, kernel_names, monkeypatch, gen):
    from tokenkern.kernel_report.triton_report import record_launches

    monkeypatch.setenv("TOKENKERN_POISON", "0")  # the NaN fill of a test run is not the op's
    b, n, k = 2, 30, 6
    x = torch.randn(b, n, 8, generator=gen, device=TRITON_DEVICE)
    v = torch.rand(b, n, generator=gen).to(TRITON_DEVICE)
    mask = torch.ones(b, n, dtype=torch.bool, device=TRITON_DEVICE)
    args = {
        "maxmin_select": (x, k, mask),
        "dpp_select": (x, v, k, mask),
        "mmr_select": (x, v, k, 0.5, mask),
        "pivot_select": (x, torch.zeros(b, 2, dtype=torch.int64, device=TRITON_DEVICE), mask, 3),
    }[op]
    with record_launches(execute=False) as launches:
        getattr(ops, f"{op}_triton")(*args)
    assert [launch.name for launch in launches] == kernel_names
