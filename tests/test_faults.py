"""Faults in a run: prompts outside the vocabulary, unwritable outputs, full disk, out of memory, Ctrl-C, SIGTERM."""

import errno
import io
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import babygpt
from conftest import (BABYGPT, LONG, STEP_RE, TINY, Running, all_finite, load_ckpt, make_corpus, one_line_error, run_main,
                      same_files, show, snapshot, succeeded, temp_files, tiny)

ALIEN = "火星"  # characters that are not in make_corpus()
# A stop must come in seconds; each slow alternative takes 60 s or more (a run that never ends, an evaluation
# of 2 x 10^6 batches, a save that hangs 60 s), and a loaded 2-core machine needed up to a few seconds.
STOP_BOUND = 30


# -----------------------------------------------------------------------------
# Input that does not fit the vocabulary: refused before any training

@pytest.mark.parametrize("command", ["train", "sample-ckpt", "sample-model.pth"])
def test_prompt_not_in_vocabulary(work, capsys, command):
    """A prompt with characters the corpus never had is refused in one line naming them, before training, not
    with a traceback after it."""
    args = ["--prompts=春江," + ALIEN + "江"]
    if command == "train":
        args = tiny(*args)
    else:
        args = ["sample", *TINY, "--data_path=poems.txt", *args]
        if command == "sample-model.pth":
            (work / "ckpt.pt").unlink()
    before = snapshot(work)
    res = run_main(capsys, args)
    one_line_error(res, ALIEN, "vocabulary", "--prompts")
    assert not STEP_RE.search(res.stdout), "the prompt must be checked before any training"
    same_files(before, snapshot(work))


def test_top_k_larger_than_the_vocabulary_is_refused_before_training(corpus, monkeypatch, capsys):
    """--top_k larger than the vocabulary is refused in one line before training, not a crash that loses the model."""
    monkeypatch.chdir(corpus.parent)
    vocab_size = len(set(make_corpus()))
    before = snapshot(corpus.parent)
    res = run_main(capsys, tiny(f"--top_k={vocab_size + 50}", data=corpus.name))
    one_line_error(res, f"top_k ({vocab_size + 50})", f"({vocab_size})")
    assert not STEP_RE.search(res.stdout)
    same_files(before, snapshot(corpus.parent))


# -----------------------------------------------------------------------------
# Outputs that cannot be written, and a full disk

@pytest.mark.parametrize("arg,needles", [
    ("--save_path=nodir/model.pth", ["--save_path=nodir/model.pth", "does not exist"]),
    ("--ckpt_path=nodir/ckpt.pt", ["--ckpt_path=nodir/ckpt.pt", "does not exist"]),
    ("--save_path=adir", ["--save_path=adir", "directory"]),
    ("--ckpt_path=adir", ["--ckpt_path=adir", "directory"]),
], ids=["save_path-missing-folder", "ckpt_path-missing-folder", "save_path-is-dir", "ckpt_path-is-dir"])
def test_unwritable_output_path(work, capsys, arg, needles):
    """A typo in an output folder stops before training, in one line, not after hours of training."""
    (work / "adir").mkdir()
    (work / "adir" / "keep.txt").write_text("x")
    before = snapshot(work)
    res = run_main(capsys, tiny(arg))
    one_line_error(res, *needles)
    assert not STEP_RE.search(res.stdout), "must fail before training, not after it"
    same_files(before, snapshot(work))
    assert not (work / "nodir").exists()


def test_an_output_folder_that_is_not_writable_is_refused_before_training(work, capsys, monkeypatch):
    """An output folder the user cannot write to stops before training, in one line naming it."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: mode != os.W_OK and real_access(p, mode, *a, **k))
    before = snapshot(work)
    res = run_main(capsys, tiny())
    one_line_error(res, "--save_path=model.pth", f"the folder {work} is not writable")
    assert not STEP_RE.search(res.stdout)
    same_files(before, snapshot(work))


class _FullDisk(io.RawIOBase):
    """A file that takes `room` bytes and then fails like a full disk."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def writable(self):
        return True

    def write(self, b):
        if len(b) > self.room:
            self.f.write(bytes(b[:self.room]))
            self.f.flush()
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)


