"""Model-level verbs: inject, merge/unmerge/eject/disable, summary, bad input, a transformers model."""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import randlora
from conftest import (
    Int8Linear,
    TinyNet,
    assert_close,
    assert_unchanged,
    base_weight64,
    fresh_tiny,
    randomize_model_,
    tiny_llama,
    ref_layer_delta,
    snapshot,
)

ALL = ["embed", "block.0", "block.2", "head"]


def adapted_names(model):
    return [n for n, _ in randlora.named_adapters(model)]


# -----------------------------------------------------------------------------
# 11. inject semantics


@pytest.mark.parametrize(
    "targets,expected",
    [
        (["head"], ["head"]),
        (["0", "2"], ["block.0", "block.2"]),  # suffix ".entry"
        (["block.0", "head", "head"], ["block.0", "head"]),  # duplicates once
        (r"block\.[02]", ["block.0", "block.2"]),  # regex, full match
        (r"embed|head", ["embed", "head"]),
        (lambda n, m: isinstance(m, nn.Linear) and m.out_features == 8, ["embed", "block.2"]),
        (lambda n, m: isinstance(m, nn.Linear), ALL),
    ],
)
def test_targets(targets, expected):
    model = fresh_tiny()
    randlora.inject(model, targets, rank=2)
    assert sorted(adapted_names(model)) == sorted(expected)
    for name, m in randlora.named_adapters(model):
        assert m.name == name
        assert isinstance(m.base, nn.Linear)


def test_regex_is_full_match_not_search():
    model = fresh_tiny()
    snap = snapshot(model)
    for pattern in ("lock.0", "bloc", "head.", r"ead", "mbed"):  # re.search would find these
        with pytest.raises(ValueError, match="matched no module"):
            randlora.inject(model, pattern, rank=2)
    assert_unchanged(model, snap)
    randlora.inject(model, "head", rank=2)
    assert adapted_names(model) == ["head"]


def test_inject_freezes_everything_else_and_initialises_like_peft():
    model = fresh_tiny()
    x = torch.randn(3, 6)
    y0 = model(x).detach()
    randlora.inject(model, ["block.0", "head"], rank=3)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["block.0.gam", "block.0.lam", "head.gam", "head.lam"]
    for _, m in randlora.named_adapters(model):
        assert m.scaling == 20.0 and m.alpha == 60.0  # alpha=None -> 20 * rank
        assert torch.equal(m.lam, torch.zeros(m.rank, m.n))
        assert m.n == math.ceil(m.d / m.rank)
        assert torch.equal(m.gam, torch.full((m.n, m.d), 1 / max(m.n, m.d)))
        assert m.lam.dtype == m.gam.dtype == torch.float32
    # lam = 0: the adapted model computes exactly the base model, on every path.
    for path in ("build", "factorized", "auto"):
        for _, m in randlora.named_adapters(model):
            m.strategy = path
        assert torch.equal(model(x), y0), path
    # A frozen model's parameters stay frozen even if they were trainable before inject.
    model2 = fresh_tiny()
    model2.norm.weight.requires_grad_(True)
    randlora.inject(model2, ["head"], rank=2, alpha=5)
    assert not model2.norm.weight.requires_grad
    assert model2.head.scaling == 2.5


def test_adapter_state_dict_and_mark_only():
    model = fresh_tiny()
    randlora.inject(model, ["block.0", "head"], rank=2)
    sd = randlora.adapter_state_dict(model)
    assert list(sd) == ["block.0.lam", "block.0.gam", "head.lam", "head.gam"]
    assert sd["head.lam"].shape == (2, 3) and sd["head.gam"].shape == (3, 5)
    for p in model.parameters():
        p.requires_grad_(True)
    randlora.mark_only_adapter_as_trainable(model)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(sd)


