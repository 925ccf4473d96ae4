"""Weights and checkpoints: ckpt.pt, model.pth in both layouts, atomic writes, files that cannot load, and resume."""

import os
import re
import runpy
import signal
import sys

import pytest
import torch

import babygpt
import reference
from conftest import (AUTO_ARGS, STEP_RE, TINY, fake_probe, load_ckpt, losses, make_corpus, one_line_error,
                      parse_samples, run_cli, run_main, run_many, run_wrapped, same_files, same_weights, show, snapshot,
                      tiny, tiny_model, winners)

F32, BF16 = torch.float32, torch.bfloat16
CKPT_KEYS = {"model", "optimizer", "iter_num", "evaluated", "config", "chars", "rng"}


# -----------------------------------------------------------------------------
# What ckpt.pt and model.pth hold

def test_checkpoint_contents(trained):
    """ckpt.pt loads safely and holds all a resume needs (step, AdamW's moments, random state, vocabulary,
    settings), and model.pth the same final weights."""
    ckpt = load_ckpt(trained / "ckpt.pt")  # weights_only=True must accept it
    assert isinstance(ckpt, dict)
    missing = CKPT_KEYS - set(ckpt)
    assert not missing, f"ckpt.pt lacks {missing}"
    assert ckpt["iter_num"] == 10
    assert "".join(ckpt["chars"]) == "".join(sorted(set(make_corpus())))
    for key, value in (("n_layer", 2), ("n_head", 2), ("n_embed", 32), ("block_size", 16)):
        assert ckpt["config"][key] == value
    printed = losses((trained / "train.log").read_text(encoding="utf-8"))
    assert sorted(printed) == [0, 5, 10]
    assert torch.is_tensor(ckpt["rng"]["cpu"])
    model = babygpt.BabyGPT(len(ckpt["chars"]), block_size=16, n_embed=32, n_head=2, n_layer=2)
    assert "state" in ckpt["optimizer"] and "param_groups" in ckpt["optimizer"]
    assert len(ckpt["optimizer"]["state"]) == len(list(model.parameters()))  # AdamW moments for every weight

    sd = load_ckpt(trained / "model.pth")
    assert all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()), "model.pth must be a plain state_dict"
    model.load_state_dict(babygpt.fused_layout(sd))
    ours = babygpt.fused_layout(sd)  # model.pth is in the seed's layout; ckpt.pt in ours
    assert ours.keys() == ckpt["model"].keys()
    for k in ours:  # model.pth is written after the final checkpoint, from the same weights
        assert torch.equal(ours[k], ckpt["model"][k]), k


def test_babygpt_state_dict_uses_fused_layout():
    """ckpt.pt's weights hold one fused qkv matrix per layer (the seed's classes cannot take them) and read back
    exactly."""
    n_embed, n_layer = 24, 2
    model = babygpt.BabyGPT(13, block_size=8, n_embed=n_embed, n_head=3, n_layer=n_layer)
    sd = model.state_dict()
    assert "position_embedding_table.weight" in sd
    assert not any("postion" in k or ".heads." in k or "tril" in k for k in sd)
    for layer in range(n_layer):
        assert sd[f"blocks.{layer}.sa.qkv.weight"].shape == (3 * n_embed, n_embed)
    assert "lm_head.bias" in sd  # lm_head with bias, as the seed
    ref = reference.SeedGPT(13, block_size=8, n_embed=n_embed, n_head=3, n_layer=n_layer)
    with pytest.raises(RuntimeError):
        ref.load_state_dict(sd)
    other = babygpt.BabyGPT(13, block_size=8, n_embed=n_embed, n_head=3, n_layer=n_layer)
    other.load_state_dict(babygpt.fused_layout(sd))
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in sd.items())


