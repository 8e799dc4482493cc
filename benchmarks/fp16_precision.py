"""How precise the update is in float16 and bfloat16, ours against PEFT's RandLoRA, both against float64.

    python benchmarks/fp16_precision.py                  # a 1024x1024 layer, ~20 s on a CPU
    python benchmarks/fp16_precision.py --width 256 --json benchmarks/results/fp16_precision.json

One linear layer with a zero base weight (so the output is the update alone) is adapted, its ``lam`` drawn from
N(0, sigma^2) at several sigmas, ``gam`` left at its initial ``1/d``. The same adapter is written with ``to_peft`` and
loaded by PEFT into the same model cast to the dtype. For each method: the output's relative error against
``x (s ΔW)^T`` in float64, and ``dlam``'s against float64 autograd. Ours rounds ``S = lam·A·gam`` to the layer's
dtype; PEFT computes its adapter in float32. See README "Limitations".
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import tempfile

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import randlora  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def measure(width: int, rank: int, sigma: float, dtype: torch.dtype, folder: str) -> dict:
    """Update and dlam errors of ours and PEFT for one sigma and dtype."""
    import peft

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(width, width))
    nn.init.zeros_(base[0].weight)
    nn.init.zeros_(base[0].bias)
    ours = randlora.inject(copy.deepcopy(base), ["0"], rank=rank)
    with torch.no_grad():
        ours[0].lam.normal_(0, sigma)
    x, g = torch.randn(64, width).to(dtype), torch.randn(64, width).to(dtype)
    lam = ours[0].lam.detach().double().requires_grad_()
    y_ref = x.double() @ ours[0].delta_weight(torch.float64).t()
    A, B = ours[0].random_bases(torch.float64)
    S = (lam[:, :, None] * A[:, None, :] * ours[0].gam.detach().double()[None]).flatten(0, 1)
    dW = B.flatten(1) @ S * ours[0].scaling  # S's rows k*n+b meet B's columns b*r+k, as PEFT pairs them (MATH.md)
    assert torch.allclose(dW, ours[0].delta_weight(torch.float64), rtol=1e-12, atol=1e-15)  # one update, two references
    (x.double() @ dW.t()).backward(g.double())
    path = os.path.join(folder, f"p{sigma}{dtype}")
    randlora.to_peft(ours, path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base).to(dtype), path, is_trainable=True)
    row = {"sigma": sigma, "dtype": str(dtype).removeprefix("torch.")}
    for name, model in (("ours", ours.to(dtype)), ("peft", theirs)):
        y = model(x)
        y.backward(g)
        lam_p = next(p for n, p in model.named_parameters() if n.endswith(("lam", "randlora_lambda.default")))
        row[name] = {"update": rel(y, y_ref), "dlam": rel(lam_p.grad, lam.grad)}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for dtype in (torch.float16, torch.bfloat16):
            for sigma in (1e-4, 1e-3, 1e-2, 1e-1):
                rows.append(measure(args.width, args.rank, sigma, dtype, folder))
                r = rows[-1]
                print(f"{r['dtype']:9} sigma {sigma:<7g} update: ours {r['ours']['update']:.2e}  peft {r['peft']['update']:.2e}"
                      f"   dlam: ours {r['ours']['dlam']:.2e}  peft {r['peft']['dlam']:.2e}")  # fmt: skip
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"when": when, "torch": torch.__version__, "width": args.width, "rank": args.rank, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
