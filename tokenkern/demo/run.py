"""`python -m tokenkern demo`: prune real DINOv2 tokens of real photos with leverage_topk."""

from __future__ import annotations

import time

import torch

import tokenkern
from tokenkern import reference

from .dinov2 import load_dinov2_saliency
from .photos import SKIMAGE_PHOTOS, photo_batch


def _median_time(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _grid(indices: torch.Tensor, side: int) -> str:
    mask = torch.zeros(side * side, dtype=torch.bool)
    mask[indices.cpu()] = True
    return "\n".join("    " + "".join("#" if m else "." for m in row) for row in mask.view(side, side).tolist())


def leverage_demo(keep: float = 0.25, device: str | None = None) -> None:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"tokenkern {tokenkern.__version__} | torch {torch.__version__} | device {device}")
    model = load_dinov2_saliency(device)
    pixels = photo_batch().to(device)
    with torch.no_grad():
        tokens = model.backbone(pixels)[:, 1:].contiguous()  # (B, 256, 384) patch tokens
    b, n, _ = tokens.shape
    k = round(keep * n)
    print(f"DINOv2 ViT-S/14 patch tokens of {b} photos: x = {tuple(tokens.shape)} {tokens.dtype}")
    print(f"leverage_topk(x, k={k}) keeps {keep:.0%} of the tokens by SVD leverage (rank 32)\n")

    kept, idx, scores = tokenkern.leverage_topk(tokens, k)
    t_ours = _median_time(lambda: tokenkern.leverage_topk(tokens, k))
    t_exact = _median_time(lambda: reference.leverage_topk(tokens, k), repeats=3)
    exact_idx = reference.leverage_topk(tokens, k)[1]
    side = int(n**0.5)
    for i, name in enumerate(SKIMAGE_PHOTOS):
        overlap = len(set(idx[i].tolist()) & set(exact_idx[i].tolist())) / k
        print(
            f"  {name}: kept {k}/{n} tokens, top-k overlap with exact SVD {overlap:.2f}, "
            f"scores sum {scores[i].sum().item():.2f} (= rank)"
        )
        print(_grid(idx[i], side))
    print(f"\nkept: {tuple(kept.shape)}  indices: {tuple(idx.shape)} ascending  scores: {tuple(scores.shape)}")
    print(
        f"time for the batch of {b}: tokenkern {t_ours * 1e3:.2f} ms | exact float64 SVD {t_exact * 1e3:.2f} ms "
        f"(median; {device})"
    )
