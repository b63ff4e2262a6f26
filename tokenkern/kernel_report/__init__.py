"""Static kernel report: every kernel compiled for sm_90 at the headline shapes with the
launchers' own configurations, registers, spills, shared memory, grid fill and bytes moved
against the HBM floor, checked against a budget (``budget``). Static, no GPU run.

``python -m tokenkern kernels [--json PATH] [--check]`` and ``make kernel-report`` run it.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from .schema import LABEL, report_dict, validate

__all__ = ["LABEL", "build_report", "format_table", "write_json"]

_SIDES = ("triton_report", "cuda_report")


def _side(name: str) -> Any | None:
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"{__name__}.{name}":
            return None
        raise


def build_report(small: bool = False, sides: tuple[str, ...] = _SIDES) -> dict[str, Any]:
    """The report as a JSON-ready dict (schema.validate holds). ``small``: tiny shapes (tests).
    A side whose module is absent is left out."""
    calls, toolchain = [], {}
    for name in sides:
        module = _side(name)
        if module is None:
            continue
        calls += module.calls(small=small)
        toolchain.update(module.toolchain())
    report = report_dict(calls, toolchain)
    validate(report)
    return report


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    """Validate and write the report; returns the path."""
    validate(report)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def _opt(v: object) -> str:
    return "-" if v is None else str(v)


_ROW = ("kernel", "backend", "ctas", "threads", "registers", "spill_bytes", "shared_bytes", "ctas_per_sm", "sm_fill",
        "tensor_cores", "compulsory_bytes")  # fmt: skip


def _compute_floor(params: dict[str, Any]) -> str:
    if "compute_floor_us" not in params:
        return ""
    return f"; compute floor {params['compute_floor_flops'] / 1e9:.1f} GFLOP = {params['compute_floor_us']} us"


def format_table(report: dict[str, Any]) -> str:
    """Per op call: launches, bytes vs floor; per kernel: CTAs, threads, registers, spills,
    shared memory, CTAs/SM, SM fill, tensor cores. Identical launches of a kernel are one row
    (first launch order) with their count n."""
    lines = [f"Static kernel report for {report['target']['name']} ({LABEL})", ""]
    for call in report["calls"]:
        floor = call["passes_over_x"] * call["hbm_floor_bytes"]
        ratio = call["bytes_moved"] / floor if floor else float("nan")
        lines.append(
            f"{call['op']} {call['shape']}: {call['launches']} launches, {_mb(call['bytes_moved'])} MB moved "
            f"(compulsory) vs floor {_mb(call['hbm_floor_bytes'])} MB x {call['passes_over_x']:g} passes "
            f"= {ratio:.2f}x" + _compute_floor(call["params"])
        )
        lines.append(f"  {'kernel':28} {'n':>3} {'backend':7} {'CTAs':>7} {'thr':>4} {'regs':>4} {'spill':>5} "
                     f"{'smem':>6} {'CTA/SM':>6} {'fill':>6} {'TC':>3} {'MB':>8}")  # fmt: skip
        rows: dict[tuple, int] = {}
        for k in call["kernels"]:
            row = tuple(k[f] for f in _ROW)
            rows[row] = rows.get(row, 0) + 1
        for (name, backend, ctas, thr, regs, spill, smem, per_sm, fill, tc, nbytes), n in rows.items():
            fill_s = "-" if fill is None else f"{fill:.2f}"
            tc_s = "-" if tc is None else ("yes" if tc else "no")
            lines.append(
                f"  {name[:28]:28} {n:>3} {backend:7} {ctas if backend != 'torch' else '-':>7} {thr or '-':>4} "
                f"{_opt(regs):>4} {_opt(spill):>5} {_opt(smem):>6} {_opt(per_sm):>6} {fill_s:>6} {tc_s:>3} "
                f"{_mb(nbytes):>8}"
            )
        lines.append("")
    return "\n".join(lines)
