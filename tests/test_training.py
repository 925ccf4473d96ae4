"""The training loop, train(): a run end to end, its log, the pinned tiny run, the phase line, NaN, repeat command."""

import glob
import os
import random
import re
import shlex
import signal
import time

import pytest
import torch

import babygpt
from conftest import (AUTO_ARGS, DASHES, ROOT, TINY, all_finite, load_ckpt, losses, make_corpus, one_line_error,
                      run_cli, run_main, run_wrapped, same_files, same_weights, show, snapshot, step_lines,
                      succeeded, temp_files, tiny, winners)

LOG_LINE = re.compile(r"step (\d+): train loss (\d+\.\d{4}), val loss (\d+\.\d{4}), "
                      r"speed: (\d+\.\d{2}) tokens/sec, time: (\d+)m (\d+\.\d)s")
GOLDEN = os.path.join(ROOT, "tests", "golden", "tiny_run.txt")
# The run whose log lines tests/golden/tiny_run.txt pins: float32 on one CPU thread, with dropout,
# a learning rate that moves the losses, and the seed's prompts.
PINNED_ARGS = [a for a in TINY if not a.startswith(("--max_iters", "--dropout"))] + [
    "--max_iters=20", "--dropout=0.1", "--learning_rate=1e-2", "--prompts=春江,往事"]
PHASE_LINE = re.compile(r"^total (\d+\.\d)s: start-up (\d+\.\d)s, compile (\d+\.\d)s, training (\d+\.\d)s, "
                        r"evaluation (\d+\.\d)s, checkpoints (\d+\.\d)s, generation and saving (\d+\.\d)s$")


# -----------------------------------------------------------------------------
# A run end to end

def test_tiny_float32_run_prints_the_pinned_losses_and_samples(corpus):
    """The same tiny float32 run prints the same losses and the same generated ci as ever, digit for digit."""
    res = run_cli(PINNED_ARGS + [f"--data_path={corpus.name}"], cwd=corpus.parent)
    assert res.returncode == 0, res.stderr
    lines = [re.sub(r", speed: .*", "", line) for line in res.stdout.split("\n")
             if not line.startswith(("override:", "total "))]
    with open(GOLDEN, encoding="utf-8") as f:
        assert lines == f.read().split("\n")


