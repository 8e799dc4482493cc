"""The adapters (randlora.py, section "Adapters"): RandLoraLinear on nn.Linear, transformers' Conv1D,
linear-like modules and bitsandbytes int8 / nf4 / fp4 bases, and RandLoraWeight on an
nn.MultiheadAttention's input projection. Forward and gradients against the float64 reference
(conftest's ``ref_delta``, element by element from the index formulas, on the layer's own
``random_bases``), dtypes, autocast, casts, meta init, the ``.weight`` property, dropout and input
checks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from conftest import (
    Int8Linear,
    MhaHolder,
    OwnForward,
    QNet,
    assert_close,
    assert_refused,
    assert_unchanged,
    base_weight64,
    bnb_linear,
    count_own_calls,
    fresh_tiny,
    mha_inputs,
    nonzero_uniform,
    randomize_,
    randomize_model_,
    record_saved,
    ref_delta,
    ref_layer_delta,
    reference_copy,
    rel_err,
    snapshot,
    tiny_llama,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import randlora

Config = randlora.RandLoraConfig


def make_layer(in_f, out_f, rank, *, bias=True, seed=0, kind="dense", alpha=None, strategy="auto", dropout=0.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_f, in_f, generator=g) / in_f**0.5)
        if bias:
            base.bias.copy_(torch.randn(out_f, generator=g))
    base.to(dtype)
    alpha = float(rank) * 1.5 if alpha is None else alpha
    layer = randlora.RandLoraLinear(base, Config(rank=rank, seed=seed, bases=kind, alpha=alpha, dropout=dropout, strategy=strategy), name="layer")
    randomize_(layer, seed + 1)
    return layer


def bases64(layer):
    """The layer's random bases in float64 (public: ``random_bases``): ``A`` (r, d), ``B`` (D, n, r)."""
    A, B = layer.random_bases(torch.float64)
    assert A.shape == (layer.rank, layer.d) and B.shape == (layer.D, layer.n, layer.rank)
    return A, B


def reference(layer, x, dY):
    """float64 forward and (x, lam, gam) gradients, built from the index formulas."""
    A, B = bases64(layer)
    lam = layer.lam.detach().double().requires_grad_()
    gam = layer.gam.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    W = base_weight64(layer) + layer.scaling * ref_delta(A, B, lam, gam, layer.out_features, layer.in_features)
    y = x64 @ W.t()
    if getattr(layer.base, "bias", None) is not None:
        y = y + layer.base.bias.detach().double()
    gx, glam, ggam = torch.autograd.grad(y, (x64, lam, gam), dY.double())
    return y.detach(), gx, glam, ggam


def run(layer, x, dY):
    x = x.clone().requires_grad_()
    layer.lam.grad = layer.gam.grad = None
    y = layer(x)
    y.backward(dY)
    return y.detach(), x.grad, layer.lam.grad.clone(), layer.gam.grad.clone()


# -----------------------------------------------------------------------------
# Construction: a config, a frozen base


def test_constructor_shapes_and_frozen_base():
    """A RandLoraLinear takes the base's shape: ``d = min``, ``D = max``, ``n = ceil(d / r)`` bases,
    lam (r, n), gam (n, d); its base is frozen, lam/gam train. (test_config.py checks the config
    argument itself: ``RandLoraLinear(base, 4)`` is a TypeError.)"""
    base = nn.Linear(8, 6)
    layer = randlora.RandLoraLinear(base, Config(rank=4))
    assert layer.base is base and not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lam.requires_grad and layer.gam.requires_grad
    assert layer.lam.shape == (4, 2) and layer.gam.shape == (2, 6) and (layer.n, layer.d, layer.D) == (2, 6, 8)
    assert (layer.in_features, layer.out_features, layer.rank, layer.alpha, layer.scaling) == (8, 6, 4, 80.0, 20.0)
    assert "rank=4" in repr(layer) and "strategy='auto'" in repr(layer)


# -----------------------------------------------------------------------------
# Forward and gradients against the float64 reference


@settings(max_examples=25)
@given(
    in_f=st.integers(1, 33),
    out_f=st.integers(1, 33),
    lead=st.sampled_from([(), (1,), (5,), (2, 3), (3, 1, 2)]),
    bias=st.booleans(),
    strategy=st.sampled_from(["build", "factorized", "auto"]),
    data=st.data(),
)
def test_layer_matches_reference(in_f, out_f, lead, bias, strategy, data):
    d = min(in_f, out_f)
    rank = data.draw(st.integers(1, d))
    seed = data.draw(st.integers(0, 10_000))
    layer = make_layer(in_f, out_f, rank, bias=bias, seed=seed, strategy=strategy)
    g = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(*lead, in_f, generator=g)
    dY = torch.randn(*lead, out_f, generator=g)
    got = run(layer, x, dY)
    ref = reference(layer, x, dY)
    assert got[0].shape == (*lead, out_f) and got[1].shape == x.shape
    # float32 rounding scales with the summed terms, not with their sum: y and dx can nearly
    # cancel (a 1x1 layer gave y = 4.9e-5 from terms of about 0.5), so measure them against
    # |x| |W'|^T and |dY| |W'|, with W' the float64 reference weight.
    W = (base_weight64(layer) + ref_layer_delta(layer)).abs()
    x64, dY64 = x.double().abs().reshape(-1, in_f), dY.double().abs().reshape(-1, out_f)
    scale = {"y": (x64 @ W.t()).max().item() if x64.numel() else 0.0, "dx": (dY64 @ W).max().item() if dY64.numel() else 0.0}
    # dlam and dgam sum products of bases, x and dY that can cancel too (dgam 0.2 from terms of 290 was seen): measure
    # them against the same gradients of the all-|.| update, at 2e-6 of it (float32 rounds to about 1e-8 of it)
    A, B = bases64(layer)
    lam, gam = (t.detach().double().abs().requires_grad_() for t in (layer.lam, layer.gam))
    (dY64 * (x64 @ (layer.scaling * ref_delta(A.abs(), B.abs(), lam, gam, out_f, in_f)).t())).sum().backward()
    scale |= {"dlam": 0.1 * lam.grad.max().item(), "dgam": 0.1 * gam.grad.max().item()}
    for name, a, e in zip(("y", "dx", "dlam", "dgam"), got, ref):
        assert_close(a, e, 2e-5, atol=2e-5 * scale.get(name, 0.0), what=name)


@pytest.mark.parametrize("strategy", ["build", "factorized", "auto"])
@pytest.mark.parametrize("shape", [(40, 24, 5), (24, 40, 5), (24, 24, 7), (37, 19, 4), (19, 37, 6)], ids=str)
def test_layer_orientations_float64(shape, strategy):
    """All orientations, ranks that do not divide min(in, out), in float64: tight tolerance."""
    in_f, out_f, rank = shape
    layer = make_layer(in_f, out_f, rank, strategy=strategy).double()
    assert layer.lam.dtype == layer.gam.dtype == torch.float32  # .double() keeps the adapter float32
    layer.lam.data, layer.gam.data = layer.lam.data.double(), layer.gam.data.double()  # a float64 adapter, set explicitly
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, in_f, generator=g, dtype=torch.float64)
    dY = torch.randn(3, 4, out_f, generator=g, dtype=torch.float64)
    for name, a, e in zip(("y", "dx", "dlam", "dgam"), run(layer, x, dY), reference(layer, x, dY)):
        assert a.dtype == torch.float64
        assert_close(a, e, 1e-10, what=name)


def test_one_dim_and_empty_inputs():
    layer = make_layer(7, 5, 2)
    x = torch.randn(7)
    y = layer(x)
    assert y.shape == (5,)
    ref = reference(layer, x, torch.ones(5))[0]
    assert_close(y, ref, 1e-5)
    for strategy in ("build", "factorized", "auto"):
        layer.strategy = strategy
        x0 = torch.randn(0, 3, 7, requires_grad=True)
        y0 = layer(x0)
        assert y0.shape == (0, 3, 5)
        y0.sum().backward()
        assert x0.grad.shape == x0.shape
        assert torch.equal(layer.lam.grad, torch.zeros_like(layer.lam))
        layer.lam.grad = layer.gam.grad = None


