"""The layer: forward and gradients against the float64 reference, dtypes, dropout, input checks,
linear-like and Conv1D bases; bases of every kind (bitsandbytes 8/4-bit, parametrized, own
forward), parents that read a weight (T5's feed-forward, nn.MultiheadAttention as a target and
its out_proj, nn.TransformerEncoderLayer), casts and the meta device (issue 9)."""

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
    bnb_linear,
    layer_bases64,
    randomize_,
    record_saved,
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
        assert v.dtype == torch.float32, k  # float64 too: .double() / .to(float64) keep the adapter float32
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


# -----------------------------------------------------------------------------
# 9. Bases of every kind (issue 9): decided by the weight, not the class


def test_weight_property_is_the_adapted_weight():
    """``.weight`` is W + s·ΔW in the base's layout (differentiable in lam/gam), the base weight
    while merged or disabled; ``.bias`` is the base's."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(nf=10, nx=14)
    nn.init.normal_(conv.weight, std=0.2)
    for layer in (make_layer(12, 20, 3), make_layer(20, 12, 3), randlora.RandLoraLinear(conv, randlora.RandLoraConfig(rank=3, alpha=6.0))):
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


def test_weight_property_keeps_base_dtype_under_autocast():
    # T5 compares hidden_states.dtype with wo.weight.dtype: the adapted weight must not be autocast.
    layer = make_layer(16, 12, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        W = layer.weight
    assert W.dtype == torch.float32
    assert_close(W, base_weight64(layer) + ref_layer_delta(layer), 1e-6)


class OwnForward(nn.Linear):
    """An nn.Linear subclass with a forward of its own: its weight is not what it computes with."""

    def forward(self, x):
        return super().forward(x) * 2


class SubclassParam(nn.Parameter):
    pass


def test_layout_by_weight_not_class():
    lin = nn.Linear(8, 6)
    wn = nn.utils.parametrizations.weight_norm(nn.Linear(8, 6))
    assert randlora._layout(lin) == "linear"
    assert randlora._layout(OwnForward(8, 6)) == "opaque"
    assert randlora._layout(wn) == "opaque"
    # A parametrized nn.Linear still computes F.linear(x, weight, bias): its .weight is W' exactly.
    layer = randlora.RandLoraLinear(wn, randlora.RandLoraConfig(rank=2, alpha=4.0), name="wn")
    randomize_(layer, 2)
    x = torch.randn(5, 8)
    W64 = wn.weight.detach().double() + ref_layer_delta(layer)
    assert_close(layer.weight, W64, 1e-6, what="weight_norm .weight")
    assert_close(layer(x), x.double() @ W64.t() + wn.bias.detach().double(), 1e-5, what="weight_norm forward")
    own = randlora.RandLoraLinear(OwnForward(8, 6), randlora.RandLoraConfig(rank=2), name="own")
    with pytest.raises(AttributeError):
        own.weight
    # A float tensor subclass (torchao-style) may pack values and could be computed with: opaque,
    # and no .weight (showing the base's would let a reader skip the adapter).
    sub = nn.Linear(8, 6)
    sub.weight = SubclassParam(sub.weight.detach())
    assert randlora._layout(sub) == "opaque"
    with pytest.raises(AttributeError):
        randlora.RandLoraLinear(sub, randlora.RandLoraConfig(rank=2), name="sub").weight


def _t5_ff(wo: nn.Module):
    import transformers
    from transformers.models.t5.modeling_t5 import T5DenseActDense

    torch.manual_seed(0)
    ff = T5DenseActDense(transformers.T5Config(d_model=64, d_ff=128, dropout_rate=0.0))
    ff.wo = wo
    return nn.Sequential(ff)


def test_t5_feed_forward_reads_wo_weight_dtype():
    """T5's feed-forward reads ``wo.weight.dtype`` (and casts to it): adapted, it sees the base's dtype
    and computes base + s·ΔW; with an 8-bit wo it sees int8 as the base model does."""
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
    import bitsandbytes as bnb  # a test dependency: missing, it fails (no skip)
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=False)
    q = bnb.nn.Linear8bitLt(128, 64, bias=False, has_fp16_weights=False, threshold=0.0)
    q.load_state_dict(lin.state_dict())
    model = _t5_ff(q.to("cpu"))
    import copy

    plain = copy.deepcopy(model)
    randlora.inject(model, ["wo"], 4, alpha=8.0)
    randomize_(model[0].wo, 3)
    assert model[0].wo.weight is q.weight and model[0].wo.weight.dtype == torch.int8  # what the base shows
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        h = torch.relu(plain[0].wi(x))
        want = plain(x).double() + h.double() @ ref_layer_delta(model[0].wo).t()
        assert_close(model(x), want, 1e-5, what="t5 ff, 8-bit wo")


def _bnb_layer(kind: str, in_f: int, out_f: int):
    q = bnb_linear(kind, in_f, out_f, 3)
    with torch.no_grad():
        q.eval()(torch.zeros(1, in_f))  # the CPU 4-bit kernel repacks the weight on its first eval call
    return q


@pytest.mark.parametrize("path", ["build", "factorized"])
@pytest.mark.parametrize("kind", ["int8", "nf4", "fp4"])
def test_bitsandbytes_base_runs_its_own_forward(kind, path):
    """A quantized base (a subclass of nn.Linear whose weight is packed) runs its own forward with the
    adapter beside it: y == base(x) + s·x ΔW^T exactly up to float32 rounding of the update; its
    .weight is the packed weight as it is; merge is refused naming the layer, weight untouched."""
    q = _bnb_layer(kind, 64, 128)
    assert isinstance(q, nn.Linear) and randlora._layout(q) == ("opaque" if kind == "int8" else "4bit")
    layer = randlora.RandLoraLinear(q, randlora.RandLoraConfig(rank=8, alpha=16.0, strategy=path), name="q1")
    randomize_(layer, 1)
    assert layer.weight is q.weight
    x = torch.randn(3, 5, 64)
    dY = torch.randn(3, 5, 128)
    A, B = layer_bases64(layer)
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
    layer = randlora.RandLoraLinear(q, randlora.RandLoraConfig(rank=8, alpha=16.0, strategy="build"), name="q4")
    assert layer.layout == "4bit" and not layer.mergeable
    randomize_(layer, 2)
    packed = q.weight.detach().clone()
    W64 = bnbf.dequantize_4bit(q.weight, q.weight.quant_state).double()
    real, calls = bnbf.dequantize_4bit, []
    monkeypatch.setattr(bnbf, "dequantize_4bit", lambda *a, **k: calls.append(1) or real(*a, **k))
    q.register_forward_hook(lambda *a: pytest.fail("the 4-bit layer's own forward ran"))
    x = torch.randn(3, 5, in_f, requires_grad=True)
    dY = torch.randn(3, 5, out_f)
    A, B = layer_bases64(layer)
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


def test_4bit_base_runs_its_own_forward_when_it_must():
    """Where bitsandbytes computes differently from dequantize-then-multiply (its CPU inference
    kernel's repacked weight), in another dtype than the input's (its compute_dtype), or the
    instance has a forward of its own (accelerate's hooks), the layer's own forward runs with the
    adapter beside it."""
    q = bnb_linear("nf4", 64, 64, 5)
    assert randlora._dequantizer(q, torch.float32) is not None
    assert randlora._dequantizer(q, torch.bfloat16) is None  # compute_dtype float32
    q.weight.quant_state.packing_format_for_cpu = True
    assert randlora._dequantizer(q, torch.float32) is None
    q = bnb_linear("nf4", 64, 64, 5)
    q.compute_dtype = torch.bfloat16  # computes in bf16 whatever the input: its own forward runs
    layer = randlora.RandLoraLinear(q, randlora.RandLoraConfig(rank=8, alpha=16.0, strategy="build"), name="q4")
    randomize_(layer, 3)
    own = []
    q.register_forward_hook(lambda *a: own.append(1))
    x = torch.randn(6, 64)
    y = layer(x)
    assert own and y.dtype == torch.float32
    with torch.no_grad():
        want = q(x).double() + x.double() @ ref_layer_delta(layer).t()
    assert_close(y, want, 1e-5, what="bf16-compute 4-bit base")
    q = bnb_linear("nf4", 64, 64, 5)
    own_forward = type(q).forward
    q.forward = lambda x: own.append(2) or own_forward(q, x)  # as accelerate's hooks patch an instance
    layer = randlora.RandLoraLinear(q, randlora.RandLoraConfig(rank=8, alpha=16.0, strategy="build"), name="q4")
    assert layer.layout == "opaque"
    randomize_(layer, 4)
    own.clear()
    y = layer(x)
    assert own == [2]
    with torch.no_grad():
        want = own_forward(q, x).double() + x.double() @ ref_layer_delta(layer).t()
    assert_close(y, want, 1e-5, what="4-bit base with an instance forward")


# -----------------------------------------------------------------------------
# 10. Parents that read a weight; nn.MultiheadAttention


class Holder(nn.Module):
    """One nn.MultiheadAttention (self-attention unless k/v are given) and a head."""

    def __init__(self, batch_first=True, kdim=None, vdim=None, e=16, heads=2):
        super().__init__()
        self.attn = nn.MultiheadAttention(e, heads, batch_first=batch_first, kdim=kdim, vdim=vdim)
        self.head = nn.Linear(e, 3)

    def forward(self, x, k=None, v=None):
        k = x if k is None else k
        v = x if v is None else v
        return self.head(self.attn(x, k, v, need_weights=False)[0])


def mha_reference(before: nn.Module, model: nn.Module) -> nn.Module:
    """float64 copy of ``before`` with s·ΔW (conftest's independent reference) added to every weight
    an adapter of ``model`` adapts."""
    import copy

    ref = copy.deepcopy(before).double()
    for name, ad in randlora.named_adapters(model):
        parts = name.split(".")
        if "parametrizations" in parts:
            i = parts.index("parametrizations")
            owner, pname = ".".join(parts[:i]), parts[i + 1]
        else:
            owner, pname = name, "weight"
        mod = ref.get_submodule(owner)
        with torch.no_grad():
            getattr(mod, pname).add_(ref_layer_delta(ad))
    return ref


def mha_inputs(batch_first, kdim=None, vdim=None, e=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(9)
    shape = lambda s, f: (2, s, f) if batch_first else (s, 2, f)  # noqa: E731
    x = torch.randn(*shape(5, e), generator=g, dtype=dtype)
    if kdim is None:
        return (x,)
    return x, torch.randn(*shape(4, kdim), generator=g, dtype=dtype), torch.randn(*shape(4, vdim), generator=g, dtype=dtype)


MHA_CASES = [dict(batch_first=True), dict(batch_first=False), dict(batch_first=True, kdim=12, vdim=10), dict(batch_first=False, kdim=12, vdim=10)]


@pytest.mark.parametrize("case", MHA_CASES, ids=str)
def test_mha_target_matches_reference_every_mode(case, monkeypatch):
    import copy

    torch.manual_seed(0)
    model = Holder(**case)
    before = copy.deepcopy(model)
    randlora.inject(model, ["attn"], 4, alpha=8.0)
    assert isinstance(model.attn, nn.MultiheadAttention)
    names = dict(randlora.named_adapters(model))
    params = ("in_proj_weight",) if "kdim" not in case else ("q_proj_weight", "k_proj_weight", "v_proj_weight")
    assert set(names) == {f"attn.parametrizations.{p}.0" for p in params} | {"attn.out_proj"}
    assert all(isinstance(names[f"attn.parametrizations.{p}.0"], randlora.RandLoraWeight) for p in params)
    for i, ad in enumerate(names.values()):
        randomize_(ad, i)
        assert torch.linalg.matrix_rank(ad.delta_weight(torch.float64)).item() == ad.d  # full rank
    ref = mha_reference(before, model)
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


@pytest.mark.parametrize("case", MHA_CASES[:1] + MHA_CASES[2:3], ids=str)
def test_mha_merge_unmerge_disable_eject(case):
    import copy

    torch.manual_seed(0)
    model = Holder(**case).eval()
    before = copy.deepcopy(model)
    keys = list(model.state_dict())
    randlora.inject(model, ["attn"], 4, alpha=8.0)
    assert all(not m.training for m in model.modules())  # new modules take the model's mode
    for i, (_, ad) in enumerate(randlora.named_adapters(model)):
        randomize_(ad, i)
    ref = mha_reference(before, model)
    inp = mha_inputs(**case)
    with torch.no_grad():
        want = ref(*[t.double() for t in inp])
        with randlora.disable(model):
            assert torch.equal(model(*inp), before.requires_grad_(False)(*inp))
        randlora.merge(model)
        assert_close(model(*inp), want, 1e-5, what="merged")
        randlora.unmerge(model)
        assert_close(model(*inp), want, 1e-5, what="unmerged")
        with randlora.disable(model):  # unmerge rounds the weights once more: close, not equal
            assert_close(model(*inp), before(*inp), 1e-6, what="disabled after unmerge")
        randlora.merge(model)
        randlora.eject(model)
    assert type(model.attn) is nn.MultiheadAttention and type(model.attn.out_proj) is type(before.attn.out_proj)
    assert list(model.state_dict()) == keys and not list(randlora.named_adapters(model))
    assert all(type(p) is nn.Parameter for p in model.parameters())
    for k, v in ref.state_dict().items():
        assert_close(model.state_dict()[k], v, 1e-6, what=f"ejected {k}")


def test_mha_gradcheck_float64():
    """Gradients through nn.MultiheadAttention's adapted in-projection and out_proj, float64 adapter
    (set explicitly: .double() keeps lam/gam float32)."""
    torch.manual_seed(0)
    model = Holder(batch_first=False, e=8)
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


def test_mha_refusals_name_the_module_and_reason():
    torch.manual_seed(0)
    from conftest import snapshot, assert_unchanged

    model = Holder()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"'attn'.*dropout"):
        randlora.inject(model, ["attn"], 4, dropout=0.1)
    with pytest.raises(ValueError, match=r"'attn.out_proj'.*out_proj.*dropout"):
        randlora.inject(model, ["out_proj"], 4, dropout=0.1)
    with pytest.raises(ValueError, match=r"rank 17 .*attn.in_proj_weight|rank 17 .*attn"):
        randlora.inject(model, ["attn"], 17)
    assert_unchanged(model, snap)
    # A linear with a forward of its own as out_proj: MHA would compute with its weight, skipping it.
    model.attn.out_proj = OwnForward(16, 16)
    with pytest.raises(ValueError, match=r"'attn.out_proj'.*MultiheadAttention reads out_proj.weight"):
        randlora.inject(model, ["attn.out_proj"], 4)
    with pytest.raises(ValueError, match=r"'attn'.*out_proj"):
        randlora.inject(model, ["attn"], 4)
    # out_proj alone (plain, no dropout) is fine: MHA reads its adapted .weight.
    model = Holder()
    randlora.inject(model, ["out_proj"], 3)
    randlora.inject(model, ["head"], 3)
    with pytest.raises(ValueError, match="already adapted"):
        randlora.inject(model, ["attn"], 3)


def test_transformer_encoder_layer_opaque_linear_refused():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 1, enable_nested_tensor=False)
    enc.layers[0].linear1 = OwnForward(16, 32)
    with pytest.raises(ValueError, match=r"'layers.0.linear1'.*TransformerEncoderLayer reads linear1.weight"):
        randlora.inject(enc, ["linear1"], 4)


# -----------------------------------------------------------------------------
# 11. dtypes and devices of the adapter itself


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double", "to_f64"])
def test_casts_keep_lam_gam_and_grads_float32(cast):
    layer = make_layer(12, 8, 3)
    layer(torch.randn(4, 12)).sum().backward()
    values = [(p.detach().clone(), p.grad.clone()) for p in (layer.lam, layer.gam)]
    {"half": layer.half, "bfloat16": layer.bfloat16, "double": layer.double, "to_f64": lambda: layer.to(torch.float64)}[cast]()
    for p, (v, g) in zip((layer.lam, layer.gam), values):
        assert p.dtype == p.grad.dtype == torch.float32
        assert torch.equal(p, v) and torch.equal(p.grad, g)


def test_meta_inject_shape_forward_and_deferred_init():
    with torch.device("meta"):
        model = Holder()
    randlora.inject(model, ["attn", "head"], 3)
    ads = [ad for _, ad in randlora.named_adapters(model)]
    assert len(ads) == 3 and all(ad.lam.is_meta for ad in ads)
    y = model(torch.empty(2, 5, 16, device="meta"))
    assert y.is_meta and y.shape == (2, 5, 3)
    # Materialized: the adapters start at ΔW = 0 (not uninitialised memory).
    model.to_empty(device="cpu")
    for ad in ads:
        assert torch.equal(ad.lam, torch.zeros_like(ad.lam))
        assert torch.equal(ad.gam, torch.full_like(ad.gam, 1 / max(ad.n, ad.d)))


def test_hold_weights_builds_mha_weights_once(monkeypatch):
    """Under hold_weights, nn.MultiheadAttention's repeated reads of its adapted weights build each
    W' once until lam/gam change: same outputs and gradients, bit for bit."""
    torch.manual_seed(0)
    model = Holder()
    randlora.inject(model, ["attn"], 4, alpha=8.0)
    ads = [ad for _, ad in randlora.named_adapters(model)]
    for i, ad in enumerate(ads):
        randomize_(ad, i)
    x = torch.randn(2, 5, 16)

    def step():
        for ad in ads:
            ad.lam.grad = ad.gam.grad = None
        y = model(x)
        y.square().sum().backward()
        return y.detach(), [p.grad.clone() for ad in ads for p in (ad.lam, ad.gam)]

    builds = []
    real = randlora._adapted_weight
    monkeypatch.setattr(randlora, "_adapted_weight", lambda *a, **k: builds.append(1) or real(*a, **k))
    y0, g0 = step()
    assert len(builds) >= 4  # unheld: MHA reads in_proj_weight three times in training
    with randlora.hold_weights(model):
        builds.clear()
        y1, g1 = step()
        assert len(builds) == 2 and torch.equal(y1, y0) and all(torch.equal(a, b) for a, b in zip(g1, g0))
        step()
        assert len(builds) == 2  # nothing changed: nothing built
        with torch.no_grad():
            ads[0].lam.mul_(2)  # an optimizer step
        y2, _ = step()
        assert len(builds) == 3 and not torch.equal(y2, y0)


@pytest.mark.parametrize("kind", ["parametrize", "hook"])
def test_weight_norm_target_refused_at_inject(kind):
    """A weight computed by a parametrization or a forward hook (weight_norm): the layer would
    compute right, but merge could not write W + s·ΔW through it, so inject refuses, naming it."""
    import warnings

    from conftest import assert_unchanged, snapshot

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(8, 6))
    if kind == "parametrize":
        nn.utils.parametrizations.weight_norm(model.fc)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nn.utils.weight_norm(model.fc)
    assert randlora._layout(model.fc) == "opaque"
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"'fc'.*weight_norm"):
        randlora.inject(model, ["fc"], 2)
    assert_unchanged(model, snap)


def test_mha_state_dict_carries_merge_state():
    """model.state_dict() of a merged/unmerged MHA adapter loads into a model in the other state
    with the right outputs (the in-projection's stored weight sits beside its RandLoraWeight)."""
    import copy

    torch.manual_seed(0)
    model = Holder(kdim=12, vdim=10).eval()
    randlora.inject(model, ["attn"], 4, alpha=8.0)
    for i, (_, ad) in enumerate(randlora.named_adapters(model)):
        randomize_(ad, i)
    inp = mha_inputs(True, 12, 10)
    with torch.no_grad():
        want = model(*inp)
    unmerged_sd = copy.deepcopy(model.state_dict())
    merged = randlora.merge(copy.deepcopy(model))
    merged_sd = copy.deepcopy(merged.state_dict())
    merged.load_state_dict(unmerged_sd)
    assert not any(ad.merged for _, ad in randlora.named_adapters(merged))
    unmerged = copy.deepcopy(model)
    unmerged.load_state_dict(merged_sd)
    assert all(ad.merged for _, ad in randlora.named_adapters(unmerged))
    with torch.no_grad():
        assert_close(merged(*inp), want, 1e-6, what="unmerged state into a merged model")
        assert_close(unmerged(*inp), want, 1e-6, what="merged state into an unmerged model")


def test_mha_to_peft_refused(tmp_path):
    # PEFT's RandLoRA has no nn.MultiheadAttention layer: a file it would misread is never written.
    model = Holder()
    randlora.inject(model, ["attn"], 4)
    with pytest.raises(ValueError, match="MultiheadAttention"):
        randlora.to_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
