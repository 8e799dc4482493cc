"""Shared helpers for the core test suite.

The reference update is built here, independently of randlora's own helpers
(``delta_weight``, ``_small_basis``, ``_merged_weight``): element by element from the index
formulas of docs/MATH.md (the update), in float64. Only the random bases themselves are taken from
randlora (they are random).
"""

from __future__ import annotations

import copy
import os
import stat
import sys

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import randlora  # noqa: E402

settings.register_profile(
    "randlora",
    deadline=None,
    max_examples=20,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("randlora")

CPU = torch.device("cpu")


def tiny_llama(**overrides) -> nn.Module:
    """A small transformers ``LlamaForCausalLM`` with random weights, built offline; ``overrides``
    change its ``LlamaConfig`` (defaults: hidden 32, MLP 64, 2 layers, 4 heads, vocab 64)."""
    import transformers

    cfg = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=64, max_position_embeddings=64,
    )
    cfg.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))


# -----------------------------------------------------------------------------
# Bases and the float64 reference


def layer_bases64(layer: randlora.RandLoraLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's bases as float64: ``A`` ``(r, d)`` and ``B`` ``(D, n, r)``.

    Taken in float32 (what a float32 forward uses) and widened; int8 compact bases are scaled
    by hand (their scale is a float32 value, so this is exact).
    """
    return bases64(layer._bases, layer.D, layer.d, layer.rank)


def bases64(bases, D: int, d: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    A, Bf = bases.dense(D, d, torch.float64)
    n = -(-d // rank)
    assert A.shape == (rank, d) and Bf.shape == (D, n * rank)
    return A.clone(), Bf.reshape(D, n, rank).clone()


def ref_delta(A: torch.Tensor, B: torch.Tensor, lam: torch.Tensor, gam: torch.Tensor, out_f: int, in_f: int) -> torch.Tensor:
    """Unscaled ΔW ``(out, in)`` in float64 (differentiable), element by element from §1:

        S[k*n + b, j] = lam[k, b] * A[k, j] * gam[b, j]
        Bf[:, b*r + k] = B[:, b, k]
        M = Bf @ S;  ΔW = M if out >= in else M^T

    (The two flattenings pair basis/rank indices crosswise exactly as PEFT does; this is not the
    same matrix as ``Σ_b B_b diag(lam[:, b]) A diag(gam[b])`` unless ``r == 1`` or ``n == 1``.)
    """
    D, n, r = B.shape
    d = A.shape[1]
    assert lam.shape == (r, n) and gam.shape == (n, d) and D == max(out_f, in_f) and d == min(out_f, in_f)
    lam, gam = lam.to(torch.float64), gam.to(torch.float64)
    S_rows = [None] * (r * n)
    Bf_cols = [None] * (n * r)
    for k in range(r):
        for b in range(n):
            S_rows[k * n + b] = lam[k, b] * A[k, :] * gam[b, :]
            Bf_cols[b * r + k] = B[:, b, k]
    S = torch.stack(S_rows, 0)
    Bf = torch.stack(Bf_cols, 1)
    M = Bf @ S
    return M if out_f >= in_f else M.t()


def ref_layer_delta(layer: randlora.RandLoraLinear, lam=None, gam=None) -> torch.Tensor:
    """``scaling * ΔW`` ``(out, in)`` of a layer in float64 (from its current lam/gam)."""
    A, B = layer_bases64(layer)
    lam = layer.lam.detach() if lam is None else lam
    gam = layer.gam.detach() if gam is None else gam
    return layer.scaling * ref_delta(A, B, lam, gam, layer.out_features, layer.in_features)


def reference_copy(before: nn.Module, model: nn.Module) -> nn.Module:
    """float64 copy of ``before`` with s·ΔW (:func:`ref_layer_delta`) added to every weight an adapter of ``model``
    adapts (an MHA projection's through its owner)."""
    ref = copy.deepcopy(before).double()
    for name, ad in randlora.named_adapters(model):
        parts = name.split(".")
        if "parametrizations" in parts:
            i = parts.index("parametrizations")
            owner, pname = ".".join(parts[:i]), parts[i + 1]
        else:
            owner, pname = name, "weight"
        with torch.no_grad():
            getattr(ref.get_submodule(owner), pname).add_(ref_layer_delta(ad))
    return ref


def base_weight64(layer: randlora.RandLoraLinear) -> torch.Tensor:
    w = layer.base.weight.detach().to(torch.float64)
    return w if layer.layout == "linear" else w.t()


def nonzero_uniform(shape, gen: torch.Generator, lo: float = 0.5, hi: float = 1.5, dtype=torch.float32) -> torch.Tensor:
    """Values with |v| in [lo, hi] and a random sign: never zero."""
    mag = torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    sign = torch.randint(0, 2, shape, generator=gen).to(torch.float64) * 2 - 1
    return (mag * sign).to(dtype)


def randomize_(layer: randlora.RandLoraLinear, seed: int = 0) -> None:
    """Random non-zero lam/gam (in place, no grad)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lam.copy_(nonzero_uniform(layer.lam.shape, g))
        layer.gam.copy_(nonzero_uniform(layer.gam.shape, g) / layer.d**0.5)


def randomize_model_(model: nn.Module, seed: int = 0) -> None:
    for i, (_, m) in enumerate(randlora.named_adapters(model)):
        randomize_(m, seed * 1000 + i)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float = 0.0, what: str = "") -> None:
    """Elementwise ``|a - e| <= atol + rtol * max|e|`` with NaN/Inf always failing."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    assert torch.isfinite(a).all(), f"{what}: non-finite values in result"
    assert torch.isfinite(e).all(), f"{what}: non-finite values in reference"
    tol = atol + rtol * max(e.abs().max().item() if e.numel() else 0.0, 1e-30)
    err = (a - e).abs().max().item() if a.numel() else 0.0
    assert err <= tol, f"{what}: max abs error {err:.3g} > tol {tol:.3g}"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    assert torch.isfinite(a).all() and torch.isfinite(e).all()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


# -----------------------------------------------------------------------------
# Models


class TinyNet(nn.Module):
    """Named linear layers of several shapes plus non-linear modules."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(6, width)
        self.norm = nn.LayerNorm(width)
        self.block = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width, bias=False))
        self.head = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.norm(self.embed(x))))


class Int8Linear(nn.Module):
    """A hand-written linear-like module: int8 weight buffer and a per-row scale."""

    def __init__(self, in_features: int, out_features: int, seed: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("qweight", torch.randint(-127, 128, (out_features, in_features), generator=g, dtype=torch.int8))
        self.register_buffer("scale", torch.rand(out_features, 1, generator=g) / 127 + 1e-3)
        self.bias = nn.Parameter(torch.randn(out_features, generator=g))

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantized().to(x.dtype), self.bias.to(x.dtype))


def _same_bits(a, b) -> bool:
    """Bitwise equality (NaN-safe: the same NaN bits are equal), dtype and shape included; other
    values (non-tensor extra state) by ``==``."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if (a.dtype, a.shape, a.device, a.is_meta, a.layout) != (b.dtype, b.shape, b.device, b.is_meta, b.layout):
            return False
        if a.is_meta or a.layout != torch.strided:
            return a.is_meta or torch.equal(a.to_dense(), b.to_dense())
        a, b = (t.detach().cpu().contiguous().reshape(-1) for t in (a, b))
        return torch.equal(a, b) if a.dtype == torch.bool else torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return a == b


def snapshot(model: nn.Module):
    """Everything a failed call must leave untouched: state-dict values (bitwise, NaN-safe), module
    identities, types and train/eval modes, parameters' identities, requires_grad, dtype and device,
    and each adapter's merged/disabled flags, config (dropout, strategy) and dropout module."""
    state = {k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in model.state_dict().items()}
    return (
        state,
        [(n, id(m), type(m), m.training) for n, m in model.named_modules(remove_duplicate=False)],
        [(n, id(p), p.requires_grad, p.dtype, p.device) for n, p in model.named_parameters(remove_duplicate=False)],
        [(n, m.merged, m.disabled, m.config, repr(m._modules.get("dropout"))) for n, m in randlora.named_adapters(model)],
    )


def assert_unchanged(model: nn.Module, snap) -> None:
    state, types, flags, adapted = snap
    now = snapshot(model)
    assert list(now[0]) == list(state), "state_dict keys changed"
    for k, v in state.items():
        assert _same_bits(now[0][k], v), f"{k} changed"
    assert now[1] == types, "module structure, identities or train/eval modes changed"
    assert now[2] == flags, "parameters changed (identity, requires_grad, dtype or device)"
    assert now[3] == adapted, "adapter flags or settings changed"


def fs_snapshot(root) -> dict:
    """Every entry under ``root`` (not following links): kind, mode, bytes (regular files) or link
    text (symlinks)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st_ = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISREG(st_.st_mode):
                with open(p, "rb") as f:
                    out[rel] = ("file", stat.S_IMODE(st_.st_mode), f.read())
            elif stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st_.st_mode))
            else:
                out[rel] = ("other", st_.st_mode)
    return out


def assert_fs_unchanged(root, before) -> None:
    now = fs_snapshot(root)
    assert sorted(now) == sorted(before), f"directory listing changed: {sorted(before)} -> {sorted(now)}"
    for k in before:
        assert now[k] == before[k], f"{k} changed"


@pytest.fixture
def tiny():
    torch.manual_seed(1234)
    return TinyNet()


def fresh_tiny(seed: int = 1234, width: int = 8) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(width)


def record_saved(fn):
    """``fn()`` and every tensor autograd saved for backward while it ran."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return fn(), saved


def bnb_linear(kind: str, in_f: int, out_f: int, seed: int) -> nn.Module:
    """A bitsandbytes layer (``"int8"``: Linear8bitLt; ``"nf4"``/``"fp4"``: Linear4bit, float32
    compute) holding the weights of a seeded nn.Linear, quantized on the CPU and never called (a
    4-bit weight is not yet repacked for bitsandbytes' CPU inference kernel)."""
    import bitsandbytes as bnb  # a test dependency: missing, it fails (no skip)

    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(in_f, out_f, has_fp16_weights=False, threshold=0.0)
    else:
        q = bnb.nn.Linear4bit(in_f, out_f, quant_type=kind, compute_dtype=torch.float32)
    q.load_state_dict(lin.state_dict())
    return q.to("cpu")  # quantizes


def count_own_calls(monkeypatch, cls: type, calls: list) -> None:
    """Record every call of ``cls.forward`` in ``calls``, patched on the class: a forward hook on the instance would
    itself make an adapted base's own call run."""
    real = cls.forward
    monkeypatch.setattr(cls, "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))


class QNet(nn.Module):
    """Two quantized layers. Sizes are multiples of 64: bitsandbytes' CPU 4-bit eval kernel
    repacks the weight (in place, on the first eval forward, on avx512bf16 CPUs) into blocks of 64."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.q1 = bnb_linear(kind, 64, 128, 1)
        self.act = nn.GELU()
        self.q2 = bnb_linear(kind, 128, 64, 2)

    def forward(self, x):
        return self.q2(self.act(self.q1(x)))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: with the cores shared, one intra-op thread is ~10x faster than several."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -----------------------------------------------------------------------------
# Layers, models and refusals shared by test_layers / test_targeting / test_verbs


class OwnForward(nn.Linear):
    """An nn.Linear subclass with a forward of its own: its weight is not what it computes with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class MhaHolder(nn.Module):
    """One nn.MultiheadAttention (self-attention unless k/v are given) and a head."""

    def __init__(self, batch_first: bool = True, kdim: int | None = None, vdim: int | None = None, e: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(e, heads, batch_first=batch_first, kdim=kdim, vdim=vdim)
        self.head = nn.Linear(e, 3)

    def forward(self, x: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
        k = x if k is None else k
        v = x if v is None else v
        return self.head(self.attn(x, k, v, need_weights=False)[0])


def mha_inputs(batch_first: bool = True, kdim: int | None = None, vdim: int | None = None, e: int = 16, dtype=torch.float32):
    """Inputs for :class:`MhaHolder`: ``(x,)``, or ``(x, k, v)`` with kdim/vdim."""
    g = torch.Generator().manual_seed(9)
    shape = lambda s, f: (2, s, f) if batch_first else (s, 2, f)  # noqa: E731
    x = torch.randn(*shape(5, e), generator=g, dtype=dtype)
    if kdim is None:
        return (x,)
    return x, torch.randn(*shape(4, kdim), generator=g, dtype=dtype), torch.randn(*shape(4, vdim), generator=g, dtype=dtype)


def assert_refused(model: nn.Module, fn, errors, *patterns: str, outputs=None) -> str:
    """``fn(model)`` raises one of ``errors`` whose message matches every regex pattern, and
    ``model`` is unchanged (:func:`assert_unchanged`; with ``outputs``, a callable of the model,
    its outputs under no_grad are bitwise the same too). Returns the message."""
    import re

    before = None
    if outputs is not None:
        with torch.no_grad():
            before = outputs(model)
    snap = snapshot(model)
    with pytest.raises(errors) as info:
        fn(model)
    msg = str(info.value)
    for p in patterns:
        assert re.search(p, msg), f"{p!r} not in {msg!r}"
    assert_unchanged(model, snap)
    if outputs is not None:
        with torch.no_grad():
            assert torch.equal(outputs(model), before), "outputs changed"
    return msg


# -----------------------------------------------------------------------------
# Tiny real architectures (random init, offline), shared by test_peft / test_scale: LLaMA, GPT-2
# (Conv1D, tied head), BERT and ViT classifiers, T5, torch's nn.TransformerEncoder and an
# open_clip-style block around nn.MultiheadAttention (``block-sf``: sequence first; ``block-kv``:
# its own key/value widths, so separate q/k/v projection weights).


class ResidualAttentionBlock(nn.Module):
    """ln_1 -> nn.MultiheadAttention -> ln_2 -> mlp(c_fc, gelu, c_proj)."""

    def __init__(self, d: int = 32, heads: int = 4, batch_first: bool = True, kdim: int | None = None, vdim: int | None = None) -> None:
        from collections import OrderedDict

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


def _arch_builders() -> dict:
    import transformers  # a test dependency: missing, it fails (no skip)

    def gpt2():
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0))  # fmt: skip

    def bert():
        return transformers.BertForSequenceClassification(transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=64,
            max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))  # fmt: skip

    def vit():
        return transformers.ViTForImageClassification(transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
            patch_size=4, num_channels=3, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))  # fmt: skip

    def t5():
        return transformers.T5ForConditionalGeneration(transformers.T5Config(
            d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, vocab_size=64, dropout_rate=0.0,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))  # fmt: skip

    def encoder():
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, activation="gelu")
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    return {
        "llama": tiny_llama, "gpt2": gpt2, "bert": bert, "vit": vit, "t5": t5, "encoder": encoder,
        "block": ResidualAttentionBlock, "block-sf": lambda: ResidualAttentionBlock(batch_first=False),
        "block-kv": lambda: ResidualAttentionBlock(kdim=24, vdim=20),
        "block-kv-sf": lambda: ResidualAttentionBlock(batch_first=False, kdim=24, vdim=20),
    }  # fmt: skip


