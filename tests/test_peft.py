"""PEFT interoperability against the real peft package: randlora.from_peft / randlora.to_peft
(PEFT RandLoRA folders) and randlora.to_lora (a PEFT LoRA folder, issue 20).

RandLoRA comparisons run both libraries on copies of one base model (float32, CPU) and check
outputs (and gradients) within 1e-5 relative to max|reference|. PEFT initialises lambda to 0,
which would make the comparison vacuous, so the adapters get random non-zero lambda/gamma first
and every comparison asserts that the adapter moves the output by more than 1e-2.

to_lora is checked against a truncated SVD computed here, in float64, from conftest's independent
float64 ΔW (``ref_layer_delta``, element by element from the index formulas), never from
randlora's own ``delta_weight``: PEFT's LoRA model must compute base + SVD_k(s·ΔW) within 1e-4 of
the output scale (float32 model against a float64 reference), and RandLoRA's own output to 1e-5
once k >= min(in, out) of every layer.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import sys

import pytest
import safetensors
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import peft  # noqa: E402,F401  (test extras: a missing one must fail, not skip)
import transformers  # noqa: E402
from conftest import (
    QNet,  # noqa: E402
    ResidualAttentionBlock,
    arch_base,
    arch_inputs,
    arch_randomize,
    arch_run,
    arch_train_steps,
    assert_fs_unchanged,
    assert_refused,
    assert_unchanged,
    fresh_tiny,
    fs_snapshot,
    randomize_model_,
    ref_layer_delta,
    rel_err,
    snapshot,
    tiny_llama,
)
from peft import PeftModel, RandLoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import LoraLayer  # noqa: E402
from peft.tuners.randlora.layer import RandLoraLayer  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import randlora  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_thread")]

RTOL = 1e-5
MIN_EFFECT = 1e-2  # an adapter must move the output at least this much (relative)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
LLAMA_REGEX = r"model\.layers\.\d+\.(self_attn\.(q|k|v)_proj|mlp\.(up|down)_proj)"
PEFT_W, PEFT_C = "adapter_model.safetensors", "adapter_config.json"


# -----------------------------------------------------------------------------
# Models


class MLP(nn.Module):
    """Layers of different shapes (a: out > in, b and c: out < in; d = 20, 30, 6), an untargeted
    head and a non-linear module."""

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
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=128,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(cfg)


def _roberta() -> nn.Module:
    cfg = transformers.RobertaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=128,
        max_position_embeddings=40, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.RobertaForSequenceClassification(cfg)  # its classifier holds dense and out_proj


class MHANet(nn.Module):
    """An nn.MultiheadAttention (which reads its projections' weights) and a plain linear."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


_BUILDERS = {"mlp": MLP, "llama": _llama, "gpt2": _gpt2, "bert": _bert, "mha": MHANet, "roberta": _roberta}
_BASES: dict[str, nn.Module] = {}


def base_model(kind: str) -> nn.Module:
    """A fresh copy of one fixed random model per kind (float32, eval mode)."""
    if kind not in _BASES:
        torch.manual_seed(sorted(_BUILDERS).index(kind) + 1)
        _BASES[kind] = _BUILDERS[kind]().eval()
    return copy.deepcopy(_BASES[kind])


def batch(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if kind == "mlp":
        return torch.randn(5, 3, 20, generator=g)
    if kind == "mha":
        return torch.randn(2, 5, 16, generator=g)
    return torch.randint(0, 128, (2, 9), generator=g)


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> None:
    """``max|a - b| <= rtol * max|b|``, NaN/Inf failing."""
    assert a.shape == b.shape, (a.shape, b.shape)
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


def ours_adapted(kind: str, targets, seed: int = 0, **kw) -> nn.Module:
    """Our adapter on a fresh base, with random non-zero lam/gam (PEFT's scale, see randomize_peft)."""
    model = randlora.inject(base_model(kind), targets, **kw)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for _, m in randlora.named_adapters(model):
            m.lam.copy_(torch.randn(m.lam.shape, generator=g) * 0.2)
            m.gam.copy_(torch.randn(m.gam.shape, generator=g) * 0.01)
    return model.eval()


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
    if "randlora_dropout" in config:
        assert all(m.dropout.p == config["randlora_dropout"] for _, m in randlora.named_adapters(ours))
    assert rel(ref, base) > MIN_EFFECT, rel(ref, base)  # the adapter really changes the output
    assert_close(got, ref)
    layers = dict(randlora.named_adapters(ours))
    assert layers and all(type(m) is randlora.RandLoraLinear for m in layers.values())
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


def test_from_peft_skips_targets_inside_modules_to_save(tmp_path):
    """PEFT adapts no module that is, or is inside, a module to save (nor counts it in the bases' size): RoBERTa's
    classifier.dense matches the target "dense" but trains in full inside the saved classifier. Same outputs as PEFT."""
    config = RandLoraConfig(r=8, randlora_alpha=16.0, target_modules=["query", "value", "dense"], modules_to_save=["classifier"])
    pm = get_peft_model(base_model("roberta"), config)
    randomize_peft(pm, 3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.5)  # the trained head differs from the base's
    pm.save_pretrained(str(tmp_path / "a"))
    x = batch("roberta")
    with torch.no_grad():
        ref = run(peft_load("roberta", tmp_path / "a"), x)
        ours = randlora.from_peft(base_model("roberta"), tmp_path / "a").eval()
        got = run(ours, x)
    names = [n for n, _ in randlora.named_adapters(ours)]
    assert not [n for n in names if n.startswith("classifier")] and any(n.endswith("attention.output.dense") for n in names)
    assert isinstance(ours.classifier, randlora.SavedModule)
    assert rel(ref, run(base_model("roberta"), x)) > MIN_EFFECT
    assert_close(got, ref)


class HeadNet(nn.Module):
    """Two linear layers whose names share a prefix: ``head`` (a module to save) and ``head2`` (a target)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head, self.head2 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head2(torch.relu(self.head(x)))


def test_from_peft_adapts_a_target_whose_name_extends_a_module_to_save(tmp_path):
    """Only a module that is, or is inside, a module to save is skipped: ``head2`` is neither for ``head``."""
    pm = get_peft_model(HeadNet(), RandLoraConfig(r=2, target_modules=["head2"], modules_to_save=["head"]))
    randomize_peft(pm, 4)
    pm.save_pretrained(str(tmp_path / "a"))
    x = torch.randn(3, 8)
    ours = randlora.from_peft(HeadNet(), tmp_path / "a")
    assert [n for n, _ in randlora.named_adapters(ours)] == ["head2"]
    with torch.no_grad():
        assert_close(ours(x), pm.eval()(x))


class ClassifierNet(nn.Module):
    """DistilBERT's head names: ``pre_classifier`` ends with ``classifier`` but is not a ``.classifier`` suffix."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.pre_classifier, self.classifier = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.pre_classifier(torch.relu(self.body(x)))))


@pytest.mark.parametrize("saved,targets", [(["classifier"], ["body"]), (["classifier", "score", "pre_classifier"],
                                          ["body"]), (["classifier"], ["body", "pre_classifier"])])
def test_from_peft_saves_the_modules_peft_saved(saved, targets, tmp_path):
    """PEFT (0.22 here) saves a module whose name is an entry or ends with "." + entry, and ignores an entry that
    matches nothing (task_type="SEQ_CLS" writes ["classifier", "score", ...]); from_peft loads what it saved and
    computes what PEFT computes. (PEFT up to 0.18 also saved any name ending with an entry: also loaded, as the file
    then holds those modules; a target's randlora keys under such a name do not make it one.)"""
    pm = get_peft_model(ClassifierNet(), RandLoraConfig(r=2, target_modules=targets, modules_to_save=saved))
    randomize_peft(pm, 5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "a"))
    with safetensors.safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        held = {k.split(".")[2] for k in f.keys() if "randlora" not in k}
    ours = randlora.from_peft(ClassifierNet(), tmp_path / "a")
    assert sorted(n for n, m in ours.named_modules() if isinstance(m, randlora.SavedModule)) == sorted(held)
    assert sorted(n for n, _ in randlora.named_adapters(ours)) == sorted(targets)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert_close(ours(x), pm.eval()(x))
        assert rel(ours(x), ClassifierNet()(x)) > MIN_EFFECT


class NestedHeads(nn.Module):
    """``subhead`` ends with ``head`` (a looser match) and holds a child ``head`` (a strict ``.head`` match)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.head = nn.Linear(8, 8), nn.Linear(8, 8)
        self.subhead = nn.ModuleDict({"head": nn.Linear(8, 8), "proj": nn.Linear(8, 8)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.q(x))
        return self.head(h) + self.subhead["proj"](torch.relu(self.subhead["head"](h)))


def test_from_peft_does_not_take_a_parent_for_its_saved_child(tmp_path):
    """The file holds subhead.head's state (PEFT 0.22 saves the strict match): that is not subhead's own state, so
    subhead is not a module to save (was refused: missing subhead.proj, or nested modules to save)."""
    pm = get_peft_model(NestedHeads(), RandLoraConfig(r=2, target_modules=["q"], modules_to_save=["head"]))
    randomize_peft(pm, 6)
    pm.save_pretrained(str(tmp_path / "a"))
    ours = randlora.from_peft(NestedHeads(), tmp_path / "a")
    saved = sorted(n for n, m in ours.named_modules() if isinstance(m, randlora.SavedModule))
    assert saved == ["head", "subhead.head"], saved
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert_close(ours(x), pm.eval()(x))


def test_from_peft_regenerated_bases_equal_peft_buffers(tmp_path):
    # save_projection=False: our regenerated bases are PEFT's, value for value: each layer's own
    # view (public random_bases) is the slice of PEFT's buffers it uses, and to_peft writes the
    # whole shared buffers back exactly as PEFT holds them.
    for extra in (dict(), dict(sparse=True), dict(very_sparse=True)):
        tag = next(iter(extra), "dense")
        folder = make_peft_adapter("mlp", tmp_path / tag, r=7, target_modules=["a", "b"], save_projection=False, **extra)
        pm = peft_load("mlp", folder)
        A_peft, B_peft = pm.base_model.randlora_A["default"].float(), pm.base_model.randlora_B["default"].float()
        ours = randlora.from_peft(base_model("mlp"), folder)
        for name, m in randlora.named_adapters(ours):
            A, B = m.random_bases(torch.float32)
            assert torch.equal(A, A_peft[:, 0, : m.d]), (tag, name)
            assert torch.equal(B, B_peft[: m.D, : m.n]), (tag, name)
        randlora.to_peft(ours, tmp_path / f"{tag}-back")
        back = load_file(tmp_path / f"{tag}-back" / PEFT_W)
        assert torch.equal(back["base_model.randlora_A"], A_peft) and torch.equal(back["base_model.randlora_B"], B_peft), tag


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


def test_from_peft_draw_dtype_changes_regenerated_bases(tmp_path):
    # The dense draw depends on the dtype PEFT picked (bf16 where available, else fp16): the file
    # does not say, draw_dtype chooses.
    folder = make_peft_adapter("mlp", tmp_path / "a", r=7, target_modules=["a", "b"], save_projection=False)
    bf = randlora.from_peft(base_model("mlp"), folder, draw_dtype=torch.bfloat16).a.random_bases()[0]
    fp = randlora.from_peft(base_model("mlp"), folder, draw_dtype=torch.float16).a.random_bases()[0]
    auto = randlora.from_peft(base_model("mlp"), folder).a.random_bases()[0]
    assert not torch.equal(bf, fp)
    assert torch.equal(auto, bf)  # a CPU-only machine: bfloat16, as accelerate.is_bf16_available() says


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


@pytest.mark.parametrize("case", list(OURS_CASES))
def test_to_peft_loads_in_peft(case, tmp_path):
    kind, targets, kw = OURS_CASES[case]
    ours = ours_adapted(kind, targets, **kw)
    folder = tmp_path / "out"
    randlora.to_peft(ours, folder)
    assert sorted(os.listdir(folder)) == [PEFT_C, PEFT_W]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary or backup left beside it
    cfg = json.loads((folder / PEFT_C).read_text())
    assert cfg["peft_type"] == "RANDLORA" and cfg["save_projection"] is True and cfg["r"] == kw["rank"]
    assert cfg["fan_in_fan_out"] is (kind == "gpt2")
    assert cfg["randlora_dropout"] == kw.get("dropout", 0.0) and cfg["base_model_name_or_path"] is None
    x = batch(kind)
    with torch.no_grad():
        got = run(ours, x)
        pm = peft_load(kind, folder)
        ref = run(pm, x)
        assert rel(got, run(base_model(kind), x)) > MIN_EFFECT, rel(got, run(base_model(kind), x))
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
    tensors = load_file(folder / PEFT_W)
    O = max(m.out_features for m in ours_layers.values())
    I = max(m.in_features for m in ours_layers.values())
    n_max = -(-min(O, I) // kw["rank"])
    assert tensors["base_model.randlora_A"].shape == (kw["rank"], 1, min(O, I))
    assert tensors["base_model.randlora_B"].shape == (max(O, I), n_max, kw["rank"])


def test_to_peft_refuses_sparse_bases_peft_cannot_express(tmp_path):
    # Our sparse A is chosen per layer width (full rank); PEFT slices one A for every layer, which
    # cannot hold A for widths 20 and 30 (and the 50 it is sized for) at rank 7. Refused, and nothing
    # is written. (0.2's message named "min(in, out) = <width>"; 0.3's names the width whose A is
    # not a prefix of the widest one's.)
    ours = ours_adapted("mlp", ["a", "b"], rank=7, seed=1, bases="sparse")
    with pytest.raises(ValueError, match=r"min\(in, out\).*width [0-9]+'s A is not the first [0-9]+ columns.*save_adapter"):
        randlora.to_peft(ours, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == []


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
        A1, B1 = mine[name].random_bases()
        A2, B2 = theirs[name].random_bases()
        assert torch.equal(A1, A2) and torch.equal(B1, B2)
    # ... and back to PEFT again (explicit bases), still the same model, same flags.
    randlora.to_peft(back, tmp_path / "again")
    first = json.loads((tmp_path / "out" / PEFT_C).read_text())
    second = json.loads((tmp_path / "again" / PEFT_C).read_text())
    assert first == second
    with torch.no_grad():
        assert_close(run(peft_load(kind, tmp_path / "again"), x), run(ours, x))


def test_peft_to_ours_to_peft(tmp_path):
    folder = make_peft_adapter("gpt2", tmp_path / "a", r=12, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, sparse=True, projection_prng_key=3)
    ours = randlora.from_peft(base_model("gpt2"), folder)
    randlora.to_peft(ours, tmp_path / "b")
    a, b = load_file(f"{folder}/{PEFT_W}"), load_file(tmp_path / "b" / PEFT_W)
    copy_of_bases = re.compile(r"base_model\.model\..*\.randlora_[AB]")  # per layer: PEFT <= 0.21 writes them, 0.22 not
    assert {k for k in a if not copy_of_bases.fullmatch(k)} == set(b)  # to_peft writes the bases once, as 0.22
    assert all(torch.equal(a[k].float(), b[f"base_model.randlora_{k[-1]}" if copy_of_bases.fullmatch(k) else k]) for k in a)
    cfg = json.loads((tmp_path / "b" / PEFT_C).read_text())
    assert cfg["sparse"] is True and cfg["very_sparse"] is False and cfg["projection_prng_key"] == 3


def test_to_peft_overwrites_atomically(tmp_path):
    ours = ours_adapted("mlp", ["a", "b"], rank=4)
    folder = tmp_path / "out"
    randlora.to_peft(ours, folder)
    with torch.no_grad():
        ours.a.lam.add_(1.0)
    randlora.to_peft(ours, folder)  # over an existing adapter
    assert sorted(os.listdir(folder)) == [PEFT_C, PEFT_W]  # no temp files left
    assert sorted(os.listdir(tmp_path)) == ["out"]  # nor the old folder's backup
    assert torch.equal(load_file(folder / PEFT_W)["base_model.model.a.randlora_lambda"], ours.a.lam.detach())


class LinearLike(nn.Module):
    """A linear-like module with a forward of its own: neither PEFT RandLoRA nor LoRA wraps it."""

    def __init__(self):
        super().__init__()
        self.in_features, self.out_features = 8, 8
        self.inner = nn.Linear(8, 8)

    def forward(self, x):
        return self.inner(x)


def test_to_peft_refusals(tmp_path):
    with pytest.raises(ValueError, match="no RandLoRA layers"):
        randlora.to_peft(base_model("mlp"), tmp_path / "x")
    # very_sparse bases use each layer's own sparsity: not expressible when min(in, out) differs.
    ours = randlora.inject(base_model("mlp"), ["a", "b"], 4, bases="very_sparse")
    with pytest.raises(ValueError, match="very_sparse"):
        randlora.to_peft(ours, tmp_path / "x")
    model = nn.Sequential(LinearLike())
    randlora.inject(model, ["0"], 4)
    with pytest.raises(ValueError, match="'0' wraps a LinearLike.*only nn.Linear, Conv1D and bitsandbytes"):
        randlora.to_peft(model, tmp_path / "x")
    assert sorted(os.listdir(tmp_path)) == []


# -----------------------------------------------------------------------------
# from_peft refusals: a clear error, and the model left exactly as it was


@pytest.fixture
def good(tmp_path):
    """PEFT up to 0.21 writes the shared bases at base_model. and a copy per layer; 0.22 only the shared ones. Both
    layouts are read; this folder holds both, so the refusals about a layer's copy are tested with either PEFT."""
    folder = make_peft_adapter("mlp", tmp_path / "good", r=7, target_modules=["a", "b", "c"])
    edit_weights(folder, lambda t: t | {f"base_model.model.{n}.randlora_{x}": t[f"base_model.randlora_{x}"].clone()
                                        for n in "abc" for x in "AB"})  # fmt: skip
    return folder


def edit_config(folder, **changes) -> None:
    path = os.path.join(folder, PEFT_C)
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
    path = os.path.join(folder, PEFT_W)
    tensors = fn({k: v.clone() for k, v in load_file(path).items()})
    save_file(tensors, path)


def expect_refusal(folder, match: str, model: nn.Module | None = None, error=ValueError) -> None:
    model = base_model("mlp") if model is None else model
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        randlora.from_peft(model, folder)
    assert_unchanged(model, snap)


# 0.3's messages where they changed: from_peft reads modules_to_save (a head the file does not
# hold is a missing key), and the flag / seed / regex / shape errors have new wording.
CONFIG_REFUSALS = {
    "peft_type": (dict(peft_type="LORA"), "peft_type 'RANDLORA'.*got 'LORA'"),
    "layers_to_transform": (dict(layers_to_transform=[0]), "layers_to_transform"),
    "layers_pattern": (dict(layers_pattern="layers"), "layers_pattern"),
    "modules_to_save": (dict(modules_to_save=["head"]), "missing keys 'base_model.model.head.bias', 'base_model.model.head.weight'"),
    "bias": (dict(bias="all"), "bias='all'"),
    "rank_pattern": (dict(rank_pattern={"a": 4}), "rank_pattern"),
    "alpha_pattern": (dict(alpha_pattern={"a": 4}), "alpha_pattern"),
    "exclude_modules": (dict(exclude_modules=["b"]), "exclude_modules"),
    "all-linear": (dict(target_modules="all-linear"), "all-linear"),
    "no-targets": (dict(target_modules=None), "target_modules must be"),
    "bad-regex": (dict(target_modules="(a"), "missing \\), unterminated subpattern"),
    "r": (dict(r=0), "rank must be a positive int"),
    "alpha": (dict(randlora_alpha="big"), "randlora_alpha must be"),
    "dropout": (dict(randlora_dropout=1.5), "dropout must be in"),
    "flag": (dict(sparse="yes"), "sparse must be bool, got 'yes'"),
    "prng-key": (dict(projection_prng_key=2**70), "projection_prng_key"),
    "target-missing": (dict(target_modules=["zzz"]), "matches no module"),
    "target-not-linear": (dict(target_modules=["a", "act"]), "selects 'act', not a linear layer"),
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
    "missing-gamma": (_drop("base_model.model.b.randlora_gamma"), "missing keys 'base_model.model.b.randlora_gamma'"),
    "missing-all-bases": (
        _drop(*[f"{p}.randlora_{s}" for p in ("base_model", "base_model.model.a", "base_model.model.b", "base_model.model.c") for s in "AB"]),
        "missing keys .*save_projection=true",
    ),
    "missing-one-layer-copy": (_drop("base_model.model.c.randlora_B"), "missing keys 'base_model.model.c.randlora_B'"),
    "unexpected-key": (_set("base_model.model.a.extra", torch.zeros(2)), "unexpected keys 'base_model.model.a.extra'"),
    "other-adapter-name": (_set("base_model.model.a.randlora_lambda.other", torch.zeros(7, 3)), "unexpected keys"),
    "unknown-layer": (_set("base_model.model.zz.randlora_lambda", torch.zeros(7, 3)), "unexpected keys 'base_model.model.zz"),
    "lambda-shape": (_set("base_model.model.a.randlora_lambda", torch.zeros(7, 4)), r"'a.lam' is torch.float32 \(7, 4\); expected a floating-point \(7, 3\)"),
    "gamma-shape": (_set("base_model.model.b.randlora_gamma", torch.zeros(5, 29)), r"'b.gam' is torch.float32 \(5, 29\); expected a floating-point \(5, 30\)"),
    # d_max = min of the element-wise max (50, 50): larger than every layer's own min(in, out).
    "A-shape": (_set("base_model.randlora_A", lambda t: t[:, :, :-1].contiguous()), r"'base_model.randlora_A' is torch.float32 \(7, 1, 49\); expected .* shape \(7, 1, 50\)"),
    "B-shape": (_set("base_model.model.a.randlora_B", lambda t: t[:-1].contiguous()), r"randlora_B' is torch.float32 \(49, 8, 7\); expected .* shape \(50, 8, 7\)"),
    "nan": (_set("base_model.model.b.randlora_gamma", lambda t: t.index_fill(1, torch.tensor([3]), float("nan"))), "NaN or Inf"),
    "inf": (_set("base_model.randlora_B", lambda t: t.index_fill(0, torch.tensor([3]), float("inf"))), "'base_model.randlora_B' contains NaN or Inf values; expected finite floats"),
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
    expect_refusal(os.path.join(good, PEFT_W), "is a regular file, not a folder")
    multi = tmp_path / "multi"
    for name in ("first", "second"):
        make_peft_adapter("mlp", multi / name, r=7, target_modules=["a"])
    expect_refusal(multi, "several adapters in subfolders \\('first', 'second'\\)")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / PEFT_C).write_text(open(os.path.join(good, PEFT_C)).read())
    (pickled / "adapter_model.bin").write_bytes(b"\x80")
    expect_refusal(pickled, "pickle files are not read")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / PEFT_C).write_text(open(os.path.join(good, PEFT_C)).read())
    data = open(os.path.join(good, PEFT_W), "rb").read()
    (truncated / PEFT_W).write_bytes(data[: len(data) // 2])
    expect_refusal(truncated, "not a readable safetensors file")
    (truncated / PEFT_W).write_bytes(data)
    (truncated / PEFT_C).write_text("{not json")
    expect_refusal(truncated, "not UTF-8 JSON")
    # Model problems: a model with another shape, an already adapted model.
    wrong = base_model("mlp")
    wrong.b = nn.Linear(50, 31)
    expect_refusal(good, r"'b.gam' is torch.float32 \(5, 30\); expected a floating-point \(5, 31\)|randlora_A' is torch.float32", model=wrong)
    adapted = randlora.inject(base_model("mlp"), ["a"], 4)
    expect_refusal(good, "already has RandLoRA layers", model=adapted)
    with pytest.raises(ValueError, match="draw_dtype"):
        randlora.from_peft(base_model("mlp"), good, draw_dtype=torch.float32)


def test_from_peft_accepts_shared_or_per_layer_bases_only(good):
    # PEFT loads either layout (all copies are one shared buffer); so do we.
    x = batch("mlp")
    with torch.no_grad():
        ref = run(peft_load("mlp", good), x)
    full = load_file(os.path.join(good, PEFT_W))
    for keep in ("shared", "per-layer"):
        def fn(t, keep=keep):
            return {k: v for k, v in t.items() if not k.endswith(("randlora_A", "randlora_B")) or k.startswith("base_model.model.") == (keep == "per-layer")}

        save_file(full, os.path.join(good, PEFT_W))
        edit_weights(good, fn)
        with torch.no_grad():
            assert_close(run(randlora.from_peft(base_model("mlp"), good), x), ref)


# -----------------------------------------------------------------------------
# to_lora (issue 20): a PEFT LoRA folder holding the best rank-k approximation of each s·ΔW

LORA_CASES = {
    # a: 20 -> 50 (out > in), b: 50 -> 30 and c: 30 -> 6 (out < in; d = 6 < k = 7: zero-padded)
    "mlp": (["a", "b", "c"], {}),
    # transformers' Conv1D (weight (in, out)): c_attn 64 -> 192, c_fc 64 -> 256
    "gpt2": (["c_attn", "c_fc"], {}),
    # every linear but the classifier, which is a module to save and travels in full
    "bert": ("all-linear", {"modules_to_save": ["classifier"]}),
}


def lora_model(kind: str) -> nn.Module:
    targets, extra = LORA_CASES[kind]
    model = ours_adapted(kind, targets, seed=2, rank=4, alpha=6.0, **extra)
    if extra:
        with torch.no_grad():
            model.classifier.trained.weight.add_(torch.randn(model.classifier.trained.weight.shape, generator=torch.Generator().manual_seed(5)))
    return model


def truncated_svd(delta: torch.Tensor, k: int) -> torch.Tensor:
    """The best rank-``k`` approximation of a float64 matrix (Eckart–Young), computed here."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def lora_reference(kind: str, model: nn.Module, deltas: dict[str, torch.Tensor], k: int | None) -> nn.Module:
    """The base model in float64 with ``W + SVD_k(s ΔW)`` in each adapted layer (the whole ΔW for
    ``k`` None) and each module to save's trained copy."""
    ref = base_model(kind).double()
    with torch.no_grad():
        for name, m in randlora.named_adapters(model):
            w = ref.get_submodule(name).weight
            dw = deltas[name] if k is None else truncated_svd(deltas[name], k)
            w.add_(dw.t() if m.layout == "conv1d" else dw)
    for name in LORA_CASES[kind][1].get("modules_to_save", []):
        trained = copy.deepcopy(model.get_submodule(name).trained).double()
        parent, _, attr = name.rpartition(".")
        setattr(ref.get_submodule(parent), attr, trained)
    return ref


@pytest.mark.parametrize("kind", list(LORA_CASES))
def test_to_lora_is_the_truncated_svd_in_peft(kind, tmp_path):
    model = lora_model(kind)
    layers = dict(randlora.named_adapters(model))
    deltas = {n: ref_layer_delta(m) for n, m in layers.items()}  # float64, independent of delta_weight
    sigmas = {n: torch.linalg.svdvals(d) for n, d in deltas.items()}
    widths = {n: min(m.in_features, m.out_features) for n, m in layers.items()}
    full = max(widths.values())
    ks = sorted({1, 2, 7, full})
    assert min(widths.values()) < 7 <= full or kind != "mlp"  # mlp: one layer narrower than k = 7
    errors = {}
    for k in ks:
        folder = tmp_path / f"k{k}"
        errors[k] = randlora.to_lora(model, folder, rank=k)
        assert list(errors[k]) == list(layers)
        # The relative errors are the independent float64 values sqrt(Σ_{i>k} σ_i²) / sqrt(Σ σ_i²).
        for name, s in sigmas.items():
            expected = math.sqrt(s[k:].square().sum().item() / s.square().sum().item())
            assert abs(errors[k][name] - expected) <= 1e-6, (k, name, errors[k][name], expected)
        cfg = json.loads((folder / PEFT_C).read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == k and cfg["lora_alpha"] == k
        assert cfg["fan_in_fan_out"] is (kind == "gpt2") and cfg["lora_dropout"] == 0.0
        assert cfg["use_dora"] is False and cfg["use_rslora"] is False
        assert cfg["modules_to_save"] == LORA_CASES[kind][1].get("modules_to_save")
        tensors = load_file(folder / PEFT_W)
        for name, m in layers.items():
            A, B = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
            assert A.shape == (k, m.in_features) and B.shape == (m.out_features, k) and A.dtype == B.dtype == torch.float32
            kk = min(k, widths[name])
            assert not A[kk:].any() and not B[:, kk:].any()  # zero-padded beyond min(in, out)
            # B A is the truncated SVD (lora_alpha / r = 1), to float32 rounding of the factors
            target = truncated_svd(deltas[name], k)
            assert (B.double() @ A.double() - target).norm().item() <= 1e-6 * deltas[name].norm().item(), (k, name)
    # The error decreases with k, to 0 at k >= min(in, out).
    for name in layers:
        seq = [errors[k][name] for k in ks]
        for k, e0, e1 in zip(ks[1:], seq, seq[1:]):
            assert e1 < e0 or (e0 == 0.0 and k > widths[name]), (name, seq)
        assert errors[full][name] == 0.0 and seq[0] > 0.1
    x = batch(kind)
    with torch.no_grad():
        ours = run(model, x)
        assert rel(ours, run(base_model(kind), x)) > MIN_EFFECT
        for k in (2, full):
            pm = PeftModel.from_pretrained(base_model(kind), str(tmp_path / f"k{k}")).eval()
            lora_layers = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, LoraLayer)}
            assert lora_layers == set(layers)
            theirs = run(pm, x)
            expected = run(lora_reference(kind, model, deltas, k), x.double() if x.is_floating_point() else x)
            assert_close(theirs, expected, 1e-4)
            if k == 2:  # the truncation matters: the comparison tells k = 2 from the full update
                assert rel(expected, run(lora_reference(kind, model, deltas, None), x.double() if x.is_floating_point() else x)) > 1e-3
            else:  # k >= min(in, out) of every layer: RandLoRA's own output, to float32 rounding
                assert_close(theirs, ours, 1e-5)


def test_to_lora_of_a_fresh_adapter_is_exact_zero(tmp_path):
    model = randlora.inject(base_model("mlp"), ["a", "b", "c"], rank=4)  # lam = 0: ΔW = 0
    errors = randlora.to_lora(model, tmp_path / "lora", rank=3)
    assert errors == {"a": 0.0, "b": 0.0, "c": 0.0}
    tensors = load_file(tmp_path / "lora" / PEFT_W)
    assert len(tensors) == 6 and not any(t.any() for t in tensors.values())
    x = batch("mlp")
    with torch.no_grad():
        pm = PeftModel.from_pretrained(base_model("mlp"), str(tmp_path / "lora")).eval()
        assert torch.equal(run(pm, x), run(base_model("mlp"), x))


def test_to_lora_verbose_prints_each_layers_error(tmp_path, capsys):
    model = lora_model("mlp")
    errors = randlora.to_lora(model, tmp_path / "lora", rank=2, verbose=True)
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"{n}: relative error {e:.4g}" for n, e in errors.items()]


