"""Greedy diversity selection: maxmin_select (DivPrune), dpp_select (CDPruner), pivot_select
(DART) and mmr_select (maximal marginal relevance).

The contract every op of the family shares:

- Similarity (maxmin, dpp, mmr): the cosine ``S_ij = u_i . u_j`` with ``u_i = x_i / ||x_i||``;
  a zero-norm token has ``u = 0``, so similarity 0 (distance 1) with every other token;
  ``S_ii = 1`` for every token (self-distance 0). S is exactly symmetric: every kernel uses
  one float32 value for S_ij and S_ji (e.g. the one computed for i < j), so that two mutual
  nearest neighbours tie exactly in DivPrune's first pick and the lower index wins. pivot_select uses
  ``torch.nn.functional.cosine_similarity``'s rule, ``x_p . x_j / (max(||x_p||, 1e-8) *
  max(||x_j||, 1e-8))``. fp16/bf16 inputs are read as float32 and every sum accumulates in
  float32.
- mask / candidates: (B, N) bool, True = the token may be selected (mask None: all).
- Greedy choices take the first maximum (ties to the lower index), NaN ranks as -inf, a
  selected token is never selected again, and the result is (B, count) int64 ascending.
- Each sample's result is what it gets alone (no batch-wide normalization); same inputs,
  same outputs, bit for bit, on one device.
- Fewer candidates than a sample must select: ValueError on the CPU (a value check). The
  CUDA kernels never sync the host, so they do not check values: they then pad with the
  lowest-index unselected tokens, and an out-of-range pivot gives an unspecified (in-range)
  result; no out-of-range index is ever returned.
- maxmin/dpp/mmr: N <= MAX_TOKENS (the N x N similarity of a sample: 64 MiB in float32 at
  N = 4096).

Faces of each op: the public function; the ``torch.library.custom_op`` schema
``tokenkern::<op>``, its fake kernel, its CPU kernel (the float32 similarity in the private C++
op ``tokenkern::_cosine_sim_kernel`` (pivot_select: with torch), then the greedy loop in the
private C++ op ``tokenkern::_<op>_kernel``, csrc/cpu/diversity_cpu.cpp, which asserts only its
memory-safety invariants) and its CUDA
kernel (``<op>_triton``, tokenkern._triton.diversity, called with the public op's
arguments), every one through ``check_<op>`` (the single source of the argument rules).
Indices are not differentiable: an input that requires grad is refused at call time.
Spec: ``tokenkern.reference.maxmin_select``, ``dpp_select``, ``pivot_select``,
``mmr_select``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op, register_fake

from .. import _C  # noqa: F401  (the private CPU kernel ops)
from . import _args as checks
from ._grad import register_refusal

MAX_TOKENS = 4096
# Samples whose float32 similarity matrices are built at once on the CPU: at most this many
# floats (256 MiB).
_CPU_SIM_FLOATS = 1 << 26

# --------------------------------------------------------------------------------- checks


def _check_mask(op: str, name: str, mask: object, x: Tensor) -> None:
    """mask: (B, N) bool on x's device, or None."""
    if mask is None:
        return
    mask = checks.tensor(op, name, mask)
    checks.ndim(op, name, mask, 2, "(B, N)")
    checks.dtype(op, name, mask, (torch.bool,))
    checks.same_device(op, [("x", x), (name, mask)])
    if tuple(mask.shape) != tuple(x.shape[:2]):
        checks.fail(op, f"{name} (B, N) must match x's first two dimensions, got {tuple(mask.shape)} "
                        f"and {tuple(x.shape)}")  # fmt: skip


def _check_scores(op: str, name: str, scores: object, x: Tensor) -> None:
    """scores: (B, N) float32/float16/bfloat16 on x's device."""
    scores = checks.tensor(op, name, scores)
    checks.ndim(op, name, scores, 2, "(B, N)")
    checks.dtype(op, name, scores)
    checks.same_device(op, [("x", x), (name, scores)])
    if tuple(scores.shape) != tuple(x.shape[:2]):
        checks.fail(op, f"{name} (B, N) must match x's first two dimensions, got {tuple(scores.shape)} "
                        f"and {tuple(x.shape)}")  # fmt: skip