def test_tiny_cli_run_end_to_end(corpus, tmp_path, monkeypatch):
    """`python babygpt.py` logs the seed's lines at step 0, every eval_interval and the last step, learns,
    prints one text per prompt, saves a loadable model.pth and an offline wandb run."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_BASE_URL", "WANDB_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    max_iters, interval, new = 47, 15, 12
    args = TINY + [f"--max_iters={max_iters}", f"--eval_interval={interval}", "--learning_rate=3e-3",
                   f"--max_new_token={new}", f"--data_path={corpus.name}", "--wandb_mode=offline",
                   "--device=cpu"]
    proc = run_cli(args, cwd=tmp_path, timeout=300, env={"HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout

    # log lines: exactly the seed's format, at step 0, every eval_interval and the last step
    steps = step_lines(out)
    matches = [LOG_LINE.fullmatch(line) for line in steps]
    assert steps and all(matches), steps
    assert all(float(m[6]) < 60 for m in matches)
    assert [int(m[1]) for m in matches] == sorted(set(range(0, max_iters + 1, interval)) | {max_iters})
    first_train, first_val = float(matches[0][2]), float(matches[0][3])
    last_train, last_val = float(matches[-1][2]), float(matches[-1][3])
    assert last_train < first_train - 1.0 and last_val < first_val - 1.0, steps  # it learns
    assert float(matches[0][4]) >= 0 and all(float(m[4]) > 0 for m in matches[1:])

    # then one generation per prompt, each followed by ten dashes, then the save message
    vocab = set(corpus.read_text(encoding="utf-8"))
    rest = out[out.index(steps[-1]) + len(steps[-1]) + 1:]
    for prompt in babygpt.prompts:
        assert rest.startswith(prompt), rest
        text = rest[:len(prompt) + new]
        assert set(text) <= vocab
        rest = rest[len(text):]
        assert rest.startswith("\n" + DASHES + "\n"), rest
        rest = rest[len(DASHES) + 2:]
    saved, summary = rest.split("\n", 1)
    assert saved == "模型已保存到model.pth"
    assert re.fullmatch(r"total [\d.]+s: start-up [\d.]+s, .*, generation and saving [\d.]+s\n", summary), summary

    sd = torch.load(tmp_path / "model.pth", weights_only=True)  # a plain state_dict that loads safely
    babygpt.BabyGPT(len(vocab), block_size=16, n_embed=32, n_head=2, n_layer=2).load_state_dict(babygpt.fused_layout(sd))

    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))  # wandb: the metrics the seed logged
    assert len(runs) == 1, os.listdir(tmp_path)
    records = glob.glob(os.path.join(runs[0], "*.wandb"))
    assert records
    blob = open(records[0], "rb").read()
    for key in (b"train_loss", b"val_loss", b"tokens_per_sec", b"iteration"):
        assert key in blob, key
    assert "wandb sync" in out


def test_training_learns_from_the_train_split_and_is_judged_on_val(tmp_path, monkeypatch, capsys):
    """The val loss is measured on the last tenth of the text, which training never sees: here it stays
    far above the train loss."""
    text = make_corpus(100)
    n = int(0.9 * len(text))
    tail = list(text[n:])
    random.Random(0).shuffle(tail)  # val: shuffled characters the first part never shows in that order
    (tmp_path / "split.txt").write_text(text[:n] + "".join(tail), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    res = run_main(capsys, tiny("--learning_rate=1e-2", "--max_iters=30", "--eval_interval=30", data="split.txt"))
    assert res.returncode == 0, show(res)
    train_loss, val_loss = losses(res.stdout)[30]
    assert train_loss < val_loss - 0.5, res.stdout


def test_format_time_never_shows_sixty_seconds():
    """The log's time reads 1m 0.0s at 59.96 s, never 0m 60.0s."""
    assert babygpt.format_time(0) == "0m 0.0s"
    assert babygpt.format_time(61.26) == "1m 1.3s"
    for seconds in (59.96, 59.99, 119.97):
        m, s = re.fullmatch(r"(\d+)m (\d+\.\d)s", babygpt.format_time(seconds)).groups()
        assert float(s) < 60, babygpt.format_time(seconds)
        assert abs(int(m) * 60 + float(s) - seconds) <= 0.05


# -----------------------------------------------------------------------------
# The phase line: where the time went

# every evaluation 1.0 s, every step 0.06 s, every checkpoint 0.8 s and the generation 0.5 s longer: a phase
# that took another's time is off by a whole sleep, far more than a loaded machine's own compute adds
SLOW_PHASES = """
def slowed(fn, seconds):
    def wrapper(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)
    return wrapper
babygpt.estimate_loss = slowed(babygpt.estimate_loss, 1.0)
babygpt.train_step = slowed(babygpt.train_step, 0.06)
babygpt.generate_texts = slowed(babygpt.generate_texts, 0.5)
real_save = torch.save
def save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and "iter_num" in obj:
        time.sleep(0.8)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
real_main = babygpt.main
def timed_main(*args):
    code = real_main(*args)
    print(f"SPAN {babygpt.STARTED:.3f} {time.time():.3f}", file=sys.stderr)
    return code
babygpt.main = timed_main
"""


