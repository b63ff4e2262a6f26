"""Bad input across every public op, wrapper and method helper: bounded loop counts, Python
ints within int64 (bools, floats and tensors refused), finite float arguments, finite merge
weights and masses within float32, empty dimensions, and the CUDA limits the CPU cannot see
(checked by the fake kernel on fake CUDA tensors and by the Triton faces under the
interpreter)."""

import contextlib
import re

import pytest
import torch
from testing import HAS_CUDA, REL_TOL, assert_rel_close, triton_face
from torch._subclasses.fake_tensor import FakeTensorMode

import tokenkern
from tokenkern import methods as M
from tokenkern import reference
from tokenkern.methods.baselines import uniform_positions
from tokenkern.ops import leverage as leverage_ops
from tokenkern.ops.attention import attn_scores_triton, attn_topk_triton
from tokenkern.ops.leverage import leverage_scores_triton, leverage_topk_triton
from tokenkern.ops.merge import merge_mass, merge_values
from tokenkern.ops.select import topk_gather_triton
from tokenkern.ops.spectral import check_spectral_ipr, spectral_ipr_triton

FLOAT32_MAX = torch.finfo(torch.float32).max


def raises(message: str, error: type[Exception] = ValueError):
    return pytest.raises(error, match=re.escape(message))


# ------------------------------------------------------------------ 1. bounded loop counts

LEVERAGE_FACES = {
    "wrapper": (tokenkern.leverage_scores, lambda x, k, **kw: tokenkern.leverage_topk(x, k, **kw)),
    "cpu": (torch.ops.tokenkern.leverage_scores, torch.ops.tokenkern.leverage_topk),
    "triton": (leverage_scores_triton, leverage_topk_triton),
}

COUNT_LIMITS = [
    ("power_iters", 10**9, "power_iters must be <= 32"),
    ("power_iters", 33, "power_iters must be <= 32"),
    ("oversample", 10**9, "oversample must be <= 65536"),
    ("rank", 10**9, "rank must be <= 65536"),
]


@pytest.mark.parametrize("face", [*LEVERAGE_FACES, "fake"])
@pytest.mark.parametrize(("name", "value", "message"), COUNT_LIMITS)
def test_leverage_counts_have_a_maximum(face, name, value, message, gen):
    x = torch.randn(2, 24, 12, generator=gen)
    kwargs = {"rank": 4, name: value}
    if face == "fake":
        with FakeTensorMode(allow_non_fake_inputs=True):
            with raises(f"tokenkern.leverage_scores: {message}"):
                torch.ops.tokenkern.leverage_scores(x, **kwargs)
            with raises(f"tokenkern.leverage_topk: {message}"):
                torch.ops.tokenkern.leverage_topk(x, 3, **kwargs)
        return
    scores_fn, topk_fn = LEVERAGE_FACES[face]
    with raises(f"tokenkern.leverage_scores: {message}"):
        scores_fn(x, **kwargs)
    with raises(f"tokenkern.leverage_topk: {message}"):
        topk_fn(x, 3, **kwargs)


def test_the_maximum_power_iters_is_accepted(gen):
    x = torch.randn(1, 24, 12, generator=gen)
    scores = tokenkern.leverage_scores(x, rank=4, power_iters=32)
    # The scores of a rank-r subspace sum to r; float32: a few roundings (QR, the eigenvector
    # product, the squares) per entry of the (N, r) basis.
    assert torch.isfinite(scores).all() and abs(scores.double().sum().item() - 4.0) <= 24 * 4 * 2**-20


def test_lofi_config_bounds_its_counts():
    for name, value in (("power_iters", 10**9), ("rank", 0), ("oversample", -1), ("seed", 2**63)):
        with raises(f"tokenkern.lofi: {name} must be an int in"):
            M.LoFiConfig(**{name: value})
    with raises("tokenkern.lofi: power_iters must be an int in [0, 32]"):
        M.LoFiConfig(power_iters=True)


# ------------------------------------------- 2. Python ints within int64, finite Python floats

BIG = 2**63


