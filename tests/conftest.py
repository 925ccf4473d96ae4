"""Shared helpers: a tiny corpus the tests write themselves, tiny model settings, CLI runners
(in the foreground, in the background, and after a patch), fakes for wandb and for the dtype
probe, file snapshots, and one thread per test and per subprocess."""

import contextlib
import copy
import hashlib
import io
import os
import queue
import re
import subprocess
import sys
import threading
import time
import traceback
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import babygpt  # noqa: E402  (from ROOT)
import reference  # noqa: E402

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
# TINY with dtype=auto (the probe decides) and no max_iters, with dropout and a learning rate that
# moves the losses: for runs whose dtype or step count is measured.
AUTO_ARGS = [a for a in TINY if not a.startswith(("--dtype", "--max_iters"))] + ["--dropout=0.1",
                                                                                "--learning_rate=1e-2"]


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


# One OpenMP thread per process: on 2 shared cores the threads of tiny ops otherwise wait on each
# other (a 2 s run takes 7 s). It changes no result: every comparison runs under it.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# torchrun's variables: a subprocess that inherited them would think it is one rank of a job
DDP_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
BABYGPT = os.path.join(ROOT, "babygpt.py")


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """Every test runs as the main process (say() prints only on rank 0) with one torch thread:
    tiny models gain nothing from threads, and results do not depend on it."""
    monkeypatch.delenv("RANK", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli_env(env=None):
    """The environment of a babygpt subprocess: os.environ, unbuffered, quiet wandb, one OpenMP
    thread, then env (which wins), without torchrun's variables."""
    full = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", **ONE_THREAD, **(env or {})}
    for var in DDP_VARS:
        full.pop(var, None)
    return full


def babygpt_cmd(*args):
    """The command line `python babygpt.py ARGS`."""
    return [sys.executable, BABYGPT, *args]


def torchrun_cmd(*args, nproc=2):
    """The command line `torchrun --standalone --nproc_per_node=NPROC babygpt.py ARGS`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            BABYGPT, *args]


# `python babygpt.py ARGS` after a patch (Python source) that hooks into babygpt, so that a test can
# slow a phase down or send a signal at a known moment. babygpt is imported before torch, so the
# phase line counts from the same moment as in a plain run.
WRAPPED = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
import babygpt
import torch
{patch}
sys.exit(babygpt.main())
"""


def wrapped_cmd(patch, *args):
    """The command line of `python babygpt.py ARGS` with `patch` applied first."""
    return [sys.executable, "-c", WRAPPED.format(root=ROOT, patch=patch), *args]


def run_wrapped(patch, args, cwd, timeout=120, env=None):
    """wrapped_cmd(patch, ARGS) run in cwd; returns the CompletedProcess (text mode)."""
    return subprocess.run(wrapped_cmd(patch, *args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=cli_env(env))


def run_cli(args, cwd, timeout=120, env=None, **kwargs):
    """Run `python babygpt.py ARGS` in cwd with cli_env(env); returns the CompletedProcess (text mode)."""
    return subprocess.run(babygpt_cmd(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=cli_env(env), **kwargs)


class Running:
    """A subprocess (environment cli_env(env)) whose output is collected line by line in the
    background."""

    def __init__(self, cmd, cwd, env=None):
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=cli_env(env), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines = queue.Queue()
        self.out, self.err = [], []
        self.threads = [threading.Thread(target=self._pump, args=(s, b), daemon=True)
                        for s, b in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.threads:
            t.start()

    @classmethod
    def babygpt(cls, args, cwd, **kw):
        """`python babygpt.py ARGS` in the background."""
        return cls(babygpt_cmd(*args), cwd, **kw)

    @classmethod
    def wrapped(cls, patch, args, cwd, **kw):
        """`python babygpt.py ARGS` after `patch`, in the background."""
        return cls(wrapped_cmd(patch, *args), cwd, **kw)

    def _pump(self, stream, buf):
        for line in stream:
            buf.append(line)
            self.lines.put(line)

    def wait_for(self, pattern, timeout=60):
        """The first line of output matching pattern, or fail (after killing the run)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            if re.search(pattern, line):
                return line
        self.kill()
        pytest.fail(f"no line matching {pattern!r} within {timeout}s; output:\n{self.output}")

    def signal(self, sig):
        try:
            self.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout):
        """Exit code, or fail (after killing it) when it does not exit within timeout seconds."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"did not exit within {timeout}s; output:\n{self.output}")
        for t in self.threads:
            t.join(timeout=5)
        return rc

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def output(self):
        return "".join(self.out) + "".join(self.err)


def snapshot(folder):
    """Every file under folder with its sha256 and mtime: to prove nothing was changed or added."""
    snap = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(dirpath, name)
            with open(p, "rb") as f:
                snap[os.path.relpath(p, folder)] = (hashlib.sha256(f.read()).hexdigest(),
                                                    os.stat(p).st_mtime_ns)
    return snap


def same_files(before, after, names=None):
    """Two snapshots agree on `names` (by default every file): nothing changed, added or removed."""
    names = names if names is not None else sorted(set(before) | set(after))
    changed = [n for n in names if before.get(n) != after.get(n)]
    assert not changed, f"changed, added or removed: {changed}"


def temp_files(folder):
    return [os.path.relpath(os.path.join(d, n), folder) for d, _, files in os.walk(folder)
            for n in files if n.endswith(".tmp")]


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def same_weights(a, b):
    """Two state_dicts with the same keys and bit-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def all_finite(state_dict):
    return all(torch.isfinite(v).all() for v in state_dict.values() if torch.is_tensor(v))


def tiny_model(vocab=30, seed=0, dropout=0.0, cls=None):
    """A BabyGPT (or `cls`, such as reference.SeedGPT) of the tiny shape, seeded, in training mode."""
    torch.manual_seed(seed)
    return (cls or babygpt.BabyGPT)(vocab, block_size=16, n_embed=32, n_head=2, n_layer=2, dropout=dropout)


def batch(n, vocab=30, seed=1):
    """n random (inputs, targets) rows of the tiny block size."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(vocab, (n, 16), generator=g), torch.randint(vocab, (n, 16), generator=g)


def step_weights(model, batches, lr=0.5, grad_clip=0.0, opt="sgd"):
    """Weights after one babygpt.train_step on a copy of model."""
    m = copy.deepcopy(model)
    if opt == "sgd":
        optimizer = torch.optim.SGD(m.parameters(), lr=lr)
    else:
        optimizer = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01)
    babygpt.train_step(m, optimizer, batches, grad_clip=grad_clip)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def assert_close_weights(a, b, atol=1e-6, rtol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


def max_change(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def seed_and_baby(vocab_size, block_size, n_embed, n_head, n_layer, seed=0, device="cpu"):
    """A reference.SeedGPT with default init and a BabyGPT holding the same weights (eval mode)."""
    torch.manual_seed(seed)
    ref = reference.SeedGPT(vocab_size, block_size=block_size, n_embed=n_embed, n_head=n_head,
                            n_layer=n_layer, dropout=0.0)
    baby = babygpt.BabyGPT(vocab_size, block_size=block_size, n_embed=n_embed, n_head=n_head,
                           n_layer=n_layer, dropout=0.0)
    baby.load_state_dict(babygpt.fused_layout(ref.state_dict()))
    return ref.to(device).eval(), baby.to(device).eval()


class FakeWandb(types.ModuleType):
    """A stand-in for the wandb module (no network): records init arguments and logged rows."""

    def __init__(self, folder):
        super().__init__("wandb")
        self.folder = folder
        self.inits, self.logged, self.log_kwargs, self.summaries, self.metrics = [], [], [], [], []
        self.configs = []  # each run's config: what init was given, with every update on top
        self.finished = []  # the exit code each finished run was closed with

    def Settings(self, **kwargs):
        return kwargs

    def Table(self, columns, data):
        return types.SimpleNamespace(columns=columns, data=data)

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self
        run_id = kwargs.get("id") or f"run{len(self.inits):04d}"
        run_dir = os.path.join(self.folder, "wandb", f"offline-run-{run_id}", "files")
        os.makedirs(run_dir, exist_ok=True)
        summary, config = {}, dict(kwargs.get("config") or {})
        self.summaries.append(summary)
        self.configs.append(config)

        def log(metrics, **kw):
            fake.logged.append(dict(metrics))
            fake.log_kwargs.append(kw)

        def update(values, allow_val_change=False):
            assert allow_val_change or not set(values) & set(config), "wandb refuses to change a config value"
            config.update(values)

        return types.SimpleNamespace(id=run_id, dir=run_dir, url="http://x", log=log, summary=summary,
                                     config=types.SimpleNamespace(update=update),
                                     define_metric=lambda *a, **k: fake.metrics.append((a, k)),
                                     finish=lambda exit_code=None: fake.finished.append(exit_code))


def install_fake_wandb(monkeypatch, folder):
    """A FakeWandb as the wandb module, with WANDB_MODE unset: returns it."""
    fake = FakeWandb(str(folder))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return fake


def fake_probe(steps, forward=0.01):
    """A stand-in for probe_dtypes that measures steps[dtype] a step and `forward` an evaluation batch."""
    def probe(model, data, micro_batch, dev, dtypes, budget=2.5):
        return {dt: steps[dt] for dt in dtypes}, forward
    return probe


def winners(*order):
    """A stand-in for probe_dtypes whose k-th call measures order[k] clearly faster than the other dtype."""
    calls = iter(order)

    def probe(model, data, micro_batch, dev, dtypes, budget=2.5):
        fast = next(calls)
        return {dt: (0.01 if dt == fast else 0.03) for dt in dtypes}, 0.001
    return probe


def corpus_data_for(text):
    """(vocab_size, {"train", "val"} token tensors) of `text`, split 90/10 as training does."""
    tok = babygpt.Tokenizer(text)
    ids = torch.tensor(tok.encode(text))
    n = int(0.9 * len(ids))
    return tok.vocab_size, {"train": ids[:n], "val": ids[n:]}


# -----------------------------------------------------------------------------
# The tiny run's command line, its log, its errors, and one trained folder for all tests

STEP_RE = re.compile(r"^step (\d+): train loss ([0-9.]+), val loss ([0-9.]+)", re.M)
LONG = ["--max_iters=1000000", "--eval_interval=100000"]  # trains until interrupted
DASHES = "-" * 10


def tiny(*extra, data="poems.txt"):
    """TINY on the corpus `data` (a path relative to the run's folder), with `extra` on top."""
    return [*TINY, f"--data_path={data}", *extra]


def tiny_wandb(*extra, mode="offline", data="poems.txt"):
    """tiny(...) with --wandb_mode=MODE instead of disabled."""
    return [a for a in tiny(data=data) if not a.startswith("--wandb_mode")] + [f"--wandb_mode={mode}", *extra]


def step_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith("step ")]


def losses_only(stdout):
    """The step lines without the speed and time fields, which vary between runs."""
    return [line.split(", speed")[0] for line in step_lines(stdout)]


def losses(stdout):
    """{step: (train loss, val loss)} as printed."""
    return {int(s): (float(t), float(v)) for s, t, v in STEP_RE.findall(stdout)}


def run_main(capsys, args):
    """babygpt.main(args) in this process: (returncode, stdout, stderr) as a namespace. An escaping
    exception is reported as returncode None with its traceback in stderr."""
    capsys.readouterr()
    try:
        rc = babygpt.main(list(args))
    except SystemExit as e:
        rc = e.code
    except BaseException:  # noqa: B036 - a KeyboardInterrupt escaping main is a failure too
        out, err = capsys.readouterr()
        return types.SimpleNamespace(returncode=None, stdout=out, stderr=err + traceback.format_exc())
    out, err = capsys.readouterr()
    return types.SimpleNamespace(returncode=rc, stdout=out, stderr=err)


def show(res):
    return f"exit code {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"


def succeeded(res):
    assert res.returncode == 0, show(res)
    assert "Traceback" not in res.stdout + res.stderr, show(res)


def run_many(*jobs):
    """Independent CLI runs [(args, cwd), ...], one per CPU this process may use; results in order."""
    with ThreadPoolExecutor(max_workers=max(1, len(os.sched_getaffinity(0)))) as pool:
        return list(pool.map(lambda job: run_cli(*job), jobs))


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


def one_line_error(res, *needles):
    """Exit code 1, one line on stderr (`error: ...`) holding every needle, no traceback."""
    assert res.returncode == 1, show(res)
    assert "Traceback" not in res.stdout + res.stderr, show(res)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr\n{show(res)}"
    line = lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in the message: {line}"
    return line


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A folder with poems.txt, and ckpt.pt (step 10), model.pth and train.log of one tiny run
    (learning rate 1e-2, so that the model has learned something)."""
    folder = tmp_path_factory.mktemp("trained")
    (folder / "poems.txt").write_text(make_corpus(), encoding="utf-8")
    cwd, out, err, threads = os.getcwd(), io.StringIO(), io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        os.chdir(folder)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = babygpt.main(tiny("--learning_rate=1e-2"))
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    assert rc == 0, out.getvalue() + err.getvalue()
    (folder / "train.log").write_text(out.getvalue(), encoding="utf-8")
    return folder


@pytest.fixture
def work(trained, tmp_path, monkeypatch):
    """A fresh cwd holding copies (same bytes and mtimes) of poems.txt, ckpt.pt and model.pth."""
    import shutil
    for name in ("poems.txt", "ckpt.pt", "model.pth"):
        shutil.copy2(trained / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -----------------------------------------------------------------------------
# Calls into babygpt's plumbing with plain arguments, as tests think of them

def evaluate(model, data, batch_size, block_size, eval_iters, generator=None, ctx=None, batches_per_pass=1):
    """babygpt.estimate_loss on eval_iters batches of batch_size x block_size, under ctx (autocast)."""
    with ctx or contextlib.nullcontext():
        return babygpt.estimate_loss(model, data, types.SimpleNamespace(block_size=block_size, eval_iters=eval_iters),
                                     batch_size, generator, batches_per_pass)


def fake_run(micro_batch=8, dev=torch.device("cpu"), clock=None, start_iter=0, world=1, **more):
    """What plan_run, fit_steps and warm_up read of babygpt.Run."""
    return types.SimpleNamespace(micro_batch=micro_batch, dev=dev, clock=clock or babygpt.PhaseClock(),
                                 start_iter=start_iter, world=world, **more)
