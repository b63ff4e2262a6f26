"""The static kernel report: its launch interception, budget checker and JSON schema."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from testing import run_compiling

from tokenkern.kernel_report import budget, schema
from tokenkern.kernel_report.schema import KernelLaunch, OpCall

ROOT = Path(__file__).resolve().parent.parent


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _cases(gen: torch.Generator) -> dict[str, Callable[[], object]]:
    """Small float32 calls of every Triton op face (the interpreter runs them)."""
    from tokenkern.ops import attention, diversity, gumbel, leverage, select, spectral

    x = _randn(gen, 2, 40, 24)
    q, k = _randn(gen, 1, 2, 5, 16), _randn(gen, 1, 2, 21, 16)
    xv = _randn(gen, 1, 14, 8)
    lse = torch.logsumexp(torch.einsum("bhqd,bhkd->bhqk", q, k) * 16**-0.5, dim=-1)
    logits, g = _randn(gen, 3, 50), _randn(gen, 3, 50)
    rel, mask = torch.rand(2, 40, generator=gen), torch.rand(2, 40, generator=gen) > 0.3
    pivots = torch.tensor([[3, 30, 12], [0, 39, 7]])
    candidates = torch.ones(2, 40, dtype=torch.bool).scatter_(1, pivots, False)
    return {
        "leverage_topk": lambda: leverage.leverage_topk_triton(x, 10, 3, 4, 1, 0),
        "spectral_ipr_top": lambda: spectral.spectral_ipr_triton(x, 2),
        "spectral_ipr_all": lambda: spectral.spectral_ipr_triton(x, -1),
        "attn_topk": lambda: attention.attn_topk_triton(q, k, xv, 4, key_start=3, key_end=17, causal=True),
        "attn_topk_lse": lambda: attention.attn_topk_triton(q, k, xv, 4, lse=lse, key_start=3, key_end=17),
        "topk_gather": lambda: select.topk_gather_triton(logits, _randn(gen, 3, 50, 8), 7),
        "gumbel_topk": lambda: gumbel.gumbel_topk_triton(logits, 7, 0.5, 3, True),
        "gumbel_topk_backward": lambda: gumbel.gumbel_topk_backward_cuda(g, logits, 7, 0.5, 3),
        "maxmin_select": lambda: diversity.maxmin_select_triton(x, 6, None),
        "dpp_select": lambda: diversity.dpp_select_triton(x, rel, 6, mask),
        "mmr_select": lambda: diversity.mmr_select_triton(x, rel, 6, 0.5, mask),
        "pivot_select": lambda: diversity.pivot_select_triton(x, pivots, candidates, 4),
    }


def _gpu_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launchers' GPU configuration (they read TRITON_INTERPRET at launch), with every kernel
    module imported first: triton.jit decides at import whether a kernel is interpreted, so a
    module first imported under TRITON_INTERPRET=0 would stay compiled for the tests after."""
    import importlib
    import pkgutil

    import tokenkern._triton

    for module in pkgutil.iter_modules(tokenkern._triton.__path__):
        importlib.import_module(f"tokenkern._triton.{module.name}")
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _interpreted_launches(run: Callable[[], object]) -> list[tuple[str, tuple[int, ...]]]:
    """(kernel, grid) of each program grid the interpreter actually executes."""
    from triton.runtime import interpreter

    seen: list[tuple[str, tuple[int, ...]]] = []
    original = interpreter.GridExecutor.__call__

    def call(self, *args, **kwargs):
        grid = tuple(int(n) for n in self.grid) + (1,) * (3 - len(self.grid))
        seen.append((self.fn.__name__, grid))
        return original(self, *args, **kwargs)

    interpreter.GridExecutor.__call__ = call
    try:
        run()
    finally:
        interpreter.GridExecutor.__call__ = original
    return seen


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="compares with the Triton interpreter")
@pytest.mark.parametrize("case", list(_cases(torch.Generator())))
def test_interception_records_the_launches_the_kernels_make(case, gen):
    from tokenkern.kernel_report.triton_report import record_launches

    run = _cases(gen)[case]
    actual = _interpreted_launches(run)
    with record_launches(execute=False) as launches:
        run()
    recorded = [(launch.name, launch.grid) for launch in launches if launch.backend == "triton"]
    assert actual and recorded == actual


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="compares with the Triton interpreter")
def test_recording_skips_execution_and_counts_torch_launches(gen):
    from tokenkern.kernel_report.triton_report import record_launches
    from tokenkern.ops import leverage

    x = _randn(gen, 2, 40, 24)

    with record_launches(execute=False) as launches:
        _, _, scores = leverage.leverage_topk_triton(x, 10, 3, 4, 1, 0)
        norms = torch.linalg.vector_norm(x, dim=-1)
    poison = os.environ.get("TOKENKERN_POISON") == "1"  # outputs then start as NaN: fill_ launches
    torch_ops = [launch.name for launch in launches if launch.backend == "torch"]
    assert [name for name in torch_ops if not (poison and name == "torch.fill_")] == ["torch.linalg_vector_norm"]
    assert norms.shape == (2, 40)
    # TOKENKERN_POISON fills outputs with NaN: a skipped row_scores leaves them so.
    assert os.environ.get("TOKENKERN_POISON") != "1" or bool(torch.isnan(scores).all())


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="records through the Triton interpreter")
def test_spectral_ipr_all_is_one_launch_once_the_counters_exist(gen):
    """All singular values: one Triton launch and no torch op per call; the ticket counters
    (one torch.zeros per stream, ever) are allocated by record_launches before it records."""
    from tokenkern.kernel_report.triton_report import _no_poison, record_launches
    from tokenkern.ops import spectral

    x = _randn(gen, 3, 150, 70)  # min(N, D) = 70: 2 x 2 tiles, folded onto 1 x 3 programs
    with _no_poison(), record_launches(execute=False) as launches:
        spectral.spectral_ipr_triton(x, -1)
    assert [(launch.name, launch.grid) for launch in launches] == [("_gram_ipr_kernel", (3 * 3, 1, 1))]


