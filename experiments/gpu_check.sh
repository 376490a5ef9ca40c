#!/usr/bin/env bash
# Dense vs quality budget vs GMP, eager and torch.compile, side by side on one accelerator.
#   experiments/gpu_check.sh OUT                       # MLP, ResNet-20, GPT at short GPU schedules, bf16-mixed
#   GPU_CHECK_TINY=1 experiments/gpu_check.sh OUT      # the same plumbing at a tiny CPU scale (tests, seconds)
#   GPU_CHECK_SCALE=suite experiments/gpu_check.sh OUT # the CPU suite's nets instead (the 2026-12-04 H200 table)
# GPU_CHECK_SCALE=compute (the default) sizes the nets so that a dense bf16 step is a few TFLOP (an MLP
# 784-8192-8192-10 at batch 4096, a ResNet-20 of 64/128/256 channels at batch 512, a GPT 6x12x768 on 64x256
# characters): milliseconds of tensor-core work on an H100/H200, against Lightning's ~1 ms of per-step Python. The
# suite's nets take microseconds there, so their wall-clock measured only the per-step overhead (2026-12-04: no
# pruned eager run faster than dense).
# On a bare GPU image without hydra (wheels in .whl/, data in .gpudata/, see experiments/README.md):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:$PWD bash experiments/gpu_check.sh $OUT
# Per task one Hydra multirun (one process, so the start-up is paid once): compile=false,true x
# check=warmup,dense,gmp,budget (conf/check/; warmup is a throwaway few seconds so the dense run is not charged
# for CUDA/cuDNN start-up; compiled, it only traces). Each task is cut at GPU_CHECK_LIMIT_<TASK> s (eager runs first).
# Writes OUT/runs/<task>/<job>/summary.json and OUT/table.md (also printed): FLOPs and wall-clock ratios to the
# dense run, recompiles and their time, peak CUDA memory.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: experiments/gpu_check.sh OUT}
PY=${PY:-python3}
TINY=${GPU_CHECK_TINY:-0}
SCALE=${GPU_CHECK_SCALE:-compute}
case $SCALE in compute|suite) ;; *) echo "gpu_check.sh: GPU_CHECK_SCALE='$SCALE'; choose compute or suite" >&2; exit 2 ;; esac
TASKS=${GPU_CHECK_TASKS:-mlp resnet gpt}
# Seconds per task (one multirun): the three together at most 8 min at the compute scale (~7 at the suite scale).
if [ "$TINY" = 1 ]; then DEFAULT_LIMITS=(300 300 300); elif [ "$SCALE" = suite ]; then DEFAULT_LIMITS=(100 160 140)
else DEFAULT_LIMITS=(120 180 180); fi
LIMIT_MLP=${GPU_CHECK_LIMIT_MLP:-${DEFAULT_LIMITS[0]}}; LIMIT_RESNET=${GPU_CHECK_LIMIT_RESNET:-${DEFAULT_LIMITS[1]}}
LIMIT_GPT=${GPU_CHECK_LIMIT_GPT:-${DEFAULT_LIMITS[2]}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# Data: the copies in .gpudata/ when present (a bare machine), else the usual lookup (Debian path, package data).
if [ -d .gpudata/fashion-mnist ]; then export CTPRUNE_FASHION_MNIST_DIR=${CTPRUNE_FASHION_MNIST_DIR:-$PWD/.gpudata/fashion-mnist}; fi
if [ -d .gpudata/shakespeare ]; then export CTPRUNE_SHAKESPEARE_DIR=${CTPRUNE_SHAKESPEARE_DIR:-$PWD/.gpudata/shakespeare}; fi
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1

COMMON=(logger=csv callbacks.model_checkpoint=null trainer.enable_checkpointing=false
        ++trainer.enable_progress_bar=false ++trainer.enable_model_summary=false callbacks.progress_bar=null)
if [ "$TINY" = 1 ]; then  # CPU, seconds: tiny schedules, aot_eager (no C++ codegen), fp32
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  COMMON+=(trainer=cpu ++trainer.precision=32-true compile_options.backend=aot_eager
           trainer.max_epochs=-1 trainer.limit_val_batches=2 trainer.limit_test_batches=2 trainer.val_check_interval=null
           pruning.probe_batches=1 pruning.min_width=4)
  # importance=trajectory: the budget's one decision comes after 4 steps, where the default Taylor ranking's
  # smallest worthwhile cut does not fit (no surgery: nothing for the compile plumbing to re-specialise)
  MLP=(dataset=synthetic dataset.num_samples=512 'model.hidden=[64,64]' trainer.max_steps=24
       pruning.every_n_steps=4 pruning.round_to=1 importance=trajectory)
  RESNET=(experiment=resnet_fmnist dataset=synthetic dataset.num_samples=256 'dataset.input_shape=[1,28,28]'
          dataset.batch_size=32 'model.widths=[8,16,16]' model.depth=8 trainer.max_steps=16 pruning.every_n_steps=4
          model.channels_last=true)
  GPT=(experiment=gpt_shakespeare dataset.max_chars=60000 dataset.batch_size=16 model.block_size=32 model.n_embd=32
       model.n_layer=1 model.n_head=2 model.warmup_steps=2 trainer.max_steps=16 pruning.every_n_steps=4)
elif [ "$SCALE" = compute ]; then  # one GPU, bf16-mixed, dense steps of 1.5-4 TFLOP; a few hundred steps per run
  COMMON+=(trainer=gpu ++trainer.precision=bf16-mixed)
  # 55 000 training images / 4096: 13 steps an epoch, validated at each epoch's end (2 batches)
  # dataset.on_device: the images stay on the GPU (a 4096-image batch gathered and copied from the host would take
  # about as long as the dense step)
  MLP=('model.hidden=[8192,8192]' dataset.batch_size=4096 dataset.on_device=true trainer.max_epochs=-1 trainer.max_steps=600
       model.warmup_steps=30 pruning.every_n_steps=25 pruning.round_to=auto)
  # round_to 8 (not auto's 64: a 64-channel stage would have one step); NHWC, cuDNN's bf16 layout
  RESNET=(experiment=resnet_fmnist 'model.widths=[64,128,256]' dataset.batch_size=512 dataset.on_device=true trainer.max_epochs=-1
          trainer.max_steps=400 trainer.limit_train_batches=1.0 trainer.limit_val_batches=4 pruning.every_n_steps=25
          pruning.round_to=8 pruning.min_width=8 model.channels_last=true)
  GPT=(experiment=gpt_shakespeare model.n_layer=6 model.n_head=12 model.n_embd=768 model.block_size=256
       dataset.batch_size=64 trainer.max_steps=400 trainer.max_epochs=-1 trainer.val_check_interval=200
       trainer.limit_val_batches=8 model.warmup_steps=40 pruning.every_n_steps=25 pruning.round_to=auto)
else  # GPU_CHECK_SCALE=suite: the CPU suite's nets, bf16-mixed; schedules of a few thousand steps at most, ~10-30 s per eager run
  COMMON+=(trainer=gpu ++trainer.precision=bf16-mixed)
  # round_to=auto: widths in multiples of 64 for bf16 on CUDA (the ResNet's 16-64 channels keep steps of 8)
  MLP=(trainer.max_epochs=3 pruning.every_n_steps=50 pruning.round_to=auto)
  RESNET=(experiment=resnet_fmnist trainer.max_epochs=2 pruning.every_n_steps=40 model.channels_last=true)  # NHWC: cuDNN's bf16 layout
  GPT=(experiment=gpt_shakespeare trainer.max_steps=600 trainer.max_epochs=-1 trainer.val_check_interval=200
       model.warmup_steps=50 pruning.every_n_steps=50 pruning.round_to=auto)
fi

for task in $TASKS; do
  case $task in
    mlp) ARGS=("${MLP[@]}"); TASK_LIMIT_S=$LIMIT_MLP ;;
    resnet) ARGS=("${RESNET[@]}"); TASK_LIMIT_S=$LIMIT_RESNET ;;
    gpt) ARGS=("${GPT[@]}"); TASK_LIMIT_S=$LIMIT_GPT ;;
    *) echo "gpu_check.sh: unknown task '$task'; choose from mlp resnet gpt" >&2; exit 2 ;;
  esac
  echo "== $task ($(date +%T)), limit ${TASK_LIMIT_S}s"
  timeout --signal=TERM --kill-after=10 "$TASK_LIMIT_S" "$PY" train.py -m "${COMMON[@]}" "${ARGS[@]}" \
    compile=false,true check=warmup,dense,gmp,budget seed=0 \
    hydra.sweep.dir="$OUT/runs/$task" 'hydra.sweep.subdir=${hydra.job.num}_${hydra.runtime.choices.check}_compile${compile}' \
    > "$OUT/$task.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then echo "   $task: exit $rc (124: cut at the time limit); tail of $OUT/$task.log:"; tail -n 15 "$OUT/$task.log"; fi
done
"$PY" experiments/gpu_check_table.py "$OUT/runs" | tee "$OUT/table.md"
echo "gpu_check.sh: ${SECONDS}s in all"
