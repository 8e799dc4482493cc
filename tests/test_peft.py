"""PEFT interoperability: randlora.from_peft / randlora.to_peft against the real PEFT.

Every comparison runs both libraries on copies of one base model (float32, CPU) and checks
outputs (and gradients) within 1e-5 relative. PEFT initialises lambda to 0, which would make
the comparison vacuous, so the adapters get random non-zero lambda/gamma first.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import randlora  # noqa: E402
from conftest import tiny_llama  # noqa: E402

import peft  # noqa: E402  (test extras: a missing one must fail, not skip)
import transformers  # noqa: E402
from peft import PeftModel, RandLoraConfig, get_peft_model  # noqa: E402
from peft.tuners.randlora.layer import RandLoraLayer  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

RTOL = 1e-5
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
LLAMA_REGEX = r"model\.layers\.\d+\.(self_attn\.(q|k|v)_proj|mlp\.(up|down)_proj)"


# -----------------------------------------------------------------------------
# Models


class MLP(nn.Module):
    """Layers of different shapes (d = 20, 30, 6), an untargeted head and a non-linear module."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(20, 50)
        self.b = nn.Linear(50, 30)
        self.c = nn.Linear(30, 6, bias=False)
        self.act = nn.ReLU()
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c(self.act(self.b(self.act(self.a(x))))))


def _llama() -> nn.Module:
    return tiny_llama(hidden_size=64, intermediate_size=96, vocab_size=128)


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return transformers.GPT2LMHeadModel(cfg)


_BASES: dict[str, nn.Module] = {}


def base_model(kind: str) -> nn.Module:
    """A fresh copy of one fixed random model per kind."""
    if kind not in _BASES:
        torch.manual_seed({"mlp": 1, "llama": 2, "gpt2": 3}[kind])
        _BASES[kind] = {"mlp": MLP, "llama": _llama, "gpt2": _gpt2}[kind]().eval()
    return copy.deepcopy(_BASES[kind])


