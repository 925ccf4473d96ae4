"""Batches, evaluation and one training step: get_batch, estimate_loss, train_step (accumulation, clipping), get_lr."""

import copy
import types

import pytest
import torch
from torch.overrides import TorchFunctionMode

import babygpt
import reference
from conftest import (evaluate, assert_close_weights, batch, install_fake_wandb, load_ckpt, losses,
                      max_change, run_main, show, step_weights, tiny, tiny_model, tiny_wandb)


# -----------------------------------------------------------------------------
# get_batch

def test_get_batch_windows_are_consecutive_and_targets_shifted():
    """Each row is a real window of the text with its targets one character on, and every window, the
    last included, can be drawn."""
    n, block = 50, 7
    data = torch.arange(100, 100 + n)  # distinct values: a window's first value gives its offset
    seen = set()
    torch.manual_seed(0)
    for _ in range(40):
        x, y = babygpt.get_batch(data, 16, block)
        assert x.shape == y.shape == (16, block)
        assert x.dtype == y.dtype == torch.long
        for row_x, row_y in zip(x, y):
            offset = int(row_x[0]) - 100
            assert 0 <= offset <= n - block - 1
            assert torch.equal(row_x, data[offset:offset + block])
            assert torch.equal(row_y, data[offset + 1:offset + block + 1])
            seen.add(offset)
    assert seen == set(range(n - block))


def test_get_batch_draws_the_seeds_windows_from_the_same_seed():
    """With torch.manual_seed(42) the run trains on the very windows the seed's script drew."""
    data = torch.randint(0, 50, (1000,), generator=torch.Generator().manual_seed(0))
    for seed, B, T in [(0, 16, 32), (5, 3, 8), (9, 64, 1)]:
        torch.manual_seed(seed)
        x, y = babygpt.get_batch(data, B, T)
        torch.manual_seed(seed)
        xs, ys = reference.seed_get_batch(data, B, T, "cpu")
        assert torch.equal(x, xs) and torch.equal(y, ys), (seed, B, T)


class _CountTorchCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_get_batch_has_no_python_loop_over_the_batch():
    """A batch of 64 costs as many torch operations as a batch of 2 (the seed's loop costs 32 times more)."""
    data = torch.arange(2000)

    def count(fn, batch_size):
        with _CountTorchCalls() as mode:
            fn(batch_size)
        return mode.calls

    ours = [count(lambda b: babygpt.get_batch(data, b, 16), b) for b in (2, 64)]
    seeds = [count(lambda b: reference.seed_get_batch(data, b, 16, "cpu"), b) for b in (2, 64)]
    assert seeds[1] > seeds[0]  # the counter does see a per-row loop
    assert ours[0] == ours[1]


def test_get_batch_with_a_generator_repeats_and_stays_with_the_data():
    """Evaluation's own generator draws the same windows again from the same seed (so a resume evaluates the
    same batches), other windows from another, and the batch lands where the data is."""
    data = torch.arange(500)
    a = babygpt.get_batch(data, 8, 10, torch.Generator(device="cpu").manual_seed(4))
    b = babygpt.get_batch(data, 8, 10, torch.Generator(device="cpu").manual_seed(4))
    c = babygpt.get_batch(data, 8, 10, torch.Generator(device="cpu").manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].device == data.device and torch.equal(a[1], a[0] + 1)


# -----------------------------------------------------------------------------
# estimate_loss

@pytest.mark.parametrize("start_training", [True, False])
def test_estimate_loss_measures_each_split_with_dropout_off(start_training):
    """The printed losses are the plain mean over eval_iters batches of each split, with dropout off, and
    the model goes back to the mode it was in."""
    torch.manual_seed(0)
    model = babygpt.BabyGPT(5, block_size=8, n_embed=16, n_head=2, n_layer=1, dropout=0.5).train(start_training)
    data = {"train": torch.zeros(200, dtype=torch.long), "val": torch.arange(200) % 5}
    out = evaluate(model, data, 4, 8, 3, torch.Generator().manual_seed(1))
    assert all(m.training is start_training for m in model.modules())
    assert set(out) == {"train", "val"} and all(type(v) is float for v in out.values())
    model.eval()
    gen = torch.Generator().manual_seed(1)  # the val batches follow the train batches in one stream
    with torch.no_grad():
        for split in ("train", "val"):
            want = sum(model(*babygpt.get_batch(data[split], 4, 8, gen))[1].item() for _ in range(3)) / 3
            assert out[split] == pytest.approx(want, abs=1e-5), split
    assert abs(out["train"] - out["val"]) > 0.01  # the splits really differ here


