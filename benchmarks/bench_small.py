"""Whole-model training step on small and medium models: frozen / PEFT LoRA / ours / PEFT RandLoRA, eager and
compiled, at equal trainable-parameter counts.

The issue's setting: "Training step, H100, bf16 weights, AdamW on the trainable parameters, fresh model per run,
RandLoRA rank matched to LoRA r16's parameter count, all linear layers of the blocks targeted, median of 3
interleaved runs", eager, torch.compile (default) and torch.compile(mode="reduce-overhead").

    python benchmarks/bench_small.py --shapes minilm,bert-base --modes eager,compile,ro --json $OUT/bench_small.json
    python benchmarks/bench_small.py --shapes 1b --modes eager --reps 3 --steps 20 --budget-s 480 --json $OUT/b1.json
    python benchmarks/bench_small.py --dry-run --shapes minilm,bert-base,qwen2-0.5b,1b    # the plan and the counts
    python benchmarks/bench_small.py --tiny            # CPU, tiny shapes, a few steps: the end-to-end smoke test
    python benchmarks/bench_small.py --report a.json b.json   # one table from the runs of several calls

Other flags: --compiled-reps N (repeats for compiled modes; default --reps), --warmup / --warmup-compiled,
--threads N (torch.set_num_threads; 1 with --tiny), --device cuda|cpu, --dtype bfloat16|float32 (the weights).

Shapes (random weights from transformers configs, seed 0, built directly on the device in bf16; ``NAME:BxS``
overrides the batch, e.g. ``1b:1x2048``):
  minilm      BertModel, all-MiniLM-L6-v2's config (hidden 384, 6 layers, 12 heads, MLP 1536, vocab 30522); 64 x 64
  bert-base   BertModel (hidden 768, 12 layers, 12 heads, MLP 3072, vocab 30522); 32 x 128
  qwen2-0.5b  Qwen2ForCausalLM (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocab 151936, tied
              embeddings, rope_theta 1e6); 4 x 512
  1b          LlamaForCausalLM (hidden 2048, MLP 5632, 16 layers, 16 heads, 16 KV heads, vocab 32000); 4 x 1024
  tiny-bert, tiny-qwen2, tiny-llama    two-layer versions (hidden 64) for CPU tests; 2 x 16
  host-bert    BERT-base's 12 blocks at hidden 32, 1 x 4 tokens: a step that is all host time (CPU comparisons)
Targets: every linear layer inside the transformer blocks (not embeddings, pooler or lm_head):
  BERT         ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
               (6 per block; "output.dense" also matches "attention.output.dense": PEFT's and randlora's suffix rule)
  Qwen2/LLaMA  ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] (7 per block)
The script checks that each method adapted exactly those layers (count) and that the pooler / lm_head is not one.
Loss: decoders, the causal LM loss (labels = input ids, use_cache=False; transformers computes it in float32);
BERT, last_hidden_state.float().square().mean() (BERT has no head; this is differentiable in every layer).
The model is in train mode (BERT's dropout 0.1 on, as its config says; the decoders have no dropout).

Methods (``--methods``):
  frozen    no adapter, everything frozen. To have a backward at all, the model is called with
            inputs_embeds = (the batch's word embeddings, computed once outside the step, detached, requires_grad):
            loss.backward() computes every activation gradient down to the embeddings and no parameter gradient;
            no optimizer (nothing to step). That is the floor every adapter's step pays (an adapter on the first
            block needs dX down to the first block; the frozen floor also has the position/LayerNorm part of BERT's
            embeddings and skips the word-embedding gather).
  lora      PEFT LoRA r16, alpha 32, no dropout (get_peft_model defaults otherwise: built after the bf16 model,
            so PEFT keeps its adapter weights float32, autocast_adapter_dtype=True)
  ours      randlora.inject(model, targets, rank=R), R = the RandLoRA rank whose total trainable count over the
            targets is closest to LoRA r16's (count per layer: r*n + n*d, d = min(in, out), n = ceil(d / r));
            lam/gam float32
  randlora  PEFT RandLoRA at the same rank R, PEFT's defaults otherwise (alpha 640, dense bases)
  ours-hold ours with each step inside randlora.hold_weights(model) (opt-in; not in the default set)
  ours-torch ours with randlora.TRITON set False for the run: S and dlam/dgam from torch ops, never the Triton
            kernels (opt-in: what the kernels' launches cost or save on the host)
Adapter parameters that start at zero (lora_B, randlora_lambda, lam) are drawn from N(0, 0.02) before timing.
AdamW (lr 1e-5, torch's defaults: foreach on CUDA) over the trainable parameters.

Modes (``--modes``): eager; compile = torch.compile(model); ro = torch.compile(model, mode="reduce-overhead")
(CUDA graphs; each step begins with torch.compiler.cudagraph_mark_step_begin()). The optimizer stays eager.

One run = build a fresh model + adapter (+ torch.compile), ``--warmup`` steps (``--warmup-compiled`` for compiled
modes: compilation happens in the first, CUDA-graph recording in the next ones), reset the peak-memory counter,
then ``--steps`` timed steps back to back, each bracketed by CUDA events (perf_counter on CPU); the run's time is
the median of its steps. A step = forward + loss + backward + AdamW step + zero_grad(set_to_none=True).
Peak = torch.cuda.max_memory_allocated over the timed steps (weights, gradients, optimizer state, activations).
Before every compiled run torch._dynamo.reset() clears dynamo's in-memory caches (a fresh model must not hit the
recompile limit of the code objects earlier models compiled), so each compiled run traces again; inductor's FX
graph cache and AOTAutograd's cache (on disk under /tmp/torchinductor_$USER, kept, also for later processes on
the same machine) make later repeats of a (shape, method, mode) cheaper than its first compile. ours and PEFT
RandLoRA bypass AOTAutograd's cache (their custom autograd.Function), so their repeats redo AOT autograd. Reported per run: build time,
first-step time (compile included) and "compile_s" = first step - the median timed step, the whole warm-up, the
run's wall time, and dynamo's counters for the run: graphs compiled, graph breaks (with reasons), recompiles
(frames compiled more than once, with guard-failure reasons), CUDA-graph skips, cache hits/misses, and whether
anything compiled during the timed steps ("no graph break, no recompile" is a target).

Order: for each shape, for each mode, for each repeat, the methods in turn (A B C A B C ...). The table gives per
(shape, mode, method) the median of the runs' medians, their range, the ratio to PEFT LoRA's median in the same
shape and mode, the peak, and the compile time. A failing run (error, OOM) is recorded with its traceback and
the next run starts. The JSON (``--json``) is rewritten after every run, so a killed process leaves the runs so
far; SIGTERM or SIGINT (a timeout) stops at once, prints the table of the finished runs and writes the JSON.
``--budget-s`` skips runs that would end past that many seconds of wall time (estimated from the same
configuration's last run), so the table and JSON are written inside a call's time limit.

Only randlora's public API is used (inject, named_adapters, hold_weights); a failing ``import randlora`` is
retried twice, then fails only the runs of ours.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # --budget-s counts from here (imports included)

import argparse
import contextlib
import datetime
import gc
import hashlib
import json
import logging
import math
import os
import platform
import signal
import statistics
import sys
import traceback
import warnings

import torch
import torch.nn as nn

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_RANK = 16

SHAPES = {
    "minilm": dict(family="bert", batch=64, seq=64, cfg=dict(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522)),
    "bert-base": dict(family="bert", batch=32, seq=128, cfg=dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=30522)),
    "qwen2-0.5b": dict(family="qwen2", batch=4, seq=512, cfg=dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
        vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=32768)),
    "1b": dict(family="llama", batch=4, seq=1024, cfg=dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
        vocab_size=32000, max_position_embeddings=4096)),
    # BERT-base's depth (12 blocks, 72 adapted layers) at a width where arithmetic is negligible: the host's share
    "host-bert": dict(family="bert", batch=1, seq=4, cfg=dict(
        hidden_size=32, num_hidden_layers=12, num_attention_heads=2, intermediate_size=64, vocab_size=100)),
    "tiny-bert": dict(family="bert", batch=2, seq=16, cfg=dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=1000)),
    "tiny-qwen2": dict(family="qwen2", batch=2, seq=16, cfg=dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=1000, tie_word_embeddings=True, max_position_embeddings=256)),
    "tiny-llama": dict(family="llama", batch=2, seq=16, cfg=dict(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=256, max_position_embeddings=256)),
}
METHODS = ("frozen", "lora", "ours", "randlora", "ours-hold", "ours-torch")
MODES = ("eager", "compile", "ro")
DEFAULT_SHAPES = "minilm,bert-base,qwen2-0.5b,1b"
TINY_SHAPES = "tiny-bert,tiny-qwen2,tiny-llama"


class Stop(Exception):
    """SIGTERM/SIGINT: stop now, print the table, write the JSON."""


# -----------------------------------------------------------------------------
# Counting and matching


def name_matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def target_layers(model: nn.Module, targets: list[str]) -> list[tuple[str, int, int]]:
    """(name, in, out) of every nn.Linear a list of suffixes selects (PEFT's and randlora's rule)."""
    return [
        (n, m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(name_matches(n, t) for t in targets)
    ]


def randlora_count(shapes, r: int) -> int:
    total = 0
    for i, o in shapes:
        d = min(i, o)
        n = math.ceil(d / r)
        total += r * n + n * d
    return total


def lora_count(shapes, k: int) -> int:
    return sum(k * (i + o) for i, o in shapes)


def equal_count_rank(shapes, lora_rank: int) -> int:
    """The RandLoRA rank (1 .. the smallest min(in, out)) whose total count is closest to LoRA's (ties: larger)."""
    target = lora_count(shapes, lora_rank)
    top = min(min(i, o) for i, o in shapes)
    return min(range(1, top + 1), key=lambda r: (abs(randlora_count(shapes, r) - target), -r))


