"""Every Triton launch configuration the launchers choose over a sweep of user shapes, dtypes
and options, compiled for sm_90 (static, no GPU run): each must be launchable on an H100/H200.

The headline report (``triton_report``) compiles the configurations of the benchmark shapes;
users call the ops at others (SigLIP's 729 x 1152 tokens, Qwen2-VL's 3584-wide states, one
token, k = N, rank + oversample = 128, head dim 256, float32 inputs), and the launchers pick other
block sizes, warps, stages and sketch widths there. A configuration that needs more shared
memory than a block may have (227 KiB), more registers than an SM holds for its threads, or a
grid axis past CUDA's limits fails at launch, on the user's GPU. ``python -m tokenkern kernels
--sweep [--json PATH]`` (``make kernel-sweep``, which writes
``benchmarks/results/static/sweep.json``) records every op face over the sweep (launches intercepted,
nothing executed), compiles each distinct specialization once and fails on any such
configuration, and on a spill that ``SPILLS_ALLOWED`` does not list (the budget holds the
headline shapes to none; this list holds every other configuration to today's spills).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .schema import LABEL, SM90, ctas_per_sm
from .triton_report import _compile_all, _key, _no_poison, record_launches, specialization

# fp16 compiles to the same tiles, stages and MMA shapes as bf16 (same element size).
_DT = {"bf16": torch.bfloat16, "fp32": torch.float32}
GRID_X_MAX, GRID_YZ_MAX = 2**31 - 1, 65535
# (N, D): one token, tiny, LLaVA-1.5, SigLIP, LLaVA-NeXT, Qwen2-VL-wide, long and narrow
TOKEN_SHAPES = ((1, 8), (17, 40), (576, 1024), (729, 1152), (2880, 4096), (1024, 3584), (4096, 64))


# (kernel, a piece of the case label) -> the most spill bytes per thread (sm_90; static, no GPU
# run) among the spilling specializations that entry covers. A spill no entry covers, or above
# its entry, fails the sweep, and so does an entry that covers no spill any more: the list only
# shrinks. Labels are those of the first case that compiles a specialization; the first entry
# whose piece a spill's label holds is the one that covers it.
SPILLS_ALLOWED: dict[tuple[str, str], int] = {
    # sketch width 128 (rank + oversample > 64): the passes' fused orth phase (and the stand-alone
    # Jacobi) hold several 128 x 128 float32 matrices, 32 registers a thread each at 16 warps (the
    # passes run at 32 there: 5.5-13 KB at 16)
    ("_x_mm_kernel", "r=64+64"): 2924,
    ("_xt_mm_kernel", "r=64+64"): 1440,
    ("_top_subspace_kernel", "r=64+64"): 1848,
    ("_top_subspace_kernel", "r=120+8"): 1848,
    ("_ritz_ipr_kernel", "rank=112"): 8,
    # a handful of tokens (N = 1 or 17, D <= 40)
    ("_xt_mm_kernel", "N=17 D=40"): 80,
    ("_xt_mm_kernel", "N=1 D=8"): 16,
    ("_gram_ipr_kernel", "N=17 D=40 fp32"): 452,
    ("_gram_ipr_kernel", "N=1 D=8 fp32"): 452,
    # float32 x, rank 1 (L = 16): the 3xTF32 pass next to the orth phase
    ("_x_mm_kernel", "fp32 rank=1"): 36,
    ("_xt_mm_kernel", "fp32 rank=1"): 48,
    # float32 q/k at head dim 256: the 3xTF32 halves of a 16 x 256 query tile and a 32 x 256 key tile
    ("_colsum_kernel", "d=256 fp32"): 664,
    # 16-bit q/k with both masks, summed (not mean), at four warps
    ("_colsum_kernel", "bf16 lse=False"): 8,
    ("_gumbel_topk_kernel", "N=40000"): 120,
}


@dataclass(frozen=True)
class Case:
    op: str
    label: str
    run: Callable[[], object]


def _x(b: int, n: int, d: int, dtype: str) -> torch.Tensor:
    return torch.empty(b, n, d, dtype=_DT[dtype])


def _leverage_cases() -> Iterator[Case]:
    from tokenkern._triton.leverage import LEVERAGE_MAX_SKETCH
    from tokenkern._triton.spectral import sketch_fits
    from tokenkern.ops import leverage, spectral

    for dtype in _DT:
        for b in (1, 8):
            for n, d in TOKEN_SHAPES:
                k = max(1, n // 4)
                for rank, over in ((1, 0), (32, 8), (64, 64), (120, 8)):
                    if min(rank + over, n, d) > LEVERAGE_MAX_SKETCH or rank > min(n, d):
                        continue
                    for p in (0, 2):
                        yield Case("leverage_topk", f"B={b} N={n} D={d} {dtype} r={rank}+{over} p={p}",
                                   lambda b=b, n=n, d=d, dtype=dtype, rank=rank, over=over, p=p, k=k:
                                   leverage.leverage_topk_triton(_x(b, n, d, dtype), k, rank, over, p, 0))  # fmt: skip
                for rank in (-1, 1, 32, 112):
                    if rank != -1 and rank < min(n, d) and not sketch_fits(min(n, d), rank):
                        continue
                    yield Case("spectral_ipr", f"B={b} N={n} D={d} {dtype} rank={rank}",
                               lambda b=b, n=n, d=d, dtype=dtype, rank=rank:
                               spectral.spectral_ipr_triton(_x(b, n, d, dtype), rank))  # fmt: skip


def _attention_cases() -> Iterator[Case]:
    from tokenkern.ops import attention

    # (B, Hq, Hkv, Nq, Nk, head dim, key range, x width)
    shapes = ((1, 2, 1, 1, 9, 16, (0, 9), 8), (8, 32, 32, 1, 2950, 128, (5, 2885), 4096),
              (2, 28, 4, 7, 1300, 128, (14, 1214), 3584), (1, 32, 32, 2950, 2950, 128, (5, 2885), 4096),
              (8, 32, 32, 2950, 2950, 128, (5, 2885), 4096), (4, 16, 16, 577, 577, 64, (1, 577), 1024),
              (1, 12, 12, 200, 300, 80, (0, 300), 768), (1, 8, 1, 300, 300, 256, (0, 256), 2048))  # fmt: skip
    for dtype in _DT:
        for b, hq, hkv, nq, nk, hd, (ks, ke), dx in shapes:
            for lse, causal, masks, reduce in ((False, True, False, "mean"), (True, True, True, "mean"),
                                               (False, False, True, "sum"), (False, True, True, "sum")):  # fmt: skip

                def run(b=b, hq=hq, hkv=hkv, nq=nq, nk=nk, hd=hd, ks=ks, ke=ke, dx=dx, lse=lse, causal=causal,
                        masks=masks, reduce=reduce, dtype=dtype):  # fmt: skip
                    q, k = torch.empty(b, hq, nq, hd, dtype=_DT[dtype]), torch.empty(b, hkv, nk, hd, dtype=_DT[dtype])
                    kw: dict[str, Any] = {"key_start": ks, "key_end": ke, "causal": causal, "reduce": reduce}
                    if lse:
                        kw["lse"] = torch.empty(b, hq, nq, dtype=torch.float32)
                    if masks:
                        kw["query_mask"] = torch.ones(b, nq, dtype=torch.bool)
                        kw["key_mask"] = torch.ones(b, nk, dtype=torch.bool)
                    attention.attn_scores_triton(q, k, **kw)
                    return attention.attn_topk_triton(q, k, torch.empty(b, ke - ks, dx, dtype=_DT[dtype]),
                                                      max(1, (ke - ks) // 4), **kw)  # fmt: skip

                label = (f"B={b} H={hq}/{hkv} Nq={nq} Nk={nk} d={hd} {dtype} lse={lse} causal={causal} "
                         f"masks={masks} {reduce}")  # fmt: skip
                yield Case("attn_topk", label, run)


def _select_cases() -> Iterator[Case]:
    from tokenkern.ops import gumbel, select

    for dtype in _DT:
        for b, n, d in ((1, 1, 1), (3, 50, 8), (8, 2880, 4096), (1, 2880, 4096), (64, 576, 1152), (2, 40000, 64)):
            for k in sorted({1, max(1, n // 4), n}):
                yield Case("topk_gather", f"B={b} N={n} D={d} {dtype} k={k}",
                           lambda b=b, n=n, d=d, k=k, dtype=dtype: select.topk_gather_triton(
                               torch.empty(b, n, dtype=torch.float32), _x(b, n, d, dtype), k))  # fmt: skip
    for b, n in ((1, 1), (3, 50), (8, 2880), (64, 2880), (1, 40000), (4096, 64)):
        for k in sorted({1, max(1, n // 4), n}):

            def run(b=b, n=n, k=k):
                logits = torch.empty(b, n, dtype=torch.float32)
                gumbel.gumbel_topk_triton(logits, k, 0.5, 0, True)
                _, shift = gumbel.gumbel_topk_soft_triton(logits, k, 0.5, 0)
                gumbel.gumbel_topk_backward_cuda(torch.empty_like(logits), logits, k, 0.5, 0)
                return gumbel.gumbel_topk_backward_cuda(torch.empty_like(logits), logits, k, 0.5, 0, shift)

            yield Case("gumbel_topk", f"B={b} N={n} k={k}", run)


def _diversity_cases() -> Iterator[Case]:
    from tokenkern.ops import diversity

    for dtype in _DT:
        for b in (1, 8):
            for n, d in TOKEN_SHAPES:
                for k in sorted({1, max(1, n // 4), n}):

                    def run(b=b, n=n, d=d, k=k, dtype=dtype):
                        x, rel = _x(b, n, d, dtype), torch.empty(b, n, dtype=torch.float32)
                        mask = torch.ones(b, n, dtype=torch.bool)
                        diversity.maxmin_select_triton(x, k, None)
                        diversity.maxmin_select_triton(x, k, mask)
                        diversity.dpp_select_triton(x, rel, k, None)
                        diversity.mmr_select_triton(x, rel, k, 0.5, mask)
                        diversity.mmr_select_triton(x, rel, k, 0.5, None)
                        return diversity.dpp_select_triton(x, rel, k, mask)

                    yield Case("maxmin/mmr/dpp_select", f"B={b} N={n} D={d} {dtype} k={k}", run)
            for length, p, per in ((1, 1, 1), (650, 8, 16), (3000, 8, 16), (577, 32, 1)):

                def pivots(b=b, length=length, p=p, per=per, dtype=dtype):
                    x = _x(b, length, 1024, dtype)
                    piv = torch.zeros(b, p, dtype=torch.int64)
                    return diversity.pivot_select_triton(x, piv, torch.ones(b, length, dtype=torch.bool), per)

                yield Case("pivot_select", f"B={b} L={length} {dtype} P={p} per_pivot={per}", pivots)


def cases() -> list[Case]:
    return [*_leverage_cases(), *_attention_cases(), *_select_cases(), *_diversity_cases()]


@dataclass
class Result:
    """One compiled specialization: where it launches first, its worst grid, its resources."""

    kernel: str
    case: str
    num_warps: int
    grid: tuple[int, int, int]
    registers: int = 0
    spill_bytes: int = 0
    shared_bytes: int = 0

    def problems(self) -> list[str]:
        """Why this configuration would not launch on sm_90 (empty: it launches)."""
        out = []
        limit = SM90.smem_per_sm - SM90.smem_reserved_per_cta
        if self.shared_bytes > limit:
            out.append(f"needs {self.shared_bytes} bytes of shared memory, a block may have {limit}")
        if ctas_per_sm(self.num_warps * 32, self.registers, 0)[0] < 1:
            out.append(f"{self.registers} registers x {self.num_warps * 32} threads exceed an SM's {SM90.regs_per_sm}")
        if self.grid[0] > GRID_X_MAX or max(self.grid[1:]) > GRID_YZ_MAX:
            out.append(f"grid {self.grid} exceeds CUDA's ({GRID_X_MAX}, {GRID_YZ_MAX}, {GRID_YZ_MAX})")
        return out


def record(selected: list[Case]) -> tuple[dict[str, dict[str, Any]], dict[str, Result]]:
    """Record every case; returns each distinct specialization and its (first) result."""
    specs: dict[str, dict[str, Any]] = {}
    results: dict[str, Result] = {}
    with _no_poison():
        for case in selected:
            with record_launches() as launches:
                case.run()
            for launch in launches:
                if launch.backend != "triton":
                    continue
                spec = specialization(launch)
                key = _key(spec)  # what the JIT compiles separately (alignment attributes included)
                if key not in specs:
                    specs[key] = spec
                    warps = int(spec["options"].get("num_warps", 4))
                    results[key] = Result(launch.name, f"{case.op} {case.label}", warps, launch.grid)
                elif math.prod(launch.grid) > math.prod(results[key].grid):
                    results[key].grid = launch.grid
    return specs, results


def run(selected: list[Case] | None = None, workers: int | None = None) -> list[Result]:
    """Record, compile for sm_90 and return one Result per distinct specialization."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("tokenkern.kernel_report: the sweep must run with TRITON_INTERPRET unset (it compiles)")
    specs, results = record(cases() if selected is None else selected)
    compiled = _compile_all(specs, workers or max(1, min(2, os.cpu_count() or 1)))
    for key, r in results.items():
        c = compiled[key]
        r.registers, r.spill_bytes, r.shared_bytes = c["registers"], c["spill_bytes"], c["shared_bytes"]
    return list(results.values())


