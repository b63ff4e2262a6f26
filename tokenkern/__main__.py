"""Command line: ``python -m tokenkern {demo,info,bench,plan}``."""

from __future__ import annotations

import argparse
import sys


def _info() -> None:
    import torch

    import tokenkern

    print(f"tokenkern {tokenkern.__version__}")
    print(f"torch {torch.__version__} (cuda {torch.version.cuda}), cuda available: {torch.cuda.is_available()}")
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("tokenkern::"))
    print("ops: " + ", ".join(names))


def _bench(extra: list[str]) -> int:
    from pathlib import Path

    import pytest

    root = Path(__file__).resolve().parent.parent / "benchmarks"
    if not root.is_dir():
        print("the benchmark suites live in the repository checkout (benchmarks/)", file=sys.stderr)
        return 2
    return pytest.main([str(root), "--benchmark-only", *extra])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="prune real DINOv2 tokens of real photos, every method, and a small LLaVA")
    demo.add_argument("--keep", type=float, default=0.25, help="fraction kept in the LoFi section (default 0.25)")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    demo.add_argument("--out", default="demo-output", help="folder for the PNG (default demo-output)")
    sub.add_parser("info", help="versions, devices and registered ops")
    bench = sub.add_parser("bench", help="run the benchmark suites (extra args go to pytest)")
    bench.add_argument("pytest_args", nargs=argparse.REMAINDER)
    from .planner import cli as planner_cli

    plan_parser = sub.add_parser(
        "plan",
        help="inference-optimal (LLM size, visual tokens) under a FLOPs budget: frontier table and plot",
        description="Cost every (model, visual token count) pair, score it with a scaling law and print "
        "the Pareto frontier and the optimum under the budget. Exit status 1 if nothing fits.",
    )
    planner_cli.add_arguments(plan_parser)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo.run import main as demo_main

        demo_main(args.keep, args.device, args.out)
        return 0
    if args.command == "info":
        _info()
        return 0
    if args.command == "plan":
        return planner_cli.run(args)
    return _bench(args.pytest_args)


if __name__ == "__main__":
    sys.exit(main())
