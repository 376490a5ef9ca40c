#!/usr/bin/env bash
# The loop where dense converges further: char-GPT 1000 steps and ResNet-20 1200 steps (the suite's CPU-scale
# models, 4x their schedules), 3 seeds: dense, the budget loop (1% loss, one default config) and GMP at the
# hindsight oracle's target of the CPU-scale sweep (GPT 0.2; ResNet: none held, 0.5 for reference).
#   experiments/long_schedule.sh OUT [accelerator]      # every run in parallel, one thread each
# Writes OUT/<task>/<group>/seed<k>/summary.json and OUT/long.tar.gz (the summaries), then the tables.
# EXTRA="..." appends overrides to every run (a smoke test: EXTRA="trainer.max_epochs=1 trainer.limit_train_batches=4").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: experiments/long_schedule.sh OUT [cpu|gpu]}
ACC=${2:-cpu}
PY=${PY:-python3}
SEEDS=${SEEDS:-0 1 2}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
if [ -d .gpudata/fashion-mnist ]; then export CTPRUNE_FASHION_MNIST_DIR=$PWD/.gpudata/fashion-mnist; fi
if [ -d .gpudata/shakespeare ]; then export CTPRUNE_SHAKESPEARE_DIR=$PWD/.gpudata/shakespeare; fi
export OMP_NUM_THREADS=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
COMMON=(logger=csv callbacks.model_checkpoint=null trainer.enable_checkpointing=false
        ++trainer.enable_progress_bar=false ++trainer.enable_model_summary=false callbacks.progress_bar=null
        trainer.accelerator="$ACC")
GPT=(experiment=gpt_shakespeare dataset.batch_size=32 model.block_size=64 model.n_embd=128 model.warmup_steps=25 trainer.max_steps=-1
     trainer.max_epochs=20 trainer.limit_train_batches=50 trainer.val_check_interval=null trainer.limit_val_batches=10)
RESNET=(experiment=resnet_fmnist dataset.batch_size=64 trainer.max_epochs=12 trainer.limit_train_batches=100
        trainer.limit_val_batches=10)
LOOP=(controller=lqr pruning.quality_budget=0.01 pruning.target=0.1)
run() {  # run TASK GROUP SEED OVERRIDES...
  local task=$1 group=$2 seed=$3; shift 3
  # shellcheck disable=SC2086  # EXTRA: space-separated overrides
  "$PY" train.py "${COMMON[@]}" "$@" ${EXTRA:-} seed="$seed" hydra.run.dir="$OUT/$task/$group/seed$seed" \
    > "$OUT/$task.${group}_seed$seed.log" 2>&1 || echo "long_schedule: $task $group seed $seed failed (see its log)"
}
for seed in $SEEDS; do
  run gpt dense "$seed" "${GPT[@]}" controller=none &
  run gpt loop "$seed" "${GPT[@]}" "${LOOP[@]}" &
  run gpt gmp "$seed" "${GPT[@]}" controller=gmp pruning.target=0.2 &
  run resnet dense "$seed" "${RESNET[@]}" controller=none &
  run resnet loop "$seed" "${RESNET[@]}" "${LOOP[@]}" &
  run resnet gmp "$seed" "${RESNET[@]}" controller=gmp pruning.target=0.5 &
done
wait
(cd "$OUT" && tar czf long.tar.gz */*/*/summary.json)
for task in gpt resnet; do "$PY" experiments/report.py --groups "$OUT/$task" || true; done
"$PY" experiments/oracle.py "$OUT" || true
echo "long_schedule.sh: ${SECONDS}s"
