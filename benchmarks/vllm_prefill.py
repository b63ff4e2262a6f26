"""vLLM prefill throughput with and without tokenkern pruning (the plugin), on the tiny
random-weight LLaVA-1.5 of tests/vllm (or any LLaVA-1.5 directory given with --model).

    .venv-vllm/bin/python benchmarks/vllm_prefill.py [--model DIR] [--prompts 16] [--repeats 3]
        [--configs stock,lofi,fastervlm] [--json FILE]

Each configuration gets its own engine (in this process, prefix caching and the processor cache
off); a round generates one token for a batch of prompts with one new image each (no cache
hit), so its time is the prefill, encoder included. Reports the
median round time, requests/s and the speed-up over the stock engine, measured in one run.
Run it from the repository root with the environment's installed tokenkern (make test-vllm).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "vllm"))

# name -> the "tokenkern" key of hf_overrides (None: the stock engine, the baseline)
CONFIGS = {
    "stock": None,
    "uniform": {"method": "uniform", "keep": 0.25},
    "lofi": {"method": "lofi", "keep": 0.25, "rank": 8},
    "fastervlm": {"method": "fastervlm", "keep": 0.25},
}


def _round(llm, sampling, prompts: int, first_image: int) -> float:
    import tiny_llava

    requests = [
        {"prompt": f"USER: <image>\nquestion {i} ASSISTANT:",
         "multi_modal_data": {"image": tiny_llava.random_image(first_image + i)}}
        for i in range(prompts)
    ]  # fmt: skip
    start = time.perf_counter()
    llm.generate(requests, sampling, use_tqdm=False)
    return time.perf_counter() - start


def measure(model: str, prompts: int, repeats: int, dtype: str, names: list[str],
            gpu_memory: float = 0.2) -> list[dict]:  # fmt: skip
    from vllm import LLM, SamplingParams

    sampling = SamplingParams(temperature=0.0, max_tokens=1)
    rows = []
    for name in names:
        cfg = CONFIGS[name]
        llm = LLM(model=model, dtype=dtype, enforce_eager=True, max_model_len=512, max_num_seqs=prompts, seed=0,
                  distributed_executor_backend="uni", enable_prefix_caching=False, mm_processor_cache_gb=0,
                  gpu_memory_utilization=gpu_memory, hf_overrides={"tokenkern": cfg} if cfg else {})  # fmt: skip
        _round(llm, sampling, prompts, 0)  # warm-up
        times = [_round(llm, sampling, prompts, (r + 1) * prompts) for r in range(repeats)]
        median = statistics.median(times)
        rows.append({"config": name, "tokenkern": cfg, "prompts": prompts, "median_s": median,
                     "requests_per_s": prompts / median})  # fmt: skip
        del llm
        gc.collect()
    base = rows[0]["median_s"]  # stock
    for row in rows:
        row["speedup_vs_stock"] = base / row["median_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a LLaVA-1.5 directory (default: build the tiny one)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated, starting with stock (the baseline), of {', '.join(CONFIGS)}",
    )
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.2,
        help="each engine's share of GPU memory (the engines run one after another)",
    )
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or names[0] != "stock":
        parser.error(
            f"--configs must start with stock and name configurations of {sorted(CONFIGS)}, got {args.configs!r}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            import tiny_llava

            model = str(tiny_llava.build(Path(tmp) / "tiny-llava"))
        rows = measure(model, args.prompts, args.repeats, args.dtype, names, args.gpu_memory_utilization)
    print(f"{'config':<22} {'median s':>9} {'req/s':>8} {'x stock':>8}")
    for r in rows:
        print(f"{r['config']:<22} {r['median_s']:>9.3f} {r['requests_per_s']:>8.1f} {r['speedup_vs_stock']:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
