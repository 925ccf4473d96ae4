"""Measured defaults: the dtype probe and its decision, the CPU's long-run note, progress during
evaluation, MPS's draws on the CPU (faked: no MPS here), and generation's attention kernels."""

import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import babygpt
from conftest import TINY, cli_env, corpus_data_for, losses, make_corpus, run_main, show, tiny

F32, BF16 = torch.float32, torch.bfloat16


def tiny_model(vocab, dropout=0.2):
    torch.manual_seed(0)
    return babygpt.BabyGPT(vocab, block_size=16, n_embed=32, n_head=2, n_layer=2, dropout=dropout)


def cfg_for(**kw):
    """The constants as a config (nothing printed), with a tiny shape and `kw` on top."""
    cfg = {k: getattr(babygpt, k) for k in babygpt.CONFIG_KEYS}
    cfg.update(n_layer=2, n_head=2, n_embed=32, block_size=16, batch_size=8, max_iters=10, eval_iters=2)
    return SimpleNamespace(**{**cfg, "_explicit": set(), "_measured": set(), **kw})


@pytest.mark.parametrize("steps,expected", [
    ({F32: 1.0, BF16: 0.6}, BF16),   # bfloat16 faster
    ({F32: 0.7, BF16: 1.0}, F32),    # bfloat16 slower
    ({F32: 0.5, BF16: 0.5}, F32),    # a tie keeps the exact format
    ({F32: 0.5}, F32),
])
def test_auto_keeps_the_faster_measured_dtype(steps, expected):
    assert babygpt.choose_dtype("auto", torch.device("cpu"), steps) == expected


def fake_probe(steps, forward=0.01):
    def probe(model, data, micro_batch, block_size, dev, dtypes, budget=3.0):
        return {dt: steps[dt] for dt in dtypes}, forward
    return probe


def plan(cfg, micro_batch=8):
    return babygpt.plan_run(cfg, None, None, micro_batch, torch.device("cpu"), 1, 0, babygpt.PhaseClock())


@pytest.mark.parametrize("bf16_seconds", [0.5, 2.0])
def test_auto_prints_its_measured_decision(monkeypatch, capsys, bf16_seconds):
    monkeypatch.setattr(babygpt, "probe_dtypes", fake_probe({F32: 1.0, BF16: bf16_seconds}))
    got = plan(cfg_for(dtype="auto"))
    assert got == (BF16 if bf16_seconds < 1.0 else F32)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"dtype auto: {babygpt.dtype_name(got)}; on this cpu bfloat16 is "
                                               f"{1 / bf16_seconds:.2f}x as fast as float32")
    assert f"(best of 3: float32 1.000s, bfloat16 {bf16_seconds:.3f}s a step of 8 x 16 tokens)" in out[0]


def test_forced_bfloat16_that_is_slower_is_allowed_with_a_note(monkeypatch, capsys):
    monkeypatch.setattr(babygpt, "probe_dtypes", fake_probe({F32: 1.0, BF16: 1.25}))
    assert plan(cfg_for(dtype="bfloat16")) == BF16
    assert "note: bfloat16 is slower than float32 on this cpu (0.80x" in capsys.readouterr().out


def test_forced_float16_off_cuda_is_timed_and_named(monkeypatch, capsys):
    """MPS can autocast to float16: the forced dtype is the one timed against float32."""
    monkeypatch.setattr(babygpt, "probe_dtypes", fake_probe({F32: 1.0, torch.float16: 2.0}))
    got = babygpt.plan_run(cfg_for(dtype="float16"), None, None, 8, torch.device("mps"), 1, 0, babygpt.PhaseClock())
    assert got == torch.float16
    assert "note: float16 is slower than float32 on this mps (0.50x: best of 3: float32 1.000s, float16 2.000s" in \
        capsys.readouterr().out


def test_forced_float32_measures_float32_only(monkeypatch, capsys):
    seen = []

    def probe(model, data, micro_batch, block_size, dev, dtypes, budget=3.0):
        seen.append(list(dtypes))
        return {F32: 0.01}, 0.001
    monkeypatch.setattr(babygpt, "probe_dtypes", probe)
    assert plan(cfg_for(dtype="float32")) == F32
    assert seen == [[F32]] and capsys.readouterr().out == ""


