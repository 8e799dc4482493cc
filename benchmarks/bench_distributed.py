"""RandLoRA training under DDP and FSDP2, against one GPU, on a LLaMA-shaped model.

    torchrun --nproc-per-node=2 benchmarks/bench_distributed.py                   # GPUs, bf16, NCCL
    torchrun --nproc-per-node=2 benchmarks/bench_distributed.py --device cpu --tiny   # gloo smoke test

Model: transformers LlamaConfig(hidden 2048, intermediate 5632, 16 layers, 16 heads, vocab
32000), random init, bf16; RandLoRA r=32 on q,k,v,up,down; AdamW on lam/gam (float32); batch x
seq = 4 x 1024 tokens per GPU. Three setups in one job:

* ``1 GPU``: rank 0 trains a plain (unwrapped) model on its own; the other ranks wait.
* ``DDP``: DistributedDataParallel with default arguments on every rank. Afterwards the ranks'
  lam/gam are all-gathered and compared (bit for bit, and a float64 checksum); a few more steps
  under ``no_sync()`` time the same step without the gradient all-reduce. DDP runs twice
  (``--ddp-repeats``): bf16 GPU kernels are not bit-reproducible and AdamW turns tiny gradient
  differences into full-size steps, so the spread between two identical runs is the yardstick
  for the FSDP2-vs-DDP comparison below.
* ``FSDP2``: ``fully_shard`` on every decoder layer, then on the root. Afterwards every rank
  calls ``randlora.save_adapter`` (each with its own path: only rank 0 must write), and rank 0
  checks the file against the gathered shards; lam/gam are also compared with the DDP run's
  (same data, same steps).

Step time is the median over the timed steps after warm-up (wall clock around a synchronized
step: forward, backward, all-reduce / reduce-scatter, AdamW), the slowest rank's median.
Peak memory is ``torch.cuda.max_memory_allocated`` over warm-up and timed steps, the largest
over ranks. Rank 0 prints a markdown table and writes JSON to $OUT (if set).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import randlora  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
FULL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16, vocab_size=32000)
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)


def log(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


class Ctx:
    def __init__(self, args) -> None:
        self.args = args
        self.cuda = args.device == "cuda"
        self.distributed = "RANK" in os.environ
        if self.distributed:
            self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            self.local = int(os.environ.get("LOCAL_RANK", 0))
            if self.cuda:
                torch.cuda.set_device(self.local)
                dist.init_process_group("nccl", device_id=torch.device("cuda", self.local))
            else:
                dist.init_process_group("gloo")
        else:
            self.rank, self.world, self.local = 0, 1, 0
        self.device = torch.device("cuda", self.local) if self.cuda else torch.device("cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.cfg = TINY if args.tiny else FULL

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def build(ctx: Ctx):
    from transformers import LlamaConfig, LlamaForCausalLM

    mc = LlamaConfig(**ctx.cfg, max_position_embeddings=max(ctx.args.seq, 128), use_cache=False)
    torch.manual_seed(0)  # identical weights on every rank
    old = torch.get_default_dtype()
    torch.set_default_dtype(ctx.dtype)
    try:
        with torch.device(ctx.device):
            model = LlamaForCausalLM(mc)
    finally:
        torch.set_default_dtype(old)
    randlora.inject(model, TARGETS, ctx.args.rank)
    return model.train()


def batch(ctx: Ctx, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + rank)  # a different shard of data per rank
    ids = torch.randint(0, ctx.cfg["vocab_size"], (ctx.args.batch, ctx.args.seq), generator=g)
    return ids.to(ctx.device)


def train(ctx: Ctx, model, adapter_params, ids) -> dict:
    opt = torch.optim.AdamW(adapter_params, lr=1e-4)
    times, losses = [], []
    for i in range(ctx.args.warmup + ctx.args.steps):
        ctx.sync()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ctx.sync()
        if i >= ctx.args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated() if ctx.cuda else None
    return dict(ms=1e3 * statistics.median(times), peak_bytes=peak, first_loss=losses[0], last_loss=losses[-1])


def lam_gam(model) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if n.endswith((".lam", ".gam"))]


def run_single(ctx: Ctx) -> dict | None:
    res = None
    if ctx.rank == 0:
        ctx.free()
        model = build(ctx)
        params = lam_gam(model)
        res = train(ctx, model, params, batch(ctx, 0))
        res.update(setup="1 GPU" if ctx.cuda else "1 process", gpus=1, trainable=sum(p.numel() for p in params))
        del model, params
        ctx.free()
    ctx.barrier()
    return res


def run_ddp(ctx: Ctx) -> tuple[dict, torch.Tensor]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ctx.free()
    model = build(ctx)
    ours = [n for m in model.modules() if isinstance(m, randlora.RandLoraLinear) for n, _ in m.named_buffers(recurse=False)]
    ddp = DDP(model, device_ids=[ctx.local] if ctx.cuda else None)  # default arguments
    params = lam_gam(model)
    ids = batch(ctx, ctx.rank)
    res = train(ctx, ddp, params, ids)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    everyone = [torch.empty_like(flat) for _ in range(ctx.world)]
    dist.all_gather(everyone, flat)
    res.update(
        identical=all(torch.equal(e, everyone[0]) for e in everyone),
        checksums=[float(e.double().sum()) for e in everyone],
        randlora_buffers=len(ours),
    )
    flat = flat.cpu()
    del everyone
    if ctx.args.no_sync_steps:
        # The same step without the gradient all-reduce (ranks drift apart from here on):
        # separates DDP's communication from the per-GPU work.
        opt = torch.optim.AdamW(params, lr=1e-4)
        times = []
        for _ in range(ctx.args.no_sync_steps):
            ctx.sync()
            t0 = time.perf_counter()
            with ddp.no_sync():
                ddp(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ctx.sync()
            times.append(time.perf_counter() - t0)
        res["ms_no_sync"] = 1e3 * statistics.median(times[1:] or times)
        del opt
    del ddp, model, params
    ctx.free()
    return res, flat


def run_fsdp(ctx: Ctx, ddp_flat: torch.Tensor | None) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ctx.free()
    model = build(ctx)
    mesh = init_device_mesh(ctx.device.type, (ctx.world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = lam_gam(model)
    res = train(ctx, model, params, batch(ctx, ctx.rank))

    # save_adapter on every rank, each with its own path: rank 0 alone must write.
    folder = ctx.args.save_dir
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"adapter_fsdp_rank{r}.safetensors") for r in range(ctx.world)]
    t0 = time.perf_counter()
    randlora.save_adapter(model, paths[ctx.rank])
    save_s = time.perf_counter() - t0
    full = {n: p.detach().full_tensor().float().cpu() for n, p in model.named_parameters() if n.endswith((".lam", ".gam"))}
    ctx.barrier()
    if ctx.rank == 0:
        from safetensors.torch import load_file

        written = [os.path.exists(p) for p in paths]
        saved = load_file(paths[0])
        res.update(
            save_s=save_s,
            writers=[r for r, w in enumerate(written) if w],
            saved_tensors=len(saved),
            saved_equal=saved.keys() == full.keys() and all(torch.equal(saved[k], full[k]) for k in full),
            saved_mb=os.path.getsize(paths[0]) / 2**20,
        )
        if ddp_flat is not None:
            flat = torch.cat([full[n].reshape(-1) for n in full])
            res["vs_ddp_rel"] = float((flat.double() - ddp_flat.double()).norm() / ddp_flat.double().norm())
        for p in paths:
            if os.path.exists(p):
                os.remove(p)
    ctx.barrier()
    del model, params, full
    ctx.free()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (smoke test)")
    ap.add_argument("--modes", default="single,ddp,fsdp")
    ap.add_argument("--batch", type=int, default=None, help="sequences per GPU (default 4; tiny 2)")
    ap.add_argument("--seq", type=int, default=None, help="default 1024; tiny 32")
    ap.add_argument("--rank", type=int, default=None, help="RandLoRA rank (default 32; tiny 8)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--save-dir", default=os.path.join("/tmp", "randlora_bench_distributed"))
    ap.add_argument("--ddp-repeats", type=int, default=2, help="DDP runs; a second one measures the run-to-run spread of lam/gam")
    ap.add_argument("--no-sync-steps", type=int, default=6, help="extra DDP steps under no_sync() (0: skip)")
    args = ap.parse_args()
    args.batch = args.batch or (2 if args.tiny else 4)
    args.seq = args.seq or (32 if args.tiny else 1024)
    args.rank = args.rank or (8 if args.tiny else 32)
    modes = args.modes.split(",")
    ctx = Ctx(args)
    if not ctx.cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.world))

    import transformers

    env = dict(
        date=datetime.date.today().isoformat(),
        device=torch.cuda.get_device_name(ctx.device) if ctx.cuda else "cpu",
        world_size=ctx.world,
        torch=torch.__version__,
        transformers=transformers.__version__,
        backend=dist.get_backend() if ctx.distributed else None,
        dtype=str(ctx.dtype),
        model=ctx.cfg,
        targets=TARGETS,
        rank=args.rank,
        batch_per_gpu=args.batch,
        seq=args.seq,
        warmup=args.warmup,
        steps=args.steps,
        command="torchrun --nproc-per-node=%d benchmarks/bench_distributed.py %s" % (ctx.world, " ".join(sys.argv[1:])),
        nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"),
    )
    log(f"# {json.dumps(env)}")
    rows: list[dict] = []
    out_dir = os.environ.get("OUT")

    def save() -> None:
        if ctx.rank == 0 and out_dir:
            with open(os.path.join(out_dir, "bench_distributed.json"), "w") as f:
                json.dump(dict(env=env, rows=rows), f, indent=1)

    if "single" in modes:
        r = run_single(ctx)
        if ctx.rank == 0:
            rows.append(r)
            log(f"1 GPU: {r['ms']:.1f} ms/step, loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}")
            save()
    ddp_flat = None
    if ctx.distributed and "ddp" in modes:
        r, ddp_flat = run_ddp(ctx)
        for _ in range(args.ddp_repeats - 1):  # same data, same steps: how far apart do two runs end?
            again, flat2 = run_ddp(ctx)
            r.setdefault("repeat_ms", []).append(again["ms"])
            r.setdefault("repeat_rel", []).append(float((flat2.double() - ddp_flat.double()).norm() / ddp_flat.double().norm()))
            r.setdefault("repeat_last_loss", []).append(again["last_loss"])
        per_rank = ctx.gather(dict(ms=r["ms"], peak=r["peak_bytes"], ms_no_sync=r.get("ms_no_sync")))
        r.update(setup="DDP", gpus=ctx.world, ms=max(p["ms"] for p in per_rank), ms_per_rank=[p["ms"] for p in per_rank],
                 peak_bytes=max(p["peak"] or 0 for p in per_rank) or None, peak_per_rank=[p["peak"] for p in per_rank])
        if r.get("ms_no_sync") is not None:
            r["ms_no_sync"] = max(p["ms_no_sync"] for p in per_rank)
        rows.append(r)
        log(f"DDP: {r['ms']:.1f} ms/step, ranks identical: {r['identical']}, checksums {r['checksums']}")
        save()
    if ctx.distributed and "fsdp" in modes:
        r = run_fsdp(ctx, ddp_flat)
        per_rank = ctx.gather(dict(ms=r["ms"], peak=r["peak_bytes"]))
        r.update(setup="FSDP2", gpus=ctx.world, ms=max(p["ms"] for p in per_rank), ms_per_rank=[p["ms"] for p in per_rank],
                 peak_bytes=max(p["peak"] or 0 for p in per_rank) or None, peak_per_rank=[p["peak"] for p in per_rank])
        rows.append(r)
        log(f"FSDP2: {r['ms']:.1f} ms/step, writers {r.get('writers')}, saved == gathered: {r.get('saved_equal')}")
        save()

    if ctx.rank == 0:
        tokens = args.batch * args.seq
        print(f"\n{env['device']} x{ctx.world}, torch {env['torch']}, {env['date']}: `{env['command']}`\n")
        print("| setup | GPUs | ms / step (median) | tokens/s (all GPUs) | tokens/s per GPU | peak GB per GPU | checks |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            tps = tokens * r["gpus"] / (r["ms"] / 1e3)
            gb = "—" if not r.get("peak_bytes") else f"{r['peak_bytes'] / 1e9:.2f}"
            checks = ""
            if r["setup"] == "DDP":
                checks = f"ranks identical: {'yes' if r['identical'] else 'NO'}; RandLoRA buffers: {r['randlora_buffers']}"
                if "ms_no_sync" in r:
                    checks += f"; {r['ms_no_sync']:.1f} ms without the all-reduce (no_sync)"
                if "repeat_rel" in r:
                    checks += f"; a second DDP run: lam/gam rel. diff {r['repeat_rel'][0]:.1e}, last loss {r['repeat_last_loss'][0]:.4f} vs {r['last_loss']:.4f}"
            elif r["setup"] == "FSDP2":
                checks = (f"save_adapter written by ranks {r['writers']}, {r['saved_tensors']} tensors "
                          f"{'equal' if r['saved_equal'] else 'NOT equal'} to gathered shards")
                if "vs_ddp_rel" in r:
                    checks += f"; lam/gam vs DDP: rel. diff {r['vs_ddp_rel']:.1e}, last loss {r['last_loss']:.4f}"
            r["tokens_per_s"] = tps
            print(f"| {r['setup']} | {r['gpus']} | {r['ms']:.1f} | {tps:,.0f} | {tps / r['gpus']:,.0f} | {gb} | {checks} |")
        save()
        if out_dir:
            print(f"\nwrote {os.path.join(out_dir, 'bench_distributed.json')}")
    if ctx.distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