# -----------------------------------------------------------------------------
# Building


def import_randlora(tries: int = 3, wait_s: float = 2.0):
    for i in range(tries):
        try:
            import randlora

            return randlora
        except Exception:
            if i == tries - 1:
                raise
            time.sleep(wait_s)
    return None


def parse_shape(text: str) -> dict:
    name, _, bs = text.partition(":")
    if name not in SHAPES:
        raise SystemExit(f"unknown shape {name!r}: one of {', '.join(SHAPES)}")
    spec = dict(SHAPES[name], name=text, base=name)
    if bs:
        b, s = (int(v) for v in bs.lower().split("x"))
        spec.update(batch=b, seq=s)
    spec["targets"] = BERT_TARGETS if spec["family"] == "bert" else DECODER_TARGETS
    return spec


def model_class(family: str):
    import transformers as tf

    return {
        "bert": (tf.BertConfig, tf.BertModel),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
    }[family]


def build_base(spec: dict, device: str, dtype: torch.dtype) -> nn.Module:
    conf_cls, cls = model_class(spec["family"])
    cfg = dict(spec["cfg"])
    if spec["family"] == "bert":
        cfg.setdefault("max_position_embeddings", max(512, spec["seq"]))
    else:
        cfg["max_position_embeddings"] = max(cfg.get("max_position_embeddings", 0), spec["seq"])
    config = conf_cls(**cfg)
    config.use_cache = False
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(old)
    model.requires_grad_(False)
    return model


