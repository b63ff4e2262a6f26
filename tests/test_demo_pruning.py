"""The demo's pruned DINOv2 runs: every vision-side method reduces the tokens it says it does,
keeping everything reproduces the unpruned model, and the outputs stay close to it."""

import pytest
import torch
import torch.nn.functional as F

from tokenkern.demo import vit_pruning


@pytest.fixture(scope="module")
def one_photo(photos):
    return photos[1][:1]


@pytest.fixture(scope="module")
def full(dinov2, one_photo):
    return vit_pruning.full_forward(dinov2, one_photo, repeats=1)


@pytest.mark.parametrize("method", vit_pruning.VISION_METHODS)
def test_quarter_keep(method, dinov2, one_photo, full):
    cls, sal, kept, tokens, final = vit_pruning.pruned_forward(dinov2, one_photo, method, 0.25)
    assert final.shape == (1, tokens, 384)
    assert tokens == 64
    assert cls.shape == full.cls.shape and sal.shape == full.saliency.shape
    assert torch.isfinite(cls).all() and torch.isfinite(sal).all()
    if kept is not None:
        assert kept.shape == (1, 64) and bool((kept[:, 1:] > kept[:, :-1]).all())
    # A quarter of the tokens after block 4 still gives a related embedding and saliency map.
    assert F.cosine_similarity(cls, full.cls).item() > 0.5
    assert F.cosine_similarity(sal.flatten(1), full.saliency.flatten(1)).item() > 0.7


@pytest.mark.parametrize("method", ["fastervlm", "lofi", "random", "uniform", "visionzip", "tome"])
def test_keeping_everything_is_the_unpruned_model(method, dinov2, one_photo, full):
    cls, sal, _, tokens, _ = vit_pruning.pruned_forward(dinov2, one_photo, method, 1.0)
    assert tokens == 256
    torch.testing.assert_close(cls, full.cls, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sal, full.saliency, rtol=1e-4, atol=1e-4)


def test_demo_llava_section_runs(capsys):
    from tokenkern.demo import run

    run.llava_section()
    out = capsys.readouterr().out
    assert "identical: True" in out
    assert "prefill lengths per layer [73, 73, 25, 25, 25, 25]" in out  # fastv after layer 2
