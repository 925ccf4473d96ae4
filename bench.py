"""
Measure babygpt against the seed's code (reference.py) on this machine, one after the other.

    python bench.py                      # sizes chosen for the device
    python bench.py --batch_size=16 --steps=10
    python bench.py --shapes=preset      # on a CPU: only the shape of --preset=cpu
    python bench.py --only=fast --compile_mode=default --profile

Prints one line per measurement, the ratios last:
  train   tokens/sec of babygpt's fast path and of the seed's per-head fp32 model with its
          Python-loop get_batch (same architecture, batch, dropout and device), model FLOPs
          utilisation where the device's peak is known, and peak memory;
  eval    the time of one evaluation (2 x eval_iters forward passes, scaled to eval_iters=100);
  sample  2 prompts x 100 new characters: the seed's recompute-everything loop against
          babygpt.generate in fp32 and in half-size weights (and the dtype `python babygpt.py
          sample` uses here).
Shapes: on a GPU the full default configuration (the seed's shape, batch 64). On a CPU two:
the seed's shape with batch 8 and dropout 0.2, and the shape of --preset=cpu (its layers, width,
context, batch and dropout); --n_layer and the like change the seed's shape.
The fast path picks its dtype and compilation as babygpt.train does: on a GPU bfloat16 autocast
and torch.compile as choose_compile_mode says (--compile_mode); on a CPU with dtype auto it times
float32 and bfloat16 steps (probe_dtypes), trains in the dtype choose_dtype picks from those
timings, and reports them.
Each measurement runs in a process of its own, so its peak memory is its own.
Data are random tokens over the real corpus's vocabulary size: speed does not depend on them.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

import babygpt
import reference

VOCAB = 6104  # distinct characters in ci.txt
# Dense bfloat16 tensor-core peaks (no sparsity), FLOP/s, by a substring of the device name.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12, "A10G": 70e12}
SHAPE_KEYS = ("n_layer", "n_head", "n_embed", "block_size", "batch_size", "dropout", "dtype")
SHAPE_TITLES = {"seed": "seed shape", "preset": "cpu preset's shape"}


def peak_memory_gb(dev):
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux: whole process


def shape_of(name, args):
    """The model and batch of one measurement: the seed's (the command line may change it) or
    --preset=cpu's, with the dtype the fast path asks for."""
    if name == "preset":
        return SimpleNamespace(**{k: babygpt.PRESETS["cpu"].get(k, getattr(babygpt, k)) for k in SHAPE_KEYS})
    return SimpleNamespace(**{k: getattr(args, k) for k in SHAPE_KEYS[:5]}, dropout=0.2, dtype="auto")


def shape_list(text):
    names = text.split(",")
    if not all(n in SHAPE_TITLES for n in names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(SHAPE_TITLES)}")
    return names


def compile_cfg(args):
    return SimpleNamespace(compile="auto", compile_mode=args.compile_mode, grad_accum_steps=1)


def flops_per_token(shape):
    """Training FLOPs per token: 6 per weight (forward + backward) plus attention's scores and
    weighted sums (12 * layers * width * context, counting the full square as PyTorch does)."""
    C, L = shape.n_embed, shape.n_layer
    weights = L * 12 * C * C + C * VOCAB  # blocks (qkv, proj, 2 MLP matrices) + lm_head
    return 6 * weights + 12 * L * C * shape.block_size


def build(kind, shape, dev):
    sizes = dict(block_size=shape.block_size, n_embed=shape.n_embed, n_head=shape.n_head,
                 n_layer=shape.n_layer, dropout=shape.dropout)
    torch.manual_seed(0)
    if kind == "seed":
        return reference.SeedGPT(VOCAB, **sizes).to(dev)
    return babygpt.BabyGPT(VOCAB, **sizes).to(dev)


