"""The torch port of the shipped DINOv2 saliency model equals the ONNX graph it came from."""

import numpy as np
import torch


def test_port_matches_onnx_graph(dinov2, photos):
    from onnx.reference import ReferenceEvaluator

    from tokenkern.demo.dinov2 import onnx_path

    pixels = photos[1][:1]
    with torch.no_grad():
        ours = dinov2(pixels).numpy()
    theirs = ReferenceEvaluator(str(onnx_path())).run(None, {"input_image": pixels.numpy()})[0]
    assert ours.shape == theirs.shape == (1, 1, 224, 224)
    assert np.isfinite(ours).all()
    assert np.abs(ours - theirs).max() < 1e-4


def test_photos_are_normalized_real_images(photos):
    names, batch = photos
    assert batch.shape == (len(names), 3, 224, 224)
    # Real photos, not constants: per-channel spread after ImageNet normalization.
    assert bool((batch.std(dim=(2, 3)) > 0.2).all())
