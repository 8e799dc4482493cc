"""What a compiled training step costs the host: inductor's code for one step of a bench_small shape, per method.

    python benchmarks/compiled_code.py --out $OUT                        # BERT-base on CUDA, lora and ours
    python benchmarks/compiled_code.py --device cpu --shape host-bert --out /tmp/code

For each method it compiles the model as bench_small does (same shape, targets, rank at LoRA r16's count, step),
captures the generated module of every graph (forward, backward) with torch._inductor.utils.run_and_get_code and
writes them to OUT/code_<method>.txt. It prints, per graph, the number of graph inputs and what the wrapper's call()
does per step: Triton launches (".run("), extern kernels (cuBLAS), allocations, tensor reinterpretations, input
asserts; then the host time (time.perf_counter, no synchronisation inside) of the compiled forward call alone and
of a whole step, median (range) of --steps after 5 warm-up steps. A step where these counts are lower but the host
time higher has its cost outside the launches (guards, runtime wrappers, input handling).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

import torch

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__))]
import bench_small as bs

PATTERNS = {"triton": r"\.run\(", "extern": r"extern_kernels\.\w+\(", "alloc": r"empty_strided",
            "reinterpret": r"reinterpret_tensor\(", "asserts": r"assert_size_stride\("}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="bert-base")
    ap.add_argument("--methods", default="lora,ours")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev, spec = args.device, bs.parse_shape(args.shape)
    info, dtype = bs.shape_info(spec), torch.bfloat16 if args.device == "cuda" else torch.float32
    os.makedirs(args.out, exist_ok=True)
    for method in args.methods.split(","):
        bs.reset_dynamo()
        model = bs.attach(method, bs.build_base(spec, dev, dtype), spec, info).train()
        fn = torch.compile(model)
        step, opt, _ = bs.make_step(method, "compile", model, fn, spec, dev)
        _, codes = run_and_get_code(step)
        with open(os.path.join(args.out, f"code_{method}.txt"), "w") as f:
            f.write("\n\n#### NEXT GRAPH ####\n\n".join(codes))
        for i, code in enumerate(codes):
            call = code[code.find("def call(") :]
            inputs = re.search(r"\n\s*(.*?) = args\n", call)
            counts = {k: len(re.findall(p, call)) for k, p in PATTERNS.items()}
            print(f"{method} graph {i}: inputs {len(inputs[1].split(',')) if inputs else '?'}, {counts}", flush=True)
        for _ in range(5):
            step()
        bs.sync(dev)
        ids = torch.randint(0, spec["cfg"]["vocab_size"], (spec["batch"], spec["seq"]), device=dev)
        fwd, whole = [], []
        for _ in range(args.steps):
            bs.sync(dev)
            t0 = time.perf_counter()
            out = fn(input_ids=ids)
            fwd.append((time.perf_counter() - t0) * 1e3)
            del out
            opt.zero_grad(set_to_none=True)
            bs.sync(dev)
            t0 = time.perf_counter()
            step()
            whole.append((time.perf_counter() - t0) * 1e3)
        bs.sync(dev)
        print(f"{method}: host ms, compiled forward call {statistics.median(fwd):.2f} ({min(fwd):.2f}-{max(fwd):.2f}), "
              f"whole step {statistics.median(whole):.2f} ({min(whole):.2f}-{max(whole):.2f})", flush=True)
        del model, fn, step, opt
        bs.free(dev)


if __name__ == "__main__":
    from torch._inductor.utils import run_and_get_code

    main()