def test_summary_exact_counts():
    model = fresh_tiny()
    randlora.inject(model, ["embed", "block.0", "head"], rank=3, seed=7)
    text = randlora.summary(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for name, m in randlora.named_adapters(model):
        line = next(l for l in text.splitlines() if l.split() and l.split()[0] == name)
        cells = line.split()
        assert f"{m.out_features}x{m.in_features}" in cells
        assert str(m.n) in cells
        assert cells[-1].replace(",", "") == str(m.lam.numel() + m.gam.numel())
        assert m.lam.numel() + m.gam.numel() == m.rank * m.n + m.n * m.d
    nums = re.search(r"trainable parameters: ([\d,]+) of ([\d,]+)", text)
    assert nums and int(nums.group(1).replace(",", "")) == trainable and int(nums.group(2).replace(",", "")) == total
    assert "rank 3" in text and "seed 7" in text


def test_second_inject_same_settings_extends_different_settings_refused():
    model = fresh_tiny()
    randlora.inject(model, ["head"], rank=2, seed=1)
    randlora.inject(model, ["block.0"], rank=2, seed=1)
    assert sorted(adapted_names(model)) == ["block.0", "head"]
    assert model.head._bases is model.block[0]._bases
    snap = snapshot(model)
    with pytest.raises(ValueError, match="same settings"):
        randlora.inject(model, ["embed"], rank=3, seed=1)
    with pytest.raises(ValueError, match="same settings"):
        randlora.inject(model, ["embed"], rank=2, seed=2)
    assert_unchanged(model, snap)


# -----------------------------------------------------------------------------
# 9. Bad input leaves the model unchanged


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        (dict(rank=0), ValueError, "rank"),
        (dict(rank=-2), ValueError, "rank"),
        (dict(rank=1.5), ValueError, "rank"),
        (dict(rank=True), ValueError, "rank"),
        (dict(rank="2"), ValueError, "rank"),
        (dict(rank=2, seed=-1), ValueError, "seed"),
        (dict(rank=2, seed=1.0), ValueError, "seed"),
        (dict(rank=2, alpha=0), ValueError, "alpha"),
        (dict(rank=2, alpha=-3.0), ValueError, "alpha"),
        (dict(rank=2, alpha=float("nan")), ValueError, "alpha"),
        (dict(rank=2, alpha=float("inf")), ValueError, "alpha"),
        (dict(rank=2, alpha=True), ValueError, "alpha"),
        (dict(rank=2, alpha="1"), ValueError, "alpha"),
        (dict(rank=2, dropout=-0.1), ValueError, "dropout"),
        (dict(rank=2, dropout=1.0), ValueError, "dropout"),
        (dict(rank=2, dropout=True), ValueError, "dropout"),
        (dict(rank=2, dropout=float("nan")), ValueError, "dropout"),
        (dict(rank=2, bases="gaussian"), ValueError, "bases"),
        (dict(rank=2, bases=None), ValueError, "bases"),
        (dict(rank=2, strategy="fast"), ValueError, "strategy"),
    ],
)
def test_bad_config(kwargs, exc, pattern):
    model = fresh_tiny()
    snap = snapshot(model)
    with pytest.raises(exc, match=pattern):
        randlora.inject(model, ALL, **kwargs)
    assert_unchanged(model, snap)


def test_rank_too_large_names_layer_and_shape():
    model = fresh_tiny()
    snap = snapshot(model)
    # rank 6 fits embed (6->8), block.0 (8->16), block.2 (16->8) but not head (8->5).
    with pytest.raises(ValueError, match=r"'head'.*in_features=8.*out_features=5"):
        randlora.inject(model, ALL, rank=6)
    assert_unchanged(model, snap)
    randlora.inject(model, ALL, rank=5)  # exactly min(in, out) is fine
    assert len(adapted_names(model)) == 4


def test_target_matching_nothing_lists_linear_layers():
    model = fresh_tiny()
    snap = snapshot(model)
    with pytest.raises(ValueError) as e:
        randlora.inject(model, ["head", "q_proj"], rank=2)
    msg = str(e.value)
    assert "q_proj" in msg
    for name in ALL:
        assert name in msg
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="block.0"):
        randlora.inject(model, r"nothing\d", rank=2)
    with pytest.raises(ValueError):
        randlora.inject(model, lambda n, m: False, rank=2)
    with pytest.raises((ValueError, TypeError)):
        randlora.inject(model, [], rank=2)
    with pytest.raises((ValueError, TypeError)):
        randlora.inject(model, "(unclosed", rank=2)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("targets,name", [(["head", "norm"], "norm"), ("block|head", "block"), (lambda n, m: n in ("head", "block.1"), "block.1")])