def test_every_run_ends_with_its_time_split_into_phases(corpus):
    """The closing line splits the process's whole wall time (importing torch included) into phases, each
    second in the phase it was spent in."""
    t0 = time.time()
    res = run_wrapped(SLOW_PHASES, tiny("--checkpoint_interval=0", "--prompts=春江", data=corpus.name), corpus.parent)
    wall = time.time() - t0
    assert res.returncode == 0, res.stderr
    m = PHASE_LINE.match(res.stdout.rstrip("\n").split("\n")[-1])
    assert m, res.stdout[-300:]
    total, *phases = (float(x) for x in m.groups())
    got = dict(zip(babygpt.PhaseClock.PHASES, phases))
    assert sum(phases) == pytest.approx(total, abs=0.35)  # each is rounded to 0.1 s
    started, ended = (float(x) for x in re.search(r"^SPAN (\S+) (\S+)$", res.stderr, re.M).groups())
    # the whole run, from the top of babygpt.py (before torch is imported) to main's return
    assert ended - started - 0.5 < total <= min(wall, ended - started) + 0.1
    with open(babygpt.__file__, encoding="utf-8") as f:
        source = f.read()
    assert source.index("STARTED = time.time()") < source.index("\nimport torch")
    assert got["start-up"] > 0  # at least importing torch
    want = {"evaluation": 3 * 1.0, "training": 10 * 0.06, "checkpoints": 3 * 0.8, "generation and saving": 0.5}
    for phase, seconds in want.items():
        assert got[phase] >= seconds - 0.1, (phase, m[0])
    assert got["training"] < want["training"] + 0.9 * 1.0, m[0]  # evaluation is not training
    assert got["evaluation"] < want["evaluation"] + 0.9 * 0.8, m[0]  # nor are checkpoints evaluation


# -----------------------------------------------------------------------------
# A loss that becomes NaN

