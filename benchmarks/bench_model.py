"""Model-level training step of randlora against PEFT LoRA and PEFT RandLoRA (issue #12).

    python benchmarks/bench_model.py --config 1b:4x1024 --config 8b:1x4096:ckpt --config 8b:4x4096:ckpt \
        --methods frozen,lora,randlora,ours --reps 3 --json $OUT/bench_model.json
    python benchmarks/bench_model.py --config 8b:1x4096:ckpt:nf4 --methods frozen,lora,randlora,ours --agree
    python benchmarks/bench_model.py --profile 8b:1x4096:ckpt --methods lora,ours

One step = forward with labels, loss.backward(), AdamW step, zero_grad (the frozen floor: forward +
backward down to the embeddings, no parameter gradients, no optimizer). Each (configuration,
repeat, method) builds a fresh random-init LLaMA model from transformers' LlamaConfig (seed 0: the
same base weights for every method), runs ``--warmup`` steps, then times ``--steps`` steps
back to back with CUDA events; a run's time is the median of its steps. Methods are interleaved
(A B C A B C ...), ``--reps`` runs each; the table gives the median of the runs and their range,
and calls a ratio against PEFT LoRA only when the ranges do not overlap ("within noise"
otherwise). Peak = torch.cuda.max_memory_allocated over the timed steps (the optimizer state
exists: the counter is reset after the first warm-up step), weights included.

Configurations ``SHAPE:BxS[:ckpt][:nf4]``: shapes ``1b`` (hidden 2048, MLP 5632, 16 layers, 16
heads, vocab 32000: the README's 1.1B shape), ``8b`` (LLaMA-3-8B: hidden 4096, MLP 14336, 32
layers, 32 heads, 8 KV heads, vocab 128256), ``tiny`` (CPU smoke test). ``ckpt``: gradient
checkpointing (transformers', use_reentrant=False). ``nf4``: every linear layer of the decoder
blocks (not lm_head) replaced by a bitsandbytes Linear4bit (nf4, double quantization, bf16
compute), as QLoRA does; no prepare_model_for_kbit_training (norms and lm_head stay bf16).

Methods (targets q_proj, k_proj, v_proj, up_proj, down_proj; r=32 everywhere):
  frozen          the base model, no adapter: the floor any adapter's step pays
  lora            PEFT LoRA r32 (alpha 8, no dropout), PEFT's defaults otherwise
  randlora        PEFT RandLoRA r32 (PEFT's defaults: alpha 640, dense bases)
  ours            randlora.inject(model, targets, 32) (alpha 640, as PEFT's RandLoRA)
  NAME            any NAME given with --impl NAME=path/to/module.py: that copy of randlora
  X:hold          method X with each step run inside randlora.hold_weights(model) (opt-in: W' built once a step)
  X@cast          build order "cast" (below) instead of "bf16"
  X@bf16adapter   PEFT methods: build order "bf16", get_peft_model(..., autocast_adapter_dtype=False)
                  (PEFT's adapter weights stay bf16, as after "cast", without a float32 model)
Build orders: "bf16" (default): the model is created on the GPU with torch's default dtype set to
bf16, then the adapter is attached (PEFT keeps its adapter weights in float32: get_peft_model's
autocast_adapter_dtype=True; ours keeps lam/gam float32 by design). "cast": the model is created
on the GPU in float32, the adapter attached in float32, then model.to(bfloat16) casts everything
(PEFT's adapter weights and bases become bf16; ours keeps lam/gam float32). The JSON records the
dtypes of each run's trainable parameters and adapter buffers.
Adapter parameters that start at zero (lora_B, randlora_lambda, our lam) are set to N(0, 0.02)
before timing: never time on zeros.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn as nn

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
RANK = 32
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, vocab_size=32000),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
}
IMPLS: dict[str, str] = {}  # method name -> module file (--impl)
_MODULES: dict[str, object] = {}


def impl_module(name: str):
    """The randlora module behind a method name: 'ours' is the repository's randlora.py."""
    if name not in _MODULES:
        if name == "ours":
            import randlora

            _MODULES[name] = randlora
        else:
            path = IMPLS[name]
            spec = importlib.util.spec_from_file_location(f"randlora_{name}", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            _MODULES[name] = mod
    return _MODULES[name]


def parse_config(text: str) -> dict:
    parts = text.split(":")
    shape, bs = parts[0], parts[1]
    b, s = (int(v) for v in bs.lower().split("x"))
    flags = set(parts[2:])
    unknown = flags - {"ckpt", "nf4"}
    if shape not in SHAPES or unknown:
        raise SystemExit(f"bad config {text!r}: shape one of {sorted(SHAPES)}, flags ckpt/nf4")
    return dict(name=text, shape=shape, batch=b, seq=s, ckpt="ckpt" in flags, nf4="nf4" in flags)


def parse_method(text: str) -> dict:
    base, _, order = text.partition("@")
    kind, _, mode = base.partition(":")
    return dict(name=text, kind=kind, mode=mode or None, order=order or "bf16")


# -----------------------------------------------------------------------------
# Building


def quantize_nf4(model: nn.Module) -> None:
    """Replace every nn.Linear inside the decoder blocks by a bitsandbytes nf4 Linear4bit."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for cname, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    q = bnb.nn.Linear4bit(
                        child.in_features, child.out_features, bias=child.bias is not None, compute_dtype=torch.bfloat16,
                        compress_statistics=True, quant_type="nf4", device="meta",
                    )
                    w = child.weight.data.to(torch.bfloat16)
                    q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4", module=q).to(w.device)
                    if child.bias is not None:
                        q.bias = nn.Parameter(child.bias.data.to(torch.bfloat16), requires_grad=False)
                    setattr(parent, cname, q)
                    del child, w


def dequantize_nf4(model: nn.Module) -> None:
    """Replace every Linear4bit by a bf16 nn.Linear holding its dequantized weight."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for cname, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state).to(torch.bfloat16)
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                lin.weight = nn.Parameter(w, requires_grad=False)
                if child.bias is not None:
                    lin.bias = nn.Parameter(child.bias.data.to(torch.bfloat16), requires_grad=False)
                setattr(parent, cname, lin)


def make_model(method: dict, conf: dict, device: str, dtype: torch.dtype, dequant: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    mc = LlamaConfig(**SHAPES[conf["shape"]], max_position_embeddings=max(4096, conf["seq"]))
    mc.use_cache = False
    cast = method["order"] == "cast"
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32 if cast else dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(mc)
    finally:
        torch.set_default_dtype(old)
    if conf["nf4"]:
        if cast:
            raise SystemExit("nf4 configurations use the bf16 build order only")
        quantize_nf4(model)
        if dequant:
            dequantize_nf4(model)
        gc.collect()
        torch.cuda.empty_cache() if device == "cuda" else None
    if conf["ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kind = method["kind"]
    if kind == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
        # the floor: backward runs through every layer down to the embeddings (as with any
        # adapter on the first layer), computing no parameter gradient
        model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    elif kind in ("lora", "randlora"):
        from peft import LoraConfig, RandLoraConfig, get_peft_model

        pcfg = LoraConfig(r=RANK, target_modules=TARGETS) if kind == "lora" else RandLoraConfig(r=RANK, target_modules=TARGETS)
        model = get_peft_model(model, pcfg, autocast_adapter_dtype=method["order"] != "bf16adapter")
    else:
        impl_module(kind).inject(model, TARGETS, RANK)
    if cast:
        model.to(dtype)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or "randlora_lambda" in name or name.endswith(".lam")):
                p.normal_(0, 0.02)
    model.train()
    return model


def dtypes_of(model: nn.Module) -> dict:
    train = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
    bufs = sorted({f"{n.rsplit('.', 2)[-2] if 'randlora_' in n else n.rsplit('.', 1)[-1]}:{b.dtype}" for n, b in model.named_buffers() if "randlora_" in n})
    return dict(trainable=train, adapter_buffers=bufs)


# -----------------------------------------------------------------------------
# One run


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def make_step(model, method: dict, conf: dict, device: str):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5) if method["kind"] != "frozen" else None
    g = torch.Generator(device="cpu").manual_seed(2)
    vocab = SHAPES[conf["shape"]]["vocab_size"]
    ids = torch.randint(0, vocab, (conf["batch"], conf["seq"]), generator=g).to(device)
    hold = impl_module(method["kind"]).hold_weights if method["mode"] == "hold" else None

    def step(phases: list | None = None):
        # phases (CUDA, untimed): the peak of forward + loss, then of backward + optimizer step
        with hold(model) if hold is not None else contextlib.nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
            if phases is not None:
                phases.append(torch.cuda.max_memory_allocated())
                torch.cuda.reset_peak_memory_stats()
            loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if phases is not None:
            phases.append(torch.cuda.max_memory_allocated())

    return step, params, opt


def run_one(method: dict, conf: dict, args, device: str, dtype: torch.dtype) -> dict:
    free(device)
    rec = dict(config=conf["name"], method=method["name"], order=method["order"])
    t0 = time.perf_counter()
    model = make_model(method, conf, device, dtype)
    sync(device)
    rec["build_s"] = time.perf_counter() - t0
    rec["dtypes"] = dtypes_of(model)
    step, params, opt = make_step(model, method, conf, device)
    rec["trainable"] = sum(p.numel() for p in params)
    step()  # optimizer state exists before the peak counter starts
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup - 1):
        step()
    sync(device)
    times, host = [], []
    if device == "cuda":
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(args.steps)]
        for a, b in ev:
            h0 = time.perf_counter()
            a.record()
            step()
            b.record()
            host.append((time.perf_counter() - h0) * 1e3)
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) for a, b in ev]
        rec["peak_bytes"] = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        phases: list[int] = []
        step(phases)  # after the timed steps: where the peak is (forward + loss, or backward)
        torch.cuda.synchronize()
        rec["peak_forward_bytes"], rec["peak_backward_bytes"] = phases
    else:
        for _ in range(args.steps):
            h0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - h0) * 1e3)
        host = times
        rec["peak_bytes"] = None
    rec["step_ms"] = times
    rec["ms"] = statistics.median(times)
    rec["host_ms"] = statistics.median(host)
    del model, step, params, opt
    free(device)
    return rec


