"""Measured defaults: the dtype probe and its decision, the CPU's long-run note, progress during
evaluation, MPS's draws on the CPU (faked: no MPS here), and generation's attention kernels."""

from types import SimpleNamespace

import pytest
import torch

import babygpt
from conftest import TINY, corpus_data_for, make_corpus

F32, BF16 = torch.float32, torch.bfloat16


def tiny_model(vocab, dropout=0.2):
    torch.manual_seed(0)
    return babygpt.BabyGPT(vocab, block_size=16, n_embed=32, n_head=2, n_layer=2, dropout=dropout)


def cfg_for(**kw):
    """The constants as a config (nothing printed), with a tiny shape and `kw` on top."""
    cfg = {k: getattr(babygpt, k) for k in babygpt.CONFIG_KEYS}
    cfg.update(n_layer=2, n_head=2, n_embed=32, block_size=16, batch_size=8, max_iters=10, eval_iters=2)
    return SimpleNamespace(**{**cfg, **kw})


@pytest.mark.parametrize("steps,expected", [
    ({F32: 1.0, BF16: 0.6}, BF16),   # bfloat16 faster (the AMD EPYC)
    ({F32: 0.7, BF16: 1.0}, F32),    # bfloat16 slower (the Intel Xeon)
    ({F32: 0.5, BF16: 0.5}, F32),    # a tie keeps the exact format
    ({F32: 0.5}, F32),
])
def test_pick_dtype_keeps_the_faster(steps, expected):
    assert babygpt.pick_dtype(steps) == expected


def fake_probe(steps, forward=0.01, rows=4):
    def probe(model, data, micro_batch, block_size, dev, dtypes, budget=3.0):
        return rows, {dt: steps[dt] for dt in dtypes}, forward
    return probe


@pytest.mark.parametrize("bf16_seconds", [0.5, 2.0])
def test_choose_dtype_auto_prints_its_measured_decision(monkeypatch, capsys, bf16_seconds):
    monkeypatch.setattr(babygpt, "probe_dtypes", fake_probe({F32: 1.0, BF16: bf16_seconds}))
    got = babygpt.choose_dtype(cfg_for(dtype="auto"), None, None, 8, torch.device("cpu"), 1)
    assert got == (BF16 if bf16_seconds < 1.0 else F32)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"dtype auto: {babygpt.dtype_name(got)}, measured")
    assert f"(float32 1.000s, bfloat16 {bf16_seconds:.3f}s a step of 4 x 16 tokens)" in out[0]


def test_forced_bfloat16_that_is_slower_is_allowed_with_a_note(monkeypatch, capsys):
    monkeypatch.setattr(babygpt, "probe_dtypes", fake_probe({F32: 1.0, BF16: 1.25}))
    assert babygpt.choose_dtype(cfg_for(dtype="bfloat16"), None, None, 8, torch.device("cpu"), 1) == BF16
    out = capsys.readouterr().out
    assert "note: bfloat16 is slower than float32 on this cpu (0.80x" in out


def test_forced_float32_measures_float32_only(monkeypatch, capsys):
    seen = []

    def probe(model, data, micro_batch, block_size, dev, dtypes, budget=3.0):
        seen.append(list(dtypes))
        return 4, {F32: 0.01}, 0.001
    monkeypatch.setattr(babygpt, "probe_dtypes", probe)
    assert babygpt.choose_dtype(cfg_for(dtype="float32"), None, None, 8, torch.device("cpu"), 1) == F32
    assert seen == [[F32]] and capsys.readouterr().out == ""


@pytest.mark.parametrize("preset", ["", "cpu"])
def test_a_long_cpu_run_is_announced(monkeypatch, capsys, preset):
    # 2 s a step of 4 rows: the default run (64 rows, 5000 steps) would take days
    monkeypatch.setattr(babygpt, "probe_dtypes", fake_probe({F32: 2.0, BF16: 3.0}, forward=0.7))
    _, cfg = babygpt.parse_args([f"--preset={preset}"] if preset else [])
    capsys.readouterr()
    babygpt.choose_dtype(cfg, None, None, cfg.batch_size, torch.device("cpu"), 1)
    out = capsys.readouterr().out
    assert "note: on this CPU this run needs about" in out
    assert ("--preset=cpu trains a small model" in out) == (preset == "")


