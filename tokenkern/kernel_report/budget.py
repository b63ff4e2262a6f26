"""The static kernel budget (static, no GPU run) and today's allow-list of its breaches.

Budgets, per op call of the report:

- ``spills``: 0 spill bytes in every kernel (value: the most spill bytes per thread);
- ``grid_b8``: at B=8, every kernel carrying > 10% of the call's bytes (or known FLOPs)
  launches >= 132 CTAs (value: the fewest CTAs);
- ``per_sample_b1``: at B=1 N=2880, no kernel launches one CTA per sample (value: its CTAs);
- ``launches``: launches per call <= ``launch_limit`` (value: the most launches);
- ``bytes``: bytes moved <= 1.2 x passes over x x the one-pass HBM floor (value: the largest
  bytes / (passes x floor)).

A breach is keyed by (op, kernel, budget) (kernel "" for the call-level budgets; the op with
" (lse)" or " (all)" for the variants that have their own launch budget) and its value
is the worst over the headline shapes. ``ALLOWED`` lists today's breaches with their values;
``check`` fails on a breach not in the list, on one worse than listed, and on a listed entry
that no longer breaches (so the list only shrinks as kernels are fixed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .schema import SM90

BYTES_SLACK = 1.2
FILL_SHARE = 0.10


@dataclass(frozen=True)
class Breach:
    op: str
    kernel: str
    budget: str
    value: float
    limit: float
    shapes: tuple[str, ...]

    @property
    def key(self) -> tuple[str, str, str]:
        return self.op, self.kernel, self.budget


# (op, kernel, budget) -> the measured value today (static, no GPU run). Each redesigned
# kernel leaves this list; ``python -m tokenkern kernels --check`` prints it.
ALLOWED: dict[tuple[str, str, str], float] = {
    # dpp/maxmin/mmr_select: the (B, N, N) float32 Gram matrix is scratch (GEMM writes, greedy reads;
    # maxmin's first pick reads all of it, its step rows again where it exceeds the L2; mmr and dpp a row
    # per pick). dpp's greedy also re-reads the (B, N, k) float32 Cholesky rows of its unselected
    # candidates at every step, about N k^2/2 - k^3/3 floats per sample: 20 GB at B=8 N=2880 k=720, counted
    # as an upper bound where the scratch (66 MB) exceeds the L2 (docs/performance.md).
    ("dpp_select", "", "bytes"): 108.39,
    # the l x l Jacobi eigen-solver (~234 dependent rounds at L = 64) in the last pass's last program per sample
    ("leverage_topk", "_xt_mm_kernel (eigen-solver in the last programs)", "per_sample_b1"): 1,
    ("maxmin_select", "", "bytes"): 4.17,
    ("mmr_select", "", "bytes"): 2.81,
    # spectral_ipr top-r: + partial-Gram scratch of the passes (orth without a per-sample phase), B=8 N=576.
    ("spectral_ipr", "", "bytes"): 1.72,
    ("spectral_ipr", "_xt_mm_kernel (eigen-solver in the last programs)", "per_sample_b1"): 1,
}


# Kernels whose flag (a constexpr) makes the last program of each sample run a serial phase of
# its own after the launch's work: one program per sample, as a launch of its own would be.
# (The l x l Cholesky factorizations of the range finder's last programs, L steps, are not
# listed: the budget's design factors the Gram once per sample.)
PER_SAMPLE_PHASES = {"FINISH": "eigen-solver in the last programs"}


def per_sample_phase(kernel: dict[str, Any]) -> str | None:
    """The per-sample phase a kernel record runs in its last programs (PER_SAMPLE_PHASES), if any."""
    flags = (kernel.get("config") or {}).get("constexprs", {})
    return next((name for flag, name in PER_SAMPLE_PHASES.items() if flags.get(flag)), None)


def launch_limit(call: dict[str, Any]) -> int | None:
    """The most launches one call of this op may make (None: no budget)."""
    op, p = call["op"], call["params"]
    if op in ("leverage_topk", "spectral_ipr"):
        if op == "spectral_ipr" and p.get("rank", -1) == -1:
            return 2
        return int(call["passes_over_x"]) + 2
    if op == "attn_topk":
        return 2 if p.get("lse") else 3
    diversity = {"maxmin_select": 2, "dpp_select": 2, "mmr_select": 2, "pivot_select": 2}
    return {"merge_tokens": 3, "bipartite_merge": 3, "topk_gather": 1, "gumbel_topk": 1, "gumbel_topk_backward": 1,
            **diversity}.get(op)  # fmt: skip


def op_key(call: dict[str, Any]) -> str:
    """The op as the allow-list names it: variants with their own launch budget apart."""
    op, p = call["op"], call["params"]
    if p.get("lse"):
        return f"{op} (lse)"
    if op == "spectral_ipr" and p.get("rank", -1) == -1:
        return f"{op} (all)"
    return op


def _is_b8(p: dict[str, Any]) -> bool:
    return p.get("B") == 8


def _is_b1_n2880(p: dict[str, Any]) -> bool:
    return p.get("B") == 1 and p.get("N", p.get("key_end", 0) - p.get("key_start", 0)) == 2880


def heavy(call: dict[str, Any], k: dict[str, Any]) -> bool:
    """Whether kernel record k carries > 10% of the call's bytes or known FLOPs."""
    total_bytes = call["bytes_moved"]
    flops = [x["flops"] for x in call["kernels"] if x["flops"]]
    by_bytes = total_bytes > 0 and k["compulsory_bytes"] > FILL_SHARE * total_bytes
    by_flops = bool(flops) and (k["flops"] or 0) > FILL_SHARE * sum(flops)
    return by_bytes or by_flops


