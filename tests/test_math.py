"""The math: the reference expressions, the Triton kernels (interpreted on the CPU), the autograd function and its
strategies (exercised through RandLoraLinear with float64 weights: a float64 layer computes in float64), the cost
model and the "auto" choice, what is kept for backward, and reusing W' = W + s·ΔW (checkpoint recompute,
hold_weights) without ever serving a stale one.

Correctness is checked against conftest's independent float64 reference (``ref_delta``, built element by element from
the index formulas), with the layer's bases from its public ``random_bases``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

import randlora
from conftest import assert_close, nonzero_uniform, randomize_, record_saved, ref_delta, ref_layer_delta

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
f64 = torch.float64


class OwnLinear(nn.Linear):
    """An nn.Linear with a forward of its own: the adapter runs beside it (layout "opaque"), so the autograd function
    computes ``s x ΔW^T`` alone (no W) and the base adds its own bias."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


def layer64(in_f, out_f, rank, *, kind="dense", strategy="build", bias=True, opaque=False, seed=0, scaling=1.7):
    """A RandLoraLinear on a float64 base (seeded weights)."""
    torch.manual_seed(seed)
    base = (OwnLinear if opaque else nn.Linear)(in_f, out_f, bias=bias).to(f64)
    config = randlora.RandLoraConfig(rank=rank, seed=seed, bases=kind, strategy=strategy, alpha=scaling * rank)
    layer = randlora.RandLoraLinear(base, config)
    assert layer.layout == ("opaque" if opaque else "linear")
    return layer


def params64(layer, seed=0):
    """Float64 leaves for lam (r, n) and gam (n, d), never zero (the layer's own stay float32)."""
    g = torch.Generator().manual_seed(seed)
    lam = nonzero_uniform(tuple(layer.lam.shape), g, dtype=f64).requires_grad_()
    gam = nonzero_uniform(tuple(layer.gam.shape), g, dtype=f64).requires_grad_()
    return lam, gam


def call64(layer, x, lam, gam, W=None, b=None):
    """The layer's output with float64 ``lam``/``gam`` (and ``W``/``b`` when given) in place of its own."""
    params = {"lam": lam, "gam": gam} | ({} if W is None else {"base.weight": W}) | ({} if b is None else {"base.bias": b})
    return functional_call(layer, params, (x,))


def reference(layer, x, lam, gam, W=None, b=None):
    """x (W + s ΔW)^T + b in float64 from conftest's element-wise ΔW (differentiable in every argument)."""
    A, B = layer.random_bases(f64)
    W = layer.base.weight if W is None else W
    b = layer.base.bias if b is None else b
    y = x @ (W + layer.scaling * ref_delta(A, B, lam, gam, layer.out_features, layer.in_features)).t()
    return y if b is None else y + b


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


# -----------------------------------------------------------------------------
# 1. The reference expressions (eager; the kernels below must match them)


@pytest.mark.parametrize("r,n,d", [(3, 2, 5), (1, 4, 7), (4, 4, 16)])
def test_small_basis_and_scale_grads_reference(monkeypatch, r, n, d):
    """S[k*n + b, j] = lam[k, b] A[k, j] gam[b, j]; dlam, dgam = the gradients of s <S, dS> (float64, and float32 with
    float32 results for half-precision dS)."""
    monkeypatch.setattr(randlora, "TRITON", False)
    g = torch.Generator().manual_seed(r * 100 + d)
    lam, gam, A = (nonzero_uniform(shape, g, dtype=f64) for shape in ((r, n), (n, d), (r, d)))
    S_ref = torch.stack([lam[k, b] * A[k] * gam[b] for k in range(r) for b in range(n)])
    S = randlora._small_basis(lam, gam, A, f64)
    assert S.dtype == f64 and S.shape == (r * n, d)
    assert_close(S, S_ref, 1e-15, what="S float64")
    S32 = randlora._small_basis(lam.float(), gam.float(), A.float(), torch.float32)
    assert S32.dtype == torch.float32
    assert_close(S32, S_ref, 1e-6, what="S float32")
    dS = torch.randn(r * n, d, generator=g, dtype=f64)
    lam_, gam_ = lam.clone().requires_grad_(), gam.clone().requires_grad_()
    S_of = torch.stack([lam_[k, b] * A[k] * gam_[b] for k in range(r) for b in range(n)])
    want = torch.autograd.grad((2.5 * S_of * dS).sum(), (lam_, gam_), retain_graph=True)
    got = randlora._scale_grads(dS, lam, gam, A, 2.5)
    for name, a, e in zip(("dlam", "dgam"), got, want):
        assert a.dtype == f64
        assert_close(a, e, 1e-13, what=name)
    for dtype in (torch.float32, torch.bfloat16):
        got = randlora._scale_grads(dS.to(dtype), lam.float(), gam.float(), A.to(dtype), 2.5)
        want_q = torch.autograd.grad((2.5 * S_of * dS.to(dtype).double()).sum(), (lam_, gam_), retain_graph=True)
        for name, a, e in zip(("dlam", "dgam"), got, want_q):
            assert a.dtype == torch.float32
            assert_close(a, e, 1e-2 if dtype == torch.bfloat16 else 1e-5, what=f"{name} {dtype}")


