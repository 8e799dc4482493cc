"""Targeting and refusals (randlora.py, section "Targeting and refusals"): which layers of which real
architectures get adapted, that they then compute base + s·ΔW, and the refusals table.

Tiny models from configs (random init, offline): LLaMA, GPT-2 (Conv1D, tied head), T5 (q, k, v, o,
wi, wo), BERT and ViT classifiers (heads as modules_to_save), torch's nn.TransformerEncoder (eval
fast path), an open_clip-style block around nn.MultiheadAttention; small hand-made models for
modules under two names, shared weights, nested targets, weight_norm, and the target kinds (list,
regex, "all-linear", callable).

How the reference is built: a deep copy of the model before inject, in float64; for every
adapter, ``scaling * ΔW`` from conftest's independent ``ref_delta`` (float64, element by element
from docs/MATH.md#the-update, on the adapter's own ``random_bases`` and lam/gam) is added to the
corresponding weight of the copy (transposed for Conv1D's (in, out) layout; MHA's packed
in_proj_weight is one (3E, E) matrix). Each adapted weight is detached from whatever else shares
it (a tied head's embedding keeps its value), so the reference is exactly "base plus update
where the adapter is".

Tolerances:
  * float64 model (``model.double()``: bases widened from their float32 draw, lam/gam float32 and
    exactly representable) vs the float64 reference: RTOL64 = 1e-9 relative to max|ref| (only
    float64 rounding of a few hundred products).
  * float32 model vs the float64 reference: RTOL32 = 1e-4 relative to max|ref|. float32 rounding
    (2^-24 = 6e-8 per operation) through sums of <= 128 terms, two blocks of attention, norms and
    softmax measures <= 1.2e-6 here; 1e-4 leaves margin while the adapters move the outputs by more
    than 1e-2 relative (asserted in every comparison, so a missing update cannot pass).
"""

from __future__ import annotations

import copy
import re
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import transformers  # noqa: E402,F401  (test extras: a missing one must fail, not skip)
from conftest import (
    adapter_slot,
    arch_reference,
    MhaHolder,
    OwnForward,
    ResidualAttentionBlock,
    arch_base,
    arch_inputs,
    arch_randomize,
    arch_run,
    arch_train_steps,
    assert_close,
    assert_refused,
    assert_unchanged,
    distinct_adapters,
    fresh_tiny,
    randomize_,
    randomize_model_,
    ref_delta,
    ref_layer_delta,
    rel_err,
    save_load_identical,
    snapshot,
    tiny_llama,
)
from torch.nn.utils import parametrize

import randlora

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_thread")]

RTOL64 = 1e-9
RTOL32 = 1e-4
MIN_EFFECT = 1e-2  # the adapters must move the outputs at least this much (relative)
STRATEGIES = ("build", "factorized")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc", "lm_head"]  # c_proj: attn.c_proj and mlp.c_proj
T5_TARGETS = ["q", "k", "v", "o", "wi", "wo"]
BLOCK_TARGETS = ["attn", "c_fc", "c_proj"]
ALL = ["embed", "block.0", "block.2", "head"]  # TinyNet's linear layers


# -----------------------------------------------------------------------------
# Models


TARGETS = {
    "llama": LLAMA_TARGETS,
    "gpt2": GPT2_TARGETS,
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense"],
    # every linear layer of the blocks, as transformers 5 names them (q_proj ... fc2) or 4.x (query ... dense)
    "vit": r".*\.(q_proj|k_proj|v_proj|o_proj|fc1|fc2|query|key|value|dense)",
    "t5": T5_TARGETS,
    "encoder": ["self_attn", "linear1", "linear2"],
    **{k: BLOCK_TARGETS for k in ("block", "block-sf", "block-kv", "block-kv-sf")},
}


base, inputs, run = arch_base, arch_inputs, arch_run  # conftest's tiny architectures (seeded per kind)


def adapted(kind: str, strategy: str = "auto", rank: int = 6, seed: int = 0, model: nn.Module | None = None, **kw) -> tuple[nn.Module, nn.Module]:
    """(model with random non-zero lam/gam, its untouched base copy).

    The copy is frozen as inject freezes the base: torch's MHA rounds differently when its
    projection weights require grad, even under no_grad, and "exactly the base model" compares
    like with like."""
    model = base(kind) if model is None else model
    before = copy.deepcopy(model).requires_grad_(False)  # frozen like the adapted model's base
    randlora.inject(model, TARGETS[kind], rank, seed, alpha=2.0 * rank, strategy=strategy, **kw)
    arch_randomize(model, seed)
    return model, before


def names_of(model: nn.Module) -> list[str]:
    return [n for n, _ in randlora.named_adapters(model)]


# -----------------------------------------------------------------------------
# The float64 reference


def check_against(model, ref, before, inp, dtype, rtol, what, modes=((True, True), (True, False), (False, True), (False, False))):
    """``model`` (in ``dtype``) == ``ref`` in train/eval x grad/no-grad; the update matters."""
    for train, grad in modes:
        model.train(train)
        ref.train(train)
        before.train(train)
        with torch.set_grad_enabled(grad):
            got = run(model, inp, dtype)
            want = run(ref, inp, torch.float64)
            plain = run(before, inp, next(before.parameters()).dtype)
        assert got.dtype == dtype, what
        assert rel_err(want, plain) > MIN_EFFECT, f"{what}: the update hardly changes the output"
        assert_close(got, want, rtol, what=f"{what} train={train} grad={grad}")


def check_grads(model, before, inp, dtype, rtol, what, train=True):
    """lam/gam gradients of a weighted sum of the outputs == those of the float64 reference."""
    ref, leaves = arch_reference(before, model, grad=True)
    model.train(train)
    ref.train(train)
    for p in model.parameters():
        p.grad = None
    out = run(model, inp, dtype)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (out * w.to(dtype)).sum().backward()
    (run(ref, inp, torch.float64) * w).sum().backward()
    checked = 0
    for name, ad in distinct_adapters(model):
        for mine, theirs in zip((ad.lam, ad.gam), leaves[name]):
            assert mine.grad is not None, f"{what}: {name} got no gradient"
            assert mine.grad.dtype == torch.float32, f"{what}: {name} grad is {mine.grad.dtype}"
            assert_close(mine.grad, theirs.grad, rtol, what=f"{what}: grad of {name}")
            checked += 1
    assert checked >= 2