def test_non_linear_target_type_error(targets, name):
    model = fresh_tiny()
    snap = snapshot(model)
    with pytest.raises(TypeError, match=re.escape(repr(name))):
        randlora.inject(model, targets, rank=2)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("targets", [["head"], "head", lambda n, m: isinstance(m, nn.Linear), r"head(\.base)?"])
def test_inject_into_adapted_layer_refused(targets):
    model = fresh_tiny()
    randlora.inject(model, ["head"], rank=2)
    randomize_model_(model, 1)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="already adapted"):
        randlora.inject(model, targets, rank=2)
    assert_unchanged(model, snap)


# -----------------------------------------------------------------------------
# 8. merge / unmerge / eject / disable


def _adapted_tiny(seed=0, rank=3, dtype=torch.float32):
    model = fresh_tiny()
    randlora.inject(model, ALL, rank=rank, seed=seed, alpha=2.0 * rank)
    randomize_model_(model, seed + 1)
    return model.to(dtype)


def _weights(model):
    return {n: m.base.weight.detach().clone() for n, m in randlora.named_adapters(model)}


def _delta_atol(model):
    """float32 round-trip slack for W + ΔW - ΔW: a few ulps of the larger of W and ΔW."""
    return {n: 1e-6 * max(ref_layer_delta(m).abs().max().item(), m.base.weight.abs().max().item()) for n, m in randlora.named_adapters(model)}


def test_merge_matches_unmerged_and_reference():
    model = _adapted_tiny()
    x = torch.randn(4, 6)
    y = model(x).detach()
    w0 = _weights(model)
    atol = _delta_atol(model)
    randlora.merge(model)
    for name, m in randlora.named_adapters(model):
        assert m.merged
        # merged weight = W + scaling * ΔW (float64 reference)
        assert_close(m.base.weight, w0[name].double() + ref_layer_delta(m), 1e-6, what=name)
    model.eval()
    assert_close(model(x), y, 1e-5, what="merged output")
    w1 = _weights(model)
    randlora.merge(model)  # second merge: no-op, ΔW not added twice
    for n, w in _weights(model).items():
        assert torch.equal(w, w1[n])
    randlora.unmerge(model)
    for n, w in _weights(model).items():
        assert_close(w, w0[n], 0, atol=atol[n], what=n)
    w2 = _weights(model)
    randlora.unmerge(model)  # not merged: no-op
    for n, w in _weights(model).items():
        assert torch.equal(w, w2[n])
    assert_close(model(x), y, 1e-5, what="unmerged output")


def test_merge_bf16():
    model = _adapted_tiny(dtype=torch.bfloat16)
    x = torch.randn(4, 6).bfloat16()
    y = model(x).detach()
    randlora.merge(model)
    ym = model.eval()(x)
    assert ym.dtype == torch.bfloat16
    assert ((ym.float() - y.float()).norm() / y.float().norm()).item() < 3e-2
    w_merged = _weights(model)
    randlora.unmerge(model)
    for n, m in randlora.named_adapters(model):
        assert m.base.weight.dtype == torch.bfloat16
        assert not torch.equal(m.base.weight, w_merged[n])


def test_training_a_merged_model_raises():
    model = _adapted_tiny()
    randlora.merge(model)
    model.train()
    x = torch.randn(2, 6)
    with pytest.raises(RuntimeError, match="'embed'.*merged"):
        model(x)
    with torch.no_grad():
        model(x)  # no grad: fine
    model.eval()
    assert torch.isfinite(model(x)).all()


def test_unmerge_uses_snapshot_of_lam_gam():
    model = _adapted_tiny()
    w0 = _weights(model)
    atol = _delta_atol(model)
    randlora.merge(model)
    with torch.no_grad():
        for _, m in randlora.named_adapters(model):
            m.lam.mul_(3).add_(1)
            m.gam.mul_(-2)
    randlora.unmerge(model)
    for n, w in _weights(model).items():
        assert_close(w, w0[n], 0, atol=atol[n], what=n)


