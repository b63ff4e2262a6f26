"""Every op of the tokenkern namespace: opcheck (schema, fake kernel, autograd registration,
AOT dispatch) on each device, and torch.compile(fullgraph=True) over a call."""

import pytest
import torch
from testing import HAS_CUDA

import tokenkern  # noqa: F401

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def _x(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


# op name -> list of (args builder, kwargs); every op registered under tokenkern:: must appear.
CASES = {
    "topk_gather": [
        (lambda dev: (_x(2, 30, device=dev), _x(2, 30, 8, device=dev), 7), {}),
        (lambda dev: (_x(1, 5, device=dev), _x(1, 5, 3, dtype=torch.float16, device=dev), 5), {}),
    ],
    "leverage_scores": [
        (lambda dev: (_x(2, 40, 24, device=dev),), {"rank": 4, "oversample": 2, "power_iters": 1}),
    ],
    "spectral_ipr": [
        (lambda dev: (_x(2, 40, 24, device=dev),), {}),
        (lambda dev: (_x(2, 30, 50, dtype=torch.float16, device=dev),), {"rank": 4}),
    ],
    "attn_scores": [
        (lambda dev: (_x(2, 4, 5, 16, device=dev), _x(2, 2, 30, 16, device=dev)), {"causal": True}),
        (
            lambda dev: (_x(1, 2, 3, 16, device=dev), _x(1, 1, 20, 16, device=dev)),
            {
                "key_start": 4,
                "key_end": 18,
                "reduce": "sum",
                "key_mask": torch.tensor([[True] * 15 + [False] * 5]),
                "query_mask": torch.tensor([[True, False, True]]),
                "lse": torch.full((1, 2, 3), 3.0),
            },
        ),
    ],
    "attn_topk": [
        (
            lambda dev: (_x(2, 4, 5, 16, device=dev), _x(2, 2, 30, 16, device=dev), _x(2, 20, 8, device=dev), 6),
            {"key_start": 5, "key_end": 25, "causal": True},
        ),
    ],
    "merge_tokens": [
        (lambda dev: (_x(2, 20, 8, device=dev), torch.tensor([[0, 4, 9], [1, 2, 19]], device=dev)), {}),
        (
            lambda dev: (
                _x(2, 20, 8, dtype=torch.float16, device=dev),
                torch.tensor([[0, 4, 9], [1, 2, 19]], device=dev),
            ),
            {
                "metric": torch.randn(2, 20, 4),
                "weight": torch.rand(2, 20),
                "topm": 2,
                "temperature": 0.5,
                "combine": "add_mean",
                "query_metric": torch.randn(2, 20, 4),
            },
        ),
        (
            lambda dev: (_x(1, 12, 8, device=dev), torch.tensor([[3, 5]], device=dev)),
            {"topm": 4, "combine": "sum", "assign": "kept"},
        ),
    ],
    "bipartite_merge": [
        (lambda dev: (_x(2, 15, 8, device=dev), _x(2, 15, 4, device=dev), 5), {"protect_first": True}),
        (lambda dev: (_x(1, 8, 8, device=dev), _x(1, 8, 8, device=dev), 2), {"size": torch.rand(1, 8) + 1}),
    ],
    # The private C++ kernels the public ops call after checking their arguments.
    "_topk_gather_kernel": [
        (lambda dev: (_x(2, 30, device=dev), _x(2, 30, 8, device=dev), 7), {}),
    ],
    # The private C++ kernels the merge ops call after checking their arguments (all arguments
    # passed: their schemas have no defaults).
    "_merge_tokens_kernel": [
        (
            lambda dev: (_x(2, 20, 8, device=dev), torch.tensor([[0, 4, 9], [1, 2, 19]], device=dev)),
            {
                "metric": None,
                "weight": None,
                "topm": 2,
                "temperature": 0.5,
                "combine": "mean",
                "query_metric": None,
                "assign": "dropped",
            },
        ),
        (
            lambda dev: (_x(1, 12, 8, dtype=torch.float16, device=dev), torch.tensor([[3, 5]], device=dev)),
            {
                "metric": torch.randn(1, 12, 4),
                "weight": torch.rand(1, 12),
                "topm": 4,
                "temperature": 0.0,
                "combine": "sum",
                "query_metric": None,
                "assign": "kept",
            },
        ),
    ],
    "_bipartite_merge_kernel": [
        (lambda dev: (_x(2, 15, 8, device=dev), _x(2, 15, 4, device=dev), 5), {"size": None, "protect_first": True}),
    ],
    # The launch plans of the CUDA merge launchers (private CPU ops of the static kernel report;
    # no tensor arguments).
    "_merge_tokens_launch_plan": [
        (lambda dev: (8, 2880, 4096, 720, 4096, 1, False, True), {}),
        (lambda dev: (3, 12, 8, 5, 4, 4, True, False), {}),
    ],
    "_bipartite_merge_launch_plan": [
        (lambda dev: (8, 577, 1024, 64, 144), {}),
        (lambda dev: (1, 1, 8, 8, 0), {}),
    ],
    "gumbel_topk": [
        (lambda dev: (_x(2, 30, device=dev).requires_grad_(), 7, 0.5, 3), {}),
        (lambda dev: (_x(3, 17, dtype=torch.float16, device=dev).requires_grad_(), 17, 2.0, 0), {"hard": False}),
        (lambda dev: (_x(1, 5, device=dev), 1, 1.0, 2**40), {"hard": False}),
    ],
    "gumbel_topk_soft": [
        (lambda dev: (_x(2, 30, device=dev).requires_grad_(), 7, 0.5, 3), {}),
        (lambda dev: (_x(3, 17, dtype=torch.float16, device=dev).requires_grad_(), 17, 2.0, 0), {}),
    ],
    "gumbel_topk_backward": [
        (lambda dev: (_x(2, 30, device=dev), _x(2, 30, device=dev), 7, 0.5, 3), {}),
        (lambda dev: (_x(1, 9, device=dev), _x(1, 9, dtype=torch.float16, device=dev), 9, 1.0, 11), {}),
        (
            lambda dev: (
                _x(2, 30, device=dev),
                _x(2, 30, device=dev),
                7,
                0.5,
                3,
                torch.ops.tokenkern.gumbel_topk_soft(_x(2, 30, device=dev), 7, 0.5, 3)[1],
            ),
            {},
        ),
    ],
    "leverage_topk": [
        (lambda dev: (_x(2, 40, 24, device=dev), 9), {"rank": 4, "oversample": 2, "power_iters": 1}),
        (lambda dev: (_x(1, 33, 16, dtype=torch.float16, device=dev), 1), {"rank": 4}),
    ],
    "maxmin_select": [
        (lambda dev: (_x(2, 30, 8, device=dev), 7, None), {}),
        (lambda dev: (_x(2, 9, 8, dtype=torch.float16, device=dev), 3, torch.rand(2, 9, device=dev) > 0.3), {}),
    ],
    "dpp_select": [
        (lambda dev: (_x(2, 30, 8, device=dev), torch.rand(2, 30, device=dev) + 0.1, 7, None), {}),
        (lambda dev: (_x(1, 9, 8, device=dev), torch.rand(1, 9, device=dev), 9, None), {}),
    ],
    "mmr_select": [
        (lambda dev: (_x(2, 30, 8, device=dev), _x(2, 30, device=dev), 7, 0.5, None), {}),
    ],
    "pivot_select": [
        (
            lambda dev: (
                _x(2, 30, 8, device=dev),
                torch.tensor([[3, 0, 29], [5, 6, 7]], device=dev),
                torch.arange(30, device=dev).expand(2, 30) >= 8,
                4,
            ),
            {},
        ),
    ],
    # The private C++ kernels of the diversity ops: the float32 cosine similarities and the
    # greedy loops over them.
    "_cosine_sim_kernel": [
        (lambda dev: (_x(2, 12, 5, device=dev),), {}),
    ],
    "_maxmin_select_kernel": [
        (lambda dev: (_x(2, 12, 12, device=dev), None, 5), {}),
    ],
    "_dpp_select_kernel": [
        (lambda dev: (_x(2, 12, 12, device=dev), torch.rand(2, 12, device=dev), None, 5), {}),
    ],
    "_mmr_select_kernel": [
        (lambda dev: (_x(2, 12, 12, device=dev), _x(2, 12, device=dev), torch.rand(2, 12) > 0.2, 5, 0.3), {}),
    ],
    "_pivot_select_kernel": [
        (lambda dev: (_x(2, 3, 12, device=dev), torch.rand(2, 12, device=dev) > 0.2, 2), {}),
    ],
    # The private C++ kernel of attn_scores for few queries per key head.
    "_attn_scores_kernel": [
        (
            lambda dev: (_x(2, 4, 1, 16, device=dev), _x(2, 2, 30, 16, device=dev), *(None, 0.25, 3, 28)),
            {"query_mask": None, "key_mask": None, "causal_offset": 29, "mean": True},
        ),
        (
            lambda dev: (
                _x(1, 2, 3, 16, dtype=torch.bfloat16, device=dev),
                _x(1, 1, 20, 16, dtype=torch.bfloat16, device=dev),
                torch.full((1, 2, 3), 3.0, device=dev),
                0.25,
                4,
                18,
                torch.tensor([[True, False, True]], device=dev),
                torch.tensor([[True] * 15 + [False] * 5], device=dev),
                None,
                False,
            ),
            {},
        ),
    ],
}


# Ops checked on CPU only: a private CPU kernel (CUDA runs Triton instead), or no tensor arguments.
CPU_ONLY = {
    "_topk_gather_kernel",
    "_merge_tokens_launch_plan",
    "_bipartite_merge_launch_plan",
    "_cosine_sim_kernel",
    "_maxmin_select_kernel",
    "_dpp_select_kernel",
    "_mmr_select_kernel",
    "_pivot_select_kernel",
    "_attn_scores_kernel",
}


def _skip_missing_kernel(name: str, device: str) -> None:
    if device != "cpu" and name in CPU_ONLY:
        pytest.skip(f"{name} is a CPU kernel")


def registered_ops() -> set[str]:
    names = torch._C._dispatch_get_all_op_names()
    return {n.split("::", 1)[1] for n in names if n.startswith("tokenkern::")}


def test_every_registered_op_is_checked():
    assert registered_ops() == set(CASES), "add opcheck/compile cases for new ops"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "case"), [(n, c) for n, cs in CASES.items() for c in cs])
def test_opcheck(name, case, device):
    _skip_missing_kernel(name, device)
    make, kwargs = case
    op = getattr(torch.ops.tokenkern, name).default
    kwargs = {n: (v.to(device) if isinstance(v, torch.Tensor) else v) for n, v in kwargs.items()}
    torch.library.opcheck(op, make(device), kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_compile_fullgraph(name, device):
    _skip_missing_kernel(name, device)
    make, kwargs = CASES[name][0]
    args = make(device)
    kwargs = {n: (v.to(device) if isinstance(v, torch.Tensor) else v) for n, v in kwargs.items()}
    op = getattr(torch.ops.tokenkern, name)

    def f(*a):
        out = op(*a, **kwargs)
        return out if isinstance(out, tuple) else (out,)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    for got, want in zip(compiled(*args), f(*args), strict=True):
        assert torch.equal(got, want)
