#!/usr/bin/env bash
# The headline evidence suite: every baseline side by side, 3 seeds, one folder per group.
#   experiments/suite.sh [mlp|resnet|gpt|lru|all] [OUT]        (SCALE=gpu: the full schedules on a GPU node)
#   python experiments/report.py --groups OUT/mlp --plots OUT/mlp
#   experiments/suite.sh overrides TASK       # print the task's overrides at this SCALE, one per line
# Each group is one Hydra multirun over seeds; the report pairs every run with the dense run of its own
# seed. CSV logs; LOGGER=many adds W&B (offline without a key), grouped by experiment (`group`) and
# controller (`job_type`) -- see conf/logger/wandb.yaml.
# CPU scale (the default): 1 intra-op thread per run (OMP_NUM_THREADS, default 1), so two tasks can run side
# by side on a 2-core machine with stable step times. Per task ~35-45 min here (13-14 groups x 3 seeds); the
# ResNet, GPT and LRU schedules are shortened (CPU_* below), the MLP is the 8-epoch reference.
set -euo pipefail
cd "$(dirname "$0")/.."
TASK=${1:-mlp}
OUT=${2:-experiments/results/suite}
SEEDS=${SEEDS:-0,1,2}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# CPU scale: dense ~50-60 s per run at 1 thread here; short epochs (limit_train_batches) so that Lightning's
# epoch-based ModelPruning can prune at two epoch ends and still fine-tune. GPU scale: longer schedules.
CPU_MLP=()
CPU_RESNET=(dataset.batch_size=64 trainer.max_epochs=3 trainer.limit_train_batches=100 trainer.limit_val_batches=10)
CPU_GPT=(dataset.batch_size=32 model.block_size=64 model.n_embd=128 model.warmup_steps=25 trainer.max_epochs=5
         trainer.limit_train_batches=50 trainer.val_check_interval=null trainer.limit_val_batches=10)
CPU_LRU=(trainer.max_epochs=5 trainer.limit_train_batches=110 trainer.limit_val_batches=20)
if [ "${SCALE:-cpu}" = gpu ]; then
  CPU_MLP=(trainer=gpu trainer.max_epochs=30); CPU_RESNET=(trainer=gpu trainer.max_epochs=30)
  CPU_GPT=(trainer=gpu trainer.max_steps=5000 trainer.max_epochs=-1); CPU_LRU=(trainer=gpu trainer.max_epochs=30 dataset.pool=1)
fi
task_overrides() {  # task_overrides TASK: the experiment and scale overrides of a task, one per line
  case $1 in
    mlp) if [ ${#CPU_MLP[@]} -gt 0 ]; then printf '%s\n' "${CPU_MLP[@]}"; fi ;;
    resnet) printf '%s\n' experiment=resnet_fmnist "${CPU_RESNET[@]}" ;;
    gpt) printf '%s\n' experiment=gpt_shakespeare "${CPU_GPT[@]}" ;;
    lru) printf '%s\n' experiment=lru_sfmnist "${CPU_LRU[@]}" ;;
    *) echo "suite.sh: unknown task '$1'; choose mlp, resnet, gpt, lru or all" >&2; exit 2 ;;
  esac
}
if [ "$TASK" = overrides ]; then task_overrides "${2:-mlp}"; exit 0; fi
MP_EPOCHS=2  # ModelPruning: epochs at whose end 25% of the remaining rows/channels are masked (MLP: 4 of 8)

run() {  # run GROUP OVERRIDES...: one multirun into OUT/TASK/GROUP/<job>_seed<seed> (skipped when done: re-run to resume)
  local group=$1; shift
  local done="$OUT/$TASK/$group.done${SEEDS//,/_}"
  [ -e "$done" ] && { echo "$TASK/$group done already"; return; }
  mkdir -p "$OUT/$TASK"
  "$PY" train.py -m logger="${LOGGER:-csv}" seed="$SEEDS" hydra.sweep.dir="$OUT/$TASK/$group" \
    'hydra.sweep.subdir=${hydra.job.num}_seed${seed}' "$@" \
    > "$OUT/$TASK/$group.log" 2>&1 && { touch "$done"; echo "$TASK/$group ok $(date +%T)"; } \
    || { echo "$TASK/$group FAILED (see $OUT/$TASK/$group.log)"; exit 1; }
}

