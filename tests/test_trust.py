"""Runs you can trust: a measured decision (the dtype, the fitted step count) is made once per
training, recorded in ckpt.pt and the wandb config, kept on resume, and written out as a command
that repeats the run exactly."""

import re
import shlex
import sys

import pytest
import torch

import babygpt
from conftest import TINY, FakeWandb, load_ckpt, losses, run_cli, run_main, show, tiny

F32, BF16 = torch.float32, torch.bfloat16
AUTO = [a for a in TINY if not a.startswith(("--dtype", "--max_iters"))] + ["--dropout=0.1", "--learning_rate=1e-2"]


def winners(*order):
    """A fake probe whose k-th call measures order[k] clearly faster than the other dtype."""
    calls = iter(order)

    def probe(model, data, micro_batch, block_size, dev, dtypes, budget=2.5):
        fast = next(calls)
        return {dt: (0.01 if dt == fast else 0.03) for dt in dtypes}, 0.001
    return probe


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_keeps_the_dtype_its_first_start_measured(corpus, monkeypatch, capsys):
    """A user resumes on a busy CPU where the probe now says float32: the run must go on in the
    bfloat16 it started in and end with the weights of the run done straight, bit for bit."""
    monkeypatch.chdir(corpus.parent)
    args = AUTO + [f"--data_path={corpus.name}"]
    monkeypatch.setattr(babygpt, "probe_dtypes", winners(BF16))
    straight = run_main(capsys, args + ["--max_iters=20", "--dtype=bfloat16", "--ckpt_path=whole.pt",
                                        "--save_path=whole.pth"])
    assert straight.returncode == 0, show(straight)
    monkeypatch.setattr(babygpt, "probe_dtypes", winners(BF16, F32))  # the second start disagrees
    first = run_main(capsys, args + ["--max_iters=10"])
    assert first.returncode == 0 and "dtype auto: bfloat16" in first.stdout, show(first)
    assert load_ckpt("ckpt.pt")["config"]["dtype"] == "bfloat16"  # what it trained in, not "auto"
    second = run_main(capsys, args + ["--max_iters=20", "--resume=true"])
    assert second.returncode == 0, show(second)
    assert "resuming from ckpt.pt at step 10, in bfloat16" in second.stdout and "note:" not in second.stdout
    repeat = re.search(r"^to repeat this run exactly: .* --dtype=bfloat16 --max_iters=20$", second.stdout, re.M)
    assert repeat and "--resume" not in repeat[0], show(second)  # the whole training's dtype was measured
    assert {**losses(first.stdout), **losses(second.stdout)} == losses(straight.stdout)
    assert same_weights(load_ckpt("model.pth"), load_ckpt("whole.pth"))


def test_a_bfloat16_piece_resumed_with_the_default_dtype_continues_in_bfloat16(corpus):
    """The real probe, in a process of its own: trained with --dtype=bfloat16, then resumed with the
    default dtype=auto, the model is the one trained in bfloat16 throughout (on a CPU where auto
    picks float32 this fails unless the checkpoint's dtype is kept)."""
    folder, data = corpus.parent, f"--data_path={corpus.name}"
    whole = run_cli(AUTO + [data, "--max_iters=20", "--dtype=bfloat16", "--save_path=whole.pth",
                            "--ckpt_path=whole.pt"], cwd=folder)
    assert whole.returncode == 0, whole.stderr
    first = run_cli(AUTO + [data, "--max_iters=10", "--dtype=bfloat16"], cwd=folder)
    second = run_cli(AUTO + [data, "--max_iters=20", "--resume=true"], cwd=folder)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "in bfloat16" in second.stdout, second.stdout
    assert same_weights(load_ckpt(folder / "model.pth"), load_ckpt(folder / "whole.pth"))


@pytest.mark.parametrize("dtype,note", [("float32", True), ("bfloat16", False)])
def test_an_explicit_dtype_on_resume_says_the_run_is_no_longer_exact(corpus, monkeypatch, capsys, dtype, note):
    """Resuming a bfloat16 checkpoint with --dtype=float32 trains in float32 (the user asked) and says
    in one line that the run now differs from one never stopped; the same dtype says nothing."""
    monkeypatch.chdir(corpus.parent)
    args = AUTO + [f"--data_path={corpus.name}"]
    monkeypatch.setattr(babygpt, "probe_dtypes", winners(BF16, BF16))
    assert run_main(capsys, args + ["--max_iters=5", "--dtype=bfloat16"]).returncode == 0
    res = run_main(capsys, args + ["--max_iters=10", "--resume=true", f"--dtype={dtype}"])
    assert res.returncode == 0, show(res)
    said = [line for line in res.stdout.splitlines() if "no longer exact" in line]
    if note:
        assert said == ["note: ckpt.pt trained in bfloat16; with --dtype=float32 this resumed run is no longer "
                        "exact (leave --dtype out to keep bfloat16)"], show(res)
        assert load_ckpt("ckpt.pt")["config"]["dtype"] == "float32"
    else:
        assert said == [], show(res)


@pytest.mark.parametrize("bf16_seconds,expected", [
    (0.97, F32),   # 1.03x: a coin toss between two formats, so the exact one
    (0.85, F32),   # 1.18x: still under the margin
    (0.80, BF16),  # 1.25x: clearly faster
])
def test_near_ties_give_float32(bf16_seconds, expected):
    """Users on a CPU where the two formats time alike must get float32 every time, not whichever
    format a noisy moment favoured."""
    assert babygpt.choose_dtype("auto", torch.device("cpu"), {F32: 1.0, BF16: bf16_seconds}) == expected