def test_a_short_cpu_run_says_nothing(monkeypatch, capsys):
    monkeypatch.setattr(babygpt, "probe_dtypes", fake_probe({F32: 0.001}, forward=0.0003))
    babygpt.choose_dtype(cfg_for(dtype="float32"), None, None, 8, torch.device("cpu"), 1)
    assert "note" not in capsys.readouterr().out


def test_estimate_run_seconds_scales_with_steps_rows_and_evaluations():
    cfg = SimpleNamespace(max_iters=1000, eval_interval=100, eval_iters=10, batch_size=32, grad_accum_steps=1)
    base = babygpt.estimate_run_seconds(cfg, 8, 0.1, 0.02, 32, 1)
    assert base == pytest.approx(1000 * 0.1 * 4 + 11 * 20 * 0.02 * 4)
    cfg.max_iters = 2000
    assert babygpt.estimate_run_seconds(cfg, 8, 0.1, 0.02, 32, 1) > 1.9 * base
    assert babygpt.estimate_run_seconds(cfg, 8, 0.1, 0.02, 32, 1, start_iter=1000) == pytest.approx(base)


def test_probe_puts_back_random_state_weights_gradients_and_mode():
    vocab, data = corpus_data_for(make_corpus())
    model = tiny_model(vocab)
    model.eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    rows, steps, forward = babygpt.probe_dtypes(model, data["train"], 8, 16, torch.device("cpu"), [F32, BF16],
                                                budget=0.5)
    assert 1 <= rows <= 8 and set(steps) == {F32, BF16} and all(t > 0 for t in steps.values()) and forward > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_a_run_with_the_probe_on_is_the_run_it_chose(corpus, monkeypatch, capsys):
    """dtype=auto probes, then trains exactly as if its choice had been forced."""
    monkeypatch.chdir(corpus.parent)
    monkeypatch.setattr(babygpt, "pick_dtype", lambda steps: F32)
    base = [a for a in TINY if not a.startswith("--dtype")] + [f"--data_path={corpus.name}", "--dropout=0.1"]
    logs = []
    for dtype in ("auto", "float32"):
        assert babygpt.main(base + [f"--dtype={dtype}"]) == 0
        out = capsys.readouterr().out
        logs.append([l for l in out.splitlines() if l.startswith("step ")])
        assert ("dtype auto: float32" in out) == (dtype == "auto")
    strip = lambda lines: [l.split(", speed")[0] for l in lines]
    assert strip(logs[0]) == strip(logs[1]) and len(logs[0]) == 3


def test_progress_line_shows_evaluation_progress(capsys, monkeypatch):
    s = SimpleNamespace(tty=True, clock=SimpleNamespace(last_progress=0.0, tokens=0, mark=0.0),
                        tokens_per_step=128, progress_shown=False)
    babygpt.show_progress(s, "evaluating 37/200")
    assert capsys.readouterr().out == "\r\x1b[K  evaluating 37/200"
    babygpt.show_progress(s, "evaluating 38/200")  # within a second: not redrawn
    assert capsys.readouterr().out == ""
    s.tty = False
    s.clock.last_progress = 0.0
    babygpt.show_progress(s, "evaluating 39/200")
    assert capsys.readouterr().out == ""  # never into a pipe or a file


def test_estimate_loss_reports_each_pass_and_can_be_stopped():
    vocab, data = corpus_data_for(make_corpus())
    model = tiny_model(vocab)
    seen = []
    babygpt.estimate_loss(model, data, 4, 16, 6, torch.Generator().manual_seed(0),
                          on_batch=lambda done, total: seen.append((done, total)), batches_per_pass=2)
    assert seen == [(0, 12), (2, 12), (4, 12), (6, 12), (8, 12), (10, 12)]

    def stop(done, total):
        if done >= 4:
            raise babygpt.Interrupted
    with pytest.raises(babygpt.Interrupted):
        babygpt.estimate_loss(model, data, 4, 16, 6, torch.Generator().manual_seed(0), on_batch=stop)
    assert model.training


# -----------------------------------------------------------------------------
# MPS: random draws on the CPU (torch.multinomial has open bugs there), faked on a CPU

