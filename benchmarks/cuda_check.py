"""Exactness and kernel timings on a CUDA GPU (run on the device; CPU tests cover the rest).

    python benchmarks/cuda_check.py --json $OUT/cuda_check.json

1. Exactness: RandLoraLinear forward and backward (y, dX, dlam, dgam) on CUDA, both strategies, bf16 and float32,
   dense and sparse bases, with the Triton kernels on, against a float64 reference W + s·ΔW built from the layer's
   own bases (relative Frobenius error); and the kernels against the eager reference (randlora.TRITON = False).
2. torch.compile on CUDA: a tiny LLaMA (transformers), fullgraph, default and mode="reduce-overhead": compiled loss
   and lam/gam gradients against eager (float32), graphs compiled after 3 steps.
3. Kernels versus the eager reference, host and device time per call, for S (r*n, d) sizes from MiniLM's to 8B's:
   decides whether small layers should take the eager ops (launch-bound) instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch._dynamo.testing
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import randlora  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def exactness(dev: str) -> list[dict]:
    rows = []
    for (in_f, out_f), N, strategy, dtype, bases in [
        ((384, 1536), 512, "build", torch.bfloat16, "dense"), ((1536, 384), 512, "factorized", torch.bfloat16, "dense"),
        ((1024, 1024), 2048, "build", torch.float32, "dense"), ((1024, 1024), 64, "factorized", torch.float32, "dense"),
        ((768, 3072), 1024, "auto", torch.bfloat16, "sparse"), ((2048, 512), 4096, "auto", torch.float32, "very_sparse"),
    ]:  # fmt: skip
        torch.manual_seed(0)
        base = nn.Linear(in_f, out_f, device=dev, dtype=dtype)
        layer = randlora.RandLoraLinear(base, randlora.RandLoraConfig(rank=16, bases=bases, strategy=strategy))
        with torch.no_grad():
            layer.lam.normal_()
            layer.gam.normal_(0, 1 / layer.d**0.5)
        x = torch.randn(N, in_f, device=dev, dtype=dtype, requires_grad=True)
        dy = torch.randn(N, out_f, device=dev, dtype=dtype)
        y = layer(x)
        y.backward(dy)
        A, B = layer.random_bases(torch.float64)  # (r, d), (D, n, r): the reference, element by element (MATH.md)
        lam, gam = layer.lam.detach().double().cpu().requires_grad_(), layer.gam.detach().double().cpu().requires_grad_()
        r, n = lam.shape
        S = (lam[:, :, None] * A[:, None, :] * gam[None]).reshape(r * n, -1)
        Bf = B.reshape(B.shape[0], -1)
        dW = Bf @ S  # column b*r + k of Bf meets row k*n + b of S, as PEFT pairs them (docs/MATH.md#the-peft-pairing)
        dW = dW if out_f >= in_f else dW.t()
        x64 = x.detach().double().cpu().requires_grad_()
        W64 = base.weight.detach().double().cpu() + layer.scaling * dW
        y64 = x64 @ W64.t() + base.bias.detach().double().cpu()
        y64.backward(dy.double().cpu())
        row = dict(shape=f"{in_f}->{out_f}", N=N, strategy=strategy, dtype=str(dtype), bases=bases, y=rel(y.cpu(), y64),
                   dx=rel(x.grad.cpu(), x64.grad), dlam=rel(layer.lam.grad.cpu(), lam.grad), dgam=rel(layer.gam.grad.cpu(), gam.grad))  # fmt: skip
        rows.append(row)
        print("exact", row, flush=True)
    return rows


def kernels(dev: str) -> list[dict]:
    rows = []
    for r, n, d in [(12, 32, 384), (24, 32, 768), (28, 32, 896), (32, 64, 2048), (32, 128, 4096)]:
        lam = torch.randn(r, n, device=dev)
        gam = torch.randn(n, d, device=dev)
        A = torch.randn(r, d, device=dev, dtype=torch.bfloat16)
        dS = torch.randn(r * n, d, device=dev, dtype=torch.bfloat16)
        row = dict(r=r, n=n, d=d)
        for triton_on in (True, False):
            randlora.TRITON = triton_on and randlora.triton is not None
            S = randlora._small_basis(lam, gam, A, torch.bfloat16)
            dl, dg = randlora._scale_grads(dS, lam, gam, A, 2.0)
            key = "triton" if triton_on else "eager"
            row[f"{key}_S"], row[f"{key}_grads"] = S.float(), (dl, dg)
            for name, fn in (("S", lambda: randlora._small_basis(lam, gam, A, torch.bfloat16)),
                             ("grads", lambda: randlora._scale_grads(dS, lam, gam, A, 2.0))):  # fmt: skip
                for _ in range(20):
                    fn()
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(200):
                    fn()
                host = (time.perf_counter() - t) / 200 * 1e6
                torch.cuda.synchronize()
                dev_t = (time.perf_counter() - t) / 200 * 1e6
                row[f"{key}_{name}_host_us"], row[f"{key}_{name}_us"] = round(host, 1), round(dev_t, 1)
        randlora.TRITON = randlora.triton is not None
        row["S_rel"] = rel(row.pop("triton_S"), row.pop("eager_S"))
        (tl_, tg_), (el_, eg_) = row.pop("triton_grads"), row.pop("eager_grads")
        row["dlam_rel"], row["dgam_rel"] = rel(tl_, el_), rel(tg_, eg_)
        rows.append(row)
        print("kernel", row, flush=True)
    return rows


def compiled(dev: str) -> list[dict]:
    import transformers

    rows = []
    for mode in ("default", "reduce-overhead") if dev == "cuda" else ("default",):
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=4, vocab_size=256)  # fmt: skip
        ref = transformers.LlamaForCausalLM(cfg).to(dev)
        randlora.inject(ref, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], rank=8)
        for _, a in randlora.named_adapters(ref):
            with torch.no_grad():
                a.lam.normal_(0, 0.02)
        ids = torch.randint(0, 256, (2, 64), device=dev)

        def loss_of(m):
            logits = m(input_ids=ids).logits.float()
            return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))

        import copy

        comp_model = copy.deepcopy(ref)
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounter() if mode == "default" else None
        comp = torch.compile(comp_model, fullgraph=True, mode=None if mode == "default" else mode, backend=counter or "inductor")
        errs = []
        for step in range(3):
            if mode == "reduce-overhead" and dev == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            le, lc = loss_of(ref), loss_of(comp)
            le.backward()
            lc.backward()
            ge = [p.grad for p in ref.parameters() if p.requires_grad]
            gc_ = [p.grad for p in comp_model.parameters() if p.requires_grad]
            errs.append(max([abs(le.item() - lc.item()) / abs(le.item())] + [rel(a, b) for a, b in zip(gc_, ge)]))
            for m in (ref, comp_model):
                m.zero_grad(set_to_none=True)
        row = dict(mode=mode, max_rel_err=max(errs), frames=counter.frame_count if counter else None)
        rows.append(row)
        print("compile", row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of parts 1 and 2")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = args.device
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    out = dict(device=name, torch=torch.__version__, triton=getattr(randlora.triton, "__version__", None))
    out["exactness"], out["kernels"] = exactness(dev), kernels(dev) if dev == "cuda" else []
    out["compile"] = compiled(dev)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
