"""The price of serving a RandLoRA adapter through a LoRA runtime.

RandLoRA's update is full rank; a LoRA runtime (PEFT, vLLM, ...) only takes rank-k factors.
``randlora.to_lora(model, folder, k)`` writes, per layer, the best rank-k approximation of the
update (truncated SVD) as a Hugging Face PEFT LoRA folder. This measures what that costs on the
example's real task:

1. Train the RandLoRA classifier of ``train_example.py`` exactly as its default run does (MiniLM,
   Rotten Tomatoes, every linear layer of the encoder, RandLoRA rank 12, 60 steps of 16, lr 3e-4,
   head lr 3e-3, seed 0, max 40 tokens), through train_example's own functions, and report its test
   accuracy.
2. For each export rank k: ``randlora.to_lora(trained.bert, folder, k)``; load the folder into a
   fresh plain copy of the base encoder with ``peft.PeftModel.from_pretrained``; put the trained
   classifier head on top; evaluate test accuracy, the largest |logit difference| from the RandLoRA
   model over the test split, the fraction of test predictions that agree with it, the per-layer
   relative Frobenius error of the export (mean and max over the 36 layers, as ``to_lora``
   returns it) and the folder's size. k = 384 = min(in, out) of every MiniLM layer is exact (up to
   float32 rounding).
3. References: the trained head on the plain base encoder (the adapter dropped, "rank 0"), and the
   sizes of RandLoRA's own adapter file (``save_adapter``) and of its PEFT RandLoRA folder
   (``to_peft``).

The classifier head: train_example injects RandLoRA into the whole ``Classifier`` with
``modules_to_save=["head"]``, so the head is trained in full and every export carries it (PEFT's
``modules_to_save``); the LoRA folder is loaded into a fresh plain ``Classifier`` (whose random head
the folder replaces). If train_example adapts the encoder only (its earlier form), the encoder is
exported and the trained head is put on top of the loaded encoder instead. Either way the LoRA
factors cover the 36 encoder layers only; the report says which case ran.

    python benchmarks/export_lora.py            # a few minutes on one thread
        # -> benchmarks/results/export_lora.json and benchmarks/results/export_lora.md
    python benchmarks/export_lora.py --tiny     # smoke test (a few steps, a few snippets)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import randlora
import train_example as te

RANKS = [1, 4, 8, 11, 16, 32, 64, 128, 256, 384]


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} CPUs"


def folder_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


@torch.no_grad()
def logits_of(model: torch.nn.Module, data, batch: int = 128) -> torch.Tensor:
    model.eval()
    out = []
    for i in range(0, len(data), batch):
        ids, mask = te.pad([d[0] for d in data[i : i + batch]])
        out.append(model(ids, mask))
    return torch.cat(out)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--ranks", type=int, nargs="+", default=RANKS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="default benchmarks/results/export_lora.json (none with --tiny)")
    p.add_argument("--md", default=None, help="default benchmarks/results/export_lora.md (none with --tiny)")
    args = p.parse_args(argv)
    if not args.tiny and args.json is None and args.md is None:
        args.json = os.path.join(ROOT, "benchmarks", "results", "export_lora.json")
        args.md = os.path.join(ROOT, "benchmarks", "results", "export_lora.md")
    import peft

    torch.set_num_threads(args.threads)
    ex = te.parse_args(["--tiny"] if args.tiny else [])  # train_example's own defaults
    device = torch.device("cpu")
    t0 = time.perf_counter()

    # --- 1. train_example's RandLoRA run (same data, model, rank, steps, lr, seed)
    base, tokenizer = te.load_minilm()
    splits = te.rotten_tomatoes()
    train_data = splits["train"][: ex.train_examples] if ex.train_examples else splits["train"]
    test_data = splits["test"][: ex.test_examples] if ex.test_examples else splits["test"]
    train_set = list(zip(te.encode(tokenizer, [t for t, _ in train_data], ex.max_len), [y for _, y in train_data]))
    test_set = list(zip(te.encode(tokenizer, [t for t, _ in test_data], ex.max_len), [y for _, y in test_data]))
    model = te.make_model(base, "randlora", 2, ex.seed, rank=ex.rank)
    print(f"training RandLoRA r{ex.rank}: {te.count_trainable(model):,} trainable, {ex.steps} steps of {ex.batch}, lr {ex.lr_randlora:g}, "
          f"head lr {ex.lr_head:g}, seed {ex.seed}", flush=True)
    run = te.train(model, train_set, ex.steps, ex.batch, ex.lr_randlora, ex.seed, device, label="RandLoRA", head_lr=ex.lr_head)
    acc = te.accuracy(model, test_set, device)
    ref = logits_of(model, test_set)
    pred = ref.argmax(-1)
    print(f"RandLoRA test accuracy {100 * acc:.2f}% ({len(test_set)} snippets), trained in {run.train_s:.0f} s", flush=True)

    shapes = te.target_shapes(base, te.TARGETS)
    # train_example injects into the whole Classifier with modules_to_save=["head"] (the head is then a
    # randlora.SavedModule and goes into every export); an older train_example injected into the encoder
    # only, with the head beside it. Both are handled: export what carries the adapter, put the head on
    # top when it is not part of the export.
    head_inside = isinstance(model.head, randlora.SavedModule)
    adapted = model if head_inside else model.bert
    head_state = (model.head.trained if head_inside else model.head).state_dict()
    tmp = tempfile.mkdtemp(prefix="export_lora_")
    sizes = {}
    randlora.save_adapter(adapted, os.path.join(tmp, "randlora.safetensors"))
    sizes["randlora_save_adapter"] = folder_bytes(os.path.join(tmp, "randlora.safetensors"))
    randlora.to_peft(adapted, os.path.join(tmp, "peft_randlora"))
    sizes["peft_randlora_folder"] = folder_bytes(os.path.join(tmp, "peft_randlora"))

    def fresh_base() -> torch.nn.Module:
        """A plain copy of what was adapted: the classifier (random head, replaced by the folder's) or the encoder."""
        return te.Classifier(copy.deepcopy(base), 2) if head_inside else copy.deepcopy(base)

    def with_head(loaded: torch.nn.Module) -> torch.nn.Module:
        if head_inside:
            return loaded.eval()  # the folder's modules_to_save carries the trained head
        clf = te.Classifier(loaded, 2)
        clf.head.load_state_dict(head_state)
        return clf.eval()

    def plain_with_trained_head() -> torch.nn.Module:
        clf = te.Classifier(copy.deepcopy(base), 2)
        clf.head.load_state_dict(head_state)
        return clf.eval()

    def evaluate(clf: torch.nn.Module) -> dict:
        logits = logits_of(clf, test_set)
        labels = torch.tensor([y for _, y in test_set])
        return {"test_accuracy": float((logits.argmax(-1) == labels).float().mean()),
                "max_abs_logit_diff": float((logits - ref).abs().max()),
                "agreement": float((logits.argmax(-1) == pred).float().mean())}

    # sanity: the PEFT RandLoRA folder reproduces the model (not a LoRA runtime, a reference)
    peft_rand = evaluate(with_head(peft.PeftModel.from_pretrained(fresh_base(), os.path.join(tmp, "peft_randlora"))))
    dropped = evaluate(plain_with_trained_head())
    print(f"trained head on the plain base encoder: accuracy {100 * dropped['test_accuracy']:.2f}%; PEFT RandLoRA folder: "
          f"accuracy {100 * peft_rand['test_accuracy']:.2f}%, max |Δlogit| {peft_rand['max_abs_logit_diff']:.2e}", flush=True)

    rows = []
    for k in args.ranks:
        t = time.perf_counter()
        folder = os.path.join(tmp, f"lora_r{k}")
        errors = randlora.to_lora(adapted, folder, k)
        export_s = time.perf_counter() - t
        loaded = peft.PeftModel.from_pretrained(fresh_base(), folder)
        n_lora = sum(m.numel() for n, m in loaded.named_parameters() if "lora_" in n)
        assert len(errors) == len(shapes), (len(errors), len(shapes))
        row = {"rank": k, "mean_rel_error": statistics.mean(errors.values()), "max_rel_error": max(errors.values()),
               "layers": len(errors), "lora_params": n_lora, "folder_bytes": folder_bytes(folder), "export_s": export_s,
               **evaluate(with_head(loaded))}
        row["eval_s"] = time.perf_counter() - t - export_s
        rows.append(row)
        shutil.rmtree(folder)
        print(f"  rank {k:>3}: rel. error mean {row['mean_rel_error']:.4f} max {row['max_rel_error']:.4f}; accuracy "
              f"{100 * row['test_accuracy']:.2f}%; max |Δlogit| {row['max_abs_logit_diff']:.3e}; agreement {100 * row['agreement']:.1f}%; "
              f"{row['folder_bytes'] / 2**20:.2f} MiB", flush=True)
    shutil.rmtree(tmp)

    results = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + list(sys.argv[1:] if argv is None else argv)),
        "machine": machine(), "threads": args.threads, "torch": torch.__version__, "peft": peft.__version__,
        "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "train": {"rank": ex.rank, "steps": ex.steps, "batch": ex.batch, "lr": ex.lr_randlora, "lr_head": ex.lr_head, "seed": ex.seed,
                  "max_len": ex.max_len, "train_snippets": len(train_set), "test_snippets": len(test_set),
                  "trainable": te.count_trainable(model), "train_s": run.train_s},
        "head_in_export": head_inside,
        "randlora_test_accuracy": acc, "adapter_dropped": dropped, "peft_randlora": peft_rand, "sizes": sizes,
        "lora_params_matching_count": te.lora_param_count(shapes, te.matching_lora_rank(shapes, te.randlora_param_count(shapes, ex.rank))),
        "matching_lora_rank": te.matching_lora_rank(shapes, te.randlora_param_count(shapes, ex.rank)),
        "rows": rows, "total_wall_s": time.perf_counter() - t0,
    }
    md = report(results)
    print(md)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    return results