def test_non_contiguous_input():
    layer = make_layer(6, 9, 2)
    x = torch.randn(9, 4, 6).transpose(0, 1)  # (4, 9, 6), not contiguous
    dY = torch.randn(4, 9, 9)
    for strategy in ("build", "factorized"):
        layer.strategy = strategy
        for name, a, e in zip(("y", "dx", "dlam", "dgam"), run(layer, x, dY), reference(layer, x, dY)):
            assert_close(a, e, 2e-5, what=name)


@pytest.mark.parametrize("route", ["build", "factorized", "dropout"])
@pytest.mark.parametrize("shape", [(6, 9), (9, 6)], ids=str)
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)], ids=str)
def test_output_can_be_modified_in_place(route, shape, lead):
    """The output is a tensor of its own, never a view made inside the autograd function (autograd refuses in-place
    changes to those): models scale or add to a projection's output in place, and the gradients stay exact."""
    in_f, out_f = shape
    layer = make_layer(in_f, out_f, 2, strategy="factorized" if route == "dropout" else route,
                       dropout=0.5 if route == "dropout" else 0.0)
    layer.train(route == "dropout")  # dropout > 0 while training: the base's own call plus the update beside it
    layer.dropout.eval()  # dropping nothing, so the float64 reference holds
    g = torch.Generator().manual_seed(3)
    x, dY = torch.randn(*lead, in_f, generator=g), torch.randn(*lead, out_f, generator=g)
    xg = x.clone().requires_grad_()
    y = layer(xg)
    y.mul_(2).add_(1)
    y.backward(dY)
    y_ref, dx_ref, dlam_ref, dgam_ref = reference(layer, x, 2 * dY)
    for name, a, e in (("y", y.detach(), 2 * y_ref + 1), ("dx", xg.grad, dx_ref), ("dlam", layer.lam.grad, dlam_ref),
                       ("dgam", layer.gam.grad, dgam_ref)):
        assert_close(a, e, 2e-5, what=name)


def test_base_weight_trainable_gets_full_gradient():
    layer = make_layer(8, 6, 3)
    layer.base.weight.requires_grad_(True)  # frozen by the constructor; the user unfreezes it
    layer.base.bias.requires_grad_(True)
    x, dY = torch.randn(5, 8), torch.randn(5, 6)
    for strategy in ("build", "factorized"):
        layer.strategy = strategy
        layer.base.weight.grad = layer.base.bias.grad = None
        layer(x).backward(dY)
        assert_close(layer.base.weight.grad, dY.t() @ x, 1e-5, what="dW")
        assert_close(layer.base.bias.grad, dY.sum(0), 1e-5, what="db")


# -----------------------------------------------------------------------------
# Input checks


@pytest.mark.parametrize("how", ["prune", "parametrize", "weight_norm"])
def test_lam_gam_held_elsewhere_by_torch_tools(how):
    """torch's pruning and parametrize (and FSDP1, DataParallel's replicas) keep lam/gam out of the module's
    parameter dict: the layer still computes with what they give, against the float64 reference."""
    from torch.nn.utils import parametrize, prune

    class Twice(nn.Module):
        def forward(self, t):
            return 2 * t

    layer = make_layer(6, 9, 2)
    randomize_(layer, 4)
    if how == "prune":
        prune.l1_unstructured(layer, "lam", amount=0.5)
    elif how == "parametrize":
        parametrize.register_parametrization(layer, "lam", Twice())
    else:
        layer = torch.nn.utils.weight_norm(layer, "gam")
    assert "lam" not in layer._parameters or "gam" not in layer._parameters
    x, dY = torch.randn(2, 3, 6), torch.randn(2, 3, 9)
    xg = x.clone().requires_grad_()
    y = layer(xg)
    y.backward(dY)
    y_ref, dx_ref, _, _ = reference(layer, x, dY)  # reads layer.lam / layer.gam: what the tool computes
    assert_close(y.detach(), y_ref, 1e-5, what="y")
    assert_close(xg.grad, dx_ref, 1e-5, what="dx")


def test_wrong_input_features_raises_naming_layer():
    layer = make_layer(8, 6, 3)
    with pytest.raises(ValueError, match=r"'layer'.*8"):
        layer(torch.randn(2, 7))
    with pytest.raises(ValueError, match="in_features=8"):
        layer(torch.randn(8, 2))


def test_wrong_input_features_in_a_model_names_the_layer():
    model = fresh_tiny()
    randlora.inject(model, ["block.2", "head"], rank=2)
    model.block[1] = nn.Linear(16, 12)  # now block.2 (16 -> 8) receives 12 features
    with pytest.raises(ValueError, match=r"'block\.2'.*12.*in_features=16"):
        model(torch.randn(3, 6))


def test_non_floating_input_refused_naming_the_layer_and_caching_nothing():
    layer = make_layer(8, 6, 3)
    views = dict(layer._views)
    with pytest.raises(ValueError, match=r"'layer': input is torch\.int64 \(2, 8\); expected floating"):
        layer(torch.ones(2, 8, dtype=torch.int64))
    assert dict(layer._views) == views


@pytest.mark.parametrize("where", ["layer", "model"])
def test_zero_dim_input(where):
    model = fresh_tiny()
    randlora.inject(model, ["embed", "block.0", "head"], rank=2)
    randomize_model_(model, 5)
    model.eval()
    x = torch.tensor(1.0)
    before = snapshot(model)
    with pytest.raises((ValueError, RuntimeError, TypeError)) as e:
        (model.embed if where == "layer" else model)(x)
    assert not isinstance(e.value, IndexError)
    assert "embed" in str(e.value), str(e.value)
    assert_unchanged(model, before)


# -----------------------------------------------------------------------------
# dtypes and autocast


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dtypes_params_stay_float32_and_output_dtype(dtype):
    layer = make_layer(16, 12, 3, dtype=dtype)
    lam0, gam0 = layer.lam.detach().clone(), layer.gam.detach().clone()
    assert layer.lam.dtype == layer.gam.dtype == torch.float32
    x = torch.randn(2, 3, 16).to(dtype)
    for strategy in ("build", "factorized"):
        layer.strategy = strategy
        y = layer(x)
        assert y.dtype == dtype
        assert torch.isfinite(y).all()
        y.float().sum().backward()
        assert layer.lam.grad.dtype == layer.gam.grad.dtype == torch.float32
        layer.lam.grad = layer.gam.grad = None
    assert torch.equal(layer.lam, lam0) and torch.equal(layer.gam, gam0)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_low_precision_close_to_float32(dtype, tol, shape):
    in_f, out_f = shape
    layer32 = make_layer(in_f, out_f, 3)
    layer_lp = make_layer(in_f, out_f, 3, dtype=dtype)
    with torch.no_grad():
        layer_lp.base.weight.copy_(layer32.base.weight)
        layer_lp.base.bias.copy_(layer32.base.bias)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, in_f, generator=g).to(dtype).float()  # same values in both runs
    dY = torch.randn(4, 6, out_f, generator=g).to(dtype).float()
    for strategy in ("build", "factorized"):
        layer32.strategy = layer_lp.strategy = strategy
        ref = run(layer32, x, dY)
        got = run(layer_lp, x.to(dtype), dY.to(dtype))
        assert got[0].dtype == dtype and got[1].dtype == dtype
        assert got[2].dtype == torch.float32 and got[3].dtype == torch.float32
        for name, a, e in zip(("y", "dx", "dlam", "dgam"), got, ref):
            err = rel_err(a, e)
            assert err < tol, f"{strategy} {name}: relative error {err:.3g}"