@pytest.mark.parametrize("error", ["OSError", "RuntimeError"])
@pytest.mark.parametrize("target", ["ckpt.pt", "model.pth"])
def test_disk_full(work, capsys, monkeypatch, error, target):
    """A disk that fills up while ckpt.pt or model.pth is written says so in one line and leaves the previous
    file whole, with no half-written temporary file."""
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        is_ckpt = isinstance(obj, dict) and "iter_num" in obj
        if is_ckpt == (target == "ckpt.pt"):
            if error == "OSError":  # what a plain write reports
                f.write(b"PK\x03\x04" + b"\0" * 1000)
                f.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_save(obj, _FullDisk(f, 1000), *args, **kwargs)  # torch's zip writer
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    before = snapshot(work)
    res = run_main(capsys, tiny("--max_iters=12"))
    line = one_line_error(res, target, "cannot write", "unchanged")
    if error == "OSError":
        assert "No space left on device" in line
    assert not temp_files(work), "a half-written temporary file was left behind"
    if target == "ckpt.pt":  # the first save of the run failed: stops, nothing changed
        same_files(before, snapshot(work))
        assert not STEP_RE.search(res.stdout.split("step 0:", 1)[-1])
    else:  # training finished, model.pth could not be written: the old one is intact
        same_files(before, snapshot(work), ["model.pth", "poems.txt"])
        assert load_ckpt(work / "ckpt.pt")["iter_num"] == 12  # the run itself is not lost
    assert isinstance(torch.load(work / "model.pth", weights_only=True), dict)


# -----------------------------------------------------------------------------
# Out of memory

@pytest.mark.parametrize("where", ["train_step", "estimate_loss", "generate_texts"])
def test_out_of_memory(work, capsys, monkeypatch, where):
    """GPU out of memory while training, evaluating or generating is one line naming the settings that lower
    memory, and the last checkpoint is kept."""
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
                                     "total capacity of 7.79 GiB of which 1.12 GiB is free.\n"
                                     "Of the allocated memory 5.1 GiB is allocated by PyTorch")
    monkeypatch.setattr(babygpt, where, oom)
    before = snapshot(work)
    res = run_main(capsys, tiny())
    one_line_error(res, "memory", "--batch_size", "--block_size", "--grad_accum_steps")
    same_files(before, snapshot(work), ["model.pth", "poems.txt"])
    if where == "estimate_loss":  # nothing was evaluated: nothing written
        same_files(before, snapshot(work))
    assert all_finite(load_ckpt(work / "ckpt.pt")["model"])
    assert not temp_files(work)


# -----------------------------------------------------------------------------
# Ctrl-C and SIGTERM during training, evaluation, the final save, and twice

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_training(work, capsys, sig):
    """Ctrl-C or SIGTERM during training stops within seconds with a checkpoint and the command that resumes it,
    which then continues from that step."""
    before = snapshot(work)
    run = Running.babygpt(tiny(*LONG), work)
    run.wait_for(r"^step 0: ")
    time.sleep(0.3)
    t0 = time.time()
    run.signal(sig)
    assert run.wait(timeout=60) == 128 + sig, run.output  # 130 or 143: the shell sees a stopped run
    assert time.time() - t0 < STOP_BOUND, "took more than a few seconds to stop"
    assert "Traceback" not in run.output, run.output
    assert "stopping after this step" in run.output and "--resume=true" in run.output, run.output
    assert not temp_files(work)
    same_files(before, snapshot(work), ["model.pth", "poems.txt"])  # no model.pth from a half run
    done = load_ckpt(work / "ckpt.pt")["iter_num"]
    assert 0 < done < 1000000
    res = run_main(capsys, tiny("--eval_interval=100000", f"--max_iters={done + 3}", "--resume=true"))
    succeeded(res)
    assert f"resuming from ckpt.pt at step {done}" in res.stdout
    assert f"step {done + 3}:" in res.stdout
    assert load_ckpt(work / "ckpt.pt")["iter_num"] == done + 3


# the second evaluation (step 5 with --eval_interval=5) says so, then takes a minute: time to stop in it
SLOW_SECOND_EVAL = """
real_eval, calls = babygpt.estimate_loss, []
def announced(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        print("EVALUATING", file=sys.stderr, flush=True)
        time.sleep(60)
    return real_eval(*args, **kwargs)
babygpt.estimate_loss = announced
"""

