"""The arithmetic floor of a training step: the matmul work of bench_small.py's step, counted, by method.

    python benchmarks/flops.py                                   # the four shapes of bench_small.py, ~30 s on a CPU
    python benchmarks/flops.py --shapes minilm,1b:1x2048 --json benchmarks/results/flops.json

Each method's model is built, adapted and stepped exactly as bench_small.py does (its ``build_base``, ``attach`` and
``make_step``: forward, loss, backward, AdamW), but on the meta device, under ``torch.utils.flop_counter``: every
matmul the step dispatches is counted from its shapes and nothing is computed, so the 1.1B shape counts in seconds
on a CPU. The counts are what any GPU must compute, and ``ours ÷ LoRA`` is the floor of a compute-bound step's time
ratio at equal matmul efficiency (a step that is host- or memory-bound can sit below or above it).

Why ours counts more: the update is full rank (``r·n ≥ d``), so ``dS`` costs a weight-gradient-sized product
(``dYᵀ X``, then ``Bfᵀ G``) LoRA does not have, and from ``_build_from`` tokens on each layer builds ``W'`` (a
``D·d·rn`` product) in forward and again in backward (docs/MATH.md#cost-model). The routes printed per layer
shape are randlora's own choices for the step's token count.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_small import DEFAULT_SHAPES, attach, build_base, import_randlora, make_step, parse_shape, shape_info  # noqa: E402

METHODS = ("frozen", "lora", "ours", "randlora")


def step_macs(spec: dict, info: dict, method: str, device: str = "meta") -> tuple[int, dict[str, int]]:
    """Multiply-adds of one training step of ``method`` (total, and by aten op), counted on ``device``."""
    if spec["family"] != "bert":  # its check for packed sequences reads values, which meta tensors have not (no matmul)
        import transformers.masking_utils as masking

        masking.find_packed_sequence_indices = lambda position_ids: None
    model = attach(method, build_base(spec, device, torch.bfloat16), spec, info)
    model.train()
    step, _, _ = make_step(method, "eager", model, model, spec, device)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops() // 2, {str(k): v // 2 for k, v in counter.get_flop_counts()["Global"].items()}


def routes(info: dict, tokens: int) -> list[str]:
    """The forward strategy and backward routes randlora's cost model picks per adapted layer shape."""
    randlora, out = import_randlora(), []
    for shape in info["layer_shapes"]:
        in_f, out_f = (int(v) for v in shape.split("->"))
        rn = info["rand_rank"] * -(-min(in_f, out_f) // info["rand_rank"])
        build = tokens >= randlora._build_from(out_f, in_f, rn, "auto")
        dx, ds = randlora._backward_routes(tokens, out_f, in_f, rn, False, True, True)
        out.append(f"{shape}: {'build' if build else 'factorized'} forward; dX {dx}, dS {ds}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="bench_small.py's shapes, NAME or NAME:BxS")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = []
    for text in (s.strip() for s in args.shapes.split(",") if s.strip()):
        spec = parse_shape(text)
        info = shape_info(spec)
        counts = {m: step_macs(spec, info, m) for m in methods}
        tokens = spec["batch"] * spec["seq"]
        rows.append(dict(shape=text, tokens=tokens, adapted_layers=info["adapted_layers"], rand_rank=info["rand_rank"],
                         gmac={m: c[0] / 1e9 for m, c in counts.items()}, by_op={m: c[1] for m, c in counts.items()},
                         routes=routes(info, tokens)))  # fmt: skip
    print("Matmul multiply-adds per training step (GMAC; forward, loss, backward, AdamW), counted by torch's flop counter")
    print("on the meta device; (÷ frozen) and the ratio ÷ PEFT LoRA r16. RandLoRA at the rank matching LoRA r16's count.\n")
    print("| shape | tokens | adapted layers | RandLoRA rank | " + " | ".join(methods) + " | ours ÷ LoRA |")
    print("| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in methods) + " | ---: |")
    for w in rows:
        g, f = w["gmac"], w["gmac"].get("frozen")
        cells = [f"{g[m]:,.1f}" + (f" ({g[m] / f:.2f})" if f and m != "frozen" else "") for m in methods]
        ratio = f"**{g['ours'] / g['lora']:.2f}**" if "ours" in g and "lora" in g else ""
        print(f"| {w['shape']} | {w['tokens']:,} | {w['adapted_layers']} | {w['rand_rank']} | " + " | ".join(cells) + f" | {ratio} |")
    print("\nRoutes ours takes per adapted layer shape at the step's token count (randlora's cost model):")
    for w in rows:
        print(f"  {w['shape']}: " + "; ".join(w["routes"]))
    if args.json:
        out = dict(script="benchmarks/flops.py", argv=sys.argv[1:], torch=torch.__version__, rows=rows,
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