@pytest.mark.parametrize("how", ["half", "autocast", "weight"])
@pytest.mark.parametrize("strategy", ["build", "factorized"])
def test_float16_update_keeps_float32_precision(how, strategy):
    """In float16 the update is computed in float32 (as PEFT does): early in training (gam at 1/d, small lam) the small
    basis lam·A·gam sits in float16's subnormal range, and rounding it there lost up to 17% of the update. A zero base
    weight makes the output the update alone; against float64, through the layer (.half() or fp16 autocast) and
    through .weight (a parent reading it)."""
    torch.manual_seed(0)
    layer = randlora.inject(nn.Sequential(nn.Linear(256, 128)), ["0"], rank=8, strategy=strategy)[0]
    with torch.no_grad():
        layer.base.weight.zero_()
        layer.base.bias.zero_()
        layer.lam.normal_(0, 1e-4)
    dW = ref_layer_delta(layer)  # float64
    x, dY = torch.randn(16, 256).half(), torch.randn(16, 128).half()
    lam64 = layer.lam.detach().double().requires_grad_()
    A, B = layer.random_bases(torch.float64)
    (x.double() @ (layer.scaling * ref_delta(A, B, lam64, layer.gam.detach().double(), 128, 256)).t()).backward(dY.double())
    if how == "weight":
        layer.half()
        assert layer.weight.dtype == torch.float16
        assert rel_err(layer.weight, dW) < 1e-3  # s ΔW rounded once to float16 (it was 17% off)
        return
    if how == "half":
        layer.half()
        y = layer(x)
    else:
        with torch.autocast("cpu", dtype=torch.float16):
            y = layer(x.float())
    assert y.dtype == torch.float16
    y.backward(dY)
    assert rel_err(y, x.double() @ dW.t()) < 2e-3  # float16's rounding of the output
    assert rel_err(layer.lam.grad, lam64.grad) < 1e-5


def test_autocast_keeps_the_fused_call(monkeypatch):
    """Under autocast a float32 layer computes in one fused call whether its input is float32 or already bf16 (the
    output of a layer before it): the base's own forward never runs."""
    torch.manual_seed(0)
    model = randlora.inject(nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 8)), ["0", "1"], rank=3)
    randomize_model_(model, 2)
    calls = []
    count_own_calls(monkeypatch, nn.Linear, calls)
    for x in (torch.randn(5, 16), torch.randn(5, 16).bfloat16()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        assert y.dtype == torch.bfloat16 and calls == []


def test_autocast_bf16_cpu():
    layer = make_layer(16, 12, 3)
    x = torch.randn(5, 16)
    ref = reference(layer, x, torch.ones(5, 12))[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, ref) < 3e-2
    y.float().sum().backward()
    assert layer.lam.grad.dtype == torch.float32 and torch.isfinite(layer.lam.grad).all()


def test_float64_layer_under_autocast_stays_float64():
    """Autocast leaves float64 matmuls alone, as the base layer's: the adapted layer computes in float64 too."""
    layer = make_layer(16, 12, 3, dtype=torch.float64)
    x = torch.randn(5, 16, dtype=torch.float64)
    ref = reference(layer, x, torch.ones(5, 12, dtype=torch.float64))[0]
    for strategy in ("build", "factorized"):
        layer.strategy = strategy
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.float64
        assert_close(y, ref, 1e-12, what=f"float64 under autocast, {strategy}")


def test_weight_property_keeps_base_dtype_under_autocast():
    # T5 compares hidden_states.dtype with wo.weight.dtype: the adapted weight must not be autocast.
    layer = make_layer(16, 12, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        W = layer.weight
    assert W.dtype == torch.float32
    assert_close(W, base_weight64(layer) + ref_layer_delta(layer), 1e-6)


# -----------------------------------------------------------------------------
# Casts: lam/gam (and their grads) stay float32 with their values


CASTS = {
    "half": (lambda m: m.half(), torch.float16),
    "bfloat16": (lambda m: m.bfloat16(), torch.bfloat16),
    "double": (lambda m: m.double(), torch.float64),
    "to_bf16": (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    "to_f64": (lambda m: m.to(torch.float64), torch.float64),
}


@pytest.mark.parametrize("cast", list(CASTS))
@pytest.mark.parametrize("what", ["layer", "model"])
def test_casts_keep_lam_gam_values_and_grads_float32(cast, what):
    """One layer, and a model adapted by inject: every cast leaves lam/gam and their grads float32
    with their exact values (a round trip through a half type would round them), the base in the
    new dtype, lam/gam trainable."""
    if what == "layer":
        layer = make_layer(12, 8, 3)
        model = nn.Sequential(layer)
    else:
        model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 6))
        randlora.inject(model, ["0", "2"], rank=2)
        randomize_model_(model, 3)
    x = torch.randn(4, model[0].in_features)
    model(x).sum().backward()
    ads = [m for _, m in randlora.named_adapters(model)]
    values = [(p.detach().clone(), p.grad.clone()) for a in ads for p in (a.lam, a.gam)]
    before = {k: v.clone() for k, v in randlora.adapter_state_dict(model).items()}
    convert, dtype = CASTS[cast]
    convert(layer if what == "layer" else model)
    assert all(a.base.weight.dtype == dtype for a in ads)
    for p, (v, g) in zip([p for a in ads for p in (a.lam, a.gam)], values):
        assert p.dtype == p.grad.dtype == torch.float32
        assert torch.equal(p, v) and torch.equal(p.grad, g)
    for k, v in randlora.adapter_state_dict(model).items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k]), f"{k} changed by the cast"
    assert all(p.requires_grad for n, p in model.named_parameters() if n.endswith((".lam", ".gam")))


# -----------------------------------------------------------------------------
# Dropout


@pytest.mark.parametrize("strategy", ["build", "factorized"])
def test_dropout(strategy):
    p = 0.3
    layer = make_layer(12, 10, 3, dropout=p, strategy=strategy)
    plain = make_layer(12, 10, 3, dropout=0.0, strategy=strategy)
    with torch.no_grad():
        plain.lam.copy_(layer.lam)
        plain.gam.copy_(layer.gam)
    assert isinstance(layer.dropout, nn.Dropout) and layer.dropout.p == p and isinstance(plain.dropout, nn.Identity)
    x = torch.randn(6, 12)
    # eval: dropout off -> equals the no-dropout layer exactly
    layer.eval()
    plain.eval()
    assert torch.equal(layer(x), plain(x))
    # train: differs, and equals base(x) + adapter(dropout(x)) under the same seed
    layer.train()
    torch.manual_seed(77)
    y = layer(x)
    torch.manual_seed(77)
    xd = nn.functional.dropout(x, p, training=True)
    assert (xd == 0).any() and not torch.equal(xd, x)
    dW = ref_layer_delta(layer)
    expected = (x.double() @ base_weight64(layer).t() + layer.base.bias.double()) + xd.double() @ dW.t()
    assert_close(y, expected, 2e-5, what="dropout output")
    assert not torch.allclose(y, plain(x))
    # Gradients flow to lam/gam through the dropped input.
    y.sum().backward()
    assert torch.isfinite(layer.lam.grad).all() and layer.lam.grad.abs().sum() > 0


# -----------------------------------------------------------------------------
# Linear-like modules and Conv1D


@pytest.mark.parametrize("strategy", ["build", "factorized", "auto"])
@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_linear_like_module(strategy, shape):
    in_f, out_f = shape
    base = Int8Linear(in_f, out_f, seed=3)
    layer = randlora.RandLoraLinear(base, Config(rank=3, seed=0, alpha=4.5, strategy=strategy), name="q")
    assert layer.layout == "opaque" and not layer.mergeable
    randomize_(layer, 4)
    x = torch.randn(2, 5, in_f)
    dY = torch.randn(2, 5, out_f)
    x_ = x.clone().requires_grad_()
    y = layer(x_)
    y.backward(dY)
    A, B = bases64(layer)
    lam = layer.lam.detach().double().requires_grad_()
    gam = layer.gam.detach().double().requires_grad_()
    x64 = x.double().requires_grad_()
    W = base.dequantized().double() + layer.scaling * ref_delta(A, B, lam, gam, out_f, in_f)
    y_ref = x64 @ W.t() + base.bias.detach().double()
    grads = torch.autograd.grad(y_ref, (x64, lam, gam), dY.double())
    assert_close(y, y_ref, 2e-5, what="y")
    for name, a, e in zip(("dx", "dlam", "dgam"), (x_.grad, layer.lam.grad, layer.gam.grad), grads):
        assert_close(a, e, 2e-5, what=name)
    with pytest.raises(TypeError, match="'q'"):
        layer.merge()
    assert not layer.merged