def _kernel(**over: object) -> KernelLaunch:
    base = KernelLaunch(
        op="toy", shape="B=8 N=2880", kernel="_k", backend="triton", grid=[264, 1, 1], ctas=264, threads=128,
        registers=64, spill_bytes=0, shared_bytes=1024, ctas_per_sm=8, limiter="registers", sm_fill=0.25,
        compulsory_bytes=1000, tensor_cores=False,
    )  # fmt: skip
    return replace(base, **over)


def _call(kernels: list[KernelLaunch], params: dict, op: str = "toy", floor: int = 1000, passes: float = 1) -> OpCall:
    return OpCall(
        op=op, shape=kernels[0].shape, params=params, launches=len(kernels), kernels=kernels,
        bytes_moved=sum(k.compulsory_bytes for k in kernels), hbm_floor_bytes=floor, floor_formula="|x|",
        passes_over_x=passes, passes_formula="1",
    )  # fmt: skip


def _report(*calls: OpCall) -> dict:
    report = schema.report_dict(list(calls), {"triton": "test"})
    schema.validate(report)
    return report


def test_budget_passes_a_clean_call():
    report = _report(_call([_kernel()], {"B": 8, "N": 2880}))
    assert budget.breaches(report) == []
    assert budget.check(report, allowed={}).ok


def test_budget_flags_synthetic_breaches():
    spilling = _kernel(kernel="_spill", spill_bytes=96)
    narrow = _kernel(kernel="_narrow", grid=[8, 1, 1], ctas=8)
    tiny = _kernel(kernel="_tiny", grid=[8, 1, 1], ctas=8, compulsory_bytes=1)  # < 10% of the bytes: no grid budget
    b8 = _call([spilling, narrow, tiny], {"B": 8, "N": 2880}, op="gumbel_topk", floor=1000)
    b1 = _call([_kernel(shape="B=1", grid=[1, 1, 1], ctas=1)], {"B": 1, "N": 2880})
    found = {(b.op, b.kernel, b.budget): b.value for b in budget.breaches(_report(b8, b1))}
    assert found == {
        ("gumbel_topk", "_spill", "spills"): 96,
        ("gumbel_topk", "_narrow", "grid_b8"): 8,
        ("gumbel_topk", "", "launches"): 3,  # gumbel_topk: 1 launch
        ("gumbel_topk", "", "bytes"): 2.0,  # 2001 bytes > 1.2 x 1 pass x 1000
        ("toy", "_k", "per_sample_b1"): 1,
    }
    verdict = budget.check(_report(b8, b1), allowed={})
    assert not verdict.ok and len(verdict.new) == 5
    assert "NEW BREACH gumbel_topk _spill spills: 96" in budget.format_verdict(verdict, {})


