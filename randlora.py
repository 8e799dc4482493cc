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
autograd functions -> layers -> model verbs -> state dict and checkpoint I/O -> Trainer checkpoints
-> PEFT interop.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import time
import warnings
import weakref
from typing import BinaryIO, Callable, Iterable, Iterator, Mapping, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch.autograd.function import once_differentiable

__version__ = "0.2.0"

__all__ = [
    "RandLoraConfig",
    "RandLoraLinear",
    "RandLoraWeight",
    "inject",
    "named_adapters",
    "merge",
    "unmerge",
    "eject",
    "disable",
    "hold_weights",
    "mark_only_adapter_as_trainable",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "save_adapter",
    "load_adapter",
    "summary",
    "SavedModule",
    "trainer_callback",
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


# Sparse bases that keep ΔW full rank (docs/MATH.md#sparse-bases). With i.i.d. ternary bases a
# column of A that happens to be all zero zeroes a column of ΔW for any lam/gam (PEFT's sparse
# bases lose 5 % of the rank at r=8, very sparse ones 60 % at d=4096). Ours draw every entry as
# before except one per column of a square block, chosen (0 or ±1) so that the block's leading
# principal minors are odd, hence non-zero: a parity argument then makes ΔW full rank for every
# (lam, gam) off a measure-zero set.


def _ternary(u: torch.Tensor, s: float) -> torch.Tensor:
    """-1 / 0 / +1 (int8) with probabilities ``1/(2s)``, ``1 - 1/s``, ``1/(2s)`` from uniforms ``u``."""
    p = 1 / (2 * s)
    return (u > 1 - p).to(torch.int8) - (u < p).to(torch.int8)


def _odd_diagonal(support: torch.Tensor) -> torch.Tensor:
    """Diagonal bits ``(K,)`` that make every leading principal minor of the 0/1 matrix
    ``support`` ``(K, K)`` (its off-diagonal bits as given) odd: LU without pivoting over GF(2),
    where pivot k is the diagonal bit plus what earlier steps left, so the bit is chosen to make
    it 1. Rows packed 62 columns per int64 word (clear of the sign bit); O(K^3 / 62) word ops."""
    K, WB = support.shape[0], 62
    nw = -(-K // WB)
    bits = torch.zeros(K, nw * WB, dtype=torch.int64)
    bits[:, :K] = support.to(torch.int64)
    bits[torch.arange(K), torch.arange(K)] = 0
    words = (bits.view(K, nw, WB) << torch.arange(WB)).sum(-1)  # distinct powers of two: sum = or
    diag = torch.zeros(K, dtype=torch.bool)
    for k in range(K):
        w, bit = divmod(k, WB)
        row = words[k, w:]  # words left of w hold only eliminated columns
        if not (int(row[0]) >> bit) & 1:
            diag[k] = True
            row[0] |= 1 << bit
        rest = words[k + 1 :, w:]
        rest ^= (-((rest[:, 0] >> bit) & 1)).unsqueeze(1) & row  # eliminate bit k below the pivot
    return diag


def _fix_diagonal(block: torch.Tensor, u: torch.Tensor) -> None:
    """Choose ``block``'s diagonal in place (0, or ±1 signed by its own uniform in ``u``) so every
    leading principal minor of the ternary ``block`` is odd."""
    idx = torch.arange(block.shape[0])
    on = _odd_diagonal(block != 0)
    sign = (u[idx, idx] >= 0.5).to(torch.int8) * 2 - 1
    block[idx, idx] = torch.where(on, sign, torch.zeros((), dtype=torch.int8))


def _sparse_A(seed: int, rank: int, d: int, s: float) -> torch.Tensor:
    """Ternary small basis ``(rank, d)`` int8. Its columns are cut into ``n`` groups of consecutive
    columns, group b holding ``ceil((d - b) / n)`` columns (as many as rows k with k*n + b < d),
    and each square block ``A[:g, group]`` gets an odd-minor diagonal. Depends on ``d`` through the
    groups, so it is cached per ``d`` (for ``r | d`` it is a prefix of any larger multiple of r)."""
    u = _uniform_A(seed, rank, d)
    A = _ternary(u, s)
    n = _num_bases(d, rank)
    q, extra = divmod(d, n)
    start = 0
    for b in range(n):
        g = q + (b < extra)
        _fix_diagonal(A[:g, start : start + g], u[:g, start : start + g])
        start += g
    return A


def _sparse_B(seed: int, rank: int, D: int, n: int, s: float) -> torch.Tensor:
    """Ternary large bases ``(D, n, rank)`` int8: the flattened diagonal ``Bf[c, c]``
    (``c < min(D, n*rank)``) chosen so every leading principal minor of ``Bf`` is odd. ``Bf[c, c]``
    depends only on ``Bf[:c+1, :c+1]``, so ``B`` stays prefix-stable in ``D`` and ``n``."""
    u = _uniform_B(seed, rank, D, n)
    B = _ternary(u, s)
    K = min(D, n * rank)
    _fix_diagonal(B.view(D, n * rank)[:K, :K], u.view(D, n * rank)[:K, :K])
    return B


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
        self._small: dict[tuple, torch.Tensor] = {}  # sparse A per exact d (see _sparse_A)

    def __deepcopy__(self, memo: dict) -> "_Bases":
        return self

    @property
    def compact(self) -> bool:
        """Whether the bases are stored as int8 plus a scale."""
        return self.kind != "dense"

    def _generate(self, D: int, d: int, s: float | None) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        """Bases of at least (D, d) on the CPU: float32, or int8 ternary plus its scale."""
        n = _num_bases(d, self.rank)
        if self.kind == "dense":
            uA, uB = _uniform_A(self.seed, self.rank, d), _uniform_B(self.seed, self.rank, D, n)
            return (uA * 2 - 1) * math.sqrt(3), (uB * 2 - 1) * math.sqrt(3), None
        s = _sparsity(self.kind, d) if s is None else s  # "sparse": s = 3 for every layer
        return _sparse_A(self.seed, self.rank, d, s), _sparse_B(self.seed, self.rank, D, n, s), _f32(math.sqrt(s))

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
        A = self._sparse_small(d, s, device) if self.compact else A_all[:, :d]
        return A, B_all[:D, :n].flatten(1), scale

    @torch.compiler.disable
    def _sparse_small(self, d: int, s: float | None, device: torch.device) -> torch.Tensor:
        """The int8 small basis for exactly this ``d`` (``r * d`` bytes per distinct ``d``)."""
        key = (torch.device(device), d, s)
        A = self._small.get(key)
        if A is None:
            A = self._small[key] = _sparse_A(self.seed, self.rank, d, _sparsity(self.kind, d) if s is None else s).to(device)
        return A

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


def _adapted_weight(
    W: torch.Tensor | None, S: torch.Tensor, Bf: torch.Tensor, scaling: float, out_ge_in: bool, owned: bool = False
) -> torch.Tensor:
    """``W + scaling * ΔW`` ``(out, in)`` in the compute dtype, in one matmul; into ``W`` itself
    when the caller ``owned`` it (a dequantized copy), else into a new tensor."""
    lhs, rhs = (Bf, S) if out_ge_in else (S.t(), Bf.t())
    if W is None:
        return torch.mm(lhs, rhs).mul_(scaling)
    return W.addmm_(lhs, rhs, alpha=scaling) if owned else torch.addmm(W, lhs, rhs, alpha=scaling)


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


class _WeightMemo:
    """Where one layer's ``W' = W + s·ΔW`` can wait for the backward that needs it.

    A forward that runs inside a backward pass is a checkpoint recompute: the backward of that
    layer follows within the same pass, so the recompute leaves its ``W'`` here and the backward
    takes it instead of building it again (held for one checkpoint segment at most). Under
    :func:`hold_weights` (opt-in) the entry stays, and every forward, recompute and backward reuses
    it until ``lam``, ``gam`` or ``W`` change. Entries are keyed on what ``W'`` depends on, so a stale
    one is never used (see :func:`_weight_key`).
    """

    __slots__ = ("entry", "hold")

    def __init__(self) -> None:
        self.entry: tuple[tuple, torch.Tensor] | None = None
        self.hold = False

    def get(self, key: tuple | None) -> torch.Tensor | None:
        e = self.entry
        return e[1] if key is not None and e is not None and e[0] == key else None

    def take(self, key: tuple | None) -> torch.Tensor | None:
        Wp = self.get(key)
        if not self.hold:
            self.entry = None
        return Wp


def _weight_key(W: torch.Tensor | None, lam: torch.Tensor, gam: torch.Tensor, dtype: torch.dtype, scaling: float) -> tuple:
    """What ``W'`` depends on. In-place updates (``optimizer.step()``, ``copy_``) bump ``_version``,
    a new tensor has a new ``data_ptr``; writes through ``.data`` bump nothing, so the code that
    makes them (merge, unmerge, ``_apply``) clears the memo itself."""
    w = None if W is None else (W.data_ptr(), W._version, W.dtype, W.shape)
    return (lam.data_ptr(), lam._version, gam.data_ptr(), gam._version, w, dtype, scaling)


class RandLoraFunction(torch.autograd.Function):
    """``y = x W^T + b + scaling * x ΔW^T`` with nothing kept for backward but the input.

    Two exact strategies (docs/MATH.md#two-exact-strategies), chosen by the caller (``build``):

    * factorized: ``x S^T Bf^T`` (out >= in) or ``x Bf S`` (out < in); cheap for few tokens.
    * build: build ``W' = W + scaling * ΔW`` in the compute dtype, use it, drop it; best for
      many tokens.

    The backward needs only ``x``, so it picks its own routes (``free``, the "auto" strategy;
    a forced strategy forces both): ``dX`` through ``W'`` or factorized, ``dS`` from
    ``G = dY^T X`` or factorized, whichever costs least (:func:`_backward_routes`); a ``W'`` left
    in ``memo`` by a checkpoint recompute is used instead of being built again. Saved tensors are
    only ``x``, ``W``, ``lam``, ``gam`` and the (shared) bases.

    Shapes: ``x`` (N, in), ``W`` (out, in), or a function that returns it (a quantized base's
    weight, dequantized when needed and never saved), or None (the adapter's term alone: the
    caller runs the base itself), ``bias`` (out,) or None, ``lam`` (r, n), ``gam`` (n, d), ``A`` (r, d),
    ``Bf`` (D, n*r) -> ``y`` (N, out).
    """

    @staticmethod
    def forward(ctx, x, W, bias, lam, gam, A, Bf, bases_scale, scaling, out_ge_in, build, free=False, memo=None, key=None, keep=False):
        dtype = x.dtype
        unpack, W = (W, None) if callable(W) else (None, W)
        A_, Bf_ = _materialize(A, dtype, bases_scale), _materialize(Bf, dtype, bases_scale)
        if build:
            Wp = memo.get(key) if memo is not None else None
            if Wp is None:
                S = _small_basis(lam, gam, A_, dtype)
                Wp = _adapted_weight(unpack() if unpack else W, S, Bf_, scaling, out_ge_in, owned=unpack is not None)
                if keep:
                    memo.entry = (key, Wp)
            y = F.linear(x, Wp, bias)
            del Wp
        else:
            Wb = unpack() if unpack else W
            y = F.linear(x, Wb, bias) if Wb is not None else None
            del Wb
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
        ctx.bases_scale, ctx.scaling, ctx.out_ge_in, ctx.build, ctx.free = bases_scale, scaling, out_ge_in, build, free
        ctx.memo, ctx.key, ctx.unpack = memo, key, unpack
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dY):
        x, W, lam, gam, A, Bf = ctx.saved_tensors
        need_x, need_W, need_b, need_lam, need_gam = ctx.needs_input_grad[:5]
        s, out_ge_in, dtype = ctx.scaling, ctx.out_ge_in, x.dtype
        memo, ctx.memo = ctx.memo, None
        Wp = memo.take(ctx.key) if memo is not None else None
        dY = _as(dY, dtype)
        A_, Bf_ = _materialize(A, dtype, ctx.bases_scale), _materialize(Bf, dtype, ctx.bases_scale)
        need_S = need_lam or need_gam
        if ctx.free:
            out_f, in_f = (Bf.shape[0], A.shape[1]) if out_ge_in else (A.shape[1], Bf.shape[0])
            dx_route, ds_route = _backward_routes(x.shape[0], out_f, in_f, Bf.shape[1], Wp is not None, need_x, need_S)
        else:
            dx_route, ds_route = ("W'", "G") if ctx.build else ("factorized", "factorized")
        # dX through the factors, or through a W' built here, needs S (and a quantized base's W,
        # dequantized again rather than kept); dS and _scale_grads never read S
        dx_needs_S = need_x and (dx_route == "factorized" or Wp is None)
        S = _small_basis(lam, gam, A_, dtype) if dx_needs_S else None
        if dx_needs_S and ctx.unpack is not None:
            W = ctx.unpack()
        dX = dS = G = None
        if need_x and dx_route == "W'":
            dX = dY @ (Wp if Wp is not None else _adapted_weight(W, S, Bf_, s, out_ge_in, owned=ctx.unpack is not None))
        del Wp
        if need_S and ds_route == "G":
            G = dY.t() @ x  # (out, in): full fine-tuning's weight gradient
            dS = Bf_.t() @ (G if out_ge_in else G.t())  # (r*n, d), unscaled: _scale_grads applies it
        fx, fs = need_x and dX is None, need_S and dS is None
        if fx or fs:
            dX_f, dS_f = _factorized_grads(x, W, dY, S, Bf_, s, out_ge_in, fx, fs)
            dX, dS = (dX_f if fx else dX), (dS_f if fs else dS)
        dW = (G if G is not None else dY.t() @ x) if need_W else None
        del G
        dlam, dgam = _scale_grads(dS, lam, gam, A_, s) if dS is not None else (None, None)
        db = dY.sum(0) if need_b and ctx.has_bias else None
        return dX, dW, db, dlam, dgam, None, None, None, None, None, None, None, None, None, None


class AdaptedWeight(torch.autograd.Function):
    """``W' = W + scaling * ΔW`` ``(out, in)`` as a tensor, for code that reads a weight instead of
    calling the layer (``nn.MultiheadAttention``, T5, the eval fast path of
    ``nn.TransformerEncoderLayer``). Saves only ``lam``, ``gam`` and the shared bases; the
    backward takes ``dlam``/``dgam`` from ``dW'`` exactly as the build strategy does from ``G``.
    """

    @staticmethod
    def forward(ctx, W, lam, gam, A, Bf, bases_scale, scaling, out_ge_in, kept=None):
        # kept: this very W' built before (hold_weights): a copy, so a reader never writes into it.
        dtype = W.dtype
        ctx.save_for_backward(lam, gam, A, Bf)
        ctx.bases_scale, ctx.scaling, ctx.out_ge_in, ctx.dtype = bases_scale, scaling, out_ge_in, dtype
        if kept is not None:
            return kept.clone()
        A_, Bf_ = _materialize(A, dtype, bases_scale), _materialize(Bf, dtype, bases_scale)
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
        return dW, dlam, dgam, None, None, None, None, None, None


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


def _costs(N: int, out_f: int, in_f: int, rn: int) -> dict[str, int]:
    """Multiply-adds of each piece beyond the base matmuls every route does
    (docs/MATH.md#cost-model); ``D = max(in, out)``, ``d = min(in, out)``, ``rn = r*n``."""
    D, d = max(out_f, in_f), min(out_f, in_f)
    return {
        "build": D * d * rn,  # W' = W + s Bf S
        "factorized": N * rn * (D + d),  # x S^T Bf^T or x Bf S; also dX and dS by factors
        "G": N * D * d + D * d * rn,  # G = dY^T x, then Bf^T G
        "shared": N * D * rn if out_f >= in_f else 0,  # dY Bf, used by both factorized dX and dS
    }


def _prefer_build(N: int, out_f: int, in_f: int, rn: int) -> bool:
    """Whether the forward should build ``W'`` for ``N`` tokens: the cheaper forward. The backward
    picks its own routes (:func:`_backward_routes`), so its cost does not depend on this choice,
    and the same ``N`` always gives the same route (a checkpoint recompute repeats it exactly)."""
    c = _costs(N, out_f, in_f, rn)
    return c["build"] * _BUILD_COST_FACTOR < c["factorized"]


def _backward_routes(N: int, out_f: int, in_f: int, rn: int, have_W: bool, need_x: bool, need_S: bool) -> tuple[str, str]:
    """The cheapest exact backward: ``dX`` via ``"W'"`` (free when ``have_W``) or ``"factorized"``,
    ``dS`` via ``"G"`` or ``"factorized"`` (sharing ``dY Bf`` with a factorized ``dX``)."""
    c = _costs(N, out_f, in_f, rn)
    best = None
    for dx in ("W'", "factorized"):
        for ds in ("G", "factorized"):
            cost = 0
            if need_x:
                cost += (0 if have_W else c["build"] * _BUILD_COST_FACTOR) if dx == "W'" else c["factorized"]
            if need_S:
                cost += c["G"] if ds == "G" else c["factorized"] - (c["shared"] if need_x and dx == "factorized" else 0)
            if best is None or cost < best[0]:
                best = (cost, dx, ds)
    return best[1], best[2]


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


def _plain_weight(w: object) -> bool:
    """Whether ``w`` is a plain floating 2-D tensor: its values are what a matmul with it computes.

    Exact types: tensor subclasses (bitsandbytes' Int8Params / Params4bit, torchao's quantized
    tensors) may pack their values behind a float dtype. FSDP2 shards are DTensors of plain values."""
    plain_type = type(w) in (torch.Tensor, nn.Parameter) or type(w).__name__ == "DTensor"
    return plain_type and w.is_floating_point() and w.dim() == 2


def _bnb_4bit_forward(module: nn.Module) -> bool:
    """Whether ``module`` computes as bitsandbytes' ``Linear4bit`` does (nf4 or fp4, its own
    subclasses included): ``x W^T + b`` with ``W`` its dequantized weight, in its compute dtype.
    Not when the instance carries a forward of its own (accelerate's device hooks move or load the
    weight there): that forward must run."""
    if "forward" in vars(module):
        return False
    for c in type(module).__mro__:
        if c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes"):
            return type(module).forward is c.forward and type(module.weight).__name__ == "Params4bit"
    return False


def _layout(module: nn.Module) -> str:
    """How the adapter meets the base layer's weight:

    * ``"linear"``: an ``nn.Linear`` whose weight is a plain floating ``(out, in)`` tensor and
      whose forward is ``nn.Linear``'s: the base matmul runs inside :class:`RandLoraFunction`.
    * ``"conv1d"``: transformers' ``Conv1D``, the same with the weight stored ``(in, out)``.
    * ``"4bit"``: bitsandbytes' ``Linear4bit``: the build strategy dequantizes ``W`` (as
      bitsandbytes itself does for many tokens) and adds ``s·ΔW`` to that copy; the factorized
      strategy runs the layer's own forward with the adapter's term beside it. Never written.
    * ``"opaque"``: anything else (bitsandbytes 8-bit layers, whose forward also quantizes the
      input; a parametrized weight; forward pre-hooks; a subclass with its own forward): its own
      forward runs, the adapter's term is added beside it, and its weight is never written.

    Decided by what the weight is, not by the module's class: bitsandbytes' layers subclass
    ``nn.Linear``.
    """
    if parametrize.is_parametrized(module) or module._forward_pre_hooks:
        # A pre-hook may set the weight (the old hook-based weight_norm recomputes it from
        # weight_g/weight_v before every forward, FSDP2 unshards it): only its own forward computes.
        return "opaque"
    if not _plain_weight(getattr(module, "weight", None)):
        return "4bit" if _bnb_4bit_forward(module) else "opaque"
    if type(module).forward is nn.Linear.forward and isinstance(module, nn.Linear):
        return "linear"
    return "conv1d" if _is_conv1d(module) else "opaque"


def _dequantizer(module: nn.Module, dtype: torch.dtype) -> Callable[[], torch.Tensor] | None:
    """For a ``"4bit"`` base: a function that returns its ``W`` ``(out, in)`` dequantized to
    ``dtype`` (a new tensor each call, as bitsandbytes' own forward makes for many tokens), or
    None where only the layer's own forward computes: no quant_state, the weight repacked for
    bitsandbytes' CPU inference kernel, or a compute dtype other than ``dtype``."""
    w = module.weight
    qs = getattr(w, "quant_state", None)
    if qs is None or getattr(qs, "packing_format_for_cpu", False) or getattr(module, "compute_dtype", None) not in (None, dtype):
        return None
    from bitsandbytes.functional import dequantize_4bit  # the layer is bitsandbytes': it is installed

    return lambda: _as(dequantize_4bit(w, qs), dtype)


def _autocasting(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (never for devices without autocast: meta)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _as_float32(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """``new`` as float32 on its device, from ``old``'s values when ``old`` was float32 already
    (exact) and has values (not meta)."""
    if old is not None and old.dtype == torch.float32 and not old.is_meta:
        return old.to(new.device)
    return new.float()


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
        self._memo = _WeightMemo()  # a W' kept for a backward (checkpoint recompute, hold_weights)
        self.lam = nn.Parameter(torch.empty(config.rank, self.n, dtype=torch.float32, device=device))
        self.gam = nn.Parameter(torch.empty(self.n, self.d, dtype=torch.float32, device=device))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``lam = 0`` (so ΔW = 0) and ``gam = 1 / max(n, d)``, as PEFT initialises them. Also what
        a model built on the meta device gets when it is materialized (``to_empty``)."""
        self.lam.zero_()
        self.gam.fill_(1 / max(self.n, self.d))

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
        # deepcopy / pickle: drop the remembered views (they would copy the shared bases) and
        # any kept W' (a copy must not share it).
        state = self.__dict__.copy()
        state["_views"] = None
        state["_memo"] = _WeightMemo()
        return state

    def _memo_for(self, build_with_grad: bool, with_base: bool, dtype: torch.dtype) -> tuple[_WeightMemo | None, tuple | None, bool]:
        """``(memo, key, keep)``: where the backward of a build forward looks for ``W'``, the key it
        is filed under, and whether this forward leaves its ``W'`` there: only in a checkpoint
        recompute (a forward run by the backward pass itself, which then runs this layer's
        backward) or under :func:`hold_weights`; otherwise nothing is kept."""
        if not build_with_grad or torch.compiler.is_compiling():
            return None, None, False
        memo = self._memo
        keep = memo.hold or torch._C._current_graph_task_id() != -1
        # memo and key even when not keeping: non-reentrant checkpointing runs the backward of the
        # first forward's node (with the recompute's saved tensors), so that ctx must look it up.
        W = self.base.weight if with_base else None  # the parameter itself: its version counts writes
        return memo, _weight_key(W, self.lam, self.gam, dtype, self.scaling), keep

    def _bases_for(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        """This layer's views of the shared bases, remembered per layer: slicing them anew on
        every call costs more host time than the small-batch GPU work it feeds."""
        v = self._views
        if v is None or v[0] is not self._bases or v[2] is not dtype or v[1] != device:
            v = (self._bases, device, dtype, *self._bases.get(self.D, self.d, device, dtype))
            self._views = v
        return v[3], v[4], v[5]

    def _apply(self, fn, recurse: bool = True):
        # model.half() / .double() / .to(dtype) cast the base but keep lam/gam and their grads
        # float32, with the values from before the cast (a round trip through a half type would
        # round them). An explicit `lam.data = lam.data.double()` afterwards is respected.
        # .data: new tensor objects on the old storage (_apply may swap the grad's .data in place).
        before = [(p.data, None if p.grad is None else p.grad.data) for p in (self.lam, self.gam)]
        super()._apply(fn, recurse)
        self._memo.entry = None  # a kept W' is of the old device/dtype
        for p, (old, old_grad) in zip((self.lam, self.gam), before):
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = _as_float32(old, p.data)
                if p.grad is not None:
                    p.grad = _as_float32(old_grad, p.grad)
        if before[0][0].is_meta and not self.lam.is_meta:
            # Deferred init (built on meta, then model.to_empty(device=...)): a meta tensor has no
            # values to keep, and uninitialised memory would be a random ΔW. Start from ΔW = 0.
            self.reset_parameters()
        return self

    def _refuse_training_merged(self, what: str) -> None:
        """A merged forward does not use lam/gam: training through it would leave them without a
        gradient, silently."""
        if self.training and torch.is_grad_enabled() and (self.lam.requires_grad or self.gam.requires_grad):
            raise RuntimeError(
                f"{what} {self.name!r} is merged: lam/gam are not used by a merged forward and would "
                "get no gradient. Call randlora.unmerge(model) before training, or model.eval() for inference."
            )

    def adapted(self, W: torch.Tensor) -> torch.Tensor:
        """``W + scaling * ΔW`` for ``W`` ``(out, in)``, in ``W``'s dtype (also under autocast: a
        parent reading it sees the base's dtype), differentiable in ``W``, ``lam`` and ``gam``."""
        A, Bf, bscale = self._bases_for(W.device, W.dtype)
        args = (W, self.lam, self.gam, A, Bf, bscale, self.scaling, self.out_features >= self.in_features)
        with torch.autocast(W.device.type, enabled=False) if _autocasting(W.device.type) else contextlib.nullcontext():
            if not self._memo.hold or torch.compiler.is_compiling():
                return AdaptedWeight.apply(*args)
            # hold_weights: parents read a weight several times a call (nn.MultiheadAttention's
            # forward reads in_proj_weight up to five times): build W' once until lam/gam/W change.
            key = _weight_key(W, self.lam, self.gam, W.dtype, self.scaling)
            kept = self._memo.get(key)
            if kept is None:
                with torch.no_grad():
                    kept = AdaptedWeight.apply(*args)
                self._memo.entry = (key, kept)
            return AdaptedWeight.apply(*args, kept)

    @torch.no_grad()
    def merge(self) -> None:
        """Add ``scaling * ΔW`` to the base weight (float32 arithmetic, float64 for a float64
        weight, rounded once to the weight's dtype). A no-op if merged."""
        if self.merged:
            return
        self._check_mergeable()
        lam, gam = self.lam.detach().clone(), self.gam.detach().clone()
        self._add_to_weight(lam, gam, 1.0)
        self._merged_params, self.merged = (lam, gam), True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract what :meth:`merge` added (from lam/gam as they were at merge time)."""
        if not self.merged:
            return
        lam, gam = self._merged_params
        self._add_to_weight(lam, gam, -1.0)
        self._merged_params, self.merged = None, False

    # Merge state in state_dict() (issue 10): a merged layer's base weight holds W + s·ΔW, so its
    # state dict says so (key "<layer>._extra_state", only while merged); a state dict without it
    # comes from an unmerged layer. Loading one into a layer in the other state stays correct.
    _merge_weight_key: str | None = None  # the state-dict key (below this module) merge writes

    def get_extra_state(self) -> torch.Tensor:
        """``[1, *lam, *gam]`` (float32; lam/gam as merged) while merged, ``[0]`` otherwise."""
        if not self.merged:
            return torch.zeros(1)
        lam, gam = self._merged_params
        return torch.cat([torch.ones(1), lam.detach().float().cpu().flatten(), gam.detach().float().cpu().flatten()])

    def set_extra_state(self, state: object) -> None:
        params = self._parse_merge_state(state)
        self._merged_params, self.merged = params, params is not None

    def _parse_merge_state(self, state: object) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A state-dict merge state, checked: ``None`` (unmerged) or ``(lam, gam)`` as merged."""
        r, n, d = self.rank, self.n, self.d
        ok = isinstance(state, torch.Tensor) and state.dim() == 1 and state.is_floating_point()
        ok = ok and state.layout == torch.strided and not state.is_meta
        if ok and state.numel() == 1 and state.item() == 0:
            return None
        if not (ok and state.numel() == 1 + r * n + n * d and state[0].item() == 1 and torch.isfinite(state).all()):
            got = f"{type(state).__name__} {tuple(state.shape)}" if isinstance(state, torch.Tensor) else _short_repr(state)
            raise ValueError(
                f"{type(self).__name__} {self.name!r}: the merge state in the state dict is {got}; expected [0] "
                f"(unmerged) or [1, lam ({r}x{n}), gam ({n}x{d})] (merged), finite float"
            )
        if self.disabled:
            raise ValueError(f"{type(self).__name__} {self.name!r}: a merged state cannot be loaded inside randlora.disable(); load it outside")
        flat = state.detach().to(self.lam.device, torch.float32)
        return flat[1 : 1 + r * n].reshape(r, n).clone(), flat[1 + r * n :].reshape(n, d).clone()

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.merged:  # unmerged state dicts keep the keys they always had
            destination.pop(prefix + "_extra_state", None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
        key = prefix + "_extra_state"
        if key in state_dict:
            self._parse_merge_state(state_dict[key])  # refuse before this layer changes
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if key not in state_dict:
            if key in missing_keys:
                missing_keys.remove(key)
            if self._merge_weight_key is not None and prefix + self._merge_weight_key in state_dict:
                self._merged_params, self.merged = None, False  # the weight loaded is an unmerged one

    def _add_to_weight(self, lam: torch.Tensor, gam: torch.Tensor, sign: float) -> None:
        self._memo.entry = None
        w = self._stored_weight()
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        dW = self.delta_weight(acc, lam, gam).to(w.device)
        w.copy_((w.to(acc) + sign * dW).to(w.dtype))

    def _check_mergeable(self) -> None:
        """Raise if :meth:`merge` cannot add into the base weight."""

    def _stored_weight(self) -> torch.Tensor:
        """The stored base weight as ``(out, in)``, detached (a view that :meth:`merge` writes)."""
        raise NotImplementedError

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

    _merge_weight_key = "base.weight"

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
        new_dropout = config.dropout != self.dropout_p  # before self.config changes (dropout_p reads it)
        self.config = config
        if new_dropout:
            self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
            self.dropout.train(self.training)

    @property
    def mergeable(self) -> bool:
        return self.layout in ("linear", "conv1d")

    def _weight(self) -> torch.Tensor:
        """The base weight as ``(out, in)`` (a view for Conv1D)."""
        w = self.base.weight
        return w.t() if self.layout == "conv1d" else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"RandLoraLinear {self.name!r}: input has shape {tuple(x.shape)}; expected (..., {self.in_features}) "
                f"(in_features={self.in_features} in the last dim)"
            )
        if self.disabled:
            return self.base(x)
        if self.merged:
            self._refuse_training_merged("RandLoraLinear")
            return self.base(x)
        dt = x.device.type
        dtype = torch.get_autocast_dtype(dt) if _autocasting(dt) else x.dtype
        A, Bf, bscale = self._bases_for(x.device, dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        backward = torch.is_grad_enabled() and (x.requires_grad or self.lam.requires_grad or self.gam.requires_grad)
        auto = self.strategy == "auto"
        build = self.strategy == "build" or (auto and _prefer_build(x2.shape[0], self.out_features, self.in_features, self.rank * self.n))
        out_ge_in = self.out_features >= self.in_features
        # Dropout makes the adapter's input differ from the base's: then the base runs on its own.
        # A 4-bit base is dequantized only to build W' (bitsandbytes' own forward is faster for few tokens).
        unpack = _dequantizer(self.base, dtype) if self.layout == "4bit" and build else None
        with_base = (self.layout in ("linear", "conv1d") or unpack is not None) and (isinstance(self.dropout, nn.Identity) or not self.training)
        memo, key, keep = self._memo_for(build and backward, with_base, dtype)
        with torch.autocast(dt, enabled=False) if dtype is not x.dtype else contextlib.nullcontext():
            if with_base:
                W = unpack if unpack is not None else _as(self._weight(), dtype)
                b = self.base.bias
                b = _as(b, dtype) if b is not None else None
                y = RandLoraFunction.apply(
                    _as(x2, dtype), W, b, self.lam, self.gam, A, Bf, bscale, self.scaling, out_ge_in, build, auto, memo, key, keep
                )
                return y.view(*lead, self.out_features)
            delta = RandLoraFunction.apply(
                _as(self.dropout(x2), dtype), None, None, self.lam, self.gam, A, Bf, bscale, self.scaling, out_ge_in, build, auto, memo, key, keep
            )
        y = self.base(x)
        return y + delta.view(*lead, self.out_features).to(y.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The weight this layer computes with, in the base's own layout (``(out, in)``; ``(in, out)``
        for Conv1D): ``W + scaling * ΔW``, differentiable in ``lam``/``gam``, or the base weight while
        merged or disabled. For parents that read ``.weight`` instead of calling the layer.

        A quantized base's packed integer weight is returned as it is: no code can compute with it,
        code only inspects it (T5 reads ``wo.weight.dtype``), and sees what the base model shows.
        A base with a float weight and a forward of its own has no adapted weight to show: raises.
        (See :func:`_shown_weight`; inject refuses such layers under parents known to read it.)
        Each read builds ``W'`` (one ``(out, in)`` matmul; parents may read it several times a
        call): inside :func:`hold_weights` it is built once until lam/gam/W change; for
        inference, :func:`merge`."""
        shown = "adapted" if self.mergeable else _shown_weight(self.base)
        if shown == "base":
            return self.base.weight
        if shown is None:
            raise AttributeError(
                f"RandLoraLinear {self.name!r} wraps a {type(self.base).__name__} with its own forward: code that "
                "reads its .weight would compute without the adapter (call the layer instead)"
            )
        if self.merged or self.disabled:
            return self.base.weight
        Wp = self.adapted(self._weight())
        return Wp.t() if self.layout == "conv1d" else Wp

    @weight.setter
    def weight(self, value: torch.Tensor) -> None:
        # transformers' tie_weights() assigns output_embeddings.weight: that is the base's weight.
        self.base.weight = value

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def _check_mergeable(self) -> None:
        # Quantized weights: dequantize, add, requantize would add a quantization error of the
        # size of the update's own rounding (4-bit: ~1/16 of a block's absmax per entry), so the
        # merged model would not compute base + s·ΔW. Refused instead.
        if not self.mergeable:
            raise TypeError(
                f"RandLoraLinear {self.name!r}: cannot merge into a {type(self.base).__name__}, whose weight is not "
                "a plain tensor (quantized, packed or parametrized): requantizing W + s·ΔW would change the "
                "result; keep the adapter unmerged (it computes beside the layer)"
            )

    def _stored_weight(self) -> torch.Tensor:
        w = self.base.weight.detach()
        return w.t() if self.layout == "conv1d" else w


class RandLoraWeight(RandLoraAdapter):
    """A RandLoRA update on a weight its module reads itself instead of calling a layer:
    ``nn.MultiheadAttention``'s input projection, ``in_proj_weight`` ``(3E, E)`` as one matrix,
    or ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` when kdim/vdim differ from E.

    A parametrization (``torch.nn.utils.parametrize``) of ``owner.<param>``: reading it gives
    ``W + scaling * ΔW`` (differentiable in ``lam``/``gam``), or ``W`` while merged or disabled;
    ``W`` is stored as ``owner.parametrizations.<param>.original``. Built by :func:`_adapt_weight`.

    Each read builds ``W'`` (``nn.MultiheadAttention.forward`` reads ``in_proj_weight`` up to
    five times a call): :func:`hold_weights` builds it once until lam/gam/W change; for
    inference, :func:`merge`. Parametrized modules are saved with ``state_dict()`` (torch does
    not pickle them whole).
    """

    mergeable = True
    layout = "linear"  # the weight is a plain (out, in) tensor
    dropout_p = 0.0  # the owner calls no layer with an input to drop

    def __init__(self, weight: torch.Tensor, config: RandLoraConfig, name: str = "", *, bases: _Bases | None = None, training: bool = True) -> None:
        out_f, in_f = weight.shape
        super().__init__(in_f, out_f, config, name, bases, weight.device)
        self.merged = False  # the stored weight holds W + s·ΔW (see merge)
        self.disabled = False
        self._merged_params: tuple[torch.Tensor, torch.Tensor] | None = None
        self._slot: tuple[nn.Module, str] | None = None  # (owner, param), set by _adapt_weight
        self._param_order: list[str] = []  # the owner's parameter names before, for eject
        self.train(training)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return W
        if self.merged:
            self._refuse_training_merged("RandLoRA weight")
            return W
        return self.adapted(W)

    def set_config(self, config: RandLoraConfig) -> None:
        """Take ``config``'s per-layer settings; the shared ones must not change, and there is no
        dropout (the owner never calls a layer with an input to drop)."""
        if config.shared != self.config.shared or config.dropout != 0:
            raise ValueError(f"RandLoRA weight {self.name!r}: cannot take {config} (shared settings {self.config.shared}, dropout 0)")
        self.config = config

    def _stored_weight(self) -> torch.Tensor:
        return self.merge_writes()[0].detach()

    def merge_writes(self) -> list[torch.Tensor]:
        """The parameter :meth:`merge` writes into: the owner's stored (original) weight."""
        owner, param = self._slot
        return [owner.parametrizations[param].original]

    def eject(self, model: nn.Module, name: str) -> None:
        """For :func:`eject`, after :meth:`merge`: remove the parametrization, leaving the merged
        weight as the owner's plain parameter (once none is left, the owner is of its own class
        again). ``model`` and ``name`` (this adapter's) are not needed."""
        owner, param = self._slot
        parametrize.remove_parametrizations(owner, param, leave_parametrized=False)
        # Back in its old place among the owner's parameters: the state_dict keys keep their order.
        params = dict(owner._parameters)
        order = [k for k in self._param_order if k in params] + [k for k in params if k not in self._param_order]
        owner._parameters.clear()
        owner._parameters.update((k, params[k]) for k in order)


_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def _mha_weights(mha: nn.MultiheadAttention) -> tuple[str, ...]:
    """The input-projection weights of ``mha``: one packed ``(3E, E)`` matrix, or three."""
    return _MHA_WEIGHTS[:1] if mha._qkv_same_embed_dim else _MHA_WEIGHTS[1:]


def _adapt_weight(owner: nn.Module, param: str, config: RandLoraConfig, name: str, bases: _Bases | None = None) -> RandLoraWeight:
    """Parametrize ``owner.<param>`` with a new :class:`RandLoraWeight`, in the owner's mode."""
    adapter = RandLoraWeight(getattr(owner, param), config, name, bases=bases, training=owner.training)
    # The owner's parameter names before any parametrization, for eject to restore their order:
    # after q_proj_weight's, k_proj_weight's adapter takes q_proj_weight's record.
    earlier = [f for fs in getattr(owner, "parametrizations", {}).values() for f in fs if isinstance(f, RandLoraWeight)]
    adapter._param_order = earlier[0]._param_order if earlier else list(owner._parameters)
    # unsafe: skips a trial evaluation; the parametrization keeps the shape and dtype by construction.
    parametrize.register_parametrization(owner, param, adapter, unsafe=True)
    adapter._slot = (owner, param)
    owner.parametrizations.train(owner.training)
    owner.parametrizations[param].register_load_state_dict_pre_hook(_weight_state_hook)
    return adapter


def _weight_state_hook(plist: nn.Module, state_dict, prefix: str, *args) -> None:
    """A state dict loaded into a parametrization list (``<owner>.parametrizations.<param>.``) that
    brings the stored weight (``original``) without a merge state (``0._extra_state``) brings an
    unmerged one: the RandLoraWeight (``0``) is then unmerged. Its own load sees only its keys."""
    if prefix + "original" in state_dict and prefix + "0._extra_state" not in state_dict:
        plist[0]._merged_params, plist[0].merged = None, False


def _adapt(model: nn.Module, name: str, module: nn.Module, config: RandLoraConfig, bases: _Bases | None = None) -> None:
    """Put an adapter on the (checked) target ``name`` of ``model``, in place. An
    ``nn.MultiheadAttention`` (it never calls its projections: it reads their weights) gets a
    :class:`RandLoraWeight` on its input projection and a :class:`RandLoraLinear` as ``out_proj``,
    whose ``.weight`` is the adapted weight; it stays an ``nn.MultiheadAttention``."""
    if isinstance(module, nn.MultiheadAttention):
        for param in _mha_weights(module):
            _adapt_weight(module, param, config, f"{name}.{param}", bases)
        module.out_proj = RandLoraLinear(module.out_proj, config, f"{name}.out_proj", bases=bases)
        return
    _replace(model, name, RandLoraLinear(module, config, name, bases=bases))


def _target_shapes(module: nn.Module) -> list[tuple[str, int, int]] | None:
    """``(weight, in, out)`` of each weight an adapter on ``module`` adapts, or None if ``module``
    is no target (neither linear-like nor an ``nn.MultiheadAttention``)."""
    if isinstance(module, nn.MultiheadAttention):
        shapes = [(p, getattr(module, p).shape[1], getattr(module, p).shape[0]) for p in _mha_weights(module)]
        return shapes + [("out_proj", module.out_proj.in_features, module.out_proj.out_features)]
    feats = _features(module)
    return None if feats is None else [("weight", *feats)]


def _shown_weight(module: nn.Module) -> str | None:
    """What :attr:`RandLoraLinear.weight` shows for a base ``module``: ``"adapted"`` (W + s·ΔW),
    ``"base"`` (packed integers, as they are: nothing can compute with them, T5 reads their dtype)
    or None (a float weight behind a forward of its own, or a float tensor subclass: there is no
    adapted weight to show, and showing the base's would let a reader skip the adapter)."""
    if _layout(module) in ("linear", "conv1d"):
        return "adapted"
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and not w.is_floating_point():
        # Packed integers (bitsandbytes int8 / 4-bit): any computation with them fails loudly. A
        # float tensor subclass (torchao) could be computed with, skipping the adapter: None below.
        return "base"
    # A parametrized nn.Linear (weight_norm, ...) still computes F.linear(x, weight, bias).
    plain_forward = isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
    plain_forward = plain_forward and not module._forward_pre_hooks
    return "adapted" if plain_forward and _plain_weight(w) else None


def _weight_reader(parent: nn.Module, attr: str) -> str | None:
    """How ``parent`` uses its child ``attr``'s ``.weight`` besides (or instead of) calling it:
    ``"computes"`` (nn.MultiheadAttention never calls out_proj; nn.TransformerEncoderLayer's eval
    fast path reads linear1/linear2), ``"inspects"`` (T5's feed-forward reads ``wo.weight.dtype``)
    or None (not known to read it)."""
    if isinstance(parent, nn.MultiheadAttention) and attr == "out_proj":
        return "computes"
    if isinstance(parent, nn.TransformerEncoderLayer) and attr in ("linear1", "linear2"):
        return "computes"
    if type(parent).__name__.endswith(("DenseActDense", "DenseGatedActDense")) and attr == "wo":
        return "inspects"
    return None


def _refusal(model: nn.Module, name: str, module: nn.Module, config: RandLoraConfig) -> str | None:
    """Why target ``name`` cannot compute exactly base + s·ΔW with ``config`` (refused at inject),
    or None: a parent that reads the layer's weight where the adapter cannot show in it."""
    if isinstance(module, nn.MultiheadAttention):
        return _mha_refusal(module, config)
    if _plain_weight(getattr(module, "weight", None)) and (
        parametrize.is_parametrized(module) or module._forward_pre_hooks
    ):
        return (
            "its weight is computed by a parametrization or a forward pre-hook (weight_norm, ...): merge could not "
            "write W + s·ΔW through it; remove it first (torch.nn.utils.parametrize.remove_parametrizations, "
            "torch.nn.utils.remove_weight_norm)"
        )
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    use, shown = _weight_reader(parent, attr), _shown_weight(module)
    if use == "computes" and isinstance(parent, nn.MultiheadAttention) and config.dropout > 0:
        return (
            "nn.MultiheadAttention never calls its out_proj (it reads out_proj.weight): adapter dropout cannot "
            "apply; adapt it with dropout=0 (an inject call of its own) or leave it out of the targets"
        )
    if (use == "computes" and shown != "adapted") or (use == "inspects" and shown is None):
        return (
            f"its parent {type(parent).__name__} reads {attr}.weight instead of calling it, and a "
            f"{type(module).__name__} {'has no plain weight' if shown is None else 'has a quantized weight'} to add the update to"
        )
    return None


def _mha_refusal(mha: nn.MultiheadAttention, config: RandLoraConfig) -> str | None:
    if config.dropout > 0:
        return (
            "nn.MultiheadAttention applies its projections as weights (it calls no layer with an input to drop): "
            "adapter dropout cannot apply; adapt it with dropout=0 (in an inject call of its own)"
        )
    plists = getattr(mha, "parametrizations", {}).values()
    if isinstance(mha.out_proj, RandLoraAdapter) or any(isinstance(f, RandLoraWeight) for fs in plists for f in fs):
        return "it is already adapted with RandLoRA; eject(model) first to re-adapt it"
    for p in _mha_weights(mha):
        if parametrize.is_parametrized(mha, p) or not _plain_weight(getattr(mha, p)):
            return f"its {p} is parametrized or not a plain floating tensor"
    if _layout(mha.out_proj) != "linear":
        return f"its out_proj is a {type(mha.out_proj).__name__} without a plain weight"
    return None


def _check_has_values(model: nn.Module, source: str) -> None:
    """Refuse to load values into a model on the meta device: its tensors are shapes without
    values, so a copy into them is dropped silently."""
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ValueError(
            f"{source}: cannot load values into a model on the meta device ({len(meta)} parameters, e.g. "
            f"{_short_list(meta, 3)}, have shapes but no values); materialize it first: "
            "model.to_empty(device=...), then load its weights"
        )


# How named_adapters names a RandLoraWeight: "<owner>.parametrizations.<param>.0".
_WEIGHT_ADAPTER_NAME = re.compile(r"(.+)\.parametrizations\.(\w+)\.0")


def _adapter_names(name: str, module: nn.Module) -> list[str]:
    """The names (as :func:`named_adapters` gives them) of the adapters that :func:`_adapt` puts
    on target ``name``."""
    if isinstance(module, nn.MultiheadAttention):
        return [f"{name}.parametrizations.{p}.0" for p in _mha_weights(module)] + [f"{name}.out_proj"]
    return [name]


def _adapter_targets(model: nn.Module, shapes: Mapping[str, tuple[int, int]], source: str) -> list[tuple[str, nn.Module]]:
    """The targets whose :func:`_adapt` re-creates exactly the adapters ``shapes`` names
    (``{adapter name: (out, in)}``, as saved) in a model without adapters: each layer itself, and
    the ``nn.MultiheadAttention`` of in-projection adapters (it adapts its out_proj too). Raises
    ``ValueError`` (``source`` first) for a name with no such place, a shape that differs, or an
    attention module whose adapters are there only in part."""
    modules = dict(model.named_modules())
    targets: dict[str, nn.Module] = {}
    for name in shapes:
        hit = _WEIGHT_ADAPTER_NAME.fullmatch(name)
        target = hit[1] if hit else name
        m = modules.get(target)
        if m is None or (hit is not None and not (isinstance(m, nn.MultiheadAttention) and hit[2] in _mha_weights(m))):
            raise ValueError(f"{source}: adapter layer {_short_repr(name)} is not in the model; its linear layers: {_short_list(_linear_names(model))}")
        targets[target] = m
    for target, m in list(targets.items()):
        if isinstance(m, nn.MultiheadAttention):
            missing = [n for n in _adapter_names(target, m) if n not in shapes]
            if missing:
                raise ValueError(f"{source}: nn.MultiheadAttention {target!r} is adapted only in part: no {_short_list(missing, 4)}")
            targets.pop(target + ".out_proj", None)
    for target, m in targets.items():
        got = _target_shapes(m)
        if got is None:
            raise ValueError(f"{source}: adapter layer {target!r} is a {type(m).__name__} in the model, not a linear layer")
        for name, (what, i, o) in zip(_adapter_names(target, m), got):
            if tuple(shapes[name]) != (o, i):
                raise ValueError(f"{source}: layer {name!r} is (out, in) = {tuple(shapes[name])} in the adapter but {(o, i)} in the model")
    return list(targets.items())


class SavedModule(nn.Module):
    """A module trained in full beside the adapters: ``inject(..., modules_to_save=[...])``, PEFT's
    ``modules_to_save`` (typically a task head: a classifier, a score layer).

    ``original`` is the module as it was (frozen; what :func:`disable` computes with, so a disabled
    model is exactly the base model); ``trained`` is a copy that trains and that
    :func:`save_adapter` / :func:`adapter_state_dict` carry in full (parameters and persistent
    buffers). Attributes the wrapper lacks (``weight``, ``out_features``, ...) are read from the
    module in use. :func:`eject` leaves ``trained`` in its place.
    """

    def __init__(self, module: nn.Module, name: str = "") -> None:
        super().__init__()
        if isinstance(module, (SavedModule, RandLoraAdapter)):
            raise TypeError(f"module {name!r} is already a RandLoRA {type(module).__name__}")
        self.original = module
        self.trained = copy.deepcopy(module)  # a tied parameter is copied: the other owner keeps its own
        self.name = name
        self.disabled = False  # set by disable(): compute with the original
        self.training = module.training
        for p in self.original.parameters():
            p.requires_grad_(False)
        self.trainable_()

    def trainable_(self) -> None:
        """Make the trained copy's floating-point parameters trainable."""
        for p in self.trained.parameters():
            if p.is_floating_point() or p.is_complex():
                p.requires_grad_(True)

    def forward(self, *args, **kwargs):
        return (self.original if self.disabled else self.trained)(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original", "trained", "_parameters", "_buffers", "_modules"):
                raise
            active = super().__getattr__("original" if self.__dict__.get("disabled") else "trained")
            try:
                return getattr(active, name)
            except AttributeError:
                raise AttributeError(
                    f"SavedModule {self.__dict__.get('name')!r} and its {type(active).__name__} have no attribute {name!r}"
                ) from None

    def state_for_file(self) -> dict[str, torch.Tensor]:
        """The trained copy's state (parameters, persistent buffers) by key relative to it, detached."""
        return {k: v.detach() for k, v in self.trained.state_dict().items()}

    def check_file_state(self, state: Mapping[str, object], source: str) -> dict[str, torch.Tensor]:
        """Validate ``state`` (keys relative to the module) against the trained copy: same keys and
        shapes, dense tensors with values, floating where the module's are (and finite)."""
        own = self.trained.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own), key=str)
        if missing or unexpected:
            raise ValueError(
                f"{source}: saved module {self.name!r} does not fit: missing keys "
                f"{_short_list([f'{self.name}.{k}' for k in missing], 10)}; unexpected keys "
                f"{_short_list([_short_repr(f'{self.name}.{k}') for k in unexpected], 10)}"
            )
        out = {}
        for key, mine in own.items():
            t, what = state[key], f"{source}: {self.name}.{key}"
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.is_meta:
                raise ValueError(f"{what} must be a dense tensor with values, got {type(t).__name__} {getattr(t, 'layout', '')}")
            if tuple(t.shape) != tuple(mine.shape) or t.is_floating_point() != mine.is_floating_point():
                raise ValueError(f"{what} is {t.dtype} {tuple(t.shape)}; the module has {mine.dtype} {tuple(mine.shape)}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"{what} contains NaN or Inf values")
            out[key] = t
        return out

    def load_checked(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy a state that :meth:`check_file_state` accepted into the trained copy (in place:
        parameters keep their identity, device and dtype)."""
        self.trained.load_state_dict(state, strict=True)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, disabled={self.disabled}"


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


ALL_LINEAR = "all-linear"


def _wrapped_names(model: nn.Module) -> list[str]:
    """Names of RandLoRA wrappers (adapters, saved modules): their insides are no targets."""
    return [n for n, m in model.named_modules() if isinstance(m, (RandLoraAdapter, SavedModule))]


def _match(model: nn.Module, targets: Targets, what: str = "targets", skip: Sequence[nn.Module] = ()) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` selected by ``targets`` (see :func:`inject`), in model order, each module
    once (under its first name) however many names reach it; the root module is named ``""``.
    ``what`` names the argument in errors; ``skip`` (and its insides) is left out of "all-linear"."""
    _check_targets_type(targets, what)
    # remove_duplicate=False: a module reachable under two names matches under either.
    modules = list(model.named_modules(remove_duplicate=False))
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        hit = _all_linear(model, skip)
    elif callable(targets) and not isinstance(targets, str):
        hit = lambda n, m: bool(targets(n, m))  # noqa: E731
    elif isinstance(targets, str):
        hit = _regex_matcher(model, modules, targets, what)
    else:
        entries = list(targets)
        for entry in entries:
            if not any(_name_matches(n, entry) for n, _ in modules):
                raise ValueError(
                    f"{what} entry {_short_repr(entry)} matches no module of {type(model).__name__}; "
                    f"its linear layers are: {_short_list(_linear_names(model))}"
                )
        hit = lambda n, m: any(_name_matches(n, e) for e in entries)  # noqa: E731
    hits = {id(m) for n, m in modules if hit(n, m)}
    # Under its first name, the one named_modules(), named_adapters() and state_dict() use.
    return [(n, m) for n, m in model.named_modules() if id(m) in hits]


def _check_targets_type(targets: object, what: str) -> None:
    ok = isinstance(targets, str) or (callable(targets) and not isinstance(targets, type))
    if isinstance(targets, (list, tuple, set, frozenset)):
        ok = len(targets) > 0 and all(isinstance(e, str) for e in targets)
    if not ok:
        raise TypeError(
            f"{what} must be a non-empty list of module names, a regex str, {ALL_LINEAR!r} or a callable "
            f"(name, module) -> bool; got {type(targets).__name__} {_short_repr(targets)}"
        )


def _regex_matcher(model: nn.Module, modules: list[tuple[str, nn.Module]], pattern: str, what: str) -> Callable[[str, nn.Module], bool]:
    """A full match of the regex ``pattern``; one that matches nothing is an error, and when the
    same string as a list entry (a name) would match, the error says so."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what} {_short_repr(pattern)} is not a valid regular expression: {e}") from None
    if any(regex.fullmatch(n) for n, _ in modules):
        return lambda n, m: regex.fullmatch(n) is not None
    as_name = sorted({n for n, _ in modules if _name_matches(n, pattern)})
    if as_name:
        raise ValueError(
            f"{what} regex {_short_repr(pattern)} matched no module: a str is a regular expression full-matched "
            f"against qualified names, a list matches names: {what}=[{_short_repr(pattern)}] would select "
            f"{len(as_name)} module(s): {_short_list(as_name, 5)}"
        )
    raise ValueError(f"{what} regex {_short_repr(pattern)} matched no module; linear layers: {_short_list(_linear_names(model))}")


def _all_linear(model: nn.Module, skip: Sequence[nn.Module]) -> Callable[[str, nn.Module], bool]:
    """PEFT's "all-linear": every ``nn.Linear`` (quantized subclasses included) and ``Conv1D``
    but the output head (``model.get_output_embeddings()``, when the model has one), never inside
    a RandLoRA wrapper, and none of ``skip`` (the modules to save)."""
    head = None
    if callable(getattr(model, "get_output_embeddings", None)):
        with contextlib.suppress(NotImplementedError, AttributeError):
            head = model.get_output_embeddings()
    wrappers = [m for m in model.modules() if isinstance(m, (RandLoraAdapter, SavedModule))]
    skipped = {id(s) for m in [*skip, *wrappers] for s in m.modules()}

    def hit(name: str, m: nn.Module) -> bool:
        return (isinstance(m, nn.Linear) or _is_conv1d(m)) and m is not head and id(m) not in skipped

    return hit


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
    modules_to_save: Targets | None = None,
    config: RandLoraConfig | None = None,
    path: str | None = None,
) -> nn.Module:
    """Wrap the targeted linear layers of ``model`` in :class:`RandLoraLinear`, in place.

    Every other parameter is frozen; the new ``lam``/``gam`` (and the modules to save) are
    trainable. Everything is validated before anything changes, so a failed call leaves
    ``model`` as it was.

    Args:
        model: any ``nn.Module`` holding the layers (not a bare layer: wrap it in a container).
        targets: a list of names (a module matches when its qualified name equals an entry or
            ends with ``"." + entry``; each entry must match); a ``str``, which is a regular
            expression full-matched against qualified names; ``"all-linear"`` (PEFT's: every
            ``nn.Linear`` and ``Conv1D`` but the output head, ``model.get_output_embeddings()``,
            and the modules to save); or a callable ``(name, module) -> bool``. A target may not
            contain another target.
        rank, seed, alpha, dropout, bases, strategy: the :class:`RandLoraConfig` fields (see
            there), or pass ``config=`` instead. ``1 <= rank <= min(in, out)`` of every target.
        modules_to_save: modules trained in full beside the adapters (task heads), selected like
            ``targets``; each becomes a :class:`SavedModule` (see there).
        path: the old name of ``strategy`` (deprecated).

    A module reachable under several names is adapted once: the same adapter under every name.
    A target whose weight is shared with another module (a head tied to the embedding) is
    adapted beside the shared weight, which stays shared and unchanged; :func:`merge` and
    :func:`eject` then refuse, naming both owners (merging would change the other module too).

    Returns:
        ``model``, adapted.
    """
    config = _inject_config(rank, seed, alpha, dropout, bases, strategy, config, path)
    none = modules_to_save is None or (isinstance(modules_to_save, (list, tuple, set, frozenset)) and not modules_to_save)
    saved = [] if none else _match(model, modules_to_save, "modules_to_save")
    found = _match(model, targets, "targets", skip=[m for _, m in saved])
    if not found:
        raise ValueError(f"targets {_short_repr(targets)} selected no module; linear layers: {_short_list(_linear_names(model))}")
    _check_targets(model, found, config)
    _check_saved(model, saved, found)
    with _slot_index(model):
        for name, m in found:
            _adapt(model, name, m, config)
        for name, m in saved:
            _replace(model, name, SavedModule(m, name))
    # Freezes the rest; a second inject keeps the first one's adapters and saved modules trainable.
    return mark_only_adapter_as_trainable(model)


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
    _check_not_root(found, "targets")
    inside = {n + ".base" for n, _ in named_adapters(model)}
    saved = tuple(n + "." for n in _saved_modules(model))
    for name, m in found:
        if isinstance(m, RandLoraAdapter) or name in inside or any(name.startswith(p + ".") for p in inside):
            raise ValueError(f"layer {name!r} is already adapted with RandLoRA; eject(model) first to re-adapt it")
        if isinstance(m, SavedModule) or (saved and name.startswith(saved)):
            raise ValueError(f"layer {name!r} is (inside) a module to save, trained in full: it cannot also be adapted")
    _check_nesting(found, "target", "target")
    for name, m in found:
        shapes = _target_shapes(m)  # one per adapted weight (an nn.MultiheadAttention has several)
        if shapes is None:
            raise TypeError(
                f"target {name!r} is a {type(m).__name__}, not a linear layer (nn.Linear, Conv1D, or a module "
                "with in_features, out_features and forward) nor an nn.MultiheadAttention"
            )
        for what, i, o in shapes:
            if config.rank > min(i, o):
                raise ValueError(
                    f"rank {config.rank} is larger than min(in, out) = {min(i, o)} of layer "
                    f"{name if what == 'weight' else name + '.' + what!r} (in_features={i}, out_features={o})"
                )
        reason = _refusal(model, name, m, config)
        if reason:
            raise ValueError(f"cannot adapt {name!r} exactly: {reason}")
    for _, m in named_adapters(model):
        if m.config.shared != config.shared or type(m._bases) is not _Bases:
            raise ValueError(
                f"model already has RandLoRA layers with rank={m.rank}, seed={m.config.seed}, bases={m.config.bases!r}, "
                f"alpha={m.alpha:g}; a second inject must use the same settings (got rank={config.rank}, "
                f"seed={config.seed}, bases={config.bases!r}, alpha={config.alpha:g})"
            )


def _check_not_root(found: list[tuple[str, nn.Module]], what: str) -> None:
    for name, m in found:
        if name == "":
            raise ValueError(
                f"{what} select the model itself (the root module, a {type(m).__name__}): inject replaces "
                "submodules in place and cannot replace the object you hold; wrap a bare layer in a container, "
                "e.g. nn.Sequential(layer), or build RandLoraLinear(layer, RandLoraConfig(...)) directly"
            )


def _check_nesting(
    outer: list[tuple[str, nn.Module]], outer_kind: str, inner_kind: str, inner: list[tuple[str, nn.Module]] | None = None
) -> None:
    """Refuse an ``outer`` module that contains an ``inner`` one: wrapping both, the outer wrapper
    would compute the inner module unadapted, or adapt it twice."""
    ids = {id(m) for _, m in (outer if inner is None else inner)}
    for name, m in outer:
        for sub_name, sub in m.named_modules(remove_duplicate=False):
            if sub_name and id(sub) in ids:
                raise ValueError(
                    f"{outer_kind} {name!r} contains {inner_kind} {name + '.' + sub_name!r}; both are selected, "
                    "and a selected module may not contain another: select one of them"
                )


def _saved_modules(model: nn.Module) -> dict[str, SavedModule]:
    """``{name: SavedModule}`` of ``model`` (each once, under its first name), in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SavedModule)}


def _check_saved(model: nn.Module, saved: list[tuple[str, nn.Module]], found: list[tuple[str, nn.Module]]) -> None:
    """Refuse modules to save that cannot be: the root, wrappers, targets (or containing them)."""
    _check_not_root(saved, "modules_to_save")
    _check_nesting(saved, "module to save", "module to save")
    _check_nesting(saved, "module to save", "target", found)
    _check_nesting(found, "target", "module to save", saved)
    targeted = {id(m) for _, m in found}
    wrappers = tuple(n + "." for n in _wrapped_names(model))
    for name, m in saved:
        if id(m) in targeted:
            raise ValueError(f"module {name!r} is both a target and a module to save; choose one")
        inside = any(isinstance(s, (RandLoraAdapter, SavedModule)) for s in m.modules())
        if inside or (wrappers and name.startswith(wrappers)):
            raise ValueError(f"module to save {name!r} is, is inside or contains a RandLoRA adapter or saved module")


_SLOTS: dict[int, dict[int, list[tuple[nn.Module, str]]]] = {}  # id(model) -> slot index, see _slot_index


@contextlib.contextmanager
def _slot_index(model: nn.Module) -> Iterator[None]:
    """While a verb replaces many modules: one scan finds every ``(parent, attribute)`` slot
    holding each module, so that :func:`_replace` is linear in the model's size, not quadratic."""
    index: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                index.setdefault(id(child), []).append((parent, attr))
    _SLOTS[id(model)] = index
    try:
        yield
    finally:
        _SLOTS.pop(id(model), None)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where module ``name`` is, under every name that reaches that module: one
    module reachable under two names (or held by two parents) stays one module."""
    old = model.get_submodule(name)
    index = _SLOTS.get(id(model))
    slots = index.pop(id(old), None) if index is not None else None
    if slots is None:
        slots = [(parent, attr) for parent in model.modules() for attr, child in parent._modules.items() if child is old]
    for parent, attr in slots:
        setattr(parent, attr, new)
    if index is not None:
        index[id(new)] = slots


def _param_owners(model: nn.Module) -> dict[int, list[str]]:
    """``{id(parameter): ["<module>.<name>", ...]}``: every module attribute holding it (a module
    reachable under several names counts once, under its first name)."""
    owners: dict[int, list[str]] = {}
    for mname, m in model.named_modules():
        for pname, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    return owners


def _merge_writes(adapter: RandLoraAdapter) -> list[torch.Tensor]:
    """The parameters :meth:`merge` writes into: a RandLoraLinear's base weight; other adapter
    kinds say so with a ``merge_writes()`` method."""
    if isinstance(adapter, RandLoraLinear):
        return [adapter.base.weight] if adapter.mergeable else []
    hook = getattr(adapter, "merge_writes", None)
    return list(hook()) if callable(hook) else []


def _check_mergeable(model: nn.Module, layers: list[RandLoraAdapter], verb: str) -> None:
    """Refuse (before anything changes) to merge into a weight that is no plain tensor, or into
    one that another module shares: that would change the other module's computation."""
    for m in layers:
        if not getattr(m, "mergeable", True):
            raise TypeError(
                f"cannot {verb}: layer {m.name!r} wraps a {type(getattr(m, 'base', m)).__name__}, whose weight is not a "
                "plain tensor; keep the adapter unmerged (it computes beside the layer)"
            )
    owners = _param_owners(model)
    for m in layers:
        for p in _merge_writes(m):
            names = owners.get(id(p), [])
            if len(names) > 1:
                raise ValueError(
                    f"cannot {verb}: layer {m.name!r} would add its update into a weight that is shared (tied): "
                    f"{' is also '.join(map(repr, names))}. Merging would change the other module's computation; "
                    "keep the adapter unmerged (it computes correctly beside the shared weight) or untie the weight first"
                )


def merge(model: nn.Module) -> nn.Module:
    """Add every adapter's ``scaling * ΔW`` into its base weight (idempotent).

    A merged layer computes as its plain base layer (inference at base speed). Its ``lam``/``gam``
    are then unused: a training-mode forward with gradients enabled raises; call :func:`unmerge`
    to keep training. Refused, model unchanged, when a base weight is not a plain tensor
    (``TypeError``) or is shared with another module (``ValueError`` naming both owners).
    Inside :func:`disable` it only decides that the layers are merged when the context ends.
    """
    layers = [m for _, m in named_adapters(model)]
    _check_mergeable(model, layers, "merge")
    for m in layers:
        if m.disabled:
            m._remerge = True  # inside disable(): the model keeps computing as the base
        else:
            m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract every merged adapter's update again (idempotent). Inside :func:`disable` the
    layers are unmerged already; then this decides that they stay unmerged after the context."""
    for _, m in named_adapters(model):
        if m.disabled:
            m.__dict__.pop("_remerge", None)
        else:
            m.unmerge()
    return model


def _unwrap(model: nn.Module, name: str, adapter: RandLoraAdapter) -> None:
    """Replace one merged adapter by the plain module it adapts (RandLoraLinear: its base);
    other adapter kinds do it with an ``eject(model, name)`` method."""
    if isinstance(adapter, RandLoraLinear):
        _replace(model, name, adapter.base)
    else:
        adapter.eject(model, name)


def eject(model: nn.Module) -> nn.Module:
    """Merge, then replace every adapter by the plain layer it adapts and every saved module by
    its trained copy, under every name that reaches them: the model computes as before, with no
    RandLoRA module left. Refused (model unchanged) inside :func:`disable`, and wherever
    :func:`merge` refuses. Returns ``model``."""
    layers = list(named_adapters(model))
    saved = _saved_modules(model)
    if any(m.disabled for _, m in layers) or any(s.disabled for s in saved.values()):
        raise RuntimeError("cannot eject inside randlora.disable(model): the model must compute as the base there")
    _check_mergeable(model, [m for _, m in layers], "eject")
    merge(model)
    with _slot_index(model):
        for name, m in layers:
            _unwrap(model, name, m)
        for name, s in saved.items():
            _replace(model, name, s.trained)
    return model


@contextlib.contextmanager
def disable(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside, ``model`` computes exactly as the base model (e.g. the reference
    model of a DPO loss): adapters are off and saved modules compute with their original module.

    Merged layers are unmerged for the duration and merged again after. Inside, :func:`merge`
    and :func:`unmerge` only choose whether the layers are merged when the (outermost) context
    ends; the model keeps computing as the base. Contexts nest.
    """
    layers = [m for _, m in named_adapters(model)]
    saved = list(_saved_modules(model).values())
    state = [m.disabled for m in layers + saved]
    for m in layers:
        if not m.disabled:
            m._remerge = m.merged
            m.unmerge()
            m.disabled = True
    for s in saved:
        s.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(layers + saved, state):
            m.disabled = was
            if not was and m.__dict__.pop("_remerge", False):
                m.merge()


def mark_only_adapter_as_trainable(model: nn.Module) -> nn.Module:
    """Freeze every parameter but the adapters' ``lam``/``gam`` and the saved modules' trained
    copies (what :func:`inject` leaves)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m in named_adapters(model):
        m.lam.requires_grad_(True)
        m.gam.requires_grad_(True)
    for s in _saved_modules(model).values():
        s.trainable_()
    return model


@contextlib.contextmanager
def hold_weights(model: nn.Module, budget_bytes: int | None = None) -> Iterator[nn.Module]:
    """Context manager (opt-in speed for memory): inside, each layer that builds ``W'`` builds it
    once and reuses it in every forward, checkpoint recompute and backward until its ``lam``,
    ``gam`` or base weight change (an optimizer step, a load), e.g. across gradient-accumulation
    micro-batches. Costs one ``(out, in)`` weight in the compute dtype per held layer, held from
    the first forward to the end of the context: layers are held in model order while their
    bf16 size fits ``budget_bytes`` (``None``: all). Without it nothing is kept from a forward
    to its backward, except a checkpoint segment's ``W'`` from its recompute to its backward."""
    layers = [m for _, m in named_adapters(model) if isinstance(getattr(m, "_memo", None), _WeightMemo)]
    used = 0
    for m in layers:
        size = 2 * m.out_features * m.in_features
        if budget_bytes is None or used + size <= budget_bytes:
            m._memo.hold, used = True, used + size
    try:
        yield model
    finally:
        for m in layers:
            m._memo.hold, m._memo.entry = False, None


def summary(model: nn.Module) -> str:
    """A table of adapted layers (name, shape, bases, trainable parameters) and saved modules,
    then the exact number of trainable parameters and their share of all parameters."""
    rows = [(n, f"{m.out_features}x{m.in_features}", str(m.n), f"{m.lam.numel() + m.gam.numel():,}") for n, m in named_adapters(model)]
    rows += [(f"{n} (saved in full)", "-", "-", f"{sum(p.numel() for p in s.trained.parameters()):,}") for n, s in _saved_modules(model).items()]
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
        lines.insert(0, f"RandLoRA: {len(dict(named_adapters(model)))} layers, rank {first.rank}, alpha {first.alpha:g} (scaling {first.scaling:g}), {origin}")
    lines.append(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.4f}%)")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# State dict and checkpoint I/O (safetensors; no pickle anywhere)

FORMAT_NAME = "randlora"
# 2: per-layer dropout and strategy in "layers". 3: a "checksum" over settings and tensors
# (required), "modules_to_save". Versions 1 and 2 have no checksum: they load unverified.
FORMAT_VERSION = "3"
READ_VERSIONS = ("1", "2", "3")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter file holds (detached, not copied): ``{"<layer>.lam": (r, n),
    "<layer>.gam": (n, d)}`` per adapter and ``{"<module>.<key>": tensor}`` for the full state of
    each module to save."""
    state = {}
    for name, m in named_adapters(model):
        state[f"{name}.lam"] = m.lam.detach()
        state[f"{name}.gam"] = m.gam.detach()
    for name, s in _saved_modules(model).items():
        state.update({f"{name}.{k}": v for k, v in s.state_for_file().items()})
    return state


def _split_state(state: object, expected: Iterable[str], saved: Iterable[str], source: str) -> dict[str, dict[str, object]]:
    """``state``'s entries per saved module (keys relative to it); every other key must be one of
    ``expected`` (lam/gam keys), which must all be there."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{source} must be a mapping (a dict of name -> tensor), got {type(state).__name__}")
    expected, saved = set(expected), list(saved)
    per_module: dict[str, dict[str, object]] = {n: {} for n in saved}
    unexpected = []
    for key, value in state.items():
        owner = next((n for n in saved if isinstance(key, str) and key.startswith(n + ".")), None) if key not in expected else None
        if owner is not None:
            per_module[owner][key[len(owner) + 1 :]] = value
        elif key not in expected:
            unexpected.append(_short_repr(key))
    missing = sorted(k for k in expected if k not in state)
    if missing or unexpected:
        raise ValueError(f"{source} does not fit the model: missing keys {_short_list(missing, 10)}; unexpected keys {_short_list(sorted(unexpected), 10)}")
    return per_module


def _check_tensor(t: object, key: str, source: str) -> torch.Tensor:
    """``t`` if it is a dense floating-point tensor with values (not meta, not sparse)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{source}: {key} must be a floating-point tensor, got {type(t).__name__}")
    if t.is_meta:
        raise ValueError(f"{source}: {key} is on the meta device (a shape without values)")
    if t.layout != torch.strided:
        raise ValueError(f"{source}: {key} is a sparse tensor ({t.layout}); pass dense tensors")
    if not t.is_floating_point():
        raise ValueError(f"{source}: {key} must be a floating-point tensor, got {t.dtype}")
    return t


def _checked_values(t: object, key: str, source: str, shape: tuple[int, ...], hint: str = "") -> torch.Tensor:
    """``t`` as a float32 CPU tensor, if it is dense, floating-point, of ``shape`` and finite."""
    t = _check_tensor(t, key, source)
    if tuple(t.shape) != shape:
        raise ValueError(f"{source}: {key} has shape {tuple(t.shape)}, expected {shape}{hint}")
    t = t.detach().to("cpu", torch.float32)
    if not torch.isfinite(t).all():
        raise ValueError(f"{source}: {key} contains NaN or Inf values")
    return t


def _check_state(layers: Mapping[str, object], saved: Mapping[str, object], state: object, source: str) -> tuple[dict, dict]:
    """Validate ``state`` against ``layers`` (adapters or shape probes) and ``saved`` modules
    (objects with ``check_file_state``): ``(lam/gam as float32 CPU tensors, {module: its state})``."""
    expected = {f"{n}.{p}": m for n, m in layers.items() for p in ("lam", "gam")}
    per_module = _split_state(state, expected, saved, source)
    out = {}
    for key, m in expected.items():
        shape = (m.rank, m.n) if key.endswith(".lam") else (m.n, m.d)
        hint = f" for layer {m.name!r} (in={m.in_features}, out={m.out_features}, rank={m.rank})"
        out[key] = _checked_values(state[key], key, source, shape, hint)
    return out, {n: s.check_file_state(per_module[n], source) for n, s in saved.items()}


def load_adapter_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy ``lam``/``gam`` (and the modules to save) from ``state`` (as from
    :func:`adapter_state_dict`) into ``model``.

    ``state`` must be a mapping whose keys and shapes match the adapted layers exactly, with dense,
    finite floating-point values; otherwise ``TypeError`` / ``ValueError`` and the model keeps its
    parameters. A merged model refuses (``RuntimeError``): unmerge first.
    """
    layers = dict(named_adapters(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no RandLoRA layers; inject() first or use load_adapter()")
    _check_has_values(model, "adapter state")
    saved = _saved_modules(model)
    checked, modules = _check_state(layers, saved, state, "adapter state")
    if any(m.merged for m in layers.values()):
        raise RuntimeError("unmerge(model) before loading new adapter values into a merged model")
    with torch.no_grad():
        for name, m in layers.items():
            m.lam.copy_(checked[f"{name}.lam"])
            m.gam.copy_(checked[f"{name}.gam"])
    for name, s in saved.items():
        s.load_checked(modules[name])
    return model


def _gather(t: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """A tensor's full value as a contiguous CPU tensor (in ``dtype``; None keeps its own), for
    writing to a file. FSDP2 shards parameters as DTensors: every rank must call this collective."""
    t = t.detach()
    full_tensor = getattr(t, "full_tensor", None)
    t = full_tensor() if callable(full_tensor) else t
    return t.to("cpu", dtype or t.dtype).contiguous()


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
    except (KeyError, ValueError, TypeError, RecursionError) as e:  # RecursionError: "[[[[..." nested deep
        raise ValueError(f"{path}: malformed randlora layers metadata ({type(e).__name__}: {_short_repr(str(e), 200)})") from None


def _parse_saved(meta: Mapping[str, str], path: str) -> list[str]:
    """The names of the modules to save recorded in ``meta`` (format 3; none before)."""
    try:
        names = json.loads(meta.get("modules_to_save", "[]"))
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}: malformed modules_to_save metadata ({_short_repr(str(e), 200)})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{path}: modules_to_save metadata must be a list of distinct names, got {_short_repr(names)}")
    return names


# ---- safetensors files, written and read here: no numpy (the runtime needs only torch), one
# writer and one reader for our files and PEFT's. Format: 8-byte little-endian header length,
# a JSON header (``__metadata__`` and per tensor dtype / shape / data_offsets), the raw bytes.

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # bytes of JSON header accepted (safetensors' own limit)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (valid while ``t`` lives)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def _write_safetensors(f: BinaryIO, items: Sequence[tuple[str, torch.Tensor]], metadata: Mapping[str, str]) -> None:
    """Write ``items`` (contiguous CPU tensors; one tensor may appear under several names) as a
    safetensors file to ``f``, streaming each tensor's bytes (repeated tensors are never copied)."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; writing them on a big-endian machine is not supported")
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, t in items:
        if key in header or t.dtype not in _ST_CODES or t.device.type != "cpu" or not t.is_contiguous():
            raise TypeError(f"{key}: cannot write a {t.dtype} tensor on {t.device} (duplicate name or unsupported)")
        size = t.numel() * t.element_size()
        header[key] = {"dtype": _ST_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for _, t in items:
        f.write(_tensor_bytes(t))


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]  # fmt: skip
    return next((what for test, what in kinds if test(mode)), "not a regular file")


def _path_error(e: OSError, path: str) -> Exception:
    """``e`` as the error to raise for ``path``: a symlink loop says so (not "No such file")."""
    if e.errno == errno.ELOOP:
        return ValueError(f"{path}: symlink loop (too many levels of symbolic links)")
    return e


def _open_regular(path: str) -> BinaryIO:
    """``path`` opened for reading; anything but a regular file is refused (a FIFO would block,
    a device never end). The open does not block, so no check-then-open race can hang."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise _path_error(e, path) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"{path} is {_file_kind(mode)}, not a regular file; refusing to read it")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("duplicate keys in a JSON object")
    return d


def _parse_entry(key: str, e: object, path: str) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """One tensor's header entry, checked: ``(dtype, shape, start, end)``."""
    nat = lambda v: type(v) is int and v >= 0  # noqa: E731
    ok = isinstance(e, dict) and set(e) == {"dtype", "shape", "data_offsets"} and isinstance(e["dtype"], str)
    ok = ok and e["dtype"] in _ST_DTYPES and isinstance(e["shape"], list) and all(nat(v) for v in e["shape"])
    ok = ok and isinstance(e["data_offsets"], list) and len(e["data_offsets"]) == 2 and all(nat(v) for v in e["data_offsets"])
    if not ok:
        raise ValueError(f"{path} is not a readable safetensors file: bad header entry for tensor {_short_repr(key)}: {_short_repr(e)}")
    dtype, (a, b) = _ST_DTYPES[e["dtype"]], e["data_offsets"]
    if b < a or b - a != math.prod(e["shape"]) * dtype.itemsize:
        what = f"tensor {_short_repr(key)} has {b - a} bytes of data for shape {e['shape']} {e['dtype']}"
        raise ValueError(f"{path} is not a readable safetensors file: {what}")
    return dtype, tuple(e["shape"]), a, b


def _parse_header(f: BinaryIO, path: str) -> tuple[dict[str, str], dict[str, tuple], int]:
    """``(metadata, {key: (dtype, shape, start, end)}, data start)`` of the open file ``f``.
    Strict: one JSON object padded with spaces, tensors back to back up to the end of the file."""
    size = os.fstat(f.fileno()).st_size
    n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
    if not 0 < n <= min(size - 8, _MAX_HEADER):
        raise ValueError(f"{path} is not a readable safetensors file ({size} bytes, header length {n}; truncated or corrupt?)")
    try:
        text = f.read(n).decode("utf-8")
        header, end = json.JSONDecoder(object_pairs_hook=_unique_keys).raw_decode(text)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError; deep nesting
        raise ValueError(f"{path} is not a readable safetensors file: bad header ({_short_repr(str(e), 200)})") from None
    meta = header.pop("__metadata__", {}) if isinstance(header, dict) else None
    if text[end:].strip(" ") or not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"{path} is not a readable safetensors file: the header is not one JSON object of string metadata and tensors")
    entries = {k: _parse_entry(k, e, path) for k, e in header.items()}
    pos = 0
    for _, _, a, b in sorted(entries.values(), key=lambda e: (e[2], e[3])):
        if a != pos:
            raise ValueError(f"{path} is not a readable safetensors file: tensor data has a gap or overlap at byte {pos}")
        pos = b
    if pos != size - 8 - n:
        what = f"the tensors take {pos} bytes, the file has {size - 8 - n} after the header (truncated?)"
        raise ValueError(f"{path} is not a readable safetensors file: {what}")
    return meta, entries, 8 + n