def test_linear_like_module_in_a_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = Int8Linear(8, 6, seed=1)
            self.o = nn.Linear(6, 8)

        def forward(self, x):
            return self.o(self.q(x))

    torch.manual_seed(0)
    model = Net()
    x = torch.randn(3, 8)
    y0 = model(x).detach()
    randlora.inject(model, ["q", "o"], rank=2)
    assert model.q.layout == "opaque"
    assert torch.equal(model(x), y0)  # lam = 0
    randomize_model_(model, 2)
    y = model(x).detach()
    snap = snapshot(model)
    with pytest.raises(TypeError, match="'q'"):
        randlora.merge(model)
    assert_unchanged(model, snap)  # "o" was not merged either
    with pytest.raises(TypeError):
        randlora.eject(model)
    assert_unchanged(model, snap)
    with randlora.disable(model):
        assert torch.equal(model(x), y0)
    assert torch.equal(model(x), y)
    # Against the reference: q's adapter beside the dequantized weight.
    q = model.q
    h = x.double() @ (q.base.dequantized().double() + ref_layer_delta(q)).t() + q.base.bias.double()
    out = h @ (base_weight64(model.o) + ref_layer_delta(model.o)).t() + model.o.base.bias.double()
    assert_close(y, out, 2e-5)


def _conv1d(nf=10, nx=14):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(nf=nf, nx=nx)  # in nx, out nf, weight stored (in, out)
    nn.init.normal_(conv.weight, std=0.2)
    nn.init.normal_(conv.bias)
    return conv


def test_conv1d_layer_matches_reference_and_merges():
    conv = _conv1d()
    layer = randlora.RandLoraLinear(conv, Config(rank=4, seed=2, alpha=8.0), name="c_attn")
    assert layer.layout == "conv1d" and (layer.in_features, layer.out_features) == (14, 10)
    randomize_(layer, 1)
    x, dY = torch.randn(3, 14), torch.randn(3, 10)
    for strategy in ("build", "factorized"):
        layer.strategy = strategy
        for name, a, e in zip(("y", "dx", "dlam", "dgam"), run(layer, x, dY), reference(layer, x, dY)):
            assert_close(a, e, 2e-5, what=f"{strategy} {name}")
    w0 = conv.weight.detach().clone()
    y0 = layer(x).detach()
    layer.merge()
    assert_close(conv.weight.t(), base_weight64(layer), 0)  # sanity: views agree
    assert_close(layer.eval()(x), y0, 1e-5)
    layer.unmerge()
    assert_close(conv.weight, w0, 1e-6)


# -----------------------------------------------------------------------------
# Layout (decided by the weight, not the class) and the .weight property


def test_weight_property_is_the_adapted_weight():
    """``.weight`` is W + s·ΔW in the base's layout (differentiable in lam/gam), the base weight
    while merged or disabled; ``.bias`` is the base's."""
    conv = _conv1d()
    for layer in (make_layer(12, 20, 3), make_layer(20, 12, 3), randlora.RandLoraLinear(conv, Config(rank=3, alpha=6.0))):
        randomize_(layer, 5)
        W = layer.weight
        want = base_weight64(layer) + ref_layer_delta(layer)
        assert_close(W if layer.layout == "linear" else W.t(), want, 1e-6, what=layer.layout)
        assert layer.bias is layer.base.bias
        (W.double() * torch.randn(W.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).sum().backward()
        assert layer.lam.grad.abs().sum() > 0 and layer.gam.grad.abs().sum() > 0
        layer.merge()
        assert layer.weight is layer.base.weight
        layer.unmerge()
        layer.disabled = True
        assert layer.weight is layer.base.weight


class SubclassParam(nn.Parameter):
    pass


def test_layout_by_weight_not_class():
    lin = nn.Linear(8, 6)
    wn = nn.utils.parametrizations.weight_norm(nn.Linear(8, 6))
    assert randlora._classify(lin) == ("linear", "adapted")
    assert randlora.RandLoraLinear(nn.Linear(8, 6), Config(rank=2)).layout == "linear"
    assert randlora._classify(OwnForward(8, 6))[0] == "opaque"
    assert randlora._classify(wn)[0] == "opaque"
    # A parametrized nn.Linear still computes F.linear(x, weight, bias): its .weight is W' exactly.
    layer = randlora.RandLoraLinear(wn, Config(rank=2, alpha=4.0), name="wn")
    assert layer.layout == "opaque" and not layer.mergeable
    randomize_(layer, 2)
    x = torch.randn(5, 8)
    W64 = wn.weight.detach().double() + ref_layer_delta(layer)
    assert_close(layer.weight, W64, 1e-6, what="weight_norm .weight")
    assert_close(layer(x), x.double() @ W64.t() + wn.bias.detach().double(), 1e-5, what="weight_norm forward")
    own = randlora.RandLoraLinear(OwnForward(8, 6), Config(rank=2), name="own")
    assert own.layout == "opaque" and own.shows is None
    with pytest.raises(AttributeError, match=r"'own' wraps a OwnForward with its own forward.*call the layer instead"):
        own.weight  # the reason reaches the user (nn.Module.__getattr__ would replace it)
    # A float tensor subclass (torchao-style) may pack values and could be computed with: opaque,
    # and no .weight (showing the base's would let a reader skip the adapter).
    sub = nn.Linear(8, 6)
    sub.weight = SubclassParam(sub.weight.detach())
    assert randlora._classify(sub)[0] == "opaque"
    sub_layer = randlora.RandLoraLinear(sub, Config(rank=2), name="sub")
    assert sub_layer.layout == "opaque"
    with pytest.raises(AttributeError):
        sub_layer.weight


@pytest.mark.parametrize("when", ["before inject", "after inject"])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "instance forward"])
def test_a_hooked_or_patched_base_runs_its_own_call(kind, when):
    """Forward hooks on the base (activation capture, an output edit) and a forward patched onto the instance
    (accelerate's hooks) run as the base's own call does, with the update beside: hook(base(x)) + s x ΔW^T, output and
    gradients against float64; merging, which would change what a hook sees, is refused naming the reason."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(8, 6) if kind == "conv1d" else nn.Linear(6, 8)
    seen = []

    def hook_up(b: nn.Module) -> None:
        if kind == "instance forward":
            plain = b.forward
            b.forward = lambda x: plain(x) * 2.0 + 1.0
        else:
            b.register_forward_hook(lambda mod, inp, out: seen.append(1))
            b.register_forward_hook(lambda mod, inp, out: out * 2.0 + 1.0)

    if when == "before inject":
        hook_up(base)
    model = randlora.inject(nn.Sequential(base), ["0"], rank=2)
    if when == "after inject":
        hook_up(base)
    layer = model[0]
    randomize_(layer, 3)
    x = torch.randn(5, 6, dtype=torch.float64).float().requires_grad_()
    W64 = base.weight.detach().double().t() if kind == "conv1d" else base.weight.detach().double()  # (out, in)
    x64 = x.detach().double().requires_grad_()
    lam64, gam64 = layer.lam.detach().double().requires_grad_(), layer.gam.detach().double().requires_grad_()
    A, B = layer.random_bases(torch.float64)
    delta = layer.scaling * ref_delta(A, B, lam64, gam64, 8, 6)
    ref = (x64 @ W64.t() + layer.base.bias.detach().double()) * 2.0 + 1.0 + x64 @ delta.t()
    dY = torch.randn(5, 8)
    want = torch.autograd.grad(ref, (x64, lam64, gam64), dY.double())
    y = model(x)
    assert_close(y, ref, 1e-5, what=f"{kind} {when} forward")
    for got, w, what in zip(torch.autograd.grad(y, (x, layer.lam, layer.gam), dY), want, ("dx", "dlam", "dgam")):
        assert_close(got, w, 1e-5, what=f"{kind} {when} {what}")
    assert kind == "instance forward" or len(seen) == 1  # the capture hook saw the call
    assert layer.layout == ("opaque" if when == "before inject" else "linear" if kind != "conv1d" else "conv1d")
    assert_refused(model, randlora.merge, TypeError, r"'0'", "hooked or replaced")


# -----------------------------------------------------------------------------
# Parents that read a weight: T5's feed-forward reads wo.weight.dtype


def _t5_ff(wo: nn.Module):
    import transformers
    from transformers.models.t5.modeling_t5 import T5DenseActDense

    torch.manual_seed(0)
    ff = T5DenseActDense(transformers.T5Config(d_model=64, d_ff=128, dropout_rate=0.0))
    ff.wo = wo
    return nn.Sequential(ff)


def test_t5_feed_forward_reads_wo_weight_dtype():
    """T5's feed-forward reads ``wo.weight.dtype`` (and casts to it): adapted, it sees the base's dtype
    and computes base + s·ΔW."""
    torch.manual_seed(0)
    model = _t5_ff(nn.Linear(128, 64, bias=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    randlora.inject(model, ["wi", "wo"], 4, alpha=8.0)
    for i, (_, m) in enumerate(randlora.named_adapters(model)):
        randomize_(m, i)
    ff = model[0]
    x = torch.randn(2, 3, 64)
    h = torch.relu(x.double() @ (before["0.wi.weight"].double() + ref_layer_delta(ff.wi)).t())
    want = h @ (before["0.wo.weight"].double() + ref_layer_delta(ff.wo)).t()
    for train, grad in ((True, True), (True, False), (False, True), (False, False)):
        model.train(train)
        with torch.set_grad_enabled(grad):
            assert_close(model(x), want, 2e-5, what=f"t5 ff train={train} grad={grad}")
    assert ff.wo.weight.dtype == torch.float32


def test_t5_feed_forward_with_8bit_wo():
    """With an 8-bit wo, T5 sees int8 (the packed weight, as the base model shows it) and the adapter
    computes beside the 8-bit layer's own forward."""
    import bitsandbytes as bnb  # a test dependency: missing, it fails (no skip)

    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=False)
    q = bnb.nn.Linear8bitLt(128, 64, bias=False, has_fp16_weights=False, threshold=0.0)
    q.load_state_dict(lin.state_dict())
    model = _t5_ff(q.to("cpu"))
    plain = copy.deepcopy(model)
    randlora.inject(model, ["wo"], 4, alpha=8.0)
    randomize_(model[0].wo, 3)
    assert model[0].wo.weight is q.weight and model[0].wo.weight.dtype == torch.int8  # what the base shows
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        h = torch.relu(plain[0].wi(x))
        want = plain(x).double() + h.double() @ ref_layer_delta(model[0].wo).t()
        assert_close(model(x), want, 1e-5, what="t5 ff, 8-bit wo")