def fast_dtype(model, data, shape, dev):
    """The autocast dtype babygpt.train would pick, and the probe's timings where it measured:
    off CUDA, dtype auto times float32 and bfloat16 steps and choose_dtype picks from them."""
    if shape.dtype != "auto" or dev.type == "cuda":
        return babygpt.choose_dtype(shape.dtype, dev), None
    steps, _ = babygpt.probe_dtypes(model, data, shape.batch_size, dev, [torch.float32, torch.bfloat16])
    return babygpt.choose_dtype("auto", dev, steps), {babygpt.dtype_name(d): s for d, s in steps.items()}


def measure_train(kind, shape, args, dev):
    data = torch.randint(VOCAB, (1_000_000,), device=dev)
    model = build(kind, shape, dev)
    B, T = shape.batch_size, shape.block_size
    if kind == "seed":  # the seed's loop: fp32, per-head attention, Python-loop batches
        amp, probe, per_pass = torch.float32, None, 1
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)

        def step():
            x, y = reference.seed_get_batch(data, B, T, dev)
            _, loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def evaluate(iters):
            model.eval()
            with torch.no_grad():
                for _ in range(2 * iters):
                    x, y = reference.seed_get_batch(data, B, T, dev)
                    model(x, y)[1].item()
            model.train()
    else:  # babygpt's fast path on this device: dtype (probed on a CPU), compile, fused AdamW
        amp, probe = fast_dtype(model, data, shape, dev)
        ctx = babygpt.autocast(dev, amp)
        if dev.type == "cuda":
            torch.set_float32_matmul_precision("high")
        model = babygpt.compile_model(model, compile_cfg(args), dev, 1, babygpt.PhaseClock(), lambda m: None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=dev.type in babygpt.FUSED_ADAMW)
        scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
        evaluation = SimpleNamespace(eval_iters=args.eval_iters, block_size=T)
        per_pass = babygpt.choose_eval_passes(evaluation, B, VOCAB, dev)

        def step():
            babygpt.train_step(model, optimizer, [babygpt.get_batch(data, B, T)], ctx, scaler)

        def evaluate(iters):
            with ctx:
                babygpt.estimate_loss(model, {"train": data, "val": data}, SimpleNamespace(eval_iters=iters, block_size=T),
                                      B, None, per_pass)

    # the preset's steps are much cheaper on a CPU: time 5x as many
    repeat = 5 if args.shape == "preset" and dev.type == "cpu" else 1
    evaluate(per_pass)  # as training's warm-up: one pass per split compiles evaluation's graph
    for _ in range(args.warmup * repeat):
        step()
    babygpt.sync(dev)
    t0 = time.time()
    for _ in range(args.steps * repeat):
        step()
    babygpt.sync(dev)
    seconds = time.time() - t0
    if args.profile and kind == "fast":
        profile(step, dev)
    t1 = time.time()
    evaluate(args.eval_iters)
    babygpt.sync(dev)
    eval_seconds = (time.time() - t1) * 100 / args.eval_iters  # scaled to the default eval_iters=100
    return {"tokens_per_sec": args.steps * repeat * B * T / seconds, "eval_seconds": eval_seconds,
            "peak_gb": peak_memory_gb(dev), "dtype": babygpt.dtype_name(amp), "probe": probe}