def test_to_lora_refusals_leave_files_alone(tmp_path):
    existing = tmp_path / "existing"
    randlora.to_lora(lora_model("mlp"), existing, rank=2)
    before = fs_snapshot(tmp_path)
    # MHA adapters: PEFT LoRA would skip the weights nn.MultiheadAttention reads itself.
    whole = randlora.inject(base_model("mha"), ["attn", "fc"], rank=4)  # in-projection and out_proj
    in_proj = randlora.inject(base_model("mha"), ["attn", "fc"], rank=4)
    in_proj.attn.out_proj = in_proj.attn.out_proj.base  # only the in-projection's adapter left
    assert [n for n, _ in randlora.named_adapters(in_proj)] == ["attn.parametrizations.in_proj_weight.0", "fc"]
    out_proj = randlora.inject(base_model("mha"), ["attn.out_proj", "fc"], rank=4)
    opaque = randlora.inject(nn.Sequential(LinearLike()), ["0"], 4)
    cases = [
        (whole, "layer 'attn\\.(out_proj|parametrizations\\.in_proj_weight\\.0)' adapts a weight its parent module reads directly \\(nn.MultiheadAttention"),
        (in_proj, "layer 'attn\\.parametrizations\\.in_proj_weight\\.0' adapts a weight its parent module reads directly \\(nn.MultiheadAttention.*LoRA"),
        (out_proj, "layer 'attn\\.out_proj' adapts a weight its parent module reads directly \\(nn.MultiheadAttention.*LoRA"),
        (opaque, "'0' wraps a LinearLike.*PEFT LoRA adapts only nn.Linear, Conv1D and bitsandbytes"),
        (base_model("mlp"), "no RandLoRA layers"),
    ]
    for model, match in cases:
        snap = snapshot(model)
        for target in (existing, tmp_path / "new"):
            with pytest.raises(ValueError, match=match):
                randlora.to_lora(model, target, rank=2)
        assert_unchanged(model, snap)
    for rank in (0, -1, "4", 4.0, True, None):
        with pytest.raises(ValueError, match="rank must be a positive int, got " + repr(rank).replace(".", "\\.")):
            randlora.to_lora(lora_model("mlp"), existing, rank=rank)
    diverged = lora_model("mlp")
    with torch.no_grad():
        dict(randlora.named_adapters(diverged))["b"].gam[0, 1] = float("nan")
    for target in (existing, tmp_path / "new"):
        with pytest.raises(ValueError, match="layer 'b' has NaN or Inf in lam/gam"):
            randlora.to_lora(diverged, target, rank=2)
    assert_fs_unchanged(tmp_path, before)