# -----------------------------------------------------------------------------
# train_step: gradient accumulation and clipping

@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_accumulation_is_exact(opt):
    """--grad_accum_steps=4 takes the same optimizer step as the whole batch at once, not one four times as large."""
    model = tiny_model()
    x, y = batch(8)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    lr = 0.5 if opt == "sgd" else 1e-3
    whole = step_weights(model, [(x, y)], lr=lr, opt=opt)
    micro = step_weights(model, [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)], lr=lr, opt=opt)
    assert max_change(whole, start) > 1e-4  # the step did something
    assert_close_weights(micro, whole)
    other = step_weights(model, [(x[:2], y[:2])], lr=lr, opt=opt)
    assert max_change(other, whole) > 1e-4  # differently-split data really gives another step


def test_accumulating_micro_batches_trains_the_same_model(corpus, monkeypatch, capsys):
    """A run with --grad_accum_steps=2 prints the losses of the run without it: each micro-batch holds
    half of batch_size, drawn from the same random stream."""
    monkeypatch.chdir(corpus.parent)
    runs = []
    for accum in (1, 2):
        res = run_main(capsys, tiny(f"--grad_accum_steps={accum}", "--learning_rate=3e-3",
                                    f"--save_path=m{accum}.pth", f"--ckpt_path=c{accum}.pt", data=corpus.name))
        assert res.returncode == 0, show(res)
        runs.append(losses(res.stdout))
    assert runs[0].keys() == runs[1].keys() == {0, 5, 10}
    for step in runs[0]:
        assert runs[0][step] == pytest.approx(runs[1][step], abs=3e-4), step
    assert runs[0][10][0] < runs[0][0][0] - 0.1  # it trained


def test_grad_clip_clips_the_total_gradient():
    """--grad_clip=0.05 moves the weights by the gradient clipped to norm 0.05 (the whole batch's, also when
    accumulated), and 0 leaves it unclipped."""
    model = tiny_model()
    x, y = batch(8)
    lr, clip = 1.0, 0.05
    ref = copy.deepcopy(model)  # the expected update: the mean loss's gradient through clip_grad_norm_
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
    accumulated = step_weights(model, [(x[:4], y[:4]), (x[4:], y[4:])], lr=lr, grad_clip=clip)
    unclipped = step_weights(model, [(x, y)], lr=lr, grad_clip=0.0)
    assert_close_weights(clipped, expected)
    assert_close_weights(accumulated, expected)
    params = dict(model.named_parameters())
    moved = torch.sqrt(sum(((clipped[k] - p.detach()) ** 2).sum() for k, p in params.items()))
    assert moved <= lr * clip * (1 + 1e-4)  # SGD moves by lr x the clipped norm at most
    plain = copy.deepcopy(model)  # 0: the mean loss's own gradient, not clipped
    plain(x, y)[1].backward()
    with torch.no_grad():
        for p in plain.parameters():
            p -= lr * p.grad
    assert_close_weights(unclipped, {k: v.detach() for k, v in plain.state_dict().items()})
    assert max_change(unclipped, clipped) > 1e-3


