"""Host time per adapted-layer call: a stack of tiny layers, forward + backward, one thread.

The issue's measurement: "Host time per adapted-layer call (8 layers of 64², 4 tokens, forward + backward,
one thread): ours vs PEFT LoRA vs the frozen layer; target: ours <= PEFT LoRA on CPU and GPU".

    python benchmarks/host_overhead.py                              # CPU, the issue's setting
    python benchmarks/host_overhead.py --device cuda --json $OUT/host_overhead_cuda.json
    python benchmarks/host_overhead.py --profile                    # and torch.profiler's host ops per call
    python benchmarks/host_overhead.py --dim 2048 --tokens 64 --layers 1 --device cuda   # the README's 2048² row
    python benchmarks/host_overhead.py --tiny                       # seconds: a smoke test

What is timed. A model is ``nn.Sequential`` of ``--layers`` ``nn.Linear(dim, dim)`` (bias on; seed 0), each
adapted by the method (or left frozen); the input ``x`` (``--tokens`` x ``dim``) requires grad, so every layer
computes dX, as an inner layer of a real model does. One call is

    x.grad = None; p.grad = None for each trainable p; model(x).backward(dy)

(dy preallocated). A repeat times ``--iters`` such calls back to back with time.perf_counter, with no device
synchronisation inside the loop (on CUDA the tiny kernels finish long before the host has issued the next ones,
so the wall time is the host's time; a synchronize closes each repeat). The number reported is µs per layer:
the repeat's time / iters / layers. Methods are interleaved (A B C A B C ...) for ``--reps`` repeats; the table
gives the median and range of the repeats. torch.set_num_threads(--num-threads, default 1).

Methods (``--methods``, comma separated; ``NAME@R`` sets the rank):
  frozen        the plain nn.Linear stack (no trainable parameter; dX only)
  lora          PEFT LoRA (default r = --lora-rank = 16, alpha 2r, no dropout, PEFT's defaults otherwise)
  ours          randlora.inject(model, names, rank=R) (default R: the RandLoRA rank whose trainable count is
                closest to LoRA r16's on these layers; for 64x64 that is r=2, 2,112 vs 2,048 per layer)
  randlora      PEFT RandLoRA at the same rank (PEFT's defaults otherwise)
  ours-torch    ours with randlora.TRITON False while it runs: S and dlam/dgam from torch ops (on CUDA, where the
                Triton kernels would run otherwise: what their launches cost or save on the host)
  bare          a floor for ours: the same factorized update (out >= in, dense bases, ours' bases and lam/gam) as a
                bare torch.autograd.Function, with no input checks, plan, routes, autocast or hooks; its output and
                gradients are checked against ours' before timing. What any Python autograd.Function computing this
                update without keeping S costs on the host.
  builtin       the same update from built-in operations, ``addmm(x W^T + b, x S^T, Bf^T)`` with ``S`` built from
                lam, gam, A in float32: autograd's C++ engine runs the whole backward, as it does LoRA's, but keeps
                ``S`` (r*n x d) from forward to backward, a weight-sized tensor per layer, which ours refuses to
                keep; checked against ours' like bare. What skipping the Python backward would cost on the host.
The "saved bytes" column is what autograd keeps from forward to backward per layer call beyond the model's own
tensors (parameters, buffers, frozen bases): the storages torch.autograd.graph.saved_tensors_hooks sees, each once.
Adapter parameters that start at zero (lora_B, lam) are drawn from N(0, 0.02) first (never time on zeros).
On CUDA the model is bf16 (``--dtype``), the adapter attached afterwards (PEFT keeps its adapter weights
float32 then, its default; ours keeps lam/gam float32); on CPU float32.

Only randlora's public API is used (inject, named_adapters).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

DEFAULT_METHODS = "frozen,lora,ours,bare,randlora,ours@16,randlora@16"


def import_randlora(tries: int = 3, wait_s: float = 2.0):
    """randlora, imported with a few retries (the file may be mid-edit); raises the last error."""
    for i in range(tries):
        try:
            import randlora

            return randlora
        except Exception:
            if i == tries - 1:
                raise
            time.sleep(wait_s)
    return None


def randlora_count(shapes: list[tuple[int, int]], r: int) -> int:
    """Trainable parameters of RandLoRA rank r over layers of shape (in, out): r*n + n*d, d = min, n = ceil(d/r)."""
    total = 0
    for i, o in shapes:
        d = min(i, o)
        n = math.ceil(d / r)
        total += r * n + n * d
    return total


def lora_count(shapes: list[tuple[int, int]], k: int) -> int:
    return sum(k * (i + o) for i, o in shapes)


def equal_count_rank(shapes: list[tuple[int, int]], lora_rank: int) -> int:
    """The RandLoRA rank (1 .. smallest min(in, out)) whose total count is closest to LoRA's (ties: larger rank)."""
    target = lora_count(shapes, lora_rank)
    top = min(min(i, o) for i, o in shapes)
    return min(range(1, top + 1), key=lambda r: (abs(randlora_count(shapes, r) - target), -r))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except Exception:
        return platform.processor() or platform.machine()


