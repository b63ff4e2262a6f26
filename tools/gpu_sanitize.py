"""Small calls of every CUDA merge kernel path, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck python tools/gpu_sanitize.py --device cuda

Covers merge_tokens (dropped and kept assignment, cosine and query similarity, topm 1 and > 1,
every combine, float32 / float16 / bfloat16, K = N, awkward sizes, several 256-token tiles of
merge_prepare_kernel per sample) and bipartite_merge (odd and even N, protect_first, r = 0,
several edge_select tiles per sample, the best_match_kernel path, node keys past edge_select's
shared-memory tile), each checked
against the float64 reference so that a run that computes garbage fails too. ``--device cpu``
runs the same calls on the CPU kernels (the dry form of ``make gpu-check``).
"""

from __future__ import annotations

import argparse
import sys

import torch

import tokenkern
from tokenkern import reference

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _keep(gen: torch.Generator, b: int, n: int, k: int, device: str) -> torch.Tensor:
    return torch.rand(b, n, generator=gen).argsort(dim=-1)[:, :k].sort(dim=-1).values.to(device)


def merge_cases(device: str, dtypes: list[torch.dtype]) -> list[str]:
    """Runs the merge_tokens cases; returns the failures."""
    gen = torch.Generator().manual_seed(0)
    failures = []
    for dtype in dtypes:
        for b, n, k, d, c, topm, assign, combine, query in (
            (2, 67, 17, 40, 24, 1, "dropped", "mean", False),
            (1, 130, 33, 300, 64, 3, "dropped", "add_mean", True),
            (2, 45, 45, 8, 8, 2, "dropped", "sum", False),
            (3, 50, 7, 96, 16, 4, "kept", "mean", False),
            (2, 600, 150, 24, 16, 2, "dropped", "mean", False),  # several 256-token tiles per sample
            (1, 700, 300, 16, 8, 1, "dropped", "sum", False),  # keep slots in two tiles
            (2, 300, 80, 32, 16, 1, "kept", "mean", False),  # topm = 1 kept: self excluded in the tiles
        ):
            x = torch.randn(b, n, d, generator=gen).to(dtype)
            metric = torch.randn(b, n, c, generator=gen).to(dtype)
            q = torch.randn(b, n, c, generator=gen).to(dtype) if query else None
            w = torch.rand(b, n, generator=gen) + 0.5
            keep = _keep(gen, b, n, k, "cpu")
            temp = 0.5 if topm > 1 else 0.0
            args = dict(metric=metric, weight=w, topm=topm, temperature=temp, combine=combine, query_metric=q,
                        assign=assign)  # fmt: skip
            dev = {name: (v.to(device) if isinstance(v, torch.Tensor) else v) for name, v in args.items()}
            merged, mass = tokenkern.merge_tokens(x.to(device), keep.to(device), **dev, validate=False)
            ref = {name: (v.double() if isinstance(v, torch.Tensor) else v) for name, v in args.items()}
            ref_merged, ref_mass = reference.merge_tokens(x.double(), keep, **ref)
            err = max(_rel(merged, ref_merged), _rel(mass, ref_mass))
            if not err <= TOL[dtype]:
                failures.append(f"merge_tokens {dtype} B={b} N={n} K={k} topm={topm} {assign}: rel error {err:.2e}")
    return failures


def bipartite_cases(device: str, dtypes: list[torch.dtype]) -> list[str]:
    """Runs the bipartite_merge cases; returns the failures."""
    gen = torch.Generator().manual_seed(1)
    failures = []
    for dtype in dtypes:
        # N = 1100: three edge_select tiles per sample
        cases = [(2, 77, 40, 16, 20, False), (1, 300, 130, 64, 149, True), (2, 10, 8, 8, 0, False),
                 (2, 1100, 24, 16, 400, False)]  # fmt: skip
        if dtype == torch.float32:
            cases.append((1, 4098, 8, 8, 1000, False))  # too many similarity partials: best_match_kernel
            cases.append((1, 8200, 8, 8, 3000, True))  # 4100 A tokens: node keys past edge_select's shared memory
        for b, n, d, c, r, protect in cases:
            x = torch.randn(b, n, d, generator=gen).to(dtype)
            metric = torch.randn(b, n, c, generator=gen).to(dtype)
            size = torch.rand(b, n, generator=gen) + 0.5
            out, out_size = tokenkern.bipartite_merge(x.to(device), metric.to(device), r, size.to(device),
                                                      protect_first=protect, validate=False)  # fmt: skip
            ref, ref_size = reference.bipartite_merge(x.double(), metric.double(), r, size.double(),
                                                      protect_first=protect)  # fmt: skip
            err = max(_rel(out, ref), _rel(out_size, ref_size))
            if not err <= TOL[dtype]:
                failures.append(f"bipartite_merge {dtype} B={b} N={n} r={r}: rel error {err:.2e}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize: --device cuda needs a GPU", file=sys.stderr)
        return 2
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if args.device == "cuda" else [])
    failures = merge_cases(args.device, dtypes) + bipartite_cases(args.device, dtypes)
    if args.device == "cuda":
        torch.cuda.synchronize()
    for f in failures:
        print(f"FAIL {f}")
    print(f"gpu_sanitize: {len(failures)} failures on {args.device}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