class _SafetensorsReader:
    """A safetensors file open for reading (a context manager): header parsed and checked against
    the file's size at open, tensors read on demand (float32 etc. as stored). Errors name the file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file = _open_regular(path)
        try:
            self.metadata, self.entries, self.data_start = _parse_header(self.file, path)
        except BaseException:
            self.file.close()
            raise

    def __enter__(self) -> "_SafetensorsReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def keys(self) -> list[str]:
        return list(self.entries)

    def tensor(self, key: str) -> torch.Tensor:
        dtype, shape, a, b = self.entries[key]
        buf = bytearray(b - a)
        self.file.seek(self.data_start + a)
        if self.file.readinto(buf) != len(buf):
            raise ValueError(f"{self.path} is not a readable safetensors file: truncated while reading {_short_repr(key)}")
        t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        return t.reshape(shape)


def _adapter_checksum(metadata: Mapping[str, str], items: Iterable[tuple[str, torch.Tensor]]) -> str:
    """``"sha256:<hex>"`` over every metadata entry but ``checksum`` (by key) and every tensor's
    name, dtype, shape and bytes (by name): all a load depends on, independent of the file layout.
    Each field is length-prefixed, so no two different contents encode alike."""
    h = hashlib.sha256(b"randlora-checksum-1\0")

    def put(b: bytes | memoryview) -> None:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    for k in sorted(metadata):
        if k != "checksum":
            put(k.encode("utf-8", "surrogatepass"))
            put(metadata[k].encode("utf-8", "surrogatepass"))
    for name, t in sorted(items, key=lambda kv: kv[0]):
        t = t.detach().to("cpu").contiguous()
        put(name.encode("utf-8", "surrogatepass"))
        put(f"{_ST_CODES[t.dtype]}{list(t.shape)}".encode())
        put(_tensor_bytes(t))
    return "sha256:" + h.hexdigest()


# ---- atomic writes: a temporary file (or folder) beside the target, fsynced, renamed over it.
# Temporary names say which host and process wrote them, so a later save removes those that a
# killed process left behind.

_TEMP_NAME = re.compile(r"\.randlora-([0-9a-f]{8})-(\d+)-[0-9a-f]+\.tmp")
_STALE_AFTER_S = 24 * 3600  # any save's temporary file older than this is abandoned (no save takes a day)


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temp_path(folder: str) -> str:
    return os.path.join(folder, f".randlora-{_host_tag()}-{os.getpid()}-{secrets.token_hex(8)}.tmp")


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would terminate it there; rely on the age rule
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _remove_stale_temps(folder: str) -> None:
    """Remove the temporary files and folders of saves into ``folder`` that died (killed, power
    loss): when their process is gone (this host), or after a day (another host, a reused pid)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for e in entries:
        m = _TEMP_NAME.fullmatch(e.name)
        if m is None or (m.group(1) == _host_tag() and int(m.group(2)) == os.getpid()):
            continue  # not ours, or this process's own save in progress (another thread)
        with contextlib.suppress(OSError):
            stale = time.time() - e.stat(follow_symlinks=False).st_mtime > _STALE_AFTER_S
            stale = stale or (m.group(1) == _host_tag() and not _pid_alive(int(m.group(2))))
            if stale and e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path, ignore_errors=True)
            elif stale:
                os.unlink(e.path)