def batch(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if kind == "mlp":
        return torch.randn(5, 3, 20, generator=g)
    return torch.randint(0, 128, (2, 9), generator=g)


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> None:
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert rel(a, b) <= rtol, rel(a, b)


# -----------------------------------------------------------------------------
# PEFT side


def randomize_peft(pm: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            # Sizes that make the update comparable to the base weights (not 100 times larger,
            # which would make float32 rounding, not the method, dominate the comparison).
            if "randlora_lambda" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "randlora_gamma" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def make_peft_adapter(kind: str, folder, seed: int = 0, **config) -> str:
    config.setdefault("randlora_alpha", 2.0 * config.get("r", 32))
    pm = get_peft_model(base_model(kind), RandLoraConfig(**config))
    randomize_peft(pm, seed)
    pm.save_pretrained(str(folder))
    return str(folder)


def peft_load(kind: str, folder, trainable: bool = False) -> nn.Module:
    return PeftModel.from_pretrained(base_model(kind), str(folder), is_trainable=trainable).eval()


def snapshot(model: nn.Module):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    return state, types, grads


def assert_unchanged(model: nn.Module, snap) -> None:
    state, types, grads = snapshot(model)
    assert types == snap[1]
    assert state.keys() == snap[0].keys()
    assert all(torch.equal(state[k], snap[0][k]) for k in state)
    assert grads == snap[2]


# -----------------------------------------------------------------------------
# PEFT -> ours

PEFT_CASES = {
    # r = 7 divides none of the sizes (20, 30, 6, 50) and exceeds min(in, out) = 6 of layer c.
    "mlp-dense": ("mlp", dict(r=7, target_modules=["a", "b", "c"])),
    "mlp-sparse": ("mlp", dict(r=7, target_modules=["a", "b", "c"], sparse=True)),
    "mlp-very-sparse": ("mlp", dict(r=4, target_modules=["a", "b", "c"], very_sparse=True)),
    "mlp-regen-dense": ("mlp", dict(r=7, target_modules=["a", "b", "c"], save_projection=False)),
    "mlp-regen-sparse": ("mlp", dict(r=7, target_modules=["a", "b", "c"], save_projection=False, sparse=True)),
    "mlp-regen-very-sparse": ("mlp", dict(r=5, target_modules=["a", "b"], save_projection=False, very_sparse=True)),
    "mlp-regex-dropout": ("mlp", dict(r=8, target_modules=r"(a|c)", randlora_dropout=0.1, projection_prng_key=11)),
    "llama": ("llama", dict(r=12, target_modules=LLAMA_TARGETS)),
    "llama-regex": ("llama", dict(r=16, target_modules=LLAMA_REGEX)),
    "llama-regen": ("llama", dict(r=10, target_modules=LLAMA_TARGETS, save_projection=False, projection_prng_key=5)),
    "gpt2": ("gpt2", dict(r=12, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "gpt2-regen": ("gpt2", dict(r=9, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True, save_projection=False)),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_from_peft_matches_peft(case, tmp_path):
    kind, config = PEFT_CASES[case]
    folder = make_peft_adapter(kind, tmp_path / "adapter", **config)
    x = batch(kind)
    with torch.no_grad():
        ref = run(peft_load(kind, folder), x)
        base = run(base_model(kind), x)
        ours = randlora.from_peft(base_model(kind), folder).eval()
        got = run(ours, x)
    assert all(m.dropout.p == config["randlora_dropout"] for _, m in randlora.named_adapters(ours)) if "randlora_dropout" in config else True
    assert rel(ref, base) > 1e-2, rel(ref, base)  # the adapter really changes the output
    assert_close(got, ref)
    layers = dict(randlora.named_adapters(ours))
    assert layers and all(type(m).__name__ == "RandLoraLinear" for m in layers.values())
    if kind == "gpt2":
        assert {m.layout for m in layers.values()} == {"conv1d"}
    # The model is a normal randlora model: only lam/gam train; merge and eject keep the outputs
    # (up to the float32 rounding of adding the update into the weights).
    assert {n.rsplit(".", 1)[-1] for n, p in ours.named_parameters() if p.requires_grad} == {"lam", "gam"}
    with torch.no_grad():
        randlora.merge(ours)
        assert_close(run(ours, x), ref, 1e-4)
        randlora.unmerge(ours)
        assert_close(run(ours, x), ref, 1e-4)
        randlora.eject(ours)
        assert not any(True for _ in randlora.named_adapters(ours))
        assert_close(run(ours, x), ref, 1e-4)


def test_from_peft_regenerated_bases_equal_peft_buffers(tmp_path):
    # save_projection=False: our regenerated bases are PEFT's, value for value.
    for extra in (dict(), dict(sparse=True), dict(very_sparse=True)):
        folder = make_peft_adapter("mlp", tmp_path / str(len(extra) and next(iter(extra))), r=7, target_modules=["a", "b"], save_projection=False, **extra)
        pm = peft_load("mlp", folder)
        ours = randlora.from_peft(base_model("mlp"), folder)
        A, B = ours.a._bases.A, ours.a._bases.B
        assert torch.equal(A, pm.base_model.randlora_A["default"][:, 0].float())
        assert torch.equal(B, pm.base_model.randlora_B["default"].float())


def test_training_after_from_peft_matches_peft_gradients(tmp_path):
    folder = make_peft_adapter("llama", tmp_path / "adapter", r=12, target_modules=LLAMA_TARGETS)
    x = batch("llama")
    pm = peft_load("llama", folder, trainable=True).train()
    ours = randlora.from_peft(base_model("llama"), folder).train()
    w = torch.randn(2, 9, 128, generator=torch.Generator().manual_seed(3))
    (run(pm, x) * w).sum().backward()
    (run(ours, x) * w).sum().backward()
    peft_params = dict(pm.named_parameters())
    checked = 0
    for name, m in randlora.named_adapters(ours):
        for mine, theirs in ((m.lam, "randlora_lambda"), (m.gam, "randlora_gamma")):
            ref = peft_params[f"base_model.model.{name}.{theirs}.default"].grad
            assert ref is not None and mine.grad is not None
            assert_close(mine.grad, ref)
            checked += 1
    assert checked == 2 * 5 * 2
    assert all(p.grad is None for n, p in ours.named_parameters() if not n.endswith((".lam", ".gam")))
    # One identical SGD step on both keeps them equal.
    for params in ([p for p in pm.parameters() if p.requires_grad], [p for p in ours.parameters() if p.requires_grad]):
        torch.optim.SGD(params, lr=1e-2).step()
    with torch.no_grad():
        assert_close(run(ours.eval(), x), run(pm.eval(), x))


# -----------------------------------------------------------------------------
# ours -> PEFT

OURS_CASES = {
    "mlp-dense": ("mlp", ["a", "b", "c"], dict(rank=5, seed=3)),
    # widths 20 and 30 are multiples of the rank: our sparse A is then one shared prefix, as PEFT needs
    "mlp-sparse": ("mlp", ["a", "b"], dict(rank=5, seed=1, bases="sparse", alpha=9.5)),
    "llama": ("llama", LLAMA_TARGETS, dict(rank=12, seed=4)),
    "llama-very-sparse": ("llama", LLAMA_TARGETS, dict(rank=16, seed=2, bases="very_sparse")),
    "gpt2": ("gpt2", ["c_attn", "c_fc"], dict(rank=12, seed=0)),
    "gpt2-dropout": ("gpt2", ["attn.c_proj", "c_fc"], dict(rank=10, seed=8, dropout=0.1)),
}


def ours_adapted(kind: str, targets, seed: int = 0, **kw) -> nn.Module:
    model = randlora.inject(base_model(kind), targets, **kw)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for _, m in randlora.named_adapters(model):
            m.lam.copy_(torch.randn(m.lam.shape, generator=g) * 0.2)
            m.gam.copy_(torch.randn(m.gam.shape, generator=g) * 0.01)
    return model.eval()


@pytest.mark.parametrize("case", list(OURS_CASES))
def test_to_peft_loads_in_peft(case, tmp_path):
    kind, targets, kw = OURS_CASES[case]
    ours = ours_adapted(kind, targets, **kw)
    folder = tmp_path / "out"
    randlora.to_peft(ours, folder)
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "RANDLORA" and cfg["save_projection"] is True and cfg["r"] == kw["rank"]
    assert cfg["fan_in_fan_out"] is (kind == "gpt2")
    assert cfg["randlora_dropout"] == kw.get("dropout", 0.0) and cfg["base_model_name_or_path"] is None
    x = batch(kind)
    with torch.no_grad():
        got = run(ours, x)
        pm = peft_load(kind, folder)
        ref = run(pm, x)
        assert rel(got, run(base_model(kind), x)) > 1e-2, rel(got, run(base_model(kind), x))
    assert_close(ref, got)
    # PEFT adapted exactly our layers (the regex of exact names), with our lam/gam.
    peft_layers = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, RandLoraLayer)}
    ours_layers = dict(randlora.named_adapters(ours))
    assert peft_layers == set(ours_layers)
    for name, m in ours_layers.items():
        peft_layer = pm.get_submodule(f"base_model.model.{name}")
        assert torch.equal(peft_layer.randlora_lambda["default"], m.lam)
        assert torch.equal(peft_layer.randlora_gamma["default"], m.gam)
    # The stored bases are sized as PEFT sizes them (element-wise max of (out, in) over the targets).
    tensors = load_file(folder / "adapter_model.safetensors")
    O = max(m.out_features for m in ours_layers.values())
    I = max(m.in_features for m in ours_layers.values())
    n_max = -(-min(O, I) // kw["rank"])
    assert tensors["base_model.randlora_A"].shape == (kw["rank"], 1, min(O, I))
    assert tensors["base_model.randlora_B"].shape == (max(O, I), n_max, kw["rank"])


def test_to_peft_refuses_sparse_bases_peft_cannot_express(tmp_path):
    # Our sparse A is chosen per layer width (full rank); PEFT slices one A for every layer, which
    # cannot hold A for widths 20 and 30 (and the 50 it is sized for) at rank 7. Refused, and nothing is written.
    ours = ours_adapted("mlp", ["a", "b"], rank=7, seed=1, bases="sparse")
    with pytest.raises(ValueError, match="min\\(in, out\\) = [0-9]+.*save_adapter"):
        randlora.to_peft(ours, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("case", ["mlp-dense", "mlp-sparse", "llama-very-sparse", "gpt2"])
def test_round_trip_ours_to_peft_to_ours(case, tmp_path):
    kind, targets, kw = OURS_CASES[case]
    ours = ours_adapted(kind, targets, **kw)
    randlora.to_peft(ours, tmp_path / "out")
    back = randlora.from_peft(base_model(kind), tmp_path / "out").eval()
    x = batch(kind)
    with torch.no_grad():
        assert_close(run(back, x), run(ours, x))
    mine, theirs = dict(randlora.named_adapters(ours)), dict(randlora.named_adapters(back))
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name].lam, theirs[name].lam) and torch.equal(mine[name].gam, theirs[name].gam)
        assert mine[name].scaling == theirs[name].scaling and mine[name].layout == theirs[name].layout
        A1, B1 = mine[name]._bases.dense(mine[name].D, mine[name].d)
        A2, B2 = theirs[name]._bases.dense(theirs[name].D, theirs[name].d)
        assert torch.equal(A1, A2) and torch.equal(B1, B2)
    # ... and back to PEFT again (explicit bases), still the same model, same flags.
    randlora.to_peft(back, tmp_path / "again")
    first = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    second = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert first == second
    with torch.no_grad():
        assert_close(run(peft_load(kind, tmp_path / "again"), x), run(ours, x))


def test_peft_to_ours_to_peft(tmp_path):
    folder = make_peft_adapter("gpt2", tmp_path / "a", r=12, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, sparse=True, projection_prng_key=3)
    ours = randlora.from_peft(base_model("gpt2"), folder)
    randlora.to_peft(ours, tmp_path / "b")
    a, b = load_file(f"{folder}/adapter_model.safetensors"), load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].float(), b[k]) for k in a)
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert cfg["sparse"] is True and cfg["very_sparse"] is False and cfg["projection_prng_key"] == 3


