"""``python -m tokenkern plan``: print the frontier for a FLOPs budget, optionally plot it."""

from __future__ import annotations

import argparse
import importlib.util
import math
import re
import sys

from .planning import DEFAULT_VISUAL_TOKENS, PlanResult, plan
from .presets import PAPER_FAMILY, PRESET_NAMES
from .report import format_table, plot_png
from .scaling import DEFAULT_LAW, PowerLaw

_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}


def parse_flops(text: str) -> float:
    """``'2e12'``, ``'2T'``, ``'2.5 TFLOPs'``, ``'800G'`` -> FLOPs."""
    m = re.fullmatch(r"\s*([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)\s*([KMGTPE]?)(?:FLOPS?|F)?\s*", text, flags=re.IGNORECASE)
    try:
        value = float(m.group(1)) * _SUFFIX[m.group(2).upper()] if m else None
    except ValueError:  # e.g. "1.2.3T"
        value = None
    if value is None:
        raise argparse.ArgumentTypeError(f"not a FLOPs count: {text!r} (examples: 2e12, 2T, 800G)")
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"the budget must be > 0 and finite, got {text!r}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected ints >= 1, got {text!r}")
    return values


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {value}")
        return value

    return parse


def _models(text: str) -> list[str]:
    names = list(PRESET_NAMES) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in PRESET_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown preset(s) {unknown}; choose from {', '.join(PRESET_NAMES)} or 'all'")
    return names


def _law(text: str) -> PowerLaw:
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected four finite numbers A,ALPHA,BETA,D, got {text!r}")
    a, alpha, beta, d = values
    return PowerLaw(A=a, alpha=alpha, beta=beta, D=d)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", type=parse_flops, required=True, help="FLOPs per request: 2e12, 2T, 800G")
    p.add_argument(
        "--models",
        type=_models,
        default=list(PAPER_FAMILY),
        help=f"comma-separated presets or 'all' (default: the paper's family). Presets: {', '.join(PRESET_NAMES)}",
    )
    p.add_argument(
        "--visual-tokens",
        type=_int_list,
        default=list(DEFAULT_VISUAL_TOKENS),
        help="visual token counts to try (default: %(default)s)",
    )
    p.add_argument("--text-tokens", type=_count(0), default=50, help="prompt text tokens (default: %(default)s)")
    p.add_argument(
        "--decode-tokens", type=_count(0), default=0, help="decode steps after the prefill (default: %(default)s)"
    )
    p.add_argument(
        "--batch", type=_count(1), default=1, help="requests per batch, for the KV-cache memory (default: %(default)s)"
    )
    p.add_argument(
        "--lm-head", choices=["last", "all"], default="last", help="prefill logits positions (default: last)"
    )
    p.add_argument("--llm-only", action="store_true", help="count LLM FLOPs only (the paper's O(N(Q+V)) compute)")
    p.add_argument("--causal-skip", action="store_true", help="count only the causal half of prefill attention")
    p.add_argument(
        "--image-size",
        type=_count(1),
        default=None,
        help="crop side in pixels for every model (default: each model's own)",
    )
    p.add_argument(
        "--memory-gib", type=_positive, default=None, help="also require weights + KV cache <= this many GiB"
    )
    p.add_argument(
        "--law",
        type=_law,
        default=DEFAULT_LAW,
        metavar="A,ALPHA,BETA,D",
        help="coefficients of error = A (N/1e9)^-ALPHA V^-BETA + D (default: the paper's visual-reasoning law)",
    )
    p.add_argument("--all", action="store_true", help="print every candidate, not only the frontier")
    p.add_argument("--png", default=None, metavar="PATH", help="also write the plot to PATH")


def run(args: argparse.Namespace) -> int:
    """Print the table (and write the plot); exit status 0, 1 if nothing fits the budget, 2 if
    the arguments do not describe valid models (e.g. an image size the merge cannot tile) or
    the plot cannot be written (matplotlib missing, a path that cannot be created)."""
    if args.png and missing_module("matplotlib"):
        print("tokenkern plan: --png needs matplotlib: install tokenkern[demo]", file=sys.stderr)
        return 2
    try:
        result = _plan(args)
    except ValueError as err:
        print(f"tokenkern plan: {err}", file=sys.stderr)
        return 2
    print(format_table(result, rows="all" if args.all else "frontier"))
    if args.png:
        try:
            path = plot_png(result, args.png)
        except OSError as err:
            print(f"tokenkern plan: --png must be a writable path, got {args.png!r} ({err})", file=sys.stderr)
            return 2
        print(f"plot written to {path}")
    return 0 if result.optimum is not None else 1


def missing_module(module: str) -> bool:
    """Whether ``module`` cannot be imported (not installed, or set to None in sys.modules)."""
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def _plan(args: argparse.Namespace) -> PlanResult:
    return plan(
        args.budget,
        args.models,
        visual_tokens=args.visual_tokens,
        text_tokens=args.text_tokens,
        decode_tokens=args.decode_tokens,
        law=args.law,
        batch=args.batch,
        lm_head=args.lm_head,
        include_vision=not args.llm_only,
        causal_skip=args.causal_skip,
        image_size=args.image_size,
        memory_budget_bytes=None if args.memory_gib is None else args.memory_gib * 2**30,
    )