def _check_greedy(op: str, x: object, k: int, mask: object) -> Tensor:
    """x: (B, N, D) floating with 1 <= N <= MAX_TOKENS, 1 <= k <= N, mask (B, N) bool or None."""
    x = checks.tokens(op, "x", x)
    checks.at_most(op, "x.shape[1]", x.shape[1], MAX_TOKENS, "the tokens of one sample: N x N similarities")
    checks.keep_count(op, "k", k, x.shape[1])
    _check_mask(op, "mask", mask, x)
    return x


def check_maxmin_select(x: object, k: int, mask: object) -> None:
    """x: (B, N, D) float32/float16/bfloat16, N <= MAX_TOKENS, 1 <= k <= N, mask: (B, N) bool or None."""
    _check_greedy("maxmin_select", x, k, mask)


def check_dpp_select(x: object, relevance: object, k: int, mask: object) -> None:
    """As check_maxmin_select, and relevance: (B, N) floating on x's device."""
    x = _check_greedy("dpp_select", x, k, mask)
    _check_scores("dpp_select", "relevance", relevance, x)


def check_mmr_select(x: object, importance: object, k: int, lam: float, mask: object) -> None:
    """As check_maxmin_select, importance: (B, N) floating on x's device, 0 <= lam <= 1."""
    op = "mmr_select"
    x = _check_greedy(op, x, k, mask)
    _check_scores(op, "importance", importance, x)
    lam = checks.number(op, "lam", lam)
    if not isinstance(lam, torch.SymFloat | torch.SymInt) and not 0.0 <= lam <= 1.0:
        checks.fail(op, f"lam must be in [0, 1], got {lam!r}")


def check_pivot_select(x: object, pivots: object, candidates: object, per_pivot: int) -> None:
    """x: (B, L, D) floating, pivots: (B, P) int64 with P >= 1, candidates: (B, L) bool,
    per_pivot >= 1 with P * per_pivot <= L; all on one device."""
    op = "pivot_select"
    x = checks.tokens(op, "x", x)
    pivots = checks.tensor(op, "pivots", pivots)
    checks.ndim(op, "pivots", pivots, 2, "(B, P)")
    checks.dtype(op, "pivots", pivots, (torch.int64,))
    checks.same_device(op, [("x", x), ("pivots", pivots)])
    if pivots.shape[0] != x.shape[0] or pivots.shape[1] < 1:
        checks.fail(op, f"pivots must be (B, P) with B = x.shape[0] and P >= 1, got {tuple(pivots.shape)} "
                        f"for x of shape {tuple(x.shape)}")  # fmt: skip
    candidates = checks.tensor(op, "candidates", candidates)
    _check_mask(op, "candidates", candidates, x)
    length = x.shape[1]
    checks.int_range(op, "per_pivot", per_pivot, 1, length, f" (1 <= per_pivot <= L = {length})")
    n_piv = pivots.shape[1]
    if n_piv * per_pivot > length:
        checks.fail(op, f"per_pivot must be <= L / P = {length} / {n_piv} (P * per_pivot tokens are "
                        f"selected), got {per_pivot}")  # fmt: skip


def _check_counts(op: str, name: str, cand: Tensor | None, need: int, per: str) -> None:
    """The CPU value check: every sample has >= need candidates."""
    if cand is None:
        return
    counts = cand.sum(dim=1)
    short = torch.nonzero(counts < need)
    if short.numel():
        s = int(short[0, 0])
        checks.fail(op, f"{name} must leave >= {need} candidates {per}, got {int(counts[s])} in sample {s}")


def _check_pivot_range(pivots: Tensor, length: int) -> None:
    """The CPU value check: 0 <= pivots < L."""
    bad = (pivots < 0) | (pivots >= length)
    if bool(bad.any()):
        value = int(pivots[bad][0])
        checks.fail("pivot_select", f"pivots must be positions in [0, {length}) (L = x.shape[1]), got {value}")


# ------------------------------------------------------------------------- public functions


def maxmin_select(x: Tensor, k: int, mask: Tensor | None = None) -> Tensor:
    """DivPrune's max-min diversity selection of k tokens per sample.

    x: (B, N, D), mask: (B, N) bool (True = candidate) or None -> (B, k) int64 ascending.
    Cosine distance d = 1 - S (module docstring). First pick: the candidate whose nearest
    other candidate is farthest; then repeatedly the unselected candidate farthest from the
    selected set (max of its min distance). First maximum on ties.
    """
    check_maxmin_select(x, k, mask)
    return torch.ops.tokenkern.maxmin_select(x, k, mask)


