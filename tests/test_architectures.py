"""RandLoRA on real architectures (issue 9).

Tiny models from configs (random init, offline): LLaMA, GPT-2 (tied head), BERT and ViT
classifiers (heads as modules_to_save), T5 (q, k, v, o, wi, wo), torch's nn.TransformerEncoder
(eval fast path), an open_clip-style block around nn.MultiheadAttention, and bitsandbytes 8-bit
and 4-bit layers.

How the reference is built: a deep copy of the model before inject, in float64; for every
adapter, ``scaling * ΔW`` from conftest's independent ``ref_delta`` (float64, element by element
from docs/MATH.md#the-update, on the adapter's own random bases and lam/gam) is added to the
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
import os
import re
import sys
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import randlora  # noqa: E402
from conftest import assert_close, bases64, bnb_linear, nonzero_uniform, ref_delta, rel_err, tiny_llama  # noqa: E402

import transformers  # noqa: E402  (test extras: a missing one must fail, not skip)

pytestmark = pytest.mark.filterwarnings("ignore")

RTOL64 = 1e-9
RTOL32 = 1e-4
MIN_EFFECT = 1e-2  # the adapters must move the outputs at least this much (relative)
STRATEGIES = ("build", "factorized")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc", "lm_head"]  # c_proj: attn.c_proj and mlp.c_proj
T5_TARGETS = ["q", "k", "v", "o", "wi", "wo"]
BLOCK_TARGETS = ["attn", "c_fc", "c_proj"]
MHA_PARAMS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


# -----------------------------------------------------------------------------
# Models


class ResidualAttentionBlock(nn.Module):
    """An open_clip-style block: ln_1 -> nn.MultiheadAttention -> ln_2 -> mlp(c_fc, gelu, c_proj).

    With ``kdim``/``vdim`` the attention takes its own key and value inputs (then MHA keeps
    separate q/k/v projection weights)."""

    def __init__(self, d: int = 32, heads: int = 4, batch_first: bool = True, kdim: int | None = None, vdim: int | None = None) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=batch_first, kdim=kdim, vdim=vdim)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d, 4 * d)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(4 * d, d))]))

    def forward(self, x: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
        q = self.ln_1(x)
        k = q if k is None else k
        v = q if v is None else v
        x = x + self.attn(q, k, v, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=64,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(cfg)


def _vit() -> nn.Module:
    cfg = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=4, num_channels=3, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.ViTForImageClassification(cfg)


def _t5() -> nn.Module:
    cfg = transformers.T5Config(
        d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, vocab_size=64, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    return transformers.T5ForConditionalGeneration(cfg)


def _encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, activation="gelu")
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


BUILDERS = {
    "llama": tiny_llama,
    "gpt2": _gpt2,
    "bert": _bert,
    "vit": _vit,
    "t5": _t5,
    "encoder": _encoder,
    "block": ResidualAttentionBlock,
    "block-sf": lambda: ResidualAttentionBlock(batch_first=False),
    "block-kv": lambda: ResidualAttentionBlock(kdim=24, vdim=20),
    "block-kv-sf": lambda: ResidualAttentionBlock(batch_first=False, kdim=24, vdim=20),
}
TARGETS = {
    "llama": LLAMA_TARGETS,
    "gpt2": GPT2_TARGETS,
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense"],
    "vit": ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
    "t5": T5_TARGETS,
    "encoder": ["self_attn", "linear1", "linear2"],
    **{k: BLOCK_TARGETS for k in ("block", "block-sf", "block-kv", "block-kv-sf")},
}
_CACHE: dict[str, nn.Module] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls: with the cores shared, one intra-op thread is ~10x faster than several.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def base(kind: str) -> nn.Module:
    """A fresh copy of one fixed random model per kind (float32, train mode)."""
    if kind not in _CACHE:
        torch.manual_seed(sorted(BUILDERS).index(kind) + 11)
        _CACHE[kind] = BUILDERS[kind]().train()
    return copy.deepcopy(_CACHE[kind])


def inputs(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    if kind in ("llama", "gpt2", "bert"):
        return {"input_ids": torch.randint(0, 64, (2, 7), generator=g)}
    if kind == "t5":
        return {"input_ids": torch.randint(2, 64, (2, 7), generator=g), "decoder_input_ids": torch.randint(2, 64, (2, 5), generator=g)}
    if kind == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    if kind == "encoder":
        return {"src": torch.randn(2, 6, 32, generator=g)}
    batch_first = not kind.endswith("-sf")
    shape = lambda s, f: (2, s, f) if batch_first else (s, 2, f)  # noqa: E731
    inp = {"x": torch.randn(*shape(5, 32), generator=g)}
    if "kv" in kind:
        inp["k"] = torch.randn(*shape(6, 24), generator=g)
        inp["v"] = torch.randn(*shape(6, 20), generator=g)
    return inp


def run(model: nn.Module, inp: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    out = model(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in inp.items()})
    return out if isinstance(out, torch.Tensor) else out.logits


def adapted(kind: str, strategy: str = "auto", rank: int = 6, seed: int = 0, **kw) -> tuple[nn.Module, nn.Module]:
    """(model with random non-zero lam/gam, its untouched base copy).

    The copy is frozen as inject freezes the base: torch's MHA rounds differently when its
    projection weights require grad, even under no_grad, and "exactly the base model" compares
    like with like."""
    model = base(kind)
    before = copy.deepcopy(model).requires_grad_(False)  # frozen like the adapted model's base
    randlora.inject(model, TARGETS[kind], rank, seed, alpha=2.0 * rank, strategy=strategy, **kw)
    randomize(model, seed)
    return model, before


def randomize(model: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Random non-zero lam/gam for every adapter (sized so the update is comparable to W)."""
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for _, ad in randlora.named_adapters(model):
            ad.lam.copy_(nonzero_uniform(ad.lam.shape, g) * scale)
            ad.gam.copy_(nonzero_uniform(ad.gam.shape, g) * scale / ad.d**0.5)


