"""One bitsandbytes nf4 Linear4bit on CUDA with a RandLoRA adapter: forward and the adapter's
gradients against a float64 reference built from the dequantized weight (issue #9 GPU check).

    python benchmarks/check_nf4_layer.py        # needs CUDA and bitsandbytes
"""

import torch
import torch.nn as nn

import randlora


def main() -> None:
    import bitsandbytes as bnb

    torch.manual_seed(0)
    rows = []
    for out_f, in_f in ((4096, 4096), (14336, 4096), (4096, 14336)):
        dense = nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
        q = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
        model = nn.Sequential(q).cuda()
        W = bnb.functional.dequantize_4bit(model[0].weight.data, model[0].weight.quant_state).double()  # (out, in)
        randlora.inject(model, ["0"], rank=32)
        layer = model[0]
        with torch.no_grad():
            layer.lam.normal_(0, 0.02)
        x = torch.randn(2048, in_f, device="cuda", dtype=torch.bfloat16)
        for strategy in ("build", "factorized"):
            layer.strategy = strategy
            layer.lam.grad = layer.gam.grad = None
            y = layer(x)
            g = torch.randn_like(y)
            (y.float() * g.float()).sum().backward()
            lam = layer.lam.detach().double().requires_grad_()
            gam = layer.gam.detach().double().requires_grad_()
            A, Bf = layer._bases.dense(layer.D, layer.d, torch.float64, device="cuda")
            S = (lam.unsqueeze(2) * gam * A.unsqueeze(1)).flatten(0, 1)
            M = Bf @ S
            dWr = (M if out_f >= in_f else M.t()) * layer.scaling
            ref = x.double() @ (W + dWr).t()
            (ref * g.double()).sum().backward()
            rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
            rows.append((f"{out_f}x{in_f}", strategy, rel(y.detach(), ref.detach()), rel(layer.lam.grad, lam.grad),
                         rel(layer.gam.grad, gam.grad), rel(x.double() @ W.t(), ref.detach())))
    print("| layer (out x in) | strategy | y rel. err vs float64 | dlam rel. err | dgam rel. err | (size of the update: rel. change of y) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.2e} | {r[3]:.2e} | {r[4]:.2e} | {r[5]:.2e} |")


if __name__ == "__main__":
    main()
