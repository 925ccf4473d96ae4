"""Behaviour a refactor could break with one wrong line: each test names what it guards, and
checks it through what a user sees (the log, model.pth, ckpt.pt, wandb's calls, the exit code)."""

import math
import os
import re
import signal
import sys
import time

import pytest
import torch

import babygpt
import reference
from conftest import ROOT, FakeWandb, cli_env, load_ckpt, losses, make_corpus, run_cli, run_main, tiny, torchrun_cmd


def main(args, capsys):
    """babygpt.main(args) in this process: (exit code, stdout, stderr)."""
    res = run_main(capsys, args)
    return res.returncode, res.stdout, res.stderr


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# A run of `python babygpt.py ARGS` after a patch (Python source) that hooks into babygpt.
WRAPPED = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
import torch, babygpt
{patch}
sys.exit(babygpt.main(sys.argv[1:]))
"""


def run_wrapped(patch, args, cwd, timeout=120, env=None):
    import subprocess
    return subprocess.run([sys.executable, "-c", WRAPPED.format(root=ROOT, patch=patch), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=cli_env(env))


# Ctrl-C arrives while step STOP_AT trains (get_lr is called once per step, with its number)
SIGINT_AT_STEP = """
real_lr = babygpt.get_lr
def get_lr(it, cfg):
    if it == {step}:
        os.kill(os.getpid(), signal.SIGINT)
    return real_lr(it, cfg)
babygpt.get_lr = get_lr
"""

# the process dies (as under kill -9) right after its N-th checkpoint reaches the disk
DIE_AFTER_CHECKPOINT = """
real_replace, written = os.replace, []
def replace(src, dst):
    real_replace(src, dst)
    if str(dst).endswith("ckpt.pt"):
        written.append(dst)
        if len(written) == {n}:
            os._exit(9)
os.replace = replace
"""


# -----------------------------------------------------------------------------
# resume: a checkpoint from an interrupt, or from the middle of a run, continues the same run

RESUME_ARGS = ["--dropout=0.1", "--learning_rate=3e-3", "--lr_schedule=cosine", "--warmup_iters=2",
               "--min_lr=1e-4", "--checkpoint_interval=0", "--max_iters=10", "--eval_interval=4"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(losses, model.pth) of the 10-step run that the pieces below must reproduce."""
    folder = tmp_path_factory.mktemp("whole")
    (folder / "poems.txt").write_text(make_corpus(), encoding="utf-8")
    res = run_cli(tiny(*RESUME_ARGS), cwd=folder)
    assert res.returncode == 0, res.stderr
    return losses(res.stdout), load_ckpt(folder / "model.pth")


@pytest.mark.parametrize("how", ["interrupt", "killed"])
def test_an_interrupted_or_killed_run_resumes_to_the_same_model(corpus, uninterrupted, how):
    """Guards: the step, the random state, the optimizer's moments and the schedule in ckpt.pt,
    for a checkpoint written by Ctrl-C mid-run and one written at an evaluation mid-run."""
    whole_losses, whole_model = uninterrupted
    folder = corpus.parent
    if how == "interrupt":  # Ctrl-C during step 6: the run stops after it, at step 7
        first = run_wrapped(SIGINT_AT_STEP.format(step=6), tiny(*RESUME_ARGS, "--resume=false"), folder)
        assert first.returncode == 0, first.stderr
        assert load_ckpt(folder / "ckpt.pt")["iter_num"] == 7
        hint = re.search(r"Resume with: (.*)$", first.stdout, re.M)  # the command to type, as --help writes it
        command = hint[1].split() if hint else []
        assert command[:1] == ["python"] and os.path.samefile(os.path.join(folder, command[1]), babygpt.__file__)
        assert command.count("--resume=true") == 1 and "--resume=false" not in command, first.stdout
        assert command[2:-1] == tiny(*RESUME_ARGS), command
    else:  # killed right after the checkpoint of step 4's evaluation (step 0's is the first)
        first = run_wrapped(DIE_AFTER_CHECKPOINT.format(n=2), tiny(*RESUME_ARGS), folder)
        assert first.returncode == 9, first.stderr
        assert load_ckpt(folder / "ckpt.pt")["iter_num"] == 4
    assert not (folder / "model.pth").exists()
    second = run_cli(tiny(*RESUME_ARGS, "--resume=true"), cwd=folder)
    assert second.returncode == 0, second.stderr
    pieces = {**losses(first.stdout), **losses(second.stdout)}
    assert pieces == whole_losses
    assert same_weights(load_ckpt(folder / "model.pth"), whole_model), "the resumed run trained another model"


# -----------------------------------------------------------------------------
# evaluation: dropout off, each split its own