def test_a_nan_loss_stops_training_at_its_step(corpus, monkeypatch, capsys):
    """A loss that turns NaN at step 3 stops the run at step 3, not at the next evaluation, keeping the
    last good checkpoint."""
    monkeypatch.chdir(corpus.parent)
    real_step, calls = babygpt.train_step, []

    def train_step(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # step 3: the model's output is poisoned from then on
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return real_step(model, *args, **kwargs)

    monkeypatch.setattr(babygpt, "train_step", train_step)
    res = run_main(capsys, tiny("--eval_interval=10", data=corpus.name))
    one_line_error(res, "the loss became NaN or infinite at step 3")
    assert "step 10:" not in res.stdout
    assert not (corpus.parent / "model.pth").exists()
    ckpt = load_ckpt(corpus.parent / "ckpt.pt")
    assert ckpt["iter_num"] == 0 and all_finite(ckpt["model"])


def test_nan_stops_a_fresh_run_and_keeps_model_pth(work, capsys):
    """A learning rate that blows up says so with the rate to lower, keeps the old model.pth and a finite
    ckpt.pt that resumes with a sane rate."""
    before = snapshot(work)
    res = run_main(capsys, tiny("--learning_rate=1e6"))
    line = one_line_error(res, "NaN", "learning_rate", "1000000.0")
    assert "step 10:" not in res.stdout and "step 5:" not in res.stdout, "it did not stop at once"
    same_files(before, snapshot(work), ["model.pth", "poems.txt"])
    assert not temp_files(work)
    ckpt = load_ckpt(work / "ckpt.pt")  # this run's step 0, evaluated before the first diverging step
    assert all_finite(ckpt["model"]), f"{line}\nckpt.pt holds NaN/inf weights"
    assert ckpt["iter_num"] < 5
    res = run_main(capsys, tiny("--resume=true"))
    succeeded(res)
    assert "step 10:" in res.stdout


def test_nan_on_resume_leaves_every_file_untouched(work, capsys):
    """A resumed run that diverges at once leaves the ckpt.pt and model.pth it started from byte for byte."""
    before = snapshot(work)
    res = run_main(capsys, tiny("--resume=true", "--max_iters=20", "--learning_rate=1e6"))
    one_line_error(res, "NaN", "learning_rate")
    assert "step 15:" not in res.stdout and "step 20:" not in res.stdout, "it did not stop at once"
    same_files(before, snapshot(work))


# -----------------------------------------------------------------------------
# The repeat command

def test_the_repeat_command_trains_the_same_run_with_nothing_measured(corpus, monkeypatch, capsys):
    """A fitted run with re-fits (120 -> 140 -> 150 steps) prints a command that, typed twice with the real
    probe, prints the same losses and trains the same weights."""
    monkeypatch.chdir(corpus.parent)
    args = AUTO_ARGS + [f"--data_path={corpus.name}", "--max_minutes=1", "--eval_interval=20", "--lr_schedule=cosine",
                        "--warmup_iters=5", "--min_lr=1e-4", "--save_path=fitted.pth"]
    monkeypatch.setattr(babygpt, "probe_dtypes", winners(*[torch.bfloat16] * 10))
    counts = iter([120, 140, 150, 150, 150, 150, 150, 150])
    monkeypatch.setattr(babygpt, "fit_steps", lambda cfg, *rest: setattr(cfg, "max_iters", next(counts)))
    fitted = run_main(capsys, args)
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
        again = run_main(capsys, [a for a in command[2:] if not a.startswith("--save_path")]
                         + [f"--save_path=again{n}.pth"])
        assert again.returncode == 0, show(again)
        assert losses(again.stdout) == losses(fitted.stdout), show(again)
        assert "to repeat this run" not in again.stdout  # nothing was measured
        assert same_weights(load_ckpt(f"again{n}.pth"), load_ckpt("fitted.pth"))


def test_the_resume_command_is_what_the_user_would_type(tmp_path, monkeypatch):
    """The printed resume command is `python babygpt.py ...` in the project folder, the script's full path
    elsewhere, and the torchrun line under torchrun, always with --resume=true once."""
    _, cfg = babygpt.parse_args(["--max_iters=5", "--resume=false"])
    monkeypatch.chdir(ROOT)
    assert babygpt.resume_command(cfg, 1) == "python babygpt.py --max_iters=5 --resume=true"
    monkeypatch.chdir(tmp_path)
    script = os.path.join(ROOT, "babygpt.py")
    assert babygpt.resume_command(cfg, 1) == f"python {script} --max_iters=5 --resume=true"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on each of two machines
    assert babygpt.resume_command(cfg, 4) == \
        f"torchrun --standalone --nproc_per_node=2 {script} --max_iters=5 --resume=true"


def test_a_run_that_measured_nothing_prints_no_repeat_command(corpus, capsys, monkeypatch):
    """With --dtype and --max_iters given, the run already is its own repeat command: no extra line."""
    monkeypatch.chdir(corpus.parent)
    res = run_main(capsys, tiny(data=corpus.name))
    assert res.returncode == 0 and "to repeat this run" not in res.stdout, show(res)


def test_a_stop_during_the_last_evaluation_keeps_the_run_resumable(work, capsys, monkeypatch):
    """Ctrl-C lands in the evaluation of the last step: the run must not go on to write model.pth as if it
    had finished; it saves ckpt.pt unevaluated at that step and prints how to resume."""
    real, calls = babygpt.estimate_loss, []

    def estimate_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # steps 0, 5, then the last one, 10
            babygpt.STOP.on_signal(signal.SIGINT, None)  # in an evaluation: raises KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(babygpt, "estimate_loss", estimate_loss)
    (work / "model.pth").unlink()
    res = run_main(capsys, tiny())
    assert res.returncode == 130, show(res)
    assert not (work / "model.pth").exists() and "模型已保存" not in res.stdout, show(res)
    assert "interrupted at step 10" in res.stdout and "--resume=true" in res.stdout, show(res)
    state = load_ckpt(work / "ckpt.pt")
    assert state["iter_num"] == 10 and state["evaluated"] is False


def test_speed_counts_the_tokens_trained_since_the_previous_line(corpus, capsys, monkeypatch):
    """Every step takes the same time, so every line after step 0 must print about the same speed, not one
    that grows with the steps trained since the start."""
    monkeypatch.chdir(corpus.parent)
    real = babygpt.train_step

    def train_step(*args, **kwargs):
        time.sleep(0.02)
        return real(*args, **kwargs)
    monkeypatch.setattr(babygpt, "train_step", train_step)
    res = run_main(capsys, tiny(f"--data_path={corpus.name}", "--max_iters=15"))
    assert res.returncode == 0, show(res)
    speeds = [float(s) for s in re.findall(r"speed: ([0-9.]+) tokens/sec", res.stdout)]
    assert speeds[0] == 0 and len(speeds) == 4, res.stdout
    assert max(speeds[1:]) < 1.3 * min(speeds[1:]), speeds
    assert max(speeds[1:]) < 8 * 16 / 0.02, speeds  # never more tokens a second than a 0.02 s step allows
