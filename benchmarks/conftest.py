"""pytest-benchmark harness shared by every suite.

Timing: each measured call ends with torch.cuda.synchronize() on a GPU, so a round covers the
device work, not the launch; pytest-benchmark reports min/median/IQR over many rounds.
Compare implementations within one `group` (same shape, same run). Results: run with
``--benchmark-json=benchmarks/results/<gpu>.json`` (``make bench`` does); the JSON's
machine_info carries the device, its measured copy bandwidth and the library versions.

Without a GPU the suites run on small CPU shapes, once each, as a smoke test
(``make test`` passes --benchmark-disable).
"""

from __future__ import annotations

import functools

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


@functools.cache
def copy_bandwidth() -> float | None:
    """Measured device-to-device copy bandwidth in bytes/s (read + write), the practical HBM
    ceiling used for bandwidth floors. None without a GPU."""
    if not HAS_CUDA:
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * src.numel() / times[len(times) // 2]


def pytest_benchmark_update_machine_info(config, machine_info):
    import triton

    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton.__version__
    machine_info["cuda"] = torch.version.cuda
    machine_info["device"] = torch.cuda.get_device_name() if HAS_CUDA else "cpu"
    if HAS_CUDA:
        machine_info["copy_bandwidth_GBps"] = round(copy_bandwidth() / 1e9, 1)


def torch_topk_gather(scores: torch.Tensor, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline every suite compares the fused select+gather with: torch.topk, sort,
    gather. scores: (B, N); x: (B, N, D) -> kept (B, k, D), indices (B, k) ascending."""
    idx = scores.topk(k, dim=-1).indices.sort(dim=-1).values
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1])), idx


def synchronize() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


@pytest.fixture
def run_benchmark(benchmark):
    """run_benchmark(fn, group=..., **extra_info): time fn() with device synchronization and
    record extra_info (shapes, dtype, bytes, peak memory) in the JSON."""

    def run(fn, group: str, **extra_info):
        benchmark.group = group
        benchmark.extra_info.update(extra_info)
        benchmark.extra_info["device"] = DEVICE

        def call():
            out = fn()
            synchronize()
            return out

        call()  # warm-up: compilation, autotuning, allocator
        if HAS_CUDA:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            call()
            benchmark.extra_info["peak_extra_memory_MiB"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 2)
        return benchmark(call)

    return run