def check_float32_then_float64(model, ref, before, inp, what, grads64=True):
    """Outputs and lam/gam gradients in float32, then the same model after ``model.double()``
    against the same float64 reference (its gradients too unless ``grads64`` is False)."""
    check_against(model, ref, before, inp, torch.float32, RTOL32, f"{what} fp32")
    check_grads(model, before, inp, torch.float32, 1e-3, f"{what} fp32")
    model.double()
    check_against(model, ref, before.double(), inp, torch.float64, RTOL64, f"{what} fp64")
    if grads64:
        check_grads(model, before, inp, torch.float64, 1e-6, f"{what} fp64")


def check_weights(model, before, rtol, what):
    """Every adapted weight, read as a parent reads it (``owner.<param>``), is W + s*ΔW."""
    ref, _ = arch_reference(before, model)
    for name, ad in distinct_adapters(model):
        owner, pname, _ = adapter_slot(name, ad)
        got = getattr(model.get_submodule(owner), pname)
        assert_close(got, getattr(ref.get_submodule(owner), pname), rtol, what=f"{what}: {owner}.{pname}")


def refused(model: nn.Module, fn, errors, *patterns: str, inp=None) -> str:
    """``fn(model)`` raises one of ``errors`` matching every pattern; the model is unchanged, and so
    are its (eval) outputs on ``inp``."""
    return assert_refused(model, fn, errors, *patterns, outputs=None if inp is None else lambda m: run(m.eval(), inp))


# =============================================================================
# Target kinds: names, regex, callable, "all-linear"


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
    assert sorted(names_of(model)) == sorted(expected)
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
    assert names_of(model) == ["head"]


def test_regex_that_is_a_name_suggests_a_list():
    msg = refused(fresh_tiny(), lambda m: randlora.inject(m, "0", rank=2), ValueError, r"targets=\['0'\]", "block.0", "regular expression")
    assert "block.2" not in msg.split("linear layers:")[0]
    # A regex matching nothing, and no name either: no hint.
    msg = refused(fresh_tiny(), lambda m: randlora.inject(m, "q_proj", rank=2), ValueError, "matched no module")
    assert "would select" not in msg
    # A real model: "q_proj" as a str is a regex that matches no qualified name; as a list it would.
    msg = refused(base("llama"), lambda m: randlora.inject(m, "q_proj", 4), ValueError, "q_proj", r"targets=\['q_proj'\]")
    assert "list" in msg.lower(), msg


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


@pytest.mark.parametrize("targets", [None, 3, 2.5, b"head", {"head": 1}, [], ["head", 3], nn.Linear, iter(["head"])])
def test_bad_targets_type_names_the_argument(targets):
    msg = refused(fresh_tiny(), lambda m: randlora.inject(m, targets, rank=2), TypeError, "targets")
    assert "list" in msg and "regex" in msg


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_all_linear_excludes_head_like_peft(kind):
    from peft import RandLoraConfig, get_peft_model
    from peft.tuners.randlora.layer import RandLoraLayer

    model = randlora.inject(base(kind), "all-linear", 4)
    ours = {n for n, _ in distinct_adapters(model)}
    assert "lm_head" not in ours and type(model.lm_head) is nn.Linear
    pm = get_peft_model(base(kind), RandLoraConfig(r=4, target_modules="all-linear"))
    theirs = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, RandLoraLayer)}
    assert ours == theirs
    every = {n for n, m in base(kind).named_modules() if type(m).__name__ in ("Linear", "Conv1D")}
    assert ours == every - {"lm_head"}
    if kind == "llama":
        assert len(ours) == 2 * 7


def test_all_linear_plain_module_and_modules_to_save():
    # No get_output_embeddings() and no head attribute PEFT knows: every Linear (PEFT does the
    # same); modules to save are left out.
    model = randlora.inject(fresh_tiny(), "all-linear", rank=2)
    assert sorted(names_of(model)) == sorted(ALL)
    model = randlora.inject(fresh_tiny(), "ALL-LINEAR", rank=2, modules_to_save=["head"])
    assert sorted(names_of(model)) == ["block.0", "block.2", "embed"]
    assert isinstance(model.head, randlora.SavedModule)
    empty = randlora.inject(fresh_tiny(), ["head"], rank=2, modules_to_save=[])
    assert not any(isinstance(m, randlora.SavedModule) for m in empty.modules())
    # A second "all-linear" finds nothing new: the adapters' own base layers are no targets.
    refused(model, lambda m: randlora.inject(m, "all-linear", rank=2), ValueError, "selected no module")


@pytest.mark.parametrize("rank", [2, 4])
def test_all_linear_leaves_output_heads_out(rank):
    """Issue 19.11: "all-linear" leaves out the model's own top-level classifier (PEFT's rule), so a
    rank larger than the head (BERT's classifier is 32 -> 3) is no error; with
    modules_to_save=["classifier"] the head trains in full. (0.2 adapted the classifier, and at
    rank 4 refused: "rank 4 is larger than min(in, out) = 3 of layer 'classifier'".)"""
    model = randlora.inject(base("bert"), "all-linear", rank)
    ours = {n for n, _ in distinct_adapters(model)}
    every = {n for n, m in base("bert").named_modules() if isinstance(m, nn.Linear)}
    assert "classifier" in every and ours == every - {"classifier"}
    assert type(model.classifier) is nn.Linear and not any(p.requires_grad for p in model.classifier.parameters())
    # The head as a module to save: a trainable copy, the adapters elsewhere as before.
    model = randlora.inject(base("bert"), "all-linear", rank, modules_to_save=["classifier"])
    assert {n for n, _ in distinct_adapters(model)} == ours
    assert isinstance(model.classifier, randlora.SavedModule)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and not n.endswith((".lam", ".gam"))}
    assert trainable == {"classifier.trained.weight", "classifier.trained.bias"}
    start = model.classifier.trained.weight.detach().clone()
    arch_train_steps(model, "bert", steps=1)
    assert not torch.equal(model.classifier.trained.weight, start), "the head did not train"
    assert torch.equal(model.classifier.original.weight, base("bert").classifier.weight)


def test_all_linear_on_an_mha_block_adapts_out_proj_only():
    """"all-linear" takes every nn.Linear: an nn.MultiheadAttention's out_proj (which the MHA reads
    as a weight, adapted), never its packed in-projection (a bare parameter)."""
    model = base("block")
    before = copy.deepcopy(model).requires_grad_(False)
    randlora.inject(model, "all-linear", 6, alpha=12.0)
    arch_randomize(model)
    assert sorted(names_of(model)) == ["attn.out_proj", "mlp.c_fc", "mlp.c_proj"]
    assert not parametrize.is_parametrized(model.attn) and type(model.attn.in_proj_weight) is nn.Parameter
    assert torch.equal(model.attn.in_proj_weight, before.attn.in_proj_weight) and not model.attn.in_proj_weight.requires_grad
    inp = inputs("block")
    ref, _ = arch_reference(before, model)
    check_against(model, ref, before, inp, torch.float32, RTOL32, "all-linear block")
    check_grads(model, before, inp, torch.float32, 1e-3, "all-linear block")