@pytest.mark.parametrize("kind", randlora.BASES_KINDS)
@pytest.mark.parametrize("shape", [(9, 6), (6, 9)], ids=str)
def test_delta_weight_matches_reference(kind, shape):
    in_f, out_f = shape
    layer = layer64(in_f, out_f, 4, kind=kind)
    randomize_(layer, 3)
    A, B = layer.random_bases(f64)
    assert A.shape == (4, layer.d) and B.shape == (layer.D, layer.n, 4)
    ref = layer.scaling * ref_delta(A, B, layer.lam.detach(), layer.gam.detach(), out_f, in_f)
    assert_close(layer.delta_weight(f64), ref, 1e-13, what="delta_weight float64")
    assert_close(layer.delta_weight(), ref, 1e-6, what="delta_weight float32")
    for bad in (torch.int32, torch.bool, "float64"):
        with pytest.raises(TypeError, match=r"delta_weight's dtype must be a floating torch\.dtype"):
            layer.delta_weight(bad)


# -----------------------------------------------------------------------------
# 2. The Triton kernels, run on the CPU through Triton's interpreter (TRITON_INTERPRET=1). The interpreter mode is fixed
# when triton is first imported, so each check runs in a fresh process.


def run_interpreted(code: str) -> str:
    path = os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_kernels_match_eager_code():
    out = run_interpreted(
        """
        import torch, randlora
        assert randlora.triton is not None and randlora.TRITON, "triton is a test dependency: pip install -e '.[test]'"
        assert randlora._use_triton(torch.zeros(1))  # the kernels run here, interpreted
        g = torch.Generator().manual_seed(1234)

        def both(fn, *args):
            got = fn(*args)
            randlora.TRITON = False  # the eager reference
            try:
                return got, fn(*args)
            finally:
                randlora.TRITON = True

        # (r, n, d, d_max): a view A[:, :d] of wider bases, d not a multiple of the block sizes
        for r, n, d, d_max in [(4, 3, 300, 307), (1, 5, 17, 17), (8, 8, 64, 100), (3, 2, 1030, 1030)]:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                lam = torch.randn(r, n, generator=g)
                gam = torch.randn(n, d, generator=g)
                A = torch.randn(r, d_max, generator=g).to(dtype)[:, :d]
                S, E = both(randlora._small_basis, lam, gam, A, dtype)
                assert S.shape == E.shape == (r * n, d) and S.dtype == E.dtype == dtype
                # the interpreter rounds to bfloat16 by truncation, the GPU to nearest: 1 ulp
                tol = 8e-3 if dtype == torch.bfloat16 else 0.0
                err = ((S.float() - E.float()).abs() / E.float().abs().clamp_min(1e-30)).max().item()
                assert err <= tol, (r, n, d, dtype, err)
                dS = torch.randn(r * n, d, generator=g).to(dtype)
                (dlam, dgam), (elam, egam) = both(randlora._scale_grads, dS, lam, gam, A, 2.5)
                assert dlam.dtype == dgam.dtype == elam.dtype == egam.dtype == torch.float32
                assert dlam.shape == (r, n) and dgam.shape == (n, d)
                for got, want in ((dlam, elam), (dgam, egam)):
                    rel = ((got - want).norm() / want.norm()).item()
                    assert rel < 1e-5, (r, n, d, dtype, rel)
        print("ok")
        """
    )
    assert out.strip().endswith("ok")


def test_layer_with_kernels_matches_float64_reference():
    out = run_interpreted(
        """
        import torch, randlora
        from conftest import ref_delta
        assert randlora.triton is not None and randlora._use_triton(torch.zeros(1))
        torch.manual_seed(0)
        for (in_f, out_f), kind in [((24, 40), "dense"), ((40, 24), "dense"), ((33, 33), "dense"), ((40, 24), "sparse"), ((24, 40), "very_sparse")]:
            for strategy in ("build", "factorized"):
                model = torch.nn.Sequential(torch.nn.Linear(in_f, out_f))
                randlora.inject(model, ["0"], 5, seed=3, strategy=strategy, bases=kind)
                layer = model[0]
                with torch.no_grad():
                    layer.lam.normal_()
                    layer.gam.normal_()
                x = torch.randn(2, 7, in_f, requires_grad=True)
                dy = torch.randn(2, 7, out_f)
                model(x).backward(dy)
                # float64 reference, element by element (conftest.ref_delta)
                lam = layer.lam.detach().double().requires_grad_()
                gam = layer.gam.detach().double().requires_grad_()
                A, B = layer.random_bases(torch.float64)
                W = layer.base.weight.double() + layer.scaling * ref_delta(A, B, lam, gam, out_f, in_f)
                xr = x.detach().double().requires_grad_()
                y = xr @ W.t() + layer.base.bias.double()
                y.backward(dy.double())
                for got, want in ((x.grad, xr.grad), (layer.lam.grad, lam.grad), (layer.gam.grad, gam.grad)):
                    rel = ((got.double() - want).norm() / want.norm()).item()
                    assert rel < 1e-5, (in_f, out_f, kind, strategy, rel)
        print("ok")
        """
    )
    assert out.strip().endswith("ok")


# -----------------------------------------------------------------------------
# 3. The autograd function and its strategies: gradcheck and the float64 reference, both orientations

def _function_args(monkeypatch, layer, x):
    """``(A, Bf, call)`` the layer hands RandLoraFunction for ``x`` (a no-grad forward: no W' memo in the call)."""
    seen, real = [], randlora.RandLoraFunction

    class Spy:
        @staticmethod
        def apply(*args):
            seen.append(args)
            return real.apply(*args)

    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(randlora, "RandLoraFunction", Spy)
        layer(x)
    (args,) = seen
    return args[5:]


GRAD_SHAPES = [(5, 4, 2), (4, 5, 2), (5, 5, 3), (7, 3, 1), (3, 7, 3)]  # (in, out, rank)
MODES = ["W_frozen", "W_grad", "adapter_only", "adapter_only_bias", "sparse", "very_sparse"]