def test_allow_list_holds_breaches_and_fails_when_obsolete_or_worse():
    call = _call([_kernel(kernel="_spill", spill_bytes=96)], {"B": 8, "N": 2880})
    report = _report(call)
    assert budget.check(report, allowed={("toy", "_spill", "spills"): 96}).ok
    assert budget.check(report, allowed={("toy", "_spill", "spills"): 200}).ok  # better than listed
    worse = budget.check(report, allowed={("toy", "_spill", "spills"): 40})
    assert not worse.ok and worse.worse[0][1] == 40
    stale = {("toy", "_spill", "spills"): 96, ("toy", "_gone", "spills"): 8}
    verdict = budget.check(report, allowed=stale)
    assert not verdict.ok and verdict.obsolete == [(("toy", "_gone", "spills"), 8)]
    assert "OBSOLETE allow-list entry toy _gone spills" in budget.format_verdict(verdict, stale)
    # a grid breach improves as CTAs grow
    narrow = _report(_call([_kernel(kernel="_n", grid=[64, 1, 1], ctas=64)], {"B": 8}))
    assert budget.check(narrow, allowed={("toy", "_n", "grid_b8"): 8}).ok
    assert not budget.check(narrow, allowed={("toy", "_n", "grid_b8"): 100}).ok


def test_allow_list_source_round_trips():
    call = _call([_kernel(kernel="_spill", spill_bytes=96)], {"B": 8, "N": 2880})
    found = budget.breaches(_report(call))
    namespace: dict = {}
    exec(budget.allow_list_source(found), namespace)
    assert namespace["ALLOWED"] == {("toy", "_spill", "spills"): 96}


def test_ctas_per_sm_on_sm90():
    assert schema.ctas_per_sm(128, 255, 57344) == (2, "registers")  # 255 -> 256 regs x 128 threads
    assert schema.ctas_per_sm(128, 24, 0) == (16, "threads")
    assert schema.ctas_per_sm(32, 16, 0) == (32, "ctas")
    assert schema.ctas_per_sm(128, 64, 100 * 1024) == (2, "shared")
    assert schema.sm_fill(132, 2) == 0.5


@pytest.mark.parametrize(
    "break_it",
    [
        lambda r: r.pop("label"),
        lambda r: r["calls"][0].pop("floor_formula"),
        lambda r: r["calls"][0].update(launches=2),
        lambda r: r["calls"][0].update(bytes_moved=1),
        lambda r: r["calls"][0]["kernels"][0].update(backend="opencl"),
        lambda r: r["calls"][0]["kernels"][0].update(grid=[2, 1]),
        lambda r: r["calls"][0]["kernels"][0].update(registers="many"),
    ],
)
def test_schema_rejects_broken_reports(break_it):
    report = _report(_call([_kernel()], {"B": 8}))
    break_it(report)
    with pytest.raises(ValueError, match=r"tokenkern\.kernel_report"):
        schema.validate(report)


_SMALL_REPORT = """
import json, sys
from tokenkern.kernel_report import budget, build_report, format_table, write_json
report = build_report(small=True, sides=("triton_report",))
write_json(report, sys.argv[1])
print(format_table(report))
"""