def shape_info(spec: dict) -> dict:
    """Targets, their shapes and the equal-count rank, from the model built on the meta device (no memory)."""
    model = build_base(spec, "meta", torch.bfloat16)
    layers = target_layers(model, spec["targets"])
    excluded = [n for n, *_ in layers if "pooler" in n or "lm_head" in n or "embed" in n]
    if excluded:
        raise RuntimeError(f"{spec['name']}: targets select {excluded}")
    shapes = [(i, o) for _, i, o in layers]
    r = equal_count_rank(shapes, LORA_RANK)
    n_blocks = spec["cfg"]["num_hidden_layers"]
    info = dict(
        shape=spec["name"], family=spec["family"], batch=spec["batch"], seq=spec["seq"], targets=spec["targets"],
        adapted_layers=len(layers), per_block=len(layers) // n_blocks, blocks=n_blocks,
        layer_shapes=sorted({f"{i}->{o}" for i, o in shapes}),
        lora_rank=LORA_RANK, lora_count=lora_count(shapes, LORA_RANK),
        rand_rank=r, rand_count=randlora_count(shapes, r),
        base_params=sum(p.numel() for p in model.parameters()),
    )
    del model
    return info


def attach(method: str, model: nn.Module, spec: dict, info: dict) -> nn.Module:
    targets = spec["targets"]
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0, target_modules=targets)
        model = get_peft_model(model, cfg)
    elif method == "randlora":
        from peft import RandLoraConfig, get_peft_model

        model = get_peft_model(model, RandLoraConfig(r=info["rand_rank"], target_modules=targets))
    elif method in ("ours", "ours-hold", "ours-torch"):
        randlora = import_randlora()
        randlora.inject(model, targets, rank=info["rand_rank"])
        got = len(list(randlora.named_adapters(model)))
        if got != info["adapted_layers"]:
            raise RuntimeError(f"randlora adapted {got} layers, expected {info['adapted_layers']}")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.numel() and not p.is_meta and not bool(p.any()):
                p.normal_(0, 0.02)  # never time on zeros (flops.py counts on the meta device: no values)
    return model


def adapted_count(method: str, model: nn.Module) -> int | None:
    """How many layers the method adapted (PEFT: modules holding lora_A / randlora_lambda)."""
    if method == "lora":
        return sum(1 for m in model.modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {})) > 0)
    if method == "randlora":
        return sum(1 for m in model.modules() if hasattr(m, "randlora_lambda") and len(m.randlora_lambda) > 0)
    return None


# -----------------------------------------------------------------------------
# Dynamo bookkeeping


