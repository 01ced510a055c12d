#!/usr/bin/env bash
# The recipe sweeps of bench/results/train-sweep-recipes{,2}-cuda.json, six train-demo runs
# side by side on one GPU machine. "recipes": the default recipe at its default steps (the
# run to set against the CPU's), with more steps, and with other rates; render processes
# per run follow its steps. "recipes2": other rates, start and decay at the default steps.
#
#     [STEPS_SCALE=1 DEVICE=cuda TIMEOUT_S=480 EVAL_SCENES=500] bash bench/train_sweep_recipes.sh [recipes|recipes2]
set -eu
cd "$(dirname "$0")/.."
scale=${STEPS_SCALE:-1}
steps() { python3 -c "print(max(2, round($1 * $scale)))"; }
set_name=${1:-recipes}
case "$set_name" in
    recipes) runs=(
        default="--no-compile --steps $(steps 2220) --render-processes 2"
        steps3000="--no-compile --steps $(steps 3000) --render-processes 3"
        steps4000="--no-compile --steps $(steps 4000) --render-processes 4"
        lr3e-3="--no-compile --steps $(steps 2220) --lr 3e-3 --render-processes 2"
        vision-lr2x="--no-compile --steps $(steps 2220) --vision-lr-scale 2 --render-processes 2"
        decay0.6="--no-compile --steps $(steps 2220) --decay-fraction 0.6 --render-processes 2") ;;
    recipes2) runs=(
        vision-lr0.5x="--no-compile --steps $(steps 2220) --vision-lr-scale 0.5 --render-processes 2"
        lr1.4e-3="--no-compile --steps $(steps 2220) --lr 1.4e-3 --render-processes 2"
        start150="--no-compile --steps $(steps 2220) --start-steps 150 --render-processes 2"
        decay0.15="--no-compile --steps $(steps 2220) --decay-fraction 0.15 --render-processes 2"
        vision-lr0.7x-start150="--no-compile --steps $(steps 2220) --vision-lr-scale 0.7 --start-steps 150 --render-processes 2"
        batch32-steps3330="--no-compile --batch-size 32 --steps $(steps 3330) --render-processes 2") ;;
    *) echo "unknown set $set_name: recipes or recipes2" >&2; exit 2 ;;
esac
args=()
for run in "${runs[@]}"; do args+=(--run "$run"); done
exec ${PYTHON:-python3} bench/train_sweep.py --name "$set_name" --device "${DEVICE:-cuda}" --timeout-s "${TIMEOUT_S:-480}" \
    --eval-scenes "${EVAL_SCENES:-500}" "${args[@]}"
