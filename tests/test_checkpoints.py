"""Issue 4: checkpoints, exact resume, interrupts, atomic writes, `babygpt.py sample`, the exact
KV cache and the seed's model.pth files.

Every CLI run uses the tiny settings of conftest.TINY in a temporary directory.
"""

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import babygpt
import reference
from conftest import (TINY, FakeWandb, Running, babygpt_cmd, cli_env, load_ckpt, losses, make_corpus, one_line_error,
                      run_cli, snapshot, tiny)


def run_many(*jobs):
    """Independent CLI runs [(args, cwd), ...], two at a time (one per core); results in order."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda job: run_cli(*job), jobs))


DASHES = "-" * 10
CKPT_KEYS = {"model", "optimizer", "iter_num", "config", "chars", "best_val_loss", "rng"}


# -----------------------------------------------------------------------------
# helpers

def parse_samples(stdout, prompts, num_samples=1):
    """The samples `sample` printed, one list per prompt: each sample is followed by a line of
    dashes. Header lines before the first sample and lines in ASCII parentheses (the speed
    report) are skipped; neither "(" nor ")" is in the test vocabulary."""
    at = stdout.find(prompts[0]) if stdout.startswith(prompts[0]) else stdout.find("\n" + prompts[0]) + 1
    assert at >= 0 and stdout[at:].startswith(prompts[0]), f"no sample starts with {prompts[0]!r}:\n{stdout}"
    body = re.sub(r"^\(.*\)$\n?", "", stdout[at:], flags=re.M)
    parts = body.split("\n" + DASHES + "\n")
    assert parts[-1].strip() == "", f"text after the last line of dashes: {parts[-1]!r}"
    samples = parts[:-1]
    assert len(samples) == len(prompts) * num_samples, f"expected {len(prompts)} x {num_samples} samples:\n{stdout}"
    return [samples[i:i + num_samples] for i in range(0, len(samples), num_samples)]


def tiny_model(vocab_size, seed=0, cls=babygpt.BabyGPT):
    torch.manual_seed(seed)
    return cls(vocab_size, block_size=16, n_embed=32, n_head=2, n_layer=2, dropout=0.0).eval()


# -----------------------------------------------------------------------------
# checkpoint contents

def test_checkpoint_contents(trained):
    ckpt = load_ckpt(trained / "ckpt.pt")  # weights_only=True must accept it
    assert isinstance(ckpt, dict)
    missing = CKPT_KEYS - set(ckpt)
    assert not missing, f"ckpt.pt lacks {missing}"
    assert ckpt["iter_num"] == 10
    text = make_corpus()
    assert "".join(ckpt["chars"]) == "".join(sorted(set(text)))
    cfg = ckpt["config"]
    for key, value in (("n_layer", 2), ("n_head", 2), ("n_embed", 32), ("block_size", 16)):
        assert cfg[key] == value
    printed = losses((trained / "train.log").read_text(encoding="utf-8"))
    assert sorted(printed) == [0, 5, 10]
    best = min(float(val) for _, val in printed.values())
    assert ckpt["best_val_loss"] == pytest.approx(best, abs=6e-5)
    assert torch.is_tensor(ckpt["rng"]["cpu"])
    model = babygpt.BabyGPT(len(ckpt["chars"]), block_size=16, n_embed=32, n_head=2, n_layer=2)
    assert "state" in ckpt["optimizer"] and "param_groups" in ckpt["optimizer"]
    # AdamW moments for every parameter: the optimizer really is saved
    assert len(ckpt["optimizer"]["state"]) == len(list(model.parameters()))

    sd = load_ckpt(trained / "model.pth")
    assert all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()), \
        "model.pth must be a plain state_dict"
    model.load_state_dict(sd)
    ours = babygpt.upgrade_state_dict(sd)  # model.pth is in the seed's layout; ckpt.pt in ours
    assert ours.keys() == ckpt["model"].keys()
    for k in ours:  # model.pth is written after the final checkpoint, from the same weights
        assert torch.equal(ours[k], ckpt["model"][k]), k


# -----------------------------------------------------------------------------
# exact resume

def test_resume_with_other_shape_is_an_error(work):
    before = snapshot(work)
    proc = run_cli(tiny("--resume=true", "--max_iters=20", "--n_layer=3"), cwd=work)
    line = one_line_error(proc)
    assert "n_layer" in line
    assert snapshot(work) == before  # ckpt.pt and model.pth untouched (bytes and mtime)


# -----------------------------------------------------------------------------
# interrupts

LONG = ["--max_iters=1000000", "--eval_interval=100000"]


# -----------------------------------------------------------------------------
# atomic writes

def test_save_atomic_writes_and_leaves_no_temp_file(tmp_path, monkeypatch):
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


def test_save_atomic_keeps_old_file_when_disk_is_full(tmp_path, monkeypatch):
    path = tmp_path / "model.pth"
    old = {"w": torch.ones(3)}
    babygpt.save_atomic(old, str(path))
    old_bytes = path.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"\x00half a checkpoint" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    # an OSError, or babygpt's one-line UserError naming the file
    with pytest.raises((OSError, babygpt.UserError)) as info:
        babygpt.save_atomic({"w": torch.zeros(3)}, str(path))
    if isinstance(info.value, OSError):
        assert info.value.errno == errno.ENOSPC
    else:
        assert "model.pth" in str(info.value)
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert torch.equal(load_ckpt(path)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth"], "temporary file left behind"


# -----------------------------------------------------------------------------
# the sample command

def test_sample_from_checkpoint_without_corpus(work):
    (work / "poems.txt").unlink()  # the vocabulary comes from ckpt.pt
    before = snapshot(work)
    prompts = ["春", "春江潮水连海平"]  # different lengths
    args = ["sample", *tiny(), f"--prompts={','.join(prompts)}", "--max_new_token=20",
            "--temperature=0"]
    # model.pth would need the deleted corpus: success means the vocabulary came from ckpt.pt
    proc, again = run_many((args, work), (args, work))
    assert proc.returncode == 0, proc.stderr
    samples = parse_samples(proc.stdout, prompts)
    assert len(samples) == len(prompts)
    for prompt, group in zip(prompts, samples):
        assert len(group) == 1
        assert group[0].startswith(prompt)
        assert len(group[0]) == len(prompt) + 20
    assert snapshot(work) == before  # sampling writes nothing
    assert parse_samples(again.stdout, prompts) == samples  # greedy is deterministic


def test_sample_num_samples_and_top_k(work):
    # top_k=1 keeps only the most likely token: the same text as greedy decoding
    proc, top1, greedy = run_many(
        (["sample", *tiny(), "--prompts=往事,明月", "--max_new_token=15", "--num_samples=2",
          "--top_k=5", "--temperature=0.8"], work),
        (["sample", *tiny(), "--prompts=往事", "--max_new_token=15", "--top_k=1",
          "--temperature=1.0"], work),
        (["sample", *tiny(), "--prompts=往事", "--max_new_token=15", "--temperature=0"], work))
    assert proc.returncode == 0, proc.stderr
    samples = parse_samples(proc.stdout, ["往事", "明月"], num_samples=2)
    assert [len(g) for g in samples] == [2, 2]
    for prompt, group in zip(["往事", "明月"], samples):
        for s in group:
            assert s.startswith(prompt) and len(s) == len(prompt) + 15

    assert top1.returncode == 0 and greedy.returncode == 0, top1.stderr + greedy.stderr
    assert parse_samples(top1.stdout, ["往事"]) == parse_samples(greedy.stdout, ["往事"])


def test_sample_falls_back_to_model_pth(work):
    args = ["--prompts=春江,往事", "--max_new_token=20", "--temperature=0"]
    # no file at ckpt_path (the default ckpt.pt stays for the comparison run)
    from_ckpt, from_pth = run_many((["sample", *tiny(), *args], work),
                                   (["sample", *tiny(), *args, "--ckpt_path=gone.pt"], work))
    assert from_ckpt.returncode == 0, from_ckpt.stderr
    assert from_pth.returncode == 0, from_pth.stderr
    # model.pth holds the final weights, as does the final ckpt.pt: the same greedy text
    prompts = ["春江", "往事"]
    assert parse_samples(from_pth.stdout, prompts) == parse_samples(from_ckpt.stdout, prompts)
    # and without the corpus, model.pth alone (no vocabulary) is a clear error
    (work / "poems.txt").unlink()
    proc = run_cli(["sample", *tiny(), *args, "--ckpt_path=gone.pt"], cwd=work)
    assert "poems.txt" in one_line_error(proc)


def test_sample_asks_for_prompts_on_a_terminal(work):
    """With no prompts and a terminal on stdin, sample asks (请输入文字: ) until end of input."""
    import pty
    leader, follower = pty.openpty()
    proc = subprocess.Popen(babygpt_cmd("sample", *tiny(), "--prompts=", "--max_new_token=5"),
                            cwd=work, stdin=follower, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env())
    os.close(follower)
    os.write(leader, "明月\n雪\n春江\n".encode() + b"\x04")  # 雪 is not in the corpus
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(leader)
    assert proc.returncode == 0, err
    assert out.count("请输入文字: ") >= 3
    assert re.search(r"明月\S{5}\n-{10}", out) and re.search(r"春江\S{5}\n-{10}", out)
    assert "not in the vocabulary: 雪" in out
    assert re.search(r"tokens/sec", out)


def test_sample_without_prompts_and_without_terminal_is_an_error(work):
    proc = run_cli(["sample", *tiny(), "--prompts="], cwd=work, stdin=subprocess.DEVNULL)
    assert "prompts" in one_line_error(proc)


# -----------------------------------------------------------------------------
# exact KV cache

def _embedded_tokens(model):
    count = [0]
    handle = model.token_embedding_table.register_forward_hook(
        lambda mod, inp, out: count.__setitem__(0, count[0] + inp[0].numel()))
    return count, handle


@pytest.mark.parametrize("prompt_len,new", [(4, 8), (4, 50), (16, 10), (20, 30)],
                         ids=["short", "past_block", "full_block_prompt", "prompt_past_block"])
def test_kv_cache_greedy_is_exact(prompt_len, new):
    vocab = 40
    seed_model = tiny_model(vocab, seed=1, cls=reference.SeedGPT)
    model = babygpt.BabyGPT(vocab, block_size=16, n_embed=32, n_head=2, n_layer=2, dropout=0.0).eval()
    model.load_state_dict(seed_model.state_dict())  # the seed layout
    g = torch.Generator().manual_seed(prompt_len * 100 + new)
    idx = torch.randint(vocab, (2, prompt_len), generator=g)

    cached = model.generate(idx, new, temperature=0, kv_cache=True)
    plain = model.generate(idx, new, temperature=0, kv_cache=False)
    seed_out = seed_model.generate(idx, new, temperature=0)
    assert cached.shape == (2, prompt_len + new)
    assert torch.equal(cached[:, :prompt_len], idx)
    assert torch.equal(cached, plain), "KV cache changes greedy output"
    assert torch.equal(cached, seed_out), "greedy output differs from the seed model's"
    assert len(set(cached[:, prompt_len:].flatten().tolist())) > 1  # not a degenerate case


def test_kv_cache_is_used_while_text_fits():
    model = tiny_model(40, seed=2)
    idx = torch.randint(40, (2, 4), generator=torch.Generator().manual_seed(0))
    count, handle = _embedded_tokens(model)
    model.generate(idx, 10, temperature=0, kv_cache=True)
    with_cache = count[0]
    count[0] = 0
    model.generate(idx, 10, temperature=0, kv_cache=False)
    handle.remove()
    # with a cache each new token is embedded once: the prompt, then one token per step
    assert with_cache <= 2 * (4 + 10)
    assert count[0] > with_cache


# -----------------------------------------------------------------------------
# the seed's model.pth files

def seed_setup(folder):
    text = make_corpus()
    (folder / "poems.txt").write_text(text, encoding="utf-8")
    tok = babygpt.Tokenizer(text)
    seed_model = tiny_model(tok.vocab_size, seed=3, cls=reference.SeedGPT)
    torch.save(seed_model.state_dict(), folder / "model.pth")
    return tok, seed_model


def test_seed_state_dict_loads_exactly():
    seed_model = tiny_model(40, seed=4, cls=reference.SeedGPT)
    sd = seed_model.state_dict()
    assert any(".heads." in k for k in sd) and any("postion_embedding_table" in k for k in sd)
    model = babygpt.BabyGPT(40, block_size=16, n_embed=32, n_head=2, n_layer=2, dropout=0.0).eval()
    model.load_state_dict(sd)
    idx = torch.randint(40, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for T in (1, 7, 16):
            a, _ = seed_model(idx[:, :T])
            b, _ = model(idx[:, :T])
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_sample_with_seed_model_pth(tmp_path):
    tok, seed_model = seed_setup(tmp_path)
    prompts = ["春江", "往事"]
    proc = run_cli(["sample", *tiny(), "--prompts=春江,往事", "--max_new_token=25",
                    "--temperature=0"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    samples = parse_samples(proc.stdout, prompts)
    for prompt, group in zip(prompts, samples):
        idx = torch.tensor([tok.encode(prompt)])
        want = tok.decode(seed_model.generate(idx, 25, temperature=0)[0].tolist())
        assert group == [want]


def test_train_from_seed_model_pth(tmp_path):
    tok, seed_model = seed_setup(tmp_path)
    # a learning rate so small that one step leaves the weights as they were
    proc, fresh = run_many(
        (tiny("--init_from=model.pth", "--max_iters=1", "--eval_interval=1",
              "--learning_rate=1e-12", "--save_path=out.pth"), tmp_path),
        (tiny("--max_iters=1", "--eval_interval=1", "--learning_rate=1e-12",
              "--save_path=fresh.pth", "--ckpt_path=fresh.pt"), tmp_path))
    assert proc.returncode == 0, proc.stderr
    model = babygpt.BabyGPT(tok.vocab_size, block_size=16, n_embed=32, n_head=2, n_layer=2,
                            dropout=0.0).eval()
    model.load_state_dict(load_ckpt(tmp_path / "out.pth"))
    idx = torch.randint(tok.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], seed_model(idx)[0], rtol=1e-5, atol=1e-5)
    # the step-0 losses are those of the seed weights, not of a fresh model
    assert fresh.returncode == 0, fresh.stderr
    assert losses(proc.stdout)[0] != losses(fresh.stdout)[0]


# -----------------------------------------------------------------------------
# bad input: one line, exit 1, no traceback, nothing modified

OTHER_TEXT = "abcdefg hijklmn\nopq rst uvw xyz\n" * 40


def test_bad_input_cli(work):
    """Two bad inputs through a real process: exit status 1, one line, nothing modified."""
    data = (work / "ckpt.pt").read_bytes()
    (work / "ckpt.pt").write_bytes(data[:len(data) // 2])
    before = snapshot(work)
    truncated, negative = run_many((["sample", *tiny()], work),
                                   (["sample", *tiny(), "--temperature=-1"], work))
    assert "ckpt.pt" in one_line_error(truncated)
    assert "temperature" in one_line_error(negative)
    assert snapshot(work) == before


# -----------------------------------------------------------------------------
# wandb across a resume (in-process, with a stand-in for wandb: no network)

@pytest.mark.parametrize("mode", ["offline", "online"])
def test_resume_and_wandb_runs(corpus, monkeypatch, mode):
    """Online, a resumed training continues the same run; offline, each piece is a new run in
    the group named after the first piece's id, and its name says where it resumed."""
    folder = corpus.parent
    fake = FakeWandb(str(folder))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.chdir(folder)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    args = [a for a in tiny(data=corpus.name) if not a.startswith("--wandb_mode")] + [f"--wandb_mode={mode}"]
    assert babygpt.main([*args, "--max_iters=5"]) == 0
    assert babygpt.main([*args, "--max_iters=10", "--resume=true"]) == 0
    first, second = fake.inits
    assert first["group"] == first["id"]
    assert second["group"] == first["id"]
    if mode == "online":
        assert second["id"] == first["id"] and second["resume"] == "allow"
        assert "resumed" not in second["name"]
    else:
        assert second["id"] != first["id"] and not second.get("resume")
        assert second["name"].endswith("resumed at step 5")
    assert [m["iteration"] for m in fake.logged if "iteration" in m] == [0, 5, 10]
    assert all("step" not in kw for kw in fake.log_kwargs)  # never step=: it drops rows on resume


def test_an_offline_piece_is_never_continued_online(corpus, monkeypatch):
    """Its id exists only on this disk: continuing it online would collide when it is synced."""
    folder = corpus.parent
    fake = FakeWandb(str(folder))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.chdir(folder)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    args = [a for a in tiny(data=corpus.name) if not a.startswith("--wandb_mode")]
    assert babygpt.main([*args, "--max_iters=5", "--wandb_mode=offline"]) == 0
    assert babygpt.main([*args, "--max_iters=10", "--resume=true", "--wandb_mode=online"]) == 0
    first, second = fake.inits
    assert second["id"] != first["id"] and second["group"] == first["id"]
    assert second["name"].endswith("resumed at step 5")