def _fsync_dir(folder: str) -> None:
    """Make the renames in ``folder`` durable. Best effort, after the fact: the rename is done and
    visible already, and some systems cannot fsync a folder."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_target(path: str | os.PathLike) -> str:
    """The file a save to ``path`` writes: through symlinks to the file they name (the links stay,
    a dangling link's target is created); an existing target must be a regular file."""
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise _path_error(e, path) from None
    if mode is not None and not stat.S_ISREG(mode):
        raise ValueError(f"{path} is {_file_kind(mode)}, not a regular file; refusing to replace it")
    return os.path.realpath(path)


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _new_file(path: str, like: os.stat_result | None) -> BinaryIO:
    """A new file at ``path`` with the mode (and, where allowed, owner) of ``like``, or the mode a
    plain ``open()`` gives."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600 if like else 0o666)
    try:
        if like is not None:
            if hasattr(os, "fchown") and (like.st_uid, like.st_gid) != (os.getuid(), os.getgid()):
                with contextlib.suppress(OSError):
                    os.fchown(fd, like.st_uid, like.st_gid)
            if hasattr(os, "fchmod"):
                os.fchmod(fd, stat.S_IMODE(like.st_mode))
            else:  # Windows before Python 3.13
                os.chmod(path, stat.S_IMODE(like.st_mode))
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


def _atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write the file ``path`` with ``write(f)`` so that, whatever happens (an exception, a kill,
    a power loss), ``path`` holds its old content or all the new one, and keeps its mode."""
    folder = os.path.dirname(path)
    _remove_stale_temps(folder)
    like = _stat_or_none(path)
    tmp = _temp_path(folder)
    try:
        with _new_file(tmp, like) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def _file_tensors(layers: dict[str, RandLoraAdapter], saved: Mapping[str, SavedModule]) -> list[tuple[str, torch.Tensor]]:
    """The tensors of an adapter file, gathered to CPU: lam/gam (float32) and the modules to save
    (their own dtypes). Non-finite values are refused, naming the layer, before any file changes:
    a diverged step must not replace the last good checkpoint with one that cannot be loaded."""
    items = []
    for name, m in layers.items():
        for p in ("lam", "gam"):
            t = _gather(getattr(m, p))
            if not torch.isfinite(t).all():
                raise ValueError(f"layer {name!r}: {p} has NaN or Inf values (a diverged step?); not saved, files left as they were")
            items.append((f"{name}.{p}", t))
    for name, s in saved.items():
        for k, v in s.state_for_file().items():
            t = _gather(v, None)
            if t.dtype not in _ST_CODES:
                raise TypeError(f"module to save {name!r}: {k} is {t.dtype}, which a safetensors file cannot hold")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"module to save {name!r}: {k} has NaN or Inf values; not saved, files left as they were")
            items.append((f"{name}.{k}", t))
    return items


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapter to a safetensors file: atomically, checksummed, finite values only.

    The file holds ``lam``/``gam`` per layer (float32), the full state of each module to save and,
    in its metadata, everything needed to rebuild the adapter: format version, rank, alpha, seed,
    bases kind, per layer ``[out, in, dropout, strategy]``, the modules to save, and a SHA-256
    checksum over all of these and the tensors' bytes (verified by :func:`load_adapter`). Bases are
    not stored: they are regenerated from the seed.

    The file is written to a temporary file in the same folder, fsynced and renamed over ``path``,
    so ``path`` holds the old file or the new one, never a part; temporary files of saves that
    were killed are removed by the next save into that folder. Overwriting keeps the file's mode;
    a symlink is followed (its target is replaced, the link stays). NaN/Inf in ``lam``/``gam``
    (or a saved module) raise ``ValueError`` naming the layer before any file is touched. Under
    torch.distributed every rank must call this (FSDP2 shards are gathered); only rank 0 writes.
    """
    layers = dict(named_adapters(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no RandLoRA layers to save")
    config = _file_config(layers)
    saved = _saved_modules(model)
    items = _file_tensors(layers, saved)
    if not _is_writer():
        return
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "randlora_version": __version__,
        **config.to_metadata(),
        "layers": _layers_metadata(layers),
        "modules_to_save": json.dumps(list(saved)),
    }
    meta["checksum"] = _adapter_checksum(meta, items)
    _atomic_write(_write_target(path), lambda f: _write_safetensors(f, items, meta))


def _check_header(meta: Mapping[str, str], path: str) -> str:
    """The format version of a randlora file's metadata, checked."""
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a randlora adapter (metadata format={_short_repr(meta.get('format'))})")
    version = meta.get("format_version")
    if version not in READ_VERSIONS:
        raise ValueError(f"{path} has format_version {_short_repr(version)}; this randlora reads {READ_VERSIONS}")
    if "checksum" not in meta and int(version) >= 3:
        raise ValueError(f"{path} has no checksum, which format {version} files have: damaged metadata?")
    return version