# -----------------------------------------------------------------------------
# Agreement on a 4-bit base: ours on nf4 vs the same adapter on the dequantized weights


def agreement(method: dict, conf: dict, device: str, dtype: torch.dtype, tokens: int = 512) -> dict:
    small = dict(conf, batch=1, seq=min(tokens, conf["seq"]), ckpt=False)
    out = {}
    g = torch.Generator(device="cpu").manual_seed(3)
    ids = torch.randint(0, SHAPES[conf["shape"]]["vocab_size"], (1, small["seq"]), generator=g).to(device)
    for base in ("nf4", "dequantized"):
        free(device)
        model = make_model(method, small, device, dtype, dequant=(base == "dequantized"))
        torch.manual_seed(4)
        with torch.no_grad():  # the same non-trivial adapter on both bases
            for name, p in sorted(model.named_parameters()):
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.02 * p.detach().float().abs().mean().clamp_min(1e-3))
        res = model(input_ids=ids, labels=ids)
        res.loss.backward()
        grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        out[base] = (res.logits.detach().float(), res.loss.item(), grads)
        del model, res
    (lq, loss_q, gq), (ld, loss_d, gd) = out["nf4"], out["dequantized"]
    num = sum((gq[n] - gd[n]).norm() ** 2 for n in gq) ** 0.5
    den = sum(gd[n].norm() ** 2 for n in gd) ** 0.5
    r = dict(
        config=conf["name"],
        method=method["name"],
        tokens=small["seq"],
        logits_rel=((lq - ld).norm() / ld.norm()).item(),
        loss_nf4=loss_q,
        loss_dequant=loss_d,
        grads_rel=(num / den).item(),
    )
    del out
    free(device)
    return r