def _attn_inputs(gen):
    return torch.randn(2, 4, 5, 8, generator=gen), torch.randn(2, 2, 9, 8, generator=gen)


def _int_calls(gen):
    """(op, argument, call(value)) for every int argument of every wrapper."""
    x = torch.randn(2, 12, 6, generator=gen)
    s = torch.randn(2, 12, generator=gen)
    q, k = _attn_inputs(gen)
    keep = torch.tensor([[0, 4, 9], [1, 2, 11]])
    return [
        ("topk_gather", "k", lambda v: tokenkern.topk_gather(s, x, v)),
        ("leverage_scores", "rank", lambda v: tokenkern.leverage_scores(x, rank=v)),
        ("leverage_scores", "oversample", lambda v: tokenkern.leverage_scores(x, oversample=v)),
        ("leverage_scores", "power_iters", lambda v: tokenkern.leverage_scores(x, power_iters=v)),
        ("leverage_scores", "seed", lambda v: tokenkern.leverage_scores(x, seed=v)),
        ("leverage_topk", "k", lambda v: tokenkern.leverage_topk(x, v)),
        ("leverage_topk", "seed", lambda v: tokenkern.leverage_topk(x, 2, seed=v)),
        ("spectral_ipr", "rank", lambda v: tokenkern.spectral_ipr(x, rank=v)),
        ("gumbel_topk", "k", lambda v: tokenkern.gumbel_topk(s, v)),
        ("gumbel_topk", "seed", lambda v: tokenkern.gumbel_topk(s, 2, seed=v)),
        ("attn_scores", "key_start", lambda v: tokenkern.attn_scores(q, k, key_start=v)),
        ("attn_scores", "key_end", lambda v: tokenkern.attn_scores(q, k, key_end=v)),
        ("attn_topk", "n_keep", lambda v: tokenkern.attn_topk(q, k, torch.randn(2, 9, 3), v)),
        ("attn_topk", "key_start", lambda v: tokenkern.attn_topk(q, k, torch.randn(2, 9, 3), 1, key_start=v)),
        ("merge_tokens", "topm", lambda v: tokenkern.merge_tokens(x, keep, topm=v)),
        ("bipartite_merge", "r", lambda v: tokenkern.bipartite_merge(x, x, v)),
    ]


INT_CASES = range(len(_int_calls(None)))


@pytest.mark.parametrize("case", INT_CASES)
def test_ints_beyond_int64_name_the_argument(case, gen):
    op, name, call = _int_calls(gen)[case]
    for value in (BIG, 2**64 + 3, -(2**63) - 1):
        with raises(f"tokenkern.{op}: {name} must be"):
            call(value)


@pytest.mark.parametrize("case", INT_CASES)
def test_ints_must_be_python_ints(case, gen):
    op, name, call = _int_calls(gen)[case]
    for value in (True, 3.0, torch.tensor(3), torch.tensor([3])):
        with raises(f"tokenkern.{op}: {name} must be a Python int", TypeError) as info:
            call(value)
        assert isinstance(info.value, ValueError)  # a bad argument, like every other
    with raises(f"{name}=int(t)", TypeError):
        call(torch.tensor(3))


def _float_calls(gen):
    x = torch.randn(2, 12, 6, generator=gen)
    q, k = _attn_inputs(gen)
    keep = torch.tensor([[0, 4, 9], [1, 2, 11]])
    return [
        ("attn_scores", "scale", lambda v: tokenkern.attn_scores(q, k, scale=v)),
        ("attn_topk", "scale", lambda v: tokenkern.attn_topk(q, k, torch.randn(2, 9, 3), 2, scale=v)),
        ("merge_tokens", "temperature", lambda v: tokenkern.merge_tokens(x, keep, topm=2, temperature=v)),
    ]


