"""How well randomized sketches find the top-k leverage-score tokens, against the exact SVD.

    python examples/sketch_accuracy.py [--seeds 5]   # CPU, about 10 s

Float64 torch, on the real DINOv2 ViT-S/14 patch tokens of the four demo photos (4, 256, 384)
and on a synthetic (4, 576, 1024) matrix with singular values 1/i: the top-k overlap (k = 25%
and 10% of N) of rank-32 leverage scores from

- the range finder of leverage_topk (Halko-Martinsson-Tropp, CholeskyQR replaced by QR here):
  width l = 40, power_iters 2 (the default: 2 p + 2 = 6 passes over x), 1 (4), 0 (2);
- the one-view sketch of Tropp, Yurtsever, Udell and Cevher (2017) that reads x once:
  Y = X Omega (N x l), W = Psi X (s x D), Q = qr(Y), X ~ Q (Psi Q)^+ W;
- the left singular vectors of Y = X Omega alone (one pass, no correction),

with mean and minimum over the samples and seeds. Prints a markdown table and writes it to
examples/results/sketch_accuracy.md (docs/ops/leverage.md quotes it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

RANK = 32
KEEP = (0.25, 0.10)


def exact_scores(x: torch.Tensor) -> torch.Tensor:
    u = torch.linalg.svd(x, full_matrices=False).U[..., :RANK]
    return (u * u).sum(-1)


def _scores(q: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """Leverage scores of Q U~_r, U~_r the top-r left singular vectors of small (l x D)."""
    u = q @ torch.linalg.svd(small, full_matrices=False).U[..., :RANK]
    return (u * u).sum(-1)


def range_finder(x: torch.Tensor, l: int, power_iters: int, gen: torch.Generator) -> torch.Tensor:
    omega = torch.randn(x.shape[0], x.shape[2], l, generator=gen, dtype=x.dtype)
    q = torch.linalg.qr(x @ omega).Q
    for _ in range(power_iters):
        q = torch.linalg.qr(x @ torch.linalg.qr(x.mT @ q).Q).Q
    return _scores(q, q.mT @ x)


def one_view(x: torch.Tensor, l: int, s: int, gen: torch.Generator) -> torch.Tensor:
    b, n, d = x.shape
    omega = torch.randn(b, d, l, generator=gen, dtype=x.dtype)
    psi = torch.randn(b, s, n, generator=gen, dtype=x.dtype)
    y, w = x @ omega, psi @ x  # the one pass over x
    q = torch.linalg.qr(y).Q
    return _scores(q, torch.linalg.lstsq(psi @ q, w).solution)


def range_only(x: torch.Tensor, l: int, gen: torch.Generator) -> torch.Tensor:
    omega = torch.randn(x.shape[0], x.shape[2], l, generator=gen, dtype=x.dtype)
    u = torch.linalg.svd(x @ omega, full_matrices=False).U[..., :RANK]
    return (u * u).sum(-1)


METHODS = {
    "range finder l=40, power_iters 2 (default)": (6, lambda x, g: range_finder(x, 40, 2, g)),
    "range finder l=40, power_iters 1": (4, lambda x, g: range_finder(x, 40, 1, g)),
    "range finder l=40, power_iters 0": (2, lambda x, g: range_finder(x, 40, 0, g)),
    "range of Y alone, l=64": (1, lambda x, g: range_only(x, 64, g)),
    **{
        f"one-view l={l}, s={s}": (1, lambda x, g, l=l, s=s: one_view(x, l, s, g))
        for l in (40, 64, 96)
        for s in (2 * l + 1, 4 * l)
    },
}


def overlaps(scores: torch.Tensor, ref: torch.Tensor, k: int) -> list[float]:
    mine, want = scores.topk(k, -1).indices, ref.topk(k, -1).indices
    return [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(mine, want, strict=True)]


def table(name: str, x: torch.Tensor, seeds: int) -> list[str]:
    x = x.double()
    n = x.shape[1]
    ref = exact_scores(x)
    lines = []
    for label, (passes, fn) in METHODS.items():
        got = {keep: [] for keep in KEEP}
        for seed in range(seeds):
            scores = fn(x, torch.Generator().manual_seed(seed))
            for keep in KEEP:
                got[keep] += overlaps(scores, ref, round(keep * n))
        cells = " | ".join(f"{sum(v) / len(v):.3f} / {min(v):.3f}" for v in got.values())
        lines.append(f"| {name} | {label} | {passes} | {cells} |")
    return lines


def synthetic(gen: torch.Generator) -> torch.Tensor:
    b, n, d, rank = 4, 576, 1024, 256
    u = torch.linalg.qr(torch.randn(b, n, rank, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(b, d, rank, generator=gen, dtype=torch.float64)).Q
    return (u / torch.arange(1, rank + 1, dtype=torch.float64)) @ v.mT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    from tokenkern.demo.dinov2 import load_dinov2_saliency
    from tokenkern.demo.photos import photo_batch

    with torch.no_grad():
        tokens = load_dinov2_saliency().backbone(photo_batch())[:, 1:].contiguous()
        lines = [
            "| tokens | sketch | passes over x | top-25% overlap mean / min | top-10% overlap mean / min |",
            "|---|---|---|---|---|",
            *table("DINOv2 ViT-S/14 (4, 256, 384)", tokens, args.seeds),
            *table("synthetic 1/i (4, 576, 1024)", synthetic(torch.Generator().manual_seed(123)), args.seeds),
        ]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sketch_accuracy.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
