"""Test session setup. Must run before any tokenkern kernel module is imported."""

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Outputs of the Triton launchers start as NaN / -1, so an unwritten element fails a test.
os.environ.setdefault("TOKENKERN_POISON", "1")

import pytest
from fixtures import dinov2, dinov2_patch_tokens, photos  # noqa: F401  (registers the fixtures)
from testing import test_seed

# tests/vllm runs in its own venv (make test-vllm); elsewhere vLLM is absent and it is not collected.
# (tests/ is on sys.path, so tests/vllm itself would pass for a namespace package named vllm.)
_VLLM = importlib.util.find_spec("vllm")
collect_ignore = [] if _VLLM is not None and _VLLM.origin is not None else ["vllm"]


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
