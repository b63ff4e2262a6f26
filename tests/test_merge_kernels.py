"""The private C++ kernels behind merge_tokens and bipartite_merge: the public ops are exactly
the kernels after their argument and value checks, and a direct call of a kernel with input
that would make it read out of bounds raises instead of crashing."""

import re
from types import SimpleNamespace

import pytest
import torch
from testing import HAS_CUDA

import tokenkern
from tokenkern.ops import _C
from tokenkern.ops import merge as merge_ops

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
INVARIANT = "kernel invariant violated"


def _keep(gen, b, n, k):
    return torch.stack([torch.randperm(n, generator=gen)[:k].sort().values for _ in range(b)])


MERGE_OPTIONS = [
    {},
    {"topm": 3, "temperature": 0.5, "combine": "add_mean", "weighted": True, "query": True},
    {"topm": 2, "combine": "sum", "assign": "kept", "weighted": True},
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("options", MERGE_OPTIONS)
def test_merge_tokens_is_its_kernel_after_the_checks(device, dtype, options, gen):
    b, n, k, d, c = 3, 37, 9, 16, 8
    x = torch.randn(b, n, d, generator=gen).to(dtype)
    keep = _keep(gen, b, n, k)
    metric = torch.randn(b, n, c, generator=gen).to(dtype)
    weight = torch.rand(b, n, generator=gen) + 0.5 if options.get("weighted") else None
    query = torch.randn(b, n, c, generator=gen).to(dtype) if options.get("query") else None
    args = [t if t is None else t.to(device) for t in (x, keep, metric, weight)]
    topm, temperature = options.get("topm", 1), options.get("temperature", 0.0)
    combine, assign = options.get("combine", "mean"), options.get("assign", "dropped")
    query = None if query is None else query.to(device)
    public = torch.ops.tokenkern.merge_tokens(*args, topm, temperature, combine, query, assign)
    kernel = torch.ops.tokenkern._merge_tokens_kernel(*args, topm, temperature, combine, query, assign)
    for got, want in zip(public, kernel, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert public[0].dtype == dtype and torch.isfinite(public[0]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("n", "r", "protect_first"), [(16, 5, False), (15, 7, True), (2, 1, False), (1, 0, True)])
def test_bipartite_merge_is_its_kernel_after_the_checks(device, n, r, protect_first, gen):
    x = torch.randn(2, n, 12, generator=gen).to(device)
    metric = torch.randn(2, n, 5, generator=gen).to(device)
    size = (torch.rand(2, n, generator=gen) + 0.5).to(device)
    for s in (None, size):
        public = torch.ops.tokenkern.bipartite_merge(x, metric, r, s, protect_first)
        kernel = torch.ops.tokenkern._bipartite_merge_kernel(x, metric, r, s, protect_first)
        for got, want in zip(public, kernel, strict=True):
            assert torch.equal(got, want)
        assert public[0].shape == (2, n - r, 12) and torch.isfinite(public[0]).all()


def _bad_kernel_calls():
    x = torch.randn(2, 10, 4)
    keep = torch.tensor([[0, 3, 7], [1, 2, 9]])
    m = torch.ops.tokenkern._merge_tokens_kernel
    bm = torch.ops.tokenkern._bipartite_merge_kernel

    def merge(x=x, keep=keep, metric=None, weight=None, topm=1, combine="mean", query=None, assign="dropped"):
        return lambda: m(x, keep, metric, weight, topm, 0.0, combine, query, assign)

    return [
        ("keep_idx above N", merge(keep=torch.tensor([[0, 3, 10], [1, 2, 9]]))),
        ("keep_idx below 0", merge(keep=torch.tensor([[0, 3, 7], [-1, 2, 9]]))),
        ("K > N", merge(keep=torch.arange(11).expand(2, 11))),
        ("K = 0", merge(keep=keep[:, :0])),
        ("keep_idx int32", merge(keep=keep.int())),
        ("keep_idx batch", merge(keep=keep[:1])),
        ("x float64", merge(x=x.double())),
        ("x 2-D", merge(x=x[0])),
        ("metric N", merge(metric=torch.randn(2, 9, 4))),
        ("query shape", merge(query=torch.randn(2, 10, 3))),
        ("query dtype", merge(query=x.half())),
        ("weight shape", merge(weight=torch.rand(2, 11))),
        ("topm > K", merge(topm=4)),
        ("topm < 1", merge(topm=0)),
        ("topm > N - 1 (kept)", merge(topm=10, assign="kept")),
        ("combine", merge(combine="max")),
        ("assign", merge(assign="both")),
        ("r > mergeable", lambda: bm(x, x, 6, None, False)),
        ("r > mergeable (protected)", lambda: bm(x, x, 5, None, True)),
        ("r < 0", lambda: bm(x, x, -1, None, False)),
        ("metric N (bipartite)", lambda: bm(x, x[:, :9], 1, None, False)),
        ("size shape", lambda: bm(x, x, 1, torch.ones(2, 9), False)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_kernel_calls())), ids=[c[0] for c in _bad_kernel_calls()])
def test_a_direct_kernel_call_with_bad_input_raises(case):
    """The kernels assert what their memory safety needs (a RuntimeError naming the violated
    condition, not the public ops' messages, which live in tokenkern.ops.merge only)."""
    _, call = _bad_kernel_calls()[case]
    with pytest.raises(RuntimeError, match=re.escape(INVARIANT)) as info:
        call()
    assert not isinstance(info.value, ValueError)
    assert "tokenkern::_merge_tokens_kernel" in str(info.value) or "tokenkern::_bipartite_merge_kernel" in str(
        info.value
    )


@pytest.mark.parametrize("op", ["_merge_tokens_kernel", "_bipartite_merge_kernel"])
def test_the_built_with_cuda_flag_matches_the_registered_kernels(op):
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(f"tokenkern::{op}", "CUDA")
    assert _C.WITH_CUDA in (0, 1) and bool(_C.WITH_CUDA) == has_cuda_kernel
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tokenkern::{op}", "CPU")


def test_a_build_without_cuda_kernels_says_so(monkeypatch):
    monkeypatch.setattr(merge_ops, "_C", SimpleNamespace(WITH_CUDA=0))
    x = torch.randn(1, 6, 4)
    with pytest.raises(RuntimeError, match=re.escape("tokenkern.merge_tokens: this tokenkern was built without")):
        merge_ops._merge_tokens_cuda(x, torch.tensor([[0, 2]]))
    with pytest.raises(RuntimeError, match=re.escape("tokenkern.bipartite_merge: this tokenkern was built without")):
        merge_ops._bipartite_merge_cuda(x, x, 1)


def test_the_value_checks_name_the_first_bad_position():
    """One rule, one message, on every face that makes the check: the CPU op, and on CUDA the
    wrappers with validate=True (both run merge_values)."""
    x = torch.randn(2, 10, 4)
    cases = [
        (torch.tensor([[0, 3, 7], [1, 12, 5]]), "keep_idx values must be in [0, N=10), got 12 at [1, 1]"),
        (torch.tensor([[0, 3, 7], [4, 2, 11]]), "keep_idx rows must be strictly ascending (sorted, no duplicates), "
                                                "got 4 then 2 at [1, 1]"),
        (torch.tensor([[0, 3, 3], [1, 2, -1]]), "keep_idx rows must be strictly ascending (sorted, no duplicates), "
                                                "got 3 then 3 at [0, 2]"),
    ]  # fmt: skip
    faces = [
        tokenkern.merge_tokens,
        torch.ops.tokenkern.merge_tokens,
        lambda x, keep: merge_ops.merge_values("merge_tokens", keep, x.shape[1], {}),
    ]
    for keep, message in cases:
        for face in faces:
            with pytest.raises(ValueError, match=re.escape(f"tokenkern.merge_tokens: {message}")):
                face(x, keep)
    weight = torch.ones(2, 10)
    weight[1, 4] = -2.0
    with pytest.raises(ValueError, match=re.escape("weight must be non-negative and finite, got -2.0 at [1, 4]")):
        torch.ops.tokenkern.merge_tokens(x, torch.tensor([[0, 3, 7], [1, 2, 9]]), weight=weight)