@pytest.mark.parametrize("case", range(3))
def test_float_arguments_are_finite_python_numbers(case, gen):
    op, name, call = _float_calls(gen)[case]
    for value in (True, torch.tensor(0.5)):
        with raises(f"tokenkern.{op}: {name} must be a finite Python number", TypeError):
            call(value)
    for value in (float("inf"), float("nan"), -float("inf"), 1e39, 10**400):
        with raises(f"tokenkern.{op}: {name} must be a finite number with |{name}| <= 3.4028235e+38"):
            call(value)
    call(0.5)
    call(1)  # an int is a number


@pytest.mark.parametrize("face", ["wrapper", "cpu", "fake"])
def test_temperature_is_zero_or_a_normal_float32(face, gen):
    x = torch.randn(2, 12, 6, generator=gen)
    keep = torch.tensor([[0, 4, 9], [1, 2, 11]])
    fn = tokenkern.merge_tokens if face == "wrapper" else torch.ops.tokenkern.merge_tokens
    for value in (1e-40, 1e-300, -1e-30):  # a float32 temperature of 0 (or < 0) would be silently uniform
        if face == "fake":
            with FakeTensorMode(allow_non_fake_inputs=True), raises("temperature must be finite and >= 0: 0 or in"):
                fn(x, keep, topm=2, temperature=value)
        else:
            with raises("tokenkern.merge_tokens: temperature must be finite and >= 0: 0 or in"):
                fn(x, keep, topm=2, temperature=value)
    with raises("tokenkern.merge_tokens: temperature must be a finite number"):
        torch.ops.tokenkern.merge_tokens(x, keep, topm=2, temperature=1e300)
    # The smallest normal float32 is allowed and is not uniform: the most similar target wins.
    merged, _ = torch.ops.tokenkern.merge_tokens(x, keep, topm=2, temperature=2.0**-126)
    ref, _ = reference.merge_tokens(x, keep, topm=2, temperature=2.0**-126)
    assert_rel_close(merged, ref, REL_TOL[torch.float32])


def test_flags_must_be_bools(gen):
    x = torch.randn(2, 12, 6, generator=gen)
    q, k = _attn_inputs(gen)
    keep = torch.tensor([[0, 4, 9], [1, 2, 11]])
    calls = [
        ("attn_scores", "causal", lambda v: tokenkern.attn_scores(q, k, causal=v)),
        ("attn_topk", "causal", lambda v: tokenkern.attn_topk(q, k, torch.randn(2, 9, 3), 2, causal=v)),
        ("gumbel_topk", "hard", lambda v: tokenkern.gumbel_topk(x[:, :, 0], 2, hard=v)),
        ("merge_tokens", "validate", lambda v: tokenkern.merge_tokens(x, keep, validate=v)),
        ("bipartite_merge", "protect_first", lambda v: tokenkern.bipartite_merge(x, x, 2, protect_first=v)),
        ("bipartite_merge", "validate", lambda v: tokenkern.bipartite_merge(x, x, 2, validate=v)),
    ]
    for op, name, call in calls:
        for value in (1, torch.tensor(True), "yes"):
            with raises(f"tokenkern.{op}: {name} must be a bool", TypeError):
                call(value)
        call(False)


def test_the_python_faces_apply_the_same_rule(gen):
    """The Triton faces (and the fake kernels) receive the raw value when called directly."""
    x = torch.randn(2, 12, 6, generator=gen)
    s = torch.randn(2, 12, generator=gen)
    q, k = _attn_inputs(gen)
    with raises("tokenkern.topk_gather: k must be a Python int, got bool", TypeError):
        topk_gather_triton(s, x, True)
    with raises("tokenkern.leverage_scores: rank must be a Python int", TypeError):
        leverage_scores_triton(x, rank=torch.tensor(4))
    with raises("tokenkern.spectral_ipr: rank must be a Python int", TypeError):
        spectral_ipr_triton(x, rank=2.0)
    with raises("tokenkern.attn_scores: scale must be a finite Python number", TypeError):
        attn_scores_triton(q, k, scale=True)
    with raises("tokenkern.attn_scores: key_end must be a Python int", TypeError):
        attn_scores_triton(q, k, key_end=True)
    with raises("tokenkern.attn_topk: n_keep must be a Python int", TypeError):
        attn_topk_triton(q, k, torch.randn(2, 9, 3), 2.0)
    with raises("tokenkern.spectral_ipr: rank must be -1 or in [1, 2**63 - 1]"):
        check_spectral_ipr(x, BIG, cuda=False)


