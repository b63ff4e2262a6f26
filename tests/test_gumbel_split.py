"""gumbel_topk's Triton kernels with each row split over several programs: every program
computes the row's statistics from the whole row in the same order and writes only its own
slice, so any number of programs per row gives the result of one, bit for bit (hard, soft,
shift, noise, backward with and without the shift), for single- and multi-chunk rows."""

import re

import pytest
import torch
from testing import TRITON_DEVICE

from tokenkern import reference
from tokenkern._triton import gumbel

# (B, N, k, tau, programs per row): even and uneven splits, B = 1, k = 1 and k = N.
SPLITS = [(1, 37, 9, 0.05, 5), (3, 50, 12, 0.7, 4), (2, 24, 1, 0.5, 7), (2, 20, 20, 1.0, 3)]


def _logits(b: int, n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(b, n, generator=gen) * 3
    x[0, 4:9] = 0.5  # ties across the k-th place
    x[-1, 1] = float("nan")
    x[-1, 2] = float("-inf")
    if b > 1:
        x[0, :2] = float("inf")
    return x.to(TRITON_DEVICE)


def _seed(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=gen))


def _forward(x, k, tau, seed, hard, splits):
    shift = None if hard else torch.zeros(x.shape[0], 2, dtype=torch.float64, device=x.device)
    out, noise = gumbel.gumbel_topk(x, k, tau, seed, hard, return_noise=True, shift=shift, n_splits=splits)
    return out, noise, shift


def _check_forward_splits(b, n, k, tau, splits, gen):
    x = _logits(b, n, gen)
    seed = _seed(gen)
    for hard in (True, False):
        one = _forward(x, k, tau, seed, hard, 1)
        many = _forward(x, k, tau, seed, hard, splits)
        assert not many[0].isnan().any()
        for a, c in zip(one, many, strict=True):
            assert (a is None and c is None) or torch.equal(a, c)
        if hard:
            want = reference.gumbel_topk(x.cpu().double(), k, tau, one[1].cpu().double(), hard=True)
            assert torch.equal(many[0].cpu().double(), want)


def _check_backward_splits(b, n, k, tau, splits, gen):
    x = _logits(b, n, gen)
    grad = torch.randn(b, n, generator=gen).to(TRITON_DEVICE)
    seed = _seed(gen)
    _, _, shift = _forward(x, k, tau, seed, False, 1)
    for saved in (None, shift):
        one = gumbel.gumbel_topk_backward(grad, x, k, tau, seed, saved, n_splits=1)
        many = gumbel.gumbel_topk_backward(grad, x, k, tau, seed, saved, n_splits=splits)
        assert not many.isnan().any()
        assert torch.equal(one, many)


@pytest.mark.parametrize(("b", "n", "k", "tau", "splits"), SPLITS)
def test_split_forward_is_the_one_program_forward(b, n, k, tau, splits, gen):
    _check_forward_splits(b, n, k, tau, splits, gen)


@pytest.mark.parametrize(("b", "n", "k", "tau", "splits"), SPLITS)
def test_split_backward_is_the_one_program_backward(b, n, k, tau, splits, gen):
    _check_backward_splits(b, n, k, tau, splits, gen)


@pytest.mark.parametrize(("b", "n", "k", "tau", "splits"), [(2, 50, 12, 0.7, 3)])
def test_split_multi_chunk_rows(monkeypatch, b, n, k, tau, splits, gen):
    """Rows of several 16-wide chunks (the path of rows past 4096), split unevenly: the same
    result as one program, and the hard mask and noise of the single-chunk kernel (soft values
    may differ in their last bits: chunked sums round in another order)."""
    x = _logits(b, n, gen)
    seed = _seed(gen)
    mask, noise, _ = _forward(x, k, tau, seed, True, 1)
    monkeypatch.setattr(gumbel, "_chunk", lambda n: 16)
    _check_forward_splits(b, n, k, tau, splits, gen)
    _check_backward_splits(b, n, k, tau, splits, gen)
    got_mask, got_noise, _ = _forward(x, k, tau, seed, True, splits)
    assert torch.equal(got_mask, mask) and torch.equal(got_noise, noise)


def test_default_splits_fill_the_gpu(monkeypatch):
    """On a GPU (not the interpreter) the launcher splits rows so that B = 8 and B = 1 at
    N = 2880 launch >= 132 programs, each owning >= 16 outputs; B = 64 a few per row."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert 8 * gumbel.splits(8, 2880) >= 132 and gumbel.splits(1, 2880) >= 132
    assert 2 <= gumbel.splits(64, 2880) <= 4
    assert gumbel.splits(4096, 2880) == 1
    assert gumbel.splits(1, 40) == 2 and gumbel.splits(1, 20) == 1 and gumbel.splits(1, 1) == 1
    for b, n in ((1, 2880), (8, 2880), (3, 100), (1, 17)):
        assert n // gumbel.splits(b, n) >= 16 or gumbel.splits(b, n) == 1


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, 65536])
def test_bad_splits(bad):
    x = torch.randn(2, 10).to(TRITON_DEVICE)
    with pytest.raises(ValueError, match=re.escape("tokenkern.gumbel_topk: n_splits must be an int in [1, 65535]")):
        gumbel.gumbel_topk(x, 2, 1.0, 0, True, n_splits=bad)
    with pytest.raises(ValueError, match=re.escape("tokenkern.gumbel_topk_backward: n_splits must be an int")):
        gumbel.gumbel_topk_backward(torch.ones_like(x), x, 2, 1.0, 0, n_splits=bad)
