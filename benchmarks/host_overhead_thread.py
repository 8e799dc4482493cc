"""Is a launch slower inside autograd's backward thread than in the main thread? Host time per
call of one aten op, randlora's two Triton kernels and its route choice: issued 10 times inside a
custom backward (less an empty backward), and back to back in the main thread.

    python benchmarks/host_overhead_thread.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import randlora  # noqa: E402

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


def per_call_us(fn, n: int = 300) -> float:
    for _ in range(20):
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
    x = torch.randn(64, D, device=DEV, dtype=DT, requires_grad=True)
    empty = per_call_us(lambda: Repeat.apply(x, None).sum().backward())
    print("| piece | µs per call, backward thread | µs per call, main thread |\n| --- | --- | --- |")
    for name, fn in pieces().items():
        in_backward = (per_call_us(lambda: Repeat.apply(x, fn).sum().backward()) - empty) / 10
        print(f"| {name} | {in_backward:.1f} | {per_call_us(fn, 2000):.1f} |")


if __name__ == "__main__":
    main()