def test_a_moment_of_contention_does_not_change_the_probes_decision(monkeypatch, capsys):
    """Another process takes the CPU during one float32 repeat (5x slower): with two formats that time
    alike the decision must still be float32, and the line says what was measured."""
    calls = []

    def time_step(model, optimizer, x, y, dt, dev):
        calls.append(dt)
        busy = dt == F32 and calls.count(F32) == 5  # the first timed repeat (after two scouts, a sizing pass and a warm-up)
        return (0.150 if busy else 0.030 if dt == F32 else 0.031), 0.0
    monkeypatch.setattr(babygpt, "time_step", time_step)
    _, cfg = babygpt.parse_args(["--n_layer=1", "--n_head=1", "--n_embed=8", "--block_size=8", "--wandb_mode=disabled"])
    data = torch.randint(0, 20, (500,))
    model = babygpt.BabyGPT(20, 8, 8, 1, 1)
    got = babygpt.plan_run(cfg, model, data, 8, torch.device("cpu"), 1, 0, babygpt.PhaseClock())
    out = capsys.readouterr().out
    assert got == F32 and cfg.dtype == "float32", out
    assert re.search(r"dtype auto: float32; on this cpu bfloat16 is 0\.97x as fast as float32, under the 1\.2x .*"
                     r"\(best of 3: float32 0\.030s, bfloat16 0\.031s a step of 8 x 8 tokens\)", out), out


def fitted_run(monkeypatch, capsys, args, counts):
    """A max_minutes run whose fits give `counts` in turn (the first from the probe, then one per
    evaluation), with a probe that measures bfloat16 clearly faster: its result namespace."""
    monkeypatch.setattr(babygpt, "probe_dtypes", winners(*[BF16] * 10))
    counts = iter(counts)

    def fit(cfg, *rest):
        cfg.max_iters = next(counts)
    monkeypatch.setattr(babygpt, "fit_steps", fit)
    return run_main(capsys, args)


def test_the_repeat_command_trains_the_same_run_with_nothing_measured(corpus, monkeypatch, capsys):
    """A fitted run with a cosine schedule and re-fits (120 -> 140 -> 150 steps) prints how to repeat
    it; that command, with the real probe and no fitting, prints the same losses and trains the same
    weights, and so does a second run of it."""
    monkeypatch.chdir(corpus.parent)
    args = AUTO + [f"--data_path={corpus.name}", "--max_minutes=1", "--eval_interval=20", "--lr_schedule=cosine",
                   "--warmup_iters=5", "--min_lr=1e-4", "--save_path=fitted.pth"]
    fitted = fitted_run(monkeypatch, capsys, args, [120, 140, 150, 150, 150, 150, 150, 150])
    assert fitted.returncode == 0, show(fitted)
    assert max(losses(fitted.stdout)) == 150
    line = re.search(r"^to repeat this run exactly: (.*)$", fitted.stdout, re.M)
    assert line, show(fitted)
    command = shlex.split(line[1])
    assert command[:2] == ["python", "babygpt.py"] or command[1].endswith("babygpt.py"), command
    assert command[-4:] == ["--dtype=bfloat16", "--max_iters=150", "--lr_decay_iters=120", "--max_minutes=0"], command
    monkeypatch.undo()  # the real probe and fit from here on
    monkeypatch.chdir(corpus.parent)
    for n in range(2):
        again = run_main(capsys, [a for a in command[2:] if not a.startswith("--save_path")] + [f"--save_path=again{n}.pth"])
        assert again.returncode == 0, show(again)
        assert losses(again.stdout) == losses(fitted.stdout), show(again)
        assert "to repeat this run" not in again.stdout  # nothing was measured
        assert same_weights(load_ckpt(f"again{n}.pth"), load_ckpt("fitted.pth"))


def test_ckpt_and_wandb_config_hold_the_values_used(corpus, monkeypatch, capsys):
    """In the dashboard and in ckpt.pt a user sees the dtype the run trained in and the step count it
    was finally fitted to, never 'auto' or the first estimate."""
    monkeypatch.chdir(corpus.parent)
    fake = FakeWandb(str(corpus.parent))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    args = [a for a in AUTO if not a.startswith("--wandb_mode")] + [
        f"--data_path={corpus.name}", "--max_minutes=1", "--eval_interval=20", "--wandb_mode=offline"]
    res = fitted_run(monkeypatch, capsys, args, [100, 120, 120, 120, 120, 120, 120])
    assert res.returncode == 0, show(res)
    assert fake.inits[0]["config"]["dtype"] == "bfloat16" and fake.inits[0]["config"]["max_iters"] == 100
    assert fake.configs[0]["dtype"] == "bfloat16" and fake.configs[0]["max_iters"] == 120  # updated on re-fit
    state = load_ckpt("ckpt.pt")
    assert state["config"]["dtype"] == "bfloat16" and state["config"]["max_iters"] == state["iter_num"] == 120
    assert set(state["measured"]) == {"dtype", "max_iters"}


def test_a_run_that_measured_nothing_prints_no_repeat_command(corpus, capsys, monkeypatch):
    """With --dtype and --max_iters given, the run already is its own repeat command."""
    monkeypatch.chdir(corpus.parent)
    res = run_main(capsys, tiny())
    assert res.returncode == 0 and "to repeat this run" not in res.stdout, show(res)