# torch.save writes a few bytes of one file, says so, then hangs: a slow save to stop in
SLOW_SAVE = """
real_save = torch.save
def slow(obj, f, *args, **kwargs):
    if {when}:
        f.write(b"PK partial")
        f.flush()
        print("SAVING {name}", file=sys.stderr, flush=True)
        time.sleep(60)
    return real_save(obj, f, *args, **kwargs)
torch.save = slow
"""
SLOW_FINAL_SAVE = SLOW_SAVE.format(when='not (isinstance(obj, dict) and "iter_num" in obj)', name="model.pth")
# the checkpoint that a stop writes hangs: time for a second Ctrl-C
SLOW_STOP_CHECKPOINT = SLOW_SAVE.format(when='isinstance(obj, dict) and obj.get("evaluated") is False', name="ckpt.pt")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_evaluation(corpus, capsys, monkeypatch, sig):
    """A stop during a long evaluation takes seconds, not the evaluation's minutes, and the resumed run redoes
    that evaluation."""
    folder = corpus.parent
    monkeypatch.chdir(folder)
    run = Running.wrapped(SLOW_SECOND_EVAL, tiny(*LONG[:1], "--eval_interval=5"), folder)
    run.wait_for(r"^EVALUATING")
    time.sleep(0.3)
    t0 = time.time()
    run.signal(sig)
    assert run.wait(timeout=60) == 128 + sig, run.output
    assert time.time() - t0 < STOP_BOUND, "took more than a few seconds to stop"
    assert "Traceback" not in run.output, run.output
    assert "stopping now" in run.output, "the message must say the evaluation is abandoned, not finished"
    assert [m[0] for m in STEP_RE.findall(run.output)] == ["0"], "the signal was meant to land in step 5's evaluation"
    assert "--resume=true" in run.output, run.output
    assert not temp_files(folder)
    ckpt = load_ckpt(folder / "ckpt.pt")
    assert ckpt["iter_num"] == 5 and ckpt["evaluated"] is False
    res = run_main(capsys, tiny("--max_iters=8", "--eval_interval=5", "--resume=true"))
    succeeded(res)
    assert [m[0] for m in STEP_RE.findall(res.stdout)] == ["5", "8"], res.stdout  # the cut evaluation is redone
    assert (folder / "model.pth").exists()


def test_a_stop_before_the_first_step_keeps_the_previous_ckpt_pt(work, capsys, monkeypatch):
    """A Ctrl-C in a new run's step-0 evaluation (a run started by mistake, without --resume=true) trained nothing:
    the earlier run's ckpt.pt must stay as it was, not become an untrained one that `sample` would then read."""
    before = snapshot(work)
    calls = []

    def estimate_loss(*args, **kwargs):
        calls.append(1)
        babygpt.STOP.on_signal(signal.SIGINT, None)  # raises KeyboardInterrupt: the evaluation is abandoned
    monkeypatch.setattr(babygpt, "estimate_loss", estimate_loss)
    res = run_main(capsys, tiny())
    assert calls and res.returncode == 130, show(res)
    assert "interrupted; files on disk are intact" in res.stderr and "--resume=true" not in res.stdout, show(res)
    same_files(before, snapshot(work), ["ckpt.pt", "model.pth", "poems.txt"])


