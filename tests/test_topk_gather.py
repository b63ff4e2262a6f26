"""topk_gather: the C++ CPU kernel and the Triton kernel against reference.topk_gather."""

import re

import pytest
import torch
from testing import BACKENDS, FLOAT_DTYPES, HAS_CUDA, TRITON_DEVICE, assert_valid_indices, device_of

import tokenkern
from tokenkern import reference
from tokenkern.ops.select import topk_gather_triton


def run(backend: str, scores, x, k):
    if backend == "cpu":
        return torch.ops.tokenkern.topk_gather(scores, x, k)
    if HAS_CUDA:
        return torch.ops.tokenkern.topk_gather(scores.cuda(), x.cuda(), k)
    return topk_gather_triton(scores, x, k)


def check_against_reference(backend, scores, x, k):
    kept, idx = run(backend, scores, x, k)
    ref_kept, ref_idx = reference.topk_gather(scores, x, k)
    assert_valid_indices(idx, x.shape[1], k)
    assert torch.equal(idx.cpu(), ref_idx), f"indices differ:\n{idx}\n{ref_idx}"
    assert kept.dtype == x.dtype and kept.shape == ref_kept.shape
    assert torch.equal(kept.cpu(), ref_kept), "kept rows are not exactly x[indices]"
    return kept, idx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("b", "n", "d", "k"),
    [(1, 1, 1, 1), (2, 7, 5, 3), (3, 577, 64, 144), (1, 576, 130, 576), (2, 2880, 16, 720), (1, 5000, 8, 1)],
)
def test_matches_reference(backend, b, n, d, k, gen):
    scores = torch.randn(b, n, generator=gen)
    x = torch.randn(b, n, d, generator=gen)
    check_against_reference(backend, scores, x, k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, torch.float64])
def test_x_dtypes_are_copied_exactly(backend, dtype, gen):
    scores = torch.rand(2, 300, generator=gen)
    x = torch.randn(2, 300, 96, generator=gen).to(dtype)
    check_against_reference(backend, scores, x, 77)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 5, 40, 99, 100])
def test_ties_go_to_the_lower_index(backend, k, gen):
    # Few distinct values: most of the boundary is ties.
    scores = torch.randint(0, 4, (3, 100), generator=gen).float()
    scores[2] = 1.0  # a row of equal scores selects the first k
    x = torch.randn(3, 100, 4, generator=gen)
    _, idx = check_against_reference(backend, scores, x, k)
    assert torch.equal(idx[2].cpu(), torch.arange(k))


@pytest.mark.parametrize("backend", BACKENDS)
def test_special_values(backend, gen):
    inf, nan = float("inf"), float("nan")
    scores = torch.tensor([[0.0, -0.0, nan, -inf, inf, 1.0, -1.0, nan, 0.0, -inf]])
    x = torch.arange(10.0).reshape(1, 10, 1)
    for k in range(1, 11):
        _, idx = check_against_reference(backend, scores, x, k)
    # NaN ranks as -inf: tied with the -inf entries, so the lower index goes first.
    _, idx = run(backend, scores, x, 8)
    assert idx.cpu().tolist() == [[0, 1, 2, 3, 4, 5, 6, 8]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, gen):
    scores = torch.randn(50, 3, generator=gen).t()  # (3, 50), stride (1, 3)
    x = torch.randn(3, 20, 50, generator=gen).transpose(1, 2)  # (3, 50, 20)
    check_against_reference(backend, scores, x, 13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend, gen):
    scores = torch.randint(0, 10, (4, 700), generator=gen).float()
    x = torch.randn(4, 700, 33, generator=gen)
    a = run(backend, scores, x, 200)
    b = run(backend, scores, x, 200)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_empty_batch():
    kept, idx = torch.ops.tokenkern.topk_gather(torch.empty(0, 5), torch.empty(0, 5, 3), 2)
    assert kept.shape == (0, 2, 3) and idx.shape == (0, 2)


def test_wrapper_accepts_other_float_scores(gen):
    scores = torch.randn(2, 30, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 30, 4, generator=gen)
    _, idx = tokenkern.topk_gather(scores, x, 5)
    assert torch.equal(idx, reference.topk_gather(scores.float(), x, 5)[1])


