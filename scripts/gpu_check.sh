#!/usr/bin/env bash
# The GPU measurements quoted in README.md and docs/performance.md, as one script.
# Needs ci.txt in the repo root (or .gpu/ci.txt) and wandb importable (or wheels in .whl/).
#   bash scripts/gpu_check.sh [OUTDIR] [SECTION ...]
# Sections (all by default, in this order): full sample bench modes tests
#   full     the cold default run `python babygpt.py` (wandb offline, empty compile caches);
#            its last line splits the wall time into phases
#   sample   `python babygpt.py sample` on the model just trained (the process's wall time), then
#            3 timed generate calls in one process (an untrained model of the default shape,
#            bfloat16 weights)
#   bench    python bench.py: babygpt against the seed's per-head fp32 code
#   modes    the two compile modes, cold, 1000 steps each, for their phase lines
#   tests    the tests whose names mention cuda or gpu (the CUDA-only ones run here)
#   profile  (only when named) where a compiled training step's time goes, kernel by kernel
set -u
out=${1:-${OUT:-/tmp/gpu_check}}
shift || true
sections=${*:-full sample bench modes tests}
want() { [[ " $sections " == *" $1 "* ]]; }
mkdir -p "$out"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true
py=${PYTHON:-python3}
log="$out/gpu_check.txt"
# each output line stamped with the seconds since its command started
stamp='import sys, time; t = time.time(); [print(f"{time.time() - t:7.2f} {l}", end="", flush=True) for l in sys.stdin]'

if [ -d .whl ] && ! $py -c "import wandb" 2>/dev/null; then  # no wandb installed: use the wheels in .whl/
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -f ci.txt ] || cp .gpu/ci.txt ci.txt
package_dir() { $py -c "import importlib.util; print(importlib.util.find_spec('$1').submodule_search_locations[0])"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  # a normal pip install leaves bytecode; a bare image may not (6 s of Python compiling torch)
  TIMEFORMAT='bytecode for torch and wandb: %R s'
  time timeout 120 $py -m compileall -q -j 16 "$(package_dir torch)" "$(package_dir wandb)" > /dev/null 2>&1
  # the first import on a fresh machine reads torch's libraries from disk; every run below then
  # starts as a user's second run does (compile caches stay empty)
  TIMEFORMAT='first import of torch and wandb, and CUDA start: %R s'
  time $py -c "import sys, torch, wandb; torch.zeros(1, device='cuda')
print(sys.version.split()[0], 'torch', torch.__version__, 'wandb', wandb.__version__)"
} 2>&1 | tee "$log"

cold_run() {  # cold_run NAME ARGS...: python babygpt.py ARGS with empty compile caches, stamped
  local name=$1; shift
  local cold; cold=$(mktemp -d)
  echo "== $name: python babygpt.py $*" | tee -a "$log"
  TIMEFORMAT="$name wall time: %R s"
  { time TORCHINDUCTOR_CACHE_DIR=$cold/inductor TRITON_CACHE_DIR=$cold/triton timeout 280 $py babygpt.py "$@" 2>&1 \
      | $py -c "$stamp" > "$out/$name.txt"; } 2>> "$out/$name.txt"
  grep -E " step (0|50|1000|2500|5000):|dtype|error|Error|Traceback|模型|^ *[0-9.]+ total |wall time" \
      "$out/$name.txt" | tee -a "$log"
}

if want full; then
  cold_run full
fi
if want sample; then
  echo "== python babygpt.py sample (first call in a new process)" | tee -a "$log"
  TIMEFORMAT='sample process wall time: %R s'
  { time timeout 120 $py babygpt.py sample --num_samples=1 > "$out/sample.txt" 2>&1; } 2>> "$out/sample.txt"
  grep -E "^sampling from|characters in|error|Error|wall time" "$out/sample.txt" | tee -a "$log"
  echo "== 3 calls of generate_texts in one process (2 prompts x 100 characters, bf16 weights)" | tee -a "$log"
  timeout 120 $py - <<'EOF' 2>&1 | tee -a "$log"
import time, torch, babygpt
from types import SimpleNamespace
dev = torch.device("cuda")
cfg = SimpleNamespace(num_samples=1, max_new_token=100, temperature=1.0, top_k=0, kv_cache=True)
chars = "".join(chr(0x4E00 + i) for i in range(6104))
tok = babygpt.Tokenizer(chars)
model = babygpt.BabyGPT(6104).to(dev).eval().to(torch.bfloat16)
for call in range(3):
    torch.cuda.synchronize(); t0 = time.time()
    babygpt.generate_texts(model, tok, [chars[10:12], chars[20:22]], cfg, dev)
    torch.cuda.synchronize(); print(f"generate call {call + 1}: {time.time() - t0:.3f}s")
EOF
fi
if want bench; then
  echo "== bench.py" | tee -a "$log"
  timeout 200 $py bench.py 2>&1 | tee -a "$log"
fi
if want modes; then
  short=(--max_iters=1000 --prompts= --save_path=/tmp/s.pth --ckpt_path=/tmp/s.pt)
  cold_run default_mode "${short[@]}" --compile_mode=default
  cold_run graphs_mode "${short[@]}" --compile_mode=reduce-overhead
fi
if want profile; then
  echo "== bench.py --only=fast --profile" | tee -a "$log"
  timeout 200 $py bench.py --only=fast --profile 2>&1 | tail -40 | tee -a "$log"
fi
if want tests; then
  echo "== GPU tests" | tee -a "$log"
  timeout 200 $py -m pytest -q -rs tests -k "cuda or gpu" -p no:cacheprovider 2>&1 | tail -15 | tee -a "$log"
fi