def test_to_peft_overwrites_atomically(tmp_path):
    ours = ours_adapted("mlp", ["a", "b"], rank=4)
    folder = tmp_path / "out"
    randlora.to_peft(ours, folder)
    with torch.no_grad():
        ours.a.lam.add_(1.0)
    randlora.to_peft(ours, folder)  # over an existing adapter
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]  # no temp files left
    assert torch.equal(load_file(folder / "adapter_model.safetensors")["base_model.model.a.randlora_lambda"], ours.a.lam.detach())


def test_to_peft_refusals(tmp_path):
    with pytest.raises(ValueError, match="no RandLoRA layers"):
        randlora.to_peft(base_model("mlp"), tmp_path / "x")
    # very_sparse bases use each layer's own sparsity: not expressible when min(in, out) differs.
    ours = randlora.inject(base_model("mlp"), ["a", "b"], 4, bases="very_sparse")
    with pytest.raises(ValueError, match="very_sparse"):
        randlora.to_peft(ours, tmp_path / "x")

    class LinearLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.in_features, self.out_features = 8, 8
            self.inner = nn.Linear(8, 8)

        def forward(self, x):
            return self.inner(x)

    model = nn.Sequential(LinearLike())
    randlora.inject(model, ["0"], 4)
    with pytest.raises(ValueError, match="only nn.Linear, Conv1D and bitsandbytes"):
        randlora.to_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists() or not os.listdir(tmp_path / "x")


