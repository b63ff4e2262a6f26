"""The static report's markdown tables in the docs (static, no GPU run).

README.md and docs/performance.md hold blocks between ``<!-- static-table:NAME -->`` and
``<!-- /static-table -->``; ``python -m tokenkern kernels --json PATH --docs`` (``make
kernel-report``) rewrites them from the report, and a test checks the committed blocks against
the committed JSON, so the numbers in the docs are the report's. NAME picks the rows:
``headline`` (each op at its largest headline shape, HEADLINE) or ``all``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import budget
from .schema import LABEL, SM90

DOCS = ("README.md", "docs/performance.md")

# The calls of the headline table, by (op, shape) as the report labels them.
HEADLINE = (
    ("leverage_topk", "B=8 N=2880 D=4096 bf16 r=32 k=720"),
    ("leverage_topk", "B=8 N=576 D=1024 bf16 r=32 k=144"),
    ("spectral_ipr", "B=8 N=2880 D=4096 bf16 rank=32"),
    ("spectral_ipr", "B=8 N=2880 D=4096 bf16 rank=all"),
    ("attn_topk", "B=8 H=32 Nq=1 Nk=2950 d=128 bf16 causal D=4096 k=720"),
    ("attn_topk", "B=8 H=32 Nq=1 Nk=2950 d=128 bf16 causal lse D=4096 k=720"),
    ("topk_gather", "B=8 N=2880 D=4096 bf16 k=720"),
    ("gumbel_topk", "B=64 N=2880 fp32 k=720"),
    ("gumbel_topk_backward", "B=64 N=2880 fp32 k=720"),
    ("merge_tokens", "B=8 N=2880 K=720 D=4096 bf16 metric=x topm=1"),
    ("bipartite_merge", "B=2 N=2880 D=4096 C=64 bf16 r=720"),
    ("maxmin_select", "B=8 N=2880 D=4096 bf16 k=720"),
    ("mmr_select", "B=8 N=2880 D=4096 bf16 k=720"),
    ("dpp_select", "B=8 N=2880 D=4096 bf16 k=720"),
    ("pivot_select", "B=8 L=650 D=4096 bf16 P=8 per_pivot=16"),
)

_BLOCK = re.compile(r"(<!-- static-table:(?P<name>[a-z]+) -->\n)(?P<body>.*?)(<!-- /static-table -->)", re.S)


def _headline(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_key = {(c["op"], c["shape"]): c for c in calls}
    missing = [key for key in HEADLINE if key not in by_key]
    if missing:
        raise ValueError(f"tokenkern.kernel_report: the report has no call {missing[0]} of the headline table")
    return [by_key[key] for key in HEADLINE]


SELECTIONS: dict[str, Callable[[list[dict[str, Any]]], list[dict[str, Any]]]] = {
    "headline": _headline,
    "all": lambda calls: list(calls),
}


def _mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


def _fewest_ctas(call: dict[str, Any]) -> str:
    """The fewest CTAs of a kernel carrying > 10% of the call's bytes or FLOPs."""
    ctas = [k["ctas"] for k in call["kernels"] if k["backend"] != "torch" and budget.heavy(call, k)]
    return str(min(ctas)) if ctas else "-"


def _breaches(call: dict[str, Any]) -> str:
    found = budget.call_breaches(call)
    if not found:
        return "met"
    return "; ".join(f"{b.budget} {b.value:g}" + (f" ({b.kernel})" if b.kernel else "") for b in found)


def _row(call: dict[str, Any]) -> str:
    floor = call["passes_over_x"] * call["hbm_floor_bytes"]
    ratio = f"{call['bytes_moved'] / floor:.2f}x" if floor else "-"
    if any("upper bound" in k["notes"] for k in call["kernels"]):
        ratio += " (upper bound)"
    p = call["params"]
    compute = f"{p['compute_floor_us']:g} µs" if "compute_floor_us" in p else "-"
    spill = max((k["spill_bytes"] or 0 for k in call["kernels"]), default=0)
    cells = [f"`{call['op']}` {call['shape']}", str(call["launches"]), _mb(call["bytes_moved"]),
             f"{call['passes_over_x']:g} × {_mb(call['hbm_floor_bytes'])}", ratio, compute, str(spill),
             _fewest_ctas(call), _breaches(call)]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def table(report: dict[str, Any], name: str) -> str:
    """The markdown table ``name`` (a key of SELECTIONS) of the report's calls."""
    if name not in SELECTIONS:
        names = sorted(SELECTIONS)
        raise ValueError(f"tokenkern.kernel_report: static-table name must be one of {names}, got {name!r}")
    calls = SELECTIONS[name](report["calls"])
    tools = report["toolchain"]
    nvcc = re.search(r"cuda_(\d+\.\d+)", tools.get("nvcc", ""))
    toolchain = f"Triton {tools.get('triton', '-')}, nvcc {nvcc.group(1) if nvcc else '-'}"
    peak = report["target"].get("peak_flops", SM90.peak_flops)
    caption = (
        f"{report['target']['name']} ({LABEL}; {toolchain}); `python -m tokenkern kernels --docs` writes it. "
        "Bytes are the kernels' compulsory bytes; the HBM floor is one pass over x plus the outputs; the compute "
        f"floor is the op's GEMM at {peak / 1e12:g} TFLOPS dense bf16; CTAs: the fewest of a kernel "
        f"carrying > 10% of the call's bytes or FLOPs ({SM90.sms} SMs; - where none does); budget: the call's breaches "
        "of the budget."
    )
    lines = [
        caption,
        "",
        "| op call | launches | bytes | passes × HBM floor | ratio | compute floor | spill (B/thread) | CTAs "
        "| budget |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(call) for call in calls]
    return "\n".join(lines) + "\n"


def update_text(text: str, report: dict[str, Any]) -> str:
    """``text`` with every static-table block rewritten from the report."""
    return _BLOCK.sub(lambda m: m.group(1) + table(report, m.group("name")) + m.group(4), text)


def blocks(text: str) -> dict[str, str]:
    """The static-table blocks of ``text``: name -> body."""
    return {m.group("name"): m.group("body") for m in _BLOCK.finditer(text)}


def update_docs(report: dict[str, Any], root: str | Path = ".") -> list[Path]:
    """Rewrite the blocks of DOCS under ``root`` (the repository root); returns the files that
    changed."""
    missing = [rel for rel in DOCS if not (Path(root) / rel).exists()]
    if missing:
        raise FileNotFoundError(f"tokenkern.kernel_report: --docs runs in the repository root, no {missing[0]} here")
    changed = []
    for rel in DOCS:
        path = Path(root) / rel
        text = path.read_text()
        new = update_text(text, report)
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed
