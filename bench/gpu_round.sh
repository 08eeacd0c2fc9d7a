#!/usr/bin/env bash
# The GPU round on a lent GPU machine (torch, triton and transformers as that image has them, no network, no
# install: the checkout runs with PYTHONPATH=.). Results and logs go to $OUT (default bench/results/gpu-round).
#
#   bash bench/gpu_round.sh          # first call: bench/gpu_quick.py, the prioritized round, within 8 minutes
#   bash bench/gpu_round.sh rest     # optional second call (about 9 minutes at most): the whole test suite,
#                                    # pytest-benchmark (kernels, encoder, training) and huge-image-max
#
# Every command runs under `timeout`, and each writes its own files, so a call cut short keeps what finished.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-round}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET              # compiled kernels; the CPU interpreter cases skip themselves
PY=${PYTHON:-python3}

step=${1:-quick}
case $step in
    quick)
        exec timeout 490 $PY bench/gpu_quick.py --out "$OUT" ;;
    rest)
        status=0
        # tests/test_gpu_round.py checks the round itself on CPU: not needed here.
        # One log per command and pytest-benchmark's JSON per file: 7 files at most come back.
        timeout 210 $PY -m pytest -q -p no:cacheprovider -rfE tests --ignore=tests/test_gpu_round.py \
            > "$OUT/tests.log" 2>&1 || status=1
        tail -5 "$OUT/tests.log"
        for part in kernels encoder training; do
            timeout 90 $PY -m pytest -q -p no:cacheprovider "bench/test_bench_$part.py" \
                --benchmark-json="$OUT/pytest-bench-$part.json" >> "$OUT/pytest-bench.log" 2>&1 || status=1
        done
        tail -5 "$OUT/pytest-bench.log"
        timeout 60 $PY -m glm4v_fast.bench --full --workloads huge-image-max --encoder-only --repeats 3 --no-plot \
            --out "$OUT" > "$OUT/huge-image-max.log" 2>&1 || status=1
        tail -15 "$OUT/huge-image-max.log"
        exit $status ;;
    *)
        echo "usage: bash bench/gpu_round.sh [quick|rest]"; exit 2 ;;
esac