def profile(step, dev, steps=5):
    """Print where the time of a few training steps goes, kernel by kernel (stderr)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    babygpt.sync(dev)
    t0 = time.time()
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        babygpt.sync(dev)
    wall = (time.time() - t0) / steps
    events = prof.key_averages()
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    busy = sum(getattr(e, key) for e in events if e.device_type.name == dev.type.upper()) / steps / 1e6
    print(events.table(sort_by=key, row_limit=25, max_name_column_width=70), file=sys.stderr)
    print(f"profile: {1e3 * wall:.2f} ms per step (profiled), {dev.type} kernels busy "
          f"{1e3 * busy:.2f} ms of it", file=sys.stderr)


def measure_sample(shape, args, dev):
    """2 prompts x 100 characters, sampled as the seed did and as babygpt does."""
    seed_model = build("seed", shape, dev).eval()
    model = build("fast", shape, dev)
    model.load_state_dict(babygpt.fused_layout(seed_model.state_dict()))
    model.eval()
    chars = "".join(chr(0x4E00 + i) for i in range(VOCAB))
    tokenizer = babygpt.Tokenizer(chars)
    prompts = [chars[10:12], chars[20:22]]
    cfg = SimpleNamespace(num_samples=1, max_new_token=args.new_tokens, temperature=1.0, top_k=0,
                          kv_cache=True)

    def timed(fn, repeats=2):
        best = float("inf")
        for _ in range(repeats):
            babygpt.sync(dev)
            t0 = time.time()
            fn()
            babygpt.sync(dev)
            best = min(best, time.time() - t0)
        return best

    idx = torch.tensor([tokenizer.encode(p) for p in prompts], device=dev)
    out = {"seed": timed(lambda: seed_model.generate(idx, args.new_tokens))}
    out["fp32"] = timed(lambda: babygpt.generate_texts(model, tokenizer, prompts, cfg, dev))
    half = babygpt.choose_dtype("auto", dev) if dev.type == "cuda" else torch.bfloat16
    model.to(half)
    out["half"] = timed(lambda: babygpt.generate_texts(model, tokenizer, prompts, cfg, dev))
    out["half_dtype"] = babygpt.dtype_name(half)
    out["sample_dtype"] = babygpt.dtype_name(babygpt.choose_dtype("auto", dev))
    return out


def run_child(what, args, shape="seed"):
    """Run one measurement in a fresh process and return its JSON result."""
    cmd = [sys.executable, os.path.abspath(__file__), f"--child={what}", f"--shape={shape}"] + [
        f"--{k}" if v is True else f"--{k}={v}" for k, v in vars(args).items()
        if k not in ("child", "only", "shape", "shapes") and v not in (None, False)]
    env = dict(os.environ)
    if what == "fast":  # babygpt.py turns on huge pages before torch starts; the seed's script does not
        env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if args.profile else subprocess.PIPE,
                          text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"bench: the {what} measurement ({SHAPE_TITLES[shape]}) failed:\n{(proc.stderr or '')[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dtype_note(r, dev):
    """How the fast path's dtype was chosen, for the ratio line."""
    if r["probe"]:
        return f"babygpt dtype {r['dtype']}, chosen by measurement"
    return f"babygpt dtype {r['dtype']}, auto on {dev.type}"


