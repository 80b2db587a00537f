#!/usr/bin/env bash
# The GPU check (issue 21): set-up, then seven steps in order, each under its own time limit with
# its output in $OUT/STEP.log. $OUT/summary.txt gets each step's exit status and seconds; a step
# that fails or runs out of time is recorded there and the next one runs. At the end it prints the
# summary and $OUT/results.txt (accuracies, speeds); $OUT/gpu_check.tar.gz holds every text file.
#
#   make gpu                                   # = bash scripts/gpu_check.sh: 9.5 min at most
#   GPU_CHECK_DRY=1 bash scripts/gpu_check.sh  # the dry run on the CPU: about 1.5 min
#
# step        its limit (default)        what it runs
# data        GPU_CHECK_DATA_S=45        loads CIFAR-10 once (decoded into the cache the runs read)
# tests       GPU_CHECK_TESTS_S=60       pytest -m cuda: every model on CUDA against the CPU, the
#                                        batched data path on the device, a bf16-mixed run
# bench       GPU_CHECK_BENCH_S=120      seqlstm.py bench --quick --json $OUT/bench.json
# teacher     GPU_CHECK_TEACHER_MIN=1.5  train params/distill.yaml: the teacher by TEACHER_RECIPE,
#                                        then the L = 5 student and its undistilled twin, 1 epoch
# scifar_s4d  GPU_CHECK_S4D_MIN=1.5      train params/scifar.yaml: S4D on sequential CIFAR-10
# lra_s4d     GPU_CHECK_S4D_MIN=1.5      train params/lra_image.yaml -p model s4d: on LRA Image
# sequencer   GPU_CHECK_SEQUENCER_MIN=1.25  train params/sequencer2d.yaml -p model sequencer2d_s
#
# The rule for the training steps: a fixed epoch count, what is expected to fit the minutes (not yet
# measured on a GPU), with `timeout` at the budget stopping a run that does not fit; the epoch lines
# of its log (s/epoch) say how many would. GPU_CHECK_TEACHER_EPOCHS=15, GPU_CHECK_S4D_EPOCHS=1,
# GPU_CHECK_SEQUENCER_EPOCHS=3. Sizes: GPU_CHECK_S4D_ARGS='{dim: 512, layers: 6}' (the S4D
# authors' depth and width), GPU_CHECK_TEACHER_ARGS='{}' (fast_cnn; airbench94's widths:
# '{widths: [64, 256, 256]}'), GPU_CHECK_SEQUENCER_ARGS='{}'. All else as the params files say, on
# every CPU core (threads 0).
#
# GPU_CHECK_DRY=1: the same steps on the CPU (CUDA hidden: the cuda tests skip themselves) on
# digits, 256 training images, 1 epoch (the teacher's too), 1 thread, S4D at 2 x 32 (state 8), the
# Sequencer on digits' one channel and `bench --tiny`: on the GPU the only unknown is speed.
#
# OUT (default outputs/gpu_check) holds everything: the runs (SEQLSTM_OUTPUTS=$OUT/outputs, MLflow
# in its mlflow.db: MLFLOW_TRACKING_URI unset), the decoded data and the teacher
# (SEQLSTM_CACHE=$OUT/cache: the teacher trains afresh). A check first removes the last one's
# results there. Set-up, outside the minutes: GPU_CHECK_PYTHON (default .venv/bin/python, made by
# `make setup` when missing); `make data` from GPU_CHECK_SHARED (default ../shared/data) when it
# is there, else torchvision downloads CIFAR-10 (GPU_CHECK_SETUP_S=900 for each).
set -euo pipefail