def distinct_adapters(model: nn.Module) -> list[tuple[str, nn.Module]]:
    seen, out = set(), []
    for name, ad in randlora.named_adapters(model):
        if id(ad) not in seen:
            seen.add(id(ad))
            out.append((name, ad))
    return out


# -----------------------------------------------------------------------------
# The float64 reference


def slot(name: str, ad: nn.Module) -> tuple[str, str, bool]:
    """Where an adapter's weight lives in the base model: (module path, parameter name, conv1d).

    A RandLoraLinear adapts its base's ``weight`` under its own path; a weight parametrization
    (MHA in-projections) is named after the parameter it adapts, e.g.
    ``attn.parametrizations.in_proj_weight.0`` or ``attn.in_proj_weight``."""
    if isinstance(ad, randlora.RandLoraLinear):
        return name, "weight", type(ad.base).__name__ == "Conv1D"
    parts = name.split(".")
    hits = [i for i, p in enumerate(parts) if p in MHA_PARAMS or p == "weight"]
    assert hits, f"cannot tell which weight adapter {name!r} adapts"
    i = hits[-1]
    return ".".join(p for p in parts[:i] if p != "parametrizations"), parts[i], False


def reference(before: nn.Module, model: nn.Module, grad: bool = False):
    """float64 copy of ``before`` with ``scaling * ΔW`` of each adapter of ``model`` added.

    With ``grad``, the update is a differentiable function of float64 leaves (lam, gam) per
    adapter, returned as ``{name: (lam64, gam64)}``."""
    ref = copy.deepcopy(before).double()
    leaves = {}
    for name, ad in distinct_adapters(model):
        owner, pname, conv = slot(name, ad)
        mod = ref.get_submodule(owner)
        W = getattr(mod, pname).detach()
        assert tuple(W.shape) == ((ad.in_features, ad.out_features) if conv else (ad.out_features, ad.in_features)), name
        A, B = bases64(ad._bases, ad.D, ad.d, ad.rank)
        lam = ad.lam.detach().to(torch.float64).requires_grad_(grad)
        gam = ad.gam.detach().to(torch.float64).requires_grad_(grad)
        dW = ad.scaling * ref_delta(A, B, lam, gam, ad.out_features, ad.in_features)
        new = W + (dW.t() if conv else dW)
        mod._parameters.pop(pname)  # unties it from anything else sharing it
        setattr(mod, pname, new if grad else nn.Parameter(new.detach(), requires_grad=False))
        leaves[name] = (lam, gam)
    return ref, leaves


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
    ref, leaves = reference(before, model, grad=True)
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
    ref, _ = reference(before, model)
    for name, ad in distinct_adapters(model):
        owner, pname, _ = slot(name, ad)
        got = getattr(model.get_submodule(owner), pname)
        assert_close(got, getattr(ref.get_submodule(owner), pname), rtol, what=f"{what}: {owner}.{pname}")