# -----------------------------------------------------------------------------
# Refusals: a clear ValueError, and the model left exactly as it was


@pytest.fixture
def good(tmp_path):
    return make_peft_adapter("mlp", tmp_path / "good", r=7, target_modules=["a", "b", "c"])


def edit_config(folder, **changes) -> None:
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    for k, v in changes.items():
        if v is KeyError:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    with open(path, "w") as f:
        json.dump(cfg, f)


def edit_weights(folder, fn) -> None:
    path = os.path.join(folder, "adapter_model.safetensors")
    tensors = fn({k: v.clone() for k, v in load_file(path).items()})
    save_file(tensors, path)


def expect_refusal(folder, match: str, model: nn.Module | None = None, error=ValueError) -> None:
    model = base_model("mlp") if model is None else model
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        randlora.from_peft(model, folder)
    assert_unchanged(model, snap)


CONFIG_REFUSALS = {
    "peft_type": (dict(peft_type="LORA"), "peft_type is 'LORA'"),
    "layers_to_transform": (dict(layers_to_transform=[0]), "layers_to_transform"),
    "layers_pattern": (dict(layers_pattern="layers"), "layers_pattern"),
    "modules_to_save": (dict(modules_to_save=["head"]), "modules_to_save"),
    "bias": (dict(bias="all"), "bias='all'"),
    "rank_pattern": (dict(rank_pattern={"a": 4}), "rank_pattern"),
    "alpha_pattern": (dict(alpha_pattern={"a": 4}), "alpha_pattern"),
    "exclude_modules": (dict(exclude_modules=["b"]), "exclude_modules"),
    "all-linear": (dict(target_modules="all-linear"), "all-linear"),
    "no-targets": (dict(target_modules=None), "target_modules must be"),
    "bad-regex": (dict(target_modules="(a"), "not a valid regular expression"),
    "r": (dict(r=0), "rank must be a positive int"),
    "alpha": (dict(randlora_alpha="big"), "randlora_alpha must be"),
    "dropout": (dict(randlora_dropout=1.5), "dropout must be in"),
    "flag": (dict(sparse="yes"), "sparse must be true or false"),
    "prng-key": (dict(projection_prng_key=2**70), "not a valid torch seed"),
    "target-missing": (dict(target_modules=["zzz"]), "matches no module"),
    "target-not-linear": (dict(target_modules=["a", "act"]), "'act' is a ReLU, not a linear layer"),
    "fewer-targets": (dict(target_modules=["a", "b"]), "unexpected keys .*base_model.model.c.randlora_gamma"),
    "more-targets": (dict(target_modules=["a", "b", "c", "head"]), "missing keys .*base_model.model.head.randlora_gamma"),
    # PEFT regenerates bases but the file holds them: refused rather than silently ignored.
    "projection-off": (dict(save_projection=False), "unexpected keys .*randlora_A"),
}


