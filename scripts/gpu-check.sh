#!/usr/bin/env bash
# GPU acceptance run on an offline server that has its own torch with CUDA:
#   1. install dcesynth and its dependencies from wheelhouse/ (`make wheelhouse`), no network,
#      into a venv that sees the system's torch;
#   2. the CUDA tests, and the model/loss tests on this machine;
#   3. both benchmarks (training step vs the naive model, whole-case inference);
#   4. the `gpu` preset on a simulated cohort: simulate -> train -> predict -> evaluate.
# Everything lands in OUTDIR: one log per part, timings.txt, gpu.txt, the run's config.json
# and log.jsonl, and the evaluation report (report/metrics.json, report/index.html); the
# weights stay in a temporary folder. About 8-9 minutes on one H200.
#
# Usage: scripts/gpu-check.sh OUTDIR        (from the repository root)
# Environment:
#   WHEELHOUSE      wheel folder (default: wheelhouse)
#   PYTHON          interpreter whose site-packages hold torch (default: python3)
#   GPU_CHECK_VENV  use (and install into) this existing venv instead of a new one
#   GPU_CHECK_SMALL 1 = toy sizes, to dry-run the script on a CPU in a minute or two
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: scripts/gpu-check.sh OUTDIR" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
WHEELHOUSE=${WHEELHOUSE:-wheelhouse}
SMALL=${GPU_CHECK_SMALL:-0}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [[ ! -d $WHEELHOUSE ]]; then
    echo "error: $WHEELHOUSE: no wheel folder; run \`make wheelhouse\` where there is network" >&2
    exit 2
fi

if [[ $SMALL == 1 ]]; then
    BENCH_ARGS=(--quick)
    TRAIN_STEP_ARGS=(--quick --repeats 2)
    COHORT=(--shape 64 64 32)
    TRAIN_CASES=4
    TEST_CASES=2
    TRAIN_ARGS=(--preset demo --max-steps 4)
else
    BENCH_ARGS=()
    TRAIN_STEP_ARGS=()
    COHORT=(--shape 192 192 64)
    TRAIN_CASES=40
    TEST_CASES=8
    TRAIN_ARGS=(--preset gpu)
fi

: >"$OUT/timings.txt"
# step NAME COMMAND...: run COMMAND, its output to the terminal and OUT/NAME.log, its time
# and exit status to OUT/timings.txt; returns that status.
step() {
    local name=$1 status=0
    shift
    local start=$SECONDS
    echo "== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log" || status=$?
    echo "$name $((SECONDS - start)) s, exit $status" | tee -a "$OUT/timings.txt"
    return "$status"
}

VENV=${GPU_CHECK_VENV:-$WORK/venv}
if [[ ! -x $VENV/bin/python ]]; then
    "${PYTHON:-python3}" -m venv --system-site-packages "$VENV"
fi
step install "$VENV/bin/pip" install --no-index --find-links "$WHEELHOUSE" dcesynth pytest
BIN=$VENV/bin

{
    if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
    "$BIN/python" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'cuda', torch.version.cuda, 'device', \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
} >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

# A failing test is recorded, and the GPU time still buys the figures below.
step tests timeout 300 "$BIN/python" -m pytest -q -p no:cacheprovider \
    tests/test_benchmarks_naive.py tests/test_model.py tests/test_losses.py || true
step train_step "$BIN/python" benchmarks/train_step.py "${TRAIN_STEP_ARGS[@]}"
step inference "$BIN/python" benchmarks/inference.py "${BENCH_ARGS[@]}"

step simulate "$BIN/dcesynth" simulate "$WORK/train" --cases "$TRAIN_CASES" --seed 0 "${COHORT[@]}"
"$BIN/dcesynth" simulate "$WORK/test" --cases "$TEST_CASES" --seed 1 "${COHORT[@]}" >/dev/null
step train "$BIN/dcesynth" train "$WORK/train" --out "$WORK/run" "${TRAIN_ARGS[@]}"
mkdir -p "$OUT/run"
cp "$WORK/run/config.json" "$WORK/run/log.jsonl" "$OUT/run/"
step predict "$BIN/dcesynth" predict "$WORK/run" "$WORK/test" --out "$WORK/predictions"
step evaluate "$BIN/dcesynth" evaluate "$WORK/test" --pred "iterunet=$WORK/predictions" \
    --out "$OUT/report"

echo "== done: $OUT (timings.txt, report/metrics.json)"
cat "$OUT/timings.txt"