# -----------------------------------------------------------------------------
# Snapshots for refusals


def snapshot(model: nn.Module):
    """Everything a refused call must leave untouched: values (bitwise), parameter and module
    identities, types, flags, modes, adapter states."""
    state = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if isinstance(v, torch.Tensor):
            v = v.detach()
            state[k] = (v.dtype, v.device, tuple(v.shape), None if v.is_meta else v.clone())
        else:
            state[k] = repr(v)
    return (
        state,
        [(n, id(p), p.requires_grad, p.dtype, p.device) for n, p in model.named_parameters(remove_duplicate=False)],
        [(n, id(m), type(m), m.training) for n, m in model.named_modules(remove_duplicate=False)],
        [(n, id(a), getattr(a, "merged", None), getattr(a, "disabled", None)) for n, a in randlora.named_adapters(model)],
    )


def assert_unchanged(model: nn.Module, snap) -> None:
    now = snapshot(model)
    assert list(now[0]) == list(snap[0]), "state_dict keys changed"
    for k, old in snap[0].items():
        new = now[0][k]
        if isinstance(old, str):
            assert new == old, f"{k} changed"
            continue
        assert new[:3] == old[:3], f"{k}: dtype/device/shape changed"
        if old[3] is not None:
            assert torch.equal(new[3], old[3]), f"{k} changed"
    assert now[1] == snap[1], "parameters changed (identity, requires_grad, dtype or device)"
    assert now[2] == snap[2], "modules changed (identity, type or mode)"
    assert now[3] == snap[3], "adapters changed"


def refused(model: nn.Module, fn, errors, *patterns: str, inp=None) -> str:
    """``fn(model)`` raises one of ``errors`` whose message matches every pattern; the model is
    bitwise unchanged (and so are its outputs on ``inp``)."""
    out = None
    if inp is not None:
        with torch.no_grad():
            out = run(model.eval(), inp)
    snap = snapshot(model)
    with pytest.raises(errors) as info:
        fn(model)
    msg = str(info.value)
    for p in patterns:
        assert re.search(p, msg), f"{p!r} not in {msg!r}"
    assert_unchanged(model, snap)
    if inp is not None:
        with torch.no_grad():
            assert torch.equal(run(model, inp), out)
    return msg


def save_load_identical(model: nn.Module, fresh: nn.Module, inp, path) -> nn.Module:
    """save_adapter -> load_adapter into ``fresh`` -> outputs bit-identical (train+grad and eval)."""
    randlora.save_adapter(model, path)
    randlora.load_adapter(fresh, path)
    mine, theirs = dict(distinct_adapters(model)), dict(distinct_adapters(fresh))
    assert mine.keys() == theirs.keys()
    for n in mine:
        assert torch.equal(mine[n].lam, theirs[n].lam) and torch.equal(mine[n].gam, theirs[n].gam), n
    for train, grad in ((True, True), (False, False)):
        model.train(train)
        fresh.train(train)
        with torch.set_grad_enabled(grad):
            assert torch.equal(run(fresh, inp), run(model, inp)), f"train={train}"
    return fresh


# -----------------------------------------------------------------------------
# LLaMA


@pytest.mark.parametrize("strategy", ["build", "factorized", "auto"])
def test_llama_matches_float64_reference(strategy):
    model, before = adapted("llama", strategy)
    assert len(distinct_adapters(model)) == 2 * 7
    inp = inputs("llama")
    ref, _ = reference(before, model)
    check_float32_then_float64(model, ref, before, inp, f"llama {strategy}")


