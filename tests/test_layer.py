"""The layer: forward and gradients against the float64 reference, dtypes, dropout, input checks,
linear-like and Conv1D bases."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import randlora
from conftest import (
    Int8Linear,
    assert_close,
    base_weight64,
    layer_bases64,
    randomize_,
    ref_delta,
    ref_layer_delta,
    rel_err,
)


def make_layer(in_f, out_f, rank, *, bias=True, seed=0, kind="dense", alpha=None, strategy="auto", dropout=0.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_f, in_f, generator=g) / in_f**0.5)
        if bias:
            base.bias.copy_(torch.randn(out_f, generator=g))
    base.to(dtype)
    alpha = float(rank) * 1.5 if alpha is None else alpha
    layer = randlora.RandLoraLinear(base, randlora.RandLoraConfig(rank=rank, seed=seed, bases=kind, alpha=alpha, dropout=dropout, strategy=strategy), name="layer")
    randomize_(layer, seed + 1)
    return layer


def reference(layer, x, dY):
    """float64 forward and (x, lam, gam) gradients, built from the §1 formulas."""
    A, B = layer_bases64(layer)
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
# 3. Forward and gradients against the float64 reference


@settings(max_examples=25)
@given(
    in_f=st.integers(1, 33),
    out_f=st.integers(1, 33),
    lead=st.sampled_from([(), (1,), (5,), (2, 3), (3, 1, 2)]),
    bias=st.booleans(),
    path=st.sampled_from(["build", "factorized", "auto"]),
    data=st.data(),
)
def test_layer_matches_reference(in_f, out_f, lead, bias, path, data):
    d = min(in_f, out_f)
    rank = data.draw(st.integers(1, d))
    seed = data.draw(st.integers(0, 10_000))
    layer = make_layer(in_f, out_f, rank, bias=bias, seed=seed, strategy=path)
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
    for name, a, e in zip(("y", "dx", "dlam", "dgam"), got, ref):
        assert_close(a, e, 2e-5, atol=2e-5 * scale.get(name, 0.0), what=name)


@pytest.mark.parametrize("path", ["build", "factorized", "auto"])
@pytest.mark.parametrize("shape", [(40, 24, 5), (24, 40, 5), (24, 24, 7), (37, 19, 4), (19, 37, 6)], ids=str)
def test_layer_orientations_float64(shape, path):
    """All orientations, ranks that do not divide min(in, out), in float64: tight tolerance."""
    in_f, out_f, rank = shape
    layer = make_layer(in_f, out_f, rank, strategy=path).double()
    assert layer.lam.dtype == torch.float64
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
    for path in ("build", "factorized", "auto"):
        layer.strategy = path
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
    for path in ("build", "factorized"):
        layer.strategy = path
        for name, a, e in zip(("y", "dx", "dlam", "dgam"), run(layer, x, dY), reference(layer, x, dY)):
            assert_close(a, e, 2e-5, what=name)


def test_base_weight_trainable_gets_full_gradient():
    layer = make_layer(8, 6, 3)
    layer.base.weight.requires_grad_(True)
    layer.base.bias.requires_grad_(True)
    x, dY = torch.randn(5, 8), torch.randn(5, 6)
    for path in ("build", "factorized"):
        layer.strategy = path
        layer.base.weight.grad = layer.base.bias.grad = None
        layer(x).backward(dY)
        assert_close(layer.base.weight.grad, dY.t() @ x, 1e-5, what="dW")
        assert_close(layer.base.bias.grad, dY.sum(0), 1e-5, what="db")


def test_wrong_input_features_raises_naming_layer():
    layer = make_layer(8, 6, 3)
    with pytest.raises(ValueError, match=r"'layer'.*8"):
        layer(torch.randn(2, 7))
    with pytest.raises(ValueError, match="in_features=8"):
        layer(torch.randn(8, 2))


# -----------------------------------------------------------------------------
# 6. dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dtypes_params_stay_float32_and_output_dtype(dtype):
    layer = make_layer(16, 12, 3, dtype=dtype)
    lam0, gam0 = layer.lam.detach().clone(), layer.gam.detach().clone()
    assert layer.lam.dtype == layer.gam.dtype == torch.float32
    x = torch.randn(2, 3, 16).to(dtype)
    for path in ("build", "factorized"):
        layer.strategy = path
        y = layer(x)
        assert y.dtype == dtype
        assert torch.isfinite(y).all()
        y.float().sum().backward()
        assert layer.lam.grad.dtype == layer.gam.grad.dtype == torch.float32
        layer.lam.grad = layer.gam.grad = None
    assert torch.equal(layer.lam, lam0) and torch.equal(layer.gam, gam0)


@pytest.mark.parametrize("cast", ["bfloat16", "half", "to_bf16", "to_f64"])
def test_model_cast_keeps_adapter_float32_and_values(cast):
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 6))
    randlora.inject(model, ["0", "2"], rank=2)
    for _, m in randlora.named_adapters(model):
        randomize_(m, 3)
    before = {k: v.clone() for k, v in randlora.adapter_state_dict(model).items()}
    if cast == "bfloat16":
        model.bfloat16()
        expect_base = torch.bfloat16
    elif cast == "half":
        model.half()
        expect_base = torch.float16
    elif cast == "to_bf16":
        model.to(torch.bfloat16)
        expect_base = torch.bfloat16
    else:
        model.to(torch.float64)
        expect_base = torch.float64
    assert model[0].base.weight.dtype == expect_base
    after = randlora.adapter_state_dict(model)
    for k, v in after.items():
        want = torch.float64 if cast == "to_f64" else torch.float32
        assert v.dtype == want, k
        # A round trip through the half type would round the values: they must be untouched.
        assert torch.equal(v.to(torch.float32), before[k]), f"{k} values changed by the cast"
    assert all(p.requires_grad for n, p in model.named_parameters() if n.endswith((".lam", ".gam")))


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
    for path in ("build", "factorized"):
        layer32.strategy = layer_lp.strategy = path
        ref = run(layer32, x, dY)
        got = run(layer_lp, x.to(dtype), dY.to(dtype))
        assert got[0].dtype == dtype and got[1].dtype == dtype
        assert got[2].dtype == torch.float32 and got[3].dtype == torch.float32
        for name, a, e in zip(("y", "dx", "dlam", "dgam"), got, ref):
            err = rel_err(a, e)
            assert err < tol, f"{path} {name}: relative error {err:.3g}"


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


# -----------------------------------------------------------------------------
# 7. Dropout


@pytest.mark.parametrize("path", ["build", "factorized"])
def test_dropout(path):
    p = 0.3
    layer = make_layer(12, 10, 3, dropout=p, strategy=path)
    plain = make_layer(12, 10, 3, dropout=0.0, strategy=path)
    with torch.no_grad():
        plain.lam.copy_(layer.lam)
        plain.gam.copy_(layer.gam)
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


@pytest.mark.parametrize("path", ["build", "factorized", "auto"])
@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_linear_like_module(path, shape):
    in_f, out_f = shape
    base = Int8Linear(in_f, out_f, seed=3)
    layer = randlora.RandLoraLinear(base, randlora.RandLoraConfig(rank=3, seed=0, alpha=4.5, strategy=path), name="q")
    assert layer.layout == "opaque" and not layer.mergeable
    randomize_(layer, 4)
    x = torch.randn(2, 5, in_f)
    dY = torch.randn(2, 5, out_f)
    x_ = x.clone().requires_grad_()
    y = layer(x_)
    y.backward(dY)
    A, B = layer_bases64(layer)
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


def test_conv1d_layer_matches_reference_and_merges():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(nf=10, nx=14)  # in 14, out 10, weight stored (in, out)
    nn.init.normal_(conv.weight, std=0.2)
    nn.init.normal_(conv.bias)
    layer = randlora.RandLoraLinear(conv, randlora.RandLoraConfig(rank=4, seed=2, alpha=8.0), name="c_attn")
    assert layer.layout == "conv1d" and (layer.in_features, layer.out_features) == (14, 10)
    randomize_(layer, 1)
    x, dY = torch.randn(3, 14), torch.randn(3, 10)
    for path in ("build", "factorized"):
        layer.strategy = path
        for name, a, e in zip(("y", "dx", "dlam", "dgam"), run(layer, x, dY), reference(layer, x, dY)):
            assert_close(a, e, 2e-5, what=f"{path} {name}")
    w0 = conv.weight.detach().clone()
    y0 = layer(x).detach()
    layer.merge()
    assert_close(conv.weight.t(), base_weight64(layer), 0)  # sanity: views agree
    assert_close(layer.eval()(x), y0, 1e-5)
    layer.unmerge()
    assert_close(conv.weight, w0, 1e-6)