ARCH_KINDS = ("bert", "block", "block-kv", "block-kv-sf", "block-sf", "encoder", "gpt2", "llama", "t5", "vit")
_ARCH_CACHE: dict[str, nn.Module] = {}


def arch_base(kind: str) -> nn.Module:
    """A fresh copy of one fixed random model per kind of :data:`ARCH_KINDS` (float32, train mode)."""
    if kind not in _ARCH_CACHE:
        torch.manual_seed(ARCH_KINDS.index(kind) + 11)
        _ARCH_CACHE[kind] = _arch_builders()[kind]().train()
    return copy.deepcopy(_ARCH_CACHE[kind])


def arch_inputs(kind: str) -> dict[str, torch.Tensor]:
    """Keyword inputs for :func:`arch_base`'s model of ``kind``."""
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


def arch_run(model: nn.Module, inp: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The model's output tensor (``.logits`` of transformers' outputs), float inputs in ``dtype``."""
    out = model(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in inp.items()})
    return out if isinstance(out, torch.Tensor) else out.logits

def distinct_adapters(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Each adapter of ``model`` once, under its first name."""
    seen, out = set(), []
    for name, ad in randlora.named_adapters(model):
        if id(ad) not in seen:
            seen.add(id(ad))
            out.append((name, ad))
    return out


