"""Gradients of the ops: kept/merged tokens back-propagate to x (against the float64
reference differentiated by torch, with the selection or assignment held constant), index,
score and mass outputs are non-differentiable, ranking inputs get no gradient, the pure score
ops refuse requires-grad inputs at call time, and a pruned transformers model trains."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from testing import BACKENDS, HAS_CUDA, REL_TOL, assert_rel_close, device_of

import tokenkern
from tokenkern import reference
from tokenkern.ops.attention import attn_topk_triton
from tokenkern.ops.leverage import leverage_topk_triton
from tokenkern.ops.select import topk_gather_triton

DTYPES = [torch.float32, torch.float16]


@contextlib.contextmanager
def dispatched_to(backend: str, op: str, kernel):
    """Run op's "triton" backend: on a GPU the CUDA dispatch does it; without one, route the
    op's CPU dispatch to its Triton kernel (interpreted) for the duration."""
    if backend != "triton" or HAS_CUDA:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        lib = torch.library.Library("tokenkern", "IMPL")
        lib.impl(op, kernel, "CPU")
    try:
        yield
    finally:
        lib._destroy()


def leaf(t: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    return t.detach().to(device).requires_grad_()


def vjp(out: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(out, x, g.to(out.device))
    return grad.cpu()


def reference_vjp(fn, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """d(sum(fn(x64) * g)) / dx in float64, fn a reference returning the tokens first."""
    x64 = x.detach().cpu().double().requires_grad_()
    out = fn(x64)
    return vjp(out, x64, g.double())


# ------------------------------------------------------------------------------- selection


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_gather_grad(backend, dtype, gen):
    b, n, d, k = 3, 37, 20, 11
    dev = device_of(backend)
    scores = torch.randn(b, n, generator=gen)
    x = leaf(torch.randn(b, n, d, generator=gen).to(dtype), dev)
    s = leaf(scores, dev)  # ranks only: no gradient, no error
    with dispatched_to(backend, "topk_gather", topk_gather_triton):
        kept, indices = torch.ops.tokenkern.topk_gather(s, x, k)
    assert kept.requires_grad and not indices.requires_grad
    g = torch.randn(b, k, d, generator=gen).to(dtype)
    grad, grad_s = torch.autograd.grad(kept, (x, s), g.to(dev), allow_unused=True)
    assert grad_s is None
    ref = reference_vjp(lambda x64: reference.topk_gather(scores, x64, k)[0], x, g)
    # The gradient of a gather is a scatter of g: exact.
    assert grad.dtype == dtype and torch.equal(grad.cpu().double(), ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_leverage_topk_grad(backend, dtype, gen):
    b, n, d, k = 2, 40, 24, 9
    dev = device_of(backend)
    x = leaf(torch.randn(b, n, d, generator=gen).to(dtype), dev)
    with dispatched_to(backend, "leverage_topk", leverage_topk_triton):
        kept, indices, scores = torch.ops.tokenkern.leverage_topk(x, k, rank=4, oversample=4, power_iters=1)
    assert kept.requires_grad and not indices.requires_grad and not scores.requires_grad
    g = torch.randn(b, k, d, generator=gen).to(dtype)
    grad = vjp(kept, x, g)
    # The selection is a constant: the reference ranks by the op's own (sketched) scores.
    ref = reference_vjp(lambda x64: reference.topk_gather(scores.detach().cpu(), x64, k)[0], x, g)
    assert grad.dtype == dtype and torch.equal(grad.double(), ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_attn_topk_grad(backend, dtype, gen):
    b, hq, hkv, nq, nk, dh, d, n_keep = 2, 4, 2, 5, 30, 16, 12, 6
    dev = device_of(backend)
    q = leaf(torch.randn(b, hq, nq, dh, generator=gen).to(dtype), dev)
    k = leaf(torch.randn(b, hkv, nk, dh, generator=gen).to(dtype), dev)
    x = leaf(torch.randn(b, 20, d, generator=gen).to(dtype), dev)
    with dispatched_to(backend, "attn_topk", attn_topk_triton):
        kept, indices, scores = torch.ops.tokenkern.attn_topk(q, k, x, n_keep, key_start=5, key_end=25, causal=True)
    assert kept.requires_grad and not indices.requires_grad and not scores.requires_grad
    g = torch.randn(b, n_keep, d, generator=gen).to(dtype)
    grad_q, grad_k, grad = torch.autograd.grad(kept, (q, k, x), g.to(dev), allow_unused=True)
    assert grad_q is None and grad_k is None
    ref = reference_vjp(lambda x64: reference.topk_gather(scores.detach().cpu(), x64, n_keep)[0], x, g)
    assert grad.dtype == dtype and torch.equal(grad.cpu().double(), ref)


# ---------------------------------------------------------------------------------- merges

# The merge gradient is M^T g with M (B, K, N) read off in float32 (each entry a few
# roundings) and summed over at most K + 1 terms: well inside REL_TOL[float32]; for float16
# the result's final rounding (2^-11 relative) dominates, inside REL_TOL[float16].
MERGE_RULES = [
    dict(),
    dict(metric=True, weight=True),
    dict(metric=True, combine="sum", topm=3, temperature=0.3),
    dict(metric=True, weight=True, combine="add_mean", topm=4),
    dict(metric=True, query_metric=True, weight=True, topm=2, temperature=0.5),
    dict(assign="kept", topm=3, combine="sum", weight=True),
    dict(metric=True, assign="kept", topm=2, temperature=0.2),
]


def merge_inputs(gen, b, n, d, c, rule, dtype):
    x = torch.randn(b, n, d, generator=gen).to(dtype)
    kw = dict(rule)
    for name in ("metric", "query_metric"):
        if kw.pop(name, False):
            kw[name] = torch.randn(b, n, c, generator=gen)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(b, n, generator=gen) + 0.1
    return x, kw


def random_keep(gen, b, n, k):
    return torch.stack([torch.randperm(n, generator=gen)[:k].sort().values for _ in range(b)])


def check_merge_grad(x, keep, kw, gen, dtype):
    b, k, d = x.shape[0], keep.shape[1], x.shape[2]
    xg = leaf(x)
    merged, mass = torch.ops.tokenkern.merge_tokens(xg, keep, **kw)
    assert merged.requires_grad and not mass.requires_grad
    g = torch.randn(b, k, d, generator=gen).to(dtype)
    grad = vjp(merged, xg, g)
    # metric=None: x is the metric; the reference gets it as a constant.
    ref_kw = dict(kw, metric=kw.get("metric", x.detach()))
    ref = reference_vjp(lambda x64: reference.merge_tokens(x64, keep, **ref_kw)[0], x, g)
    assert grad.dtype == dtype
    assert_rel_close(grad, ref, REL_TOL[dtype], "grad_x")


@pytest.mark.parametrize("rule", MERGE_RULES, ids=lambda r: "-".join(f"{k}={v}" for k, v in r.items()) or "default")
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_tokens_grad(rule, dtype, gen):
    b, n, k, d, c = 2, 41, 9, 12, 6
    x, kw = merge_inputs(gen, b, n, d, c, rule, dtype)
    check_merge_grad(x, random_keep(gen, b, n, k), kw, gen, dtype)


def test_merge_grad_in_blocks(monkeypatch, gen):
    """The linear map read off in several one-hot blocks (a width not dividing N)."""
    import tokenkern.ops._grad as autograd

    b, n, k, d = 2, 50, 7, 5
    monkeypatch.setattr(autograd, "_ONE_HOT_ELEMENTS", b * n * 7)
    x, kw = merge_inputs(gen, b, n, d, 4, dict(metric=True, weight=True, topm=2, temperature=0.5), torch.float32)
    check_merge_grad(x, random_keep(gen, b, n, k), kw, gen, torch.float32)


@pytest.mark.parametrize("protect_first", [False, True])
@pytest.mark.parametrize("sized", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bipartite_merge_grad(protect_first, sized, dtype, gen):
    b, n, d, c, r = 2, 33, 10, 6, 9
    x = torch.randn(b, n, d, generator=gen).to(dtype)
    metric = torch.randn(b, n, c, generator=gen)
    size = torch.rand(b, n, generator=gen) + 0.5 if sized else None
    xg = leaf(x)
    merged, out_size = torch.ops.tokenkern.bipartite_merge(xg, leaf(metric), r, size, protect_first)
    assert merged.requires_grad and not out_size.requires_grad
    g = torch.randn(b, n - r, d, generator=gen).to(dtype)
    grad = vjp(merged, xg, g)
    ref = reference_vjp(lambda x64: reference.bipartite_merge(x64, metric, r, size, protect_first)[0], x, g)
    assert grad.dtype == dtype
    assert_rel_close(grad, ref, REL_TOL[dtype], "grad_x")


def test_merge_metric_and_weight_get_no_gradient(gen):
    x = leaf(torch.randn(2, 20, 8, generator=gen))
    metric, weight, query = (leaf(t) for t in (torch.randn(2, 20, 4), torch.rand(2, 20), torch.randn(2, 20, 4)))
    keep = random_keep(gen, 2, 20, 5)
    merged, _ = tokenkern.merge_tokens(x, keep, metric, weight, topm=2, temperature=0.5, query_metric=query)
    grads = torch.autograd.grad(merged.sum(), (x, metric, weight, query), allow_unused=True)
    assert grads[0] is not None and all(gr is None for gr in grads[1:])


def test_backward_through_cpp_ops_warns_nothing(gen):
    x = leaf(torch.randn(2, 16, 4, generator=gen))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept, _ = tokenkern.topk_gather(torch.randn(2, 16, generator=gen), x, 5)
        merged, _ = tokenkern.merge_tokens(x, random_keep(gen, 2, 16, 4))
        tomed, _ = tokenkern.bipartite_merge(x, x.detach(), 3)
        (kept.sum() + merged.sum() + tomed.sum()).backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


# ---------------------------------------------------------------------- pure score ops


def score_calls():
    x = torch.randn(2, 20, 8)
    q, k, lse = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 10, 8), torch.full((1, 2, 3), 3.0)
    return [
        ("leverage_scores", "x", lambda a: tokenkern.leverage_scores(a["x"], rank=4), {"x": x}),
        ("leverage_scores", "x", lambda a: torch.ops.tokenkern.leverage_scores(a["x"], 4), {"x": x}),
        ("spectral_ipr", "x", lambda a: tokenkern.spectral_ipr(a["x"]), {"x": x}),
        ("spectral_ipr", "x", lambda a: torch.ops.tokenkern.spectral_ipr(a["x"], 4), {"x": x}),
        ("attn_scores", "q", lambda a: tokenkern.attn_scores(a["q"], a["k"]), {"q": q, "k": k}),
        ("attn_scores", "k", lambda a: torch.ops.tokenkern.attn_scores(a["q"], a["k"]), {"q": q, "k": k}),
        ("attn_scores", "lse", lambda a: tokenkern.attn_scores(a["q"], a["k"], a["lse"]), {"q": q, "k": k, "lse": lse}),
    ]


@pytest.mark.parametrize(("op", "arg", "call", "inputs"), score_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_score_ops_refuse_inputs_that_require_grad(op, arg, call, inputs):
    args = dict(inputs, **{arg: inputs[arg].clone().requires_grad_()})
    message = (
        f"tokenkern.{op}: not differentiable in {arg}; pass {arg}.detach() (scores rank tokens and carry no gradient)"
    )
    with pytest.raises(ValueError) as err:
        call(args)
    assert str(err.value) == message
    with torch.no_grad():
        out = call(args)
    assert not out.requires_grad and bool(torch.isfinite(out).all())
    detached = call({n: t.detach() for n, t in args.items()})
    assert torch.equal(detached, out)


# -------------------------------------------------------------------- opcheck and compile


def _rg(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


OPCHECK = [
    ("topk_gather", lambda: (torch.randn(2, 30), _rg(2, 30, 8), 7), {}),
    ("topk_gather", lambda: (_rg(1, 5), _rg(1, 5, 3, dtype=torch.float16), 5), {}),
    ("leverage_topk", lambda: (_rg(2, 40, 24), 9), {"rank": 4, "oversample": 2, "power_iters": 1}),
    ("attn_topk", lambda: (_rg(2, 4, 5, 16), _rg(2, 2, 30, 16), _rg(2, 20, 8), 6), {"key_start": 5, "key_end": 25}),
    ("merge_tokens", lambda: (_rg(2, 20, 8), torch.tensor([[0, 4, 9], [1, 2, 19]])), {}),
    (
        "merge_tokens",
        lambda: (_rg(2, 20, 8, dtype=torch.float16), torch.tensor([[0, 4, 9], [1, 2, 19]])),
        {
            "metric": _rg(2, 20, 4),
            "weight": torch.rand(2, 20),
            "topm": 2,
            "temperature": 0.5,
            "combine": "add_mean",
            "query_metric": torch.randn(2, 20, 4),
        },
    ),
    ("merge_tokens", lambda: (_rg(1, 12, 8), torch.tensor([[3, 5]])), {"topm": 4, "combine": "sum", "assign": "kept"}),
    ("bipartite_merge", lambda: (_rg(2, 15, 8), torch.randn(2, 15, 4), 5), {"protect_first": True}),
    ("bipartite_merge", lambda: (_rg(1, 8, 8), _rg(1, 8, 8), 2), {"size": torch.rand(1, 8) + 1}),
]


@pytest.mark.parametrize(("name", "make", "kwargs"), OPCHECK, ids=[c[0] for c in OPCHECK])
def test_opcheck_with_requires_grad(name, make, kwargs):
    torch.library.opcheck(getattr(torch.ops.tokenkern, name).default, make(), kwargs)


COMPILED = {
    "topk_gather": lambda x, g: torch.ops.tokenkern.topk_gather(x.detach().sum(-1), x, 5)[0],
    "merge_tokens": lambda x, g: torch.ops.tokenkern.merge_tokens(x, torch.tensor([[0, 3, 7], [2, 5, 9]]))[0],
    "bipartite_merge": lambda x, g: torch.ops.tokenkern.bipartite_merge(x, x.detach(), 4, None, True)[0],
}


@pytest.mark.parametrize("name", sorted(COMPILED))
def test_compile_fullgraph_backward(name, gen):
    fn = COMPILED[name]

    def loss(x, g):
        out = fn(x, g)
        return (out * g[:, : out.shape[1]]).sum()

    x = torch.randn(2, 12, 6, generator=gen)
    g = torch.randn(2, 12, 6, generator=gen)
    eager_x, compiled_x = leaf(x), leaf(x)
    loss(eager_x, g).backward()
    torch._dynamo.reset()
    torch.compile(loss, fullgraph=True)(compiled_x, g).backward()
    assert_rel_close(compiled_x.grad, eager_x.grad, REL_TOL[torch.float32], "compiled grad_x")


# ---------------------------------------------------------------------- a pruned model trains


@pytest.mark.parametrize("method", ["fastv", "visionzip"])
def test_pruned_model_trains(method, gen):
    """A forward with grad enabled through a pruned tiny LLaVA, then loss.backward(): every
    parameter the unpruned model trains gets a finite gradient."""
    from test_integrations import PROMPTS, _layer_lengths, build

    tiny = build("llava")
    model, inputs = tiny.model, tiny.inputs(PROMPTS, gen)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(**inputs).logits.float().pow(2).mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    seen, hooks = _layer_lengths(model)
    try:
        full = grads()
        full_length = max(seen)
        seen.clear()
        handle = tokenkern.prune(model, method, keep=0.25)
        try:
            pruned = grads()
        finally:
            handle.remove()
    finally:
        for h in hooks:
            h.remove()
    assert min(seen) < full_length, f"{method} did not prune: layer lengths {seen} of {full_length}"
    assert set(pruned) == set(full)
    assert all(bool(torch.isfinite(gr).all()) for gr in pruned.values())
    assert any(bool((gr != 0).any()) for gr in pruned.values())