def test_eject_returns_plain_linears_with_same_outputs():
    model = _adapted_tiny()
    x = torch.randn(5, 6)
    y = model(x).detach()
    deltas = {n: ref_layer_delta(m) for n, m in randlora.named_adapters(model)}
    w0 = {n: base_weight64(m) for n, m in randlora.named_adapters(model)}
    out = randlora.eject(model)
    assert out is model
    assert adapted_names(model) == []
    for n in ALL:
        mod = model.get_submodule(n)
        assert type(mod) is nn.Linear
        assert_close(mod.weight, w0[n] + deltas[n], 1e-6, what=n)
    assert not any(isinstance(m, randlora.RandLoraLinear) for m in model.modules())
    assert_close(model(x), y, 1e-5)
    assert set(model.state_dict()) == set(fresh_tiny().state_dict())


@pytest.mark.parametrize("merged", [False, True])
def test_disable_gives_base_outputs(merged):
    base = fresh_tiny()
    x = torch.randn(3, 6)
    y_base = base(x).detach()
    model = _adapted_tiny()
    y_adapted = model(x).detach()
    assert not torch.allclose(y_adapted, y_base)
    if merged:
        randlora.merge(model)
        model.eval()
    w_before = _weights(model)
    atol = _delta_atol(model)
    with randlora.disable(model) as m:
        assert m is model
        if merged:
            assert_close(model(x), y_base, 1e-5)
        else:
            assert torch.equal(model(x), y_base)
    assert all(l.merged == merged and not l.disabled for _, l in randlora.named_adapters(model))
    for n, w in _weights(model).items():
        assert_close(w, w_before[n], 0, atol=2 * atol[n], what=n)
    assert_close(model(x), y_adapted, 1e-5)
    # Restored after an exception too.
    with pytest.raises(KeyError):
        with randlora.disable(model):
            raise KeyError("boom")
    assert all(l.merged == merged and not l.disabled for _, l in randlora.named_adapters(model))
    assert_close(model(x), y_adapted, 1e-5)


def test_wrong_input_features_in_a_model_names_the_layer():
    model = fresh_tiny()
    randlora.inject(model, ["block.2", "head"], rank=2)
    model.block[1] = nn.Linear(16, 12)  # now block.2 (16 -> 8) receives 12 features
    with pytest.raises(ValueError, match=r"'block\.2'.*12.*in_features=16"):
        model(torch.randn(3, 6))


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


# -----------------------------------------------------------------------------
# A transformers model


def test_llama_smoke():
    torch.manual_seed(0)
    model = tiny_llama(num_key_value_heads=2)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        logits0 = model(ids).logits
    targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    randlora.inject(model, targets, rank=4, seed=0)
    names = adapted_names(model)
    assert len(names) == 2 * len(targets)
    assert all(n.rsplit(".", 1)[1] in targets for n in names)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits0)  # lam = 0
    model.train()
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for n, p in model.named_parameters():
        if n.endswith((".lam", ".gam")):
            assert p.requires_grad and p.grad is not None and torch.isfinite(p.grad).all(), n
        else:
            assert not p.requires_grad and p.grad is None, n
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith(".lam"))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, logits0)


# -----------------------------------------------------------------------------
# Issue 9: targets, tied and shared weights, modules_to_save; disable and merge together


