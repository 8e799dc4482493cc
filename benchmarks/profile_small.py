"""Kernel time against host time of bench_small's training steps: is a step compute-bound or host-bound?

    python benchmarks/profile_small.py --shapes minilm,bert-base --methods lora,ours --json $OUT/profile_small.json
    python benchmarks/profile_small.py --shapes bert-base --mode compile --warmup 5   # the compiled step

For each (shape, method), interleaved over ``--reps`` repeats: a fresh model as bench_small builds it (bf16 weights,
all linear layers of the blocks, RandLoRA's rank matched to LoRA r16's count), ``--warmup`` steps, then ``--steps``
timed steps without the profiler (wall time per step, CUDA-synchronized), then the same steps under torch.profiler.
Reported per step: wall ms; GPU busy ms (the sum of the device time of every kernel, memcpy and memset); busy ÷ wall
(near 1: the GPU is the bound; well below 1: the host, issuing kernels, is); kernel launches; and the CPU operators
with the most self time under the profiler (which inflates host time, so only the split and the counts are read
from it, the wall time from the unprofiled steps). CUDA only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_small import attach, build_base, make_step, parse_shape, shape_info  # noqa: E402

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def measure(spec: dict, info: dict, method: str, args) -> dict:
    """One fresh model: unprofiled wall time per step, then a profile of as many steps."""
    torch._dynamo.reset()  # each run compiles its own model, as bench_small's runs do
    model = attach(method, build_base(spec, "cuda", torch.bfloat16), spec, info)
    fn = model if args.mode == "eager" else torch.compile(model, mode=None if args.mode == "compile" else "reduce-overhead")
    step, _, _ = make_step(method, args.mode, model, fn, spec, "cuda")
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    walls = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e3 / args.steps
    launches = sum(e.count for e in events if e.key in LAUNCHES) / args.steps
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.rows]
    del model, step
    torch.cuda.empty_cache()
    return dict(wall_ms=statistics.median(walls), busy_ms=busy, launches=launches,
                top_cpu=[(e.key, round(e.self_cpu_time_total / 1e3 / args.steps, 3), e.count // args.steps) for e in top])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="minilm,bert-base")
    ap.add_argument("--methods", default="lora,ours")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3, help="steps before timing (compiled modes: the first compiles)")
    ap.add_argument("--mode", default="eager", choices=["eager", "compile", "ro"], help="as bench_small's --modes")
    ap.add_argument("--rows", type=int, default=8, help="CPU operators listed per run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_small.py profiles CUDA steps; no GPU here")
    runs = []
    for name in args.shapes.split(","):
        spec = parse_shape(name)
        info = shape_info(spec)
        for rep in range(args.reps):
            for method in args.methods.split(","):
                r = dict(shape=name, method=method, mode=args.mode, rep=rep, **measure(spec, info, method, args))
                runs.append(r)
                if args.json:  # after every run: a call's time limit keeps the runs so far
                    with open(args.json, "w") as f:
                        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, runs=runs), f, indent=1)
                print(f"{name} {method} rep{rep}: wall {r['wall_ms']:.2f} ms, GPU busy {r['busy_ms']:.2f} ms "
                      f"({r['busy_ms'] / r['wall_ms']:.2f}), {r['launches']:.0f} launches", flush=True)
    print(f"\n## profile_small: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 weights, mode {args.mode}; "
          f"median of {args.reps} runs")
    print("| shape | method | wall ms / step | GPU busy ms / step | busy ÷ wall | kernel launches / step |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name in args.shapes.split(","):
        for method in args.methods.split(","):
            rs = [r for r in runs if r["shape"] == name and r["method"] == method]
            med = {k: statistics.median(r[k] for r in rs) for k in ("wall_ms", "busy_ms", "launches")}
            print(f"| {name} | {method} | {med['wall_ms']:.2f} | {med['busy_ms']:.2f} | {med['busy_ms'] / med['wall_ms']:.2f} | "
                  f"{med['launches']:.0f} |")
    for r in runs[-len(args.methods.split(",")) :]:
        print(f"\n# CPU self time per step under the profiler, {r['shape']} {r['method']} (ms, calls):")
        print("\n".join(f"  {k}: {t} ms, {c}" for k, t, c in r["top_cpu"]))


if __name__ == "__main__":
    main()