# -----------------------------------------------------------------------------
# PEFT on real architectures (tiny LLaMA, GPT-2, T5, BERT and ViT classifiers with their heads as
# modules to save, an nn.MultiheadAttention block, bitsandbytes bases)


def _arch_peft_load(kind, folder):
    return PeftModel.from_pretrained(arch_base(kind).eval(), str(folder)).eval()


@pytest.mark.parametrize(
    "kind,targets,extra",
    [
        ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], {}),
        ("gpt2", ["c_attn", "c_proj", "c_fc"], {}),
        ("t5", ["q", "k", "v", "o", "wi", "wo"], {}),
        ("bert", ["query", "value", "intermediate.dense"], {"modules_to_save": ["classifier"]}),
        # transformers 5 names ViT's projections q_proj, v_proj, fc1; 4.x query, value, intermediate.dense
        ("vit", r".*\.(q_proj|v_proj|fc1|query|value|intermediate\.dense)", {"modules_to_save": ["classifier"]}),
    ],
)
def test_to_peft_matches_peft_on_architectures(kind, targets, extra, tmp_path):
    model = arch_base(kind)
    randlora.inject(model, targets, 4, 3, alpha=8.0, **extra)
    arch_randomize(model, 3)
    if extra:
        arch_train_steps(model, kind, steps=2)
    model.eval()
    randlora.to_peft(model, tmp_path / "peft")
    inp = arch_inputs(kind)
    with torch.no_grad():
        ours, theirs, plain = arch_run(model, inp), arch_run(_arch_peft_load(kind, tmp_path / "peft"), inp), arch_run(arch_base(kind).eval(), inp)
    assert rel_err(ours, plain) > MIN_EFFECT
    assert_close(theirs, ours, 1e-5)


