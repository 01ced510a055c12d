#!/usr/bin/env bash
# The recipe sweep of bench/results/train-sweep-recipes-cuda.json: the default recipe at
# its default steps (the run to set against the CPU's), with more steps, and with other
# rates, side by side on one GPU machine. Renderers per run follow its steps.
#
#     [STEPS_SCALE=1] bash bench/train_sweep_recipes.sh
set -eu
cd "$(dirname "$0")/.."
scale=${STEPS_SCALE:-1}
steps() { python3 -c "print(max(2, round($1 * $scale)))"; }
exec ${PYTHON:-python3} bench/train_sweep.py --name recipes --device "${DEVICE:-cuda}" --timeout-s "${TIMEOUT_S:-480}" \
    --eval-scenes "${EVAL_SCENES:-500}" \
    --run default="--no-compile --steps $(steps 2220) --render-processes 2" \
    --run steps3000="--no-compile --steps $(steps 3000) --render-processes 3" \
    --run steps4000="--no-compile --steps $(steps 4000) --render-processes 4" \
    --run lr3e-3="--no-compile --steps $(steps 2220) --lr 3e-3 --render-processes 2" \
    --run vision-lr2x="--no-compile --steps $(steps 2220) --vision-lr-scale 2 --render-processes 2" \
    --run decay0.6="--no-compile --steps $(steps 2220) --decay-fraction 0.6 --render-processes 2"