def _read_adapter(path: str) -> tuple[RandLoraConfig, dict[str, tuple[int, int, RandLoraConfig]], list[str], dict[str, torch.Tensor]]:
    """Read, verify and parse a randlora file: ``(shared config, {layer: (out, in, config)},
    modules to save, tensors)``."""
    with _SafetensorsReader(path) as f:
        meta = f.metadata
        _check_header(meta, path)  # before reading the tensors of what may be a large other file
        tensors = {k: f.tensor(k) for k in f.keys()}
    if "checksum" in meta and meta["checksum"] != _adapter_checksum(meta, tensors.items()):
        raise ValueError(
            f"{path}: checksum mismatch: the file was damaged or changed after it was saved "
            f"(stored {_short_repr(meta['checksum'])}); refusing to load it"
        )
    shared = RandLoraConfig.from_metadata(meta, path)
    return shared, _parse_layers(meta, shared, path), _parse_saved(meta, path), tensors


def _check_file_fits(model: nn.Module, path: str, shared: RandLoraConfig, recorded: dict, saved_names: list[str]) -> None:
    """Refuse a file whose settings, layers or modules to save do not fit ``model``."""
    layers, saved = dict(named_adapters(model)), _saved_modules(model)
    if layers:
        have = _file_config(layers)
        for field, ours, theirs in zip(("rank", "alpha", "seed", "bases"), have.shared, shared.shared):
            if ours != theirs:
                raise ValueError(f"{path}: adapter has {field}={theirs!r} but the model's RandLoRA layers have {field}={ours!r}")
        for what, mine, theirs in (("adapter layers", set(layers), set(recorded)), ("modules to save", set(saved), set(saved_names))):
            if mine != theirs:
                raise ValueError(
                    f"{path}: {what} differ from the model's: missing in file {_short_list(sorted(mine - theirs), 10)}; "
                    f"not in model {_short_list([_short_repr(n) for n in sorted(theirs - mine)], 10)}"
                )
    modules = dict(model.named_modules())
    for name in saved_names:
        if name not in modules:
            raise ValueError(f"{path}: module to save {_short_repr(name)} is not in the model")
    for name, (out_f, in_f, _) in recorded.items() if layers else ():  # a plain model: see _adapter_targets
        m = layers[name]
        if (m.in_features, m.out_features) != (in_f, out_f):
            raise ValueError(f"{path}: layer {name!r} is (out, in) = {(out_f, in_f)} in the adapter but {(m.out_features, m.in_features)} in the model")


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter written by :func:`save_adapter`.

    Into a plain model, it injects exactly the recorded layers (and modules to save) with the
    recorded settings; into an already adapted model, it checks that rank, seed, bases kind, alpha,
    layers and modules to save agree. Refused with ``ValueError``, the model left exactly as it
    was: a checksum mismatch (any changed byte), any mismatch of settings, layers or shapes,
    NaN/Inf, a corrupt or truncated file, a path that is not a regular file (a FIFO, a folder, a
    device) or a symlink loop. A missing file raises ``FileNotFoundError``. Returns ``model``.
    """
    path = os.fspath(path)
    shared, recorded, saved_names, tensors = _read_adapter(path)
    _check_has_values(model, path)
    _check_file_fits(model, path, shared, recorded, saved_names)
    if not any(True for _ in named_adapters(model)):
        modules = dict(model.named_modules())
        # Validate everything against dry runs of the new layers before touching the model.
        probe = {n: _ShapeProbe(shared.rank, out_f, in_f, n) for n, (out_f, in_f, _) in recorded.items()}
        _check_state(probe, {n: _SavedProbe(modules[n], n) for n in saved_names}, tensors, path)
        targets = _adapter_targets(model, {n: (out_f, in_f) for n, (out_f, in_f, _) in recorded.items()}, path)
        base_config = shared.replace(dropout=0.0, strategy="auto")  # per layer: set_config below
        _check_targets(model, targets, base_config)
        _check_saved(model, [(n, modules[n]) for n in saved_names], targets)
        for name, m in targets:
            _adapt(model, name, m, base_config)
        for name in saved_names:
            _replace(model, name, SavedModule(modules[name], name))
        mark_only_adapter_as_trainable(model)
    load_adapter_state_dict(model, tensors)
    adapters = dict(named_adapters(model))
    for name, (_, _, config) in recorded.items():  # dropout and strategy as saved: resume is bit-exact
        adapters[name].set_config(config)
    return model


class _ShapeProbe:
    """Just the shape attributes of a would-be RandLoraLinear, for validation."""

    def __init__(self, rank: int, out_f: int, in_f: int, name: str) -> None:
        self.rank, self.in_features, self.out_features, self.name = rank, in_f, out_f, name
        self.d = min(in_f, out_f)
        self.n = _num_bases(self.d, rank)


class _SavedProbe:
    """A would-be :class:`SavedModule` (its module as ``trained``), for validation."""

    check_file_state = SavedModule.check_file_state

    def __init__(self, module: nn.Module, name: str) -> None:
        self.trained, self.name = module, name


# -----------------------------------------------------------------------------
# Hugging Face Trainer checkpoints (transformers is imported only when asked for).

TRAINER_ADAPTER_NAME = "adapter.safetensors"
# What Trainer.save_model writes for the whole model: (sharded) safetensors or .bin, and indexes.
_TRAINER_MODEL_FILES = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")


def trainer_callback():
    """A ``transformers.TrainerCallback`` that makes every Trainer checkpoint adapter-only.

    On each save it writes ``adapter.safetensors`` (:func:`save_adapter`: loads into a plain
    model with :func:`load_adapter`) into the new ``checkpoint-<step>`` folder, and replaces the
    whole-model weights the Trainer wrote there by a small ``model.safetensors`` holding only the
    trainable tensors (``lam``/``gam``, saved modules) under the model's own keys. Optimizer,
    scheduler, RNG and trainer state are the Trainer's own. To resume, rebuild the adapted model
    and hand the folder to the Trainer::

        model = build_base_model()
        randlora.load_adapter(model, f"{ckpt}/adapter.safetensors")
        trainer = Trainer(model=model, args=args, ..., callbacks=[randlora.trainer_callback()])
        trainer.train(resume_from_checkpoint=ckpt)

    (The Trainer then loads ``model.safetensors`` non-strictly and logs the frozen base weights
    as "missing keys": they come from the base model.) The whole model is still written once per
    checkpoint before it is replaced; ``trainer.save_model()`` (outside checkpoints) is not
    affected: save the final adapter with :func:`save_adapter`.
    """
    import transformers

    class RandLoraCheckpoints(transformers.TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            folder = os.path.join(args.output_dir, f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            _adapter_checkpoint(model, folder, args.should_save)
            return control

    return RandLoraCheckpoints()


def _adapter_checkpoint(model: nn.Module, folder: str, writer: bool) -> None:
    """Make a Trainer checkpoint folder adapter-only (see :func:`trainer_callback`). Every rank
    calls this (sharded parameters are gathered); only ``writer`` touches the folder."""
    if writer and not os.path.isdir(folder):  # e.g. a hyperparameter search, which saves under run folders
        raise FileNotFoundError(f"randlora.trainer_callback: the Trainer wrote no checkpoint folder {folder}")
    save_adapter(model, os.path.join(folder, TRAINER_ADAPTER_NAME))
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    keep |= {f"{n}.trained.{k}" for n, s in _saved_modules(model).items() for k in s.trained.state_dict()}
    state = {}
    for key, t in model.state_dict().items():
        if key in keep:
            t = t.detach()
            full_tensor = getattr(t, "full_tensor", None)
            state[key] = (full_tensor() if callable(full_tensor) else t).to("cpu").contiguous()
    if not writer:
        return
    for name in os.listdir(folder):
        if _TRAINER_MODEL_FILES.fullmatch(name):
            os.remove(os.path.join(folder, name))
    items = list(state.items())
    _atomic_write(os.path.join(folder, "model.safetensors"), lambda f: _write_safetensors(f, items, {"format": "pt"}))


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
        "saved": _peft_saved_names(raw.get("modules_to_save"), file),
    }


def _peft_json(file: str) -> dict:
    """The one JSON object in ``file``."""
    with _open_regular(file) as f:
        data = f.read(_MAX_HEADER + 1)
    if len(data) > _MAX_HEADER:
        raise ValueError(f"{file} is larger than {_MAX_HEADER} bytes: not an adapter config")
    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{file} is not UTF-8 text: {e}") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{file} is not valid JSON: {_short_repr(str(e), 200)}") from None
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


def _peft_saved_names(names: object, file: str) -> list[str]:
    """``modules_to_save``: null or a list of names (PEFT selects modules whose names end in one)."""
    if names is None:
        return []
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{file}: modules_to_save must be null or a list of module names, got {_short_repr(names)}")
    return list(names)


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
        try:
            os.stat(folder)
        except FileNotFoundError:
            backup = _backup_path(os.path.realpath(folder))
            hint = f"; an interrupted to_peft left the previous one at {backup} (rename it back)" if os.path.isdir(backup) else ""
            raise FileNotFoundError(f"no PEFT adapter folder at {folder}{hint}") from None
        except OSError as e:
            raise _path_error(e, folder) from None
        raise ValueError(f"{folder} is a file; from_peft expects the folder written by PEFT's save_pretrained")
    if not os.path.lexists(os.path.join(folder, PEFT_CONFIG_NAME)):
        subs = sorted(
            e.name for e in os.scandir(folder) if e.is_dir() and os.path.isfile(os.path.join(e.path, PEFT_CONFIG_NAME))
        )
        if subs:
            raise ValueError(
                f"{folder} holds several PEFT adapters in subfolders ({_short_list(subs, 10)}) and none at its top; "
                "pass the subfolder of the one adapter to load"
            )
        raise ValueError(f"{folder} has no {PEFT_CONFIG_NAME}: not a PEFT adapter folder")
    if not os.path.lexists(os.path.join(folder, PEFT_WEIGHTS_NAME)):
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

    ``modules_to_save`` (PEFT's rule: every module whose name ends in an entry) become
    :class:`SavedModule` s with the file's full state for them.

    Refused with ``ValueError`` (the model is left exactly as it was; everything is checked
    before anything changes): another ``peft_type``; ``layers_to_transform``, ``layers_pattern``,
    ``rank_pattern``, ``alpha_pattern``, ``exclude_modules``, ``target_parameters``; ``bias``
    other than ``"none"``; ``target_modules="all-linear"``; a folder with several adapters in
    subfolders and none at the top; a model that already has RandLoRA layers; targets that match
    nothing, are not linear layers or differ from the file's layers; modules to save that match
    nothing or overlap targets; missing or unexpected keys; wrong shapes; non-float, NaN or Inf
    values; stored copies of the bases that disagree; files that are not regular files (FIFOs
    are never read) or not UTF-8 JSON. A missing folder raises ``FileNotFoundError``. Returns
    ``model``, adapted.
    """
    folder = _peft_folder(path)
    cfg = _peft_config(folder)
    if draw_dtype is not None and draw_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"draw_dtype must be torch.bfloat16, torch.float16 or None, got {draw_dtype!r}")
    if any(True for _ in named_adapters(model)):
        raise ValueError(f"{type(model).__name__} already has RandLoRA layers; from_peft adapts a plain model (eject() first)")
    targets = _peft_targets(model, cfg, folder)
    saved = _peft_saved(model, cfg["saved"], targets, folder)
    weights = os.path.join(folder, PEFT_WEIGHTS_NAME)
    by_layer, shared, by_module = _peft_keys(model, weights, targets, cfg, saved)
    params, A, B = _peft_values(weights, targets, by_layer, shared, cfg)
    states = _peft_saved_states(weights, saved, by_module)
    if A is None:
        O, I = _peft_max_shape(targets)
        A, B = _peft_regenerate(cfg["kind"], cfg["rank"], cfg["key"], O, I, draw_dtype or _peft_draw_dtype())
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(f"{folder}: PEFT's regenerated {cfg['kind']} bases are degenerate (NaN/Inf) for r={cfg['rank']}, shape {(O, I)}")
    _peft_build(model, targets, params, A, B, cfg)
    for name, m in saved.items():
        s = SavedModule(m, name)
        _replace(model, name, s)
        s.load_checked(states[name])
    return mark_only_adapter_as_trainable(model)


