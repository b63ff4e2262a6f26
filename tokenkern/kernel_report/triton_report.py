"""The Triton side of the static kernel report (static, no GPU run).

Each public op's CUDA face (``tokenkern.ops.<family>.<op>_triton``) runs on CPU tensors at the
headline shapes while every Triton launch is intercepted: the launchers are sync-free, so the
launch sequence (kernels, grids, constexprs, num_warps, num_stages) depends on shapes only. A
launch is recorded and skipped (outputs stay uninitialized; nothing reads them). Torch ops in
the launchers that would launch a CUDA kernel (reductions, fills, copies) are recorded too.
Each distinct Triton specialization is then compiled for sm_90 with Triton's own binder (the
signature, constexprs and 16-byte divisibility attributes the JIT would derive from the same
arguments) and ptxas reports registers, spills and shared memory.

Recording must run where the kernels are JIT functions (TRITON_INTERPRET unset) for the
compile step; ``record_launches`` also works under the interpreter (the tests compare it
with an interpreted run).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .schema import LABEL, SM90, KernelLaunch, OpCall, compute_floor, ctas_per_sm, sm_fill

ARCH = 90

# Aten ops that launch nothing on CUDA: allocations and views.
# Arrival counters (ticket.py) allocated before a recording: more than any recorded call uses.
RECORDED_COUNTERS = 4096
_NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach"}


@dataclass
class Launch:
    """One recorded launch. Triton: fn (the JIT function), args/kwargs as passed; torch: the
    aten op. tensors: (data_ptr, bytes) of each distinct tensor argument (and torch outputs)."""

    name: str
    backend: str
    grid: tuple[int, int, int]
    tensors: dict[int, int]
    fn: Any = None
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def _tensor_bytes(values: list[Any]) -> dict[int, int]:
    out: dict[int, int] = {}
    for v in values:
        if isinstance(v, torch.Tensor):
            ptr = v.data_ptr()
            out[ptr] = max(out.get(ptr, 0), v.numel() * v.element_size())
    return out


def _grid3(grid: Any) -> tuple[int, int, int]:
    if callable(grid):
        raise ValueError("tokenkern.kernel_report: grid must be a tuple of ints, got a callable")
    g = [int(n) for n in grid] + [1] * (3 - len(grid))
    return g[0], g[1], g[2]


class _TorchLaunches(TorchDispatchMode):
    """Records every aten op that would launch a CUDA kernel (not views or allocations)."""

    def __init__(self, sink: list[Launch]):
        super().__init__()
        self.sink = sink
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not self.paused and not func.is_view and name not in _NO_LAUNCH:
            flat = tree_flatten((args, kwargs or {}))[0] + tree_flatten(out)[0]
            self.sink.append(Launch(f"torch.{name}", "torch", (1, 1, 1), _tensor_bytes(flat)))
        return out


@contextlib.contextmanager
def record_launches(execute: bool = False, torch_ops: bool = True) -> Iterator[list[Launch]]:
    """Within the block, Triton launches (JIT or interpreted) are recorded into the yielded
    list and skipped (``execute=False``) or run (``execute=True``); with ``torch_ops`` the
    aten ops that would launch a CUDA kernel are recorded too."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from tokenkern._triton.gaussian import isolated_sketches, restore_sketches
    from tokenkern._triton.ticket import counters

    # The arrival counters are a workspace zeroed once per process and stream, not per call:
    # allocate them before recording (the recorded calls run on CPU tensors).
    counters(RECORDED_COUNTERS, torch.device("cpu"))
    # Sketches generated within the block may never have been written (execute=False): keep
    # them out of the process's cache.
    sketches = isolated_sketches()
    launches: list[Launch] = []
    mode = _TorchLaunches(launches) if torch_ops else None
    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def patched(cls: type) -> Callable[..., Any]:
        def run(self, *args, grid, warmup, **kwargs):
            if warmup:
                return originals[cls](self, *args, grid=grid, warmup=warmup, **kwargs)
            values = list(args) + list(kwargs.values())
            launches.append(Launch(self.fn.__name__, "triton", _grid3(grid), _tensor_bytes(values), self, args, kwargs))
            if not execute:
                return None
            if mode is not None:
                mode.paused = True
            try:
                return originals[cls](self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                if mode is not None:
                    mode.paused = False

        return run

    for cls in originals:
        cls.run = patched(cls)
    try:
        with mode if mode is not None else contextlib.nullcontext():
            yield launches
    finally:
        restore_sketches(sketches)
        for cls, run in originals.items():
            cls.run = run


# ------------------------------------------------------------------------ headline calls


@dataclass
class Call:
    """One op call to record: ``run(inputs)`` calls the op's CUDA face; ``make()`` builds the
    inputs (uninitialized CPU tensors); floor/passes are functions of the inputs and outputs."""

    op: str
    shape: str
    params: dict[str, Any]
    make: Callable[[], dict[str, Any]]
    run: Callable[[dict[str, Any]], Any]
    floor: Callable[[dict[str, Any], Any], int]
    floor_formula: str
    passes: float
    passes_formula: str


def _nbytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _x(b: int, n: int, d: int, dtype: str) -> dict[str, Any]:
    return {"x": torch.empty(b, n, d, dtype=_DT[dtype])}


def _leverage_calls(b: int, n: int, d: int, dtype: str) -> list[Call]:
    from tokenkern._triton.spectral import POWER_ITERS, spectral_sketch
    from tokenkern.ops import leverage, spectral

    k, p = n // 4, 2
    label = f"B={b} N={n} D={d} {dtype}"
    sel_floor = "|x| + |kept| + |indices| + |scores| (read x once, write the outputs)"
    params = {"B": b, "N": n, "D": d, "dtype": dtype}
    lev = Call(
        "leverage_topk", f"{label} r=32 k={k}", {**params, "rank": 32, "k": k, "power_iters": p},
        lambda: _x(b, n, d, dtype),
        lambda a: leverage.leverage_topk_triton(a["x"], k, 32, 8, p, 0),
        lambda a, out: _nbytes(a["x"], *out), sel_floor,
        2 * p + 2, f"2 * power_iters + 2 = {2 * p + 2} products with x (sketch, 2 per power iteration, final X^T Q)",
    )  # fmt: skip
    ipr_floor = "|x| + |out| (read x once, write (B,) float32)"
    pi = 0 if spectral_sketch(min(n, d), 32) == min(n, d) else POWER_ITERS
    top = Call(
        "spectral_ipr", f"{label} rank=32", {"B": b, "N": n, "D": d, "dtype": dtype, "rank": 32, "power_iters": pi},
        lambda: _x(b, n, d, dtype),
        lambda a: spectral.spectral_ipr_triton(a["x"], 32),
        lambda a, out: _nbytes(a["x"], out), ipr_floor,
        2 * pi + 2, f"2 * power_iters + 2 = {2 * pi + 2} products with x (power_iters = {pi})",
    )  # fmt: skip
    full = Call(
        "spectral_ipr", f"{label} rank=all", {"B": b, "N": n, "D": d, "dtype": dtype, "rank": -1},
        lambda: _x(b, n, d, dtype),
        lambda a: spectral.spectral_ipr_triton(a["x"], -1),
        lambda a, out: _nbytes(a["x"], out), ipr_floor,
        1, "1: one Gram matrix of the smaller side",
    )  # fmt: skip
    return [lev, top, full]


def _attn_inputs(b: int, h: int, nq: int, nk: int, d: int, dx: int, ks: int, ke: int, lse: bool) -> dict[str, Any]:
    return {
        "q": torch.empty(b, h, nq, d, dtype=torch.bfloat16),
        "k": torch.empty(b, h, nk, d, dtype=torch.bfloat16),
        "x": torch.empty(b, ke - ks, dx, dtype=torch.bfloat16),
        "lse": torch.empty(b, h, nq, dtype=torch.float32) if lse else None,
    }


def _attn_calls(b: int, nq: int, lse: bool, topk: bool, dims: tuple[int, ...]) -> list[Call]:
    from tokenkern.ops import attention

    h, nk, d, dx, ks, ke = dims
    n_keep = (ke - ks) // 4
    label = f"B={b} H={h} Nq={nq} Nk={nk} d={d} bf16 causal{' lse' if lse else ''}"
    params = {"B": b, "H": h, "Nq": nq, "Nk": nk, "d": d, "dtype": "bf16", "lse": lse, "key_start": ks, "key_end": ke}
    passes = 1 if lse else 2
    passes_formula = (
        "1: q and k read once (lse given)" if lse else "2: q and k read by the lse pass and the column-sum pass"
    )

    def scores(a: dict[str, Any]) -> Any:
        kw = {"lse": a["lse"], "key_start": ks, "key_end": ke, "causal": True}
        if topk:
            return attention.attn_topk_triton(a["q"], a["k"], a["x"], n_keep, **kw)
        return attention.attn_scores_triton(a["q"], a["k"], **kw)

    if topk:
        floor = lambda a, out: _nbytes(a["q"], a["k"], a["lse"], out[0], *out)  # noqa: E731
        formula = "|q| + |k| (+ |lse|) + 2 |kept| (read the kept rows, write them) + |indices| + |scores|"
        params = {**params, "D": dx, "k": n_keep}
        label += f" D={dx} k={n_keep}"
    else:
        floor = lambda a, out: _nbytes(a["q"], a["k"], a["lse"], out)  # noqa: E731
        formula = "|q| + |k| (+ |lse|) + |scores|"
    make = lambda: _attn_inputs(b, h, nq, nk, d, dx, ks, ke, lse)  # noqa: E731
    op = "attn_topk" if topk else "attn_scores"
    return [Call(op, label, params, make, scores, floor, formula, passes, passes_formula)]


def _select_calls(b: int, n: int, d: int) -> list[Call]:
    from tokenkern.ops import select

    k = n // 4

    def make() -> dict[str, Any]:
        return {"scores": torch.empty(b, n, dtype=torch.float32), "x": torch.empty(b, n, d, dtype=torch.bfloat16)}

    return [
        Call(
            "topk_gather", f"B={b} N={n} D={d} bf16 k={k}", {"B": b, "N": n, "D": d, "dtype": "bf16", "k": k},
            make, lambda a: select.topk_gather_triton(a["scores"], a["x"], k),
            lambda a, out: _nbytes(a["scores"], out[0], *out),
            "|scores| + 2 |kept| (read the kept rows, write them) + |indices|", 1, "1: scores and the kept rows once",
        )
    ]  # fmt: skip


_GUMBEL_PASSES = "1: logits once from HBM (the programs sharing a row re-read it from L2)"
_GUMBEL_BWD_PASSES = "1: logits and grad once from HBM (the programs sharing a row re-read them from L2)"


def _gumbel_calls(b: int, n: int) -> list[Call]:
    from tokenkern.ops import gumbel

    k = n // 4
    label = f"B={b} N={n} fp32 k={k}"
    params = {"B": b, "N": n, "dtype": "fp32", "k": k, "tau": 0.5}

    def make() -> dict[str, Any]:
        return {"logits": torch.empty(b, n), "grad": torch.empty(b, n)}

    fwd = Call(
        "gumbel_topk", label, params, make, lambda a: gumbel.gumbel_topk_triton(a["logits"], k, 0.5, 0, True),
        lambda a, out: _nbytes(a["logits"], out), "|logits| + |out|", 1, _GUMBEL_PASSES,
    )  # fmt: skip
    bwd = Call(
        "gumbel_topk_backward", label, params, make,
        lambda a: gumbel.gumbel_topk_backward_cuda(a["grad"], a["logits"], k, 0.5, 0),
        lambda a, out: _nbytes(a["logits"], a["grad"], out), "|logits| + |grad| + |out|", 1, _GUMBEL_BWD_PASSES,
    )  # fmt: skip
    # the soft forward (gumbel_topk(hard=False)) stores each row's threshold; its backward reads it
    soft_params = {**params, "hard": False}

    def make_soft() -> dict[str, Any]:
        return {**make(), "shift": torch.empty(b, 2, dtype=torch.float64)}

    soft = Call(
        "gumbel_topk", f"{label} soft", soft_params, make_soft,
        lambda a: gumbel.gumbel_topk_soft_triton(a["logits"], k, 0.5, 0),
        lambda a, out: _nbytes(a["logits"], *out), "|logits| + |out| + |shift|", 1, _GUMBEL_PASSES,
    )  # fmt: skip
    soft_bwd = Call(
        "gumbel_topk_backward", f"{label} from shift", {**soft_params, "shift": True}, make_soft,
        lambda a: gumbel.gumbel_topk_backward_cuda(a["grad"], a["logits"], k, 0.5, 0, a["shift"]),
        lambda a, out: _nbytes(a["logits"], a["grad"], a["shift"], out), "|logits| + |grad| + |shift| + |out|", 1,
        _GUMBEL_BWD_PASSES,
    )  # fmt: skip
    return [fwd, bwd, soft, soft_bwd]


def _diversity_calls(b: int, n: int, k: int, d: int) -> list[Call]:
    from tokenkern.ops import diversity

    label = f"B={b} N={n} D={d} bf16 k={k}"
    # The GEMM computes each Gram entry once: the symmetric half, B N^2 D FLOPs.
    gemm, gemm_clause = compute_floor(b * n * n * d, "the symmetric Gram GEMM B*N^2*D")
    params = {"B": b, "N": n, "D": d, "dtype": "bf16", "k": k, **gemm}

    def make() -> dict[str, Any]:
        # Every token a candidate (the masked kernels, the most work): dpp's count depends on it.
        return {**_x(b, n, d, "bf16"), "r": torch.empty(b, n), "mask": torch.ones(b, n, dtype=torch.bool)}

    floor = lambda a, out: _nbytes(a["x"], out)  # noqa: E731
    formula = "|x| + |indices| (read x once, write the indices)" + gemm_clause
    passes = "1: x once (the Gram GEMM); the N x N float32 similarity is scratch"
    return [
        Call("maxmin_select", label, params, make, lambda a: diversity.maxmin_select_triton(a["x"], k, a["mask"]),
             floor, formula, 1, passes),
        Call("dpp_select", label, params, make,
             lambda a: diversity.dpp_select_triton(a["x"], a["r"], k, a["mask"]), floor, formula, 1, passes),
        Call("mmr_select", label, params, make,
             lambda a: diversity.mmr_select_triton(a["x"], a["r"], k, 0.5, a["mask"]), floor, formula, 1, passes),
    ]  # fmt: skip


def _pivot_calls(b: int, length: int, d: int, n_piv: int, per_pivot: int) -> list[Call]:
    from tokenkern.ops import diversity

    label = f"B={b} L={length} D={d} bf16 P={n_piv} per_pivot={per_pivot}"
    params = {"B": b, "L": length, "D": d, "dtype": "bf16", "P": n_piv, "per_pivot": per_pivot}

    def make() -> dict[str, Any]:
        return {
            **_x(b, length, d, "bf16"),
            "pivots": torch.zeros(b, n_piv, dtype=torch.int64),
            "candidates": torch.empty(b, length, dtype=torch.bool),
        }

    return [
        Call("pivot_select", label, params, make,
             lambda a: diversity.pivot_select_triton(a["x"], a["pivots"], a["candidates"], per_pivot),
             lambda a, out: _nbytes(a["x"], out), "|x| + |indices| (read x once, write the indices)",
             1, "1: x once (the P x L cosines)"),
    ]  # fmt: skip


LLAVA_NEXT = (32, 2950, 128, 4096, 35, 2915)  # H, Nk, d, D of x, visual key span [35, 2915)


def headline_calls(small: bool = False) -> list[Call]:
    """The headline shapes of the benchmark table (``small``: tiny shapes, for the tests)."""
    if small:
        return [*_select_calls(2, 96, 64), *_gumbel_calls(2, 96)]
    calls: list[Call] = []
    for b, n, d in ((8, 2880, 4096), (1, 2880, 4096), (8, 576, 1024)):
        calls += _leverage_calls(b, n, d, "bf16")
    for b in (1, 8):
        for nq in (1, 2950):
            for lse in (False, True):
                calls += _attn_calls(b, nq, lse, True, LLAVA_NEXT)
    calls += _attn_calls(8, 2950, False, False, LLAVA_NEXT) + _attn_calls(8, 2950, True, False, LLAVA_NEXT)
    calls += _select_calls(8, 2880, 4096) + _select_calls(1, 2880, 4096)
    calls += _gumbel_calls(64, 2880) + _gumbel_calls(8, 2880)
    for b in (8, 1):
        calls += _diversity_calls(b, 576, 144, 4096) + _diversity_calls(b, 2880, 720, 4096)
        calls += _pivot_calls(b, 650, 4096, 8, 16) + _pivot_calls(b, 3000, 4096, 8, 16)
    return calls


# --------------------------------------------------------------------------- compiling


# Pointer parameters that get a placeholder tensor (never read) when their flag is off.
_PLACEHOLDERS = {
    "qm_ptr": "HAS_QMASK", "km_ptr": "HAS_KMASK", "noise_ptr": "STORE_NOISE", "scores_ptr": "WRITE_SCORES",
    # the range finder's passes (sketch.py): right factor T, stored output, partial Grams
    "t_ptr": "HAS_T", "out_ptr": "STORE_OUT", "part_ptr": "GRAM", "gram_ptr": "GRAM", "cnt_ptr": "GRAM",
    # a pass's trailing orth phase (ORTH): its right factor Tin, partial Grams and output T
    "tin_ptr": "O_HAS_T", "opart_ptr": "ORTH", "ot_ptr": "ORTH",
}  # fmt: skip
# What a pass's trailing orth phase reads again (P, its Gram, the scales) and rewrites (P):
# counted once more, as when orth was a launch of its own.
_ORTH_PHASE_REREADS = ("out_ptr", "gram_ptr", "amax_ptr", "bmax_ptr")


def _kernel_bytes(launch: Launch) -> tuple[int, str]:
    """Compulsory bytes: each distinct tensor argument once, placeholders (a mask pointer
    whose HAS_ flag is off) left out. topk_gather reads only the kept rows of x: x counts as
    the bytes of kept. attn_topk's head groups: the (B, groups, N) partial sums count in the
    column-sum kernel (written) and in topk_gather's (read). The greedy diversity kernels count
    the part of the Gram they touch and dpp's scratch re-reads (``_greedy_bytes``)."""
    if launch.backend != "triton":
        return sum(launch.tensors.values()), ""
    named = dict(zip(launch.fn.arg_names, launch.args, strict=False)) | launch.kwargs
    used = [v for n, v in named.items() if not (n in _PLACEHOLDERS and not named.get(_PLACEHOLDERS[n], True))]
    if launch.name == "_topk_gather_kernel":
        kept = named["kept_ptr"]
        used = [v for v in used if v is not named["x_ptr"]]
        note = "x counted as its kept rows"
        if named["n_parts"] > 1:
            note += f"; scores summed from {named['n_parts']} partial rows (scratch) and written"
        return sum(_tensor_bytes(used).values()) + kept.numel() * kept.element_size(), note
    if launch.name == "_colsum_kernel" and named["n_groups"] > 1:
        note = f"out: (B, {named['n_groups']}, N) float32 partial column sums, one per head group (scratch)"
        return sum(_tensor_bytes(used).values()), note
    if named.get("ORTH"):
        again = sum(_tensor_bytes([named[n] for n in _ORTH_PHASE_REREADS if n in named]).values())
        note = "trailing orth phase: P, its Gram and the scales counted again (it rereads them and rewrites P)"
        return sum(_tensor_bytes(used).values()) + again, note
    if launch.name in _ROW_SPLIT and named["S"] > 1:
        return sum(_tensor_bytes(used).values()), _row_split_note(named["S"])
    if launch.name in ("_greedy_kernel", "_dpp_kernel"):
        return _greedy_bytes(launch.name, named, used)
    return sum(_tensor_bytes(used).values()), ""


def _greedy_bytes(name: str, named: dict[str, Any], used: list[Any]) -> tuple[int, str]:
    """The greedy diversity kernels (diversity.py) touch of the Gram G (B, N, N): its diagonal
    (a sector per token) and the row of each step's pick; maxmin's first pick reads all of G
    first, so its step rows count again where G exceeds the L2 (the scan evicted them) and are
    noted as L2 traffic where it fits. dpp_select re-reads at step i the i Cholesky entries of
    each candidate still unselected, sum_i (candidates - i - 1) i floats per sample: counted
    where the (B, N, k) scratch exceeds the L2, as an upper bound (a step touches only the
    first i entries of the live rows: the note gives the largest step's footprint), and noted
    as L2 traffic where the scratch fits. The pick's own i entries, read by each of the
    sample's programs, count once (one row, re-read through L2 by several CTAs)."""
    g, k = named["g_ptr"], int(named["k"])
    batch, n = g.shape[0], g.shape[1]
    scratch = named.get("ct_ptr")
    others = sum(_tensor_bytes([v for v in used if v is not g and v is not scratch]).values())
    rows = k if name == "_dpp_kernel" else k - 1
    row_bytes = batch * rows * n * g.element_size()
    if name == "_greedy_kernel" and not named["MMR"]:
        g_bytes = g.numel() * g.element_size()
        if g_bytes > SM90.l2_bytes:
            note = f"G read whole by the first pick, then the {rows} step rows (counted again: G exceeds the L2)"
            g_bytes += row_bytes
        else:
            note = f"G read whole by the first pick; the {rows} step rows again: L2 traffic"
    else:
        g_bytes = batch * n * SM90.sector_bytes + row_bytes
        note = f"G: its diagonal (a sector per token) and the {rows} rows of the picks"
    if scratch is None:
        return others + g_bytes, note
    scratch_bytes = scratch.numel() * scratch.element_size()
    candidates = _candidates(named, batch, n)
    rereads = scratch.element_size() * sum(_live_rereads(c, k) for c in candidates)
    if scratch_bytes > SM90.l2_bytes:
        step = max(sum(_step_footprint(c, i, scratch.element_size()) for c in candidates) for i in range(k))
        note += (f"; the Cholesky scratch re-read at every step ({rereads / 1e6:.0f} MB, counted: the scratch "
                 f"exceeds the L2; an upper bound, the largest step touches {step / 2**20:.1f} MiB of it)")  # fmt: skip
        return others + g_bytes + scratch_bytes + rereads, note
    note += f"; the Cholesky scratch re-read at every step ({rereads / 1e6:.0f} MB of L2 traffic: it fits in L2)"
    return others + g_bytes + scratch_bytes, note


def _step_footprint(candidates: int, i: int, itemsize: int = 4) -> int:
    """Bytes of the Cholesky scratch dpp's step i reads in one sample: the first i entries of
    each live row, in sectors (rows of k entries start on a sector when k * itemsize is a
    multiple of one; else this is short by at most a sector per row)."""
    return max(candidates - i - 1, 0) * math.ceil(i * itemsize / SM90.sector_bytes) * SM90.sector_bytes


def _candidates(named: dict[str, Any], batch: int, n: int) -> list[int]:
    """The candidates of each sample of a greedy launch: its mask's count, or N."""
    if not named["HAS_MASK"]:
        return [n] * batch
    return [int(c) for c in (named["c_ptr"] != 0).sum(dim=1).tolist()]


def _live_rereads(candidates: int, k: int) -> int:
    """Floats of the Cholesky scratch dpp's greedy re-reads in one sample: at step i, i entries
    of each candidate still unselected after the pick."""
    return sum(max(candidates - i - 1, 0) * i for i in range(k))


# Kernels whose flat S x B grid splits each row over S programs that all read the whole row.
_ROW_SPLIT = ("_gumbel_topk_kernel", "_gumbel_topk_backward_kernel")


def _row_split_note(programs: int) -> str:
    return (
        f"{programs} programs per row, each reads the whole row (logits, and grad in the backward) "
        f"for the row's statistics: {programs}x the row inputs as L2 traffic, HBM bytes counted once"
    )


def specialization(launch: Launch) -> dict[str, Any]:
    """What the JIT would compile this Triton launch as on sm_90: signature, constexprs and
    attributes from Triton's binder, plus the options (num_warps, num_stages, ...)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    backend = make_backend(GPUTarget("cuda", ARCH, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*launch.args, **launch.kwargs)
    opts, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, spec, options)
    keep = ("num_warps", "num_stages", "num_ctas", "maxnreg")
    return {
        "module": fn.fn.__module__,
        "name": fn.fn.__name__,
        "signature": dict(signature),
        "constexprs": {k: v for k, v in constexprs.items()},
        "attrs": {k: v for k, v in attrs.items()},
        "options": {k: getattr(opts, k) for k in keep if getattr(opts, k, None) is not None},
    }


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_TENSOR_CORE = re.compile(r"^\s*(wgmma\.mma_async|mma\.sync)", re.MULTILINE)


def _ptxas_log(ptx: str) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(ARCH).path, "-v", f"--gpu-name=sm_{ARCH}a", src, "-o", os.path.join(tmp, "k.cubin")]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stderr


def compile_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Compile one specialization for sm_90; registers, spill bytes (stores + loads, per
    thread, from ptxas -v), shared bytes and whether the PTX has mma/wgmma."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec["module"]), spec["name"])
    src = ASTSource(fn, spec["signature"], spec["constexprs"], spec["attrs"])
    knobs.nvidia.dump_ptxas_log = True
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        compiled = triton.compile(src, target=GPUTarget("cuda", ARCH, 32), options=spec["options"])
    log = captured.getvalue()
    if not _PTXAS_REGS.search(log):  # a Triton cache hit skips ptxas
        log = _ptxas_log(compiled.asm["ptx"])
    regs = int(_PTXAS_REGS.search(log).group(1))
    spills = sum(int(n) for n in _PTXAS_SPILL.search(log).groups()) if _PTXAS_SPILL.search(log) else 0
    return {
        "registers": regs,
        "spill_bytes": spills,
        "shared_bytes": int(compiled.metadata.shared),
        "tensor_cores": bool(_TENSOR_CORE.search(compiled.asm["ptx"])),
    }


def _key(spec: dict[str, Any]) -> str:
    return repr(sorted((k, repr(v)) for k, v in spec.items()))


def _compile_all(specs: dict[str, dict[str, Any]], workers: int) -> dict[str, dict[str, Any]]:
    if workers <= 1 or len(specs) <= 1:
        return {k: compile_one(s) for k, s in specs.items()}
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        results = pool.map(compile_one, specs.values())
        return dict(zip(specs, results, strict=True))


# --------------------------------------------------------------------------- records


def _kernel_record(call: Call, launch: Launch, compiled: dict[str, Any] | None, nbytes: int, note: str) -> KernelLaunch:
    ctas = math.prod(launch.grid)
    if compiled is None:  # a torch op: its grid is torch's business
        note = "torch op launched by the glue; grid not known"
        return KernelLaunch(call.op, call.shape, launch.name, "torch", list(launch.grid), ctas, 0, None, None, None,
                            None, None, None, nbytes, None, notes=note)  # fmt: skip
    threads = int(compiled["config"]["num_warps"]) * 32
    per_sm, limiter = ctas_per_sm(threads, compiled["registers"], compiled["shared_bytes"], SM90)
    return KernelLaunch(
        op=call.op, shape=call.shape, kernel=launch.name, backend="triton", grid=list(launch.grid), ctas=ctas,
        threads=threads, registers=compiled["registers"], spill_bytes=compiled["spill_bytes"],
        shared_bytes=compiled["shared_bytes"], ctas_per_sm=per_sm, limiter=limiter,
        sm_fill=round(sm_fill(ctas, per_sm, SM90), 4), compulsory_bytes=nbytes,
        tensor_cores=compiled["tensor_cores"], flops=None, config=compiled["config"], notes=note,
    )  # fmt: skip


def _config(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "constexprs": {spec["signature_names"][k[0]]: v for k, v in spec["constexprs"].items() if len(k) == 1},
        "signature": {k: v for k, v in spec["signature"].items() if v != "constexpr"},
        **spec["options"],
    }


def calls(small: bool = False, workers: int | None = None) -> list[OpCall]:
    """Record every headline call, compile its Triton specializations for sm_90 and return
    the report's records (static, no GPU run)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("tokenkern.kernel_report: the report must run with TRITON_INTERPRET unset (it compiles)")
    recorded = []
    specs: dict[str, dict[str, Any]] = {}
    with _no_poison():
        for call in headline_calls(small):
            recorded.append(_record(call, specs))
    workers = workers or max(1, min(2, os.cpu_count() or 1))
    compiled = _compile_all(specs, workers)
    for key, spec in specs.items():
        names = list(getattr(importlib.import_module(spec["module"]), spec["name"]).arg_names)
        compiled[key]["config"] = _config({**spec, "signature_names": names})
    return [_op_call(call, launches, keys, nbytes, floor, compiled) for call, launches, keys, nbytes, floor in recorded]


@contextlib.contextmanager
def _no_poison() -> Iterator[None]:
    """Outputs are not NaN-filled while recording (the fill would count as a launch)."""
    old = os.environ.get("TOKENKERN_POISON")
    os.environ["TOKENKERN_POISON"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TOKENKERN_POISON"]
        else:
            os.environ["TOKENKERN_POISON"] = old


def _record(call: Call, specs: dict[str, dict[str, Any]]) -> tuple:
    """Run one call with its launches recorded; new Triton specializations go into specs.
    The steady state is recorded: a first call (not recorded) makes what is built once per
    process and stream (the range finder's Gaussian sketch, gaussian.py)."""
    warm, inputs = call.make(), call.make()
    with record_launches() as launches:
        call.run(warm)
        del launches[:]
        out = call.run(inputs)
    keys = []
    for launch in launches:
        if launch.backend != "triton":
            keys.append(None)
            continue
        spec = specialization(launch)
        key = _key(spec)
        specs.setdefault(key, spec)
        keys.append(key)
    nbytes = [_kernel_bytes(launch) for launch in launches]
    return call, launches, keys, nbytes, call.floor(inputs, out)


def _op_call(call: Call, launches: list[Launch], keys: list, nbytes: list, floor: int, compiled: dict) -> OpCall:
    kernels = [
        _kernel_record(call, launch, compiled[key] if key else None, n, note)
        for launch, key, (n, note) in zip(launches, keys, nbytes, strict=True)
    ]
    return OpCall(
        op=call.op, shape=call.shape, params=call.params, launches=len(kernels), kernels=kernels,
        bytes_moved=sum(k.compulsory_bytes for k in kernels), hbm_floor_bytes=floor,
        floor_formula=call.floor_formula, passes_over_x=call.passes, passes_formula=call.passes_formula, label=LABEL,
    )  # fmt: skip


def toolchain() -> dict[str, str]:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    version = get_ptxas(ARCH).version
    return {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "triton_ptxas": str(version).strip().splitlines()[-1],
    }