@pytest.mark.parametrize("strategy", ["build", "factorized"])
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(monkeypatch, shape, strategy, mode):
    """``W_grad``: the user unfroze W and b; ``adapter_only*``: a base with its own forward (W is not in the function,
    the base adds its bias); sparse kinds: int8 bases."""
    in_f, out_f, rank = shape
    kind = mode if mode in ("sparse", "very_sparse") else "dense"
    opaque, bias = mode.startswith("adapter_only"), mode != "adapter_only"
    layer = layer64(in_f, out_f, rank, kind=kind, strategy=strategy, bias=bias, opaque=opaque)
    lam, gam = params64(layer)
    x = torch.randn(3, in_f, dtype=f64, requires_grad=True)
    A, Bf, call = _function_args(monkeypatch, layer, x.detach())  # what the function gets: int8 bases and a scale
    assert A.dtype == Bf.dtype == (f64 if kind == "dense" else torch.int8)
    assert (call.plan.scale is not None) == (kind != "dense") and call.build == (strategy == "build")
    if mode in ("W_grad", "adapter_only_bias"):
        W = layer.base.weight.detach().clone().requires_grad_(mode == "W_grad")
        b = layer.base.bias.detach().clone().requires_grad_()
        inputs, fn = (x, W, b, lam, gam), lambda x, W, b, lam, gam: call64(layer, x, lam, gam, W, b)
    else:
        inputs, fn = (x, lam, gam), lambda x, lam, gam: call64(layer, x, lam, gam)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["build", "factorized", "auto"])
@pytest.mark.parametrize("shape", GRAD_SHAPES[:3], ids=str)
@pytest.mark.parametrize("mode", ["W_grad", "adapter_only", "sparse"])
def test_gradgradcheck(shape, strategy, mode):
    """Gradients that differentiate again (create_graph=True: gradient penalties, Hessian-vector products): second
    derivatives in x, W, b, lam and gam against finite differences, float64."""
    in_f, out_f, rank = shape
    layer = layer64(in_f, out_f, rank, kind="sparse" if mode == "sparse" else "dense", strategy=strategy,
                    opaque=mode == "adapter_only")  # fmt: skip
    lam, gam = params64(layer)
    x = torch.randn(3, in_f, dtype=f64, requires_grad=True)
    if mode == "W_grad":
        W = layer.base.weight.detach().clone().requires_grad_()
        b = layer.base.bias.detach().clone().requires_grad_()
        inputs, fn = (x, W, b, lam, gam), lambda x, W, b, lam, gam: call64(layer, x, lam, gam, W, b)
    else:
        inputs, fn = (x, lam, gam), lambda x, lam, gam: call64(layer, x, lam, gam)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["build", "factorized"])
