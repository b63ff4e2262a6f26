"""benchmarks/cpu/summary.py: the CPU suites' ratio tables."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu" / "summary.py"
_spec = importlib.util.spec_from_file_location("cpu_summary", _PATH)
summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summary)


def _row(case: str, threads: int, ours: float, torch_s: float) -> dict:
    return {"case": case, "threads": threads, "tokenkern_median_s": ours, "torch_median_s": torch_s,
            "ratio": torch_s / ours}  # fmt: skip


def test_pivot_puts_each_dtype_and_thread_count_in_its_column():
    runs = [
        {"cpu_ratios": [_row("op B=2 float32", 1, 1.0, 2.0), _row("op B=2 bfloat16", 2, 4.0, 1.0)]},
        {"cpu_ratios": [_row("op B=2 float32", 2, 1.0, 3.0), _row("other N=5 float32", 1, 2.0, 1.0)]},
    ]
    lines = summary.pivot(runs).splitlines()
    assert lines[0] == "| case | fp32, 1 thread | fp32, 2 threads | bf16, 1 thread | bf16, 2 threads |"
    assert lines[2:] == ["| op B=2 | 2.00x | 3.00x | - | 0.25x |", "| other N=5 | 0.50x | - | - | - |"]


def test_table_lists_every_row_in_ms():
    text = summary.table([{"machine_info": {"cpu": {"brand_raw": "Some CPU"}, "torch": "2.13.0+cpu"},
                           "cpu_ratios": [_row("op B=2 float32", 1, 0.001, 0.002)]}])  # fmt: skip
    assert text.startswith("CPU: Some CPU; torch 2.13.0+cpu;")
    assert "| op B=2 float32 | 1 | 1.00 | 2.00 | 2.00x |" in text