# =============================================================================
# The refusals table: "cannot adapt '<name>': <why>", model unchanged


@pytest.mark.parametrize("targets", ["all-linear", r".*", lambda n, m: True, [""]])
def test_bare_layer_as_the_model_is_refused(targets):
    torch.manual_seed(0)
    refused(nn.Linear(8, 6), lambda m: randlora.inject(m, targets, rank=2), ValueError, "model itself", "root", "Linear", r"nn\.Sequential")


@pytest.mark.parametrize("targets", [["head"], "head", lambda n, m: isinstance(m, nn.Linear), r"head(\.base)?"])
def test_inject_into_adapted_layer_refused(targets):
    model = fresh_tiny()
    randlora.inject(model, ["head"], rank=2)
    randomize_model_(model, 1)
    refused(model, lambda m: randlora.inject(m, targets, rank=2), ValueError, "already adapted")


class LinearLike(nn.Module):
    """A linear-like module (in_features, out_features, forward) that holds a layer of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.in_features = self.out_features = 8
        self.inner = nn.Linear(8, 8)

    def forward(self, x):
        return self.inner(x)


def test_a_target_containing_an_adapter_is_refused():
    """A second inject on a linear-like module around an adapted layer would wrap an adapter in an adapter."""
    torch.manual_seed(0)
    model = randlora.inject(nn.Sequential(LinearLike()), ["0.inner"], rank=2)
    randomize_model_(model, 1)
    refused(model, lambda m: randlora.inject(m, ["0"], rank=2), ValueError, re.escape("cannot adapt '0'"), "contains an adapter")


def test_a_lazy_layer_not_yet_run_is_refused_naming_why():
    """Its in_features is 0 until a forward: refused as uninitialised, not as "rank larger than min(in, out) = 0"."""
    model = nn.Sequential(nn.LazyLinear(8))
    with pytest.raises(ValueError, match="LazyLinear whose shape is not known yet; run one forward pass first"):
        randlora.inject(model, ["0"], rank=2)
    assert type(model[0]) is nn.LazyLinear and model[0].has_uninitialized_params()


def test_a_lazy_layer_elsewhere_in_the_model_is_refused_before_anything_changes(tmp_path):
    """An untargeted lazy layer that has not run yet cannot be frozen (torch refuses requires_grad_ on it): inject and
    a load into a plain model refuse it up front, naming it, instead of failing after the targets were replaced."""
    torch.manual_seed(0)
    donor = randlora.inject(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), ["0"], rank=2)
    randlora.save_adapter(donor, tmp_path / "a.safetensors")
    model = nn.Sequential(nn.Linear(8, 8), nn.LazyLinear(4))
    before = ([type(m) for m in model.modules()], [(n, p.requires_grad) for n, p in model.named_parameters()],
              model[0].weight.detach().clone())
    for fn in (lambda: randlora.inject(model, ["0"], rank=2),
               lambda: randlora.load_adapter(model, tmp_path / "a.safetensors")):
        with pytest.raises(ValueError, match=r"lazy parameters '1\.weight', '1\.bias' are not initialized.*forward"):
            fn()
        after = ([type(m) for m in model.modules()], [(n, p.requires_grad) for n, p in model.named_parameters()])
        assert after == before[:2] and torch.equal(model[0].weight, before[2])
    model(torch.randn(2, 8))  # once it has run, it is adapted as usual
    assert [n for n, _ in randlora.named_adapters(randlora.inject(model, ["0"], rank=2))] == ["0"]


def test_a_layer_under_two_names_is_checked_under_each_parent():
    """MHA's out_proj also registered elsewhere, first: its first name's parent is not the MHA, but the MHA still reads
    its weight, so adapter dropout, which could never apply, is refused under either name."""

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.proj, self.mha = mha.out_proj, mha

    torch.manual_seed(0)
    for targets in (["mha.out_proj"], ["proj"]):
        refused(Holder(), lambda m: randlora.inject(m, targets, rank=2, dropout=0.5), ValueError, "reads out_proj.weight", "dropout")


@pytest.mark.parametrize("targets,name", [(["head", "norm"], "norm"), ("block|head", "block"), (lambda n, m: n in ("head", "block.1"), "block.1")])
def test_non_linear_target_type_error(targets, name):
    refused(fresh_tiny(), lambda m: randlora.inject(m, targets, rank=2), TypeError, re.escape(f"cannot adapt {name!r}"), "not a linear layer")


def test_rank_too_large_names_layer_and_shape():
    model = fresh_tiny()
    # rank 6 fits embed (6->8), block.0 (8->16), block.2 (16->8) but not head (8->5).
    refused(model, lambda m: randlora.inject(m, ALL, rank=6), ValueError,
            re.escape("cannot adapt 'head': rank 6 is larger than min(in, out) = 5 of layer 'head' (in_features=8, out_features=5)"))  # fmt: skip
    randlora.inject(model, ALL, rank=5)  # exactly min(in, out) is fine
    assert len(names_of(model)) == 4


class Outer(nn.Module):
    """A linear-like module containing a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.in_features, self.out_features = 8, 8
        self.inner = nn.Linear(8, 8)

    def forward(self, x):
        return self.inner(x) * 2


@pytest.mark.parametrize("targets", [["outer", "inner"], r"outer(\.inner)?", lambda n, m: n.startswith("outer")])
def test_target_containing_a_target_refused(targets):
    model = nn.Sequential(OrderedDict(first=nn.Linear(8, 8), outer=Outer(), head=nn.Linear(8, 2)))
    alone = r"(?<![\w.])outer(?![\w.])"  # the name itself, not a prefix
    refused(model, lambda m: randlora.inject(m, targets, rank=2), ValueError, r"'outer'", alone, r"'outer\.inner'")


def test_mha_containing_its_out_proj_refused():
    alone = r"(?<![\w.])attn(?![\w.])"
    refused(base("block"), lambda m: randlora.inject(m, ["attn", "out_proj"], 4), ValueError, alone, r"'attn'", r"attn\.out_proj")


