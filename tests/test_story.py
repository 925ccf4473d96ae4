"""The file reads in the seed's order, and its shape changed nothing a user sees: the pinned
losses of a tiny run, --help as a user types settings, and the run's closing time line."""

import ast
import inspect
import os
import re
import time

import pytest

import babygpt
from conftest import ROOT, TINY, FakeWandb, run_cli

GOLDEN = os.path.join(ROOT, "tests", "golden", "tiny_run.txt")
# The run whose log lines tests/golden/tiny_run.txt pins (written by the code before the
# restructure, commit acda30c): float32 on one CPU thread, with dropout, a learning rate that
# moves the losses, and the seed's prompts.
PINNED_ARGS = [a for a in TINY if not a.startswith(("--max_iters", "--dropout"))] + [
    "--max_iters=20", "--dropout=0.1", "--learning_rate=1e-2", "--prompts=春江,往事"]
PHASE_LINE = re.compile(r"^total (\d+\.\d)s: start-up (\d+\.\d)s, compile (\d+\.\d)s, training (\d+\.\d)s, "
                        r"evaluation (\d+\.\d)s, checkpoints (\d+\.\d)s, generation and saving (\d+\.\d)s$")


def test_tiny_float32_run_prints_the_pinned_losses_and_samples(corpus):
    res = run_cli(PINNED_ARGS + [f"--data_path={corpus.name}"], cwd=corpus.parent)
    assert res.returncode == 0, res.stderr
    lines = [re.sub(r", speed: .*", "", line) for line in res.stdout.split("\n")
             if not line.startswith(("override:", "total "))]
    with open(GOLDEN, encoding="utf-8") as f:
        assert lines == f.read().split("\n")


def test_every_run_ends_with_its_time_split_into_phases(corpus):
    t0 = time.time()
    res = run_cli(PINNED_ARGS + [f"--data_path={corpus.name}"], cwd=corpus.parent)
    wall = time.time() - t0
    assert res.returncode == 0, res.stderr
    m = PHASE_LINE.match(res.stdout.rstrip("\n").split("\n")[-1])
    assert m, res.stdout[-300:]
    total, *phases = (float(x) for x in m.groups())
    assert sum(phases) == pytest.approx(total, abs=0.35)  # each is rounded to 0.1 s
    assert total <= wall + 0.1 and total > wall - 1.0  # the process's own wall time
    assert phases[0] > 0  # at least importing torch


