#!/usr/bin/env bash
# Run transformers' GLM-4V model tests (glm4v, glm4v_moe, glm46v) stock and with every vision tower swapped by
# glm4v_fast (the pytest plugin beside this script), and print the counts side by side.
#
#   tools/hf_suite/run.sh SUITE_DIR [stock|patched|both] [MODEL ...]
#
# SUITE_DIR: one folder with both archives of transformers' suite extracted into it (conftest.py, tests/ ...).
# The tests need `parameterized pytest-xdist pytest-timeout pytest-env python-dotenv accelerate psutil` beside
# transformers. Logs go to $LOG_DIR (default: SUITE_DIR/glm4v_fast_logs). PYTHON picks the interpreter (default:
# the repository's .venv); GLM4V_FAST_KERNELS / GLM4V_FAST_ATTN choose the tower's kernels / attention backend
# (set TRITON_INTERPRET=1 too for kernels=triton on a CPU). About 80 s per file and mode on 2 idle cores.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
suite="${1:?usage: $0 SUITE_DIR [stock|patched|both] [MODEL ...]}"
mode="${2:-both}"
shift $(( $# >= 2 ? 2 : 1 ))
models=("$@")
[ ${#models[@]} -eq 0 ] && models=(glm4v glm4v_moe glm46v)
python="${PYTHON:-$repo/.venv/bin/python}"
logs="${LOG_DIR:-$suite/glm4v_fast_logs}"
mkdir -p "$logs"
case "$mode" in stock) modes=(stock) ;; patched) modes=(patched) ;; both) modes=(stock patched) ;;
  *) echo "mode must be stock, patched or both, got '$mode'" >&2; exit 2 ;; esac
[ -f "$suite/conftest.py" ] && [ -d "$suite/tests/models" ] || { echo "$suite: not an extracted suite" >&2; exit 2; }

summary=()
for model in "${models[@]}"; do
  file="tests/models/$model/test_modeling_$model.py"
  [ -f "$suite/$file" ] || { echo "$suite/$file: no such test file" >&2; exit 2; }
  for m in "${modes[@]}"; do
    log="$logs/$model-$m.log"
    args=(-m pytest "$file" -rA -q -p no:cacheprovider)
    [ "$m" = patched ] && args+=(-p glm4v_fast_patch_plugin)
    echo "== $model ($m): $log" >&2
    ( cd "$suite" && PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$python" "${args[@]}" >"$log" 2>&1 ) || true
    counts="$(grep -E '^=+ .*(passed|failed|error).* in [0-9.]+s' "$log" | tail -1 | sed -E 's/^=+ //; s/ =+$//')"
    summary+=("$(printf '%-10s %-8s %s' "$model" "$m" "${counts:-no summary line, see $log}")")
    grep -E '^(FAILED|ERROR) ' "$log" | sed 's/^/    /' >&2 || true
  done
done
printf '%s\n' "${summary[@]}"
