"""RandLoRA at scale and in the ecosystem (GitHub issue 6).

* Data parallel, 2 CPU processes with gloo: DDP under default arguments equals single-process
  training on the whole batch, keeps ranks identical and never broadcasts the bases (they are
  no buffers: each rank regenerates them from the seed); FSDP2 (``fully_shard`` per block)
  trains the same way and ``save_adapter`` gathers the shards and writes from rank 0 only.
* ``torch.compile``, activation checkpointing (``torch.utils.checkpoint`` and transformers'
  ``gradient_checkpointing_enable``) and ``torch.autocast`` against eager float32.
* A hand-written int8 linear-like layer is adapted beside its own forward; merging it raises.
* Sparse / very sparse bases are cached as int8 (2x below dense bf16 bases) and compute exactly
  what the dense float version of the same bases computes.
"""

from __future__ import annotations

import copy
import hashlib
import os
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import randlora  # noqa: E402
from conftest import tiny_llama  # noqa: E402

WORLD = 2
RANK, SEED = 4, 7
TARGETS = ["q", "up", "down"]


# -----------------------------------------------------------------------------
# A small transformer-ish model (no buffers, so DDP has nothing of ours to broadcast)


class Block(nn.Module):
    def __init__(self, d: int = 24, h: int = 40) -> None:
        super().__init__()
        self.q = nn.Linear(d, d)  # square
        self.up = nn.Linear(d, h)  # out > in
        self.down = nn.Linear(h, d, bias=False)  # out < in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.q(x)
        return x + self.down(F.gelu(self.up(x)))


class Net(nn.Module):
    def __init__(self, d: int = 24, blocks: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(blocks))
        self.ckpt = None  # None, or use_reentrant for torch.utils.checkpoint per block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x) if self.ckpt is None else checkpoint(blk, x, use_reentrant=self.ckpt)
        return x


def adapted(model: nn.Module) -> list[randlora.RandLoraLinear]:
    return [m for m in model.modules() if isinstance(m, randlora.RandLoraLinear)]


def make_model(bases: str = "dense", seed: int = SEED, adapt: bool = True, blocks: int = 2) -> Net:
    torch.manual_seed(0)
    model = Net(blocks=blocks)
    if not adapt:
        return model
    randlora.inject(model, TARGETS, RANK, seed, bases=bases)
    # non-zero lam so that lam and gam both get gradients from the first step
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in adapted(model):
            m.lam.copy_(torch.randn(m.lam.shape, generator=g) * 0.02)
    return model


def data(n: int = 8, seq: int = 6, d: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, seq, d, generator=g), torch.randn(n, seq, d, generator=g)


def train(model: nn.Module, x: torch.Tensor, t: torch.Tensor, steps: int = 3) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(model(x), t)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def adapter_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def grads_of(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    for p in model.parameters():
        p.grad = None
    y = model(x)
    F.mse_loss(y.float(), t).backward()
    return y.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str = "") -> None:
    """Relative error in norm (float32 sums in another order differ elementwise, not in norm)."""
    assert a.shape == b.shape, (what, a.shape, b.shape)
    r = rel(a, b)
    assert r < tol, f"{what}: relative error {r:.2e} >= {tol:.0e}"


def reference(steps: int = 3) -> Net:
    """Single-process training on the whole batch."""
    model = make_model()
    train(model, *data(), steps=steps)
    return model


def cache_bytes(bases: randlora._Bases) -> int:
    return sum(t.untyped_storage().nbytes() for hit in bases._cache.values() for t in hit[:2])


def bases_digest(bases: randlora._Bases) -> str:
    """sha256 of the float32 CPU bases of the largest layer of Net (D = 40, d = 24)."""
    h = hashlib.sha256()
    for t in bases.get(40, 24, torch.device("cpu"), torch.float32)[:2]:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -----------------------------------------------------------------------------
# Two CPU processes (gloo). Workers are module-level so that spawn can import them.


def _init(rank: int, init: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)


def _shard(x: torch.Tensor, rank: int) -> torch.Tensor:
    per = x.shape[0] // WORLD
    return x[rank * per : (rank + 1) * per]


