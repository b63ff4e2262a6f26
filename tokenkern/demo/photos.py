"""Real photos that ship inside installed packages, as normalized (3, 224, 224) tensors."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def load_rgb(name: str) -> np.ndarray:
    """(H, W, 3) uint8 photo: a scikit-image sample ("astronaut", ...) or "grace_hopper"
    (matplotlib's sample data)."""
    if name in SKIMAGE_PHOTOS:
        import skimage.data

        return np.array(getattr(skimage.data, name)())  # a writable copy
    if name == "grace_hopper":
        import matplotlib.cbook
        import matplotlib.image

        return np.array(matplotlib.image.imread(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    raise ValueError(f"unknown photo {name!r}; choose from {(*SKIMAGE_PHOTOS, 'grace_hopper')}")


def to_model_input(rgb: np.ndarray, size: int = 224) -> torch.Tensor:
    """Center-crop to a square, resize to size x size (antialiased bilinear), normalize."""
    img = torch.from_numpy(np.ascontiguousarray(rgb[..., :3])).permute(2, 0, 1).float() / 255.0
    h, w = img.shape[1:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    img = img[:, top : top + s, left : left + s]
    img = F.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (img.clamp(0, 1) - mean) / std


def photo_batch(names: tuple[str, ...] = SKIMAGE_PHOTOS, size: int = 224) -> torch.Tensor:
    """(len(names), 3, size, size) model inputs."""
    return torch.stack([to_model_input(load_rgb(n), size) for n in names])