@pytest.mark.parametrize("preset", ["", "cpu"])
def test_a_long_cpu_run_is_announced_with_its_measured_length(monkeypatch, capsys, preset):
    # 2 s a step, 0.7 s an evaluation batch: the default run (5000 steps, 101 evaluations of 200
    # batches) needs 5000 x 2 + 101 x 200 x 0.7 = 24,140 s = 6.7 hours
    monkeypatch.setattr(babygpt, "probe_dtypes", fake_probe({F32: 2.0, BF16: 3.0}, forward=0.7))
    _, cfg = babygpt.parse_args([f"--preset={preset}", "--max_iters=5000", "--eval_interval=50",
                                 "--eval_iters=100"] if preset else [])
    capsys.readouterr()
    plan(cfg, cfg.batch_size)
    out = capsys.readouterr().out
    assert "note: on this CPU this run needs about 6.7 hours" in out
    assert ("--preset=cpu trains a small model" in out) == (preset == "")


def test_a_short_cpu_run_says_nothing(monkeypatch, capsys):
    monkeypatch.setattr(babygpt, "probe_dtypes", fake_probe({F32: 0.001}, forward=0.0003))
    plan(cfg_for(dtype="float32"))
    assert "note" not in capsys.readouterr().out


@pytest.mark.parametrize("step,expected", [(0.2, 2800), (0.4, 1400), (0.05, 9800), (10.0, 250)])
def test_max_minutes_fits_the_steps_to_the_measured_speed(monkeypatch, capsys, step, expected):
    """The preset: a step of 0.2 s, and an evaluation of 2 x 50 batches of 0.05 s every 500 steps:
    (600 - 5 - 5) / (0.2 + 5 / 500) = 2809 steps, rounded down to 2800. At least 250."""
    monkeypatch.setattr(babygpt, "probe_dtypes", fake_probe({F32: step}, forward=0.05))
    _, cfg = babygpt.parse_args(["--preset=cpu", "--dtype=float32"])
    capsys.readouterr()
    clock = babygpt.PhaseClock(babygpt.time.time())
    babygpt.plan_run(cfg, None, None, 8, torch.device("cpu"), 1, 0, clock)
    assert cfg.max_iters == expected
    out = capsys.readouterr().out
    assert out.startswith(f"{expected:,} steps fit in about 10 minutes on this cpu ({step:.3f}s a step")
    _, cfg = babygpt.parse_args(["--preset=cpu", "--dtype=float32", "--max_iters=300"])  # explicit wins
    babygpt.plan_run(cfg, None, None, 32, torch.device("cpu"), 1, 0, clock)
    assert cfg.max_iters == 300 and "fit" not in capsys.readouterr().out


@pytest.mark.parametrize("it,per_step,expected", [
    (1000, 0.1, 3900),   # 1000 + 294.99 / 0.1 = 3949, rounded down to a multiple of 50
    (1000, 0.05, 6850),  # a faster machine: more steps
    (3750, 1.0, 4000),   # slower now: 3750 + 294 = 4044 steps
    (3750, 10.0, 3751),  # far slower: one more step, never fewer than done
])
def test_a_re_fit_gives_the_steps_left_in_the_minutes_at_the_measured_speed(it, per_step, expected):
    """Five of ten minutes gone, 5 s kept for generation and saving: 295 s left."""
    _, cfg = babygpt.parse_args(["--preset=cpu"])
    clock = babygpt.PhaseClock(babygpt.time.time() - 300)
    babygpt.fit_steps(cfg, it, per_step, 0, clock, torch.device("cpu"), 1)
    assert cfg.max_iters == expected