class LogCapture(logging.Handler):
    """Keeps warnings from torch._dynamo / torch._inductor (recompile limit, CUDA-graph skips) for the run record."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[str] = []
        self._last = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            key = (record.created, record.getMessage())
            if key == self._last:  # the same record seen through a logger and its parent
                return
            self._last = key
            if len(self.records) < 20:
                self.records.append(f"{record.name}: {record.getMessage()[:400]}")
        except Exception:
            pass


CAPTURE = LogCapture()


def install_log_capture() -> None:
    try:
        import torch._dynamo  # noqa: F401
        import torch._inductor.cudagraph_utils  # noqa: F401  (creates the "cudagraphs" artifact logger)
    except Exception:
        pass
    for name in ("torch._dynamo", "torch._inductor"):
        logging.getLogger(name).addHandler(CAPTURE)
    capture_artifacts()


def capture_artifacts() -> None:
    """Artifact loggers (off by default, not propagated): the CUDA-graph skip reasons. Attached where they exist."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.") and name.endswith("__cudagraphs"):
            lg = logging.getLogger(name)
            if CAPTURE not in lg.handlers:
                lg.addHandler(CAPTURE)


def first_line(text: str, limit: int = 240) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return (lines[0] if lines else "")[:limit]


def dynamo_snapshot() -> dict:
    """dynamo's counters since the last reset (they are cleared before each compiled run)."""
    out: dict = {}
    try:
        from torch._dynamo.utils import counters

        gb = counters.get("graph_break", {})
        out["graph_breaks"] = int(sum(gb.values()))
        out["graph_break_reasons"] = [f"{c}x {first_line(k)}" for k, c in list(gb.items())[:8]]
        out["unique_graphs"] = int(counters.get("stats", {}).get("unique_graphs", 0))
        out["frames"] = int(counters.get("frames", {}).get("total", 0))
        ind = counters.get("inductor", {})
        out["cudagraph_skips"] = int(ind.get("cudagraph_skips", 0))
        out["fxgraph_cache"] = {k: int(v) for k, v in ind.items() if k.startswith("fxgraph_cache")}
        out["aot_cache"] = {k: int(v) for k, v in counters.get("aot_autograd", {}).items() if "cache" in k}
    except Exception as e:
        out["counters_error"] = repr(e)[:200]
    try:
        from torch._dynamo import convert_frame

        fcc = getattr(convert_frame, "FRAME_COMPILE_COUNTER", None)
        if fcc is not None:
            out["recompiles"] = int(sum(max(c - 1, 0) for c in fcc.values()))
            out["frames_compiled"] = int(sum(fcc.values()))
    except Exception as e:
        out["recompiles_error"] = repr(e)[:200]
    try:
        from torch._dynamo.utils import guard_failures

        reasons = []
        for code, fails in guard_failures.items():
            for f in fails[:3]:
                reasons.append(f"{getattr(code, 'co_name', code)}: {first_line(f, 200)}")
        out["recompile_reasons"] = reasons[:10]
    except Exception:
        pass
    return out


def compile_phase_times() -> dict[str, float]:
    """dynamo's cumulative compile time per phase (seconds; not cleared by torch._dynamo.reset)."""
    try:
        from torch._dynamo.utils import calculate_time_spent

        return dict(calculate_time_spent())
    except Exception:
        return {}


def reset_dynamo() -> None:
    try:
        import torch._dynamo
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()
    except Exception:
        pass


# -----------------------------------------------------------------------------
# One run


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def make_step(method: str, mode: str, model: nn.Module, fn, spec: dict, device: str):
    """The training step (returns the loss tensor) and the optimizer."""
    family = spec["family"]
    g = torch.Generator(device="cpu").manual_seed(2)
    ids = torch.randint(0, spec["cfg"]["vocab_size"], (spec["batch"], spec["seq"]), generator=g).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "frozen":
        if params:
            raise RuntimeError(f"frozen model has {len(params)} trainable tensors")
        with torch.no_grad():
            emb = model.get_input_embeddings()(ids)
        emb = emb.detach().requires_grad_(True)
        inputs = dict(inputs_embeds=emb)
        opt = None
    else:
        if not params:
            raise RuntimeError("no trainable parameter")
        emb = None
        inputs = dict(input_ids=ids)
        opt = torch.optim.AdamW(params, lr=1e-5)
    if family != "bert":
        inputs.update(labels=ids, use_cache=False)
    hold = import_randlora().hold_weights if method == "ours-hold" else None
    ro = mode == "ro"

    def step():
        if ro:
            torch.compiler.cudagraph_mark_step_begin()
        with hold(model) if hold is not None else contextlib.nullcontext():
            out = fn(**inputs)
            loss = out.last_hidden_state.float().square().mean() if family == "bert" else out.loss
            loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            emb.grad = None
        return loss

    return step, opt, params


