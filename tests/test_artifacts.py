"""What users keep: a model.pth the seed's own classes load, wandb runs worth opening (offline
pieces of one training grouped, charts against the training step, samples as a table)."""

import glob
import json
import os
import re
import sys

import pytest
import torch

import babygpt
import reference
from conftest import FakeWandb, load_ckpt, losses, run_cli, tiny


# -----------------------------------------------------------------------------
# model.pth in the seed's layout

def seed_model(vocab):
    return reference.SeedGPT(vocab, block_size=16, n_embed=32, n_head=2, n_layer=2, dropout=0.0)


def test_model_pth_has_exactly_the_seeds_keys_and_loads_strictly_into_its_classes(trained):
    folder, ckpt = trained, load_ckpt(trained / "ckpt.pt")
    sd = load_ckpt(folder / "model.pth")
    vocab = len(ckpt["chars"])
    ref = seed_model(vocab)
    assert set(sd) == set(ref.state_dict())  # per-head key/query/value, tril, postion_embedding_table
    ref.load_state_dict(torch.load(folder / "model.pth"), strict=True)  # as the seed's code does
    ref.eval()
    ours = babygpt.BabyGPT(vocab, block_size=16, n_embed=32, n_head=2, n_layer=2, dropout=0.0)
    ours.load_state_dict(ckpt["model"])
    ours.eval()
    idx = torch.randint(vocab, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ref(idx)[0], ours(idx)[0], atol=1e-5, rtol=1e-5)
    for layer in range(2):
        for head in range(2):
            tril = sd[f"blocks.{layer}.sa.heads.{head}.tril"]
            assert torch.equal(tril, torch.tril(torch.ones(16, 16)))


def test_seed_state_dict_round_trips_and_shares_one_mask():
    torch.manual_seed(0)
    model = babygpt.BabyGPT(30, block_size=8, n_embed=12, n_head=3, n_layer=2)
    sd = model.state_dict()
    seed = babygpt.seed_state_dict(sd, n_head=3, block_size=8)
    back = babygpt.upgrade_state_dict(seed)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    masks = {seed[k].data_ptr() for k in seed if k.endswith(".tril")}
    assert len(masks) == 1  # torch.save writes the shared mask once


def test_sample_and_init_from_work_from_a_seed_layout_model_pth(work, trained):
    os.remove(work / "ckpt.pt")  # sample must use model.pth, with the vocabulary of data_path
    res = run_cli(["sample", *tiny("--temperature=0", "--prompts=春江", "--max_new_token=12")], cwd=work)
    assert res.returncode == 0, res.stderr
    after = res.stdout.split("sampling from model.pth\n", 1)[1]  # the echoed overrides name 春江 too
    text = after.split("\n----------\n")[0]
    assert text.startswith("春江") and len(text) == 2 + 12, res.stdout  # the prompt and 12 new characters
    res = run_cli(tiny("--init_from=model.pth", "--max_iters=5", "--save_path=again.pth", "--ckpt_path=again.pt"),
                  cwd=work)
    assert res.returncode == 0, res.stderr
    log = (trained / "train.log").read_text(encoding="utf-8")
    step0 = [losses(out)[0][0] for out in (log, res.stdout)]
    assert step0[1] < step0[0] - 0.5  # it started from the trained weights (same step-0 batches)


# -----------------------------------------------------------------------------
# wandb: the stand-in records how runs are made and what is logged

def run_with_fake_wandb(corpus, monkeypatch, *extra, mode="offline"):
    fake = FakeWandb(str(corpus.parent))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.chdir(corpus.parent)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    args = [a for a in tiny(data=corpus.name) if not a.startswith("--wandb_mode")] + [f"--wandb_mode={mode}", *extra]
    assert babygpt.main(args) == 0
    return fake


def test_wandb_run_name_tags_code_and_step_metric(corpus, monkeypatch):
    fake = run_with_fake_wandb(corpus, monkeypatch)
    init = fake.inits[0]
    assert init["name"] == "2L-32 poems.txt cpu"
    assert init["tags"] == ["cpu", "float32"] and init["save_code"] is True
    assert (("iteration",), {}) in fake.metrics
    assert (("*",), {"step_metric": "iteration"}) in fake.metrics  # charts against the training step
    assert (("val_loss",), {"step_metric": "iteration", "summary": "min"}) in fake.metrics
    assert all(not kw for kw in fake.log_kwargs)  # never step=


def test_samples_are_logged_as_a_table_at_the_first_last_and_every_interval(corpus, monkeypatch, capsys):
    fake = run_with_fake_wandb(corpus, monkeypatch, "--max_iters=20", "--sample_interval=10",
                               "--prompts=春江,往事", "--max_new_token=6")
    tables = [(m["iteration"], m["samples"]) for m in fake.logged if "samples" in m]
    assert [it for it, _ in tables] == [0, 10, 20]
    last = tables[-1][1]
    assert last.columns == ["iteration", "prompt", "text"]
    assert [(r[0], r[1]) for r in last.data] == [(it, p) for it in (0, 10, 20) for p in ("春江", "往事")]
    assert all(r[2].startswith(r[1]) and len(r[2]) == len(r[1]) + 6 for r in last.data)
    out = capsys.readouterr().out
    assert [l for l in out.splitlines() if l.startswith("春江")] and \
        len([l for l in out.splitlines() if l.startswith("春江")]) == 1  # only the seed's final generation