def test_estimate_loss_measures_each_split_with_dropout_off():
    torch.manual_seed(0)
    model = babygpt.BabyGPT(5, block_size=8, n_embed=16, n_head=2, n_layer=1, dropout=0.5).train()
    data = {"train": torch.zeros(200, dtype=torch.long), "val": torch.arange(200) % 5}
    out = babygpt.estimate_loss(model, data, 4, 8, 3, torch.Generator().manual_seed(1))
    assert model.training
    model.eval()
    with torch.no_grad():
        for split in ("train", "val"):
            gen = torch.Generator().manual_seed(1)
            if split == "val":  # the val batches come after the train batches in the same stream
                for _ in range(3):
                    babygpt.get_batch(data["train"], 4, 8, gen)
            want = sum(model(*babygpt.get_batch(data[split], 4, 8, gen))[1].item() for _ in range(3)) / 3
            assert out[split] == pytest.approx(want, abs=1e-5), split
    assert abs(out["train"] - out["val"]) > 0.01  # the splits really differ here


def test_training_learns_from_the_train_split_and_is_judged_on_val(tmp_path, monkeypatch, capsys):
    """The last tenth of the text (val) is shuffled characters the first part never shows in that
    order: a model that trained on train predicts train far better than val."""
    import random
    text = make_corpus(100)
    n = int(0.9 * len(text))
    rng = random.Random(0)
    tail = list(text[n:])
    rng.shuffle(tail)
    (tmp_path / "split.txt").write_text(text[:n] + "".join(tail), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    rc, out, err = main(tiny("--learning_rate=1e-2", "--max_iters=30", "--eval_interval=30",
                                 data="split.txt"), capsys)
    assert rc == 0, err
    train_loss, val_loss = losses(out)[30]
    assert train_loss < val_loss - 0.5, out


# -----------------------------------------------------------------------------
# gradient accumulation and clipping, as train() wires them

def test_accumulating_micro_batches_trains_the_same_model(corpus, monkeypatch, capsys):
    """Two micro-batches of 4 draw the same rows as one batch of 8 (one random stream), so the
    losses must agree to rounding."""
    monkeypatch.chdir(corpus.parent)
    runs = []
    for accum in (1, 2):
        rc, out, err = main(tiny(f"--grad_accum_steps={accum}", "--learning_rate=3e-3",
                                     f"--save_path=m{accum}.pth", f"--ckpt_path=c{accum}.pt"), capsys)
        assert rc == 0, err
        runs.append(losses(out))
    assert runs[0].keys() == runs[1].keys() == {0, 5, 10}
    for step in runs[0]:
        assert runs[0][step] == pytest.approx(runs[1][step], abs=3e-4), step
    assert runs[0][10][0] < runs[0][0][0] - 0.1  # it trained


def test_grad_clip_clips_every_step_to_the_setting(corpus, monkeypatch, capsys):
    monkeypatch.chdir(corpus.parent)
    real_clip, calls = torch.nn.utils.clip_grad_norm_, []

    def clip(params, max_norm, *args, **kwargs):
        params = list(params)
        norm = real_clip(params, max_norm, *args, **kwargs)
        after = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        calls.append((max_norm, len(params), float(after)))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    rc, _, err = main(tiny("--grad_clip=0.05"), capsys)
    assert rc == 0, err
    n_params = len(list(babygpt.BabyGPT(10, 16, 32, 2, 2).parameters()))
    assert len(calls) == 10 and all(c[0] == 0.05 and c[1] == n_params for c in calls)
    assert all(c[2] <= 0.05 * 1.001 for c in calls)
    calls.clear()
    rc, _, err = main(tiny("--grad_clip=0"), capsys)
    assert rc == 0 and not calls


# -----------------------------------------------------------------------------
# sampling: temperature and top-k

def test_top_k_draws_only_and_all_of_the_k_likeliest():
    logits = torch.tensor([[3.0, 2.9, 0.5, 2.8, -1.0, 2.7]]).repeat(4000, 1)
    drawn = babygpt.sample_next(logits, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert drawn.shape == (4000, 1)
    assert set(drawn.flatten().tolist()) == {0, 1, 3}
    greedy = babygpt.sample_next(logits[:2], temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert greedy.flatten().tolist() == [0, 0]


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_the_logits(temperature):
    logits = torch.tensor([[0.0, math.log(3.0)]]).repeat(20000, 1)  # p(1) = 3/4 at temperature 1
    drawn = babygpt.sample_next(logits, temperature=temperature, generator=torch.Generator().manual_seed(0))
    want = 3 ** (1 / temperature) / (1 + 3 ** (1 / temperature))
    assert drawn.float().mean().item() == pytest.approx(want, abs=0.015)


def test_generate_texts_passes_temperature_and_top_k_to_the_model():
    """temperature 0, and top_k 1 at temperature 1, are both greedy: the seed model's argmax."""
    vocab = 12
    torch.manual_seed(3)
    ref = reference.SeedGPT(vocab, block_size=8, n_embed=16, n_head=2, n_layer=1, dropout=0.0).eval()
    model = babygpt.BabyGPT(vocab, block_size=8, n_embed=16, n_head=2, n_layer=1, dropout=0.0)
    model.load_state_dict(ref.state_dict())
    tok = babygpt.Tokenizer("abcdefghijkl")
    greedy = tok.decode(ref.generate(torch.tensor([tok.encode("ab")]), 20, temperature=0)[0].tolist())
    base = dict(max_new_token=20, num_samples=1, kv_cache=True)
    for temperature, top_k in ((0.0, 0), (1.0, 1)):
        cfg = babygpt.SimpleNamespace(temperature=temperature, top_k=top_k, **base)
        assert babygpt.generate_texts(model, tok, ["ab"], cfg, torch.device("cpu")) == [[greedy]]
    cfg = babygpt.SimpleNamespace(temperature=1.0, top_k=0, **base)
    sampled = {babygpt.generate_texts(model, tok, ["ab"], cfg, torch.device("cpu"),
                                      torch.Generator().manual_seed(s))[0][0] for s in range(4)}
    assert len(sampled) > 1


def test_sampling_with_the_kv_cache_draws_the_same_text():
    torch.manual_seed(4)
    model = babygpt.BabyGPT(20, block_size=8, n_embed=16, n_head=2, n_layer=2, dropout=0.0).eval()
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    outs = [model.generate(idx, 12, temperature=1.0, kv_cache=cache, generator=torch.Generator().manual_seed(9))
            for cache in (True, False)]
    assert torch.equal(outs[0], outs[1])


# -----------------------------------------------------------------------------
# NaN: caught at the step where it appears

def test_a_nan_loss_stops_training_at_its_step(corpus, monkeypatch, capsys):
    """The loss turns NaN at step 3 (the model's output is poisoned from then on): the run stops
    there, not at the next evaluation (step 10), and keeps the last good checkpoint."""
    monkeypatch.chdir(corpus.parent)
    real_step, calls = babygpt.train_step, []

    def train_step(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # step 3
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return real_step(model, *args, **kwargs)

    monkeypatch.setattr(babygpt, "train_step", train_step)
    rc, out, err = main(tiny("--eval_interval=10"), capsys)
    assert rc == 1
    assert "the loss became NaN or infinite at step 3" in err, err
    assert "step 10:" not in out
    assert not (corpus.parent / "model.pth").exists()
    ckpt = load_ckpt(corpus.parent / "ckpt.pt")
    assert ckpt["iter_num"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


# -----------------------------------------------------------------------------
# model.pth: the seed's classes, and a head count that does not fit

def test_a_model_pth_with_another_head_count_is_never_loaded_silently(tmp_path, monkeypatch, capsys):
    """The seed layout records n_head (heads.N): the same weights read with another head count
    compute another function."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "poems.txt").write_text(make_corpus(), encoding="utf-8")
    rc, _, err = main(tiny("--n_head=4"), capsys)
    assert rc == 0, err
    os.remove("ckpt.pt")
    heads = {k.split(".")[4] for k in load_ckpt(tmp_path / "model.pth") if ".heads." in k}
    assert heads == {"0", "1", "2", "3"}
    rc, _, err = main(tiny("--n_head=2", "--init_from=model.pth", "--save_path=b.pth"), capsys)
    assert rc == 1 and "n_head" in err and len(err.strip().splitlines()) == 1, err
    rc, _, err = main(tiny("--n_head=4", "--init_from=model.pth", "--save_path=b.pth", "--ckpt_path=b.pt"), capsys)
    assert rc == 0, err
    rc, _, err = main(tiny("--n_head=4", "--init_from=b.pt", "--save_path=c.pth", "--ckpt_path=c.pt"), capsys)
    assert rc == 0, err  # a ckpt.pt's weights start a training too
    # sample builds the model the file describes, whatever --n_head says
    rc, out, err = main(["sample", *tiny("--n_head=2", "--temperature=0", "--prompts=春江")], capsys)
    assert rc == 0, err
    ref = reference.SeedGPT(len(set(make_corpus())), block_size=16, n_embed=32, n_head=4, n_layer=2, dropout=0.0)
    ref.load_state_dict(load_ckpt(tmp_path / "model.pth"))
    tok = babygpt.Tokenizer(make_corpus())
    want = tok.decode(ref.eval().generate(torch.tensor([tok.encode("春江")]), 12, temperature=0)[0].tolist())
    assert want in out, out


# -----------------------------------------------------------------------------
# wandb: three offline pieces of one training

def test_three_offline_pieces_share_one_group_and_one_sync_command(corpus, monkeypatch, capsys):
    fake = FakeWandb(str(corpus.parent))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.chdir(corpus.parent)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    base = [a for a in tiny() if not a.startswith("--wandb_mode")] + ["--wandb_mode=offline"]
    outs = []
    for i, end in enumerate((5, 10, 15)):
        rc, out, err = main(base + [f"--max_iters={end}"] + (["--resume=true"] if i else []), capsys)
        assert rc == 0, err
        outs.append(out)
    ids = [init["id"] for init in fake.inits]
    assert len(set(ids)) == 3
    assert [init["group"] for init in fake.inits] == [ids[0]] * 3
    assert [init["name"].endswith(f"resumed at step {s}") for init, s in zip(fake.inits, (0, 5, 10))] == \
        [False, True, True]
    sync = re.search(r"wandb sync (.*)$", outs[2], re.M)[1].split()
    assert sync == [f"wandb/offline-run-{i}" for i in ids]
    iterations = [row["iteration"] for row in fake.logged if "val_loss" in row]
    assert iterations == [0, 5, 10, 15]  # the resumed pieces do not repeat a step


# -----------------------------------------------------------------------------
# the phase line: each second goes to the phase it was spent in

def test_each_phase_gets_the_time_spent_in_it(corpus, monkeypatch, capsys):
    monkeypatch.chdir(corpus.parent)
    slow = {"evaluation": 0.4, "training": 0.06, "checkpoints": 0.3, "generation and saving": 0.5}

    def slowed(fn, seconds):
        def wrapper(*args, **kwargs):
            time.sleep(seconds)
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(babygpt, "estimate_loss", slowed(babygpt.estimate_loss, slow["evaluation"]))
    monkeypatch.setattr(babygpt, "train_step", slowed(babygpt.train_step, slow["training"]))
    monkeypatch.setattr(babygpt, "generate_texts", slowed(babygpt.generate_texts, slow["generation and saving"]))
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "iter_num" in obj:
            time.sleep(slow["checkpoints"])
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    rc, out, err = main(tiny("--checkpoint_interval=0", "--prompts=春江"), capsys)
    assert rc == 0, err
    line = [l for l in out.splitlines() if l.startswith("total ")][-1]
    got = {p.rsplit(" ", 1)[0]: float(p.rsplit(" ", 1)[1][:-1]) for p in line.split(": ", 1)[1].split(", ")}
    want = {"evaluation": 3 * 0.4, "training": 10 * 0.06, "checkpoints": 3 * 0.3, "generation and saving": 0.5}
    for phase, seconds in want.items():
        assert got[phase] >= seconds - 0.1, (phase, line)
    assert got["training"] < want["training"] + 0.9 * slow["evaluation"], line  # evaluation is not training
    assert got["evaluation"] < want["evaluation"] + 0.9 * slow["checkpoints"], line


# -----------------------------------------------------------------------------
# several processes (torchrun, 2 CPU processes)

# each rank writes its first training batch and its final weights next to the run
RECORD_RANKS = """
rank = os.environ["RANK"]
real_batch, real_train, batches = babygpt.get_batch, babygpt.train, []
def get_batch(data, batch_size, block_size, generator=None):
    x, y = real_batch(data, batch_size, block_size, generator)
    if generator is None and not batches:
        batches.append(x.clone())
    return x, y
def train(cfg, *args):
    model = real_train(cfg, *args)
    torch.save({"batch": batches[0], "model": model.state_dict()}, f"rank{rank}.pt")
    return model
babygpt.get_batch, babygpt.train = get_batch, train
"""


def test_two_processes_train_one_model_on_different_batches(corpus, capsys, monkeypatch):
    folder = corpus.parent
    args = [*tiny("--max_iters=6", "--eval_interval=3", "--learning_rate=3e-3"), "--device=cpu"]
    import subprocess
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
    assert same_weights(babygpt.upgrade_state_dict(sd), ranks[0]["model"])
    # the logged losses are the mean of the processes' losses: near one process's own
    together = losses(proc.stdout)
    assert sorted(together) == [0, 3, 6]
    monkeypatch.chdir(folder)
    rc, out, err = main(args[:-1] + ["--max_iters=1", "--save_path=one.pth", "--ckpt_path=one.pt"], capsys)
    alone = losses(out)[0]
    assert together[0][0] == pytest.approx(alone[0], abs=0.15) and together[0][1] == pytest.approx(alone[1], abs=0.15)
