"""Shared device/dtype tables, tolerance helpers and input builders for every test module."""

from __future__ import annotations

import functools
import math
import os
import random
import subprocess
import sys

import torch

HAS_CUDA = torch.cuda.is_available()

# Where the Triton kernels run: a GPU when there is one, else CPU tensors under TRITON_INTERPRET=1.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

# The two implementations of a Python-registered op: the CPU kernel (torch/C++) and the
# CUDA kernel (Triton). Tests take `backend` from here.
BACKENDS = ["cpu", "triton"]


def run_compiling(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run a Python script in a fresh interpreter with TRITON_INTERPRET unset: there the kernels
    are JIT functions, which compile (for a GPU target, without one)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True)


# The interpreter gets bf16 arithmetic wrong: bf16 cases run on a GPU only.
FLOAT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])

# Relative error bounds (||out - ref|| / ||ref||) against float64 references, by input dtype.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


@functools.cache
def test_seed() -> int:
    env = os.environ.get("TOKENKERN_TEST_SEED")
    return int(env) if env else random.SystemRandom().randrange(2**31)


def device_of(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else "cpu"


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf if out has a NaN or Inf the reference lacks."""
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    err = rel_error(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} (seed {test_seed()})"


def assert_valid_indices(indices: torch.Tensor, n: int, k: int) -> None:
    """(B, k) int64 indices: in [0, n), strictly ascending (hence unique) per row."""
    assert indices.dtype == torch.int64, indices.dtype
    assert indices.shape[-1] == k, (tuple(indices.shape), k)
    idx = indices.cpu()
    assert bool(((idx >= 0) & (idx < n)).all()), f"indices out of [0, {n}): {idx}"
    if k > 1:
        assert bool((idx[..., 1:] > idx[..., :-1]).all()), f"indices not strictly ascending: {idx}"


def same_sets(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a.sort(-1).values.cpu() == b.sort(-1).values.cpu()).all())


def gapped_matrix(
    batch: int, n: int, d: int, rank: int, gap: float = 10.0, gen: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x = U diag(s) V^T in float64 with sigma_rank / sigma_{rank+1} = gap, and its exact
    leverage scores ||U_r[i]||^2 (r = min(rank, n, d)). Rows of U get uneven weights so that
    the leverage scores spread out like those of real tokens."""
    m = min(n, d)
    r = min(rank, m)
    a = torch.randn(batch, n, m, generator=gen, dtype=torch.float64)
    a = a * torch.exp(torch.randn(batch, n, 1, generator=gen, dtype=torch.float64))
    u = torch.linalg.qr(a).Q
    v = torch.linalg.qr(torch.randn(batch, d, m, generator=gen, dtype=torch.float64)).Q
    top = torch.logspace(1.0 + math.log10(gap), math.log10(gap), r, dtype=torch.float64)
    rest = torch.logspace(0.0, -1.0, m - r, dtype=torch.float64)
    s = torch.cat([top, rest])
    x = (u * s) @ v.mT
    return x, (u[..., :r] ** 2).sum(-1)


def separated_k(scores: torch.Tensor, gap: float, near: int) -> int | None:
    """For one row of exact scores: the k closest to `near` at which the k-th and (k+1)-th
    largest differ by more than `gap`, so that any estimate within gap / 2 of every score
    has the same top-k set. None if there is no such k."""
    s = scores.double().sort(descending=True).values
    ok = ((s[:-1] - s[1:]) > gap).nonzero().flatten() + 1
    if len(ok) == 0:
        return None
    return int(ok[(ok - near).abs().argmin()])


def on_backend(op: str, backend: str, *args, **kwargs):
    """Runs torch.ops.tokenkern.<op> on a backend: "cpu" (the CPU kernel) or "triton" (the CUDA
    kernel: on the GPU when there is one, else its Triton launcher on CPU tensors through the
    interpreter). Tensor arguments move to the GPU and outputs come back to the CPU."""
    if backend == "cpu":
        return getattr(torch.ops.tokenkern, op)(*args, **kwargs)
    if HAS_CUDA:
        move = lambda v: v.cuda() if isinstance(v, torch.Tensor) else v  # noqa: E731
        out = getattr(torch.ops.tokenkern, op)(*map(move, args), **{n: move(v) for n, v in kwargs.items()})
        return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()
    return triton_face(op)(*args, **kwargs)


def triton_face(op: str):
    """The CUDA kernel of torch.ops.tokenkern.<op> as registered, ``<op>_triton`` of its family
    module tokenkern.ops.<family> (None when the op's CUDA kernel is C++)."""
    import importlib
    import pkgutil

    import tokenkern.ops as ops

    families = [importlib.import_module(f"tokenkern.ops.{m.name}") for m in pkgutil.iter_modules(ops.__path__)]
    for module in [ops, *families]:
        fn = getattr(module, f"{op}_triton", None)
        if fn is not None:
            return fn
    return None