MHA_PARAMS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def adapter_slot(name: str, ad: nn.Module) -> tuple[str, str, bool]:
    """Where an adapter's weight lives in the base model: (module path, parameter name, conv1d).

    A RandLoraLinear adapts its base's ``weight`` under its own path; a weight parametrization
    (MHA in-projections) is named after the parameter it adapts, e.g.
    ``attn.parametrizations.in_proj_weight.0``."""
    if isinstance(ad, randlora.RandLoraLinear):
        return name, "weight", ad.layout == "conv1d"
    parts = name.split(".")
    hits = [i for i, p in enumerate(parts) if p in MHA_PARAMS or p == "weight"]
    assert hits, f"cannot tell which weight adapter {name!r} adapts"
    i = hits[-1]
    return ".".join(p for p in parts[:i] if p != "parametrizations"), parts[i], False


def arch_reference(before: nn.Module, model: nn.Module, grad: bool = False):
    """float64 copy of ``before`` with ``scaling * ΔW`` of each adapter of ``model`` added.

    With ``grad``, the update is a differentiable function of float64 leaves (lam, gam) per
    adapter, returned as ``{name: (lam64, gam64)}``."""
    ref = copy.deepcopy(before).double()
    leaves = {}
    for name, ad in distinct_adapters(model):
        owner, pname, conv = adapter_slot(name, ad)
        mod = ref.get_submodule(owner)
        W = getattr(mod, pname).detach()
        assert tuple(W.shape) == ((ad.in_features, ad.out_features) if conv else (ad.out_features, ad.in_features)), name
        A, B = ad.random_bases(torch.float64)
        lam = ad.lam.detach().to(torch.float64).requires_grad_(grad)
        gam = ad.gam.detach().to(torch.float64).requires_grad_(grad)
        dW = ad.scaling * ref_delta(A, B, lam, gam, ad.out_features, ad.in_features)
        new = W + (dW.t() if conv else dW)
        mod._parameters.pop(pname)  # unties it from anything else sharing it
        setattr(mod, pname, new if grad else nn.Parameter(new.detach(), requires_grad=False))
        leaves[name] = (lam, gam)
    return ref, leaves


def save_load_identical(model: nn.Module, fresh: nn.Module, inp, path) -> nn.Module:
    """save_adapter -> load_adapter into ``fresh`` -> the same lam/gam and bit-identical outputs
    (train with grad, and eval without)."""
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
            assert torch.equal(arch_run(fresh, inp), arch_run(model, inp)), f"train={train}"
    return fresh


def arch_train_steps(model: nn.Module, kind: str, steps: int = 3) -> None:
    """A few SGD steps of a 3-class cross-entropy on :func:`arch_run`'s output for ``kind``'s inputs."""
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (2,), generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(arch_run(model, arch_inputs(kind)), labels).backward()
        opt.step()


def arch_randomize(model: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Random non-zero lam/gam for every adapter (sized so that the update is comparable to W)."""
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for _, ad in randlora.named_adapters(model):
            ad.lam.copy_(nonzero_uniform(ad.lam.shape, g) * scale)
            ad.gam.copy_(nonzero_uniform(ad.gam.shape, g) * scale / ad.d**0.5)
