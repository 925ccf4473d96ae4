"""Weights & Biases: starting, naming and grouping runs across resumes, what they log, failures that never stop one."""

import glob
import json
import os
import re
import subprocess
import sys
import time
import types

import pytest
import torch

import babygpt
from conftest import (AUTO_ARGS, STEP_RE, FakeWandb, babygpt_cmd, cli_env, install_fake_wandb, load_ckpt, run_cli,
                      run_main, show, succeeded, tiny, tiny_wandb, winners)

PHASE_LINE = re.compile(r"^total (\d+\.\d)s: start-up (\d+\.\d)s, compile (\d+\.\d)s, training (\d+\.\d)s, "
                        r"evaluation (\d+\.\d)s, checkpoints (\d+\.\d)s, generation and saving (\d+\.\d)s$")


def run_with_fake_wandb(corpus, monkeypatch, *extra, mode="offline"):
    fake = install_fake_wandb(monkeypatch, corpus.parent)
    monkeypatch.chdir(corpus.parent)
    assert babygpt.main(tiny_wandb(*extra, mode=mode, data=corpus.name)) == 0
    return fake


# -----------------------------------------------------------------------------
# What a run logs

def test_auto_logs_online_only_when_logged_in(tmp_path, monkeypatch):
    """wandb_mode=auto logs online with an API key or a netrc login, offline otherwise, and WANDB_MODE (dryrun,
    disabled) is obeyed; an explicit --wandb_mode wins."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    mode = lambda setting="auto": babygpt.choose_wandb_mode(types.SimpleNamespace(wandb_mode=setting))
    assert mode() == "offline"  # no key, no ~/.netrc
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert mode() == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com/")
    assert mode() == "offline"  # logged in elsewhere only
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert mode() == "online" and mode("offline") == "offline" and mode("disabled") is None
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert mode() is None and mode("online") == "online"


def test_wandb_run_name_tags_code_and_step_metric(corpus, monkeypatch):
    """The dashboard names the run by its shape, data and device, tags its dtype, keeps the code, and charts
    everything against the training step (never step=, which drops rows after a resume)."""
    fake = run_with_fake_wandb(corpus, monkeypatch)
    init = fake.inits[0]
    assert init["name"] == "2L-32 poems.txt cpu"
    assert init["tags"] == ["cpu", "float32"] and init["save_code"] is True
    assert (("iteration",), {}) in fake.metrics
    assert (("*",), {"step_metric": "iteration"}) in fake.metrics
    assert (("val_loss",), {"step_metric": "iteration", "summary": "min"}) in fake.metrics
    assert all(not kw for kw in fake.log_kwargs)


def test_samples_are_logged_as_a_table_at_the_first_last_and_every_interval(corpus, monkeypatch, capsys):
    """Generated samples appear in wandb as one growing table, at the first evaluation, every sample_interval
    steps and the last; the terminal shows only the final generation."""
    fake = run_with_fake_wandb(corpus, monkeypatch, "--max_iters=20", "--sample_interval=10",
                               "--prompts=春江,往事", "--max_new_token=6")
    tables = [(m["iteration"], m["samples"]) for m in fake.logged if "samples" in m]
    assert [it for it, _ in tables] == [0, 10, 20]
    last = tables[-1][1]
    assert last.columns == ["iteration", "prompt", "text"]
    assert [(r[0], r[1]) for r in last.data] == [(it, p) for it in (0, 10, 20) for p in ("春江", "往事")]
    assert all(r[2].startswith(r[1]) and len(r[2]) == len(r[1]) + 6 for r in last.data)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("春江")]
    assert len(printed) == 1  # only the seed's final generation


def test_samples_do_not_change_the_training(corpus, monkeypatch, capsys):
    """Logging samples to wandb leaves the losses of the run exactly as without wandb."""
    run_with_fake_wandb(corpus, monkeypatch, "--dropout=0.1", "--sample_interval=5")
    with_samples = [l.split(", speed")[0] for l in capsys.readouterr().out.splitlines() if l.startswith("step ")]
    assert babygpt.main(tiny("--dropout=0.1", "--ckpt_path=b.pt", "--save_path=b.pth", data=corpus.name)) == 0
    without = [l.split(", speed")[0] for l in capsys.readouterr().out.splitlines() if l.startswith("step ")]
    assert with_samples == without and len(without) == 3


def test_time_figures_go_to_the_wandb_summary(corpus, monkeypatch, capsys):
    """The run's summary in wandb holds the phase figures the closing line printed."""
    fake = run_with_fake_wandb(corpus, monkeypatch)
    last = capsys.readouterr().out.rstrip("\n").split("\n")[-1]
    m = PHASE_LINE.match(last)
    assert m, last
    summary = fake.summaries[-1]
    names = ["total"] + [f"time/{p}" for p in babygpt.PhaseClock.PHASES]
    printed = dict(zip(names, (float(x) for x in m.groups())))
    assert summary["time/total"] == pytest.approx(printed.pop("total"), abs=0.051)
    assert {k: round(summary[k], 1) for k in printed} == pytest.approx(printed, abs=0.11)