def strong_snapshot(model):
    """Bitwise values, parameter and module identities, flags, modes, adapter states."""
    return (
        {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        [(n, id(p), p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)],
        [(n, id(m), type(m), m.training) for n, m in model.named_modules(remove_duplicate=False)],
        [(n, m.merged, m.disabled, dict(m.__dict__).get("_remerge")) for n, m in randlora.named_adapters(model)],
    )


def assert_same(model, snap):
    now = strong_snapshot(model)
    assert list(now[0]) == list(snap[0])
    for k, v in snap[0].items():
        assert now[0][k].dtype == v.dtype and torch.equal(now[0][k], v), k
    assert now[1:] == snap[1:]


def refuse(model, call, exc, *patterns):
    snap = strong_snapshot(model)
    with pytest.raises(exc) as e:
        call(model)
    for p in patterns:
        assert re.search(p, str(e.value)), (p, str(e.value))
    assert_same(model, snap)
    return str(e.value)


@pytest.mark.parametrize("targets", [None, 3, 2.5, b"head", {"head": 1}, [], ["head", 3], nn.Linear, iter(["head"])])
def test_bad_targets_type_names_the_argument(targets):
    msg = refuse(fresh_tiny(), lambda m: randlora.inject(m, targets, rank=2), TypeError, "targets")
    assert "list" in msg and "regex" in msg


@pytest.mark.parametrize("targets", ["all-linear", r".*", lambda n, m: True, [""]])
def test_bare_layer_as_the_model_is_refused(targets):
    torch.manual_seed(0)
    refuse(nn.Linear(8, 6), lambda m: randlora.inject(m, targets, rank=2), ValueError, "model itself", "root", "Linear", "nn.Sequential")


def test_regex_that_is_a_name_suggests_a_list():
    msg = refuse(fresh_tiny(), lambda m: randlora.inject(m, "0", rank=2), ValueError, r"targets=\['0'\]", "block.0", "regular expression")
    assert "block.2" not in msg.split("linear layers:")[0]
    # A regex matching nothing, and no name either: no hint.
    msg = refuse(fresh_tiny(), lambda m: randlora.inject(m, "q_proj", rank=2), ValueError, "matched no module")
    assert "would select" not in msg


def test_all_linear_plain_module_and_modules_to_save():
    # No get_output_embeddings(): every Linear (PEFT does the same); modules to save are left out.
    model = randlora.inject(fresh_tiny(), "all-linear", rank=2)
    assert sorted(adapted_names(model)) == sorted(ALL)
    model = randlora.inject(fresh_tiny(), "ALL-LINEAR", rank=2, modules_to_save=["head"])
    assert sorted(adapted_names(model)) == ["block.0", "block.2", "embed"]
    assert isinstance(model.head, randlora.SavedModule)
    assert not randlora._saved_modules(randlora.inject(fresh_tiny(), ["head"], rank=2, modules_to_save=[]))
    # A second "all-linear" finds nothing new: the adapters' own base layers are no targets.
    refuse(model, lambda m: randlora.inject(m, "all-linear", rank=2), ValueError, "selected no module")


def test_all_linear_skips_output_embeddings():
    torch.manual_seed(0)
    model = tiny_llama()
    randlora.inject(model, "all-linear", rank=4)
    names = adapted_names(model)
    assert "lm_head" not in names and len(names) == 2 * 7


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.in_features, self.out_features = 6, 6
        self.inner = nn.Linear(6, 6)

    def forward(self, x):
        return self.inner(x) + x


@pytest.mark.parametrize("targets", [["outer", "inner"], r"outer(\.inner)?", lambda n, m: n.startswith("outer")])
def test_target_containing_a_target_refused(targets):
    model = nn.Sequential(OrderedDict(first=nn.Linear(6, 6), outer=Outer()))
    refuse(model, lambda m: randlora.inject(m, targets, rank=2), ValueError, r"'outer'", r"'outer\.inner'")


class Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = self.a  # one module, two names
        self.c = nn.Linear(6, 6)
        self.d = nn.Linear(6, 6)
        self.d.weight = self.c.weight  # two modules, one weight
        self.e = nn.Linear(6, 6)

    def forward(self, x):
        return self.e(self.d(self.c(self.b(self.a(x)))))


def test_one_module_under_two_names_adapted_once_and_merges():
    torch.manual_seed(0)
    model = Aliased()
    x = torch.randn(4, 6)
    randlora.inject(model, ["b"], rank=2)
    assert model.a is model.b and isinstance(model.a, randlora.RandLoraLinear) and model.a.name == "a"
    assert adapted_names(model) == ["a"]
    randomize_model_(model, 3)
    y = model(x).detach()
    randlora.merge(model)
    model.eval()
    assert_close(model(x), y, 1e-5)
    randlora.eject(model)
    assert model.a is model.b and type(model.a) is nn.Linear
    assert_close(model(x), y, 1e-5)


@pytest.mark.parametrize("targets", [["c"], ["d"], ["c", "d"]])
def test_shared_weight_computes_unmerged_and_merge_names_both(targets):
    torch.manual_seed(0)
    model = Aliased()
    x = torch.randn(4, 6)
    W = model.c.weight.detach().double().clone()
    randlora.inject(model, targets, rank=2)
    randomize_model_(model, 4)
    # Unmerged: each adapted layer is W + its own update; the shared weight itself is untouched.
    h = x.double()
    for name in ("a", "b", "c", "d", "e"):
        layer = getattr(model, name)
        if isinstance(layer, randlora.RandLoraLinear):
            h = h @ (W + ref_layer_delta(layer)).t() + layer.base.bias.double()
        else:
            h = h @ layer.weight.double().t() + layer.bias.double()
    assert_close(model(x), h, 1e-5)
    assert torch.equal(model.c.weight if "c" not in targets else model.c.base.weight, W.float())
    for verb in (randlora.merge, randlora.eject):
        refuse(model, verb, ValueError, r"'c(\.base)?\.weight'", r"'d(\.base)?\.weight'", "shared")


class Headed(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8))
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.head(self.norm(self.body(x)))


