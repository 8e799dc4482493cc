"""Adapter file sizes: randlora's own checkpoint against PEFT's RandLoRA checkpoint.

    python benchmarks/adapter_size.py                 # about 2 minutes and ~16 GB of RAM on a CPU
    python benchmarks/adapter_size.py --skip-to-peft  # without writing the ~10 GB to_peft folder

The LLaMA-shaped benchmark model (hidden 2048, MLP 5632, 16 layers, 16 heads, vocab 32000;
about 1e9 parameters) is built on the CPU in bfloat16 with uninitialised weights: file sizes do
not depend on the values. Targets q, k, v, up, down (80 layers), r = 32. Written to a
temporary folder and deleted again:

* ``randlora.save_adapter``: lam/gam only (float32); the bases are regenerated from the seed.
* PEFT ``save_pretrained`` (``save_projection=True``, PEFT's default): lam/gam plus the shared
  bases ``randlora_A`` (r, 1, d_max) and ``randlora_B`` (D_max, n_max, r) in the base model's
  dtype (bf16 here), stored once per adapted layer and once more by PEFT up to 0.21, once by 0.22
  (the table counts the copies in the file).
* ``randlora.to_peft``: PEFT's layout with the bases once, at ``base_model.``, in float32 (so any
  machine loads it exactly).

Prints a markdown table and writes ``benchmarks/results/adapter_size.json`` (or ``$OUT``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import randlora  # noqa: E402

MODEL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16, vocab_size=32000)
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
RANK = 32


def build(dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**MODEL)).to(dtype)
    return model.to_empty(device="cpu").eval()  # uninitialised: sizes do not depend on values


def copies(folder: str) -> str:
    """How many copies of randlora_A a PEFT folder's weights file holds, in words."""
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "adapter_model.safetensors"), framework="pt") as f:
        n = sum(k.endswith("randlora_A") for k in f.keys())
    return "once" if n == 1 else f"{n} times (per layer and once more)"


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--skip-to-peft", action="store_true", help="do not write the to_peft folder (~10 GB)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    warnings.filterwarnings("ignore")
    import peft
    from peft import RandLoraConfig, get_peft_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="randlora-size-", dir=os.environ.get("TMPDIR")) as tmp:
        model = build(dtype)
        n_params = sum(p.numel() for p in model.parameters())
        randlora.inject(model, TARGETS, RANK, seed=0)
        layers = dict(randlora.named_adapters(model))
        n_layers = len(layers)
        trainable = sum(m.lam.numel() + m.gam.numel() for m in layers.values())
        t = time.perf_counter()
        randlora.save_adapter(model, os.path.join(tmp, "ours.safetensors"))
        ours = os.path.getsize(os.path.join(tmp, "ours.safetensors"))
        rows.append(("randlora `save_adapter`", "lam/gam (float32); bases regenerated from the seed", ours, time.perf_counter() - t))
        if not args.skip_to_peft:
            t = time.perf_counter()
            randlora.to_peft(model, os.path.join(tmp, "to_peft"))
            size = folder_bytes(os.path.join(tmp, "to_peft"))
            what = f"PEFT layout: lam/gam + the bases {copies(os.path.join(tmp, 'to_peft'))} (float32)"
            rows.append(("randlora `to_peft`", what, size, time.perf_counter() - t))
            shutil.rmtree(os.path.join(tmp, "to_peft"))
        del model, layers
        gc.collect()

        model = build(dtype)
        pm = get_peft_model(model, RandLoraConfig(r=RANK, target_modules=TARGETS))
        A = pm.base_model.randlora_A["default"]
        B = pm.base_model.randlora_B["default"]
        peft_trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
        t = time.perf_counter()
        pm.save_pretrained(os.path.join(tmp, "peft"))
        size = folder_bytes(os.path.join(tmp, "peft"))
        rows.append(
            (
                "PEFT `save_pretrained`",
                f"lambda/gamma + randlora_A {tuple(A.shape)} and randlora_B {tuple(B.shape)} ({str(B.dtype).removeprefix('torch.')}) "
                f"{copies(os.path.join(tmp, 'peft'))}",
                size,
                time.perf_counter() - t,
            )
        )
        assert peft_trainable == trainable, (peft_trainable, trainable)
        del pm, model
        gc.collect()

    lines = [
        "| checkpoint | contents | bytes | MB | vs randlora |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name, what, size, _ in rows:
        lines.append(f"| {name} | {what} | {size:,} | {size / 1e6:,.1f} | {size / ours:,.1f}x |")
    table = "\n".join(lines)
    head = (
        f"LLaMA-shaped model ({n_params / 1e6:,.0f} M parameters, {args.dtype}), targets {','.join(TARGETS)} "
        f"in {n_layers} layers, r={RANK}: {trainable:,} trainable parameters"
    )
    print(head)
    print()
    print(table)
    result = {
        "env": {
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()} CPU ({os.cpu_count()} cores), {platform.system()}",
            "torch": torch.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
            "command": "python benchmarks/adapter_size.py" + (" --skip-to-peft" if args.skip_to_peft else "") + ("" if args.dtype == "bfloat16" else f" --dtype {args.dtype}"),
        },
        "model": dict(MODEL, dtype=args.dtype, parameters=n_params),
        "targets": TARGETS,
        "rank": RANK,
        "trainable": trainable,
        "files": [{"checkpoint": n, "contents": w, "bytes": s, "write_s": round(dt, 2)} for n, w, s, dt in rows],
        "table": table,
    }
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "adapter_size.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