def test_llama_merge_eject_and_save_load(tmp_path):
    model, before = adapted("llama")
    inp = inputs("llama")
    ref, _ = reference(before, model)
    save_load_identical(model, base("llama"), inp, tmp_path / "a.safetensors")
    randlora.merge(model)
    check_against(model, ref, before, inp, torch.float32, RTOL32, "llama merged", modes=((False, False),))
    randlora.eject(model)
    assert not list(randlora.named_adapters(model))
    assert all(type(model.get_submodule(n)) is nn.Linear for n, m in before.named_modules() if isinstance(m, nn.Linear))
    check_against(model, ref, before, inp, torch.float32, RTOL32, "llama ejected", modes=((False, False),))


# -----------------------------------------------------------------------------
# GPT-2: Conv1D layers and the tied head


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gpt2_conv1d_and_tied_head_forward(strategy):
    model, before = adapted("gpt2", strategy)
    names = {n for n, _ in distinct_adapters(model)}
    assert "lm_head" in names and len(names) == 2 * 4 + 1  # c_attn, attn.c_proj, c_fc, mlp.c_proj; lm_head
    assert {type(a.base).__name__ for _, a in distinct_adapters(model)} == {"Conv1D", "Linear"}
    # The head stays tied to the embedding: inject copies no weight, the embedding is untouched.
    assert model.transformer.wte.weight is model.lm_head.base.weight
    assert torch.equal(model.transformer.wte.weight, before.transformer.wte.weight)
    inp = inputs("gpt2")
    ref, _ = reference(before, model)
    check_float32_then_float64(model, ref, before, inp, f"gpt2 {strategy}", grads64=False)


@pytest.mark.parametrize("verb", ["merge", "eject"])
def test_gpt2_tied_head_merge_refused(verb):
    model, _ = adapted("gpt2")
    refused(
        model, getattr(randlora, verb), ValueError, r"lm_head(\.base)?\.weight", r"transformer\.wte\.weight", inp=inputs("gpt2")
    )


def test_gpt2_save_load(tmp_path):
    model, _ = adapted("gpt2")
    fresh = save_load_identical(model, base("gpt2"), inputs("gpt2"), tmp_path / "a.safetensors")
    assert fresh.transformer.wte.weight is fresh.lm_head.base.weight


# -----------------------------------------------------------------------------
# T5: every projection (wo's weight is read by its parent)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_t5_all_projections(strategy, tmp_path):
    model, before = adapted("t5", strategy, rank=4)
    assert len(distinct_adapters(model)) == 2 * 6 + 2 * 10
    inp = inputs("t5")
    ref, _ = reference(before, model)
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


# -----------------------------------------------------------------------------
# BERT / ViT classifiers: heads as modules_to_save


def _train_steps(model, kind, steps=3):
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (2,), generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(run(model, inputs(kind)), labels).backward()
        opt.step()


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_classifier_head_modules_to_save(kind, tmp_path):
    model, before = adapted(kind, modules_to_save=["classifier"])
    inp = inputs(kind)
    ref, _ = reference(before, model)
    check_against(model, ref, before, inp, torch.float32, RTOL32, f"{kind} (head untrained)")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n in trainable if not n.endswith((".lam", ".gam"))}
    assert len(head) >= 2 and all("classifier" in n for n in head), head
    assert not any(p.requires_grad for n, p in model.named_parameters() if "classifier" not in n and not n.endswith((".lam", ".gam")))
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n in head}
    _train_steps(model, kind)
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


# -----------------------------------------------------------------------------
# Against PEFT (float32, identical bases; 1e-5 relative)


def _peft_load(kind, folder):
    from peft import PeftModel

    return PeftModel.from_pretrained(base(kind).eval(), str(folder)).eval()