def _headed(**kw):
    torch.manual_seed(0)
    return randlora.inject(Headed(), ["body.0", "body.2"], rank=2, **kw)


@pytest.mark.parametrize("saved", [["head"], "head", r"he.d", lambda n, m: n == "head"])
def test_modules_to_save_train_and_disable(saved):
    torch.manual_seed(0)
    plain = Headed().eval()
    model = _headed(modules_to_save=saved).eval()
    assert isinstance(model.head, randlora.SavedModule) and model.head.name == "head"
    assert model.head.original is not model.head.trained
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(
        [f"body.{i}.{p}" for i in (0, 2) for p in ("lam", "gam")] + [f"head.trained.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    )
    x = torch.randn(5, 6)
    randomize_model_(model, 1)
    with torch.no_grad():
        for p in model.head.trained.parameters():
            p.add_(torch.randn_like(p))
        y = model(x)
        with randlora.disable(model):
            assert torch.equal(model(x), plain(x))  # adapters off, the original head
        assert torch.equal(model(x), y)
    assert "head (saved in full)" in randlora.summary(model)
    # Saved modules stay trainable through mark_only_adapter_as_trainable.
    for p in model.parameters():
        p.requires_grad_(True)
    randlora.mark_only_adapter_as_trainable(model)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == trainable
    # eject: plain modules, the trained head in place, same outputs.
    randlora.eject(model)
    assert isinstance(model.head, nn.Sequential) and not list(randlora.named_adapters(model))
    with torch.no_grad():
        assert_close(model(x), y, 1e-5)


def test_modules_to_save_with_buffers_save_and_load(tmp_path):
    # A BatchNorm to save: its parameters and its buffers (float running stats, an int64 counter).
    model = _headed(modules_to_save=["norm", "head"])
    randomize_model_(model, 2)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 6)).square().sum().backward()
        opt.step()
    state = randlora.adapter_state_dict(model)
    assert state["norm.num_batches_tracked"].item() == 2 and state["norm.num_batches_tracked"].dtype == torch.int64
    assert {"norm.running_mean", "norm.weight", "head.2.bias"} <= set(state)
    randlora.save_adapter(model, tmp_path / "a.safetensors")
    torch.manual_seed(0)
    fresh = randlora.load_adapter(Headed(), tmp_path / "a.safetensors")
    assert isinstance(fresh.norm, randlora.SavedModule) and isinstance(fresh.head, randlora.SavedModule)
    for k, v in randlora.adapter_state_dict(fresh).items():
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), k
    x = torch.randn(4, 6)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
        with randlora.disable(fresh):
            torch.manual_seed(0)
            assert torch.equal(fresh(x), Headed().eval()(x))
    # A state dict that does not fit a saved module is refused, the model unchanged.
    bad = dict(state)
    bad["norm.running_mean"] = torch.zeros(3)
    refuse(fresh, lambda m: randlora.load_adapter_state_dict(m, bad), ValueError, r"norm\.running_mean")
    bad = {k: v for k, v in state.items() if k != "head.0.weight"}
    refuse(fresh, lambda m: randlora.load_adapter_state_dict(m, bad), ValueError, r"head\.0\.weight")


def test_modules_to_save_second_inject_keeps_them_trainable():
    model2 = Headed()
    randlora.inject(model2, ["body.0"], rank=2, modules_to_save=["head"])
    randlora.inject(model2, ["body.2"], rank=2)
    assert all(p.requires_grad for p in model2.head.trained.parameters())
    assert not any(p.requires_grad for p in model2.head.original.parameters())
    assert model2.body[0].lam.requires_grad and model2.body[2].lam.requires_grad


