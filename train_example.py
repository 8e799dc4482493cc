"""RandLoRA vs LoRA vs full fine-tuning: a real fine-tuning run on a laptop CPU.

    python train_example.py                  # about 2 minutes on 2 CPU cores, no download

What it does, with nothing but torch, safetensors and the Python standard library:

1. Pretrains a small byte-level GPT on real text that ships with Python: the source code of
   the standard library (the ``.py`` files next to the ``os`` module).
2. Fine-tunes copies of that model on different real text, the English reference
   documentation in ``pydoc_data.topics`` (the text behind ``help("for")``), and evaluates on
   topics held out from training. Four runs on the same model and the same batches:
   the frozen model (no training), LoRA, RandLoRA with about the same number of trainable
   parameters as LoRA, and full fine-tuning.
3. Prints a table: trainable parameters, held-out loss and perplexity, loss on held-out
   Python source (how much of the pretraining domain each method forgets), time, memory.
4. Saves the RandLoRA adapter, reloads it into a fresh copy of the pretrained model, checks
   the outputs are bit-for-bit identical, merges it and times inference against the base.

With ``--hf-model PATH --text FILE`` it instead fine-tunes a local Hugging Face causal LM with
RandLoRA on a local text file (needs ``transformers``; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import randlora

# The linear layers adapted by LoRA and RandLoRA: every projection of attention and MLP.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


# -----------------------------------------------------------------------------
# Data: two real corpora that ship with every CPython installation


def stdlib_source(max_bytes: int) -> tuple[bytes, bytes]:
    """Python's standard-library source as bytes: ``(train, held_out)``.

    Files are read in sorted order so every run sees the same text. The held-out part is the
    text right after the training cap (other files), used to measure forgetting.
    """
    folder = os.path.dirname(os.__file__)
    names = sorted(n for n in os.listdir(folder) if n.endswith(".py"))
    chunks, total = [], 0
    held_out_bytes = max(max_bytes // 16, 4096)
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            chunks.append(f.read())
        total += len(chunks[-1])
        if total >= max_bytes + held_out_bytes:
            break
    text = b"".join(chunks)
    return text[:max_bytes], text[max_bytes : max_bytes + held_out_bytes]


def pydoc_topics(held_out_every: int = 5) -> tuple[bytes, bytes, list[str]]:
    """The English reference-manual topics of ``pydoc``: ``(train, held_out, held_out_keys)``.

    Split by topic, not by position, so held-out text is about subjects the model never saw
    during fine-tuning: every ``held_out_every``-th topic in sorted key order.
    """
    from pydoc_data.topics import topics

    keys = sorted(topics)
    held = [k for i, k in enumerate(keys) if i % held_out_every == held_out_every - 1]
    train = [k for k in keys if k not in held]
    join = lambda ks: "\n\n".join(topics[k] for k in ks).encode("utf-8")
    return join(train), join(held), held


def as_tokens(data: bytes) -> torch.Tensor:
    """Bytes as a 1-D tensor of token ids in [0, 256)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def batches(tokens: torch.Tensor, batch: int, context: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless random windows ``(x, y)`` of shape ``(batch, context)``, ``y`` shifted by one.

    A generator of its own, seeded: every method is trained on exactly the same batches.
    """
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(context + 1)
    while True:
        starts = torch.randint(len(tokens) - context - 1, (batch, 1), generator=gen)
        window = tokens[starts + offsets]
        yield window[:, :-1], window[:, 1:]


def eval_windows(tokens: torch.Tensor, context: int, max_tokens: int) -> torch.Tensor:
    """Non-overlapping windows of ``context + 1`` tokens spread evenly over ``tokens``.

    Evenly spaced (not the first ones) so a capped evaluation still covers every part of the text.
    """
    count = (len(tokens) - 1) // context
    keep = max(1, min(count, max_tokens // context))
    starts = torch.linspace(0, count - 1, keep).long() * context
    return tokens[starts[:, None] + torch.arange(context + 1)]


# -----------------------------------------------------------------------------
# A small GPT, written with plain nn.Linear layers so any adapter can wrap them


@dataclass
class GPTConfig:
    vocab: int = 256  # bytes
    context: int = 128
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4


class Block(nn.Module):
    """Pre-norm transformer block. Separate q/k/v/o and up/down projections, named as in LLaMA,
    so the same target list works here and on Hugging Face models."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(d)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))
        self.ln2 = nn.LayerNorm(d)
        self.up_proj = nn.Linear(d, 4 * d)
        self.down_proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        h = self.ln1(x)
        # (B, T, C) -> (B, heads, T, C / heads)
        q, k, v = (p(h).view(B, T, self.n_head, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(B, T, C))
        return x + self.down_proj(F.gelu(self.up_proj(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init)
        # GPT-2's init: shrink the projections that write into the residual stream, so its
        # variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """``idx`` ``(B, T)`` byte ids -> logits ``(B, T, 256)``."""
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        # Output layer tied to the input embedding: fewer parameters, a better small model.
        return F.linear(self.ln_f(x), self.tok_emb.weight)


def gpt_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


# -----------------------------------------------------------------------------
# A reference LoRA (Hu et al. 2021), the baseline RandLoRA is compared with


class LoraLinear(nn.Module):
    """``y = base(x) + (alpha / r) * x A^T B^T`` with ``A`` ``(r, in)``, ``B`` ``(out, r)``.

    Initialised as in the paper and PEFT: ``A`` Kaiming-uniform, ``B = 0`` (so the model starts
    exactly as the base model).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base, self.scaling = base, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scaling the small B rather than the (tokens, out) product saves a large temporary.
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B * self.scaling)


def inject_lora(model: nn.Module, targets: Sequence[str], rank: int, alpha: float) -> nn.Module:
    """Freeze ``model`` and wrap every ``nn.Linear`` whose name ends in a target with LoRA."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name.split(".")[-1] in targets:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, LoraLinear(m, rank, alpha))
    return model


def target_shapes(model: nn.Module, targets: Sequence[str]) -> list[tuple[int, int]]:
    """``(in, out)`` of every targeted linear layer."""
    return [(m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]


def randlora_param_count(shapes: list[tuple[int, int]], rank: int) -> int:
    """RandLoRA trains ``lam`` ``(r, n)`` and ``gam`` ``(n, d)`` per layer, ``n = ceil(d / r)``."""
    total = 0
    for i, o in shapes:
        d = min(i, o)
        n = -(-d // rank)
        total += rank * n + n * d
    return total


def matching_lora_rank(shapes: list[tuple[int, int]], budget: int) -> int:
    """The LoRA rank whose ``r * (in + out)`` per layer comes closest to ``budget`` in total."""
    per_rank = sum(i + o for i, o in shapes)
    return max(1, round(budget / per_rank))


# -----------------------------------------------------------------------------
# Measuring: peak memory and a training loop that reports progress


def _release_freed_memory() -> None:
    # glibc keeps freed heap memory mapped; hand it back so the next RSS peak measures only
    # what the next run needs, not what the previous one left behind.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a block of code above what was in use when it started, in MB.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only). CPU: the process's peak resident
    set size from ``resource.getrusage`` (``ru_maxrss``): everything the process touched,
    tensors, allocator slack and Python objects alike. That peak only ever grows, but Linux
    lets a process reset it (write "5" to ``/proc/self/clear_refs``), which is what makes a
    per-block figure possible. Elsewhere (macOS, Windows) ``mb`` stays NaN: not measured.
    """

    def __init__(self, device: torch.device) -> None:
        self.device, self.mb, self.start = device, float("nan"), -1

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        _release_freed_memory()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            with open("/proc/self/statm") as f:  # resident pages, second field
                self.start = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass  # not Linux, or not allowed: leave mb as NaN
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.start) / 2**20
        elif self.start >= 0:
            import resource  # Unix only, hence imported here

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KB on Linux
            self.mb = (peak - self.start) / 2**20


@dataclass
class RunResult:
    method: str
    trainable: int
    loss: float  # held-out fine-tuning text, nats per byte (per token for --hf-model)
    forget_loss: float = float("nan")  # held-out pretraining text
    train_s: float = float("nan")
    tokens_per_s: float = float("nan")
    peak_mb: float = float("nan")


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 10% of steps, then cosine decay to 10% of ``peak``."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Run:
    """One method being trained: its model, its AdamW optimizer and what was measured."""

    def __init__(self, method: str, model: nn.Module, lr: float, weight_decay: float = 0.0) -> None:
        self.method, self.model, self.lr = method, model, lr
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
        self.seconds, self.tokens, self.peak_mb = 0.0, 0, float("nan")
        self.recent: list[tuple[float, float, int]] = []  # (loss, seconds, tokens) since the last report

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float, loss_fn: LossFn, device: torch.device, measure_memory: bool) -> None:
        # Every step of a run has the same shapes, so its peak memory is reached in the first
        # steps (the first also creates the optimizer state): measure those, train the rest freely.
        mem = PeakMemory(device) if measure_memory else contextlib.nullcontext()
        with mem:
            start = time.perf_counter()
            for group in self.opt.param_groups:
                group["lr"] = lr
            loss = loss_fn(self.model, x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            value = loss.item()  # waits for the device, so the time below is honest
            seconds = time.perf_counter() - start
        if isinstance(mem, PeakMemory) and not math.isnan(mem.mb):
            self.peak_mb = mem.mb if math.isnan(self.peak_mb) else max(self.peak_mb, mem.mb)
        self.seconds, self.tokens = self.seconds + seconds, self.tokens + x.numel()
        self.recent.append((value, seconds, x.numel()))

    def report(self) -> str:
        """Mean loss and throughput since the previous report."""
        loss = sum(r[0] for r in self.recent) / len(self.recent)
        rate = sum(r[2] for r in self.recent) / sum(r[1] for r in self.recent)
        self.recent = []
        return f"{self.method} loss {loss:.3f} {rate:>6,.0f} tok/s"


def train(
    runs: list[Run],
    data: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    device: torch.device,
    loss_fn: LossFn = gpt_loss,
    log_every: int = 25,
) -> None:
    """Train every run on the same batches, one step of each in turn.

    Taking turns (rather than one whole run after the other) means that a slow moment of the
    machine, a busy neighbour or a throttling CPU slows every method alike: the times compare.
    """
    for run in runs:
        run.model.train()
    for step in range(steps):
        x, y = (t.to(device) for t in next(data))
        for run in runs:
            run.step(x, y, lr_at(step, steps, run.lr), loss_fn, device, measure_memory=step < 3)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"  step {step + 1:>4}/{steps} | " + " | ".join(run.report() for run in runs), flush=True)
    for run in runs:
        del run.opt  # free the optimizer state


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, device: torch.device, batch: int, loss_fn: LossFn = gpt_loss) -> float:
    """Mean cross-entropy (nats per token) over ``windows`` ``(count, context + 1)``."""
    model.eval()
    total = 0.0
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch].to(device)
        total += loss_fn(model, w[:, :-1], w[:, 1:]).item() * len(w)
    return total / len(windows)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def print_table(rows: list[RunResult], unit: str, device: torch.device) -> None:
    """The results as a markdown table (columns nobody measured are left out)."""
    fmt = lambda v, spec: "-" if math.isnan(v) else format(v, spec)  # NaN: not measured
    columns: list[tuple[str, Callable[[RunResult], str]]] = [
        ("method", lambda r: r.method),
        ("trainable params", lambda r: f"{r.trainable:,}"),
        (f"held-out loss ({unit})", lambda r: f"{r.loss:.4f}"),
        ("perplexity", lambda r: f"{math.exp(r.loss):.2f}"),
        ("source loss", lambda r: fmt(r.forget_loss, ".4f")),
        ("train time (s)", lambda r: fmt(r.train_s, ".1f")),
        ("tokens/s", lambda r: fmt(r.tokens_per_s, ",.0f")),
        ("peak GPU MB" if device.type == "cuda" else "peak RSS MB", lambda r: fmt(r.peak_mb, ",.0f")),
    ]
    if all(math.isnan(r.forget_loss) for r in rows):
        columns.pop(4)
    print("\n| " + " | ".join(name for name, _ in columns) + " |")
    print("| --- |" + " ---: |" * (len(columns) - 1))
    for r in rows:
        print("| " + " | ".join(cell(r) for _, cell in columns) + " |")


def time_forward(models: dict[str, nn.Module], x: torch.Tensor, device: torch.device, repeats: int = 20) -> dict[str, float]:
    """Median seconds per forward of each model on ``x``, calls interleaved so that a slow
    moment of the machine hits every model alike."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m.eval()
            m(x)  # warm-up
        for _ in range(repeats):
            for name, m in models.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t = time.perf_counter()
                m(x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append(time.perf_counter() - t)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


# -----------------------------------------------------------------------------
# The experiment


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_threads(threads: int | None) -> None:
    # PyTorch defaults to the number of physical cores of the machine, which oversubscribes a
    # container limited to fewer CPUs; use the CPUs this process may actually run on.
    if threads is None and hasattr(os, "sched_getaffinity"):
        threads = len(os.sched_getaffinity(0))
    if threads:
        torch.set_num_threads(max(1, threads))


def run_comparison(args: argparse.Namespace) -> list[RunResult]:
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    cfg = GPTConfig(context=args.context, d_model=args.d_model, n_layer=args.layers, n_head=args.heads)

    code_train, code_held = stdlib_source(args.pretrain_bytes)
    doc_train, doc_held, held_keys = pydoc_topics()
    doc_eval = eval_windows(as_tokens(doc_held), cfg.context, args.eval_tokens)
    code_eval = eval_windows(as_tokens(code_held), cfg.context, args.eval_tokens // 4)
    print(
        f"data: pretrain on {len(code_train):,} bytes of Python's standard-library source; fine-tune on "
        f"{len(doc_train):,} bytes of pydoc topics; evaluate on {doc_eval.numel() - len(doc_eval):,} bytes "
        f"of {len(held_keys)} held-out topics ({', '.join(held_keys[:4])}, ...)"
    )

    # 1. Pretraining: the "foundation model" every method starts from.
    base = GPT(cfg).to(device)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"\n== pretraining a {n_params:,}-parameter byte-level GPT ({cfg.n_layer} layers, d_model "
          f"{cfg.d_model}, context {cfg.context}), {args.pretrain_steps} steps of {args.batch} x {cfg.context} bytes ==")
    start = time.perf_counter()
    train([Run("pretrain", base, args.pretrain_lr, weight_decay=0.1)],
          batches(as_tokens(code_train), args.batch, cfg.context, args.seed), args.pretrain_steps, device,
          log_every=max(1, args.pretrain_steps // 6))
    print(f"  pretraining took {time.perf_counter() - start:.1f} s")
    base.requires_grad_(False)

    # 2. Parameter budgets: RandLoRA's count is set by its rank; LoRA's rank is chosen to match.
    shapes = target_shapes(base, TARGETS)
    rl_params = randlora_param_count(shapes, args.rank)
    lora_rank = matching_lora_rank(shapes, rl_params)
    lora_params = lora_rank * sum(i + o for i, o in shapes)
    print(f"\ntrainable parameters: RandLoRA rank {args.rank}: {rl_params:,}; LoRA rank {lora_rank}: {lora_params:,} "
          f"({100 * (lora_params / rl_params - 1):+.1f}%); full fine-tuning: {n_params:,}")

    # 3. Fine-tuning: three copies of the pretrained model, trained on the same batches.
    # LoRA: alpha = 2 * rank (scaling 2), a common choice.
    lora = Run(f"LoRA r{lora_rank}", inject_lora(copy.deepcopy(base), TARGETS, lora_rank, alpha=2.0 * lora_rank), args.lr_lora)
    # RandLoRA: alpha defaults to 20 * rank (scaling 20, as in PEFT): gam starts as small as
    # 1 / max(n, d), and the scaling brings the update back to a size the learning rate can move.
    rl = Run(f"RandLoRA r{args.rank}", randlora.inject(copy.deepcopy(base), TARGETS, rank=args.rank, seed=args.seed), args.lr_randlora)
    full = Run("full fine-tuning", copy.deepcopy(base).requires_grad_(True), args.lr_full)
    runs = [lora, rl, full]
    for run in runs:
        print(f"{run.method}: {count_trainable(run.model):,} trainable parameters, AdamW lr {run.lr:g}")
    print(f"\n== fine-tuning on pydoc topics, {args.steps} steps of {args.batch} x {cfg.context} bytes ==")
    train(runs, batches(as_tokens(doc_train), args.batch, cfg.context, args.seed + 1), args.steps, device)

    results = [RunResult("frozen (no fine-tuning)", 0, evaluate(base, doc_eval, device, args.batch), evaluate(base, code_eval, device, args.batch))]
    for run in runs:
        results.append(RunResult(run.method, count_trainable(run.model), evaluate(run.model, doc_eval, device, args.batch),
                                 evaluate(run.model, code_eval, device, args.batch), run.seconds, run.tokens / run.seconds, run.peak_mb))
    print_table(results, "nats/byte", device)
    print("source loss: held-out Python source (the pretraining domain); a rise after fine-tuning is forgetting.")
    what = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "the process's peak resident set size (getrusage ru_maxrss)"
    print(f"peak MB: {what} during a training step, above what was in use before it (activations, gradients, optimizer state).")
    del lora, full

    check_adapter(rl.model, base, doc_eval, device, args)
    return results


def check_adapter(trained: nn.Module, base: nn.Module, windows: torch.Tensor, device: torch.device, args: argparse.Namespace) -> None:
    """Save the adapter, reload it into a fresh copy of the base model, compare, merge, time."""
    print("\n== the RandLoRA adapter ==")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    randlora.save_adapter(trained, args.out)
    print(f"saved {args.out}: {os.path.getsize(args.out) / 1024:,.1f} KB "
          "(lam and gam only; the random bases are regenerated from the seed)")

    # load_adapter injects into the plain model exactly the layers and settings the file records.
    fresh = randlora.load_adapter(copy.deepcopy(base), args.out)
    x = windows[: args.batch, :-1].to(device)
    trained.eval()
    fresh.eval()
    with torch.no_grad():
        y_trained, y_loaded = trained(x), fresh(x)
    print(f"reload check: outputs of the reloaded adapter and the trained model are "
          f"{'identical' if torch.equal(y_trained, y_loaded) else 'DIFFERENT'} (torch.equal)")

    # Merging adds scaling * ΔW into each base weight: every layer then computes just its plain
    # nn.Linear, so inference costs what the base model's does (randlora.eject also drops the
    # wrappers). Unmerged, the adapter is computed on every call.
    randlora.merge(fresh)
    with torch.no_grad():
        diff = (fresh(x) - y_trained).abs().max().item()
    print(f"merged: max |merged - unmerged| logit difference {diff:.2e} (float32 rounding)")
    unmerged = randlora.load_adapter(copy.deepcopy(base), args.out)
    t = time_forward({"base": base, "merged": fresh, "unmerged": unmerged}, x, device)
    print(f"inference, batch {tuple(x.shape)}: base {t['base'] * 1e3:.2f} ms, merged RandLoRA {t['merged'] * 1e3:.2f} ms "
          f"(ratio {t['merged'] / t['base']:.2f}), unmerged RandLoRA {t['unmerged'] * 1e3:.2f} ms "
          f"(ratio {t['unmerged'] / t['base']:.2f})")


# -----------------------------------------------------------------------------
# The same recipe on a local Hugging Face model


def hf_linear_targets(model: nn.Module) -> list[str]:
    """Every linear layer of the model except the output head (and tied embeddings)."""
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D") and m is not head]


def finetune_hf(args: argparse.Namespace) -> list[RunResult]:
    """Fine-tune a local ``transformers`` causal LM with RandLoRA on a local text file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # only needed on this path

    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.hf_model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.hf_model, local_files_only=True).to(device)
    with open(args.text, encoding="utf-8") as f:
        ids = torch.tensor(tokenizer(f.read(), verbose=False)["input_ids"], dtype=torch.long)
    # The last 10% of the file is held out for evaluation.
    cut = int(len(ids) * 0.9)
    train_ids, held_ids = ids[:cut], ids[cut:]
    context = min(args.context, len(held_ids) - 1, len(train_ids) - 2)
    if context < 2:
        raise SystemExit(f"{args.text} is too short: {len(ids)} tokens")
    held = eval_windows(held_ids, context, args.eval_tokens)
    print(f"{args.hf_model}: {sum(p.numel() for p in model.parameters()):,} parameters; {args.text}: "
          f"{len(train_ids):,} training and {held.numel() - len(held):,} held-out tokens, context {context}")

    def hf_loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = m(input_ids=x).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    results = [RunResult("frozen (no fine-tuning)", 0, evaluate(model, held, device, args.batch, hf_loss))]
    base = copy.deepcopy(model)  # kept to check that the saved adapter reloads exactly
    targets = args.targets or hf_linear_targets(model)
    randlora.inject(model, targets, rank=args.rank, seed=args.seed)
    print(randlora.summary(model))
    run = Run(f"RandLoRA r{args.rank}", model, args.lr_randlora)
    print(f"\n== {run.method}: AdamW lr {run.lr:g}, {args.steps} steps of {args.batch} x {context} tokens ==")
    train([run], batches(train_ids, args.batch, context, args.seed + 1), args.steps, device, hf_loss,
          log_every=max(1, min(25, args.steps // 4)))
    results.append(RunResult(run.method, count_trainable(model), evaluate(model, held, device, args.batch, hf_loss),
                             train_s=run.seconds, tokens_per_s=run.tokens / run.seconds, peak_mb=run.peak_mb))
    print_table(results, "nats/token", device)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    randlora.save_adapter(model, args.out)
    fresh = randlora.load_adapter(base, args.out)
    x = held[: args.batch, :-1].to(device)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        same = torch.equal(model(input_ids=x).logits, fresh(input_ids=x).logits)
    print(f"\nsaved {args.out}; reload check: outputs {'identical' if same else 'DIFFERENT'} (torch.equal)")
    return results


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--steps", type=int, default=120, help="fine-tuning steps, the same for every method (default: %(default)s)")
    p.add_argument("--rank", type=int, default=16, help="RandLoRA rank r: n = ceil(d / r) bases per layer, so a smaller r trains "
                   "more parameters; LoRA's rank is chosen to match the count (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="model init, batch order and RandLoRA's random bases (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the CPUs this process may use)")
    p.add_argument("--out", default=os.path.join("out", "randlora_adapter.safetensors"), help="where to save the RandLoRA adapter (default: %(default)s)")
    # Each method at the best of a one-off learning-rate sweep on this task (default sizes,
    # seed 0, held-out loss): 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 4e-2 for the adapters and
    # 2.5e-4 ... 8e-3 for full fine-tuning. One shared value would favour whichever method its
    # scale suits: RandLoRA's update is multiplied by alpha / r = 20, this LoRA's by 2, and
    # RandLoRA's best rate came out 4x lower than LoRA's.
    lrs = p.add_argument_group("AdamW peak learning rates (best of a sweep on the default task; a real LLM usually wants far lower ones)")
    lrs.add_argument("--lr-lora", type=float, default=2e-2, help="(default: %(default)s)")
    lrs.add_argument("--lr-randlora", type=float, default=5e-3, help="also used with --hf-model (default: %(default)s)")
    lrs.add_argument("--lr-full", type=float, default=4e-3, help="(default: %(default)s)")
    sizes = p.add_argument_group("model and data sizes (the defaults take about 2 minutes on 2 CPU cores)")
    sizes.add_argument("--pretrain-steps", type=int, default=240, help="(default: %(default)s)")
    sizes.add_argument("--pretrain-lr", type=float, default=3e-3, help="(default: %(default)s)")
    sizes.add_argument("--pretrain-bytes", type=int, default=2_000_000, help="bytes of standard-library source to pretrain on (default: %(default)s)")
    sizes.add_argument("--d-model", type=int, default=128, help="(default: %(default)s)")
    sizes.add_argument("--layers", type=int, default=4, help="(default: %(default)s)")
    sizes.add_argument("--heads", type=int, default=4, help="(default: %(default)s)")
    sizes.add_argument("--context", type=int, default=128, help="tokens per sequence (default: %(default)s)")
    sizes.add_argument("--batch", type=int, default=16, help="sequences per step (default: %(default)s)")
    sizes.add_argument("--eval-tokens", type=int, default=40_000, help="cap on held-out tokens evaluated (default: %(default)s)")
    sizes.add_argument("--tiny", action="store_true", help="a seconds-long smoke test: replaces the sizes above by tiny ones")
    hf = p.add_argument_group("fine-tune a local Hugging Face causal LM instead (needs transformers; nothing is downloaded)")
    hf.add_argument("--hf-model", metavar="PATH", help="folder with a model and its tokenizer, as written by save_pretrained")
    hf.add_argument("--text", metavar="FILE", help="UTF-8 text file to fine-tune on (its last 10%% is held out)")
    hf.add_argument("--targets", nargs="+", metavar="NAME", help="linear layers to adapt, e.g. q_proj v_proj (default: every linear layer but the output head)")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.pretrain_steps, args.pretrain_bytes = min(args.steps, 6), 10, 50_000
        args.d_model, args.layers, args.heads, args.context, args.batch, args.eval_tokens = 32, 2, 2, 32, 4, 2_000
        args.rank = min(args.rank, 8)
    if args.hf_model and not args.text:
        p.error("--hf-model needs --text FILE")
    return args


def main(argv: Sequence[str] | None = None) -> list[RunResult]:
    args = parse_args(argv)
    set_threads(args.threads)
    start = time.perf_counter()
    print(f"randlora {randlora.__version__}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"device {pick_device(args.device)}, python {sys.version.split()[0]}")
    results = finetune_hf(args) if args.hf_model else run_comparison(args)
    print(f"\ntotal wall time {time.perf_counter() - start:.1f} s")
    return results


if __name__ == "__main__":
    main()