def test_mha_refusals_name_the_module_and_reason():
    torch.manual_seed(0)
    model = MhaHolder()
    refused(model, lambda m: randlora.inject(m, ["attn"], 4, dropout=0.1), ValueError, r"'attn'.*dropout")
    refused(model, lambda m: randlora.inject(m, ["out_proj"], 4, dropout=0.1), ValueError, r"'attn.out_proj'.*out_proj.*dropout")
    refused(model, lambda m: randlora.inject(m, ["attn"], 17), ValueError, r"rank 17 .*attn.in_proj_weight|rank 17 .*attn")
    # A linear with a forward of its own as out_proj: MHA would compute with its weight, skipping it.
    model.attn.out_proj = OwnForward(16, 16)
    refused(model, lambda m: randlora.inject(m, ["attn.out_proj"], 4), ValueError, r"'attn.out_proj'.*MultiheadAttention reads out_proj.weight")
    refused(model, lambda m: randlora.inject(m, ["attn"], 4), ValueError, r"'attn'.*out_proj")
    # out_proj alone (plain, no dropout) is fine: MHA reads its adapted .weight.
    model = MhaHolder()
    randlora.inject(model, ["out_proj"], 3)
    randlora.inject(model, ["head"], 3)
    refused(model, lambda m: randlora.inject(m, ["attn"], 3), ValueError, "already adapted")


def test_transformer_encoder_layer_opaque_linear_refused():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 1, enable_nested_tensor=False)
    enc.layers[0].linear1 = OwnForward(16, 32)
    refused(enc, lambda m: randlora.inject(m, ["linear1"], 4), ValueError, r"'layers.0.linear1'.*TransformerEncoderLayer reads linear1.weight")


