"""Config: RandLoraConfig's validation, inject's keywords beside config=, retired spellings, and what a directly
built RandLoraLinear accepts (a config, a rank that fits) and does to its base (freezes it)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

import randlora
from conftest import assert_close, assert_unchanged, base_weight64, fresh_tiny, randomize_, randomize_model_, ref_layer_delta, snapshot

ALL = ["embed", "block.0", "block.2", "head"]


def _adapted(seed: int = 0) -> nn.Module:
    """TinyNet adapted on three layers, random non-zero lam/gam, eval mode."""
    model = fresh_tiny()
    randlora.inject(model, ["embed", "block.0", "head"], rank=2, seed=seed)
    randomize_model_(model, 5)
    return model.eval()


def _strategies(model: nn.Module) -> list[tuple[str, str]]:
    return [(n, m.strategy) for n, m in randlora.named_adapters(model)]


# -----------------------------------------------------------------------------
# Bad settings: refused with a message naming the field, model unchanged


BAD = [
    (dict(rank=0), "rank"),
    (dict(rank=-2), "rank"),
    (dict(rank=1.5), "rank"),
    (dict(rank=True), "rank"),
    (dict(rank="2"), "rank"),
    (dict(rank=2, seed=-1), "seed"),
    (dict(rank=2, seed=1.0), "seed"),
    (dict(rank=2, alpha=0), "alpha"),
    (dict(rank=2, alpha=-3.0), "alpha"),
    (dict(rank=2, alpha=float("nan")), "alpha"),
    (dict(rank=2, alpha=float("inf")), "alpha"),
    (dict(rank=2, alpha=True), "alpha"),
    (dict(rank=2, alpha="1"), "alpha"),
    (dict(rank=2, dropout=-0.1), "dropout"),
    (dict(rank=2, dropout=1.0), "dropout"),
    (dict(rank=2, dropout=True), "dropout"),
    (dict(rank=2, dropout=float("nan")), "dropout"),
    (dict(rank=2, bases="gaussian"), "bases"),
    (dict(rank=2, bases=None), "bases"),
    (dict(rank=2, strategy="fast"), "strategy"),
]


@pytest.mark.parametrize("kwargs,pattern", BAD, ids=[f"{k}" for k, _ in BAD])
def test_bad_config(kwargs, pattern):
    model = fresh_tiny()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=pattern):
        randlora.inject(model, ALL, **kwargs)
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match=pattern):  # the same check, on the config itself
        randlora.RandLoraConfig(**kwargs)


@pytest.mark.parametrize("bad", ["factorised", "Build", "merged ", "", None, 1])
def test_misspelled_strategy(bad):
    with pytest.raises(ValueError, match="strategy"):
        randlora.inject(fresh_tiny(), ["head"], rank=2, strategy=bad)
    model = _adapted()
    snap, strategies = snapshot(model), _strategies(model)
    with pytest.raises(ValueError, match="strategy"):  # refused when set, never silently factorized later
        model.head.strategy = bad
    assert_unchanged(model, snap)
    assert _strategies(model) == strategies


# -----------------------------------------------------------------------------
# Retired spellings (0.3): each refused with a message naming the new one


def test_retired_path_keyword_names_strategy():
    model = fresh_tiny()
    snap = snapshot(model)
    with pytest.raises(TypeError, match=r"path.*strategy="):
        randlora.inject(model, ["head"], rank=2, path="build")
    assert_unchanged(model, snap)


def test_retired_merged_strategy_names_build():
    with pytest.raises(ValueError, match="'build'"):
        randlora.RandLoraConfig(rank=2, strategy="merged")
    model = fresh_tiny()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="'build'"):
        randlora.inject(model, ["head"], rank=2, strategy="merged")
    assert_unchanged(model, snap)
    model = _adapted()
    snap, strategies = snapshot(model), _strategies(model)
    with pytest.raises(ValueError, match="'build'"):
        model.head.strategy = "merged"
    assert_unchanged(model, snap)
    assert _strategies(model) == strategies


def test_retired_path_attribute_names_strategy():
    layer = _adapted().head
    with pytest.raises(AttributeError, match=r"\.strategy"):
        layer.path  # noqa: B018


# -----------------------------------------------------------------------------
# inject's keywords beside config= (issue 19.2): a keyword that disagrees with the config is refused, naming both


CONFLICTS = [
    ("rank", 2, "4"),
    ("seed", 7, "0"),
    ("alpha", 3.0, "80.0"),
    ("dropout", 0.1, "0.0"),
    ("bases", "sparse", "'dense'"),
    ("strategy", "build", "'auto'"),
]


@pytest.mark.parametrize("field,value,config_value", CONFLICTS, ids=[c[0] for c in CONFLICTS])
def test_inject_keyword_disagreeing_with_config_refused(field, value, config_value):
    model = fresh_tiny()
    snap = snapshot(model)
    config = randlora.RandLoraConfig(rank=4)
    with pytest.raises(ValueError) as e:
        randlora.inject(model, ["block.0"], config=config, **{field: value})
    msg = str(e.value)
    assert f"{field}={value!r}" in msg and f"config.{field}={config_value}" in msg, msg
    assert_unchanged(model, snap)


@pytest.mark.parametrize("args", [(2,), (4, 7)], ids=["rank", "seed"])
def test_inject_positional_rank_or_seed_disagreeing_with_config_refused(args):
    model = fresh_tiny()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"rank=2 and config\.rank=4" if len(args) == 1 else r"seed=7 and config\.seed=0"):
        randlora.inject(model, ["block.0"], *args, config=randlora.RandLoraConfig(rank=4))
    assert_unchanged(model, snap)


@pytest.mark.parametrize(
    "given",
    [dict(rank=4), dict(seed=0), dict(alpha=80.0), dict(alpha=80), dict(alpha=None), dict(dropout=0.0), dict(bases="dense"),
     dict(strategy="auto"), dict(rank=4, seed=0, alpha=80.0, dropout=0, bases="dense", strategy="auto")],
    ids=str,
)
def test_inject_keyword_agreeing_with_config_accepted(given):
    """A keyword equal to the config's value is no conflict (alpha=None is the config's default, 20 * rank)."""
    config = randlora.RandLoraConfig(rank=4)
    model = randlora.inject(fresh_tiny(), ["block.0"], config=config, **given)
    assert [(n, m.config) for n, m in randlora.named_adapters(model)] == [("block.0", config)]


def test_inject_needs_a_rank_or_a_config():
    model = fresh_tiny()
    snap = snapshot(model)
    with pytest.raises(TypeError, match="rank"):
        randlora.inject(model, ["head"], seed=3)
    with pytest.raises(TypeError, match="RandLoraConfig"):
        randlora.inject(model, ["head"], config=dict(rank=2))
    assert_unchanged(model, snap)


# -----------------------------------------------------------------------------
# set_config: a layer's own settings (dropout, strategy) change; what inject would refuse is refused


@pytest.mark.parametrize("bad", [dict(rank=2, dropout=0.1), "dropout=0.1", None], ids=repr)
def test_set_config_needs_a_config(bad):
    model = _adapted()
    snap = snapshot(model)
    with pytest.raises(TypeError, match=r"RandLoraConfig\(rank=4\)"):
        model.head.set_config(bad)
    assert_unchanged(model, snap)


def test_set_config_keeps_the_shared_settings():
    model = _adapted()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"'head'.*\(rank, alpha, seed, bases\) must stay"):
        model.head.set_config(randlora.RandLoraConfig(rank=3))
    assert_unchanged(model, snap)
    model.head.set_config(randlora.RandLoraConfig(rank=2, seed=0, dropout=0.25, strategy="build"))
    assert model.head.dropout.p == 0.25 and model.head.strategy == "build"


@pytest.mark.parametrize("where", ["mha", "encoder"])
def test_set_config_refuses_dropout_where_inject_does(where):
    """A layer whose parent reads its weight (MHA's out_proj; an nn.TransformerEncoderLayer's linear1 on its fast
    path) never sees its input: dropout there is refused by set_config as by inject, naming the layer and why."""

    def build() -> tuple[nn.Module, str]:
        if where == "mha":
            return nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True)), "0"
        layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
        return nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), "layers.0.linear1"

    fresh, target = build()
    with pytest.raises(ValueError, match="dropout"):
        randlora.inject(fresh, [target], rank=2, dropout=0.5)
    model, target = build()
    randlora.inject(model, [target], rank=2)
    layer = model[0].out_proj if where == "mha" else model.layers[0].linear1
    reads = r"'0\.out_proj'.*MultiheadAttention reads out_proj\.weight" if where == "mha" else r"linear1'.*TransformerEncoderLayer reads linear1\.weight"
    snap = snapshot(model)
    with pytest.raises(ValueError, match=reads):
        layer.set_config(dataclasses.replace(layer.config, dropout=0.5))
    assert_unchanged(model, snap)
    layer.set_config(dataclasses.replace(layer.config, strategy="factorized"))  # its other settings still change
    assert layer.strategy == "factorized"


# -----------------------------------------------------------------------------
# A directly built RandLoraLinear (issue 19.10)


@pytest.mark.parametrize("config", [4, dict(rank=4), None, "rank=4"], ids=repr)
def test_randloralinear_needs_a_config(config):
    base = nn.Linear(8, 8)
    w = base.weight.detach().clone()
    with pytest.raises(TypeError, match=r"RandLoraConfig\(rank=4\)"):
        randlora.RandLoraLinear(base, config)
    assert torch.equal(base.weight, w) and base.weight.requires_grad and base.bias.requires_grad  # untouched


@pytest.mark.parametrize("rank,in_f,out_f", [(0, 8, 4), (-1, 8, 4), (5, 8, 4), (9, 4, 8)])
def test_randloralinear_direct_bad_rank(rank, in_f, out_f):
    base = nn.Linear(in_f, out_f)
    w = base.weight.detach().clone()
    with pytest.raises(ValueError, match="rank"):
        randlora.RandLoraLinear(base, randlora.RandLoraConfig(rank=rank, alpha=2.0))
    assert torch.equal(base.weight, w) and base.weight.requires_grad


@pytest.mark.parametrize("shape", [(6, 9), (9, 6)], ids=str)
def test_direct_randloralinear_freezes_its_base_and_an_unfrozen_W_gets_the_full_gradient(shape):
    in_f, out_f = shape
    torch.manual_seed(0)
    layer = randlora.RandLoraLinear(nn.Linear(in_f, out_f).double(), randlora.RandLoraConfig(rank=2, seed=3))
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad
    assert layer.lam.requires_grad and layer.gam.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lam", "gam"]
    randomize_(layer, 1)
    layer.base.weight.requires_grad_(True)  # the user's choice: full fine-tuning of W beside the adapter
    x = torch.randn(5, in_f, dtype=torch.float64)
    dY = torch.randn(5, out_f, dtype=torch.float64)
    y = layer(x)
    y.backward(dY)
    assert_close(y, x @ (base_weight64(layer) + ref_layer_delta(layer)).t() + layer.base.bias.detach(), 1e-12, what="y")
    assert_close(layer.base.weight.grad, dY.t() @ x, 1e-12, what="dW")  # W' = W + s ΔW: dW' / dW is the identity


def test_a_huge_integer_alpha_is_refused_by_the_config_not_by_float():
    with pytest.raises(ValueError, match=r"alpha must be a positive finite number or None, got 1000.*\(401 characters\)"):
        randlora.RandLoraConfig(rank=4, alpha=10**400)