# -----------------------------------------------------------------------------
# bitsandbytes bases (CPU): int8 runs its own forward; 4-bit is dequantized for the build strategy


def _bnb_layer(kind: str, in_f: int, out_f: int):
    q = bnb_linear(kind, in_f, out_f, 3)
    with torch.no_grad():
        q.eval()(torch.zeros(1, in_f))  # the CPU 4-bit kernel repacks the weight on its first eval call (avx512bf16 CPUs)
    return q


@pytest.mark.parametrize("strategy", ["build", "factorized"])
@pytest.mark.parametrize("kind", ["int8", "nf4", "fp4"])
def test_bitsandbytes_base_runs_its_own_forward(kind, strategy):
    """A quantized base (a subclass of nn.Linear whose weight is packed) computes base(x) + s·x ΔW^T
    exactly up to float32 rounding of the update; its .weight is the packed weight as it is; merge
    is refused naming the layer, weight untouched."""
    q = _bnb_layer(kind, 64, 128)
    assert isinstance(q, nn.Linear) and randlora._classify(q) == ("opaque" if kind == "int8" else "4bit", "base")
    layer = randlora.RandLoraLinear(q, Config(rank=8, alpha=16.0, strategy=strategy), name="q1")
    assert layer.layout == ("opaque" if kind == "int8" else "4bit") and not layer.mergeable
    randomize_(layer, 1)
    assert layer.weight is q.weight
    x = torch.randn(3, 5, 64)
    dY = torch.randn(3, 5, 128)
    A, B = bases64(layer)
    for train, grad in ((True, True), (True, False), (False, True), (False, False)):
        layer.train(train)
        lam = layer.lam.detach().double().requires_grad_()
        gam = layer.gam.detach().double().requires_grad_()
        with torch.set_grad_enabled(grad):
            layer.lam.grad = layer.gam.grad = None
            y = layer(x)
            with torch.no_grad():
                plain = q(x)
            delta = layer.scaling * x.double() @ ref_delta(A, B, lam, gam, 128, 64).t()
            assert_close(y.double() - plain.double(), delta, 1e-5, what=f"{kind} train={train} grad={grad}")
            assert rel_err(plain.double() + delta, plain) > 1e-2
            if grad:
                y.backward(dY)
                dlam, dgam = torch.autograd.grad(delta, (lam, gam), dY.double())
                assert_close(layer.lam.grad, dlam, 1e-4, what="dlam")
                assert_close(layer.gam.grad, dgam, 1e-4, what="dgam")
    packed = q.weight.detach().clone()
    with pytest.raises(TypeError, match="'q1'"):
        layer.merge()
    assert not layer.merged and torch.equal(q.weight, packed)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_4bit_base_builds_from_its_dequantized_weight(kind, checkpointed, monkeypatch):
    """The build strategy on a 4-bit base: y = x (dequantize(W) + s·ΔW)^T + b against float64, and
    dx/dlam/dgam against float64 autograd. The layer's own forward never runs; the dequantized W
    is never kept for backward (rebuilt there, or handed over by a checkpoint recompute: one
    dequantization per forward), and the packed weight is untouched. Checkpointed gradients are
    bitwise those of the plain step."""
    import bitsandbytes.functional as bnbf
    from torch.utils.checkpoint import checkpoint

    in_f, out_f = 128, 64  # W (64, 128) has a shape no other saved tensor has
    q = bnb_linear(kind, in_f, out_f, 5)  # never called: not repacked
    layer = randlora.RandLoraLinear(q, Config(rank=8, alpha=16.0, strategy="build"), name="q4")
    assert layer.layout == "4bit" and not layer.mergeable
    randomize_(layer, 2)
    packed = q.weight.detach().clone()
    W64 = bnbf.dequantize_4bit(q.weight, q.weight.quant_state).double()
    real, calls = bnbf.dequantize_4bit, []
    monkeypatch.setattr(bnbf, "dequantize_4bit", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(type(q), "forward", lambda *a: pytest.fail("the 4-bit layer's own forward ran"))
    x = torch.randn(3, 5, in_f, requires_grad=True)
    dY = torch.randn(3, 5, out_f)
    A, B = bases64(layer)
    lam = layer.lam.detach().double().requires_grad_()
    gam = layer.gam.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    want = x64 @ (W64 + layer.scaling * ref_delta(A, B, lam, gam, out_f, in_f)).t() + q.bias.double()
    want.backward(dY.double())
    y, saved = record_saved(lambda: checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x))
    assert not [t for t in saved if tuple(t.shape) == (out_f, in_f)], "a dequantized W was kept for backward"
    y.backward(dY)
    assert len(calls) == 2  # forward + (checkpoint recompute | backward's own W')
    assert_close(y, want, 1e-5, what=f"{kind} y")
    for got, ref, what in ((x.grad, x64.grad, "dx"), (layer.lam.grad, lam.grad, "dlam"), (layer.gam.grad, gam.grad, "dgam")):
        assert_close(got, ref, 1e-5, what=f"{kind} {what}")
    assert torch.equal(q.weight, packed)
    grads = [t.grad.clone() for t in (x, layer.lam, layer.gam)]
    x.grad = layer.lam.grad = layer.gam.grad = None
    (checkpoint(layer, x, use_reentrant=False) if not checkpointed else layer(x)).backward(dY)
    assert all(torch.equal(g, t.grad) for g, t in zip(grads, (x, layer.lam, layer.gam)))