# --------------------------------------------- 4. non-finite weights, masses within float32


def _keep(gen, b, n, k):
    return torch.stack([torch.randperm(n, generator=gen)[:k].sort().values for _ in range(b)])


BAD_WEIGHTS = [float("inf"), float("nan"), -float("inf"), -1.0]


@pytest.mark.parametrize("face", ["wrapper", "cpu", "validate"])
@pytest.mark.parametrize("bad", BAD_WEIGHTS)
def test_merge_weights_must_be_finite(face, bad, gen):
    b, n = 2, 16
    x = torch.randn(b, n, 6, generator=gen)
    keep = _keep(gen, b, n, 4)
    w = torch.rand(b, n, generator=gen) + 0.5
    at = (int(torch.randint(b, (), generator=gen)), int(torch.randint(n, (), generator=gen)))
    w[at] = bad
    message = "tokenkern.merge_tokens: weight must be non-negative and finite, got"
    if face == "validate":  # the Python value checks of the CUDA validate=True path
        with raises(message):
            merge_values("merge_tokens", keep, n, {"weight": w})
        return
    fn = tokenkern.merge_tokens if face == "wrapper" else torch.ops.tokenkern.merge_tokens
    for assign, topm in (("dropped", 1), ("kept", 2)):
        with raises(message):
            fn(x, keep, weight=w, topm=topm, assign=assign)


@pytest.mark.parametrize("face", ["wrapper", "cpu", "validate"])
@pytest.mark.parametrize("bad", BAD_WEIGHTS)
def test_bipartite_sizes_must_be_finite(face, bad, gen):
    b, n = 2, 15
    x = torch.randn(b, n, 6, generator=gen)
    size = torch.rand(b, n, generator=gen) + 0.5
    size[int(torch.randint(b, (), generator=gen)), int(torch.randint(n, (), generator=gen))] = bad
    message = "tokenkern.bipartite_merge: size must be non-negative and finite, got"
    if face == "validate":
        with raises(message):
            merge_values("bipartite_merge", None, 0, {"size": size})
        return
    fn = tokenkern.bipartite_merge if face == "wrapper" else torch.ops.tokenkern.bipartite_merge
    with raises(message):
        fn(x, x, 4, size=size)


def test_a_mass_past_float32_is_refused(gen):
    x = torch.randn(2, 24, 6, generator=gen)
    keep = torch.tensor([[0, 3], [1, 2]])
    huge = torch.full((2, 24), 3e38)
    mass_msg = "must keep every output mass (the sum of the weights merged into a token) within float32"
    with raises(f"tokenkern.merge_tokens: weight {mass_msg}"):
        tokenkern.merge_tokens(x, keep, weight=huge)
    with raises(f"tokenkern.merge_tokens: weight {mass_msg}"):
        torch.ops.tokenkern.merge_tokens(x, keep, weight=huge, topm=3, assign="kept")
    with raises(f"tokenkern.bipartite_merge: size {mass_msg}"):
        tokenkern.bipartite_merge(x, x, 12, size=huge)
    # The validate=True path of the CUDA wrappers checks the masses the op returned.
    with raises(f"tokenkern.merge_tokens: weight {mass_msg}"):
        merge_mass("merge_tokens", "weight", torch.tensor([[1.0, float("inf")]]))
    merge_mass("merge_tokens", "weight", torch.tensor([[1.0, FLOAT32_MAX]]))


def _huge_weights(gen, b, n):
    """Weights whose products with x overflow float32 while every mass still fits: each in
    [s/2, 3s/2) with n * 3s/2 < FLOAT32_MAX, so that a mass (at most the sample's total) fits."""
    s = FLOAT32_MAX / (2 * n)
    return s * (0.5 + torch.rand(b, n, generator=gen, dtype=torch.float64)).float()