@pytest.mark.parametrize(
    "kind,targets,extra",
    [
        ("llama", LLAMA_TARGETS, {}),
        ("gpt2", ["c_attn", "c_proj", "c_fc"], {}),
        ("t5", T5_TARGETS, {}),
        ("bert", ["query", "value", "intermediate.dense"], {"modules_to_save": ["classifier"]}),
        ("vit", ["q_proj", "v_proj", "fc1"], {"modules_to_save": ["classifier"]}),
    ],
)
def test_to_peft_matches_peft(kind, targets, extra, tmp_path):
    model = base(kind)
    randlora.inject(model, targets, 4, 3, alpha=8.0, **extra)
    randomize(model, 3)
    if extra:
        _train_steps(model, kind, steps=2)
    model.eval()
    randlora.to_peft(model, tmp_path / "peft")
    inp = inputs(kind)
    with torch.no_grad():
        ours, theirs, plain = run(model, inp), run(_peft_load(kind, tmp_path / "peft"), inp), run(base(kind).eval(), inp)
    assert rel_err(ours, plain) > MIN_EFFECT
    assert_close(theirs, ours, 1e-5, what=kind)


def test_from_peft_bert_with_head(tmp_path):
    from peft import RandLoraConfig, get_peft_model

    pm = get_peft_model(base("bert"), RandLoraConfig(r=4, randlora_alpha=8.0, target_modules=["query", "value"], modules_to_save=["classifier"]))
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
    inp = inputs("bert")
    with torch.no_grad():
        theirs = run(_peft_load("bert", tmp_path / "peft"), inp)
    for train in (False, True):
        ours = randlora.from_peft(base("bert").train(train), tmp_path / "peft")
        assert all(m.training == train for m in ours.modules()), "new modules must take the model's mode"
        ours.eval()
        with torch.no_grad():
            assert_close(run(ours, inp), theirs, 1e-5, what="from_peft bert")
            with randlora.disable(ours):
                assert torch.equal(run(ours, inp), run(base("bert").eval(), inp))


# -----------------------------------------------------------------------------
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
    randomize(model)
    ref, _ = reference(before, model)
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


# -----------------------------------------------------------------------------
# nn.MultiheadAttention (open_clip-style block)


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
    ref, _ = reference(before, model)
    check_weights(model, before, 1e-6, kind)
    check_float32_then_float64(model, ref, before, inp, f"{kind} {strategy}")


@pytest.mark.parametrize("kind", ["block", "block-kv"])
def test_mha_each_delta_full_rank(kind):
    model, _ = adapted(kind, rank=6)
    for name, a in distinct_adapters(model):
        dW = a.delta_weight(torch.float64)
        assert dW.shape == (a.out_features, a.in_features), name
        A, B = bases64(a._bases, a.D, a.d, a.rank)
        assert_close(dW, a.scaling * ref_delta(A, B, a.lam.detach(), a.gam.detach(), a.out_features, a.in_features), 1e-9, what=name)
        assert torch.linalg.matrix_rank(dW).item() == min(a.in_features, a.out_features), name


@pytest.mark.parametrize("kind", ["block", "block-kv"])
def test_mha_merge_unmerge_disable_eject(kind):
    model, before = adapted(kind)
    inp = inputs(kind)
    ref, _ = reference(before, model)
    model.eval()
    before.eval()
    with torch.no_grad():
        plain = run(before, inp)
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
    with torch.no_grad(), randlora.disable(model):
        assert_close(run(model, inp), plain, 1e-6, what=f"{kind} disabled after unmerge")
    model.train()
    check_grads(model, before, inp, torch.float32, 1e-3, f"{kind} after unmerge")
    randlora.eject(model)
    assert type(model.attn) is nn.MultiheadAttention and not parametrize.is_parametrized(model.attn)
    assert type(model.attn.out_proj) is type(before.attn.out_proj)
    assert type(model.mlp.c_fc) is nn.Linear and not list(randlora.named_adapters(model))
    assert set(model.state_dict()) == set(before.state_dict())
    for n, p in model.named_parameters():
        assert type(p) is nn.Parameter, n
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


def test_mha_gradcheck():
    model, _ = adapted("block-sf", rank=8)
    model.double().train()
    inp = inputs("block-sf")
    x = inp["x"][:3, :1].double().requires_grad_()  # (seq 3, batch 1, 32)
    assert torch.autograd.gradcheck(lambda x: model(x), (x,), fast_mode=True)
    # ... and with respect to the in-projection's and out_proj's lam/gam (float64 values through
    # torch.func.functional_call).
    names = [n for n, p in model.named_parameters() if p.requires_grad and ("in_proj" in n or "out_proj" in n)]
    assert len(names) == 4, names
    params = {n: p.detach().double().requires_grad_() for n, p in model.named_parameters() if n in names}

    def f(x, *vals):
        return torch.func.functional_call(model, dict(zip(names, vals)), (x,))

    assert torch.autograd.gradcheck(f, (x, *[params[n] for n in names]), fast_mode=True)


