#!/usr/bin/env bash
# The GPU check in stages that fit one device lease: at most 8 minutes by design, at most 8 result
# files in $OUT, each stage's results written as soon as it finishes, so a stage that runs long
# (it is stopped at its cap) leaves every other stage's results.
#
#   stage 1 (60 s)   environment; every kernel against its torch reference (smoke)
#   stage 2 (180 s)  correctness: fp64 references, repeats, offset-1 views, found_inf, eigensolver
#                    sizes, tensors above 2^31 elements, compute-sanitizer memcheck + racecheck,
#                    then the op test files on every backend (pytest, streamed)
#   stage 3 (180 s)  headline benchmark rows: report.py --headline (do_bench timing)
#   stage 4 (rest)   a short CIFAR-10 training run (when .data/ was carried), then the rest of the
#                    report, until the 8 minutes are spent
#
#   bash benchmarks/gpu_check.sh              # from anywhere, on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run    # or GPU_CHECK_DRY_RUN=1: the CPU rehearsal
#
# Environment: OUT (default benchmarks/results/gpu-check), PYTHON (default python3, else python),
# GPU_CHECK_TOTAL_S (default 480). Wheels for missing packages are taken from .whl/ (see
# benchmarks/README.md). Exit status 0 when no stage failed or timed out (skipped is not failed).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (known: --dry-run, --help)" >&2; exit 2 ;;
  esac
done
[ "$DRY_RUN" = 1 ] || [ "$DRY_RUN" = true ] && DRY_RUN=1 || DRY_RUN=0

OUT=${OUT:-benchmarks/results/gpu-check}
mkdir -p "$OUT" || { echo "gpu_check.sh: cannot create OUT=$OUT" >&2; exit 2; }
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if command -v python3 >/dev/null 2>&1; then PY=python3
  elif command -v python >/dev/null 2>&1; then PY=python
  else echo "gpu_check.sh: neither python3 nor python is on PATH (set PYTHON)" >&2; exit 2; fi
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PY PYTHONUNBUFFERED=1 PYTHONPATH="$WORK/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY_RUN" = 1 ]; then
  # The rehearsal runs on the CPU even where a GPU exists: Triton through its interpreter.
  export GPU_CHECK_DRY_RUN=1 CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
fi

TOTAL_S=${GPU_CHECK_TOTAL_S:-480}
KILL_AFTER_S=3          # a step that ignores SIGTERM is killed this long after its cap
MIN_STEP_S=5            # a step is not started with less time than this left
SUMMARY="$OUT/summary.md"
ROWS=()
STAGE_STATUS=()
FAILED=0

# ------------------------------------------------------------------------------------------------
write_summary() {
  {
    echo "# GPU check summary"
    echo
    echo "- started: $STARTED_AT; $( [ "$DRY_RUN" = 1 ] && echo "DRY RUN on the CPU" || echo "GPU run" );" \
         "budget ${TOTAL_S} s, ${SECONDS} s used so far"
    echo "- python: $PY; results in \`$OUT\`"
    echo
    echo "| stage | step | status | seconds | cap s | note |"
    echo "|:---|:---|:---|---:|---:|:---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "Stages: ${STAGE_STATUS[*]:-none finished yet}"
    echo
    echo "Statuses: passed (exit 0), failed (non-zero exit: see the stage's log), timed out (stopped"
    echo "at its cap; its log holds what it finished), skipped (the reason is in the note)."
  } > "$SUMMARY.tmp" && mv "$SUMMARY.tmp" "$SUMMARY"
}

record() {  # stage step status seconds cap note
  ROWS+=("| $1 | $2 | $3 | $4 | $5 | $6 |")
  echo "[gpu_check] stage $1, $2: $3 (${4} s of ${5} s)${6:+ - $6}"
  [ "$3" = failed ] || [ "$3" = "timed out" ] && FAILED=1
  write_summary
}

skip_step() {  # stage step reason
  record "$1" "$2" skipped 0 0 "$3"
}

