"""Where the time of one RandLoRA layer goes: a kernel-level profile of forward + backward.

    python benchmarks/profile_layer.py [--in 4096 --out 4096 --tokens 8192 --path merged]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import randlora  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--in", dest="in_f", type=int, default=4096)
    ap.add_argument("--out", dest="out_f", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--path", default="merged")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model = nn.Sequential(nn.Linear(args.in_f, args.out_f, bias=False, device=dev, dtype=dtype))
    randlora.inject(model, ["0"], args.rank, path=args.path)
    with torch.no_grad():
        model[0].lam.normal_()
    x = torch.randn(args.tokens, args.in_f, device=dev, dtype=dtype, requires_grad=True)
    dy = torch.randn(args.tokens, args.out_f, device=dev, dtype=dtype)
    def step():
        x.grad = None
        model[0].lam.grad = model[0].gam.grad = None
        model(x).backward(dy)

    for _ in range(3):
        step()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(5):
            step()
        if dev == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
    print(f"## {args.in_f}->{args.out_f}, N={args.tokens}, path={args.path} (5 iterations)")
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