@pytest.mark.parametrize("case", list(CONFIG_REFUSALS))
def test_from_peft_refuses_config(case, good):
    changes, match = CONFIG_REFUSALS[case]
    edit_config(good, **changes)
    expect_refusal(good, match)


def _set(key, value):
    def fn(t):
        t[key] = value(t[key]) if callable(value) else value
        return t

    return fn


def _drop(*keys):
    def fn(t):
        for k in keys:
            del t[k]
        return t

    return fn


WEIGHT_REFUSALS = {
    "missing-gamma": (_drop("base_model.model.b.randlora_gamma"), "missing keys base_model.model.b.randlora_gamma"),
    "missing-all-bases": (
        _drop(*[f"{p}.randlora_{s}" for p in ("base_model", "base_model.model.a", "base_model.model.b", "base_model.model.c") for s in "AB"]),
        "missing keys .*save_projection=true",
    ),
    "missing-one-layer-copy": (_drop("base_model.model.c.randlora_B"), "missing keys base_model.model.c.randlora_B"),
    "unexpected-key": (_set("base_model.model.a.extra", torch.zeros(2)), "unexpected keys base_model.model.a.extra"),
    "other-adapter-name": (_set("base_model.model.a.randlora_lambda.other", torch.zeros(7, 3)), "unexpected keys"),
    "unknown-layer": (_set("base_model.model.zz.randlora_lambda", torch.zeros(7, 3)), "unexpected keys base_model.model.zz"),
    "lambda-shape": (_set("base_model.model.a.randlora_lambda", torch.zeros(7, 4)), r"randlora_lambda has shape \(7, 4\), expected \(7, 3\)"),
    "gamma-shape": (_set("base_model.model.b.randlora_gamma", torch.zeros(5, 29)), r"randlora_gamma has shape \(5, 29\), expected \(5, 30\)"),
    # d_max = min of the element-wise max (50, 50): larger than every layer's own min(in, out).
    "A-shape": (_set("base_model.randlora_A", lambda t: t[:, :, :-1].contiguous()), r"base_model.randlora_A has shape \(7, 1, 49\), expected \(7, 1, 50\)"),
    "B-shape": (_set("base_model.model.a.randlora_B", lambda t: t[:-1].contiguous()), r"randlora_B has shape \(49, 8, 7\), expected \(50, 8, 7\)"),
    "nan": (_set("base_model.model.b.randlora_gamma", lambda t: t.index_fill(1, torch.tensor([3]), float("nan"))), "NaN or Inf"),
    "inf": (_set("base_model.randlora_B", lambda t: t.index_fill(0, torch.tensor([3]), float("inf"))), "NaN or Inf"),
    "int": (_set("base_model.model.a.randlora_lambda", torch.zeros(7, 3, dtype=torch.int32)), "floating-point"),
    "copies-differ": (_set("base_model.model.b.randlora_A", lambda t: t * 2), "stored copies of the shared bases differ"),
}