@pytest.mark.parametrize(
    ("combine", "assign", "topm", "temperature"),
    [("mean", "dropped", 1, 0.0), ("mean", "dropped", 3, 0.5), ("add_mean", "dropped", 2, 0.0),
     ("mean", "kept", 4, 0.0), ("add_mean", "kept", 3, 1.0)],
)  # fmt: skip
def test_huge_finite_weights_do_not_overflow(combine, assign, topm, temperature, gen):
    b, n, k = 2, 24, 5
    x = 1e3 * torch.randn(b, n, 8, generator=gen)  # weight * x overflows float32
    keep = _keep(gen, b, n, k)
    w = _huge_weights(gen, b, n)
    assert bool(torch.isinf(w[..., None] * x).any())
    kw = dict(weight=w, topm=topm, temperature=temperature, combine=combine, assign=assign)
    merged, mass = torch.ops.tokenkern.merge_tokens(x, keep, **kw)
    ref, ref_mass = reference.merge_tokens(x, keep, **kw)
    assert_rel_close(merged, ref, REL_TOL[torch.float32], "merged")
    # mass_j: a float32 sum of at most n + 1 non-negative terms.
    assert_rel_close(mass, ref_mass, (n + 1) * 2**-24, "mass")


def test_huge_finite_sizes_do_not_overflow_bipartite(gen):
    b, n = 2, 25
    x = 1e3 * torch.randn(b, n, 8, generator=gen)
    size = _huge_weights(gen, b, n)
    merged, out_size = tokenkern.bipartite_merge(x, x, 9, size=size)
    ref, ref_size = reference.bipartite_merge(x, x, 9, size=size)
    assert_rel_close(merged, ref, REL_TOL[torch.float32], "merged")
    assert_rel_close(out_size, ref_size, (n + 1) * 2**-24, "size")


@pytest.mark.skipif(not HAS_CUDA, reason="the sync-free CUDA op poisons the sample instead of raising")
def test_cuda_non_finite_weight_poisons_its_sample(gen):
    x = torch.randn(2, 16, 6, generator=gen).cuda()
    keep = _keep(gen, 2, 16, 4).cuda()
    w = torch.ones(2, 16, device="cuda")
    w[1, 5] = float("inf")
    merged, mass = torch.ops.tokenkern.merge_tokens(x, keep, weight=w)
    assert torch.isfinite(merged[0]).all() and torch.isnan(merged[1]).all() and torch.isnan(mass[1]).all()
    with raises("tokenkern.merge_tokens: weight must be non-negative and finite"):
        tokenkern.merge_tokens(x, keep, weight=w)
    size = torch.ones(2, 16, device="cuda")
    size[0, 2] = float("nan")
    out, out_size = torch.ops.tokenkern.bipartite_merge(x, x, 3, size=size)
    assert torch.isnan(out[0]).all() and torch.isnan(out_size[0]).all() and torch.isfinite(out[1]).all()
    huge = torch.full((2, 16), 3e38, device="cuda")
    with raises("tokenkern.merge_tokens: weight must keep every output mass"):
        tokenkern.merge_tokens(x, keep, weight=huge)


# -------------------------------------------------------------------- 6. empty dimensions


@pytest.mark.parametrize("face", ["wrapper", "cpu", "triton", "fake"])
def test_attention_needs_heads(face, gen):
    q, k = _attn_inputs(gen)
    x = torch.randn(2, 9, 3, generator=gen)
    cases = [((q[:, :0], k), "Hq=0, Hkv=2"), ((q, k[:, :0]), "Hq=4, Hkv=0"), ((q[:, :0], k[:, :0]), "Hq=0, Hkv=0")]
    fns = {
        "wrapper": (tokenkern.attn_scores, tokenkern.attn_topk),
        "cpu": (torch.ops.tokenkern.attn_scores, torch.ops.tokenkern.attn_topk),
        "triton": (attn_scores_triton, attn_topk_triton),
        "fake": (torch.ops.tokenkern.attn_scores, torch.ops.tokenkern.attn_topk),
    }[face]
    for (qq, kk), got in cases:
        message = f"q and k must have at least one head each, got {got}"
        with FakeTensorMode(allow_non_fake_inputs=True) if face == "fake" else contextlib.nullcontext():
            with raises(f"tokenkern.attn_scores: {message}"):
                fns[0](qq, kk)
            with raises(f"tokenkern.attn_topk: {message}"):
                fns[1](qq, kk, x, 2)


