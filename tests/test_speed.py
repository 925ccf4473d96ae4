"""Faithfulness under speed (issue 3): the fast path (fused QKV + SDPA, autocast, gathered
batches, compile on CUDA) computes the seed's function. No timing assertions here."""

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import corpus_data_for, make_corpus, seed_and_baby

import babygpt
import reference
from babygpt import UserError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def corpus_data():
    return corpus_data_for(make_corpus())


def mean_kl(logits_p, logits_q):
    p = logits_p.float().log_softmax(-1)
    q = logits_q.float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.fixture
def no_tf32():
    """fp32 comparisons on CUDA need true fp32 matmuls."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# -----------------------------------------------------------------------------
# fp32: the fused SDPA model is the seed's function

def test_fp32_sdpa_matches_reference_at_seed_architecture():
    """The seed's own shape (6 layers, 6 heads, 384 wide, block 256) with a full block."""
    ref, baby = seed_and_baby(100, 256, 384, 6, 6)
    idx = torch.randint(100, (2, 256), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(idx)[0], baby(idx)[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("T", [1, 5, 16])
def test_fp32_sdpa_matches_reference_small(T):
    ref, baby = seed_and_baby(31, 16, 48, 4, 2, seed=T)
    idx = torch.randint(31, (3, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        torch.testing.assert_close(baby(idx)[0], ref(idx)[0], rtol=0, atol=1e-5)


def test_fp32_gradients_match_reference():
    """Training the fused model moves it exactly as training the seed's would."""
    ref, baby = seed_and_baby(23, 8, 32, 4, 2, seed=7)
    idx = torch.randint(23, (4, 8), generator=torch.Generator().manual_seed(0))
    tgt = torch.randint(23, (4, 8), generator=torch.Generator().manual_seed(1))
    ref(idx, tgt)[1].backward()
    baby(idx, tgt)[1].backward()
    fused = babygpt.upgrade_state_dict({k: p.grad for k, p in ref.named_parameters()})
    for name, p in baby.named_parameters():
        torch.testing.assert_close(p.grad, fused[name], rtol=1e-4, atol=1e-6, msg=name)


# -----------------------------------------------------------------------------
# bfloat16 autocast on the CPU

def test_bf16_autocast_cpu_logits_close_to_fp32():
    _, baby = seed_and_baby(100, 256, 384, 6, 6)
    idx = torch.randint(100, (1, 256), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fp32 = baby(idx)[0]
        with babygpt.autocast(torch.device("cpu"), torch.bfloat16):
            bf16 = baby(idx)[0]
    assert bf16.dtype == torch.bfloat16  # autocast really ran the model in bf16
    diff = (bf16.float() - fp32).abs()
    assert diff.max().item() < 0.05, diff.max().item()
    assert diff.max().item() < 0.1 * fp32.std().item()
    assert mean_kl(fp32, bf16) < 1e-4
    assert (fp32.argmax(-1) == bf16.argmax(-1)).float().mean().item() > 0.95


def test_autocast_helper_enables_only_for_low_precision():
    cpu = torch.device("cpu")
    with babygpt.autocast(cpu, torch.float32):
        assert not torch.is_autocast_enabled("cpu")
    with babygpt.autocast(cpu, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


def _train(vocab, data, ctx, steps=30, device="cpu", compile_model=False):
    torch.manual_seed(0)
    model = babygpt.BabyGPT(vocab, block_size=16, n_embed=32, n_head=2, n_layer=2, dropout=0.0).to(device)
    data = {k: v.to(device) for k, v in data.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    step_model = torch.compile(model) if compile_model else model
    gen = torch.Generator(device=device).manual_seed(1)
    before = babygpt.estimate_loss(model, data, 8, 16, 10, torch.Generator(device=device).manual_seed(2))
    for _ in range(steps):
        babygpt.train_step(step_model, opt, [babygpt.get_batch(data["train"], 8, 16, gen)], ctx)
    # judged in fp32 on the same evaluation batches
    after = babygpt.estimate_loss(model, data, 8, 16, 10, torch.Generator(device=device).manual_seed(2))
    return before, after


def test_bf16_cpu_training_reaches_the_fp32_loss():
    vocab, data = corpus_data()
    before32, after32 = _train(vocab, data, None)
    before16, after16 = _train(vocab, data, babygpt.autocast(torch.device("cpu"), torch.bfloat16))
    assert before16 == before32  # same seed, same start
    assert after32["val"] < before32["val"] - 0.5  # the run really learns something
    assert after16["val"] < before16["val"] - 0.5
    for split in ("train", "val"):
        assert abs(after16[split] - after32[split]) < 0.05, (split, after16, after32)


def test_estimate_loss_under_autocast_matches_fp32():
    vocab, data = corpus_data()
    torch.manual_seed(0)
    model = babygpt.BabyGPT(vocab, block_size=16, n_embed=32, n_head=2, n_layer=2, dropout=0.2)
    fp32 = babygpt.estimate_loss(model, data, 8, 16, 5, torch.Generator().manual_seed(3))
    ctx = babygpt.autocast(torch.device("cpu"), torch.bfloat16)
    bf16 = babygpt.estimate_loss(model, data, 8, 16, 5, torch.Generator().manual_seed(3), ctx)
    assert model.training
    for split in ("train", "val"):
        assert type(bf16[split]) is float
        assert abs(bf16[split] - fp32[split]) < 0.02


# -----------------------------------------------------------------------------
# dtype selection and its errors

def test_choose_dtype_on_cpu():
    """Without a measurement, auto is float32 on a CPU (training measures: see plan_run)."""
    cpu = torch.device("cpu")
    assert babygpt.choose_dtype("auto", cpu) == torch.float32
    assert babygpt.choose_dtype("float32", cpu) == torch.float32
    assert babygpt.choose_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(UserError, match="float16"):
        babygpt.choose_dtype("float16", cpu)


@pytest.mark.parametrize("bad", ["float64", "fp16", "half", "bf16", "int8", ""])
def test_unknown_dtype_rejected_by_validate_config(bad, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    _, cfg = babygpt.parse_args([f"--dtype={bad}"])
    with pytest.raises(UserError, match="dtype"):
        babygpt.validate_config(cfg)


def test_known_dtypes_pass_validate_config():
    for good in ("auto", "float32", "bfloat16", "float16"):
        _, cfg = babygpt.parse_args([f"--dtype={good}"])
        babygpt.validate_config(cfg)


# -----------------------------------------------------------------------------
# torch.compile and its modes

@pytest.mark.parametrize("bad", ["fast", "Default", "reduce_overhead", ""])
def test_unknown_compile_mode_rejected(bad):
    _, cfg = babygpt.parse_args([f"--compile_mode={bad}"])
    with pytest.raises(UserError, match="compile_mode must be one of"):
        babygpt.validate_config(cfg)


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_graph_modes_refuse_gradient_accumulation(mode):
    _, cfg = babygpt.parse_args([f"--compile_mode={mode}", "--grad_accum_steps=2"])
    with pytest.raises(UserError, match="grad_accum_steps=1 or compile_mode=default"):
        babygpt.validate_config(cfg)
    _, cfg = babygpt.parse_args([f"--compile_mode={mode}"])
    babygpt.validate_config(cfg)


def _cfg(compile="auto", mode="auto", accum=1):
    return SimpleNamespace(compile=compile, compile_mode=mode, grad_accum_steps=accum)


def test_choose_compile_mode():
    """Off on a CPU unless forced; on one GPU CUDA graphs; graph modes refused under DDP."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert babygpt.choose_compile_mode(_cfg(), cpu, 1) is None  # auto: off on a CPU
    assert babygpt.choose_compile_mode(_cfg(compile="false"), gpu, 1) is None
    assert babygpt.choose_compile_mode(_cfg(compile="true"), cpu, 1) == "default"
    assert babygpt.choose_compile_mode(_cfg(), gpu, 1) == "reduce-overhead"
    assert babygpt.choose_compile_mode(_cfg(accum=2), gpu, 1) == "default"  # graphs cannot accumulate
    assert babygpt.choose_compile_mode(_cfg(), gpu, 2) == "default"  # nor run under DDP
    with pytest.raises(UserError, match="compile_mode=default under torchrun"):
        babygpt.choose_compile_mode(_cfg(mode="reduce-overhead"), gpu, 2)


def test_compile_model_leaves_the_model_eager_and_a_failed_compile_warns(capsys):
    """The compiled wrapper trains; the model keeps its state_dict names and its eager
    generate(). A compile that fails (no C++ compiler, no Triton) is one warning, then eager."""
    torch.manual_seed(0)
    model = babygpt.BabyGPT(20, block_size=8, n_embed=16, n_head=2, n_layer=2, dropout=0.0)
    keys = list(model.state_dict())
    clock = babygpt.PhaseClock()
    seen = []
    compiled = babygpt.compile_model(model, _cfg(compile="true"), torch.device("cpu"), 1, clock, seen.append)
    assert seen == [compiled] and compiled is not model and compiled._orig_mod is model
    assert list(model.state_dict()) == keys and model._compiled_call_impl is None

    def broken(m):
        raise RuntimeError("InductorError: no working C++ compiler found\nmore detail")
    assert babygpt.compile_model(model, _cfg(compile="true"), torch.device("cpu"), 1, clock, broken) is model
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: torch.compile failed (InductorError: no working C++ compiler found); training without it"]
    assert babygpt.compile_model(model, _cfg(), torch.device("cpu"), 1, clock, broken) is model  # auto: eager


def test_evaluation_in_larger_passes_gives_the_same_losses():
    """batches_per_pass changes how many batches go through the model at once, not which
    batches or their mean."""
    vocab, data = corpus_data()
    torch.manual_seed(0)
    model = babygpt.BabyGPT(vocab, block_size=16, n_embed=32, n_head=2, n_layer=2, dropout=0.2)
    one = babygpt.estimate_loss(model, data, 8, 16, 6, torch.Generator().manual_seed(4))
    for n in (2, 3, 4):  # 4 does not divide 6: the last pass is smaller
        got = babygpt.estimate_loss(model, data, 8, 16, 6, torch.Generator().manual_seed(4), batches_per_pass=n)
        for split in ("train", "val"):
            assert got[split] == pytest.approx(one[split], abs=1e-5), (n, split)
    assert model.training


def test_choose_eval_passes_is_one_off_cuda_and_divides_eval_iters(monkeypatch):
    cfg = SimpleNamespace(eval_iters=100, block_size=256, batch_size=64)
    assert babygpt.choose_eval_passes(cfg, 1, 6104, torch.device("cpu")) == 1
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (70 * 2**30, 80 * 2**30))
    n = babygpt.choose_eval_passes(cfg, 1, 6104, torch.device("cuda"))
    assert n == 20 and 100 % n == 0
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (2 * 2**30, 8 * 2**30))
    small = babygpt.choose_eval_passes(cfg, 1, 6104, torch.device("cuda"))
    assert 1 <= small < n and 100 % small == 0  # a small GPU gets smaller passes
    odd = SimpleNamespace(eval_iters=7, block_size=256, batch_size=64)
    assert babygpt.choose_eval_passes(odd, 1, 6104, torch.device("cuda")) in (1, 7)


# -----------------------------------------------------------------------------
# Batches gathered with one indexing op, same windows as the seed's loop

def test_get_batch_draws_the_seeds_windows_from_the_same_seed():
    data = torch.randint(0, 50, (1000,), generator=torch.Generator().manual_seed(0))
    for seed, B, T in [(0, 16, 32), (5, 3, 8), (9, 64, 1)]:
        torch.manual_seed(seed)
        x, y = babygpt.get_batch(data, B, T)
        torch.manual_seed(seed)
        xs, ys = reference.seed_get_batch(data, B, T, "cpu")
        assert torch.equal(x, xs) and torch.equal(y, ys), (seed, B, T)


class _CountTorchCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_get_batch_has_no_python_loop_over_the_batch():
    """The number of torch operations does not grow with batch_size (the seed's does)."""
    data = torch.arange(2000)

    def count(fn, batch_size):
        with _CountTorchCalls() as mode:
            fn(batch_size)
        return mode.calls

    ours = [count(lambda b: babygpt.get_batch(data, b, 16), b) for b in (2, 64)]
    seeds = [count(lambda b: reference.seed_get_batch(data, b, 16, "cpu"), b) for b in (2, 64)]
    assert seeds[1] > seeds[0]  # the counter does see a per-row loop
    assert ours[0] == ours[1]


def test_get_batch_with_generator_is_reproducible_and_stays_on_device():
    data = torch.arange(500)
    a = babygpt.get_batch(data, 8, 10, torch.Generator().manual_seed(4))
    b = babygpt.get_batch(data, 8, 10, torch.Generator().manual_seed(4))
    c = babygpt.get_batch(data, 8, 10, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].device == data.device


# -----------------------------------------------------------------------------
# CUDA only

@cuda
def test_cuda_fp32_sdpa_matches_reference(no_tf32):
    ref, baby = seed_and_baby(100, 256, 384, 6, 6, device="cuda")
    idx = torch.randint(100, (4, 256), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(baby(idx)[0], ref(idx)[0], rtol=0, atol=1e-5)


@cuda
def test_cuda_bf16_autocast_logits_close_to_fp32(no_tf32):
    _, baby = seed_and_baby(100, 256, 384, 6, 6, device="cuda")
    idx = torch.randint(100, (4, 256), device="cuda")
    with torch.no_grad():
        fp32 = baby(idx)[0]
        with babygpt.autocast(torch.device("cuda"), torch.bfloat16):
            bf16 = baby(idx)[0]
    assert bf16.dtype == torch.bfloat16
    assert (bf16.float() - fp32).abs().max().item() < 0.05
    assert mean_kl(fp32, bf16) < 1e-4


@cuda
def test_cuda_compiled_model_matches_eager(no_tf32):
    _, baby = seed_and_baby(100, 64, 128, 4, 2, device="cuda")
    compiled = torch.compile(baby)
    idx = torch.randint(100, (4, 64), device="cuda")
    tgt = torch.randint(100, (4, 64), device="cuda")
    with torch.no_grad():
        eager_logits, eager_loss = baby(idx, tgt)
        comp_logits, comp_loss = compiled(idx, tgt)
    torch.testing.assert_close(comp_logits, eager_logits, rtol=1e-4, atol=1e-4)
    assert abs(comp_loss.item() - eager_loss.item()) < 1e-4


@cuda
def test_cuda_choose_dtype_and_fast_training_matches_fp32(no_tf32):
    dev = torch.device("cuda")
    auto = babygpt.choose_dtype("auto", dev)
    assert auto == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    assert babygpt.choose_dtype("float32", dev) == torch.float32
    vocab, data = corpus_data()
    _, after32 = _train(vocab, data, None, device="cuda")
    before, after = _train(vocab, data, babygpt.autocast(dev, auto), device="cuda", compile_model=True)
    assert after["val"] < before["val"] - 0.5
    for split in ("train", "val"):
        assert abs(after[split] - after32[split]) < 0.05, (split, after, after32)


@cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_cuda_compiled_training_loop_matches_eager(mode):
    """The loop as train() runs it (evaluate, train, evaluate ...) through compile_model, against
    the same loop on the eager model: CUDA graphs replay the same function."""
    from torch._dynamo.utils import counters
    dev = torch.device("cuda")
    vocab, data = corpus_data()
    data = {k: v.to(dev) for k, v in data.items()}
    ctx = babygpt.autocast(dev, torch.bfloat16)

    def run(compiled):
        torch.manual_seed(0)
        model = babygpt.BabyGPT(vocab, block_size=16, n_embed=32, n_head=2, n_layer=2, dropout=0.0).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
        model = babygpt.compile_model(model, _cfg("true" if compiled else "false", mode), dev, 1,
                                      babygpt.PhaseClock(), lambda m: None)
        gen = torch.Generator(device=dev).manual_seed(1)
        evals = []
        for _ in range(3):
            evals.append(babygpt.estimate_loss(model, data, 8, 16, 10, torch.Generator(device=dev).manual_seed(2),
                                               ctx, batches_per_pass=5))
            for _ in range(20):
                babygpt.train_step(model, opt, [babygpt.get_batch(data["train"], 8, 16, gen)], ctx)
        return evals

    skips = counters["inductor"]["cudagraph_skips"]
    eager, comp = run(False), run(True)
    assert counters["inductor"]["cudagraph_skips"] == skips  # the graphs really ran
    assert comp[-1]["val"] < comp[0]["val"] - 0.5
    for e, c in zip(eager, comp):
        for split in ("train", "val"):
            assert abs(e[split] - c[split]) < 0.05, (split, eager, comp)


@cuda
def test_cuda_get_batch_gathers_on_the_device():
    data = torch.arange(1000, device="cuda")
    x, y = babygpt.get_batch(data, 32, 16, torch.Generator(device="cuda").manual_seed(0))
    assert x.device.type == y.device.type == "cuda"
    offsets = x[:, 0]
    want = offsets[:, None] + torch.arange(16, device="cuda")
    assert torch.equal(x, want) and torch.equal(y, want + 1)


def test_warm_up_runs_trainings_passes_and_leaves_no_trace():
    """The compile warm-up runs one evaluation pass per split and one training step's forward
    and backward; the training after it is the training without it."""
    vocab, data = corpus_data()
    cfg = SimpleNamespace(block_size=16)
    runs = []
    for warm in (True, False):
        torch.manual_seed(0)
        model = babygpt.BabyGPT(vocab, block_size=16, n_embed=32, n_head=2, n_layer=2, dropout=0.2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        calls = []
        real_forward = model.forward
        model.forward = lambda *a, **k: calls.append(a[0].shape) or real_forward(*a, **k)
        if warm:
            babygpt.warm_up(model, data, cfg, 4, 8, 3, nullcontext(), torch.amp.GradScaler(enabled=False),
                            torch.device("cpu"))
            assert calls == [(24, 16), (24, 16), (4, 16)]
        babygpt.train_step(model, optimizer, [babygpt.get_batch(data["train"], 4, 16)])
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
