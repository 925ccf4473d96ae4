"""Devices, number formats and compilation: the dtype probe, the run-length note, max_minutes, compile, huge pages."""

import os
import re
import subprocess
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

import babygpt
from babygpt import UserError
from conftest import (fake_run, evaluate, TINY, cli_env, corpus_data_for, fake_probe, losses, make_corpus, one_line_error, run_main,
                      same_files, seed_and_baby, show, snapshot, tiny, tiny_model)

F32, BF16 = torch.float32, torch.bfloat16
CPU = torch.device("cpu")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def corpus_data():
    return corpus_data_for(make_corpus())


def cfg_for(**kw):
    """The constants as a config (nothing printed), with a tiny shape and `kw` on top."""
    cfg = {k: getattr(babygpt, k) for k in babygpt.CONFIG_KEYS}
    cfg.update(n_layer=2, n_head=2, n_embed=32, block_size=16, batch_size=8, max_iters=10, eval_iters=2)
    return SimpleNamespace(**{**cfg, "_explicit": set(), "_measured": set(), **kw})


def plan(cfg, micro_batch=8, dev=CPU):
    return babygpt.plan_run(cfg, None, None, fake_run(micro_batch, dev, babygpt.PhaseClock()))


# -----------------------------------------------------------------------------
# The device

@pytest.mark.parametrize("command", ["train", "sample"])
@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:x", "cuda", "cuda:1", "mps", "meta"])
def test_bad_device(work, capsys, command, name):
    """--device=cuda on a machine without a GPU (or a device that does not exist) says which devices are here,
    in one line, before anything runs."""
    if torch.cuda.is_available() and name.startswith("cuda"):
        pytest.skip("this machine has a GPU")
    here = [d for d, ok in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available()),
                            ("cpu", True)) if ok]
    if name in here:
        pytest.skip(f"this machine has {name}")
    before = snapshot(work)
    cmd = ["sample"] if command == "sample" else []
    res = run_main(capsys, cmd + tiny(f"--device={name}"))
    one_line_error(res, repr(name), f"devices here: {', '.join(here)}")
    same_files(before, snapshot(work))


# -----------------------------------------------------------------------------
# Number formats

@pytest.mark.parametrize("steps,expected", [
    ({F32: 1.0, BF16: 0.6}, BF16),    # bfloat16 clearly faster
    ({F32: 1.0, BF16: 0.80}, BF16),   # 1.25x
    ({F32: 1.0, BF16: 0.85}, F32),    # 1.18x: under the margin
    ({F32: 1.0, BF16: 0.97}, F32),    # 1.03x: a coin toss between two formats, so the exact one
    ({F32: 0.5, BF16: 0.5}, F32),     # a tie keeps the exact format
    ({F32: 0.7, BF16: 1.0}, F32),     # bfloat16 slower
    ({F32: 0.5}, F32),
])
def test_auto_leaves_float32_only_for_a_clearly_faster_dtype(steps, expected):
    """On a CPU where the formats time alike a user gets float32 every time, not whichever a noisy moment favoured."""
    assert babygpt.choose_dtype("auto", CPU, steps) == expected


def test_choose_dtype_on_cpu():
    """--dtype=bfloat16 is honoured on a CPU and --dtype=float16, which CPUs cannot train in, is a clear error."""
    assert babygpt.choose_dtype("auto", CPU) == F32  # nothing measured
    assert babygpt.choose_dtype("float32", CPU) == F32
    assert babygpt.choose_dtype("bfloat16", CPU) == BF16
    with pytest.raises(UserError, match="float16"):
        babygpt.choose_dtype("float16", CPU)


def test_autocast_helper_enables_only_for_low_precision():
    """float32 runs without autocast (exact), bfloat16 under it."""
    with babygpt.autocast(CPU, F32):
        assert not torch.is_autocast_enabled("cpu")
    with babygpt.autocast(CPU, BF16):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == BF16