# -----------------------------------------------------------------------------
# Profile


def profile(method: dict, conf: dict, args, device: str, dtype: torch.dtype, out_dir: str) -> dict:
    from torch.profiler import ProfilerActivity, profile as tprofile

    free(device)
    model = make_model(method, conf, device, dtype)
    step, params, opt = make_step(model, method, conf, device)
    for _ in range(2):
        step()
    sync(device)
    n = 2
    h0 = time.perf_counter()
    for _ in range(n):
        step()
    host_ms = (time.perf_counter() - h0) / n * 1e3
    sync(device)
    wall_ms = (time.perf_counter() - h0) / n * 1e3
    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(n):
            step()
        sync(device)
    ka = prof.key_averages()
    # kernels only (an aten op's self device time repeats its kernels' time)
    kernels = [e for e in ka if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
    gpu_ms = sum(e.self_device_time_total for e in kernels) / n / 1e3

    def cat(name: str) -> str:
        k = name.lower()
        if "small_basis" in k:
            return "triton S build"
        if "scale_grads" in k:
            return "triton dS reduce"
        if "flash" in k or "fmha" in k or "attention" in k:
            return "attention"
        if "gemm" in k or "nvjet" in k or "cutlass" in k or "sm90_xmma" in k or "cublas" in k or "splitk" in k.replace("_", ""):
            return "matmul"
        if "reduce" in k:
            return "reductions"
        if "elementwise" in k or "vectorized" in k or "unrolled" in k:
            return "elementwise"
        return "other"

    cats: dict[str, float] = {}
    for e in kernels:
        if e.self_device_time_total > 0:
            c = cat(e.key)
            cats[c] = cats.get(c, 0.0) + e.self_device_time_total / n / 1e3
    # autograd functions (inclusive GPU time) and matmuls by shape
    fn_rows = [
        dict(name=e.key, calls=e.count / n, device_ms=e.device_time_total / n / 1e3)
        for e in ka
        if "RandLora" in e.key or e.key.startswith("CheckpointFunction")
    ]
    shp = prof.key_averages(group_by_input_shape=True)
    mm_rows = sorted(
        (
            dict(op=e.key, shapes=str(e.input_shapes), calls=e.count / n, device_ms=e.device_time_total / n / 1e3)
            for e in shp
            if e.key in ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear", "aten::bmm") and e.device_time_total > 0
        ),
        key=lambda r: -r["device_ms"],
    )
    mm_rows = [r for r in mm_rows if r["op"] in ("aten::mm", "aten::addmm")][:30]
    table = ka.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60)
    tag = f"{conf['name']}_{method['name']}".replace(":", "-").replace("@", "-")
    if out_dir:
        with open(os.path.join(out_dir, f"profile_{tag}.txt"), "w") as f:
            f.write(table)
            f.write("\n\nmatmuls by input shape (per step)\n")
            for r in mm_rows:
                f.write(f"{r['op']:12s} {r['calls']:6.1f} calls {r['device_ms']:8.2f} ms  {r['shapes']}\n")
            # host side: where the CPU time goes (synchronizing calls show up here)
            f.write("\n\nby self CPU time\n")
            f.write(ka.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    rec = dict(
        config=conf["name"], method=method["name"], wall_ms=wall_ms, host_ms=host_ms, gpu_busy_ms=gpu_ms,
        categories_ms=dict(sorted(cats.items(), key=lambda kv: -kv[1])), functions=fn_rows, matmuls=mm_rows,
    )
    print(f"\n### profile {conf['name']} {method['name']}: wall {wall_ms:.1f} ms/step (unprofiled), host issue {host_ms:.1f} ms/step, GPU busy {gpu_ms:.1f} ms/step")
    print("categories (ms/step): " + ", ".join(f"{k} {v:.1f}" for k, v in rec["categories_ms"].items()))
    for r in fn_rows:
        print(f"  {r['name']}: {r['calls']:.0f} calls/step, {r['device_ms']:.1f} ms GPU/step (inclusive)")
    print("  top matmuls by shape (ms/step):")
    for r in mm_rows[:16]:
        print(f"    {r['op']:11s} x{r['calls']:5.0f} {r['device_ms']:7.2f}  {r['shapes']}")
    del model, step, params, opt, prof
    free(device)
    return rec


# -----------------------------------------------------------------------------
# Tables


def summarize(runs: list[dict], configs: list[dict], methods: list[dict]) -> list[dict]:
    rows = []
    for conf in configs:
        lora = [r for r in runs if r["config"] == conf["name"] and r["method"] == "lora" and r.get("ms") is not None]
        for m in methods:
            rs = [r for r in runs if r["config"] == conf["name"] and r["method"] == m["name"]]
            ok = [r for r in rs if r.get("ms") is not None]
            row = dict(config=conf["name"], method=m["name"], runs=len(ok), errors=[r["error"] for r in rs if "error" in r][:1])
            if ok:
                ms = [r["ms"] for r in ok]
                pk = [r["peak_bytes"] for r in ok if r["peak_bytes"] is not None]
                row.update(
                    median_ms=statistics.median(ms), min_ms=min(ms), max_ms=max(ms),
                    peak_gb=max(pk) / 1e9 if pk else None, host_ms=statistics.median(r["host_ms"] for r in ok),
                    phases_gb=[max(r[k] for r in ok) / 1e9 for k in ("peak_forward_bytes", "peak_backward_bytes")] if pk else None,
                    trainable=ok[0]["trainable"], dtypes=ok[0]["dtypes"],
                )
                if lora and m["name"] != "lora":
                    lm = [r["ms"] for r in lora]
                    lp = [r["peak_bytes"] for r in lora if r["peak_bytes"] is not None]
                    row["vs_lora"] = row["median_ms"] / statistics.median(lm)
                    row["vs_lora_range"] = (min(ms) / max(lm), max(ms) / min(lm))
                    row["separated"] = max(ms) < min(lm) or min(ms) > max(lm)
                    row["peak_vs_lora"] = (max(pk) / max(lp)) if pk and lp else None
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| config | method | runs | median ms | range ms | peak GB | peak fwd / bwd GB | host ms | ours/LoRA step | verdict | peak/LoRA |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "median_ms" not in r:
            err = (r["errors"][0] if r["errors"] else "no run")[:90]
            print(f"| {r['config']} | {r['method']} | 0 | — | — | — | — | — | — | {err} | — |")
            continue
        v = r.get("vs_lora")
        ratio = f"{v:.2f} ({r['vs_lora_range'][0]:.2f}–{r['vs_lora_range'][1]:.2f})" if v else "—"
        verdict = ("separated" if r["separated"] else "within noise") if v else ""
        pk = f"{r['peak_gb']:.2f}" if r["peak_gb"] is not None else "—"
        pv = f"{r['peak_vs_lora']:.3f}" if r.get("peak_vs_lora") else "—"
        ph = " / ".join(f"{v:.2f}" for v in r["phases_gb"]) if r.get("phases_gb") else "—"
        print(
            f"| {r['config']} | {r['method']} | {r['runs']} | {r['median_ms']:.1f} | {r['min_ms']:.1f}–{r['max_ms']:.1f} | {pk} | {ph} | "
            f"{r['host_ms']:.1f} | {ratio} | {verdict} | {pv} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=[], help="SHAPE:BxS[:ckpt][:nf4], repeatable")
    ap.add_argument("--methods", default="frozen,lora,randlora,ours", help="comma list (see above)")
    ap.add_argument("--methods-for", action="append", default=[], help="CONFIG=comma list: other methods for one config")
    ap.add_argument("--impl", action="append", default=[], help="NAME=path: a copy of randlora.py run as method NAME")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--agree", action="store_true", help="nf4 configs: agreement of each method with the dequantized base")
    ap.add_argument("--agree-tokens", type=int, default=512, help="tokens of the --agree check (1 sequence, no checkpointing)")
    ap.add_argument("--profile", action="append", default=[], help="CONFIG to profile with --methods (no timing table)")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--json", default=None, help="write results here (default: $OUT/bench_model.json if $OUT is set)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    for spec in args.impl:
        name, _, path = spec.partition("=")
        IMPLS[name] = path
    device = args.device
    dtype = torch.bfloat16
    configs = [parse_config(c) for c in args.config]
    methods = [parse_method(m) for m in args.methods.split(",") if m]
    per_conf = {k: [parse_method(m) for m in v.split(",") if m] for k, _, v in (s.partition("=") for s in args.methods_for)}
    out_dir = os.environ.get("OUT", "")
    json_path = args.json or (os.path.join(out_dir, "bench_model.json") if out_dir else None)
    import peft
    import transformers

    env = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
        command="python benchmarks/bench_model.py " + " ".join(sys.argv[1:]),
        impls=IMPLS,
    )
    with contextlib.suppress(Exception):
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    print(f"# {env}", flush=True)
    results = dict(env=env, runs=[], summary=[], agreement=[], profiles=[])

    def save():
        if json_path:
            with open(json_path, "w") as f:
                json.dump(results, f, indent=1, default=str)

    for text in args.profile:
        conf = parse_config(text)
        for m in methods:
            try:
                results["profiles"].append(profile(m, conf, args, device, dtype, out_dir))
            except Exception as e:  # keep going: one method's failure must not lose the others
                print(f"profile {text} {m['name']} failed: {type(e).__name__}: {e}")
                free(device)
            save()

    for conf in configs:
        ms = per_conf.get(conf["name"], methods)
        for rep in range(args.reps):
            for m in ms:
                try:
                    rec = run_one(m, conf, args, device, dtype)
                except Exception as e:
                    rec = dict(config=conf["name"], method=m["name"], ms=None, error=f"{type(e).__name__}: {str(e)[:300]}")
                    if not isinstance(e, torch.cuda.OutOfMemoryError):
                        traceback.print_exc(limit=3)
                    free(device)
                rec["rep"] = rep
                results["runs"].append(rec)
                save()
                shown = f"{rec['ms']:.1f} ms, peak {rec['peak_bytes'] / 1e9 if rec.get('peak_bytes') else 0:.2f} GB, host {rec['host_ms']:.1f} ms, build {rec['build_s']:.1f} s" if rec.get("ms") else rec["error"]
                print(f"  {conf['name']} rep {rep} {m['name']}: {shown}", flush=True)
        if args.agree and conf["nf4"]:
            for m in ms:
                if m["kind"] == "frozen":
                    continue
                try:
                    a = agreement(m, conf, device, dtype, args.agree_tokens)
                except Exception as e:
                    a = dict(config=conf["name"], method=m["name"], error=f"{type(e).__name__}: {str(e)[:300]}")
                    free(device)
                results["agreement"].append(a)
                save()
        seen: dict[str, dict] = {}
        for c in configs:
            for m in per_conf.get(c["name"], methods):
                seen.setdefault(m["name"], m)
        results["summary"] = summarize(results["runs"], configs, list(seen.values()))
        save()
    if configs:
        print_table(results["summary"])
    if results["agreement"]:
        print("\n| config | method | tokens | logits rel. err. nf4 vs dequantized | loss nf4 / dequantized | adapter grads rel. err. |")
        print("| --- | --- | --- | --- | --- | --- |")
        for a in results["agreement"]:
            if "error" in a:
                print(f"| {a['config']} | {a['method']} | — | {a['error'][:80]} | — | — |")
            else:
                print(f"| {a['config']} | {a['method']} | {a['tokens']} | {a['logits_rel']:.2e} | {a['loss_nf4']:.4f} / {a['loss_dequant']:.4f} | {a['grads_rel']:.2e} |")
    save()
    if json_path:
        print(f"\nwrote {json_path}")


if __name__ == "__main__":
    main()