def call_breaches(call: dict[str, Any]) -> list[Breach]:
    """The budget breaches of one op call (a dict of schema.OpCall)."""
    op, shape, p = op_key(call), call["shape"], call["params"]
    out: list[Breach] = []
    for k in call["kernels"]:
        if k["spill_bytes"]:
            out.append(Breach(op, k["kernel"], "spills", k["spill_bytes"], 0, (shape,)))
        if k["backend"] == "torch":
            continue
        if _is_b8(p) and heavy(call, k) and k["ctas"] < SM90.sms:
            out.append(Breach(op, k["kernel"], "grid_b8", k["ctas"], SM90.sms, (shape,)))
        if _is_b1_n2880(p) and k["ctas"] <= p["B"]:
            out.append(Breach(op, k["kernel"], "per_sample_b1", k["ctas"], p["B"] + 1, (shape,)))
        phase = per_sample_phase(k)
        if _is_b1_n2880(p) and phase:
            out.append(Breach(op, f"{k['kernel']} ({phase})", "per_sample_b1", p["B"], p["B"] + 1, (shape,)))
    limit = launch_limit(call)
    if limit is not None and call["launches"] > limit:
        out.append(Breach(op, "", "launches", call["launches"], limit, (shape,)))
    floor = call["passes_over_x"] * call["hbm_floor_bytes"]
    if floor > 0 and call["bytes_moved"] > BYTES_SLACK * floor:
        out.append(Breach(op, "", "bytes", round(call["bytes_moved"] / floor, 2), BYTES_SLACK, (shape,)))
    return out


_LOWER_IS_WORSE = {"grid_b8", "per_sample_b1"}


def _worse(budget: str, a: float, b: float) -> bool:
    return a < b if budget in _LOWER_IS_WORSE else a > b


def breaches(report: dict[str, Any]) -> list[Breach]:
    """Every breach of the report, merged per (op, kernel, budget) to the worst value."""
    merged: dict[tuple[str, str, str], Breach] = {}
    for call in report["calls"]:
        for b in call_breaches(call):
            old = merged.get(b.key)
            if old is None:
                merged[b.key] = b
                continue
            worst = b if _worse(b.budget, b.value, old.value) else old
            shapes = old.shapes + tuple(s for s in b.shapes if s not in old.shapes)
            merged[b.key] = Breach(b.op, b.kernel, b.budget, worst.value, worst.limit, shapes)
    return sorted(merged.values(), key=lambda b: b.key)


@dataclass
class Verdict:
    new: list[Breach]
    worse: list[tuple[Breach, float]]
    obsolete: list[tuple[tuple[str, str, str], float]]
    allowed: list[Breach]

    @property
    def ok(self) -> bool:
        return not (self.new or self.worse or self.obsolete)


def check(report: dict[str, Any], allowed: dict[tuple[str, str, str], float] | None = None) -> Verdict:
    """Compare the report's breaches with the allow-list (default ``ALLOWED``)."""
    allowed = ALLOWED if allowed is None else allowed
    found = breaches(report)
    keys = {b.key for b in found}
    new = [b for b in found if b.key not in allowed]
    worse = [(b, allowed[b.key]) for b in found if b.key in allowed and _worse(b.budget, b.value, allowed[b.key])]
    obsolete = [(key, value) for key, value in allowed.items() if key not in keys]
    return Verdict(new, worse, obsolete, [b for b in found if b.key in allowed])


def _fmt(value: float) -> str:
    return f"{value:g}"


def format_verdict(v: Verdict, allowed: dict[tuple[str, str, str], float] | None = None) -> str:
    """The allow-list and the verdict as text (static, no GPU run)."""
    allowed = ALLOWED if allowed is None else allowed
    lines = [f"kernel budget allow-list ({len(allowed)} entries; static, no GPU run):"]
    for (op, kernel, budget), value in sorted(allowed.items()):
        lines.append(f"  {op:22} {kernel or '-':28} {budget:14} {_fmt(value)}")
    for b in v.new:
        where = "; ".join(b.shapes)
        lines.append(
            f"NEW BREACH {b.op} {b.kernel or '-'} {b.budget}: {_fmt(b.value)} (limit {_fmt(b.limit)}) at {where}"
        )
    for b, listed in v.worse:
        lines.append(f"WORSE {b.op} {b.kernel or '-'} {b.budget}: {_fmt(b.value)}, listed {_fmt(listed)}")
    for (op, kernel, budget), value in v.obsolete:
        lines.append(
            f"OBSOLETE allow-list entry {op} {kernel or '-'} {budget} ({_fmt(value)}): it no longer breaches; remove it"
        )
    if v.new or v.worse:
        lines.append("allow-list with today's values (only if these breaches are accepted for now):")
        lines.append(allow_list_source(sorted(v.new + v.allowed, key=lambda b: b.key)))
    lines.append("budget: ok" if v.ok else "budget: FAILED")
    return "\n".join(lines)


def allow_list_source(found: list[Breach]) -> str:
    """Python text of an ALLOWED dict holding exactly these breaches (to refresh the list)."""
    rows = [f"    ({b.op!r}, {b.kernel!r}, {b.budget!r}): {_fmt(b.value)}," for b in found]
    return "ALLOWED: dict[tuple[str, str, str], float] = {\n" + "\n".join(rows) + "\n}"
