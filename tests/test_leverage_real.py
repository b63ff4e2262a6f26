"""leverage_topk with its defaults on real features: DINOv2 ViT-S/14 patch tokens of real
photos. The top-k overlap with the exact SVD answer is reported and must be >= 0.9."""

import pytest
import torch

from tokenkern import reference
from tokenkern.ops.leverage import leverage_scores_triton

KEEP = (0.25, 0.10)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_topk_overlap_with_exact_on_dinov2_tokens(backend, dinov2_patch_tokens, photos, report):
    tokens = dinov2_patch_tokens
    names = photos[0]
    n = tokens.shape[1]
    exact = reference.leverage_scores(tokens)
    if backend == "cpu":
        scores = torch.ops.tokenkern.leverage_scores(tokens)
    else:
        scores = leverage_scores_triton(tokens.to("cuda" if torch.cuda.is_available() else "cpu")).cpu()
    for keep in KEEP:
        k = round(keep * n)
        mine = reference.topk_gather(scores, tokens, k)[1]
        ref = reference.topk_gather(exact, tokens, k)[1]
        for i, name in enumerate(names):
            overlap = len(set(mine[i].tolist()) & set(ref[i].tolist())) / k
            report(f"leverage_topk[{backend}] DINOv2 {name}: top-{k}/{n} overlap with exact SVD = {overlap:.3f}")
            assert overlap >= 0.9, f"{name} k={k}: overlap {overlap:.3f} < 0.9"
