"""When does a full-rank update pay? A teacher-student experiment on a real pretrained model.

The claim under test: RandLoRA's update is full rank, so when the change a task needs is itself
full rank it should beat LoRA at the same number of trainable parameters; when the change is low
rank, LoRA should tie or win.

Setup (every choice below is fixed in the code and printed into the report):

* Base model: all-MiniLM-L6-v2, read offline by ``train_example.load_minilm()``.
* Target layers: the attention ``query`` and ``value`` projections of all 6 encoder layers (12
  square 384x384 matrices, the classic LoRA targets). Square layers make "full rank" unambiguous
  (RandLoRA's ``d = D = 384``) and keep a step affordable on one CPU thread; the FFN matrices
  would triple the cost of full fine-tuning's optimizer state and of every ΔW computation.
* Teacher: the base model with a known update ``ΔW*`` added to every target weight. Per layer,
  ``ΔW*`` is either a Gaussian matrix (``full``: full rank, flat-ish spectrum) or the product of
  two Gaussian factors of rank 4 (``low``), rescaled so that ``||ΔW*||_F = FRAC * ||W||_F`` with
  ``FRAC = 0.2`` for both teachers (same norm per layer). ``ΔW*`` is drawn once from the teacher
  seed and is the same for every student. The report gives the size of the output change this
  causes (``||f_teacher - f_base||^2 / ||f_base||^2`` on the test split).
* Data: Rotten Tomatoes snippets (``train_example.rotten_tomatoes()``, split by movie), cut at
  24 tokens (the median snippet is about that long; shorter batches keep the run near an hour).
  Training uses a fixed pool of ``steps * batch`` training snippets (every run sees each once, in
  its seed's order); learning rates are chosen on validation snippets; test metrics use
  the whole test split.
* Student: starts from the base weights and is trained to match the teacher's final hidden
  states: loss = masked mean over real tokens of ``||f_student - f_teacher||^2``, divided by the
  same quantity for the untrained base on the pool (so the loss starts at 1 and reads as the
  unrecovered fraction). Methods, all adapting exactly the 12 target matrices (everything else
  frozen):
    - ``lora``: ``train_example.inject_lora`` (scaling ``alpha / r = 2``, ``B = 0`` at start);
    - ``randlora``: ``randlora.inject`` with its defaults (dense bases, ``alpha = 20 r``), bases
      seeded by the student seed;
    - ``full``: the target weights themselves (biases frozen).
* Budgets: RandLoRA ranks chosen so that LoRA at an integer rank has (almost exactly) the same
  trainable count on a 384x384 layer: RandLoRA r55 has ``55*7 + 7*384 = 3,073`` per layer vs
  LoRA r4's ``3,072``; RandLoRA r7 has ``7*55 + 55*384 = 21,505`` vs LoRA r28's ``21,504``.
  (For RandLoRA a *smaller* rank means *more* bases and more parameters.) Exact counts are in
  the report; the budgets differ by 7x. LoRA r4 can represent the low-rank teacher exactly.
* Optimisation: AdamW (weight decay 0: decay would pull full fine-tuning towards zero instead of
  towards the base weights), batch 16, a fixed number of steps, linear warm-up over 10% then
  linear decay to 0 (``train_example.lr_at``), no gradient clipping (the loss is smooth and
  Adam is invariant to its scale). Defaults: 128 steps of 16 snippets, sized so that the whole run
  (about 60 runs) takes about an hour on one thread of a 2-CPU machine that is also running a test
  suite (measured: 0.3 s per step alone, about 0.5 s beside the tests).
* Learning rates: per (teacher, method, budget) on seed 0, a log grid with half-decade spacing
  (``10^(k/2)``), three points around a per-method starting guess; scored by the recovered fraction
  on the validation snippets. While the best is at an edge of what was tried, the grid is extended
  one point past that edge (at most ``--max-extend`` times per config; the report flags a config
  whose choice stayed at an edge). Then seeds 1, 2 (and more with ``--seeds``) run at the chosen
  rate; seed 0's run at the chosen rate is reused. Every run's test metrics are recorded, but only
  the validation score takes part in the choice.
* Seeds: a student seed sets the data order, LoRA's ``A`` initialisation and RandLoRA's bases.

Metrics (test split unless marked val):

* recovered fraction ``1 - sum ||f_student - f_teacher||^2 / sum ||f_base - f_teacher||^2`` over
  every real token (1 = the teacher's output change is reproduced, 0 = no better than the base,
  negative = worse);
* distance to ΔW*: ``sqrt(sum_l ||ΔW_l - ΔW*_l||_F^2) / sqrt(sum_l ||ΔW*_l||_F^2)`` over the 12
  layers together (LoRA: ``scaling * B A``; RandLoRA: ``adapter.delta_weight()``; full: trained
  minus original weight). 1.0 is the distance of the untrained student (ΔW = 0);
* activation-weighted distance: the same with each layer's error seen through its inputs,
  ``||(ΔW_l - ΔW*_l) C_l^(1/2)||_F``, ``C_l`` = the second moment of that layer's inputs in the base
  model over the test tokens. The student can only see ``ΔW*`` through the inputs the data
  produces, so a method can be far from ``ΔW*`` in Frobenius norm and close in this norm;
* references: the Eckart-Young distance of the best rank-k approximation of ΔW* (what an ideal
  LoRA of rank k could reach in Frobenius distance); the same for ``ΔW*_l C_l^(1/2)`` (how low
  rank the teacher's change looks through the inputs the text produces); and the share of the
  inputs' second moment in its top-k directions (how anisotropic those inputs are).

    python benchmarks/full_rank.py --tiny                 # smoke test, < 1 minute
    python benchmarks/full_rank.py                        # the full run, ~1 hour on one thread
        # -> benchmarks/results/full_rank.json and benchmarks/results/full_rank.md
    python benchmarks/full_rank.py --report-only          # rewrite the .md from the .json
    # supplementary check, 4x longer training, one budget, full-rank teacher, 2 seeds:
    python benchmarks/full_rank.py --steps 512 --teachers full --methods lora randlora --budget-index 1 \
        --seeds 2 --max-extend 2 --json benchmarks/results/full_rank_512steps.json --md benchmarks/results/full_rank_512steps.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import randlora
import train_example as te

TARGETS = ["query", "value"]
FRAC = 0.2  # ||ΔW*||_F / ||W||_F per target layer
TEACHER_SEED = 1234
LOW_RANK = 4
# (LoRA rank, RandLoRA rank): equal trainable counts on 384x384 layers (see the docstring)
BUDGETS = [(4, 55), (28, 7)]
# Centre of the starting grid, as an exponent k of 10^(k/2): LoRA and RandLoRA 1e-3, full 1e-4
START = {"lora": -6, "randlora": -6, "full": -8}


def lr_of(k: int) -> float:
    return float(f"{10 ** (k / 2):.3g}")


# -----------------------------------------------------------------------------
# Models


def target_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and te.matches(n, TARGETS)]


def make_teacher(base: nn.Module, kind: str, seed: int, frac: float) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy of ``base`` with ``ΔW*`` added to each target weight; returns ``(teacher, {name: ΔW*})``."""
    g = torch.Generator().manual_seed(seed)
    teacher = copy.deepcopy(base)
    deltas = {}
    for name in target_names(base):
        W = base.get_submodule(name).weight.detach().double()
        o, i = W.shape
        if kind == "full":
            D = torch.randn(o, i, generator=g, dtype=torch.float64)
        elif kind == "low":
            D = torch.randn(o, LOW_RANK, generator=g, dtype=torch.float64) @ torch.randn(LOW_RANK, i, generator=g, dtype=torch.float64)
        else:
            raise ValueError(kind)
        D = D * (frac * W.norm() / D.norm())
        deltas[name] = D
        with torch.no_grad():
            teacher.get_submodule(name).weight.add_(D.float())
    teacher.requires_grad_(False).eval()
    return teacher, deltas


