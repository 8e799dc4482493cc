"""Model verbs (randlora.py, section "Model verbs"): inject, merge / unmerge / eject / disable,
mark_only_adapter_as_trainable, summary, hold_weights, modules_to_save, a second inject, the merge
state machine (with disable, and through ``model.state_dict()``), copies of a model, and the
README's usage snippet.

Outputs are compared with an independent float64 reference built from conftest's helpers
(``ref_delta`` / ``ref_layer_delta`` on the layers' bases), never with randlora's own arithmetic.
Every refusal is checked against a snapshot of the model (conftest.assert_unchanged)."""

from __future__ import annotations

import copy
import math
import os
import re
import runpy
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn as nn
from conftest import (
    MhaHolder,
    assert_close,
    assert_refused,
    assert_unchanged,
    base_weight64,
    fresh_tiny,
    mha_inputs,
    nonzero_uniform,
    randomize_,
    randomize_model_,
    ref_layer_delta,
    reference_copy,
    snapshot,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import randlora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = ["embed", "block.0", "block.2", "head"]  # TinyNet's linear layers
TARGETS = ["embed", "block.0", "head"]
X_SEED = 77


# -----------------------------------------------------------------------------
# Helpers


def adapters(model: nn.Module):
    return list(randlora.named_adapters(model))


def names_of(model: nn.Module) -> list[str]:
    return [n for n, _ in randlora.named_adapters(model)]


def make(seed: int = 0, rank: int = 2, targets=TARGETS, values: int | None = 5, **kw) -> nn.Module:
    """TinyNet (seed 1234 weights) adapted on ``targets``, random non-zero lam/gam, eval mode."""
    model = fresh_tiny()
    randlora.inject(model, targets, rank=rank, seed=seed, **kw)
    if values is not None:
        randomize_model_(model, values)
    return model.eval()


def xs(n: int = 5, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(X_SEED)).to(dtype)


def params64(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapters' lam/gam now, as float64 copies (what the model *should* compute)."""
    return {n: (m.lam.detach().double().clone(), m.gam.detach().double().clone()) for n, m in adapters(model)}


def reference64(src: nn.Module, params=None, *, dtype=torch.float32, adapted: bool = True) -> nn.Module:
    """A plain float64 TinyNet computing base + scaling * ΔW of ``src``'s adapters.

    The base weights come from a fresh TinyNet (the same seed), rounded to ``dtype`` (the dtype
    the adapted model runs in); ΔW comes from conftest's element-wise float64 reference with the
    layers' bases and ``params`` (default: the adapters' current lam/gam).
    """
    ref = fresh_tiny().to(dtype).double()
    if adapted:
        params = params64(src) if params is None else params
        with torch.no_grad():
            for name, m in adapters(src):
                lam, gam = params[name]
                ref.get_submodule(name).weight.add_(ref_layer_delta(m, lam, gam))
    return ref.eval()


def check_outputs(model: nn.Module, ref: nn.Module, x: torch.Tensor, rtol: float = 2e-5, what: str = "") -> None:
    with torch.no_grad():
        y = model(x)
        e = ref(x.double())
    assert_close(y, e, rtol, what=what or "output vs float64 reference")


def base_weights64(dtype=torch.float32) -> dict[str, torch.Tensor]:
    plain = fresh_tiny().to(dtype)
    return {n: m.weight.detach().double() for n, m in plain.named_modules() if isinstance(m, nn.Linear)}


def check_weights_consistent(model: nn.Module, params, dtype=torch.float32, slack: float = 4e-6) -> None:
    """A merged layer's base weight is W0 + scaling * ΔW(params); an unmerged one's is W0."""
    w0 = base_weights64(dtype)
    eps = {torch.float32: 1.0, torch.float64: 1.0, torch.bfloat16: 2e4, torch.float16: 2e3}[dtype]
    for name, m in adapters(model):
        d = ref_layer_delta(m, *params[name])
        w = m.base.weight.detach().double()
        expected = w0[name] + d if m.merged else w0[name]
        atol = slack * eps * max(d.abs().max().item(), w0[name].abs().max().item())
        assert_close(w, expected, 0, atol=atol, what=f"{name} base weight (merged={m.merged})")


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


# =============================================================================
# inject: what it adapts, freezes and initialises; a second inject


def test_inject_freezes_everything_else_and_initialises_like_peft():
    model = fresh_tiny()
    x = torch.randn(3, 6)
    y0 = model(x).detach()
    assert randlora.inject(model, ["block.0", "head"], rank=3) is model
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["block.0.gam", "block.0.lam", "head.gam", "head.lam"]
    for _, m in randlora.named_adapters(model):
        assert m.scaling == 20.0 and m.alpha == 60.0  # alpha=None -> 20 * rank
        assert torch.equal(m.lam, torch.zeros(m.rank, m.n))
        assert m.n == math.ceil(m.d / m.rank)
        assert torch.equal(m.gam, torch.full((m.n, m.d), 1 / max(m.n, m.d)))
        assert m.lam.dtype == m.gam.dtype == torch.float32
    # lam = 0: the adapted model computes exactly the base model, on every strategy.
    for strategy in ("build", "factorized", "auto"):
        for _, m in randlora.named_adapters(model):
            m.strategy = strategy
        assert torch.equal(model(x), y0), strategy
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
    assert randlora.mark_only_adapter_as_trainable(model) is model
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


def test_second_inject_same_settings_extends_and_keeps_everything_trainable():
    """A second (and third) inject with the same settings adds layers on the same seeded bases and
    leaves the first calls' lam/gam and modules to save trainable: every one gets a gradient and an
    optimizer step moves it. Other settings are refused, model unchanged."""
    model = fresh_tiny()
    randlora.inject(model, ["head"], rank=2, seed=1, modules_to_save=["norm"])
    randlora.inject(model, ["block.0"], rank=2, seed=1)
    randlora.inject(model, ["embed"], rank=2, seed=1)
    assert sorted(names_of(model)) == ["block.0", "embed", "head"]
    # One set of seeded bases: each layer's are the leading part of the widest layer's.
    A, B = model.block[0].random_bases()
    for m in (model.head, model.embed):
        a, b = m.random_bases()
        assert torch.equal(a, A[:, : m.d]) and torch.equal(b, B[: m.D, : m.n]), m.name
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted([f"{t}.{p}" for t in TARGETS for p in ("lam", "gam")] + ["norm.trained.weight", "norm.trained.bias"])
    assert not any(p.requires_grad for p in model.norm.original.parameters())
    randomize_model_(model, 3)
    model.train()
    model(xs()).square().sum().backward()
    for n, m in adapters(model):
        for p in (m.lam, m.gam):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {k: v.clone() for k, v in randlora.adapter_state_dict(model).items()}
    opt.step()
    after = randlora.adapter_state_dict(model)
    assert all(not torch.equal(before[k], after[k]) for k in before)
    for kw in (dict(rank=3, seed=1), dict(rank=2, seed=2)):
        assert_refused(model, lambda m: randlora.inject(m, ["block.2"], **kw), ValueError, "same settings")


# =============================================================================
# modules_to_save


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


def test_assigning_a_weight_of_a_module_to_save_is_refused_naming_it():
    """tie_weights() assigns lm_head.weight: on a module saved in full (a trained copy, and the frozen original) it is
    refused with a message naming the module and what to assign instead (was a bare KeyError), the model unchanged."""
    model = _headed(modules_to_save=["head.0"])

    def tie(m):
        m.head[0].weight = m.head[2].weight

    msg = assert_refused(model, tie, AttributeError, r"module to save 'head\.0' is trained in full as a copy",
                         r"on \.trained or \.original")
    assert "tie_weights" in msg
    model.head[0].trained.bias = nn.Parameter(torch.zeros(8))  # said explicitly, it is the user's to make
    assert torch.equal(model.head[0].trained.bias, torch.zeros(8))


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
    assert_refused(fresh, lambda m: randlora.load_adapter_state_dict(m, bad), ValueError, r"norm\.running_mean")
    bad = {k: v for k, v in state.items() if k != "head.0.weight"}
    assert_refused(fresh, lambda m: randlora.load_adapter_state_dict(m, bad), ValueError, r"head\.0\.weight")


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
    assert_refused(model, lambda m: randlora.inject(m, targets, rank=2, modules_to_save=saved), exc, *(patterns or []))


def test_modules_to_save_of_an_adapted_model_refused():
    model = _headed(modules_to_save=["head"])
    assert_refused(model, lambda m: randlora.inject(m, ["head.trained.0"], rank=2), ValueError, "module to save")
    assert_refused(model, lambda m: randlora.inject(m, ["head.original.2"], rank=2), ValueError, "module to save")
    assert_refused(model, lambda m: randlora.inject(m, ["body.2"], rank=2, modules_to_save=["head"]), ValueError, "already")
    assert_refused(model, lambda m: randlora.inject(m, ["head.trained.2"], rank=2), ValueError)
    model = randlora.inject(Headed(), ["body.0"], rank=2)
    assert_refused(model, lambda m: randlora.inject(m, ["body.2"], rank=2, modules_to_save=["body"]), ValueError, r"'body'")
    assert_refused(model, lambda m: randlora.inject(m, ["head.0"], rank=2, modules_to_save=["body.0"]), ValueError, r"'body\.0'")


# =============================================================================
# merge / unmerge / eject / disable


def test_merge_matches_unmerged_and_reference():
    model = _adapted_tiny()
    x = torch.randn(4, 6)
    y = model(x).detach()
    w0 = _weights(model)
    atol = _delta_atol(model)
    assert randlora.merge(model) is model
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
    assert randlora.unmerge(model) is model
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
    assert names_of(model) == []
    for n in ALL:
        mod = model.get_submodule(n)
        assert type(mod) is nn.Linear
        assert_close(mod.weight, w0[n] + deltas[n], 1e-6, what=n)
    assert not any(isinstance(m, randlora.RandLoraLinear) for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())  # the model stays frozen
    assert_close(model(x), y, 1e-5)
    assert set(model.state_dict()) == set(fresh_tiny().state_dict())


def test_eject_leaves_the_trained_copy_of_a_module_to_save_frozen_too():
    model = randlora.inject(fresh_tiny(), ["block.0"], rank=2, modules_to_save=["head"])
    with torch.no_grad():
        model.head.trained.weight.add_(1.0)
    trained = model.head.trained
    randlora.eject(model)
    assert model.head is trained and torch.equal(model.head.weight, trained.weight)
    assert not any(p.requires_grad for p in model.parameters())  # the model stays frozen, the trained copy included


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


# merge() / unmerge() inside disable(): the model keeps computing as the base; they choose the
# state the layers are in when the (outermost) context ends.


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


@pytest.mark.parametrize("start_merged", [False, True])
def test_merge_inside_disable_against_reference(start_merged):
    """The same, against the float64 reference and the weights: base outputs inside after every
    merge/unmerge, the adapted outputs and consistent weights after."""
    model = make()
    params = params64(model)
    ref, base_ref, x = reference64(model, params), reference64(model, adapted=False), xs()
    if start_merged:
        randlora.merge(model)
    with randlora.disable(model):
        randlora.merge(model)
        check_outputs(model, base_ref, x, what="inside disable after merge()")
        randlora.unmerge(model)
        check_outputs(model, base_ref, x, what="inside disable after unmerge()")
        randlora.merge(model) if not start_merged else None
        check_outputs(model, base_ref, x, what="inside disable after a second merge()")
    assert all(m.merged == (not start_merged) for _, m in adapters(model))
    check_outputs(model, ref, x, what="after disable")
    check_weights_consistent(model, params)
    assert not any(m.disabled for _, m in adapters(model))
    randlora.unmerge(model)
    check_weights_consistent(model, params)
    check_outputs(model, ref, x, what="after disable, unmerged")
    with randlora.disable(model):
        check_outputs(model, base_ref, x, what="disabled again")


@pytest.mark.parametrize("start_merged", [False, True])
def test_eject_inside_disable_refused(start_merged):
    model = _adapted_tiny().eval()
    x = torch.randn(3, 6)
    if start_merged:
        randlora.merge(model)
    with torch.no_grad():
        y = model(x)
    with randlora.disable(model):
        assert_refused(model, randlora.eject, RuntimeError, "disable")
    assert all(m.merged == start_merged and not m.disabled for _, m in randlora.named_adapters(model))
    with torch.no_grad():
        assert_close(model(x), y, 1e-6)


# -----------------------------------------------------------------------------
# A property over sequences: merge / unmerge / disable (nested) / load_adapter_state_dict /
# save_adapter + load_adapter / state_dict round trips, always against a float64 reference.


class MergeDisableMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.model = make(values=1)
        self.params = params64(self.model)
        self.ctxs: list = []
        self.x = xs()
        self.tmp = tempfile.mkdtemp(prefix="randlora-sm-")
        self.n = 0
        self.base_ref = reference64(self.model, adapted=False)

    def teardown(self):
        while self.ctxs:
            self.ctxs.pop().__exit__(None, None, None)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def any_merged(self):
        return any(m.merged for _, m in adapters(self.model))

    @precondition(lambda self: not self.any_merged())
    @rule(seed=st.integers(0, 10_000))
    def set_params(self, seed):
        g = torch.Generator().manual_seed(seed)
        state = {}
        for name, m in adapters(self.model):
            state[f"{name}.lam"] = nonzero_uniform(m.lam.shape, g)
            state[f"{name}.gam"] = nonzero_uniform(m.gam.shape, g) / m.d**0.5
        randlora.load_adapter_state_dict(self.model, state)
        self.params = {n: (state[f"{n}.lam"].double(), state[f"{n}.gam"].double()) for n, _ in adapters(self.model)}

    @rule()
    def merge(self):
        before = snapshot(self.model)
        try:
            randlora.merge(self.model)
        except (RuntimeError, ValueError):
            assert self.ctxs, "merge refused outside disable"
            assert_unchanged(self.model, before)

    @rule()
    def unmerge(self):
        randlora.unmerge(self.model)

    @precondition(lambda self: len(self.ctxs) < 2)
    @rule()
    def enter_disable(self):
        ctx = randlora.disable(self.model)
        assert ctx.__enter__() is self.model
        self.ctxs.append(ctx)

    @precondition(lambda self: self.ctxs)
    @rule()
    def exit_disable(self):
        self.ctxs.pop().__exit__(None, None, None)

    @precondition(lambda self: not self.ctxs)
    @rule()
    def save_and_load(self):
        self.n += 1
        path = os.path.join(self.tmp, f"{self.n}.safetensors")
        randlora.save_adapter(self.model, path)
        new = fresh_tiny().eval()
        randlora.load_adapter(new, path)
        self.model = new

    @precondition(lambda self: not self.ctxs)
    @rule(into_merged=st.booleans(), seed=st.integers(0, 100))
    def state_dict_round_trip(self, into_merged, seed):
        state = self.model.state_dict()
        new = make(values=seed + 7)
        if into_merged:
            randlora.merge(new)
        before = snapshot(new)
        try:
            new.load_state_dict(state)
        except (RuntimeError, ValueError):
            assert_unchanged(new, before)
            return
        self.model = new

    @invariant()
    def computes_the_reference(self):
        if self.ctxs:
            check_outputs(self.model, self.base_ref, self.x, 1e-4, "inside disable")
        else:
            check_outputs(self.model, reference64(self.model, self.params), self.x, 1e-4, "adapted")
            check_weights_consistent(self.model, self.params, slack=40e-6)


TestMergeDisableMachine = MergeDisableMachine.TestCase
TestMergeDisableMachine.settings = settings(max_examples=8, stateful_step_count=12, deadline=None)


# =============================================================================
# The merge state travels with model.state_dict() (the layer's extra state, present only while
# merged): loading a merged state into an unmerged model (or the reverse, or merged into merged)
# gives the right outputs; never ΔW counted twice or not at all.


RTOLS = {torch.float32: 2e-5, torch.float64: 1e-9, torch.bfloat16: 3e-2}


@settings(max_examples=3)
@given(seed=st.integers(0, 50))
@pytest.mark.parametrize("direction", ["merged->unmerged", "unmerged->merged", "merged->merged"])
@pytest.mark.parametrize("dtype,alpha", [(torch.float32, None), (torch.float32, 0.5), (torch.float64, None), (torch.float64, 0.5), (torch.bfloat16, 0.5)])
def test_state_dict_carries_merge_state(direction, dtype, alpha, seed):
    # alpha=0.5 keeps scaling * ΔW comparable to W, so bf16 merge/unmerge rounding stays small
    # while ΔW counted twice (or not at all) stays far outside the tolerance; alpha=None (20 * rank)
    # makes ΔW dominate W.
    src_merged = direction.startswith("merged")
    src = make(values=seed, alpha=alpha).to(dtype)
    params = params64(src)
    ref = reference64(src, params, dtype=dtype)
    base_ref = reference64(src, dtype=dtype, adapted=False)
    x = xs(dtype=dtype)
    rtol = RTOLS[dtype]
    if src_merged:
        randlora.merge(src)
    check_outputs(src, ref, x, rtol, "source")
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in src.state_dict().items()}
    assert ("head._extra_state" in state) == src_merged  # present only while merged

    dst = make(values=seed + 100, alpha=alpha).to(dtype)  # other lam/gam: a load must replace them
    if direction.endswith("->merged"):
        randlora.merge(dst)
    dst.load_state_dict(state)
    assert all(m.merged == src_merged for _, m in adapters(dst))
    check_outputs(dst, ref, x, rtol, f"{direction}: loaded")
    check_weights_consistent(dst, params, dtype)
    randlora.unmerge(dst)  # subtracts exactly what is in the weight
    check_outputs(dst, ref, x, rtol, f"{direction}: after unmerge")
    check_weights_consistent(dst, params, dtype)
    assert not any(m.merged for _, m in adapters(dst))
    if dtype != torch.bfloat16:  # unmerge subtracts what the weight holds: two roundings at most
        base, eps = fresh_tiny().to(dtype), torch.finfo(dtype).eps
        for name, m in adapters(dst):
            w0 = base.get_submodule(name).weight.double()
            assert_close(m.base.weight, w0, 0, atol=2 * eps * (w0.abs().max().item() + ref_layer_delta(m).abs().max().item()))
    randlora.merge(dst)
    check_outputs(dst, ref, x, rtol, f"{direction}: merged again")
    check_weights_consistent(dst, params, dtype)
    with randlora.disable(dst):
        check_outputs(dst, base_ref, x, rtol, f"{direction}: disabled")


def test_state_dict_of_merged_model_differs_from_unmerged():
    """Self-describing: the same lam/gam merged and unmerged give state dicts that differ in
    more than the base weights (the merge state itself is recorded)."""
    a, b = make(), make()
    randlora.merge(a)
    sa, sb = a.state_dict(), b.state_dict()
    weight_keys = {f"{n}.base.weight" for n, _ in adapters(a)}
    other_diff = [k for k in sa if k not in weight_keys and (k not in sb or not torch.equal(sa[k], sb[k]))]
    assert other_diff or set(sa) != set(sb), "merge state is not in the state dict"
    assert {k for k in sa if k.endswith("_extra_state")} == {f"{n}._extra_state" for n, _ in adapters(a)}
    assert not any(k.endswith("_extra_state") for k in sb)


def test_merge_state_partial_and_legacy_loads():
    model = make()
    ref, x = reference64(model), torch.randn(4, 6)
    randlora.merge(model)
    # lam/gam alone (strict=False, PEFT's way) into a merged model: the merge state stays, and the weight holds the
    # loaded update, never the old one (nothing stale); unmerge gives the base weights back.
    other = make(values=9)
    model.load_state_dict(randlora.adapter_state_dict(other), strict=False)
    assert all(m.merged for _, m in randlora.named_adapters(model))
    check_outputs(model, reference64(other), x)
    check_weights_consistent(model, params64(other))
    model.load_state_dict(randlora.adapter_state_dict(make()), strict=False)
    randlora.unmerge(model)
    check_weights_consistent(model, params64(model))
    check_outputs(model, ref, x)
    # A state dict without merge state (unmerged, or from randlora <= 0.2) loads strictly into a
    # merged model and leaves it unmerged with the loaded (unmerged) weights.
    plain_state = make().state_dict()
    assert not any(k.endswith("_extra_state") for k in plain_state)
    randlora.merge(model)
    model.load_state_dict(plain_state)
    assert not any(m.merged for _, m in randlora.named_adapters(model))
    check_outputs(model, ref, x)


@pytest.mark.parametrize(
    "bad",
    [torch.ones(3), torch.zeros(2), torch.tensor([2.0]), torch.ones(1, 1), "merged", torch.tensor([1.0, float("nan")])],
)
def test_bad_merge_state_is_refused_before_the_layer_changes(bad):
    src = make()
    randlora.merge(src)
    state = dict(src.state_dict())
    state["head._extra_state"] = bad
    model = make(values=9)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="head.*merge state"):
        model.load_state_dict(state)
    assert torch.equal(model.head.lam, snap[0]["head.lam"]) and torch.equal(model.head.base.weight, snap[0]["head.base.weight"])
    assert not model.head.merged