def test_samples_do_not_change_the_training(corpus, monkeypatch, capsys):
    """The samples draw from a generator of their own: the losses match a run without wandb."""
    run_with_fake_wandb(corpus, monkeypatch, "--dropout=0.1", "--sample_interval=5")
    with_samples = [l.split(", speed")[0] for l in capsys.readouterr().out.splitlines() if l.startswith("step ")]
    assert babygpt.main(tiny("--dropout=0.1", "--ckpt_path=b.pt", "--save_path=b.pth", data=corpus.name)) == 0
    without = [l.split(", speed")[0] for l in capsys.readouterr().out.splitlines() if l.startswith("step ")]
    assert with_samples == without and len(without) == 3


def test_wandb_failures_in_logging_never_stop_training(corpus, monkeypatch, capsys):
    fake = FakeWandb(str(corpus.parent))

    def broken_table(columns, data):
        raise RuntimeError("table service down")
    fake.Table = broken_table
    real_init = fake.init

    def init(**kw):
        run = real_init(**kw)
        run.log = lambda metrics, **k: (_ for _ in ()).throw(ConnectionError("gone"))
        return run
    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.chdir(corpus.parent)
    args = [a for a in tiny(data=corpus.name) if not a.startswith("--wandb_mode")] + ["--wandb_mode=offline"]
    assert babygpt.main(args) == 0
    captured = capsys.readouterr()
    assert "warning: wandb samples failed (table service down)" in captured.err
    assert "warning: wandb logging failed (gone); continuing without it" in captured.err
    assert "step 10:" in captured.out and "模型已保存到model.pth" in captured.out


# -----------------------------------------------------------------------------
# wandb for real, offline: an interrupted-and-resumed training as two grouped runs

def test_offline_resume_is_two_runs_in_one_group_with_their_sample_tables(corpus):
    folder = corpus.parent
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    args = [a for a in tiny(data=corpus.name) if not a.startswith("--wandb_mode")] + ["--sample_interval=5"]
    first = run_cli([*args, "--max_iters=5"], cwd=folder, env=env)
    assert first.returncode == 0, first.stderr
    second = run_cli([*args, "--max_iters=10", "--resume=true"], cwd=folder, env=env)
    assert second.returncode == 0, second.stderr
    runs = sorted(glob.glob(str(folder / "wandb" / "offline-run-*")), key=os.path.getmtime)
    assert len(runs) == 2, runs
    ids = [r.rsplit("-", 1)[1] for r in runs]
    assert ids[0] != ids[1]
    blobs = [open(glob.glob(os.path.join(r, "*.wandb"))[0], "rb").read() for r in runs]
    assert ids[0].encode() in blobs[1]  # the second piece's group is the first piece's id
    assert b"resumed at step 5" in blobs[1] and b"resumed at step" not in blobs[0]
    for run, steps in zip(runs, ([0, 5], [10])):
        tables = sorted(glob.glob(os.path.join(run, "files", "media", "table", "samples_*.table.json")))
        assert len(tables) == len(steps), tables
        with open(tables[-1], encoding="utf-8") as f:
            table = json.load(f)
        assert table["columns"] == ["iteration", "prompt", "text"]
        assert sorted({row[0] for row in table["data"]}) == steps
    # one command uploads both pieces
    sync = re.search(r"upload every piece of this training later with: wandb sync (.+)$", second.stdout, re.M)
    assert sync, second.stdout
    assert [os.path.basename(p) for p in sync[1].split()] == [os.path.basename(r) for r in runs]
    assert "wandb leet" in first.stdout


# -----------------------------------------------------------------------------
# scripts/val_loss.py: a model's validation loss, measured apart from training

def test_val_loss_script_scores_a_trained_model_better_than_an_untrained_one(work):
    import subprocess
    script = os.path.join(os.path.dirname(babygpt.__file__), "scripts", "val_loss.py")
    vocab = len(set((work / "poems.txt").read_text(encoding="utf-8")))
    torch.manual_seed(0)
    fresh = babygpt.BabyGPT(vocab, block_size=16, n_embed=32, n_head=2, n_layer=2)
    torch.save(babygpt.seed_state_dict(fresh.state_dict(), 2, 16), work / "fresh.pth")
    scores = []
    for name in ("model.pth", "fresh.pth"):
        proc = subprocess.run([sys.executable, script, name, "--data_path=poems.txt", "--windows=200"], cwd=work,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        scores.append(float(re.search(r"val loss ([0-9.]+) over 200 random windows of 16", proc.stdout)[1]))
    assert scores[0] < scores[1] - 0.5, scores
    proc = subprocess.run([sys.executable, script, "gone.pth", "--data_path=poems.txt"], cwd=work,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "gone.pth" in proc.stderr
