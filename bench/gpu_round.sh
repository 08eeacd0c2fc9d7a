#!/usr/bin/env bash
# One whole round on a lent GPU machine, in one command: install, the test suite on CUDA (compiled Triton
# kernels, the cuda cases and the gpu-marked tests), `glm4v-fast bench` (workloads vs transformers, kernel and
# attention sweeps, JSON + PNG) and the pytest-benchmark runs. Logs and results go to $OUT (default
# bench/results/gpu-round); copy the bench JSON and PNG into bench/results/ and commit them.
#
#   device tool:  bash bench/gpu_round.sh [tests] [bench] [pytest-bench] [static]   (default: the first three)
# Each call is capped at 10 minutes: run the steps in separate calls when all three do not fit. `static` runs
# only the static-shape and CUDA-graph tests (tests/test_model_static.py, capture and replay included), which
# the `tests` step also runs: a quick first check of the capture path.
# There is no network there: it installs with --no-deps and uses the image's torch, triton, transformers.
set -uo pipefail
OUT=${OUT:-bench/results/gpu-round}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
    >> "$OUT/gpu.txt" 2>&1
$PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
    || { echo "install failed, see $OUT/install.log"; tail -20 "$OUT/install.log"; exit 1; }

steps=${*:-tests bench pytest-bench}
status=0
for step in $steps; do
    case $step in
        tests) $PY -m pytest -q tests -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15 || status=1 ;;
        bench) $PY -m glm4v_fast.bench --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -40 || status=1 ;;
        static) $PY -m pytest -q -rs tests/test_model_static.py -p no:cacheprovider 2>&1 | tee "$OUT/static.log" \
                    | tail -15 || status=1 ;;
        pytest-bench) $PY -m pytest -q bench -p no:cacheprovider --benchmark-json="$OUT/pytest-benchmark.json" \
                          2>&1 | tee "$OUT/pytest-bench.log" | tail -15 || status=1 ;;
        *) echo "unknown step $step (tests, bench, pytest-bench, static)"; exit 2 ;;
    esac
done
exit $status