def test_4bit_base_runs_its_own_forward_when_it_must(monkeypatch):
    """Where bitsandbytes computes differently from dequantize-then-multiply (its CPU inference
    kernel's repacked weight), in another dtype than the input's (its compute_dtype), or the
    instance has a forward of its own (accelerate's hooks), the layer's own forward runs with the
    adapter beside it, even under the build strategy. (0.2 tested ``_dequantizer`` directly; here
    the same cases through the layer's behaviour.)"""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    x = torch.randn(6, 64)
    own = []
    # Plain (float32 compute, float32 input, not repacked): dequantized, its own forward does not run.
    q = bnb_linear("nf4", 64, 64, 5)
    layer = randlora.RandLoraLinear(q, Config(rank=8, alpha=16.0, strategy="build"), name="q4")
    randomize_(layer, 3)
    count_own_calls(monkeypatch, bnb.nn.Linear4bit, own)
    layer(x)
    assert not own
    # The same layer with a bfloat16 input (compute_dtype float32): its own forward.
    y = layer(x.bfloat16())
    assert own and y.dtype == torch.bfloat16
    with torch.no_grad():
        want = q(x.bfloat16()).double() + x.bfloat16().double() @ ref_layer_delta(layer).t()
    assert rel_err(y, want) < 3e-2
    monkeypatch.undo()
    # A weight repacked for bitsandbytes' CPU kernel: its own forward (stood in for here: the real
    # repacked kernel needs an avx512bf16 CPU), never a dequantization by the adapter.
    W = bnbf.dequantize_4bit(q.weight, q.weight.quant_state).detach().clone()
    q.weight.quant_state.packing_format_for_cpu = True
    real, dequantized, ran = bnbf.dequantize_4bit, [], []
    monkeypatch.setattr(bnbf, "dequantize_4bit", lambda *a, **k: dequantized.append(1) or real(*a, **k))
    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", lambda self, x: ran.append(1) or nn.functional.linear(x, W, self.bias))
    y = layer(x)
    assert ran and not dequantized
    with torch.no_grad():
        assert_close(y, x.double() @ (W.double() + ref_layer_delta(layer)).t() + q.bias.double(), 1e-5, what="repacked 4-bit base")
    monkeypatch.undo()
    # compute_dtype bfloat16, float32 input: its own forward (in bf16), the adapter in float32 beside it.
    q = bnb_linear("nf4", 64, 64, 5)
    q.compute_dtype = torch.bfloat16  # computes in bf16 whatever the input: its own forward runs
    layer = randlora.RandLoraLinear(q, Config(rank=8, alpha=16.0, strategy="build"), name="q4")
    randomize_(layer, 3)
    own.clear()
    count_own_calls(monkeypatch, bnb.nn.Linear4bit, own)
    y = layer(x)
    assert own and y.dtype == torch.float32
    with torch.no_grad():
        want = q(x).double() + x.double() @ ref_layer_delta(layer).t()
    assert_close(y, want, 1e-5, what="bf16-compute 4-bit base")
    monkeypatch.undo()
    # A forward set on the instance (accelerate's hooks): opaque, that forward runs.
    q = bnb_linear("nf4", 64, 64, 5)
    own_forward = type(q).forward
    q.forward = lambda x: own.append(2) or own_forward(q, x)  # as accelerate's hooks patch an instance
    layer = randlora.RandLoraLinear(q, Config(rank=8, alpha=16.0, strategy="build"), name="q4")
    assert layer.layout == "opaque"
    randomize_(layer, 4)
    own.clear()
    y = layer(x)
    assert own == [2]
    with torch.no_grad():
        want = own_forward(q, x).double() + x.double() @ ref_layer_delta(layer).t()
    assert_close(y, want, 1e-5, what="4-bit base with an instance forward")


BNB_KINDS = ["int8", "nf4", "fp4"]


def _randomize_bnb(model, seed=0):
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for _, ad in randlora.named_adapters(model):
            ad.lam.copy_(nonzero_uniform(ad.lam.shape, g))
            ad.gam.copy_(nonzero_uniform(ad.gam.shape, g) / ad.d**0.5)


def _bnb(kind, strategy="auto", settled=True):
    model = QNet(kind)
    before = copy.deepcopy(model).requires_grad_(False)  # frozen like the adapted model's base
    assert not before.q1.weight.is_floating_point()  # really quantized
    randlora.inject(model, ["q1", "q2"], 8, alpha=16.0, strategy=strategy)
    _randomize_bnb(model)
    return (settle(model), settle(before)) if settled else (model, before)


def settle(model: nn.Module) -> nn.Module:
    """One eval forward, so that 4-bit layers have repacked their weights where bitsandbytes does (a
    CPU detail: after that, train and eval forwards use the repacked weight) in every copy alike.
    bitsandbytes 0.50.2 then fails any forward whose input requires grad (``result += bias`` on
    a view), so training through a quantized base is checked on unsettled copies."""
    was = model.training
    with torch.no_grad():
        model.eval()(torch.zeros(1, 64))
    return model.train(was)


def _dequantized(layer: nn.Module) -> torch.Tensor | None:
    """A 4-bit layer's W as bitsandbytes dequantizes it (float64), before any repacking; None for 8-bit."""
    import bitsandbytes.functional as bnbf

    qs = getattr(layer.weight, "quant_state", None)
    return None if qs is None else bnbf.dequantize_4bit(layer.weight, qs).double()


@pytest.mark.parametrize("strategy", ["build", "factorized"])
@pytest.mark.parametrize("kind", BNB_KINDS)
def test_bnb_model_forward_is_base_plus_update(kind, strategy, monkeypatch):
    """y = base(x) + s·x ΔW^T in a model of two quantized layers. The 8-bit layer always runs its own
    forward (it quantizes x too); a 4-bit layer under the build strategy is dequantized instead, as
    bitsandbytes does for many tokens: then y = x (W + s·ΔW)^T + b with W its dequantized weight,
    against float64, while the 4-bit layer of the plain model runs bitsandbytes' own kernel."""
    model, before = _bnb(kind, strategy, settled=False)
    W_deq = {name: _dequantized(m) for name, m in before.named_children() if name in ("q1", "q2")}
    dequantizes = kind != "int8" and strategy == "build"
    own_calls = []
    for cls in {type(model.get_submodule(name).base) for name in ("q1", "q2")}:
        count_own_calls(monkeypatch, cls, own_calls)
    g = torch.Generator().manual_seed(4)
    # The whole model trains: gradients reach q1's adapter through q2's quantized base.
    model.train()
    model(torch.randn(4, 64, generator=g)).square().sum().backward()
    for name, ad in randlora.named_adapters(model):
        assert ad.lam.grad is not None and torch.isfinite(ad.lam.grad).all() and ad.lam.grad.abs().sum() > 0, name
    settle(model)
    settle(before)
    for name, ad in randlora.named_adapters(model):
        assert isinstance(ad, randlora.RandLoraLinear)
        x = torch.randn(3, 5, ad.in_features, generator=g)
        A, B = bases64(ad)
        for train, grad in ((True, True), (True, False), (False, True), (False, False)):
            model.train(train)
            before.train(train)
            lam = ad.lam.detach().double().requires_grad_()
            gam = ad.gam.detach().double().requires_grad_()
            with torch.set_grad_enabled(grad):
                own_calls.clear()
                got = ad(x)
                assert bool(own_calls) != dequantizes, f"{kind} {name}: the layer's own forward ran: {bool(own_calls)}"
                delta = ad.scaling * x.double() @ ref_delta(A, B, lam, gam, ad.out_features, ad.in_features).t()
                plain = before.get_submodule(name)(x)
            if dequantizes:
                plain = x.double() @ W_deq[name].t() + before.get_submodule(name).bias.double()
            want = plain.double() + delta
            assert got.dtype == torch.float32
            assert rel_err(want, plain) > 1e-2
            # the base's own output is reproduced exactly; the update to float32 rounding
            assert_close(got.double() - plain.double(), delta, 1e-5, what=f"{kind} {name} train={train} grad={grad}")
            if grad:
                w = torch.randn(got.shape, generator=g, dtype=torch.float64)
                ad.lam.grad = ad.gam.grad = None
                (got * w.float()).sum().backward()
                (delta * w).sum().backward()
                assert_close(ad.lam.grad, lam.grad, 1e-4, what=f"{kind} {name} dlam")
                assert_close(ad.gam.grad, gam.grad, 1e-4, what=f"{kind} {name} dgam")


