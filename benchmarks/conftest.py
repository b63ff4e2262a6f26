"""pytest-benchmark harness shared by every suite.

Timing: each measured call ends with torch.cuda.synchronize() on a GPU, so a round covers the
device work, not the launch; pytest-benchmark reports min/median/IQR over many rounds.
Compare implementations within one `group` (same shape, same run). Results: run with
``--benchmark-json=benchmarks/results/<gpu>.json`` (``make bench`` does); the JSON's
machine_info carries the device, its measured copy bandwidth and the library versions.

Floors (``floor_info``): HBM = bytes moved / the measured copy bandwidth (read + write bytes);
compute = FLOPs / the documented tensor-core peak (``PEAK_FLOPS``); a call's floor is the larger.

Without a GPU the suites run on small CPU shapes, once each, as a smoke test
(``make test`` passes --benchmark-disable).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

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


# Dense tensor-core peaks in FLOP/s (no sparsity), from NVIDIA's H100 / H200 datasheets, by a
# fragment of torch.cuda.get_device_name() (first match wins); "fp32" is the non-tensor FMA peak.
# TOKENKERN_PEAK_TFLOPS overrides the peak of every kind.
PEAK_FLOPS = {
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51.2e12},
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12},
    "H100": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},  # SXM5
    "H200": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
}
# The tensor-core kind a GEMM on inputs of this dtype runs at its best.
GEMM_KIND = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "tf32"}


def peak_flops(kind: str = "bf16") -> float | None:
    """The documented peak of this GPU for `kind` ("bf16", "fp16", "tf32", "fp32") in FLOP/s;
    None without a GPU or for a device missing from PEAK_FLOPS."""
    override = os.environ.get("TOKENKERN_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    if not HAS_CUDA:
        return None
    name = torch.cuda.get_device_name()
    for fragment, peaks in PEAK_FLOPS.items():
        if fragment in name:
            return peaks[kind]
    return None


def hbm_floor_us(nbytes: int) -> float | None:
    """Time to move nbytes (reads + writes) at the measured copy bandwidth, which already
    counts both the read and the write of a copy. None without a GPU."""
    bw = copy_bandwidth()
    return nbytes / bw * 1e6 if bw else None


def compute_floor_us(flops: int, kind: str = "bf16") -> float | None:
    """Time of flops at the documented peak of `kind`; None when the peak is unknown."""
    peak = peak_flops(kind)
    return flops / peak * 1e6 if peak else None


def floor_info(nbytes: int, flops: int | None = None, kind: str = "bf16") -> dict[str, float]:
    """extra_info entries of a call's floors: hbm_floor_us, compute_floor_us (when flops and
    the peak are known) and floor_us = the larger of the two. Empty without a GPU."""
    info: dict[str, float] = {}
    hbm = hbm_floor_us(nbytes)
    if hbm is None:
        return info
    info["hbm_floor_us"] = round(hbm, 2)
    compute = compute_floor_us(flops, kind) if flops else None
    if compute is not None:
        info["compute_floor_us"] = round(compute, 2)
    info["floor_us"] = round(max(hbm, compute or 0.0), 2)
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    import triton

    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton.__version__
    machine_info["cuda"] = torch.version.cuda
    machine_info["device"] = torch.cuda.get_device_name() if HAS_CUDA else "cpu"
    if HAS_CUDA:
        machine_info["copy_bandwidth_GBps"] = round(copy_bandwidth() / 1e9, 1)
        peak = peak_flops("bf16")
        machine_info["peak_bf16_TFLOPS"] = round(peak / 1e12, 1) if peak else None


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """CPU suites (benchmarks/cpu): each group holds a "tokenkern" and a "torch" entry; record
    ratio_vs_torch = torch median / tokenkern median in the tokenkern entry and in
    output_json["cpu_ratios"]."""
    groups: dict[str, dict[str, dict]] = {}
    for entry in output_json["benchmarks"]:
        info = entry.get("extra_info", {})
        # CPU-suite entries carry impl and threads (the GPU suites may name an impl too).
        if "threads" in info and info.get("impl") in CPU_IMPLS and entry.get("stats"):
            groups.setdefault(entry["group"], {})[info["impl"]] = entry
    ratios = []
    for group, pair in sorted(groups.items()):
        if len(pair) != 2:
            continue
        tk, base = pair["tokenkern"], pair["torch"]
        ratio = base["stats"]["median"] / tk["stats"]["median"]
        tk["extra_info"]["ratio_vs_torch"] = round(ratio, 3)
        ratios.append(
            {
                "case": group.rsplit(" threads=", 1)[0],
                "threads": tk["extra_info"]["threads"],
                "tokenkern_median_s": tk["stats"]["median"],
                "torch_median_s": base["stats"]["median"],
                "ratio": round(ratio, 3),
            }
        )
    if ratios:
        output_json["cpu_ratios"] = ratios


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


# CPU suites (benchmarks/cpu, see cpu_harness.py there): each case times "tokenkern" and "torch"
# in one group, at 1 and 2 intra-op threads.
CPU_IMPLS = ("tokenkern", "torch")


@pytest.fixture(params=(1, 2), ids=lambda t: f"threads{t}")
def threads(request) -> int:
    """Runs the case with torch's intra-op pool at this many threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture(params=CPU_IMPLS)
def impl(request) -> str:
    return request.param


@pytest.fixture
def compare(benchmark, impl, threads):
    """compare(fns, check, group, **extra_info): fns maps "tokenkern" and "torch" to
    zero-argument callables; check(tokenkern_out, torch_out) asserts they agree (run once, before
    timing, in every mode); then this case's side is timed."""

    def run(fns: dict[str, Callable[[], Any]], check: Callable[[Any, Any], None], group: str, **extra_info):
        if set(fns) != set(CPU_IMPLS):
            raise ValueError(f"compare: fns must have the keys {CPU_IMPLS}, got {sorted(fns)}")
        check(fns["tokenkern"](), fns["torch"]())
        benchmark.group = f"{group} threads={threads}"
        benchmark.extra_info.update(extra_info, impl=impl, threads=threads, device="cpu")
        return benchmark(fns[impl])

    return run
