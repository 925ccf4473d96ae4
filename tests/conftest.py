"""Shared helpers: a tiny corpus the tests write themselves, tiny model settings, and a CLI runner."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A few real ci lines; repeated with numbered titles they make a corpus with a small vocabulary.
POEM_LINES = [
    "春江潮水连海平，海上明月共潮生。",
    "往事知多少，小楼昨夜又东风。",
    "明月几时有，把酒问青天。",
    "大江东去，浪淘尽，千古风流人物。",
    "寻寻觅觅，冷冷清清，凄凄惨惨戚戚。",
]

# Settings small enough that a CPU run takes a second or two.
TINY = ["--n_layer=2", "--n_head=2", "--n_embed=32", "--block_size=16", "--batch_size=8",
        "--eval_iters=2", "--eval_interval=5", "--max_iters=10", "--max_new_token=12",
        "--dtype=float32", "--wandb_mode=disabled", "--dropout=0.0"]


def make_corpus(n_poems=60):
    poems = []
    for i in range(n_poems):
        lines = [POEM_LINES[(i + j) % len(POEM_LINES)] for j in range(3)]
        poems.append("\n".join([f"词牌{i % 7} 作者{i % 5}"] + lines))
    return "\n\n".join(poems) + "\n"


@pytest.fixture
def corpus(tmp_path):
    """Path of a small UTF-8 corpus in a fresh temporary directory (also the cwd of CLI runs)."""
    path = tmp_path / "poems.txt"
    path.write_text(make_corpus(), encoding="utf-8")
    return path


def run_cli(args, cwd, timeout=120, env=None, **kwargs):
    """Run `python babygpt.py ARGS` in cwd; returns the CompletedProcess (text mode)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", **(env or {})}
    full_env.pop("RANK", None)
    return subprocess.run([sys.executable, os.path.join(ROOT, "babygpt.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=full_env, **kwargs)