def test_phase_clock_gives_every_second_to_one_phase(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(babygpt.time, "time", lambda: now[0])
    clock = babygpt.PhaseClock(start=90.0)  # the process started 10 s ago
    for name, seconds in (("compile", 3.0), ("evaluation", 1.5), ("training", 4.0), ("checkpoints", 0.5),
                          ("training", 2.0), ("generation and saving", 1.0)):
        clock.phase(name)
        now[0] += seconds
    seconds, total = clock.figures()
    assert total == 22.0 and sum(seconds.values()) == pytest.approx(22.0)
    assert seconds == {"start-up": 10.0, "compile": 3.0, "training": 6.0, "evaluation": 1.5,
                       "checkpoints": 0.5, "generation and saving": 1.0}
    assert clock.summary() == ("total 22.0s: start-up 10.0s, compile 3.0s, training 6.0s, evaluation 1.5s, "
                               "checkpoints 0.5s, generation and saving 1.0s")


def test_wandb_starts_while_the_model_compiles(corpus, monkeypatch):
    """wandb.init runs in a thread during the compile warm-up: here the fake init waits until
    the warm-up has begun, which would never happen if they ran one after the other. Its run is
    the one training logs to, and the wait for it counts as start-up, not compile."""
    warm_up_began, inits = __import__("threading").Event(), []
    real_start = babygpt.start_wandb

    def start_wandb(*args):
        assert warm_up_began.wait(timeout=30), "wandb.init did not start before the compile ended"
        inits.append(__import__("threading").current_thread().name)
        time.sleep(0.3)  # a slow init: the loop must wait for it
        return real_start(*args)

    def warm_up(s):
        warm_up_began.set()

    monkeypatch.setattr(babygpt, "start_wandb", start_wandb)
    monkeypatch.setattr(babygpt, "warm_up", warm_up)
    monkeypatch.setattr(babygpt, "compile_model", lambda *a: "compiled")  # as if (without the wait)
    fake = FakeWandb(str(corpus.parent))
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    monkeypatch.chdir(corpus.parent)
    args = [a for a in TINY if not a.startswith("--wandb_mode")] + [
        f"--data_path={corpus.name}", "--wandb_mode=offline"]
    clock = babygpt.PhaseClock(time.time())
    _, cfg = babygpt.parse_args(args)
    babygpt.train(cfg, clock)
    assert inits and inits[0].startswith("wandb-start")
    assert len(fake.inits) == 1 and any("val_loss" in row for row in fake.logged)
    seconds, _ = clock.figures()
    assert seconds["start-up"] >= 0.3 and seconds["compile"] < 0.3
    assert list(clock.notes) == ["python and imports", "data and device", "model, dtype, optimizer", "wandb.init"]
    assert clock.notes["wandb.init"] >= 0.3


def test_a_run_stopped_while_compiling_does_not_wait_for_wandb(corpus, monkeypatch, capsys):
    """Ctrl-C during the compile warm-up ends the run at once, even while wandb.init is still
    waiting for its server (up to WANDB_INIT_TIMEOUT): the thread it runs in is not waited for."""
    import threading
    release, still_waiting, daemon = threading.Event(), [], []

    def start_wandb(*args):
        daemon.append(threading.current_thread().daemon)  # exit does not wait for a daemon thread
        release.wait(timeout=60)
        still_waiting.append(not release.is_set())
        return babygpt.DummyWandb()

    def warm_up(s):
        raise KeyboardInterrupt

    monkeypatch.setattr(babygpt, "start_wandb", start_wandb)
    monkeypatch.setattr(babygpt, "warm_up", warm_up)
    monkeypatch.setattr(babygpt, "compile_model", lambda *a: "compiled")
    monkeypatch.chdir(corpus.parent)
    try:
        assert babygpt.main(TINY + [f"--data_path={corpus.name}"]) == 130
        assert not still_waiting  # main returned while wandb.init was still running
        assert daemon == [True]
    finally:
        release.set()
    assert "interrupted; files on disk are intact" in capsys.readouterr().err


def test_phase_clock_notes_start_up_steps(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(babygpt.time, "time", lambda: now[0])
    clock = babygpt.PhaseClock(start=97.0)
    clock.note("python and imports")
    now[0] += 0.5
    clock.note("data and device")

    def slow(x):
        now[0] += 1.25
        return x * 2

    assert clock.timed("wandb.init", slow, 21) == 42
    assert clock.detail(0.75) == ("detail: python and imports 3.0s, data and device 0.5s, wandb.init 1.2s, "
                                  "samples 0.8s (in evaluation)")


def test_time_figures_go_to_the_wandb_summary(corpus, monkeypatch, capsys):
    monkeypatch.setenv("BABYGPT_DETAIL", "1")  # and the detail line after the phase line
    fake = FakeWandb(str(corpus.parent))
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    monkeypatch.chdir(corpus.parent)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    args = [a for a in TINY if not a.startswith("--wandb_mode")] + [f"--data_path={corpus.name}", "--wandb_mode=offline"]
    assert babygpt.main(args) == 0
    summary = fake.summaries[-1]
    phases = [k for k in summary if k.startswith("time/") and k not in ("time/total", "time/samples")]
    assert {p[5:] for p in phases} == set(babygpt.PhaseClock.PHASES)
    assert sum(summary[p] for p in phases) == pytest.approx(summary["time/total"], abs=1e-6)
    last = capsys.readouterr().out.rstrip("\n").split("\n")[-2:]
    assert PHASE_LINE.match(last[0]) and last[1].startswith("detail: python and imports ")
    assert last[1].endswith(f"samples {summary['time/samples']:.1f}s (in evaluation)")


def test_help_shows_settings_as_typed_with_their_meaning(capsys):
    with pytest.raises(SystemExit) as info:
        babygpt.parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--prompts=春江,往事" in out and "--resume=false" in out and "--kv_cache=true" in out
    assert "['春江'" not in out and "True" not in out  # no Python reprs
    for name in babygpt.CONFIG_KEYS:  # every setting, with its default and its constant's comment
        line = next(l for l in out.splitlines() if l.strip().startswith(f"--{name}="))
        assert len(line.split(None, 1)) == 2, f"--{name} has no explanation: {line!r}"
    assert "presets: cpu (" in out


def test_the_file_reads_in_the_seeds_order():
    source = inspect.getsource(babygpt)
    tree = ast.parse(source)
    lines = {n.name: n.lineno for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    story = ["Tokenizer", "MultiHeadAttention", "FeedForward", "Block", "BabyGPT", "get_batch",
             "estimate_loss", "train_step", "get_lr", "train", "generate_texts", "sample", "main"]
    assert [lines[n] for n in story] == sorted(lines[n] for n in story)
    assert lines["Tokenizer"] <= 160
    banner = source[:source.index("---- plumbing")].count("\n") + 1
    assert lines["main"] < banner  # the story ends before the plumbing starts
    after = [name for name, line in lines.items() if line > banner]
    assert {"setup_training", "build_corpus", "parse_args", "start_wandb", "save_atomic"} <= set(after)
    first_constant = min(n.lineno for n in tree.body if isinstance(n, ast.Assign))
    assert first_constant < lines["Tokenizer"]


def test_train_is_short_and_reads_like_the_seeds_loop():
    src = inspect.getsource(babygpt.train)
    assert len(src.splitlines()) <= 80
    for block in ("# ---- evaluate and log", "# ---- checkpoint", "# ---- stop?", "# ---- one training step",
                  "# ---- progress", "# ---- generate and save"):
        assert block in src, block
    assert "last_step" in src
    assert "def " not in src.split("\n", 1)[1]  # no closures