@pytest.mark.parametrize("hooked", ["norm1", "linear1"])
def test_transformer_encoder_nested_inference_path_with_a_hooked_layer(hooked):
    """nn.TransformerEncoder turns a padded batch into a nested tensor in inference; a layer with a forward hook (on
    an untargeted norm, or on a target) leaves the fused path and calls linear1/linear2 with that nested tensor.
    The adapted layers compute base + s ΔW on it, against the float64 reference on every real token."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    before = copy.deepcopy(enc)
    randlora.inject(enc, ["linear1", "linear2"], rank=4)
    arch_randomize(enc, 1)
    enc.layers[0].get_submodule(hooked).register_forward_hook(lambda m, i, o: None)
    x, mask = torch.randn(2, 7, 16), torch.tensor([[False] * 5 + [True] * 2, [False] * 7])
    ref, _ = arch_reference(before, enc)
    with torch.no_grad():
        y, want = enc(x, src_key_padding_mask=mask), ref(x.double(), src_key_padding_mask=mask)
    assert_close(y[~mask], want[~mask], 1e-5)


def test_a_nested_input_with_adapter_dropout_in_training_is_refused():
    """Dropout on a nested input is not applied by the nested path, so a training call with dropout refuses it
    rather than computing without it; in eval the same call computes."""
    torch.manual_seed(0)
    model = randlora.inject(nn.Sequential(nn.Linear(8, 6)), ["0"], rank=2, dropout=0.5).train()
    x = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8)])
    with pytest.raises(ValueError, match="RandLoraLinear '0': adapter dropout on a nested-tensor input"):
        model(x)
    assert model.eval()(x).size(0) == 2


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w

    def right_inverse(self, w):
        return w / 2


class _ScaledRows(nn.Module):
    """weight = direction * scale[:, None], stored as a 2-D direction and a 1-D scale (two originals)."""

    def forward(self, direction, scale):
        return direction * scale[:, None]

    def right_inverse(self, w):
        return w.clone(), torch.ones(w.shape[0])


@pytest.mark.parametrize("kind", ["weight_norm", "custom", "old_weight_norm", "spectral_norm", "two_originals"])
def test_parametrized_or_hooked_weight_refused_at_inject(kind):
    """A weight computed by a parametrization (weight_norm, a custom one, spectral_norm) or a forward pre-hook (the
    old weight_norm): the layer would compute right, but merge could not write W + s·ΔW through
    it, so inject refuses, naming the layer and the reason (README "Refused at inject"); the
    model is unchanged, spectral_norm's power-iteration buffers included (reading its weight in train mode would
    step them). (0.2's test allowed either a correct merge or this refusal; 0.3 documents the refusal.)"""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    for i in (0, 2):
        if kind == "weight_norm":
            torch.nn.utils.parametrizations.weight_norm(net[i])
        elif kind == "custom":
            torch.nn.utils.parametrize.register_parametrization(net[i], "weight", _Double())
        elif kind == "spectral_norm":
            torch.nn.utils.parametrizations.spectral_norm(net[i])
        elif kind == "two_originals":
            torch.nn.utils.parametrize.register_parametrization(net[i], "weight", _ScaledRows())
        else:  # the old hook-based weight_norm: weight recomputed from g, v before every forward
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.nn.utils.weight_norm(net[i])
    assert all(randlora._classify(net[i])[0] == "opaque" for i in (0, 2))
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    outputs = None if kind == "spectral_norm" else (lambda m: m(x))  # a spectral_norm call in train mode steps it
    assert_refused(net, lambda m: randlora.inject(m, ["0", "2"], rank=2), ValueError, r"cannot adapt '0'", "weight_norm",
                   "parametrization", outputs=outputs)  # fmt: skip


def test_a_refused_attention_with_spectral_norm_is_left_as_it_was():
    """An attention module whose input projection is under spectral_norm is refused, and the refusal reads only the
    stored weights: the power iteration's buffers do not step (train mode)."""
    mha = nn.MultiheadAttention(8, 2)
    torch.nn.utils.parametrizations.spectral_norm(mha, "in_proj_weight")
    assert_refused(nn.Sequential(mha), lambda m: randlora.inject(m, ["0"], rank=2), ValueError, "cannot adapt '0'",
                   "parametrized")


def test_a_parametrized_bias_alone_is_adapted_beside_the_layer():
    """A parametrization of the bias alone leaves the weight plain: the layer is adapted beside its own call (its
    bias as parametrized), computing base(x) + s x ΔW^T against the float64 reference; merge is refused."""
    torch.manual_seed(5)
    net = nn.ModuleDict(dict(lin=nn.Linear(6, 8)))
    torch.nn.utils.parametrize.register_parametrization(net.lin, "bias", _Double())
    W64, b64 = net.lin.weight.detach().double(), 2 * net.lin.parametrizations.bias.original.detach().double()
    randlora.inject(net, ["lin"], rank=2)
    randomize_(net.lin, 1)
    x = torch.randn(4, 6)
    assert_close(net.lin(x), x.double() @ (W64 + ref_layer_delta(net.lin)).t() + b64, 1e-5)
    assert_refused(net, randlora.merge, TypeError, "cannot merge: layer 'lin'")


# =============================================================================
# Modules under two names, weights shared by two modules


class TwoNames(nn.Module):
    """One Linear reachable as ``block`` and ``alias``, applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(8, 8)
        self.alias = self.block
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.alias(torch.tanh(self.block(x)))))


class SharedWeight(nn.Module):
    """Two Linears sharing one weight Parameter (own biases)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(8, 8)
        self.l2 = nn.Linear(8, 8)
        self.l2.weight = self.l1.weight
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def _x8():
    return {"x": torch.randn(4, 8, generator=torch.Generator().manual_seed(2))}


@pytest.mark.parametrize("targets", [["block", "alias"], "block|alias", ["block"], ["alias"]])
def test_one_module_under_two_names(targets):
    """Adapted once, under its first name; the same adapter under both; merge adds the update once;
    eject puts one plain Linear back under both names."""
    torch.manual_seed(0)
    model = TwoNames()
    before = copy.deepcopy(model).requires_grad_(False)  # frozen like the adapted model's base
    randlora.inject(model, targets, 4, alpha=8.0)
    arch_randomize(model, scale=1.0)
    assert model.block is model.alias and isinstance(model.block, randlora.RandLoraLinear)
    assert names_of(model) == ["block"] and model.block.name == "block"
    assert len(distinct_adapters(model)) == 1
    inp = _x8()
    ref, _ = arch_reference(before, model)
    check_against(model, ref, before, inp, torch.float32, RTOL32, "two names")
    W0 = before.block.weight.detach().clone()
    randlora.merge(model)
    assert_close(model.block.base.weight, ref.block.weight, 1e-6, what="merged once")
    check_against(model, ref, before, inp, torch.float32, RTOL32, "two names merged", modes=((False, False),))
    randlora.unmerge(model)
    assert_close(model.block.base.weight, W0, 1e-6, what="unmerged")
    randlora.eject(model)
    assert model.block is model.alias and type(model.block) is nn.Linear
    check_against(model, ref, before, inp, torch.float32, RTOL32, "two names ejected", modes=((False, False),))


class StorageShared(SharedWeight):
    """Two Linears whose two weight Parameters share one storage (a tie made through ``.data``)."""

    def __init__(self) -> None:
        super().__init__()
        self.l2.weight = nn.Parameter(torch.empty(0))
        self.l2.weight.data = self.l1.weight.data


class Aliased(nn.Module):
    """One module under two names (``a``, ``b``) and two modules sharing one weight (``c``, ``d``)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = self.a
        self.c = nn.Linear(8, 8)
        self.d = nn.Linear(8, 8)
        self.d.weight = self.c.weight
        self.e = nn.Linear(8, 3)

    def forward(self, x):
        return self.e(self.d(self.c(self.b(self.a(x)))))


@pytest.mark.parametrize(
    "cls,one,two,targets",
    [(SharedWeight, "l1", "l2", ["l1"]), (SharedWeight, "l1", "l2", ["l2"]), (SharedWeight, "l1", "l2", ["l1", "l2"]),
     (Aliased, "c", "d", ["c"]), (Aliased, "c", "d", ["d"]), (Aliased, "c", "d", ["c", "d"]),
     (StorageShared, "l1", "l2", ["l1"]), (StorageShared, "l1", "l2", ["l2"])],
    ids=str,
)  # fmt: skip
def test_two_linears_sharing_a_weight(cls, one, two, targets):
    """Each adapted layer computes W + its own update, the shared weight itself untouched (the other
    owner computes with W); merge and eject are refused naming both owners, model unchanged."""
    torch.manual_seed(0)
    model = cls()
    before = copy.deepcopy(model).requires_grad_(False)  # frozen like the adapted model's base
    W = model.get_submodule(one).weight.detach().clone()
    randlora.inject(model, targets, 4, alpha=8.0)
    arch_randomize(model, scale=1.0)
    inp = _x8()
    ref, _ = arch_reference(before, model)
    check_against(model, ref, before, inp, torch.float32, RTOL32, f"shared weight {targets}")
    owners = [model.get_submodule(n).base if n in targets else model.get_submodule(n) for n in (one, two)]
    assert owners[0].weight.data_ptr() == owners[1].weight.data_ptr() and torch.equal(owners[0].weight, W), "the shared weight changed"
    for verb in ("merge", "eject"):
        refused(model, getattr(randlora, verb), ValueError, rf"'{one}(\.base)?\.weight'", rf"'{two}(\.base)?\.weight'", "shared", inp=inp)


class SliceShared(nn.Module):
    """``q``'s weight is a Parameter on rows 8: of ``p``'s (a slice of another weight's storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.p, self.q = nn.Linear(8, 16), nn.Linear(8, 8)
        self.q.weight = nn.Parameter(self.p.weight.data[8:])

    def forward(self, x):
        return self.p(x)[..., :8] + self.q(x)


def test_a_weight_on_a_slice_of_another_is_shared():
    """Bytes shared at another offset are shared all the same: merge and eject into ``q`` would change ``p``'s
    computation, so both are refused naming both owners, the model and its outputs unchanged."""
    torch.manual_seed(0)
    model = SliceShared()
    randlora.inject(model, ["q"], 4, alpha=8.0)
    arch_randomize(model, scale=1.0)
    for verb in ("merge", "eject"):
        refused(model, getattr(randlora, verb), ValueError, r"'p\.weight'", r"'q\.base\.weight'", "shared", inp=_x8())


# =============================================================================
# LLaMA


@pytest.mark.parametrize("strategy", ["build", "factorized", "auto"])
def test_llama_matches_float64_reference(strategy):
    model, before = adapted("llama", strategy)
    assert len(distinct_adapters(model)) == 2 * 7
    inp = inputs("llama")
    ref, _ = arch_reference(before, model)
    check_float32_then_float64(model, ref, before, inp, f"llama {strategy}")


def test_llama_smoke():
    """inject on q/k/v/up/down of a LLaMA with grouped-query attention: lam = 0 computes the base;
    one training step: only lam/gam get gradients, and the step changes the logits."""
    torch.manual_seed(0)
    model = tiny_llama(num_key_value_heads=2)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        logits0 = model(ids).logits
    targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    randlora.inject(model, targets, rank=4, seed=0)
    names = names_of(model)
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


# =============================================================================
# GPT-2: Conv1D layers and the tied head


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gpt2_conv1d_and_tied_head_forward(strategy):
    model, before = adapted("gpt2", strategy)
    names = {n for n, _ in distinct_adapters(model)}
    assert "lm_head" in names and len(names) == 2 * 4 + 1  # c_attn, attn.c_proj, c_fc, mlp.c_proj; lm_head
    assert {type(a.base).__name__ for _, a in distinct_adapters(model)} == {"Conv1D", "Linear"}
    assert {a.layout for _, a in distinct_adapters(model)} == {"conv1d", "linear"}
    # The head stays tied to the embedding: inject copies no weight, the embedding is untouched.
    assert model.transformer.wte.weight is model.lm_head.base.weight
    assert torch.equal(model.transformer.wte.weight, before.transformer.wte.weight)
    inp = inputs("gpt2")
    ref, _ = arch_reference(before, model)
    check_float32_then_float64(model, ref, before, inp, f"gpt2 {strategy}", grads64=False)


@pytest.mark.parametrize("verb", ["merge", "eject"])
def test_gpt2_tied_head_merge_refused(verb):
    model, _ = adapted("gpt2")
    refused(model, getattr(randlora, verb), ValueError, r"'lm_head(\.base)?\.weight'", r"'transformer\.wte\.weight'", inp=inputs("gpt2"))


def test_gpt2_retie_after_inject():
    """Issue 19.9: re-tying after inject (``model.tie_weights()``, ``lm_head.weight = wte.weight``)
    sets the adapted head's base weight (0.2: a bare ``KeyError: "attribute 'weight' already
    exists"``); the model then computes base + s·ΔW, and merge still refuses naming both owners."""
    model, before = adapted("gpt2")
    assert isinstance(model.lm_head, randlora.RandLoraLinear)
    model.tie_weights()
    assert model.lm_head.base.weight is model.transformer.wte.weight
    model.lm_head.weight = model.transformer.wte.weight
    assert isinstance(model.lm_head, randlora.RandLoraLinear) and "weight" not in model.lm_head._parameters
    assert model.lm_head.base.weight is model.transformer.wte.weight
    assert torch.equal(model.transformer.wte.weight, before.transformer.wte.weight)
    inp = inputs("gpt2")
    ref, _ = arch_reference(before, model)
    check_against(model, ref, before, inp, torch.float32, RTOL32, "gpt2 re-tied")
    check_grads(model, before, inp, torch.float32, 1e-3, "gpt2 re-tied")
    refused(model, randlora.merge, ValueError, r"'lm_head(\.base)?\.weight'", r"'transformer\.wte\.weight'", inp=inp)


# =============================================================================
# T5: every projection (wo's weight is read by its parent)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_t5_all_projections(strategy, tmp_path):
    model, before = adapted("t5", strategy, rank=4)
    assert len(distinct_adapters(model)) == 2 * 6 + 2 * 10
    inp = inputs("t5")
    ref, _ = arch_reference(before, model)
    check_weights(model, before, 1e-6, "t5")  # reads weights only: order-free
    check_float32_then_float64(model, ref, before, inp, f"t5 {strategy}", grads64=False)
    model.float()
    before.float()
    save_load_identical(model, base("t5"), inp, tmp_path / "a.safetensors")
    randlora.merge(model)
    check_against(model, ref, before, inp, torch.float32, RTOL32, "t5 merged", modes=((False, False),))
    randlora.unmerge(model)
    check_against(model, ref, before, inp, torch.float32, RTOL32, "t5 unmerged", modes=((True, True),))
    randlora.eject(model)
    assert not list(randlora.named_adapters(model))
    assert type(model.encoder.block[0].layer[1].DenseReluDense.wo) is nn.Linear
    check_against(model, ref, before, inp, torch.float32, RTOL32, "t5 ejected", modes=((False, False),))


# =============================================================================
# BERT / ViT classifiers: heads as modules_to_save


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_classifier_head_modules_to_save(kind, tmp_path):
    model, before = adapted(kind, modules_to_save=["classifier"])
    inp = inputs(kind)
    ref, _ = arch_reference(before, model)
    check_against(model, ref, before, inp, torch.float32, RTOL32, f"{kind} (head untrained)")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n in trainable if not n.endswith((".lam", ".gam"))}
    assert len(head) >= 2 and all("classifier" in n for n in head), head
    assert not any(p.requires_grad for n, p in model.named_parameters() if "classifier" not in n and not n.endswith((".lam", ".gam")))
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n in head}
    arch_train_steps(model, kind)
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters() if n in head), "head did not train"
    # The adapter file carries the head; loading it into a fresh model reproduces the logits.
    assert any("classifier" in k for k in randlora.adapter_state_dict(model))
    fresh = save_load_identical(model, base(kind), inp, tmp_path / "a.safetensors")
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == trainable
    # disable(): exactly the base model, the original head included (in the model and the reload).
    for m in (model, fresh):
        m.eval()
        before.eval()
        with torch.no_grad():
            trained = run(m, inp)
            with randlora.disable(m):
                assert torch.equal(run(m, inp), run(before, inp))
            assert torch.equal(run(m, inp), trained)
        assert rel_err(trained, run(before, inp)) > MIN_EFFECT