@pytest.mark.parametrize("kind", ["block", "block-sf", "block-kv"])
def test_mha_save_load_bit_identical(kind, tmp_path):
    model, _ = adapted(kind)
    fresh = save_load_identical(model, base(kind), inputs(kind), tmp_path / "a.safetensors")
    assert isinstance(fresh.attn, nn.MultiheadAttention)


def test_encoder_save_load_bit_identical(tmp_path):
    model = randlora.inject(base("encoder"), TARGETS["encoder"], 6, alpha=12.0)
    randomize(model)
    save_load_identical(model, base("encoder"), inputs("encoder"), tmp_path / "a.safetensors")


# -----------------------------------------------------------------------------
# Shared modules and shared weights


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


@pytest.mark.parametrize("targets", [["block", "alias"], "block|alias", ["block"]])
def test_one_module_under_two_names(targets):
    torch.manual_seed(0)
    model = TwoNames()
    before = copy.deepcopy(model).requires_grad_(False)  # frozen like the adapted model's base
    randlora.inject(model, targets, 4, alpha=8.0)
    randomize(model, scale=1.0)
    assert model.block is model.alias and isinstance(model.block, randlora.RandLoraLinear)
    assert len(distinct_adapters(model)) == 1
    inp = _x8()
    ref, _ = reference(before, model)
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


@pytest.mark.parametrize("targets", [["l1"], ["l1", "l2"]])
def test_two_linears_sharing_a_weight(targets):
    torch.manual_seed(0)
    model = SharedWeight()
    before = copy.deepcopy(model).requires_grad_(False)  # frozen like the adapted model's base
    randlora.inject(model, targets, 4, alpha=8.0)
    randomize(model, scale=1.0)
    inp = _x8()
    ref, _ = reference(before, model)
    check_against(model, ref, before, inp, torch.float32, RTOL32, f"shared weight {targets}")
    for verb in ("merge", "eject"):
        refused(model, getattr(randlora, verb), ValueError, r"l1(\.base)?\.weight", r"l2(\.base)?\.weight", inp=inp)


# -----------------------------------------------------------------------------
# Modes: new modules take the model's train/eval mode


def test_inject_and_load_keep_the_models_mode(tmp_path):
    # eval: every module in eval, the adapter's dropout not applied.
    model = base("llama").eval()
    before = copy.deepcopy(model).requires_grad_(False)  # frozen like the adapted model's base
    randlora.inject(model, LLAMA_TARGETS, 6, alpha=12.0, dropout=0.5)
    randomize(model)
    assert all(not m.training for m in model.modules())
    assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in model.modules())
    inp = inputs("llama")
    ref, _ = reference(before, model)
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


def test_from_peft_takes_the_models_mode(tmp_path):
    from peft import RandLoraConfig, get_peft_model

    pm = get_peft_model(base("llama"), RandLoraConfig(r=4, randlora_alpha=8.0, target_modules=["q_proj", "v_proj"], randlora_dropout=0.5))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "randlora_lambda" in n:
                p.fill_(0.1)
    pm.save_pretrained(str(tmp_path / "peft"))
    inp = inputs("llama")
    with torch.no_grad():
        theirs = run(_peft_load("llama", tmp_path / "peft"), inp)
    for train in (False, True):
        ours = randlora.from_peft(base("llama").train(train), tmp_path / "peft")
        assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in ours.modules())
        assert all(m.training == train for m in ours.modules()), f"train={train}"
    with torch.no_grad():  # eval: the dropout is off, the outputs are PEFT's
        assert_close(run(ours.eval(), inp), theirs, 1e-5, what="from_peft llama")


# -----------------------------------------------------------------------------
# dtypes: lam/gam and their grads stay float32