def dpp_select(x: Tensor, relevance: Tensor, k: int, mask: Tensor | None = None) -> Tensor:
    """CDPruner's DPP selection: fast greedy MAP (Chen et al. 2018) of ``L = diag(r) S diag(r)``.

    x: (B, N, D) features (S their cosine similarity), relevance r: (B, N) (normalized by the
    caller), mask: (B, N) bool or None -> (B, k) int64 ascending. Per step: the candidate with
    the largest residual d2 (first maximum); when that is <= 0 or not finite (the kernel's
    numerical rank is exhausted), the lowest-index unselected candidate, with a zero update.
    """
    check_dpp_select(x, relevance, k, mask)
    return torch.ops.tokenkern.dpp_select(x, relevance, k, mask)


def pivot_select(x: Tensor, pivots: Tensor, candidates: Tensor, per_pivot: int) -> Tensor:
    """DART's duplication-aware selection: per pivot, the per_pivot least similar candidates.

    x: (B, L, D), pivots: (B, P) int64 positions in pivot order, candidates: (B, L) bool ->
    (B, P * per_pivot) int64 ascending. For each pivot p in order: the per_pivot remaining
    candidates with the lowest cosine similarity to x[p] (ties to the lower index) are
    selected and leave the candidates. The pivots are not added (the caller keeps them).
    """
    check_pivot_select(x, pivots, candidates, per_pivot)
    return torch.ops.tokenkern.pivot_select(x, pivots, candidates, per_pivot)


def mmr_select(x: Tensor, importance: Tensor, k: int, lam: float = 0.5, mask: Tensor | None = None) -> Tensor:
    """Maximal marginal relevance: importance traded against similarity to the selected set.

    x: (B, N, D), importance: (B, N), mask: (B, N) bool or None -> (B, k) int64 ascending.
    imp = importance min-max normalized per sample over the candidates (0 when constant);
    first pick: the largest importance; then the first maximum of
    ``lam * imp_j - (1 - lam) * max_{s selected} S_sj``.
    """
    check_mmr_select(x, importance, k, lam, mask)
    return torch.ops.tokenkern.mmr_select(x, importance, k, float(lam), mask)


# ------------------------------------------------------------------------ CPU similarities


