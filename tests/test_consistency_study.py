"""The consistency study script's building blocks (the full run takes minutes: see docs/metrics.md)."""

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "consistency_study.py"


def load():
    spec = importlib.util.spec_from_file_location("consistency_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_views_and_patch_logits():
    study = load()
    pixels, names = study.views()
    assert pixels.shape == (20, 3, 224, 224) and len(names) == 20 and len(set(names)) == 20
    sal = torch.rand(3, 1, 224, 224)
    logits = study.patch_logits(sal, (16, 16))
    assert logits.shape == (3, 256, 2)
    probs = logits.softmax(-1)[..., 1]
    pooled = torch.nn.functional.adaptive_avg_pool2d(sal, (16, 16)).flatten(1)
    torch.testing.assert_close(probs, pooled, rtol=1e-5, atol=1e-5)


def test_committed_results_are_complete():
    import json

    result = json.loads((SCRIPT.parent / "results" / "consistency_dinov2.json").read_text())
    study = load()
    runs = {(r["method"], r["keep"]) for r in result["rows"]}
    assert runs == {(m, k) for m in study.vit_pruning.VISION_METHODS for k in study.KEEPS}
    assert all(0.0 <= r["top1_agreement"] <= 1.0 for r in result["rows"])