def test_from_peft_bert_with_head(tmp_path):
    pm = get_peft_model(arch_base("bert"), RandLoraConfig(r=4, randlora_alpha=8.0, target_modules=["query", "value"], modules_to_save=["classifier"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "randlora_lambda" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "randlora_gamma" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(tmp_path / "peft"))
    inp = arch_inputs("bert")
    with torch.no_grad():
        theirs = arch_run(_arch_peft_load("bert", tmp_path / "peft"), inp)
    for train in (False, True):
        ours = randlora.from_peft(arch_base("bert").train(train), tmp_path / "peft")
        assert isinstance(ours.classifier, randlora.SavedModule)
        assert all(m.training == train for m in ours.modules()), "new modules must take the model's mode"
        ours.eval()
        with torch.no_grad():
            assert_close(arch_run(ours, inp), theirs, 1e-5)
            with randlora.disable(ours):
                assert torch.equal(arch_run(ours, inp), arch_run(arch_base("bert").eval(), inp))


def test_from_peft_takes_the_models_mode(tmp_path):
    pm = get_peft_model(arch_base("llama"), RandLoraConfig(r=4, randlora_alpha=8.0, target_modules=["q_proj", "v_proj"], randlora_dropout=0.5))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "randlora_lambda" in n:
                p.fill_(0.1)
    pm.save_pretrained(str(tmp_path / "peft"))
    inp = arch_inputs("llama")
    with torch.no_grad():
        theirs = arch_run(_arch_peft_load("llama", tmp_path / "peft"), inp)
    for train in (False, True):
        ours = randlora.from_peft(arch_base("llama").train(train), tmp_path / "peft")
        assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in ours.modules())
        assert all(m.training == train for m in ours.modules()), f"train={train}"
    with torch.no_grad():  # eval: the dropout is off, the outputs are PEFT's
        assert_close(arch_run(ours.eval(), inp), theirs, 1e-5)


def _settle(model: nn.Module) -> nn.Module:
    """One eval forward, so that 4-bit layers have repacked their weights (a bitsandbytes CPU
    detail: after that, train and eval forwards use the repacked weight) in every copy alike."""
    was = model.training
    with torch.no_grad():
        model.eval()(torch.zeros(1, 64))
    return model.train(was)


@pytest.mark.parametrize("kind", ["int8", "nf4", "fp4"])
def test_bnb_to_peft_loads_in_peft(kind, tmp_path):
    # PEFT's RandLoRA wraps bitsandbytes' 8-bit and 4-bit linears too: our adapter written with
    # to_peft and loaded by PEFT onto the same quantized base computes what ours computes.
    model = QNet(kind)
    before = copy.deepcopy(model).requires_grad_(False)  # frozen like the adapted model's base
    assert not before.q1.weight.is_floating_point()  # really quantized
    randlora.inject(model, ["q1", "q2"], 8, alpha=16.0)
    arch_randomize(model, scale=1.0)
    model, before = _settle(model), _settle(before)
    randlora.to_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(before), str(tmp_path / "peft")).eval()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = model.eval()(x), peft_model(x)
        plain = before(x)
    assert rel_err(theirs.double(), ours.double()) < 1e-5
    assert rel_err(plain.double(), ours.double()) > 1e-2  # the adapter does something


