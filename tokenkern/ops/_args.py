"""Argument checks shared by every face of an op (fake, CPU and CUDA kernels), so that a
bad call fails the same way, with a message naming the argument, wherever it runs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..reference import GUMBEL_MIN_TAU

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type: a TypeError, and a ValueError like every other bad
    argument (so that ``except ValueError`` keeps catching all of them)."""


def fail(op: str, message: str) -> None:
    raise ValueError(f"tokenkern.{op}: {message}")


def fail_type(op: str, message: str) -> None:
    raise ArgumentTypeError(f"tokenkern.{op}: {message}")


def tensor(op: str, name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        fail_type(op, f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value  # type: ignore[return-value]


def ndim(op: str, name: str, t: torch.Tensor, dims: int, layout: str) -> None:
    if t.dim() != dims:
        fail(op, f"{name} must be {layout}, got shape {tuple(t.shape)}")


def dtype(op: str, name: str, t: torch.Tensor, allowed: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    if t.dtype not in allowed:
        names = " or ".join(dtype_name(d) for d in allowed)
        fail(op, f"{name} must have dtype {names}, got {dtype_name(t.dtype)}")


def dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def same_device(op: str, named: Sequence[tuple[str, torch.Tensor | None]]) -> None:
    present = [(n, t) for n, t in named if t is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            fail(op, f"{name} is on {t.device} but {first_name} is on {first.device}")


INT64_MAX = 2**63 - 1
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)  # the smallest normal float32


def _type_error(op: str, name: str, expected: str, value: object, convert: str) -> None:
    if isinstance(value, torch.Tensor):
        got = f"a Tensor of shape {tuple(value.shape)} (pass a Python value, e.g. {name}={convert}(t))"
    else:
        got = f"{type(value).__name__} {value!r}"
    fail_type(op, f"{name} must be {expected}, got {got}")


def integer(op: str, name: str, value: object) -> None:
    """A Python int (or a SymInt under torch.compile): not a bool, a float or a tensor, 0-d
    ones included (the ops' schemas take int64; a tensor would need a host sync). TypeError
    otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | torch.SymInt):
        _type_error(op, name, "a Python int", value, "int")


def int_range(op: str, name: str, value: int, lo: int, hi: int | None = None, what: str = "") -> None:
    """A Python int (see integer) in [lo, hi]; hi=None: any value up to 2**63 - 1 (int64)."""
    integer(op, name, value)
    if value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        fail(op, f"{name} must be {bound}{what}, got {value}")
    if hi is None and value > INT64_MAX:
        fail(op, f"{name} must be in [{lo}, 2**63 - 1] (an int64){what}, got {value}")


def at_most(op: str, name: str, value: int, hi: int, why: str) -> None:
    """value <= hi, a documented maximum (why: what it bounds)."""
    if value > hi:
        fail(op, f"{name} must be <= {hi} ({why}), got {value}")


def number(op: str, name: str, value: object) -> float:
    """A finite Python int or float (not a bool or a tensor) representable in float32:
    |value| <= 3.4028235e38. Returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float | torch.SymFloat | torch.SymInt):
        _type_error(op, name, "a finite Python number", value, "float")
    if isinstance(value, torch.SymFloat | torch.SymInt):
        return value  # type: ignore[return-value]
    if not abs(value) <= FLOAT32_MAX:  # also NaN, Inf and ints too large for a float
        fail(op, f"{name} must be a finite number with |{name}| <= {FLOAT32_MAX:.8g} (float32), got {value!r}")
    return float(value)


def flag(op: str, name: str, value: object) -> None:
    """A Python bool (not an int or a tensor)."""
    if not isinstance(value, bool | torch.SymBool):
        _type_error(op, name, "a bool", value, "bool")


def tokens(op: str, name: str, x: object) -> torch.Tensor:
    """A (B, N, D) float32/float16/bfloat16 token matrix with N, D >= 1."""
    x = tensor(op, name, x)
    ndim(op, name, x, 3, "(B, N, D)")
    dtype(op, name, x)
    if x.shape[1] < 1 or x.shape[2] < 1:
        fail(op, f"{name} must have N >= 1 tokens and D >= 1 features, got shape {tuple(x.shape)}")
    return x


# Randomized SVD (leverage scores): documented maxima of the counts. rank and oversample are
# clamped to min(N, D) anyway; the bounds only refuse nonsense early. power_iters is a loop count.
SVD_MAX_RANK = 65536
SVD_MAX_OVERSAMPLE = 65536
SVD_MAX_POWER_ITERS = 32
# The CUDA (Triton) path pads the sketch width l to a power of two L (>= 16); its Jacobi
# eigen-solver holds L x L float32 matrices on chip, and at L = 512 it needs more shared memory
# than an H100/H200 block has (227 KiB). So l = min(rank + oversample, N, D) <= 256 on CUDA.
LEVERAGE_MAX_SKETCH = 256


def svd_sketch(
    op: str, n: int, d: int, rank: int, oversample: int, power_iters: int, seed: int, cuda: bool = False
) -> tuple[int, int]:
    """Checks the randomized-SVD arguments; returns (r, l): the rank kept and the sketch width.
    1 <= rank <= 65536, 0 <= oversample <= 65536, 0 <= power_iters <= 32, 0 <= seed < 2**63;
    with cuda=True also l = min(rank + oversample, N, D) <= 256 (the CUDA kernel's sketch)."""
    int_range(op, "rank", rank, 1)
    at_most(op, "rank", rank, SVD_MAX_RANK, "the documented maximum; the rank is clamped to min(N, D)")
    int_range(op, "oversample", oversample, 0)
    at_most(op, "oversample", oversample, SVD_MAX_OVERSAMPLE, "the documented maximum")
    int_range(op, "power_iters", power_iters, 0)
    at_most(op, "power_iters", power_iters, SVD_MAX_POWER_ITERS, "the documented maximum")
    int_range(op, "seed", seed, 0, INT64_MAX)
    r = min(rank, n, d)
    l = min(r + oversample, n, d)
    if cuda and l > LEVERAGE_MAX_SKETCH:
        if oversample < LEVERAGE_MAX_SKETCH:
            fix = f"use rank <= {LEVERAGE_MAX_SKETCH - oversample} with oversample={oversample}"
        else:
            fix = f"use oversample < {LEVERAGE_MAX_SKETCH} and rank <= {LEVERAGE_MAX_SKETCH} - oversample"
        fail(
            op,
            f"rank + oversample must be <= {LEVERAGE_MAX_SKETCH} on CUDA when min(N, D) > {LEVERAGE_MAX_SKETCH} "
            f"(the Jacobi solver's sketch; width 512 needs more shared memory than a block has), got rank={rank}, "
            f"oversample={oversample} with min(N, D)={min(n, d)}; {fix}, or a CPU tensor",
        )
    return r, l


def topk_gather(scores: object, x: object, k: int) -> None:
    op = "topk_gather"
    scores = tensor(op, "scores", scores)
    x = tensor(op, "x", x)
    ndim(op, "scores", scores, 2, "(B, N)")
    ndim(op, "x", x, 3, "(B, N, D)")
    dtype(op, "scores", scores, (torch.float32,))
    if not x.dtype.is_floating_point:
        fail(op, f"x must be a floating tensor, got {dtype_name(x.dtype)}")
    same_device(op, [("scores", scores), ("x", x)])
    if tuple(scores.shape) != tuple(x.shape[:2]):
        fail(op, f"scores (B, N) must match x's first two dimensions, got {tuple(scores.shape)} and {tuple(x.shape)}")
    int_range(op, "k", k, 1, x.shape[1], " (1 <= k <= N)")


REDUCTIONS = ("mean", "sum")


def attention(
    op: str,
    q: object,
    k: object,
    lse: object,
    scale: float | None,
    key_start: int,
    key_end: int,
    query_mask: object,
    key_mask: object,
    causal: bool,
    reduce: str,
) -> tuple[int, float]:
    """Checks the attention-score arguments; returns (key_end resolved, scale resolved)."""
    q = tensor(op, "q", q)
    k = tensor(op, "k", k)
    ndim(op, "q", q, 4, "(B, Hq, Nq, d)")
    ndim(op, "k", k, 4, "(B, Hkv, Nk, d)")
    dtype(op, "q", q)
    if k.dtype != q.dtype:
        fail(op, f"k must have q's dtype {dtype_name(q.dtype)}, got {dtype_name(k.dtype)}")
    b, hq, nq, d = q.shape
    kb, hkv, nk, kd = k.shape
    if kb != b:
        fail(op, f"k has batch size {kb} but q has {b}")
    if kd != d:
        fail(op, f"k has head dim {kd} but q has {d}")
    if not 1 <= d <= 256:
        fail(op, f"head dim d must be in [1, 256], got {d}")
    if hq < 1 or hkv < 1:
        fail(op, f"q and k must have at least one head each, got Hq={hq}, Hkv={hkv}")
    if hq % hkv != 0:
        fail(op, f"query heads Hq={hq} must be a multiple of key heads Hkv={hkv}")
    if nq < 1 or nk < 1:
        fail(op, f"q and k need at least one position each, got Nq={nq}, Nk={nk}")
    same_device(op, [("q", q), ("k", k), ("lse", lse), ("query_mask", query_mask), ("key_mask", key_mask)])
    if lse is not None:
        lse = tensor(op, "lse", lse)
        if tuple(lse.shape) != (b, hq, nq):
            fail(op, f"lse must be (B, Hq, Nq) = {(b, hq, nq)}, got {tuple(lse.shape)}")
        dtype(op, "lse", lse, (torch.float32,))
    for name, mask, n in (("query_mask", query_mask, nq), ("key_mask", key_mask, nk)):
        if mask is None:
            continue
        mask = tensor(op, name, mask)
        if tuple(mask.shape) != (b, n):
            layout = "(B, Nq)" if name == "query_mask" else "(B, Nk)"
            fail(op, f"{name} must be {layout} = {(b, n)}, got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            fail(op, f"{name} must have dtype bool, got {dtype_name(mask.dtype)}")
    int_range(op, "key_start", key_start, 0, nk - 1, f" (0 <= key_start < Nk={nk})")
    integer(op, "key_end", key_end)
    end = nk if key_end == -1 else key_end
    if not key_start < end <= nk:
        fail(op, f"key_end must be -1 or in ({key_start}, {nk}] (key_start < key_end <= Nk), got {key_end}")
    if scale is not None:
        number(op, "scale", scale)
    flag(op, "causal", causal)
    if reduce not in REDUCTIONS:
        fail(op, f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    return end, (d**-0.5 if scale is None else float(scale))


def keep_count(op: str, name: str, value: int, n: int) -> None:
    int_range(op, name, value, 1, n, f" (1 <= {name} <= {n})")


MERGE_DTYPES = FLOAT_DTYPES
# The CUDA merge kernels span one sample's similarity tiles (64 rows each) on grid axis y
# (<= 65535 blocks): N <= 65535 * 64 (csrc/cuda/merge_kernels.cuh, kMaxTokens).
MERGE_CUDA_MAX_TOKENS = 65535 * 64


def merge_cuda_tokens(op: str, x: torch.Tensor) -> None:
    if x.device.type == "cuda" and x.shape[1] > MERGE_CUDA_MAX_TOKENS:
        limit = f"x must have N <= {MERGE_CUDA_MAX_TOKENS} tokens on CUDA (the kernels' grid limit)"
        fail(op, f"{limit}, got N={x.shape[1]}")


COMBINES = ("mean", "sum", "add_mean")
ASSIGNS = ("dropped", "kept")


def _same_bn(op: str, name: str, t: object, b: int, n: int, layout: str) -> torch.Tensor:
    t = tensor(op, name, t)
    dims = len(layout.split(","))
    if t.dim() != dims or tuple(t.shape[:2]) != (b, n):
        expected = f"({b}, {n}, C)" if dims == 3 else f"({b}, {n})"
        fail(op, f"{name} must be {layout} with x's B and N = {expected}, got shape {tuple(t.shape)}")
    dtype(op, name, t, MERGE_DTYPES)
    if dims == 3 and t.shape[2] < 1:
        fail(op, f"{name} must have C >= 1 features, got shape {tuple(t.shape)}")
    return t


def merge_tokens(x, keep_idx, metric, weight, topm, temperature, combine, query_metric, assign) -> tuple[int, int]:
    """Static checks of merge_tokens (the CPU and CUDA kernels make the same ones in C++);
    returns (K, D)."""
    op = "merge_tokens"
    x = tensor(op, "x", x)
    ndim(op, "x", x, 3, "(B, N, D)")
    dtype(op, "x", x, MERGE_DTYPES)
    b, n, d = x.shape
    merge_cuda_tokens(op, x)
    keep_idx = tensor(op, "keep_idx", keep_idx)
    ndim(op, "keep_idx", keep_idx, 2, "(B, K)")
    dtype(op, "keep_idx", keep_idx, (torch.int64,))
    if keep_idx.shape[0] != b:
        fail(op, f"keep_idx has batch size {keep_idx.shape[0]} but x has {b}")
    k = keep_idx.shape[1]
    if not 1 <= k <= n:
        fail(op, f"keep_idx must keep K in [1, N={n}] tokens, got K={k}")
    m = x if metric is None else _same_bn(op, "metric", metric, b, n, "(B, N, C)")
    c = m.shape[2]
    if query_metric is not None:
        q = tensor(op, "query_metric", query_metric)
        if tuple(q.shape) != (b, n, c):
            fail(op, f"query_metric must be (B, N, C) = ({b}, {n}, {c}), got shape {tuple(q.shape)}")
        if q.dtype != m.dtype:
            fail(op, f"query_metric must have metric's dtype {dtype_name(m.dtype)}, got {dtype_name(q.dtype)}")
    if weight is not None:
        _same_bn(op, "weight", weight, b, n, "(B, N)")
    same_device(op, [("x", x), ("keep_idx", keep_idx), ("metric", metric), ("weight", weight),
                     ("query_metric", query_metric)])  # fmt: skip
    if combine not in COMBINES:
        fail(op, f"combine must be one of {COMBINES}, got {combine!r}")
    if assign not in ASSIGNS:
        fail(op, f"assign must be one of {ASSIGNS}, got {assign!r}")
    candidates = n - 1 if assign == "kept" else k
    rule = "1 <= topm <= N - 1 with assign='kept'" if assign == "kept" else "1 <= topm <= K"
    int_range(op, "topm", topm, 1, candidates, f" ({rule})")
    temperature_arg(op, temperature)
    return k, d


def temperature_arg(op: str, temperature: object) -> None:
    """0 (uniform weights) or a positive float32 normal number: in [2^-126, 3.4028235e38], so
    that the kernels' float32 temperature is never a silent 0 or inf."""
    t = number(op, "temperature", temperature)
    if isinstance(t, float) and t != 0.0 and not FLOAT32_TINY <= t <= FLOAT32_MAX:
        fail(
            op,
            f"temperature must be finite and >= 0: 0 or in [{FLOAT32_TINY:.8g}, {FLOAT32_MAX:.8g}] (float32), "
            f"got {temperature!r}",
        )


def bipartite_merge(x, metric, r, size, protect_first) -> int:
    """Static checks of bipartite_merge; returns N."""
    op = "bipartite_merge"
    x = tensor(op, "x", x)
    ndim(op, "x", x, 3, "(B, N, D)")
    dtype(op, "x", x, MERGE_DTYPES)
    b, n, _ = x.shape
    merge_cuda_tokens(op, x)
    _same_bn(op, "metric", metric, b, n, "(B, N, C)")
    if size is not None:
        _same_bn(op, "size", size, b, n, "(B, N)")
    same_device(op, [("x", x), ("metric", metric), ("size", size)])
    flag(op, "protect_first", protect_first)
    n_a, n_b = (n + 1) // 2, n // 2
    mergeable = 0 if n_b == 0 else n_a - (1 if protect_first else 0)
    protected = ", token 0 protected" if protect_first else ""
    int_range(op, "r", r, 0, mergeable, f" (the number of set-A tokens that can merge{protected})")
    return n


def merge_values(op: str, keep_idx: torch.Tensor | None, n: int, nonneg: dict) -> None:
    """Value checks (they read the tensors: a host sync on CUDA; the validate=True path of the
    merge wrappers). keep_idx strictly ascending in [0, N); the named weight tensors finite and
    non-negative. Same messages as the C++ checks (csrc/cpu/merge_cpu.cpp)."""
    if keep_idx is not None and keep_idx.numel():
        if bool(((keep_idx < 0) | (keep_idx >= n)).any()):
            fail(op, f"keep_idx values must be in [0, N={n})")
        if keep_idx.shape[1] > 1 and not bool((keep_idx[:, 1:] > keep_idx[:, :-1]).all()):
            fail(op, "keep_idx rows must be strictly ascending (sorted, no duplicates)")
    for name, t in nonneg.items():
        if t is None or not isinstance(t, torch.Tensor) or not t.numel():
            continue
        bad = ~(torch.isfinite(t) & (t >= 0))
        if bool(bad.any()):
            where = [int(i) for i in bad.nonzero()[0]]
            fail(op, f"{name} must be non-negative and finite, got {float(t[tuple(where)])} at {where}")


def merge_mass(op: str, name: str, mass: torch.Tensor) -> None:
    """After a merge op (validate path, a host sync on CUDA): every mass finite. With finite,
    non-negative weights a mass is infinite only when the weights merged into one token sum
    past float32's range; the CPU op refuses that with the same message."""
    over = torch.isinf(mass)
    if bool(over.any()):
        where = [int(i) for i in over.nonzero()[0]]
        fail(
            op,
            f"{name} must keep every output mass (the sum of the weights merged into a token) within float32 "
            f"(<= {FLOAT32_MAX:.8g}), got an overflowing mass at {where}; rescale {name}",
        )


# spectral_ipr: the CUDA kernel estimates the top-r eigenvalues with a randomized sketch whose
# width must fit its register-resident eigen-solver.
SPECTRAL_MAX_SKETCH = 128
SPECTRAL_MIN_OVERSAMPLE = 16


def spectral_sketch(m: int, r: int) -> int:
    """Sketch width of the CUDA top-r path for 1 <= r < m = min(N, D): twice the rank and at
    least r + 16, rounded up to a power of two, at most 128 and at most m (l = m is exact)."""
    want = max(2 * r, r + SPECTRAL_MIN_OVERSAMPLE)
    return min(m, 1 << (want - 1).bit_length(), SPECTRAL_MAX_SKETCH)


def spectral_ipr(x: object, rank: int, cuda: bool) -> tuple[torch.Tensor, int | None]:
    """Checks spectral_ipr's arguments; returns (x, r): r is None when every singular value
    counts (rank = -1 or rank >= min(N, D)), else the number of top eigenvalues kept. With
    cuda=True also checks that the CUDA kernel's sketch can hold rank."""
    op = "spectral_ipr"
    x = tokens(op, "x", x)
    integer(op, "rank", rank)
    if rank != -1 and rank < 1:
        fail(op, f"rank must be -1 (all singular values) or >= 1, got {rank}")
    if rank > INT64_MAX:
        fail(op, f"rank must be -1 or in [1, 2**63 - 1] (an int64), got {rank}")
    m = min(x.shape[1], x.shape[2])
    if rank == -1 or rank >= m:
        return x, None
    if cuda:
        l = spectral_sketch(m, rank)
        if l < m and l < rank + SPECTRAL_MIN_OVERSAMPLE:
            top = SPECTRAL_MAX_SKETCH - SPECTRAL_MIN_OVERSAMPLE
            fail(
                op,
                f"rank={rank} with min(N, D)={m} does not fit the CUDA kernel's sketch ({SPECTRAL_MAX_SKETCH} "
                f"columns, rank + {SPECTRAL_MIN_OVERSAMPLE} needed); use rank <= {top}, rank >= min(N, D) "
                "or -1 (all singular values), or a CPU tensor",
            )
    return x, rank


def gumbel_topk(logits: object, k: int, tau: float, seed: int) -> None:
    """Checks the gumbel_topk arguments: logits (B, N) floating with N >= 1, 1 <= k <= N,
    tau finite and >= 2^-126 (``reference.GUMBEL_MIN_TAU``: the kernels scale by 1/tau in
    float32), 0 <= seed < 2^63."""
    op = "gumbel_topk"
    logits = tensor(op, "logits", logits)
    ndim(op, "logits", logits, 2, "(B, N)")
    if not logits.dtype.is_floating_point:
        fail(op, f"logits must be a floating tensor, got {dtype_name(logits.dtype)}")
    if logits.shape[1] < 1:
        fail(op, f"logits must have N >= 1 tokens, got shape {tuple(logits.shape)}")
    int_range(op, "k", k, 1, logits.shape[1], " (1 <= k <= N)")
    if isinstance(tau, bool) or not isinstance(tau, float | int) or not (math.isfinite(tau) and tau > 0):
        fail(op, f"tau must be a finite number > 0, got {tau!r}")
    if tau < GUMBEL_MIN_TAU:
        fail(op, f"tau must be >= 2^-126 (~1.18e-38, so that 1/tau is a finite float32), got {tau!r}")
    int_range(op, "seed", seed, 0, 2**63 - 1)


def gumbel_topk_backward(grad: object, logits: object, k: int, tau: float, seed: int) -> None:
    gumbel_topk(logits, k, tau, seed)
    op = "gumbel_topk_backward"
    grad = tensor(op, "grad", grad)
    if tuple(grad.shape) != tuple(logits.shape):  # type: ignore[union-attr]
        fail(op, f"grad must have logits' shape {tuple(logits.shape)}, got {tuple(grad.shape)}")  # type: ignore[union-attr]
    if not grad.dtype.is_floating_point:
        fail(op, f"grad must be a floating tensor, got {dtype_name(grad.dtype)}")
    same_device(op, [("logits", logits), ("grad", grad)])  # type: ignore[list-item]
