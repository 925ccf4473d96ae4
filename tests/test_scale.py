"""Issue 5: gradient accumulation, clipping, the learning-rate schedule, and DDP under torchrun."""

import copy
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.multiprocessing as mp

import babygpt
from conftest import TINY, FakeWandb, cli_env, make_corpus, run_cli, torchrun_cmd



def run_torchrun(args, cwd, nproc=2, timeout=90):
    try:
        return subprocess.run(torchrun_cmd(*args, nproc=nproc), cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, env=cli_env())
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun hung for {timeout}s; output so far:\n{e.stdout}\n{e.stderr}")


def tiny_model(vocab=30, seed=0):
    torch.manual_seed(seed)
    return babygpt.BabyGPT(vocab, block_size=16, n_embed=32, n_head=2, n_layer=2, dropout=0.0)


def batch(n, vocab=30, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(vocab, (n, 16), generator=g)
    y = torch.randint(vocab, (n, 16), generator=g)
    return x, y


def step_weights(model, batches, lr=0.5, grad_clip=0.0, opt="sgd"):
    """Weights after one babygpt.train_step on a copy of model."""
    m = copy.deepcopy(model)
    if opt == "sgd":
        optimizer = torch.optim.SGD(m.parameters(), lr=lr)
    else:
        optimizer = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01)
    babygpt.train_step(m, optimizer, batches, grad_clip=grad_clip)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def assert_same_weights(a, b, atol=1e-6, rtol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


def max_change(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


# -----------------------------------------------------------------------------
# accumulation and clipping

@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_accumulation_is_exact(opt):
    model = tiny_model()
    x, y = batch(8)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    lr = 0.5 if opt == "sgd" else 1e-3
    whole = step_weights(model, [(x, y)], lr=lr, opt=opt)
    micro = step_weights(model, [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)], lr=lr, opt=opt)
    assert max_change(whole, start) > 1e-4  # the step did something
    assert_same_weights(micro, whole)
    # and differently-split data really gives a different step (the comparison can fail)
    other = step_weights(model, [(x[:2], y[:2])], lr=lr, opt=opt)
    assert max_change(other, whole) > 1e-4


def test_grad_clip_clips_to_the_norm():
    model = tiny_model()
    x, y = batch(4)
    lr, clip = 1.0, 0.05
    # the expected update: the gradient of the mean loss, clipped with clip_grad_norm_
    ref = copy.deepcopy(model)
    _, loss = ref(x, y)
    loss.backward()
    params = list(ref.parameters())
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    assert norm > 10 * clip, "the gradient must be large enough for clipping to matter"
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
    expected = {k: v.detach() for k, v in ref.state_dict().items()}

    clipped = step_weights(model, [(x, y)], lr=lr, grad_clip=clip)
    unclipped = step_weights(model, [(x, y)], lr=lr, grad_clip=0.0)
    assert_same_weights(clipped, expected)
    params = dict(model.named_parameters())
    moved = torch.sqrt(sum(((clipped[k] - p.detach()) ** 2).sum() for k, p in params.items()))
    assert moved <= lr * clip * (1 + 1e-4)  # SGD moves by lr x the clipped norm at most
    assert max_change(unclipped, clipped) > 1e-3  # with grad_clip=0 nothing is clipped


def test_grad_clip_with_accumulation_clips_the_total():
    model = tiny_model()
    x, y = batch(8)
    whole = step_weights(model, [(x, y)], lr=1.0, grad_clip=0.05)
    micro = step_weights(model, [(x[:4], y[:4]), (x[4:], y[4:])], lr=1.0, grad_clip=0.05)
    assert_same_weights(micro, whole)


# -----------------------------------------------------------------------------
# learning-rate schedule

def lr_cfg(**kw):
    base = dict(lr_schedule="cosine", learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100, lr_decay_iters=0)
    return types.SimpleNamespace(**{**base, **kw})


def test_constant_schedule():
    cfg = lr_cfg(lr_schedule="constant")
    assert {babygpt.get_lr(it, cfg) for it in range(0, 101)} == {1e-3}


def test_cosine_schedule():
    cfg = lr_cfg()
    lrs = [babygpt.get_lr(it, cfg) for it in range(0, 101)]
    warm = lrs[:10]
    assert all(0 <= a < b for a, b in zip(warm, warm[1:])), "warmup must rise"
    steps = [b - a for a, b in zip(warm, warm[1:])]
    assert max(steps) - min(steps) < 1e-12, "warmup must be linear"
    assert warm[0] == pytest.approx(1e-3 / 10), "the first step already learns: no step at learning rate 0"
    assert warm[-1] == pytest.approx(1e-3), "warmup reaches learning_rate on its last step"
    assert lrs[10] == pytest.approx(1e-3), "peak learning_rate right after warmup"
    decay = lrs[10:]
    assert all(b <= a + 1e-15 for a, b in zip(decay, decay[1:])), "decay must be monotone"
    assert decay[0] > decay[len(decay) // 2] > decay[-1]
    assert lrs[100] == pytest.approx(1e-4), "min_lr at max_iters"
    assert min(lrs[10:]) >= 1e-4 - 1e-15
    # halfway through the decay the cosine is at its midpoint
    assert lrs[55] == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-6)
    # no warmup: full learning rate from the first step
    assert babygpt.get_lr(0, lr_cfg(warmup_iters=0)) == pytest.approx(1e-3)


def test_training_uses_the_schedule(corpus, monkeypatch):
    """The optimizer's lr follows get_lr, and the current lr is logged to wandb as 'lr'."""
    folder = corpus.parent
    fake = FakeWandb(str(folder))
    monkeypatch.setitem(sys.modules, "wandb", fake)  # offline: no network
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.chdir(folder)
    args = [a for a in TINY if not a.startswith("--wandb_mode")]
    args += [f"--data_path={corpus.name}", "--wandb_mode=offline", "--lr_schedule=cosine",
             "--warmup_iters=3", "--learning_rate=2e-3", "--min_lr=2e-4", "--max_iters=10",
             "--eval_interval=5"]
    assert babygpt.main(args) == 0
    cfg = types.SimpleNamespace(lr_schedule="cosine", learning_rate=2e-3, min_lr=2e-4,
                                warmup_iters=3, max_iters=10, lr_decay_iters=0)
    ckpt = torch.load(folder / "ckpt.pt", map_location="cpu", weights_only=True)
    group = ckpt["optimizer"]["param_groups"][0]
    assert group["lr"] == pytest.approx(babygpt.get_lr(9, cfg))  # the last step's lr
    assert group["weight_decay"] == pytest.approx(0.01)
    with_lr = [m for m in fake.logged if "lr" in m]
    assert len(with_lr) >= 3, f"'lr' is not logged to wandb: {fake.logged}"
    values = [m["lr"] for m in with_lr]
    assert all(min(2e-4, 2e-3) - 1e-12 <= v <= 2e-3 + 1e-12 for v in values)
    assert len(set(values)) > 1  # the schedule moves


# -----------------------------------------------------------------------------
# bad input

BAD_SETTINGS = {
    "accum0": (["--grad_accum_steps=0"], "grad_accum_steps"),
    "warmup_gt_max": (["--warmup_iters=20", "--max_iters=10", "--lr_schedule=cosine"], "warmup_iters"),
    "unknown_schedule": (["--lr_schedule=linear"], "lr_schedule"),
    "batch_not_divisible": (["--batch_size=8", "--grad_accum_steps=3"], "grad_accum_steps"),
}


@pytest.fixture(scope="module")
def bad_results(tmp_path_factory):
    """Each bad setting run in its own folder, two runs at a time (one per core)."""
    jobs = []
    for name, (args, _) in BAD_SETTINGS.items():
        folder = tmp_path_factory.mktemp(name)
        (folder / "poems.txt").write_text(make_corpus(), encoding="utf-8")
        jobs.append(([*TINY, "--data_path=poems.txt", *args], folder))
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(lambda job: run_cli(*job), jobs))
    return {name: (folder, proc) for name, (_, folder), proc in zip(BAD_SETTINGS, jobs, procs)}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_bad_scale_settings(bad_results, case):
    folder, proc = bad_results[case]
    expected = BAD_SETTINGS[case][1]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0]
    assert sorted(p.name for p in folder.iterdir()) == ["poems.txt"]  # nothing written


