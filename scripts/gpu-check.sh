#!/usr/bin/env bash
# GPU acceptance run on an offline server that has its own torch with CUDA:
#   1. install dcesynth and its dependencies from wheelhouse/ (`make wheelhouse`), no network,
#      into a venv that sees PYTHON's torch;
#   2. the CUDA tests (tests/test_cuda.py, the naive model's CUDA loss check);
#   3. both benchmarks (training step vs the naive model, whole-case inference);
#   4. the `gpu` preset on a simulated cohort: simulate -> train -> predict -> evaluate.
# Everything lands in OUTDIR: one log per part, timings.txt, gpu.txt, the run's config.json
# and log.jsonl, and the evaluation report (report/metrics.json, report/index.html); the
# weights stay in a temporary folder. About 8-9 minutes on one H200. A part that fails is
# recorded in timings.txt and the parts after it still run; the exit status is then 1.
# Training is stopped cleanly (Ctrl-C: checkpoint saved, then predict uses it) if it runs
# past GPU_CHECK_TRAIN_S seconds, so that the whole check keeps to its time.
#
# Usage: scripts/gpu-check.sh OUTDIR        (from the repository root)
# Environment:
#   WHEELHOUSE      wheel folder (default: wheelhouse)
#   PYTHON          interpreter whose site-packages hold torch (default: python3)
#   GPU_CHECK_VENV  use (and install into) this existing venv instead of a new one
#   GPU_CHECK_SMALL 1 = toy sizes, to dry-run the script on a CPU in a minute or two
#   GPU_CHECK_TRAIN_S  training time limit in seconds (default 330)
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
TRAIN_LIMIT_S=${GPU_CHECK_TRAIN_S:-330}
FAILED=0

: >"$OUT/timings.txt"
# step NAME COMMAND...: run COMMAND, its output to the terminal and OUT/NAME.log, its time
# and exit status to OUT/timings.txt; a failure sets FAILED and the script goes on.
step() {
    local name=$1 status=0
    shift
    local start=$SECONDS
    echo "== $name: $*"
    PYTHONUNBUFFERED=1 "$@" 2>&1 | tee "$OUT/$name.log" || status=$?
    echo "$name $((SECONDS - start)) s, exit $status" | tee -a "$OUT/timings.txt"
    if [[ $status -ne 0 ]]; then FAILED=1; fi
}

VENV=${GPU_CHECK_VENV:-$WORK/venv}
if [[ ! -x $VENV/bin/python ]]; then
    "${PYTHON:-python3}" -m venv --without-pip "$VENV"
    # The venv sees PYTHON's packages (torch among them), also where PYTHON is itself a venv's,
    # which --system-site-packages would not give; its pip (and setuptools) are PYTHON's too.
    SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "${PYTHON:-python3}" -c 'import site; print("\n".join(site.getsitepackages()))' \
        >"$SITE/parent-site-packages.pth"
fi
step install "$VENV/bin/python" -m pip install --no-index --find-links "$WHEELHOUSE" dcesynth pytest
if [[ $FAILED -ne 0 ]]; then exit 1; fi
BIN=$VENV/bin

{
    if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
    "$BIN/python" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'cuda', torch.version.cuda, 'device', \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
} >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

step tests timeout 300 "$BIN/python" -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    tests/test_benchmarks_naive.py
step train_step "$BIN/python" benchmarks/train_step.py --profile "${TRAIN_STEP_ARGS[@]}"
step inference "$BIN/python" benchmarks/inference.py "${BENCH_ARGS[@]}"

step simulate "$BIN/python" -m dcesynth simulate "$WORK/train" --cases "$TRAIN_CASES" --seed 0 "${COHORT[@]}"
"$BIN/python" -m dcesynth simulate "$WORK/test" --cases "$TEST_CASES" --seed 1 "${COHORT[@]}" >/dev/null
# An exit by the time limit's Ctrl-C (130) is a finished part here: the checkpoint is saved.
step train bash -c '"$@"; status=$?; [[ $status -eq 130 ]] && echo "stopped at the time limit"; \
    [[ $status -eq 0 || $status -eq 130 ]]' train \
    timeout --preserve-status -s INT -k 60 "$TRAIN_LIMIT_S" \
    "$BIN/python" -m dcesynth train "$WORK/train" --out "$WORK/run" "${TRAIN_ARGS[@]}"
mkdir -p "$OUT/run"
cp "$WORK/run/config.json" "$WORK/run/log.jsonl" "$OUT/run/" || FAILED=1
step predict "$BIN/python" -m dcesynth predict "$WORK/run" "$WORK/test" --out "$WORK/predictions"
step evaluate "$BIN/python" -m dcesynth evaluate "$WORK/test" --pred "iterunet=$WORK/predictions" \
    --out "$OUT/report"

echo "== done: $OUT (timings.txt, report/metrics.json)"
cat "$OUT/timings.txt"
exit "$FAILED"