def run_one(spec: dict, info: dict, method: str, mode: str, rep: int, args, device: str) -> dict:
    rec = dict(shape=spec["name"], mode=mode, method=method, rep=rep, status="ok")
    compiled = mode != "eager"
    t_run = time.perf_counter()
    CAPTURE.records.clear()
    model = fn = step = opt = params = None
    triton_was = None
    try:
        if method == "ours-torch":
            rl = import_randlora()
            triton_was, rl.TRITON = rl.TRITON, False
        if compiled:
            reset_dynamo()
        if device == "cuda":
            rec["mem_start_gb"] = torch.cuda.memory_allocated() / 1e9
        t0 = time.perf_counter()
        model = build_base(spec, device, getattr(torch, args.dtype))
        model = attach(method, model, spec, info)
        model.train()
        sync(device)
        rec["build_s"] = time.perf_counter() - t0
        params_all = [p for p in model.parameters() if p.requires_grad]
        rec["trainable"] = sum(p.numel() for p in params_all)
        rec["trainable_dtypes"] = sorted({str(p.dtype).replace("torch.", "") for p in params_all})
        n_adapted = adapted_count(method, model)
        if n_adapted is not None:
            rec["adapted_layers"] = n_adapted
            if n_adapted != info["adapted_layers"]:
                raise RuntimeError(f"{method} adapted {n_adapted} layers, expected {info['adapted_layers']}")
        if device == "cuda":
            rec["weights_gb"] = torch.cuda.memory_allocated() / 1e9
        fn = model
        if compiled:
            fn = torch.compile(model) if mode == "compile" else torch.compile(model, mode="reduce-overhead")
        step, opt, params = make_step(method, mode, model, fn, spec, device)
        capture_artifacts()

        warm = args.warmup_compiled if compiled else args.warmup
        phases0 = compile_phase_times() if compiled else {}
        t0 = time.perf_counter()
        step()
        sync(device)
        rec["first_step_s"] = time.perf_counter() - t0
        for _ in range(max(warm - 1, 0)):
            step()
        sync(device)
        rec["warmup_s"] = time.perf_counter() - t0
        if compiled:
            rec["dynamo_warmup"] = dynamo_snapshot()
            phases1 = compile_phase_times()
            rec["compile_phases_s"] = {k: round(v - phases0.get(k, 0.0), 3) for k, v in phases1.items()
                                       if v - phases0.get(k, 0.0) > 0.005}
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        host = []
        if device == "cuda":
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(args.steps)]
            t0 = time.perf_counter()
            loss = None
            for a, b in ev:
                loss = None  # no output of an earlier step stays alive (CUDA-graph outputs are reused)
                h0 = time.perf_counter()
                a.record()
                loss = step()
                b.record()
                host.append((time.perf_counter() - h0) * 1e3)
            torch.cuda.synchronize()
            rec["timed_wall_s"] = time.perf_counter() - t0
            times = [a.elapsed_time(b) for a, b in ev]
            rec["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        else:
            times = []
            t0 = time.perf_counter()
            loss = None
            for _ in range(args.steps):
                loss = None
                h0 = time.perf_counter()
                loss = step()
                times.append((time.perf_counter() - h0) * 1e3)
            rec["timed_wall_s"] = time.perf_counter() - t0
            host = times
        rec["loss"] = float(loss.detach().float().item())
        del loss
        if not math.isfinite(rec["loss"]):
            rec["status"] = "nonfinite-loss"
        rec["step_ms"] = [round(t, 4) for t in times]
        rec["ms"] = statistics.median(times)
        rec["host_ms"] = statistics.median(host)
        rec["compile_s"] = max(rec["first_step_s"] - rec["ms"] / 1e3, 0.0) if compiled else None
        if compiled:
            rec["dynamo"] = snap = dynamo_snapshot()
            w = rec["dynamo_warmup"]
            rec["compiled_while_timed"] = snap.get("frames_compiled", 0) != w.get("frames_compiled", 0) or snap.get(
                "unique_graphs", 0
            ) != w.get("unique_graphs", 0)
    except Stop:
        raise
    except Exception as exc:  # one configuration failing must not stop the run
        rec["status"] = "oom" if "out of memory" in str(exc).lower() else "error"
        rec["error"] = f"{type(exc).__name__}: {first_line(exc, 600)}"
        rec["traceback"] = traceback.format_exc()[-4000:]
        if compiled:
            try:
                rec["dynamo"] = dynamo_snapshot()
            except Exception:
                pass
    finally:
        if triton_was is not None:
            import_randlora().TRITON = triton_was
        if CAPTURE.records:
            rec["log"] = list(CAPTURE.records)
        model = fn = step = opt = params = None  # noqa: F841  (drop the references before freeing)
        if compiled:
            reset_dynamo()  # frees CUDA-graph pools
        free(device)
        rec["wall_s"] = time.perf_counter() - t_run
    return rec


# -----------------------------------------------------------------------------
# Report


def summarize(runs: list[dict], infos: dict) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["shape"], r["mode"], r["method"]), []).append(r)
    rows = []
    for (shape, mode, method), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok" and "ms" in r]
        row = dict(shape=shape, mode=mode, method=method, runs=len(rs), ok=len(ok),
                   statuses=sorted({r["status"] for r in rs if r["status"] != "ok"}))
        if ok:
            ms = [r["ms"] for r in ok]
            row.update(ms=statistics.median(ms), ms_min=min(ms), ms_max=max(ms))
            row["host_ms"] = statistics.median(r["host_ms"] for r in ok if "host_ms" in r)
            if ok[0].get("peak_gb") is not None:
                row["peak_gb"] = max(r["peak_gb"] for r in ok)
            row["trainable"] = ok[0]["trainable"]
            cs = [r["compile_s"] for r in ok if r.get("compile_s") is not None]
            if cs:
                row["compile_s_first"], row["compile_s_later"] = cs[0], (statistics.median(cs[1:]) if len(cs) > 1 else None)
            dyn = [r.get("dynamo", {}) for r in ok if r.get("dynamo")]
            if dyn:
                row["graph_breaks"] = max(d.get("graph_breaks", 0) for d in dyn)
                row["recompiles"] = max(d.get("recompiles", 0) for d in dyn)
                row["graphs"] = max(d.get("unique_graphs", 0) for d in dyn)
                row["cudagraph_skips"] = max(d.get("cudagraph_skips", 0) for d in dyn)
                row["compiled_while_timed"] = any(r.get("compiled_while_timed") for r in ok)
        errs = [r.get("error") for r in rs if r.get("error")]
        if errs:
            row["error"] = errs[0]
        rows.append(row)
    shape_order = list(dict.fromkeys(r["shape"] for r in runs))
    rows.sort(key=lambda x: (shape_order.index(x["shape"]), MODES.index(x["mode"]) if x["mode"] in MODES else 9,
                             METHODS.index(x["method"]) if x["method"] in METHODS else 9))
    for row in rows:
        lora = next((x for x in rows if x["shape"] == row["shape"] and x["mode"] == row["mode"] and x["method"] == "lora"), None)
        if lora and "ms" in lora and "ms" in row:
            row["ratio_lora"] = row["ms"] / lora["ms"]
            row["ranges_overlap_lora"] = not (row["ms_max"] < lora["ms_min"] or row["ms_min"] > lora["ms_max"])
    return rows