def test_to_peft_refuses_out_proj_alone_of_an_mha(tmp_path):
    # nn.MultiheadAttention reads out_proj.weight: PEFT's out_proj adapter would be skipped.
    block = ResidualAttentionBlock()
    randlora.inject(block, ["attn.out_proj"], 4)
    assert_refused(block, lambda m: randlora.to_peft(m, tmp_path / "peft"), ValueError, "out_proj.*MultiheadAttention")
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("export", ["to_peft", "to_lora"])
def test_export_refuses_encoder_layer_linears_its_fast_path_reads(tmp_path, export):
    # nn.TransformerEncoderLayer's fast path reads linear1.weight / linear2.weight: PEFT's adapters there would be skipped.
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    randlora.inject(layer, ["linear1"], 4)
    write = (lambda m: randlora.to_peft(m, tmp_path / "out")) if export == "to_peft" else (lambda m: randlora.to_lora(m, tmp_path / "out", 2))
    assert_refused(layer, write, ValueError, r"'linear1' adapts a weight its parent module reads directly .*nn.TransformerEncoderLayer")
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# PEFT folders on disk: replaced as a whole, other files and modes kept, refusals leave files alone,
# the one documented window of the two-rename swap, readers that refuse without blocking


def _tiny_adapted(rank: int = 2) -> nn.Module:
    model = fresh_tiny()
    randlora.inject(model, ["embed", "block.0", "head"], rank=rank, seed=0)
    randomize_model_(model, 5)
    return model.eval()


