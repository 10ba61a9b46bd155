#!/usr/bin/env bash
# The GPU checks of pyoptk as one prepared device call (no GPU exists on the CI or
# development machine, so everything that needs one is here, sized to fit one 10-minute
# command of a lent machine; see /work/.library/device/METHOD.md).
#
#   bash bench/gpu_check.sh [stage ...]     stages: build tests sanitizer bench (default all)
#
# Each stage has its own time budget (seconds, overridable: BUILD_S, TESTS_S,
# SANITIZER_S, BENCH_S) so that a slow one cannot eat the others' time; logs and the
# benchmark CSV go to $OUT (default /tmp/pyoptk-gpu-check), and the last lines printed
# are a summary. Runs under the machine's own python3 (PY to override); the build is in
# place (`pip install --no-build-isolation --no-deps -e .`: no network there). Wheels
# of packages the machine lacks (`higher` for `bench maml`) travel in `.whl/` and are
# unpacked to /tmp/site when present:
#   pip download --no-deps --only-binary=:all: -d .whl higher==0.2.1   (here, once)
#   device run: command "bash bench/gpu_check.sh", carry [".whl"], timeout_s 600
set -u -o pipefail
PY=${PY:-python3}
OUT=${OUT:-/tmp/pyoptk-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STAGES=${*:-build tests sanitizer bench}
SUMMARY=()

note() { SUMMARY+=("$1"); echo "== $1"; }

run_stage() {  # name budget_s log command...
    local name=$1 budget=$2 log=$3
    shift 3
    local t0=$SECONDS
    timeout --signal=INT --kill-after=10 "$budget" "$@" >"$log" 2>&1
    local rc=$?
    note "$name: rc=$rc in $((SECONDS - t0)) s (budget $budget s) -> $(basename "$log")"
    tail -n 5 "$log"
    return $rc
}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
    --format=csv >"$OUT/device.txt" 2>&1 || true

for stage in $STAGES; do
    case $stage in
    build)
        # PYOPTK_CUDA=ON: a build that silently skipped the CUDA sources would make every
        # later check test the Triton/torch fallbacks instead.
        PYOPTK_CUDA=ON run_stage build "${BUILD_S:-300}" "$OUT/build.log" \
            $PY -m pip install --no-build-isolation --no-deps -e . || exit 1
        $PY -m pyoptk.cli info >>"$OUT/device.txt" 2>&1
        ;;
    tests)
        # The gpu tier, then the CPU-only suites that also take a device parameter.
        run_stage "pytest -m gpu" "${TESTS_S:-240}" "$OUT/gpu_tests.log" \
            $PY -m pytest -q -m gpu -p no:cacheprovider -rfEs --durations=15
        ;;
    sanitizer)
        # memcheck on one test per CUDA kernel family (each a few launches).
        run_stage compute-sanitizer "${SANITIZER_S:-150}" "$OUT/sanitizer.log" \
            compute-sanitizer --tool memcheck --error-exitcode 3 --target-processes all \
            $PY -m pytest -q -m gpu -p no:cacheprovider -x \
            tests/test_ops_adamw.py tests/test_ops_lamb.py tests/test_ops_grad_norm.py \
            tests/test_ops_inner_step.py
        ;;
    bench)
        B=${BENCH_S:-420}
        # Shares of the bench budget: the step suites are quick, maml needs `higher`.
        run_stage "bench optim" $((B * 25 / 100)) "$OUT/bench.log" \
            $PY -m pyoptk.cli bench optim --device cuda
        run_stage "bench learned" $((B * 35 / 100)) "$OUT/bench_learned.log" \
            $PY -m pyoptk.cli bench learned --device cuda
        run_stage "bench maml" $((B * 20 / 100)) "$OUT/bench_maml.log" \
            $PY -m pyoptk.cli bench maml --device cuda
        run_stage "bench meta" $((B * 20 / 100)) "$OUT/bench_meta.log" \
            $PY -m pyoptk.cli bench meta --device cuda
        cp bench/results/*.csv "$OUT/" 2>/dev/null
        ;;
    *)
        echo "unknown stage $stage (build tests sanitizer bench)" >&2
        exit 2
        ;;
    esac
done

echo
echo "==== summary ($(head -n 2 "$OUT/device.txt" | tail -n 1))"
printf '%s\n' "${SUMMARY[@]}"
grep -hE "^(FAILED|ERROR)|passed|failed" "$OUT"/gpu_tests.log 2>/dev/null | tail -n 15
grep -hE "ERROR SUMMARY" "$OUT"/sanitizer.log 2>/dev/null | tail -n 1
