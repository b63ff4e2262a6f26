"""Shared pieces of the CPU suites: each CPU op against the plain torch a user would write from
the same rule, both timed by pytest-benchmark in one run.

Every case is two benchmarks in one group, ``impl`` = "tokenkern" and "torch"; the group name
holds the op, shape, dtype and thread count. ``benchmarks/conftest.py`` turns each group's two
medians into ``ratio_vs_torch`` = torch median / tokenkern median (> 1: tokenkern is faster),
stored in the tokenkern entry's extra_info and in the JSON's ``cpu_ratios`` list;
``benchmarks/cpu/summary.py`` prints them as a table.

Shapes: ``make test`` runs the suites once each on small shapes (``--benchmark-disable``);
``make bench-cpu`` sets TOKENKERN_BENCH_CPU=full for the shapes the README reports.
The fixtures ``threads``, ``impl`` and ``compare`` live in ``benchmarks/conftest.py``.
Before timing, each case checks that both sides agree, so a fast wrong answer cannot pass.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

FULL = os.environ.get("TOKENKERN_BENCH_CPU") == "full"
DTYPES = (torch.float32, torch.bfloat16)


def shapes(full: Sequence[Any], smoke: Sequence[Any]) -> Sequence[Any]:
    """The full shapes under make bench-cpu, the smoke shapes otherwise."""
    return full if FULL else smoke


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