@pytest.mark.parametrize("kind", ["gpt2", "block"])
def test_dtype_conversions_keep_adapters_float32(kind):
    model, _ = adapted(kind)
    inp = inputs(kind)
    ads = distinct_adapters(model)
    if kind == "block":
        assert any(not isinstance(a, randlora.RandLoraLinear) for _, a in ads)  # the MHA in-projection
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


# -----------------------------------------------------------------------------
# meta device


@pytest.mark.parametrize("kind", ["llama", "block", "block-kv"])
def test_meta_inject_and_shape_forward(kind):
    with torch.device("meta"):
        torch.manual_seed(0)
        model = BUILDERS[kind]()
    randlora.inject(model, TARGETS[kind], 4)
    ads = distinct_adapters(model)
    assert ads and all(a.lam.is_meta and a.gam.is_meta for _, a in ads)
    inp = {k: v.to("meta") for k, v in inputs(kind).items()}
    out = run(model, inp)
    want = {"llama": (2, 7, 64), "block": (2, 5, 32), "block-kv": (2, 5, 32)}[kind]
    assert out.is_meta and tuple(out.shape) == want


def test_load_adapter_into_meta_model_refused(tmp_path):
    model = randlora.inject(base("block"), ["c_fc", "c_proj"], 6, alpha=12.0)
    randomize(model)
    randlora.save_adapter(model, tmp_path / "a.safetensors")
    with torch.device("meta"):
        meta = ResidualAttentionBlock()
    refused(meta, lambda m: randlora.load_adapter(m, tmp_path / "a.safetensors"), ValueError, "meta")
    meta2 = randlora.inject(copy.deepcopy(meta), ["c_fc", "c_proj"], 6, alpha=12.0)
    refused(meta2, lambda m: randlora.load_adapter(m, tmp_path / "a.safetensors"), ValueError, "meta")


# -----------------------------------------------------------------------------
# Targets


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_all_linear_excludes_head_like_peft(kind):
    from peft import RandLoraConfig, get_peft_model
    from peft.tuners.randlora.layer import RandLoraLayer

    model = randlora.inject(base(kind), "all-linear", 4)
    ours = {n for n, _ in distinct_adapters(model)}
    assert "lm_head" not in ours
    pm = get_peft_model(base(kind), RandLoraConfig(r=4, target_modules="all-linear"))
    theirs = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, RandLoraLayer)}
    assert ours == theirs
    every = {n for n, m in base(kind).named_modules() if type(m).__name__ in ("Linear", "Conv1D")}
    assert ours == every - {"lm_head"}


def test_regex_string_that_is_a_name_says_so():
    msg = refused(base("llama"), lambda m: randlora.inject(m, "q_proj", 4), ValueError, "q_proj")
    assert "list" in msg.lower(), msg


class Outer(nn.Module):
    """A linear-like module containing a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.in_features, self.out_features = 8, 8
        self.inner = nn.Linear(8, 8)

    def forward(self, x):
        return self.inner(x) * 2


def test_nested_targets_refused():
    alone = lambda name: rf"(?<![\w.]){name}(?![\w.])"  # noqa: E731  the name itself, not a prefix
    refused(base("block"), lambda m: randlora.inject(m, ["attn", "out_proj"], 4), ValueError, alone("attn"), r"attn\.out_proj")
    model = nn.Sequential(OrderedDict(outer=Outer(), head=nn.Linear(8, 2)))
    refused(model, lambda m: randlora.inject(m, ["outer", "inner"], 4), ValueError, alone("outer"), r"outer\.inner")
    refused(model, lambda m: randlora.inject(m, r"outer(\.inner)?", 4), ValueError, alone("outer"), r"outer\.inner")


# -----------------------------------------------------------------------------
# bitsandbytes quantized bases (CPU)


class QNet(nn.Module):
    """Two quantized layers. Sizes are multiples of 64: bitsandbytes' CPU 4-bit eval kernel
    repacks the weight (in place, on the first eval forward) into blocks of 64."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.q1 = bnb_linear(kind, 64, 128, 1)
        self.act = nn.GELU()
        self.q2 = bnb_linear(kind, 128, 64, 2)

    def forward(self, x):
        return self.q2(self.act(self.q1(x)))


BNB_KINDS = ["int8", "nf4", "fp4"]