def test_merged_state_inside_disable_is_refused():
    src = make()
    randlora.merge(src)
    model = make()
    with randlora.disable(model):
        with pytest.raises(ValueError, match="disable"):
            model.load_state_dict(src.state_dict())


def _adapted_mha():
    """An MHA (kdim 12, vdim 10) adapted with random lam/gam, its inputs and its unmerged outputs."""
    torch.manual_seed(0)
    model = MhaHolder(kdim=12, vdim=10).eval()
    randlora.inject(model, ["attn"], 4, alpha=8.0)
    for i, (_, ad) in enumerate(randlora.named_adapters(model)):
        randomize_(ad, i)
    inp = mha_inputs(True, 12, 10)
    with torch.no_grad():
        want = model(*inp)
    return model, inp, want


def test_mha_state_dict_carries_merge_state():
    """model.state_dict() of a merged/unmerged MHA adapter loads into a model in the other state
    with the right outputs (the in-projection's stored weight sits beside its RandLoraWeight)."""
    model, inp, want = _adapted_mha()
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


@pytest.mark.parametrize("kind", ["linear", "mha"])
def test_a_merge_state_loaded_without_its_weight_never_marks_a_layer_merged(kind):
    """A merge state describes the weight saved with it. A merged model's adapter entries alone (lam, gam, merge
    state; strict=False) carry no weight: into an unmerged model they are new values, and it stays unmerged; into a
    merged one the held weight is re-merged with them. Either way the model computes base + s ΔW(loaded), against the
    float64 reference, and unmerge gives the base back."""
    def build(values):
        torch.manual_seed(0)
        model = MhaHolder(kdim=12, vdim=10).eval() if kind == "mha" else fresh_tiny().eval()
        before = copy.deepcopy(model)
        randlora.inject(model, ["attn"] if kind == "mha" else TARGETS, 4, alpha=8.0)
        for i, (_, ad) in enumerate(randlora.named_adapters(model)):
            randomize_(ad, values + i)
        return model, before

    inp = mha_inputs(True, 12, 10) if kind == "mha" else (xs(),)
    src, before = build(values=1)
    randlora.merge(src)
    entries = {k: v for k, v in src.state_dict().items() if k.endswith(("lam", "gam", "_extra_state"))}
    assert any(k.endswith("_extra_state") for k in entries)
    assert not any(k.endswith(("weight", "original")) for k in entries)
    for merged_before in (False, True):
        model, _ = build(values=7)
        if merged_before:
            randlora.merge(model)
        model.load_state_dict(entries, strict=False)
        assert [ad.merged for _, ad in adapters(model)] == [merged_before] * len(adapters(model))
        with torch.no_grad():
            want = reference_copy(before, model)(*(t.double() for t in inp))
            assert_close(model(*inp), want, 2e-5, what=f"merged before: {merged_before}")
            randlora.unmerge(model)
            assert_close(model(*inp), want, 2e-5, what="unmerged")
            with randlora.disable(model):
                assert_close(model(*inp), before(*inp), 2e-5, what="the base model")