@pytest.mark.parametrize("case", list(WEIGHT_REFUSALS))
def test_from_peft_refuses_weights(case, good):
    fn, match = WEIGHT_REFUSALS[case]
    edit_weights(good, fn)
    expect_refusal(good, match)


def test_from_peft_refuses_files_and_models(good, tmp_path):
    # Folder problems.
    expect_refusal(tmp_path / "nowhere", "no PEFT adapter folder", error=FileNotFoundError)
    expect_refusal(os.path.join(good, "adapter_model.safetensors"), "is a file")
    multi = tmp_path / "multi"
    for name in ("first", "second"):
        make_peft_adapter("mlp", multi / name, r=7, target_modules=["a"])
    expect_refusal(multi, "several PEFT adapters")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(open(os.path.join(good, "adapter_config.json")).read())
    (pickled / "adapter_model.bin").write_bytes(b"\x80")
    expect_refusal(pickled, "pickle files are not read")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "adapter_config.json").write_text(open(os.path.join(good, "adapter_config.json")).read())
    data = open(os.path.join(good, "adapter_model.safetensors"), "rb").read()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    expect_refusal(truncated, "not a readable safetensors file")
    (truncated / "adapter_model.safetensors").write_bytes(data)
    (truncated / "adapter_config.json").write_text("{not json")
    expect_refusal(truncated, "not valid JSON")
    # Model problems: a model with another shape, an already adapted model.
    wrong = base_model("mlp")
    wrong.b = nn.Linear(50, 31)
    expect_refusal(good, r"randlora_gamma has shape \(5, 30\), expected \(5, 31\)|randlora_A has shape", model=wrong)
    adapted = randlora.inject(base_model("mlp"), ["a"], 4)
    expect_refusal(good, "already has RandLoRA layers", model=adapted)
    with pytest.raises(ValueError, match="draw_dtype"):
        randlora.from_peft(base_model("mlp"), good, draw_dtype=torch.float32)


def test_from_peft_accepts_shared_or_per_layer_bases_only(good):
    # PEFT loads either layout (all copies are one shared buffer); so do we.
    x = batch("mlp")
    with torch.no_grad():
        ref = run(peft_load("mlp", good), x)
    full = load_file(os.path.join(good, "adapter_model.safetensors"))
    for keep in ("shared", "per-layer"):
        def fn(t, keep=keep):
            return {k: v for k, v in t.items() if not k.endswith(("randlora_A", "randlora_B")) or k.startswith("base_model.model.") == (keep == "per-layer")}

        save_file(full, os.path.join(good, "adapter_model.safetensors"))
        edit_weights(good, fn)
        with torch.no_grad():
            assert_close(run(randlora.from_peft(base_model("mlp"), good), x), ref)


def test_from_peft_draw_dtype_changes_regenerated_bases(tmp_path):
    # The dense draw depends on the dtype PEFT picked (bf16 where available, else fp16): the file
    # does not say, draw_dtype chooses.
    folder = make_peft_adapter("mlp", tmp_path / "a", r=7, target_modules=["a", "b"], save_projection=False)
    bf = randlora.from_peft(base_model("mlp"), folder, draw_dtype=torch.bfloat16).a._bases.A
    fp = randlora.from_peft(base_model("mlp"), folder, draw_dtype=torch.float16).a._bases.A
    auto = randlora.from_peft(base_model("mlp"), folder).a._bases.A
    assert not torch.equal(bf, fp)
    assert torch.equal(auto, bf)  # a CPU-only machine: accelerate.is_bf16_available() is True