def test_grad_clip_clips_every_step_to_the_setting(corpus, monkeypatch, capsys):
    """A run with --grad_clip=0.05 clips every one of its steps, over all weights, to 0.05; with 0 none."""
    monkeypatch.chdir(corpus.parent)
    real_clip, calls = torch.nn.utils.clip_grad_norm_, []

    def clip(params, max_norm, *args, **kwargs):
        params = list(params)
        norm = real_clip(params, max_norm, *args, **kwargs)
        after = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        calls.append((max_norm, len(params), float(after)))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    res = run_main(capsys, tiny("--grad_clip=0.05", data=corpus.name))
    assert res.returncode == 0, show(res)
    n_params = len(list(babygpt.BabyGPT(10, 16, 32, 2, 2).parameters()))
    assert len(calls) == 10 and all(c[0] == 0.05 and c[1] == n_params for c in calls)
    assert all(c[2] <= 0.05 * 1.001 for c in calls)
    calls.clear()
    res = run_main(capsys, tiny("--grad_clip=0", data=corpus.name))
    assert res.returncode == 0 and not calls, show(res)


# -----------------------------------------------------------------------------
# get_lr: the learning-rate schedule

def lr_cfg(**kw):
    base = dict(lr_schedule="cosine", learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100, lr_decay_iters=0)
    return types.SimpleNamespace(**{**base, **kw})


def test_constant_schedule():
    """The seed's default schedule keeps learning_rate at every step."""
    cfg = lr_cfg(lr_schedule="constant")
    assert {babygpt.get_lr(it, cfg) for it in range(0, 101)} == {1e-3}


def test_cosine_schedule():
    """--lr_schedule=cosine rises linearly (never at 0) to learning_rate over warmup_iters, then falls along a
    cosine to min_lr at max_iters."""
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
    assert lrs[55] == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-6)  # halfway through the decay
    assert babygpt.get_lr(0, lr_cfg(warmup_iters=0)) == pytest.approx(1e-3)  # no warmup: full rate at once


def test_the_learning_rate_stays_at_min_lr_past_lr_decay_iters():
    """A run re-fitted to more steps than its schedule (lr_decay_iters=60 of 100) trains its last steps at
    min_lr, instead of climbing back up the cosine."""
    cfg = lr_cfg(lr_decay_iters=60)
    assert babygpt.get_lr(35, cfg) == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-6)  # the midpoint moved to 35
    for it in (60, 61, 80, 99, 150):
        assert babygpt.get_lr(it, cfg) == pytest.approx(1e-4, rel=1e-9), it


def test_training_uses_the_schedule(corpus, monkeypatch):
    """The optimizer trains at the schedule's rate at each step, and wandb's 'lr' chart shows it, flat at
    min_lr past lr_decay_iters."""
    folder = corpus.parent
    fake = install_fake_wandb(monkeypatch, folder)
    monkeypatch.chdir(folder)
    args = tiny_wandb("--lr_schedule=cosine", "--warmup_iters=3", "--learning_rate=2e-3", "--min_lr=2e-4",
                      "--lr_decay_iters=6", "--max_iters=10", "--eval_interval=5", data=corpus.name)
    real_step, trained_at = babygpt.train_step, []

    def train_step(model, optimizer, *rest, **kwargs):
        trained_at.append(optimizer.param_groups[0]["lr"])
        return real_step(model, optimizer, *rest, **kwargs)
    monkeypatch.setattr(babygpt, "train_step", train_step)
    assert babygpt.main(args) == 0
    cfg = types.SimpleNamespace(lr_schedule="cosine", learning_rate=2e-3, min_lr=2e-4, warmup_iters=3, lr_decay_iters=6,
                          max_iters=10)
    assert trained_at == pytest.approx([babygpt.get_lr(i, cfg) for i in range(10)], rel=1e-9)
    assert trained_at[0] < trained_at[2] > trained_at[5] > trained_at[9] == pytest.approx(2e-4)  # up, then down
    group = load_ckpt(folder / "ckpt.pt")["optimizer"]["param_groups"][0]
    assert group["lr"] == pytest.approx(2e-4)  # the last step, past lr_decay_iters
    assert group["weight_decay"] == pytest.approx(0.01)
    logged = [m["lr"] for m in fake.logged if "lr" in m]
    # step 0: the first warmup step; step 5: two thirds into the decay (cos(2pi/3) = -1/2); step 10: min_lr
    assert logged == pytest.approx([2e-3 / 3, 2e-4 + 0.25 * 1.8e-3, 2e-4], rel=1e-6)
