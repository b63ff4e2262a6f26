"""PNG figures of the demo (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _square_crop(rgb: np.ndarray, size: int = 224) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    img = torch.from_numpy(np.ascontiguousarray(rgb[top : top + s, left : left + s, :3])).permute(2, 0, 1).float()
    img = torch.nn.functional.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True)[0]
    return img.permute(1, 2, 0).clamp(0, 255).byte().numpy()


def kept_patches(photos: dict[str, np.ndarray], kept: dict[str, torch.Tensor], grid: int, path: str | Path) -> Path:
    """One row per photo, one column per method: the kept patches at full brightness over a
    dimmed image. kept[method]: (num_photos, k) patch indices on a grid x grid layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(photos)
    methods = list(kept)
    fig, axes = plt.subplots(len(names), len(methods) + 1, figsize=(2.1 * (len(methods) + 1), 2.1 * len(names)))
    axes = np.atleast_2d(axes)
    for r, name in enumerate(names):
        img = _square_crop(photos[name]).astype(np.float32) / 255.0
        axes[r, 0].imshow(img)
        axes[r, 0].set_title(name if r else f"original\n{name}", fontsize=8)
        cell = img.shape[0] // grid
        for c, method in enumerate(methods, start=1):
            mask = np.zeros(grid * grid, dtype=bool)
            mask[kept[method][r].cpu().numpy()] = True
            mask = np.kron(mask.reshape(grid, grid), np.ones((cell, cell), dtype=bool))
            shown = np.where(mask[..., None], img, 0.25 * img)
            axes[r, c].imshow(shown)
            if r == 0:
                axes[r, c].set_title(f"{method}\n{int(kept[method].shape[1])}/{grid * grid} kept", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
