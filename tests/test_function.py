"""The autograd function: gradcheck, both paths, the automatic choice, saved tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import randlora
from conftest import CPU, assert_close, bases64, layer_bases64, nonzero_uniform, randomize_, record_saved, ref_delta

F = randlora.RandLoraFunction


def _inputs(in_f, out_f, rank, N=3, kind="dense", seed=0, with_W=True, with_bias=True, W_grad=False):
    """float64 leaf inputs for RandLoraFunction.apply, plus the float64 bases (A, B) for the reference."""
    g = torch.Generator().manual_seed(seed)
    d, D = min(in_f, out_f), max(in_f, out_f)
    n = -(-d // rank)
    bases = randlora._Bases(rank, seed, kind)
    A, Bf, scale = bases.get(D, d, CPU, torch.float64)
    x = torch.randn(N, in_f, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64, requires_grad=W_grad) if with_W else None
    b = torch.randn(out_f, generator=g, dtype=torch.float64, requires_grad=W_grad) if with_bias else None
    lam = nonzero_uniform((rank, n), g, dtype=torch.float64).requires_grad_()
    gam = nonzero_uniform((n, d), g, dtype=torch.float64).requires_grad_()
    A64, B64 = bases64(bases, D, d, rank)
    return x, W, b, lam, gam, A, Bf, scale, (A64, B64)


def _apply(x, W, b, lam, gam, A, Bf, scale, scaling, out_ge_in, merged):
    return F.apply(x, W, b, lam, gam, A, Bf, scale, scaling, out_ge_in, merged)


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("shape", [(5, 4, 2), (4, 5, 2), (5, 5, 3), (7, 3, 1), (3, 7, 3)], ids=str)
@pytest.mark.parametrize("mode", ["W_frozen", "W_grad", "adapter_only", "adapter_only_bias", "sparse", "very_sparse"])
def test_gradcheck(shape, merged, mode):
    in_f, out_f, rank = shape
    kind = mode if mode in ("sparse", "very_sparse") else "dense"
    x, W, b, lam, gam, A, Bf, scale, _ = _inputs(
        in_f,
        out_f,
        rank,
        kind=kind,
        with_W=not mode.startswith("adapter_only"),
        with_bias=mode != "adapter_only",
        W_grad=mode == "W_grad",
    )
    if kind != "dense":
        assert A.dtype == torch.int8 and Bf.dtype == torch.int8 and scale is not None
    if mode == "adapter_only_bias":
        b.requires_grad_()
    scaling = 1.7
    out_ge_in = out_f >= in_f

    def fn(x, W, b, lam, gam):
        return _apply(x, W, b, lam, gam, A, Bf, scale, scaling, out_ge_in, merged)

    assert torch.autograd.gradcheck(fn, (x, W, b, lam, gam), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("shape", [(6, 4, 3), (4, 6, 3)], ids=str)
@pytest.mark.parametrize("with_W", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_function_matches_reference(shape, merged, with_W, with_bias):
    """Forward and all gradients against the element-by-element float64 reference, incl. the
    bias being added in adapter-only mode (W=None) on both paths."""
    in_f, out_f, rank = shape
    x, W, b, lam, gam, A, Bf, scale, (A64, B64) = _inputs(in_f, out_f, rank, N=5, with_W=with_W, with_bias=with_bias, W_grad=True)
    scaling = 0.9
    y = _apply(x, W, b, lam, gam, A, Bf, scale, scaling, out_f >= in_f, merged)
    dY = torch.randn_like(y)
    leaves = [t for t in (x, W, b, lam, gam) if t is not None]
    grads = torch.autograd.grad(y, leaves, dY)

    dW = scaling * ref_delta(A64, B64, lam, gam, out_f, in_f)
    Wt = dW if W is None else W + dW
    y_ref = x @ Wt.t() + (b if b is not None else 0)
    grads_ref = torch.autograd.grad(y_ref, leaves, dY)
    assert_close(y, y_ref, 1e-12, what="y")
    for name, g, gr in zip(("x", "W", "b", "lam", "gam"), grads, grads_ref):
        assert_close(g, gr, 1e-11, what=name)


# -----------------------------------------------------------------------------
# 4. Both paths against each other


@settings(max_examples=20)
@given(
    st.integers(1, 40),
    st.integers(1, 40),
    st.integers(0, 33),
    st.data(),
)
def test_paths_agree(in_f, out_f, N, data):
    d = min(in_f, out_f)
    rank = data.draw(st.integers(1, d))
    seed = data.draw(st.integers(0, 2**20))
    x, W, b, lam, gam, A, Bf, scale, _ = _inputs(in_f, out_f, rank, N=N, seed=seed)
    outs = []
    for merged in (False, True):
        y = _apply(x, W, b, lam, gam, A, Bf, scale, 1.3, out_f >= in_f, merged)
        dY = torch.ones_like(y) + torch.arange(y.numel(), dtype=y.dtype).view_as(y) % 3
        outs.append((y, *torch.autograd.grad(y, (x, lam, gam), dY)))
    for name, a, b_ in zip(("y", "dx", "dlam", "dgam"), *outs):
        assert torch.isfinite(a).all()
        assert_close(a, b_, 1e-10, atol=1e-12, what=name)
        assert a.dtype == b_.dtype == torch.float64


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_layer_paths_agree_float32(shape):
    in_f, out_f = shape
    torch.manual_seed(0)
    layer = randlora.RandLoraLinear(nn.Linear(in_f, out_f), randlora.RandLoraConfig(rank=5, seed=1, alpha=10.0))
    randomize_(layer, 3)
    x = torch.randn(2, 7, in_f)
    res = {}
    for path in ("factorized", "build", "auto"):
        layer.strategy = path
        xx = x.clone().requires_grad_()
        y = layer(xx)
        y.square().sum().backward()
        res[path] = (y.detach(), xx.grad, layer.lam.grad.clone(), layer.gam.grad.clone())
        layer.lam.grad = layer.gam.grad = None
    for other in ("build", "auto"):
        for a, b in zip(res["factorized"], res[other]):
            assert_close(a, b, 1e-4, what=other)


# -----------------------------------------------------------------------------
# The automatic choice


def test_prefer_build_cost_model():
    ch = randlora._prefer_build
    assert ch(16, 4096, 4096, 4096) is False
    assert ch(32768, 4096, 4096, 4096) is True
    assert ch(16, 11008, 4096, 4096) is False
    assert ch(32768, 11008, 4096, 4096) is True
    assert ch(32768, 4096, 11008, 4096) is True
    assert ch(4096, 14336, 4096, 4096) is True  # an 8B MLP at 1x4096: one build beats factorizing
    assert ch(0, 64, 64, 64) is False
    # Monotone in N: once built, always built.
    flags = [ch(N, 1024, 1024, 1024) for N in (1, 8, 64, 256, 512, 1024, 2048, 8192)]
    assert flags == sorted(flags) and flags[0] is False and flags[-1] is True


def test_backward_routes_cost_model():
    br = randlora._backward_routes
    # Few tokens: everything through the factors; many tokens: dX through W' and dS from G.
    assert br(16, 4096, 4096, 4096, False, True, True) == ("factorized", "factorized")
    assert br(65536, 4096, 4096, 4096, False, True, True) == ("W'", "G")
    # A W' at hand (checkpoint recompute) is always used for dX.
    for N in (16, 4096, 65536):
        assert br(N, 4096, 4096, 4096, True, True, True)[0] == "W'"
    assert br(4096, 14336, 4096, 4096, True, True, True) == ("W'", "factorized")


def test_auto_strategy_uses_the_cost_model(monkeypatch):
    calls = []
    orig = randlora._prefer_build

    def spy(*args):
        calls.append(args)
        return orig(*args)

    monkeypatch.setattr(randlora, "_prefer_build", spy)
    layer = randlora.RandLoraLinear(nn.Linear(12, 10), randlora.RandLoraConfig(rank=3, seed=0, alpha=3.0))
    x = torch.randn(2, 5, 12)
    layer(x)
    assert calls[-1] == (10, 10, 12, 3 * 4)
    with torch.no_grad():
        layer(x[:1])
    assert calls[-1] == (5, 10, 12, 3 * 4)
    n = len(calls)
    layer.strategy = "build"
    layer(x)
    assert len(calls) == n  # forced strategy: no choice made


# -----------------------------------------------------------------------------
# 5. Memory: what is kept between forward and backward


def _cache_ptrs(layer):
    """Storages of the shared bases: the cached (A, B) pairs and the per-width sparse A."""
    shared = [t for v in layer._bases._cache.values() for t in v[:2]] + list(layer._bases._small.values())
    return {t.untyped_storage().data_ptr() for t in shared}


@pytest.mark.parametrize("path", ["factorized", "build", "auto"])
@pytest.mark.parametrize("shape", [(64, 96), (96, 64)], ids=str)
@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_saved_tensors_only_input_params_and_shared_bases(path, shape, kind):
    in_f, out_f = shape
    N, rank = 4096, 5  # n = 13, r*n = 65: no shape collides with (N, in), (out, in), ...
    torch.manual_seed(0)
    layer = randlora.RandLoraLinear(nn.Linear(in_f, out_f), randlora.RandLoraConfig(rank=rank, seed=0, bases=kind, alpha=16.0, strategy=path))
    randomize_(layer, 0)
    rn = layer.rank * layer.n
    assert rn == 65
    x = torch.randn(2, N // 2, in_f, requires_grad=True)
    y, saved = record_saved(lambda: layer(x))
    allowed = {
        x.untyped_storage().data_ptr(): "x",
        layer.base.weight.untyped_storage().data_ptr(): "W",
        layer.base.bias.untyped_storage().data_ptr(): "bias",
        layer.lam.untyped_storage().data_ptr(): "lam",
        layer.gam.untyped_storage().data_ptr(): "gam",
    }
    cache = _cache_ptrs(layer)
    assert saved, "nothing saved at all?"
    for t in saved:
        assert tuple(t.shape) not in {(N, rn), (rn, N), (rn, layer.d), (layer.d, rn), (N, out_f)}  # no activations, no S
        # (a merged weight W' would have W's shape: the storage check below rules it out)
        p = t.untyped_storage().data_ptr()
        assert p in allowed or p in cache, f"saved an extra tensor of shape {tuple(t.shape)} {t.dtype}"
    kinds = {allowed.get(t.untyped_storage().data_ptr(), "bases") for t in saved}
    assert "x" in kinds and "lam" in kinds and "gam" in kinds and "bases" in kinds
    # And it still differentiates correctly.
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.lam.grad).all()


@pytest.mark.parametrize("path", ["factorized", "build"])
@pytest.mark.parametrize("x_grad", [True, False])
def test_saved_tensors_with_dropout(path, x_grad):
    """With dropout in training, the adapter runs on the dropped input, which must be kept: one
    (N, in) tensor. When x needs a gradient, dropout itself also keeps its mask (N, in) (a float
    tensor on the CPU). The base layer runs on its own and keeps only its weight (and x). Still
    nothing of size (N, r*n), (r*n, d) or (N, out)."""
    N, in_f, out_f, rank = 4096, 64, 96, 5
    torch.manual_seed(0)
    layer = randlora.RandLoraLinear(nn.Linear(in_f, out_f), randlora.RandLoraConfig(rank=rank, seed=0, alpha=16.0, dropout=0.1, strategy=path))
    layer.train()
    randomize_(layer, 0)
    rn = layer.rank * layer.n
    x = torch.randn(N, in_f, requires_grad=x_grad)
    y, saved = record_saved(lambda: layer(x))
    allowed = {
        x.untyped_storage().data_ptr(),
        layer.base.weight.untyped_storage().data_ptr(),
        layer.base.bias.untyped_storage().data_ptr(),
        layer.lam.untyped_storage().data_ptr(),
        layer.gam.untyped_storage().data_ptr(),
    } | _cache_ptrs(layer)
    extra = [t for t in saved if t.untyped_storage().data_ptr() not in allowed]
    for t in saved:
        assert tuple(t.shape) not in {(N, rn), (rn, N), (rn, layer.d), (layer.d, rn), (N, out_f)}
    assert extra, "the dropped input must be saved"
    assert all(tuple(t.shape) == (N, in_f) for t in extra), [tuple(t.shape) for t in extra]
    assert len({t.untyped_storage().data_ptr() for t in extra}) == (2 if x_grad else 1)
    y.sum().backward()
    assert torch.isfinite(layer.gam.grad).all()


# -----------------------------------------------------------------------------
# 6. Reusing W' = W + s·ΔW: checkpoint recompute and hold_weights (exact, never stale)


def _mlp(seed=0, strategy="build"):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 16))
    randlora.inject(model, ["0", "2"], rank=4, seed=1, strategy=strategy)
    with torch.no_grad():
        for _, m in randlora.named_adapters(model):
            m.lam.normal_()
    return model


def _grads(model, x, ckpt=False):
    model.zero_grad(set_to_none=True)
    if ckpt:
        out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
    else:
        out = model(x)
    (out.square().sum()).backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _kept(model):
    return [m._memo.entry is not None for _, m in randlora.named_adapters(model)]


@pytest.mark.parametrize("strategy", ["build", "auto"])
def test_checkpoint_recompute_reuses_W_and_gives_the_same_gradients(strategy, monkeypatch):
    x = torch.randn(3, 50, 24, requires_grad=True)
    model = _mlp(strategy=strategy)
    plain_out, plain = _grads(model, x)
    builds, smalls = [], []
    orig, orig_S = randlora._adapted_weight, randlora._small_basis
    monkeypatch.setattr(randlora, "_adapted_weight", lambda *a, **k: builds.append(1) or orig(*a, **k))
    monkeypatch.setattr(randlora, "_small_basis", lambda *a, **k: smalls.append(1) or orig_S(*a, **k))
    ckpt_out, ckpt = _grads(model, x, ckpt=True)
    assert torch.equal(plain_out, ckpt_out)
    if strategy == "build":  # same routes: bit for bit; and the recompute's W' served the backward
        assert all(torch.equal(a, b) for a, b in zip(plain, ckpt))
        assert len(builds) == 2 * 2  # per layer: forward and recompute; the backward built none
        assert len(smalls) == 2 * 2  # nor S: dS and dlam/dgam never read it
    else:
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(plain, ckpt))
    assert _kept(model) == [False, False]  # handed over once, then dropped


def test_nothing_kept_without_checkpointing_or_hold():
    model = _mlp()
    x = torch.randn(60, 24)
    model(x).sum().backward()
    assert _kept(model) == [False, False]
    with torch.no_grad(), randlora.hold_weights(model):
        model(x)
        assert _kept(model) == [False, False]  # inference builds nothing to keep


def test_hold_weights_bitwise_across_accumulation_and_invalidated_by_every_write(tmp_path):
    torch.manual_seed(0)
    xs = [torch.randn(70, 24) for _ in range(3)]
    ref, held = _mlp(), _mlp()
    opt_r = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    opt_h = torch.optim.AdamW([p for p in held.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        with randlora.hold_weights(held):
            for x in xs:  # gradient accumulation: one W' per layer for all micro-batches
                ref(x).square().mean().backward()
                held(x).square().mean().backward()
                assert _kept(held) == [True, True]
            gh = [p.grad.clone() for p in held.parameters() if p.requires_grad]
            gr = [p.grad.clone() for p in ref.parameters() if p.requires_grad]
            assert all(torch.equal(a, b) for a, b in zip(gh, gr))
            opt_r.step(); opt_h.step(); opt_r.zero_grad(); opt_h.zero_grad()
            # After the optimizer step the kept W' is stale: the next forward must not use it.
            assert torch.equal(held(xs[0]), ref(xs[0]))
    # Every other way lam/gam/W change inside a hold: in-place edit, load, merge/unmerge.
    with randlora.hold_weights(held):
        held(xs[0]).sum().backward()
        with torch.no_grad():
            held[0].lam.mul_(0.5); ref[0].lam.mul_(0.5)
        assert torch.equal(held(xs[1]), ref(xs[1]))
        randlora.load_adapter_state_dict(held, randlora.adapter_state_dict(_mlp(seed=5)))
        randlora.load_adapter_state_dict(ref, randlora.adapter_state_dict(_mlp(seed=5)))
        assert torch.equal(held(xs[1]), ref(xs[1]))
        held(xs[2]).sum().backward()
        randlora.merge(held); randlora.unmerge(held)
        randlora.merge(ref); randlora.unmerge(ref)
        assert torch.equal(held(xs[2]), ref(xs[2]))
    assert _kept(held) == [False, False]  # the context drops what it held


def test_hold_weights_budget_holds_layers_in_order():
    model = _mlp()
    first = 2 * 24 * 40  # bf16 bytes of layer "0"'s W'
    with randlora.hold_weights(model, budget_bytes=first):
        assert [m._memo.hold for _, m in randlora.named_adapters(model)] == [True, False]
    assert [m._memo.hold for _, m in randlora.named_adapters(model)] == [False, False]
