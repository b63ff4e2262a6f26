"""The CUDA C++ side of the static kernel report: compiler-output parsers, the launch plan the
CUDA merge launchers follow (tokenkern::_merge_tokens_launch_plan / _bipartite_merge_launch_plan)
and the records at the merge headline shapes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import tokenkern  # noqa: F401  (registers the ops)
from tokenkern.kernel_report import cuda_report, schema
from tokenkern.kernel_report.cuda_report import MergeCall

ROOT = Path(__file__).resolve().parent.parent
PLAN = torch.ops.tokenkern._merge_tokens_launch_plan
BIPARTITE_PLAN = torch.ops.tokenkern._bipartite_merge_launch_plan
HAS_NVCC = cuda_report.nvcc() is not None and (ROOT / cuda_report.SOURCE).is_file()

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN9tokenkern4cuda17similarity_kernelI13__nv_bfloat16EEvPKT_' for 'sm_90'
ptxas info    : Function properties for _ZN9tokenkern4cuda17similarity_kernelI13__nv_bfloat16EEvPKT_
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 56 registers, used 1 barriers, 28672 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN9tokenkern4cuda19keep_scatter_kernelEPKlllPiS3_' for 'sm_90'
ptxas info    : Function properties for _Z6helperv
    24 bytes stack frame, 40 bytes spill stores, 40 bytes spill loads
ptxas info    : Function properties for _ZN9tokenkern4cuda19keep_scatter_kernelEPKlllPiS3_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, 384 bytes cmem[0]
"""

SASS = """\
\t\tFunction : _ZN9tokenkern4cuda17similarity_kernelI13__nv_bfloat16EEvPKT_
        /*0080*/                   LDG.E.U16 R2, desc[UR4][R2.64] ;
        /*0090*/              @!P0 LDG.E.128.CONSTANT R4, desc[UR4][R6.64] ;
        /*00a0*/                   LDG.E R8, desc[UR4][R8.64] ;
        /*00b0*/                   HMMA.16816.F32.BF16 R12, R16, R20, R12 ;
        /*00c0*/                   HMMA.16816.F32.BF16 R12, R16, R20, R12 ;
        /*00d0*/                   LDS.128 R4, [R2] ;
\t\tFunction : _ZN9tokenkern4cuda19keep_scatter_kernelEPKlllPiS3_
        /*0010*/               @P1 LDG.E.64 R2, desc[UR4][R2.64] ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
"""


def test_parse_ptxas_reads_entry_functions_only():
    kernels = cuda_report.parse_ptxas(PTXAS_LOG)
    sim = kernels["_ZN9tokenkern4cuda17similarity_kernelI13__nv_bfloat16EEvPKT_"]
    assert (sim.registers, sim.stack_bytes, sim.spill_stores, sim.spill_loads, sim.shared_bytes, sim.barriers) == (
        56, 16, 8, 12, 28672, 1,
    )  # fmt: skip
    assert sim.name == "similarity_kernel<__nv_bfloat16>"
    keep = kernels["_ZN9tokenkern4cuda19keep_scatter_kernelEPKlllPiS3_"]
    # the non-entry helper's 40-byte spills are not the kernel's
    assert (keep.registers, keep.spill_stores, keep.spill_loads, keep.shared_bytes) == (12, 0, 0, 0)
    assert keep.name == "keep_scatter_kernel"


def test_parse_sass_counts_load_widths_and_tensor_core_ops():
    sass = cuda_report.parse_sass(SASS)
    loads, tc = sass["_ZN9tokenkern4cuda17similarity_kernelI13__nv_bfloat16EEvPKT_"]
    assert loads == {"2": 1, "16": 1, "4": 1}  # LDS (shared) is not a global load
    assert tc == {"HMMA": 2}
    loads, tc = sass["_ZN9tokenkern4cuda19keep_scatter_kernelEPKlllPiS3_"]
    assert loads == {"8": 1} and tc == {"HGMMA": 1}


@pytest.mark.parametrize(
    ("mangled", "name"),
    [
        ("_ZN9tokenkern4cuda17similarity_kernelI13__nv_bfloat16EEvPKT_NS0_6RowMapES5_S6_llllPf",
         "similarity_kernel<__nv_bfloat16>"),
        ("_ZN9tokenkern4cuda17similarity_kernelI6__halfEEvPKT_NS0_6RowMapES5_S6_llllNS0_13SimilarityOutE",
         "similarity_kernel<__half>"),
        ("_ZN9tokenkern4cuda19merge_reduce_kernelIfEEvPKT_PKlPKfPKiSA_S8_SA_lllllbNS_7CombineEPS2_Pf",
         "merge_reduce_kernel<float>"),
        ("_ZN9tokenkern4cuda18edge_select_kernelEPKillbPhPi", "edge_select_kernel"),
    ],
)  # fmt: skip
def test_readable_names(mangled, name):
    assert cuda_report._demangle_fallback(mangled) == name
    assert cuda_report.readable_name(mangled) == name


def _kernels(plan: torch.Tensor) -> list[str]:
    return [cuda_report.PLAN_KERNELS[i] for i in plan[:, 0].tolist() if i >= 0]