def _bnb(kind, strategy="auto", settled=True):
    model = QNet(kind)
    before = copy.deepcopy(model).requires_grad_(False)  # frozen like the adapted model's base
    assert not before.q1.weight.is_floating_point()  # really quantized
    randlora.inject(model, ["q1", "q2"], 8, alpha=16.0, strategy=strategy)
    randomize(model, scale=1.0)
    return (settle(model), settle(before)) if settled else (model, before)


def settle(model: nn.Module) -> nn.Module:
    """One eval forward, so that 4-bit layers have repacked their weights (a bitsandbytes CPU
    detail: after that, train and eval forwards use the repacked weight) in every copy alike.
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


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", BNB_KINDS)
def test_bnb_forward_is_base_plus_update(kind, strategy):
    """y = base(x) + s·x ΔW^T. The 8-bit layer always runs its own forward (it quantizes x too);
    a 4-bit layer under the build strategy is dequantized instead, as bitsandbytes does for many
    tokens: then y = x (W + s·ΔW)^T + b with W its dequantized weight, against float64, while the
    4-bit layer of the plain model runs bitsandbytes' own CPU kernel (repacked weight)."""
    model, before = _bnb(kind, strategy, settled=False)
    W_deq = {name: _dequantized(m) for name, m in before.named_children() if name in ("q1", "q2")}
    dequantizes = kind != "int8" and strategy == "build"
    own_calls = []
    for name in ("q1", "q2"):
        model.get_submodule(name).base.register_forward_hook(lambda *a: own_calls.append(1))
    g = torch.Generator().manual_seed(4)
    # The whole model trains: gradients reach q1's adapter through q2's quantized base.
    model.train()
    model(torch.randn(4, 64, generator=g)).square().sum().backward()
    for name, ad in distinct_adapters(model):
        assert ad.lam.grad is not None and torch.isfinite(ad.lam.grad).all() and ad.lam.grad.abs().sum() > 0, name
    settle(model)
    settle(before)
    for name, ad in distinct_adapters(model):
        assert isinstance(ad, randlora.RandLoraLinear)
        x = torch.randn(3, 5, ad.in_features, generator=g)
        A, B = bases64(ad._bases, ad.D, ad.d, ad.rank)
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
            assert rel_err(want, plain) > MIN_EFFECT
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
    x = {"x": torch.randn(4, 64, generator=torch.Generator().manual_seed(1))}
    save_load_identical(model, copy.deepcopy(before), x, tmp_path / "a.safetensors")
    for verb in ("merge", "eject"):
        refused(model, getattr(randlora, verb), (TypeError, ValueError), r"q1|q2", inp=x)


@pytest.mark.parametrize("kind", BNB_KINDS)
def test_bnb_to_peft_loads_in_peft(kind, tmp_path):
    # PEFT's RandLoRA wraps bitsandbytes' 8-bit and 4-bit linears too: our adapter written with
    # to_peft and loaded by PEFT onto the same quantized base computes what ours computes.
    from peft import PeftModel

    model, before = _bnb(kind)
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
    refused(block, lambda m: randlora.to_peft(m, tmp_path / "peft"), ValueError, "out_proj.*MultiheadAttention")
    assert not (tmp_path / "peft").exists()


# -----------------------------------------------------------------------------
# Checkpoints without numpy


def test_save_and_load_without_numpy(tmp_path):
    import subprocess

    script = f"""
import sys
sys.modules["numpy"] = None  # any import of numpy now fails
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
import torch, torch.nn as nn
try:
    import numpy  # noqa: F401
    raise SystemExit("numpy was importable")
except ImportError:
    pass
import randlora
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
fresh = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
fresh.load_state_dict(model.state_dict())
randlora.inject(model, ["0", "2"], 4)
with torch.no_grad():
    for _, a in randlora.named_adapters(model):
        a.lam.uniform_(0.5, 1.0)
path = {str(tmp_path / "a.safetensors")!r}
randlora.save_adapter(model, path)
randlora.load_adapter(fresh, path)
x = torch.randn(3, 16)
with torch.no_grad():
    assert torch.equal(model(x), fresh(x))
    assert not torch.equal(model(x), fresh[2].base(fresh[1](fresh[0].base(x))))
print("ok")
"""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