# run_step STAGE STEP CAP_S LOG NOTE_REGEX COMMAND: COMMAND (a bash command line) runs under
# timeout with min(CAP_S, the stage's and the check's time left) seconds, its output appended
# to LOG as it comes; CAP_S 0 means the rest of the stage.
run_step() {
  local stage=$1 step=$2 cap=$3 log=$4 regex=$5 command=$6
  local left=$((TOTAL_S - SECONDS - KILL_AFTER_S)) stage_left=$((STAGE_END - SECONDS - KILL_AFTER_S))
  [ "$stage_left" -lt "$left" ] && left=$stage_left
  if [ "$cap" -eq 0 ] || [ "$cap" -gt "$left" ]; then cap=$left; fi
  if [ "$cap" -lt "$MIN_STEP_S" ]; then
    skip_step "$stage" "$step" "no time left in the stage's or the check's budget"
    return
  fi
  local before start rc status note
  before=0
  [ -f "$log" ] && before=$(wc -l < "$log")
  printf '\n===== stage %s, %s (cap %s s) %s\n$ %s\n' "$stage" "$step" "$cap" "$(date -u +%H:%M:%SZ)" \
    "$command" >> "$log"
  start=$SECONDS
  timeout --kill-after="${KILL_AFTER_S}s" "${cap}s" bash -c "$command" >> "$log" 2>&1
  rc=$?
  case $rc in
    0) status=passed ;;
    124|137) status="timed out" ;;
    *) status=failed ;;
  esac
  local output
  output=$(tail -n +"$((before + 1))" "$log")
  note=$(grep -E -- "$regex" <<< "$output" | tail -n 4 | tr '|' '/' \
         | awk 'BEGIN { ORS = "; " } { print }' | sed 's/; $//' | cut -c1-300)
  if [ "$status" = "timed out" ]; then  # what it finished before the cap
    note="before the cap: $(grep -cE '(PASSED|^PASS )' <<< "$output") checks passed, \
$(grep -cE '(FAILED|^FAIL )' <<< "$output") failed${note:+; $note}"
  fi
  [ "$status" = failed ] && note="exit $rc${note:+; $note}"
  record "$stage" "$step" "$status" "$((SECONDS - start))" "$cap" "$note"
}

begin_stage() {  # number cap_s (0: until the check's deadline)
  STAGE=$1
  STAGE_FIRST_ROW=${#ROWS[@]}
  if [ "$2" -eq 0 ]; then STAGE_END=$TOTAL_S; else STAGE_END=$((SECONDS + $2)); fi
  [ "$STAGE_END" -gt "$TOTAL_S" ] && STAGE_END=$TOTAL_S
  echo "[gpu_check] stage $1 begins at ${SECONDS} s (ends by $STAGE_END s)"
}

end_stage() {  # the stage's status: the worst of its steps
  local rows=("${ROWS[@]:$STAGE_FIRST_ROW}") status=skipped row
  for row in "${rows[@]}"; do
    case $row in
      *"| failed |"*) status=failed ;;
      *"| timed out |"*) [ "$status" != failed ] && status="timed out" ;;
      *"| passed |"*) [ "$status" = skipped ] && status=passed ;;
    esac
  done
  STAGE_STATUS+=("$STAGE: $status;")
  write_summary
}