def test_a_fitted_run_re_fits_its_steps_to_the_speed_it_measures(corpus, monkeypatch, capsys):
    """The probe claims a step takes 10 us, and only 0.2 s of the minute are left after it: the first
    fit promises thousands of steps, and the first evaluation cuts them to the 250 a fitted run trains at least."""
    monkeypatch.chdir(corpus.parent)
    clock = babygpt.PhaseClock()

    def probe(*args, **kwargs):
        clock.start = babygpt.time.time() - (60 - 5 - 0.2)
        return {F32: 1e-5}, 1e-5
    monkeypatch.setattr(babygpt, "probe_dtypes", probe)
    _, cfg = babygpt.parse_args([a for a in tiny("--max_minutes=1", "--eval_interval=50") if "max_iters" not in a])
    babygpt.train(cfg, clock)
    out = capsys.readouterr().out
    first = int(re.search(r"^([\d,]+) steps fit in about 1 minutes", out, re.M).group(1).replace(",", ""))
    assert first >= 1000, out
    assert "max_minutes: 250 steps fit now" in out, out
    assert set(losses(out)) == set(range(0, 251, 50))
    state = torch.load("ckpt.pt", weights_only=True)
    assert state["iter_num"] == 250 and state["config"]["max_iters"] == 250  # a resume keeps the re-fit


def test_a_fitted_run_that_is_faster_than_the_probe_said_trains_to_the_new_count(corpus, monkeypatch, capsys):
    """The probe claims a second a step with 4 s left: 250 steps (the least). The run's real speed
    fits more, and it must train, evaluate and stop at the new count, not at the first one."""
    monkeypatch.chdir(corpus.parent)
    clock = babygpt.PhaseClock()

    def probe(*args, **kwargs):
        clock.start = babygpt.time.time() - (60 - 5 - 4)
        return {F32: 1.0}, 1e-5
    monkeypatch.setattr(babygpt, "probe_dtypes", probe)
    _, cfg = babygpt.parse_args([a for a in tiny("--max_minutes=1", "--eval_interval=50") if "max_iters" not in a])
    babygpt.train(cfg, clock)
    out = capsys.readouterr().out
    assert "250 steps fit in about 1 minutes" in out
    last = max(losses(out))
    state = torch.load("ckpt.pt", weights_only=True)
    assert last > 250 and state["iter_num"] == state["config"]["max_iters"] == last, out


def test_a_re_fit_is_announced_only_when_it_moves_5_percent_from_the_last_count_announced(
        corpus, monkeypatch, capsys):
    """Re-fits of 300 -> 310 (3%) stay quiet, 330 (10% from 300) is said, then 340 and 345 (under
    5% from 330) are quiet again; the run ends at the last count."""
    monkeypatch.chdir(corpus.parent)
    monkeypatch.setattr(babygpt, "probe_dtypes", fake_probe({F32: 1e-3}))
    counts = iter([300, 310, 330, 340, 345, 345, 345])

    def fit(cfg, *args):
        cfg.max_iters = next(counts)
    monkeypatch.setattr(babygpt, "fit_steps", fit)
    r = run_main(capsys, [a for a in tiny("--max_minutes=1", "--eval_interval=50") if "max_iters" not in a])
    assert r.returncode == 0, show(r)
    said = [line for line in r.stdout.splitlines() if line.startswith("max_minutes:")]
    assert said == ["max_minutes: 330 steps fit now, at this run's speed so far"], show(r)
    assert max(losses(r.stdout)) == 345


def test_a_fitted_run_resumes_to_the_steps_it_was_fitted_to(corpus, monkeypatch, capsys):
    monkeypatch.chdir(corpus.parent)
    monkeypatch.setattr(babygpt, "probe_dtypes", fake_probe({F32: 0.5, BF16: 1.0}, forward=0.01))
    args = TINY + [f"--data_path={corpus.name}", "--max_minutes=5"]
    args = [a for a in args if not a.startswith("--max_iters")]
    ckpt = babygpt.main(args + ["--max_iters=3"])  # stands for a run stopped early
    assert ckpt == 0
    state = babygpt.torch.load("ckpt.pt", weights_only=True)
    state["config"]["max_iters"] = 500  # as a fitted run of 500 steps would have saved
    babygpt.torch.save(state, "ckpt.pt")
    _, cfg = babygpt.parse_args(args + ["--resume=true"])
    model = babygpt.BabyGPT(state["model"]["token_embedding_table.weight"].shape[0], 16, 32, 2, 2)
    babygpt.load_start(cfg, model, babygpt.Tokenizer(state["chars"]))
    assert cfg.max_iters == 500


