"""The writer of ``make gpu-check``'s results (tools/gpu_check.sh).

    python tools/gpu_summary.py env --out RUN/env.json
    python tools/gpu_summary.py summary --run RUN --out DEST [--dry 1] [--wall SECONDS]

``summary`` reads RUN/env.json, RUN/steps.jsonl (one line per step), RUN/*.xml (pytest junit
counts), RUN/bench-*.json (pytest-benchmark) and RUN/static.json (the static kernel report) and
writes DEST/gpu-check.json and DEST/gpu-check.md: device, versions, steps, per benchmark the
median and IQR, its ratio to each baseline of its group (baseline median / ours), its ratio to
the floor, and the static estimate of the same call beside it (labelled "static, no GPU run").
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

STATIC_LABEL = "static, no GPU run"
# Static params compared with a benchmark's extra_info to find the same call.
_MATCH_KEYS = ("B", "N", "D", "K", "r", "hard", "shift")
_DTYPES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}


def _run(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        return "not found"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return f"unusable ({err})"
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return lines[-1] if lines else "unknown"


def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except Exception as err:  # any import failure is recorded, not raised
        return f"not importable ({type(err).__name__})"


def environment() -> dict[str, Any]:
    """Device and versions of this machine."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "driver": _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if cuda else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "nvcc": _run([shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc", "--version"]),
        "commit": _run(["git", "rev-parse", "HEAD"]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------------- reading


def read_steps(run: Path) -> list[dict[str, Any]]:
    """steps.jsonl, with pytest's junit counts added to the steps that wrote RUN/<step>.xml."""
    path = run / "steps.jsonl"
    steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    for s in steps:
        xml = run / f"{s['step']}.xml"
        if xml.exists():
            s["tests"] = junit_counts(xml)
    return steps


def junit_counts(path: Path) -> dict[str, int]:
    """passed / failed / errors / skipped of a pytest junit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return {"passed": passed, "failed": total["failures"], "errors": total["errors"], "skipped": total["skipped"]}


def read_benchmarks(run: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every benchmark of RUN/bench-*.json as a row, and the machine_info of the first file."""
    rows: list[dict[str, Any]] = []
    machine: dict[str, Any] = {}
    for path in sorted(run.glob("bench-*.json")):
        data = json.loads(path.read_text())
        machine = machine or data.get("machine_info", {})
        for bench in data.get("benchmarks", []):
            info = dict(bench.get("extra_info", {}))
            stats = bench.get("stats", {})
            rows.append({
                "suite": path.stem.removeprefix("bench-"),
                "op": bench["name"].split("[", 1)[0].removeprefix("test_"),
                "name": bench["name"],
                "group": bench.get("group") or bench["name"],
                "impl": info.get("impl", bench.get("param", "")),
                "median_us": round(stats["median"] * 1e6, 3),
                "iqr_us": round(stats.get("iqr", 0.0) * 1e6, 3),
                "rounds": stats.get("rounds"),
                "info": info,
            })  # fmt: skip
    return rows, machine


def read_vllm_prefill(run: Path) -> list[dict[str, Any]]:
    """The rows of RUN/vllm-prefill.json (benchmarks/vllm_prefill.py), [] when it did not run."""
    path = run / "vllm-prefill.json"
    return json.loads(path.read_text()) if path.exists() else []


def read_static(run: Path) -> dict[str, Any] | None:
    path = run / "static.json"
    return json.loads(path.read_text()) if path.exists() else None


# ------------------------------------------------------------------------------- combining


def is_ours(impl: str) -> bool:
    return impl.startswith("tokenkern")


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Per row of ours: speedup over every baseline of its group (baseline median / ours) and
    median / floor_us where the suite recorded a floor."""
    by_group: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_group.setdefault(row["group"], []).append(row)
    for row in rows:
        floor = row["info"].get("floor_us")
        row["x_floor"] = round(row["median_us"] / floor, 3) if floor else None
        if not is_ours(row["impl"]):
            continue
        row["speedup"] = {
            other["impl"]: round(other["median_us"] / row["median_us"], 3)
            for other in by_group[row["group"]]
            if not is_ours(other["impl"]) and row["median_us"] > 0
        }


def static_match(row: dict[str, Any], report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The static record of the same op call (op, B, N, D, K / r, dtype), or None."""
    if report is None or not is_ours(row["impl"]):
        return None
    info = row["info"]
    dtype = _DTYPES.get(str(info.get("dtype")), info.get("dtype"))
    for call in report.get("calls", []):
        p = call["params"]
        if call["op"] != row["op"] or (dtype is not None and p.get("dtype") not in (None, dtype)):
            continue
        if all(p.get(k) == info.get(k) for k in _MATCH_KEYS if k in p or k in info):
            return call
    return None


def static_estimate(call: dict[str, Any], copy_gbps: float | None) -> dict[str, Any]:
    """The static figures of a call and, with a measured copy bandwidth, the time its bytes
    take at that bandwidth (or its compute floor if larger): a lower bound of the design."""
    est: dict[str, Any] = {
        "label": STATIC_LABEL,
        "shape": call["shape"],
        "launches": call["launches"],
        "bytes_moved": call["bytes_moved"],
        "hbm_floor_bytes": call["hbm_floor_bytes"],
        "compute_floor_us": call["params"].get("compute_floor_us"),
    }
    if copy_gbps:
        bytes_us = call["bytes_moved"] / (copy_gbps * 1e9) * 1e6
        est["bytes_at_copy_bw_us"] = round(bytes_us, 2)
        est["estimate_us"] = round(max(bytes_us, est["compute_floor_us"] or 0.0), 2)
    return est


def summarize(run: Path, dry: bool, wall_s: float | None = None) -> dict[str, Any]:
    """The summary object of one gpu-check run folder."""
    env_path = run / "env.json"
    env = json.loads(env_path.read_text()) if env_path.exists() else {}
    steps = read_steps(run)
    rows, machine = read_benchmarks(run)
    add_ratios(rows)
    report = read_static(run)
    copy_gbps = machine.get("copy_bandwidth_GBps")
    for row in rows:
        call = static_match(row, report)
        row["static"] = static_estimate(call, copy_gbps) if call else None
    failed = [s["step"] for s in steps if s["status"] in ("failed", "timeout")]
    return {
        "kind": "gpu-check",
        "dry": dry,
        "env": env,
        "machine_info": machine,
        "wall_s": wall_s,
        "steps": steps,
        "failed_steps": failed,
        "benchmarks": rows,
        "vllm_prefill": read_vllm_prefill(run),
        "static_label": STATIC_LABEL,
        "static_calls": len(report["calls"]) if report else 0,
    }


# -------------------------------------------------------------------------------- markdown


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _tests(step: dict[str, Any]) -> str:
    t = step.get("tests")
    if not t:
        return ""
    return f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped"


def markdown(summary: dict[str, Any]) -> str:
    env = summary["env"]
    title = "gpu-check" + (" (DRY run on CPU: plumbing only, no measurement)" if summary["dry"] else "")
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {_fmt(v)}" for k, v in env.items()]
    if summary["machine_info"].get("copy_bandwidth_GBps"):
        lines.append(f"- measured copy bandwidth: {summary['machine_info']['copy_bandwidth_GBps']} GB/s")
    lines.append(f"- wall time: {_fmt(summary['wall_s'], 0)} s")
    lines += ["", "## Steps", "", "| step | status | seconds | tests |", "|---|---|---|---|"]
    for s in summary["steps"]:
        lines.append(f"| {s['step']} | {s['status']}{' (' + s['why'] + ')' if s.get('why') else ''} | "
                     f"{_fmt(s['seconds'])} | {_tests(s)} |")  # fmt: skip
    lines += ["", "## Benchmarks", "",
              f"Medians measured in this run; the static columns are the kernel report's ({STATIC_LABEL}): "
              "launches, bytes moved, and those bytes at the measured copy bandwidth (or the compute floor "
              "if larger).", "",
              "| group | impl | median us | IQR us | x floor | speedup vs baselines | static launches | "
              "static MB | static est. us |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in summary["benchmarks"]:
        speed = ", ".join(f"{k} {v:.2f}x" for k, v in r.get("speedup", {}).items()) or "-"
        st = r["static"] or {}
        mb = st["bytes_moved"] / 1e6 if st else None
        lines.append(f"| {r['group']} | {r['impl']} | {_fmt(r['median_us'])} | {_fmt(r['iqr_us'])} | "
                     f"{_fmt(r['x_floor'], 2)} | {speed} | {_fmt(st.get('launches'))} | {_fmt(mb)} | "
                     f"{_fmt(st.get('estimate_us'))} |")  # fmt: skip
    if summary.get("vllm_prefill"):
        lines += ["", "## vLLM prefill (tiny random-weight LLaVA-1.5, one token per request)", "",
                  "| config | prompts | median s | requests/s | x stock |", "|---|---|---|---|---|"]  # fmt: skip
        for r in summary["vllm_prefill"]:
            lines.append(f"| {r['config']} | {r['prompts']} | {_fmt(r['median_s'], 3)} | "
                         f"{_fmt(r['requests_per_s'])} | {_fmt(r['speedup_vs_stock'], 2)} |")  # fmt: skip
    if summary["failed_steps"]:
        lines += ["", f"Failed steps: {', '.join(summary['failed_steps'])} (logs in gpu-check/)."]
    return "\n".join(lines) + "\n"


def write(summary: dict[str, Any], dest: Path) -> tuple[Path, Path]:
    dest.mkdir(parents=True, exist_ok=True)
    js, md = dest / "gpu-check.json", dest / "gpu-check.md"
    js.write_text(json.dumps(summary, indent=1) + "\n")
    md.write_text(markdown(summary))
    return js, md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="make gpu-check's environment record and summary writer")
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="write the device and versions as JSON")
    env.add_argument("--out", required=True)
    summ = sub.add_parser("summary", help="write gpu-check.json and gpu-check.md from a run folder")
    summ.add_argument("--run", required=True)
    summ.add_argument("--out", required=True)
    summ.add_argument("--dry", default="0", choices=("0", "1"))
    summ.add_argument("--wall", type=float, default=None)
    args = parser.parse_args(argv)
    if args.command == "env":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(environment(), indent=1) + "\n")
        return 0
    run = Path(args.run)
    if not run.is_dir():
        print(f"gpu_summary: --run must be a folder, got {args.run}", file=sys.stderr)
        return 2
    js, md = write(summarize(run, args.dry == "1", args.wall), Path(args.out))
    print(f"gpu_summary: wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