@pytest.mark.parametrize("kind", BNB_KINDS)
def test_bnb_merge_and_eject_refused(kind, tmp_path):
    model, before = _bnb(kind, settled=False)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    # save_adapter -> load_adapter into a fresh copy: bit-identical outputs (train+grad and eval)
    fresh = copy.deepcopy(before)
    randlora.save_adapter(model, tmp_path / "a.safetensors")
    randlora.load_adapter(fresh, tmp_path / "a.safetensors")
    for n, ad in randlora.named_adapters(model):
        other = fresh.get_submodule(n)
        assert torch.equal(ad.lam, other.lam) and torch.equal(ad.gam, other.gam), n
    for train, grad in ((True, True), (False, False)):
        model.train(train)
        fresh.train(train)
        with torch.set_grad_enabled(grad):
            assert torch.equal(fresh(x), model(x)), f"train={train}"
    for verb in ("merge", "eject"):
        assert_refused(model, getattr(randlora, verb), (TypeError, ValueError), r"q1|q2", outputs=lambda m: m.eval()(x))


# -----------------------------------------------------------------------------
# nn.MultiheadAttention as a target: RandLoraWeight on its input projection, RandLoraLinear out_proj


MHA_CASES = [dict(batch_first=True), dict(batch_first=False), dict(batch_first=True, kdim=12, vdim=10), dict(batch_first=False, kdim=12, vdim=10)]


@pytest.mark.parametrize("case", MHA_CASES, ids=str)
def test_mha_target_matches_reference_every_mode(case, monkeypatch):
    torch.manual_seed(0)
    model = MhaHolder(**case)
    before = copy.deepcopy(model)
    randlora.inject(model, ["attn"], 4, alpha=8.0)
    assert isinstance(model.attn, nn.MultiheadAttention)
    names = dict(randlora.named_adapters(model))
    params = ("in_proj_weight",) if "kdim" not in case else ("q_proj_weight", "k_proj_weight", "v_proj_weight")
    assert set(names) == {f"attn.parametrizations.{p}.0" for p in params} | {"attn.out_proj"}
    assert all(isinstance(names[f"attn.parametrizations.{p}.0"], randlora.RandLoraWeight) for p in params)
    assert all(names[f"attn.parametrizations.{p}.0"].layout == "linear" for p in params)
    for i, ad in enumerate(names.values()):
        randomize_(ad, i)
        assert torch.linalg.matrix_rank(ad.delta_weight(torch.float64)).item() == ad.d  # full rank
    ref = reference_copy(before, model)
    inp = mha_inputs(**case)
    calls = []
    native = torch._native_multi_head_attention
    monkeypatch.setattr(torch, "_native_multi_head_attention", lambda *a, **k: calls.append(1) or native(*a, **k))
    for train, grad in ((True, True), (True, False), (False, True), (False, False)):
        model.train(train)
        ref.train(train)
        with torch.set_grad_enabled(grad):
            calls.clear()
            got = model(*inp)
            # The eval fast path (self-attention, batch_first, no grad) runs, with the adapted weights.
            assert len(calls) == (not train and not grad and case == dict(batch_first=True))
            want = ref(*[t.double() for t in inp])
        assert_close(got, want, 1e-5, what=f"{case} train={train} grad={grad}")
        assert rel_err(want, before.train(train)(*inp)) > 1e-2
    # Gradients of lam/gam against the float64 reference.
    model.train()
    dY = torch.randn(model(*inp).shape, generator=torch.Generator().manual_seed(2))
    (model(*inp) * dY).sum().backward()
    leaves = {}
    ref2 = copy.deepcopy(before).double()
    for name, ad in names.items():
        lam = ad.lam.detach().double().requires_grad_()
        gam = ad.gam.detach().double().requires_grad_()
        leaves[name] = (lam, gam)
        owner, pname = ("attn", name.split(".")[2]) if "parametrizations" in name else ("attn.out_proj", "weight")
        mod = ref2.get_submodule(owner)
        W = getattr(mod, pname).detach() + ref_layer_delta(ad, lam, gam)
        mod._parameters.pop(pname)
        setattr(mod, pname, W)
    (ref2(*[t.double() for t in inp]) * dY.double()).sum().backward()
    for name, ad in names.items():
        assert_close(ad.lam.grad, leaves[name][0].grad, 1e-4, what=f"{name} dlam")
        assert_close(ad.gam.grad, leaves[name][1].grad, 1e-4, what=f"{name} dgam")


def test_mha_gradcheck_float64():
    """Gradients through nn.MultiheadAttention's adapted in-projection and out_proj, float64 adapter
    (set explicitly: .double() keeps lam/gam float32): full gradcheck in x and every lam/gam.
    (test_targeting's test_mha_block_gradcheck does the same on an open_clip-style block.)"""
    torch.manual_seed(0)
    model = MhaHolder(batch_first=False, e=8)
    randlora.inject(model, ["attn"], 4, alpha=8.0)
    model.double()
    ads = [ad for _, ad in randlora.named_adapters(model)]
    assert all(ad.lam.dtype == torch.float32 for ad in ads)
    for i, ad in enumerate(ads):
        randomize_(ad, i)
        ad.lam.data, ad.gam.data = ad.lam.data.double(), ad.gam.data.double()
    x = torch.randn(3, 1, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(model, (x,))
    # ... and with respect to every lam/gam (functional_call swaps in float64 leaves).
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == 2 * len(ads) == 4
    vals = [model.get_parameter(n).detach().double().clone().requires_grad_() for n in names]

    def f(x, *vals):
        return torch.func.functional_call(model, dict(zip(names, vals)), (x,))

    assert torch.autograd.gradcheck(f, (x, *vals))


def test_mha_to_peft_refused(tmp_path):
    # PEFT's RandLoRA has no nn.MultiheadAttention layer: a file it would misread is never written.
    model = MhaHolder()
    randlora.inject(model, ["attn"], 4)
    with pytest.raises(ValueError, match="MultiheadAttention"):
        randlora.to_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


# -----------------------------------------------------------------------------
# The meta device: inject builds shapes; to_empty starts from ΔW = 0


@pytest.mark.parametrize("kind", ["holder", "holder-kv", "llama"])
def test_meta_inject_shape_forward_and_deferred_init(kind):
    builders = {
        "holder": (lambda: MhaHolder(), ["attn", "head"], 3, lambda: (torch.empty(2, 5, 16, device="meta"),), (2, 5, 3)),
        "holder-kv": (lambda: MhaHolder(kdim=12, vdim=10), ["attn", "head"], 3,
                      lambda: (torch.empty(2, 5, 16, device="meta"), torch.empty(2, 4, 12, device="meta"), torch.empty(2, 4, 10, device="meta")), (2, 5, 3)),
        "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 4,
                  lambda: (torch.zeros(2, 7, dtype=torch.long, device="meta"),), (2, 7, 64)),
    }  # fmt: skip
    build, targets, rank, inp, shape = builders[kind]
    with torch.device("meta"):
        torch.manual_seed(0)
        model = build()
    randlora.inject(model, targets, rank)
    ads = [ad for _, ad in randlora.named_adapters(model)]
    assert len(ads) == {"holder": 3, "holder-kv": 5, "llama": 14}[kind]
    assert all(ad.lam.is_meta and ad.gam.is_meta for ad in ads)
    y = model(*inp())
    y = y if isinstance(y, torch.Tensor) else y.logits
    assert y.is_meta and tuple(y.shape) == shape
    # Materialized: the adapters start at ΔW = 0 (not uninitialised memory).
    model.to_empty(device="cpu")
    for ad in ads:
        assert torch.equal(ad.lam, torch.zeros_like(ad.lam))
        assert torch.equal(ad.gam, torch.full_like(ad.gam, 1 / max(ad.n, ad.d)))


