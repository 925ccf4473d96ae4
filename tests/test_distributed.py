"""Several processes under torchrun (DDP with gloo on the CPU): one model trained together, clean stops on faults."""

import contextlib
import os
import signal
import subprocess
import time

import pytest
import torch
import torch.multiprocessing as mp

import babygpt
from conftest import (WRAPPED, ROOT, LONG, Running, all_finite, assert_close_weights, batch, cli_env, load_ckpt,
                      losses, max_change, run_main, same_files, same_weights, snapshot, step_weights, succeeded,
                      temp_files, tiny, tiny_model, torchrun_cmd)


# -----------------------------------------------------------------------------
# One model, trained on different batches

def _ddp_worker(rank, world, init_file, start_path, out_path):
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        averages = {}  # accum: the gradient averages (all-reduces) one step made
        for accum in (1, 2):  # with 2 micro-batches the first one's backward must not average
            model = tiny_model()
            model.load_state_dict(babygpt.fused_layout(torch.load(start_path, weights_only=True)))
            ddp = DistributedDataParallel(model)
            calls = []
            ddp.register_comm_hook(None, lambda _, bucket: calls.append(1) or default_hooks.allreduce_hook(None, bucket))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
            x, y = batch(8)
            per = 8 // world
            xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
            m = per // accum
            micro = [(xs[i * m:(i + 1) * m], ys[i * m:(i + 1) * m]) for i in range(accum)]
            babygpt.train_step(ddp, optimizer, micro)
            torch.save(model.state_dict(), f"{out_path}.{accum}.{rank}")
            averages[accum] = len(calls)
        torch.save(averages, f"{out_path}.averages.{rank}")
        dist.barrier()  # both are done before either tears down (gloo could abort otherwise)
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip Python's teardown, as babygpt's __main__ does: DDP still holds gloo, whose threads can abort there


def test_ddp_gradient_equivalence(tmp_path):
    """Two processes with half the batch each (in 1 or 2 micro-batches) take the step one process takes with the
    whole batch, not the step of its own half; with 2 micro-batches the gradients are averaged once, not twice."""
    model = tiny_model()
    start = tmp_path / "start.pt"
    torch.save(model.state_dict(), start)
    x, y = batch(8)
    expected = step_weights(model, [(x, y)], lr=0.5)
    assert max_change(expected, model.state_dict()) > 1e-4
    half_only = step_weights(model, [(x[:4], y[:4])], lr=0.5)
    assert max_change(expected, half_only) > 1e-4  # one process's half alone is not enough

    ctx = mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(start), str(tmp_path / "out")),
                             nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 90
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP workers hung")
    for accum in (1, 2):
        for rank in range(2):
            assert_close_weights(torch.load(tmp_path / f"out.{accum}.{rank}", weights_only=True), expected)
    for rank in range(2):
        averages = torch.load(tmp_path / f"out.averages.{rank}", weights_only=True)
        assert averages[2] == averages[1] > 0, averages


# each rank writes its first training batch, its own evaluations and its final weights next to the run
RECORD_RANKS = """
rank = os.environ["RANK"]
real_batch, real_finish, real_estimate, batches, estimates = babygpt.get_batch, babygpt.Run.finish, babygpt.estimate_loss, [], []
def get_batch(data, batch_size, block_size, generator=None):
    x, y = real_batch(data, batch_size, block_size, generator)
    if generator is None and not batches:
        batches.append(x.clone())
    return x, y
def estimate_loss(*args, **kwargs):
    estimates.append(real_estimate(*args, **kwargs))
    return estimates[-1]
def finish(self, *args):
    torch.save({"batch": batches[0], "model": self.model.state_dict(), "losses": estimates}, f"rank{rank}.pt")
    return real_finish(self, *args)
babygpt.get_batch, babygpt.Run.finish, babygpt.estimate_loss = get_batch, finish, estimate_loss
"""