def _ddp_part(rank: int, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    original = dist._broadcast_coalesced
    try:
        broadcasts: list[int] = []

        def counting(group, tensors, *args, **kwargs):  # every broadcast DDP makes goes through here
            broadcasts.append(sum(t.numel() for t in tensors))
            return original(group, tensors, *args, **kwargs)

        dist._broadcast_coalesced = counting
        model = make_model()
        shared = adapted(model)[0]._bases
        ddp = DDP(model)  # default arguments: broadcast_buffers=True
        at_init = list(broadcasts)
        cache_after_init = len(shared._cache)
        x, t = data()
        losses = train(ddp, _shard(x, rank), _shard(t, rank))
        flat = torch.cat([p.reshape(-1) for p in adapter_params(model).values()])
        mine = dict(digest=bases_digest(shared), flat=flat, losses=losses)
        everyone: list = [None] * WORLD
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            torch.save(
                dict(
                    params=adapter_params(model),
                    ranks=everyone,
                    buffers=[n for n, _ in model.named_buffers()],
                    state_keys=list(model.state_dict()),
                    will_sync_buffers=ddp.will_sync_module_buffers(),
                    broadcast_at_init=at_init,
                    broadcast_after_init=broadcasts[len(at_init) :],
                    numel=sum(v.numel() for v in model.state_dict().values()),
                    cache_after_init=cache_after_init,
                ),
                os.path.join(out_dir, "ddp.pt"),
            )
    finally:
        dist._broadcast_coalesced = original


def _fsdp_part(rank: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))  # CPU even where CUDA exists (the default mesh would pick it)
    model = make_model()
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    kinds = sorted({type(p).__name__ for p in model.parameters()})
    x, t = data()
    train(model, _shard(x, rank), _shard(t, rank))
    # Every rank calls save_adapter (it gathers the shards); each names its own file, so
    # the files that exist afterwards tell who wrote.
    randlora.save_adapter(model, os.path.join(out_dir, f"adapter_rank{rank}.safetensors"))
    full = {n: p.detach().full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    local = {n: tuple(p.to_local().shape) for n, p in model.named_parameters() if p.requires_grad}
    dist.barrier()
    if rank == 0:
        torch.save(dict(full=full, local=local, kinds=kinds), os.path.join(out_dir, "fsdp.pt"))


def _worker(rank: int, init: str, out_dir: str) -> None:
    _init(rank, init)
    try:
        _ddp_part(rank, out_dir)
        dist.barrier()
        _fsdp_part(rank, out_dir)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Runs the DDP and the FSDP2 scenario in one pair of processes (starting one costs seconds)."""
    # One retry with a fresh rendezvous: starting two gloo processes on a loaded 2-core machine can
    # fail for reasons of its own (the workers assert nothing; the tests check what they wrote,
    # and a crash that randlora causes happens again).
    for attempt in range(2):
        out = tmp_path_factory.mktemp("dist")
        try:
            mp.spawn(_worker, args=(f"file://{out / 'rendezvous'}", str(out)), nprocs=WORLD, join=True)
            return out
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            if attempt == 1:
                raise


def test_ddp_equals_single_process_and_never_broadcasts_bases(two_ranks):
    got = torch.load(two_ranks / "ddp.pt", weights_only=False)
    ref = adapter_params(reference())

    # Same result as one process on the whole batch.
    assert got["params"].keys() == ref.keys() and len(ref) == 2 * 3 * 2
    for name in ref:
        close(got["params"][name], ref[name], 1e-5, name)

    # Ranks stay identical, bit for bit.
    r0, r1 = got["ranks"]
    assert torch.equal(r0["flat"], r1["flat"])

    # The bases are nothing DDP knows of: no buffers, not in the state dict, never broadcast.
    assert got["buffers"] == []
    assert not any("_bases" in k or "_cache" in k for k in got["state_keys"])
    assert got["will_sync_buffers"] is False
    assert sum(got["broadcast_at_init"]) == got["numel"]  # parameters only (base weights, lam, gam)
    assert got["broadcast_after_init"] == []  # nothing at any forward
    # ... each rank generated them itself, after DDP was built, from the seed, and they agree.
    assert got["cache_after_init"] == 0
    assert r0["digest"] == r1["digest"]
    assert r0["digest"] == bases_digest(randlora._seeded_bases(randlora.RandLoraConfig(rank=RANK, seed=SEED)))


def test_fsdp2_trains_and_save_adapter_writes_from_rank0_only(two_ranks):
    tmp_path = two_ranks
    got = torch.load(tmp_path / "fsdp.pt", weights_only=False)
    assert "DTensor" in got["kinds"]  # really sharded
    assert got["local"]["blocks.0.q.gam"][0] < got["full"]["blocks.0.q.gam"].shape[0]
    assert (tmp_path / "adapter_rank0.safetensors").exists()
    assert not (tmp_path / "adapter_rank1.safetensors").exists()

    ref_model = reference()
    ref = adapter_params(ref_model)
    for name in ref:
        close(got["full"][name], ref[name], 1e-5, name)

    # Reload into a plain model: the gathered values, bit for bit, and the reference's outputs.
    fresh = randlora.load_adapter(make_model(adapt=False), tmp_path / "adapter_rank0.safetensors")
    loaded = adapter_params(fresh)
    assert loaded.keys() == ref.keys()
    for name in ref:
        assert torch.equal(loaded[name], got["full"][name]), name
    x, _ = data()
    with torch.no_grad():
        close(fresh(x), ref_model(x), 1e-5, "output")


# -----------------------------------------------------------------------------
# torch.compile


def test_compile_matches_eager_forward_and_gradients():
    torch._dynamo.reset()
    # A seed of its own: the compiled model meets a cold bases cache. Generating them is kept
    # out of the graph (a graph break on the first call; later calls read the cache).
    model = make_model(seed=101, blocks=1)
    x, t = data()
    # aot_eager: dynamo and AOTAutograd as inductor gets them, without inductor's C++ builds
    # (tens of seconds on 2 cores); inductor itself runs in the next test.
    compiled = torch.compile(model, backend="aot_eager")
    for call in range(2):
        yc, gc = grads_of(compiled, x, t)
        ye, ge = grads_of(model, x, t)
        close(yc, ye, 1e-5, f"output, call {call}")
        assert gc.keys() == ge.keys() and len(ge) == 2 * 3
        for name in ge:
            close(gc[name], ge[name], 1e-5, f"{name}, call {call}")


def test_compile_fullgraph_merged_path_compact_bases_after_one_eager_step():
    torch._dynamo.reset()
    model = make_model("sparse", seed=102, blocks=1)
    for m in adapted(model):
        m.strategy = "build"
    x, t = data()
    ye, ge = grads_of(model, x, t)  # warms the bases cache: nothing is left to generate in the graph
    compiled = torch.compile(model, fullgraph=True)  # default backend: inductor (C++ on CPU)
    yc, gc = grads_of(compiled, x, t)
    close(yc, ye, 1e-5, "output")
    for name in ge:
        close(gc[name], ge[name], 1e-5, name)


# -----------------------------------------------------------------------------
# Activation checkpointing


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_torch_checkpoint_same_gradients(use_reentrant):
    model = make_model()
    x, t = data()
    y0, g0 = grads_of(model, x, t)
    model.ckpt = use_reentrant
    # reentrant checkpointing only sends gradients through inputs that require grad
    y1, g1 = grads_of(model, x.clone().requires_grad_(use_reentrant), t)
    close(y1, y0, 1e-5, "output")
    for name in g0:
        close(g1[name], g0[name], 1e-5, name)


def _tiny_llama():
    torch.manual_seed(0)
    model = tiny_llama()
    randlora.inject(model, ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], rank=4)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in adapted(model):
            m.lam.copy_(torch.randn(m.lam.shape, generator=g) * 0.02)
    return model.train()


@pytest.mark.parametrize("reentrant", [None, True])
def test_transformers_gradient_checkpointing_same_gradients(reentrant):
    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))

    def grads():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    l0, g0 = grads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # renamed to activation_checkpointing_enable in newer transformers
        if reentrant is None:
            model.gradient_checkpointing_enable()  # the library's default
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()  # frozen embeddings: reentrant needs a grad-requiring input
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    l1, g1 = grads()
    torch.testing.assert_close(l1, l0)
    assert len(g0) == 2 * 5 * 2
    for name in g0:
        assert g1[name] is not None, name
        close(g1[name], g0[name], 1e-4, name)


# -----------------------------------------------------------------------------
# Mixed precision


# The CUDA cases exist where a GPU does (they ran on an H100/H200 during development).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["factorized", "build"])
def test_autocast_bf16_with_float32_adapter(device, path):
    model = make_model().to(device)
    for m in adapted(model):
        m.strategy = path
    x, t = (v.to(device) for v in data())
    y32, g32 = grads_of(model, x, t)
    with torch.autocast(device, dtype=torch.bfloat16):
        y16, g16 = grads_of(model, x, t)
        inner = adapted(model)[0](x)
    assert inner.dtype == torch.bfloat16  # the adapted layer computes in the autocast dtype
    assert rel(y16, y32) < 2e-2
    for name, g in g16.items():
        assert g.dtype == torch.float32, name  # float32 lam/gam keep float32 gradients
        assert rel(g, g32[name]) < 5e-2, name
    for m in adapted(model):
        assert m.lam.dtype == m.gam.dtype == torch.float32


def test_bf16_model_keeps_float32_adapter():
    model = make_model().to(torch.bfloat16)
    assert {p.dtype for p in adapter_params(model).values()} == {torch.float32}
    x, t = data()
    y, g = grads_of(model, x.bfloat16(), t)
    assert y.dtype == torch.bfloat16 and all(v.dtype == torch.float32 for v in g.values())
    y32, g32 = grads_of(make_model(), x, t)
    assert rel(y, y32) < 2e-2


# -----------------------------------------------------------------------------
# Linear-like base layers: a hand-written int8 linear


class Int8Linear(nn.Module):
    """int8 weight with a per-output-row scale; forward dequantizes. No ``weight`` attribute."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def dequantized(self) -> torch.Tensor:
        return self.qweight.to(self.scale.dtype) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def _quantize(model: Net) -> Net:
    for blk in model.blocks:
        for name in TARGETS:
            setattr(blk, name, Int8Linear(getattr(blk, name)))
    return model


def _dequantized_twin(qmodel: Net) -> Net:
    """The same model with plain float32 nn.Linear layers holding the dequantized weights."""
    twin = make_model(adapt=False)
    for blk, qblk in zip(twin.blocks, qmodel.blocks):
        for name in TARGETS:
            with torch.no_grad():
                getattr(blk, name).weight.copy_(getattr(qblk, name).dequantized())
    return twin


@pytest.mark.parametrize("path", ["factorized", "auto"])
def test_int8_linear_like_layer_adapted_beside_its_forward(path):
    qmodel = _quantize(make_model(adapt=False))
    twin = _dequantized_twin(qmodel)
    randlora.inject(qmodel, TARGETS, RANK, SEED, strategy=path)
    randlora.inject(twin, TARGETS, RANK, SEED)
    assert all(m.layout == "opaque" and not m.mergeable for m in adapted(qmodel))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mq, mt in zip(adapted(qmodel), adapted(twin)):
            mq.lam.copy_(torch.randn(mq.lam.shape, generator=g) * 0.02)
            mt.lam.copy_(mq.lam)
    before = {k: v.clone() for k, v in qmodel.state_dict().items() if k.endswith(("qweight", "scale"))}
    assert len(before) == 2 * 3 * 2

    x, t = data()
    yq, gq = grads_of(qmodel, x, t)
    yt, gt = grads_of(twin, x, t)
    close(yq, yt, 1e-5, "output")
    assert gq.keys() == gt.keys()
    for name in gq:
        close(gq[name], gt[name], 1e-5, name)

    train(qmodel, x, t, steps=2)
    after = qmodel.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # the quantized weights are never touched
    n_adapted = len(list(adapted(qmodel)))
    with pytest.raises(TypeError, match="cannot merge.*Int8Linear"):
        randlora.merge(qmodel)
    assert not any(m.merged for m in adapted(qmodel))
    with pytest.raises(TypeError, match="cannot eject.*Int8Linear"):
        randlora.eject(qmodel)
    assert len(list(adapted(qmodel))) == n_adapted  # refused before anything was replaced


# -----------------------------------------------------------------------------
# Compact (int8) sparse bases


@pytest.mark.parametrize("kind", ["sparse", "very_sparse"])
def test_compact_sparse_bases_memory(kind):
    # The benchmark model's shapes: D = 5632, d = 2048 at r = 32 (dense bf16 bases: 23.2 MB).
    D, d = 5632, 2048
    dense = randlora._Bases(32, seed=5, kind="dense")
    compact = randlora._Bases(32, seed=5, kind=kind)
    dense.get(D, d, torch.device("cpu"), torch.bfloat16)
    A, Bf, scale = compact.get(D, d, torch.device("cpu"), torch.bfloat16)
    assert A.dtype == Bf.dtype == torch.int8 and scale is not None
    assert set(A.unique().tolist()) == {-1, 0, 1}
    ratio = cache_bytes(dense) / cache_bytes(compact)
    assert ratio >= 2.0, ratio
    # ... and 4x below the float32 bases PEFT keeps.
    f32 = randlora._Bases(32, seed=5, kind="dense")
    f32.get(D, d, torch.device("cpu"), torch.float32)
    assert cache_bytes(f32) / cache_bytes(compact) >= 4.0


@pytest.mark.parametrize("kind", ["sparse", "very_sparse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_sparse_bases_match_dense_float_version(kind, dtype):
    model = make_model(kind).to(dtype)
    twin = copy.deepcopy(model)
    for m in adapted(twin):  # the dense float version of exactly these bases, per layer
        A, Bf = m._bases.dense(m.D, m.d, torch.float32)
        m._bases = randlora._StoredBases(m.rank, A, Bf.view(m.D, m.n, m.rank))
    assert not any(m._bases.compact for m in adapted(twin))
    x, t = data()
    x = x.to(dtype)
    for path in ("factorized", "build"):
        for m in adapted(model) + adapted(twin):
            m.strategy = path
        y0, g0 = grads_of(model, x, t)
        y1, g1 = grads_of(twin, x, t)
        assert torch.equal(y0, y1), path
        for name in g0:
            assert torch.equal(g0[name], g1[name]), (path, name)
    for m in adapted(model):
        assert all(v[0].dtype == torch.int8 for v in m._bases._cache.values())
