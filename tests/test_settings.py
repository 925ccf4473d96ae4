"""The constants at the top of babygpt.py, the presets, and the command line: --name=value, validation, --help."""

import os
import re
import subprocess
import sys

import pytest

import babygpt
from babygpt import UserError
from conftest import ROOT, STEP_RE, one_line_error, run_cli, run_main, same_files, snapshot, tiny


# -----------------------------------------------------------------------------
# The constants: the seed's defaults

def test_constants_are_the_seeds_defaults():
    """`python babygpt.py` with no settings trains the seed's model on the seed's schedule, not another one."""
    expected = dict(prompts=["春江", "往事"], max_new_token=100, max_iters=5000, eval_iters=100,
                    eval_interval=50, batch_size=64, block_size=256, learning_rate=3e-4,
                    n_embed=384, n_head=6, n_layer=6, dropout=0.2, train_data_ratio=0.9,
                    seed=42, data_path="ci.txt", save_path="model.pth", device="auto",
                    wandb_mode="auto", wandb_project="babygpt")
    for name, value in expected.items():
        assert getattr(babygpt, name) == value, name
        assert name in babygpt.CONFIG_KEYS, name
    model = babygpt.BabyGPT(10)  # a model built without a shape has the seed's
    assert model.block_size == 256 and len(model.blocks) == 6
    assert model.token_embedding_table.embedding_dim == 384 and model.blocks[0].sa.n_head == 6
    assert model.blocks[0].ffwd.net[3].p == 0.2


def test_import_does_nothing_but_define(tmp_path):
    """Importing babygpt from a notebook or another script starts no training, prints nothing and writes no file."""
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-c", "import babygpt; assert callable(babygpt.main)"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    assert os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# --name=value overrides and presets

def test_overrides_are_converted_and_echoed(capsys):
    """--max_iters=7 trains 7 steps (an int, not '7'), lists split on commas, booleans read true/false,
    the seed's spelling tain_data_ratio works, and every override is echoed."""
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
    """--preset=cpu gives the small model fitted to 10 minutes, and a setting typed next to it wins in any order."""
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


# -----------------------------------------------------------------------------
# A command line that cannot be read

BAD_ARGS = [
    (["--bogus=1"], ["--bogus", "valid:", "max_iters", "learning_rate", "prompts", "data_path", "wandb_mode", "dtype"]),
    (["--learing_rate=1e-3"], ["--learing_rate", "valid:", "learning_rate"]),
    (["--max_iters=abc"], ["--max_iters", "integer", "'abc'"]),
    (["--max_iters=1.5"], ["--max_iters", "integer"]),
    (["--learning_rate=fast"], ["--learning_rate", "number", "'fast'"]),
    (["--resume=maybe"], ["--resume", "true or false"]),
    (["--max_iters", "5"], ["--max_iters", "--name=value"]),
    (["--max_iters"], ["--max_iters", "--name=value"]),
    (["-max_iters=5"], ["-max_iters=5", "--name=value"]),
    (["--=5"], ["--name=value"]),
    (["sample"], ["'sample'", "--name=value"]),  # a command after the settings
    (["trian"], ["'trian'", "train", "sample"]),
    (["max_iters=5"], ["max_iters=5", "train", "sample"]),
    (["--preset=gpu"], ["'gpu'", "cpu"]),
    (["--lr_schedule=linear"], ["lr_schedule", "constant", "cosine"]),
    (["--wandb_mode=on"], ["wandb_mode", "online", "offline", "disabled"]),
]


@pytest.mark.parametrize("args,needles", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_command_line(work, capsys, args, needles):
    """A typo on the command line stops with one line naming the setting and what it expects, before
    anything is read or written."""
    before = snapshot(work)
    res = run_main(capsys, args + tiny() if args[0] in ("trian", "max_iters=5") else tiny() + args)
    one_line_error(res, *needles)
    assert not STEP_RE.search(res.stdout)
    same_files(before, snapshot(work))


def test_bad_command_line_from_a_shell(work):
    """From a shell, a bad value exits with status 1 and one line, not a traceback."""
    before = snapshot(work)
    proc = run_cli(["--max_iters=many"], cwd=work)
    one_line_error(proc, "--max_iters", "integer")
    same_files(before, snapshot(work))


# -----------------------------------------------------------------------------
# Values that cannot work: the message names the setting, its rule and the value given

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
    (["--grad_accum_steps=0"], ["grad_accum_steps", "at least 1"]),
    (["--grad_accum_steps=3"], ["batch_size", "divisible", "grad_accum_steps"]),  # 8 rows in 3 micro-batches
    (["--train_data_ratio=0"], ["train_data_ratio", "between 0 and 1"]),
    (["--train_data_ratio=1"], ["train_data_ratio", "between 0 and 1"]),
    (["--train_data_ratio=1.5"], ["train_data_ratio", "between 0 and 1"]),
    (["--train_data_ratio=-0.1"], ["train_data_ratio", "between 0 and 1"]),
    (["--dropout=1"], ["dropout", "[0, 1)"]),
    (["--dropout=-0.1"], ["dropout", "[0, 1)"]),
    (["--dropout=2.5"], ["dropout", "[0, 1)"]),
    (["--learning_rate=-1"], ["learning_rate", "0 or more"]),
    (["--learning_rate=0"], ["learning_rate", "positive"]),
    (["--temperature=-1"], ["temperature", "0 or more"]),
    (["--warmup_iters=20", "--lr_schedule=cosine"], ["warmup_iters", "max_iters=10"]),
    (["--warmup_iters=5", "--lr_decay_iters=3"], ["lr_decay_iters", "warmup_iters=5"]),
]


