#!/usr/bin/env bash
# The GPU measurements quoted in the closing notes, as one script for a short GPU lease.
# Needs ci.txt in the repo root. Usage:
#   bash scripts/gpu_check.sh [OUTDIR] [SECTION ...]
# Sections (all by default): tests bench modes full autotune compare
#   tests     the CUDA-only tests
#   bench     python bench.py (the default compile mode, with a kernel profile of the fast path)
#   modes     the fast path with compile_mode=default, for comparison, with its profile
#   full      the full default run `python babygpt.py` with an empty compile cache
#   autotune  the fast path with compile_mode=max-autotune (CUDA graphs + autotuned kernels)
#   compare   300 steps on the real corpus: fp32 eager vs the fast path, 1-process DDP vs plain
set -u
out=${1:-${OUT:-/tmp/gpu_check}}
shift || true
sections=${*:-tests bench modes full autotune compare}
want() { [[ " $sections " == *" $1 "* ]]; }
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
short="--max_iters=300 --eval_interval=100 --prompts= --wandb_mode=disabled"
last_line() { grep '^step 300:' "$1" || echo "(no step 300 line in $1)"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import sys, torch; print(sys.version.split()[0], torch.__version__)"; } 2>&1 | tee "$out/env.txt"

if want tests; then
  echo "== GPU tests"
  timeout 200 $py -m pytest -q -rs tests -k "cuda or gpu" 2>&1 | tail -15 | tee "$out/pytest.txt"
fi
if want bench; then
  echo "== bench.py"
  TORCH_LOGS=perf_hints timeout 200 $py bench.py --profile 2> "$out/bench_profile.txt" | tee "$out/bench.txt"
  grep -E "^profile:|skipping cudagraphs" "$out/bench_profile.txt"
fi
if want modes; then
  echo "== bench.py --only=fast --compile_mode=default"
  timeout 120 $py bench.py --only=fast --compile_mode=default --profile 2> "$out/default_profile.txt" | tee "$out/default.txt"
  grep "^profile:" "$out/default_profile.txt"
fi
if want full; then
  echo "== full default run: python babygpt.py (empty compile cache)"
  cold=$(mktemp -d)
  TIMEFORMAT='wall time: %R s'
  # each output line stamped with the seconds since the command started
  stamp='import sys, time; t = time.time(); [print(f"{time.time() - t:7.2f} {l}", end="", flush=True) for l in sys.stdin]'
  { time TORCHINDUCTOR_CACHE_DIR=$cold/inductor TRITON_CACHE_DIR=$cold/triton timeout 300 $py babygpt.py 2>&1 \
      | $py -c "$stamp" | tee "$out/full.txt" | grep -E " step (0|50|100|2500|4950|5000):|error|Error|模型"; } 2>> "$out/full.txt"
  tail -1 "$out/full.txt"
fi
if want autotune; then
  echo "== bench.py --only=fast --compile_mode=max-autotune"
  TIMEFORMAT='bench wall time (compile and autotuning included): %R s'
  { time timeout 180 $py bench.py --only=fast --compile_mode=max-autotune 2>&1 | tail -4; } 2>&1 | tee "$out/autotune.txt"
fi
if want compare; then
  echo "== fp32 eager vs fast path, 300 steps"
  timeout 150 $py babygpt.py $short --dtype=float32 --compile=false --save_path=/tmp/a.pth --ckpt_path=/tmp/a.pt > "$out/fp32.txt" 2>&1
  timeout 150 $py babygpt.py $short --save_path=/tmp/b.pth --ckpt_path=/tmp/b.pt > "$out/fast.txt" 2>&1
  echo "fp32: $(last_line "$out/fp32.txt")"; echo "fast: $(last_line "$out/fast.txt")"
  echo "== DDP, 1 process (NCCL) vs plain (the fast run above)"
  timeout 150 torchrun --standalone --nproc_per_node=1 babygpt.py $short --save_path=/tmp/c.pth --ckpt_path=/tmp/c.pt > "$out/ddp1.txt" 2>&1
  echo "ddp1: $(last_line "$out/ddp1.txt")"
fi