def make_student(base: nn.Module, method: str, rank: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    if method == "lora":
        te.inject_lora(model, TARGETS, rank)
    elif method == "randlora":
        randlora.inject(model, TARGETS, rank=rank, seed=seed)
    elif method == "full":
        model.requires_grad_(False)
        for name in target_names(base):
            model.get_submodule(name).weight.requires_grad_(True)
    else:
        raise ValueError(method)
    return model


def learned_deltas(model: nn.Module, base: nn.Module, method: str, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{name: ΔW}`` in float64 as the student computes it."""
    out = {}
    if method == "randlora":
        adapters = dict(randlora.named_adapters(model))
        for n in names:
            out[n] = adapters[n].delta_weight(torch.float64)
    for n in names:
        m = model.get_submodule(n)
        if method == "lora":
            out[n] = m.scaling * (m.lora_B.detach().double() @ m.lora_A.detach().double())
        elif method == "full":
            out[n] = m.weight.detach().double() - base.get_submodule(n).weight.detach().double()
    return out


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -----------------------------------------------------------------------------
# Data and hidden states


@torch.no_grad()
def hidden_states(model: nn.Module, seqs: Sequence[Sequence[int]], batch: int = 64) -> list[torch.Tensor]:
    """Final hidden states of each sequence, ``(len_i, hidden)``, in the order given."""
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: list[torch.Tensor | None] = [None] * len(seqs)
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        ids, mask = te.pad([seqs[i] for i in idx])
        h = model(ids, mask)
        for j, i in enumerate(idx):
            out[i] = h[j, : len(seqs[i])].clone()
    return out  # type: ignore[return-value]


def sq_error(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return sum(float((x.double() - y.double()).square().sum()) for x, y in zip(a, b))


def recovered(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], base: Sequence[torch.Tensor]) -> float:
    return 1.0 - sq_error(student, teacher) / sq_error(base, teacher)


@torch.no_grad()
def input_moments(model: nn.Module, seqs: Sequence[Sequence[int]], names: Sequence[str], batch: int = 64) -> dict[str, torch.Tensor]:
    """Per target layer, ``E[x x^T]`` of its inputs over the real tokens, float64."""
    acc = {n: None for n in names}
    count = [0]
    cur_mask: list[torch.Tensor] = []

    def hook(name):
        def f(_m, inputs, _out):
            x = inputs[0].double()
            keep = cur_mask[0].reshape(-1).bool()
            x = x.reshape(-1, x.shape[-1])[keep]
            acc[name] = x.t() @ x if acc[name] is None else acc[name] + x.t() @ x
        return f

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        for s in range(0, len(seqs), batch):
            ids, mask = te.pad(seqs[s : s + batch])
            cur_mask[:] = [mask]
            model(ids, mask)
            count[0] += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    return {n: a / count[0] for n, a in acc.items()}


def psd_sqrt(C: torch.Tensor) -> torch.Tensor:
    w, V = torch.linalg.eigh(C)
    return (V * w.clamp(min=0).sqrt()) @ V.t()


def distances(learned: dict, target: dict, roots: dict) -> tuple[float, float]:
    num = sum(float((learned[n] - target[n]).square().sum()) for n in target)
    den = sum(float(target[n].square().sum()) for n in target)
    num_a = sum(float(((learned[n] - target[n]) @ roots[n]).square().sum()) for n in target)
    den_a = sum(float((target[n] @ roots[n]).square().sum()) for n in target)
    return math.sqrt(num / den), math.sqrt(num_a / den_a)


def eckart_young(target: dict, k: int) -> float:
    num = den = 0.0
    for D in target.values():
        s2 = torch.linalg.svdvals(D).square()
        num += float(s2[k:].sum())
        den += float(s2.sum())
    return math.sqrt(num / den)


def teacher_diagnostics(target: dict, roots: dict, ks: Sequence[int]) -> dict:
    """How low-rank ΔW* looks through the data: the Eckart-Young distance of the best rank-k
    approximation of ``ΔW*_l C_l^(1/2)`` (the change the layer's inputs actually see), over all layers,
    and the share of the input second moment's trace in its top-k eigendirections (mean over layers)."""
    seen = {n: target[n] @ roots[n] for n in target}
    ey_act, share = {}, {}
    svals = {n: torch.linalg.svdvals(M).square() for n, M in seen.items()}
    eig = {n: torch.linalg.eigvalsh(roots[n] @ roots[n]).flip(0).clamp(min=0) for n in roots}
    den = sum(float(s2.sum()) for s2 in svals.values())
    for k in ks:
        ey_act[str(k)] = math.sqrt(sum(float(s2[k:].sum()) for s2 in svals.values()) / den)
        share[str(k)] = statistics.mean(float(e[:k].sum() / e.sum()) for e in eig.values())
    return {"eckart_young_act": ey_act, "input_top_k_share": share}


DIAG_KS = (1, 4, 8, 28, 64)


# -----------------------------------------------------------------------------
# Training


def train_student(model: nn.Module, pool_ids, pool_target, norm: float, steps: int, batch: int, lr: float, seed: int) -> tuple[float, float, bool]:
    """AdamW on the normalised masked MSE to the teacher; returns ``(seconds, mean loss of the last 10% of steps, diverged)``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = list(range(len(pool_ids)))
    random.Random(seed).shuffle(order)
    model.train()
    losses, start, pos = [], time.perf_counter(), 0
    for step in range(steps):
        if pos + batch > len(order):
            random.Random(seed + 1000 * step).shuffle(order)
            pos = 0
        idx = order[pos : pos + batch]
        pos += batch
        ids, mask = te.pad([pool_ids[i] for i in idx])
        target = torch.zeros(len(idx), ids.shape[1], pool_target[idx[0]].shape[-1])
        for j, i in enumerate(idx):
            target[j, : len(pool_ids[i])] = pool_target[i]
        for group in opt.param_groups:
            group["lr"] = te.lr_at(step, steps, lr)
        h = model(ids, mask)
        m = mask.unsqueeze(-1).to(h.dtype)
        loss = ((h - target).square() * m).sum() / (m.sum() * norm)
        if not torch.isfinite(loss):
            model.eval()
            return time.perf_counter() - start, float("nan"), True
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    tail = losses[-max(1, steps // 10) :]
    return time.perf_counter() - start, sum(tail) / len(tail), False


# -----------------------------------------------------------------------------
# The experiment


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} CPUs"


def report_only(args: argparse.Namespace) -> dict:
    """Rewrite the report from the JSON; recompute the teacher diagnostics if the file lacks them."""
    with open(args.json) as f:
        results = json.load(f)
    cfg = results["config"]
    if any("eckart_young_act" not in info for info in results["teachers"].values()):
        base, tokenizer = te.load_minilm()
        base.requires_grad_(False).eval()
        test_texts = [t for t, _ in te.rotten_tomatoes()["test"]][: cfg["test"]]
        test_ids = te.encode(tokenizer, test_texts, cfg["max_len"])
        names = target_names(base)
        roots = {n: psd_sqrt(C) for n, C in input_moments(base, test_ids, names).items()}
        for kind, info in results["teachers"].items():
            _, target = make_teacher(base, kind, cfg["teacher_seed"], cfg["frac"])
            info.update(teacher_diagnostics(target, roots, DIAG_KS))
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(report(results))
    print(report(results))
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.report_only:
        return report_only(args)
    t_start = time.perf_counter()
    base, tokenizer = te.load_minilm()
    base.requires_grad_(False).eval()
    splits = te.rotten_tomatoes()
    rng = random.Random(0)
    train_texts = [t for t, _ in splits["train"]]
    rng.shuffle(train_texts)
    pool_n = args.steps * args.batch
    val_texts = [t for t, _ in splits["val"]][: args.val_examples or None]
    test_texts = [t for t, _ in splits["test"]][: args.test_examples or None]
    pool_ids = te.encode(tokenizer, train_texts[:pool_n], args.max_len)
    val_ids = te.encode(tokenizer, val_texts, args.max_len)
    test_ids = te.encode(tokenizer, test_texts, args.max_len)
    names = target_names(base)
    print(f"pool {len(pool_ids)} train snippets, val {len(val_ids)}, test {len(test_ids)}; {len(names)} target layers", flush=True)

    base_pool = hidden_states(base, pool_ids)
    base_val, base_test = hidden_states(base, val_ids), hidden_states(base, test_ids)
    roots = {n: psd_sqrt(C) for n, C in input_moments(base, test_ids, names).items()}
    base_sq_test = sum(float(x.double().square().sum()) for x in base_test)

    results = {"runs": [], "config": {}, "teachers": {}, "choices": []}
    done = {}
    if args.resume and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            old = json.load(f)
        for r in old.get("runs", []):
            done[(r["teacher"], r["method"], r["rank"], r["lr"], r["seed"])] = r
        print(f"resuming: {len(done)} runs already recorded in {args.json}", flush=True)
    results["config"] = {
        "targets": TARGETS, "target_layers": names, "frac": args.frac, "teacher_seed": TEACHER_SEED, "low_rank": LOW_RANK,
        "budgets": [list(b) for b in args.budgets], "methods": args.methods, "steps": args.steps, "batch": args.batch, "max_len": args.max_len,
        "pool": len(pool_ids), "val": len(val_ids), "test": len(test_ids), "seeds": args.seeds, "max_extend": args.max_extend,
        "start": START, "threads": args.threads, "optimizer": "AdamW(weight_decay=0), warm-up 10% + linear decay",
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + list(sys.argv[1:] if argv is None else argv)),
        "machine": machine(), "torch": torch.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }

    def save() -> None:
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    for kind in args.teachers:
        t0 = time.perf_counter()
        teacher, target = make_teacher(base, kind, TEACHER_SEED, args.frac)
        teach_pool = hidden_states(teacher, pool_ids)
        teach_val, teach_test = hidden_states(teacher, val_ids), hidden_states(teacher, test_ids)
        del teacher
        norm = sq_error(base_pool, teach_pool) / sum(len(s) for s in pool_ids)
        change = sq_error(base_test, teach_test) / base_sq_test
        ranks = sorted({b[0] for b in args.budgets})
        info = {
            "output_change_test": change,
            "base_mse_per_token_pool": norm,
            "delta_norm_total": math.sqrt(sum(float(D.square().sum()) for D in target.values())),
            "eckart_young": {str(k): eckart_young(target, k) for k in ranks},
            "stable_rank_mean": statistics.mean(float(D.square().sum() / torch.linalg.matrix_norm(D, 2) ** 2) for D in target.values()),
            **teacher_diagnostics(target, roots, DIAG_KS),
        }
        results["teachers"][kind] = info
        print(f"\n== teacher {kind}: ||f_t - f_b||^2 / ||f_b||^2 = {change:.4f} on test; Eckart-Young distances {info['eckart_young']}; "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

        configs = [("full", 0, 0)]
        for lora_r, rand_r in args.budgets:
            configs += [("lora", lora_r, lora_r), ("randlora", rand_r, lora_r)]
        configs = [c for c in configs if c[0] in args.methods]
        configs.sort(key=lambda c: (c[2], c[0]))  # by budget, full first

        def run(method: str, rank: int, budget: int, lr: float, seed: int, phase: str,
                teacher=(kind, target, teach_pool, teach_val, teach_test, norm)) -> dict:
            kind, target, teach_pool, teach_val, teach_test, norm = teacher  # this teacher's, bound at definition
            key = (kind, method, rank, lr, seed)
            if key in done:
                results["runs"].append(done[key])
                return done[key]
            t = time.perf_counter()
            model = make_student(base, method, rank, seed)
            secs, tail, diverged = train_student(model, pool_ids, teach_pool, norm, args.steps, args.batch, lr, seed)
            rec = {"teacher": kind, "method": method, "rank": rank, "budget_lora_rank": budget, "trainable": count_trainable(model),
                   "lr": lr, "seed": seed, "phase": phase, "train_s": secs, "final_train_loss": tail, "diverged": diverged}
            if diverged:
                rec.update(val_recovered=float("-inf"), test_recovered=float("nan"), dist=float("nan"), dist_act=float("nan"))
            else:
                rec["val_recovered"] = recovered(hidden_states(model, val_ids), teach_val, base_val)
                rec["test_recovered"] = recovered(hidden_states(model, test_ids), teach_test, base_test)
                rec["dist"], rec["dist_act"] = distances(learned_deltas(model, base, method, names), target, roots)
            rec["wall_s"] = time.perf_counter() - t
            results["runs"].append(rec)
            save()
            print(f"  {kind:4s} {method:8s} r{rank:<3d} lr {lr:<8.3g} seed {seed} [{phase}]: val rec {rec['val_recovered']:+.4f}  "
                  f"test rec {rec['test_recovered']:+.4f}  dist {rec['dist']:.4f}  act-dist {rec['dist_act']:.4f}  "
                  f"loss {tail:.4f}  {rec['wall_s']:.0f} s  (total {(time.perf_counter() - t_start) / 60:.1f} min)", flush=True)
            return rec

        for method, rank, budget in configs:
            tried: dict[int, float] = {}
            c = START[method]
            for k in (c - 1, c, c + 1):
                tried[k] = run(method, rank, budget, lr_of(k), 0, "grid")["val_recovered"]
            extensions = 0
            while True:
                best = max(tried, key=lambda k: tried[k])
                lo, hi = min(tried), max(tried)
                if best not in (lo, hi) or extensions >= args.max_extend:
                    break
                k = lo - 1 if best == lo else hi + 1
                tried[k] = run(method, rank, budget, lr_of(k), 0, "grid-extend")["val_recovered"]
                extensions += 1
            best = max(tried, key=lambda k: tried[k])
            at_edge = best in (min(tried), max(tried))
            results["choices"].append({"teacher": kind, "method": method, "rank": rank, "budget_lora_rank": budget,
                                       "grid": {str(lr_of(k)): tried[k] for k in sorted(tried)}, "lr": lr_of(best), "at_edge": at_edge})
            for seed in range(1, args.seeds):
                run(method, rank, budget, lr_of(best), seed, "seed")
            save()
    results["total_wall_s"] = time.perf_counter() - t_start
    save()
    if args.md:
        os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
        with open(args.md, "w") as f:
            f.write(report(results))
    print(report(results))
    return results


# -----------------------------------------------------------------------------
# Report


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def final_runs(results: dict, choice: dict) -> list[dict]:
    """The runs at a config's chosen rate, one per seed."""
    seen, out = set(), []
    for r in results["runs"]:
        if (r["teacher"], r["method"], r["rank"], r["lr"]) == (choice["teacher"], choice["method"], choice["rank"], choice["lr"]) and r["seed"] not in seen:
            seen.add(r["seed"])
            out.append(r)
    return sorted(out, key=lambda r: r["seed"])


def label(method: str, rank: int) -> str:
    return {"lora": f"LoRA r{rank}", "randlora": f"RandLoRA r{rank}", "full": "full fine-tuning"}[method]


def report(results: dict) -> str:
    cfg = results["config"]
    L = ["# When does a full-rank update pay? Teacher-student on MiniLM", ""]
    L.append(f"Command: `{cfg['command']}`  ")
    L.append(f"Machine: {cfg['machine']}, {cfg['threads']} thread(s); torch {cfg['torch']}, Python {cfg['python']}; {cfg['date']}; "
             f"total wall time {results.get('total_wall_s', float('nan')) / 60:.1f} min.")
    L.append("")
    L.append(f"Targets: `{'`, `'.join(cfg['targets'])}` of all 6 layers ({len(cfg['target_layers'])} matrices 384x384). "
             f"Teachers: base + ΔW* with ||ΔW*||_F = {cfg['frac']} ||W||_F per layer; `full` = Gaussian ΔW*, `low` = rank-{cfg['low_rank']} "
             f"product of Gaussians, teacher seed {cfg['teacher_seed']}. Student objective: masked MSE to the teacher's final hidden "
             f"states. {cfg['steps']} steps of {cfg['batch']} snippets (≤ {cfg['max_len']} tokens) from a pool of {cfg['pool']} training "
             f"snippets, {cfg['optimizer']}. LR chosen on {cfg['val']} validation snippets with seed 0; metrics on {cfg['test']} test "
             f"snippets; seeds 0..{cfg['seeds'] - 1}. See the module docstring of `benchmarks/full_rank.py` for the rationale.")
    L.append("")
    L.append("## Teachers")
    L.append("")
    L.append("| teacher | output change ‖f_t − f_b‖² / ‖f_b‖² (test) | mean stable rank of ΔW* | " +
             " | ".join(f"best rank-{k} distance (Eckart–Young)" for k in next(iter(results["teachers"].values()))["eckart_young"]) + " |")
    L.append("| --- | ---: | ---: |" + " ---: |" * len(next(iter(results["teachers"].values()))["eckart_young"]))
    for kind, info in results["teachers"].items():
        L.append(f"| {kind} | {info['output_change_test']:.4f} | {info['stable_rank_mean']:.1f} | " +
                 " | ".join(f"{v:.4f}" for v in info["eckart_young"].values()) + " |")
    L.append("")
    first = next(iter(results["teachers"].values()))
    if "eckart_young_act" in first:
        ks = list(first["eckart_young_act"])
        L.append("What the data can see: the student only observes ΔW*_l x for the inputs x the text produces. Below, the best "
                 "rank-k approximation's relative error of ΔW*_l C_l^(1/2) (C_l = second moment of layer l's inputs over the test "
                 "tokens; over all 12 layers), and the share of the inputs' second moment in its top-k directions (mean over layers).")
        L.append("")
        L.append("| | " + " | ".join(f"k = {k}" for k in ks) + " |")
        L.append("| --- |" + " ---: |" * len(ks))
        L.append("| inputs: share of E‖x‖² in the top-k directions | " + " | ".join(f"{first['input_top_k_share'][k]:.3f}" for k in ks) + " |")
        for kind, info in results["teachers"].items():
            L.append(f"| teacher `{kind}`: rank-k error of ΔW* C^(1/2) | " + " | ".join(f"{info['eckart_young_act'][k]:.3f}" for k in ks) + " |")
        L.append("")
    L.append("## Results (test split, mean ± std over seeds at the chosen learning rate)")
    L.append("")
    L.append("Recovered = 1 − Σ‖f_s − f_t‖² / Σ‖f_b − f_t‖² (higher is better). Distance = ‖ΔW − ΔW*‖_F / ‖ΔW*‖_F over all 12 "
             "layers (lower is better; 1 = no update). Act.-weighted distance = the same through the square root of each layer's input "
             "second moment (the part of ΔW* the data can reveal).")
    L.append("")
    L.append("| teacher | method | trainable | lr | recovered | distance to ΔW* | act.-weighted distance | recovered per seed | train s/run |")
    L.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    summary: dict = {}
    for ch in results["choices"]:
        runs = [r for r in final_runs(results, ch) if not r["diverged"]]
        if not runs:
            continue
        rec, dist, act = (mean_std([r[k] for r in runs]) for k in ("test_recovered", "dist", "dist_act"))
        summary[(ch["teacher"], ch["method"], ch["budget_lora_rank"])] = ([r["test_recovered"] for r in runs], [r["dist"] for r in runs], runs[0]["trainable"])
        L.append(f"| {ch['teacher']} | {label(ch['method'], ch['rank'])} | {runs[0]['trainable']:,} | {ch['lr']:g}{' (edge)' if ch['at_edge'] else ''} | "
                 f"{rec[0]:.4f} ± {rec[1]:.4f} | {dist[0]:.4f} ± {dist[1]:.4f} | {act[0]:.4f} ± {act[1]:.4f} | "
                 f"{', '.join(format(r['test_recovered'], '.4f') for r in runs)} | {statistics.mean(r['train_s'] for r in runs):.0f} |")
    L.append("")
    L.append("train s/run: wall-clock seconds of training on one thread of a 2-CPU machine that was running other jobs "
             "(a test suite) at the same time, so they vary by 2-3x with that load: not a speed comparison.")
    L.append("")
    L.append("## RandLoRA minus LoRA at equal trainable count")
    L.append("")
    L.append("Difference of the means; 'clear' when |difference| > 2 × sqrt(std²_a/n_a + std²_b/n_b) (a rough two-standard-error rule, "
             "few seeds).")
    L.append("")
    L.append("| teacher | budget (LoRA rank ↔ RandLoRA rank, trainable) | Δ recovered (RandLoRA − LoRA) | Δ distance (RandLoRA − LoRA) |")
    L.append("| --- | --- | ---: | ---: |")

    def diff(a: list[float], b: list[float]) -> str:
        d = statistics.mean(a) - statistics.mean(b)
        se = math.sqrt((statistics.variance(a) / len(a) if len(a) > 1 else 0) + (statistics.variance(b) / len(b) if len(b) > 1 else 0))
        return f"{d:+.4f} ({'clear' if abs(d) > 2 * se else 'within noise'})"

    for kind in results["teachers"]:
        for lora_r, rand_r in cfg["budgets"]:
            a, b = summary.get((kind, "randlora", lora_r)), summary.get((kind, "lora", lora_r))
            if a and b:
                L.append(f"| {kind} | LoRA r{lora_r} ({b[2]:,}) ↔ RandLoRA r{rand_r} ({a[2]:,}) | {diff(a[0], b[0])} | {diff(a[1], b[1])} |")
    L.append("")
    wins = [(k, b) for k in results["teachers"] for b, _ in cfg["budgets"]
            if summary.get((k, "randlora", b)) and summary.get((k, "lora", b))]
    rand_better = [(k, b) for k, b in wins if statistics.mean(summary[(k, "randlora", b)][0]) > statistics.mean(summary[(k, "lora", b)][0])]
    L.append(f"RandLoRA recovered more of the teacher's output change than LoRA at equal count in {len(rand_better)} of {len(wins)} "
             f"(teacher, budget) pairs" + (f": {', '.join(f'{k}/LoRA r{b}' for k, b in rand_better)}." if rand_better else "."))
    for k in results["teachers"]:
        ranked = sorted(((statistics.mean(v[0]), m, b) for (kk, m, b), v in summary.items() if kk == k), reverse=True)
        names = {(c["method"], c["budget_lora_rank"]): label(c["method"], c["rank"]) for c in results["choices"]}
        L.append(f"- teacher `{k}`, recovered fraction, best first: " + ", ".join(f"{names[(m, b)]} {v:.3f}" for v, m, b in ranked))
    L.append("")
    L.append("## Learning-rate choice (seed 0, validation recovered fraction)")
    L.append("")
    L.append("Grid: half-decade steps around a starting point, extended past an edge while the best was there. "
             "'(edge)' marks a choice that stayed at an edge after the allowed extensions; -inf = diverged.")
    L.append("")
    L.append("| teacher | method | chosen lr | grid: lr → val recovered |")
    L.append("| --- | --- | ---: | --- |")
    for ch in results["choices"]:
        grid = ", ".join(f"{lr} → {'**' if float(lr) == ch['lr'] else ''}{v:.4f}{'**' if float(lr) == ch['lr'] else ''}" for lr, v in ch["grid"].items())
        L.append(f"| {ch['teacher']} | {label(ch['method'], ch['rank'])} | {ch['lr']:g}{' (edge)' if ch['at_edge'] else ''} | {grid} |")
    L.append("")
    return "\n".join(L) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a few steps on a few snippets (smoke test)")
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-len", type=int, default=24)
    p.add_argument("--val-examples", type=int, default=384, help="0: all")
    p.add_argument("--test-examples", type=int, default=0, help="0: all")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max-extend", type=int, default=3)
    p.add_argument("--frac", type=float, default=FRAC)
    p.add_argument("--teachers", nargs="+", default=["full", "low"], choices=["full", "low"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="default benchmarks/results/full_rank.json (none with --tiny)")
    p.add_argument("--md", default=None, help="default benchmarks/results/full_rank.md (none with --tiny)")
    p.add_argument("--methods", nargs="+", default=["full", "lora", "randlora"], choices=["full", "lora", "randlora"])
    p.add_argument("--budget-index", type=int, nargs="+", default=list(range(len(BUDGETS))),
                   help=f"which of the budgets {BUDGETS} (LoRA rank, RandLoRA rank) to run")
    p.add_argument("--resume", action="store_true", help="reuse the runs already in --json")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite --md from --json (adding teacher diagnostics missing from an older file); trains nothing")
    args = p.parse_args(argv)
    args.budgets = [BUDGETS[i] for i in args.budget_index]
    if args.tiny:
        args.steps, args.batch, args.val_examples, args.test_examples, args.seeds, args.max_extend = 4, 4, 16, 16, 2, 1
        args.budgets = BUDGETS[:1]
    elif args.json is None and args.md is None:
        args.json = os.path.join(ROOT, "benchmarks", "results", "full_rank.json")
        args.md = os.path.join(ROOT, "benchmarks", "results", "full_rank.md")
    return args


if __name__ == "__main__":
    main()
