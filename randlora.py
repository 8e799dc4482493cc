"""RandLoRA: full-rank parameter-efficient fine-tuning, in one file.

A frozen linear layer ``y = x W^T + b`` (``W``: ``(out, in)``) is adapted, in the paper's words,
with ``ΔW = Σ_b B_b Λ_b A Γ_b``: fixed random bases ``A`` ``(r, d)`` and ``B`` ``(D, n, r)``
shared by every adapted layer, and only the diagonals ``lam`` (Λ, ``(r, n)``) and ``gam``
(Γ, ``(n, d)``) trained. ``d = min(in, out)``, ``D = max(in, out)``, ``n = ceil(d / r)``, so
``n * r >= d`` and the update can be full rank. With the scaled small basis ``S`` ``(r*n, d)``
and the flattened large bases ``Bf`` ``(D, n*r)``:

    S[k*n + b, j] = lam[k, b] * A[k, j] * gam[b, j]
    Bf[:, b*r + k] = B[:, b, k]
    M = Bf @ S                          (D, d)
    ΔW = M if out >= in else M^T
    y = x W^T + b + (alpha / r) * x ΔW^T

This is exactly what Hugging Face PEFT computes, so PEFT adapters load bit for bit. The two
flattenings pair column ``b*r + k`` of ``Bf`` with row ``k*n + b`` of ``S``: for r, n > 1 that is
not the literal per-basis sum above, but still a sum of rank-``r`` products, full rank for generic
``lam``, ``gam``. docs/MATH.md derives all of it: the update, what ``rank`` means here (a smaller
rank gives more bases and *more* parameters), gradients, the cost model behind the automatic
strategy choice, and what "full rank" means for each bases kind.

The file reads top to bottom: config -> seeded bases -> reference math -> fast kernels ->
autograd function -> layers -> model verbs -> state dict and checkpoint I/O -> PEFT interop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
import warnings
import weakref
from typing import Callable, Iterator, Mapping, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch.autograd.function import once_differentiable

__version__ = "0.2.0"

__all__ = [
    "RandLoraConfig",
    "RandLoraLinear",
    "inject",
    "named_adapters",
    "merge",
    "unmerge",
    "eject",
    "disable",
    "mark_only_adapter_as_trainable",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "save_adapter",
    "load_adapter",
    "summary",
    "from_peft",
    "to_peft",
]

# -----------------------------------------------------------------------------
# Config

BASES_KINDS = ("dense", "sparse", "very_sparse")
# How a layer computes its exact update (docs/MATH.md#two-exact-strategies): "build" builds
# W' = W + s·ΔW for the call, "factorized" multiplies through the bases, "auto" picks per call.
STRATEGIES = ("auto", "build", "factorized")
_OLD_STRATEGY_NAMES = {"merged": "build"}  # before 0.2 "merged" named the build strategy


def _strategy(value: object, what: str = "strategy") -> str:
    """``value`` as a strategy name; old spellings work with a DeprecationWarning."""
    if value in _OLD_STRATEGY_NAMES:
        new = _OLD_STRATEGY_NAMES[value]
        warnings.warn(f"{what}={value!r} is deprecated; use {what}={new!r}", DeprecationWarning, stacklevel=3)
        return new
    if value not in STRATEGIES:
        raise ValueError(f"{what} must be one of {STRATEGIES}, got {_short_repr(value)}")
    return value


def _short_repr(value: object, limit: int = 80) -> str:
    # Values can come from files: never echo megabytes into an exception message.
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@dataclasses.dataclass(frozen=True)
class RandLoraConfig:
    """The settings of one adapter: validated here once, compared and serialized as a whole.

    Args:
        rank: ``r``, the rank of each random basis; ``n = ceil(min(in, out) / r)`` bases per layer.
            Unlike LoRA, a *smaller* rank means more bases and more trainable parameters.
        alpha: ``scaling = alpha / rank``; ``None`` means ``20 * rank`` (PEFT's default ratio).
        seed: seeds the shared random bases (regenerated from it, never saved).
        bases: ``"dense"``, ``"sparse"`` or ``"very_sparse"`` (ternary bases of the paper).
        dropout: dropout probability on the adapter branch's input (training only).
        strategy: ``"auto"``, ``"build"`` or ``"factorized"`` (see :class:`RandLoraFunction`).
    """

    rank: int = 32
    alpha: float | None = None
    seed: int = 0
    bases: str = "dense"
    dropout: float = 0.0
    strategy: str = "auto"

    def __post_init__(self) -> None:
        rank, seed, alpha, dropout = self.rank, self.seed, self.alpha, self.dropout
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ValueError(f"rank must be a positive int, got {_short_repr(rank)}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {_short_repr(seed)}")
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0):
            raise ValueError(f"alpha must be a positive finite number or None, got {_short_repr(alpha)}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {_short_repr(dropout)}")
        if self.bases not in BASES_KINDS:
            raise ValueError(f"bases must be one of {BASES_KINDS}, got {_short_repr(self.bases)}")
        object.__setattr__(self, "alpha", 20.0 * rank if alpha is None else float(alpha))
        object.__setattr__(self, "dropout", float(dropout))
        object.__setattr__(self, "strategy", _strategy(self.strategy))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def shared(self) -> tuple[int, float, int, str]:
        """What every layer of one adapter has in common: ``(rank, alpha, seed, bases)``."""
        return self.rank, self.alpha, self.seed, self.bases

    def replace(self, **changes: object) -> "RandLoraConfig":
        return dataclasses.replace(self, **changes)

    def to_metadata(self) -> dict[str, str]:
        """The shared settings as adapter-file metadata (strings; floats round-trip exactly)."""
        return {"rank": str(self.rank), "alpha": repr(self.alpha), "seed": str(self.seed), "bases": self.bases}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], source: str) -> "RandLoraConfig":
        """The inverse of :meth:`to_metadata`; errors name ``source``."""
        try:
            return cls(rank=int(meta["rank"]), alpha=float(meta["alpha"]), seed=int(meta["seed"]), bases=meta["bases"])
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{source}: malformed randlora metadata ({type(e).__name__}: {_short_repr(str(e))})") from None


# -----------------------------------------------------------------------------
# Seeded random bases


def _num_bases(d: int, rank: int) -> int:
    return -(-d // rank)


def _block_seed(*parts: object) -> int:
    # A stable 63-bit seed per block: Python's hash() is salted per process, blake2b is not.
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


_BLOCK = 1024  # columns of A / rows of B drawn per generator seed


def _uniform_A(seed: int, rank: int, d: int) -> torch.Tensor:
    """Uniform [0, 1) draws for the small basis, ``(rank, d)``, float32 on the CPU.

    Drawn in column blocks, each from its own seed, so ``A`` for a smaller ``d`` is a
    prefix of ``A`` for a larger one: a layer's bases depend only on its own shape.
    """
    cols = []
    for j in range(_num_bases(d, _BLOCK)):
        g = torch.Generator(device="cpu").manual_seed(_block_seed("randlora", seed, rank, "A", j))
        cols.append(torch.rand((rank, _BLOCK), generator=g, dtype=torch.float32))
    return torch.cat(cols, dim=1)[:, :d].contiguous()


def _uniform_B(seed: int, rank: int, D: int, n: int) -> torch.Tensor:
    """Uniform [0, 1) draws for the large bases, ``(D, n, rank)``, float32 on the CPU.

    Drawn per (basis, row block), so ``B[:D, :n]`` is the same for every larger ``D``, ``n``.
    """
    out = torch.empty((_num_bases(D, _BLOCK) * _BLOCK, n, rank), dtype=torch.float32)
    for b in range(n):
        for i in range(_num_bases(D, _BLOCK)):
            g = torch.Generator(device="cpu").manual_seed(_block_seed("randlora", seed, rank, "B", b, i))
            out[i * _BLOCK : (i + 1) * _BLOCK, b] = torch.rand((_BLOCK, rank), generator=g, dtype=torch.float32)
    return out[:D].contiguous()


def _sparsity(kind: str, d: int) -> float:
    """``s`` such that an entry is non-zero with probability ``1/s`` (±1 each ``1/(2s)``)."""
    return 3.0 if kind == "sparse" else math.sqrt(d)


def _f32(value: float) -> float:
    # Round a scale to float32 once, so int8 bases rebuilt in any dtype equal the float32 ones cast.
    return float(torch.tensor(value, dtype=torch.float32))


def _covers(hit: tuple | None, D: int, d: int) -> bool:
    """Whether cached bases ``(A (r, d'), B (D', n', r), scale)`` are large enough for (D, d)."""
    return hit is not None and hit[1].shape[0] >= D and hit[0].shape[1] >= d


class _Bases:
    """The shared random bases of one adapter: ``A`` ``(r, d_max)`` and ``B`` ``(D_max, n_max, r)``.

    Generated on the CPU in float32 from ``seed`` alone, then cast and moved lazily: one copy
    per (device, dtype), grown when a larger layer asks, shared by every layer. Dense bases are
    uniform with unit variance (``(2u - 1) * sqrt(3)``); sparse kinds are ternary
    ``{-1, 0, +1} * sqrt(s)`` and are kept as int8 plus one float scale (half of bf16), rebuilt
    in the compute dtype only inside a call. Very sparse bases use ``s = sqrt(d)`` of the layer
    asking, so they are cached per distinct ``d``. Instances are immutable and shared: deepcopy
    returns the same object.
    """

    def __init__(self, rank: int, seed: int = 0, kind: str = "dense") -> None:
        self.rank, self.seed, self.kind = rank, seed, kind
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, float | None]] = {}

    def __deepcopy__(self, memo: dict) -> "_Bases":
        return self

    @property
    def compact(self) -> bool:
        """Whether the bases are stored as int8 plus a scale."""
        return self.kind != "dense"

    def _generate(self, D: int, d: int, s: float | None) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        """Bases of at least (D, d) on the CPU: float32, or int8 ternary plus its scale."""
        n = _num_bases(d, self.rank)
        uA, uB = _uniform_A(self.seed, self.rank, d), _uniform_B(self.seed, self.rank, D, n)
        if self.kind == "dense":
            return (uA * 2 - 1) * math.sqrt(3), (uB * 2 - 1) * math.sqrt(3), None
        s = _sparsity(self.kind, d) if s is None else s  # "sparse": s = 3 for every layer
        p = 1 / (2 * s)

        def ternary(u: torch.Tensor) -> torch.Tensor:
            return (u > 1 - p).to(torch.int8) - (u < p).to(torch.int8)

        return ternary(uA), ternary(uB), _f32(math.sqrt(s))

    def get(
        self, D: int, d: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        """Views for one layer: ``A`` ``(r, d)``, ``Bf`` ``(D, n*r)`` and the int8 scale (or None).

        Dense bases come in ``dtype``; compact (int8) bases come as int8 with their scale, to be
        rebuilt by :func:`_materialize`.
        """
        s = _sparsity(self.kind, d) if self.kind == "very_sparse" else None
        store = torch.int8 if self.compact else dtype
        key = (torch.device(device), store, s)
        hit = self._cache.get(key)
        if not _covers(hit, D, d):
            hit = self._fill(key, D, d, s, device, store)
        A_all, B_all, scale = hit
        n = _num_bases(d, self.rank)
        return A_all[:, :d], B_all[:D, :n].flatten(1), scale

    @torch.compiler.disable
    def _fill(self, key: tuple, D: int, d: int, s: float | None, device: torch.device, store: torch.dtype) -> tuple:
        """Generate (or grow) the cached bases under ``key``. Kept out of torch.compile graphs:
        seeded CPU generators cannot be traced, so a compiled model only ever reads the cache."""
        hit = self._cache.get(key)
        if not _covers(hit, D, d):
            grow_D, grow_d = D, d
            if hit is not None:  # grow: every previous slice keeps its values
                grow_D, grow_d = max(D, hit[1].shape[0]), max(d, hit[0].shape[1])
            A_all, B_all, scale = self._generate(grow_D, grow_d, s)
            hit = (A_all.to(device=device, dtype=store), B_all.to(device=device, dtype=store), scale)
            self._cache[key] = hit
        return hit

    def dense(self, D: int, d: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The float version of one layer's bases, ``A`` ``(r, d)`` and ``Bf`` ``(D, n*r)``."""
        A, B, scale = self.get(D, d, torch.device(device), dtype)
        return _materialize(A, dtype, scale), _materialize(B, dtype, scale)


# One bases object per (rank, seed, kind) while any layer holds it: every layer of a model
# shares one cached copy per device and dtype. Weak, so an ejected adapter frees its bases.
_SHARED_BASES: "weakref.WeakValueDictionary[tuple, _Bases]" = weakref.WeakValueDictionary()


def _seeded_bases(config: RandLoraConfig) -> _Bases:
    """The shared bases object of ``config``'s (rank, seed, kind)."""
    key = (config.rank, config.seed, config.bases)
    bases = _SHARED_BASES.get(key)
    if bases is None:
        bases = _Bases(*key)
        _SHARED_BASES[key] = bases
    return bases


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Skips the dispatch of a no-op .to(): this runs several times per layer and call.
    return t if t.dtype == dtype else t.to(dtype)


def _materialize(t: torch.Tensor, dtype: torch.dtype, scale: float | None) -> torch.Tensor:
    """Bases in ``dtype``: dense ones as they are, int8 ones times their scale (a temporary)."""
    return _as(t, dtype) if scale is None else t.to(dtype).mul_(scale)


# -----------------------------------------------------------------------------
# Reference math (docs/MATH.md#the-update, #gradients): plain PyTorch, any device and dtype.


def _small_basis_eager(lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``S`` ``(r*n, d)`` in ``dtype``: ``S[k*n + b, j] = lam[k, b] * A[k, j] * gam[b, j]``.

    Computed in float32 (float64 for float64 compute) and rounded once, in two passes: the
    second multiplies and rounds in one kernel.
    """
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    lg = _as(lam, acc).unsqueeze(2) * _as(gam, acc)
    if dtype == acc:
        return lg.mul_(A.unsqueeze(1)).flatten(0, 1)
    return torch.mul(lg, A.unsqueeze(1), out=torch.empty(lg.shape, dtype=dtype, device=lg.device)).flatten(0, 1)


def _adapted_weight(W: torch.Tensor | None, S: torch.Tensor, Bf: torch.Tensor, scaling: float, out_ge_in: bool) -> torch.Tensor:
    """``W + scaling * ΔW`` ``(out, in)`` in the compute dtype, in one matmul."""
    lhs, rhs = (Bf, S) if out_ge_in else (S.t(), Bf.t())
    if W is None:
        return torch.mm(lhs, rhs).mul_(scaling)
    return torch.addmm(W, lhs, rhs, alpha=scaling)


def _scale_grads_eager(
    dS: torch.Tensor, lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``dlam`` ``(r, n)`` and ``dgam`` ``(n, d)`` from unscaled ``dS`` ``(r*n, d)`` (docs/MATH.md#gradients).

    ``dlam[k, b] = s Σ_j dS[k*n+b, j] A[k, j] gam[b, j]``, ``dgam[b, j] = s Σ_k dS[k*n+b, j] lam[k, b] A[k, j]``,
    in float32 (float64 for float64 compute): products and sums that inductor fuses under compile.
    """
    acc = torch.float64 if dS.dtype == torch.float64 else torch.float32
    r, n = lam.shape
    dSA = dS.view(r, n, -1) * (_as(A, acc) * scaling).unsqueeze(1)  # (r, n, d)
    dlam = (dSA * _as(gam, acc)).sum(-1)
    dgam = (dSA * _as(lam, acc).unsqueeze(-1)).sum(0)
    return _as(dlam, lam.dtype), _as(dgam, gam.dtype)


# -----------------------------------------------------------------------------
# Fast kernels: on CUDA, the two elementwise steps above each become one Triton kernel
# (Triton ships with CUDA builds of PyTorch): S is written once in the compute dtype, dS is read
# once. That is what keeps the build strategy within a few percent of full fine-tuning
# (benchmarks/). They compute the same float32 expressions as the reference beside them, which
# runs everywhere else: on the CPU, under torch.compile (inductor fuses the eager code itself),
# for float64, or with RANDLORA_TRITON=0. The switch is decided once, here, at import.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # tests run the kernels on the CPU
try:
    if os.environ.get("RANDLORA_TRITON", "1") == "0":
        raise ImportError
    import triton
    import triton.language as tl
except Exception:  # not installed (CPU builds), or broken: the reference is always there
    triton = None
TRITON = triton is not None

if triton is not None:

    @triton.jit
    def _small_basis_kernel(S, lam, A, gam, n, d, s_row, a_row, g_row, BLOCK: tl.constexpr):
        row = tl.program_id(0)  # k * n + b
        k = row // n
        b = row - k * n
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = j < d
        a = tl.load(A + k * a_row + j, mask=mask).to(tl.float32)
        g = tl.load(gam + b * g_row + j, mask=mask).to(tl.float32)
        lk = tl.load(lam + row).to(tl.float32)
        tl.store(S + row * s_row + j, (lk * g * a).to(S.dtype.element_ty), mask=mask)  # eager's order

    @triton.jit
    def _scale_grads_kernel(dS, A, lam, gam, dgam, part, r, n, d, ds_row, a_row, g_row, scaling, BLOCK: tl.constexpr):
        # One program per (basis b, block of columns j): reads dS[k*n + b, j] for all k once,
        # accumulates dgam[b, j] and writes per-block partial sums of dlam (no atomics: deterministic).
        b = tl.program_id(0)
        jb = tl.program_id(1)
        j = jb * BLOCK + tl.arange(0, BLOCK)
        mask = j < d
        g = tl.load(gam + b * g_row + j, mask=mask, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(r):
            t = tl.load(dS + (k * n + b) * ds_row + j, mask=mask, other=0.0).to(tl.float32)
            t = t * tl.load(A + k * a_row + j, mask=mask, other=0.0).to(tl.float32)
            acc += t * tl.load(lam + k * n + b).to(tl.float32)
            tl.store(part + (k * n + b) * tl.num_programs(1) + jb, tl.sum(t * g, axis=0) * scaling)
        tl.store(dgam + b * d + j, acc * scaling, mask=mask)


def _use_triton(t: torch.Tensor) -> bool:
    """Whether the kernels can take ``t``: the import switch, then the tensor's device and dtype."""
    return TRITON and (t.is_cuda or _TRITON_INTERPRET) and t.dtype != torch.float64 and not torch.compiler.is_compiling()


def _small_basis(lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``S`` ``(r*n, d)`` in ``dtype``: ``S[k*n + b, j] = lam[k, b] * A[k, j] * gam[b, j]``."""
    if not _use_triton(A) or A.stride(1) != 1 or gam.stride(1) != 1 or not lam.is_contiguous():
        return _small_basis_eager(lam, gam, A, dtype)
    r, n = lam.shape
    d = gam.shape[1]
    S = torch.empty(r * n, d, dtype=dtype, device=A.device)
    _small_basis_kernel[(r * n, triton.cdiv(d, 1024))](S, lam, A, gam, n, d, S.stride(0), A.stride(0), gam.stride(0), BLOCK=1024)
    return S


def _scale_grads(
    dS: torch.Tensor, lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``dlam`` ``(r, n)`` and ``dgam`` ``(n, d)`` (float32) from unscaled ``dS`` ``(r*n, d)``."""
    if not _use_triton(dS) or dS.stride(1) != 1 or A.stride(1) != 1 or gam.stride(1) != 1 or not lam.is_contiguous():
        return _scale_grads_eager(dS, lam, gam, A, scaling)
    r, n = lam.shape
    d = gam.shape[1]
    blocks = triton.cdiv(d, 256)
    dgam = torch.empty(n, d, dtype=torch.float32, device=dS.device)
    part = torch.empty(r, n, blocks, dtype=torch.float32, device=dS.device)
    _scale_grads_kernel[(n, blocks)](dS, A, lam, gam, dgam, part, r, n, d, dS.stride(0), A.stride(0), gam.stride(0), scaling, BLOCK=256)
    return _as(part.sum(-1), lam.dtype), _as(dgam, gam.dtype)


# -----------------------------------------------------------------------------
# Autograd functions


class RandLoraFunction(torch.autograd.Function):
    """``y = x W^T + b + scaling * x ΔW^T`` with nothing kept for backward but the input.

    Two exact strategies (docs/MATH.md#two-exact-strategies), chosen by the caller (``build``):

    * factorized: ``x S^T Bf^T`` (out >= in) or ``x Bf S`` (out < in); cheap for few tokens.
    * build: build ``W' = W + scaling * ΔW`` in the compute dtype, use it, drop it; rebuild it
      in backward and take ``dlam``/``dgam`` from ``G = dY^T X``. Best for many tokens.

    ``S`` and ``W'`` are rebuilt in backward from the parameters and the shared bases, so saved
    tensors are only ``x``, ``W``, ``lam``, ``gam`` and the bases (which are shared).

    Shapes: ``x`` (N, in), ``W`` (out, in) or None (the adapter's term alone: the caller runs the
    base itself), ``bias`` (out,) or None, ``lam`` (r, n), ``gam`` (n, d), ``A`` (r, d),
    ``Bf`` (D, n*r) -> ``y`` (N, out).
    """

    @staticmethod
    def forward(ctx, x, W, bias, lam, gam, A, Bf, bases_scale, scaling, out_ge_in, build):
        dtype = x.dtype
        A_, Bf_ = _materialize(A, dtype, bases_scale), _materialize(Bf, dtype, bases_scale)
        if build:
            S = _small_basis(lam, gam, A_, dtype)
            y = F.linear(x, _adapted_weight(W, S, Bf_, scaling, out_ge_in), bias)
        else:
            y = F.linear(x, W, bias) if W is not None else None
            if out_ge_in:  # (x S^T) Bf^T: S carries lam and gam, so x S^T is already small
                lhs, rhs = x @ _small_basis(lam, gam, A_, dtype).t(), Bf_.t()
            else:  # (x Bf) S with lam moved onto Bf's columns: x Bf alone overflows fp16 sooner than x W^T
                lhs, rhs = _factor_left(x, Bf_, lam), _small_basis(torch.ones_like(lam), gam, A_, dtype)
            if y is None:  # the adapter's term alone; a bias (if given) is still added
                y = torch.mm(lhs, rhs).mul_(scaling) if bias is None else torch.addmm(bias, lhs, rhs, alpha=scaling)
            else:
                y.addmm_(lhs, rhs, alpha=scaling)
        ctx.save_for_backward(x, W, lam, gam, A, Bf)
        ctx.has_bias = bias is not None
        ctx.bases_scale, ctx.scaling, ctx.out_ge_in, ctx.build = bases_scale, scaling, out_ge_in, build
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dY):
        x, W, lam, gam, A, Bf = ctx.saved_tensors
        need_x, need_W, need_b, need_lam, need_gam = ctx.needs_input_grad[:5]
        s, out_ge_in, dtype = ctx.scaling, ctx.out_ge_in, x.dtype
        dY = _as(dY, dtype)
        A_, Bf_ = _materialize(A, dtype, ctx.bases_scale), _materialize(Bf, dtype, ctx.bases_scale)
        S = _small_basis(lam, gam, A_, dtype)
        need_S = need_lam or need_gam
        dW = dS = None
        if ctx.build:
            dX = dY @ _adapted_weight(W, S, Bf_, s, out_ge_in) if need_x else None
            if need_W or need_S:
                G = dY.t() @ x  # (out, in): full fine-tuning's weight gradient
                dW = G if need_W else None
                if need_S:
                    dS = Bf_.t() @ (G if out_ge_in else G.t())  # (r*n, d), unscaled: _scale_grads applies it
                del G
        else:
            dX, dS = _factorized_grads(x, W, dY, S, Bf_, s, out_ge_in, need_x, need_S)
            dW = dY.t() @ x if need_W else None
        dlam, dgam = _scale_grads(dS, lam, gam, A_, s) if dS is not None else (None, None)
        db = dY.sum(0) if need_b and ctx.has_bias else None
        return dX, dW, db, dlam, dgam, None, None, None, None, None, None


class AdaptedWeight(torch.autograd.Function):
    """``W' = W + scaling * ΔW`` ``(out, in)`` as a tensor, for code that reads a weight instead of
    calling the layer (``nn.MultiheadAttention``, T5, the eval fast path of
    ``nn.TransformerEncoderLayer``). Saves only ``lam``, ``gam`` and the shared bases; the
    backward takes ``dlam``/``dgam`` from ``dW'`` exactly as the build strategy does from ``G``.
    """

    @staticmethod
    def forward(ctx, W, lam, gam, A, Bf, bases_scale, scaling, out_ge_in):
        dtype = W.dtype
        A_, Bf_ = _materialize(A, dtype, bases_scale), _materialize(Bf, dtype, bases_scale)
        ctx.save_for_backward(lam, gam, A, Bf)
        ctx.bases_scale, ctx.scaling, ctx.out_ge_in, ctx.dtype = bases_scale, scaling, out_ge_in, dtype
        return _adapted_weight(W, _small_basis(lam, gam, A_, dtype), Bf_, scaling, out_ge_in)

    @staticmethod
    @once_differentiable
    def backward(ctx, dWp):
        lam, gam, A, Bf = ctx.saved_tensors
        dtype = ctx.dtype
        dWp = _as(dWp, dtype)
        dlam = dgam = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            A_, Bf_ = _materialize(A, dtype, ctx.bases_scale), _materialize(Bf, dtype, ctx.bases_scale)
            dS = Bf_.t() @ (dWp if ctx.out_ge_in else dWp.t())  # (r*n, d), unscaled
            dlam, dgam = _scale_grads(dS, lam, gam, A_, ctx.scaling)
        dW = dWp if ctx.needs_input_grad[0] else None
        return dW, dlam, dgam, None, None, None, None, None


def _factor_left(x: torch.Tensor, Bf: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``x Bf diag(lam_c)`` ``(N, r*n)``, where column ``c = b*r + k`` of ``Bf`` meets row ``c`` of
    ``S``, whose ``lam`` is ``lam.flatten()[c]`` (docs/MATH.md#the-update)."""
    return x @ (Bf * _as(lam.detach().flatten(), Bf.dtype))


def _factorized_grads(x, W, dY, S, Bf, s: float, out_ge_in: bool, need_x: bool, need_S: bool):
    """``dX`` ``(N, in)`` and unscaled ``dS`` ``(r*n, d)`` of the factorized strategy."""
    dX = dS = None
    if out_ge_in:  # y += s (x S^T) Bf^T
        dH = dY @ Bf  # (N, r*n), unscaled
        if need_x:
            dX = torch.mm(dH, S).mul_(s) if W is None else torch.addmm(dY @ W, dH, S, alpha=s)
        if need_S:
            dS = dH.t() @ x
    else:  # y += s (x Bf) S
        if need_x:
            dU = dY @ S.t()
            dX = torch.mm(dU, Bf.t()).mul_(s) if W is None else torch.addmm(dY @ W, dU, Bf.t(), alpha=s)
        if need_S:
            dS = (x @ Bf).t() @ dY
    return dX, dS


def _prefer_build(N: int, out_f: int, in_f: int, rn: int, backward: bool) -> bool:
    """Whether building ``W'`` is cheaper than the factorized strategy for ``N`` tokens, from the
    multiply-add counts of docs/MATH.md#cost-model (forward + backward when a backward follows)."""
    D, d = max(out_f, in_f), min(out_f, in_f)
    base = N * D * d
    build = D * d * rn
    fact = base + N * rn * (D + d)
    built = base + build
    if backward:
        recompute = N * D * rn if in_f > out_f else 0
        fact += base + N * rn * (D + d) + N * rn * d + recompute
        built += 2 * base + 2 * build
    return built * _BUILD_COST_FACTOR < fact


# Multiplies the build strategy's count before comparing (> 1 favours factorized). Measured on an
# H100 (benchmarks/bench.py, crossover table): with the fused kernels the plain counts pick the
# faster strategy everywhere but within a few percent of the crossover, so no correction is needed.
_BUILD_COST_FACTOR = 1.0


# -----------------------------------------------------------------------------
# Layers


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) stores its weight as (in, out); matched by duck type so we
    # never import transformers.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None and module.weight.dim() == 2


def _features(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of a linear-like module, or None if it is not one."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    i, o = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(i, int) and isinstance(o, int) and not isinstance(i, bool) and callable(getattr(module, "forward", None)):
        return i, o
    return None


def _layout(module: nn.Module) -> str:
    """How the adapter meets the base layer's weight:

    * ``"linear"``: an ``nn.Linear`` whose weight is a plain floating ``(out, in)`` tensor and
      whose forward is ``nn.Linear``'s: the base matmul runs inside :class:`RandLoraFunction`.
    * ``"conv1d"``: transformers' ``Conv1D``, the same with the weight stored ``(in, out)``.
    * ``"opaque"``: anything else (bitsandbytes 8-bit and 4-bit layers, a parametrized weight, a
      subclass with its own forward): its own forward runs, the adapter's term is added beside
      it, and its weight is never read or written (not mergeable).
    """
    w = getattr(module, "weight", None)
    # Exact types: tensor subclasses (bitsandbytes' Int8Params / Params4bit, torchao's quantized
    # tensors) may pack their values behind a float dtype. FSDP2 shards are DTensors of plain values.
    plain_type = type(w) in (torch.Tensor, nn.Parameter) or type(w).__name__ == "DTensor"
    plain = plain_type and w.is_floating_point() and w.dim() == 2
    if not plain or parametrize.is_parametrized(module):
        return "opaque"
    if type(module).forward is nn.Linear.forward and isinstance(module, nn.Linear):
        return "linear"
    return "conv1d" if _is_conv1d(module) else "opaque"


def _module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


class RandLoraAdapter(nn.Module):
    """What every RandLoRA adapter has: its config, the shared bases, and the trained ``lam``
    ``(r, n)`` and ``gam`` ``(n, d)`` (float32, initialised as PEFT does: ``lam = 0`` so ΔW = 0,
    ``gam = 1 / max(n, d)``) for a weight of ``out_features x in_features``."""

    def __init__(self, in_features: int, out_features: int, config: RandLoraConfig, name: str, bases: _Bases | None, device: torch.device) -> None:
        super().__init__()
        if config.rank > min(in_features, out_features) and bases is None:  # PEFT files may hold r > d
            raise ValueError(
                f"rank {config.rank} is larger than min(in, out) = {min(in_features, out_features)} of layer "
                f"{name!r} (in_features={in_features}, out_features={out_features})"
            )
        self.in_features, self.out_features = in_features, out_features
        self.d, self.D = min(in_features, out_features), max(in_features, out_features)
        self.n = _num_bases(self.d, config.rank)
        self.config, self.name = config, name
        self._bases = _seeded_bases(config) if bases is None else bases
        self._views: tuple | None = None
        self.lam = nn.Parameter(torch.zeros(config.rank, self.n, dtype=torch.float32, device=device))
        self.gam = nn.Parameter(torch.full((self.n, self.d), 1 / max(self.n, self.d), dtype=torch.float32, device=device))

    rank = property(lambda self: self.config.rank)
    alpha = property(lambda self: self.config.alpha)
    scaling = property(lambda self: self.config.scaling)

    @property
    def strategy(self) -> str:
        return self.config.strategy

    @strategy.setter
    def strategy(self, value: str) -> None:
        self.config = self.config.replace(strategy=_strategy(value, f"{type(self).__name__} {self.name!r}: strategy"))

    @property
    def path(self) -> str:
        warnings.warn("RandLoraLinear.path is deprecated; use .strategy", DeprecationWarning, stacklevel=2)
        return {"build": "merged"}.get(self.strategy, self.strategy)

    @path.setter
    def path(self, value: str) -> None:
        warnings.warn("RandLoraLinear.path is deprecated; use .strategy", DeprecationWarning, stacklevel=2)
        self.strategy = _OLD_STRATEGY_NAMES.get(value, value)

    def __getstate__(self) -> dict:
        # deepcopy / pickle: drop the remembered views (they would copy the shared bases).
        state = self.__dict__.copy()
        state["_views"] = None
        return state

    def _bases_for(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        """This layer's views of the shared bases, remembered per layer: slicing them anew on
        every call costs more host time than the small-batch GPU work it feeds."""
        v = self._views
        if v is None or v[0] is not self._bases or v[2] is not dtype or v[1] != device:
            v = (self._bases, device, dtype, *self._bases.get(self.D, self.d, device, dtype))
            self._views = v
        return v[3], v[4], v[5]

    def _apply(self, fn, recurse: bool = True):
        # model.half() / .to(bfloat16) casts the base but keeps lam/gam float32, with their values
        # taken from before the cast (a round trip through the half type would round them).
        before = (self.lam.data, self.gam.data)
        super()._apply(fn, recurse)
        for p, old in zip((self.lam, self.gam), before):
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = old.to(device=p.device, dtype=torch.float32)
        return self

    def adapted(self, W: torch.Tensor) -> torch.Tensor:
        """``W + scaling * ΔW`` for ``W`` ``(out, in)``, differentiable in ``lam``/``gam``."""
        A, Bf, bscale = self._bases_for(W.device, W.dtype)
        return AdaptedWeight.apply(W, self.lam, self.gam, A, Bf, bscale, self.scaling, self.out_features >= self.in_features)

    def delta_weight(self, dtype: torch.dtype = torch.float32, lam: torch.Tensor | None = None, gam: torch.Tensor | None = None) -> torch.Tensor:
        """``scaling * ΔW`` as ``(out, in)`` in ``dtype`` (computed in float32 or float64)."""
        lam = self.lam if lam is None else lam
        gam = self.gam if gam is None else gam
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        with torch.no_grad():
            A, Bf = self._bases.dense(self.D, self.d, acc, device=lam.device)
            M = Bf @ _small_basis(lam, gam, A, acc)
            dW = M if self.out_features >= self.in_features else M.t()
            return (dW * self.scaling).to(dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bases={self.n} ({self._bases.kind}), scaling={self.scaling:g}, strategy={self.strategy!r}"
        )


class RandLoraLinear(RandLoraAdapter):
    """A frozen linear layer plus a RandLoRA update: ``y = base(x) + scaling * x ΔW^T``.

    Args:
        base: the layer to adapt: ``nn.Linear``, transformers' ``Conv1D`` (weight stored
            ``(in, out)``) or any linear-like module with ``in_features``, ``out_features`` and a
            forward (e.g. a quantized linear: the adapter runs beside it; see :func:`_layout`).
        config: the adapter's :class:`RandLoraConfig`.
        name: the layer's qualified name, for messages.
        bases: the shared bases; by default the seeded bases of ``config``.

    Input ``(*, in)`` -> output ``(*, out)``. The module takes ``base``'s train/eval mode.
    """

    def __init__(self, base: nn.Module, config: RandLoraConfig, name: str = "", *, bases: _Bases | None = None) -> None:
        feats = _features(base)
        if feats is None:
            raise TypeError(f"{name or type(base).__name__}: {type(base).__name__} is not a linear-like layer")
        super().__init__(*feats, config, name, bases, _module_device(base))
        self.base = base
        self.layout = _layout(base)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.merged = False  # the base weight holds W + s·ΔW (see merge)
        self.disabled = False
        self._merged_params: tuple[torch.Tensor, torch.Tensor] | None = None
        self.train(base.training)

    @property
    def dropout_p(self) -> float:
        return self.config.dropout

    def set_config(self, config: RandLoraConfig) -> None:
        """Take ``config``'s per-layer settings (dropout, strategy); the shared ones must not change."""
        if config.shared != self.config.shared:
            raise ValueError(f"RandLoraLinear {self.name!r}: (rank, alpha, seed, bases) {config.shared} != {self.config.shared}")
        self.config = config
        if config.dropout != self.dropout_p:
            self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
            self.dropout.train(self.training)

    @property
    def mergeable(self) -> bool:
        return self.layout != "opaque"

    def _weight(self) -> torch.Tensor:
        """The base weight as ``(out, in)`` (a view for Conv1D)."""
        w = self.base.weight
        return w if self.layout == "linear" else w.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"RandLoraLinear {self.name!r}: input has shape {tuple(x.shape)}; expected (..., {self.in_features}) "
                f"(in_features={self.in_features} in the last dim)"
            )
        if self.disabled:
            return self.base(x)
        if self.merged:
            if self.training and torch.is_grad_enabled() and (self.lam.requires_grad or self.gam.requires_grad):
                raise RuntimeError(
                    f"RandLoraLinear {self.name!r} is merged: lam/gam are not used by a merged forward and would "
                    "get no gradient. Call randlora.unmerge(model) before training, or model.eval() for inference."
                )
            return self.base(x)
        dt = x.device.type
        dtype = torch.get_autocast_dtype(dt) if torch.is_autocast_enabled(dt) else x.dtype
        A, Bf, bscale = self._bases_for(x.device, dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        backward = torch.is_grad_enabled() and (x.requires_grad or self.lam.requires_grad or self.gam.requires_grad)
        build = self.strategy == "build" or (
            self.strategy == "auto" and _prefer_build(x2.shape[0], self.out_features, self.in_features, self.rank * self.n, backward)
        )
        out_ge_in = self.out_features >= self.in_features
        # Dropout makes the adapter's input differ from the base's: then the base runs on its own.
        with_base = self.layout != "opaque" and (isinstance(self.dropout, nn.Identity) or not self.training)
        with torch.autocast(dt, enabled=False) if dtype is not x.dtype else contextlib.nullcontext():
            if with_base:
                W = _as(self._weight(), dtype)
                b = self.base.bias
                b = _as(b, dtype) if b is not None else None
                y = RandLoraFunction.apply(_as(x2, dtype), W, b, self.lam, self.gam, A, Bf, bscale, self.scaling, out_ge_in, build)
                return y.view(*lead, self.out_features)
            delta = RandLoraFunction.apply(
                _as(self.dropout(x2), dtype), None, None, self.lam, self.gam, A, Bf, bscale, self.scaling, out_ge_in, build
            )
        y = self.base(x)
        return y + delta.view(*lead, self.out_features).to(y.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The weight this layer computes with, in the base's own layout (``(out, in)``; ``(in, out)``
        for Conv1D): ``W + scaling * ΔW``, differentiable in ``lam``/``gam``, or the base weight while
        merged or disabled. For parents that read ``.weight`` instead of calling the layer."""
        if self.layout == "opaque":
            raise AttributeError(
                f"RandLoraLinear {self.name!r} wraps a {type(self.base).__name__}, whose weight is not a plain tensor; "
                "code that reads its .weight would skip the adapter (call the layer instead)"
            )
        if self.merged or self.disabled:
            return self.base.weight
        Wp = self.adapted(self._weight())
        return Wp if self.layout == "linear" else Wp.t()

    @weight.setter
    def weight(self, value: torch.Tensor) -> None:
        # transformers' tie_weights() assigns output_embeddings.weight: that is the base's weight.
        self.base.weight = value

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    @torch.no_grad()
    def merge(self) -> None:
        """Add ``scaling * ΔW`` to the base weight (float32 arithmetic). A no-op if merged."""
        if self.merged:
            return
        if not self.mergeable:
            raise TypeError(
                f"RandLoraLinear {self.name!r}: cannot merge into a {type(self.base).__name__}, whose weight is not "
                "a plain tensor; keep the adapter unmerged (it computes beside the layer)"
            )
        lam, gam = self.lam.detach().clone(), self.gam.detach().clone()
        self._add_to_weight(self.delta_weight(torch.float32, lam, gam))
        self._merged_params, self.merged = (lam, gam), True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract what :meth:`merge` added (from lam/gam as they were at merge time)."""
        if not self.merged:
            return
        lam, gam = self._merged_params
        self._add_to_weight(-self.delta_weight(torch.float32, lam, gam))
        self._merged_params, self.merged = None, False

    def _add_to_weight(self, dW: torch.Tensor) -> None:
        w = self.base.weight
        dW = dW if self.layout == "linear" else dW.t()
        w.data.copy_((w.data.float() + dW.to(w.device)).to(w.dtype))


def _adapt(model: nn.Module, name: str, module: nn.Module, config: RandLoraConfig) -> None:
    """Put an adapter on the (checked) target ``name`` of ``model``, in place."""
    _replace(model, name, RandLoraLinear(module, config, name))


# -----------------------------------------------------------------------------
# Model-level verbs

Targets = Union[str, Sequence[str], Callable[[str, nn.Module], bool]]


def named_adapters(model: nn.Module) -> Iterator[tuple[str, RandLoraAdapter]]:
    """``(qualified name, adapter)`` for every RandLoRA adapter in ``model``, each once."""
    for name, m in model.named_modules():
        if isinstance(m, RandLoraAdapter):
            yield name, m


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and _features(m) is not None and not isinstance(m, RandLoraAdapter)]


def _match(model: nn.Module, targets: Targets) -> list[tuple[str, nn.Module]]:
    """Qualified names and modules selected by ``targets`` (see :func:`inject`)."""
    modules = [(n, m) for n, m in model.named_modules() if n]
    if callable(targets) and not isinstance(targets, str):
        return [(n, m) for n, m in modules if targets(n, m)]
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ValueError(f"targets {targets!r} is not a valid regular expression: {e}") from None
        found = [(n, m) for n, m in modules if pattern.fullmatch(n)]
        if not found:
            raise ValueError(f"targets regex {targets!r} matched no module; linear layers: {_short_list(_linear_names(model))}")
        return found
    entries = list(targets)
    if not entries or not all(isinstance(e, str) and e for e in entries):
        raise TypeError(f"targets must be a non-empty list of names, a regex string or a callable; got {targets!r}")
    found, seen = [], set()
    for entry in entries:
        hits = [(n, m) for n, m in modules if _name_matches(n, entry)]
        if not hits:
            raise ValueError(
                f"target {entry!r} matches no module of {type(model).__name__}; "
                f"its linear layers are: {_short_list(_linear_names(model))}"
            )
        for n, m in hits:
            if n not in seen:
                seen.add(n)
                found.append((n, m))
    return found


def _name_matches(name: str, entry: str) -> bool:
    """A list entry selects a module whose qualified name equals it or ends with ``"." + entry``
    (PEFT's rule too)."""
    return name == entry or name.endswith("." + entry)


def _short_list(names: list[str], limit: int = 30) -> str:
    if not names:
        return "(none)"
    more = f", ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def inject(
    model: nn.Module,
    targets: Targets,
    rank: int | None = None,
    seed: int = 0,
    *,
    alpha: float | None = None,
    dropout: float = 0.0,
    bases: str = "dense",
    strategy: str = "auto",
    config: RandLoraConfig | None = None,
    path: str | None = None,
) -> nn.Module:
    """Wrap the targeted linear layers of ``model`` in :class:`RandLoraLinear`, in place.

    Every other parameter is frozen; the new ``lam``/``gam`` are trainable. Everything is
    validated before anything changes, so a failed call leaves ``model`` as it was.

    Args:
        model: any ``nn.Module``.
        targets: a list of names (a module matches when its qualified name equals an entry or
            ends with ``"." + entry``; each entry must match), a regex string (full match on the
            qualified name) or a callable ``(name, module) -> bool``.
        rank, seed, alpha, dropout, bases, strategy: the :class:`RandLoraConfig` fields (see
            there), or pass ``config=`` instead. ``1 <= rank <= min(in, out)`` of every target.
        path: the old name of ``strategy`` (deprecated).

    Returns:
        ``model``, adapted.
    """
    config = _inject_config(rank, seed, alpha, dropout, bases, strategy, config, path)
    found = _match(model, targets)
    if not found:
        raise ValueError(f"targets {targets!r} selected no module; linear layers: {_short_list(_linear_names(model))}")
    _check_targets(model, found, config)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in found:
        _adapt(model, name, m, config)
    for _, m in named_adapters(model):  # a second inject keeps the first one's adapters trainable
        m.lam.requires_grad_(True)
        m.gam.requires_grad_(True)
    return model


def _inject_config(rank, seed, alpha, dropout, bases, strategy, config, path) -> RandLoraConfig:
    """The config of an :func:`inject` call, from its keywords or ``config=`` (not both)."""
    if path is not None:
        warnings.warn("inject(path=...) is deprecated; use strategy=...", DeprecationWarning, stacklevel=3)
        strategy = _OLD_STRATEGY_NAMES.get(path, path)
    if config is None:
        if rank is None:
            raise TypeError("inject() needs rank=... (or config=RandLoraConfig(...))")
        return RandLoraConfig(rank=rank, seed=seed, alpha=alpha, dropout=dropout, bases=bases, strategy=strategy)
    if not isinstance(config, RandLoraConfig):
        raise TypeError(f"config must be a RandLoraConfig, got {type(config).__name__}")
    if rank is not None and rank != config.rank:
        raise ValueError(f"inject got rank={rank!r} and config.rank={config.rank}; pass one of them")
    return config


def _check_targets(model: nn.Module, found: list[tuple[str, nn.Module]], config: RandLoraConfig) -> None:
    """Refuse targets that cannot be adapted with ``config``, before anything changes."""
    inside = {n + ".base" for n, _ in named_adapters(model)}
    for name, m in found:
        if isinstance(m, RandLoraAdapter) or name in inside or any(name.startswith(p + ".") for p in inside):
            raise ValueError(f"layer {name!r} is already adapted with RandLoRA; eject(model) first to re-adapt it")
        feats = _features(m)
        if feats is None:
            raise TypeError(
                f"target {name!r} is a {type(m).__name__}, not a linear layer (nn.Linear, Conv1D, or a module "
                "with in_features, out_features and forward)"
            )
        if config.rank > min(feats):
            raise ValueError(
                f"rank {config.rank} is larger than min(in, out) = {min(feats)} of layer {name!r} "
                f"(in_features={feats[0]}, out_features={feats[1]})"
            )
    for _, m in named_adapters(model):
        if m.config.shared != config.shared or type(m._bases) is not _Bases:
            raise ValueError(
                f"model already has RandLoRA layers with rank={m.rank}, seed={m.config.seed}, bases={m.config.bases!r}, "
                f"alpha={m.alpha:g}; a second inject must use the same settings (got rank={config.rank}, "
                f"seed={config.seed}, bases={config.bases!r}, alpha={config.alpha:g})"
            )


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def merge(model: nn.Module) -> nn.Module:
    """Add every adapter's ``scaling * ΔW`` into its base weight (idempotent).

    A merged layer computes as its plain base layer (inference at base speed). Its ``lam``/``gam``
    are then unused: a training-mode forward with gradients enabled raises; call :func:`unmerge`
    to keep training.
    """
    layers = [m for _, m in named_adapters(model)]
    for m in layers:
        if not m.mergeable:
            raise TypeError(f"cannot merge: layer {m.name!r} wraps a {type(m.base).__name__}, which has no plain weight")
    for m in layers:
        m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract every merged adapter's update again (idempotent)."""
    for _, m in named_adapters(model):
        m.unmerge()
    return model


def eject(model: nn.Module) -> nn.Module:
    """Merge, then replace each :class:`RandLoraLinear` by its base layer. Returns ``model``."""
    merge(model)
    for name, m in list(named_adapters(model)):
        _replace(model, name, m.base)
    return model


@contextlib.contextmanager
def disable(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside, ``model`` computes as the base model (e.g. the reference model
    of a DPO loss). Merged layers are unmerged for the duration and merged again after."""
    layers = [m for _, m in named_adapters(model)]
    state = [(m.disabled, m.merged) for m in layers]
    for m in layers:
        m.unmerge()
        m.disabled = True
    try:
        yield model
    finally:
        for m, (was_disabled, was_merged) in zip(layers, state):
            m.disabled = was_disabled
            if was_merged:
                m.merge()


def mark_only_adapter_as_trainable(model: nn.Module) -> nn.Module:
    """Freeze every parameter but the adapters' ``lam``/``gam`` (what :func:`inject` leaves)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m in named_adapters(model):
        m.lam.requires_grad_(True)
        m.gam.requires_grad_(True)
    return model


def summary(model: nn.Module) -> str:
    """A table of adapted layers (name, shape, bases, trainable parameters), then the exact
    number of trainable parameters and their share of all parameters."""
    rows = [(n, f"{m.out_features}x{m.in_features}", str(m.n), f"{m.lam.numel() + m.gam.numel():,}") for n, m in named_adapters(model)]
    head = ("layer", "out x in", "bases", "trainable")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines = [fmt(head), *map(fmt, rows)]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    first = next((m for _, m in named_adapters(model)), None)
    if first is not None:
        c = first.config
        origin = f"seed {c.seed}, bases {c.bases}" if type(first._bases) is _Bases else "bases loaded from a PEFT file"
        lines.insert(0, f"RandLoRA: {len(rows)} layers, rank {first.rank}, alpha {first.alpha:g} (scaling {first.scaling:g}), {origin}")
    lines.append(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.4f}%)")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# State dict and checkpoint I/O (safetensors; no pickle anywhere)

FORMAT_NAME = "randlora"
FORMAT_VERSION = "2"  # 2: per-layer dropout and strategy in "layers"
READ_VERSIONS = ("1", "2")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors only: ``{"<layer path>.lam": (r, n), "<layer path>.gam": (n, d)}``."""
    state = {}
    for name, m in named_adapters(model):
        state[f"{name}.lam"] = m.lam.detach()
        state[f"{name}.gam"] = m.gam.detach()
    return state


def _check_state(layers: dict[str, RandLoraLinear], state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Validate ``state`` against ``layers``; return it as float32 CPU tensors."""
    expected = {f"{n}.{p}": m for n, m in layers.items() for p in ("lam", "gam")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} does not fit the model: missing keys {_short_list(missing, 10)}; unexpected keys {_short_list(unexpected, 10)}")
    out = {}
    for key, m in expected.items():
        t = state[key]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{source}: {key} must be a floating-point tensor, got {type(t).__name__} {getattr(t, 'dtype', '')}")
        shape = (m.rank, m.n) if key.endswith(".lam") else (m.n, m.d)
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{source}: {key} has shape {tuple(t.shape)}, expected {shape} for layer {m.name!r} "
                f"(in={m.in_features}, out={m.out_features}, rank={m.rank})"
            )
        t = t.detach().to("cpu", torch.float32)
        if not torch.isfinite(t).all():
            raise ValueError(f"{source}: {key} contains NaN or Inf values")
        out[key] = t
    return out


def load_adapter_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy ``lam``/``gam`` from ``state`` (as from :func:`adapter_state_dict`) into ``model``.

    Keys and shapes must match the adapted layers exactly and values must be finite; otherwise
    ``ValueError`` and the model keeps its parameters.
    """
    layers = dict(named_adapters(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no RandLoRA layers; inject() first or use load_adapter()")
    checked = _check_state(layers, state, "adapter state")
    if any(m.merged for m in layers.values()):
        raise RuntimeError("unmerge(model) before loading new adapter values into a merged model")
    with torch.no_grad():
        for name, m in layers.items():
            m.lam.copy_(checked[f"{name}.lam"])
            m.gam.copy_(checked[f"{name}.gam"])
    return model


def _gather(t: torch.Tensor) -> torch.Tensor:
    """A parameter's full value as a float32 CPU tensor, for writing to a file.

    FSDP2 shards parameters as DTensors: every rank must call this collective."""
    t = t.detach()
    full_tensor = getattr(t, "full_tensor", None)
    t = full_tensor() if callable(full_tensor) else t
    return t.to("cpu", torch.float32).contiguous()


def _is_writer() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _file_config(layers: dict[str, RandLoraAdapter]) -> RandLoraConfig:
    """The settings all ``layers`` share (one adapter per file), checked."""
    first = next(iter(layers.values())).config
    for name, m in layers.items():
        if m.config.shared != first.shared:
            raise ValueError(f"layer {name!r} has (rank, alpha, seed, bases) {m.config.shared} unlike the others {first.shared}; one adapter per file")
        if type(m._bases) is not _Bases:
            raise ValueError(f"layer {name!r} uses bases loaded from a PEFT file (not seeded); save it with to_peft() instead")
    return first


def _layers_metadata(layers: dict[str, RandLoraAdapter]) -> str:
    """Per layer: ``[out, in, dropout, strategy]`` (what may differ between layers)."""
    return json.dumps({n: [m.out_features, m.in_features, m.config.dropout, m.config.strategy] for n, m in layers.items()})


def _parse_layers(meta: Mapping[str, str], shared: RandLoraConfig, path: str) -> dict[str, tuple[int, int, RandLoraConfig]]:
    """``{name: (out, in, config)}`` from the ``layers`` metadata (format 1: ``[out, in]`` and one
    file-wide ``dropout``)."""
    try:
        raw = json.loads(meta["layers"])
        if not isinstance(raw, dict):
            raise TypeError(f"layers is a {type(raw).__name__}, not an object")
        default = float(meta.get("dropout", 0.0))
        out = {}
        for name, entry in raw.items():
            if not isinstance(entry, list) or len(entry) not in (2, 4):
                raise ValueError(f"layer {_short_repr(name)} has {_short_repr(entry)}, expected [out, in, dropout, strategy]")
            out_f, in_f, dropout, strategy = (entry + [default, "auto"])[:4]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (out_f, in_f)):
                raise ValueError(f"layer {_short_repr(name)} has shape {_short_repr(entry[:2])}")
            out[name] = (out_f, in_f, shared.replace(dropout=dropout, strategy=strategy))
        return out
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: malformed randlora layers metadata ({type(e).__name__}: {_short_repr(str(e), 200)})") from None


def _temp_file(folder: str) -> str:
    """A new empty file in ``folder``: same filesystem, so ``os.replace`` onto the target is atomic."""
    fd, tmp = tempfile.mkstemp(prefix=".randlora-", suffix=".tmp", dir=folder)
    os.close(fd)
    return tmp


def _publish(tmp: str, path: str) -> None:
    """Give ``tmp`` the permissions a plain ``open()`` would (mkstemp makes it owner-only) and
    rename it over ``path``."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapter to a safetensors file, atomically.

    The file holds ``lam``/``gam`` per layer (float32) and, in its metadata, everything needed to
    rebuild the adapter: format version, rank, alpha, seed, bases kind, dropout and the adapted
    layers with their ``(out, in)`` shapes. Bases are not stored: they are regenerated from the
    seed. The file is written to a temporary file in the same folder and renamed over ``path``,
    so a crash never leaves a broken file where a good one was. Under torch.distributed every
    rank must call this (FSDP2 shards are gathered); only rank 0 writes.
    """
    from safetensors.torch import save_file

    layers = dict(named_adapters(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no RandLoRA layers to save")
    config = _file_config(layers)
    tensors = {}
    for name, m in layers.items():
        tensors[f"{name}.lam"] = _gather(m.lam)
        tensors[f"{name}.gam"] = _gather(m.gam)
    if not _is_writer():
        return
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "randlora_version": __version__,
        **config.to_metadata(),
        "layers": _layers_metadata(layers),
    }
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = _temp_file(folder)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _read_adapter(path: str | os.PathLike) -> tuple[RandLoraConfig, dict[str, tuple[int, int, RandLoraConfig]], dict[str, torch.Tensor]]:
    """Parse and validate a randlora file: (shared config, ``{layer: (out, in, config)}``, tensors)."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, ValueError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a randlora adapter (metadata format={meta.get('format')!r})")
    if meta.get("format_version") not in READ_VERSIONS:
        raise ValueError(
            f"{path} has format_version {_short_repr(meta.get('format_version'))}; this randlora reads {READ_VERSIONS}"
        )
    shared = RandLoraConfig.from_metadata(meta, path)
    return shared, _parse_layers(meta, shared, path), tensors


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter written by :func:`save_adapter`.

    Into a plain model, it injects exactly the recorded layers with the recorded settings; into an
    already adapted model, it checks that rank, seed, bases kind, alpha and layers agree. Any
    mismatch (settings, missing or unexpected layers, shapes, NaN/Inf, a corrupt file) raises
    ``ValueError`` and leaves the model as it was. Returns ``model``.
    """
    shared, recorded, tensors = _read_adapter(path)
    layers = dict(named_adapters(model))
    if layers:
        have = _file_config(layers)
        for field, ours, theirs in zip(("rank", "alpha", "seed", "bases"), have.shared, shared.shared):
            if ours != theirs:
                raise ValueError(f"{path}: adapter has {field}={theirs!r} but the model's RandLoRA layers have {field}={ours!r}")
        if set(layers) != set(recorded):
            raise ValueError(
                f"{path}: adapter layers differ from the model's: missing in file {_short_list(sorted(set(layers) - set(recorded)), 10)}; "
                f"not in model {_short_list(sorted(set(recorded) - set(layers)), 10)}"
            )
    modules = dict(model.named_modules())
    for name, (out_f, in_f, _) in recorded.items():
        m = layers.get(name, modules.get(name))
        if m is None:
            raise ValueError(f"{path}: adapter layer {_short_repr(name)} is not in the model; its linear layers: {_short_list(_linear_names(model))}")
        feats = (m.in_features, m.out_features) if isinstance(m, RandLoraAdapter) else _features(m)
        if feats is None:
            raise ValueError(f"{path}: adapter layer {name!r} is a {type(m).__name__} in the model, not a linear layer")
        if feats != (in_f, out_f):
            raise ValueError(f"{path}: layer {name!r} is (out, in) = {(out_f, in_f)} in the adapter but {feats[::-1]} in the model")
    if not layers:
        # Validate the tensors against a dry run of the layers' shapes before touching the model.
        probe = {n: _ShapeProbe(shared.rank, out_f, in_f, n) for n, (out_f, in_f, _) in recorded.items()}
        _check_state(probe, tensors, str(path))
        _check_targets(model, [(n, modules[n]) for n in recorded], shared)
        for p in model.parameters():
            p.requires_grad_(False)
        for name, (_, _, config) in recorded.items():
            _replace(model, name, RandLoraLinear(modules[name], config, name))
    load_adapter_state_dict(model, tensors)
    for name, (_, _, config) in recorded.items():  # dropout and strategy as saved: resume is bit-exact
        layers.get(name, model.get_submodule(name)).set_config(config)
    return model


class _ShapeProbe:
    """Just the shape attributes of a would-be RandLoraLinear, for validation."""

    def __init__(self, rank: int, out_f: int, in_f: int, name: str) -> None:
        self.rank, self.in_features, self.out_features, self.name = rank, in_f, out_f, name
        self.d = min(in_f, out_f)
        self.n = _num_bases(self.d, rank)


# -----------------------------------------------------------------------------
# ---- PEFT interoperability
#
# Hugging Face PEFT stores a RandLoRA adapter as a folder: ``adapter_config.json`` (a
# ``RandLoraConfig``) and ``adapter_model.safetensors`` with, per adapted layer,
# ``base_model.model.<path>.randlora_lambda`` ``(r, n)`` and ``.randlora_gamma`` ``(n, d)``
# (the same tensors as our ``lam``/``gam``) and, when ``save_projection`` is true, the shared
# bases ``randlora_A`` ``(r, 1, d_max)`` and ``randlora_B`` ``(D_max, n_max, r)``, once per
# layer and once more at ``base_model.``. PEFT sizes the shared bases from the element-wise
# maximum of ``(out, in)`` over all targets and every layer slices ``A[:, :, :d]``,
# ``B[:D, :n]``. Neither direction imports peft or transformers.

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_LAYER_PREFIX = "base_model.model."
_PEFT_SHARED_PREFIX = "base_model."
_PEFT_SUFFIXES = ("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B")

# Config fields this loader does not implement: refused unless null / empty / "none".
_PEFT_REFUSED_FIELDS = {
    "layers_to_transform": "adapting only some layer indices",
    "layers_pattern": "adapting only some layer indices",
    "modules_to_save": "extra fully trained modules",
    "rank_pattern": "per-layer ranks",
    "alpha_pattern": "per-layer alphas",
    "exclude_modules": "excluded modules",
    "target_parameters": "adapting parameters instead of modules",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer replication",
}



class _StoredBases(_Bases):
    """Bases given as tensors (read from a PEFT file, or regenerated as PEFT draws them) instead of
    a seed: ``A`` ``(r, d_max)``, ``B`` ``(D_max, n_max, r)``. ``peft`` holds the PEFT config flags
    they came with (``sparse``, ``very_sparse``, ``projection_prng_key``), written back by
    :func:`to_peft`."""

    def __init__(self, rank: int, A: torch.Tensor, B: torch.Tensor, peft: dict | None = None) -> None:
        super().__init__(rank, seed=0, kind="dense")
        self.A, self.B = (t.detach().to("cpu", torch.float32).contiguous() for t in (A, B))
        self.peft = dict(peft or {})

    @property
    def compact(self) -> bool:
        return False

    def _generate(self, D: int, d: int, s: float | None) -> tuple[torch.Tensor, torch.Tensor, None]:
        if self.A.shape[1] < d or self.B.shape[0] < D or self.B.shape[1] < _num_bases(d, self.rank):
            raise ValueError(
                f"the adapter's stored bases A {tuple(self.A.shape)} and B {tuple(self.B.shape)} are too small "
                f"for a layer with D={D}, d={d} at rank {self.rank}"
            )
        return self.A, self.B, None


def _peft_draw_dtype() -> torch.dtype:
    """The dtype PEFT draws dense bases in on this machine: what ``accelerate``'s
    ``is_bf16_available()`` answers (bfloat16, else float16), asked without importing it."""
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return torch.bfloat16 if xpu.is_bf16_supported() else torch.float16
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        newer = getattr(mps, "is_macos_or_newer", None)
        return torch.bfloat16 if newer is None or newer(14, 0) else torch.float16
    return torch.bfloat16


def _peft_regenerate(kind: str, rank: int, key: int, O: int, I: int, draw_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's bases for ``save_projection=False``: ``A`` ``(r, d_max)``, ``B`` ``(D_max, n_max, r)``.

    The same draws, in the same order and dtype, as ``RandLoraModel._init_randlora_A_randlora_B``
    (dense) and ``_init_randlora_A_randlora_B_sparse`` (sparse kinds) of PEFT 0.21, from a CPU
    generator seeded with ``projection_prng_key``; ``(O, I)`` is the element-wise maximum of the
    targets' ``(out, in)``.
    """
    D_max, d_max = max(O, I), min(O, I)
    n_max = _num_bases(d_max, rank)
    g = torch.Generator(device="cpu").manual_seed(key)
    with torch.no_grad():
        if kind == "dense":

            def draw(shape: tuple[int, ...]) -> torch.Tensor:
                return nn.init.kaiming_uniform_(torch.empty(shape, dtype=draw_dtype), a=math.sqrt(5), generator=g)

            A = draw((rank, 1, d_max))
            B = torch.cat([draw((D_max, 1, rank)) for _ in range(n_max)], dim=1)
        else:
            sparsity = math.sqrt(d_max) if kind == "very_sparse" else 3
            uA = torch.rand((rank, 1, d_max), generator=g)
            uB = torch.rand((D_max, n_max, rank), generator=g)

            def ternary(u: torch.Tensor) -> torch.Tensor:
                t = torch.zeros(u.shape)
                t[u < 1 / (2 * sparsity)] = -1
                t[u > 1 - 1 / (2 * sparsity)] = 1
                return t

            A, B = ternary(uA), ternary(uB)
        A, B = A / A.std(), B / B.std()  # in the draw dtype, as PEFT does
    return A[:, 0].float().contiguous(), B.float().contiguous()


def _peft_config(folder: str) -> dict[str, object]:
    """Read and validate ``adapter_config.json``; return the settings from_peft uses."""
    file = os.path.join(folder, PEFT_CONFIG_NAME)
    raw = _peft_json(file)
    for name, what in _PEFT_REFUSED_FIELDS.items():
        value = raw.get(name)
        if value not in (None, [], {}, "", ()):
            raise ValueError(f"{file}: {name}={_short_repr(value)} ({what}) is not supported by from_peft")
    if raw.get("bias", "none") != "none":
        raise ValueError(f"{file}: bias={_short_repr(raw['bias'])} is not supported by from_peft (only 'none': biases are not trained)")
    rank = _peft_field(raw, file, "r", 32, (int,))
    alpha = _peft_field(raw, file, "randlora_alpha", 640, (int, float))
    dropout = _peft_field(raw, file, "randlora_dropout", 0.0, (int, float))
    key = _peft_field(raw, file, "projection_prng_key", 0, (int,))
    try:
        RandLoraConfig(rank=rank, alpha=alpha, dropout=dropout)
    except ValueError as e:
        raise ValueError(f"{file}: {e} (from r / randlora_alpha / randlora_dropout)") from None
    try:
        torch.Generator(device="cpu").manual_seed(key)
    except (RuntimeError, OverflowError, ValueError) as e:
        raise ValueError(f"{file}: projection_prng_key={key} is not a valid torch seed: {e}") from None
    save_projection = _peft_field(raw, file, "save_projection", True, (bool,))
    very_sparse, sparse = (_peft_field(raw, file, f, False, (bool,)) for f in ("very_sparse", "sparse"))
    _peft_field(raw, file, "fan_in_fan_out", False, (bool,))  # PEFT follows each layer's type whatever this says
    return {
        "rank": rank,
        "alpha": float(alpha),
        "dropout": float(dropout),
        "key": key,
        "save_projection": save_projection,
        "kind": "very_sparse" if very_sparse else "sparse" if sparse else "dense",
        "targets": _peft_target_modules(raw.get("target_modules"), file),
    }


def _peft_json(file: str) -> dict:
    """The one JSON object in ``file``."""
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{file} is not UTF-8 text: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file} must hold one JSON object (one adapter), got {type(raw).__name__}")
    if raw.get("peft_type") != "RANDLORA":
        raise ValueError(f"{file}: peft_type is {_short_repr(raw.get('peft_type'))}; from_peft reads only RandLoRA adapters (peft_type 'RANDLORA')")
    return raw


def _peft_field(raw: dict, file: str, name: str, default: object, kinds: tuple[type, ...]) -> object:
    """``raw[name]`` (or ``default``), which must be of one of ``kinds`` (a bool is not a number)."""
    v = raw.get(name, default)
    if (isinstance(v, bool) and bool not in kinds) or not isinstance(v, kinds):
        expected = "true or false" if kinds == (bool,) else " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"{file}: {name} must be {expected}, got {_short_repr(v)}")
    return v


def _peft_target_modules(targets: object, file: str) -> str | list[str]:
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            raise ValueError(f"{file}: target_modules='all-linear' is not supported by from_peft; list the module names")
        try:
            re.compile(targets)
        except re.error as e:
            raise ValueError(f"{file}: target_modules {_short_repr(targets)} is not a valid regular expression: {e}") from None
        return targets
    if isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets):
        return list(targets)
    raise ValueError(f"{file}: target_modules must be a non-empty list of names or a regex string, got {_short_repr(targets)}")


def _peft_match(model: nn.Module, targets: str | list[str]) -> list[tuple[str, nn.Module]]:
    """Modules PEFT would adapt: a list entry matches a name equal to it or ending in
    ``"." + entry``; a string must match the whole name (``re.fullmatch``)."""
    if isinstance(targets, str):
        pattern = re.compile(targets)
        hit = lambda n: pattern.fullmatch(n) is not None
    else:
        hit = lambda n: any(_name_matches(n, e) for e in targets)
    return [(n, m) for n, m in model.named_modules() if n and hit(n)]


def _peft_folder(path: str | os.PathLike) -> str:
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            raise ValueError(f"{folder} is a file; from_peft expects the folder written by PEFT's save_pretrained")
        raise FileNotFoundError(f"no PEFT adapter folder at {folder}")
    if not os.path.isfile(os.path.join(folder, PEFT_CONFIG_NAME)):
        subs = sorted(
            e.name for e in os.scandir(folder) if e.is_dir() and os.path.isfile(os.path.join(e.path, PEFT_CONFIG_NAME))
        )
        if subs:
            raise ValueError(
                f"{folder} holds several PEFT adapters in subfolders ({_short_list(subs, 10)}) and none at its top; "
                "pass the subfolder of the one adapter to load"
            )
        raise ValueError(f"{folder} has no {PEFT_CONFIG_NAME}: not a PEFT adapter folder")
    if not os.path.isfile(os.path.join(folder, PEFT_WEIGHTS_NAME)):
        other = [f for f in ("adapter_model.bin", "adapter_model.pt") if os.path.isfile(os.path.join(folder, f))]
        hint = f" (found {other[0]}: pickle files are not read; re-save with safe_serialization=True)" if other else ""
        raise ValueError(f"{folder} has no {PEFT_WEIGHTS_NAME}{hint}")
    return folder


def from_peft(model: nn.Module, path: str | os.PathLike, *, draw_dtype: torch.dtype | None = None) -> nn.Module:
    """Load a Hugging Face PEFT RandLoRA adapter into the plain ``model``, in place.

    ``path`` is the folder written by PEFT's ``save_pretrained`` (``adapter_config.json`` and
    ``adapter_model.safetensors``); ``model`` has the module names of the model that was given to
    ``get_peft_model`` (a transformers model, or any ``nn.Module`` built the same way). The
    targets are found with PEFT's ``target_modules`` rules, wrapped in :class:`RandLoraLinear`
    (``nn.Linear``, transformers' ``Conv1D`` - ``fan_in_fan_out`` - or linear-like layers) with
    ``r``, ``randlora_alpha`` and ``randlora_dropout``, and given the file's ``randlora_lambda`` /
    ``randlora_gamma`` as ``lam`` / ``gam``. Outputs equal ``PeftModel.from_pretrained(model,
    path)``. The result is a normal randlora model (train, merge, eject); every other parameter is
    frozen. Save it back with :func:`to_peft` (:func:`save_adapter` refuses its explicit bases).

    Bases: with ``save_projection`` true (PEFT's default) the stored ``randlora_A`` / ``randlora_B``
    are used, so the adapter loads identically on any machine. With ``save_projection`` false they
    are regenerated from ``projection_prng_key`` exactly as PEFT 0.21 does: ``sparse`` /
    ``very_sparse`` bases from float32 ``torch.rand`` draws, dense bases from Kaiming-uniform draws
    in bfloat16 where ``accelerate.is_bf16_available()`` is true (any CPU-only machine, CUDA GPUs
    that support bf16) and float16 otherwise. The file does not record which dtype the training
    machine drew in, so such an adapter can only be reproduced where PEFT would pick the same
    dtype (and with the same PyTorch random number generators); pass ``draw_dtype``
    (``torch.bfloat16`` or ``torch.float16``) to choose it explicitly.

    Refused with ``ValueError`` (the model is left exactly as it was; everything is checked
    before anything changes): another ``peft_type``; ``layers_to_transform``, ``layers_pattern``,
    ``modules_to_save``, ``rank_pattern``, ``alpha_pattern``, ``exclude_modules``,
    ``target_parameters``; ``bias`` other than ``"none"``; ``target_modules="all-linear"``; a
    folder with several adapters in subfolders and none at the top; a model that already has
    RandLoRA layers; targets that match nothing, are not linear layers or differ from the file's
    layers; missing or unexpected keys; wrong shapes; non-float, NaN or Inf values; several
    stored copies of the bases that disagree. A missing folder raises ``FileNotFoundError``.

    Returns:
        ``model``, adapted.
    """
    folder = _peft_folder(path)
    cfg = _peft_config(folder)
    if draw_dtype is not None and draw_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"draw_dtype must be torch.bfloat16, torch.float16 or None, got {draw_dtype!r}")
    if any(True for _ in named_adapters(model)):
        raise ValueError(f"{type(model).__name__} already has RandLoRA layers; from_peft adapts a plain model (eject() first)")
    targets = _peft_targets(model, cfg, folder)
    weights = os.path.join(folder, PEFT_WEIGHTS_NAME)
    by_layer, shared = _peft_keys(model, weights, targets, cfg)
    params, A, B = _peft_values(weights, targets, by_layer, shared, cfg)
    if A is None:
        O, I = _peft_max_shape(targets)
        A, B = _peft_regenerate(cfg["kind"], cfg["rank"], cfg["key"], O, I, draw_dtype or _peft_draw_dtype())
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(f"{folder}: PEFT's regenerated {cfg['kind']} bases are degenerate (NaN/Inf) for r={cfg['rank']}, shape {(O, I)}")
    _peft_build(model, targets, params, A, B, cfg)
    return model


# -- read and validate


def _peft_targets(model: nn.Module, cfg: dict, folder: str) -> dict[str, tuple[nn.Module, tuple[int, int]]]:
    """``{name: (module, (in, out))}`` of the modules PEFT's ``target_modules`` rules select."""
    found = _peft_match(model, cfg["targets"])
    if not found:
        raise ValueError(
            f"{folder}: target_modules {cfg['targets']!r} matches no module of {type(model).__name__}; "
            f"its linear layers: {_short_list(_linear_names(model))}"
        )
    targets: dict[str, tuple[nn.Module, tuple[int, int]]] = {}
    for name, m in found:
        f = _features(m)
        if f is None:
            raise ValueError(f"{folder}: target {name!r} is a {type(m).__name__}, not a linear layer (nn.Linear, Conv1D or linear-like)")
        if any(name.startswith(other + ".") for other in targets):
            raise ValueError(f"{folder}: targets {name!r} and its parent are both matched by target_modules")
        targets[name] = (m, f)
    return targets


def _peft_max_shape(targets: dict[str, tuple[nn.Module, tuple[int, int]]]) -> tuple[int, int]:
    """``(O, I)``: the element-wise maximum of the targets' ``(out, in)``, which sizes PEFT's bases."""
    return max(f[1] for _, f in targets.values()), max(f[0] for _, f in targets.values())


def _peft_keys(model: nn.Module, weights: str, targets: dict, cfg: dict) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """The file's keys sorted into per-layer ``{layer: {suffix: key}}`` and shared-bases keys;
    any missing or unexpected key is refused."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(weights, framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, ValueError, OSError) as e:
        raise ValueError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    by_layer: dict[str, dict[str, str]] = {}
    shared: dict[str, str] = {}
    unexpected = []
    for k in keys:
        stem, _, suffix = k.rpartition(".")
        if suffix in ("randlora_A", "randlora_B") and stem == "base_model":
            shared[suffix] = k
        elif suffix in _PEFT_SUFFIXES and stem.startswith(_PEFT_LAYER_PREFIX) and stem[len(_PEFT_LAYER_PREFIX) :] in targets:
            by_layer.setdefault(stem[len(_PEFT_LAYER_PREFIX) :], {})[suffix] = k
        else:
            unexpected.append(k)
    missing = [f"{_PEFT_LAYER_PREFIX}{n}.{s}" for n in targets for s in ("randlora_lambda", "randlora_gamma") if s not in by_layer.get(n, {})]
    more_missing, more_unexpected = _peft_bases_keys(targets, by_layer, shared, cfg["save_projection"])
    missing, unexpected = missing + more_missing, unexpected + more_unexpected
    if missing or unexpected:
        stray = [k for k in unexpected if k.startswith(_PEFT_LAYER_PREFIX) and k.rpartition(".")[2] in _PEFT_SUFFIXES]
        hint = ""
        if stray:
            hint = (
                f"; the file adapts layers that target_modules does not select in {type(model).__name__} "
                f"(wrong model?), its linear layers: {_short_list(_linear_names(model), 10)}"
            )
        raise ValueError(
            f"{weights} does not fit the model: missing keys {_short_list(sorted(missing), 10)}; "
            f"unexpected keys {_short_list(sorted(unexpected), 10)}{hint}"
        )
    return by_layer, shared


def _peft_bases_keys(targets: dict, by_layer: dict, shared: dict, save_projection: bool) -> tuple[list[str], list[str]]:
    """Missing and unexpected bases keys: with ``save_projection`` the bases are stored at
    ``base_model.`` and/or per layer (all layers or none); without it, nowhere."""
    missing: list[str] = []
    if not save_projection:
        unexpected = sorted(shared.values())
        unexpected += sorted(k for n in by_layer for s, k in by_layer[n].items() if s in ("randlora_A", "randlora_B"))
        return missing, unexpected
    layer_copies = [n for n in targets if by_layer.get(n, {}).keys() & {"randlora_A", "randlora_B"}]
    for n in layer_copies:
        missing += [f"{_PEFT_LAYER_PREFIX}{n}.{s}" for s in ("randlora_A", "randlora_B") if s not in by_layer[n]]
    if layer_copies and len(layer_copies) != len(targets):
        missing += [f"{_PEFT_LAYER_PREFIX}{n}.randlora_A/B" for n in targets if n not in layer_copies]
    if len(shared) == 1:
        missing.append(f"{_PEFT_SHARED_PREFIX}{({'randlora_A', 'randlora_B'} - set(shared)).pop()}")
    if not layer_copies and not shared:
        missing.append("randlora_A and randlora_B (the config says save_projection=true)")
    return missing, []


def _peft_tensor(f, weights: str, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """One checked tensor from an open PEFT file, as float32."""
    t = f.get_tensor(key)
    if not t.is_floating_point():
        raise ValueError(f"{weights}: {key} must be a floating-point tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{weights}: {key} has shape {tuple(t.shape)}, expected {shape}")
    t = t.to(torch.float32)
    if not torch.isfinite(t).all():
        raise ValueError(f"{weights}: {key} contains NaN or Inf values")
    return t


def _peft_values(weights: str, targets: dict, by_layer: dict, shared: dict, cfg: dict):
    """``({layer: (lam, gam)}, A (r, d_max) or None, B (D_max, n_max, r) or None)``, checked; the
    stored copies of the bases must all agree."""
    from safetensors import safe_open

    rank = cfg["rank"]
    O, I = _peft_max_shape(targets)
    D_max, d_max = max(O, I), min(O, I)
    n_max = _num_bases(d_max, rank)
    params: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    A = B = None
    with safe_open(weights, framework="pt") as f:
        for name, (_, (i, o)) in targets.items():
            d = min(i, o)
            n = _num_bases(d, rank)
            lam = _peft_tensor(f, weights, by_layer[name]["randlora_lambda"], (rank, n))
            params[name] = (lam, _peft_tensor(f, weights, by_layer[name]["randlora_gamma"], (n, d)))
        if not cfg["save_projection"]:
            return params, None, None
        sources = ([shared] if shared else []) + [by_layer[n] for n in targets if "randlora_A" in by_layer[n]]
        for src in sources:
            a = _peft_tensor(f, weights, src["randlora_A"], (rank, 1, d_max))
            b = _peft_tensor(f, weights, src["randlora_B"], (D_max, n_max, rank))
            if A is None:
                A, B = a, b
            elif not (torch.equal(a, A) and torch.equal(b, B)):
                raise ValueError(
                    f"{weights}: the stored copies of the shared bases differ ({src['randlora_A']} / "
                    f"{src['randlora_B']} vs the first copy); the file is inconsistent"
                )
    return params, A[:, 0], B


# -- build


def _peft_build(model: nn.Module, targets: dict, params: dict, A: torch.Tensor, B: torch.Tensor, cfg: dict) -> None:
    """Everything is valid: wrap the targets with the file's bases and values."""
    kind = cfg["kind"]
    bases = _StoredBases(cfg["rank"], A, B, {"sparse": kind == "sparse", "very_sparse": kind == "very_sparse", "projection_prng_key": cfg["key"]})
    config = RandLoraConfig(rank=cfg["rank"], alpha=cfg["alpha"], dropout=cfg["dropout"])
    layers = {n: RandLoraLinear(m, config, n, bases=bases) for n, (m, _) in targets.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in layers.items():
        with torch.no_grad():
            layer.lam.copy_(params[name][0])
            layer.gam.copy_(params[name][1])
        _replace(model, name, layer)


def _write_safetensors(path: str, items: list[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> None:
    """Write ``items`` (float32 CPU tensors; one tensor may appear under several names) as a
    safetensors file, streaming each tensor's bytes so repeated tensors are never copied."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for key, t in items:
        if t.dtype != torch.float32:
            raise TypeError(f"{key}: expected float32, got {t.dtype}")
        size = t.numel() * 4
        header[key] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for _, t in items:
            f.write(t.contiguous().view(torch.uint8).numpy().data if t.numel() else b"")
        f.flush()
        os.fsync(f.fileno())


def to_peft(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s adapter as a Hugging Face PEFT RandLoRA adapter folder.

    ``path`` gets ``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's
    ``save_projection=True`` layout: ``lam`` / ``gam`` as ``randlora_lambda`` / ``randlora_gamma``
    and the shared bases ``randlora_A`` ``(r, 1, d_max)`` / ``randlora_B`` ``(D_max, n_max, r)``
    (float32; sized from the element-wise maximum of the targets' ``(out, in)``, as PEFT sizes
    them, and stored per layer and once at ``base_model.`` like PEFT does), so
    ``PeftModel.from_pretrained(base, path)`` loads it on any machine and gives the same outputs.
    ``target_modules`` is a regex of the exact adapted names; ``fan_in_fan_out`` is set when the
    layers are transformers ``Conv1D``. Each file is written to a temporary file in ``path`` and
    renamed into place. Under torch.distributed every rank must call this; rank 0 writes.

    The bases make this folder as large as PEFT's own checkpoint: hundreds of times larger than
    :func:`save_adapter`'s file, which regenerates the bases from the seed (about 10 GB against
    43 MB for a 1B LLaMA-shaped model at r=32, see ``benchmarks/adapter_size.py``). The tensors are
    streamed to disk, so the repeated bases take no extra memory.

    Raises ``ValueError`` if the model has no RandLoRA layers, if its layers do not share one rank,
    alpha, dropout and set of bases, if a layer is not ``nn.Linear`` / ``Conv1D`` (PEFT wraps only
    those), or for ``very_sparse`` seeded bases on layers of different ``min(in, out)`` (ours use
    each layer's own sparsity; PEFT's one shared pair cannot express that).
    """
    layers = dict(named_adapters(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no RandLoRA layers to save")
    first = _peft_check_layers(layers)
    A, B, origin = _peft_bases(layers)
    items: list[tuple[str, torch.Tensor]] = []
    for name, m in layers.items():
        items.append((f"{_PEFT_LAYER_PREFIX}{name}.randlora_lambda", _gather(m.lam)))
        items.append((f"{_PEFT_LAYER_PREFIX}{name}.randlora_gamma", _gather(m.gam)))
    if not _is_writer():
        return
    for name in layers:
        items += [(f"{_PEFT_LAYER_PREFIX}{name}.randlora_A", A), (f"{_PEFT_LAYER_PREFIX}{name}.randlora_B", B)]
    items += [(f"{_PEFT_SHARED_PREFIX}randlora_A", A), (f"{_PEFT_SHARED_PREFIX}randlora_B", B)]
    config = _peft_config_json(first, layers, origin)
    _peft_write(os.fspath(path), items, config)


def _peft_config_json(first: RandLoraAdapter, layers: dict[str, RandLoraAdapter], origin: dict) -> dict[str, object]:
    """``adapter_config.json`` for ``layers``: PEFT's RandLoRA config, ``save_projection`` true and
    ``target_modules`` a regex of the exact adapted names."""
    alpha = first.alpha
    return {
        "auto_mapping": None,
        "base_model_name_or_path": None,
        "bias": "none",
        "fan_in_fan_out": any(getattr(m, "layout", None) == "conv1d" for m in layers.values()),
        "inference_mode": True,
        "init_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "modules_to_save": None,
        "peft_type": "RANDLORA",
        "projection_prng_key": origin.get("projection_prng_key", 0),
        "r": first.rank,
        "randlora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "randlora_dropout": first.dropout_p,
        "revision": None,
        "save_projection": True,
        "sparse": origin.get("sparse", False),
        "very_sparse": origin.get("very_sparse", False),
        "target_modules": "(?:" + "|".join(re.escape(n) for n in layers) + ")",
        "task_type": None,
    }


def _peft_check_layers(layers: dict[str, RandLoraAdapter]) -> RandLoraAdapter:
    """Refuse what one PEFT adapter cannot hold; return the first layer."""
    first = next(iter(layers.values()))
    bases = first._bases
    for name, m in layers.items():
        if (m.rank, m.alpha, m.dropout_p) != (first.rank, first.alpha, first.dropout_p):
            raise ValueError(
                f"layer {name!r} has rank/alpha/dropout {(m.rank, m.alpha, m.dropout_p)} unlike {first.name!r} "
                f"{(first.rank, first.alpha, first.dropout_p)}; a PEFT adapter has one of each"
            )
        same = m._bases is bases or (
            type(bases) is _Bases and type(m._bases) is _Bases and (m._bases.seed, m._bases.kind) == (bases.seed, bases.kind)
        )
        if not same:
            raise ValueError(f"layer {name!r} uses other random bases than {first.name!r}; a PEFT adapter shares one pair")
        if m.layout == "opaque":
            raise ValueError(f"layer {name!r} wraps a {type(m.base).__name__}; PEFT's RandLoRA adapts only nn.Linear and Conv1D")
    return first


def _peft_bases(layers: dict[str, RandLoraAdapter]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The shared bases as PEFT stores them, ``A`` ``(r, 1, d_max)`` and ``B`` ``(D_max, n_max, r)``
    float32, sized from the element-wise maximum of the layers' ``(out, in)``, and the PEFT flags."""
    first = next(iter(layers.values()))
    bases, rank = first._bases, first.rank
    O = max(m.out_features for m in layers.values())
    I = max(m.in_features for m in layers.values())
    D_max, d_max = max(O, I), min(O, I)
    n_max = _num_bases(d_max, rank)
    if isinstance(bases, _StoredBases):
        A, B, _ = bases._generate(D_max, d_max, None)
        origin = bases.peft
    else:
        s = None
        if bases.kind == "very_sparse":
            ds = sorted({m.d for m in layers.values()})
            if len(ds) > 1:
                raise ValueError(
                    f"very_sparse bases use each layer's own sparsity sqrt(min(in, out)), and the layers have "
                    f"min(in, out) in {ds}; PEFT shares one pair of bases with one sparsity, so this adapter "
                    "cannot be written in PEFT's format"
                )
            s = _sparsity("very_sparse", ds[0])
        A, B, scale = bases._generate(D_max, d_max, s)
        A, B = _materialize(A, torch.float32, scale), _materialize(B, torch.float32, scale)
        origin = {"sparse": bases.kind == "sparse", "very_sparse": bases.kind == "very_sparse", "projection_prng_key": 0}
    A = A[:, :d_max].detach().to("cpu", torch.float32).reshape(rank, 1, d_max).contiguous()
    return A, B[:D_max, :n_max].detach().to("cpu", torch.float32).contiguous(), origin


def _peft_write(folder: str, items: list[tuple[str, torch.Tensor]], config: dict) -> None:
    """Write the weights and the config, each through a temporary file renamed into place."""
    os.makedirs(folder, exist_ok=True)
    written = []
    try:
        tmp = _temp_file(folder)
        written.append(tmp)
        _write_safetensors(tmp, items, {"format": "pt"})
        tmp_cfg = _temp_file(folder)
        written.append(tmp_cfg)
        with open(tmp_cfg, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, os.path.join(folder, PEFT_WEIGHTS_NAME))
        _publish(tmp_cfg, os.path.join(folder, PEFT_CONFIG_NAME))
    except BaseException:
        for t in written:
            with contextlib.suppress(OSError):
                os.remove(t)
        raise