# =============================================================================
# Copies of a model are independent (issue 19.5, "another model changed")


def _copyable(kind: str):
    """(adapted model in eval, its base before inject (frozen), inputs)."""
    torch.manual_seed(0)
    if kind == "linear":
        model, targets, inp = fresh_tiny(), ALL, (xs(),)
    else:
        kv = dict(kdim=12, vdim=10) if kind == "mha-kv" else {}
        model, targets, inp = MhaHolder(**kv), ["attn", "head"], mha_inputs(True, **kv)
    before = copy.deepcopy(model).requires_grad_(False).eval()
    randlora.inject(model, targets, 3, alpha=6.0)
    randomize_model_(model, 4)
    return model.eval(), before, inp


VERBS = {"eject": randlora.eject, "merge": randlora.merge, "unmerge": randlora.unmerge}  # and disable: a context


@pytest.mark.parametrize("verb", ["eject", "merge", "unmerge", "disable"])
@pytest.mark.parametrize("kind", ["mha", "mha-kv", "linear"])
def test_deepcopy_then_a_verb_never_changes_the_other_copy(kind, verb):
    """``c = copy.deepcopy(m)``; eject / merge / unmerge / disable on one copy leaves the other bitwise
    as it was (outputs, state, classes), and the other still computes base + s·ΔW, merges and
    ejects. Both ways round. (0.2: ejecting one copy of a model with an adapted
    nn.MultiheadAttention removed the parametrization from the class both copies share, and the
    other copy lost its ``in_proj_weight``.)"""
    for victim in ("copy", "original"):
        m, before, inp = _copyable(kind)
        if verb == "unmerge":
            randlora.merge(m)
        c = copy.deepcopy(m)
        a, b = (c, m) if victim == "copy" else (m, c)
        with torch.no_grad():
            y = b(*inp)
        snap = snapshot(b)
        cls = {n: type(mod) for n, mod in b.named_modules()}
        if verb == "disable":
            with randlora.disable(a), torch.no_grad():
                a(*inp)
                randlora.merge(a)
        else:
            VERBS[verb](a)
        assert_unchanged(b, snap)
        assert {n: type(mod) for n, mod in b.named_modules()} == cls
        with torch.no_grad():
            assert torch.equal(b(*inp), y), f"{victim} {verb}: the other copy's outputs changed"
        # Both copies still work: the verb's copy computes the reference too.
        ref = reference_copy(before, b).eval()
        with torch.no_grad():
            want = ref(*[t.double() for t in inp])
            assert_close(a(*inp), want, 1e-5, what=f"{victim} {verb}: the copy acted on")
            assert_close(b(*inp), want, 1e-5, what=f"{victim} {verb}: the other copy")
        randlora.unmerge(b)
        with torch.no_grad():
            assert_close(b(*inp), want, 1e-5, what=f"{victim} {verb}: the other copy unmerged")
        randlora.merge(b)
        with torch.no_grad():
            assert_close(b(*inp), want, 1e-5, what=f"{victim} {verb}: the other copy merged")
        randlora.eject(b)
        assert not names_of(b) and all(type(p) is nn.Parameter for p in b.parameters())
        if kind != "linear":
            assert type(b.attn) is nn.MultiheadAttention
        with torch.no_grad():
            assert_close(b(*inp), want, 1e-5, what=f"{victim} {verb}: the other copy ejected")
        if verb != "eject":  # and the first one ejects too, whatever happened to the other
            randlora.eject(a)
            with torch.no_grad():
                assert_close(a(*inp), want, 1e-5, what=f"{victim} {verb}: the copy acted on, ejected")