lqr_steps() {  # the lqr runs' training FLOPs as dense steps: the schedule of the `short` baseline
  "$PY" - "$OUT/$TASK/lqr" <<'PY'
import json, pathlib, statistics, sys
runs = [json.loads(p.read_text()) for p in pathlib.Path(sys.argv[1]).rglob("summary.json")]
print(round(statistics.mean(r["steps"] * r["train_flops"] / r["dense_train_flops"] for r in runs)))
PY
}

suite() {  # suite OVERRIDES...: every group of one task (a group's own overrides come last and win)
  run dense "$@" controller=none
  run lqr "$@" controller=lqr
  run pid "$@" controller=pid
  run gmp "$@" controller=gmp pruning.target=0.25,0.35,0.5
  run gmp_mild "$@" controller=gmp pruning.target=0.75,0.9   # the fixed targets a cautious user would pick
  # the rest of the sweep over fixed targets 0.1, 0.2, ..., 0.9 (with gmp's 0.5 and gmp_mild's 0.9): the hindsight oracle
  run gmp_sweep "$@" controller=gmp pruning.target=0.1,0.2,0.3,0.4,0.6,0.7,0.8
  run linear "$@" controller=linear
  run budget "$@" controller=lqr pruning.quality_budget=0.01 pruning.target=0.1
  run budget_pid "$@" controller=pid pruning.quality_budget=0.01 pruning.target=0.1
  run null "$@" controller=gmp pruning.target=0.99   # one ~1% cut: a run dense in effect, the noise of a paired Δ
  run lqr_taylor "$@" controller=lqr importance=taylor
  run lqr_magnitude "$@" controller=lqr importance=magnitude
  run model_pruning "$@" controller=none callbacks=model_pruning callbacks.model_pruning.epochs="$MP_EPOCHS"
  run short "$@" controller=none trainer.max_steps="$(lqr_steps)"       # dense, cut to lqr's training FLOPs
  local seed ckpt                                                       # lqr's final net, from scratch
  for seed in ${SEEDS//,/ }; do
    ckpt=$(ls "$OUT/$TASK"/lqr/*_seed"$seed"/checkpoints/last.ckpt)
    SEEDS=$seed run small "$@" controller=none architecture_from="'$ckpt'"  # quoted: Hydra's grammar
  done
}

case $TASK in
  mlp|resnet|gpt|lru)
    mapfile -t TASK_ARGS < <(task_overrides "$TASK")
    if [ "$TASK" = mlp ]; then MP_EPOCHS=4; fi
    suite ${TASK_ARGS[@]+"${TASK_ARGS[@]}"}
    if [ "$TASK" != gpt ]; then  # the budget in accuracy points (0.3 pt of error), on 8 held-out probe batches
      run budget_points ${TASK_ARGS[@]+"${TASK_ARGS[@]}"} controller=lqr pruning.quality_budget=0.003 \
        pruning.target=0.1 pruning.budget_metric=error pruning.probe_batches=8; fi
    if [ "$TASK" = mlp ]; then  # the same small net built at its size (PyTorch's init at 424 wide, not a slice)
      run small_native ${TASK_ARGS[@]+"${TASK_ARGS[@]}"} controller=none 'model.hidden=[424,424]'; fi
    if [ "$TASK" = resnet ]; then  # widths on multiples of 8: the fast CPU conv kernels (bench_overhead.md 3b)
      run lqr_round8 "${TASK_ARGS[@]}" controller=lqr pruning.round_to=8; fi
    if [ "$TASK" = lru ]; then run hankel "${TASK_ARGS[@]}" controller=hankel controller.tau=0.15; fi
    ;;
  all) for t in mlp resnet gpt lru; do "$0" "$t" "$OUT"; done ;;
  *) echo "suite.sh: unknown task '$TASK'; choose mlp, resnet, gpt, lru or all" >&2; exit 2 ;;
esac