def fitted_offline_run(corpus, monkeypatch, capsys):
    """A max_minutes run logged offline, whose probe picks bfloat16 and whose fits give 100, then 120 steps."""
    monkeypatch.setattr(babygpt, "probe_dtypes", winners(*[torch.bfloat16] * 10))
    counts = iter([100, 120, 120, 120, 120, 120, 120])
    monkeypatch.setattr(babygpt, "fit_steps", lambda cfg, *rest: setattr(cfg, "max_iters", next(counts)))
    args = [a for a in AUTO_ARGS if not a.startswith("--wandb_mode")] + [
        f"--data_path={corpus.name}", "--max_minutes=1", "--eval_interval=20", "--wandb_mode=offline"]
    return run_main(capsys, args)


def test_ckpt_and_wandb_config_hold_the_values_used(corpus, monkeypatch, capsys):
    """The dashboard and ckpt.pt show the dtype the run trained in and the step count it was finally fitted to,
    never 'auto' or the first estimate."""
    monkeypatch.chdir(corpus.parent)
    fake = install_fake_wandb(monkeypatch, corpus.parent)
    res = fitted_offline_run(corpus, monkeypatch, capsys)
    assert res.returncode == 0, show(res)
    assert fake.inits[0]["config"]["dtype"] == "bfloat16" and fake.inits[0]["config"]["max_iters"] == 100
    assert fake.configs[0]["dtype"] == "bfloat16" and fake.configs[0]["max_iters"] == 120  # updated on re-fit
    state = load_ckpt("ckpt.pt")
    assert state["config"]["dtype"] == "bfloat16" and state["config"]["max_iters"] == state["iter_num"] == 120
    assert set(state["measured"]) == {"dtype", "max_iters"}


# -----------------------------------------------------------------------------
# Runs across resumes

def test_an_online_resume_continues_the_same_run(corpus, monkeypatch):
    """Online, a resumed training continues its own run (same id, resume='allow'), without repeating a step."""
    fake = install_fake_wandb(monkeypatch, corpus.parent)
    monkeypatch.chdir(corpus.parent)
    args = tiny_wandb(mode="online", data=corpus.name)
    assert babygpt.main([*args, "--max_iters=5"]) == 0
    assert babygpt.main([*args, "--max_iters=10", "--resume=true"]) == 0
    first, second = fake.inits
    assert first["group"] == first["id"] == second["id"] == second["group"]
    assert second["resume"] == "allow" and "resumed" not in second["name"]
    assert [m["iteration"] for m in fake.logged if "iteration" in m] == [0, 5, 10]


def test_three_offline_pieces_share_one_group_and_one_sync_command(corpus, monkeypatch, capsys):
    """A training resumed twice offline is three runs in the first one's group, each named where it resumed, no
    step logged twice, and one `wandb sync` command uploads all three."""
    fake = install_fake_wandb(monkeypatch, corpus.parent)
    monkeypatch.chdir(corpus.parent)
    outs = []
    for i, end in enumerate((5, 10, 15)):
        res = run_main(capsys, tiny_wandb(f"--max_iters={end}", *(["--resume=true"] if i else []), data=corpus.name))
        assert res.returncode == 0, show(res)
        outs.append(res.stdout)
    ids = [init["id"] for init in fake.inits]
    assert len(set(ids)) == 3
    assert [init["group"] for init in fake.inits] == [ids[0]] * 3
    assert not fake.inits[0].get("resume") and not fake.inits[1].get("resume")
    assert [init["name"].endswith(f"resumed at step {s}") for init, s in zip(fake.inits, (0, 5, 10))] == \
        [False, True, True]
    sync = re.search(r"wandb sync (.*)$", outs[2], re.M)[1].split()
    assert sync == [f"wandb/offline-run-{i}" for i in ids]
    iterations = [row["iteration"] for row in fake.logged if "val_loss" in row]
    assert iterations == [0, 5, 10, 15]


