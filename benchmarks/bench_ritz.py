"""The Rayleigh-Ritz eigen-solver of leverage_topk and spectral_ipr on its own, beside
torch.linalg.eigh of the same float32 matrices.

In leverage_topk / spectral_ipr (sketch width l <= 64) the last pass's last program of each
sample runs this l x l parallel Jacobi solver (small.jacobi_eigen) after the pass; its latency
adds to every call, at every B, and no pass runs beside it. Here its stand-alone launches
(the same small.py code, one program per sample) are timed: ``top_subspace`` (leverage, with
eigenvectors) and ``ritz_ipr`` (spectral, eigenvalues only), at l = 40 (rank 32 + oversample 8)
and l = 64 (spectral's top-32 sketch), B = 1 and 8. The first GPU run tells what share of a
leverage_topk call the solver takes (compare bench_leverage at the same B).

Static estimate (sm_90, no GPU run; the PTX of the solver's round loop at L = 64, 8 warps):
15 bar.sync and about 1100 instructions per thread per round, 39 rounds per sweep at l = 40
(63 at l = 64) and 5-10 sweeps on random spectra.

GPU only: on CPU the Triton kernels run only under the interpreter, which times nothing.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, HAS_CUDA

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="the Triton solver needs a GPU (the interpreter times nothing)")

RANK = 32
CASES = [(b, l) for b in (1, 8) for l in (40, 64)]


def gram(b: int, l: int) -> torch.Tensor:
    """(b, l, l) float32 Gram matrices of Gaussian (4 l, l) matrices (a random spectrum)."""
    w = torch.randn(b, 4 * l, l, device=DEVICE)
    return w.mT @ w


def torch_eigh(h: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigh(h).eigenvectors[..., -RANK:]


def torch_eigvalsh(h: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvalsh(h)[..., -RANK:]


@pytest.mark.parametrize("impl", ["tokenkern", "torch_eigh"])
@pytest.mark.parametrize(("b", "l"), CASES)
def test_top_subspace(run_benchmark, impl, b, l):
    from tokenkern._triton import leverage, sketch

    h = gram(b, l)
    g = sketch.pack_symmetric(h, l)
    width = sketch.sketch_width(l)
    t = torch.eye(width, device=DEVICE).repeat(b, 1, 1)
    fn = (lambda: leverage.top_subspace(g, t, l, RANK)) if impl == "tokenkern" else (lambda: torch_eigh(h))
    info = {"impl": impl, "B": b, "l": l, "rank": RANK, "dtype": "torch.float32"}
    run_benchmark(fn, group=f"top_subspace B={b} l={l}", **info)


@pytest.mark.parametrize("impl", ["tokenkern", "torch_eigvalsh"])
@pytest.mark.parametrize(("b", "l"), CASES)
def test_ritz_ipr(run_benchmark, impl, b, l):
    from tokenkern._triton import sketch, spectral

    h = gram(b, l)
    g = sketch.pack_symmetric(h, l)
    amax = torch.ones(b, device=DEVICE)
    fn = (lambda: spectral.ritz_ipr(g, amax, l, RANK)) if impl == "tokenkern" else (lambda: torch_eigvalsh(h))
    info = {"impl": impl, "B": b, "l": l, "rank": RANK, "dtype": "torch.float32"}
    run_benchmark(fn, group=f"ritz_ipr B={b} l={l}", **info)
