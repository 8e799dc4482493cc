"""Speed, memory and agreement of randlora against PEFT's RandLoRA and LoRA.

    python benchmarks/bench.py --preset gpu     # H100/H200, bf16, about 6 minutes
    python benchmarks/bench.py --preset cpu     # small shapes, float32, a few minutes

Prints markdown tables and writes JSON (to $OUT if set, else benchmarks/results/).

Layer table: one linear layer, forward + backward of a batch of N tokens, median ms (each
sample the mean of 5 back-to-back calls, as layers run inside a model);
"held" is the memory kept between forward and backward beyond the input and the output;
"peak" the peak during forward + backward above what existed before. Model table: one AdamW
step of a LLaMA-shaped model (random init) with each method.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import randlora  # noqa: E402

PRESETS = {
    "gpu": dict(
        device="cuda",
        dtype=torch.bfloat16,
        layers=[(4096, 4096), (4096, 11008), (11008, 4096)],
        tokens=[1024, 8192, 32768],
        crossover_tokens=[256, 512, 1024, 2048, 4096, 8192],
        rank=32,
        model=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16, vocab_size=32000),
        model_runs=[(4, 1024, False), (1, 256, False), (8, 2048, True)],
        warmup=3,
        reps=10,
    ),
    "cpu": dict(
        device="cpu",
        dtype=torch.float32,
        layers=[(512, 512), (512, 1376), (1376, 512)],
        tokens=[64, 512, 2048],
        crossover_tokens=[32, 64, 128, 256, 512, 1024],
        rank=16,
        model=dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4, vocab_size=4096),
        model_runs=[(4, 128, False), (1, 64, False), (8, 128, True)],
        warmup=2,
        reps=5,
    ),
    "tiny": dict(  # smoke test of the script itself
        device="cpu",
        dtype=torch.float32,
        layers=[(64, 96)],
        tokens=[16, 256],
        crossover_tokens=[16, 64],
        rank=8,
        model=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=256),
        model_runs=[(2, 32, False), (2, 32, True)],
        warmup=1,
        reps=2,
    ),
}


# -----------------------------------------------------------------------------
# Timing and memory


class Timer:
    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def median_ms(self, fn, warmup: int, reps: int, inner: int = 1) -> float:
        """Median over ``reps`` samples of the mean time of ``inner`` back-to-back calls.

        Back to back, as layers run inside a model: the host queues the next call while the
        GPU runs this one, so host overhead shows only where it exceeds the GPU work."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / inner)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                times.append((time.perf_counter() - t0) * 1e3 / inner)
        return statistics.median(times)


def allocated(device: str) -> int:
    return torch.cuda.memory_allocated() if device.startswith("cuda") else 0


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# One layer