def test_gradient_penalty_against_float64(strategy):
    """A gradient penalty ||d out / d x||^2 through LayerNorm -> adapted layer -> frozen head (R1, WGAN-GP): lam/gam get
    the float64 reference's gradients. (Before, the penalty's lam/gam gradient was silently None.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 12), nn.Linear(12, 1))
    before = copy.deepcopy(model).double()
    randlora.inject(model, ["1"], rank=4, strategy=strategy)
    randomize_(model[1], 3)
    x = torch.randn(4, 16, requires_grad=True)
    calls = []
    model[1].lam.register_hook(lambda g: calls.append(1) or 2 * g)  # a hook that scales (clipping, noise): runs once
    (gx,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    gx.pow(2).sum().backward()
    assert len(calls) == 1
    lam, gam = (t.detach().double().requires_grad_() for t in (model[1].lam, model[1].gam))
    A, B = model[1].random_bases(f64)
    W = before[1].weight + model[1].scaling * ref_delta(A, B, lam, gam, 12, 16)
    x64 = x.detach().double().requires_grad_()
    out = before[2](before[0](x64) @ W.t() + before[1].bias).sum()
    (gx64,) = torch.autograd.grad(out, x64, create_graph=True)
    dlam, dgam = torch.autograd.grad(gx64.pow(2).sum(), (lam, gam))
    assert_close(gx.detach().double(), gx64.detach(), 1e-5, what="d out / dx")
    assert_close(model[1].lam.grad.double(), 2 * dlam, 1e-4, what="lam")
    assert_close(model[1].gam.grad.double(), dgam, 1e-4, what="gam")


@pytest.mark.parametrize("strategy", ["build", "factorized"])
def test_second_order_with_only_the_base_trainable(strategy):
    """create_graph=True where only the base's bias, or its weight, trains (lam/gam frozen, x without grad): the
    gradients are the ones computed without create_graph."""
    torch.manual_seed(0)
    layer = randlora.inject(nn.Sequential(nn.Linear(6, 5)), ["0"], rank=2, strategy=strategy)[0]
    randomize_(layer, 1)
    layer.lam.requires_grad_(False)
    layer.gam.requires_grad_(False)
    x = torch.randn(3, 6)
    for p in (layer.base.bias, layer.base.weight):
        p.requires_grad_(True)
        want = torch.autograd.grad(layer(x).pow(2).sum(), p)[0]
        assert_close(torch.autograd.grad(layer(x).pow(2).sum(), p, create_graph=True)[0], want, 1e-6)
        p.requires_grad_(False)


@pytest.mark.parametrize("strategy", ["build", "factorized"])
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=str)
def test_gradcheck_function_without_W_with_bias(monkeypatch, shape, strategy):
    """The function's adapter-only form with the bias inside (the route of a 4-bit base, whose W is dequantized inside
    the function; not buildable in float64): gradcheck and the float64 reference."""
    in_f, out_f, rank = shape
    layer = layer64(in_f, out_f, rank, strategy=strategy)
    lam, gam = params64(layer)
    x = torch.randn(3, in_f, dtype=f64, requires_grad=True)
    b = torch.randn(out_f, dtype=f64, requires_grad=True)
    A, Bf, call = _function_args(monkeypatch, layer, x.detach())
    assert call.build == (strategy == "build")
    fn = lambda x, b, lam, gam: randlora.RandLoraFunction.apply(x, None, b, lam, gam, A, Bf, call)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, b, lam, gam), eps=1e-6, atol=1e-7, rtol=1e-5)
    y = fn(x, b, lam, gam)
    dY = torch.randn_like(y)
    A64, B64 = layer.random_bases(f64)
    y_ref = x @ (layer.scaling * ref_delta(A64, B64, lam, gam, out_f, in_f)).t() + b
    assert_close(y, y_ref, 1e-12, what="y")
    for name, g, gr in zip("x b lam gam".split(), torch.autograd.grad(y, (x, b, lam, gam), dY), torch.autograd.grad(y_ref, (x, b, lam, gam), dY)):
        assert_close(g, gr, 1e-11, what=name)


@pytest.mark.parametrize("kind", randlora.BASES_KINDS)
@pytest.mark.parametrize("strategy", ["build", "factorized", "auto"])
@pytest.mark.parametrize("shape", [(6, 4, 3), (4, 6, 3)], ids=str)
@pytest.mark.parametrize("with_W", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_function_matches_reference(shape, strategy, with_W, with_bias, kind):
    """Forward and all gradients (x, W, b, lam, gam) against the element-by-element float64 reference; without W in
    the function, the base (with or without bias) runs its own forward beside it."""
    in_f, out_f, rank = shape
    layer = layer64(in_f, out_f, rank, kind=kind, strategy=strategy, bias=with_bias, opaque=not with_W, scaling=0.9)
    lam, gam = params64(layer)
    x = torch.randn(5, in_f, dtype=f64, requires_grad=True)
    W = layer.base.weight.detach().clone().requires_grad_()
    b = layer.base.bias.detach().clone().requires_grad_() if with_bias else None
    y = call64(layer, x, lam, gam, W, b)
    dY = torch.randn_like(y)
    leaves = [t for t in (x, W, b, lam, gam) if t is not None]
    y_ref = reference(layer, x, lam, gam, W, b)
    assert y.dtype == f64
    assert_close(y, y_ref, 1e-12, what="y")
    for name, g, gr in zip(("x", "W", "b", "lam", "gam") if with_bias else ("x", "W", "lam", "gam"),
                           torch.autograd.grad(y, leaves, dY), torch.autograd.grad(y_ref, leaves, dY)):  # fmt: skip
        assert g.dtype == f64
        assert_close(g, gr, 1e-11, what=name)


ROUTES = [("W'", "G"), ("W'", "factorized"), ("factorized", "G"), ("factorized", "factorized")]


@pytest.mark.parametrize("routes", ROUTES, ids=str)
@pytest.mark.parametrize("shape", [(5, 4, 2), (4, 5, 2)], ids=str)
@pytest.mark.parametrize("N", [1, 6])
def test_auto_every_backward_route_gradchecks(monkeypatch, routes, shape, N):
    """"auto" with each of the four backward routes forced (the cost model picks among them), after a factorized
    (N=1) or a building (N=6) forward, with W and b trainable."""
    in_f, out_f, rank = shape
    layer = layer64(in_f, out_f, rank, strategy="auto")
    assert (N >= layer._plan.build_from) == (N == 6)
    asked = []
    monkeypatch.setattr(randlora, "_backward_routes", lambda *a: asked.append(a) or routes)
    lam, gam = params64(layer)
    x = torch.randn(N, in_f, dtype=f64, requires_grad=True)
    W = layer.base.weight.detach().clone().requires_grad_()
    b = layer.base.bias.detach().clone().requires_grad_()
    fn = lambda x, W, b, lam, gam: call64(layer, x, lam, gam, W, b)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, W, b, lam, gam), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert asked and all(a[0] == N and a[1:4] == (out_f, in_f, layer.rank * layer.n) for a in asked)
    y, leaves = fn(x, W, b, lam, gam), (x, W, b, lam, gam)
    dY = torch.randn_like(y)
    y_ref = reference(layer, x, lam, gam, W, b)
    assert_close(y, y_ref, 1e-12, what="y")
    for name, g, gr in zip("x W b lam gam".split(), torch.autograd.grad(y, leaves, dY), torch.autograd.grad(y_ref, leaves, dY)):
        assert_close(g, gr, 1e-11, what=name)


@settings(max_examples=20)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 33), st.data())
def test_strategies_agree(in_f, out_f, N, data):
    d = min(in_f, out_f)
    rank = data.draw(st.integers(1, d))
    seed = data.draw(st.integers(0, 2**20))
    outs = []
    for strategy in ("factorized", "build", "auto"):
        layer = layer64(in_f, out_f, rank, strategy=strategy, seed=seed, scaling=1.3)
        lam, gam = params64(layer, seed)
        x = torch.randn(N, in_f, generator=torch.Generator().manual_seed(seed), dtype=f64, requires_grad=True)
        y = call64(layer, x, lam, gam)
        dY = torch.ones_like(y) + torch.arange(y.numel(), dtype=y.dtype).view_as(y) % 3
        outs.append((y, *torch.autograd.grad(y, (x, lam, gam), dY)))
    for other in outs[1:]:
        for name, a, b_ in zip(("y", "dx", "dlam", "dgam"), outs[0], other):
            assert torch.isfinite(a).all()
            assert_close(b_, a, 1e-10, atol=1e-12, what=name)
            assert a.dtype == b_.dtype == f64


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_layer_strategies_agree_float32(shape):
    in_f, out_f = shape
    torch.manual_seed(0)
    layer = randlora.RandLoraLinear(nn.Linear(in_f, out_f), randlora.RandLoraConfig(rank=5, seed=1, alpha=10.0))
    randomize_(layer, 3)
    x = torch.randn(2, 7, in_f)
    res = {}
    for strategy in ("factorized", "build", "auto"):
        layer.strategy = strategy
        xx = x.clone().requires_grad_()
        y = layer(xx)
        y.square().sum().backward()
        res[strategy] = (y.detach(), xx.grad, layer.lam.grad.clone(), layer.gam.grad.clone())
        layer.lam.grad = layer.gam.grad = None
    for other in ("build", "auto"):
        for a, b in zip(res["factorized"], res[other]):
            assert_close(a, b, 1e-4, what=other)


# fp16 outliers: a fresh adapter (ΔW = 0) on a 64x256 fp16 Linear (out < in) with one input channel at >= 1e4 gives
# finite outputs wherever nn.Linear's are (every strategy).


@pytest.mark.parametrize("strategy", ["auto", "build", "factorized"])
@settings(max_examples=6)
@given(
    channel=st.integers(0, 255),
    mag=st.sampled_from([1e4, 3e4, 6e4]),
    sign=st.sampled_from([1.0, -1.0]),
    tokens=st.sampled_from([1, 3, 64, 600]),
    grad=st.booleans(),
)
def test_fp16_outlier_fresh_adapter_finite(strategy, channel, mag, sign, tokens, grad):
    torch.manual_seed(0)
    lin = nn.Linear(256, 64).half()
    model = nn.Sequential(lin)
    randlora.inject(model, ["0"], rank=8, strategy=strategy)
    assert model[0].strategy == strategy
    g = torch.Generator().manual_seed(channel)
    x = torch.randn(tokens, 256, generator=g).half()
    x[:, channel] = mag * sign
    with torch.no_grad():
        y_base = lin(x)
    assert torch.isfinite(y_base).all()  # nn.Linear itself is fine
    with torch.set_grad_enabled(grad):
        y = model(x)
    assert y.dtype == torch.float16
    assert torch.isfinite(y).all(), f"{strategy}: {int((~torch.isfinite(y)).sum())} non-finite outputs"
    assert_close(y, y_base, 4e-3, what=f"{strategy}: fresh adapter vs nn.Linear")


# -----------------------------------------------------------------------------
# 4. The cost model and the "auto" choice


def test_build_from_cost_model():
    def builds(N, out_f, in_f, rn):  # what 0.2's _prefer_build(N, out, in, rn) answered
        return N >= randlora._build_from(out_f, in_f, rn, "auto")

    assert builds(16, 4096, 4096, 4096) is False
    assert builds(32768, 4096, 4096, 4096) is True
    assert builds(16, 11008, 4096, 4096) is False
    assert builds(32768, 11008, 4096, 4096) is True
    assert builds(32768, 4096, 11008, 4096) is True
    assert builds(4096, 14336, 4096, 4096) is True  # an 8B MLP at 1x4096: one build beats factorizing
    assert builds(0, 64, 64, 64) is False
    # Monotone in N: once built, always built.
    flags = [builds(N, 1024, 1024, 1024) for N in (1, 8, 64, 256, 512, 1024, 2048, 8192)]
    assert flags == sorted(flags) and flags[0] is False and flags[-1] is True
    # Exactly where building W' (D d rn) costs less than factorizing (N rn (D + d)).
    for out_f, in_f, rn in [(10, 12, 12), (4096, 11008, 4096), (7, 3, 3)]:
        D, d, N = max(out_f, in_f), min(out_f, in_f), randlora._build_from(out_f, in_f, rn, "auto")
        assert D * d * rn < N * rn * (D + d) and not D * d * rn < (N - 1) * rn * (D + d)
    # Forced strategies: from the first token, or never.
    assert randlora._build_from(64, 64, 64, "build") == 0
    assert randlora._build_from(64, 64, 64, "factorized") >= 2**62


def test_backward_routes_cost_model():
    br = randlora._backward_routes
    # Few tokens: everything through the factors; many tokens: dX through W' and dS from G.
    assert br(16, 4096, 4096, 4096, False, True, True) == ("factorized", "factorized")
    assert br(65536, 4096, 4096, 4096, False, True, True) == ("W'", "G")
    # A W' at hand (checkpoint recompute) is always used for dX.
    for N in (16, 4096, 65536):
        assert br(N, 4096, 4096, 4096, True, True, True)[0] == "W'"
    assert br(4096, 14336, 4096, 4096, True, True, True) == ("W'", "factorized")


def _count_builds(monkeypatch) -> list:
    builds, real = [], randlora._adapted_weight
    monkeypatch.setattr(randlora, "_adapted_weight", lambda *a, **k: builds.append(1) or real(*a, **k))
    return builds


def test_auto_strategy_takes_the_cost_models_routes(monkeypatch):
    layer = randlora.RandLoraLinear(nn.Linear(12, 10), randlora.RandLoraConfig(rank=3, seed=0, alpha=3.0))
    rn = 3 * 4
    start = randlora._build_from(10, 12, rn, "auto")
    assert layer._plan.build_from == start == 6
    builds = _count_builds(monkeypatch)
    asked, real_routes = [], randlora._backward_routes
    monkeypatch.setattr(randlora, "_backward_routes", lambda *a: asked.append((a, real_routes(*a))) or asked[-1][1])
    # The forward: tokens are counted across leading dimensions; W' is built from `start` tokens on.
    with torch.no_grad():
        layer(torch.randn(1, start - 1, 12))
        assert len(builds) == 0
        layer(torch.randn(2, start // 2, 12))
        assert len(builds) == 1
    # The backward asks the cost model for its routes and takes them: dX through W' builds it once.
    for N, x_grad in [(2, True), (start, True), (200, True), (200, False)]:
        builds.clear(), asked.clear()
        x = torch.randn(N, 12, requires_grad=x_grad)
        y = layer(x)
        assert len(builds) == (N >= start)
        y.sum().backward()
        (args, (dx_route, _)), = asked
        assert args == (N, 10, 12, rn, False, x_grad, True)
        assert len(builds) == (N >= start) + (x_grad and dx_route == "W'")
    # A forced strategy makes no choice.
    for strategy, frm in (("build", 0), ("factorized", randlora._build_from(10, 12, rn, "factorized"))):
        layer.strategy = strategy
        assert layer._plan.build_from == frm
        builds.clear(), asked.clear()
        layer(torch.randn(start, 12, requires_grad=True)).sum().backward()
        assert asked == [] and len(builds) == (2 if strategy == "build" else 0)  # build: forward and dX through W'


# -----------------------------------------------------------------------------
# 5. Memory: what is kept between forward and backward


def _bases_ptrs(layer):
    """Storages of the shared bases: every copy the bases object keeps."""
    copies = layer._bases._copies.values()
    return {t.untyped_storage().data_ptr() for v in copies for t in (v if isinstance(v, tuple) else (v,)) if t is not None}


@pytest.mark.parametrize("strategy", ["factorized", "build", "auto"])
@pytest.mark.parametrize("shape", [(64, 96), (96, 64)], ids=str)
@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_saved_tensors_only_input_params_and_shared_bases(strategy, shape, kind):
    in_f, out_f = shape
    N, rank = 4096, 5  # n = 13, r*n = 65: no shape collides with (N, in), (out, in), ...
    torch.manual_seed(0)
    layer = randlora.RandLoraLinear(nn.Linear(in_f, out_f), randlora.RandLoraConfig(rank=rank, seed=0, bases=kind, alpha=16.0, strategy=strategy))
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
    cache = _bases_ptrs(layer)
    assert saved, "nothing saved at all?"
    for t in saved:
        assert tuple(t.shape) not in {(N, rn), (rn, N), (rn, layer.d), (layer.d, rn), (N, out_f)}  # no activations, no S
        # (a built weight W' would have W's shape: the storage check below rules it out)
        p = t.untyped_storage().data_ptr()
        assert p in allowed or p in cache, f"saved an extra tensor of shape {tuple(t.shape)} {t.dtype}"
    kinds = {allowed.get(t.untyped_storage().data_ptr(), "bases") for t in saved}
    assert "x" in kinds and "lam" in kinds and "gam" in kinds and "bases" in kinds
    # And it still differentiates correctly.
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.lam.grad).all()


@pytest.mark.parametrize("strategy", ["factorized", "build"])
@pytest.mark.parametrize("x_grad", [True, False])
def test_saved_tensors_with_dropout(strategy, x_grad):
    """With dropout in training, the adapter runs on the dropped input, which must be kept: one (N, in) tensor. When x
    needs a gradient, dropout itself also keeps its mask (N, in). The base layer runs on its own and keeps only its
    weight (and x). Still nothing of size (N, r*n), (r*n, d) or (N, out)."""
    N, in_f, out_f, rank = 4096, 64, 96, 5
    torch.manual_seed(0)
    layer = randlora.RandLoraLinear(nn.Linear(in_f, out_f), randlora.RandLoraConfig(rank=rank, seed=0, alpha=16.0, dropout=0.1, strategy=strategy))
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
    } | _bases_ptrs(layer)
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
    return out.detach(), [p.grad.clone() for p in trainable(model)]


def _kept(model):
    return [m._memo.entry is not None for _, m in randlora.named_adapters(model)]


@pytest.mark.parametrize("strategy", ["build", "auto"])
def test_checkpoint_recompute_reuses_W_and_gives_the_same_gradients(strategy, monkeypatch):
    x = torch.randn(3, 50, 24, requires_grad=True)
    model = _mlp(strategy=strategy)
    plain_out, plain = _grads(model, x)
    smalls, orig_S = [], randlora._small_basis
    builds = _count_builds(monkeypatch)
    monkeypatch.setattr(randlora, "_small_basis", lambda *a, **k: smalls.append(1) or orig_S(*a, **k))
    asked, real_routes = [], randlora._backward_routes
    monkeypatch.setattr(randlora, "_backward_routes", lambda *a: asked.append(a) or real_routes(*a))
    ckpt_out, ckpt = _grads(model, x, ckpt=True)
    assert torch.equal(plain_out, ckpt_out)
    if strategy == "build":  # same routes: bit for bit; and the recompute's W' served the backward
        assert all(torch.equal(a, b) for a, b in zip(plain, ckpt))
        assert len(builds) == 2 * 2  # per layer: forward and recompute; the backward built none
        assert len(smalls) == 2 * 2  # nor S: dS and dlam/dgam never read it
    else:
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(plain, ckpt))
        assert len(asked) == 2 and all(a[4] is True for a in asked)  # the cost model knew W' was at hand
    assert _kept(model) == [False, False]  # handed over once, then dropped


@pytest.mark.parametrize("route", ["non-reentrant", "non-reentrant, then hold_weights", "reentrant"])
def test_a_recompute_whose_backward_never_runs_leaves_nothing_stale(route):
    """A checkpointed segment with an unused output recomputes a layer whose backward then never runs (non-reentrant;
    a reentrant recompute keeps nothing, a guard here). Its W' must not outlive that backward pass: a later forward
    and backward, plain or under hold_weights, after lam changed by any means (here through .data, which no version
    counter sees), compute from the new lam, against the float64 reference."""
    model = _mlp()
    x, h = torch.randn(32, 24, requires_grad=True), torch.randn(32, 40, requires_grad=True)
    segment = lambda x, h: (model[0](x), model[2](h))  # noqa: E731
    y0, _ = torch.utils.checkpoint.checkpoint(segment, x, h, use_reentrant=route == "reentrant")
    y0.sum().backward()  # model[2]'s output is unused: recomputed, no backward
    layer = model[2]
    layer.lam.data.mul_(2.0)
    with randlora.hold_weights(model) if route.endswith("hold_weights") else contextlib.nullcontext():
        y = layer(h)
        y.backward(dy := torch.randn_like(y))
    W64 = layer.base.weight.detach().double() + ref_layer_delta(layer)
    assert_close(y, h.double() @ W64.t() + layer.base.bias.double(), 1e-5, what="output")
    assert_close(h.grad, dy.double() @ W64, 1e-5, what="dX")
    assert _kept(model) == [False, False]


def test_nothing_kept_without_checkpointing_or_hold():
    model = _mlp()
    x = torch.randn(60, 24)
    model(x).sum().backward()
    assert _kept(model) == [False, False]
    with torch.no_grad(), randlora.hold_weights(model):
        model(x)
        assert _kept(model) == [False, False]  # inference builds nothing to keep


def test_hold_weights_bitwise_across_accumulation_and_invalidated_by_every_write():
    torch.manual_seed(0)
    xs = [torch.randn(70, 24) for _ in range(3)]
    ref, held = _mlp(), _mlp()
    opt_r = torch.optim.AdamW(trainable(ref), lr=1e-2)
    opt_h = torch.optim.AdamW(trainable(held), lr=1e-2)
    for _ in range(3):
        with randlora.hold_weights(held):
            for x in xs:  # gradient accumulation: one W' per layer for all micro-batches
                ref(x).square().mean().backward()
                held(x).square().mean().backward()
                assert _kept(held) == [True, True]
            gh = [p.grad.clone() for p in trainable(held)]
            gr = [p.grad.clone() for p in trainable(ref)]
            assert all(torch.equal(a, b) for a, b in zip(gh, gr))
            opt_r.step(), opt_h.step(), opt_r.zero_grad(), opt_h.zero_grad()
            # After the optimizer step the kept W' is stale: the next forward must not use it.
            assert torch.equal(held(xs[0]), ref(xs[0]))
    # Every other way lam/gam/W change inside a hold: in-place edit, load, merge/unmerge, .to().
    with randlora.hold_weights(held):
        held(xs[0]).sum().backward()
        with torch.no_grad():
            held[0].lam.mul_(0.5), ref[0].lam.mul_(0.5)
        assert torch.equal(held(xs[1]), ref(xs[1]))
        randlora.load_adapter_state_dict(held, randlora.adapter_state_dict(_mlp(seed=5)))
        randlora.load_adapter_state_dict(ref, randlora.adapter_state_dict(_mlp(seed=5)))
        assert torch.equal(held(xs[1]), ref(xs[1]))
        held(xs[2]).sum().backward()
        randlora.merge(held), randlora.unmerge(held)
        randlora.merge(ref), randlora.unmerge(ref)
        assert torch.equal(held(xs[2]), ref(xs[2]))
        with torch.no_grad():
            held[2].base.weight.add_(0.25), ref[2].base.weight.add_(0.25)
        assert torch.equal(held(xs[2]), ref(xs[2]))
        held.double(), ref.double()
        assert torch.equal(held(xs[2].double()), ref(xs[2].double()))
        held.float(), ref.float()
        assert torch.equal(held(xs[0]), ref(xs[0]))
    assert _kept(held) == [False, False]  # the context drops what it held


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hold_weights_budget_holds_layers_in_order(dtype):
    """The budget counts each W' in its weight's dtype, in model order, taking every layer that still fits."""
    model = _mlp().to(dtype)
    first, second = 24 * 40 * dtype.itemsize, 40 * 16 * dtype.itemsize  # bytes of layer "0"'s and "2"'s W'
    for budget, held in [(first, [True, False]), (first - 1, [False, True]), (first + second, [True, True]), (second - 1, [False, False])]:
        with randlora.hold_weights(model, budget_bytes=budget):
            assert [m._memo.hold for _, m in randlora.named_adapters(model)] == held, budget
        assert [m._memo.hold for _, m in randlora.named_adapters(model)] == [False, False]


@pytest.mark.parametrize("budget", ["1GB", -1, 1.5e9, True])
def test_hold_weights_budget_must_be_bytes(budget):
    model = _mlp()
    with pytest.raises(ValueError, match=rf"budget_bytes must be a non-negative int \(bytes\) or None, got {re.escape(repr(budget))}"):
        with randlora.hold_weights(model, budget_bytes=budget):
            pass
    assert not any(m._memo.hold for _, m in randlora.named_adapters(model))


# Issue 19.1, "a cache must never serve stale weights": optimizers whose step writes parameters without bumping their
# version counters (bitsandbytes' 8-bit optimizers run raw kernels; this one writes through .data).


class DataSGD(torch.optim.Optimizer):
    """Sign-SGD with momentum that writes parameters through ``.data``: no version counter moves."""

    def __init__(self, params, lr: float = 1e-3) -> None:
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                    buf.mul_(0.9).add_(p.grad)
                    p.data.add_(buf.sign(), alpha=-group["lr"])


def _adamw8bit(params):
    import bitsandbytes as bnb  # a test dependency: missing, it fails (no skip)

    return bnb.optim.AdamW8bit(params, lr=1e-2, min_8bit_size=0)  # 8-bit states even for small lam/gam


@pytest.mark.parametrize("make_opt", [DataSGD, _adamw8bit], ids=["data_writes", "bnb_AdamW8bit"])
def test_hold_weights_sees_optimizer_steps_that_bump_no_version(make_opt):
    torch.manual_seed(0)
    xs = [torch.randn(70, 24) for _ in range(2)]
    ref, held = _mlp(), _mlp()
    opt_r, opt_h = make_opt(trainable(ref)), make_opt(trainable(held))
    losses = []
    with randlora.hold_weights(held):
        for _ in range(4):
            for x in xs:
                loss_r, loss_h = ref(x).square().mean(), held(x).square().mean()
                assert torch.isfinite(loss_h) and torch.equal(loss_h, loss_r)  # bit for bit: the held W' is this step's
                loss_r.backward(), loss_h.backward()
                assert _kept(held) == [True, True]
            losses.append(loss_h.item())
            assert all(torch.equal(a.grad, b.grad) for a, b in zip(trainable(held), trainable(ref)))
            versions = [p._version for p in trainable(held)]
            before = [p.detach().clone() for p in trainable(held)]
            opt_r.step(), opt_h.step(), opt_r.zero_grad(), opt_h.zero_grad()
            assert [p._version for p in trainable(held)] == versions  # nothing but the step itself says they changed
            assert not all(torch.equal(a, b) for a, b in zip(before, trainable(held)))
        assert torch.equal(held(xs[0]), ref(xs[0]))
    assert len(set(losses)) == len(losses), losses  # training moved the loss every step


@pytest.mark.parametrize("tie", ["one Parameter", "two Parameters on one storage"])
def test_hold_weights_sees_a_write_through_the_other_side_of_a_tie(tie, monkeypatch):
    """An output layer tied to an embedding, as one Parameter or as two on one storage (a tie made through .data):
    inside hold_weights, an in-place edit of the embedding under no_grad (as hold_weights asks) is seen by the
    adapted head, against the float64 reference. One Parameter's W' is held (built once per value), two Parameters'
    never (each call builds: the other side's writes leave this side's version counter as it was)."""
    torch.manual_seed(0)
    emb, head = nn.Embedding(20, 8), nn.Linear(8, 20, bias=False)
    if tie == "one Parameter":
        head.weight = emb.weight
    else:
        head.weight.data = emb.weight.data
    model = nn.ModuleDict(dict(emb=emb, head=head))
    randlora.inject(model, ["head"], rank=4, strategy="build")
    randomize_(model.head, 3)
    x = torch.randn(6, 8)
    builds = _count_builds(monkeypatch)
    with randlora.hold_weights(model):
        model.head(x), model.head(x)
        with torch.no_grad():
            model.emb.weight.mul_(2.0)
        y, _ = model.head(x), model.head(x)
    assert len(builds) == (2 if tie == "one Parameter" else 4)
    W64 = model.head.base.weight.detach().double() + ref_layer_delta(model.head)
    assert torch.equal(model.head.base.weight, model.emb.weight)
    assert_close(y, x.double() @ W64.t(), 1e-5, what="head output after the edit")


class _NoWeight(nn.Module):
    """A linear-like module with its own forward and no ``weight`` attribute."""

    in_features, out_features = 8, 6

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.t()


def test_hold_weights_takes_a_layer_without_a_weight():
    """hold_weights on a model whose adapted module has no ``weight`` (adapted beside its own forward): it computes
    base + s ΔW as outside the context, against the float64 reference."""
    torch.manual_seed(0)
    model = randlora.inject(nn.Sequential(_NoWeight()), ["0"], rank=2)
    randomize_(model[0], 1)
    x = torch.randn(4, 8)
    with randlora.hold_weights(model):
        y = model(x)
    W64 = model[0].base.w.detach().double() + ref_layer_delta(model[0])
    assert_close(y, x.double() @ W64.t(), 1e-5)


def test_hold_weights_data_write_outside_a_step_is_seen_after_reentering():
    """As hold_weights' docstring states: a write through ``.data`` outside an optimizer step is not seen inside the
    context (the held W' stays in use); leaving and entering the context again uses the new values."""
    x = torch.randn(70, 24)
    ref, held = _mlp(), _mlp()
    with randlora.hold_weights(held):
        before = held(x)  # builds and holds W'
        held[0].lam.data.mul_(2)
        assert torch.equal(held(x), before)  # documented: not seen inside the context
    with torch.no_grad():
        ref[0].lam.mul_(2)
    with randlora.hold_weights(held):
        after = held(x)
        assert torch.equal(after, ref(x)) and not torch.equal(after, before)
        assert torch.equal(held(x), after)
    assert torch.equal(held(x), ref(x))