# =============================================================================
# nn.TransformerEncoder: the eval fast path reads the weights directly


@pytest.mark.parametrize("targets", [["linear1", "linear2"], ["self_attn", "linear1", "linear2"]])
def test_transformer_encoder_fast_path(targets, monkeypatch):
    assert torch.backends.mha.get_fastpath_enabled()
    calls = []
    fwd = torch._transformer_encoder_layer_fwd

    def counting(*args, **kw):
        calls.append(1)
        return fwd(*args, **kw)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counting)
    model = base("encoder")
    before = copy.deepcopy(model).requires_grad_(False)  # frozen like the adapted model's base
    inp = inputs("encoder")
    with torch.no_grad():
        plain = run(before.eval(), inp)
    assert len(calls) == 2, "the base encoder does not take the fast path: the check below would be vacuous"
    randlora.inject(model, targets, 6, alpha=12.0)
    arch_randomize(model)
    ref, _ = arch_reference(before, model)
    with torch.no_grad():
        want = run(ref.train(), inp, torch.float64)  # train mode, dropout 0: the slow path
    assert rel_err(want, plain) > MIN_EFFECT
    # eval under no_grad: the fast path runs (reading .weight of the adapted layers) and is right.
    calls.clear()
    model.eval()
    with torch.no_grad():
        fast = run(model, inp)
    assert len(calls) == 2, "the adapted encoder left the fast path in eval under no_grad"
    assert_close(fast, want, RTOL32, what="encoder fast path")
    # eval with grad, train: the slow paths.
    calls.clear()
    for train in (False, True):
        model.train(train)
        assert_close(run(model, inp), want, RTOL32, what=f"encoder slow path train={train}")
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            assert_close(run(model, inp), want, RTOL32, what="encoder fast path off")
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    assert not calls
    check_grads(model, before, inp, torch.float32, 1e-3, "encoder")
    randlora.merge(model)
    model.eval()
    with torch.no_grad():
        assert_close(run(model, inp), want, RTOL32, what="encoder merged (fast path)")
    assert len(calls) == 2


