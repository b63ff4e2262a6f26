"""The sketch accuracy study's estimators (the full run: python examples/sketch_accuracy.py)."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "sketch_accuracy.py"


def load():
    spec = importlib.util.spec_from_file_location("sketch_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("label", list(load().METHODS))
def test_every_sketch_is_exact_on_a_rank_r_matrix(label, gen):
    # x of rank r = RANK: every sketch spans its range (Y = X Omega almost surely; the one-view
    # solve (Psi Q)^+ Psi X = Q^T X), so the scores are the exact ones up to float64 rounding:
    # about 1e-16 cond(x)^2, cond(x) ~ 10 here; 1e-9 holds up to cond(x) ~ 1e3.
    study = load()
    x = torch.randn(2, 100, study.RANK, generator=gen, dtype=torch.float64) @ torch.randn(
        2, study.RANK, 120, generator=gen, dtype=torch.float64
    )
    _, fn = study.METHODS[label]
    got, want = fn(x, gen), study.exact_scores(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


def test_committed_table_has_every_sketch():
    study = load()
    rows = (SCRIPT.parent / "results" / "sketch_accuracy.md").read_text().splitlines()[2:]
    labels = [row.split(" | ")[1] for row in rows]
    assert labels == list(study.METHODS) * 2
    for row in rows:
        for cell in row.strip(" |").split(" | ")[3:]:
            mean, low = (float(v) for v in cell.split(" / "))
            assert 0.0 <= low <= mean <= 1.0
