"""The CUDA C++ side of the static kernel report (static, no GPU run).

Compile: ``csrc/cuda/merge_kernels.cu`` (the torch-free merge kernels, every dtype
instantiation) with ``nvcc -arch=sm_90 -Xptxas -v -cubin``; ptxas reports per kernel registers,
stack, spill stores / loads and static shared memory; ``cuobjdump -sass`` of the cubin gives
each kernel's global load widths (16-byte ``LDG.E.128`` or narrower) and tensor-core
instructions (HMMA, HGMMA = wgmma).

Grids: the CPU ops ``tokenkern::_merge_tokens_launch_plan`` / ``_bipartite_merge_launch_plan``
return the launch plan the CUDA launchers themselves follow (``csrc/common/merge_plan.h``), so
the grids here are exactly the launchers' and no formula is restated in Python.

Compulsory bytes of a kernel (``_merge_tokens_bytes``, ``_bipartite_bytes``): every tensor
element the kernel must read or write, each once, from its arguments (an operand re-read by
several CTAs through L2 counts once; a scattered write counts the elements written). Torch
launches of the glue (``merge_cuda.cu``: the all-ones weight when ``weight`` is None) are records
of backend "torch"; the invalid-input flags need no fill (the first kernel of each op writes one
per (sample, 256-token tile), ``csrc/common/merge_plan.h``).

Floors of one call: HBM = every input read once + every output written once; compute = the
similarity GEMM's FLOPs (2 * B * rows * columns * C) at the dense bf16 tensor-core peak of the
target (``SM90_PEAK_FLOPS``). The floor of a call is the larger of the two
(``params["compute_floor_us"]`` beside ``hbm_floor_bytes``).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .schema import LABEL, SM90, KernelLaunch, OpCall, compute_floor, ctas_per_sm, sm_fill

ARCH = 90
ROOT = Path(__file__).resolve().parents[2]
SOURCE = Path("csrc/cuda/merge_kernels.cu")

SM90_PEAK_FLOPS = SM90.peak_flops  # the compute floor's dense bf16 tensor-core peak

# Kernel ids of the launch plan (enum MergeKernel in csrc/common/merge_plan.h), in id order.
PLAN_KERNELS = (
    "merge_prepare_kernel",
    "similarity_kernel",
    "select_targets_kernel",
    "merge_reduce_kernel",
    "best_match_kernel",
    "edge_select_kernel",
    "bipartite_output_kernel",
)
# Template kernels and the operand whose dtype instantiates them (merge_kernels.cuh: TM is the
# metric's element type, TX the tokens').
_TEMPLATE_OPERAND = {
    "similarity_kernel": "metric",
    "merge_reduce_kernel": "x",
    "bipartite_output_kernel": "x",
}
_CTYPE = {"bf16": "__nv_bfloat16", "fp16": "__half", "fp32": "float"}
_ESIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
_TENSOR_CORE_OPS = ("HMMA", "HGMMA", "IMMA", "QGMMA")


# ------------------------------------------------------------------------------ toolchain


def _tool(env: str, name: str, extra: tuple[Path, ...] = ()) -> str | None:
    """A CUDA tool: $env, else PATH, else /usr/local/cuda/bin, else the extra folders."""
    if os.environ.get(env):
        return os.environ[env]
    found = shutil.which(name)
    if found:
        return found
    for folder in (Path("/usr/local/cuda/bin"), *extra):
        if (folder / name).is_file():
            return str(folder / name)
    return None


def nvcc() -> str | None:
    """The nvcc the report compiles with ($NVCC, PATH, /usr/local/cuda/bin), or None."""
    return _tool("NVCC", "nvcc")


def cuobjdump() -> str | None:
    """cuobjdump ($CUOBJDUMP, PATH, /usr/local/cuda/bin, or the copy Triton ships), or None."""
    extra: tuple[Path, ...] = ()
    try:
        import triton.backends.nvidia as nv

        extra = (Path(nv.__file__).parent / "bin",)
    except ImportError:
        pass
    return _tool("CUOBJDUMP", "cuobjdump", extra)


def _version(tool: str | None) -> str:
    if tool is None:
        return "not found"
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return f"unusable ({err})"
    lines = [line for line in out.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "unknown"


def toolchain() -> dict[str, str]:
    """Versions of the CUDA tools the report used."""
    return {"nvcc": _version(nvcc()), "cuobjdump": _version(cuobjdump())}


# ------------------------------------------------------------------------ compiler output


@dataclass
class CompiledKernel:
    """One kernel instantiation of the cubin (sm_90), as ptxas and cuobjdump report it."""

    mangled: str
    name: str  # readable: "similarity_kernel<__nv_bfloat16>"
    registers: int = 0
    stack_bytes: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared_bytes: int = 0  # static
    barriers: int = 0
    sass: bool = False  # the SASS counts below were read
    global_loads: dict[str, int] = field(default_factory=dict)  # bytes per load -> count
    tensor_core_ops: dict[str, int] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return self.name.split("<", 1)[0]

    @property
    def tensor_cores(self) -> bool:
        return sum(self.tensor_core_ops.values()) > 0


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_\d+'")
_PROPS = re.compile(r"Function properties for (\S+)")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_BARRIERS = re.compile(r"used (\d+) barriers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict[str, CompiledKernel]:
    """Per entry function (mangled name) of a ``-Xptxas -v`` log: registers, stack, spills,
    static shared memory, barriers. Properties of non-entry functions are ignored."""
    kernels: dict[str, CompiledKernel] = {}
    entry = props = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            entry = props = m.group(1)
            kernels[entry] = CompiledKernel(entry, readable_name(entry))
        elif m := _PROPS.search(line):
            props = m.group(1)
        elif (m := _SPILL.search(line)) and entry is not None and props == entry:
            k = kernels[entry]
            k.stack_bytes, k.spill_stores, k.spill_loads = (int(g) for g in m.groups())
        elif (m := _REGS.search(line)) and entry is not None:
            k = kernels[entry]
            k.registers = int(m.group(1))
            if b := _BARRIERS.search(line):
                k.barriers = int(b.group(1))
            if s := _SMEM.search(line):
                k.shared_bytes = int(s.group(1))
    return kernels


_SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)")
_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")
_LOAD_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def _load_bytes(opcode: str) -> int:
    for part in opcode.split(".")[1:]:
        if part in _LOAD_WIDTH:
            return _LOAD_WIDTH[part]
    return 4


def parse_sass(sass: str) -> dict[str, tuple[dict[str, int], dict[str, int]]]:
    """Per function (mangled name) of ``cuobjdump -sass``: global loads by bytes per thread
    ({"16": n, "2": n, ...}) and tensor-core instructions by opcode ({"HMMA": n})."""
    out: dict[str, tuple[Counter, Counter]] = {}
    current = None
    for line in sass.splitlines():
        if m := _SASS_FUNCTION.match(line):
            current = m.group(1)
            out[current] = (Counter(), Counter())
            continue
        if current is None or not (m := _SASS_OP.search(line)):
            continue
        opcode = m.group(1)
        head = opcode.split(".", 1)[0]
        if head == "LDG":
            out[current][0][str(_load_bytes(opcode))] += 1
        elif head in _TENSOR_CORE_OPS:
            out[current][1][head] += 1
    return {name: (dict(loads), dict(tc)) for name, (loads, tc) in out.items()}


_BUILTIN = {"f": "float", "d": "double", "i": "int", "l": "long", "b": "bool"}


def _demangle_fallback(mangled: str) -> str:
    """tokenkern::cuda kernels only: _ZN9tokenkern4cuda<len><name>[I<type>E]... -> name<type>."""
    m = re.match(r"_ZN9tokenkern4cuda(\d+)", mangled)
    if not m:
        return mangled
    start = m.end()
    name = mangled[start : start + int(m.group(1))]
    rest = mangled[start + int(m.group(1)) :]
    if not rest.startswith("I"):
        return name
    rest = rest[1:]
    if rest[:1] in _BUILTIN:
        return f"{name}<{_BUILTIN[rest[0]]}>"
    t = re.match(r"(\d+)", rest)
    return f"{name}<{rest[len(t.group(1)) : len(t.group(1)) + int(t.group(1))]}>" if t else name


def readable_name(mangled: str) -> str:
    """The readable name ("similarity_kernel<__nv_bfloat16>") of a mangled tokenkern::cuda kernel (c++filt
    when present, else a parser for the one-type-argument kernels of this library)."""
    tool = shutil.which("c++filt")
    if tool is None:
        return _demangle_fallback(mangled)
    try:
        text = subprocess.run([tool, mangled], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return _demangle_fallback(mangled)
    text = text.split("(", 1)[0]
    text = text.removeprefix("void ").removeprefix("tokenkern::cuda::")
    return text or _demangle_fallback(mangled)


@functools.cache
def compile_kernels(arch: int = ARCH) -> tuple[dict[str, CompiledKernel], str]:
    """Compile merge_kernels.cu for sm_<arch>: {readable name: CompiledKernel} and "" — or {}
    and the reason when it cannot (no nvcc, no sources, a compile error)."""
    compiler = nvcc()
    if compiler is None:
        return {}, "nvcc not found (set NVCC=...)"
    if not (ROOT / SOURCE).is_file():
        return {}, f"{SOURCE} not found (the report needs a source checkout)"
    with tempfile.TemporaryDirectory(prefix="tokenkern-cuda-report-") as tmp:
        cubin = Path(tmp) / "merge_kernels.cubin"
        cmd = [compiler, f"-arch=sm_{arch}", "-std=c++17", "-Icsrc", "-Xptxas", "-v", "-cubin", "-o", str(cubin),
               str(SOURCE)]  # fmt: skip
        try:
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as err:
            return {}, f"nvcc failed to run: {err}"
        if done.returncode != 0:
            return {}, f"nvcc failed ({done.returncode}): {done.stderr[-2000:]}"
        kernels = parse_ptxas(done.stderr + done.stdout)
        dump = cuobjdump()
        if dump is not None:
            sass = subprocess.run([dump, "-sass", str(cubin)], capture_output=True, text=True, timeout=600).stdout
            for mangled, (loads, tc) in parse_sass(sass).items():
                if mangled in kernels:
                    k = kernels[mangled]
                    k.sass, k.global_loads, k.tensor_core_ops = True, loads, tc
    return {k.name: k for k in kernels.values()}, "" if dump is not None else "cuobjdump not found: no SASS counts"


# --------------------------------------------------------------------------- launch plans


@dataclass(frozen=True)
class PlannedLaunch:
    kernel: str
    grid: tuple[int, int, int]
    threads: int
    dynamic_smem: int
    chunks: int


def _plan_rows(plan: Any) -> list[PlannedLaunch]:
    rows = []
    for kid, gx, gy, gz, threads, smem, chunks in plan.tolist():
        if kid < 0:
            continue
        rows.append(PlannedLaunch(PLAN_KERNELS[kid], (gx, gy, gz), threads, smem, chunks))
    return rows


def merge_tokens_plan(b: int, n: int, d: int, k: int, c: int, topm: int, kept_mode: bool,
                      cosine: bool) -> list[PlannedLaunch]:  # fmt: skip
    """The launches of one merge_tokens launch chunk, as the CUDA launcher makes them."""
    import torch

    import tokenkern  # noqa: F401  (registers the ops)

    return _plan_rows(torch.ops.tokenkern._merge_tokens_launch_plan(b, n, d, k, c, topm, kept_mode, cosine))


def bipartite_merge_plan(b: int, n: int, d: int, c: int, r: int) -> list[PlannedLaunch]:
    """The launches of one bipartite_merge launch chunk, as the CUDA launcher makes them."""
    import torch

    import tokenkern  # noqa: F401  (registers the ops)

    return _plan_rows(torch.ops.tokenkern._bipartite_merge_launch_plan(b, n, d, c, r))


# ------------------------------------------------------------------------ compulsory bytes


@dataclass(frozen=True)
class MergeCall:
    """One headline call of merge_tokens (k = K kept) or bipartite_merge (k = r merged)."""

    op: str
    b: int
    n: int
    d: int
    k: int
    c: int
    dtype: str = "bf16"
    topm: int = 1
    metric_is_x: bool = False
    weight: bool = True  # merge_tokens: a float32 weight is passed (else the glue fills ones)

    @property
    def es(self) -> int:
        return _ESIZE[self.dtype]

    @property
    def shape(self) -> str:
        if self.op == "merge_tokens":
            metric = "metric=x" if self.metric_is_x else f"C={self.c}"
            return f"B={self.b} N={self.n} K={self.k} D={self.d} {self.dtype} {metric} topm={self.topm}"
        return f"B={self.b} N={self.n} D={self.d} C={self.c} {self.dtype} r={self.k}"


# csrc/common/merge_plan.h: the similarity tiles' side (kTileM = kTileN), the most A tokens whose
# node keys edge_select_kernel holds in shared memory (kKeyTile) and the most similarity partials
# per sample it reduces itself (kEdgeReducePartials).
SIMILARITY_TILE = 64
KEY_TILE = 4096
EDGE_REDUCE_PARTIALS = 1 << 16


def _tiles(items: int) -> int:
    return -(-items // SIMILARITY_TILE)


def _merge_tokens_bytes(kernel: str, p: MergeCall) -> int:
    """Compulsory bytes of a merge_tokens kernel (dropped mode, cosine: the headline calls)."""
    b, n, d, k, c, es, topm = p.b, p.n, p.d, p.k, p.c, p.es, p.topm
    rows, cols = n - k, k
    i32, i64, f32 = 4, 8, 4
    flags = b * -(-n // 256) * i32  # one invalid flag per (sample, 256-token tile)
    counters = b * _tiles(rows) * i32 if topm == 1 else 0  # one arrival counter per row block
    partials = b * rows * _tiles(cols) * 2 * i32  # (key, index) per (row, column tile)
    targets = 2 * b * rows * topm * 4  # targets and coefficients (B, N - K, topm)
    if topm == 1:
        # row-best partials written, then read back by the last tile of each row block; its
        # counter; the choosers' weights and the flags read; targets and coefficients written
        epilogue = 2 * partials + 2 * counters + b * rows * f32 + flags + targets
    else:
        epilogue = b * rows * cols * f32  # the similarity matrix (B, N - K, K) written
    table = {
        # keep (B, K) and weight (B, N) read, dropped (B, N - K), the arrival counters and the
        # flags written
        "merge_prepare_kernel": b * k * i64 + b * n * f32 + b * rows * i32 + counters + flags,
        # the chooser and candidate rows of metric (all N, each once; the norms come from the
        # staged tiles) and the row maps (dropped, keep) read, then the epilogue
        "similarity_kernel": b * n * c * es + b * rows * i32 + b * k * i64 + epilogue,
        # topm > 1: similarities, dropped and the choosers' weights read; targets and
        # coefficients written
        "select_targets_kernel": b * rows * cols * f32 + b * rows * i32 + b * rows * f32 + targets + flags,
        # x rows (every token: kept rows and their sources), keep, the kept weights, dropped,
        # targets and coefficients read; merged (B, K, D) and mass (B, K) written
        "merge_reduce_kernel": b * n * d * es + b * k * (i64 + f32) + b * rows * i32 + targets + flags
        + b * k * d * es + b * k * f32,
    }  # fmt: skip
    return table[kernel]


def _bipartite_bytes(kernel: str, p: MergeCall) -> int:
    """Compulsory bytes of a bipartite_merge kernel."""
    b, n, d, r, c, es = p.b, p.n, p.d, p.k, p.c, p.es
    n_a, n_b = (n + 1) // 2, n // 2
    i32, f32 = 4, 4
    flags = b * -(-n_a // 256) * i32  # one invalid flag per (sample, 256-A-token tile)
    partials = b * n_a * _tiles(n_b) * 2 * i32  # (key, index) per (A token, column tile)
    # edge_select reduces the partials and writes the node indices (edge_select_reduces), or
    # best_match does, writing node keys and indices that edge_select reads
    small = n_a <= KEY_TILE and n_a * _tiles(n_b) <= EDGE_REDUCE_PARTIALS
    table = {
        # metric rows (A and B sets, each once; the norms come from the staged tiles) read, the
        # row-best partials written
        "similarity_kernel": b * n * c * es + partials,
        # partials read, node key and index (B, N_A) written
        "best_match_kernel": partials + 2 * b * n_a * i32,
        # partials (or node keys) and size (B, N) read, node indices when it reduces them, merged
        # flags (B, N_A) uint8, unmerged list (B, N_A - r) and the invalid flags written
        "edge_select_kernel": (partials + b * n_a * i32 if small else b * n_a * i32) + b * n * f32 + b * n_a
        + b * (n_a - r) * i32 + flags,
        # x rows (all N), sizes, flags, node index, unmerged list read; out (B, N - r, D) and
        # out_size (B, N - r) written
        "bipartite_output_kernel": b * n * d * es + b * n * f32 + b * n_a * (1 + i32) + b * (n_a - r) * i32 + flags
        + b * (n - r) * (d * es + f32),
    }  # fmt: skip
    return table[kernel]


def _flops(kernel: str, p: MergeCall) -> int | None:
    """Floating point operations of a kernel where they matter: the similarity GEMM (tensor
    cores for 16-bit metrics) with the squares of the staged tiles (every tile sums its rows'
    and columns' norms: FMA), and the weighted sums (FMA)."""
    b, n, d, c = p.b, p.n, p.d, p.c
    if p.op == "merge_tokens":
        rows, cols = p.n - p.k, p.k
        sums = 2 * b * (rows * p.topm + p.k) * d
    else:
        rows, cols = (n + 1) // 2, n // 2
        sums = 2 * b * (p.k + n // 2) * d
    norms = 2 * b * (rows * _tiles(cols) + cols * _tiles(rows)) * c
    return {
        "similarity_kernel": 2 * b * rows * cols * c + norms,
        "merge_reduce_kernel": sums,
        "bipartite_output_kernel": sums,
    }.get(kernel)


def _glue_fills(p: MergeCall) -> list[tuple[str, int, str]]:
    """Torch launches of the glue before the kernels: (name, bytes, what)."""
    fills = []
    if p.op == "merge_tokens" and not p.weight:
        fills.append(("torch.ones", p.b * p.n * 4, "default weight (B, N) float32"))
    return fills


def _floor(p: MergeCall) -> tuple[int, str]:
    x = p.b * p.n * p.d * p.es
    metric = 0 if p.metric_is_x else p.b * p.n * p.c * p.es
    if p.op == "merge_tokens":
        small = p.b * p.k * 8 + (p.b * p.n * 4 if p.weight else 0)
        out = p.b * p.k * (p.d * p.es + 4)
        what = "|x| (= metric)" if p.metric_is_x else "|x| + |metric|"
        return x + metric + small + out, f"{what} + |keep_idx| + |weight| + |merged| + |mass| (each once)"
    small = p.b * p.n * 4
    out = p.b * (p.n - p.k) * (p.d * p.es + 4)
    return x + metric + small + out, "|x| + |metric| + |size| + |merged| + |size out| (each once)"


# -------------------------------------------------------------------------------- records


def headline_calls(small: bool = False) -> list[MergeCall]:
    """The merge headline shapes (``small``: tiny shapes, for the tests)."""
    if small:
        return [
            MergeCall("merge_tokens", 2, 96, 64, 24, 64, metric_is_x=True),
            MergeCall("bipartite_merge", 2, 97, 64, 24, 16),
        ]
    return [
        MergeCall("merge_tokens", 8, 2880, 4096, 720, 4096, metric_is_x=True),
        MergeCall("merge_tokens", 1, 2880, 4096, 720, 4096, metric_is_x=True),
        MergeCall("merge_tokens", 8, 576, 1024, 144, 1024, metric_is_x=True),
        MergeCall("bipartite_merge", 8, 577, 1024, 144, 64),
        MergeCall("bipartite_merge", 2, 2880, 4096, 720, 64),
        MergeCall("bipartite_merge", 1, 2880, 4096, 720, 64),
    ]  # fmt: skip


def _instantiation(kernel: str, p: MergeCall) -> str:
    return f"{kernel}<{_CTYPE[p.dtype]}>" if kernel in _TEMPLATE_OPERAND else kernel


def _kernel_record(p: MergeCall, launch: PlannedLaunch, compiled: dict[str, CompiledKernel], why: str) -> KernelLaunch:
    name = _instantiation(launch.kernel, p)
    nbytes = (_merge_tokens_bytes if p.op == "merge_tokens" else _bipartite_bytes)(launch.kernel, p)
    ctas = launch.grid[0] * launch.grid[1] * launch.grid[2]
    config: dict[str, Any] = {
        "instantiation": name, "threads": launch.threads, "dynamic_smem": launch.dynamic_smem,
        "chunks": launch.chunks, "arch": f"sm_{ARCH}",
    }  # fmt: skip
    k = compiled.get(name)
    if k is None:
        note = f"not compiled: {why or f'{name} not in the cubin'}"
        return KernelLaunch(p.op, p.shape, launch.kernel, "cuda", list(launch.grid), ctas, launch.threads, None, None,
                            None, None, None, None, nbytes, None, _flops(launch.kernel, p), config, note)  # fmt: skip
    shared = k.shared_bytes + launch.dynamic_smem
    per_sm, limiter = ctas_per_sm(launch.threads, k.registers, shared, SM90)
    config |= {"mangled": k.mangled, "static_smem": k.shared_bytes, "stack_bytes": k.stack_bytes,
               "spill_stores": k.spill_stores, "spill_loads": k.spill_loads, "barriers": k.barriers,
               "global_loads_by_bytes": k.global_loads, "tensor_core_ops": k.tensor_core_ops}  # fmt: skip
    notes = []
    if k.global_loads and "16" not in k.global_loads:
        widest = max(int(w) for w in k.global_loads)
        notes.append(f"no 16-byte global loads (widest {widest} B)")
    if why:
        notes.append(why)
    return KernelLaunch(
        op=p.op, shape=p.shape, kernel=launch.kernel, backend="cuda", grid=list(launch.grid), ctas=ctas,
        threads=launch.threads, registers=k.registers, spill_bytes=k.spill_stores + k.spill_loads,
        shared_bytes=shared, ctas_per_sm=per_sm, limiter=limiter, sm_fill=round(sm_fill(ctas, per_sm, SM90), 4),
        compulsory_bytes=nbytes, tensor_cores=k.tensor_cores if k.sass else None,
        flops=_flops(launch.kernel, p), config=config, notes="; ".join(notes),
    )  # fmt: skip


def _torch_record(p: MergeCall, name: str, nbytes: int, what: str) -> KernelLaunch:
    return KernelLaunch(p.op, p.shape, name, "torch", [1, 1, 1], 1, 0, None, None, None, None, None, None, nbytes,
                        None, notes=f"torch op launched by the glue ({what}); grid not known")  # fmt: skip


def _params(p: MergeCall) -> dict[str, Any]:
    params: dict[str, Any] = {"B": p.b, "N": p.n, "D": p.d, "C": p.c, "dtype": p.dtype}
    if p.op == "merge_tokens":
        params |= {"K": p.k, "topm": p.topm, "metric": "x" if p.metric_is_x else "separate", "assign": "dropped",
                   "weight": p.weight}  # fmt: skip
        rows, cols = p.n - p.k, p.k
    else:
        params["r"] = p.k
        rows, cols = (p.n + 1) // 2, p.n // 2
    return params | {"compute_floor_flops": 2 * p.b * rows * cols * p.c}


def op_call(p: MergeCall, compiled: dict[str, CompiledKernel], why: str = "") -> OpCall:
    """The record of one merge call: its launches in order (glue fills, then the plan)."""
    if p.op == "merge_tokens":
        plan = merge_tokens_plan(p.b, p.n, p.d, p.k, p.c, p.topm, False, True)
    else:
        plan = bipartite_merge_plan(p.b, p.n, p.d, p.c, p.k)
    if any(launch.chunks != 1 for launch in plan):
        chunks = plan[0].chunks
        raise ValueError(f"tokenkern.kernel_report: {p.op} {p.shape} must run in one launch chunk, got {chunks}")
    kernels = [_torch_record(p, *fill) for fill in _glue_fills(p)]
    kernels += [_kernel_record(p, launch, compiled, why) for launch in plan]
    floor, floor_formula = _floor(p)
    params = _params(p)
    gemm, clause = compute_floor(params["compute_floor_flops"], "similarity GEMM 2*B*rows*cols*C")
    params |= gemm
    floor_formula += clause
    known = [k.flops for k in kernels if k.flops is not None]
    if p.op == "merge_tokens" and p.metric_is_x:
        # Every assignment must be known before a kept row's sum is final: with metric = x the
        # similarity reads x and then the reduction reads it again (x is larger than L2).
        passes, passes_formula = 2, "2: the similarity reads x (the metric), then the reduction reads each source row"
    else:
        passes, passes_formula = 1, ("1: the similarity reads the metric once and the reduction reads each source row "
                                     "of x once")  # fmt: skip
    return OpCall(
        op=p.op, shape=p.shape, params=params, launches=len(kernels), kernels=kernels,
        bytes_moved=sum(k.compulsory_bytes for k in kernels), hbm_floor_bytes=floor, floor_formula=floor_formula,
        passes_over_x=passes, passes_formula=passes_formula, flops=sum(known) if known else None, label=LABEL,
    )  # fmt: skip


def calls(small: bool = False) -> list[OpCall]:
    """The CUDA C++ records of the report (static, no GPU run): every merge headline call."""
    compiled, why = compile_kernels(ARCH)
    return [op_call(p, compiled, why) for p in headline_calls(small)]
