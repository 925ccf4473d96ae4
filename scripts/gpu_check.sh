#!/usr/bin/env bash
# The GPU measurements quoted in the closing notes, as one script for a short GPU lease:
# bench.py, the full default run, fp32 vs the fast path and 1-process DDP vs plain on the
# real corpus, then the GPU-only tests. Needs ci.txt in the repo root. Usage:
#   bash scripts/gpu_check.sh [OUTDIR]
set -u
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
short="--max_iters=300 --eval_interval=100 --prompts= --wandb_mode=disabled"
last_line() { grep '^step 300:' "$1" || echo "(no step 300 line in $1)"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import sys, torch; print(sys.version.split()[0], torch.__version__)"; } 2>&1 | tee "$out/env.txt"

echo "== bench.py"
timeout 240 $py bench.py 2>&1 | tee "$out/bench.txt"

echo "== full default run: python babygpt.py"
TIMEFORMAT='wall time: %R s'
{ time timeout 300 $py babygpt.py 2>&1 | tee "$out/full.txt"; } 2>> "$out/full.txt"
tail -1 "$out/full.txt"

echo "== fp32 eager vs fast path, 300 steps"
timeout 150 $py babygpt.py $short --dtype=float32 --compile=false --save_path=/tmp/a.pth --ckpt_path=/tmp/a.pt > "$out/fp32.txt" 2>&1
timeout 150 $py babygpt.py $short --save_path=/tmp/b.pth --ckpt_path=/tmp/b.pt > "$out/fast.txt" 2>&1
echo "fp32: $(last_line "$out/fp32.txt")"; echo "fast: $(last_line "$out/fast.txt")"

echo "== DDP, 1 process (NCCL) vs plain (the fast run above)"
timeout 150 torchrun --standalone --nproc_per_node=1 babygpt.py $short --save_path=/tmp/c.pth --ckpt_path=/tmp/c.pt > "$out/ddp1.txt" 2>&1
echo "ddp1: $(last_line "$out/ddp1.txt")"

echo "== GPU tests"
timeout 150 $py -m pytest -q -rs tests -k "cuda or gpu" 2>&1 | tail -15 | tee "$out/pytest.txt"