# =============================================================================
# hold_weights at model level


def test_hold_weights_builds_mha_weights_once(monkeypatch):
    """Under hold_weights, nn.MultiheadAttention's repeated reads of its adapted weights build each
    W' once until lam/gam change: same outputs and gradients, bit for bit."""
    torch.manual_seed(0)
    model = MhaHolder()
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
            ads[0].lam.mul_(2)  # an in-place write
        y2, _ = step()
        assert len(builds) == 3 and not torch.equal(y2, y0)


# =============================================================================
# The README's usage snippet runs as written; the runtime needs no numpy


def readme_snippet(section: str) -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index(f"## {section}")
    block = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert block, f"no python block under '## {section}'"
    return block.group(1)


def test_usage_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "usage.py"
    script.write_text(readme_snippet("Usage"))
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "trainable parameters:" in out and "merged, max |Δlogits|:" in out
    assert (tmp_path / "adapter.safetensors").is_file()
    err = float(out.rsplit("merged, max |Δlogits|:", 1)[1].split()[0])
    assert err < 1e-4  # merge is float32 arithmetic on the same ΔW


def test_runtime_smoke_without_numpy():
    # inject, train, save and load without numpy (CI also runs this script in a fresh venv with
    # only torch and `pip install .`).
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtime_smoke.py")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "runtime smoke ok" in done.stdout and "no numpy" in done.stdout


