"""The kernel core stands alone: importing the ops loads neither the method recipes, the
integrations, the planner, the demo nor Triton (Triton is imported when a CUDA kernel first
runs). Checked in a fresh interpreter, where sys.modules starts empty."""

import subprocess
import sys

import pytest

CORE = ["tokenkern", "tokenkern.ops", "tokenkern.reference"]
NOT_LOADED = ["tokenkern.methods", "tokenkern.integrations", "tokenkern.planner", "tokenkern.demo", "triton"]


@pytest.mark.parametrize("module", CORE)
def test_core_imports_alone(module):
    probe = f"import sys, {module}\nprint(','.join(m for m in {NOT_LOADED!r} if m in sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import {module} loaded {out.stdout.strip()}"


def test_top_level_only_reexports():
    """Every public op of tokenkern is the very function defined in its family module."""
    import tokenkern
    import tokenkern.ops as ops

    for name in ops.__all__:
        fn = getattr(tokenkern, name)
        assert fn is getattr(ops, name)
        assert fn.__module__.startswith("tokenkern.ops."), (name, fn.__module__)