def test_assigning_the_weight_of_a_merged_layer_is_refused():
    # Re-tying (tie_weights(), lm_head.weight = wte.weight) sets the base's weight; while merged that
    # tensor would lose ΔW in the forward and get s·ΔW subtracted by the next unmerge: refused, nothing changed.
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8))
    randlora.inject(m, ["0"], rank=4)
    randomize_(m[0], 1)
    emb = nn.Parameter(torch.randn(8, 8))
    before = emb.detach().clone()
    randlora.merge(m)
    merged = m[0].base.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"'0' is merged: unmerge\(model\) before assigning its weight"):
        m[0].weight = emb
    assert m[0].base.weight is not emb and torch.equal(m[0].base.weight, merged) and torch.equal(emb, before)
    randlora.unmerge(m)
    m[0].weight = emb  # unmerged: the base's weight, as tie_weights() wants
    assert m[0].base.weight is emb



@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_input_dtype_unlike_the_weight_raises_as_the_base_does(kind):
    """Without autocast, half input into a float32 layer raises as the base does (it used to compute in half silently);
    under autocast the layer follows autocast's dtype."""
    import transformers

    torch.manual_seed(0)
    base = nn.Linear(8, 6) if kind == "linear" else transformers.pytorch_utils.Conv1D(6, 8)
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError) as plain:
        base(x.half())
    layer = randlora.inject(nn.Sequential(base), ["0"], rank=2)[0]
    randomize_(layer, 3)
    for train, strategy in ((True, "build"), (False, "factorized"), (False, "build")):
        layer.train(train)
        layer.strategy = strategy
        with pytest.raises(RuntimeError) as ours:
            layer(x.half())
        assert type(ours.value) is type(plain.value)
    with torch.autocast("cpu", torch.bfloat16):
        assert layer(x.half()).dtype == torch.bfloat16


# =============================================================================
# The meta device: a model adapted while on meta computes only once it has values (a fifth hostile review)


def test_a_model_adapted_on_meta_refuses_real_inputs_until_materialized_and_loads_with_assign():
    """Built and adapted on meta, given only its base weights (assign=True): lam/gam have no values, so a real input
    is refused, naming the layer (it computed garbage before); on meta, meta inputs run (shape inference). The whole
    state loaded with assign=True then computes exactly what the source model computes."""
    make = lambda: nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 8))  # noqa: E731
    torch.manual_seed(0)
    source = randlora.inject(make(), "all-linear", rank=4)
    for _, layer in randlora.named_adapters(source):
        with torch.no_grad():
            layer.lam.normal_()
            layer.gam.normal_()
    state, x = {k: v.clone() for k, v in source.state_dict().items()}, torch.randn(3, 16)
    with torch.device("meta"):
        model = make()
    randlora.inject(model, "all-linear", rank=4)
    assert model(x.to("meta")).shape == (3, 8)
    model.load_state_dict({k: v for k, v in state.items() if ".base." in k}, strict=False, assign=True)
    with pytest.raises(RuntimeError, match=r"layer '0': lam/gam are on the meta device"):
        model(x)
    model.load_state_dict(state, assign=True)
    assert torch.equal(model(x), source(x))


def test_a_weight_of_another_shape_is_refused_naming_the_layer():
    """tie_weights() assigns lm_head.weight through the adapter; a weight of another shape (a resized vocabulary)
    would leave the adapter's update the wrong size: refused before anything changes."""
    torch.manual_seed(0)
    model = randlora.inject(nn.Sequential(nn.Linear(32, 50)), ["0"], rank=4)
    before = model[0].base.weight
    with pytest.raises(ValueError, match=r"layer '0' is adapted for a weight of shape \(50, 32\), got \(60, 32\)"):
        model[0].weight = nn.Parameter(torch.randn(60, 32))
    assert model[0].base.weight is before
    model[0].weight = same = nn.Parameter(torch.randn(50, 32))
    assert model[0].base.weight is same


def test_a_merged_state_dict_loads_with_assign_into_a_model_built_on_meta_and_unmerges():
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(16, 24))  # noqa: E731
    source = randlora.inject(make(), ["0"], rank=4)
    with torch.no_grad():
        source[0].lam.normal_()
    x, plain = torch.randn(3, 16), source[0].base.weight.detach().clone()
    randlora.merge(source)
    with torch.device("meta"):
        model = make()
    randlora.inject(model, ["0"], rank=4)
    model.load_state_dict({k: v.clone() for k, v in source.state_dict().items()}, assign=True)
    with torch.no_grad():
        assert model[0].merged and torch.equal(model(x), source(x))
    randlora.unmerge(model)
    randlora.unmerge(source)  # the same subtraction from the same merged weight: bit for bit
    assert torch.equal(model[0].base.weight, source[0].base.weight)
    assert_close(model[0].base.weight, plain, 0, atol=1e-6 * model[0].delta_weight().abs().max().item())


def test_a_weight_resized_through_data_is_refused_naming_the_layer_when_read():
    """resize_token_embeddings swaps a tied weight's .data (no assignment to intercept): a parent reading .weight
    then gets a refusal naming the layer, not a bare shape error from the update."""
    torch.manual_seed(0)
    model = randlora.inject(nn.Sequential(nn.Linear(32, 64)), ["0"], rank=4)
    model[0].base.weight.data = torch.randn(70, 32)
    with pytest.raises(ValueError, match=r"layer '0': its weight is now \(70, 32\), but it was adapted as \(64, 32\)"):
        model[0].weight


def test_4bit_subclass_whose_nearest_linear4bit_has_its_own_forward_runs_its_own_forward():
    """The 4-bit layout (the adapter dequantizes the weight itself) is taken only where the module uses the forward
    of the nearest class named Linear4bit: a subclass from another bitsandbytes module that replaces it runs its own
    forward, even if a class further down restores bitsandbytes' original."""
    import sys
    import types

    import bitsandbytes as bnb

    sys.modules.setdefault("bitsandbytes_ext", types.ModuleType("bitsandbytes_ext"))
    ext = type("Linear4bit", (bnb.nn.Linear4bit,), {"forward": lambda self, x: bnb.nn.Linear4bit.forward(self, x),
                                                    "__module__": "bitsandbytes_ext"})
    mixed = type("Mixed", (ext,), {"forward": bnb.nn.Linear4bit.forward})
    q = mixed(16, 8, quant_type="nf4", compute_dtype=torch.float32).to("cpu")  # quantizes
    assert randlora._classify(q) == ("opaque", "base")
    assert randlora._classify(bnb_linear("nf4", 16, 8, 0)) == ("4bit", "base")