def print_table(rows: list[dict], infos: dict, device_name: str, dtype: str = "bfloat16") -> None:
    print(f"\n## bench_small: training step, {device_name}, {dtype} weights, AdamW; median of runs (range)")
    for info in infos.values():
        print(f"# {info['shape']}: {info['adapted_layers']} layers adapted ({info['per_block']} per block x "
              f"{info['blocks']}), {info['batch']}x{info['seq']} tokens; LoRA r{info['lora_rank']} trains "
              f"{info['lora_count']:,}, RandLoRA r{info['rand_rank']} {info['rand_count']:,} "
              f"({info['rand_count'] / info['lora_count']:.3f}x)")
    print("| shape | mode | method | ms / step, median (range) | ÷ LoRA | host ms | peak GB | compile s (1st / later) | graphs / breaks / recompiles / cg skips | runs |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | --- | --- | --- |")
    for r in rows:
        if "ms" in r:
            t = f"{r['ms']:.2f} ({r['ms_min']:.2f}–{r['ms_max']:.2f})"
        else:
            t = f"{','.join(r['statuses'])}: {(r.get('error') or '')[:70]}"
        ratio = f"{r['ratio_lora']:.2f}{'' if not r.get('ranges_overlap_lora') or r['method'] == 'lora' else '~'}" if "ratio_lora" in r else ""
        peak = f"{r['peak_gb']:.2f}" if r.get("peak_gb") is not None else ""
        comp = ""
        if r.get("compile_s_first") is not None:
            later = r.get("compile_s_later")
            comp = f"{r['compile_s_first']:.1f} / {later:.1f}" if later is not None else f"{r['compile_s_first']:.1f}"
        dyn = ""
        if "graphs" in r:
            dyn = f"{r['graphs']} / {r['graph_breaks']} / {r['recompiles']} / {r['cudagraph_skips']}"
            if r.get("compiled_while_timed"):
                dyn += " (compiled while timed!)"
        runs = f"{r['ok']}/{r['runs']}" + (f" {','.join(r['statuses'])}" if r["statuses"] else "")
        host = f"{r['host_ms']:.1f}" if r.get("host_ms") is not None else ""
        print(f"| {r['shape']} | {r['mode']} | {r['method']} | {t} | {ratio} | {host} | {peak} | {comp} | {dyn} | {runs} |")
    print("(÷ LoRA: ratio of medians; '~' = the run ranges overlap LoRA's. host ms: the host's time to issue a step "
          "(close to the step time = host-bound). graphs/breaks/recompiles/cg skips: the most in any run of that row)")