@pytest.mark.parametrize("merged", [False, True])
def test_copy_or_pickle_inside_disable_is_refused(merged):
    """A copy taken inside disable() would stay disabled for ever (only the original's context enables it again): refused,
    naming the layer, for adapters and modules to save; outside the context a copy computes as the model."""
    import io

    model = fresh_tiny()
    randlora.inject(model, TARGETS, rank=2, seed=0, modules_to_save=["block.2"])
    randomize_model_(model, 1)
    model.eval()
    if merged:
        randlora.merge(model)
    x = torch.randn(3, 6)
    with torch.no_grad():
        y = model(x)
    with randlora.disable(model):
        before = snapshot(model)
        for copy_it in (copy.deepcopy, lambda m: torch.save(m, io.BytesIO())):
            with pytest.raises(RuntimeError, match=r"cannot copy or pickle '(embed|block\.2)' inside randlora\.disable"):
                copy_it(model)
            assert_unchanged(model, before)
        with pytest.raises(RuntimeError, match=r"'block\.2' inside"):
            copy.deepcopy(model.block[2])
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin(x), y) and torch.equal(model(x), y)
    assert all(m.merged == merged and not m.disabled for _, m in randlora.named_adapters(twin))


# =============================================================================
# A sixth review: caches keyed by identity, inference mode, modules to save kept in order