def test_an_offline_piece_is_never_continued_online(corpus, monkeypatch):
    """A piece logged offline, resumed online, starts a new run in its group: continuing its id, which exists
    only on this disk, would collide when synced."""
    fake = install_fake_wandb(monkeypatch, corpus.parent)
    monkeypatch.chdir(corpus.parent)
    assert babygpt.main(tiny_wandb("--max_iters=5", mode="offline", data=corpus.name)) == 0
    assert babygpt.main(tiny_wandb("--max_iters=10", "--resume=true", mode="online", data=corpus.name)) == 0
    first, second = fake.inits
    assert second["id"] != first["id"] and second["group"] == first["id"]
    assert second["name"].endswith("resumed at step 5")


def test_offline_resume_is_two_runs_in_one_group_with_their_sample_tables(corpus):
    """With the real wandb offline, an interrupted-and-resumed training leaves two run folders, the second grouped
    under the first, each with its own sample tables, and one command uploads both."""
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
    sync = re.search(r"upload every piece of this training later with: wandb sync (.+)$", second.stdout, re.M)
    assert sync, second.stdout
    assert [os.path.basename(p) for p in sync[1].split()] == [os.path.basename(r) for r in runs]
    assert "wandb leet" in first.stdout


# -----------------------------------------------------------------------------
# Failures: never allowed to stop training

def test_wandb_failures_in_logging_never_stop_training(corpus, monkeypatch, capsys):
    """When wandb's table or logging calls fail mid-run, one warning each and the run trains and saves to the end."""
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
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.chdir(corpus.parent)
    res = run_main(capsys, tiny_wandb(data=corpus.name))
    assert res.returncode == 0, show(res)
    assert res.stderr.count("warning: wandb samples failed (table service down)") == 1, res.stderr
    assert res.stderr.count("warning: wandb logging failed (gone); continuing without it") == 1, res.stderr
    assert "step 10:" in res.stdout and "模型已保存到model.pth" in res.stdout


def test_wandb_that_cannot_set_its_x_axis_never_stops_training(corpus, monkeypatch, capsys):
    """When define_metric fails right after wandb.init, that attempt failed: one warning, no offline folder to sync
    printed or kept in ckpt.pt, nothing logged, and the run trains, prints and saves."""
    fake = install_fake_wandb(monkeypatch, corpus.parent)
    real_init = fake.init

    def init(**kw):
        run = real_init(**kw)
        run.define_metric = lambda *a, **k: (_ for _ in ()).throw(ValueError("bad metric"))
        return run
    fake.init = init
    monkeypatch.chdir(corpus.parent)
    res = run_main(capsys, tiny_wandb(data=corpus.name))
    assert res.returncode == 0, show(res)
    assert res.stderr.strip().splitlines() == ["warning: wandb offline failed (bad metric); metrics are printed only"]
    assert "wandb sync" not in res.stdout and load_ckpt(corpus.parent / "ckpt.pt")["wandb_offline_dirs"] == []
    assert fake.logged == [] and "step 10:" in res.stdout and "模型已保存到model.pth" in res.stdout


def test_an_online_run_whose_set_up_fails_is_closed_before_logging_offline(corpus, monkeypatch, capsys):
    """When the online run starts but its charts cannot be set up, it is closed (else wandb.init would hand it back)
    and a new offline run logs the metrics."""
    fake = install_fake_wandb(monkeypatch, corpus.parent)
    real_init, closed = fake.init, []
    fake.finish = lambda exit_code=None: closed.append(exit_code)

    def init(**kw):
        run = real_init(**kw)
        if kw["mode"] == "online":
            run.define_metric = lambda *a, **k: (_ for _ in ()).throw(ValueError("bad metric"))
        return run
    fake.init = init
    monkeypatch.chdir(corpus.parent)
    res = run_main(capsys, tiny_wandb(data=corpus.name, mode="online"))
    assert res.returncode == 0, show(res)
    assert res.stderr.strip().splitlines() == ["warning: wandb online failed (bad metric); logging offline instead"]
    assert closed == [1] and [i["mode"] for i in fake.inits] == ["online", "offline"] and fake.logged, show(res)