def report(paths: list[str]) -> None:
    runs, infos, devices = [], {}, set()
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        runs += data.get("runs", [])
        infos.update(data.get("shapes", {}))
        devices.add(data.get("env", {}).get("device", "?"))
        dtype = data.get("settings", {}).get("dtype", "bfloat16")
        print(f"# {path}: {len(data.get('runs', []))} runs, {data.get('env', {}).get('device')}, {data.get('date')}, "
              f"randlora.py sha256 {data.get('env', {}).get('randlora_sha256')}, finished {data.get('finished')}")
    print_table(summarize(runs, infos), infos, " + ".join(sorted(devices)), dtype)


def environment(device: str) -> dict:
    env = dict(python=platform.python_version(), torch=torch.__version__, host=platform.node())
    for mod in ("transformers", "peft", "triton"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    if device == "cuda":
        env["device"] = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
        except Exception:
            pass
        env["device"] = f"CPU {name}, {torch.get_num_threads()} threads"
    try:
        with open(os.path.join(ROOT, "randlora.py"), "rb") as f:
            env["randlora_sha256"] = hashlib.sha256(f.read()).hexdigest()[:16]
    except Exception:
        pass
    return env


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help=f"comma separated, NAME or NAME:BxS (default {DEFAULT_SHAPES})")
    ap.add_argument("--methods", default="frozen,lora,ours,randlora", help=f"comma separated: {', '.join(METHODS)}")
    ap.add_argument("--modes", default="eager,compile,ro", help="comma separated: eager, compile, ro")
    ap.add_argument("--reps", type=int, default=3, help="runs per (shape, mode, method), interleaved")
    ap.add_argument("--compiled-reps", type=int, default=None, help="runs for compiled modes (default --reps)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps, eager")
    ap.add_argument("--warmup-compiled", type=int, default=5, help="warm-up steps, compiled modes (>= 3 for CUDA graphs)")
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda if available (cpu with --tiny)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="the model's weights (bf16: the issue's setting)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's; 1 with --tiny)")
    ap.add_argument("--budget-s", type=float, default=None, help="skip runs that would end after this many seconds")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny shapes, 2 repeats of 3 steps, 1 thread")
    ap.add_argument("--dry-run", action="store_true", help="print the shapes, counts and the run plan; run nothing")
    ap.add_argument("--json", default=None, help="write all runs here (rewritten after every run)")
    ap.add_argument("--report", nargs="+", default=None, metavar="JSON",
                    help="run nothing: print one table from the runs of these JSON files (e.g. several GPU calls)")
    args = ap.parse_args()
    if args.report:
        report(args.report)
        return
    if args.tiny:
        args.shapes = args.shapes or TINY_SHAPES
        args.device = args.device or "cpu"
        args.threads = args.threads or 1
        if "--reps" not in sys.argv:
            args.reps = 2
        if "--steps" not in sys.argv:
            args.steps = 3
        if "--warmup" not in sys.argv:
            args.warmup = 1
        if "--warmup-compiled" not in sys.argv:
            args.warmup_compiled = 3
    args.shapes = args.shapes or DEFAULT_SHAPES
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS] + [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown methods/modes {bad}: methods {METHODS}, modes {MODES}")
    specs = [parse_shape(s.strip()) for s in args.shapes.split(",") if s.strip()]
    compiled_reps = args.compiled_reps if args.compiled_reps is not None else args.reps

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = _T0
    env = environment(device)
    print(f"# bench_small on {env['device']}: torch {env['torch']}, transformers {env['transformers']}, "
          f"peft {env['peft']}, triton {env['triton']}; randlora.py sha256 {env.get('randlora_sha256')}", flush=True)
    infos = {}
    for spec in specs:
        try:
            infos[spec["name"]] = info = shape_info(spec)
        except Exception as exc:
            print(f"!! {spec['name']}: {type(exc).__name__}: {exc}", flush=True)
            continue
        print(f"# {spec['name']}: targets {spec['targets']}: {info['adapted_layers']} layers "
              f"({', '.join(info['layer_shapes'])}); LoRA r{LORA_RANK} {info['lora_count']:,} trainable, "
              f"RandLoRA r{info['rand_rank']} {info['rand_count']:,} ({info['rand_count'] / info['lora_count']:.3f}x); "
              f"base {info['base_params'] / 1e6:.1f}M parameters; {spec['batch']}x{spec['seq']} tokens", flush=True)
    plan = [
        (spec, mode, rep, method)
        for spec in specs if spec["name"] in infos
        for mode in modes
        for rep in range(compiled_reps if mode != "eager" else args.reps)
        for method in methods
    ]
    print(f"# {len(plan)} runs: shapes {[s['name'] for s in specs]}, modes {modes}, methods {methods}, "
          f"{args.reps} eager / {compiled_reps} compiled repeats, {args.steps} timed steps, warm-up {args.warmup} / "
          f"{args.warmup_compiled}, device {device}", flush=True)
    if args.dry_run:
        for i, (spec, mode, rep, method) in enumerate(plan):
            print(f"  {i + 1:3d}. {spec['name']} {mode} rep{rep} {method}")
        return

    install_log_capture()
    # transformers' deprecation notice, once per PEFT model under torch.compile: it would fill the output tail
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    payload = dict(script="benchmarks/bench_small.py", argv=sys.argv[1:],
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   env=env, settings=dict(vars(args), device=device, compiled_reps=compiled_reps, lora_rank=LORA_RANK),
                   shapes=infos, runs=[], summary=[], finished=False)

    def on_signal(signum, frame):
        raise Stop(f"signal {signum}")

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    runs = payload["runs"]
    last_wall: dict[tuple, float] = {}
    try:
        for i, (spec, mode, rep, method) in enumerate(plan):
            elapsed = time.perf_counter() - t_start
            key = (spec["name"], mode, method)
            guess = last_wall.get(key)  # this configuration's last run, else the longest of the same shape and mode,
            if guess is None:  # else the longest of the same mode
                guess = max((v for k, v in last_wall.items() if k[:2] == key[:2]), default=None)
            if guess is None:
                guess = max((v for k, v in last_wall.items() if k[1] == mode), default=0.0)
            if args.budget_s is not None and elapsed + guess > args.budget_s:
                runs.append(dict(shape=spec["name"], mode=mode, method=method, rep=rep, status="skipped-budget",
                                 error=f"skipped: {elapsed:.0f} s elapsed + about {guess:.0f} s > budget {args.budget_s:.0f} s"))
                print(f"[{i + 1}/{len(plan)} {elapsed:6.0f}s] {spec['name']} {mode} {method} rep{rep}: skipped (budget)", flush=True)
                continue
            rec = run_one(spec, infos[spec["name"]], method, mode, rep, args, device)
            runs.append(rec)
            last_wall[key] = rec["wall_s"]
            elapsed = time.perf_counter() - t_start
            head = f"[{i + 1}/{len(plan)} {elapsed:6.0f}s] {spec['name']} {mode} {method} rep{rep}:"
            if rec["status"] in ("ok", "nonfinite-loss") and "ms" in rec:
                parts = [f"{rec['ms']:.2f} ms (host {rec['host_ms']:.2f})", f"loss {rec['loss']:.4g}"]
                if rec.get("peak_gb") is not None:
                    parts.append(f"peak {rec['peak_gb']:.2f} GB")
                parts.append(f"build {rec['build_s']:.1f} s, first step {rec['first_step_s']:.1f} s, "
                             f"warm-up {rec['warmup_s']:.1f} s, run {rec['wall_s']:.1f} s")
                ph = rec.get("compile_phases_s")
                if ph:
                    aot = ",".join(k.replace("autograd_cache_", "") for k in (rec.get("dynamo") or {}).get("aot_cache", {}))
                    parts.append(f"compile: forward frame {ph.get('entire_frame_compile', 0):.1f} s (backend "
                                 f"{ph.get('backend_compile', 0):.1f}), backward {ph.get('entire_backward_compile', 0):.1f} s, "
                                 f"AOT cache {aot or '-'}")
                d = rec.get("dynamo")
                if d:
                    parts.append(f"graphs {d.get('unique_graphs')} breaks {d.get('graph_breaks')} "
                                 f"recompiles {d.get('recompiles')} cg-skips {d.get('cudagraph_skips')}"
                                 + (" COMPILED WHILE TIMED" if rec.get("compiled_while_timed") else ""))
                if rec["status"] != "ok":
                    parts.append(rec["status"].upper())
                print(head, "; ".join(parts), flush=True)
                if d and (d.get("graph_breaks") or d.get("recompiles")):
                    for reason in d.get("graph_break_reasons", [])[:3] + d.get("recompile_reasons", [])[:3]:
                        print(f"      {reason}", flush=True)
            else:
                print(head, f"{rec['status'].upper()} after {rec['wall_s']:.1f} s: {rec.get('error', '')[:300]}", flush=True)
            payload["summary"] = summarize(runs, infos)
            write_json(args.json, payload)
        payload["finished"] = True
    except Stop as exc:
        payload["stopped"] = str(exc)
        print(f"!! stopped by {exc}; writing what ran", flush=True)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        payload["wall_s"] = time.perf_counter() - t_start
        payload["summary"] = rows = summarize(runs, infos)
        write_json(args.json, payload)
        print_table(rows, infos, env["device"], args.dtype)
        n_bad = sum(1 for r in runs if r["status"] != "ok")
        print(f"# {len(runs)} runs ({n_bad} not ok) in {payload['wall_s']:.0f} s" + (f"; wrote {args.json}" if args.json else ""),
              flush=True)
    if payload.get("stopped"):
        sys.exit(143)


if __name__ == "__main__":
    main()