def _peft_saved_states(weights: str, saved: Mapping[str, nn.Module], by_module: dict[str, dict[str, str]]) -> dict[str, dict]:
    """The modules to save's states from the file, checked like our own files'."""
    with _SafetensorsReader(weights) as f:
        return {n: _SavedProbe(m, n).check_file_state({k: f.tensor(v) for k, v in by_module[n].items()}, weights) for n, m in saved.items()}


def _peft_saved(model: nn.Module, names: list[str], targets: dict, folder: str) -> dict[str, nn.Module]:
    """The modules PEFT's ``modules_to_save`` selects (a name *ending* in an entry, PEFT's rule),
    checked like :func:`inject`'s."""
    found = [(n, m) for n, m in model.named_modules() if n and any(n.endswith(e) for e in names)]
    missing = [e for e in names if not any(n.endswith(e) for n, _ in found)]
    if missing:
        raise ValueError(f"{folder}: modules_to_save {_short_list([_short_repr(e) for e in missing], 5)} matches no module of {type(model).__name__}")
    try:
        _check_saved(model, found, [(n, m) for n, (m, _) in targets.items()])
    except ValueError as e:
        raise ValueError(f"{folder}: {e}") from None
    return dict(found)


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


def _peft_keys(model: nn.Module, weights: str, targets: dict, cfg: dict, saved: Mapping[str, nn.Module]) -> tuple[dict, dict, dict]:
    """The file's keys sorted into per-layer ``{layer: {suffix: key}}``, shared-bases keys and
    per module to save ``{module: {key in its state: file key}}``; any missing or unexpected key
    is refused."""
    with _SafetensorsReader(weights) as f:
        keys = f.keys()
    by_layer: dict[str, dict[str, str]] = {}
    shared: dict[str, str] = {}
    by_module: dict[str, dict[str, str]] = {n: {} for n in saved}
    unexpected = []
    for k in keys:
        stem, _, suffix = k.rpartition(".")
        owner = next((n for n in saved if k.startswith(f"{_PEFT_LAYER_PREFIX}{n}.")), None)
        if owner is not None:
            by_module[owner][k[len(_PEFT_LAYER_PREFIX) + len(owner) + 1 :]] = k
        elif suffix in ("randlora_A", "randlora_B") and stem == "base_model":
            shared[suffix] = k
        elif suffix in _PEFT_SUFFIXES and stem.startswith(_PEFT_LAYER_PREFIX) and stem[len(_PEFT_LAYER_PREFIX) :] in targets:
            by_layer.setdefault(stem[len(_PEFT_LAYER_PREFIX) :], {})[suffix] = k
        else:
            unexpected.append(k)
    missing = [f"{_PEFT_LAYER_PREFIX}{n}.{s}" for n in targets for s in ("randlora_lambda", "randlora_gamma") if s not in by_layer.get(n, {})]
    more_missing, more_unexpected = _peft_bases_keys(targets, by_layer, shared, cfg["save_projection"])
    missing, unexpected = missing + more_missing, unexpected + more_unexpected
    for n, m in saved.items():  # PEFT stores a module to save's full state dict
        missing += [f"{_PEFT_LAYER_PREFIX}{n}.{k} (modules_to_save)" for k in m.state_dict() if k not in by_module[n]]
        unexpected += [f"{_PEFT_LAYER_PREFIX}{n}.{k} (modules_to_save)" for k in by_module[n] if k not in m.state_dict()]
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
    return by_layer, shared, by_module


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
    return _checked_values(f.tensor(key), key, weights, shape)


