#!/usr/bin/env bash
# make gpu-check [DRY=1]: one run that turns a lent H100/H200 into measured numbers (<= 8 min).
#   env        device, driver, library versions (env.json)
#   build      pip install --no-build-isolation --no-deps -e . for sm_90 (the CUDA extension)
#   tests-*    the GPU test subset in three pytest runs (every op vs reference incl. bf16, CUDA
#              graph capture, torch.compile(fullgraph=True), opcheck on CUDA), junit XML each
#   memcheck / racecheck   compute-sanitizer on a small merge script (tools/gpu_sanitize.py)
#   bench-*    the benchmark suites at their GPU (headline) shapes, one JSON per suite (make
#              bench's pytest run, with fewer rounds so that it fits)
#   vllm-prefill  benchmarks/vllm_prefill.py (tiny LLaVA, stock vs pruned) when vLLM is installed
#   static     the static kernel report (benchmarks/results/static/sm90.json when present)
#   summary    gpu-check.json + gpu-check.md (tools/gpu_summary.py)
# into $OUT when set, else benchmarks/results/ (build/gpu-check-dry/ for DRY=1). Each step has
# its own timeout, cut to what is left of GPU_CHECK_BUDGET_S (470 s); a failing, timed-out or
# skipped step is recorded and the script goes on. It exits 1 if a step failed or timed out.
# Order: what the first GPU run must produce first (build, core tests, sanitizers, benchmarks),
# then the longer test groups.
#
# DRY=1 runs the plumbing on CPU: each step in its dry form (import check instead of the build,
# pytest --collect-only, the sanitizer script on CPU, a one-round benchmark smoke, the summary
# writer on the smoke JSON). make test runs it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DRY=${DRY:-0}
# A dry run never writes into benchmarks/results/ unless OUT says so.
if [ "$DRY" = 1 ]; then DEST=${OUT:-build/gpu-check-dry}; else DEST=${OUT:-benchmarks/results}; fi
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
RUN="$DEST/gpu-check"
rm -rf "$RUN"
mkdir -p "$RUN"
STEPS="$RUN/steps.jsonl"
: >"$STEPS"
SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
START=$(date +%s)

BUDGET=${GPU_CHECK_BUDGET_S:-470}  # seconds for all steps; the summary needs a few more

now() { date +%s.%N; }
seconds_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

record() {  # record NAME STATUS RC SECONDS TIMEOUT LOG WHY
  printf '{"step": "%s", "status": "%s", "rc": %d, "seconds": %s, "timeout_s": %d, "log": "%s", "why": "%s"}\n' \
    "$1" "$2" "$3" "$4" "$5" "$6" "$7" >>"$STEPS"
}

skip() {
  record "$1" skipped 0 0 0 "" "$2"
  echo "gpu-check: $1 skipped ($2)"
}

# step NAME TIMEOUT_S CMD...: runs CMD with its own timeout (cut to what is left of $BUDGET),
# output in $RUN/NAME.log, one line in steps.jsonl.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - $(date +%s) + START))
  if [ "$left" -lt 10 ]; then
    skip "$name" "out of time (budget ${BUDGET}s)"
    return 0
  fi
  [ "$limit" -le "$left" ] || limit=$left
  local t0 rc status
  t0=$(now)
  echo "gpu-check: $name (timeout ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$RUN/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  record "$name" "$status" "$rc" "$(seconds_since "$t0")" "$limit" "gpu-check/$name.log" ""
  [ "$status" = ok ] || echo "gpu-check: $name $status (rc $rc), see $RUN/$name.log"
  return 0
}

# The GPU test subset: the files with CUDA-only cases (HAS_CUDA-gated devices, dtypes, tests),
# in three groups; the first holds opcheck / compile / CUDA-graph capture and the merge kernels.
TESTS_CORE="tests/test_registry.py tests/test_gpu_check.py tests/test_merge.py tests/test_merge_kernels.py
  tests/test_merge_rules.py tests/test_topk_gather.py"
TESTS_TRITON="tests/test_attention.py tests/test_leverage.py tests/test_gumbel.py tests/test_diversity_triton.py
  tests/test_diversity.py"
TESTS_REST="tests/test_metrics.py tests/test_autograd.py tests/test_bad_inputs.py tests/test_numerics.py"
BENCH_FAST="bench_merge bench_topk_gather bench_attention bench_gumbel bench_spectral_ipr bench_diversity bench_ritz"