def spill_verdict(
    results: list[Result], allowed: dict[tuple[str, str], int] | None = None
) -> tuple[list[str], list[str]]:
    """(each spill that no entry of ``allowed`` (default SPILLS_ALLOWED) covers or that is above
    its entry; each entry that covers no spill). An entry covers a spill of its kernel whose case
    label holds its piece."""
    allowed = SPILLS_ALLOWED if allowed is None else allowed
    breaches, covered = [], set()
    for r in results:
        if not r.spill_bytes:
            continue
        key = next((k for k in allowed if k[0] == r.kernel and k[1] in r.case), None)
        covered.add(key)
        if key is None:
            breaches.append(f"{r.kernel} at {r.case}: {r.spill_bytes} bytes spilled per thread, not in SPILLS_ALLOWED")
        elif r.spill_bytes > allowed[key]:
            breaches.append(f"{r.kernel} at {r.case}: {r.spill_bytes} bytes spilled per thread, "
                            f"SPILLS_ALLOWED{key} = {allowed[key]}")  # fmt: skip
    obsolete = [f"SPILLS_ALLOWED{k} = {v} covers no spill: drop it" for k, v in allowed.items() if k not in covered]
    return breaches, obsolete


def failed(results: list[Result]) -> bool:
    """Whether the sweep fails: a configuration that cannot launch, or spills outside SPILLS_ALLOWED."""
    breaches, obsolete = spill_verdict(results)
    return any(r.problems() for r in results) or bool(breaches or obsolete)


