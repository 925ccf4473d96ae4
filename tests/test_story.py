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
    assert wall - 3.0 < total <= wall + 0.1  # the process's own wall time, from before torch is imported
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


def test_time_figures_go_to_the_wandb_summary(corpus, monkeypatch, capsys):
    fake = FakeWandb(str(corpus.parent))
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    monkeypatch.chdir(corpus.parent)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    args = [a for a in TINY if not a.startswith("--wandb_mode")] + [f"--data_path={corpus.name}", "--wandb_mode=offline"]
    assert babygpt.main(args) == 0
    summary = fake.summaries[-1]
    last = capsys.readouterr().out.rstrip("\n").split("\n")[-1]
    m = PHASE_LINE.match(last)
    assert m, last
    names = ["total"] + [f"time/{p}" for p in babygpt.PhaseClock.PHASES]
    printed = dict(zip(names, (float(x) for x in m.groups())))
    assert summary["time/total"] == pytest.approx(printed.pop("total"), abs=0.051)
    assert {k: round(summary[k], 1) for k in printed} == pytest.approx(printed, abs=0.11)


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
    assert {"setup_distributed", "build_corpus", "parse_args", "start_wandb", "save_atomic"} <= set(after)
    first_constant = min(n.lineno for n in tree.body if isinstance(n, ast.Assign))
    assert first_constant < lines["Tokenizer"]


def test_train_shows_the_seeds_steps_in_the_seeds_order():
    """A reader of train() alone sees the seed's script: text, tokenizer, split, model, AdamW,
    the loop with get_batch, estimate_loss, the log line and wandb, then generate and save."""
    src = inspect.getsource(babygpt.train)
    steps = ["load_corpus(", "Tokenizer(text)", "train_data_ratio", "BabyGPT(", "torch.optim.AdamW(",
             "for it in ", "estimate_loss(", 'say(f"step {it}: train loss', "wandb_log(run", "get_batch(",
             "train_step(", "generate_texts(", "save_atomic(seed_state_dict(", "模型已保存到"]
    at = [src.find(step) for step in steps]
    assert -1 not in at, [s for s, i in zip(steps, at) if i < 0]
    loop = src.index("for it in ")
    assert at == sorted(at[:7]) + at[7:] and all(i > loop for i in at[6:11])
    for block in ("# ---- evaluate and log", "# ---- checkpoint", "# ---- stop?", "# ---- one training step",
                  "# ---- generate"):
        assert block in src, block
    assert len(src.splitlines()) <= 140