def train_line(label, title, r, shape, peak):
    mfu = f", MFU {100 * r['tokens_per_sec'] * flops_per_token(shape) / peak:.1f}%" if peak else ""
    probe = r["probe"]
    probed = (f" (probe: float32 {probe['float32']:.3f}s, bfloat16 {probe['bfloat16']:.3f}s a step of "
              f"{shape.batch_size} x {shape.block_size} tokens)" if probe else "")
    prefix = f"train {label} ({title}):"
    return (f"{prefix:<48}{r['tokens_per_sec']:>10,.0f} tokens/sec, peak memory {r['peak_gb']:.2f} GB{mfu}, "
            f"one evaluation {r['eval_seconds']:.2f}s, {r['dtype']}{probed}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch_size", type=int)
    p.add_argument("--block_size", type=int, default=babygpt.block_size)
    p.add_argument("--n_embed", type=int, default=babygpt.n_embed)
    p.add_argument("--n_head", type=int, default=babygpt.n_head)
    p.add_argument("--n_layer", type=int, default=babygpt.n_layer)
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--eval_iters", type=int)
    p.add_argument("--new_tokens", type=int, default=babygpt.max_new_token)
    p.add_argument("--compile_mode", default=babygpt.compile_mode, choices=babygpt.COMPILE_MODES)
    p.add_argument("--shapes", type=shape_list,
                   help="seed, preset or seed,preset (default: both on a CPU, seed on a GPU)")
    p.add_argument("--only", choices=("fast", "seed", "sample"), help="run one measurement")
    p.add_argument("--profile", action="store_true", help="print a kernel profile of a few steps")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--shape", default="seed", choices=SHAPE_TITLES, help=argparse.SUPPRESS)
    args = p.parse_args()
    try:
        dev = babygpt.choose_device(args.device)
    except babygpt.UserError as e:
        sys.exit(f"error: {e}")
    gpu = dev.type == "cuda"
    # Full defaults on a GPU; on a CPU the seed's architecture with a small batch, and the preset's.
    for name, on_gpu, on_cpu in (("batch_size", 64, 8), ("steps", 50, 10), ("warmup", 10, 2),
                                 ("eval_iters", 100, 4), ("shapes", ["seed"], ["seed", "preset"])):
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    if args.device == "auto":
        args.device = str(dev)

    if args.child:
        torch.set_num_threads(torch.get_num_threads())
        shape = shape_of(args.shape, args)
        result = (measure_sample(shape, args, dev) if args.child == "sample"
                  else measure_train(args.child, shape, args, dev))
        print(json.dumps(result))
        return

    name = torch.cuda.get_device_name(dev) if gpu else f"CPU, {torch.get_num_threads()} threads"
    amp = (f"{babygpt.dtype_name(babygpt.choose_dtype('auto', dev))} autocast" if gpu
           else "float32 or bfloat16, as a probe decides")
    mode = babygpt.choose_compile_mode(compile_cfg(args), dev, 1)
    print(f"device: {dev} ({name}), torch {torch.__version__}, fast path: dtype auto = {amp}, "
          f"{f'compile mode {mode}' if mode else 'compile off'}")
    scaled = "" if args.eval_iters == 100 else f" (timed with eval_iters={args.eval_iters} and scaled)"
    print(f"config: vocab={VOCAB}, {args.steps} timed steps after {args.warmup} warm-up (5x as many at the "
          f"cpu preset's cheaper shape on a CPU); "
          f"one evaluation = 2 x 100 batches{scaled}")
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    results = {}
    for shape_name in args.shapes if args.only != "sample" else []:
        shape, title = shape_of(shape_name, args), SHAPE_TITLES[shape_name]
        print(f"{title}: " + " ".join(f"{k}={getattr(shape, k)}" for k in SHAPE_KEYS) +
              ", the seed's side in float32", flush=True)
        for kind, label in (("fast", "babygpt fast path"), ("seed", "seed per-head fp32")):
            if args.only in (None, kind):
                r = results[shape_name, kind] = run_child(kind, args, shape_name)
                print(train_line(label, title, r, shape, peak), flush=True)
    if results:
        print(f"MFU: of the {peak / 1e12:.0f} TFLOP/s bf16 dense peak" if peak else
              "MFU: n/a (peak FLOP/s of this device unknown)")
    if args.only in (None, "sample"):
        gen = run_child("sample", args)
        print(f"sample 2 prompts x {args.new_tokens} characters ({SHAPE_TITLES['seed']}): seed recompute "
              f"loop {gen['seed']:.2f}s, babygpt KV cache fp32 {gen['fp32']:.2f}s, {gen['half_dtype']} "
              f"weights {gen['half']:.2f}s (`babygpt.py sample` uses {gen['sample_dtype']} here)")
        print(f"ratio sample (seed time / babygpt): fp32 {gen['seed'] / gen['fp32']:.1f}x, "
              f"{gen['half_dtype']} {gen['seed'] / gen['half']:.1f}x")
    for shape_name in args.shapes:
        if (shape_name, "fast") in results and (shape_name, "seed") in results:
            fast, seed = results[shape_name, "fast"], results[shape_name, "seed"]
            title = SHAPE_TITLES[shape_name]
            print(f"ratio eval at the {title} (seed time / babygpt): "
                  f"{seed['eval_seconds'] / fast['eval_seconds']:.2f}x")
            print(f"ratio train at the {title} (babygpt / seed tokens/sec): "
                  f"{fast['tokens_per_sec'] / seed['tokens_per_sec']:.2f}x ({dtype_note(fast, dev)})")


if __name__ == "__main__":
    main()