def test_a_stop_in_the_step_before_an_evaluation_skips_that_evaluation(corpus, capsys, monkeypatch):
    """A Ctrl-C during the step before an evaluation stops after that step, without first running the
    evaluation (minutes at the seed's shape on a CPU); the resumed run evaluates that step."""
    monkeypatch.chdir(corpus.parent)
    real_step, steps = babygpt.train_step, []

    def train_step(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        steps.append(1)
        if len(steps) == 5:  # step 4: the evaluation of step 5 comes next
            babygpt.STOP.on_signal(signal.SIGINT, None)
        return loss
    monkeypatch.setattr(babygpt, "train_step", train_step)
    res = run_main(capsys, tiny(data=corpus.name))
    assert [m[0] for m in STEP_RE.findall(res.stdout)] == ["0"], res.stdout
    assert "interrupted at step 5; checkpoint saved to ckpt.pt" in res.stdout, res.stdout
    ckpt = load_ckpt(corpus.parent / "ckpt.pt")
    assert ckpt["iter_num"] == 5 and ckpt["evaluated"] is False
    monkeypatch.setattr(babygpt, "train_step", real_step)
    res = run_main(capsys, tiny("--resume=true", data=corpus.name))
    succeeded(res)
    assert [m[0] for m in STEP_RE.findall(res.stdout)] == ["5", "10"], res.stdout


def test_a_stop_that_came_too_late_to_stop_training_is_not_reported_as_a_cut_save(corpus, capsys, monkeypatch):
    """A Ctrl-C that training did not act on (under torchrun: after the processes last compared notes) lets the
    run finish; it is not reported as an interruption before model.pth was written, since model.pth was."""
    monkeypatch.chdir(corpus.parent)
    monkeypatch.setattr(babygpt.StopRequests, "check", lambda self, it, dev: None)  # as between agreements
    real_step, steps = babygpt.train_step, []

    def train_step(*args, **kwargs):
        steps.append(1)
        if len(steps) == 10:  # the last step
            babygpt.STOP.on_signal(signal.SIGINT, None)
        return real_step(*args, **kwargs)
    monkeypatch.setattr(babygpt, "train_step", train_step)
    res = run_main(capsys, tiny(data=corpus.name))
    succeeded(res)
    assert "模型已保存到model.pth" in res.stdout and "interrupted" not in res.stdout, res.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_final_save(work, capsys, sig):
    """A stop while model.pth is written keeps the old model.pth, says how to finish (resuming only generates
    and saves) and exits 130 (143 for SIGTERM), so that a following `&& python babygpt.py sample` does not run."""
    before = snapshot(work)
    args = tiny("--max_iters=12")
    run = Running.wrapped(SLOW_FINAL_SAVE, args, work)
    run.wait_for(r"^SAVING model.pth")
    t0 = time.time()
    run.signal(sig)
    assert run.wait(timeout=60) == 128 + sig, run.output
    assert time.time() - t0 < STOP_BOUND, "took more than a few seconds to stop"
    assert "Traceback" not in run.output, run.output
    assert re.search(r"interrupted before model.pth was written; ckpt.pt holds all 12 steps. "
                     r"Resume with: python \S*babygpt.py .*--max_iters=12 --resume=true$", run.output, re.M), run.output
    same_files(before, snapshot(work), ["model.pth", "poems.txt"])  # the old model.pth is intact
    assert not temp_files(work), f"a half-written temporary file was left behind: {temp_files(work)}"
    ckpt = load_ckpt(work / "ckpt.pt")
    assert ckpt["iter_num"] == 12 and all_finite(ckpt["model"])
    res = run_main(capsys, args + ["--resume=true"])  # completes the run: writes model.pth
    succeeded(res)
    assert "模型已保存到model.pth" in res.stdout and not STEP_RE.search(res.stdout)
    assert snapshot(work)["model.pth"] != before["model.pth"]


def test_a_second_ctrl_c_quits_at_once_without_damage(corpus):
    """A second Ctrl-C while the stop's checkpoint is written quits at once (exit 130) and leaves the previous
    ckpt.pt whole."""
    folder = corpus.parent
    run = Running.wrapped(SLOW_STOP_CHECKPOINT, tiny(*LONG, data=corpus.name), folder)
    run.wait_for(r"^step 0: ")
    deadline = time.time() + 20
    while not (folder / "ckpt.pt").exists() and time.time() < deadline:  # step 0's checkpoint
        time.sleep(0.05)
    good = snapshot(folder)["ckpt.pt"]
    run.signal(signal.SIGINT)
    run.wait_for(r"^SAVING ckpt.pt")
    t0 = time.time()
    run.signal(signal.SIGINT)
    assert run.wait(timeout=60) == 130, run.output
    assert time.time() - t0 < STOP_BOUND and "Traceback" not in run.output, run.output
    assert "interrupted; files on disk are intact" in run.output
    assert not temp_files(folder) and snapshot(folder)["ckpt.pt"] == good


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_ctrl_c_during_a_training_step_quits_without_finishing_the_step(corpus, capsys, monkeypatch, first):
    """The second Ctrl-C is the user's way out of a slow step: it must quit at once with the first signal's code
    (130, or 143 after a SIGTERM), not be taken as another first request that lets the step run on."""
    monkeypatch.chdir(corpus.parent)
    real_step, after_second = babygpt.train_step, []

    def train_step(*args, **kwargs):
        if babygpt.STOP.signum is None:  # the first training step: two signals while it runs
            babygpt.STOP.on_signal(first, None)
            babygpt.STOP.on_signal(signal.SIGINT, None)
            after_second.append(1)
        return real_step(*args, **kwargs)
    monkeypatch.setattr(babygpt, "train_step", train_step)
    res = run_main(capsys, tiny(*LONG, data=corpus.name))
    assert res.returncode == 128 + first and not after_second, show(res)
    assert res.stderr.count("stopping after this step") == 1, show(res)
    assert "interrupted; files on disk are intact" in res.stderr and "Traceback" not in res.stderr, show(res)
    assert load_ckpt(corpus.parent / "ckpt.pt")["iter_num"] == 0  # step 0's checkpoint, whole


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_before_training_quits_at_once_with_the_signals_exit_code(corpus, capsys, monkeypatch, sig):
    """A Ctrl-C (or SIGTERM) during start-up quits at once with 130 (143), so a following command does not run,
    and writes nothing."""
    monkeypatch.chdir(corpus.parent)
    real_load = babygpt.load_corpus

    def load_corpus(*args, **kwargs):
        babygpt.STOP.on_signal(sig, None)
        return real_load(*args, **kwargs)
    monkeypatch.setattr(babygpt, "load_corpus", load_corpus)
    before = snapshot(corpus.parent)
    res = run_main(capsys, tiny(data=corpus.name))
    assert res.returncode == 128 + sig, show(res)
    assert res.stderr.strip() == "interrupted; files on disk are intact", show(res)
    same_files(before, snapshot(corpus.parent))


def test_ctrl_c_while_torch_is_still_loading_quits_with_130_and_no_traceback(tmp_path):
    """A Ctrl-C in the first seconds, while `import torch` runs, quits as one before training does."""
    fake = tmp_path / "torch"  # a torch whose import is interrupted, as a Ctrl-C would interrupt the real one
    fake.mkdir()
    (fake / "__init__.py").write_text("import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(30)\n")
    res = subprocess.run([sys.executable, BABYGPT, "--help"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert res.returncode == 130, res
    assert res.stderr.strip() == "interrupted; files on disk are intact", res
    assert list(tmp_path.iterdir()) == [fake]


def test_ctrl_c_after_model_pth_is_written_exits_0(corpus, capsys, monkeypatch):
    """A Ctrl-C while wandb closes and the phase line is printed comes after model.pth is written: the run is
    finished, so the exit code says so (0) and `&& python babygpt.py sample` goes on."""
    monkeypatch.chdir(corpus.parent)
    real_figures, pressed = babygpt.PhaseClock.figures, []

    def figures(self):
        if not pressed:
            pressed.append(1)
            babygpt.STOP.on_signal(signal.SIGINT, None)
        return real_figures(self)
    monkeypatch.setattr(babygpt.PhaseClock, "figures", figures)
    res = run_main(capsys, tiny(data=corpus.name))
    assert pressed and res.returncode == 0, show(res)
    assert "模型已保存到model.pth" in res.stdout and (corpus.parent / "model.pth").exists()


def test_ctrl_c_as_the_saved_message_is_printed_exits_0_at_once(corpus, capsys, monkeypatch):
    """A Ctrl-C between writing model.pth and saying so quits at once with exit 0: the files are complete, so it
    is neither an abandoned save ("stopping now") nor a stop that the shell must hear about (130)."""
    monkeypatch.chdir(corpus.parent)
    real_say, pressed = babygpt.say, []

    def say(*args, **kwargs):
        if args and str(args[0]).startswith("模型已保存到") and not pressed:
            pressed.append(1)
            babygpt.STOP.on_signal(signal.SIGINT, None)
        real_say(*args, **kwargs)
    monkeypatch.setattr(babygpt, "say", say)
    res = run_main(capsys, tiny(data=corpus.name))
    assert pressed and res.returncode == 0, show(res)
    assert "stopping now" not in res.stderr and "interrupted; files on disk are intact" in res.stderr, show(res)
    assert (corpus.parent / "model.pth").exists()


def test_under_torchrun_a_ctrl_c_once_model_pth_is_written_is_only_noted(capsys):
    """Under torchrun the first process, still saying that model.pth is saved, neither abandons that nor announces
    a stop: the files are complete and every process must reach the end."""
    stop = babygpt.StopRequests()
    stop.world = 2
    with stop.at_once():  # the first process's generation and save
        stop.mark_finished()
        stop.on_signal(signal.SIGINT, None)  # must not raise: that would report a cut save, or end this process
    assert stop.signum == signal.SIGINT and "stopping" not in capsys.readouterr().err
