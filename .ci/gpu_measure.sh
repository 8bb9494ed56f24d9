#!/usr/bin/env bash
# The GPU figures README's memory and speed tables need, in priority order, on one lent GPU
# (random weights: --dry_run downloads nothing). Not part of CI, which has no GPU. Each line prints
# seconds per step (median of steps 2+), peak allocated and reserved GiB and MFU; a command that
# runs out of memory or time says so and the next one runs. Three groups, each within one device
# call's 10 minutes (their limits sum to 560, 480 and 450 s); A first, B if time is left, then C.
# From the repository root, where distar.py imports (on a CPU the same lines check the flags):
#   OUT=/some/folder bash .ci/gpu_measure.sh A       # appends to $OUT/gpu_measure.log
set -u
group=${1:?which group: A, B or C}
out=${OUT:-out_gpu_measure}
mkdir -p "$out"
log="$out/gpu_measure.log"
step() {  # step SECONDS DESCRIPTION COMMAND...: runs COMMAND with a time limit, logs it
    local limit=$1 what=$2
    shift 2
    echo "=== $what: $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | grep -v "it/s]" | tee -a "$log"
    echo "=== exit ${PIPESTATUS[0]} (124: over ${limit} s)" | tee -a "$log"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'CUDA',
torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee -a "$log"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if [ "$group" = A ]; then
# 1. SDXL LoRA 64 at 1024 px: does it fit a 48 GB card (peak reserved <= 45 GiB), at batch 1 or 2?
step 100 "sdxl lora b1" python3 distar.py --dry_run --lora_rank=64 --batch_size=1 --max_steps=4
step 100 "sdxl lora b2" python3 distar.py --dry_run --lora_rank=64 --batch_size=2 --max_steps=4
# 2. SDXL full fine-tuning at today's defaults (batch 2), then the cost table's ratios
step 120 "sdxl full" python3 distar.py --dry_run --max_steps=4
step 240 "sdxl bench" python3 distar.py --dry_run --bench --bench_reps=3 --bench_warmup=1 \
    --out_dir="$out/bench"
fi
if [ "$group" = B ]; then
# 3. SD3.5-medium with LoRA at batch 1
step 120 "sd3 lora b1" python3 distar.py --dry_run --model=sd3 --lora_rank=64 --batch_size=1 \
    --max_steps=4
# 4. --fsdp under NCCL, one process: a dry run's steps, then tiny models' run and its resume (a dry
# run saves nothing to resume)
step 120 "nccl fsdp dry run" torchrun --standalone --nproc_per_node=1 distar.py --dry_run --fsdp \
    --max_steps=3
step 120 "nccl fsdp tiny" torchrun --standalone --nproc_per_node=1 distar.py --tiny --fsdp \
    --max_steps=2 --out_dir="$out/fsdp"
step 120 "nccl fsdp tiny resume" torchrun --standalone --nproc_per_node=1 distar.py --tiny --fsdp \
    --max_steps=3 --resume --out_dir="$out/fsdp"
fi
if [ "$group" = C ]; then
# 3. SD3.5-medium full fine-tuning, if the card holds it; 5. the speed options, each alone, against
# group A's "sdxl full"
step 150 "sd3 full" python3 distar.py --dry_run --model=sd3 --max_steps=4
step 150 "sdxl compile" python3 distar.py --dry_run --max_steps=4 --compile
step 150 "sdxl fast_backends" python3 distar.py --dry_run --max_steps=4 --fast_backends
fi