@pytest.mark.parametrize(
    "targets,saved,patterns",
    [
        (["body.0"], ["body.0"], [r"'body\.0'", "both a target and a module to save"]),
        (["body.0"], ["body"], [r"'body'", r"'body\.0'"]),  # saved contains a target
        (["head"], ["head.0"], None),  # head is not linear: TypeError first
        (["head.0"], ["head"], [r"'head'", r"'head\.0'"]),
        (["body.0"], ["head", "head.2"], [r"'head'", r"'head\.2'"]),  # saved inside saved
        (["body.0"], [""], ["model itself"]),
        (["body.0"], ["nothing"], ["modules_to_save", "nothing"]),
    ],
)
def test_modules_to_save_overlaps_refused(targets, saved, patterns):
    torch.manual_seed(0)
    model = Headed()
    exc = TypeError if patterns is None else ValueError
    refuse(model, lambda m: randlora.inject(m, targets, rank=2, modules_to_save=saved), exc, *(patterns or []))


def test_modules_to_save_of_an_adapted_model_refused():
    model = _headed(modules_to_save=["head"])
    refuse(model, lambda m: randlora.inject(m, ["head.trained.0"], rank=2), ValueError, "module to save")
    refuse(model, lambda m: randlora.inject(m, ["head.original.2"], rank=2), ValueError, "module to save")
    refuse(model, lambda m: randlora.inject(m, ["body.2"], rank=2, modules_to_save=["head"]), ValueError, "already")
    refuse(model, lambda m: randlora.inject(m, ["head.trained.2"], rank=2), ValueError)
    model = randlora.inject(Headed(), ["body.0"], rank=2)
    refuse(model, lambda m: randlora.inject(m, ["body.2"], rank=2, modules_to_save=["body"]), ValueError, r"'body'")
    refuse(model, lambda m: randlora.inject(m, ["head.0"], rank=2, modules_to_save=["body.0"]), ValueError, r"'body\.0'")


# -----------------------------------------------------------------------------
# merge() / unmerge() inside disable(): the model keeps computing as the base; they choose the
# state the layers are in when the context ends.


@pytest.mark.parametrize("start_merged", [False, True])
def test_merge_and_unmerge_inside_disable(start_merged):
    base = fresh_tiny()
    model = _adapted_tiny()
    x = torch.randn(3, 6)
    y_base, y = base(x).detach(), model(x).detach()
    w0 = _weights(model)
    model.eval()
    if start_merged:
        randlora.merge(model)
    with torch.no_grad():
        with randlora.disable(model):
            y_in = model(x)  # the base, up to the rounding of an earlier merge and unmerge
            assert_close(y_in, y_base, 1e-5)
            randlora.merge(model)
            assert torch.equal(model(x), y_in) and not any(m.merged for _, m in randlora.named_adapters(model))
            with randlora.disable(model):  # nested
                randlora.unmerge(model)
                assert torch.equal(model(x), y_in)
            assert torch.equal(model(x), y_in)
            assert not any(m.merged for _, m in randlora.named_adapters(model))
        # The last call inside (unmerge) decides.
        assert not any(m.merged or m.disabled for _, m in randlora.named_adapters(model))
        for n, w in _weights(model).items():
            assert torch.equal(w, w0[n]) or start_merged
        assert_close(model(x), y, 1e-5)
        with randlora.disable(model):
            randlora.merge(model)
        assert all(m.merged and not m.disabled for _, m in randlora.named_adapters(model))
        assert_close(model(x), y, 1e-5)
        with randlora.disable(model):
            assert_close(model(x), y_base, 1e-5)
        randlora.unmerge(model)
        assert_close(model(x), y, 1e-5)


def test_eject_inside_disable_refused():
    model = _adapted_tiny()
    with randlora.disable(model):
        refuse(model, randlora.eject, RuntimeError, "disable")


# -----------------------------------------------------------------------------
# Runtime dependencies: inject, train, save and load without numpy (CI also runs this script in
# a fresh venv with only torch and `pip install .`).


def test_runtime_smoke_without_numpy():
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtime_smoke.py")
    root = os.path.dirname(os.path.dirname(script))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "runtime smoke ok" in done.stdout and "no numpy" in done.stdout