def test_hold_weights_never_serves_the_w_of_a_tensor_that_reused_a_freed_address():
    """A new nn.Parameter assigned to the base weight or lam may land where a freed one was, at version 0: the held
    W' is keyed by the tensors themselves, so the layer computes with the new values every time."""
    torch.manual_seed(0)
    model = randlora.inject(nn.Sequential(nn.Linear(64, 64)), ["0"], rank=8, strategy="build")
    layer, x = model[0], torch.randn(8, 64)
    with torch.no_grad():
        layer.lam.normal_(0, 0.1)

    def new(i: int) -> None:
        if i % 2:
            layer.lam = nn.Parameter(torch.randn(layer.lam.shape))
        else:
            layer.base.weight = nn.Parameter(torch.randn(64, 64), requires_grad=False)

    with randlora.hold_weights(model):
        for i in range(40):
            new(i)
            model(x)  # holds W' of these tensors
            new(i)
            new(i)  # often at the address the first one had, freed by the second
            want = x.double() @ (base_weight64(layer) + ref_layer_delta(layer)).t() + layer.base.bias.double()
            assert_close(model(x), want, 1e-5, what=f"step {i}")


def test_inference_mode_leaves_the_shared_bases_usable_for_training():
    """Bases first materialized inside torch.inference_mode (an eval pass, or a serving model adapted there) are
    cached for every model of the same settings: they must be normal tensors, or training anywhere fails."""
    net = lambda: nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))  # noqa: E731
    x = torch.randn(4, 16)
    model = randlora.inject(net(), ["0", "2"], rank=4, seed=31)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().sum().backward()
    with torch.inference_mode():
        serving = randlora.inject(net(), ["0", "2"], rank=2, seed=37)
    trained = randlora.inject(net(), ["0", "2"], rank=2, seed=37)
    trained(x).sum().backward()
    assert serving[0]._bases is trained[0]._bases and trained[0].lam.grad is not None