def test_two_processes_train_one_model_on_different_batches(corpus):
    """Under torchrun each process draws batches of its own, all end with the same weights, one model.pth is
    saved, and the logged losses are the processes' mean."""
    folder = corpus.parent
    args = [*tiny("--max_iters=6", "--eval_interval=3", "--learning_rate=3e-3", data=corpus.name), "--device=cpu"]
    script = folder / "wrapped.py"
    script.write_text(WRAPPED.format(root=ROOT, patch=RECORD_RANKS), encoding="utf-8")
    proc = subprocess.run(torchrun_cmd(*args)[:-len(args) - 1] + [str(script), *args], cwd=folder,
                          capture_output=True, text=True, timeout=120, env=cli_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(ranks[0]["batch"], ranks[1]["batch"]), "both processes drew the same batches"
    assert same_weights(ranks[0]["model"], ranks[1]["model"]), "the processes trained apart"
    sd = load_ckpt(folder / "model.pth")
    assert not any(k.startswith("module.") for k in sd) and proc.stdout.count("模型已保存到") == 1
    assert same_weights(babygpt.fused_layout(sd), ranks[0]["model"])
    together = losses(proc.stdout)
    assert sorted(together) == [0, 3, 6]
    own = [r["losses"][0] for r in ranks]  # each process evaluates batches of its own at step 0
    assert own[0] != own[1]
    assert together[0] == pytest.approx(tuple((own[0][k] + own[1][k]) / 2 for k in ("train", "val")), abs=6e-5)


# -----------------------------------------------------------------------------
# Faults: every process exits, none hangs, nothing is lost

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


@pytest.mark.parametrize("arg,message", [
    ("--n_head=3", "n_embed must be divisible by n_head=3 (got 32)"),
    ("--batch_size=9", "batch_size (9) must be divisible by the number of processes (2)"),
], ids=["bad-constant", "batch-not-divisible"])
def test_torchrun_bad_setting(corpus, arg, message):
    """A bad setting under torchrun is one error line (not one per process), and every process exits, none left
    hanging."""
    folder = corpus.parent
    run = Running(_torchrun(tiny(arg, data=str(corpus))), folder)
    rc = run.wait(timeout=60)
    assert rc != 0, run.output
    _no_babygpt_traceback(run.output)
    errors = [ln for ln in run.output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], run.output
    _assert_no_orphans(folder)
    assert not list(folder.glob("*.pt*"))


def test_torchrun_nan(work):
    """A loss that becomes NaN under torchrun stops every process, keeps model.pth and a finite ckpt.pt."""
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


# the first process is asked to stop during step 9, the step before the evaluation of step 10
STOP_BEFORE_EVALUATION = """
real_step, steps = babygpt.train_step, []
def train_step(*args, **kwargs):
    steps.append(1)
    if len(steps) == 10 and os.environ["RANK"] == "0":
        babygpt.STOP.on_signal(signal.SIGINT, None)
    return real_step(*args, **kwargs)
babygpt.train_step = train_step
"""


def test_torchrun_stop_before_an_evaluation_skips_it(corpus):
    """Under torchrun a Ctrl-C in the step before an evaluation stops every process at that evaluation's step
    without running it; the checkpoint says so, so a resumed run evaluates it once."""
    folder = corpus.parent
    args = [*tiny("--max_iters=20", "--eval_interval=10", data=corpus.name), "--device=cpu"]
    script = folder / "wrapped.py"
    script.write_text(WRAPPED.format(root=ROOT, patch=STOP_BEFORE_EVALUATION), encoding="utf-8")
    proc = subprocess.run(torchrun_cmd(*args)[:-len(args) - 1] + [str(script), *args], cwd=folder,
                          capture_output=True, text=True, timeout=120, env=cli_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(losses(proc.stdout)) == [0], proc.stdout
    assert "interrupted at step 10; checkpoint saved to ckpt.pt" in proc.stdout, proc.stdout
    ckpt = load_ckpt(folder / "ckpt.pt")
    assert ckpt["iter_num"] == 10 and ckpt["evaluated"] is False


def test_torchrun_sigterm(corpus):
    """SIGTERM to torchrun stops every process within seconds, with a checkpoint that torchrun resumes to the end."""
    folder = corpus.parent
    run = Running(_torchrun(tiny(*LONG, data=str(corpus))), folder)
    run.wait_for(r"^step 0: ", timeout=90)
    time.sleep(1.0)
    t0 = time.time()
    run.signal(signal.SIGTERM)
    run.wait(timeout=120)
    assert time.time() - t0 < 60, "torchrun took more than 60 s to stop (the run itself never ends)"
    _no_babygpt_traceback(run.output)
    _assert_no_orphans(folder)
    assert not temp_files(folder)
    done = load_ckpt(folder / "ckpt.pt")["iter_num"]
    assert 0 < done < 1000000, run.output
    res = subprocess.run(_torchrun(tiny("--eval_interval=100000", f"--max_iters={done + 3}", "--resume=true",
                                        data=str(corpus))), cwd=folder, capture_output=True, text=True, timeout=90,
                         env=cli_env())
    succeeded(res)
    assert f"resuming from ckpt.pt at step {done}" in res.stdout and f"step {done + 3}:" in res.stdout, res.stdout


def test_an_error_of_one_process_names_its_rank_and_a_shared_one_is_printed_once(monkeypatch, capsys):
    """Under torchrun an error every process meets (a bad setting) is printed by the first process only, and one
    that only this process met (its GPU is missing, its memory ran out) by this process, with its rank: else
    the user sees four copies of one line, or nothing from the process that failed."""
    waits = []  # a process that leaves a shared error to the first waits, so that torchrun cannot stop that one first
    monkeypatch.setattr(babygpt.time, "sleep", lambda s: waits.append(s))
    monkeypatch.setenv("RANK", "3")
    babygpt.report_error(babygpt.UserError("n_embed must be divisible by n_head=5 (got 32)"))
    assert waits and waits[-1] >= 10
    babygpt.report_error(babygpt.ProcessError("cuda:3 is wanted but this machine has 2 GPU(s)"))
    assert capsys.readouterr().err == "error: rank 3: cuda:3 is wanted but this machine has 2 GPU(s)\n"
    monkeypatch.setenv("RANK", "0")
    babygpt.report_error(babygpt.UserError("n_embed must be divisible by n_head=5 (got 32)"))
    assert capsys.readouterr().err == "error: n_embed must be divisible by n_head=5 (got 32)\n"
    assert sum(waits[1:]) == 0, "the first process, which prints the error, must not wait"


def test_under_torchrun_a_ctrl_c_in_an_evaluation_lets_every_process_finish_it():
    """Under torchrun every process must finish an evaluation (its losses are averaged across them): one that
    abandoned it would leave the others waiting forever. On one process the same press abandons it at once."""
    finished = []
    for world in (2, 1):
        stop = babygpt.StopRequests()
        with contextlib.suppress(KeyboardInterrupt), stop.while_training(world):
            with stop.at_once():
                stop.on_signal(signal.SIGINT, None)
                finished.append(world)
        assert stop.signum == signal.SIGINT
    assert finished == [2]


def test_under_torchrun_a_ctrl_c_after_training_is_noted_and_every_process_reaches_the_end():
    """After the loop every process of a torchrun job must reach run.finish's barrier: a Ctrl-C there is only noted
    (one that quit would leave the others blocked there), except in the first one's generation and save, which it
    cuts short. On one process the same press raises KeyboardInterrupt, which train() catches."""
    for world in (2, 1):
        stop = babygpt.StopRequests()
        with stop.while_training(world):
            pass
        with pytest.raises(KeyboardInterrupt), stop.at_once():  # the first process's generation and save, abandoned
            stop.on_signal(signal.SIGINT, None)
        stop = babygpt.StopRequests()
        with stop.while_training(world):
            pass
        if world == 1:
            with pytest.raises(KeyboardInterrupt):
                stop.on_signal(signal.SIGINT, None)
        else:
            try:
                stop.on_signal(signal.SIGINT, None)  # noted: this process goes on to the barrier
            except KeyboardInterrupt:
                pytest.fail("a Ctrl-C after training ended a torchrun process before run.finish's barrier")
            assert stop.signum == signal.SIGINT


def test_under_torchrun_a_ctrl_c_before_training_is_reported_once(capsys, monkeypatch):
    """torchrun passes a Ctrl-C on to every process: before training each quits with 130, and only the first says so,
    not one line per process."""
    monkeypatch.setattr(babygpt, "parse_args", lambda argv: babygpt.STOP.on_signal(signal.SIGINT, None))
    for rank, printed in (("1", ""), ("0", "interrupted; files on disk are intact")):
        monkeypatch.setenv("RANK", rank)
        res = run_main(capsys, [])
        assert res.returncode == 130 and res.stderr.strip() == printed, (rank, res)


def test_under_torchrun_a_ctrl_c_in_training_says_the_stop_comes_within_10_steps(capsys, monkeypatch):
    """Under torchrun the processes agree on a stop every 10 steps, so the message must not promise the next step."""
    monkeypatch.setenv("RANK", "0")
    for world, message in ((2, "stopping within 10 steps"), (1, "stopping after this step")):
        stop = babygpt.StopRequests()
        with stop.while_training(world):
            stop.on_signal(signal.SIGINT, None)
        assert message in capsys.readouterr().err, world