def _peft_model(v):
    model = _tiny_adapted()
    with torch.no_grad():
        model.head.lam.fill_(float(v))
    return model


def _peft_version(folder):
    loaded = fresh_tiny()
    randlora.from_peft(loaded, folder)
    return int(loaded.head.lam[0, 0].item())


def test_to_peft_keeps_other_files_and_modes(tmp_path):
    folder = tmp_path / "peft"
    randlora.to_peft(_peft_model(1), folder)
    (folder / "README.md").write_text("model card")
    os.chmod(folder / PEFT_W, 0o600)
    os.chmod(folder, 0o750)
    randlora.to_peft(_peft_model(2), folder)
    assert sorted(os.listdir(folder)) == ["README.md", PEFT_C, PEFT_W]
    assert (folder / "README.md").read_text() == "model card"
    assert os.stat(folder / PEFT_W).st_mode & 0o777 == 0o600 and os.stat(folder).st_mode & 0o777 == 0o750
    assert _peft_version(folder) == 2
    assert sorted(os.listdir(tmp_path)) == ["peft"]


def test_to_peft_refusals_leave_files_alone(tmp_path):
    folder = tmp_path / "peft"
    randlora.to_peft(_peft_model(1), folder)
    (folder / "sub").mkdir()
    before = sorted(os.listdir(folder))
    with pytest.raises(ValueError, match="subfolders"):
        randlora.to_peft(_peft_model(2), folder)
    assert sorted(os.listdir(folder)) == before and _peft_version(folder) == 1
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a regular file, not a folder"):
        randlora.to_peft(_peft_model(2), tmp_path / "file")
    os.symlink("file", tmp_path / "link")  # named as the user spelled it, not as it resolves
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'link'))} is a regular file, not a folder"):
        randlora.to_peft(_peft_model(2), tmp_path / "link")
    os.unlink(tmp_path / "link")
    nan = _peft_model(2)
    with torch.no_grad():
        nan.head.gam[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'head.gam' has NaN or Inf"):
        randlora.to_peft(nan, tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["file", "peft"]


def test_to_peft_checks_the_folder_it_replaces(tmp_path, monkeypatch):
    """The folder checked is the one replaced: "missing/../keep" is written as keep (os.path.realpath), so keep's
    subfolders refuse it and keep's other files are kept, as for "keep" itself."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep" / "sub").mkdir(parents=True)
    (tmp_path / "keep" / "sub" / "data.bin").write_bytes(b"precious")
    before = fs_snapshot(tmp_path)
    for write in (lambda p: randlora.to_peft(_peft_model(1), p), lambda p: randlora.to_lora(_peft_model(1), p, 2)):
        with pytest.raises(ValueError, match="has subfolders \\('sub'\\)"):
            write("missing/../keep")
    assert fs_snapshot(tmp_path) == before
    (tmp_path / "card").mkdir()
    (tmp_path / "card" / "README.md").write_text("model card")
    randlora.to_peft(_peft_model(2), "missing/../card")
    assert sorted(os.listdir(tmp_path / "card")) == ["README.md", PEFT_C, PEFT_W]
    assert _peft_version(tmp_path / "card") == 2 and sorted(os.listdir(tmp_path)) == ["card", "keep"]


def test_to_peft_survives_a_backup_it_cannot_remove(tmp_path, monkeypatch):
    """Once the new folder is in place the save has succeeded: removing the old folder's backup may fail (a
    write-protected folder, a file held open on NFS) without failing the call. The next save removes it first; one
    that still cannot is refused, naming the backup, files untouched."""
    folder = tmp_path / "peft"
    randlora.to_peft(_peft_model(1), folder)
    real_unlink = os.unlink

    def unlink(p, *a, dir_fd=None, **kw):  # shutil.rmtree unlinks relative to an open folder
        if dir_fd is not None:
            raise PermissionError(13, "Permission denied", p)
        return real_unlink(p, *a, dir_fd=dir_fd, **kw)

    monkeypatch.setattr(os, "unlink", unlink)
    randlora.to_peft(_peft_model(2), folder)
    assert _peft_version(folder) == 2 and sorted(os.listdir(tmp_path)) == [".peft.randlora-old", "peft"]
    before = fs_snapshot(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / '.peft.randlora-old'}, an earlier save's copy")):
        randlora.to_peft(_peft_model(3), folder)
    assert fs_snapshot(tmp_path) == before
    monkeypatch.setattr(os, "unlink", real_unlink)
    randlora.to_peft(_peft_model(3), folder)
    assert _peft_version(folder) == 3 and sorted(os.listdir(tmp_path)) == ["peft"]


def test_to_peft_through_a_symlinked_folder(tmp_path):
    (tmp_path / "store").mkdir()
    randlora.to_peft(_peft_model(1), tmp_path / "store" / "peft")
    os.symlink("store/peft", tmp_path / "link")
    randlora.to_peft(_peft_model(2), tmp_path / "link")
    assert os.readlink(tmp_path / "link") == "store/peft"
    assert _peft_version(tmp_path / "store" / "peft") == 2
    assert sorted(os.listdir(tmp_path / "store")) == ["peft"]


def test_to_peft_two_rename_window_and_recovery(tmp_path, monkeypatch):
    """0.3 replaces a PEFT folder by two renames (no renameat2): old -> ``.<name>.randlora-old``,
    new -> ``<name>``, then the backup is deleted. A crash between the two renames (the one
    documented window) leaves no folder at the target but the complete old folder at the backup
    path; from_peft's FileNotFoundError names it; the next to_peft puts it back first (and removes
    the killed save's temporary folder, by its name), then replaces it. A second rename that fails
    with an exception (no crash) is undone at once."""
    folder = tmp_path / "peft"
    target, backup = os.path.realpath(folder), os.path.realpath(tmp_path / ".peft.randlora-old")
    randlora.to_peft(_peft_model(1), folder)
    randlora.to_peft(_peft_model(2), folder)  # over an existing folder: no backup left behind
    assert _peft_version(folder) == 2 and sorted(os.listdir(tmp_path)) == ["peft"]
    (folder / "README.md").write_text("model card")
    old = fs_snapshot(folder)
    real_rename, calls = os.rename, []

    def renames(fail_from=None, only=False):
        calls.clear()

        def rename(a, b):  # calls number fail_from on (or only that one) raise
            calls.append((os.fspath(a), os.fspath(b)))
            if fail_from is not None and (len(calls) == fail_from if only else len(calls) >= fail_from):
                raise OSError(5, "injected")
            return real_rename(a, b)

        monkeypatch.setattr(os, "rename", rename)

    def is_tmp(p):
        return os.path.dirname(p) == str(tmp_path) and os.path.basename(p).startswith(".peft.randlora-") and p.endswith(".tmp")

    # A crash between the two renames: the second one, and nothing after it, happens.
    renames(fail_from=2)
    with pytest.raises(OSError, match="injected"):
        randlora.to_peft(_peft_model(3), folder)
    assert calls[0] == (target, backup) and calls[1][1] == target and is_tmp(calls[1][0])
    (tmp_path / ".peft.randlora-0badc0de.tmp").mkdir()  # a killed save also leaves its temporary folder
    (tmp_path / ".peft.randlora-0badc0de.tmp" / PEFT_W).write_bytes(b"partial")
    monkeypatch.setattr(os, "rename", real_rename)
    assert sorted(os.listdir(tmp_path)) == [".peft.randlora-0badc0de.tmp", ".peft.randlora-old"]  # no folder at the target
    assert fs_snapshot(backup) == old  # the complete old folder
    with pytest.raises(FileNotFoundError, match=f"no PEFT adapter folder at {re.escape(str(folder))}.*{re.escape(backup)}"):
        randlora.from_peft(fresh_tiny(), folder)

    # The second rename fails with an exception: recovery first, then the swap, undone.
    renames(fail_from=3, only=True)
    with pytest.raises(OSError, match="injected"):
        randlora.to_peft(_peft_model(4), folder)
    monkeypatch.setattr(os, "rename", real_rename)
    assert calls[:2] == [(backup, target), (target, backup)] and calls[2][1] == target and is_tmp(calls[2][0])
    assert calls[3:] == [(backup, target)]  # the undo
    assert sorted(os.listdir(tmp_path)) == ["peft"] and fs_snapshot(folder) == old and _peft_version(folder) == 2

    # The crash again; the next to_peft puts the old folder back first, then replaces it.
    renames(fail_from=2)
    with pytest.raises(OSError, match="injected"):
        randlora.to_peft(_peft_model(5), folder)
    renames()
    randlora.to_peft(_peft_model(6), folder)
    monkeypatch.setattr(os, "rename", real_rename)
    assert calls[:2] == [(backup, target), (target, backup)] and calls[2][1] == target and is_tmp(calls[2][0]) and len(calls) == 3
    assert _peft_version(folder) == 6 and sorted(os.listdir(tmp_path)) == ["peft"]
    assert (folder / "README.md").read_text() == "model card"  # the restored folder's other files kept


def test_from_peft_refuses_a_fifo_config_without_blocking(tmp_path):
    folder = tmp_path / "peft"
    randlora.to_peft(_peft_model(1), folder)
    os.remove(folder / PEFT_C)
    os.mkfifo(folder / PEFT_C)
    model = fresh_tiny()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="adapter_config.json is a FIFO.*not a regular file"):
        randlora.from_peft(model, folder)
    assert_unchanged(model, snap)


def test_from_peft_non_utf8_config(tmp_path):
    folder = tmp_path / "peft"
    randlora.to_peft(_tiny_adapted(rank=1), folder)
    cfg_path = folder / PEFT_C
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "modèle"
    cfg_path.write_bytes(json.dumps(cfg, ensure_ascii=False).encode("latin-1"))
    model, fs = fresh_tiny(), fs_snapshot(tmp_path)
    msg = assert_refused(model, lambda m: randlora.from_peft(m, folder), ValueError)
    assert_fs_unchanged(tmp_path, fs)
    assert "adapter_config.json" in msg and "utf-8" in msg.lower(), msg


def test_huge_peft_config_string_is_not_echoed(tmp_path):
    folder = tmp_path / "peft"
    randlora.to_peft(_tiny_adapted(rank=1), folder)
    cfg = json.loads((folder / PEFT_C).read_text())
    cfg["peft_type"] = "Q" * 2_000_000
    (folder / PEFT_C).write_text(json.dumps(cfg))
    model, fs = fresh_tiny(), fs_snapshot(tmp_path)
    msg = assert_refused(model, lambda m: randlora.from_peft(m, folder), ValueError)
    assert_fs_unchanged(tmp_path, fs)
    assert len(msg) < 10_000, f"message of {len(msg)} characters"


# =============================================================================
# Layers whose parent reads the weight, hooked layers, bounded messages (a fifth hostile review)


class EncoderAndAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        h = self.enc(x)
        return self.mha(h, h, h, need_weights=False)[0]


@pytest.mark.parametrize("targets", [["mha.out_proj"], ["linear1", "linear2"]])
def test_from_peft_refuses_a_layer_whose_parent_reads_its_weight(targets, tmp_path):
    """PEFT's update on MHA's out_proj or an encoder layer's linear1/linear2 applies in some modes and not in others
    (the parent reads .weight, its fast path skips the call): from_peft refuses, as to_peft does; model unchanged."""
    torch.manual_seed(0)
    base = EncoderAndAttention().eval()
    pm = get_peft_model(copy.deepcopy(base), RandLoraConfig(r=4, target_modules=targets, randlora_alpha=8))
    pm.save_pretrained(str(tmp_path))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"parent reads its weight directly") as info:
        randlora.from_peft(base, tmp_path)
    assert str(tmp_path) in str(info.value)
    assert not list(randlora.named_adapters(base))
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    with pytest.raises(ValueError, match=r"draw_dtype must be") as info:
        randlora.from_peft(base, tmp_path, draw_dtype="x" * 100_000)
    assert len(str(info.value)) < 300


def test_from_peft_refuses_a_layer_an_attention_reads_under_another_name(tmp_path):
    """target_modules=["proj"], where proj is also an MHA's out_proj: PEFT adapts only the call of proj, the MHA reads
    the plain weight; ours would adapt both. Refused, as for the MHA's own name."""

    class Aliased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            att = nn.MultiheadAttention(16, 2, batch_first=True)
            self.proj, self.att = att.out_proj, att  # proj first: PEFT selects the layer under that name

        def forward(self, x):
            return self.att(x, x, x, need_weights=False)[0] + self.proj(x)

    torch.manual_seed(0)
    base = Aliased().eval()
    get_peft_model(copy.deepcopy(base), RandLoraConfig(r=4, target_modules=["proj"])).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"layer 'proj''s parent reads its weight directly"):
        randlora.from_peft(base, tmp_path)
    assert not list(randlora.named_adapters(base))