def test_the_probe_leaves_no_trace_on_the_run():
    """Training after the probe is training without it: no gradients left to add to the first
    step, the random state and the training mode (dropout) as they were."""
    vocab, data = corpus_data_for(make_corpus())
    runs = []
    for probe in (True, False):
        model = tiny_model(vocab, dropout=0.2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        torch.manual_seed(1)
        if probe:
            steps, forward = babygpt.probe_dtypes(model, data["train"], 8, 16, torch.device("cpu"), [F32, BF16],
                                                  budget=0.3)
            assert set(steps) == {F32, BF16} and all(t > 0 for t in steps.values()) and forward > 0
        babygpt.train_step(model, optimizer, [babygpt.get_batch(data["train"], 8, 16)])
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_the_probe_times_a_much_slower_dtype_on_a_few_tokens_only(monkeypatch):
    """A dtype 20x slower (bfloat16 on a CPU without AVX-512) must not cost 20x the budget."""
    real, shapes = babygpt.time_step, []

    def time_step(model, optimizer, x, y, dt, dev):
        shapes.append((dt, x.numel()))
        passes, update = real(model, optimizer, x, y, dt, dev)
        return passes * (20 if dt == BF16 else 1), update
    monkeypatch.setattr(babygpt, "time_step", time_step)
    vocab, data = corpus_data_for(make_corpus())
    steps, _ = babygpt.probe_dtypes(tiny_model(vocab), data["train"], 8, 16, torch.device("cpu"), [F32, BF16],
                                    budget=0.5)
    assert max(n for dt, n in shapes if dt == BF16) <= 2 * 16 and len([s for s in shapes if s[0] == BF16]) == 1
    assert steps[BF16] > 5 * steps[F32] and babygpt.choose_dtype("auto", torch.device("cpu"), steps) == F32


def test_a_run_with_the_probe_on_is_the_run_it_chose(corpus, monkeypatch, capsys):
    """dtype=auto probes, then trains exactly as if its choice had been forced."""
    monkeypatch.chdir(corpus.parent)
    monkeypatch.setattr(babygpt, "choose_dtype", lambda name, dev, steps=None: F32)
    base = [a for a in TINY if not a.startswith("--dtype")] + [f"--data_path={corpus.name}", "--dropout=0.1"]
    logs = []
    for dtype in ("auto", "float32"):
        assert babygpt.main(base + [f"--dtype={dtype}"]) == 0
        out = capsys.readouterr().out
        logs.append([l for l in out.splitlines() if l.startswith("step ")])
        assert ("dtype auto: float32" in out) == (dtype == "auto")
    strip = lambda lines: [l.split(", speed")[0] for l in lines]
    assert strip(logs[0]) == strip(logs[1]) and len(logs[0]) == 3


def test_estimate_loss_reports_each_pass_and_can_be_stopped():
    vocab, data = corpus_data_for(make_corpus())
    model = tiny_model(vocab)
    seen = []
    babygpt.estimate_loss(model, data, 4, 16, 6, torch.Generator().manual_seed(0),
                          on_batch=lambda done, total: seen.append((done, total)), batches_per_pass=2)
    assert seen == [(0, 12), (2, 12), (4, 12), (6, 12), (8, 12), (10, 12)]

    def stop(done, total):
        if done >= 4:
            raise babygpt.Interrupted
    with pytest.raises(babygpt.Interrupted):
        babygpt.estimate_loss(model, data, 4, 16, 6, torch.Generator().manual_seed(0), on_batch=stop)
    assert model.training


# -----------------------------------------------------------------------------
# MPS: random draws on the CPU (torch.multinomial has open bugs there), faked on a CPU

def test_mps_draws_and_generators_live_on_the_cpu():
    mps, cuda, cpu = torch.device("mps"), torch.device("cuda"), torch.device("cpu")
    assert babygpt.generator_device(mps) == cpu
    assert babygpt.generator_device(cuda) == cuda and babygpt.generator_device(cpu) == cpu


def test_sample_next_draws_where_generator_device_says(monkeypatch):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    plain = babygpt.sample_next(logits, 1.0, 10, torch.Generator().manual_seed(7))
    seen, real = [], torch.multinomial

    def multinomial(probs, *args, **kwargs):
        seen.append(probs.device)
        return real(probs, *args, **kwargs)
    monkeypatch.setattr(babygpt, "generator_device", lambda dev: torch.device("cpu"))
    monkeypatch.setattr(torch, "multinomial", multinomial)
    faked = babygpt.sample_next(logits, 1.0, 10, torch.Generator().manual_seed(7))
    assert seen == [torch.device("cpu")]
    assert torch.equal(plain, faked) and faked.device == logits.device and faked.shape == (3, 1)


def test_get_batch_draws_with_a_generator_of_another_device():
    """On MPS the evaluation generator is a CPU one; the windows are then moved to the data."""
    data = torch.arange(500)
    x, y = babygpt.get_batch(data, 4, 8, torch.Generator(device="cpu").manual_seed(1))
    assert x.device == data.device and torch.equal(y, x + 1)


# -----------------------------------------------------------------------------
# Generation's attention kernels

def test_generation_attention_leaves_out_cudnn_on_cuda_only(monkeypatch):
    from contextlib import nullcontext

    import torch.nn.attention as attention
    assert isinstance(babygpt.generation_attention(torch.device("cpu")), nullcontext)
    allowed = []
    monkeypatch.setattr(attention, "sdpa_kernel", lambda backends: allowed.append(list(backends)) or nullcontext())
    babygpt.generation_attention(torch.device("cuda"))
    B = attention.SDPBackend
    assert allowed == [[B.EFFICIENT_ATTENTION, B.MATH]]  # never CUDNN_ATTENTION


def test_greedy_generation_is_the_same_with_every_attention_backend():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    vocab, data = corpus_data_for(make_corpus())
    model = tiny_model(vocab, dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):  # a little training, so greedy picks are not near-ties
        babygpt.train_step(model, opt, [babygpt.get_batch(data["train"], 8, 16)])
    idx = data["val"][:5].view(1, 5)
    outs = {}
    for name, backend in (("math", SDPBackend.MATH), ("flash", SDPBackend.FLASH_ATTENTION)):
        for cache in (True, False):
            with sdpa_kernel([backend]):
                outs[name, cache] = model.generate(idx, 25, temperature=0, kv_cache=cache)  # past block_size
    first = next(iter(outs.values()))
    assert all(torch.equal(first, o) for o in outs.values()), outs


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
    """PyTorch reads THP_MEM_ALLOC_ENABLE at its first CPU allocation, so babygpt.py must set
    it before it imports torch."""
    code = HUGE_PAGES.format(script=babygpt.__file__)
    extra = {"THP_MEM_ALLOC_ENABLE": env} if env else {}
    full = {k: v for k, v in cli_env(extra).items() if k != "THP_MEM_ALLOC_ENABLE" or env}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=60)
    kilobytes = int(out.stdout.strip().splitlines()[-1])
    assert (kilobytes > 0) == (env == ""), out.stdout + out.stderr


def test_probe_drops_a_dtype_the_device_cannot_autocast(monkeypatch, capsys):
    """An MPS without bfloat16 autocast raises: the probe keeps float32 and training goes on."""
    real = babygpt.time_step

    def time_step(model, optimizer, x, y, dt, dev):
        if dt == BF16:
            raise RuntimeError("bfloat16 autocast is not supported here")
        return real(model, optimizer, x, y, dt, dev)
    monkeypatch.setattr(babygpt, "time_step", time_step)
    vocab, data = corpus_data_for(make_corpus())
    model = tiny_model(vocab)
    steps, forward = babygpt.probe_dtypes(model, data["train"], 8, 16, torch.device("cpu"), [F32, BF16], budget=0.3)
    assert set(steps) == {F32} and all(p.grad is None for p in model.parameters())
    assert babygpt.plan_run(cfg_for(dtype="auto"), model, data["train"], 8, torch.device("cpu"), 1, 0,
                            babygpt.PhaseClock()) == F32