def test_modules_to_save_keep_original_before_trained():
    """The state dict and parameter order of a module to save (an optimizer's state is matched by order)."""
    model = randlora.inject(fresh_tiny(), ["block.0"], rank=2, modules_to_save=["head"])
    assert list(model.head._modules) == ["original", "trained"]
    names = [n for n in model.state_dict() if n.startswith("head.")]
    assert names == sorted(names, key=lambda n: "trained" in n)


def test_a_refused_copy_of_one_module_to_save_leaves_every_flag_as_it_was():
    class NoCopy(nn.Linear):
        def __deepcopy__(self, memo):
            raise TypeError("cannot deepcopy NoCopy")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), NoCopy(8, 8), nn.Linear(8, 8))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(TypeError, match="cannot deepcopy NoCopy"):
        randlora.inject(model, ["3"], rank=2, modules_to_save=["1", "2"])
    assert [type(m) for m in model] == [nn.Linear, nn.LayerNorm, NoCopy, nn.Linear]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_summary_rows_count_what_trains():
    model = randlora.inject(fresh_tiny(), ["block.0", "head"], rank=2)
    model.block[0].lam.requires_grad_(False)
    text = randlora.summary(model)
    rows = [int(line.split()[-1].replace(",", "")) for line in text.splitlines()[2:-1]]
    total = int(text.splitlines()[-1].split()[2].replace(",", ""))
    assert sum(rows) == total == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_mha_stays_merged_when_a_state_dict_brings_only_an_unrelated_key():
    """Only the merge state, or the base weight the adapter sits beside, says "unmerged": an unexpected key that
    merely ends like a RandLoraLinear's base weight leaves a merged attention projection merged (its weight
    still holds W + s·ΔW, so calling it unmerged would add the update twice)."""
    model, inp, want = _adapted_mha()
    randlora.merge(model)
    stray = {f"{n}.base.weight": torch.zeros(3) for n, ad in randlora.named_adapters(model) if ".parametrizations." in n}
    assert stray and set(model.load_state_dict(stray, strict=False).unexpected_keys) == set(stray)
    assert all(ad.merged for _, ad in randlora.named_adapters(model))
    randlora.unmerge(model)
    with torch.no_grad():
        assert_close(model(*inp), want, 1e-5, what="unmerged after the stray key")
