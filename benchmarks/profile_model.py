"""Kernel-level profile of training steps of the LLaMA-shaped benchmark model with randlora.

    python benchmarks/profile_model.py [--batch 4 --seq 1024 --method ours]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import PRESETS, make_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--method", default="ours")
    ap.add_argument("--rows", type=int, default=20)
    args = ap.parse_args()
    cfg = PRESETS[args.preset]
    model = make_model(args.method, cfg, False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, cfg["model"]["vocab_size"], (args.batch, args.seq), device=cfg["device"])

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    cpu_ms = (time.perf_counter() - t0) / 3 * 1e3  # host time with the GPU catching up at the end
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) / 3 * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(f"## {args.method} {args.batch}x{args.seq}: wall {wall_ms:.1f} ms/step, host issue {cpu_ms:.1f} ms/step")
    gpu_us = sum(e.self_device_time_total for e in prof.key_averages()) / 3
    print(f"GPU busy {gpu_us / 1e3:.1f} ms/step")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=50))


if __name__ == "__main__":
    main()