def _empty_batch_calls():
    """(name, call(device) -> outputs, expected shapes) for B = 0, the documented empty result."""
    x = torch.randn(0, 12, 6)
    s = torch.randn(0, 12)
    q, k = torch.randn(0, 4, 5, 8), torch.randn(0, 2, 9, 8)
    keep = torch.zeros(0, 3, dtype=torch.long)
    return [
        ("topk_gather", lambda f: f["topk_gather"](s, x, 3), [(0, 3, 6), (0, 3)]),
        ("leverage_scores", lambda f: f["leverage_scores"](x, 4), [(0, 12)]),
        ("leverage_topk", lambda f: f["leverage_topk"](x, 3, 4), [(0, 3, 6), (0, 3), (0, 12)]),
        ("spectral_ipr", lambda f: f["spectral_ipr"](x, 2), [(0,)]),
        ("attn_scores", lambda f: f["attn_scores"](q, k), [(0, 9)]),
        ("attn_topk", lambda f: f["attn_topk"](q, k, torch.randn(0, 9, 3), 2), [(0, 2, 3), (0, 2), (0, 9)]),
        ("merge_tokens", lambda f: f["merge_tokens"](x, keep), [(0, 3, 6), (0, 3)]),
        ("bipartite_merge", lambda f: f["bipartite_merge"](x, x, 4), [(0, 8, 6), (0, 8)]),
    ]


def _faces(face):
    if face == "wrapper":
        return {n: getattr(tokenkern, n) for n in tokenkern.__all__}
    if face == "cpu":
        return {n: getattr(torch.ops.tokenkern, n) for n in tokenkern.__all__ if n != "prune"}
    faces = {n: getattr(torch.ops.tokenkern, n) for n in tokenkern.__all__ if n != "prune"}
    faces.update({n: triton_face(n) for n in faces if triton_face(n) is not None})
    return faces


@pytest.mark.parametrize("face", ["wrapper", "cpu", "triton"])
@pytest.mark.parametrize("case", range(len(_empty_batch_calls())))
def test_an_empty_batch_gives_empty_outputs(face, case):
    name, call, shapes = _empty_batch_calls()[case]
    out = call(_faces(face))
    out = out if isinstance(out, tuple) else (out,)
    assert [tuple(t.shape) for t in out] == shapes, name


def test_empty_token_feature_and_count_dims_are_refused():
    x = torch.randn(2, 12, 6)
    calls = [
        ("x must have N >= 1 tokens and D >= 1 features", lambda: tokenkern.leverage_scores(x[:, :0])),
        ("x must have N >= 1 tokens and D >= 1 features", lambda: tokenkern.leverage_topk(x[:, :, :0], 2)),
        ("x must have N >= 1 tokens and D >= 1 features", lambda: tokenkern.spectral_ipr(x[:, :0])),
        ("k must be in [1, 0]", lambda: tokenkern.topk_gather(x[:, :0, 0], x[:, :0], 1)),
        ("k must be in [1, 12]", lambda: tokenkern.topk_gather(x[..., 0], x, 0)),
        ("keep_idx must keep K in [1, N=12] tokens, got K=0",
         lambda: tokenkern.merge_tokens(x, torch.zeros(2, 0, dtype=torch.long))),
        ("metric must have C >= 1 features", lambda: tokenkern.merge_tokens(x, torch.tensor([[0], [1]]), x[..., :0])),
        ("metric must have C >= 1 features", lambda: tokenkern.bipartite_merge(x, x[..., :0], 1)),
        ("head dim d must be in [1, 256]",
         lambda: tokenkern.attn_scores(torch.randn(1, 1, 2, 0), torch.randn(1, 1, 3, 0))),
        ("q and k need at least one position each",
         lambda: tokenkern.attn_scores(torch.randn(1, 1, 0, 4), torch.randn(1, 1, 3, 4))),
        ("logits must have N >= 1 tokens", lambda: tokenkern.gumbel_topk(torch.randn(2, 0), 1)),
    ]  # fmt: skip
    for message, call in calls:
        with raises(message):
            call()