def _cosine_blocks(x: Tensor):
    """Yields (start, S) over blocks of samples: S (b, N, N) float32, exactly symmetric, by the
    C++ kernel (the upper triangle's row panels, one single-threaded GEMM each, mirrored), at
    most _CPU_SIM_FLOATS floats per block."""
    n = x.shape[1]
    step = max(1, _CPU_SIM_FLOATS // (n * n))
    for start in range(0, x.shape[0], step):
        yield start, torch.ops.tokenkern._cosine_sim_kernel(x[start : start + step])


def _blocked(x: Tensor, k: int, kernel) -> Tensor:
    """kernel(start, sim) -> (b, k) indices of the block's samples; concatenated over blocks."""
    parts = [kernel(start, sim) for start, sim in _cosine_blocks(x)]
    return torch.cat(parts, dim=0) if parts else x.new_empty(0, k, dtype=torch.int64)


def _rows(t: Tensor | None, start: int, count: int) -> Tensor | None:
    return None if t is None else t[start : start + count]


def _pivot_cosine(x: Tensor, pivots: Tensor) -> Tensor:
    """x: (B, L, D), pivots: (B, P) in [0, L) -> (B, P, L) float32 cosine_similarity(x[p], x[j])."""
    xf = x.float()
    norm = torch.linalg.vector_norm(xf, dim=-1).clamp_min(1e-8)  # (B, L)
    rows = xf.gather(1, pivots[..., None].expand(-1, -1, xf.shape[2]))  # (B, P, D)
    dots = torch.bmm(rows, xf.mT)  # (B, P, L)
    return dots / (norm.gather(1, pivots)[..., None] * norm[:, None, :])


# ------------------------------------------------------------------------- maxmin_select


_MAXMIN = "(Tensor x, int k, Tensor? mask=None) -> Tensor"


@custom_op("tokenkern::maxmin_select", mutates_args=(), device_types="cpu", schema=_MAXMIN)
def maxmin_select_cpu(x: Tensor, k: int, mask: Tensor | None = None) -> Tensor:
    """The CPU kernel: x (B, N, D), mask (B, N) bool or None -> (B, k) int64."""
    check_maxmin_select(x, k, mask)
    _check_counts("maxmin_select", "mask", mask, k, "per sample (k)")
    return _blocked(
        x, k, lambda s, sim: torch.ops.tokenkern._maxmin_select_kernel(sim, _rows(mask, s, sim.shape[0]), k)
    )


@maxmin_select_cpu.register_fake
def _maxmin_select_fake(x: Tensor, k: int, mask: Tensor | None = None) -> Tensor:
    check_maxmin_select(x, k, mask)
    return x.new_empty(x.shape[0], k, dtype=torch.int64)


@maxmin_select_cpu.register_kernel("cuda")
def maxmin_select_triton(x: Tensor, k: int, mask: Tensor | None = None) -> Tensor:
    """The CUDA kernel: x (B, N, D), mask (B, N) bool or None -> (B, k) int64."""
    check_maxmin_select(x, k, mask)
    return _triton_launcher("maxmin_select")(x, k, mask)


# ---------------------------------------------------------------------------- dpp_select


_DPP = "(Tensor x, Tensor relevance, int k, Tensor? mask=None) -> Tensor"


@custom_op("tokenkern::dpp_select", mutates_args=(), device_types="cpu", schema=_DPP)
def dpp_select_cpu(x: Tensor, relevance: Tensor, k: int, mask: Tensor | None = None) -> Tensor:
    """The CPU kernel: x (B, N, D), relevance (B, N), mask (B, N) bool or None -> (B, k) int64."""
    check_dpp_select(x, relevance, k, mask)
    _check_counts("dpp_select", "mask", mask, k, "per sample (k)")
    r = relevance.float()
    return _blocked(
        x,
        k,
        lambda s, sim: torch.ops.tokenkern._dpp_select_kernel(
            sim, r[s : s + sim.shape[0]], _rows(mask, s, sim.shape[0]), k
        ),
    )


@dpp_select_cpu.register_fake
def _dpp_select_fake(x: Tensor, relevance: Tensor, k: int, mask: Tensor | None = None) -> Tensor:
    check_dpp_select(x, relevance, k, mask)
    return x.new_empty(x.shape[0], k, dtype=torch.int64)


@dpp_select_cpu.register_kernel("cuda")
def dpp_select_triton(x: Tensor, relevance: Tensor, k: int, mask: Tensor | None = None) -> Tensor:
    """The CUDA kernel: x (B, N, D), relevance (B, N), mask (B, N) bool or None -> (B, k) int64."""
    check_dpp_select(x, relevance, k, mask)
    return _triton_launcher("dpp_select")(x, relevance, k, mask)


# ---------------------------------------------------------------------------- mmr_select


_MMR = "(Tensor x, Tensor importance, int k, float lam=0.5, Tensor? mask=None) -> Tensor"


@custom_op("tokenkern::mmr_select", mutates_args=(), device_types="cpu", schema=_MMR)
def mmr_select_cpu(x: Tensor, importance: Tensor, k: int, lam: float = 0.5, mask: Tensor | None = None) -> Tensor:
    """The CPU kernel: x (B, N, D), importance (B, N), mask (B, N) bool or None -> (B, k) int64."""
    check_mmr_select(x, importance, k, lam, mask)
    _check_counts("mmr_select", "mask", mask, k, "per sample (k)")
    imp = importance.float()
    return _blocked(
        x,
        k,
        lambda s, sim: torch.ops.tokenkern._mmr_select_kernel(
            sim, imp[s : s + sim.shape[0]], _rows(mask, s, sim.shape[0]), k, lam
        ),
    )


@mmr_select_cpu.register_fake
def _mmr_select_fake(x: Tensor, importance: Tensor, k: int, lam: float = 0.5, mask: Tensor | None = None) -> Tensor:
    check_mmr_select(x, importance, k, lam, mask)
    return x.new_empty(x.shape[0], k, dtype=torch.int64)


@mmr_select_cpu.register_kernel("cuda")
def mmr_select_triton(x: Tensor, importance: Tensor, k: int, lam: float = 0.5, mask: Tensor | None = None) -> Tensor:
    """The CUDA kernel: x (B, N, D), importance (B, N), mask (B, N) bool or None -> (B, k) int64."""
    check_mmr_select(x, importance, k, lam, mask)
    return _triton_launcher("mmr_select")(x, importance, k, lam, mask)


# -------------------------------------------------------------------------- pivot_select


_PIVOT = "(Tensor x, Tensor pivots, Tensor candidates, int per_pivot) -> Tensor"


@custom_op("tokenkern::pivot_select", mutates_args=(), device_types="cpu", schema=_PIVOT)
def pivot_select_cpu(x: Tensor, pivots: Tensor, candidates: Tensor, per_pivot: int) -> Tensor:
    """The CPU kernel: x (B, L, D), pivots (B, P), candidates (B, L) -> (B, P * per_pivot) int64."""
    check_pivot_select(x, pivots, candidates, per_pivot)
    _check_pivot_range(pivots, x.shape[1])
    need = pivots.shape[1] * per_pivot
    _check_counts("pivot_select", "candidates", candidates, need, "per sample (P * per_pivot)")
    return torch.ops.tokenkern._pivot_select_kernel(_pivot_cosine(x, pivots), candidates, per_pivot)


@pivot_select_cpu.register_fake
def _pivot_select_fake(x: Tensor, pivots: Tensor, candidates: Tensor, per_pivot: int) -> Tensor:
    check_pivot_select(x, pivots, candidates, per_pivot)
    return x.new_empty(x.shape[0], pivots.shape[1] * per_pivot, dtype=torch.int64)


@pivot_select_cpu.register_kernel("cuda")
def pivot_select_triton(x: Tensor, pivots: Tensor, candidates: Tensor, per_pivot: int) -> Tensor:
    """The CUDA kernel: x (B, L, D), pivots (B, P), candidates (B, L) -> (B, P * per_pivot) int64."""
    check_pivot_select(x, pivots, candidates, per_pivot)
    return _triton_launcher("pivot_select")(x, pivots, candidates, per_pivot)


# ------------------------------------------------------------------------------ plumbing


def _triton_launcher(op: str):
    """tokenkern._triton.diversity.<op>_triton, imported on first use (Triton is optional)."""
    try:
        from .._triton import diversity
    except ModuleNotFoundError as err:
        if err.name != "tokenkern._triton.diversity":
            raise
        diversity = None
    launch = getattr(diversity, f"{op}_triton", None)
    if launch is None:
        raise NotImplementedError(f"tokenkern.{op}: no CUDA kernel is available yet")
    return launch


# The private C++ kernels' fakes: x -> (B, N, N) float32 similarities; (B, N, N) or (B, P, L)
# float32 similarities -> indices.
@register_fake("tokenkern::_cosine_sim_kernel")
def _cosine_sim_kernel_fake(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], x.shape[1], x.shape[1], dtype=torch.float32)


