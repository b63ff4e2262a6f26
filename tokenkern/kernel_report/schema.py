"""The static kernel report's records, shared by the Triton and the CUDA C++ sides.

Every number here is static (compiler output and sizes, no GPU run). A report is a JSON
object::

    {"schema": 1, "label": "static, no GPU run", "target": {...SM90...}, "toolchain": {...},
     "calls": [OpCall, ...]}

An ``OpCall`` is one public op call at one headline shape; its ``kernels`` are the launches
that call makes, in launch order (one ``KernelLaunch`` per launch, so a kernel launched five
times appears five times).

Each side is a module with ``calls() -> list[OpCall]`` and ``toolchain() -> dict[str, str]``
(``triton_report`` and ``cuda_report``); ``tokenkern.kernel_report.build_report`` joins them,
``budget`` checks the result. Shape labels read like "B=8 N=2880 D=4096 bf16 r=32".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

SCHEMA_VERSION = 1
LABEL = "static, no GPU run"
BACKENDS = ("triton", "cuda", "torch")  # "torch": a launch by a torch op in the glue (fill, copy)


@dataclass(frozen=True)
class Target:
    """Per-SM limits of the GPU the report is computed for."""

    name: str = "sm_90 (H100/H200)"
    arch: int = 90
    sms: int = 132
    regs_per_sm: int = 65536
    regs_per_thread_max: int = 255
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256
    smem_per_sm: int = 228 * 1024
    smem_reserved_per_cta: int = 1024  # the driver reserves 1 KB of shared memory per CTA
    threads_per_sm: int = 2048
    ctas_per_sm_max: int = 32
    l2_bytes: int = 50 * 1024 * 1024  # H100 SXM / H200: 50 MiB
    sector_bytes: int = 32  # the unit of a global memory access
    # Dense bf16/fp16 tensor-core peak of an H100 SXM / H200 SXM (NVIDIA datasheets, no sparsity):
    # the compute floor of the report's calls. benchmarks/conftest.py holds the per-device table.
    peak_flops: float = 989.4e12


SM90 = Target()


def compute_floor(flops: int, what: str, target: Target = SM90) -> tuple[dict[str, Any], str]:
    """The params entries and the floor-formula clause of a call whose floor includes a GEMM of
    ``flops`` floating point operations (``what`` says which) at the target's tensor-core peak."""
    us = round(flops / target.peak_flops * 1e6, 2)
    params = {"compute_floor_flops": flops, "compute_floor_us": us, "peak_flops": target.peak_flops}
    clause = (f"; compute floor: {what} = {flops / 1e9:.1f} GFLOP = {us} us at {target.peak_flops / 1e12:.1f} "
              "TFLOPS (dense bf16); the floor is the larger of the two")  # fmt: skip
    return params, clause


def ctas_per_sm(threads: int, registers: int, shared_bytes: int, target: Target = SM90) -> tuple[int, str]:
    """CTAs of one kernel that fit on one SM at once, and what limits it.

    threads: per CTA; registers: per thread; shared_bytes: static + dynamic per CTA.
    Returns (ctas, limiter) with limiter one of "registers", "shared", "threads", "ctas".
    """
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(registers, 1) * 32 / target.reg_alloc_unit) * target.reg_alloc_unit
    limits = {
        "registers": target.regs_per_sm // (regs_per_warp * warps),
        "shared": target.smem_per_sm // (shared_bytes + target.smem_reserved_per_cta),
        "threads": target.threads_per_sm // (warps * 32),
        "ctas": target.ctas_per_sm_max,
    }
    limiter = min(limits, key=lambda k: limits[k])
    return limits[limiter], limiter


def sm_fill(ctas: int, per_sm: int, target: Target = SM90) -> float:
    """Grid CTAs / (SMs * CTAs per SM): < 1 means the GPU is not filled by this launch."""
    return ctas / (target.sms * per_sm) if per_sm > 0 else 0.0


@dataclass
class KernelLaunch:
    """One kernel launch of an op call (static, no GPU run).

    grid: (x, y, z) CTAs; threads: per CTA (num_warps * 32 for Triton); registers: per thread;
    spill_bytes: per thread (stores + loads spilled, as ptxas reports them);
    shared_bytes: per CTA; ctas_per_sm / limiter / sm_fill: from ``ctas_per_sm`` and
    ``sm_fill``; compulsory_bytes: the sum of the sizes of the tensors the kernel reads or
    writes, each counted once; flops: tensor-core (or FMA) floating point operations where
    known, else None; config: what specializes the compile (Triton: constexprs, num_warps,
    num_stages, signature; CUDA: template arguments, block size); notes: free text
    (e.g. a dtype substituted for recording). Compile fields are None for backend "torch".
    """

    op: str
    shape: str
    kernel: str
    backend: str
    grid: list[int]
    ctas: int
    threads: int
    registers: int | None
    spill_bytes: int | None
    shared_bytes: int | None
    ctas_per_sm: int | None
    limiter: str | None
    sm_fill: float | None
    compulsory_bytes: int
    tensor_cores: bool | None
    flops: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    notes: str = ""