@pytest.mark.parametrize("export", ["to_peft", "to_lora"])
def test_a_hooked_linear_exports_and_peft_computes_what_we_compute(export, tmp_path):
    """A forward hook on an adapted nn.Linear (accelerate installs such hooks): PEFT wraps the layer and runs the hook
    too, so the export is written, and PeftModel.from_pretrained on the hooked base computes what the model computes."""

    def hooked():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        m[0].register_forward_hook(lambda mod, inp, out: out * 2)
        return m

    model = randlora.inject(hooked(), ["0", "2"], rank=4)
    for _, layer in randlora.named_adapters(model):
        with torch.no_grad():
            layer.lam.normal_()
    getattr(randlora, export)(model, tmp_path, *((8,) if export == "to_lora" else ()))
    x = torch.randn(5, 8)
    with torch.no_grad():
        ours, theirs = model(x), PeftModel.from_pretrained(hooked(), str(tmp_path)).eval()(x)
    # to_lora at rank 8 = d is exact up to the SVD's rounding
    assert (ours - theirs).abs().max() <= (1e-5 if export == "to_peft" else 1e-4) * ours.abs().max()


def test_to_peft_keeps_a_dangling_symlink_in_the_folder_it_replaces(tmp_path):
    """The folder is rewritten with its other entries; a symlink among them may point nowhere (it is not flushed)."""
    torch.manual_seed(0)
    model = randlora.inject(nn.Sequential(nn.Linear(8, 8)), ["0"], rank=4)
    folder = tmp_path / "adapter"
    randlora.to_peft(model, folder)
    os.symlink(tmp_path / "nowhere", folder / "README.link")
    with torch.no_grad():
        model[0].lam.normal_()
    randlora.to_peft(model, folder)
    assert os.readlink(folder / "README.link") == str(tmp_path / "nowhere")
    assert torch.equal(load_file(str(folder / randlora.PEFT_WEIGHTS_NAME))["base_model.model.0.randlora_lambda"], model[0].lam)


def test_loading_a_randlora_file_into_a_from_peft_model_names_the_file(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8))
    get_peft_model(copy.deepcopy(base), RandLoraConfig(r=4, target_modules=["0"])).save_pretrained(str(tmp_path / "peft"))
    ours = randlora.inject(copy.deepcopy(base), ["0"], rank=4)
    randlora.save_adapter(ours, tmp_path / "a.safetensors")
    model = randlora.from_peft(copy.deepcopy(base), tmp_path / "peft")
    with pytest.raises(ValueError, match="bases loaded from a PEFT folder") as info:
        randlora.load_adapter(model, tmp_path / "a.safetensors")
    assert str(tmp_path / "a.safetensors") in str(info.value)


def test_from_peft_names_only_the_unsupported_field(good):
    edit_config(good, layers_to_transform=[0])
    with pytest.raises(ValueError, match=r"layers_to_transform=\[0\] is not supported by from_peft") as info:
        randlora.from_peft(base_model("mlp"), good)
    assert "bias" not in str(info.value)
