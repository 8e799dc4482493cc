"""Host time per call of randlora's pieces on a GPU (launch-bound: tiny tensors, no sync inside
the timed loop), to see where a host-bound step spends its time.

    python benchmarks/host_overhead.py             # pieces, one layer's forward + backward, PEFT LoRA's
    python benchmarks/host_overhead.py --profile   # and torch.profiler's host time by op, per call
    python benchmarks/host_overhead.py --threads   # and the pieces issued inside a backward (autograd's thread)
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import randlora  # noqa: E402


def per_call_us(fn, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return statistics.median(runs)


def main() -> None:
    dev, dt = "cuda", torch.bfloat16
    r, n, d, N = 32, 64, 2048, 64
    lam = torch.randn(r, n, device=dev)
    gam = torch.randn(n, d, device=dev)
    A = torch.randn(r, d, device=dev, dtype=dt)
    dS = torch.randn(r * n, d, device=dev, dtype=dt)
    rows = {}
    rows["torch.add (one aten op)"] = per_call_us(lambda: torch.add(A, A))
    rows["_small_basis (Triton)"] = per_call_us(lambda: randlora._small_basis(lam, gam, A, dt))
    rows["_small_basis_eager"] = per_call_us(lambda: randlora._small_basis_eager(lam, gam, A, dt))
    rows["_scale_grads (Triton)"] = per_call_us(lambda: randlora._scale_grads(dS, lam, gam, A, 1.0))
    rows["_scale_grads_eager"] = per_call_us(lambda: randlora._scale_grads_eager(dS, lam, gam, A, 1.0))
    lin = nn.Linear(d, d, device=dev, dtype=dt).requires_grad_(False)  # frozen, as inject leaves it
    layer = randlora.RandLoraLinear(lin, randlora.RandLoraConfig(rank=r))
    x = torch.randn(N, d, device=dev, dtype=dt, requires_grad=True)
    rows["RandLoraLinear fwd"] = per_call_us(lambda: layer(x), 500)
    rows["RandLoraLinear fwd+bwd"] = per_call_us(lambda: layer(x).sum().backward(), 500)
    rows["frozen nn.Linear fwd+bwd"] = per_call_us(lambda: lin(x).sum().backward(), 500)
    from peft import LoraConfig, get_peft_model  # a benchmark dependency, as in bench.py

    peft_lora = get_peft_model(nn.Sequential(nn.Linear(d, d, device=dev, dtype=dt)), LoraConfig(r=r, target_modules=["0"]))
    rows["PEFT LoRA fwd+bwd"] = per_call_us(lambda: peft_lora(x).sum().backward(), 500)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {randlora.triton.__version__ if randlora.triton else None}")
    print("| piece | host µs per call |\n| --- | --- |")
    for k, v in rows.items():
        print(f"| {k} | {v:.1f} |")


def profile_one_call() -> None:
    """torch.profiler over 200 forward + backward calls of one tiny layer: host time by op."""
    from torch.profiler import ProfilerActivity, profile

    dev, dt, r, d, N = "cuda", torch.bfloat16, 32, 2048, 64
    lin = nn.Linear(d, d, device=dev, dtype=dt).requires_grad_(False)
    layer = randlora.RandLoraLinear(lin, randlora.RandLoraConfig(rank=r))
    x = torch.randn(N, d, device=dev, dtype=dt, requires_grad=True)
    for _ in range(50):
        layer(x).sum().backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(200):
            layer(x).sum().backward()
        torch.cuda.synchronize()
    rows = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)[:40]
    print("| op | calls per fwd+bwd | self CPU µs per fwd+bwd |\n| --- | --- | --- |")
    for e in rows:
        print(f"| {e.key[:60]} | {e.count / 200:.2f} | {e.self_cpu_time_total / 200:.1f} |")


DEV, DT = "cuda", torch.bfloat16
R, N_BASES, D = 32, 64, 2048


def pieces() -> dict:
    lam = torch.randn(R, N_BASES, device=DEV)
    gam = torch.randn(N_BASES, D, device=DEV)
    A = torch.randn(R, D, device=DEV, dtype=DT)
    dS = torch.randn(R * N_BASES, D, device=DEV, dtype=DT)
    return {
        "one aten op (add)": lambda: torch.add(A, A),
        "_small_basis (Triton)": lambda: randlora._small_basis(lam, gam, A, DT),
        "_scale_grads (Triton)": lambda: randlora._scale_grads(dS, lam, gam, A, 1.0),
        "_backward_routes": lambda: randlora._backward_routes(64, D, D, D, False, True, True),
    }


class Repeat(torch.autograd.Function):
    """Identity whose backward calls ``fn`` 10 times (or nothing)."""

    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn = fn
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        if ctx.fn is not None:
            for _ in range(10):
                ctx.fn()
        return g, None


def thread_table() -> None:
    """--threads: the same pieces issued from autograd's backward thread and from the main thread."""
    x = torch.randn(64, D, device=DEV, dtype=DT, requires_grad=True)
    empty = per_call_us(lambda: Repeat.apply(x, None).sum().backward(), 300)
    print("| piece | µs per call, backward thread | µs per call, main thread |\n| --- | --- | --- |")
    for name, fn in pieces().items():
        in_backward = (per_call_us(lambda: Repeat.apply(x, fn).sum().backward(), 300) - empty) / 10
        print(f"| {name} | {in_backward:.1f} | {per_call_us(fn, 2000):.1f} |")


if __name__ == "__main__":
    main()
    if "--profile" in sys.argv:
        profile_one_call()
    if "--threads" in sys.argv:
        thread_table()