@dataclass
class OpCall:
    """One public op call at one headline shape (static, no GPU run).

    params: the shape and options (B, N, D, dtype, rank, ...); launches: len(kernels);
    bytes_moved: sum of the kernels' compulsory bytes; hbm_floor_bytes: one pass over x plus
    the outputs (floor_formula says what exactly for this op); passes_over_x: what the
    algorithm must read of x (passes_formula says why); flops: sum of known kernel flops.
    """

    op: str
    shape: str
    params: dict[str, Any]
    launches: int
    kernels: list[KernelLaunch]
    bytes_moved: int
    hbm_floor_bytes: int
    floor_formula: str
    passes_over_x: float
    passes_formula: str
    flops: int | None = None
    label: str = LABEL


def report_dict(calls: list[OpCall], toolchain: dict[str, str], target: Target = SM90) -> dict[str, Any]:
    """The JSON object of a report."""
    return {
        "schema": SCHEMA_VERSION,
        "label": LABEL,
        "target": asdict(target),
        "toolchain": dict(toolchain),
        "calls": [asdict(c) for c in calls],
    }


_KERNEL_TYPES: dict[str, tuple[type, ...]] = {
    "op": (str,), "shape": (str,), "kernel": (str,), "backend": (str,), "grid": (list,),
    "ctas": (int,), "threads": (int,), "registers": (int, type(None)),
    "spill_bytes": (int, type(None)), "shared_bytes": (int, type(None)),
    "ctas_per_sm": (int, type(None)), "limiter": (str, type(None)),
    "sm_fill": (float, int, type(None)), "compulsory_bytes": (int,),
    "tensor_cores": (bool, type(None)), "flops": (int, type(None)), "config": (dict,), "notes": (str,),
}  # fmt: skip
_CALL_TYPES: dict[str, tuple[type, ...]] = {
    "op": (str,), "shape": (str,), "params": (dict,), "launches": (int,), "kernels": (list,),
    "bytes_moved": (int,), "hbm_floor_bytes": (int,), "floor_formula": (str,),
    "passes_over_x": (float, int), "passes_formula": (str,), "flops": (int, type(None)), "label": (str,),
}  # fmt: skip


def _check_keys(where: str, obj: object, types: dict[str, tuple[type, ...]]) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"tokenkern.kernel_report: {where} must be an object, got {type(obj).__name__}")
    missing, extra = set(types) - set(obj), set(obj) - set(types)
    if missing or extra:
        raise ValueError(
            f"tokenkern.kernel_report: {where} must have exactly the fields {sorted(types)}, "
            f"got missing {sorted(missing)}, unknown {sorted(extra)}"
        )
    for key, allowed in types.items():
        value = obj[key]
        if isinstance(value, bool) and bool not in allowed:
            raise ValueError(f"tokenkern.kernel_report: {where}.{key} must be {allowed}, got {value!r}")
        if not isinstance(value, allowed):
            raise ValueError(f"tokenkern.kernel_report: {where}.{key} must be {allowed}, got {value!r}")


def _check_kernel(where: str, k: dict[str, Any]) -> None:
    _check_keys(where, k, _KERNEL_TYPES)
    if k["backend"] not in BACKENDS:
        raise ValueError(f"tokenkern.kernel_report: {where}.backend must be one of {BACKENDS}, got {k['backend']!r}")
    grid = k["grid"]
    if len(grid) != 3 or not all(isinstance(g, int) and g >= 1 for g in grid) or math.prod(grid) != k["ctas"]:
        raise ValueError(f"tokenkern.kernel_report: {where}.grid must be 3 ints >= 1 whose product is ctas, got {grid}")
    for key in ("threads", "compulsory_bytes"):
        if k[key] < 0:
            raise ValueError(f"tokenkern.kernel_report: {where}.{key} must be >= 0, got {k[key]}")


def validate(report: object) -> None:
    """Raise ValueError unless ``report`` is a report object of this schema version."""
    if not isinstance(report, dict):
        raise ValueError(f"tokenkern.kernel_report: report must be an object, got {type(report).__name__}")
    expected = {"schema", "label", "target", "toolchain", "calls"}
    if set(report) != expected:
        raise ValueError(
            f"tokenkern.kernel_report: report must have the fields {sorted(expected)}, got {sorted(report)}"
        )
    if report["schema"] != SCHEMA_VERSION or report["label"] != LABEL:
        raise ValueError(
            f"tokenkern.kernel_report: report must be schema {SCHEMA_VERSION} labelled {LABEL!r}, "
            f"got {report['schema']!r}, {report['label']!r}"
        )
    target_fields = {f.name for f in fields(Target)}
    if not isinstance(report["target"], dict) or set(report["target"]) != target_fields:
        raise ValueError(f"tokenkern.kernel_report: target must have the fields {sorted(target_fields)}")
    if not isinstance(report["calls"], list):
        raise ValueError("tokenkern.kernel_report: calls must be a list")
    for i, call in enumerate(report["calls"]):
        where = f"calls[{i}]"
        _check_keys(where, call, _CALL_TYPES)
        if call["launches"] != len(call["kernels"]):
            raise ValueError(f"tokenkern.kernel_report: {where}.launches must be len(kernels), got {call['launches']}")
        for j, k in enumerate(call["kernels"]):
            _check_kernel(f"{where}.kernels[{j}]", k)
        total = sum(k["compulsory_bytes"] for k in call["kernels"])
        if call["bytes_moved"] != total:
            raise ValueError(
                f"tokenkern.kernel_report: {where}.bytes_moved must be the sum of its kernels' bytes {total}, "
                f"got {call['bytes_moved']}"
            )