def parse_method(text: str, default_rank: dict[str, int]) -> tuple[str, str, int | None]:
    kind, _, rank = text.partition("@")
    if kind not in ("frozen", "lora", "ours", "ours-torch", "randlora", "bare", "builtin"):
        raise SystemExit(f"unknown method {text!r}: frozen, lora, ours, ours-torch, randlora, bare, builtin "
                         "(optionally @RANK)")
    r = None if kind == "frozen" else int(rank) if rank else default_rank[kind]
    label = kind if kind == "frozen" else f"{kind} r{r}"
    return label, kind, r


class BareFunction(torch.autograd.Function):
    """Ours' factorized update for out >= in, ``y = x W^T + b + s (x S^T) Bf^T``, with nothing around it."""

    @staticmethod
    def forward(ctx, x, W, b, lam, gam, A, Bf, s):
        S = (lam.unsqueeze(2) * gam * A.unsqueeze(1)).flatten(0, 1).to(x.dtype)  # (r*n, d), recomputed backward
        ctx.save_for_backward(x, W, lam, gam, A, Bf)
        ctx.s = s
        return F.linear(x, W, b).addmm_(x @ S.t(), Bf.t(), alpha=s)

    @staticmethod
    def backward(ctx, dY):
        x, W, lam, gam, A, Bf = ctx.saved_tensors
        (r, n), s = lam.shape, ctx.s
        S = (lam.unsqueeze(2) * gam * A.unsqueeze(1)).flatten(0, 1).to(x.dtype)
        dH = dY @ Bf
        dSA = (dH.t() @ x).view(r, n, -1) * (A.float() * s).unsqueeze(1)
        dX = torch.addmm(dY @ W, dH, S, alpha=s)
        return dX, None, None, (dSA * gam).sum(-1), (dSA * lam.unsqueeze(-1)).sum(0), None, None, None