# every row through `train`; the model-shape rows also through `sample`
CONSTANT_CASES = [("train", a, n) for a, n in BAD_CONSTANTS] + [
    ("sample", a, n) for a, n in BAD_CONSTANTS
    if a[0].split("=")[0] in ("--n_embed", "--n_head", "--n_layer", "--block_size", "--dropout")]


@pytest.mark.parametrize("command,args,needles", CONSTANT_CASES,
                         ids=[f"{c}:{' '.join(a)}" for c, a, _ in CONSTANT_CASES])
def test_bad_constant(work, capsys, command, args, needles):
    """An impossible value (n_head not dividing n_embed, a ratio of 1.5, ...) stops with one line naming
    it, its rule and the value given, before any training."""
    before = snapshot(work)
    cmd = ["sample"] if command == "sample" else []
    res = run_main(capsys, cmd + tiny(*args))
    line = one_line_error(res, *needles)
    assert re.search(r"\(got -?[\d.]+\)|\(\d+\)", line), f"the current value is not named: {line}"
    assert not STEP_RE.search(res.stdout)
    same_files(before, snapshot(work))


@pytest.mark.parametrize("name,bad", [("dtype", v) for v in ("float64", "fp16", "half", "bf16", "int8", "")]
                         + [("compile_mode", v) for v in ("fast", "Default", "reduce_overhead", "")])
def test_unknown_dtype_or_compile_mode_is_refused(name, bad):
    """--dtype=fp16 or --compile_mode=fast is refused with the valid choices, not trained with a guess."""
    _, cfg = babygpt.parse_args([f"--{name}={bad}"])
    with pytest.raises(UserError, match=f"{name} must be one of"):
        babygpt.validate_config(cfg)


def test_every_listed_dtype_and_compile_mode_is_accepted():
    """Each dtype and compile mode a user may type is accepted."""
    modes = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    for name, values in (("dtype", ("auto", "float32", "bfloat16", "float16")), ("compile_mode", modes)):
        for value in values:
            _, cfg = babygpt.parse_args([f"--{name}={value}"])
            babygpt.validate_config(cfg)


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_graph_modes_refuse_gradient_accumulation(mode):
    """compile_mode=reduce-overhead with grad_accum_steps=2 stops at once with the fix, instead of training
    wrongly under CUDA graphs."""
    _, cfg = babygpt.parse_args([f"--compile_mode={mode}", "--grad_accum_steps=2"])
    with pytest.raises(UserError, match="grad_accum_steps=1 or compile_mode=default"):
        babygpt.validate_config(cfg)
    _, cfg = babygpt.parse_args([f"--compile_mode={mode}"])
    babygpt.validate_config(cfg)


# -----------------------------------------------------------------------------
# --help

def test_help_shows_settings_as_typed_with_their_meaning(capsys):
    """--help lists every setting as it is typed (true, 春江,往事, 5000) with its comment, the presets, and exits 0."""
    with pytest.raises(SystemExit) as info:
        babygpt.parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--max_iters=5000" in out and "--prompts=春江,往事" in out
    assert "--resume=false" in out and "--kv_cache=true" in out
    assert "['春江'" not in out and "True" not in out  # no Python reprs
    for name in babygpt.CONFIG_KEYS:  # every setting, with its default and its constant's comment
        line = next(l for l in out.splitlines() if l.strip().startswith(f"--{name}="))
        assert len(line.split(None, 1)) == 2, f"--{name} has no explanation: {line!r}"
    assert "presets: cpu (" in out


def test_help_still_lists_every_setting_when_the_source_cannot_be_read(monkeypatch, capsys):
    """--help from a copy whose babygpt.py cannot be read (bytecode only) still lists every setting and default."""
    monkeypatch.setattr(babygpt, "__file__", "/nonexistent/babygpt.py")
    with pytest.raises(SystemExit):
        babygpt.parse_args(["--help"])
    out = capsys.readouterr().out
    assert all(f"--{name}=" in out for name in babygpt.CONFIG_KEYS), out
    assert "--max_iters=5000" in out