def mean_kl(logits_p, logits_q):
    p = logits_p.float().log_softmax(-1)
    q = logits_q.float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def test_bf16_autocast_cpu_logits_close_to_fp32():
    """In bfloat16 the seed-shaped model predicts nearly the same next characters as in float32."""
    _, baby = seed_and_baby(100, 256, 384, 6, 6)
    idx = torch.randint(100, (1, 256), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fp32 = baby(idx)[0]
        with babygpt.autocast(CPU, BF16):
            bf16 = baby(idx)[0]
    assert bf16.dtype == BF16  # autocast really ran the model in bf16
    diff = (bf16.float() - fp32).abs()
    assert diff.max().item() < 0.05, diff.max().item()
    assert diff.max().item() < 0.1 * fp32.std().item()
    assert mean_kl(fp32, bf16) < 1e-4
    assert (fp32.argmax(-1) == bf16.argmax(-1)).float().mean().item() > 0.95


def _train(vocab, data, ctx, steps=30, device="cpu", compile_model=False):
    torch.manual_seed(0)
    model = babygpt.BabyGPT(vocab, block_size=16, n_embed=32, n_head=2, n_layer=2, dropout=0.0).to(device)
    data = {k: v.to(device) for k, v in data.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    step_model = torch.compile(model) if compile_model else model
    gen = torch.Generator(device=device).manual_seed(1)
    before = evaluate(model, data, 8, 16, 10, torch.Generator(device=device).manual_seed(2))
    for _ in range(steps):
        babygpt.train_step(step_model, opt, [babygpt.get_batch(data["train"], 8, 16, gen)], ctx)
    after = evaluate(model, data, 8, 16, 10, torch.Generator(device=device).manual_seed(2))
    return before, after  # judged in fp32 on the same evaluation batches


def test_bf16_cpu_training_reaches_the_fp32_loss():
    """Training in bfloat16 on a CPU learns as much as in float32, within 0.05 of its loss."""
    vocab, data = corpus_data()
    before32, after32 = _train(vocab, data, None)
    before16, after16 = _train(vocab, data, babygpt.autocast(CPU, BF16))
    assert before16 == before32  # same seed, same start
    assert after32["val"] < before32["val"] - 0.5  # the run really learns something
    assert after16["val"] < before16["val"] - 0.5
    for split in ("train", "val"):
        assert abs(after16[split] - after32[split]) < 0.05, (split, after16, after32)


def test_estimate_loss_under_autocast_matches_fp32():
    """The losses printed by a bfloat16 run are float numbers within 0.02 of the float32 ones."""
    vocab, data = corpus_data()
    model = tiny_model(vocab, dropout=0.2)
    fp32 = evaluate(model, data, 8, 16, 5, torch.Generator().manual_seed(3))
    bf16 = evaluate(model, data, 8, 16, 5, torch.Generator().manual_seed(3), babygpt.autocast(CPU, BF16))
    assert model.training
    for split in ("train", "val"):
        assert type(bf16[split]) is float
        assert abs(bf16[split] - fp32[split]) < 0.02


# -----------------------------------------------------------------------------
# MPS (faked: no MPS here) and generation's attention kernels on CUDA

def test_mps_draws_and_generators_live_on_the_cpu():
    """On a Mac the random draws happen on the CPU, where torch.multinomial has no open bugs; elsewhere on the
    device."""
    mps, gpu = torch.device("mps"), torch.device("cuda")
    assert babygpt.generator_device(mps) == CPU
    assert babygpt.generator_device(gpu) == gpu and babygpt.generator_device(CPU) == CPU


@pytest.mark.parametrize("where", ["cpu", pytest.param("cuda", marks=cuda)])
def test_sample_next_draws_on_the_generators_device(monkeypatch, where):
    """Logits on the device and a CPU generator (as a Mac samples) draw on the CPU, pick the characters a
    CPU draw picks, and hand them back where the logits are."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    plain = babygpt.sample_next(logits, 1.0, 10, torch.Generator().manual_seed(7))
    seen, real = [], torch.multinomial

    def multinomial(probs, *args, **kwargs):
        seen.append(probs.device)
        return real(probs, *args, **kwargs)
    monkeypatch.setattr(torch, "multinomial", multinomial)
    drawn = babygpt.sample_next(logits.to(where), 1.0, 10, torch.Generator().manual_seed(7))
    assert seen == [CPU]
    assert torch.equal(plain, drawn.cpu()) and drawn.device.type == where and drawn.shape == (3, 1)


def test_generation_attention_leaves_out_cudnn_on_cuda_only(monkeypatch):
    """On CUDA generation avoids cuDNN attention, which prepares anew for each text length; elsewhere nothing
    changes."""
    import torch.nn.attention as attention
    assert isinstance(babygpt.generation_attention(CPU), nullcontext)
    allowed = []
    monkeypatch.setattr(attention, "sdpa_kernel", lambda backends: allowed.append(list(backends)) or nullcontext())
    babygpt.generation_attention(torch.device("cuda"))
    B = attention.SDPBackend
    assert allowed == [[B.EFFICIENT_ATTENTION, B.MATH]]  # never CUDNN_ATTENTION


# -----------------------------------------------------------------------------
# The dtype probe

def test_the_probe_leaves_no_trace_on_the_run():
    """Training after the probe is training without it: no leftover gradients, random state or mode."""
    vocab, data = corpus_data()
    runs = []
    for probe in (True, False):
        model = tiny_model(vocab, dropout=0.2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        torch.manual_seed(1)
        if probe:
            steps, forward = babygpt.probe_dtypes(model, data["train"], 8, CPU, [F32, BF16], budget=0.3)
            assert set(steps) == {F32, BF16} and all(t > 0 for t in steps.values()) and forward > 0
        babygpt.train_step(model, optimizer, [babygpt.get_batch(data["train"], 8, 16)])
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_the_probe_times_a_much_slower_dtype_on_a_few_tokens_only(monkeypatch):
    """On a CPU where bfloat16 is 20x slower (no AVX-512) the probe does not spend 20x its budget on it."""
    real, shapes = babygpt.time_step, []

    def time_step(model, optimizer, x, y, dt, dev):
        shapes.append((dt, x.numel()))
        passes, update = real(model, optimizer, x, y, dt, dev)
        return passes * (20 if dt == BF16 else 1), update
    monkeypatch.setattr(babygpt, "time_step", time_step)
    vocab, data = corpus_data()
    steps, _ = babygpt.probe_dtypes(tiny_model(vocab, dropout=0.2), data["train"], 8, CPU, [F32, BF16], budget=0.5)
    assert max(n for dt, n in shapes if dt == BF16) <= 2 * 16 and len([s for s in shapes if s[0] == BF16]) == 1
    assert steps[BF16] > 5 * steps[F32] and babygpt.choose_dtype("auto", CPU, steps) == F32


def test_probe_drops_a_dtype_the_device_cannot_autocast(monkeypatch):
    """On a Mac without bfloat16 autocast the probe keeps float32 and training goes on, --dtype=bfloat16 is a
    one-line error, and a failing float32 step is the error it is, not a silent pick."""
    real = babygpt.time_step

    def time_step(model, optimizer, x, y, dt, dev):
        if dt == BF16:
            raise RuntimeError("bfloat16 autocast is not supported here")
        return real(model, optimizer, x, y, dt, dev)
    monkeypatch.setattr(babygpt, "time_step", time_step)
    vocab, data = corpus_data()
    model = tiny_model(vocab, dropout=0.2)
    steps, forward = babygpt.probe_dtypes(model, data["train"], 8, CPU, [F32, BF16], budget=0.3)
    assert set(steps) == {F32} and all(p.grad is None for p in model.parameters())
    assert babygpt.plan_run(cfg_for(dtype="auto"), model, data["train"], fake_run(8, CPU, babygpt.PhaseClock())) == F32

    with pytest.raises(UserError, match=r"dtype bfloat16 does not run on this cpu \(bfloat16 autocast is not "
                                        r"supported here\); use --dtype=auto or float32"):
        babygpt.probe_dtypes(model, data["train"], 8, CPU, [BF16], budget=0.3)  # --dtype=bfloat16

    def broken(model, optimizer, x, y, dt, dev):
        raise RuntimeError("float32 failed here")
    monkeypatch.setattr(babygpt, "time_step", broken)
    with pytest.raises(RuntimeError, match="float32 failed here"):
        babygpt.probe_dtypes(model, data["train"], 8, CPU, [F32, BF16], budget=0.3)


def test_a_moment_of_contention_does_not_change_the_probes_decision(monkeypatch, capsys):
    """Another process takes the CPU during one float32 repeat (5x slower): formats that time alike still give
    float32, and the line says what was measured."""
    calls = []

    def time_step(model, optimizer, x, y, dt, dev):
        calls.append(dt)
        # the first timed repeat, after two scouts, a sizing pass and a warm-up
        busy = dt == F32 and calls.count(F32) == 5
        return (0.150 if busy else 0.030 if dt == F32 else 0.031), 0.0
    monkeypatch.setattr(babygpt, "time_step", time_step)
    _, cfg = babygpt.parse_args(["--n_layer=1", "--n_head=1", "--n_embed=8", "--block_size=8", "--wandb_mode=disabled"])
    data = torch.randint(0, 20, (500,))
    got = babygpt.plan_run(cfg, babygpt.BabyGPT(20, 8, 8, 1, 1), data, fake_run(8, CPU, babygpt.PhaseClock()))
    out = capsys.readouterr().out
    assert got == F32 and cfg.dtype == "float32", out
    assert re.search(r"dtype auto: float32; on this cpu bfloat16 is 0\.97x as fast as float32, under the 1\.2x .*"
                     r"\(best of 3: float32 0\.030s, bfloat16 0\.031s a step of 8 x 8 tokens\)", out), out


@pytest.mark.parametrize("bf16_seconds", [0.5, 2.0])
def test_auto_prints_its_measured_decision(monkeypatch, capsys, bf16_seconds):
    """--dtype=auto says in one line what it picked, how much faster bfloat16 was, and what it timed."""
    monkeypatch.setattr(babygpt, "probe_dtypes", fake_probe({F32: 1.0, BF16: bf16_seconds}))
    got = plan(cfg_for(dtype="auto"))
    assert got == (BF16 if bf16_seconds < 1.0 else F32)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"dtype auto: {babygpt.dtype_name(got)}; on this cpu bfloat16 is "
                                               f"{1 / bf16_seconds:.2f}x as fast as float32")
    assert f"(best of 3: float32 1.000s, bfloat16 {bf16_seconds:.3f}s a step of 8 x 16 tokens)" in out[0]


@pytest.mark.parametrize("dtype, dev", [("float32", CPU), ("bfloat16", CPU), ("float16", torch.device("mps"))])
def test_a_forced_dtype_times_itself_only(monkeypatch, capsys, dtype, dev):
    """--dtype=bfloat16 (or float16 on a Mac, or float32) trains in it, times no other format for the run's
    length and prints nothing about formats."""
    seen = []

    def probe(model, data, micro_batch, dev, dtypes, budget=2.5):
        seen.append(list(dtypes))
        return {dt: 0.01 for dt in dtypes}, 0.001
    monkeypatch.setattr(babygpt, "probe_dtypes", probe)
    assert plan(cfg_for(dtype=dtype), dev=dev) == babygpt.DTYPES[dtype]
    assert seen == [[babygpt.DTYPES[dtype]]] and capsys.readouterr().out == ""


def test_a_run_with_the_probe_on_is_the_run_it_chose(corpus, monkeypatch, capsys):
    """--dtype=auto that picks float32 prints the losses of a --dtype=float32 run: the probe changes nothing else."""
    monkeypatch.chdir(corpus.parent)
    monkeypatch.setattr(babygpt, "choose_dtype", lambda name, dev, steps=None: F32)
    base = [a for a in TINY if not a.startswith("--dtype")] + [f"--data_path={corpus.name}", "--dropout=0.1"]
    logs = []
    for dtype in ("auto", "float32"):
        assert babygpt.main(base + [f"--dtype={dtype}"]) == 0
        out = capsys.readouterr().out
        logs.append([l.split(", speed")[0] for l in out.splitlines() if l.startswith("step ")])
        assert ("dtype auto: float32" in out) == (dtype == "auto")
    assert logs[0] == logs[1] and len(logs[0]) == 3


# -----------------------------------------------------------------------------
# How long a run takes here: the note, and max_minutes

def fake_cpu(monkeypatch, per_row, update=0.01):
    """A CPU where a training step's forward and backward take per_row seconds for each sequence in x, AdamW's
    update `update` seconds, and an evaluation's forward per_row / 20 a sequence. time_step is faked, so the
    probe's own sizing and scaling run; its clock moves only when the model evaluates. Returns a model to probe."""
    clock = [0.0]
    monkeypatch.setattr(babygpt, "time_step", lambda model, optimizer, x, y, dt, dev: (per_row * x.shape[0], update))
    fake_time = SimpleNamespace(time=time.time, perf_counter=lambda: clock[0], sleep=time.sleep)
    monkeypatch.setattr(babygpt, "time", fake_time)

    def model(block_size):
        m = babygpt.BabyGPT(20, block_size, 8, 1, 1)
        m.register_forward_hook(lambda mod, args, out: clock.__setitem__(0, clock[0] + per_row / 20 * args[0].shape[0]))
        return m
    return model


def plan_on_fake_cpu(monkeypatch, capsys, args, per_row, update=0.01):
    """`python babygpt.py ARGS` planned on fake_cpu: (cfg after planning, what it printed, seconds of one
    optimizer step and of one evaluation, both of the whole batch, as the fake CPU takes them)."""
    model = fake_cpu(monkeypatch, per_row, update)
    _, cfg = babygpt.parse_args(args)
    capsys.readouterr()
    data = torch.randint(0, 20, (4 * cfg.block_size,), generator=torch.Generator().manual_seed(0))
    babygpt.plan_run(cfg, model(cfg.block_size), data, fake_run(cfg.batch_size // cfg.grad_accum_steps, CPU, babygpt.PhaseClock(time.time())))
    step = cfg.batch_size * per_row + update  # every sequence of the batch, then one AdamW update
    evaluation = 2 * cfg.eval_iters * cfg.batch_size * per_row / 20
    return cfg, capsys.readouterr().out, step, evaluation


@pytest.mark.parametrize("args,per_row,hint", [
    ([], 0.02, True),                                    # the seed's defaults: the probe times 15 of 64 sequences
    (["--grad_accum_steps=4"], 0.02, True),              # the same batch in 4 micro-batches of 16
    (["--preset=cpu", "--max_iters=5000"], 0.05, False),  # the preset's shape, trained for longer
], ids=["seed", "accumulated", "preset"])
def test_the_run_length_note_counts_every_sequence_of_every_step(monkeypatch, capsys, args, per_row, hint):
    """On a CPU the note for the seed's defaults says the hours the whole run takes (the full batch of every step
    and every evaluation), not a fraction of them, with or without gradient accumulation."""
    cfg, out, step, evaluation = plan_on_fake_cpu(monkeypatch, capsys, args, per_row)
    evaluations = len(set(range(0, cfg.max_iters + 1, cfg.eval_interval)) | {cfg.max_iters})
    hours = (cfg.max_iters * step + evaluations * evaluation) / 3600
    note = re.search(r"^note: on this CPU this run needs about ([\d.]+) hours(.*)$", out, re.M)
    assert note, f"no run-length note for a run of {hours:.1f} hours:\n{out}"
    assert float(note[1]) == pytest.approx(hours, rel=0.05, abs=0.05), note[0]
    assert ("python babygpt.py --preset=cpu trains a small model" in note[2]) == hint, note[0]


def test_a_short_cpu_run_says_nothing(monkeypatch, capsys):
    """A run of a few minutes prints no run-length note."""
    monkeypatch.setattr(babygpt, "probe_dtypes", fake_probe({F32: 0.001}, forward=0.0003))
    plan(cfg_for(dtype="float32"))
    assert "note" not in capsys.readouterr().out


@pytest.mark.parametrize("args,per_row", [
    (["--max_minutes=10"], 0.02),                                          # the seed's shape
    (["--max_minutes=10", "--grad_accum_steps=4"], 0.02),                  # 4 micro-batches of 16
    (["--max_minutes=10", "--batch_size=256", "--grad_accum_steps=4"], 0.005),  # 4 micro-batches of 64
    (["--preset=cpu"], 0.05),                                              # the preset: 10 minutes
], ids=["seed", "accumulated", "accumulated-256", "preset"])
def test_max_minutes_fits_the_steps_into_the_minutes(monkeypatch, capsys, args, per_row):
    """--max_minutes=10 fits a first step count that trains, evaluates and saves in 10 minutes at this machine's
    speed, with or without accumulation: not several times too many, nor 50 steps too few."""
    cfg, out, step, evaluation = plan_on_fake_cpu(monkeypatch, capsys, args, per_row)
    n = cfg.max_iters

    def seconds(steps):  # training, and an evaluation at step 0 and every eval_interval steps
        return steps * step + (steps // cfg.eval_interval + 1) * evaluation

    assert f"{n:,} steps fit in about 10 minutes on this cpu" in out, out
    assert seconds(n) <= 600, f"the fitted {n:,} steps take {seconds(n):.0f}s at this speed, not 10 minutes:\n{out}"
    assert seconds(n + 50) > 600 - evaluation - 15, f"{n:,} steps leave minutes unused:\n{out}"


def test_max_minutes_trains_at_least_250_steps_and_yields_to_max_iters(monkeypatch, capsys):
    """On a machine too slow for 250 steps in the minutes the run still trains 250; a --max_iters typed by the
    user is never re-fitted."""
    monkeypatch.setattr(babygpt, "probe_dtypes", fake_probe({F32: 10.0}, forward=0.05))
    _, cfg = babygpt.parse_args(["--preset=cpu", "--dtype=float32"])
    capsys.readouterr()
    clock = babygpt.PhaseClock(time.time())
    babygpt.plan_run(cfg, None, None, fake_run(8, CPU, clock))
    assert cfg.max_iters == 250
    assert capsys.readouterr().out.startswith("250 steps fit in about 10 minutes on this cpu (10.000s a step")
    _, cfg = babygpt.parse_args(["--preset=cpu", "--dtype=float32", "--max_iters=300"])
    babygpt.plan_run(cfg, None, None, fake_run(8, CPU, clock))
    assert cfg.max_iters == 300 and "fit" not in capsys.readouterr().out


@pytest.mark.parametrize("it,per_step,expected", [
    (1000, 0.1, 3900),   # 1000 + 294.99 / 0.1 = 3949, rounded down to a multiple of 50
    (1000, 0.05, 6850),  # a faster machine: more steps
    (3750, 1.0, 4000),   # slower now: 3750 + 294 = 4044 steps
    (3750, 10.0, 3751),  # far slower: one more step, never fewer than done
])
def test_a_re_fit_gives_the_steps_left_in_the_minutes_at_the_measured_speed(it, per_step, expected):
    """Five of ten minutes gone, a re-fit gives the steps that end in the five left (5 s kept to generate and
    save), and never fewer than already trained."""
    _, cfg = babygpt.parse_args(["--preset=cpu"])
    clock = babygpt.PhaseClock(time.time() - 300)
    babygpt.fit_steps(cfg, it, per_step, 0, fake_run(clock=clock))
    assert cfg.max_iters == expected


def test_a_fitted_run_re_fits_its_steps_to_the_speed_it_measures(corpus, monkeypatch, capsys):
    """A probe that promised thousands of steps in the last 2 s of a minute is corrected at the first
    evaluation, when the steps turned out slow: the run trains the 250 a fitted run trains at least, and ckpt.pt
    records them."""
    monkeypatch.chdir(corpus.parent)
    clock = babygpt.PhaseClock()

    def probe(*args, **kwargs):
        clock.start = time.time() - (60 - 5 - 2.0)  # 2 s left: 200,000 steps of 1e-5 s, or 1,000 on a slow machine
        return {F32: 1e-5}, 1e-5
    monkeypatch.setattr(babygpt, "probe_dtypes", probe)
    real_step = babygpt.train_step

    def slow_step(*args, **kwargs):  # the first step takes 5 s of the minute: none is left at step 50
        if clock.start > time.time() - 60:
            clock.start -= 5
        return real_step(*args, **kwargs)
    monkeypatch.setattr(babygpt, "train_step", slow_step)
    _, cfg = babygpt.parse_args([a for a in tiny("--max_minutes=1", "--eval_interval=50", data=corpus.name)
                                 if "max_iters" not in a])
    babygpt.train(cfg, clock)
    out = capsys.readouterr().out
    first = int(re.search(r"^([\d,]+) steps fit in about 1 minutes", out, re.M).group(1).replace(",", ""))
    assert first >= 1000, out
    assert "max_minutes: 250 steps fit now" in out, out
    assert set(losses(out)) == set(range(0, 251, 50))
    state = torch.load("ckpt.pt", weights_only=True)
    assert state["iter_num"] == 250 and state["config"]["max_iters"] == 250  # a resume keeps the re-fit


def test_a_fitted_run_that_is_faster_than_the_probe_said_trains_to_the_new_count(corpus, monkeypatch, capsys):
    """A run faster than its probe said trains, evaluates and stops at the re-fitted count, not at the first one."""
    monkeypatch.chdir(corpus.parent)
    clock = babygpt.PhaseClock()

    def probe(*args, **kwargs):  # a second a step with 4 s left: 250 steps, the least
        clock.start = time.time() - (60 - 5 - 4)
        return {F32: 1.0}, 1e-5
    monkeypatch.setattr(babygpt, "probe_dtypes", probe)
    _, cfg = babygpt.parse_args([a for a in tiny("--max_minutes=1", "--eval_interval=50", data=corpus.name)
                                 if "max_iters" not in a])
    babygpt.train(cfg, clock)
    out = capsys.readouterr().out
    assert "250 steps fit in about 1 minutes" in out
    last = max(losses(out))
    state = torch.load("ckpt.pt", weights_only=True)
    assert last > 250 and state["iter_num"] == state["config"]["max_iters"] == last, out


def test_a_re_fit_is_announced_only_when_it_moves_5_percent_from_the_last_count_announced(
        corpus, monkeypatch, capsys):
    """Re-fits of 300 -> 310 (3%) stay quiet, 330 (10% from 300) is said, 340 and 345 (under 5% from 330) are
    quiet again, and the run ends at the last count."""
    monkeypatch.chdir(corpus.parent)
    monkeypatch.setattr(babygpt, "probe_dtypes", fake_probe({F32: 1e-3}))
    counts = iter([300, 310, 330, 340, 345, 345, 345])
    monkeypatch.setattr(babygpt, "fit_steps", lambda cfg, *args: setattr(cfg, "max_iters", next(counts)))
    r = run_main(capsys, [a for a in tiny("--max_minutes=1", "--eval_interval=50", data=corpus.name)
                          if "max_iters" not in a])
    assert r.returncode == 0, show(r)
    said = [line for line in r.stdout.splitlines() if line.startswith("max_minutes:")]
    assert said == ["max_minutes: 330 steps fit now, at this run's speed so far"], show(r)
    assert max(losses(r.stdout)) == 345


# -----------------------------------------------------------------------------
# torch.compile

def _cfg(compile="auto", mode="auto", accum=1):
    return SimpleNamespace(compile=compile, compile_mode=mode, grad_accum_steps=accum)


def test_choose_compile_mode():
    """Compiling is off on a CPU unless asked, uses CUDA graphs on one GPU, and refuses graph modes under torchrun."""
    gpu = torch.device("cuda")
    assert babygpt.choose_compile_mode(_cfg(), CPU, 1) is None  # auto: off on a CPU
    assert babygpt.choose_compile_mode(_cfg(compile="false"), gpu, 1) is None
    assert babygpt.choose_compile_mode(_cfg(compile="true"), CPU, 1) == "default"
    assert babygpt.choose_compile_mode(_cfg(), gpu, 1) == "reduce-overhead"
    assert babygpt.choose_compile_mode(_cfg(accum=2), gpu, 1) == "default"  # graphs cannot accumulate
    assert babygpt.choose_compile_mode(_cfg(), gpu, 2) == "default"  # nor run under DDP
    with pytest.raises(UserError, match="compile_mode=default under torchrun"):
        babygpt.choose_compile_mode(_cfg(mode="reduce-overhead"), gpu, 2)


def test_compile_model_leaves_the_model_eager_and_a_failed_compile_warns(capsys):
    """A compiled run keeps model.pth's key names and eager generation; without a C++ compiler it warns in one
    line and trains eagerly, but out of memory while compiling is reported as out of memory."""
    torch.manual_seed(0)
    model = babygpt.BabyGPT(20, block_size=8, n_embed=16, n_head=2, n_layer=2, dropout=0.0)
    keys = list(model.state_dict())
    clock = babygpt.PhaseClock()
    seen = []
    compiled = babygpt.compile_model(model, _cfg(compile="true"), CPU, 1, clock, seen.append)
    assert seen == [compiled] and compiled is not model and compiled._orig_mod is model
    assert list(model.state_dict()) == keys and model._compiled_call_impl is None

    def broken(m):
        raise RuntimeError("InductorError: no working C++ compiler found\nmore detail")
    assert babygpt.compile_model(model, _cfg(compile="true"), CPU, 1, clock, broken) is model
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: torch.compile failed (InductorError: no working C++ compiler found); training without it"]
    assert babygpt.compile_model(model, _cfg(), CPU, 1, clock, broken) is model  # auto: eager

    def out_of_memory(m):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(torch.OutOfMemoryError):
        babygpt.compile_model(model, _cfg(compile="true"), CPU, 1, clock, out_of_memory)


def test_warm_up_runs_trainings_passes_and_leaves_no_trace():
    """The compile warm-up runs one evaluation pass per split and one training forward and backward, and the
    training after it is the training without it."""
    vocab, data = corpus_data()
    cfg = SimpleNamespace(block_size=16)
    runs = []
    for warm in (True, False):
        model = tiny_model(vocab, dropout=0.2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        calls = []
        real_forward = model.forward
        model.forward = lambda *a, **k: calls.append(a[0].shape) or real_forward(*a, **k)
        if warm:
            babygpt.warm_up(model, data, fake_run(4, CPU, cfg=cfg, ctx=nullcontext(), eval_batch=8, eval_passes=3,
                                                  scaler=torch.amp.GradScaler(enabled=False)))
            assert calls == [(24, 16), (24, 16), (4, 16)]
        babygpt.train_step(model, optimizer, [babygpt.get_batch(data["train"], 4, 16)])
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


# -----------------------------------------------------------------------------
# Evaluation passes

def test_evaluation_in_larger_passes_gives_the_same_losses():
    """Evaluating several batches per pass (as on a GPU) prints the same losses as one batch at a time."""
    vocab, data = corpus_data()
    model = tiny_model(vocab, dropout=0.2)
    one = evaluate(model, data, 8, 16, 6, torch.Generator().manual_seed(4))
    for n in (2, 3, 4):  # 4 does not divide 6: the last pass is smaller
        got = evaluate(model, data, 8, 16, 6, torch.Generator().manual_seed(4), batches_per_pass=n)
        for split in ("train", "val"):
            assert got[split] == pytest.approx(one[split], abs=1e-5), (n, split)
    assert model.training


def test_choose_eval_passes_is_one_off_cuda_and_divides_eval_iters(monkeypatch):
    """A GPU evaluates up to 20 batches per pass, fewer when its memory is small, always a divisor of eval_iters;
    a CPU one at a time."""
    cfg = SimpleNamespace(eval_iters=100, block_size=256, batch_size=64)
    assert babygpt.choose_eval_passes(cfg, cfg.batch_size, 6104, CPU) == 1
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (70 * 2**30, 80 * 2**30))
    n = babygpt.choose_eval_passes(cfg, cfg.batch_size, 6104, torch.device("cuda"))
    assert n == 20 and 100 % n == 0
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (2 * 2**30, 8 * 2**30))
    small = babygpt.choose_eval_passes(cfg, cfg.batch_size, 6104, torch.device("cuda"))
    assert 1 <= small < n and 100 % small == 0  # a small GPU gets smaller passes
    odd = SimpleNamespace(eval_iters=7, block_size=256, batch_size=64)
    assert babygpt.choose_eval_passes(odd, odd.batch_size, 6104, torch.device("cuda")) in (1, 7)


# -----------------------------------------------------------------------------
# Huge pages

HUGE_PAGES = """
import os, sys, runpy
sys.argv = [{script!r}, "--help"]
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit:
    pass
import torch
x = torch.ones(64 * 2**20 // 4)
print([l.split()[1] for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")][0])
"""


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled") or
                    "[never]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read(),
                    reason="this Linux has transparent huge pages off")
@pytest.mark.parametrize("env", ["", "0"])
def test_a_cpu_run_puts_large_tensors_on_huge_pages_unless_told_not_to(env):
    """`python babygpt.py` puts large CPU tensors on huge pages (set before torch is imported), unless the user
    sets THP_MEM_ALLOC_ENABLE=0."""
    code = HUGE_PAGES.format(script=babygpt.__file__)
    extra = {"THP_MEM_ALLOC_ENABLE": env} if env else {}
    full = {k: v for k, v in cli_env(extra).items() if k != "THP_MEM_ALLOC_ENABLE" or env}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=60)
    kilobytes = int(out.stdout.strip().splitlines()[-1])
    assert (kilobytes > 0) == (env == ""), out.stdout + out.stderr


# -----------------------------------------------------------------------------
# CUDA only

@pytest.fixture
def no_tf32():
    """fp32 comparisons on CUDA need true fp32 matmuls."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@cuda
def test_cuda_fp32_sdpa_matches_reference(no_tf32):
    """On a GPU the fused attention in float32 gives the seed's logits at the seed's shape."""
    ref, baby = seed_and_baby(100, 256, 384, 6, 6, device="cuda")
    idx = torch.randint(100, (4, 256), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(baby(idx)[0], ref(idx)[0], rtol=0, atol=1e-5)


@cuda
def test_cuda_bf16_autocast_logits_close_to_fp32(no_tf32):
    """On a GPU bfloat16 predicts nearly the same next characters as float32."""
    _, baby = seed_and_baby(100, 256, 384, 6, 6, device="cuda")
    idx = torch.randint(100, (4, 256), device="cuda")
    with torch.no_grad():
        fp32 = baby(idx)[0]
        with babygpt.autocast(torch.device("cuda"), BF16):
            bf16 = baby(idx)[0]
    assert bf16.dtype == BF16
    assert (bf16.float() - fp32).abs().max().item() < 0.05
    assert mean_kl(fp32, bf16) < 1e-4


@cuda
def test_cuda_compiled_model_matches_eager(no_tf32):
    """The compiled model computes the eager model's logits and loss."""
    _, baby = seed_and_baby(100, 64, 128, 4, 2, device="cuda")
    compiled = torch.compile(baby)
    idx = torch.randint(100, (4, 64), device="cuda")
    tgt = torch.randint(100, (4, 64), device="cuda")
    with torch.no_grad():
        eager_logits, eager_loss = baby(idx, tgt)
        comp_logits, comp_loss = compiled(idx, tgt)
    torch.testing.assert_close(comp_logits, eager_logits, rtol=1e-4, atol=1e-4)
    assert abs(comp_loss.item() - eager_loss.item()) < 1e-4


@cuda
def test_cuda_choose_dtype_and_fast_training_matches_fp32(no_tf32):
    """On a GPU auto picks bfloat16 (float16 without it), and compiled low-precision training learns as float32 does."""
    dev = torch.device("cuda")
    auto = babygpt.choose_dtype("auto", dev)
    assert auto == (BF16 if torch.cuda.is_bf16_supported() else torch.float16)
    assert babygpt.choose_dtype("float32", dev) == F32
    vocab, data = corpus_data()
    _, after32 = _train(vocab, data, None, device="cuda")
    before, after = _train(vocab, data, babygpt.autocast(dev, auto), device="cuda", compile_model=True)
    assert after["val"] < before["val"] - 0.5
    for split in ("train", "val"):
        assert abs(after[split] - after32[split]) < 0.05, (split, after, after32)


@cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_cuda_compiled_training_loop_matches_eager(mode):
    """The loop as train() runs it (evaluate, train, evaluate ...) compiled, CUDA graphs included, learns what the
    eager loop learns."""
    from torch._dynamo.utils import counters
    dev = torch.device("cuda")
    vocab, data = corpus_data()
    data = {k: v.to(dev) for k, v in data.items()}
    ctx = babygpt.autocast(dev, BF16)

    def run(compiled):
        torch.manual_seed(0)
        model = babygpt.BabyGPT(vocab, block_size=16, n_embed=32, n_head=2, n_layer=2, dropout=0.0).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
        model = babygpt.compile_model(model, _cfg("true" if compiled else "false", mode), dev, 1,
                                      babygpt.PhaseClock(), lambda m: None)
        assert hasattr(model, "_orig_mod") == compiled
        gen = torch.Generator(device=dev).manual_seed(1)
        evals = []
        for _ in range(3):
            evals.append(evaluate(model, data, 8, 16, 10, torch.Generator(device=dev).manual_seed(2),
                                               ctx, batches_per_pass=5))
            for _ in range(20):
                babygpt.train_step(model, opt, [babygpt.get_batch(data["train"], 8, 16, gen)], ctx)
        return evals

    eager = run(False)
    skips, graphs = counters["inductor"]["cudagraph_skips"], counters["stats"]["unique_graphs"]
    comp = run(True)
    assert counters["stats"]["unique_graphs"] > graphs  # this loop compiled
    assert counters["inductor"]["cudagraph_skips"] == skips  # and its graphs really ran
    assert comp[-1]["val"] < comp[0]["val"] - 0.5
    for e, c in zip(eager, comp):
        for split in ("train", "val"):
            assert abs(e[split] - c[split]) < 0.05, (split, eager, comp)


@cuda
def test_cuda_get_batch_gathers_on_the_device():
    """On a GPU the batches are gathered on the GPU, as consecutive windows with targets one on."""
    data = torch.arange(1000, device="cuda")
    for gen in (torch.Generator(device="cuda").manual_seed(0), torch.Generator().manual_seed(0)):  # a Mac's: CPU
        x, y = babygpt.get_batch(data, 32, 16, gen)
        assert x.device.type == y.device.type == "cuda"
        offsets = x[:, 0]
        want = offsets[:, None] + torch.arange(16, device="cuda")
        assert torch.equal(x, want) and torch.equal(y, want + 1)


@cuda
def test_cuda_model_pth_holds_cpu_tensors_that_load_on_a_machine_without_a_gpu(corpus, monkeypatch, capsys):
    """A model.pth trained on a GPU must load with a plain torch.load on a laptop without one: its tensors are
    saved on the CPU."""
    monkeypatch.chdir(corpus.parent)
    assert run_main(capsys, tiny("--device=cuda", "--compile=false", data=corpus.name)).returncode == 0
    weights = torch.load("model.pth", weights_only=True)
    assert {t.device.type for t in weights.values()} == {"cpu"}