def test_small_report_compiles_and_validates(tmp_path):
    """The sm_90 compile path at tiny shapes, in a fresh interpreter (TRITON_INTERPRET unset)."""
    pytest.importorskip("triton.backends.nvidia")
    out = tmp_path / "report.json"
    proc = run_compiling(_SMALL_REPORT, str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    schema.validate(report)
    assert "static, no GPU run" in proc.stdout
    kernels = {k["kernel"]: k for c in report["calls"] for k in c["kernels"]}
    gather = kernels["_topk_gather_kernel"]
    assert gather["registers"] > 0 and gather["threads"] == 128 and gather["spill_bytes"] == 0
    assert gather["config"]["num_warps"] == 4 and "BLOCK_ROWS" in gather["config"]["constexprs"]
    budget.breaches(report)  # the checker reads every record of a real report


def test_committed_report_validates():
    path = ROOT / "benchmarks" / "results" / "static" / "sm90.json"
    if not path.exists():
        pytest.skip("no committed static report (make kernel-report writes it)")
    schema.validate(json.loads(path.read_text()))


def test_gumbel_rows_are_split_at_the_headline_shapes(monkeypatch):
    """gumbel_topk and its backward (every mode) launch one flat grid of S x B >= 132 programs at
    B = 8, N = 2880, and the report notes the row re-reads as L2 traffic."""
    from tokenkern.kernel_report.triton_report import _gumbel_calls, _kernel_bytes, record_launches

    _gpu_configuration(monkeypatch)
    for call in _gumbel_calls(8, 2880):
        inputs = call.make()
        with record_launches() as launches:
            call.run(inputs)
        triton = [launch for launch in launches if launch.backend == "triton"]
        assert len(triton) == 1, call.shape
        named = dict(zip(triton[0].fn.arg_names, triton[0].args, strict=False))
        s = named["S"]
        assert triton[0].grid[:1] == (8 * s,) and 8 * s >= 132, (call.shape, triton[0].grid, s)
        row_bytes = 8 * 2880 * 4
        nbytes, note = _kernel_bytes(triton[0])
        assert f"{s} programs per row" in note and "L2" in note
        assert 2 * row_bytes <= nbytes <= 3 * row_bytes + 8 * 2 * 8, (call.shape, nbytes)  # HBM: each tensor once


def test_greedy_kernels_count_what_they_touch(monkeypatch, gen):
    """maxmin's first pick reads all of G (its step rows again where G exceeds the L2); mmr and
    dpp read its diagonal and one row per pick; dpp's step re-reads of its Cholesky scratch (at
    step i, i entries of each candidate still unselected) count where the scratch exceeds the L2."""
    import dataclasses

    from tokenkern.kernel_report import triton_report
    from tokenkern.kernel_report.schema import SM90
    from tokenkern.ops import diversity

    _gpu_configuration(monkeypatch)
    b, n, k = 2, 40, 6
    x, rel = _randn(gen, b, n, 24), torch.rand(b, n, generator=gen)
    mask = torch.rand(b, n, generator=gen) > 0.3
    runs = {
        "maxmin_select": lambda: diversity.maxmin_select_triton(x, k, None),
        "mmr_select": lambda: diversity.mmr_select_triton(x, rel, k, 0.5, None),
        "dpp_select": lambda: diversity.dpp_select_triton(x, rel, k, None),
        "dpp_select (mask)": lambda: diversity.dpp_select_triton(x, rel, k, mask),
    }
    g_whole, diag = b * n * n * 4, b * n * SM90.sector_bytes
    candidates = {"dpp_select": [n] * b, "dpp_select (mask)": mask.sum(dim=1).tolist()}
    for l2 in (SM90.l2_bytes, 1000):
        monkeypatch.setattr(triton_report, "SM90", dataclasses.replace(SM90, l2_bytes=l2))
        for op, run in runs.items():
            with triton_report.record_launches() as launches:
                run()
            (greedy,) = [launch for launch in launches if launch.name in ("_greedy_kernel", "_dpp_kernel")]
            each_once = sum(greedy.tensors.values())  # every tensor argument once, G whole
            nbytes, note = triton_report._kernel_bytes(greedy)
            if op == "maxmin_select":  # G whole, and its step rows again once the scan evicted them
                assert nbytes == each_once + (b * (k - 1) * n * 4 if l2 == 1000 else 0) and "first pick" in note
            elif op == "mmr_select":
                assert nbytes == each_once - g_whole + diag + b * (k - 1) * n * 4
            else:
                rereads = 4 * sum(max(c - i - 1, 0) * i for c in candidates[op] for i in range(k))
                counted = rereads if l2 == 1000 else 0
                assert nbytes == each_once - g_whole + diag + b * k * n * 4 + counted, (l2, nbytes)
                assert ("upper bound" in note) == (l2 == 1000) and ("L2 traffic" in note) == (l2 != 1000)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts the Triton interpreter's loads")
def test_dpp_scratch_rereads_are_what_the_kernel_loads(monkeypatch, gen):
    """The interpreted _dpp_kernel loads, of its Cholesky scratch, exactly the model's re-reads
    (at step i, i entries of each candidate still unselected) plus the pick's own entries, which
    each of the sample's programs reads (one program under the interpreter)."""
    import numpy as np
    from triton.runtime import interpreter

    from tokenkern.kernel_report.triton_report import _live_rereads
    from tokenkern.ops import diversity

    scratch = {"shape": None, "range": (0, 0), "floats": 0}
    load = interpreter.InterpreterBuilder.create_masked_load

    def counting_load(self, ptrs, mask, *args):
        lo, hi = scratch["range"]
        p = ptrs.data.astype(np.uint64)
        scratch["floats"] += int(((p >= lo) & (p < hi) & mask.data.astype(bool)).sum())
        return load(self, ptrs, mask, *args)

    empty = torch.empty

    def tracked_empty(*shape, **kwargs):
        t = empty(*shape, **kwargs)
        if t.dtype == torch.float32 and tuple(t.shape) == scratch["shape"]:
            scratch["range"] = (t.data_ptr(), t.data_ptr() + t.numel() * 4)
        return t

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", counting_load)
    monkeypatch.setattr(torch, "empty", tracked_empty)
    for b, n, k, masked in [(2, 40, 6, False), (2, 40, 6, True), (1, 30, 25, True), (1, 50, 20, False)]:
        x, rel = _randn(gen, b, n, 24), torch.rand(b, n, generator=gen)
        mask = torch.rand(b, n, generator=gen) > 0.3 if masked else None
        candidates = [n] * b if mask is None else mask.sum(dim=1).tolist()
        scratch.update(shape=(b, n, k), range=(0, 0), floats=0)
        diversity.dpp_select_triton(x, rel, k, mask)
        assert scratch["range"] != (0, 0)
        # the pick's entries 0..i-1 at step i, while it is a candidate (past them: none)
        picks = sum(i for c in candidates for i in range(min(k, c)))
        assert scratch["floats"] == sum(_live_rereads(c, k) for c in candidates) + picks, (b, n, k, masked)


def test_gram_calls_state_the_compute_floor():
    """The greedy diversity calls' floor includes the symmetric Gram GEMM (B N^2 D FLOPs at the
    target's dense bf16 peak), beside the bytes of x, in their params, formula and table line."""
    from tokenkern.kernel_report import format_table
    from tokenkern.kernel_report.schema import SM90
    from tokenkern.kernel_report.triton_report import _diversity_calls

    b, n, k, d = 8, 2880, 720, 4096
    for call in _diversity_calls(b, n, k, d):
        flops = b * n * n * d
        assert call.params["compute_floor_flops"] == flops
        assert call.params["compute_floor_us"] == pytest.approx(flops / SM90.peak_flops * 1e6, abs=0.01)
        assert f"{flops / 1e9:.1f} GFLOP" in call.floor_formula and "larger of the two" in call.floor_formula
        record = {"op": call.op, "shape": call.shape, "params": call.params, "launches": 0, "bytes_moved": 1,
                  "hbm_floor_bytes": 1, "passes_over_x": 1, "kernels": []}  # fmt: skip
        line = format_table({"target": {"name": SM90.name}, "calls": [record]}).splitlines()[2]
        assert line.endswith(f"compute floor {flops / 1e9:.1f} GFLOP = {call.params['compute_floor_us']} us"), line


def test_docs_static_tables_are_the_committed_report():
    """README.md and docs/performance.md hold the committed report's static tables, as
    ``python -m tokenkern kernels --docs`` writes them (no number typed by hand)."""
    from tokenkern.kernel_report import tables

    path = ROOT / "benchmarks" / "results" / "static" / "sm90.json"
    if not path.exists():
        pytest.skip("no committed static report (make kernel-report writes it)")
    report = json.loads(path.read_text())
    found = {}
    for rel in tables.DOCS:
        for name, body in tables.blocks((ROOT / rel).read_text()).items():
            assert body == tables.table(report, name), f"{rel}: static-table:{name} differs from {path.name}"
            found[name] = rel
    assert found == {"headline": "README.md", "all": "docs/performance.md"}, found


def test_static_tables_rewrite_their_blocks_only():
    from tokenkern.kernel_report import tables

    call = {"op": "topk_gather", "shape": "B=1 N=8 D=4 bf16 k=2", "params": {"B": 1}, "launches": 1,
            "bytes_moved": 300, "hbm_floor_bytes": 200, "passes_over_x": 1,
            "kernels": [{"kernel": "k", "backend": "triton", "ctas": 1, "spill_bytes": 0, "compulsory_bytes": 300,
                         "flops": None, "notes": ""}]}  # fmt: skip
    report = {"target": {"name": "sm_90"}, "toolchain": {"triton": "3.6.0"}, "calls": [call]}
    text = "before\n<!-- static-table:all -->\nstale\n<!-- /static-table -->\nafter\n"
    new = tables.update_text(text, report)
    assert new.startswith("before\n<!-- static-table:all -->\n") and new.endswith("<!-- /static-table -->\nafter\n")
    body = tables.blocks(new)["all"]
    assert "stale" not in body and "| `topk_gather` B=1 N=8 D=4 bf16 k=2 | 1 | 0.00 MB | 1 × 0.00 MB | 1.50x |" in body
    assert body.rstrip().endswith("| bytes 1.5 |")  # 300 > 1.2 x 200: a breach of the bytes budget
    assert tables.update_text(new, report) == new
    with pytest.raises(ValueError, match="static-table name must be one of"):
        tables.update_text("<!-- static-table:nope -->\n<!-- /static-table -->", report)
    with pytest.raises(ValueError, match=r"no call .* of the headline table"):
        tables.table(report, "headline")