def test_zero_width_tokens_and_no_tokens_to_merge_are_documented_empties(gen):
    x = torch.randn(2, 12, 6, generator=gen)
    kept, idx = tokenkern.topk_gather(x[..., 0], x[..., :0], 4)  # D = 0: the indices still count
    assert kept.shape == (2, 4, 0) and torch.equal(idx, torch.topk(x[..., 0], 4).indices.sort().values)
    merged, mass = tokenkern.merge_tokens(x[..., :0], torch.tensor([[0, 5], [3, 4]]), metric=x)
    assert merged.shape == (2, 2, 0) and torch.allclose(mass.sum(-1), torch.full((2,), 12.0))
    out, size = tokenkern.bipartite_merge(x[:, :0], x[:, :0], 0)  # N = 0: only r = 0
    assert out.shape == (2, 0, 6) and size.shape == (2, 0)


def test_keep_count_needs_tokens():
    for keep in (0.5, 1.0, 3):
        with raises("tokenkern.keep_count: n must be a token count >= 1, got 0"):
            M.keep_count(keep, 0)
    assert M.keep_count(0.5, 1) == 1 and M.keep_count(3, 1) == 1


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("lofi", lambda x: M.lofi(x, M.LoFiConfig(keep=2, rank=4))),
        ("random", lambda x: M.random_select(x, M.RandomConfig(keep=2))),
        ("uniform", lambda x: M.uniform_select(x, M.UniformConfig(keep=2))),
    ],
)
def test_method_helpers_check_their_token_matrix(name, call, gen):
    x = torch.randn(3, 16, 8, generator=gen)
    with raises(f"tokenkern.{name}: x must be (B, N, D), got shape (16, 8)"):
        call(x[0])  # a 2-D x would take k from the feature width
    with raises(f"tokenkern.{name}: x must have N >= 1 tokens, got shape (3, 0, 8)"):
        call(x[:, :0])
    with raises(f"tokenkern.{name}: x must be a torch.Tensor", TypeError):
        call(x.tolist())
    empty = call(x[:0])  # an empty batch: an empty reduction
    assert empty.indices.shape == (0, 2) and empty.tokens.shape == (0, 2, 8)
    full = call(x)
    assert full.indices.shape == (3, 2) and bool((full.indices[:, 1:] > full.indices[:, :-1]).all())


def test_uniform_positions_checks_its_counts():
    with raises("tokenkern.uniform_positions: n must be >= 1, got 0"):
        uniform_positions(0, 1)
    with raises("tokenkern.uniform_positions: k must be in [1, 9] (1 <= k <= n), got 10"):
        uniform_positions(9, 10)
    with raises("tokenkern.uniform_positions: k must be in [1, 9] (1 <= k <= n), got 0"):
        uniform_positions(9, 0)
    assert uniform_positions(9, 9).tolist() == list(range(9))


def test_method_configs_check_their_fields():
    for cfg, field in ((M.RandomConfig, "keep"), (M.UniformConfig, "keep"), (M.LoFiConfig, "keep")):
        for bad in (0, 1.5, True, float("nan")):
            with raises(f"{field} must be a fraction in (0, 1] (float) or a token count >= 1 (int)"):
                cfg(keep=bad)
    with raises("tokenkern.random: seed must be an int in [0, 9223372036854775807]"):
        M.RandomConfig(seed=-1)


# ----------------------------------------------------------- 11. CUDA limits, seen on CPU


