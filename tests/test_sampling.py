"""Sampling: generate_texts and the `sample` command (from ckpt.pt or model.pth, with given or typed prompts)."""

import os
import re
import subprocess

import torch

import babygpt
import reference
from conftest import (babygpt_cmd, cli_env, make_corpus, one_line_error, parse_samples, run_cli, run_main, show,
                      snapshot, tiny)


def test_generate_texts_passes_temperature_and_top_k_to_the_model():
    """--temperature=0, and --top_k=1 at temperature 1, both write the seed model's greedy text; plain
    sampling writes other texts for other draws."""
    vocab = 12
    torch.manual_seed(3)
    ref = reference.SeedGPT(vocab, block_size=8, n_embed=16, n_head=2, n_layer=1, dropout=0.0).eval()
    model = babygpt.BabyGPT(vocab, block_size=8, n_embed=16, n_head=2, n_layer=1, dropout=0.0)
    model.load_state_dict(babygpt.fused_layout(ref.state_dict()))
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


def sample_here(capsys, monkeypatch, work, *runs):
    """`python babygpt.py ARGS` for each ARGS in runs, in this process (no torch import each time), in `work`."""
    monkeypatch.chdir(work)
    return [run_main(capsys, args) for args in runs]


def test_sample_from_checkpoint_without_corpus(work, capsys, monkeypatch):
    """`sample` needs only ckpt.pt (its vocabulary is inside), writes nothing, and greedy prompts of
    different lengths give the same texts every time."""
    (work / "poems.txt").unlink()
    before = snapshot(work)
    prompts = ["春", "春江潮水连海平"]  # different lengths
    args = ["sample", *tiny(), f"--prompts={','.join(prompts)}", "--max_new_token=20", "--temperature=0"]
    proc, again = sample_here(capsys, monkeypatch, work, args, args)
    assert proc.returncode == 0, proc.stderr
    samples = parse_samples(proc.stdout, prompts)
    assert len(samples) == len(prompts)
    for prompt, group in zip(prompts, samples):
        assert len(group) == 1
        assert group[0].startswith(prompt)
        assert len(group[0]) == len(prompt) + 20
    assert snapshot(work) == before  # sampling writes nothing
    assert parse_samples(again.stdout, prompts) == samples  # greedy is deterministic


def test_sample_num_samples_and_top_k(work, capsys, monkeypatch):
    """--num_samples=2 prints two texts per prompt of max_new_token characters each, and --top_k=1 writes
    the greedy text."""
    proc, top1, greedy = sample_here(
        capsys, monkeypatch, work,
        ["sample", *tiny(), "--prompts=往事,明月", "--max_new_token=15", "--num_samples=2", "--top_k=5",
         "--temperature=0.8"],
        ["sample", *tiny(), "--prompts=往事", "--max_new_token=15", "--top_k=1", "--temperature=1.0"],
        ["sample", *tiny(), "--prompts=往事", "--max_new_token=15", "--temperature=0"])
    assert proc.returncode == 0, proc.stderr
    samples = parse_samples(proc.stdout, ["往事", "明月"], num_samples=2)
    assert [len(g) for g in samples] == [2, 2]
    for prompt, group in zip(["往事", "明月"], samples):
        for s in group:
            assert s.startswith(prompt) and len(s) == len(prompt) + 15
    assert top1.returncode == 0 and greedy.returncode == 0, top1.stderr + greedy.stderr
    assert parse_samples(top1.stdout, ["往事"]) == parse_samples(greedy.stdout, ["往事"])


def test_sample_falls_back_to_model_pth(work, capsys, monkeypatch):
    """With --ckpt_path= (empty) `sample` skips ckpt.pt and writes from model.pth the same greedy text as from the
    final ckpt.pt; without ckpt.pt and the corpus, one line says which text it needs."""
    args = ["--prompts=春江,往事", "--max_new_token=20", "--temperature=0"]
    from_ckpt, from_pth = sample_here(capsys, monkeypatch, work, ["sample", *tiny(), *args],
                                      ["sample", *tiny(), *args, "--ckpt_path="])
    assert from_ckpt.returncode == 0, from_ckpt.stderr
    assert from_pth.returncode == 0, from_pth.stderr
    assert "sampling from model.pth" in from_pth.stdout
    prompts = ["春江", "往事"]
    assert parse_samples(from_pth.stdout, prompts) == parse_samples(from_ckpt.stdout, prompts)
    (work / "poems.txt").unlink()
    proc, = sample_here(capsys, monkeypatch, work, ["sample", *tiny(), *args, "--ckpt_path=gone.pt"])
    assert "poems.txt" in one_line_error(proc)


