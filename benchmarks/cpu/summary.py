"""Markdown table of the CPU suites' ratios: python benchmarks/cpu/summary.py RESULTS.json...

Each RESULTS.json is pytest-benchmark's --benchmark-json output of a benchmarks/cpu suite
(make bench-cpu writes one per suite); its ``cpu_ratios`` list comes from benchmarks/conftest.py.
Prints the table of every row, then the same ratios one line per case (the README's table)."""

from __future__ import annotations

import json
import sys


def table(runs: list[dict]) -> str:
    """One table over every run's cpu_ratios; the machine line comes from the first run."""
    info = runs[0].get("machine_info", {}) if runs else {}
    cpu = info.get("cpu", {}).get("brand_raw", "unknown CPU")
    lines = [
        f"CPU: {cpu}; torch {info.get('torch', '?')}; medians of pytest-benchmark rounds, both sides in one run.",
        "",
        "| case | threads | tokenkern (ms) | plain torch (ms) | ratio |",
        "|---|---|---|---|---|",
    ]
    rows = [row for run in runs for row in run.get("cpu_ratios", [])]
    for row in sorted(rows, key=lambda r: (r["case"], r["threads"])):
        lines.append(
            f"| {row['case']} | {row['threads']} | {row['tokenkern_median_s'] * 1e3:.2f} | "
            f"{row['torch_median_s'] * 1e3:.2f} | {row['ratio']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


COLUMNS = (("float32", 1), ("float32", 2), ("bfloat16", 1), ("bfloat16", 2))


def pivot(runs: list[dict]) -> str:
    """The ratios one line per case (its name without the dtype), a column per dtype x threads."""
    ratios: dict[str, dict[tuple[str, int], float]] = {}
    for row in (row for run in runs for row in run.get("cpu_ratios", [])):
        case, _, dtype = row["case"].rpartition(" ")
        ratios.setdefault(case, {})[(dtype, row["threads"])] = row["ratio"]
    head = " | ".join(f"{'fp32' if d == 'float32' else 'bf16'}, {t} thread{'s' if t > 1 else ''}" for d, t in COLUMNS)
    lines = [f"| case | {head} |", "|---|" + "---|" * len(COLUMNS)]
    for case in sorted(ratios):
        cells = [f"{ratios[case][c]:.2f}x" if c in ratios[case] else "-" for c in COLUMNS]
        lines.append(f"| {case} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    runs = []
    for path in argv:
        with open(path) as f:
            runs.append(json.load(f))
    print(table(runs))
    print(pivot(runs), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