def test_leverage_sketch_limit_on_cuda(gen):
    x = torch.randn(1, 300, 260, generator=gen)
    message = "rank + oversample must be <= 128 on CUDA when min(N, D) > 128"
    for fn in (leverage_scores_triton, lambda x, **kw: leverage_topk_triton(x, 3, **kw)):
        with raises(message) as info:
            fn(x, rank=121)
        assert "use rank <= 120 with oversample=8" in str(info.value)
        with raises("use oversample < 128 and rank <= 128 - oversample"):
            fn(x, rank=4, oversample=300)
    # The fake kernel of a CUDA tensor makes the same check; a CPU tensor takes any rank.
    with FakeTensorMode(allow_non_fake_inputs=True):
        xc = torch.empty(1, 300, 260, device="cuda")
        with raises(f"tokenkern.leverage_scores: {message}"):
            torch.ops.tokenkern.leverage_scores(xc, rank=121)
        with raises(f"tokenkern.leverage_topk: {message}"):
            torch.ops.tokenkern.leverage_topk(xc, 3, rank=121)
        assert torch.ops.tokenkern.leverage_scores(xc, rank=120).shape == (1, 300)
        assert torch.ops.tokenkern.leverage_scores(x, rank=121).shape == (1, 300)
    # Allowed at the limit, and whenever min(N, D) <= 128 (the sketch is then at most 128 wide).
    assert leverage_ops.svd_sketch("leverage_scores", 300, 260, 120, 8, 2, 0, cuda=True) == (120, 128)
    assert leverage_ops.svd_sketch("leverage_scores", 300, 100, 249, 8, 2, 0, cuda=True) == (100, 100)
    scores = torch.ops.tokenkern.leverage_scores(x, rank=121)  # sums to r (see the power_iters test)
    assert abs(scores.double().sum().item() - 121) <= 300 * 121 * 2**-20


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_cuda_merge_batches_past_the_grid_limit(gen):
    b, n = 70_000, 6  # the batch runs in chunks of at most 65535 samples
    one = torch.randn(1, n, 4, generator=gen)
    x = one.expand(b, -1, -1).contiguous().cuda()  # every sample the same: every output row too
    keep = torch.tensor([[0, 3]], device="cuda").expand(b, -1).contiguous()
    merged, mass = torch.ops.tokenkern.merge_tokens(x, keep, topm=2)
    assert torch.equal(merged, merged[:1].expand_as(merged)) and torch.equal(mass, mass[:1].expand_as(mass))
    ref, ref_mass = reference.merge_tokens(one, keep[:1].cpu(), topm=2)
    assert_rel_close(merged[:1], ref, REL_TOL[torch.float32])
    assert_rel_close(mass[:1], ref_mass, 0.0)  # unit weights: integer masses
    out, size = torch.ops.tokenkern.bipartite_merge(x, x, 2)
    assert torch.equal(out, out[:1].expand_as(out)) and torch.equal(size, size[:1].expand_as(size))
    ref_out, ref_size = reference.bipartite_merge(one, one, 2)
    assert_rel_close(out[:1], ref_out, REL_TOL[torch.float32])
    assert_rel_close(size[:1], ref_size, 0.0)


def test_merge_token_limit_on_cuda():
    """The CUDA merge kernels take N <= 65535 * 64 tokens (one sample's similarity tiles on
    grid axis y); the fake kernel of a CUDA tensor refuses more, like the CUDA glue."""
    n = 65535 * 64
    message = f"x must have N <= {n} tokens on CUDA (the kernels' grid limit), got N={n + 1}"
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(1, n + 1, 2, device="cuda")
        keep = torch.zeros(1, 1, dtype=torch.long, device="cuda")
        with raises(f"tokenkern.merge_tokens: {message}"):
            torch.ops.tokenkern.merge_tokens(x, keep)
        with raises(f"tokenkern.bipartite_merge: {message}"):
            torch.ops.tokenkern.bipartite_merge(x, x, 1)
        at_limit = torch.empty(1, n, 2, device="cuda")
        assert torch.ops.tokenkern.merge_tokens(at_limit, keep)[0].shape == (1, 1, 2)
        assert torch.ops.tokenkern.bipartite_merge(at_limit, at_limit, 1)[0].shape == (1, n - 1, 2)