@register_fake("tokenkern::_maxmin_select_kernel")
def _maxmin_kernel_fake(sim: Tensor, mask: Tensor | None, k: int) -> Tensor:
    return sim.new_empty(sim.shape[0], k, dtype=torch.int64)


@register_fake("tokenkern::_dpp_select_kernel")
def _dpp_kernel_fake(sim: Tensor, relevance: Tensor, mask: Tensor | None, k: int) -> Tensor:
    return sim.new_empty(sim.shape[0], k, dtype=torch.int64)


@register_fake("tokenkern::_mmr_select_kernel")
def _mmr_kernel_fake(sim: Tensor, importance: Tensor, mask: Tensor | None, k: int, lam: float) -> Tensor:
    return sim.new_empty(sim.shape[0], k, dtype=torch.int64)


@register_fake("tokenkern::_pivot_select_kernel")
def _pivot_kernel_fake(sim: Tensor, candidates: Tensor, per_pivot: int) -> Tensor:
    return sim.new_empty(sim.shape[0], sim.shape[1] * per_pivot, dtype=torch.int64)


register_refusal("maxmin_select", ("x", "k", "mask"))
register_refusal("dpp_select", ("x", "relevance", "k", "mask"))
register_refusal("mmr_select", ("x", "importance", "k", "lam", "mask"))
register_refusal("pivot_select", ("x", "pivots", "candidates", "per_pivot"))