class Bare(nn.Module):
    """``layer`` (a RandLoraLinear, out >= in, dense bases) computed by :class:`BareFunction`."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        assert layer.out_features >= layer.in_features and layer._bases.kind == "dense"
        A, B = layer.random_bases()
        dtype, dev = layer.base.weight.dtype, layer.base.weight.device
        self.base, self.lam, self.gam, self.s = layer.base, layer.lam, layer.gam, layer.scaling
        self.register_buffer("A", A.to(dev, dtype))
        self.register_buffer("Bf", B.flatten(1).to(dev, dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return BareFunction.apply(x, self.base.weight, self.base.bias, self.lam, self.gam, self.A, self.Bf, self.s)


class Builtin(Bare):
    """``layer`` computed from built-in operations: autograd's own backward, keeping ``S``; as few calls as it takes."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__(layer)
        self.register_buffer("A3", self.A.float().unsqueeze(1))  # (r, 1, d): broadcast against gam (n, d)
        self.register_buffer("Bt", self.Bf.t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        S = (self.lam.unsqueeze(2) * self.gam * self.A3).flatten(0, 1)
        S = S if S.dtype == x.dtype else S.to(x.dtype)
        return torch.addmm(F.linear(x, self.base.weight, self.base.bias), x @ S.t(), self.Bt, alpha=self.s)


def bare_model(ours: nn.Module, x: torch.Tensor, dy: torch.Tensor, cls: type = Bare) -> nn.Module:
    """``ours`` (an adapted stack) with each adapter computed by ``cls``, checked against ``ours``."""
    bare = nn.Sequential(*[cls(layer) for layer in ours])
    grads = []
    for model in (ours, bare):
        x.grad = None
        for p in model.parameters():
            p.grad = None
        y = model(x)
        y.backward(dy)
        grads.append([y.detach(), x.grad.clone(), *(p.grad.clone() for p in model.parameters() if p.requires_grad)])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=2e-2 if x.dtype == torch.bfloat16 else 1e-4, atol=1e-3)
    return bare


def build(kind: str, rank: int | None, args, dev: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(args.dim, args.dim, device=dev, dtype=dtype) for _ in range(args.layers)])
    model.requires_grad_(False)
    names = [str(i) for i in range(args.layers)]
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=names))
    elif kind == "randlora":
        from peft import RandLoraConfig, get_peft_model

        model = get_peft_model(model, RandLoraConfig(r=rank, target_modules=names))
    elif kind in ("ours", "ours-torch", "bare", "builtin"):
        randlora = import_randlora()
        randlora.inject(model, names, rank=rank)
        got = len(list(randlora.named_adapters(model)))
        if got != args.layers:
            raise RuntimeError(f"randlora adapted {got} layers, expected {args.layers}")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.numel() and not bool(p.any()):
                p.normal_(0, 0.02)
    model.train()
    return model


