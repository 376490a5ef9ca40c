#!/usr/bin/env bash
# The headline evidence suite: every baseline side by side, 3 seeds, one folder per group.
#   experiments/suite.sh [mlp|resnet|gpt|lru|all] [OUT]        (SCALE=gpu for the GPU-scale schedules)
#   python experiments/report.py --groups OUT/mlp --plots OUT/mlp
# Each group is one Hydra multirun over seeds (runs of one seed share the machine's state, so the
# report pairs every run with the dense run of its own seed). CSV logs; set logger=many for W&B too:
# W&B groups the runs by experiment (group) and controller (job_type) -- see conf/logger/wandb.yaml.
# CPU scale (this 2-core machine): the MLP task takes ~25 min; ResNet-20 ~10x, GPT ~5x, LRU ~3x that.
set -euo pipefail
cd "$(dirname "$0")/.."
TASK=${1:-mlp}
OUT=${2:-experiments/results/suite}
SEEDS=${SEEDS:-0,1,2}
PY=${PY:-.venv/bin/python}
GPU=()
[ "${SCALE:-cpu}" = gpu ] && GPU=(trainer=gpu trainer.max_epochs=30)

run() {  # run GROUP OVERRIDES...: one multirun into OUT/TASK/GROUP
  local group=$1; shift
  mkdir -p "$OUT/$TASK"
  "$PY" train.py -m logger=csv seed="$SEEDS" hydra.sweep.dir="$OUT/$TASK/$group" "${GPU[@]}" "$@" \
    > "$OUT/$TASK/$group.log" 2>&1 && echo "$TASK/$group ok" || { echo "$TASK/$group FAILED (see $OUT/$TASK/$group.log)"; exit 1; }
}

suite() {  # suite EXPERIMENT_OVERRIDES... (the pruned width for the small-from-scratch baseline is per task)
  run dense controller=none "$@"
  run lqr controller=lqr "$@"
  run pid controller=pid "$@"
  run gmp controller=gmp pruning.target=0.25,0.35,0.5 "$@"
  run linear controller=linear "$@"
  run budget controller=lqr pruning.quality_budget=0.01 pruning.target=0.1 "$@"
  run budget_pid controller=pid pruning.quality_budget=0.01 pruning.target=0.1 "$@"
  run lqr_taylor controller=lqr importance=taylor "$@"
  run lqr_magnitude controller=lqr importance=magnitude "$@"
}

case $TASK in
  mlp)
    suite
    run small controller=none model.hidden=[424,424]        # lqr's final widths, trained from scratch
    run short controller=none trainer.max_steps=500         # dense, cut to lqr's training FLOPs (29%)
    run model_pruning controller=none callbacks=model_pruning  # Lightning's ModelPruning (masks)
    ;;
  resnet) suite experiment=resnet_fmnist ;;
  gpt) suite experiment=gpt_shakespeare ;;
  lru) suite experiment=lru_sfmnist; run hankel controller=hankel experiment=lru_sfmnist ;;
  all) for t in mlp resnet gpt lru; do "$0" "$t" "$OUT"; done ;;
  *) echo "suite.sh: unknown task '$TASK'; choose mlp, resnet, gpt, lru or all" >&2; exit 2 ;;
esac
