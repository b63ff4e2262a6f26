"""The kernel sweep: every configuration the launchers choose, compiled for sm_90, must launch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from testing import run_compiling

from tokenkern.kernel_report.schema import SM90
from tokenkern.kernel_report.sweep import SPILLS_ALLOWED, Result, spill_verdict


def test_problems_name_what_would_not_launch():
    fits = Result(
        "k", "case", 4, (132, 1, 1), registers=255, shared_bytes=SM90.smem_per_sm - SM90.smem_reserved_per_cta
    )
    assert fits.problems() == []
    smem = Result("k", "case", 4, (1, 1, 1), registers=32, shared_bytes=262144)
    assert smem.problems() == ["needs 262144 bytes of shared memory, a block may have 232448"]
    grid = Result("k", "case", 4, (1, 65536, 1), registers=32)
    assert grid.problems() == ["grid (1, 65536, 1) exceeds CUDA's (2147483647, 65535, 65535)"]
    regs = Result("k", "case", 32, (1, 1, 1), registers=255)  # 1024 threads x 255 > 65536
    assert regs.problems() == ["255 registers x 1024 threads exceed an SM's 65536"]


def test_spill_verdict_flags_unlisted_larger_and_obsolete_entries():
    allowed = {("_k", "fp32"): 100, ("_k", "d=256"): 50, ("_gone", "x"): 10}
    results = [Result("_k", "op B=1 fp32", 8, (1, 1, 1), registers=255, spill_bytes=100),
               Result("_k", "op B=1 bf16 d=256", 8, (1, 1, 1), registers=255, spill_bytes=60),
               Result("_other", "op fp32", 8, (1, 1, 1), registers=255, spill_bytes=4),
               Result("_gone", "x", 8, (1, 1, 1), registers=40)]  # fmt: skip
    breaches, obsolete = spill_verdict(results, allowed)
    assert len(breaches) == 2
    assert "op B=1 bf16 d=256: 60 bytes" in breaches[0] and "= 50" in breaches[0]
    assert "_other at op fp32: 4 bytes" in breaches[1] and "not in SPILLS_ALLOWED" in breaches[1]
    assert obsolete == ["SPILLS_ALLOWED('_gone', 'x') = 10 covers no spill: drop it"]
    assert spill_verdict(results[:1], {("_k", "fp32"): 100}) == ([], [])


ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "benchmarks" / "results" / "static"


def test_committed_sweep_launches_and_covers_the_report():
    """benchmarks/results/static/sweep.json (make kernel-sweep): no configuration that could not
    launch, and every Triton kernel of the headline report is among those swept."""
    if not (STATIC / "sweep.json").exists() or not (STATIC / "sm90.json").exists():
        pytest.skip("no committed sweep or report (make kernel-sweep, make kernel-report)")
    sweep = json.loads((STATIC / "sweep.json").read_text())
    assert sweep["label"] == "static, no GPU run" and sweep["specializations"] == len(sweep["results"]) > 0
    assert [r for r in sweep["results"] if r["problems"]] == []
    fields = ("kernel", "case", "num_warps", "registers", "spill_bytes", "shared_bytes")
    results = [Result(**{f: r[f] for f in fields}, grid=tuple(r["grid"])) for r in sweep["results"]]
    assert spill_verdict(results) == ([], []), "make kernel-sweep: spills outside SPILLS_ALLOWED, or stale entries"
    assert all(v > 0 for v in SPILLS_ALLOWED.values())
    limit = SM90.smem_per_sm - SM90.smem_reserved_per_cta
    assert all(0 < r["registers"] <= 255 and r["shared_bytes"] <= limit for r in sweep["results"])
    report = json.loads((STATIC / "sm90.json").read_text())
    headline = {k["kernel"] for c in report["calls"] for k in c["kernels"] if k["backend"] == "triton"}
    assert headline <= {r["kernel"] for r in sweep["results"]}, headline - {r["kernel"] for r in sweep["results"]}


_SWEEP = """
import json, sys, torch
from tokenkern._triton import attention
from tokenkern.kernel_report import sweep

def colsum(dtype, blocks):  # groups=None: the heads may be split, the launcher's widest key tiles
    q, k = torch.empty(1, 2, 300, 128, dtype=dtype), torch.empty(1, 2, 300, 128, dtype=dtype)
    return attention.column_sums(q, k, None, 0.1, 0, 300, None, None, None, True, blocks=blocks, groups=None)

cases = [sweep.Case("attn_scores", "float32, 128 x 128 key tiles", lambda: colsum(torch.float32, (64, 128, 128))),
         sweep.Case("attn_scores", "bf16, the launcher's tiles", lambda: colsum(torch.bfloat16, None)),
         sweep.Case("attn_scores", "fp32, the launcher's tiles", lambda: colsum(torch.float32, None))]
results = sweep.run(cases)
print(sweep.format_results(results))
json.dump([[r.kernel, r.case, r.shared_bytes, r.problems()] for r in results], open(sys.argv[1], "w"))
"""


def test_sweep_compiles_and_flags_a_block_past_the_shared_memory(tmp_path):
    """In a fresh interpreter (TRITON_INTERPRET unset): float32 column sums forced to 128-wide
    key tiles need more shared memory than a block may have; the launcher's own tiles (bf16 and
    float32) fit."""
    pytest.importorskip("triton.backends.nvidia")
    out = tmp_path / "sweep.json"
    proc = run_compiling(_SWEEP, str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    limit = SM90.smem_per_sm - SM90.smem_reserved_per_cta
    forced = [r for r in results if r[0] == "_colsum_kernel" and "float32" in r[1]]
    assert len(forced) == 1 and forced[0][2] > limit and "shared memory" in forced[0][3][0], results
    own = [r for r in results if "launcher's tiles" in r[1]]
    assert {r[1].split(",")[0] for r in own} == {"attn_scores bf16", "attn_scores fp32"}, results
    assert all(r[2] <= limit and not r[3] for r in own), results
    assert "WOULD NOT LAUNCH _colsum_kernel at attn_scores float32" in proc.stdout
    assert "sweep: FAILED" in proc.stdout and "static, no GPU run" in proc.stdout