def make_call(model: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    """The timed call (forward + backward) and its forward alone (the graph is built, then freed unused)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def call() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        model(x).backward(dy)

    def forward() -> None:
        model(x)

    return call, forward


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps from one forward to its backward beyond the model's own tensors (parameters, buffers,
    frozen bases): activations and whatever the method computes and keeps, each storage once."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own and (t.grad_fn is not None or t.requires_grad):  # not a frozen leaf (weights, bases)
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def time_calls(call, iters: int, dev: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``iters`` calls. The CPU time (all threads of the process) is what
    the host spent, whatever else the machine runs; the wall time is what a step waits for on an idle machine."""
    gc.collect()
    sync(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(iters):
        call()
    t1, c1 = time.perf_counter(), time.process_time()
    sync(dev)
    return t1 - t0, c1 - c0


def profile_calls(label: str, call, args, dev: str) -> list[dict]:
    """torch.profiler over --profile-iters calls: host (self CPU) time by op, per layer call."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    for _ in range(20):
        call()
    sync(dev)
    with profile(activities=acts) as p:
        for _ in range(args.profile_iters):
            call()
        sync(dev)
    per = args.profile_iters * args.layers
    events = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / per
    rows = [
        dict(op=e.key, calls_per_layer_call=e.count / per, self_cpu_us_per_layer_call=e.self_cpu_time_total / per)
        for e in events[: args.rows]
    ]
    print(f"\n### {label}: host ops per layer call ({args.profile_iters} stack calls profiled; "
          f"all ops' self CPU time {total:.1f} µs per layer call, profiler overhead included)")
    print("| op | calls per layer call | self CPU µs per layer call |\n| --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['op'][:70]} | {r['calls_per_layer_call']:.2f} | {r['self_cpu_us_per_layer_call']:.2f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--iters", type=int, default=1000, help="calls of the stack per repeat")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--num-threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="also torch.profiler's top host ops per layer call")
    ap.add_argument("--profile-iters", type=int, default=200)
    ap.add_argument("--rows", type=int, default=15, help="profile rows per method")
    ap.add_argument("--tiny", action="store_true", help="a few iterations: a smoke test")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    if args.tiny:
        args.iters, args.reps, args.warmup, args.profile_iters = 20, 2, 3, 5
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if dev == "cuda" else torch.float32)
    torch.set_num_threads(args.num_threads)

    shapes = [(args.dim, args.dim)] * args.layers
    r_eq = equal_count_rank(shapes, args.lora_rank)
    defaults = {"lora": args.lora_rank, "ours": r_eq, "ours-torch": r_eq, "bare": r_eq, "builtin": r_eq, "randlora": r_eq}
    methods = [parse_method(m.strip(), defaults) for m in args.methods.split(",") if m.strip()]
    device_name = torch.cuda.get_device_name() if dev == "cuda" else f"CPU {cpu_name()}"
    try:
        import hashlib

        with open(os.path.join(ROOT, "randlora.py"), "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()[:16]
    except Exception:
        sha = None
    print(f"# randlora.py sha256 {sha}")
    print(f"# host_overhead: {args.layers} x Linear({args.dim}, {args.dim}), {args.tokens} tokens, {dev} {dtype}, "
          f"{args.num_threads} thread(s), {args.iters} calls x {args.reps} interleaved repeats; torch {torch.__version__}; "
          f"{device_name}")
    print(f"# LoRA r{args.lora_rank}: {lora_count(shapes, args.lora_rank) // args.layers:,} trainable per layer; "
          f"RandLoRA r{r_eq} (equal count): {randlora_count(shapes, r_eq) // args.layers:,}")

    x = torch.randn(args.tokens, args.dim, device=dev, dtype=dtype, requires_grad=True)
    dy = torch.randn(args.tokens, args.dim, device=dev, dtype=dtype)
    entries = {}
    triton_default = import_randlora().TRITON if any(k == "ours-torch" for _, k, _ in methods) else None

    def kernels_for(kind: str) -> None:
        """ours-torch runs (warm-up, timing, profile) with the Triton kernels off; the others as installed."""
        if triton_default is not None:
            import_randlora().TRITON = triton_default and kind != "ours-torch"

    for label, kind, rank in methods:
        e = entries[label] = dict(method=kind, rank=rank, times_s=[], cpu_times_s=[], fwd_cpu_times_s=[], status="ok")
        kernels_for(kind)
        try:
            model = build(kind, rank, args, dev, dtype)
            if kind in ("bare", "builtin"):
                model = bare_model(model, x, dy, Bare if kind == "bare" else Builtin)
            e["saved_bytes_per_layer"] = saved_bytes(model, x) // args.layers
            e["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            e["trainable_dtypes"] = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
            call, forward = make_call(model, x, dy)
            for _ in range(args.warmup):
                call()
            sync(dev)
            e["model"], e["call"], e["forward"] = model, call, forward
        except Exception as exc:  # one method failing must not stop the others
            e["status"] = "error"
            e["error"] = f"{type(exc).__name__}: {exc}"
            e["traceback"] = traceback.format_exc()[-3000:]
            print(f"!! {label}: {e['error']}", flush=True)
    t_start = time.perf_counter()
    for rep in range(args.reps):
        for label, e in entries.items():
            if e["status"] != "ok":
                continue
            kernels_for(e["method"])
            try:
                wall_s, cpu_s = time_calls(e["call"], args.iters, dev)
                e["times_s"].append(wall_s)
                e["cpu_times_s"].append(cpu_s)
                e["fwd_cpu_times_s"].append(time_calls(e["forward"], args.iters, dev)[1])
            except Exception as exc:
                e["status"] = "error"
                e["error"] = f"{type(exc).__name__}: {exc}"
                e["traceback"] = traceback.format_exc()[-3000:]
                print(f"!! {label} (repeat {rep}): {e['error']}", flush=True)
    wall = time.perf_counter() - t_start

    scale = 1e6 / (args.iters * args.layers)
    for e in entries.values():
        e["bwd_cpu_times_s"] = [c - f for c, f in zip(e["cpu_times_s"], e["fwd_cpu_times_s"])]  # the rest: the backward
        for src, pre in (("times_s", ""), ("cpu_times_s", "cpu_"), ("fwd_cpu_times_s", "fwd_cpu_"), ("bwd_cpu_times_s", "bwd_cpu_")):
            us = [t * scale for t in e[src]]
            e[f"{pre}us_per_layer"] = us
            if us:
                e[f"{pre}median_us"], e[f"{pre}min_us"], e[f"{pre}max_us"] = statistics.median(us), min(us), max(us)

    def ref(kind: str, key: str):
        return next((e.get(key) for e in entries.values() if e["method"] == kind and e.get(key)), None)

    print("\nµs per adapted-layer call (forward + backward), median of the repeats (range); wall = time.perf_counter, "
          "CPU = time.process_time of the process (robust to other load on the machine)")
    print("| method | trainable per layer | wall µs | CPU µs | CPU over frozen | wall ÷ LoRA | CPU ÷ LoRA | forward CPU µs (÷ LoRA) "
          "| backward CPU µs (÷ LoRA) | saved bytes |")
    print("| --- | ---: | --- | --- | ---: | ---: | ---: | --- | --- | ---: |")
    for label, e in entries.items():
        if "median_us" not in e:
            print(f"| {label} | | {e['status']}: {e.get('error', '')[:80]} | | | | | | | |")
            continue
        frozen_cpu, lora_w, lora_c = ref("frozen", "cpu_median_us"), ref("lora", "median_us"), ref("lora", "cpu_median_us")
        over = f"{e['cpu_median_us'] - frozen_cpu:.1f}" if frozen_cpu is not None else ""
        rw = f"{e['median_us'] / lora_w:.2f}" if lora_w else ""
        rc = f"{e['cpu_median_us'] / lora_c:.2f}" if lora_c else ""
        per_layer = e.get("trainable", 0) // args.layers
        parts = [f"{e[f'{k}_cpu_median_us']:.1f} ({e[f'{k}_cpu_median_us'] / ref('lora', f'{k}_cpu_median_us'):.2f})"
                 if ref("lora", f"{k}_cpu_median_us") else f"{e[f'{k}_cpu_median_us']:.1f}" for k in ("fwd", "bwd")]
        print(f"| {label} | {per_layer:,} | {e['median_us']:.1f} ({e['min_us']:.1f}–{e['max_us']:.1f}) | "
              f"{e['cpu_median_us']:.1f} ({e['cpu_min_us']:.1f}–{e['cpu_max_us']:.1f}) | {over} | {rw} | {rc} | {parts[0]} | {parts[1]} "
              f"| {e['saved_bytes_per_layer']:,} |")
    try:
        load = ", load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = ""
    print(f"# timed part: {wall:.1f} s wall{load}")

    if args.profile:
        for label, e in entries.items():
            if e["status"] == "ok":
                kernels_for(e["method"])
                try:
                    e["profile"] = profile_calls(label, e["call"], args, dev)
                except Exception as exc:
                    e["profile_error"] = f"{type(exc).__name__}: {exc}"
                    print(f"!! profile {label}: {e['profile_error']}")

    if args.json:
        out = dict(
            script="benchmarks/host_overhead.py",
            argv=sys.argv[1:],
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            torch=torch.__version__,
            device=device_name,
            dtype=str(dtype),
            threads=args.num_threads,
            dim=args.dim, tokens=args.tokens, layers=args.layers, iters=args.iters, reps=args.reps,
            lora_rank=args.lora_rank, equal_count_rank=r_eq, randlora_sha256=sha,
            loadavg=os.getloadavg() if hasattr(os, "getloadavg") else None,
            methods={k: {kk: vv for kk, vv in v.items() if kk not in ("model", "call", "forward")} for k, v in entries.items()},
        )
        try:
            import peft

            out["peft"] = peft.__version__
        except Exception:
            pass
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