GPU=0
[ "$DRY_RUN" != 1 ] && $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  >/dev/null 2>&1 && GPU=1
have_gpu() { [ "$GPU" = 1 ]; }
has_module() { $PY -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$1') else 1)" >/dev/null 2>&1; }

STARTED_AT=$(date -u +%Y-%m-%dT%H:%M:%SZ)
write_summary
rm -f "$OUT"/[1-4]_*            # stale results of an earlier run must not pass for this one's

# ------------------------------------------------------------------------------------------------
# Stage 1: environment and smoke test (60 s)
LOG1="$OUT/1_environment_smoke.log"
begin_stage 1 60
run_step 1 "wheels from .whl/" 20 "$LOG1" "MISSING|FAILED|nothing to install|installed" \
  "$PY benchmarks/gpu_check/wheels.py --wheels .whl --target '$WORK/site'"
run_step 1 environment 15 "$LOG1" "^(device_name|torch|triton|cupy):" \
  "date -u +%Y-%m-%dT%H:%M:%SZ
   if command -v nvidia-smi >/dev/null 2>&1; then
     nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit --format=csv \
       || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
   else echo 'nvidia-smi: not found (no NVIDIA driver here)'; fi
   $PY benchmarks/gpu_check/environment.py"
run_step 1 "smoke: every kernel vs torch" 0 "$LOG1" " summary - " \
  "$PY benchmarks/gpu_check/smoke.py"
end_stage

# ------------------------------------------------------------------------------------------------
# Stage 2: correctness (180 s)
LOG2="$OUT/2_correctness.log"
TESTS_LOG="$OUT/2_tests.log"
begin_stage 2 180
run_step 2 "correctness: fp64, repeats, offset 1, found_inf, eigh sizes" 60 "$LOG2" " summary - " \
  "$PY benchmarks/gpu_check/correctness.py --part small"
run_step 2 "correctness: tensors above 2^31 elements" 30 "$LOG2" " summary - |^SKIP" \
  "$PY benchmarks/gpu_check/correctness.py --part large"
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
for tool in memcheck racecheck; do
  if [ "$DRY_RUN" = 1 ]; then
    if [ "$tool" = memcheck ]; then  # the tiny run itself, without the sanitizer
      run_step 2 "tiny run (dry run: without compute-sanitizer)" 20 "$LOG2" " summary - " \
        "$PY benchmarks/gpu_check/tiny_run.py"
    else
      skip_step 2 "compute-sanitizer $tool" "dry run: needs a GPU"
    fi
  elif ! have_gpu; then
    skip_step 2 "compute-sanitizer $tool" "no GPU (torch.cuda.is_available() is False)"
  elif [ -z "$SANITIZER" ]; then
    skip_step 2 "compute-sanitizer $tool" "compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
  else
    # Under memcheck each tensor is its own allocation (torch reads only whether the variable
    # is set), so that an out-of-bounds access cannot land inside a neighbour's block.
    uncached=""
    [ "$tool" = memcheck ] && uncached="PYTORCH_NO_CUDA_MEMORY_CACHING=1"
    run_step 2 "compute-sanitizer $tool" 25 "$LOG2" "ERROR SUMMARY| summary - " \
      "$uncached '$SANITIZER' --tool $tool --error-exitcode 99 --print-limit 30 \
       $PY benchmarks/gpu_check/tiny_run.py"
  fi
done
OP_TESTS="tests/test_sgd_step_parity.py tests/test_multi_tensor.py tests/test_decay_outer.py \
tests/test_symmetric_eig.py tests/test_spectral.py tests/test_decay_sgd_behaviour.py"
if ! has_module pytest; then
  skip_step 2 "pytest: op tests, every backend" "no pytest on this machine"
elif [ "$DRY_RUN" = 1 ]; then
  run_step 2 "pytest: op tests (dry run: collected only)" 0 "$TESTS_LOG" "[0-9]+ tests? collected|[0-9]+ errors?" \
    "$PY -m pytest -p no:cacheprovider --collect-only -q $OP_TESTS"
elif ! have_gpu; then
  skip_step 2 "pytest: op tests, every backend" "no GPU: CI runs them on the CPU"
else
  run_step 2 "pytest: op tests, every backend" 0 "$TESTS_LOG" "[0-9]+ (passed|failed|error)" \
    "$PY -m pytest -p no:cacheprovider -v -rfEs --durations=10 $OP_TESTS"
fi
end_stage

# ------------------------------------------------------------------------------------------------
# Stage 3: headline benchmark rows (180 s)
HEADLINE="$OUT/3_headline.md"
begin_stage 3 180
TIMER=events
has_module triton && TIMER=do_bench
if [ "$DRY_RUN" = 1 ]; then
  # Plumbing only: the report's --headline path on the CPU, one section, its JSON collected.
  run_step 3 "headline rows (dry run: decay_outer on the CPU, not a measurement)" 0 "$HEADLINE" \
    "^_Report took|Error" \
    "$PY benchmarks/report.py --headline --quick --device cpu --sections decay_outer --timer $TIMER \
     --out '$WORK/headline'"
elif ! have_gpu; then
  skip_step 3 "headline rows" "no GPU: benchmark rows are GPU measurements"
else
  [ "$TIMER" = events ] && echo "no Triton: timing with CUDA events, not do_bench" >> "$HEADLINE"
  run_step 3 "headline rows: report.py --headline --quick --timer $TIMER" 0 "$HEADLINE" \
    "^_Report took|Target|Error" \
    "$PY benchmarks/report.py --headline --quick --timer $TIMER --out '$WORK/headline'"
fi
for json in "$WORK"/headline/*.json; do [ -f "$json" ] && cp "$json" "$OUT/3_headline.json"; done
end_stage

# ------------------------------------------------------------------------------------------------
# Stage 4: the rest, until the check's deadline
REST="$OUT/4_rest.md"
begin_stage 4 0
if [ "$DRY_RUN" = 1 ]; then
  skip_step 4 "CIFAR-10 training run" "dry run: needs a GPU"
  skip_step 4 "rest of the report" "dry run: needs a GPU (python benchmarks/report.py --rest --quick runs it on a CPU in minutes)"
elif ! have_gpu; then
  skip_step 4 "CIFAR-10 training run" "no GPU"
  skip_step 4 "rest of the report" "no GPU"
else
  if [ -d .data/cifar-10-batches-py ]; then
    run_step 4 "CIFAR-10 training run (ResNet-18, 2 epochs of the carried subset)" 60 "$REST" \
      "test_acc|Error|error" \
      "echo '## CIFAR-10 training run (training/train.py, log)'; echo '\`\`\`'
       $PY training/train.py --model resnet18 --dataset cifar10 --data .data --epochs 2 \
         --batch-size 128 --amp bf16 --schedule constant --track-every 10 --checkpoint-every 0 \
         --no-plots --out '$WORK/cifar-run'; rc=\$?
       cat '$WORK/cifar-run/summary.json' 2>/dev/null; echo '\`\`\`'; exit \$rc"
  else
    skip_step 4 "CIFAR-10 training run" "no data: .data/cifar-10-batches-py was not carried"
  fi
  run_step 4 "rest of the report: report.py --rest --quick --timer $TIMER" 0 "$REST" \
    "^_Report took|Error" \
    "$PY benchmarks/report.py --rest --quick --timer $TIMER --out '$WORK/rest'"
  for json in "$WORK"/rest/*.json; do [ -f "$json" ] && cp "$json" "$OUT/4_rest.json"; done
fi
end_stage

echo "[gpu_check] done in ${SECONDS} s: ${STAGE_STATUS[*]}"
echo "[gpu_check] results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exit $FAILED