DRY=${GPU_CHECK_DRY:-0}
OUT=${OUT:-$(dirname "$0")/../outputs/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${GPU_CHECK_PYTHON:-.venv/bin/python}
SHARED=${GPU_CHECK_SHARED:-../shared/data}

DATA_S=${GPU_CHECK_DATA_S:-45}
TESTS_S=${GPU_CHECK_TESTS_S:-60}
BENCH_S=${GPU_CHECK_BENCH_S:-120}
TEACHER_MIN=${GPU_CHECK_TEACHER_MIN:-1.5}
S4D_MIN=${GPU_CHECK_S4D_MIN:-1.5}
SEQUENCER_MIN=${GPU_CHECK_SEQUENCER_MIN:-1.25}
SETUP_S=${GPU_CHECK_SETUP_S:-900}  # pip's install, outside the check's minutes

if [ "$DRY" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""  # the CPU, also on a machine with a GPU
    DATASETS=(digits)
    COMMON=(-p dataset digits -p limit_train 256 -p threads 1)
    TEACHER_EPOCHS=1 S4D_EPOCHS=1 SEQUENCER_EPOCHS=1
    TEACHER_ARGS='{}' S4D_ARGS='{dim: 32, layers: 2, state: 8}' SEQUENCER_ARGS='{channels: 1}'
    BENCH=(--tiny --threads 1)
else
    DATASETS=(cifar10)
    COMMON=(-p threads 0)
    TEACHER_EPOCHS=${GPU_CHECK_TEACHER_EPOCHS:-15}
    S4D_EPOCHS=${GPU_CHECK_S4D_EPOCHS:-1}
    SEQUENCER_EPOCHS=${GPU_CHECK_SEQUENCER_EPOCHS:-3}
    TEACHER_ARGS=${GPU_CHECK_TEACHER_ARGS:-'{}'}
    S4D_ARGS=${GPU_CHECK_S4D_ARGS:-'{dim: 512, layers: 6}'}
    SEQUENCER_ARGS=${GPU_CHECK_SEQUENCER_ARGS:-'{}'}
    BENCH=(--quick)
fi

export SEQLSTM_OUTPUTS="$OUT/outputs" SEQLSTM_CACHE="$OUT/cache" PYTHONUNBUFFERED=1
unset MLFLOW_TRACKING_URI
rm -rf -- "$OUT/outputs" "$OUT/cache/teachers"  # the last check's runs and teacher: none reused
rm -f -- "$OUT"/*.log "$OUT/summary.txt" "$OUT/results.txt" "$OUT/bench.json" "$OUT/tests.xml" \
    "$OUT/gpu_check.tar.gz"

SUMMARY="$OUT/summary.txt"
RESULTS="$OUT/results.txt"
FAILED=0 LAST_RC=0
printf '%-12s %5s %8s %8s  %s\n' step exit seconds limit_s status >"$SUMMARY"

seconds() {  # "90" or "1.5m" -> seconds
    awk -v t="$1" 'BEGIN { printf "%d", (t ~ /m$/) ? substr(t, 1, length(t) - 1) * 60 : t }'
}

since() {  # seconds since a `date +%s.%N`, to 0.1 s
    awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'
}

# step NAME LIMIT COMMAND...: COMMAND under `timeout LIMIT` (seconds, or minutes as "1.5m"), its
# stdout and stderr in $OUT/NAME.log and on the terminal; one line of the summary.
step() {
    local name=$1 limit=$2 rc=0 start status
    shift 2
    echo "== $name (limit $limit): $*"
    start=$(date +%s.%N)
    timeout --kill-after=30 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" || rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    [ "$rc" = 0 ] || FAILED=1
    LAST_RC=$rc
    printf '%-12s %5s %8s %8s  %s\n' "$name" "$rc" "$(since "$start")" "$(seconds "$limit")" \
        "$status" >>"$SUMMARY"
}

# results NAME PATTERN: the lines of NAME.log that say what the step found
results() {
    { echo "-- $1"; grep -E "$2" "$OUT/$1.log" | tail -n 30 || echo "(nothing)"; } >>"$RESULTS"
}

if [ ! -x "$PY" ] && [ -n "${GPU_CHECK_PYTHON:-}" ]; then
    echo "error: GPU_CHECK_PYTHON=$PY is not an executable" >&2
    exit 2
fi
if [ ! -x "$PY" ]; then
    step setup "$SETUP_S" make setup
    [ "$LAST_RC" = 0 ] || { cat "$SUMMARY"; exit 1; }
fi
if [ "$DRY" != 1 ] && [ -d "$SHARED" ]; then  # the dry run's digits come with scikit-learn
    step data_copy "$SETUP_S" make data SHARED="$SHARED"
fi

echo "GPU check$([ "$DRY" = 1 ] && echo ' (dry run)') in $OUT, $(date -u +%FT%TZ)," \
    "commit $(git describe --always --dirty 2>/dev/null || echo '?')" | tee "$RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    | tee -a "$RESULTS" || true

LOAD_PY=$(cat <<'EOF'
import sys, time
import seqlstm
for name in sys.argv[1:]:
    start = time.perf_counter()
    data = seqlstm.load_dataset(name)
    print(f"{name}: {data.counts()} from {data.source} in {time.perf_counter() - start:.1f} s")
EOF
)
TEACHER_PY=$(cat <<'EOF'
import glob, json, os, torch
for path in sorted(glob.glob(os.path.join(os.environ["SEQLSTM_CACHE"], "teachers", "*.pt"))):
    i = json.loads(torch.load(path, weights_only=True)["info_json"])  # tensors and JSON only
    args = f" {i['args']}" if i["args"] else ""
    print(f"teacher {i['name']}{args} on {i['dataset']}: test_acc {i['test_acc']:.4f}"
          f" with test-time views ({i['test_acc_one_view']:.4f} one view), {i['epochs']} epochs"
          f" in {i['train_seconds']} s, {i['train_images_per_s']:,} training images/s")
EOF
)
RUNS_PY=$(cat <<'EOF'
import csv, sys
keys = ("report", "status", "model", "teacher", "epochs", "test_acc", "train_seconds",
        "train_images_per_s")
print("-- runs (outputs/summary.csv)")
for row in [dict(zip(keys, keys))] + list(csv.DictReader(open(sys.argv[1]))):
    print("  ".join(f"{row[k]:<{w}}" for k, w in zip(keys, (18, 7, 14, 26, 6, 8, 13, 18))))
EOF
)
CHECK_START=$(date +%s.%N)

step data "$DATA_S" "$PY" -c "$LOAD_PY" "${DATASETS[@]}"
results data ' from '

step tests "$TESTS_S" "$PY" -m pytest -q -m cuda -p no:cacheprovider --junitxml="$OUT/tests.xml"
results tests '^(FAILED|ERROR) |(passed|failed|skipped|error)'

step bench "$BENCH_S" "$PY" seqlstm.py bench "${BENCH[@]}" --json "$OUT/bench.json"
results bench '^device|^tiny|^ +L +naive|^ +(5|10|20) |^one Lightning epoch'

TRAIN=("$PY" seqlstm.py train)
RUN_LINE='^(ok|failed|killed|reused) +test_acc|^epoch +[0-9]+/|^  epoch [0-9]+/|run\(s\) trained'

step teacher "${TEACHER_MIN}m" "${TRAIN[@]}" params/distill.yaml --name gpu_teacher \
    "${COMMON[@]}" -p teacher_epochs "$TEACHER_EPOCHS" -p teacher_args "$TEACHER_ARGS" \
    -p seq_len 5 -p extra_runs '[]' -p epochs 1
"$PY" -c "$TEACHER_PY" 2>&1 | tee -a "$OUT/teacher.log" || true
results teacher "^teacher .* test_acc|^training the teacher|$RUN_LINE"

step scifar_s4d "${S4D_MIN}m" "${TRAIN[@]}" params/scifar.yaml --name gpu_scifar_s4d \
    "${COMMON[@]}" -p epochs "$S4D_EPOCHS" -p model_args "$S4D_ARGS"
results scifar_s4d "$RUN_LINE"

step lra_s4d "${S4D_MIN}m" "${TRAIN[@]}" params/lra_image.yaml --name gpu_lra_s4d \
    "${COMMON[@]}" -p model s4d -p epochs "$S4D_EPOCHS" -p model_args "$S4D_ARGS" \
    -p per_model '{s4d: {lr: 0.01, weight_decay: 0.01, optimizer: adamw}}'
results lra_s4d "$RUN_LINE"

step sequencer "${SEQUENCER_MIN}m" "${TRAIN[@]}" params/sequencer2d.yaml \
    --name gpu_sequencer2d_s "${COMMON[@]}" -p model sequencer2d_s -p per_model '{}' \
    -p epochs "$SEQUENCER_EPOCHS" -p model_args "$SEQUENCER_ARGS"
results sequencer "$RUN_LINE"

"$PY" -c "$RUNS_PY" "$SEQLSTM_OUTPUTS/summary.csv" >>"$RESULTS" 2>&1 \
    || echo "(no runs in summary.csv)" >>"$RESULTS"
echo "-- $(since "$CHECK_START") s in all" >>"$RESULTS"

# shellcheck disable=SC2046  # the names that exist, none with spaces
(cd "$OUT" && tar -czf gpu_check.tar.gz summary.txt results.txt ./*.log \
    $(ls bench.json tests.xml outputs/summary.csv outputs/mlflow.db 2>/dev/null)) \
    || echo "warning: no $OUT/gpu_check.tar.gz" >&2
echo
cat "$SUMMARY"
echo
cat "$RESULTS"
exit "$FAILED"