pytest_step() {  # pytest_step NAME TIMEOUT FILES...
  local name=$1 limit=$2
  shift 2
  step "$name" "$limit" "$PY" -m pytest -q --maxfail=5 -m "not slow" -p no:cacheprovider \
    --junitxml="$RUN/$name.xml" "$@"
}

bench_step() {  # bench_step SUITE TIMEOUT MIN_ROUNDS
  step "bench-$1" "$2" "$PY" -m pytest -q -p no:cacheprovider "benchmarks/$1.py" --benchmark-only \
    --benchmark-min-rounds="$3" --benchmark-max-time=0.1 --benchmark-json="$RUN/bench-$1.json"
}

step env 60 "$PY" tools/gpu_summary.py env --out "$RUN/env.json"

if [ "$DRY" = 1 ]; then
  step build 60 "$PY" -c "import tokenkern._C as c, torch; print('WITH_CUDA', c.WITH_CUDA, 'torch', torch.__version__)"
  # shellcheck disable=SC2086
  step tests 120 "$PY" -m pytest -q --collect-only -p no:cacheprovider $TESTS_CORE $TESTS_TRITON $TESTS_REST
  step memcheck 120 "$PY" tools/gpu_sanitize.py --device cpu
  skip racecheck "dry run: compute-sanitizer needs a GPU"
  step bench-smoke 300 "$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_merge.py \
    benchmarks/bench_topk_gather.py --benchmark-only --benchmark-min-rounds=1 --benchmark-max-time=0 \
    --benchmark-warmup=off --benchmark-json="$RUN/bench-smoke.json"
else
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
  step build 240 "$PY" -m pip install --no-build-isolation --no-deps -e . -q
  # shellcheck disable=SC2086
  pytest_step tests-core 120 $TESTS_CORE
  if [ -x "$SANITIZER" ]; then
    step memcheck 90 "$SANITIZER" --tool memcheck --error-exitcode 1 "$PY" tools/gpu_sanitize.py --device cuda
    step racecheck 120 "$SANITIZER" --tool racecheck --error-exitcode 1 "$PY" tools/gpu_sanitize.py --device cuda
  else
    skip memcheck "compute-sanitizer not found"
    skip racecheck "compute-sanitizer not found"
  fi
  for suite in $BENCH_FAST; do
    bench_step "$suite" 60 3
  done
  bench_step bench_leverage 150 1  # exact SVD at B=8 N=2880 D=4096 takes seconds per call
  # shellcheck disable=SC2086
  pytest_step tests-triton 120 $TESTS_TRITON
  # shellcheck disable=SC2086
  pytest_step tests-rest 90 $TESTS_REST
fi

# vLLM prefill with and without the plugin, only where vLLM is installed (it is not on a bare image).
if [ "$DRY" = 1 ]; then
  skip vllm-prefill "dry run: needs vLLM on a GPU"
elif "$PY" -c "import vllm" >/dev/null 2>&1; then
  step vllm-prefill 120 "$PY" benchmarks/vllm_prefill.py --prompts 16 --repeats 3 --configs stock,lofi,fastervlm \
    --json "$RUN/vllm-prefill.json"
else
  skip vllm-prefill "vLLM not installed"
fi

if [ -f benchmarks/results/static/sm90.json ] && [ "${STATIC_REFRESH:-0}" != 1 ]; then
  step static 30 cp benchmarks/results/static/sm90.json "$RUN/static.json"
else
  small=$([ "$DRY" = 1 ] && echo True || echo False)
  step static 300 env -u TRITON_INTERPRET "$PY" -c "from tokenkern.kernel_report import build_report, write_json
write_json(build_report(small=$small), '$RUN/static.json')"
fi

"$PY" tools/gpu_summary.py summary --run "$RUN" --out "$DEST" --dry "$DRY" --wall "$(($(date +%s) - START))"
rc=$?
echo "gpu-check: wrote $DEST/gpu-check.json and $DEST/gpu-check.md ($(($(date +%s) - START)) s)"
[ $rc = 0 ] || exit $rc
if grep -q '"status": "\(failed\|timeout\)"' "$STEPS"; then
  echo "gpu-check: some steps failed (see the summary)"
  exit 1
fi