# =============================================================================
# nn.MultiheadAttention blocks (open_clip-style)


def _expected_shapes(kind):
    attn = [(96, 32)] if "kv" not in kind else [(32, 32), (32, 24), (32, 20)]
    return sorted(attn + [(32, 32), (128, 32), (32, 128)])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", ["block", "block-sf", "block-kv", "block-kv-sf"])
def test_mha_block_matches_reference(kind, strategy):
    model, before = adapted(kind, strategy)
    assert isinstance(model.attn, nn.MultiheadAttention)
    ads = distinct_adapters(model)
    assert sorted((a.out_features, a.in_features) for _, a in ads) == _expected_shapes(kind)
    for name, a in ads:
        assert a.lam.dtype == a.gam.dtype == torch.float32 and a.lam.requires_grad and a.gam.requires_grad, name
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(ads) and all(n.endswith((".lam", ".gam")) for n in trainable), trainable
    inp = inputs(kind)
    ref, _ = arch_reference(before, model)
    check_weights(model, before, 1e-6, kind)
    check_float32_then_float64(model, ref, before, inp, f"{kind} {strategy}")


@pytest.mark.parametrize("kind", ["block", "block-kv"])
def test_mha_each_delta_full_rank(kind):
    model, _ = adapted(kind, rank=6)
    for name, a in distinct_adapters(model):
        dW = a.delta_weight(torch.float64)
        assert dW.shape == (a.out_features, a.in_features), name
        A, B = a.random_bases(torch.float64)
        assert_close(dW, a.scaling * ref_delta(A, B, a.lam.detach(), a.gam.detach(), a.out_features, a.in_features), 1e-9, what=name)
        assert torch.linalg.matrix_rank(dW).item() == min(a.in_features, a.out_features), name


@pytest.mark.parametrize("kind", ["block", "block-kv"])
def test_mha_merge_unmerge_disable_eject(kind):
    """Injected in eval mode (the new modules take it); disable is the base exactly; merge (twice:
    idempotent), unmerge and eject against the float64 reference; eject leaves a plain
    nn.MultiheadAttention with plain parameters, the state-dict keys in their old order and the
    merged weights. (Merges test_layer's and test_architectures' tests of the same name.)"""
    model = base(kind).eval()
    keys = list(model.state_dict())
    model, before = adapted(kind, model=model)
    assert all(not m.training for m in model.modules())  # new modules take the model's mode
    inp = inputs(kind)
    ref, _ = arch_reference(before, model)
    before.eval()
    with torch.no_grad():
        plain = run(before, inp)
        with randlora.disable(model):
            assert torch.equal(run(model, inp), plain)
    eval_only = ((False, False),)
    randlora.merge(model)
    assert isinstance(model.attn, nn.MultiheadAttention)
    check_weights(model, before, 1e-6, f"{kind} merged")
    check_against(model, ref, before, inp, torch.float32, RTOL32, f"{kind} merged", modes=eval_only)
    randlora.merge(model)  # idempotent
    check_against(model, ref, before, inp, torch.float32, RTOL32, f"{kind} merged twice", modes=eval_only)
    randlora.unmerge(model)
    check_against(model, ref, before, inp, torch.float32, RTOL32, f"{kind} unmerged", modes=((True, True), (False, False)))
    model.eval()
    with torch.no_grad(), randlora.disable(model):  # unmerge rounds the weights once more: close, not equal
        assert_close(run(model, inp), plain, 1e-6, what=f"{kind} disabled after unmerge")
    model.train()
    check_grads(model, before, inp, torch.float32, 1e-3, f"{kind} after unmerge")
    randlora.merge(model)
    randlora.eject(model)
    assert type(model.attn) is nn.MultiheadAttention and not parametrize.is_parametrized(model.attn)
    assert type(model.attn.out_proj) is type(before.attn.out_proj)
    assert type(model.mlp.c_fc) is nn.Linear and not list(randlora.named_adapters(model))
    assert list(model.state_dict()) == keys
    for n, p in model.named_parameters():
        assert type(p) is nn.Parameter, n
    for k, v in ref.state_dict().items():
        assert_close(model.state_dict()[k], v, 1e-6, what=f"ejected {k}")
    check_against(model, ref, before, inp, torch.float32, RTOL32, f"{kind} ejected", modes=eval_only)


@pytest.mark.parametrize("kind", ["block", "block-kv"])
def test_mha_disable_is_base_exactly(kind):
    model, before = adapted(kind)
    # Frozen like the adapted model's base (inject freezes it): torch's attention picks another
    # kernel when its weights require grad, which differs in the last bit.
    before.requires_grad_(False)
    inp = inputs(kind)
    for train, grad in ((False, False), (True, True)):
        model.train(train)
        before.train(train)
        with torch.set_grad_enabled(grad):
            with randlora.disable(model):
                assert torch.equal(run(model, inp), run(before, inp)), f"train={train}"
                assert torch.equal(getattr(model.attn, "in_proj_weight" if "kv" not in kind else "k_proj_weight"),
                                   getattr(before.attn, "in_proj_weight" if "kv" not in kind else "k_proj_weight"))
            assert rel_err(run(model, inp), run(before, inp)) > MIN_EFFECT


def test_mha_block_gradcheck():
    """An open_clip-style block (sequence-first), float64: gradcheck in x, and in the in-projection's
    and out_proj's lam/gam (float64 values through torch.func.functional_call). test_layers'
    test_mha_gradcheck_float64 does the full (not fast-mode) check on a smaller MHA."""
    model, _ = adapted("block-sf", rank=8)
    model.double().train()
    inp = inputs("block-sf")
    x = inp["x"][:3, :1].double().requires_grad_()  # (seq 3, batch 1, 32)
    assert torch.autograd.gradcheck(lambda x: model(x), (x,), fast_mode=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad and ("in_proj" in n or "out_proj" in n)]
    assert len(names) == 4, names
    params = {n: p.detach().double().requires_grad_() for n, p in model.named_parameters() if n in names}

    def f(x, *vals):
        return torch.func.functional_call(model, dict(zip(names, vals)), (x,))

    assert torch.autograd.gradcheck(f, (x, *[params[n] for n in names]), fast_mode=True)