def test_mps_draws_and_generators_live_on_the_cpu():
    mps, cuda, cpu = torch.device("mps"), torch.device("cuda"), torch.device("cpu")
    assert babygpt.draws_on_cpu(mps) and not babygpt.draws_on_cpu(cuda) and not babygpt.draws_on_cpu(cpu)
    assert babygpt.generator_device(mps) == cpu
    assert babygpt.generator_device(cuda) == cuda


def test_sample_next_draws_on_the_cpu_where_told(monkeypatch):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    plain = babygpt.sample_next(logits, 1.0, 10, torch.Generator().manual_seed(7))
    monkeypatch.setattr(babygpt, "draws_on_cpu", lambda device: True)
    moved = []
    real_cpu = torch.Tensor.cpu

    def spy(self, *a, **k):
        moved.append(self.shape)
        return real_cpu(self, *a, **k)
    monkeypatch.setattr(torch.Tensor, "cpu", spy)
    faked = babygpt.sample_next(logits, 1.0, 10, torch.Generator().manual_seed(7))
    assert moved == [(3, 50)]  # the probabilities went to the CPU for the draw
    assert torch.equal(plain, faked) and faked.device == logits.device and faked.shape == (3, 1)


def test_get_batch_draws_with_a_generator_of_another_device():
    """On MPS the evaluation generator is a CPU one; the windows are then moved to the data."""
    data = torch.arange(500)
    x, y = babygpt.get_batch(data, 4, 8, torch.Generator(device="cpu").manual_seed(1))
    assert x.device == data.device and torch.equal(y, x + 1)


# -----------------------------------------------------------------------------
# Generation's attention kernels

def test_generation_attention_leaves_out_cudnn_on_cuda_only():
    from contextlib import nullcontext
    assert isinstance(babygpt.generation_attention(torch.device("cpu")), nullcontext)
    assert not isinstance(babygpt.generation_attention(torch.device("cuda")), nullcontext)


def test_greedy_generation_is_the_same_with_every_attention_backend():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    vocab, data = corpus_data_for(make_corpus())
    model = tiny_model(vocab, dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):  # a little training, so greedy picks are not near-ties
        babygpt.train_step(model, opt, [babygpt.get_batch(data["train"], 8, 16)])
    idx = data["val"][:5].view(1, 5)
    outs = {}
    for name, backend in (("math", SDPBackend.MATH), ("flash", SDPBackend.FLASH_ATTENTION)):
        for cache in (True, False):
            with sdpa_kernel([backend]):
                outs[name, cache] = model.generate(idx, 25, temperature=0, kv_cache=cache)  # past block_size
    first = next(iter(outs.values()))
    assert all(torch.equal(first, o) for o in outs.values()), outs


def test_training_on_a_cpu_turns_on_huge_pages_unless_told_not_to(corpus, monkeypatch):
    monkeypatch.chdir(corpus.parent)
    args = TINY + [f"--data_path={corpus.name}", "--max_iters=1", "--prompts="]
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert babygpt.main(args) == 0
    assert babygpt.os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")  # the user's choice wins
    assert babygpt.main(args) == 0
    assert babygpt.os.environ["THP_MEM_ALLOC_ENABLE"] == "0"


def test_probe_drops_a_dtype_the_device_cannot_autocast(monkeypatch, capsys):
    """An MPS without bfloat16 autocast raises: the probe keeps float32 and training goes on."""
    real = babygpt.time_pass

    def time_pass(model, x, y, dt, dev, backward):
        if dt == BF16:
            raise RuntimeError("bfloat16 autocast is not supported here")
        return real(model, x, y, dt, dev, backward)
    monkeypatch.setattr(babygpt, "time_pass", time_pass)
    vocab, data = corpus_data_for(make_corpus())
    model = tiny_model(vocab)
    rows, steps, forward = babygpt.probe_dtypes(model, data["train"], 8, 16, torch.device("cpu"), [F32, BF16],
                                                budget=0.3)
    assert set(steps) == {F32} and all(p.grad is None for p in model.parameters())
    assert babygpt.choose_dtype(cfg_for(dtype="auto"), model, data["train"], 8, torch.device("cpu"), 1) == F32
