#!/usr/bin/env bash
# The CUDA checks, in one bounded run on a GPU machine: the GPU tests (bf16, pinned
# copies, no host sync in the insert, decode graphs against eager steps), then the
# benchmarks on the GPU, each under its own time limit, all within BUDGET seconds
# (default 540), so one slow step cannot starve the rest. Results land in
# bench/results/*-cuda.json (the card is in each file's "machine") and, when a second
# argument is given, are copied there after each step. Exits non-zero when any step
# failed or ran out of time.
#
#     [BUDGET=540] [STEPS="insert decode-step"] bash bench/cuda_proof.sh [LOG_DIR] [COPY_DIR]
set -u
cd "$(dirname "$0")/.."
log_dir=${1:-bench/results}
copy_dir=${2:-}
mkdir -p "$log_dir" bench/results ${copy_dir:+"$copy_dir"}
log="$log_dir/cuda-proof.log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}

deadline=$((SECONDS + ${BUDGET:-540}))
failed=0
started_marker=$(mktemp)  # only results written by this run are copied

step() {  # step SECONDS NAME COMMAND...: run it, log it, note the exit status
    local limit=$1 name=$2
    shift 2
    case " ${STEPS:-all} " in
        *" all "* | *" $name "*) ;;
        *) return ;;
    esac
    local left=$((deadline - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "=== $name: skipped, ${left}s of the budget left" | tee -a "$log"
        failed=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$log"
    local started=$SECONDS
    # SIGINT, not SIGTERM: the benchmarks stop the services they started on KeyboardInterrupt.
    timeout -s INT -k 30 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - started))s" | tee -a "$log"
    [ "$rc" -ne 0 ] && failed=1
    if [ -n "$copy_dir" ]; then
        find bench/results -maxdepth 1 -name '*-cuda.*' -newer "$started_marker" -exec cp {} "$copy_dir"/ \;
    fi
}

: >"$log"
echo "git $(git rev-parse --short HEAD 2>/dev/null)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo -dirty)" \
    | tee -a "$log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$log"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
    2>&1 | tee -a "$log"
step 180 gpu-tests "$py" -m pytest tests/gpu -q -rA -p no:cacheprovider
step 60 insert "$py" bench/insert.py --dtype bfloat16 --rounds 21
step 400 train-sweep env TIMEOUT_S=360 PYTHON="$py" bash bench/train_sweep_recipes.sh
step 150 eval-demo "$py" -m services.cli eval-demo --scenes 500 --compare-in-process --device cuda \
    --out bench/results/eval-demo-cuda.json
step 90 decode-step "$py" bench/decode_step.py --device cuda
step 200 e2e "$py" bench/e2e.py --rounds 2 --requests 64 --device cuda
step 200 lm-worker "$py" bench/lm_worker.py --device cuda --rounds 2
step 120 encoder "$py" bench/encoder.py --requests 128 --rounds 3
rm -f "$started_marker"
exit "$failed"