def _peft_values(weights: str, targets: dict, by_layer: dict, shared: dict, cfg: dict):
    """``({layer: (lam, gam)}, A (r, d_max) or None, B (D_max, n_max, r) or None)``, checked; the
    stored copies of the bases must all agree."""
    rank = cfg["rank"]
    O, I = _peft_max_shape(targets)
    D_max, d_max = max(O, I), min(O, I)
    n_max = _num_bases(d_max, rank)
    params: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    A = B = None
    with _SafetensorsReader(weights) as f:
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


def to_peft(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s adapter as a Hugging Face PEFT RandLoRA adapter folder.

    ``path`` gets ``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's
    ``save_projection=True`` layout: ``lam`` / ``gam`` as ``randlora_lambda`` / ``randlora_gamma``
    and the shared bases ``randlora_A`` ``(r, 1, d_max)`` / ``randlora_B`` ``(D_max, n_max, r)``
    (float32; sized from the element-wise maximum of the targets' ``(out, in)``, as PEFT sizes
    them, and stored per layer and once at ``base_model.`` like PEFT does), so
    ``PeftModel.from_pretrained(base, path)`` loads it on any machine and gives the same outputs.
    ``target_modules`` is a regex of the exact adapted names; ``fan_in_fan_out`` is set when the
    layers are transformers ``Conv1D``. Modules to save are written in full, as PEFT's
    ``modules_to_save`` (refused if PEFT's suffix rule would select other modules too).

    The folder is replaced as a whole, atomically: the new one is written complete (files fsynced)
    beside it and swapped in, so a crash at any point leaves the old folder or the new one, never
    new weights beside an old config (see :func:`_swap_folder` for systems without an atomic
    exchange). Other plain files in it (a README) are kept; a folder with subfolders is refused;
    file modes are kept; a symlinked folder is followed. NaN/Inf values are refused, naming the
    layer, before anything is written. Under torch.distributed every rank must call this; rank 0
    writes.

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
    _peft_check_parents(model, layers)
    A, B, origin = _peft_bases(layers)
    items: list[tuple[str, torch.Tensor]] = []
    for key, t in _file_tensors(layers, {}):  # refuses NaN/Inf, as from_peft does
        name, _, p = key.rpartition(".")
        items.append((f"{_PEFT_LAYER_PREFIX}{name}.randlora_{'lambda' if p == 'lam' else 'gamma'}", t))
    saved = _saved_modules(model)
    _peft_check_saved(model, saved)
    items += [(_PEFT_LAYER_PREFIX + key, t) for key, t in _file_tensors({}, saved)]  # full states, as PEFT stores them
    if not _is_writer():
        return
    for name in layers:
        items += [(f"{_PEFT_LAYER_PREFIX}{name}.randlora_A", A), (f"{_PEFT_LAYER_PREFIX}{name}.randlora_B", B)]
    items += [(f"{_PEFT_SHARED_PREFIX}randlora_A", A), (f"{_PEFT_SHARED_PREFIX}randlora_B", B)]
    config = _peft_config_json(first, layers, origin)
    config["modules_to_save"] = list(saved) or None
    _peft_write(os.fspath(path), items, config)


def _peft_check_saved(model: nn.Module, saved: Mapping[str, SavedModule]) -> None:
    """PEFT selects ``modules_to_save`` by name suffix: refuse names that would select more."""
    for name in saved:
        others = [n for n, _ in model.named_modules() if n.endswith(name) and n != name and not n.startswith(name + ".")]
        if others:
            raise ValueError(
                f"module to save {name!r}: PEFT selects modules_to_save by name suffix and would also select "
                f"{_short_list(others, 5)}; this adapter cannot be written in PEFT's format"
            )


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
        if isinstance(m, RandLoraWeight):
            raise ValueError(f"layer {name!r} adapts an nn.MultiheadAttention weight; PEFT's RandLoRA does not adapt nn.MultiheadAttention")
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
        if not m.mergeable and not _peft_wraps(m.base):
            raise ValueError(
                f"layer {name!r} wraps a {type(m.base).__name__}; PEFT's RandLoRA adapts only nn.Linear, Conv1D "
                "and bitsandbytes' Linear8bitLt / Linear4bit"
            )
    return first


def _peft_wraps(base: nn.Module) -> bool:
    """Whether PEFT's RandLoRA has a layer for this opaque base: bitsandbytes' 8-bit and 4-bit
    linears (PEFT runs their own forward with the adapter beside it, as we do)."""
    return any(c.__module__.startswith("bitsandbytes") and c.__name__ in ("Linear8bitLt", "Linear4bit") for c in type(base).__mro__)


def _peft_check_parents(model: nn.Module, layers: dict[str, RandLoraAdapter]) -> None:
    """An ``nn.MultiheadAttention`` reads its ``out_proj.weight`` instead of calling the layer: ours
    hands it W + s·ΔW, PEFT's adapted ``out_proj`` would be skipped. Refuse rather than write an
    adapter PEFT computes differently."""
    for name in layers:
        parent, _, child = name.rpartition(".")
        if child == "out_proj" and isinstance(model.get_submodule(parent), nn.MultiheadAttention):
            raise ValueError(
                f"layer {name!r} is the out_proj of an nn.MultiheadAttention, which reads its weight directly: "
                "PEFT would skip its adapter, so this adapter cannot be written in PEFT's format"
            )


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
        for d in sorted({m.d for m in layers.values()}) if bases.compact else ():  # PEFT slices one A; ours is chosen per d
            if not torch.equal(bases._sparse_small(d, s, torch.device("cpu")), A[:, :d]):
                raise ValueError(
                    f"{bases.kind} bases choose a few entries of A per layer width min(in, out) so that ΔW is full rank "
                    f"(docs/MATH.md#sparse-bases); a layer with min(in, out) = {d} uses another A than the first {d} "
                    f"columns of the widest layer's, which is all PEFT can express. Save with save_adapter(), or use "
                    f"widths that are multiples of rank {rank}"
                )
        A, B = _materialize(A, torch.float32, scale), _materialize(B, torch.float32, scale)
        origin = {"sparse": bases.kind == "sparse", "very_sparse": bases.kind == "very_sparse", "projection_prng_key": 0}
    A = A[:, :d_max].detach().to("cpu", torch.float32).reshape(rank, 1, d_max).contiguous()
    return A, B[:D_max, :n_max].detach().to("cpu", torch.float32).contiguous(), origin


def _peft_write(path: str, items: list[tuple[str, torch.Tensor]], config: dict) -> None:
    """Write the folder ``path`` as a whole, atomically: a complete new folder beside it (files
    fsynced; other plain files of the old folder linked in), swapped in by :func:`_swap_folder`."""
    target, old = _peft_target(path)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temps(parent)
    _recover_backup(target)
    tmp = _temp_path(parent)
    os.mkdir(tmp, 0o700 if old else 0o777)
    try:
        like = {n: _stat_or_none(os.path.join(target, n)) for n in (PEFT_WEIGHTS_NAME, PEFT_CONFIG_NAME)} if old else {}
        with _new_file(os.path.join(tmp, PEFT_WEIGHTS_NAME), like.get(PEFT_WEIGHTS_NAME)) as f:
            _write_safetensors(f, items, {"format": "pt"})
            f.flush()
            os.fsync(f.fileno())
        with _new_file(os.path.join(tmp, PEFT_CONFIG_NAME), like.get(PEFT_CONFIG_NAME)) as f:
            f.write((json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        if old:
            _carry_files(target, tmp)
            os.chmod(tmp, stat.S_IMODE(old.st_mode))
        _fsync_dir(tmp)
        _swap_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    shutil.rmtree(tmp, ignore_errors=True)  # the old folder, swapped out


def _peft_target(path: str | os.PathLike) -> tuple[str, os.stat_result | None]:
    """The folder :func:`to_peft` writes (symlinks followed) and its stat (None: new). It must be
    a folder of files: it is replaced as a whole, and subfolders would not be carried over."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise _path_error(e, path) from None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{path} is {'a file' if stat.S_ISREG(st.st_mode) else _file_kind(st.st_mode)}; to_peft writes an adapter folder there")
    target = os.path.realpath(path)
    if st is not None:
        subs = sorted(e.name for e in os.scandir(target) if e.is_dir(follow_symlinks=False))
        if subs:
            raise ValueError(
                f"{path} has subfolders ({_short_list(subs, 5)}); to_peft replaces the adapter folder as a whole "
                "(atomically) and would not keep them: write to another folder"
            )
    return target, st


def _carry_files(old: str, new: str) -> None:
    """Link (or copy) into ``new`` the files of ``old`` that a save does not write (a README)."""
    for e in os.scandir(old):
        dst = os.path.join(new, e.name)
        if e.name in (PEFT_WEIGHTS_NAME, PEFT_CONFIG_NAME):
            continue
        if e.is_symlink():
            os.symlink(os.readlink(e.path), dst)
            continue
        try:
            os.link(e.path, dst)
        except OSError:
            shutil.copy2(e.path, dst)


def _backup_path(target: str) -> str:
    """Where the two-rename fallback of :func:`_swap_folder` parks the old folder meanwhile."""
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.randlora-old")


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform.startswith("linux") else None
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def _swap_folder(new: str, target: str) -> None:
    """Put the folder ``new`` at ``target``; the old ``target`` (if any) ends up at ``new``.

    On Linux one atomic exchange: at every instant ``target`` is the old folder or the new one.
    Elsewhere two renames, old -> :func:`_backup_path`, new -> target: a crash between them leaves
    no ``target`` but the old folder complete at the backup path, which the next :func:`to_peft`
    puts back first (and :func:`from_peft` names in its error)."""
    if not os.path.lexists(target):
        os.rename(new, target)
    elif not _exchange(new, target):
        backup = _backup_path(target)
        os.rename(target, backup)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(backup, target)
            raise
        os.rename(backup, new)


def _recover_backup(target: str) -> None:
    """Undo what a crash in :func:`_swap_folder`'s fallback left: the old folder at the backup path."""
    backup = _backup_path(target)
    if os.path.isdir(backup):
        if os.path.lexists(target):
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(backup, target)