def report(r: dict) -> str:
    tr = r["train"]
    L = ["# Serving RandLoRA through a LoRA runtime: `randlora.to_lora` on the example's classifier", ""]
    L.append(f"Command: `{r['command']}`  ")
    L.append(f"Machine: {r['machine']}, {r['threads']} thread(s); torch {r['torch']}, peft {r['peft']}, Python {r['python']}; {r['date']}; "
             f"total wall time {r['total_wall_s'] / 60:.1f} min.")
    L.append("")
    L.append(f"RandLoRA classifier trained as `train_example.py` does by default: MiniLM, Rotten Tomatoes, all 36 linear layers of "
             f"the encoder, RandLoRA r{tr['rank']} ({tr['trainable']:,} trainable incl. the 770-parameter head), {tr['steps']} steps of "
             f"{tr['batch']}, lr {tr['lr']:g}, head lr {tr['lr_head']:g}, seed {tr['seed']}, ≤ {tr['max_len']} tokens; "
             f"{tr['train_snippets']:,} training snippets, {tr['test_snippets']:,} test snippets (other movies).")
    L.append("")
    L.append("- The classifier head " + ("is a module to save inside every export (PEFT `modules_to_save`)." if r["head_in_export"]
             else "is not part of the export; the trained head is put on top of the loaded encoder."))
    L.append(f"- **RandLoRA adapter's own test accuracy: {100 * r['randlora_test_accuracy']:.2f}%**")
    pr = r["peft_randlora"]
    L.append(f"- PEFT RandLoRA folder (`randlora.to_peft`) loaded by PEFT: accuracy {100 * pr['test_accuracy']:.2f}%, max |Δlogit| "
             f"{pr['max_abs_logit_diff']:.1e}; {r['sizes']['peft_randlora_folder'] / 2**20:.2f} MiB (the random bases are stored).")
    L.append(f"- RandLoRA's own adapter file (`randlora.save_adapter`, bases regenerated from the seed): "
             f"{r['sizes']['randlora_save_adapter'] / 2**20:.2f} MiB.")
    dr = r["adapter_dropped"]
    L.append(f"- The trained head on the plain base encoder (adapter dropped): accuracy {100 * dr['test_accuracy']:.2f}%, max |Δlogit| "
             f"{dr['max_abs_logit_diff']:.2f}, agreement with RandLoRA's predictions {100 * dr['agreement']:.1f}%.")
    L.append(f"- A LoRA with RandLoRA's trainable count would have rank {r['matching_lora_rank']} ({r['lora_params_matching_count']:,} "
             "parameters).")
    L.append("")
    L.append("LoRA export at rank k (`randlora.to_lora`, loaded with `peft.PeftModel.from_pretrained` into " +
             ("a fresh plain `Classifier` of the base encoder, the trained head coming from the folder's `modules_to_save`"
              if r["head_in_export"] else "a fresh copy of the base encoder, the trained head on top") +
             "). LoRA params: the lora_A/lora_B entries of the folder. Relative error = ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F per layer, mean and max over the "
             f"{r['rows'][0]['layers'] if r['rows'] else 36} layers. Δlogit and agreement are against the RandLoRA model on the test split.")
    L.append("")
    L.append("| export rank | LoRA params | mean rel. error | max rel. error | test accuracy | max \\|Δlogit\\| | agreement with RandLoRA | LoRA folder size |")
    L.append("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in r["rows"]:
        L.append(f"| {row['rank']} | {row['lora_params']:,} | {row['mean_rel_error']:.4f} | {row['max_rel_error']:.4f} | "
                 f"{100 * row['test_accuracy']:.2f}% | {row['max_abs_logit_diff']:.2e} | {100 * row['agreement']:.1f}% | "
                 f"{row['folder_bytes'] / 2**20:.2f} MiB |")
    L.append("")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