# -----------------------------------------------------------------------------
# distributed: torchrun with gloo on the CPU

def test_torchrun_batch_not_divisible(corpus):
    folder = corpus.parent
    proc = run_torchrun([*TINY, f"--data_path={corpus.name}", "--device=cpu", "--batch_size=9"],
                        cwd=folder, timeout=60)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 2, f"every rank must print one clear line:\n{proc.stderr}"
    assert all("batch_size" in l and "divisible" in l for l in errors)
    assert not list(folder.glob("*.pt*"))


# -----------------------------------------------------------------------------
# gradient equivalence: 2 processes x half batch == 1 process x full batch

def _ddp_worker(rank, world, init_file, start_path, out_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for accum in (1, 2):  # 2 micro-batches per process exercise DDP's no_sync path
            model = tiny_model()
            model.load_state_dict(torch.load(start_path, weights_only=True))
            ddp = DistributedDataParallel(model)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
            x, y = batch(8)
            per = 8 // world
            xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
            m = per // accum
            micro = [(xs[i * m:(i + 1) * m], ys[i * m:(i + 1) * m]) for i in range(accum)]
            babygpt.train_step(ddp, optimizer, micro)
            torch.save(model.state_dict(), f"{out_path}.{accum}.{rank}")
        dist.barrier()  # both are done before either tears down (gloo could abort otherwise)
    finally:
        dist.destroy_process_group()


def test_ddp_gradient_equivalence(tmp_path):
    """2 processes x half the batch (x 1 or 2 micro-batches) == 1 process x the whole batch."""
    model = tiny_model()
    start = tmp_path / "start.pt"
    torch.save(model.state_dict(), start)
    x, y = batch(8)
    expected = step_weights(model, [(x, y)], lr=0.5)
    assert max_change(expected, model.state_dict()) > 1e-4
    half_only = step_weights(model, [(x[:4], y[:4])], lr=0.5)
    assert max_change(expected, half_only) > 1e-4  # one process's half alone is not enough

    ctx = mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(start),
                                                str(tmp_path / "out")),
                             nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 90
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP workers hung")
    for accum in (1, 2):
        for rank in range(2):
            got = torch.load(tmp_path / f"out.{accum}.{rank}", weights_only=True)
            assert_same_weights(got, expected)