def test_model_pth_has_exactly_the_seeds_keys_and_loads_strictly_into_its_classes(trained):
    """A user's seed code loads our model.pth with strict=True and computes our model's logits."""
    ckpt = load_ckpt(trained / "ckpt.pt")
    sd = load_ckpt(trained / "model.pth")
    vocab = len(ckpt["chars"])
    ref = reference.SeedGPT(vocab, block_size=16, n_embed=32, n_head=2, n_layer=2, dropout=0.0)
    assert set(sd) == set(ref.state_dict())  # per-head key/query/value, tril, postion_embedding_table
    ref.load_state_dict(torch.load(trained / "model.pth"), strict=True)  # as the seed's code does
    ours = babygpt.BabyGPT(vocab, block_size=16, n_embed=32, n_head=2, n_layer=2, dropout=0.0)
    ours.load_state_dict(babygpt.fused_layout(ckpt["model"]))
    idx = torch.randint(vocab, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ref.eval()(idx)[0], ours.eval()(idx)[0], atol=1e-5, rtol=1e-5)
    for layer in range(2):
        for head in range(2):
            assert torch.equal(sd[f"blocks.{layer}.sa.heads.{head}.tril"], torch.tril(torch.ones(16, 16)))


def test_model_pth_loads_into_babygpt_with_the_natural_call(trained):
    """A notebook's `BabyGPT(vocab).load_state_dict(torch.load("model.pth"))` works for model.pth (the original
    script's layout) and for ckpt.pt's fused weights, and both give the trained model's logits."""
    ckpt = load_ckpt(trained / "ckpt.pt")
    vocab = len(ckpt["chars"])
    shape = dict(block_size=16, n_embed=32, n_head=2, n_layer=2, dropout=0.0)
    from_pth, from_ckpt = babygpt.BabyGPT(vocab, **shape), babygpt.BabyGPT(vocab, **shape)
    from_pth.load_state_dict(torch.load(trained / "model.pth"))
    from_ckpt.load_state_dict(ckpt["model"])
    idx = torch.randint(vocab, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(from_pth.eval()(idx)[0], from_ckpt.eval()(idx)[0])
    assert not torch.equal(from_ckpt.lm_head.bias, babygpt.BabyGPT(vocab, **shape).lm_head.bias)  # trained ones


def test_weights_with_another_head_count_are_refused_naming_both_counts(trained):
    """Per-head weights of 2 heads joined into a 4-head model would compute another function without a word:
    load_state_dict refuses them and names both counts."""
    vocab = len(load_ckpt(trained / "ckpt.pt")["chars"])
    model = babygpt.BabyGPT(vocab, block_size=16, n_embed=32, n_head=4, n_layer=2)
    with pytest.raises(ValueError, match=r"2 attention heads a layer and this model 4.*n_head=2"):
        model.load_state_dict(torch.load(trained / "model.pth"))


def test_fused_weights_record_their_head_count_and_another_is_refused():
    """Fused weights (state_dict(), ckpt.pt's "model") carry their head count: in a model with another count they are
    refused, naming both, instead of computing another function; fused weights saved without it still load."""
    sd = babygpt.BabyGPT(30, block_size=8, n_embed=12, n_head=3, n_layer=2).state_dict()
    assert babygpt.head_count(sd) == 3
    two_heads = babygpt.BabyGPT(30, block_size=8, n_embed=12, n_head=2, n_layer=2)
    with pytest.raises(ValueError, match=r"3 attention heads a layer and this model 2.*n_head=3"):
        two_heads.load_state_dict(sd)
    with pytest.raises(babygpt.UserError, match=r"n_head=3 \(here 2\)"):
        babygpt.load_weights(two_heads, sd, "model.pth")
    older = {k: v for k, v in sd.items() if not k.endswith(".head_count")}
    assert babygpt.head_count(older) == 0
    model = babygpt.BabyGPT(30, block_size=8, n_embed=12, n_head=3, n_layer=2)
    model.load_state_dict(older)
    assert same_weights(model.state_dict(), sd)


def test_seed_layout_round_trips_and_shares_one_mask():
    """Our weights written in the seed's layout read back bit for bit, and the causal mask is stored once."""
    torch.manual_seed(0)
    model = babygpt.BabyGPT(30, block_size=8, n_embed=12, n_head=3, n_layer=2)
    sd = model.state_dict()
    seed = babygpt.per_head_layout(sd, n_head=3, block_size=8)
    back = babygpt.fused_layout(seed)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert len({seed[k].data_ptr() for k in seed if k.endswith(".tril")}) == 1


def test_weights_saved_from_a_compiled_or_ddp_model_load():
    """A state_dict saved from a torch.compile'd or DDP-wrapped model (keys `_orig_mod.`, `module.`) loads as is."""
    sd = tiny_model(30).state_dict()
    for prefix in ("_orig_mod.", "module.", "module._orig_mod."):
        other = tiny_model(30, seed=1)
        babygpt.load_weights(other, {prefix + k: v for k, v in sd.items()}, "model.pth")
        assert same_weights(other.state_dict(), sd), prefix


def test_seed_layout_state_dict_loads_from_a_file(tmp_path):
    """A model.pth saved by the seed's own script loads into BabyGPT and computes the seed model's logits."""
    torch.manual_seed(0)
    ref = reference.SeedGPT(29, block_size=8, n_embed=16, n_head=2, n_layer=2, dropout=0.0).eval()
    keys = ref.state_dict().keys()
    assert "postion_embedding_table.weight" in keys and "blocks.1.sa.heads.1.tril" in keys
    path = tmp_path / "seed_model.pth"
    torch.save(ref.state_dict(), path)
    baby = babygpt.BabyGPT(29, block_size=8, n_embed=16, n_head=2, n_layer=2, dropout=0.0).eval()
    babygpt.load_weights(baby, torch.load(path, weights_only=True), str(path))
    idx = torch.randint(29, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(baby(idx)[0], ref(idx)[0], rtol=0, atol=1e-5)


def seed_setup(folder):
    """poems.txt, and a model.pth saved by the seed's own classes: (tokenizer, seed model)."""
    text = make_corpus()
    (folder / "poems.txt").write_text(text, encoding="utf-8")
    tok = babygpt.Tokenizer(text)
    seed_model = tiny_model(tok.vocab_size, seed=3, cls=reference.SeedGPT).eval()
    torch.save(seed_model.state_dict(), folder / "model.pth")
    return tok, seed_model


def test_sample_with_seed_model_pth(tmp_path):
    """`sample` on a model.pth from the seed's script writes the seed model's own greedy text."""
    tok, seed_model = seed_setup(tmp_path)
    prompts = ["春江", "往事"]
    proc = run_cli(["sample", *tiny(), "--prompts=春江,往事", "--max_new_token=25", "--temperature=0"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for prompt, group in zip(prompts, parse_samples(proc.stdout, prompts)):
        want = tok.decode(seed_model.generate(torch.tensor([tok.encode(prompt)]), 25, temperature=0)[0].tolist())
        assert group == [want]


def test_train_from_seed_model_pth(tmp_path):
    """--init_from=model.pth with the seed's file starts training from its weights, not from fresh ones."""
    tok, seed_model = seed_setup(tmp_path)
    proc, fresh = run_many(  # a learning rate so small that one step leaves the weights as they were
        (tiny("--init_from=model.pth", "--max_iters=1", "--eval_interval=1",
              "--learning_rate=1e-12", "--save_path=out.pth"), tmp_path),
        (tiny("--max_iters=1", "--eval_interval=1", "--learning_rate=1e-12",
              "--save_path=fresh.pth", "--ckpt_path=fresh.pt"), tmp_path))
    assert proc.returncode == 0, proc.stderr
    model = babygpt.BabyGPT(tok.vocab_size, block_size=16, n_embed=32, n_head=2, n_layer=2, dropout=0.0).eval()
    model.load_state_dict(babygpt.fused_layout(load_ckpt(tmp_path / "out.pth")))
    idx = torch.randint(tok.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], seed_model(idx)[0], rtol=1e-5, atol=1e-5)
    assert fresh.returncode == 0, fresh.stderr
    assert losses(proc.stdout)[0] != losses(fresh.stdout)[0]  # step 0 is the seed weights' loss


def test_a_model_pth_with_another_head_count_is_never_loaded_silently(tmp_path, monkeypatch, capsys):
    """A model.pth trained with 4 heads is refused for --n_head=2 (same weights, another function), and
    `sample` builds the 4 heads the file records."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "poems.txt").write_text(make_corpus(), encoding="utf-8")
    assert run_main(capsys, tiny("--n_head=4")).returncode == 0
    os.remove("ckpt.pt")
    heads = {k.split(".")[4] for k in load_ckpt(tmp_path / "model.pth") if ".heads." in k}
    assert heads == {"0", "1", "2", "3"}
    one_line_error(run_main(capsys, tiny("--n_head=2", "--init_from=model.pth", "--save_path=b.pth")), "n_head")
    res = run_main(capsys, tiny("--n_head=4", "--init_from=model.pth", "--save_path=b.pth", "--ckpt_path=b.pt"))
    assert res.returncode == 0, show(res)
    res = run_main(capsys, tiny("--n_head=4", "--init_from=b.pt", "--save_path=c.pth", "--ckpt_path=c.pt"))
    assert res.returncode == 0, show(res)  # a ckpt.pt's weights start a training too
    res = run_main(capsys, ["sample", *tiny("--n_head=2", "--temperature=0", "--prompts=春江")])
    assert res.returncode == 0, show(res)
    ref = reference.SeedGPT(len(set(make_corpus())), block_size=16, n_embed=32, n_head=4, n_layer=2, dropout=0.0)
    ref.load_state_dict(load_ckpt(tmp_path / "model.pth"))
    tok = babygpt.Tokenizer(make_corpus())
    want = tok.decode(ref.eval().generate(torch.tensor([tok.encode("春江")]), 12, temperature=0)[0].tolist())
    assert want in res.stdout, res.stdout


def test_val_loss_script_scores_a_trained_model_better_than_an_untrained_one(work, monkeypatch, capsys):
    """scripts/val_loss.py scores a trained model.pth better than an untrained one, and names a missing file in one
    line (run in this process: its main() as `python scripts/val_loss.py ARGS` runs it)."""
    script = os.path.join(os.path.dirname(babygpt.__file__), "scripts", "val_loss.py")
    vocab = len(set((work / "poems.txt").read_text(encoding="utf-8")))
    fresh = tiny_model(vocab)
    torch.save(babygpt.per_head_layout(fresh.state_dict(), 2, 16), work / "fresh.pth")
    monkeypatch.chdir(work)

    def val_loss(*args):
        monkeypatch.setattr(sys, "argv", [script, *args])
        runpy.run_path(script, run_name="__main__")
        return capsys.readouterr().out

    printed = [val_loss(name, "--data_path=poems.txt", "--windows=200") for name in ("model.pth", "fresh.pth")]
    scores = [float(re.search(r"val loss ([0-9.]+) over 200 random windows of 16", out)[1]) for out in printed]
    assert scores[0] < scores[1] - 0.5, scores
    with pytest.raises(SystemExit) as stop:  # sys.exit("error: ..."): that line on stderr, exit code 1
        val_loss("gone.pth", "--data_path=poems.txt")
    assert str(stop.value.code).startswith("error: ") and "gone.pth" in str(stop.value.code)


# -----------------------------------------------------------------------------
# Atomic writes

def test_save_atomic_writes_and_leaves_no_temp_file(tmp_path, monkeypatch):
    """A checkpoint is written beside its target, flushed to disk, then renamed over it: a crash never leaves
    half a ckpt.pt."""
    path = tmp_path / "ckpt.pt"
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))),
                                                     real_replace(a, b))[1])
    babygpt.save_atomic({"w": torch.arange(5)}, str(path))
    assert torch.equal(load_ckpt(path)["w"], torch.arange(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    replaces = [e for e in events if isinstance(e, tuple)]
    assert len(replaces) == 1 and os.path.abspath(replaces[0][2]) == str(path)
    assert os.path.dirname(os.path.abspath(replaces[0][1])) == str(tmp_path), \
        "the temporary file must be in the target's folder so the rename is atomic"
    assert "fsync" in events[:events.index(replaces[0])], "fsync the data before the rename"


def test_save_atomic_that_cannot_create_its_file_says_so(tmp_path, monkeypatch):
    """A checkpoint that cannot even be created (the folder turned read-only mid-run) is one error naming the
    file, and the previous ckpt.pt stays as it was."""
    path = tmp_path / "ckpt.pt"
    babygpt.save_atomic({"w": torch.ones(3)}, str(path))
    old = path.read_bytes()

    def refuse(name, *args, **kwargs):
        raise PermissionError(13, "Permission denied", name)
    monkeypatch.setattr(babygpt, "open", refuse, raising=False)
    with pytest.raises(babygpt.UserError, match=r"cannot write .*ckpt\.pt \(Permission denied.*unchanged"):
        babygpt.save_atomic({"w": torch.zeros(3)}, str(path))
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


# -----------------------------------------------------------------------------
# Files that cannot be loaded: one line, nothing changed

OTHER = "other.txt"


def _setup(work, steps):
    for step in steps:
        kind, _, name = step.partition(":")
        path = work / name
        if kind == "rm":
            path.unlink()
        elif kind == "truncate":
            data = path.read_bytes()
            path.write_bytes(data[:len(data) // 2])
        elif kind == "text":
            path.write_text("this is not a checkpoint\n", encoding="utf-8")
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "dir":
            path.unlink()
            path.mkdir()
        elif kind == "list":
            torch.save([torch.zeros(3)], path)
        elif kind == "drop":  # weights of the right shape, one of them missing
            sd = torch.load(path, weights_only=True)
            del sd["lm_head.bias"]
            torch.save(sd, path)
        elif kind == "fused":  # ckpt.pt's weights alone, as an older babygpt saved them: no head count recorded
            weights = torch.load(work / "ckpt.pt", weights_only=True)["model"]
            torch.save({k: v for k, v in weights.items() if not k.endswith(".head_count")}, path)
        elif kind in ("unconfigured", "headless"):  # its settings lack the head count, or say 0
            state = torch.load(path, weights_only=True)
            state["config"].pop("n_head") if kind == "unconfigured" else state["config"].update(n_head=0)
            torch.save(state, path)
        elif kind == "dict":
            torch.save({"weights": torch.zeros(3), "iter_num": 3}, path)
        elif kind == "other":  # the same text plus characters the trained model never saw
            (work / OTHER).write_text(make_corpus() + "火星人\n", encoding="utf-8")
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
    "sample-ckpt-no-n_head": (["unconfigured:ckpt.pt"], ["sample"], ["ckpt.pt", "not a babygpt"]),
    "sample-ckpt-zero-heads": (["headless:ckpt.pt"], ["sample"], ["ckpt.pt", "not a babygpt"]),
    "sample-pth-heads-misfit": (["fused:model.pth", "rm:ckpt.pt"], ["sample", "--n_embed=30", "--n_head=3"],
                                ["model.pth", "n_embed=32", "n_head=3"]),
    "sample-pth-truncated": (["rm:ckpt.pt", "truncate:model.pth"], ["sample"], ["model.pth"]),
    "sample-pth-text": (["rm:ckpt.pt", "text:model.pth"], ["sample"], ["model.pth"]),
    "sample-pth-not-weights": (["rm:ckpt.pt", "list:model.pth"], ["sample"], ["model.pth", "no model weights"]),
    "sample-pth-other-vocab": (["rm:ckpt.pt", "other:"], ["sample", f"--data_path={OTHER}"],
                               ["model.pth", "vocabulary", OTHER]),
    "sample-pth-no-data": (["rm:ckpt.pt"], ["sample", "--data_path=gone.txt"], ["model.pth", "gone.txt"]),
    "resume-missing": (["rm:ckpt.pt"], ["--resume=true"], ["ckpt.pt", "does not exist"]),
    "resume-truncated": (["truncate:ckpt.pt"], ["--resume=true"], ["ckpt.pt", "truncated"]),
    "resume-text": (["text:ckpt.pt"], ["--resume=true"], ["ckpt.pt"]),
    "resume-model.pth": ([], ["--resume=true", "--ckpt_path=model.pth"], ["model.pth", "not a babygpt"]),
    "resume-not-babygpt": (["dict:ckpt.pt"], ["--resume=true"], ["ckpt.pt", "not a babygpt"]),
    "resume-other-shape": ([], ["--resume=true", "--n_embed=48"], ["ckpt.pt", "n_embed=32", "48"]),
    "resume-other-block": ([], ["--resume=true", "--block_size=8"], ["ckpt.pt", "block_size=16", "8"]),
    "resume-other-layers": ([], ["--resume=true", "--n_layer=3"], ["ckpt.pt", "n_layer=2", "3"]),
    "resume-other-vocab": (["other:"], ["--resume=true", f"--data_path={OTHER}"], ["ckpt.pt", "vocabulary", OTHER]),
    "init-missing": ([], ["--init_from=nothere.pth"], ["nothere.pth", "does not exist"]),
    "init-truncated": (["truncate:model.pth"], ["--init_from=model.pth"], ["model.pth", "truncated"]),
    "init-text": ([], ["--init_from=poems.txt"], ["poems.txt"]),
    "init-not-weights": (["list:model.pth"], ["--init_from=model.pth"], ["model.pth", "no model weights"]),
    "init-foreign-weights": (["dict:model.pth"], ["--init_from=model.pth"], ["model.pth", "not hold babygpt weights"]),
    "init-missing-weight": (["drop:model.pth"], ["--init_from=model.pth"], ["model.pth", "does not fit this model"]),
    "init-ckpt-other-heads": ([], ["--init_from=ckpt.pt", "--n_head=4"], ["ckpt.pt", "n_head=2", "4"]),
    "init-other-shape": ([], ["--init_from=model.pth", "--n_embed=48"], ["model.pth", "n_embed=32", "48"]),
    "init-other-layers": ([], ["--init_from=model.pth", "--n_layer=1"], ["model.pth", "n_layer=2", "1"]),
    "init-other-vocab": (["other:"], ["--init_from=model.pth", f"--data_path={OTHER}"], ["model.pth", "vocab_size"]),
}


@pytest.mark.parametrize("case", list(CKPT_CASES))
def test_bad_checkpoint_or_model_file(work, capsys, case):
    """A missing, truncated, foreign or mis-shaped ckpt.pt or model.pth (for sample, --resume or --init_from) gets
    one short line saying what and why, and no file changes."""
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


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("case", ["sample-ckpt", "sample-model.pth", "resume", "init_from"])
def test_pickled_code_is_never_run(work, capsys, case):
    """A downloaded ckpt.pt or model.pth that carries code is refused in one line; its code never runs."""
    marker = work / "PWNED"
    evil = {"model": {"w": torch.zeros(2), "x": _Evil(str(marker))}, "iter_num": 1, "chars": "ab", "config": {}}
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
    torch.load(work / target, weights_only=False)  # the file really does carry code: an unsafe load runs it
    assert marker.is_dir()


# -----------------------------------------------------------------------------
# Resume: the same run as one never stopped

RESUME_ARGS = ["--dropout=0.1", "--learning_rate=3e-3", "--lr_schedule=cosine", "--warmup_iters=2",
               "--min_lr=1e-4", "--checkpoint_interval=0", "--max_iters=10", "--eval_interval=4"]

# Ctrl-C arrives while step {step} trains (get_lr runs once a training step and once an evaluation: the step
# chosen is not evaluated)
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
    """A run stopped by Ctrl-C mid-run, or killed after a checkpoint, resumed with the printed command prints the
    losses and trains the weights of the run never stopped."""
    whole_losses, whole_model = uninterrupted
    folder = corpus.parent
    if how == "interrupt":  # Ctrl-C during step 6: the run stops after it, at step 7
        first = run_wrapped(SIGINT_AT_STEP.format(step=6), tiny(*RESUME_ARGS, "--resume=false"), folder)
        assert first.returncode == 130, first.stderr  # a stopped run is not a finished one
        assert load_ckpt(folder / "ckpt.pt")["iter_num"] == 7
        hint = re.search(r"Resume with: (.*)$", first.stdout, re.M)  # the command to type
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
    assert {**losses(first.stdout), **losses(second.stdout)} == whole_losses
    assert same_weights(load_ckpt(folder / "model.pth"), whole_model), "the resumed run trained another model"


def test_a_resume_keeps_the_dtype_its_first_start_measured(corpus, monkeypatch, capsys):
    """A resumed run on a busy CPU, where the probe now says float32, goes on in the bfloat16 it started in and ends
    with the weights of the run done straight."""
    monkeypatch.chdir(corpus.parent)
    args = AUTO_ARGS + [f"--data_path={corpus.name}"]
    monkeypatch.setattr(babygpt, "probe_dtypes", winners(BF16))
    straight = run_main(capsys, args + ["--max_iters=20", "--dtype=bfloat16", "--ckpt_path=whole.pt",
                                        "--save_path=whole.pth"])
    assert straight.returncode == 0, show(straight)
    monkeypatch.setattr(babygpt, "probe_dtypes", winners(BF16, F32))  # the second start disagrees
    first = run_main(capsys, args + ["--max_iters=10"])
    assert first.returncode == 0 and "dtype auto: bfloat16" in first.stdout, show(first)
    assert load_ckpt("ckpt.pt")["config"]["dtype"] == "bfloat16"  # what it trained in, not "auto"
    second = run_main(capsys, args + ["--max_iters=20", "--resume=true"])
    assert second.returncode == 0, show(second)
    assert "resuming from ckpt.pt at step 10, in bfloat16" in second.stdout and "note:" not in second.stdout
    repeat = re.search(r"^to repeat this run exactly: .* --dtype=bfloat16 --max_iters=20$", second.stdout, re.M)
    assert repeat and "--resume" not in repeat[0], show(second)  # the whole training's dtype was measured
    assert {**losses(first.stdout), **losses(second.stdout)} == losses(straight.stdout)
    assert same_weights(load_ckpt("model.pth"), load_ckpt("whole.pth"))


def test_the_resume_command_of_an_explicit_dtype_auto_keeps_the_recorded_dtype(corpus, monkeypatch, capsys):
    """A run started with --dtype=auto prints a resume command that keeps the dtype it measured: resuming with it
    must not measure again (the probe now says float32) and call the run no longer exact."""
    monkeypatch.chdir(corpus.parent)
    args = AUTO_ARGS + [f"--data_path={corpus.name}", "--dtype=auto", "--max_iters=10"]
    monkeypatch.setattr(babygpt, "probe_dtypes", winners(BF16, F32))
    real_step = babygpt.train_step

    def train_step(*a, **k):  # a Ctrl-C during step 3
        if babygpt.STOP.signum is None and len(losses_seen) == 3:
            babygpt.STOP.on_signal(signal.SIGINT, None)
        losses_seen.append(1)
        return real_step(*a, **k)
    losses_seen = []
    monkeypatch.setattr(babygpt, "train_step", train_step)
    first = run_main(capsys, args)
    assert first.returncode == 130, show(first)
    command = re.search(r"Resume with: python \S+ (.*)$", first.stdout, re.M)[1].split()
    assert "--dtype=auto" not in command, command
    monkeypatch.setattr(babygpt, "train_step", real_step)
    second = run_main(capsys, command)
    assert second.returncode == 0, show(second)
    assert "in bfloat16" in second.stdout and "no longer exact" not in second.stdout, show(second)


@pytest.mark.parametrize("dtype,note", [("float32", True), ("bfloat16", False)])
def test_an_explicit_dtype_on_resume_says_the_run_is_no_longer_exact(corpus, monkeypatch, capsys, dtype, note):
    """Resuming a bfloat16 ckpt.pt with --dtype=float32 trains in float32, as asked, and says in one line that the
    run now differs from one never stopped; the same dtype says nothing."""
    monkeypatch.chdir(corpus.parent)
    args = AUTO_ARGS + [f"--data_path={corpus.name}"]
    monkeypatch.setattr(babygpt, "probe_dtypes", winners(BF16, BF16))
    assert run_main(capsys, args + ["--max_iters=5", "--dtype=bfloat16"]).returncode == 0
    res = run_main(capsys, args + ["--max_iters=10", "--resume=true", f"--dtype={dtype}"])
    assert res.returncode == 0, show(res)
    said = [line for line in res.stdout.splitlines() if "no longer exact" in line]
    if note:
        assert said == ["note: ckpt.pt trained in bfloat16; with --dtype=float32 this resumed run is no longer "
                        "exact (leave --dtype out to keep bfloat16)"], show(res)
        assert load_ckpt("ckpt.pt")["config"]["dtype"] == "float32"
    else:
        assert said == [], show(res)


def test_a_fitted_run_resumes_to_the_steps_it_was_fitted_to(corpus, monkeypatch, capsys):
    """A max_minutes run stopped early and resumed trains to the step count it was fitted to, not a new fit,
    unless the user types --max_iters."""
    monkeypatch.chdir(corpus.parent)
    monkeypatch.setattr(babygpt, "probe_dtypes", fake_probe({F32: 0.5, BF16: 1.0}, forward=0.01))
    args = [a for a in TINY if not a.startswith("--max_iters")] + [f"--data_path={corpus.name}", "--max_minutes=5"]
    assert run_main(capsys, args + ["--max_iters=3"]).returncode == 0  # stands for a run stopped early
    state = load_ckpt("ckpt.pt")
    state["config"]["max_iters"] = 20  # as a fitted run of 20 steps would have saved
    torch.save(state, "ckpt.pt")
    res = run_main(capsys, args + ["--resume=true"])  # the probe would fit hundreds of steps now
    assert res.returncode == 0 and max(losses(res.stdout)) == 20, res.stdout
    assert "steps fit" not in res.stdout and load_ckpt("ckpt.pt")["config"]["max_iters"] == 20, res.stdout
    res = run_main(capsys, args + ["--resume=true", "--max_iters=25"])
    assert res.returncode == 0 and max(losses(res.stdout)) == 25, res.stdout


def test_a_checkpoint_missing_a_tensor_is_a_one_line_error_on_resume(corpus, monkeypatch, capsys):
    """A ckpt.pt of the right shape that lacks a tensor stops --resume with a one-line error naming it,
    not a traceback from load_state_dict."""
    monkeypatch.chdir(corpus.parent)
    args = TINY + [f"--data_path={corpus.name}"]
    assert run_main(capsys, args).returncode == 0
    state = load_ckpt("ckpt.pt")
    del state["model"]["ln_final.weight"]
    torch.save(state, "ckpt.pt")
    res = run_main(capsys, args + ["--resume=true"])
    assert res.returncode == 1, res
    assert "error: ckpt.pt does not fit this model" in res.stderr and "ln_final.weight" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
