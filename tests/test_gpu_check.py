"""make gpu-check: its summary writer (tools/gpu_summary.py), its script's plumbing
(tools/gpu_check.sh, tools/gpu_sanitize.py), and the CUDA-only check it runs that no other test
file holds: every op captured in a CUDA graph replays to the eager result."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_registry import CASES, CPU_ONLY
from testing import HAS_CUDA

import tokenkern  # noqa: F401  (registers the ops)

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


summary_mod = _tool("gpu_summary")


def _bench(name: str, group: str, impl: str, median_s: float, **info) -> dict:
    return {"name": name, "group": group, "param": impl, "extra_info": {"impl": impl, **info},
            "stats": {"median": median_s, "iqr": median_s / 10, "rounds": 5}}  # fmt: skip


def _static_call(op: str, params: dict, launches: int, nbytes: int) -> dict:
    return {"op": op, "shape": "s", "params": params, "launches": launches, "bytes_moved": nbytes,
            "hbm_floor_bytes": nbytes // 3, "kernels": []}  # fmt: skip


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "gpu-check"
    run.mkdir()
    (run / "env.json").write_text(json.dumps({"device": "NVIDIA H200", "torch": "2.11.0"}))
    steps = [
        {"step": "build", "status": "ok", "rc": 0, "seconds": 80.5, "timeout_s": 240, "log": "", "why": ""},
        {"step": "tests-core", "status": "failed", "rc": 1, "seconds": 50.0, "timeout_s": 120, "log": "", "why": ""},
        {"step": "racecheck", "status": "timeout", "rc": 124, "seconds": 120.0, "timeout_s": 120, "log": "",
         "why": ""},
        {"step": "tests-rest", "status": "skipped", "rc": 0, "seconds": 0, "timeout_s": 0, "log": "",
         "why": "out of time"},
    ]  # fmt: skip
    (run / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    (run / "tests-core.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="10" failures="2" errors="1" '
        'skipped="3"></testsuite></testsuites>'
    )
    group = "merge_tokens B=8 N=2880 K=720 D=4096"
    info = {"B": 8, "N": 2880, "K": 720, "D": 4096, "dtype": "torch.bfloat16"}
    benches = [
        _bench("test_merge_tokens[8-2880-720-4096-tokenkern]", group, "tokenkern", 400e-6, floor_us=200.0, **info),
        _bench("test_merge_tokens[8-2880-720-4096-torch_scatter]", group, "torch_scatter", 2000e-6, floor_us=200.0,
               **info),
    ]  # fmt: skip
    (run / "bench-bench_merge.json").write_text(
        json.dumps({"machine_info": {"copy_bandwidth_GBps": 4000.0}, "benchmarks": benches})
    )
    calls = [
        _static_call("merge_tokens", {"B": 8, "N": 576, "K": 144, "D": 1024, "dtype": "bf16"}, 9, 10**6),
        _static_call("merge_tokens", {"B": 8, "N": 2880, "K": 720, "D": 4096, "dtype": "bf16",
                                      "compute_floor_us": 103.0}, 9, 8 * 10**8),
    ]  # fmt: skip
    (run / "static.json").write_text(json.dumps({"calls": calls}))
    return run


def test_summary_ratios_floors_and_static_estimate(run_dir: Path, tmp_path: Path):
    s = summary_mod.summarize(run_dir, dry=False, wall_s=421)
    ours, base = s["benchmarks"]
    assert ours["median_us"] == pytest.approx(400.0) and base["median_us"] == pytest.approx(2000.0)
    assert ours["speedup"] == {"torch_scatter": pytest.approx(5.0)}
    assert "speedup" not in base and base["static"] is None
    assert ours["x_floor"] == pytest.approx(2.0)
    st = ours["static"]
    assert st["label"] == "static, no GPU run" and st["launches"] == 9  # the N=2880 call, not N=576
    assert st["bytes_at_copy_bw_us"] == pytest.approx(8e8 / 4e12 * 1e6)  # 200 us
    assert st["estimate_us"] == pytest.approx(200.0)  # bytes dominate the 103 us compute floor
    assert s["failed_steps"] == ["tests-core", "racecheck"]
    assert s["steps"][1]["tests"] == {"passed": 4, "failed": 2, "errors": 1, "skipped": 3}
    js, md = summary_mod.write(s, tmp_path / "out")
    assert json.loads(js.read_text())["env"]["device"] == "NVIDIA H200"
    text = md.read_text()
    assert "static, no GPU run" in text and "torch_scatter 5.00x" in text
    assert "| tests-rest | skipped (out of time) |" in text and "Failed steps: tests-core, racecheck" in text


def test_summary_carries_the_vllm_prefill_rows(run_dir: Path, tmp_path: Path):
    assert summary_mod.summarize(run_dir, dry=False)["vllm_prefill"] == []
    rows = [
        {"config": "stock", "tokenkern": None, "prompts": 16, "median_s": 0.5, "requests_per_s": 32.0,
         "speedup_vs_stock": 1.0},
        {"config": "lofi", "tokenkern": {"method": "lofi", "keep": 0.25}, "prompts": 16, "median_s": 0.25,
         "requests_per_s": 64.0, "speedup_vs_stock": 2.0},
    ]  # fmt: skip
    (run_dir / "vllm-prefill.json").write_text(json.dumps(rows))
    s = summary_mod.summarize(run_dir, dry=False)
    assert [r["config"] for r in s["vllm_prefill"]] == ["stock", "lofi"]
    _, md = summary_mod.write(s, tmp_path / "out")
    assert "| lofi | 16 | 0.250 | 64.0 | 2.00 |" in md.read_text()


def test_static_match_needs_the_same_call(run_dir: Path):
    report = json.loads((run_dir / "static.json").read_text())
    row = {"op": "merge_tokens", "impl": "tokenkern", "info": {"B": 8, "N": 2880, "K": 720, "D": 4096,
                                                               "dtype": "torch.float32"}}  # fmt: skip
    assert summary_mod.static_match(row, report) is None  # bf16 only
    row["info"]["dtype"] = "torch.bfloat16"
    assert summary_mod.static_match(row, report)["launches"] == 9
    row["info"]["K"] = 288
    assert summary_mod.static_match(row, report) is None


def test_summary_cli_on_an_empty_run(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    assert summary_mod.main(["summary", "--run", str(run), "--out", str(tmp_path), "--dry", "1"]) == 0
    s = json.loads((tmp_path / "gpu-check.json").read_text())
    assert s["dry"] is True and s["benchmarks"] == [] and s["steps"] == []
    assert "DRY run" in (tmp_path / "gpu-check.md").read_text()
    assert summary_mod.main(["summary", "--run", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2


def test_script_names_existing_files():
    script = (ROOT / "tools/gpu_check.sh").read_text()
    subprocess.run(["bash", "-n", str(ROOT / "tools/gpu_check.sh")], check=True)
    tests = re.findall(r"tests/(test_\w+\.py)", script)
    suites = re.findall(r"\b(bench_\w+)\b", script)
    assert "test_registry.py" in tests and "test_gpu_check.py" in tests and "bench_merge" in suites
    for f in tests:
        assert (ROOT / "tests" / f).is_file(), f
    for s in suites:
        if s != "bench_step":
            assert (ROOT / "benchmarks" / f"{s}.py").is_file(), s


def test_sanitize_script_on_cpu():
    """The merge calls compute-sanitizer runs, on the CPU kernels: they match the reference."""
    done = subprocess.run([sys.executable, str(ROOT / "tools/gpu_sanitize.py"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 failures on cpu" in done.stdout


def _on_cuda(v: object) -> object:
    return v.cuda() if isinstance(v, torch.Tensor) else v


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("name", sorted(n for n in CASES if n not in CPU_ONLY))
def test_cuda_graph_capture(name):
    """Every op captured in a CUDA graph (no host sync on the CUDA path) replays to the
    eager result, bit for bit."""
    make, kwargs = CASES[name][0]
    args = [_on_cuda(a) for a in make("cuda")]
    kwargs = {k: _on_cuda(v) for k, v in kwargs.items()}
    op = getattr(torch.ops.tokenkern, name)
    with torch.no_grad():
        eager = op(*args, **kwargs)  # compiles and autotunes outside the capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            op(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = op(*args, **kwargs)
        graph.replay()
    torch.cuda.synchronize()
    eager = eager if isinstance(eager, tuple) else (eager,)
    captured = captured if isinstance(captured, tuple) else (captured,)
    for got, want in zip(captured, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
