#!/usr/bin/env bash
# The one command for the GPU machine (device tool `run`, repo root, carry [".whl"] from
# benchmarks/fetch_wheels.sh):
#   bash benchmarks/run_on_gpu.sh [extra gpu_benchmark.py flags, e.g. --models 5b]
#   SKIP_TESTS=1 TOTAL_S=240 bash benchmarks/run_on_gpu.sh --models 5b --settings compile,fp8   # a follow-up
#   SKIP_TESTS=1 TOTAL_S=240 bash benchmarks/run_on_gpu.sh --models 5b-i2v   # image-to-video (row i2v) alone
#   SKIP_TESTS=1 TOTAL_S=240 bash benchmarks/run_on_gpu.sh --models enhance  # Enhancer rows sr_x2, sr_x4, rife_2x
# (the default --models 5b,2b,5b-i2v,enhance plans the i2v row, then the Enhancer rows, last, so a first call's
# budget rarely reaches them)
# Installs the carried wheels, runs tests/gpu (at most TESTS_S, each test at most TEST_TIMEOUT_S, so one
# slow compile cannot eat the summary), then the benchmark within what is left of TOTAL_S (default 480 s:
# a lent machine gives 15 minutes in all, its start included, and 600 s a command; this leaves room for
# one rerun), and copies BENCHMARKS.md and the logs to $OUT. The benchmark's planned order and each row's
# estimate: `python3 benchmarks/gpu_benchmark.py --plan-only --budget-s 300` (it also prints it first).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu-run}"
mkdir -p "$OUT"
TOTAL_S="${TOTAL_S:-480}"
TESTS_S="${TESTS_S:-170}"
TEST_TIMEOUT_S="${TEST_TIMEOUT_S:-60}"
WHEELS="${WHEELS:-.whl}"
REPORT="${REPORT:-BENCHMARKS.md}"
T0=$SECONDS
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# 1. Packages the image lacks, from the carried wheels
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl || { echo "installing $WHEELS/*.whl failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 - <<'PY'
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0),
      "capability", torch.cuda.get_device_capability(0))
for name in ("diffusers", "transformers", "torchao", "pydantic", "accelerate", "peft", "pytest_timeout"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "(no __version__)"))
    except Exception as exc:  # report, do not stop: the tests say what is missing
        print(name, "MISSING", exc)
# with peft present every diffusers transformer forward takes the PEFT LoRA-scale path (the CPU tests too)
try:
    importlib.import_module("peft.tuners.tuners_utils")
    import diffusers.utils
    print("peft.tuners.tuners_utils imports; diffusers USE_PEFT_BACKEND", diffusers.utils.USE_PEFT_BACKEND)
except Exception as exc:
    print("peft.tuners.tuners_utils MISSING", exc)
print("cudnn", torch.backends.cudnn.version())
PY
} 2>&1 | tee "$OUT/env.log"

# 2. GPU tests (SKIP_TESTS=1: a follow-up call that only benchmarks); --confcutdir keeps
# tests/conftest.py (local S3, moto) out of this run
TEST_RC=0
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  PER_TEST=()
  if python3 -c "import pytest_timeout" 2>/dev/null; then
    PER_TEST=(--timeout "$TEST_TIMEOUT_S")  # the plugin loads through its entry point
  else
    echo "pytest-timeout missing (carry .whl from benchmarks/fetch_wheels.sh): no per-test limit" | tee "$OUT/pytest-gpu.log"
  fi
  # the cheap files first: the inductor-compile tests may use most of TESTS_S
  timeout "$TESTS_S" python3 -m pytest tests/gpu/test_stages_cuda.py tests/gpu/test_decode_cuda.py \
    tests/gpu/test_accel_cuda.py -q -rs --confcutdir=tests/gpu -p no:cacheprovider --durations=0 \
    "${PER_TEST[@]}" 2>&1 | tee -a "$OUT/pytest-gpu.log"
  TEST_RC=${PIPESTATUS[0]}
fi

# 3. Benchmark within the remaining time; it rewrites BENCHMARKS.md after every setting
BUDGET=$(( TOTAL_S - (SECONDS - T0) - 30 ))
if (( BUDGET < 60 )); then BUDGET=60; fi
timeout $(( BUDGET + 60 )) python3 benchmarks/gpu_benchmark.py --out "$REPORT" --budget-s "$BUDGET" "$@" 2>&1 \
  | tee "$OUT/benchmark.log"
BENCH_RC=${PIPESTATUS[0]}

cp "$REPORT" "$OUT/BENCHMARKS.md" 2>/dev/null
echo "pytest rc=$TEST_RC benchmark rc=$BENCH_RC total $(( SECONDS - T0 )) s" | tee -a "$OUT/benchmark.log"
exit $(( TEST_RC != 0 || BENCH_RC != 0 ))