def test_wandb_that_cannot_start_never_stops_training(corpus, monkeypatch, capsys):
    """When wandb cannot start online nor offline, two warnings say so and the run trains, prints and saves."""
    fake = install_fake_wandb(monkeypatch, corpus.parent)

    def init(**kwargs):
        raise RuntimeError("no network")
    fake.init = init
    monkeypatch.chdir(corpus.parent)
    res = run_main(capsys, tiny_wandb(mode="online", data=corpus.name))
    assert res.returncode == 0, show(res)
    assert res.stderr.strip().splitlines() == [
        "warning: wandb online failed (no network); logging offline instead",
        "warning: wandb offline failed (no network); metrics are printed only"], show(res)
    assert "step 10:" in res.stdout and "模型已保存到model.pth" in res.stdout


@pytest.mark.parametrize("broken", ["config", "finish"])
def test_wandb_that_cannot_record_a_re_fit_or_finish_never_stops_training(corpus, monkeypatch, capsys, broken):
    """When wandb refuses the re-fitted step count, or cannot finish the run, one warning says so and the run
    trains to its re-fitted end and saves."""
    monkeypatch.chdir(corpus.parent)
    fake = install_fake_wandb(monkeypatch, corpus.parent)
    real_init = fake.init

    def fail(error):
        def call(*args, **kwargs):
            raise error
        return call

    def init(**kwargs):
        run = real_init(**kwargs)
        if broken == "config":
            run.config = types.SimpleNamespace(update=fail(RuntimeError("config locked")))
        else:
            run.finish = fail(ConnectionError("gone"))
        return run
    fake.init = init
    res = fitted_offline_run(corpus, monkeypatch, capsys)
    assert res.returncode == 0, show(res)
    warning = {"config": "warning: wandb config update failed (config locked); continuing without it",
               "finish": "warning: wandb could not finish the run (gone)"}[broken]
    assert res.stderr.strip().splitlines() == [warning], show(res)
    assert "step 120:" in res.stdout and "模型已保存到model.pth" in res.stdout


def test_wandb_not_installed(work, capsys, monkeypatch):
    """Without wandb installed a run trains, prints its metrics and says once how to install it."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    fake = work / "fake_site"
    (fake / "wandb").mkdir(parents=True)
    (fake / "wandb" / "__init__.py").write_text("raise ImportError('No module named wandb')\n")
    monkeypatch.syspath_prepend(str(fake))
    for name in [m for m in sys.modules if m == "wandb" or m.startswith("wandb.")]:
        monkeypatch.delitem(sys.modules, name)
    res = run_main(capsys, tiny("--wandb_mode=auto"))
    succeeded(res)
    assert STEP_RE.search(res.stdout), res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "pip install wandb" in lines[0], show(res)
    assert not (work / "wandb").exists()


def _run_wandb(folder, args, extra, cmd=None):
    """`python babygpt.py ARGS` (or `cmd`) with no wandb login, no wandb settings in the environment, then `extra`."""
    home = folder / "home"
    home.mkdir()
    env = {"HOME": str(home), "WANDB_API_KEY": "", "WANDB_MODE": "", "NETRC": str(home / ".netrc"),
           "WANDB_BASE_URL": "", "WANDB_DIR": "", "WANDB_CONFIG_DIR": "", "WANDB_SILENT": "true", **extra}
    env = {k: v for k, v in cli_env(env).items() if v != ""}  # an empty value means unset
    t0 = time.time()
    proc = subprocess.run(cmd or babygpt_cmd(*args), cwd=folder, capture_output=True, text=True, timeout=120, env=env)
    return proc, time.time() - t0


def _offline_runs(folder):
    runs = sorted((folder / "wandb").glob("offline-run-*"))
    assert runs, f"no offline run folder in {folder / 'wandb'}"
    data = b"".join(p.read_bytes() for p in runs[-1].glob("*.wandb"))
    assert b"val_loss" in data, "the metrics were not kept in the offline run"
    return runs


def test_wandb_not_logged_in(corpus):
    """Not logged in, the default logs offline, with one line saying how to upload it later."""
    folder = corpus.parent
    proc, seconds = _run_wandb(folder, tiny("--wandb_mode=auto"), {})
    succeeded(proc)
    assert seconds < 60 and STEP_RE.search(proc.stdout), proc.stdout
    runs = _offline_runs(folder)
    wandb_lines = [ln for ln in (proc.stdout + proc.stderr).splitlines()
                   if "wandb" in ln.lower() and not ln.startswith("override:")]
    assert len(wandb_lines) == 1, f"expected one line about wandb, got {wandb_lines}"
    assert f"wandb sync wandb/{runs[-1].name}" in wandb_lines[0], wandb_lines[0]


# python babygpt.py ARGS, which sends itself a Ctrl-C right after saying that model.pth is saved
CTRL_C_AFTER_SAVE = """
import builtins, os, runpy, signal
print_ = builtins.print
def print(*args, **kwargs):
    print_(*args, **kwargs)
    if args and str(args[0]).startswith("模型已保存到"):
        os.kill(os.getpid(), signal.SIGINT)
