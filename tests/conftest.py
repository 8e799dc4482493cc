"""Shared helpers for the core test suite.

The reference update is built here, independently of randlora's own helpers
(``delta_weight``, ``_small_basis``, ``_merged_weight``): element by element from the index
formulas of docs/MATH.md (the update), in float64. Only the random bases themselves are taken from
randlora (they are random).
"""

from __future__ import annotations

import os
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


def bases64(bases: randlora._Bases, D: int, d: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    A, Bf, scale = bases.get(D, d, CPU, torch.float32)
    n = -(-d // rank)
    A = A.to(torch.float64)
    Bf = Bf.to(torch.float64)
    if scale is not None:
        A, Bf = A * scale, Bf * scale
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


def snapshot(model: nn.Module):
    """Everything a failed call must leave untouched."""
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [(n, type(m)) for n, m in model.named_modules()],
        [(n, p.requires_grad, p.dtype) for n, p in model.named_parameters()],
        [(n, m.merged, m.disabled) for n, m in randlora.named_adapters(model)],
    )


def assert_unchanged(model: nn.Module, snap) -> None:
    state, types, flags, adapted = snap
    now = model.state_dict()
    assert list(now) == list(state), "state_dict keys changed"
    for k, v in state.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), f"{k} changed"
    assert [(n, type(m)) for n, m in model.named_modules()] == types, "module structure changed"
    assert [(n, p.requires_grad, p.dtype) for n, p in model.named_parameters()] == flags, "requires_grad flags changed"
    assert [(n, m.merged, m.disabled) for n, m in randlora.named_adapters(model)] == adapted


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
