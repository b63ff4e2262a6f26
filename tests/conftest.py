"""Test session setup. Must run before any tokenkern kernel module is imported."""

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Outputs of the Triton launchers start as NaN / -1, so an unwritten element fails a test.
os.environ.setdefault("TOKENKERN_POISON", "1")

import pytest
from testing import test_seed


def pytest_report_header(config):
    return f"tokenkern test seed: {test_seed()} (set TOKENKERN_TEST_SEED to replay)"


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the session seed and the test's id: fresh inputs each
    session, reproducible with TOKENKERN_TEST_SEED."""
    import zlib

    seed = (test_seed() * 1_000_003 + zlib.crc32(request.node.nodeid.encode())) % 2**63
    return torch.Generator().manual_seed(seed)


_REPORT: list[str] = []


@pytest.fixture
def report():
    """Lines a test wants shown in the session summary (measured values, not pass/fail)."""
    return _REPORT.append


def pytest_terminal_summary(terminalreporter):
    if _REPORT:
        terminalreporter.section("tokenkern reports")
        for line in _REPORT:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def dinov2():
    from tokenkern.demo.dinov2 import load_dinov2_saliency

    return load_dinov2_saliency()


@pytest.fixture(scope="session")
def photos():
    from tokenkern.demo.photos import SKIMAGE_PHOTOS, photo_batch

    return SKIMAGE_PHOTOS, photo_batch()


@pytest.fixture(scope="session")
def dinov2_patch_tokens(dinov2, photos):
    """(4, 256, 384) final-layer DINOv2 ViT-S/14 patch tokens of the four scikit-image photos."""
    with torch.no_grad():
        return dinov2.backbone(photos[1])[:, 1:].contiguous()