class One(nn.Module):
    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def make_layer(method: str, in_f: int, out_f: int, rank: int, device: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        lin = nn.Linear(in_f, out_f, bias=False, dtype=dtype)
    model = One(lin)
    if method == "full FT":
        return model
    if method == "frozen base":
        lin.weight.requires_grad_(False)
        return model
    if method.startswith("PEFT"):
        from peft import LoraConfig, RandLoraConfig, get_peft_model

        cfg = LoraConfig(r=rank, target_modules=["lin"]) if "LoRA r" in method and "Rand" not in method else RandLoraConfig(r=rank, target_modules=["lin"])
        pm = get_peft_model(model, cfg)
        for name, p in pm.named_parameters():
            if "randlora_lambda" in name or "lora_B" in name:
                with torch.no_grad():
                    p.normal_(0, 0.02)  # non-zero: zeros can run faster than real data
        return pm
    randlora.inject(model, ["lin"], rank)
    layer = model.lin
    with torch.no_grad():
        layer.lam.normal_(0, 0.02)
    layer.strategy = {"ours (auto)": "auto", "ours (build)": "build", "ours (factorized)": "factorized"}[method]
    return model


def bench_layer(method, in_f, out_f, N, cfg, timer) -> dict:
    device, dtype = cfg["device"], cfg["dtype"]
    free_memory(device)
    model = make_layer(method, in_f, out_f, cfg["rank"], device, dtype)
    x = torch.randn(N, in_f, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(N, out_f, device=device, dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        model(x).backward(dy)

    ms = timer.median_ms(step, cfg["warmup"], cfg["reps"], inner=5)
    step()
    x.grad = None
    for p in params:
        p.grad = None
    timer.sync()
    held = peak = None
    if device.startswith("cuda"):
        m0 = allocated(device)
        torch.cuda.reset_peak_memory_stats()
        y = model(x)
        timer.sync()
        held = allocated(device) - m0 - y.untyped_storage().nbytes()
        y.backward(dy)
        timer.sync()
        peak = torch.cuda.max_memory_allocated() - m0
        del y
    trainable = sum(p.numel() for p in params)
    del model, x, dy, params
    free_memory(device)
    return dict(method=method, in_features=in_f, out_features=out_f, tokens=N, ms=ms, held_bytes=held, peak_bytes=peak, trainable=trainable)


def inference(in_f, out_f, N, cfg, timer) -> dict:
    """Forward only, no grad: plain layer, ours unmerged (auto path) and ours after merge()."""
    device, dtype = cfg["device"], cfg["dtype"]
    out = dict(in_features=in_f, out_features=out_f, tokens=N)
    x = torch.randn(N, in_f, device=device, dtype=dtype)
    for method in ("base layer", "ours unmerged", "ours merged"):
        model = make_layer("frozen base" if method == "base layer" else "ours (auto)", in_f, out_f, cfg["rank"], device, dtype)
        if method == "ours merged":
            randlora.merge(model)
        model.eval()
        with torch.no_grad():
            out[method] = timer.median_ms(lambda: model(x), cfg["warmup"], cfg["reps"], inner=5)
        del model
    return out


def host_overhead(in_f, out_f, N, cfg, reps: int = 200) -> dict:
    """Per-call time of tiny forward + backward calls issued back to back (host-bound)."""
    device, dtype = cfg["device"], cfg["dtype"]
    out = dict(in_features=in_f, out_features=out_f, tokens=N)
    for method in ["frozen base", "PEFT LoRA r", "ours (auto)", "ours (eager)"]:
        model = make_layer("ours (auto)" if method == "ours (eager)" else method, in_f, out_f, cfg["rank"], device, dtype)
        x = torch.randn(N, in_f, device=device, dtype=dtype, requires_grad=True)
        saved = randlora.TRITON
        if method == "ours (eager)":
            randlora.TRITON = False  # _use_triton reads the switch at every call
        try:
            for _ in range(20):
                model(x).sum().backward()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                model(x).sum().backward()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            out[method] = (time.perf_counter() - t0) / reps * 1e3
        finally:
            randlora.TRITON = saved
        del model, x
    return out


def agreement(in_f, out_f, N, cfg) -> dict:
    """ours vs PEFT RandLoRA on identical bases, parameters and inputs (relative errors)."""
    device, dtype, rank = cfg["device"], cfg["dtype"], cfg["rank"]
    free_memory(device)
    peft_model = make_layer("PEFT RandLoRA", in_f, out_f, rank, device, dtype)
    pl = peft_model.base_model.model.lin
    torch.manual_seed(1)
    with torch.no_grad():
        pl.randlora_lambda["default"].normal_()
        pl.randlora_gamma["default"].normal_(0, 1 / min(in_f, out_f))
    ours = One(nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype))
    with torch.no_grad():
        ours.lin.weight.copy_(pl.base_layer.weight)
    with tempfile.TemporaryDirectory() as folder:  # PEFT's own file, read as a user reads it
        peft_model.save_pretrained(folder)
        randlora.from_peft(ours, folder)
    layer = ours.lin
    x = torch.randn(N, in_f, device=device, dtype=dtype)
    dy = torch.randn(N, out_f, device=device, dtype=dtype)
    out = {}
    results = {}
    for name, model, lam, gam in [
        ("peft", peft_model, pl.randlora_lambda["default"], pl.randlora_gamma["default"]),
        ("ours", ours, layer.lam, layer.gam),
    ]:
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        y.backward(dy)
        results[name] = (y.float(), xi.grad.float(), lam.grad.float(), gam.grad.float())
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    for i, key in enumerate(["output", "input grad", "lam grad", "gam grad"]):
        out[key] = rel(results["ours"][i], results["peft"][i])
    # both against a float64 reference, to tell which one is closer
    with torch.no_grad():
        W = layer.base.weight.double() + layer.delta_weight(torch.float64).to(device)
        ref = x.double() @ W.t()
    out["output vs fp64: ours"] = rel(results["ours"][0].double(), ref)
    out["output vs fp64: peft"] = rel(results["peft"][0].double(), ref)
    del peft_model, ours
    free_memory(device)
    return dict(in_features=in_f, out_features=out_f, tokens=N, **out)


def exactness(in_f, out_f, N, path, cfg) -> dict:
    """Relative error of ours (fused kernels where available, and eager) against float64."""
    device, dtype, rank = cfg["device"], cfg["dtype"], cfg["rank"]
    torch.manual_seed(2)
    model = One(nn.Linear(in_f, out_f, bias=True, device=device, dtype=dtype))
    randlora.inject(model, ["lin"], rank, strategy=path)
    layer = model.lin
    with torch.no_grad():
        layer.lam.normal_()
        layer.gam.normal_(0, 1 / min(in_f, out_f))
    x = torch.randn(N, in_f, device=device, dtype=dtype)
    dy = torch.randn(N, out_f, device=device, dtype=dtype)
    # float64 reference, ΔW built explicitly
    lam = layer.lam.detach().double().requires_grad_(True)
    gam = layer.gam.detach().double().requires_grad_(True)
    A, Bf = layer._bases.dense(layer.D, layer.d, torch.float64, device=device)
    S = (lam[:, :, None] * A[:, None, :] * gam[None]).flatten(0, 1)
    M = Bf @ S
    dW = (M if out_f >= in_f else M.t()) * layer.scaling
    xr = x.double().requires_grad_(True)
    yr = xr @ (layer.base.weight.double() + dW).t() + layer.base.bias.double()
    yr.backward(dy.double())
    ref = (yr.detach(), xr.grad, lam.grad, gam.grad)
    out = dict(in_features=in_f, out_features=out_f, tokens=N, strategy=path)
    for mode in ("fused", "eager"):
        saved = randlora.TRITON
        if mode == "eager":
            randlora.TRITON = False
        try:
            xi = x.clone().requires_grad_(True)
            layer.lam.grad = layer.gam.grad = None
            y = model(xi)
            y.backward(dy)
            got = (y, xi.grad, layer.lam.grad, layer.gam.grad)
        finally:
            randlora.TRITON = saved
        for key, g, r in zip(("output", "input grad", "lam grad", "gam grad"), got, ref):
            err = ((g.double() - r).norm() / r.norm()).item()
            out[f"{mode} {key}"] = err if err == err else float("inf")  # NaN never passes
    return out


# -----------------------------------------------------------------------------
# A LLaMA-shaped model


def make_model(method: str, cfg: dict, grad_ckpt: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    device, dtype, rank = cfg["device"], cfg["dtype"], cfg["rank"]
    targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    mc = LlamaConfig(**cfg["model"], max_position_embeddings=4096)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(mc)
    finally:
        torch.set_default_dtype(old)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "full FT":
        pass
    elif method.startswith("PEFT"):
        from peft import LoraConfig, RandLoraConfig, get_peft_model

        pcfg = RandLoraConfig(r=rank, target_modules=targets) if "Rand" in method else LoraConfig(r=rank, target_modules=targets)
        model = get_peft_model(model, pcfg)
    else:
        randlora.inject(model, targets, rank)
    model.train()
    return model


def bench_model(method: str, batch: int, seq: int, grad_ckpt: bool, cfg: dict, timer: Timer) -> dict:
    device = cfg["device"]
    free_memory(device)
    model = make_model(method, cfg, grad_ckpt)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, cfg["model"]["vocab_size"], (batch, seq), device=device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # optimizer state exists before the peak is measured
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ms = timer.median_ms(step, cfg["warmup"], cfg["reps"])
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    trainable = sum(p.numel() for p in params)
    del model, opt, params
    free_memory(device)
    return dict(method=method, batch=batch, seq=seq, grad_ckpt=grad_ckpt, ms=ms, peak_bytes=peak, trainable=trainable)


# -----------------------------------------------------------------------------
# Main


def fmt_mb(b):
    return "—" if b is None else f"{b / 2**20:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    ap.add_argument("--skip", nargs="*", default=[], help="parts to skip: layers crossover inference overhead agreement exactness model")
    args = ap.parse_args()
    cfg = PRESETS[args.preset]
    device = cfg["device"]
    if device == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    timer = Timer(device)
    import peft

    env = dict(
        date=datetime.date.today().isoformat(),
        device=torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine(),
        torch=torch.__version__,
        peft=peft.__version__,
        preset=args.preset,
        dtype=str(cfg["dtype"]),
        rank=cfg["rank"],
        command=f"python benchmarks/bench.py --preset {args.preset}",
    )
    print(f"# {env}", flush=True)
    results: dict = dict(env=env, layers=[], crossover=[], agreement=[], model=[])
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    out_file = os.path.join(out_dir, f"bench_{args.preset}.json")

    def save():
        with open(out_file, "w") as f:
            json.dump(results, f, indent=1)

    methods = ["frozen base", "full FT", "PEFT LoRA r", "PEFT RandLoRA", "ours (auto)", "ours (build)", "ours (factorized)"]
    if "layers" not in args.skip:
        print("\n## One layer, forward + backward\n")
        print("| layer (in→out) | N | " + " | ".join(m.replace("LoRA r", f"LoRA r{cfg['rank']}") for m in methods) + " | ours auto ÷ full FT | held MB: PEFT RandLoRA / ours auto | peak MB: full FT / PEFT RandLoRA / ours auto |")
        print("|" + " --- |" * (len(methods) + 5))
        for in_f, out_f in cfg["layers"]:
            for N in cfg["tokens"]:
                row = {m: bench_layer(m, in_f, out_f, N, cfg, timer) for m in methods}
                results["layers"].extend(row.values())
                save()
                cells = " | ".join(f"{row[m]['ms']:.2f}" for m in methods)
                ratio = row["ours (auto)"]["ms"] / row["full FT"]["ms"]
                held = f"{fmt_mb(row['PEFT RandLoRA']['held_bytes'])} / {fmt_mb(row['ours (auto)']['held_bytes'])}"
                peak = " / ".join(fmt_mb(row[m]["peak_bytes"]) for m in ["full FT", "PEFT RandLoRA", "ours (auto)"])
                print(f"| {in_f}→{out_f} | {N} | {cells} | {ratio:.2f}× | {held} | {peak} |", flush=True)

    if "crossover" not in args.skip:
        print("\n## Merged vs factorized: where they cross (ms, fwd+bwd)\n")
        print("| layer | N | build | factorized | auto picks | faster |")
        print("| --- | --- | --- | --- | --- | --- |")
        for in_f, out_f in cfg["layers"]:
            for N in cfg["crossover_tokens"]:
                mm = bench_layer("ours (build)", in_f, out_f, N, cfg, timer)["ms"]
                fm = bench_layer("ours (factorized)", in_f, out_f, N, cfg, timer)["ms"]
                rn = cfg["rank"] * -(-min(in_f, out_f) // cfg["rank"])
                pick = "build" if N >= randlora._build_from(out_f, in_f, rn, "auto") else "factorized"
                faster = "build" if mm < fm else "factorized"
                results["crossover"].append(dict(in_features=in_f, out_features=out_f, tokens=N, build_ms=mm, factorized_ms=fm, auto=pick))
                save()
                print(f"| {in_f}→{out_f} | {N} | {mm:.3f} | {fm:.3f} | {pick} | {faster} |", flush=True)

    if "inference" not in args.skip:
        print("\n## Inference (forward only, ms)\n")
        print("| layer | N | base layer | ours unmerged | ours after merge() |")
        print("| --- | --- | --- | --- | --- |")
        for in_f, out_f in cfg["layers"]:
            N = cfg["tokens"][1]
            r = inference(in_f, out_f, N, cfg, timer)
            results.setdefault("inference", []).append(r)
            save()
            print(f"| {in_f}→{out_f} | {N} | {r['base layer']:.3f} | {r['ours unmerged']:.3f} | {r['ours merged']:.3f} |", flush=True)

    if "overhead" not in args.skip:
        print("\n## Host overhead: back-to-back forward + backward of tiny batches (ms per call)\n")
        print("| layer | N | frozen base | PEFT LoRA | ours (auto) | ours (eager, no Triton) |")
        print("| --- | --- | --- | --- | --- | --- |")
        in_f, out_f = cfg["layers"][0]
        o = host_overhead(in_f // 2, out_f // 2, 16, cfg)
        results["overhead"] = o
        save()
        print(f"| {o['in_features']}→{o['out_features']} | 16 | {o['frozen base']:.3f} | {o['PEFT LoRA r']:.3f} | {o['ours (auto)']:.3f} | {o['ours (eager)']:.3f} |", flush=True)

    if "agreement" not in args.skip:
        print("\n## Agreement with PEFT RandLoRA (same bases, parameters and inputs; relative error)\n")
        print("| layer | N | output | input grad | lam grad | gam grad | output vs fp64: ours / PEFT |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for in_f, out_f in cfg["layers"]:
            N = cfg["tokens"][0]
            a = agreement(in_f, out_f, N, cfg)
            results["agreement"].append(a)
            save()
            print(f"| {in_f}→{out_f} | {N} | {a['output']:.1e} | {a['input grad']:.1e} | {a['lam grad']:.1e} | {a['gam grad']:.1e} | {a['output vs fp64: ours']:.1e} / {a['output vs fp64: peft']:.1e} |", flush=True)

    if "exactness" not in args.skip:
        print("\n## Exactness (relative error vs a float64 dense reference; fused = Triton kernels on CUDA)\n")
        print("| layer | N | path | output fused / eager | input grad | lam grad | gam grad |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for in_f, out_f in cfg["layers"]:
            for path in ("build", "factorized"):
                N = cfg["tokens"][0]
                e = exactness(in_f, out_f, N, path, cfg)
                results.setdefault("exactness", []).append(e)
                save()
                cell = lambda k: f"{e['fused ' + k]:.1e} / {e['eager ' + k]:.1e}"
                print(f"| {in_f}→{out_f} | {N} | {path} | {cell('output')} | {cell('input grad')} | {cell('lam grad')} | {cell('gam grad')} |", flush=True)

    if "model" not in args.skip:
        print("\n## LLaMA-shaped model, one AdamW step\n")
        print("| batch × seq | method | trainable | ms / step | peak GB |")
        print("| --- | --- | --- | --- | --- |")
        for batch, seq, ckpt in cfg["model_runs"]:
            names = ["PEFT LoRA r", "PEFT RandLoRA", "ours"] + (["full FT"] if (batch, seq) == tuple(cfg["model_runs"][0][:2]) else [])
            for method in names:
                try:
                    r = bench_model(method, batch, seq, ckpt, cfg, timer)
                except torch.cuda.OutOfMemoryError:
                    r = dict(method=method, batch=batch, seq=seq, grad_ckpt=ckpt, ms=None, peak_bytes=None, trainable=None)
                    free_memory(device)
                results["model"].append(r)
                save()
                label = method.replace("LoRA r", f"LoRA r{cfg['rank']}") + (f" r{cfg['rank']}" if method in ("PEFT RandLoRA", "ours") else "")
                gb = "—" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 1e9:.2f}"
                ms = "OOM" if r["ms"] is None else f"{r['ms']:.1f}"
                tr = "—" if r["trainable"] is None else f"{r['trainable']:,}"
                print(f"| {batch} × {seq}{' (grad ckpt)' if ckpt else ''} | {label} | {tr} | {ms} | {gb} |", flush=True)
    save()
    print(f"\nwrote {out_file}")


if __name__ == "__main__":
    main()