def test_plan_kernel_names_match_the_header():
    header = (ROOT / "csrc/common/merge_plan.h").read_text()
    ids = dict(re.findall(r"^  k(\w+) = (\d+),$", header, re.M))
    names = dict(re.findall(r"case MergeKernel::k(\w+): return \"(\w+)\";", header))
    by_id = {int(i): names[enum] for enum, i in ids.items()}
    assert tuple(by_id[i] for i in range(len(by_id))) == cuda_report.PLAN_KERNELS


def test_tile_constants_match_the_header():
    header = (ROOT / "csrc/common/merge_plan.h").read_text()
    assert re.search(rf"constexpr int kTileM = {cuda_report.SIMILARITY_TILE}, kTileN = {cuda_report.SIMILARITY_TILE};",
                     header)  # fmt: skip
    assert re.search(rf"constexpr int64_t kKeyTile = {cuda_report.KEY_TILE};", header)
    shift = cuda_report.EDGE_REDUCE_PARTIALS.bit_length() - 1
    assert cuda_report.EDGE_REDUCE_PARTIALS == 1 << shift
    assert f"constexpr int64_t kEdgeReducePartials = int64_t{{1}} << {shift};" in header


@pytest.mark.parametrize(
    ("args", "kernels"),
    [
        ((8, 2880, 4096, 720, 4096, 1, False, True),  # topm = 1: the similarity tiles select
         ["merge_prepare_kernel", "similarity_kernel", "merge_reduce_kernel"]),
        ((8, 2880, 4096, 720, 4096, 2, False, True),
         ["merge_prepare_kernel", "similarity_kernel", "select_targets_kernel", "merge_reduce_kernel"]),
        ((2, 30, 8, 30, 4, 1, False, True),  # K = N: no dropped tokens, no similarity
         ["merge_prepare_kernel", "merge_reduce_kernel"]),
        ((3, 50, 8, 7, 4, 4, True, False),  # kept mode with a query metric
         ["merge_prepare_kernel", "similarity_kernel", "select_targets_kernel", "merge_reduce_kernel"]),
        ((3, 50, 8, 7, 4, 1, True, False),
         ["merge_prepare_kernel", "similarity_kernel", "merge_reduce_kernel"]),
    ],
)  # fmt: skip
def test_merge_tokens_plan(args, kernels):
    plan = PLAN(*args)
    assert plan.shape == (4, 7) and plan.dtype == torch.int64
    assert _kernels(plan) == kernels
    used = plan[plan[:, 0] >= 0]
    assert (plan[len(used) :] == torch.tensor([-1, 0, 0, 0, 0, 0, 0])).all()
    assert (used[:, 1:4] >= 1).all() and (used[:, 4] == 256).all() and (used[:, 5] == 0).all()
    assert (used[:, 6] == 1).all()  # one launch chunk
    batch = args[0]
    for row, name in zip(used.tolist(), kernels, strict=True):
        if name == "merge_prepare_kernel":  # one block per 256 tokens of every sample
            assert row[1:4] == [-(-args[1] // 256), batch, 1]
        else:
            assert batch in row[2:4]


@pytest.mark.parametrize(
    ("args", "kernels"),
    [
        ((8, 577, 1024, 64, 144),  # edge_select reduces the similarity tiles' partials
         ["similarity_kernel", "edge_select_kernel", "bipartite_output_kernel"]),
        ((2, 8194, 16, 16, 100),  # more A tokens than kKeyTile: best_match reduces them first
         ["similarity_kernel", "best_match_kernel", "edge_select_kernel", "bipartite_output_kernel"]),
        ((2, 4098, 16, 16, 100),  # 2049 x 33 partials per sample: too many for every edge_select CTA
         ["similarity_kernel", "best_match_kernel", "edge_select_kernel", "bipartite_output_kernel"]),
        ((2, 4096, 16, 16, 100),  # 2048 x 32
         ["similarity_kernel", "edge_select_kernel", "bipartite_output_kernel"]),
        ((1, 1, 8, 8, 0), ["edge_select_kernel", "bipartite_output_kernel"]),
    ],
)  # fmt: skip
def test_bipartite_merge_plan(args, kernels):
    plan = BIPARTITE_PLAN(*args)
    assert _kernels(plan) == kernels
    b, n, _, _, r = args
    out = plan[len(kernels) - 1].tolist()
    assert out[1:3] == [n - r, b]  # one block per output row
    edges = plan[len(kernels) - 2].tolist()
    assert edges[1:3] == [-(-((n + 1) // 2) // 256), b]  # one block per 256 A tokens of every sample


@pytest.mark.parametrize(
    ("op", "args", "message"),
    [
        (PLAN, (0, 10, 8, 2, 4, 1, False, True), "batch must be >= 1, got 0"),
        (PLAN, (1, 10, 8, 0, 4, 1, False, True), "k must be in [1, n=10], got 0"),
        (PLAN, (1, 10, 8, 11, 4, 1, False, True), "k must be in [1, n=10], got 11"),
        (PLAN, (1, 10, 8, 3, 4, 4, False, True), "topm must be in [1, 3], got 4"),
        (PLAN, (1, 10, 8, 3, 4, 10, True, True), "topm must be in [1, 9], got 10"),
        (PLAN, (1, 10**8, 8, 3, 4, 1, False, True), "n must be in [1, 4194240], got 100000000"),
        (PLAN, (1, 10, 0, 3, 4, 1, False, True), "d must be >= 1, got 0"),
        (BIPARTITE_PLAN, (1, 9, 8, 4, 6), "r must be in [0, 5], got 6"),
        (BIPARTITE_PLAN, (1, 9, 8, 4, -1), "r must be in [0, 5], got -1"),
        (BIPARTITE_PLAN, (1, 1, 8, 4, 1), "r must be in [0, 0], got 1"),
        (BIPARTITE_PLAN, (1, 9, 8, 0, 1), "c must be >= 1, got 0"),
    ],
)
def test_plan_bad_arguments(op, args, message):
    name = "_merge_tokens_launch_plan" if op is PLAN else "_bipartite_merge_launch_plan"
    with pytest.raises(ValueError, match=re.escape(f"tokenkern.{name}: {message}")):
        op(*args)


HEADLINE = MergeCall("merge_tokens", 8, 2880, 4096, 720, 4096, metric_is_x=True)


def test_headline_merge_tokens_bytes_and_floors():
    """The compulsory bytes and floors of merge_tokens B=8 N=2880 K=720 D=4096 (metric = x)."""
    call = cuda_report.op_call(HEADLINE, {}, "not compiled in this test")
    b, n, k, d = 8, 2880, 720, 4096
    x, merged = b * n * d * 2, b * k * d * 2
    assert call.hbm_floor_bytes == x + merged + b * k * 8 + b * n * 4 + b * k * 4  # + keep, weight, mass
    # two kernels read x (the similarity, with the norms from its staged tiles, and the
    # reduction); no similarity matrix: the row-best partials (key, index per row and 64-column
    # tile) are written and read back once each
    partials = b * (n - k) * -(-k // 64) * 8
    small = b * (k * 8 * 3 + n * 4 * 2 + (n - k) * 4 * 8)  # keep, weights, lists, targets, flags...
    assert 2 * x + merged + 2 * partials < call.bytes_moved < 2 * x + merged + 2 * partials + small
    assert call.bytes_moved == sum(kr.compulsory_bytes for kr in call.kernels)
    flops = 2 * b * (n - k) * k * d
    assert call.params["compute_floor_flops"] == flops
    assert call.params["compute_floor_us"] == pytest.approx(flops / cuda_report.SM90_PEAK_FLOPS * 1e6, abs=0.01)
    assert call.passes_over_x == 2  # metric = x: the similarity and the reduction each read x
    separate = cuda_report.op_call(MergeCall("merge_tokens", 8, 2880, 4096, 720, 64), {}, "not compiled")
    assert separate.passes_over_x == 1  # the similarity reads the metric, the reduction x
    assert call.launches == len(call.kernels) == 3  # 3 kernels, no glue fills
    assert call.kernels[1].flops == flops + 2 * b * ((n - k) * -(-k // 64) + k * -(-(n - k) // 64)) * d
    assert all(kr.backend == "cuda" and kr.registers is None and "not compiled" in kr.notes for kr in call.kernels)


def test_merge_tokens_default_weight_is_a_glue_fill():
    call = cuda_report.op_call(MergeCall("merge_tokens", 2, 96, 64, 24, 16, weight=False), {})
    assert [kr.kernel for kr in call.kernels if kr.backend == "torch"] == ["torch.ones"]


@pytest.mark.skipif(not HAS_NVCC, reason="needs nvcc and the csrc/ sources")
def test_compiled_records_validate():
    calls = cuda_report.calls(small=True)
    report = schema.report_dict(calls, cuda_report.toolchain())
    schema.validate(report)
    compiled, why = cuda_report.compile_kernels()
    assert compiled, why
    for call in calls:
        for kr in call.kernels:
            if kr.backend == "torch":
                continue
            assert kr.registers is not None and 0 < kr.registers <= 255, (kr.kernel, kr.notes)
            assert kr.spill_bytes is not None and kr.spill_bytes >= 0
            assert kr.config["instantiation"] in compiled
            assert kr.ctas_per_sm is not None and kr.ctas_per_sm >= 1
            sass = compiled[kr.config["instantiation"]].sass
            if kr.kernel == "similarity_kernel":  # bf16 metric: tensor cores (WMMA)
                assert kr.tensor_cores is (True if sass else None)
            if sass and kr.kernel in ("similarity_kernel", "merge_reduce_kernel", "bipartite_output_kernel"):
                assert "16" in kr.config["global_loads_by_bytes"], (kr.kernel, kr.config["global_loads_by_bytes"])
    # every instantiation (float32 and float16 too, which the bf16 headline calls do not launch)
    # keeps everything in registers
    assert [k.name for k in compiled.values() if k.spill_stores or k.spill_loads or k.stack_bytes] == []
    # every kernel of the plan is in the cubin, for every dtype
    bases = {k.base for k in compiled.values()}
    assert set(cuda_report.PLAN_KERNELS) <= bases