def write_json(results: list[Result], path: str | Path) -> Path:
    """The sweep's results as JSON (static, no GPU run): one record per specialization."""
    records = [{**asdict(r), "grid": list(r.grid), "problems": r.problems()} for r in results]
    out = {"label": LABEL, "target": SM90.name, "specializations": len(records), "results": records}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    return path


def format_results(results: list[Result]) -> str:
    """Per kernel: specializations, the most shared memory, registers and spills (with the case
    that needs them); then every configuration that would not launch."""
    lines = [f"Kernel sweep for {SM90.name} ({LABEL}): {len(results)} specializations", ""]
    lines.append(f"  {'kernel':28} {'specs':>5} {'smem max':>9} {'regs max':>8} {'spill max':>9}  worst case")
    by_kernel: dict[str, list[Result]] = {}
    for r in results:
        by_kernel.setdefault(r.kernel, []).append(r)
    for name, rs in sorted(by_kernel.items()):
        smem = max(rs, key=lambda r: r.shared_bytes)
        spill = max(rs, key=lambda r: (r.spill_bytes, r.registers))
        worst = spill if spill.spill_bytes else smem
        lines.append(f"  {name[:28]:28} {len(rs):>5} {smem.shared_bytes:>9} {max(r.registers for r in rs):>8} "
                     f"{spill.spill_bytes:>9}  {worst.case}")  # fmt: skip
    bad = [(r, p) for r in results for p in r.problems()]
    lines.append("")
    for r, p in bad:
        lines.append(f"WOULD NOT LAUNCH {r.kernel} at {r.case}: {p}")
    breaches, obsolete = spill_verdict(results)
    lines += [f"SPILL {line}" for line in breaches] + obsolete
    spilled = sum(1 for r in results if r.spill_bytes)
    if not (breaches or obsolete):
        lines.append(f"{spilled} specializations spill, all within SPILLS_ALLOWED ({len(SPILLS_ALLOWED)} entries)")
    lines.append("sweep: FAILED" if bad or breaches or obsolete else "sweep: every configuration launches")
    return "\n".join(lines)