BAD_CALLS = [
    ("scores must be (B, N)", lambda s, x: (s[0], x, 2)),
    ("x must be (B, N, D)", lambda s, x: (s, x[0], 2)),
    ("scores must have dtype", lambda s, x: (s.double(), x, 2)),
    ("scores must have dtype", lambda s, x: (s.long(), x, 2)),
    ("x must be a floating tensor", lambda s, x: (s, x.long(), 2)),
    ("must match x's first two dimensions", lambda s, x: (s[:, :5], x, 2)),
    ("must match x's first two dimensions", lambda s, x: (s[:1], x, 2)),
    ("k must be", lambda s, x: (s, x, 0)),
    ("k must be", lambda s, x: (s, x, 11)),
    ("k must be", lambda s, x: (s, x, -3)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("message", "make"), BAD_CALLS)
def test_bad_input(backend, message, make):
    scores, x = torch.randn(2, 10), torch.randn(2, 10, 3)
    args = make(scores, x)
    with pytest.raises(ValueError, match=re.escape(message)):
        if backend == "cpu":
            torch.ops.tokenkern.topk_gather(*args)
        else:
            topk_gather_triton(*args)


def test_mismatched_devices():
    with pytest.raises(ValueError, match="is on"):
        torch.ops.tokenkern.topk_gather(torch.randn(2, 10), torch.randn(2, 10, 3, device="meta"), 2)
    with pytest.raises(ValueError, match="is on"):
        topk_gather_triton(torch.randn(2, 10), torch.randn(2, 10, 3, device="meta"), 2)


def test_device_of_backends():
    assert device_of("cpu") == "cpu"


@pytest.mark.parametrize("block_rows", [16, 32])
def test_small_blocks_count_across_programs(block_rows, gen):
    """The GPU block size (many programs per row) under whatever runs the Triton kernels."""
    from tokenkern._triton.select import topk_gather

    scores = torch.randint(0, 6, (2, 300), generator=gen).float().to(TRITON_DEVICE)
    x = torch.randn(2, 300, 10, generator=gen).to(TRITON_DEVICE)
    for k in (1, 37, 150, 299, 300):
        kept, idx = topk_gather(scores, x, k, block_rows=block_rows)
        ref_kept, ref_idx = reference.topk_gather(scores.cpu(), x.cpu(), k)
        assert torch.equal(idx.cpu(), ref_idx)
        assert torch.equal(kept.cpu(), ref_kept)


def test_public_op_is_its_kernel_after_the_checks(gen):
    """The public op checks the arguments (tokenkern.ops.select, the one source of the rules)
    and then runs the private CPU kernel, whose output it returns unchanged."""
    scores = torch.randn(3, 41, generator=gen)
    x = torch.randn(3, 41, 6, generator=gen)
    public = torch.ops.tokenkern.topk_gather(scores, x, 9)
    kernel = torch.ops.tokenkern._topk_gather_kernel(scores, x, 9)
    for got, want in zip(public, kernel, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    "args",
    [
        (torch.randn(2, 10), torch.randn(2, 10, 3), 11),
        (torch.randn(2, 10), torch.randn(2, 10, 3), 0),
        (torch.randn(2, 10).double(), torch.randn(2, 10, 3), 2),
        (torch.randn(2, 10), torch.randn(2, 9, 3), 2),
        (torch.randn(2, 10), torch.randn(10, 3), 2),
    ],
    ids=["k>N", "k=0", "float64 scores", "N mismatch", "x 2-D"],
)
def test_a_direct_kernel_call_with_bad_input_raises(args):
    """The private kernel asserts what its memory accesses need: a RuntimeError naming the
    violated invariant (the user-facing messages live in tokenkern.ops.select only)."""
    with pytest.raises(RuntimeError, match=re.escape("tokenkern::_topk_gather_kernel: kernel invariant violated")):
        torch.ops.tokenkern._topk_gather_kernel(*args)


@pytest.mark.parametrize("chunk", [None, 64])
@pytest.mark.parametrize("n_parts", [1, 3])
def test_partial_rows_are_summed_in_part_order(chunk, n_parts, gen):
    """topk_gather_parts (attn_topk's head groups): the scores are the partial rows added in
    part order, bit for bit, in one chunk or several; the selection is topk_gather's of them
    (ties, NaN and -0.0 included)."""
    from tokenkern._triton.select import topk_gather, topk_gather_parts

    parts = torch.randint(0, 3, (2, n_parts, 160), generator=gen).float() / 4  # sums tie often
    parts[1] = torch.randn(n_parts, 160, generator=gen)
    parts[1, 0, 7] = float("nan")
    parts[1, :, 11] = -0.0
    x = torch.randn(2, 160, 10, generator=gen)
    total = parts[:, 0].clone()
    for p in range(1, n_parts):
        total += parts[:, p]
    pd, xd = parts.to(TRITON_DEVICE), x.to(TRITON_DEVICE)
    for k in (37, 160):
        kept, idx, scores = topk_gather_parts(pd, xd, k, block_rows=64, chunk=chunk)
        got, nan = scores.cpu(), torch.isnan(total)
        assert torch.equal(torch.isnan(got), nan) and bool(nan[1, 7])
        assert torch.equal(got[~nan].view(torch.int32), total[~nan].view(torch.int32))  # bits, -0.0 too
        ref_kept, ref_idx = reference.topk_gather(total, x, k)
        assert torch.equal(idx.cpu(), ref_idx) and torch.equal(kept.cpu(), ref_kept)
        plain_kept, plain_idx = topk_gather(total.to(TRITON_DEVICE), xd, k, block_rows=64)
        assert torch.equal(idx, plain_idx) and torch.equal(kept, plain_kept)
