"""Markdown table of the CPU suites' ratios: python benchmarks/cpu/summary.py RESULTS.json

RESULTS.json is pytest-benchmark's --benchmark-json output of benchmarks/cpu (make bench-cpu);
its ``cpu_ratios`` list comes from benchmarks/conftest.py."""

from __future__ import annotations

import json
import sys


def table(results: dict) -> str:
    info = results.get("machine_info", {})
    cpu = info.get("cpu", {}).get("brand_raw", "unknown CPU")
    lines = [
        f"CPU: {cpu}; torch {info.get('torch', '?')}; medians of pytest-benchmark rounds, both sides in one run.",
        "",
        "| case | threads | tokenkern (ms) | plain torch (ms) | ratio |",
        "|---|---|---|---|---|",
    ]
    for row in sorted(results.get("cpu_ratios", []), key=lambda r: (r["case"], r["threads"])):
        lines.append(
            f"| {row['case']} | {row['threads']} | {row['tokenkern_median_s'] * 1e3:.2f} | "
            f"{row['torch_median_s'] * 1e3:.2f} | {row['ratio']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        print(table(json.load(f)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