builtins.print = print
runpy.run_path({script!r}, run_name="__main__")
"""


def test_a_ctrl_c_after_model_pth_is_written_keeps_the_offline_run(corpus):
    """A Ctrl-C once model.pth is written exits 0 at once, and wandb still closes its offline run with every
    metric in it (the quick exit that skips interpreter teardown must not skip wandb's)."""
    folder = corpus.parent
    cmd = [sys.executable, "-c", CTRL_C_AFTER_SAVE.format(script=os.path.abspath(babygpt.__file__)),
           *tiny("--wandb_mode=offline")]
    proc, _ = _run_wandb(folder, [], {}, cmd=cmd)
    assert proc.returncode == 0 and "interrupted; files on disk are intact" in proc.stderr, show(proc)
    _offline_runs(folder)


def test_wandb_server_unreachable(corpus):
    """With the wandb server unreachable the run waits only WANDB_INIT_TIMEOUT, warns once, and logs offline."""
    folder = corpus.parent
    proc, seconds = _run_wandb(folder, tiny("--wandb_mode=online"), {
        "WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567",
        "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_INIT_TIMEOUT": "2"})
    succeeded(proc)
    assert seconds < 30, f"training took {seconds:.0f}s to start and finish (babygpt's default wait is 30 s)"
    assert STEP_RE.search(proc.stdout), proc.stdout
    warnings = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("warning: wandb"), f"stderr:\n{proc.stderr}"
    assert "offline" in warnings[0], warnings[0]
    runs = _offline_runs(folder)
    assert f"wandb sync wandb/{runs[-1].name}" in proc.stdout, proc.stdout


@pytest.mark.parametrize("broken", ["timeout", "settings", "import"])
def test_wandb_that_cannot_even_be_set_up_is_a_warning_not_a_traceback(corpus, monkeypatch, capsys, broken):
    """A bad WANDB_INIT_TIMEOUT, wandb settings that raise, or an import of wandb that breaks with something
    other than ImportError cost the user their wandb charts only: one warning, then the run trains and saves."""
    monkeypatch.chdir(corpus.parent)
    fake = install_fake_wandb(monkeypatch, corpus.parent)
    if broken == "timeout":
        monkeypatch.setenv("WANDB_INIT_TIMEOUT", "abc")
    elif broken == "settings":
        def settings(**kwargs):
            raise TypeError("unexpected keyword argument 'console'")
        fake.Settings = settings
    else:
        import builtins
        real_import = builtins.__import__

        def broken_import(name, *args, **kwargs):
            if name == "wandb":
                raise RuntimeError("protobuf version mismatch")
            return real_import(name, *args, **kwargs)
        monkeypatch.setattr("builtins.__import__", broken_import)
    res = run_main(capsys, tiny_wandb(mode="offline", data=corpus.name))
    assert res.returncode == 0, show(res)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: wandb could not start ("), show(res)
    assert {"timeout": "WANDB_INIT_TIMEOUT='abc'", "settings": "console", "import": "protobuf"}[broken] in lines[0]
    assert not fake.inits and "step 10:" in res.stdout and "模型已保存到model.pth" in res.stdout


def test_a_nan_stop_closes_the_wandb_run_and_prints_the_phase_line(corpus, monkeypatch, capsys):
    """A loss that turns NaN ends the run the way every run ends: the wandb run is closed (as failed) with its
    time figures, the phase line is printed, then the one error line and exit code 1."""
    fake = install_fake_wandb(monkeypatch, corpus.parent)
    monkeypatch.chdir(corpus.parent)
    res = run_main(capsys, tiny_wandb("--learning_rate=1e6", mode="offline", data=corpus.name))
    assert res.returncode == 1 and "the loss became NaN or infinite" in res.stderr, show(res)
    assert fake.finished == [1], "the wandb run was not closed, or not as failed"
    assert "time/total" in fake.summaries[0]
    assert PHASE_LINE.search(res.stdout.strip().splitlines()[-1]), show(res)