def test_mha_gradgradcheck():
    """Second derivatives through weights a parent reads (the MHA's in-projection and out_proj), float64, in x and every
    lam/gam. need_weights=True: the math path (torch's CPU flash attention is differentiable once only)."""
    torch.manual_seed(0)
    holder = randlora.inject(MhaHolder(e=8), ["attn"], rank=2).double()
    randomize_model_(holder, 1)
    names = [n for n, p in holder.named_parameters() if p.requires_grad]
    assert len(names) == 4, names
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)

    def f(x, *vals):
        return torch.func.functional_call(holder.attn, dict(zip((n[5:] for n in names), vals)), (x, x, x))[0]

    vals = [p.detach().double().requires_grad_() for n, p in holder.named_parameters() if n in names]
    assert torch.autograd.gradgradcheck(f, (x, *vals), fast_mode=True)


# =============================================================================
# Modes, dtypes and the meta device on real architectures


def test_inject_and_load_keep_the_models_mode(tmp_path):
    # eval: every module in eval, the adapter's dropout not applied.
    model = base("llama").eval()
    before = copy.deepcopy(model).requires_grad_(False)  # frozen like the adapted model's base
    randlora.inject(model, LLAMA_TARGETS, 6, alpha=12.0, dropout=0.5)
    arch_randomize(model)
    assert all(not m.training for m in model.modules())
    assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in model.modules())
    inp = inputs("llama")
    ref, _ = arch_reference(before, model)
    with torch.no_grad():
        first = run(model, inp)
        assert torch.equal(run(model, inp), first)
        assert_close(first, run(ref.eval(), inp, torch.float64), RTOL32, what="eval inject, dropout off")
    # train: every module in train (the dropout is active).
    trained = randlora.inject(base("llama").train(), LLAMA_TARGETS, 6, alpha=12.0, dropout=0.5)
    assert all(m.training for m in trained.modules())
    # load_adapter into an eval model: all eval, outputs bit-identical to the saved model's.
    randlora.save_adapter(model, tmp_path / "a.safetensors")
    fresh = base("llama").eval()
    randlora.load_adapter(fresh, tmp_path / "a.safetensors")
    assert all(not m.training for m in fresh.modules())
    with torch.no_grad():
        assert torch.equal(run(fresh, inp), first)
    fresh_train = randlora.load_adapter(base("llama").train(), tmp_path / "a.safetensors")
    assert all(m.training for m in fresh_train.modules())


@pytest.mark.parametrize("kind", ["gpt2", "block"])
def test_dtype_conversions_keep_adapters_float32(kind):
    model, _ = adapted(kind)
    inp = inputs(kind)
    ads = distinct_adapters(model)
    if kind == "block":
        assert any(isinstance(a, randlora.RandLoraWeight) for _, a in ads)  # the MHA in-projection
    values = {n: (a.lam.detach().clone(), a.gam.detach().clone()) for n, a in ads}

    def backward(dtype):
        for p in model.parameters():
            p.grad = None
        run(model.train(), inp, dtype).float().sum().backward()

    backward(torch.float32)
    conversions = [
        ("half", lambda m: m.half(), torch.float16),
        ("bfloat16", lambda m: m.bfloat16(), torch.bfloat16),
        ("double", lambda m: m.double(), torch.float64),
        ("to(float16)", lambda m: m.to(torch.float16), torch.float16),
        ("to(dtype=bfloat16)", lambda m: m.to(dtype=torch.bfloat16), torch.bfloat16),
        ("to(cpu, float64)", lambda m: m.to("cpu", torch.float64), torch.float64),
        ("float", lambda m: m.float(), torch.float32),
    ]
    for what, convert, dtype in conversions:
        convert(model)
        for n, a in ads:
            assert a.lam.dtype == a.gam.dtype == torch.float32, f"{what}: {n} is {a.lam.dtype}/{a.gam.dtype}"
            assert a.lam.grad is not None and a.lam.grad.dtype == a.gam.grad.dtype == torch.float32, f"{what}: {n} grad dtype"
            assert torch.equal(a.lam, values[n][0]) and torch.equal(a.gam, values[n][1]), f"{what}: {n} values changed"
        assert all(p.dtype == dtype for n, p in model.named_parameters() if not n.endswith((".lam", ".gam")))
        backward(dtype)
        for n, a in ads:
            for p in (a.lam, a.gam):
                assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), f"{what}: {n}"


def test_load_adapter_into_meta_model_refused(tmp_path):
    model = randlora.inject(base("block"), ["c_fc", "c_proj"], 6, alpha=12.0)
    arch_randomize(model)
    randlora.save_adapter(model, tmp_path / "a.safetensors")
    with torch.device("meta"):
        meta = ResidualAttentionBlock()
    refused(meta, lambda m: randlora.load_adapter(m, tmp_path / "a.safetensors"), ValueError, "meta")
    meta2 = randlora.inject(copy.deepcopy(meta), ["c_fc", "c_proj"], 6, alpha=12.0)
    refused(meta2, lambda m: randlora.load_adapter(m, tmp_path / "a.safetensors"), ValueError, "meta")


def test_a_module_to_save_that_cannot_be_copied_leaves_the_model_as_it_was():
    """A head keeping its last output (a non-leaf tensor) cannot be deep-copied: the refusal comes before any target is
    wrapped or any parameter frozen."""

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.last = nn.Linear(8, 3), None

        def forward(self, x):
            self.last = self.lin(x)
            return self.last

    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(body=nn.Linear(8, 8), head=Head()))
    model(torch.randn(2, 8))
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="deepcopy"):
        randlora.inject(model, ["body"], rank=4, modules_to_save=["head"])
    assert [type(m) for m in model.modules()] == [nn.Sequential, nn.Linear, Head, nn.Linear]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == trainable


def test_an_mha_out_proj_held_under_a_second_name_is_the_adapted_one_there_too():
    class Enc(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = nn.MultiheadAttention(8, 2)
            self.proj = self.att.out_proj

        def forward(self, x):
            return self.att(x, x, x)[0] + self.proj(x)

    torch.manual_seed(0)
    model = randlora.inject(Enc(), ["att"], rank=2)
    assert model.proj is model.att.out_proj and isinstance(model.proj, randlora.RandLoraLinear)
    randlora.eject(model)
    assert model.proj is model.att.out_proj and type(model.proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_an_mha_whose_out_proj_is_first_held_under_an_alias_is_refused():
    """Files name an adapter by its first name: out_proj's adapter would be saved as the alias, from which a load
    cannot rebuild the attention. Registered after the attention, the alias is adapted too (the test above)."""

    class Aliased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            att = nn.MultiheadAttention(8, 2)
            self.proj, self.att = att.out_proj, att

    torch.manual_seed(0)
    refused(Aliased(), lambda m: randlora.inject(m, ["att"], rank=2), ValueError, "out_proj is first held as 'proj'")