def test_sample_says_when_ckpt_pt_is_an_unfinished_runs_beside_a_model_pth(work, capsys, monkeypatch):
    """ckpt.pt, read first, may be a later run's that stopped early while model.pth holds a finished one: sample
    says so and how to read model.pth. A finished run's ckpt.pt, or one without a model.pth, gets no such note."""
    args = ["sample", *tiny(), "--prompts=春江", "--max_new_token=5", "--temperature=0"]
    finished, = sample_here(capsys, monkeypatch, work, args)
    assert finished.returncode == 0 and "note:" not in finished.stdout, show(finished)
    state = torch.load(work / "ckpt.pt", weights_only=True)
    state["config"]["max_iters"] = state["iter_num"] + 100  # as a run stopped before its last step
    torch.save(state, work / "ckpt.pt")
    unfinished, = sample_here(capsys, monkeypatch, work, args)
    assert unfinished.returncode == 0, show(unfinished)
    assert "note: ckpt.pt is an unfinished run's; --ckpt_path= samples model.pth instead" in unfinished.stdout
    (work / "model.pth").unlink()
    alone, = sample_here(capsys, monkeypatch, work, args)
    assert alone.returncode == 0 and "note:" not in alone.stdout, show(alone)


def test_sample_asks_for_prompts_on_a_terminal(work):
    """With no prompts on a terminal, `sample` asks (请输入文字: ) until Ctrl-D; an empty line asks again and a
    character it never saw gets a hint instead of a crash."""
    import pty
    leader, follower = pty.openpty()
    proc = subprocess.Popen(babygpt_cmd("sample", *tiny(), "--prompts=", "--max_new_token=5"),
                            cwd=work, stdin=follower, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env())
    os.close(follower)
    os.write(leader, "明月\n\n雪\n春江\n".encode() + b"\x04")  # 雪 is not in the corpus
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(leader)
    assert proc.returncode == 0, err
    assert out.count("请输入文字: ") >= 4
    assert re.search(r"明月\S{5}\n-{10}", out) and re.search(r"春江\S{5}\n-{10}", out)
    assert "not in the vocabulary: 雪" in out
    assert re.search(r"tokens/sec", out)


def test_sample_without_prompts_and_without_terminal_is_an_error(work):
    """`sample --prompts=` in a pipe or a job says how to give prompts, instead of waiting for input forever."""
    proc = run_cli(["sample", *tiny(), "--prompts="], cwd=work, stdin=subprocess.DEVNULL)
    assert "prompts" in one_line_error(proc)


def test_sample_builds_a_model_pth_with_the_head_count_it_was_trained_with(tmp_path, capsys, monkeypatch):
    """A learner who trained with --n_head=4 and samples without it (the setting says 2) still gets the model
    they trained: model.pth's per-head keys say 4, and its text is the text ckpt.pt's model writes."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "poems.txt").write_text(make_corpus(), encoding="utf-8")
    assert run_main(capsys, tiny("--n_head=4", "--learning_rate=1e-2", "--max_iters=30")).returncode == 0
    args = ["--prompts=春江,往事", "--max_new_token=30", "--temperature=0"]
    from_ckpt, from_pth = sample_here(capsys, monkeypatch, tmp_path, ["sample", *tiny(), *args],
                                      ["sample", *tiny(), *args, "--ckpt_path=gone.pt"])
    assert from_pth.returncode == 0, show(from_pth)
    assert "sampling from model.pth: vocab_size=" in from_pth.stdout and "n_head=4" in from_pth.stdout, show(from_pth)
    prompts = ["春江", "往事"]
    assert parse_samples(from_pth.stdout, prompts) == parse_samples(from_ckpt.stdout, prompts)
