"""RandLoRA: full-rank parameter-efficient fine-tuning, in one file.

A frozen ``y = x W^T + b`` (``W``: ``(out, in)``) gets ``ΔW = Σ_b B_b Λ_b A Γ_b``: random bases ``A`` ``(r, d)``,
``B`` ``(D, n, r)`` shared by all adapted layers, only the diagonals ``lam`` ``(r, n)`` and ``gam`` ``(n, d)`` trained
(``d = min(in, out)``, ``D = max(in, out)``, ``n = ceil(d / r)``). With ``S[k*n + b, j] = lam[k, b] A[k, j] gam[b, j]``
and ``Bf[:, b*r + k] = B[:, b, k]``: ``ΔW = Bf S`` (transposed if out < in), ``y = x W^T + b + (alpha / r) x ΔW^T``,
as PEFT computes it (docs/MATH.md). Sections: config, bases, math and kernels, autograd, adapters, targeting and
refusals, verbs, files, Trainer, PEFT and LoRA export.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import stat
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple

import safetensors
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.optim.optimizer import register_optimizer_step_post_hook

__version__ = "0.3.0"
__all__ = [
    "RandLoraConfig", "RandLoraLinear", "RandLoraWeight", "SavedModule", "inject", "named_adapters", "merge", "unmerge",
    "eject", "disable", "hold_weights", "mark_only_adapter_as_trainable", "summary", "adapter_state_dict",
    "load_adapter_state_dict", "save_adapter", "load_adapter", "trainer_class", "trainer_callback", "from_peft",
    "to_peft", "to_lora",
]

# -----------------------------------------------------------------------------
# Config

# MATH.md#two-exact-strategies
BASES_KINDS, STRATEGIES = ("dense", "sparse", "very_sparse"), ("auto", "build", "factorized")


def _short(value: object, limit: int = 80) -> str:
    """A bounded repr: names and values may come from files, and no message echoes megabytes."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _short_list(items: Sequence[object], limit: int = 10) -> str:
    """Up to ``limit`` bounded reprs, comma separated, and how many more."""
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(_short(i) for i in list(items)[:limit]) + more if len(items) else "(none)"


@dataclasses.dataclass(frozen=True)
class RandLoraConfig:
    """One adapter's settings, validated once (README: API). ``alpha=None`` is ``20 * rank``; bases from ``seed``."""

    rank: int = 32
    alpha: float | None = None
    seed: int = 0
    bases: str = "dense"
    dropout: float = 0.0
    strategy: str = "auto"

    def __post_init__(self) -> None:
        if self.strategy == "merged":
            raise ValueError("strategy 'merged' was renamed 'build' in 0.2 and removed in 0.3: use strategy='build'")
        a, p, real = self.alpha, self.dropout, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        for ok, what, value in [
            (type(self.rank) is int and self.rank > 0, "rank must be a positive int", self.rank),
            (type(self.seed) is int and self.seed >= 0, "seed must be a non-negative int", self.seed),
            (a is None or (real(a) and 0 < a <= sys.float_info.max),
             "alpha must be a positive finite number or None", a),
            (real(p) and 0 <= p < 1, "dropout must be in [0, 1)", p),
            (isinstance(self.bases, str) and self.bases in BASES_KINDS,
             f"bases must be one of {BASES_KINDS}", self.bases),
            (isinstance(self.strategy, str) and self.strategy in STRATEGIES,
             f"strategy must be one of {STRATEGIES}", self.strategy),
        ]:
            if not ok:
                raise ValueError(f"{what}, got {_short(value)}")
        object.__setattr__(self, "alpha", 20.0 * self.rank if a is None else float(a))
        object.__setattr__(self, "dropout", float(p))

    scaling = property(lambda self: self.alpha / self.rank)
    # what all layers of one adapter share
    shared = property(lambda self: (self.rank, self.alpha, self.seed, self.bases))


# -----------------------------------------------------------------------------
# Seeded random bases (docs/MATH.md#seeded-bases, #sparse-bases)

_BLOCK = 1024  # columns of A / rows of B drawn per generator: a layer's bases depend only on its own shape


def _num_bases(d: int, rank: int) -> int:
    """``n = ceil(d / rank)``: how many bases cover ``d`` columns."""
    return -(-d // rank)


def _uniform_AB(seed: int, rank: int, D: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniforms for ``A`` ``(rank, d)``, ``B`` ``(D, n, rank)``: a generator per block, seeded by its key's blake2b."""

    def draw(shape: tuple[int, int], *key: object) -> torch.Tensor:
        digest = hashlib.blake2b("|".join(map(str, ("randlora", seed, rank, *key))).encode(), digest_size=8).digest()
        # float32 whatever torch's default dtype: the draws never change
        seed_ = int.from_bytes(digest, "little") & (2**63 - 1)
        return torch.rand(shape, generator=torch.Generator().manual_seed(seed_), dtype=torch.float32)

    A = torch.cat([torch.empty(rank, 0, dtype=torch.float32),
                   *(draw((rank, _BLOCK), "A", j) for j in range(_num_bases(d, _BLOCK)))], 1)
    n, rows = _num_bases(d, rank) if D else 0, _num_bases(D, _BLOCK) * _BLOCK
    B = torch.empty(rows, n, rank, dtype=torch.float32)
    for b, i in ((b, i) for b in range(n) for i in range(rows // _BLOCK)):
        B[i * _BLOCK : (i + 1) * _BLOCK, b] = draw((_BLOCK, rank), "B", b, i)
    return A[:, :d].contiguous(), B[:D].contiguous()


def _fix_diagonal(block: torch.Tensor, u: torch.Tensor) -> None:
    """Set ``block``'s diagonal (0 or ±1) so all leading principal minors are odd: LU over GF(2), 62-bit words."""
    K, WB = block.shape[0], 62
    nw, idx = -(-K // WB), torch.arange(K)
    bits = F.pad((block != 0).to(torch.int64).fill_diagonal_(0), (0, nw * WB - K))
    words = (bits.view(K, nw, WB) << torch.arange(WB)).sum(-1)  # distinct powers of two: the sum is an or
    on = torch.zeros(K, dtype=torch.bool)
    for k in range(K):
        w, bit = divmod(k, WB)
        row = words[k, w:]  # the words left of w hold only eliminated columns
        if not (int(row[0]) >> bit) & 1:
            on[k] = True
            row[0] |= 1 << bit
        rest = words[k + 1 :, w:]
        rest ^= (-((rest[:, 0] >> bit) & 1)).unsqueeze(1) & row  # eliminate bit k below the pivot
    block[idx, idx] = torch.where(on, (u[idx, idx] >= 0.5).to(torch.int8) * 2 - 1, torch.zeros((), dtype=torch.int8))


def _sparse_AB(seed: int, rank: int, D: int, d: int, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary int8 ``A`` ``(rank, d)`` (per ``d``), ``B`` ``(D, n, rank)``; odd-minor diagonals keep ΔW full rank."""
    uA, uB = _uniform_AB(seed, rank, D, d)
    A, B = ((u > 1 - 1 / (2 * s)).to(torch.int8) - (u < 1 / (2 * s)).to(torch.int8) for u in (uA, uB))
    n = _num_bases(d, rank)
    sizes = [d // n + (b < d % n) for b in range(n)]  # A's n diagonal blocks, near equal
    for a, u in zip(A.split(sizes, 1), uA.split(sizes, 1)):
        _fix_diagonal(a[: a.shape[1]], u[: u.shape[1]])
    K = min(D, n * rank)
    _fix_diagonal(B.view(D, n * rank)[:K, :K], uB.view(D, n * rank)[:K, :K])
    return A, B


class _Bases:
    """An adapter's shared bases, from ``seed`` or ``stored`` (a PEFT file's): per (device, dtype), grown on demand."""

    def __init__(self, rank: int, seed: int = 0, kind: str = "dense", stored=None, peft: dict | None = None) -> None:
        self.rank, self.seed, self.kind, self.peft = rank, seed, kind, dict(peft or {})
        self.stored = None if stored is None else tuple(t.detach().to("cpu", torch.float32) for t in stored)
        self._copies: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._per_shape: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # one view pair a shape: one graph input

    def __deepcopy__(self, memo: dict) -> _Bases:
        return self

    def __reduce__(self):  # unpickled (torch.load of a whole model), seeded bases are the shared object again
        if self.stored is None:
            return _Bases.seeded, (RandLoraConfig(self.rank, seed=self.seed, bases=self.kind),)
        return _Bases, (self.rank, self.seed, self.kind, self.stored, self.peft)

    def scale(self, width: int) -> float | None:
        """The int8 bases' scale ``sqrt(s)`` for a layer of ``width`` (unit variance; float32), None for float bases."""
        return (None if self.kind == "dense"
                else float(torch.tensor(math.sqrt(self._sparsity(width)), dtype=torch.float32)))

    def _sparsity(self, width: int) -> float:
        """``s``: a ternary entry is non-zero with probability ``1/s``."""
        return 3.0 if self.kind == "sparse" else math.sqrt(width)

    @torch.inference_mode(False)  # cached copies made inside inference_mode would be unusable for training ever after
    def get(self, D: int, d: int, device, dtype: torch.dtype,
            width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's views ``A`` ``(r, d)``, ``Bf`` ``(D, n*r)`` in ``dtype``; int8 for sparse kinds (sparsity of
        ``width``, else ``d``)."""
        s, n = None if self.kind == "dense" else self._sparsity(width or d), _num_bases(d, self.rank)
        key = (torch.device(device), dtype if s is None else torch.int8, s)
        if (views := self._per_shape.get((*key, D, d))) is not None:
            return views
        hit = self._copies.get(key)  # (A, or None for sparse kinds, whose A is kept per d; B)
        if hit is None or hit[1].shape[0] < D or hit[1].shape[1] < n or (s is None and hit[0].shape[1] < d):
            D_, d_ = (D, d) if hit is None else (
                max(D, hit[1].shape[0]), max(d, hit[1].shape[1] * self.rank if s else hit[0].shape[1]))
            if self.stored is not None:
                A, B = self.stored
                if A.shape[1] < d or B.shape[0] < D or B.shape[1] < n:
                    raise ValueError(f"the stored bases A {tuple(A.shape)}, "
                                     f"B {tuple(B.shape)} are too small for D={D}, d={d}")
            elif s is None:
                A, B = ((u * 2 - 1) * math.sqrt(3) for u in _uniform_AB(self.seed, self.rank, D_, d_))
            else:
                A, B = None, _sparse_AB(self.seed, self.rank, D_, d_, s)[1]
            hit = self._copies[key] = (None if A is None else A.to(device, key[1]), B.to(device, key[1]))
            self._per_shape = {k: v for k, v in self._per_shape.items() if k[:3] != key}  # old copy's views: free it
        if s is not None and (*key, d) not in self._copies:
            self._copies[(*key, d)] = _sparse_AB(self.seed, self.rank, 0, d, s)[0].to(device)
        views = self._per_shape[(*key, D, d)] = (self._copies[(*key, d)] if s is not None else hit[0][:, :d],
                                                 hit[1][:D, :n].flatten(1))
        return views

    def dense(self, D: int, d: int, dtype: torch.dtype = torch.float32, device="cpu", width: int | None = None):
        """One layer's bases as floats: ``A`` ``(r, d)``, ``Bf`` ``(D, n*r)``."""
        return tuple(_materialize(t, dtype, self.scale(width or d)) for t in self.get(D, d, device, dtype, width))

    _shared: weakref.WeakValueDictionary[tuple, _Bases] = weakref.WeakValueDictionary()  # freed with the last layer

    @classmethod
    def seeded(cls, config: RandLoraConfig) -> _Bases:
        """The one bases object of ``config``'s (rank, seed, kind) while any layer holds it."""
        key = (config.rank, config.seed, config.bases)
        return cls._shared.setdefault(key, cls(*key))


# -----------------------------------------------------------------------------
# Math (docs/MATH.md#the-update, #gradients) and its Triton kernels: on CUDA each elementwise step is one kernel (S
# written once, dS read once) with the reference's float32 expressions; the reference runs elsewhere (CPU, float64,
# torch.compile graphs, which inductor fuses, RANDLORA_TRITON=0).


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, without a copy when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


def _update_dtype(dtype: torch.dtype) -> torch.dtype:
    """An update's dtype: float32 for float16, whose range rounds ``S``'s small entries to subnormals."""
    return torch.float32 if dtype == torch.float16 else dtype


def _materialize(t: torch.Tensor, dtype: torch.dtype, scale: float | None) -> torch.Tensor:
    """Bases in ``dtype``: float ones as they are, int8 ones times their scale (a temporary)."""
    return _as(t, dtype) if scale is None else t.to(dtype).mul_(scale)


def _adapted_weight(W, S: torch.Tensor, Bf: torch.Tensor, scaling: float, out_ge_in: bool, owned: bool = False):
    """``W + scaling ΔW`` ``(out, in)`` in one matmul (``s ΔW`` alone for ``W`` None; into ``W`` when ``owned``)."""
    lhs, rhs = (Bf, S) if out_ge_in else (S.t(), Bf.t())
    if W is None:
        return torch.mm(lhs, rhs).mul_(scaling)
    return W.addmm_(lhs, rhs, alpha=scaling) if owned else torch.addmm(W, lhs, rhs, alpha=scaling)


_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # tests run the kernels on the CPU
triton = None
if os.environ.get("RANDLORA_TRITON", "1") != "0":
    with contextlib.suppress(Exception):  # not installed (CPU builds) or broken: the reference is always there
        import triton.language as tl  # first: a broken triton.language leaves ``triton`` None
        import triton
TRITON = triton is not None

if triton is not None:

    @triton.jit
    def _small_basis_kernel(S, lam, A, gam, n, d, s_row, a_row, g_row, BLOCK: tl.constexpr):
        row = tl.program_id(0)  # k * n + b
        k, b = row // n, row % n
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = j < d
        a = tl.load(A + k * a_row + j, mask=mask).to(tl.float32)
        g = tl.load(gam + b * g_row + j, mask=mask).to(tl.float32)
        lk = tl.load(lam + row).to(tl.float32)
        tl.store(S + row * s_row + j, (lk * g * a).to(S.dtype.element_ty), mask=mask)  # the reference's order

    @triton.jit
    def _scale_grads_kernel(dS, A, lam, gam, dgam, part, r, n, d, ds_row, a_row, g_row, scaling, BLOCK: tl.constexpr):
        # Per (basis b, column block): dS[k*n + b, j] read once for all k; dlam as per-block partials (deterministic)
        b, jb = tl.program_id(0), tl.program_id(1)
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


def _use_triton(t: torch.Tensor, *more: torch.Tensor) -> bool:
    """Whether the Triton kernels take these operands: CUDA (or the interpreter), not float64, not traced."""
    ok = TRITON and (t.is_cuda or _TRITON_INTERPRET) and t.dtype != torch.float64 and not torch.compiler.is_compiling()
    return ok and (t, *more)[-1].is_contiguous() and all(u.stride(-1) == 1 for u in (t, *more))


def _small_basis(lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``S`` ``(r*n, d)``: ``lam[k, b] * A[k, j] * gam[b, j]`` in float32 (float64 for float64), rounded once."""
    (r, n), d = lam.shape, gam.shape[1]
    if _use_triton(A, gam, lam):
        S = torch.empty(r * n, d, dtype=dtype, device=A.device)
        _small_basis_kernel[(r * n, triton.cdiv(d, 1024))](S, lam, A, gam, n, d, S.stride(0), A.stride(0),
                                                           gam.stride(0), BLOCK=1024)
        return S
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    lg = _as(lam, acc).unsqueeze(2) * _as(gam, acc)  # times A, rounded once to dtype (in place if dtype is acc)
    return torch.mul(lg, A.unsqueeze(1), out=lg if dtype == acc else torch.empty_like(lg, dtype=dtype)).flatten(0, 1)


def _scale_grads(dS: torch.Tensor, lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor, scaling: float):
    """``dlam`` ``(r, n)``, ``dgam`` ``(n, d)`` (float32; float64 for float64) from the unscaled ``dS`` ``(r*n, d)``."""
    (r, n), d = lam.shape, gam.shape[1]
    if _use_triton(dS, A, gam, lam):
        blocks = triton.cdiv(d, 256)
        dgam, part = (torch.empty(shape, dtype=torch.float32, device=dS.device) for shape in ((n, d), (r, n, blocks)))
        args = (dS, A, lam, gam, dgam, part, r, n, d, dS.stride(0), A.stride(0), gam.stride(0), scaling)
        _scale_grads_kernel[(n, blocks)](*args, BLOCK=256)
        return part.sum(-1), dgam
    acc = torch.float64 if dS.dtype == torch.float64 else torch.float32
    dSA = dS.view(r, n, -1) * (_as(A, acc) * scaling).unsqueeze(1)  # (r, n, d)
    return _as((dSA * _as(gam, acc)).sum(-1), lam.dtype), _as((dSA * _as(lam, acc).unsqueeze(-1)).sum(0), gam.dtype)


# -----------------------------------------------------------------------------
# Autograd: one function for a layer's output, one for a weight a parent reads (docs/MATH.md#gradients)


class _Plan(NamedTuple):
    """What every call of a layer reads, decided at inject, on ``.to()`` and on a config change."""

    scaling: float
    out_ge_in: bool
    scale: float | None  # the int8 bases' scale; None for float bases
    build_from: int  # the forward builds W' from this many tokens on (docs/MATH.md#cost-model)
    free: bool  # "auto": the backward picks its own cheapest routes
    shape: tuple[int, int, int]  # (out, in, r*n)
    amp: bool  # autocast exists on the layer's device type
    device_type: str


class _Call(NamedTuple):
    """One forward's choices: the plan, the strategy for its token count, and where its ``W'`` may wait (eager only)."""

    plan: _Plan
    build: bool
    memo: _WeightMemo | None = None
    key: tuple | None = None
    keep: bool = False  # this forward leaves its W' in memo: a checkpoint recompute, or hold_weights
    unpack: Callable[[], torch.Tensor] | None = None  # a 4-bit base's dequantizer (a new tensor per call)


@functools.lru_cache(maxsize=4096)  # a layer's backward asks for the same few (N, ...) every step
def _backward_routes(N: int, out_f: int, in_f: int, rn: int, have_W: bool, need_x: bool, need_S: bool):
    """The cheapest exact backward's ``(dX, dS)`` routes (MATH.md#cost-model): ``"W'"``/``"G"`` or ``"factorized"``."""
    build, fact, G, shared = (out_f * in_f * rn, N * rn * (out_f + in_f), (N + rn) * out_f * in_f,
                              N * out_f * rn if out_f >= in_f else 0)

    def cost(dx: str, ds: str) -> int:
        dx_cost = ((0 if have_W else build) if dx == "W'" else fact) if need_x else 0
        return dx_cost + ((G if ds == "G" else fact - (shared if need_x and dx == "factorized" else 0))
                          if need_S else 0)

    routes = [(dx, ds) for dx in ("W'", "factorized") for ds in ("G", "factorized")]
    costs = [cost(*route) for route in routes]
    # the first of the cheapest; under torch.compile with a dynamic N only one known cheapest without a guard, else None
    return next((r for r, c in zip(routes, costs) if all(statically_known_true(c <= o) for o in costs)), None)


def _build_from(out_f: int, in_f: int, rn: int, strategy: str) -> int:
    """The token count from which building ``W'`` is the cheaper forward: ``D d rn < N rn (D + d)``."""
    return {"build": 0, "factorized": sys.maxsize}.get(strategy, out_f * in_f // (out_f + in_f) + 1)


@dataclasses.dataclass(eq=False, slots=True)
class _WeightMemo:
    """Where a layer's ``W'`` waits: from a checkpoint recompute to its backward, or under :func:`hold_weights`."""

    entry: tuple[tuple, torch.Tensor] | None = None
    hold: bool = False

    def __deepcopy__(self, memo: dict) -> _WeightMemo:
        return _WeightMemo()  # a copy of the model never shares a held W'

    @staticmethod
    def key(W: torch.Tensor | None, lam: torch.Tensor, gam: torch.Tensor, dtype: torch.dtype) -> tuple:
        """What ``W'`` depends on: each tensor (by id: the key holds it, so no new one takes the id), data, version."""
        ts = [t for t in (lam, gam, W) if t is not None]
        roots = [t if t._base is None else t._base for t in ts]  # a view (Conv1D's .t()) is a new object per call
        return dtype, tuple((id(r), t.data_ptr(), t._version) for r, t in zip(roots, ts)), roots

    def get(self, key: tuple | None, take: bool = False) -> torch.Tensor | None:
        e = self.entry
        if take and not self.hold:
            self.entry = None
        return e[1] if key is not None and e is not None and e[0][:2] == key[:2] else None


class RandLoraFunction(torch.autograd.Function):
    """``y = x W^T + b + s x ΔW^T`` ``(N, out)`` keeping nothing but the input for backward
    (MATH.md#two-exact-strategies); ``W`` None: the caller runs its base and this adds the adapter's term."""

    @staticmethod
    def forward(ctx, x, W, bias, lam, gam, A, Bf, call):
        p, dtype = call.plan, x.dtype
        A_, Bf_ = _materialize(A, dtype, p.scale), _materialize(Bf, dtype, p.scale)
        if call.build:
            Wp = call.memo.get(call.key) if call.memo is not None and call.memo.hold else None
            if Wp is None:
                owned = call.unpack is not None
                Wp = _adapted_weight(call.unpack() if owned else W, _small_basis(lam, gam, A_, dtype), Bf_, p.scaling,
                                     p.out_ge_in, owned)
                if call.keep:
                    call.memo.entry = (call.key, Wp)
            y = F.linear(x, Wp, bias)
        else:
            if p.out_ge_in:  # (x S^T) Bf^T: S carries lam and gam, so x S^T is already small
                lhs, rhs = x @ _small_basis(lam, gam, A_, dtype).t(), Bf_.t()
            else:  # (x Bf diag(lam)) S': x Bf alone overflows fp16 sooner than x W^T
                lhs, rhs = (x @ (Bf_ * _as(lam.detach().flatten(), dtype)),
                            _small_basis(torch.ones_like(lam), gam, A_, dtype))
            if W is not None:
                y = F.linear(x, W, bias).addmm_(lhs, rhs, alpha=p.scaling)
            else:
                y = torch.mm(lhs, rhs).mul_(p.scaling) if bias is None else torch.addmm(bias, lhs, rhs, alpha=p.scaling)
        ctx.save_for_backward(x, W, lam, gam, A, Bf)
        ctx.call = call  # a None bias has needs_input_grad False: its grad below is None
        return y

    @staticmethod
    def backward(ctx, dY):
        x, W, lam, gam, A, Bf = ctx.saved_tensors
        c, (need_x, need_W, need_b, need_lam, need_gam) = ctx.call, ctx.needs_input_grad[:5]
        Wp = c.memo.get(c.key, take=True) if c.memo is not None else None
        if torch.is_grad_enabled():  # create_graph=True (a gradient penalty): gradients that differentiate again
            W = c.unpack() if c.unpack is not None else W
            y = lambda x, W, lam, gam: F.linear(x, _weight_again(W, lam, gam, A, Bf, c.plan, x.dtype))
            dX, dW, dlam, dgam = _grads_again(y, (x, W, lam, gam), (need_x, need_W, need_lam, need_gam), dY)
            return dX, dW, dY.sum(0) if need_b else None, dlam, dgam, None, None, None
        p, dtype, need_S, s = c.plan, x.dtype, need_lam or need_gam, c.plan.scaling
        dY = _as(dY, dtype)
        A_, Bf_ = _materialize(A, dtype, p.scale), _materialize(Bf, dtype, p.scale)
        # the cheapest routes (no cache in a graph) where auto and known, else the forward's own
        routes = _backward_routes.__wrapped__ if torch.compiler.is_compiling() else _backward_routes
        chosen = routes(x.shape[0], *p.shape, Wp is not None, need_x, need_S) if p.free else None
        dx_route, ds_route = chosen or (("W'", "G") if c.build else ("factorized", "factorized"))
        fact_x, fact_S = need_x and dx_route == "factorized", need_S and ds_route == "factorized"
        # dX through the factors, or through a W' built here, needs S (and a 4-bit base's W, dequantized again)
        S = _small_basis(lam, gam, A_, dtype) if fact_x or (need_x and Wp is None) else None
        W = c.unpack() if S is not None and c.unpack is not None else W
        dX = dS = G = None
        if need_x and not fact_x:
            dX = dY @ (Wp if Wp is not None else _adapted_weight(W, S, Bf_, s, p.out_ge_in, c.unpack is not None))
        del Wp
        if need_S and not fact_S:
            G = dY.t() @ x  # (out, in): full fine-tuning's weight gradient
            dS = Bf_.t() @ (G if p.out_ge_in else G.t())  # (r*n, d), unscaled
        dH = dY @ Bf_ if p.out_ge_in and (fact_x or fact_S) else None  # (N, r*n): y += s (x S^T) Bf^T, else s (x Bf) S
        if fact_x:  # dY W' = dY W + s (dY lhs) rhs, with _adapted_weight's lhs and rhs
            dL, rhs = (dH, S) if p.out_ge_in else (dY @ S.t(), Bf_.t())
            dX = torch.mm(dL, rhs).mul_(s) if W is None else torch.addmm(dY @ W, dL, rhs, alpha=s)
        if fact_S:
            dS = dH.t() @ x if p.out_ge_in else (x @ Bf_).t() @ dY
        dW = (G if G is not None else dY.t() @ x) if need_W else None
        dlam, dgam = _scale_grads(dS, lam, gam, A_, s) if dS is not None else (None, None)
        return dX, dW, dY.sum(0) if need_b else None, dlam, dgam, None, None, None


def _weight_again(W, lam, gam, A, Bf, p: _Plan, dtype: torch.dtype) -> torch.Tensor:
    """:func:`_adapted_weight`, ``S`` in autograd's ops (rounded as in :func:`_small_basis`): differentiable again."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    A_, Bf_ = _materialize(A, dtype, p.scale), _materialize(Bf, dtype, p.scale)
    S = (_as(lam, acc).unsqueeze(2) * _as(gam, acc) * _as(A_, acc).unsqueeze(1)).flatten(0, 1).to(dtype)
    return _adapted_weight(W, S, Bf_, p.scaling, p.out_ge_in)


def _grads_again(f: Callable, inputs: tuple, needs: tuple, dy: torch.Tensor) -> list:
    """``dy``-weighted gradients of ``f(*inputs)`` as a graph, via aliases: input hooks run once (outer backward)."""
    alias = [t if t is None else t.view_as(t) for t in inputs]
    y, wanted = f(*alias), [a for a, n in zip(alias, needs) if n]
    got = iter(torch.autograd.grad(y, wanted, _as(dy, y.dtype), create_graph=True, allow_unused=True) if wanted else ())
    return [next(got) if n else None for n in needs]


class AdaptedWeight(torch.autograd.Function):
    """``W' = W + s ΔW`` ``(out, in)`` for code that reads a weight instead of calling the layer (MHA, T5, the encoder
    fast path), saving only lam, gam, the bases; ``kept``: this ``W'`` held by :func:`hold_weights` (returns a copy)."""

    @staticmethod
    def forward(ctx, W, lam, gam, A, Bf, plan, kept=None):
        ctx.save_for_backward(lam, gam, A, Bf)
        ctx.plan, ctx.dtype = plan, (dt := _update_dtype(W.dtype))  # float16: W' = W + s ΔW in float32, rounded once
        if kept is not None:
            return kept.clone()
        A_, Bf_ = _materialize(A, dt, plan.scale), _materialize(Bf, dt, plan.scale)
        return _as(_adapted_weight(_as(W, dt), _small_basis(lam, gam, A_, dt), Bf_, plan.scaling, plan.out_ge_in),
                   W.dtype)

    @staticmethod
    def backward(ctx, dWp):
        lam, gam, A, Bf = ctx.saved_tensors
        p, dWp, dlam, dgam = ctx.plan, _as(dWp, ctx.dtype), None, None
        if torch.is_grad_enabled():  # create_graph=True: gradients that differentiate again
            dlam, dgam = _grads_again(lambda lam, gam: _weight_again(None, lam, gam, A, Bf, p, ctx.dtype), (lam, gam),
                                      ctx.needs_input_grad[1:3], dWp)
        elif ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            A_, Bf_ = _materialize(A, ctx.dtype, p.scale), _materialize(Bf, ctx.dtype, p.scale)
            dlam, dgam = _scale_grads(Bf_.t() @ (dWp if p.out_ge_in else dWp.t()), lam, gam, A_, p.scaling)
        return (dWp if ctx.needs_input_grad[0] else None), dlam, dgam, None, None, None, None


# -----------------------------------------------------------------------------
# Adapters

_RANK_TOO_LARGE = "rank {} is larger than min(in, out) = {} of layer {} (in_features={}, out_features={})"
_ON_META = ("layer {}: lam/gam are on the meta device (adapted while on meta, or offloaded), so the update has no "
            "values; materialize the model first: model.to_empty(device=...), then load its weights")


class _Views(dict):
    """A layer's views of the shared bases per compute dtype: immutable values, so a copy of the model shares them."""

    def __deepcopy__(self, memo: dict) -> _Views:
        return self


def _check_config(config: object) -> None:
    """Refuse anything but a RandLoraConfig, naming the spelling that works."""
    if not isinstance(config, RandLoraConfig):
        raise TypeError("config must be a RandLoraConfig, e.g. RandLoraConfig(rank=4), "
                        f"got {type(config).__name__} {_short(config)}")


class RandLoraAdapter(nn.Module):
    """What every adapter has: a config, the shared bases, a plan decided once, trained float32 ``lam`` and ``gam``."""

    mergeable, shows = True, "adapted"
    _dropout_refusal = ""  # why no dropout can apply here (a parent reads the weight): set by _adapt / _build

    def __init__(self, in_f: int, out_f: int, config: RandLoraConfig, name: str, bases, device) -> None:
        super().__init__()
        _check_config(config)
        if config.rank > min(in_f, out_f) and bases is None:  # stored (PEFT) bases may have r > d
            raise ValueError(_RANK_TOO_LARGE.format(_short(config.rank), min(in_f, out_f), _short(name), in_f, out_f))
        self.in_features, self.out_features, self.d, self.D = in_f, out_f, min(in_f, out_f), max(in_f, out_f)
        self.n, self.config, self.name = _num_bases(self.d, config.rank), config, name
        self._bases = _Bases.seeded(config) if bases is None else bases
        self._memo, self.merged, self.disabled, self._merged_params = _WeightMemo(), False, False, None
        self.lam = nn.Parameter(torch.empty(config.rank, self.n, device=device, dtype=torch.float32))
        self.gam = nn.Parameter(torch.empty(self.n, self.d, device=device, dtype=torch.float32))
        self.reset_parameters()
        self.register_load_state_dict_post_hook(RandLoraAdapter._follow_weight)

    def __getstate__(self) -> dict:
        """Refuse a copy or pickle taken inside disable(): only the original's context would enable it again."""
        if self.__dict__.get("disabled"):
            raise RuntimeError(f"cannot copy or pickle {_short(self.name)} inside randlora.disable(model): the copy "
                               "would stay disabled; copy the model outside the context")
        return nn.Module.__getstate__(self)  # not super(): SavedModule borrows this

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PEFT's initialisation (``lam = 0``: ΔW = 0); also what a model built on meta gets at ``to_empty``."""
        self.lam.zero_()
        self.gam.fill_(1 / max(self.n, self.d))

    rank = property(lambda self: self.config.rank)
    alpha = property(lambda self: self.config.alpha)
    scaling = property(lambda self: self.config.scaling)
    strategy = property(lambda self: self.config.strategy,
                        lambda self, v: self.set_config(dataclasses.replace(self.config, strategy=v)))

    path = property(None, lambda self, value: self.__getattr__("path"))  # retired: reading it lands in __getattr__ too

    def __getattr__(self, name: str):
        # A property's AttributeError lands here, where nn.Module's would replace its message.
        if name == "path":
            raise AttributeError(".path was renamed .strategy in 0.2 and removed in 0.3: use .strategy")
        if name == "weight" and self.shows is None:
            raise AttributeError(f"RandLoraLinear {_short(self.name)} wraps a {type(self.base).__name__} with "
                                 "its own forward: code that reads its .weight would compute without the "
                                 "adapter (call the layer instead)")
        return super().__getattr__(name)

    def set_config(self, config: RandLoraConfig) -> None:
        """Take ``config``'s per-layer settings (dropout, strategy); the shared ones must not change."""
        _check_config(config)
        if config.dropout > 0 and self._dropout_refusal:
            raise ValueError(f"layer {_short(self.name)} cannot take dropout {config.dropout}: {self._dropout_refusal}")
        if config.shared != self.config.shared or (config.dropout > 0 and "dropout" not in self._modules):
            raise ValueError(f"layer {_short(self.name)} cannot take {config}: (rank, alpha, seed, bases) must stay "
                             f"{self.config.shared}{'' if 'dropout' in self._modules else ', and it takes no dropout'}")
        if config != self.config:
            self.config = config
            if "dropout" in self._modules:
                self.dropout = nn.Dropout(config.dropout).train(self.training) if config.dropout > 0 else nn.Identity()
            self._replan()

    def _replan(self, dtype: torch.dtype | None = None) -> None:
        """Decide once what every call reads: the plan, and this layer's views of the bases for its weight's dtype."""
        c, device, shape = self.config, self.lam.device, (self.out_features, self.in_features, self.rank * self.n)
        self._plan = _Plan(c.scaling, self.out_features >= self.in_features, self._bases.scale(self.d),
                           _build_from(*shape, c.strategy), c.strategy == "auto", shape,
                           torch.amp.is_autocast_available(device.type), device.type)
        self._views, self._memo.entry = _Views(), None
        self._bases_in(_update_dtype(dtype or self._compute_dtype()))

    def _bases_in(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's ``A`` ``(r, d)`` and ``Bf`` ``(D, n*r)`` for compute ``dtype`` (int8 for sparse kinds)."""
        key = dtype if self._plan.scale is None else torch.int8
        v = self._views.get(key)
        if v is None:
            if torch.compiler.is_compiling():  # no side effects while tracing: float32 values cast as eager casts them
                exact = [t for k, t in self._views.items() if k in (torch.float32, torch.float64)]
                if not exact:
                    raise RuntimeError(f"layer {_short(self.name)}: traced with {key} bases, planned for "
                                       f"{_short_list(list(self._views))}: its weight's dtype changed without .to() "
                                       "or autocast asks for another; run one forward eagerly first")
                return tuple(_as(t, key) for t in exact[0])
            v = self._views[key] = self._bases.get(self.D, self.d, self.lam.device, key)
            for t in v if v[0].is_cuda else ():  # CUDA graphs (mode="reduce-overhead") read them in place, never copy
                torch._dynamo.mark_static_address(t)
        return v

    def _compute_dtype(self) -> torch.dtype:
        """The dtype the update is computed in for this layer's weight."""
        return self._stored_weight().dtype

    def _apply(self, fn, recurse: bool = True):
        # .half() / .to(dtype) cast the base, but lam/gam and their grads stay float32 with the values from before
        before = [(p.data, None if p.grad is None else p.grad.data) for p in (self.lam, self.gam)]
        super()._apply(fn, recurse)
        for p, olds in zip((self.lam, self.gam), before):
            for attr, old in zip(("data", "grad"), olds):
                if (new := getattr(p, attr)) is not None and new.is_floating_point() and new.dtype != torch.float32:
                    setattr(p, attr, old.to(new.device) if old.dtype == torch.float32 and not old.is_meta
                            else new.float())
        if before[0][0].is_meta and not self.lam.is_meta:
            self.reset_parameters()  # built on meta, then to_empty(): no values to keep, start from ΔW = 0
        if "_plan" in self.__dict__:
            self._replan(self._converted_dtype(fn))
        return self

    def _converted_dtype(self, fn) -> torch.dtype:
        """The weight's dtype after conversion ``fn`` (``_apply`` converts a layer's children first: its base)."""
        return self._compute_dtype()

    def _follow_weight(self, *_) -> None:
        """Plan for the device and dtype a load (a post-hook: the base loads after this one) or an assignment brings."""
        if "_plan" not in self.__dict__:
            return
        if self.lam.device.type != self._plan.device_type:
            self._replan()  # lam/gam off meta
        else:
            self._bases_in(_update_dtype(self._compute_dtype()))

    def _refuse_training_merged(self) -> None:
        """Refuse a training forward while merged: lam/gam would get no gradient."""
        if (self.merged and self.training and torch.is_grad_enabled()
            and (self.lam.requires_grad or self.gam.requires_grad)):
            raise RuntimeError(f"layer {_short(self.name)} is merged: lam/gam are not used by a merged forward and "
                               "would get no gradient. Call randlora.unmerge(model) before training, or "
                               "model.eval() for inference.")

    def adapted(self, W: torch.Tensor) -> torch.Tensor:
        """``W + scaling * ΔW`` in ``W``'s dtype (autocast or not), differentiable in ``W``, lam and gam."""
        if self._plan.device_type == "meta" and not W.is_meta:
            raise RuntimeError(_ON_META.format(_short(self.name)))
        # e.g. resize_token_embeddings swapped a tied weight's .data
        if W.shape != (self.out_features, self.in_features):
            raise ValueError(f"layer {_short(self.name)}: its weight is now {tuple(W.shape)}, but it was "
                             f"adapted as {(self.out_features, self.in_features)}: resize "
                             "(resize_token_embeddings, ...) before inject")
        p, args = self._plan, (W, self.lam, self.gam, *self._bases_in(_update_dtype(W.dtype)), self._plan)
        with (torch.autocast(p.device_type, enabled=False) if p.amp and torch.is_autocast_enabled(p.device_type)
              else contextlib.nullcontext()):
            if not self._memo.hold or torch.compiler.is_compiling():
                return AdaptedWeight.apply(*args)
            # hold_weights: MHA reads in_proj_weight up to 5 times
            key = _WeightMemo.key(W, self.lam, self.gam, W.dtype)
            if self._memo.get(key) is None:
                with torch.no_grad():
                    self._memo.entry = (key, AdaptedWeight.apply(*args))
            return AdaptedWeight.apply(*args, self._memo.get(key))

    @torch.no_grad()
    def merge(self) -> None:
        """Add ``scaling * ΔW`` to the base weight (in float32, float64 for float64, rounded once); idempotent."""
        if not self.mergeable:
            raise TypeError(f"cannot merge: layer {_short(self.name)} wraps a {type(self.base).__name__}, "
                            + _UNMERGEABLE)
        if not self.merged:
            params = (self.lam.detach().clone(), self.gam.detach().clone())
            self._add_to_weight(*params, 1.0)
            self._merged_params, self.merged = params, True  # after the add: one that raises leaves all as it was

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract what :meth:`merge` added (from lam/gam as they were at merge time)."""
        if self.merged:
            self._add_to_weight(*self._merged_params, -1.0)
            self._merged_params, self.merged = None, False

    def _add_to_weight(self, lam: torch.Tensor, gam: torch.Tensor, sign: float) -> None:
        """Add ``sign * scaling * ΔW(lam, gam)`` to the stored weight."""
        w, self._memo.entry = self._stored_weight(), None
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        w.copy_((w.to(acc) + sign * self.delta_weight(acc, lam, gam).to(w.device)).to(w.dtype))

    # While merged, the state dict says so ("<layer>._extra_state" = [1, lam, gam as merged]): never loaded as unmerged.
    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            flat = [t.float().cpu().flatten() for t in self._merged_params]
            destination[prefix + "_extra_state"] = torch.cat([torch.ones(1), *flat])

    def _parse_merge_state(self, state: object) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A state dict's merge state, checked: None (unmerged) or ``(lam, gam)`` as merged (float32, on its device)."""
        r, n, d = self.rank, self.n, self.d
        ok = (isinstance(state, torch.Tensor) and state.dim() == 1 and state.is_floating_point()
              and state.layout == torch.strided and not state.is_meta)
        if ok and state.numel() == 1 and state.item() == 0:
            return None
        if not (ok and state.numel() == 1 + r * n + n * d and state[0].item() == 1 and torch.isfinite(state).all()):
            got = f"{type(state).__name__} {tuple(state.shape)}" if isinstance(state, torch.Tensor) else _short(state)
            raise ValueError(f"layer {_short(self.name)}: the merge state in the state dict is {got}; expected [0] "
                             f"(unmerged) or [1, lam ({r}x{n}), gam ({n}x{d})] (merged), finite float")
        if self.disabled:
            raise ValueError(f"layer {_short(self.name)}: "
                             "a merged state cannot be loaded inside randlora.disable(); load it outside")
        flat = state.detach().float()
        return flat[1 : 1 + r * n].reshape(r, n).clone(), flat[1 + r * n :].reshape(n, d).clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        key, self._memo.entry = prefix + "_extra_state", None
        # a merge state describes the weight loaded with it (none: an unmerged one), never the weight held here
        brings_weight = (prefix + "base.weight" in state_dict if isinstance(self, RandLoraLinear)
                         else self.__dict__.pop("_weight_in_load", False))  # see RandLoraWeight._state_hook
        params = self._parse_merge_state(state_dict[key]) if key in state_dict else None  # refused before any change
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if key in unexpected:
            unexpected.remove(key)
        if RandLoraAdapter._follow_weight not in self._load_state_dict_post_hooks.values():  # pickled before it existed
            self.register_load_state_dict_post_hook(RandLoraAdapter._follow_weight)
        if brings_weight:  # lam/gam as merged, on lam's device now
            self._merged_params = None if params is None else tuple(t.to(self.lam.device) for t in params)
            self.merged = params is not None
        elif self.merged and (prefix + "lam" in state_dict or prefix + "gam" in state_dict):
            self.unmerge()  # new lam/gam (load_state_dict(strict=False), PEFT's way) into a merged weight: merge them
            self.merge()

    @torch.no_grad()
    def delta_weight(self, dtype: torch.dtype = torch.float32, lam=None, gam=None) -> torch.Tensor:
        """``scaling * ΔW`` ``(out, in)`` in ``dtype``, computed in float32 (float64 for float64), without grad."""
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"delta_weight's dtype must be a floating torch.dtype, got {_short(dtype)}")
        lam, gam = self.lam if lam is None else lam, self.gam if gam is None else gam
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        A, Bf = self._bases.dense(self.D, self.d, acc, device=lam.device)
        M = Bf @ _small_basis(lam, gam, A, acc)
        return ((M if self.out_features >= self.in_features else M.t()) * self.scaling).to(dtype)

    def random_bases(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's random bases on the CPU: ``A`` ``(r, d)`` and ``B`` ``(D, n, r)`` (docs/MATH.md#the-update)."""
        A, Bf = self._bases.dense(self.D, self.d, dtype)
        return A.clone(), Bf.reshape(self.D, self.n, self.rank).clone()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bases={self.n} "
                f"({self._bases.kind}), scaling={self.scaling:g}, strategy={self.strategy!r}")


_UNMERGEABLE = ("whose weight is not a plain tensor (quantized, packed or parametrized) or whose forward is hooked or "
                "replaced (accelerate's hooks): merging W + s·ΔW into it would change the result; keep the adapter "
                "unmerged (it computes beside the layer)")


class RandLoraLinear(RandLoraAdapter):
    """A frozen linear layer plus a RandLoRA update: ``y = base(x) + scaling * x ΔW^T``, ``(*, in)`` -> ``(*, out)``.
    ``base``: ``nn.Linear``, transformers' ``Conv1D``, or any module with ``in_features``, ``out_features`` and a
    forward (README: Supported layers)."""

    def __init__(self, base: nn.Module, config: RandLoraConfig, name: str = "", *, bases: _Bases | None = None) -> None:
        feats = _features(base)
        if feats is None:
            raise TypeError(f"{_short(name or type(base).__name__)}: "
                            f"a {type(base).__name__} is not a linear-like layer")
        super().__init__(*feats, config, name, bases,
                         next(iter([*base.parameters(), *base.buffers()]), torch.empty(0)).device)
        self.base = base.requires_grad_(False)
        self.layout, self.shows = _classify(base)
        self.mergeable = self.layout in ("linear", "conv1d")
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.train(base.training)
        self._replan()

    def _compute_dtype(self) -> torch.dtype:
        """The base's weight dtype; a 4-bit base's compute dtype (float32 if it has none)."""
        w = getattr(self.base, "weight", None)
        if self.layout != "4bit" and isinstance(w, torch.Tensor) and w.is_floating_point():
            return w.dtype
        return getattr(self.base, "compute_dtype", None) or torch.float32

    def __setattr__(self, name: str, value: object) -> None:
        if name not in ("weight", "bias") or "base" not in self.__dict__.get("_modules", {}):
            return super().__setattr__(name, value)
        # tie_weights() assigns lm_head.weight
        if self.merged:
            raise RuntimeError(f"layer {_short(self.name)} is merged: unmerge(model) before assigning its {name}")
        old = getattr(self.base, name, None)
        if isinstance(value, torch.Tensor) and isinstance(old, torch.Tensor) and value.shape != old.shape:
            raise ValueError(f"layer {_short(self.name)} is adapted for a {name} of shape {tuple(old.shape)}, "
                             f"got {tuple(value.shape)}: resize (resize_token_embeddings, ...) before inject")
        setattr(self.base, name, value)
        self._follow_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            self._refuse_training_merged()
            return self.base(x)
        if x.is_nested:  # nn.TransformerEncoder's inference path: s ΔW as a weight beside the base's own call
            if self.training and self.config.dropout > 0:
                raise ValueError(f"RandLoraLinear {_short(self.name)}: adapter dropout on a nested-tensor input is not "
                                 "supported; pad the input, or call model.eval()")
            adt = _update_dtype(x.dtype)
            delta = _weight_again(None, self.lam, self.gam, *self._bases_in(adt), self._plan, adt)
            return self.base(x) + F.linear(x, delta.to(x.dtype))
        if x.dim() == 0 or x.shape[-1] != self.in_features or not x.is_floating_point():
            raise ValueError(f"RandLoraLinear {_short(self.name)}: input is {x.dtype} {tuple(x.shape)}; expected "
                             f"floating (..., in_features={self.in_features})")
        # the dicts, not nn.Module.__getattr__ (a microsecond a read, for a call whose own work is a few dozen); lam and
        # gam are elsewhere under torch's pruning and parametrize, FSDP1's flat parameters, DataParallel's replicas
        p, dtype, base, ps = self._plan, x.dtype, self._modules["base"], self._parameters
        lam, gam = (ps["lam"], ps["gam"]) if "lam" in ps and "gam" in ps else (self.lam, self.gam)
        if p.device_type == "meta" and not x.is_meta:
            raise RuntimeError(_ON_META.format(_short(self.name)))
        amp = p.amp and torch.is_autocast_enabled(p.device_type)
        if amp and dtype != torch.float64:  # autocast leaves float64 be
            dtype = torch.get_autocast_dtype(p.device_type)
        adt = _update_dtype(dtype)  # float16: the update in float32, beside the base's own call (as PEFT computes it)
        A, Bf = self._bases_in(adt)
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        # under torch.compile with a dynamic token count, build only where known without a guard: one graph for all
        build = statically_known_true(x2.shape[0] >= p.build_from)
        drop = self.training and self.config.dropout > 0
        unpack = _dequantizer(base, dtype) if build and self.layout == "4bit" and not drop else None
        # the base's own call where hooks were set after inject, or for x not in W's dtype without autocast (it raises)
        ok = self.mergeable and (amp or x.dtype == base.weight.dtype) or unpack is not None
        fused = ok and adt == dtype and not drop and not _own_call(base)  # the base matmul runs inside the function
        W, b, unpack = (base.weight, base.bias, unpack) if fused else (None, None, None)
        if build and torch.is_grad_enabled() and not torch.compiler.is_compiling():  # eager: W' may wait for backward
            keep = self._memo.hold or torch._C._current_graph_task_id() != -1  # hold_weights, or a checkpoint recompute
            if not keep:  # a recompute's W' whose backward never ran (an unused output) is stale by now
                self._memo.entry = None
            call = _Call(p, build, self._memo, _WeightMemo.key(W, lam, gam, adt), keep, unpack)
        else:
            call = _Call(p, build, unpack=unpack)
        if fused:
            W = None if unpack is not None else _as(W.t() if self.layout == "conv1d" else W, adt)
            y = RandLoraFunction.apply(_as(x2, adt), W, None if b is None else _as(b, adt), lam, gam, A, Bf, call)
            return y if x2 is x else y.view(*x.shape[:-1], self.out_features)
        with torch.autocast(p.device_type, enabled=False) if adt != dtype and p.amp else contextlib.nullcontext():
            delta = RandLoraFunction.apply(_as(self.dropout(x2), adt), None, None, lam, gam, A, Bf, call)
        y = base(x)
        return y + delta.view(*x.shape[:-1], self.out_features).to(y.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """For parents that read it: ``W + s ΔW`` (differentiable), the base's while merged or disabled or packed."""
        if self.shows is None:
            raise AttributeError("weight")  # __getattr__ says why
        if self.shows == "base" or self.merged or self.disabled:
            return self.base.weight
        if self.layout == "conv1d":
            return self.adapted(self.base.weight.t()).t()
        return self.adapted(self.base.weight)

    bias = property(lambda self: getattr(self.base, "bias", None))

    def _stored_weight(self) -> torch.Tensor:
        """The base weight as stored ``(out, in)``, detached (Conv1D's transposed)."""
        w = self.base.weight.detach()
        return w.t() if self.layout == "conv1d" else w


class RandLoraWeight(RandLoraAdapter):
    """A RandLoRA update on a weight its module reads itself (MHA's input projection) as a parametrization of
    ``owner.<param>``: reading it gives ``W + s ΔW``; ``W`` is ``owner.parametrizations.<param>.original``."""

    layout = "linear"

    def __init__(self, weight: torch.Tensor, config: RandLoraConfig, name: str = "", *, bases=None,
                 training=True) -> None:
        super().__init__(weight.shape[1], weight.shape[0], config, name, bases, weight.device)
        self._slot: tuple[nn.Module, str] | None = None  # (owner, param): set by _adapt, which then plans
        self._param_order: list[str] = []  # the owner's parameter names before, for unwrap
        self.train(training)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            self._refuse_training_merged()
            return W
        return self.adapted(W)

    def _stored_weight(self) -> torch.Tensor:
        """The parametrized weight's ``original`` ``(out, in)``, detached."""
        return self._slot[0].parametrizations[self._slot[1]].original.detach()

    def unwrap(self) -> None:
        """After :meth:`merge`, make the stored weight the owner's plain parameter again (in a class of its own)."""
        owner, param = self._slot
        original, cls = owner.parametrizations[param].original, type(owner)
        del owner.parametrizations[param]
        if len(owner.parametrizations) == 0:
            del owner.parametrizations
        # a new class: a deepcopy of the owner shares the parametrized one
        keep = {k: v for k, v in vars(cls).items() if k != param}
        owner.__class__ = (type(cls.__name__, cls.__bases__, keep) if "parametrizations" in owner._modules
                           else cls.__bases__[0])
        params = dict(owner._parameters, **{param: original})
        owner._parameters.clear()  # back in their order from before; names added since come after
        owner._parameters.update({k: params[k] for k in self._param_order if k in params} | params)

    def _converted_dtype(self, fn) -> torch.dtype:
        """The dtype ``fn`` gives the owner's ``original``, which it converts after this child (tried on ``[:0]``)."""
        with contextlib.suppress(Exception):  # a function for the module's own tensors only: the dtype stays
            return fn(self._stored_weight()[:0]).dtype
        return self._compute_dtype()

    @staticmethod
    def _state_hook(plist: nn.Module, state_dict, prefix: str, *args) -> None:
        """Tell the adapter whether a load brings the weight its merge state describes (its keys are the owner's)."""
        plist[0]._weight_in_load = prefix + "original" in state_dict


class SavedModule(nn.Module):
    """A module trained in full beside the adapters (``modules_to_save``): ``original`` frozen (for :func:`disable`),
    ``trained`` a training copy that adapter files carry. Attributes the wrapper lacks come from the module in use."""

    __getstate__ = RandLoraAdapter.__getstate__

    def __init__(self, module: nn.Module, name: str = "") -> None:
        super().__init__()
        if isinstance(module, (SavedModule, RandLoraAdapter)):
            raise TypeError(f"module {_short(name)} is already a RandLoRA {type(module).__name__}")
        trained = copy.deepcopy(module)  # first: a module deepcopy refuses stays as it was; a tied parameter is copied
        self.original, self.trained = module.requires_grad_(False), trained  # in this order: state dict and optimizer's
        self.name, self.disabled, self.training = name, False, module.training
        self.trainable_()

    def trainable_(self) -> None:
        for p in self.trained.parameters():
            p.requires_grad_(p.is_floating_point() or p.is_complex())

    def forward(self, *args, **kwargs):
        return (self.original if self.disabled else self.trained)(*args, **kwargs)

    def __setattr__(self, name: str, value: object) -> None:
        # e.g. tie_weights() assigning lm_head.weight: which copy should it tie, and would the trained one then train?
        if isinstance(value, torch.Tensor) and "trained" in self._modules and hasattr(self.trained, name):
            raise AttributeError(f"module to save {_short(self.name)} is trained in full as a copy: assign its {name} "
                                 "on .trained or .original (tie_weights() cannot tie a module saved in full)")
        super().__setattr__(name, value)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original", "trained", "_parameters", "_buffers", "_modules"):
                raise
            active = super().__getattr__("original" if self.__dict__.get("disabled") else "trained")
            if not hasattr(active, name):
                raise AttributeError(f"SavedModule {_short(self.__dict__.get('name'))} and its {type(active).__name__} "
                                     f"have no attribute {name!r}") from None
            return getattr(active, name)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, disabled={self.disabled}"


# -----------------------------------------------------------------------------
# Targeting and refusals: what a layer is, decided once from its weight and forward, and what cannot be adapted


def _stored_weight_of(module: nn.Module, name: str = "weight") -> object:
    """``module.<name>`` as stored: reading a parametrized one runs its parametrization (spectral_norm takes a step)."""
    if parametrize.is_parametrized(module, name):  # weight_norm keeps two: original0 (g) and original1 (v)
        plist = module.parametrizations[name]
        return plist.original if hasattr(plist, "original") else getattr(plist, "original1", None)
    return getattr(module, name, None)


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2, weight stored ``(in, out)``), by duck type: transformers is never imported."""
    w = _stored_weight_of(module)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(w, torch.Tensor) and w.dim() == 2


def _features(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of a linear-like module, or None."""
    if isinstance(module, nn.Linear) or _is_conv1d(module):
        return ((module.in_features, module.out_features) if isinstance(module, nn.Linear)
                else tuple(module.weight.shape))
    i, o = getattr(module, "in_features", None), getattr(module, "out_features", None)
    return (i, o) if type(i) is int and type(o) is int and callable(getattr(module, "forward", None)) else None


def _plain_weight(w: object) -> bool:
    """A plain floating 2-D tensor (quantized subclasses pack values behind float dtypes; FSDP2 shards are DTensors)."""
    return ((type(w) in (torch.Tensor, nn.Parameter) or type(w).__name__ == "DTensor") and w.is_floating_point()
            and w.dim() == 2)


def _own_call(module: nn.Module) -> bool:
    """Whether ``module``'s own call must run: it has hooks, or a forward set on the instance (accelerate's hooks)."""
    return bool(module._forward_hooks or module._forward_pre_hooks) or "forward" in vars(module)


def _classify(module: nn.Module) -> tuple[str, str | None]:
    """``(layout, shows)``: "linear"/"conv1d"/"4bit" (bnb)/"opaque" (own forward); .weight: "adapted"/"base"/None."""
    w = _stored_weight_of(module)
    plain_fwd = isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
    # hooks and parametrizations may compute the weight
    free = not parametrize.is_parametrized(module) and not _own_call(module)
    if free and _plain_weight(w) and (plain_fwd or _is_conv1d(module)):
        return ("linear" if plain_fwd else "conv1d"), "adapted"
    # bitsandbytes' Linear4bit (an nn.Linear), found by name: bitsandbytes is never imported
    c4 = next((c for c in type(module).__mro__ if c.__module__.startswith("bitsandbytes")
               and c.__name__ == "Linear4bit"), None)
    bnb4 = c4 is not None and type(module).forward is c4.forward and type(w).__name__ == "Params4bit"
    layout = "4bit" if free and bnb4 else "opaque"
    if isinstance(w, torch.Tensor) and not w.is_floating_point():
        return layout, "base"
    return layout, "adapted" if plain_fwd and not module._forward_pre_hooks and _plain_weight(w) else None


def _dequantizer(module: nn.Module, dtype: torch.dtype) -> Callable[[], torch.Tensor] | None:
    """A 4-bit base's ``W`` ``(out, in)`` in ``dtype``, new per call; None where only its own forward computes."""
    qs = getattr(module.weight, "quant_state", None)
    if (qs is None or getattr(qs, "packing_format_for_cpu", False)
        or getattr(module, "compute_dtype", None) not in (None, dtype)):
        return None
    from bitsandbytes.functional import dequantize_4bit  # the layer is bitsandbytes': it is installed

    return lambda: _as(dequantize_4bit(module.weight, qs), dtype)


def _weight_reader(parent: nn.Module | None, attr: str) -> str | None:
    """How ``parent`` uses child ``attr``'s weight: "computes" with it (MHA, encoder layer), "inspects" (T5) or None."""
    mha, encoder = isinstance(parent, nn.MultiheadAttention), isinstance(parent, nn.TransformerEncoderLayer)
    if (mha and attr == "out_proj") or (encoder and attr in ("linear1", "linear2")):
        return "computes"
    return ("inspects" if type(parent).__name__.endswith(("DenseActDense", "DenseGatedActDense")) and attr == "wo"
            else None)


def _mha_weights(mha: nn.MultiheadAttention) -> tuple[str, ...]:
    """The names of an attention module's input-projection weights: one packed, or three."""
    return ("in_proj_weight",) if mha._qkv_same_embed_dim else ("q_proj_weight", "k_proj_weight", "v_proj_weight")


def _target_shapes(module: nn.Module) -> list[tuple[str, int, int]] | None:
    """``(adapter name suffix, in, out)`` of each weight an adapter on ``module`` adapts, or None: no target."""
    if not isinstance(module, nn.MultiheadAttention):
        return [("", *feats)] if (feats := _features(module)) else None
    shapes = [(f".parametrizations.{p}.0", *_stored_weight_of(module, p).shape[::-1]) for p in _mha_weights(module)]
    return shapes + [(".out_proj", module.out_proj.in_features, module.out_proj.out_features)]


def _no_dropout(parent: nn.Module | None, attr: str, module: nn.Module) -> str:
    """Why no adapter dropout can apply to ``module`` (a weight read instead of a layer called), or ``""``."""
    if isinstance(module, (nn.MultiheadAttention, RandLoraWeight)):
        return "nn.MultiheadAttention applies its projections as weights (it calls no layer with an input to drop)"
    return (f"its parent {type(parent).__name__} reads {attr}.weight instead of calling it"
            if _weight_reader(parent, attr) == "computes" else "")


def _holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every ``(parent, attribute)`` holding each module: a module under two names is checked under each."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for p in model.modules():
        for a, child in p._modules.items():
            holders.setdefault(id(child), []).append((p, a))
    return holders


def _check_targets(model: nn.Module, found: list[tuple[str, nn.Module]], configs: Mapping[str, RandLoraConfig],
                   stored=False) -> None:
    """Refuse, before anything changes, every target that cannot compute exactly base + s ΔW with its config."""
    inside = tuple(n + "." for n, m in model.named_modules() if isinstance(m, (RandLoraAdapter, SavedModule)))
    holders = _holders(model)
    for name, module in found:
        mha, kind, shapes, config = (isinstance(module, nn.MultiheadAttention), type(module).__name__,
                                     _target_shapes(module), configs[name])
        refuse = f"cannot adapt {_short(name)}: "
        if name == "":
            raise ValueError(refuse + f"it is the model itself (the root module, a {kind}): inject replaces submodules "
                             "in place; wrap a bare layer in a container, e.g. nn.Sequential(layer), or build "
                             "RandLoraLinear(layer, config)")
        if name.startswith(inside) or any(isinstance(m, (RandLoraAdapter, SavedModule)) for m in module.modules()):
            raise ValueError(refuse + "it is already adapted with RandLoRA, contains an adapter, or is (inside) a "
                             "module to save; eject(model) first to re-adapt it")
        if shapes is None:
            raise TypeError(refuse + f"it is a {kind}, not a linear layer (nn.Linear, Conv1D, or a module with "
                            "in_features, out_features and forward) nor an nn.MultiheadAttention")
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(refuse + f"it is a {kind} whose shape is not known yet; run one forward pass first")
        if small := [(name + s, i, o) for s, i, o in shapes if config.rank > min(i, o) and not stored]:
            raise ValueError(refuse + _RANK_TOO_LARGE.format(_short(config.rank), min(small[0][1:]),
                                                             _short(small[0][0]), *small[0][1:]))
        if not mha and (parametrize.is_parametrized(module, "weight")
                        or (module._forward_pre_hooks and _plain_weight(_stored_weight_of(module)))):
            raise ValueError(refuse + "its weight is computed by a parametrization or a forward pre-hook (weight_norm, "
                             "...): merge could not write W + s·ΔW through it; remove it first "
                             "(torch.nn.utils.parametrize.remove_parametrizations, torch.nn.utils.remove_weight_norm)")
        why = next((w for parent, attr in holders[id(module)] if (w := _no_dropout(parent, attr, module))), "")
        if config.dropout > 0 and why:
            raise ValueError(refuse + f"{why}: adapter dropout cannot apply; adapt it with dropout=0 (an inject call "
                             "of its own) or leave it out of the targets")
        if mha and not (all(not parametrize.is_parametrized(module, p) and _plain_weight(getattr(module, p))
                            for p in _mha_weights(module)) and _classify(module.out_proj)[0] == "linear"):
            raise ValueError(refuse + "its input projection or out_proj is parametrized or not a plain floating weight")
        if mha and (first := next(n for n, m in model.named_modules() if m is module.out_proj)) != f"{name}.out_proj":
            raise ValueError(refuse + f"its out_proj is first held as {_short(first)}, the name files would give "
                             "its adapter, from which a load cannot rebuild the attention: register the "
                             "attention module before that alias")
        shows = None if mha else _classify(module)[1]
        for parent, attr in holders[id(module)]:
            reader = _weight_reader(parent, attr)
            if (reader == "computes" and shows != "adapted") or (reader == "inspects" and shows is None):
                raise ValueError(refuse + f"its parent {type(parent).__name__} reads {attr}.weight instead of calling "
                                 f"it, and a {kind} has no plain weight to add the update to")
    if lazy := [n for n, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]:
        raise ValueError(f"cannot adapt {type(model).__name__}: its lazy parameters {_short_list(lazy, 3)} are not "
                         "initialized yet (their requires_grad cannot be set); run one forward pass first")


def _check_saved(model: nn.Module, saved: list[tuple[str, nn.Module]], found: list[tuple[str, nn.Module]]) -> None:
    """Refuse modules to save that cannot be (the root, RandLoRA wrappers or insides, targets) and nested selections."""
    targeted, wrappers = {id(m) for _, m in found}, (RandLoraAdapter, SavedModule)
    inside = tuple(n + "." for n, m in model.named_modules() if isinstance(m, wrappers))
    for name, m in saved:
        if name == "" or id(m) in targeted:
            raise ValueError(f"module {_short(name)} is {'the model itself' if name == '' else 'both a target and'} a "
                             "module to save; choose one")
        if any(isinstance(s, wrappers) for s in m.modules()) or name.startswith(inside):
            raise ValueError(f"module to save {_short(name)} is, "
                             "is inside or contains a RandLoRA adapter or saved module")
    kinds = {id(m): kind for kind, pairs in (("target", found), ("module to save", saved)) for _, m in pairs}
    for name, m in [*found, *saved]:  # the outer module's wrapper would skip or double the inner one
        for sub_name, sub in m.named_modules(remove_duplicate=False):
            if sub_name and id(sub) in kinds:
                raise ValueError(f"{kinds[id(m)]} {_short(name)} contains {kinds[id(sub)]} "
                                 f"{_short(name + '.' + sub_name)}; both are selected, and a selected module may not "
                                 "contain another: select one of them")


Targets = str | Sequence[str] | Callable[[str, nn.Module], bool]
ALL_LINEAR, _HEADS = "all-linear", ("lm_head", "classifier", "score", "qa_outputs")  # heads it leaves out, as PEFT


def _linear_names(model: nn.Module) -> str:
    """The linear layers a message can suggest as targets (at most 30)."""
    return _short_list([n for n, m in model.named_modules() if n and _features(m) is not None
                        and not isinstance(m, RandLoraAdapter)], 30)


def _name_matches(name: str, entry: str) -> bool:
    """A list entry selects a module whose qualified name equals it or ends with ``"." + entry`` (PEFT's rule)."""
    return name == entry or name.endswith("." + entry)


def _match(model: nn.Module, targets: Targets, what: str = "targets",
           skip: Sequence[nn.Module] = ()) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` that ``targets`` (see :func:`inject`) selects, in model order, once, by its first name."""
    is_list = (isinstance(targets, (list, tuple, set, frozenset)) and targets
               and all(isinstance(e, str) for e in targets))
    if not (is_list or isinstance(targets, str) or (callable(targets) and not isinstance(targets, type))):
        raise TypeError(f"{what} must be a non-empty list of module names, a regex str, {ALL_LINEAR!r} or a callable "
                        f"(name, module) -> bool; got {type(targets).__name__} {_short(targets)}")
    modules = list(model.named_modules(remove_duplicate=False))  # a module under two names matches under either
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:  # every nn.Linear and Conv1D but the heads (PEFT's)
        with contextlib.suppress(NotImplementedError, AttributeError, TypeError):
            skip = [*skip, model.get_output_embeddings()]
        skip = [*skip, *(getattr(model, h, None) for h in _HEADS),
                *(m for m in model.modules() if isinstance(m, (RandLoraAdapter, SavedModule)))]
        out = {id(s) for m in skip if isinstance(m, nn.Module) for s in m.modules()}
        hits = {id(m) for _, m in modules if (isinstance(m, nn.Linear) or _is_conv1d(m)) and id(m) not in out}
    elif isinstance(targets, str):
        try:
            regex = re.compile(targets)
        except re.error as e:
            raise ValueError(f"{what} {_short(targets)} is not a valid regular expression: {e}") from None
        if not (hits := {id(m) for n, m in modules if regex.fullmatch(n)}):
            names = sorted({n for n, _ in modules if _name_matches(n, targets)})
            hint = f"; as a list, {what}=[{_short(targets)}] would select {_short_list(names, 5)}" if names else ""
            raise ValueError(f"{what} regex {_short(targets)} matched no module (a str is a regular expression "
                             f"full-matched against qualified names, a list matches names){hint}; linear "
                             f"layers: {_linear_names(model)}")
    else:
        for entry in targets if not callable(targets) else ():
            if not any(_name_matches(n, entry) for n, _ in modules):
                raise ValueError(f"{what} entry {_short(entry)} matches no module of {type(model).__name__}; its "
                                 f"linear layers are: {_linear_names(model)}")
        hits = {id(m) for n, m in modules
                if (targets(n, m) if callable(targets) else any(_name_matches(n, e) for e in targets))}
    return [(n, m) for n, m in model.named_modules() if id(m) in hits]


def _replace(model: nn.Module, new: Mapping[int, nn.Module]) -> list[tuple[nn.Module, str, nn.Module]]:
    """Put ``new[id(m)]`` wherever ``m`` is, in one scan (a module under two names stays one); the slots filled."""
    holders = _holders(model)
    slots = [(parent, attr, module) for i, module in new.items() for parent, attr in holders.get(i, [])]
    for parent, attr, module in slots:
        setattr(parent, attr, module)
    return slots


def _adapt(name: str, module: nn.Module, config: RandLoraConfig, bases: _Bases | None = None) -> dict[int, nn.Module]:
    """``{id(old): RandLoraLinear}`` for checked target ``name``; an MHA's input projection is adapted in place."""
    if not isinstance(module, nn.MultiheadAttention):
        return {id(module): RandLoraLinear(module, config, name, bases=bases)}
    order = list(module._parameters)  # before any parametrization: unwrap puts them back in this order
    why = _no_dropout(module, "out_proj", module.out_proj)  # before a parametrization renames the class
    for param in _mha_weights(module):
        a = RandLoraWeight(getattr(module, param), config, f"{name}.parametrizations.{param}.0", bases=bases,
                           training=module.training)
        a._param_order = order
        parametrize.register_parametrization(module, param, a, unsafe=True)  # unsafe: shape and dtype are kept
        a._slot = (module, param)
        module.parametrizations.train(module.training)
        module.parametrizations[param].register_load_state_dict_pre_hook(RandLoraWeight._state_hook)
    out_proj = RandLoraLinear(module.out_proj, config, f"{name}.out_proj", bases=bases)
    out_proj._dropout_refusal = why
    return {id(module.out_proj): out_proj}  # _build puts it wherever out_proj is held, under any name


# -----------------------------------------------------------------------------
# Model verbs


def named_adapters(model: nn.Module) -> Iterator[tuple[str, RandLoraAdapter]]:
    """``(qualified name, adapter)`` for every RandLoRA adapter in ``model``, each once."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, RandLoraAdapter))


def _saved_modules(model: nn.Module) -> dict[str, SavedModule]:
    """``{qualified name: SavedModule}`` of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SavedModule)}


def inject(
    model: nn.Module, targets: Targets, rank: int = ..., seed: int = ..., *, alpha: float | None = ...,
    dropout: float = ..., bases: str = ..., strategy: str = ..., modules_to_save: Targets | None = None,
    config: RandLoraConfig | None = None, **removed,
) -> nn.Module:
    """Wrap the layers ``targets`` selects in RandLoRA adapters, in place, and freeze everything else; returns
    ``model``. ``targets`` (and ``modules_to_save``): names, a regex, ``"all-linear"`` or a callable (README: Choosing
    targets). The settings: :class:`RandLoraConfig`'s fields, or ``config=``. A refused call leaves ``model`` as it
    was."""
    if removed:
        hint = " (path= was renamed strategy= in 0.2 and removed in 0.3)" if "path" in removed else ""
        raise TypeError(f"inject() got unexpected keyword(s) {_short_list(sorted(removed))}{hint}")
    given = {k: v for k, v in dict(rank=rank, seed=seed, alpha=alpha, dropout=dropout, bases=bases,
                                   strategy=strategy).items() if v is not ...}
    if not isinstance(config, RandLoraConfig) and (config is not None or "rank" not in given):
        raise TypeError(f"inject() needs rank=... or config=RandLoraConfig(...), got config={_short(config)}")
    config = config or RandLoraConfig(**given)
    for field, value in given.items():  # a keyword beside config= must agree with it
        if getattr(dataclasses.replace(config, **{field: value}), field) != getattr(config, field):
            raise ValueError(f"inject got {field}={_short(value)} and "
                             f"config.{field}={_short(getattr(config, field))}; pass one of them")
    empty = isinstance(modules_to_save, (list, tuple, set, frozenset)) and not modules_to_save
    saved = [] if modules_to_save is None or empty else _match(model, modules_to_save, "modules_to_save")
    found = _match(model, targets, "targets", skip=[m for _, m in saved])
    if not found:
        raise ValueError(f"targets {_short(targets)} selected no module; linear layers: {_linear_names(model)}")
    _check_targets(model, found, {n: config for n, _ in found})
    _check_saved(model, saved, found)
    for _, m in named_adapters(model):
        if m.config.shared != config.shared or m._bases.stored is not None:
            raise ValueError(f"model already has RandLoRA layers with (rank, alpha, seed, bases) = {m.config.shared}; "
                             f"a second inject must use the same settings (got {config.shared})")
    _build(model, [(n, m, config) for n, m in found], saved)
    return model


def _build(model: nn.Module, targets: list[tuple[str, nn.Module, RandLoraConfig]], saved,
           bases: _Bases | None = None) -> None:
    """Adapt checked targets (largest first: the shared bases are drawn once) and wrap the modules to save."""
    flags = [(p, p.requires_grad) for _, m in saved for p in m.parameters()]
    try:  # first: a module deepcopy refuses fails before any target or flag changes
        copies = {id(m): SavedModule(m, name) for name, m in saved}
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    new = {}
    for n, m, c in sorted(targets, key=lambda t: -max(i * o for _, i, o in _target_shapes(t[1]))):
        new |= _adapt(n, m, c, bases)
    for parent, attr, m in _replace(model, new | copies):
        if isinstance(m, RandLoraLinear) and not m._dropout_refusal:  # any parent holding it may read the weight
            m._dropout_refusal = _no_dropout(parent, attr, m)
    for _, m in named_adapters(model):
        m._replan()  # every layer views the newest (largest) copy of the bases
    mark_only_adapter_as_trainable(model)


def _span(p: torch.Tensor) -> tuple[object, int, int]:
    """``(storage, first byte, end byte)`` of ``p``; a meta or storage-less tensor stands alone."""
    with contextlib.suppress(RuntimeError, NotImplementedError, TypeError, AttributeError):  # DTensor, subclasses
        if p.device.type != "meta" and p.numel() and (ptr := p.untyped_storage().data_ptr()):
            last = p.storage_offset() + sum((n - 1) * st for n, st in zip(p.shape, p.stride()))
            return ptr, p.storage_offset() * p.element_size(), (last + 1) * p.element_size()
    return id(p), 0, 1


def _weight_sharers(model: nn.Module) -> Callable[[RandLoraAdapter], list[tuple[str, torch.Tensor]]]:
    """For an adapter, the ``(name, parameter)`` pairs on its weight's bytes (aliases, ``.data`` ties, slices)."""
    params = [(_span(p), pname, p) for mname, mod in model.named_modules()
              for pname, p in mod.named_parameters(mname, recurse=False, remove_duplicate=False)]

    def sharers(m: RandLoraAdapter) -> list[tuple[str, torch.Tensor]]:
        """The parameters on ``m``'s weight's bytes (none for a base without a weight)."""
        w = _stored_weight_of(*m._slot) if isinstance(m, RandLoraWeight) else _stored_weight_of(m.base)
        if not isinstance(w, torch.Tensor):
            return []
        key, lo, hi = _span(w)
        return [(n, p) for (k, a, b), n, p in params if k == key and a < hi and lo < b]

    return sharers


def _check_mergeable(model: nn.Module, layers: list[RandLoraAdapter], verb: str) -> None:
    """Refuse, before any change, to merge into a weight that is not a plain tensor or that another module shares."""
    sharers = _weight_sharers(model)
    for m in layers:
        if not m.mergeable or (isinstance(m, RandLoraLinear) and _own_call(m.base)):
            raise TypeError(f"cannot {verb}: layer {_short(m.name)} wraps a {type(m.base).__name__}, " + _UNMERGEABLE)
        if len(names := [n for n, _ in sharers(m)]) > 1:
            raise ValueError(f"cannot {verb}: layer {_short(m.name)} would add its update into a weight that is shared "
                             f"(tied): {' is also '.join(map(repr, names))}. Merging would change the other "
                             "module's computation; keep the adapter unmerged (it computes correctly beside the shared "
                             "weight) or untie the weight first")


def merge(model: nn.Module) -> nn.Module:
    """Add each adapter's ``scaling * ΔW`` to its base weight (idempotent); refused, model unchanged, if it cannot."""
    layers = [m for _, m in named_adapters(model)]
    _check_mergeable(model, layers, "merge")
    for m in layers:
        if m.disabled:  # inside disable(): merged when the context ends
            m._remerge = True
        else:
            m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract every merged adapter's update again (idempotent)."""
    for _, m in named_adapters(model):
        if m.disabled:  # inside disable(): left unmerged when the context ends
            m.__dict__.pop("_remerge", None)
        else:
            m.unmerge()
    return model


def eject(model: nn.Module) -> nn.Module:
    """Merge, then put back the plain layers and each saved module's trained copy; refused inside :func:`disable`."""
    layers, saved = [m for _, m in named_adapters(model)], list(_saved_modules(model).values())
    if any(m.disabled for m in layers + saved):
        raise RuntimeError("cannot eject inside randlora.disable(model): the model must compute as the base there")
    _check_mergeable(model, layers, "eject")
    merge(model)
    for m in layers:
        if isinstance(m, RandLoraWeight):
            m.unwrap()
    _replace(model, {id(m): m.base for m in layers if isinstance(m, RandLoraLinear)}
             | {id(s): s.trained for s in saved})
    for s in saved:
        s.trained.requires_grad_(False)  # frozen like the merged layers
    return model


@contextlib.contextmanager
def disable(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside, ``model`` computes exactly as the base model (a DPO reference); contexts nest."""
    state = [(m, m.disabled) for m in model.modules() if isinstance(m, (RandLoraAdapter, SavedModule))]
    for m, was in state:
        if not was and isinstance(m, RandLoraAdapter):
            m._remerge = m.merged  # merged again when the outermost context ends
            m.unmerge()
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in state:
            m.disabled = was
            if not was and m.__dict__.pop("_remerge", False):
                m.merge()


def mark_only_adapter_as_trainable(model: nn.Module) -> nn.Module:
    """Freeze every parameter but the adapters' ``lam``/``gam`` and the saved modules' trained copies."""
    model.requires_grad_(False)
    for _, m in named_adapters(model):
        m.lam.requires_grad_(True)
        m.gam.requires_grad_(True)
    for s in _saved_modules(model).values():
        s.trainable_()
    return model


@contextlib.contextmanager
def hold_weights(model: nn.Module, budget_bytes: int | None = None) -> Iterator[nn.Module]:
    """Context manager (opt-in speed for memory): each layer builds ``W'`` once and reuses it until lam, gam or W change
    (in model order, each layer whose ``W'`` in its weight's dtype still fits ``budget_bytes``;
    docs/MATH.md#cost-model). A change is seen by the tensors' version counters, which writes through ``.data`` bypass:
    edit under no_grad. A weight tied through ``.data`` (two Parameters, one storage) is never held."""
    if budget_bytes is not None and not (type(budget_bytes) is int and budget_bytes >= 0):
        raise ValueError(f"budget_bytes must be a non-negative int (bytes) or None, got {_short(budget_bytes)}")
    layers, used, sharers = [m for _, m in named_adapters(model)], 0, _weight_sharers(model)
    for m in layers:
        size = m.out_features * m.in_features * _update_dtype(m._compute_dtype()).itemsize
        m._memo.entry = None  # a checkpoint recompute's W' whose backward never ran
        # a write through another Parameter on these bytes leaves this one's version counter (the held W''s key) as is
        if len({id(p) for _, p in sharers(m)}) <= 1 and (budget_bytes is None or used + size <= budget_bytes):
            m._memo.hold, used = True, used + size
    hook = register_optimizer_step_post_hook(lambda *_: [setattr(m._memo, "entry", None) for m in layers])
    try:
        yield model
    finally:
        hook.remove()
        for m in layers:
            m._memo.hold, m._memo.entry = False, None


def summary(model: nn.Module) -> str:
    """A table of the adapted layers and saved modules, then the exact count of trainable parameters and their share."""
    model = getattr(model, "_orig_mod", model)  # the model inside a torch.compile wrapper: its names
    adapters, head = list(named_adapters(model)), ("layer", "out x in", "bases", "trainable")
    count = lambda ps: f"{sum(p.numel() for p in ps if p.requires_grad):,}"  # what trains: the rows add up to the total
    rows = [head, *((n, f"{m.out_features}x{m.in_features}", str(m.n), count((m.lam, m.gam))) for n, m in adapters)]
    rows += [(f"{n} (saved in full)", "-", "-", count(s.trained.parameters()))
             for n, s in _saved_modules(model).items()]
    widths = [max(map(len, column)) for column in zip(*rows)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    if adapters:
        m = adapters[0][1]
        origin = ("bases loaded from a PEFT file" if m._bases.stored is not None
                  else f"seed {m.config.seed}, bases {m.config.bases}")
        lines.insert(0, f"RandLoRA: {len(adapters)} layers, rank {m.rank}, "
                     f"alpha {m.alpha:g} (scaling {m.scaling:g}), {origin}")
    trainable, total = (sum(p.numel() for p in model.parameters() if p.requires_grad),
                        sum(p.numel() for p in model.parameters()))
    return "\n".join([*lines, (f"trainable parameters: {trainable:,} of {total:,} "
                               f"({100 * trainable / max(total, 1):.4f}%)")])


# -----------------------------------------------------------------------------
# Files: safetensors' own reader and writer, atomic writes, and one validate-then-build load pipeline

FORMAT_NAME, FORMAT_VERSION = "randlora", "3"  # 2: per-layer dropout and strategy; 3: checksum, modules_to_save
READ_VERSIONS = ("1", "2", "3")
_ST_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter file holds (detached): ``"<layer>.lam"``, ``"<layer>.gam"``, each module to save's state."""
    model = getattr(model, "_orig_mod", model)  # the model inside a torch.compile wrapper: its names
    state = {f"{n}.{p}": getattr(m, p).detach() for n, m in named_adapters(model) for p in ("lam", "gam")}
    return state | {f"{n}.{k}": v.detach() for n, s in _saved_modules(model).items()
                    for k, v in s.trained.state_dict().items()}


def load_adapter_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy ``state`` (as :func:`adapter_state_dict` gives it) into ``model``, in place, all checked first."""
    model = getattr(model, "_orig_mod", model)  # the model inside a torch.compile wrapper: its names
    layers = {n: (m.out_features, m.in_features, m.config) for n, m in named_adapters(model)}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no RandLoRA layers; inject() first or use load_adapter()")
    return _load(model, "adapter state", next(iter(layers.values()))[2], layers, list(_saved_modules(model)), state)


def _check_state(layers: Mapping[str, tuple], saved: Mapping[str, nn.Module], state: object, source: str) -> None:
    """Refuse a ``state`` that lacks or adds keys, or whose tensors are not dense, of their shape and kind, finite."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{source} must be a mapping (a dict of name -> tensor), got {type(state).__name__}")
    # (shape, the floating dtype a value is loaded into, or False): finite is checked in that dtype
    expected = {f"{n}.{k}": (tuple(v.shape), v.is_floating_point() and v.dtype) for n, m in saved.items()
                for k, v in m.state_dict().items()}
    for name, (out_f, in_f, c) in layers.items():
        nb = _num_bases(min(out_f, in_f), c.rank)
        expected |= {f"{name}.lam": ((c.rank, nb), torch.float32),
                     f"{name}.gam": ((nb, min(out_f, in_f)), torch.float32)}
    missing, unexpected = sorted(k for k in expected if k not in state), [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{source} does not fit the model: missing keys {_short_list(missing)}; unexpected keys "
                         f"{_short_list(unexpected)}")
    for key, (shape, floating) in expected.items():
        t, what = state[key], f"{source}: {_short(key)}"
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.is_meta:
            got = "a meta tensor" if getattr(t, "is_meta", False) else f"{type(t).__name__} {getattr(t, 'layout', '')}"
            raise ValueError(f"{what} must be a dense tensor with values, got {got}")
        if tuple(t.shape) != shape or t.is_floating_point() != bool(floating):
            raise ValueError(f"{what} is {t.dtype} {tuple(t.shape)}; expected "
                             f"{'a floating-point ' if floating else ''}{shape}")
        if floating and not torch.isfinite(t.to(floating)).all():
            raise ValueError(f"{what} contains NaN or Inf values"
                f"{'' if t.dtype == floating else f' (in {floating}, the dtype it loads into)'}")


def _load(model: nn.Module, source: str, shared: RandLoraConfig, layers: Mapping[str, tuple], saved_names: list[str],
          tensors: Mapping, bases: _Bases | None = None) -> nn.Module:
    """The one load pipeline (files, state dicts, PEFT folders): check everything, then change ``model``."""
    model = getattr(model, "_orig_mod", model)  # the model inside a torch.compile wrapper: its names
    if meta := [n for n, p in model.named_parameters() if p.is_meta]:
        raise ValueError(f"{source}: cannot load values into a model on the meta device ({len(meta)} "
                         f"parameters, e.g. {_short_list(meta, 3)}); materialize it first: "
                         "model.to_empty(device=...), then load its weights")
    adapters, modules = dict(named_adapters(model)), dict(model.named_modules())
    if adapters:
        _check_fits(model, source, shared, layers, saved_names, adapters)
        against = {n: s.trained for n, s in _saved_modules(model).items()}
    else:
        targets = _adapter_targets(model, layers, source)
        if absent := [n for n in saved_names if n not in modules]:
            raise ValueError(f"{source}: module to save {_short_list(absent)} is not in the model")
        against = {n: modules[n] for n in saved_names}
        try:
            _check_targets(model, [(n, m) for n, m, _ in targets], {n: c for n, _, c in targets}, bases is not None)
            _check_saved(model, list(against.items()), [(n, m) for n, m, _ in targets])
        except (TypeError, ValueError) as e:
            raise type(e)(f"{source}: {e}") from None
    _check_state(layers, against, tensors, source)
    if any(m.merged for m in adapters.values()):
        raise RuntimeError(f"{source}: unmerge(model) before loading new adapter values into a merged model")
    if not adapters:
        _build(model, targets, list(against.items()), bases)
    adapters = dict(named_adapters(model))
    with torch.no_grad():
        for name, (_, _, config) in layers.items():
            adapters[name].lam.copy_(tensors[f"{name}.lam"])  # in place: a compiled model and an optimizer keep them
            adapters[name].gam.copy_(tensors[f"{name}.gam"])
            adapters[name].set_config(config)  # dropout and strategy as saved: a resumed run is bit-exact
            adapters[name]._memo.entry = None
    for name, s in _saved_modules(model).items():
        s.trained.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})
    return model


def _adapter_targets(model: nn.Module, layers: Mapping[str, tuple],
                     source: str) -> list[tuple[str, nn.Module, RandLoraConfig]]:
    """The ``(name, module, config)`` targets whose adaptation re-creates exactly the adapters ``layers`` names."""
    modules, targets = dict(model.named_modules()), {}
    for name, (_, _, config) in layers.items():
        hit = re.fullmatch(r"(.+)\.parametrizations\.(\w+)\.0", name)  # how named_adapters names a RandLoraWeight
        target = hit[1] if hit else name
        m = modules.get(target)
        if m is None or (hit is not None and not (isinstance(m, nn.MultiheadAttention) and hit[2] in _mha_weights(m))):
            raise ValueError(f"{source}: adapter layer {_short(name)} is not in the model; "
                             f"its linear layers: {_linear_names(model)}")
        if config.dropout > 0 or target not in targets:  # an MHA part with dropout gives the MHA its config: refused
            targets[target] = (m, config)
    for target, (m, _) in list(targets.items()):
        shapes = _target_shapes(m)
        if shapes is None:
            raise ValueError(f"{source}: adapter layer {_short(target)} is a {type(m).__name__} in the "
                             "model, not a linear layer")
        if missing := [target + s for s, _, _ in shapes if target + s not in layers]:
            raise ValueError(f"{source}: nn.MultiheadAttention {_short(target)} is adapted only in part: "
                             f"no {_short_list(missing)}")
        out_proj = targets.pop(target + ".out_proj", None) if isinstance(m, nn.MultiheadAttention) else None
        if out_proj is not None and out_proj[1].dropout > 0:  # the MHA's out_proj with dropout: refused with the MHA
            targets[target] = (m, out_proj[1])
        for s, i, o in shapes:
            if tuple(layers[target + s][:2]) != (o, i):
                raise ValueError(f"{source}: layer {_short(target + s)} is (out, in) = {tuple(layers[target + s][:2])} "
                                 f"in the adapter but {(o, i)} in the model")
    return [(t, m, c) for t, (m, c) in targets.items()]


def _check_fits(model: nn.Module, source: str, shared: RandLoraConfig, layers: Mapping, saved_names: list,
                adapters: dict) -> None:
    """Refuse a file whose settings, layers, shapes, dropouts or modules to save do not fit the adapted ``model``."""
    if next(iter(adapters.values()))._bases.stored is not None:
        raise ValueError(f"{source}: the model's RandLoRA layers use bases loaded from a PEFT folder (from_peft), not "
                         "seeded ones; load into a plain model, or from_peft again")
    for field, ours, theirs in zip(("rank", "alpha", "seed", "bases"), _file_config(adapters).shared, shared.shared):
        if ours != theirs:
            raise ValueError(f"{source}: adapter has {field}={_short(theirs)} but the model's RandLoRA "
                             f"layers have {field}={ours!r}")
    for what, mine, theirs in (("adapter layers", set(adapters), set(layers)),
                               ("modules to save", set(_saved_modules(model)), set(saved_names))):
        if mine != theirs:
            raise ValueError(f"{source}: {what} differ from the model's: missing in file "
                             f"{_short_list(sorted(mine - theirs))}; not in model {_short_list(sorted(theirs - mine))}")
    for name, (out_f, in_f, config) in layers.items():
        m, (parent, _, attr) = adapters[name], name.rpartition(".")
        if (m.out_features, m.in_features) != (out_f, in_f):
            raise ValueError(f"{source}: layer {_short(name)} is (out, in) = {(out_f, in_f)} in the adapter but "
                             f"{(m.out_features, m.in_features)} in the model")
        if config.dropout > 0 and (why := m._dropout_refusal or _no_dropout(model.get_submodule(parent), attr, m)):
            raise ValueError(f"{source}: layer {_short(name)} has dropout {config.dropout}, but {why}")


def _file_config(layers: Mapping[str, RandLoraAdapter]) -> RandLoraConfig:
    """The settings all ``layers`` share (one seeded adapter per file), checked."""
    first = next(iter(layers.values())).config
    for name, m in layers.items():
        if m.config.shared != first.shared:
            raise ValueError(f"layer {_short(name)} has (rank, alpha, seed, bases) {m.config.shared} unlike the others "
                             f"{first.shared}; one adapter per file")
        if m._bases.stored is not None:
            raise ValueError(f"layer {_short(name)} uses bases loaded from a PEFT file (not seeded); "
                             "save it with to_peft() instead")
    return first


def _tensor_bytes(t: torch.Tensor) -> bytearray:
    """A CPU tensor's bytes, copied through torch itself (numpy-free)."""
    buf = bytearray(t.numel() * t.element_size())
    if buf:
        torch.frombuffer(buf, dtype=torch.uint8).copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
    return buf


def _checksum(metadata: Mapping[str, str], items: Sequence[tuple[str, torch.Tensor]]) -> str:
    """``"sha256:<hex>"`` over the metadata (but ``checksum``) and each tensor's name, dtype, shape, bytes, sorted."""
    h, enc = hashlib.sha256(b"randlora-checksum-1\0"), lambda s: s.encode("utf-8", "surrogatepass")
    fields = [(enc(k), enc(v)) for k, v in sorted(metadata.items()) if k != "checksum"]
    fields += [(enc(n), f"{_ST_CODES[t.dtype]}{list(t.shape)}".encode(), _tensor_bytes(t.cpu()))
               for n, t in sorted(items, key=lambda i: i[0])]
    for b in (b for field in fields for b in field):
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return "sha256:" + h.hexdigest()


def _serialize(items: Sequence[tuple[str, torch.Tensor]], metadata: Mapping[str, str], filename: str) -> None:
    """Write contiguous CPU tensors with safetensors' own writer, numpy-free: data pointers (>= 0.8) or bytes."""
    spec, tensors = getattr(safetensors, "TensorSpec", None), {}
    for name, t in items:
        kw = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        tensors[name] = (spec(**kw, data_ptr=t.data_ptr(), data_len=t.numel() * t.element_size()) if spec is not None
                         else kw | {"data": bytes(_tensor_bytes(t))})
    open(filename, "x").close()  # the mode open() gives, which safetensors' writer (0600) would not
    mode = os.stat(filename).st_mode
    safetensors.serialize_file(tensors, filename, metadata=dict(metadata))
    os.chmod(filename, stat.S_IMODE(mode))


def _stat(path: str, expect: Callable[[int], bool], what: str, shown: str = "") -> os.stat_result | None:
    """``os.stat(path)``, None when missing; a symlink loop or a refused kind raises, naming ``shown`` or ``path``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        loop = ValueError(f"{shown or path}: symlink loop (too many levels of symbolic links)")
        raise loop if e.errno == 40 else e from None
    if not expect(st.st_mode):
        kinds = {stat.S_IFREG: "a regular file", stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO (named pipe)",
                 stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}
        kind = kinds.get(stat.S_IFMT(st.st_mode), "a special file")
        raise ValueError(f"{shown or path} is {kind}, not a {'regular file' if expect is stat.S_ISREG else 'folder'}; "
                         f"{what}")
    return st


@contextlib.contextmanager
def _open_safetensors(path: str):
    """A safetensors file opened with safetensors' own reader; only regular files (a FIFO would block it)."""
    if _stat(path, stat.S_ISREG, "refusing to read anything but a regular file") is None:
        raise FileNotFoundError(f"no such file: {path}")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{path} is not readable: permission denied")
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            yield f
    except (safetensors.SafetensorError, OSError) as e:  # OSError: a file mmap refuses (/proc)
        raise ValueError(f"{path} is not a readable safetensors file: {_short(str(e), 200)}") from None


def _path(path: str | os.PathLike) -> str:
    """``path`` as a non-empty str: an empty one would name the working folder, bytes no file safetensors opens."""
    p = os.fspath(path)
    if not isinstance(p, str) or not p:
        raise ValueError(f"path must be a non-empty str or os.PathLike of str, got {_short(path)}")
    return p


def _drop(folder: str) -> None:
    """Remove a replaced folder's backup, write-protected or not; one that cannot be removed stays, harmless."""
    if not os.path.islink(folder):
        with contextlib.suppress(OSError):
            os.chmod(folder, stat.S_IRWXU)  # its files cannot be unlinked from a write-protected folder
        shutil.rmtree(folder, ignore_errors=True)


def _backup_path(target: str) -> str:
    """Where a folder save parks the old folder between its two renames (see :func:`_atomic_write`)."""
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.randlora-old")


def _fsync(path: str) -> None:
    """Flush ``path`` to disk; a folder that cannot be fsynced (some systems) is let be, a file's failure raises."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def _atomic_write(path: str, write: Callable[[str], None], folder: bool = False) -> None:
    """``write(new)`` beside ``path`` (file or folder), fsync, rename (README: What a saved adapter guarantees)."""
    parent, name = os.path.split(path)
    try:
        for e in os.scandir(parent or "."):  # a killed save's temporary folder (safetensors' own temporary file inside)
            if e.name.startswith(f".{name}.randlora-") and e.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    shutil.rmtree(e.path) if e.is_dir(follow_symlinks=False) else os.unlink(e.path)
        os.mkdir(tmp := os.path.join(parent, f".{name}.randlora-{secrets.token_hex(4)}.tmp"))
    except OSError as e:  # name the target, not the temporary folder
        raise type(e)(e.errno, f"cannot write {path}: {e.strerror} in its folder", parent or ".") from None
    new = tmp if folder else os.path.join(tmp, name)
    try:
        write(new)
        for f in [*(os.path.join(tmp, n) for n in os.listdir(tmp)), tmp]:
            if not os.path.islink(f):  # a copied symlink may dangle: its target is not ours to flush
                _fsync(f)
        if os.path.exists(path):
            shutil.copymode(path, new)
        if folder and os.path.lexists(path):  # a crash between the two renames leaves the old folder at _backup_path
            os.rename(path, _backup_path(path))
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(_backup_path(path), path)
                raise
            _drop(_backup_path(path))  # the new folder is in place: a failure to clean up is not the save's
        else:
            os.replace(new, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a file's now empty temporary folder, or what a failed save left
    with contextlib.suppress(OSError):
        _fsync(parent or ".")


def _is_writer() -> bool:
    """Whether this process writes files: rank 0 under torch.distributed, else always."""
    return (not (torch.distributed.is_available() and torch.distributed.is_initialized())
            or torch.distributed.get_rank() == 0)


def _gather(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor's full value as a contiguous CPU tensor; FSDP2's DTensor shards are gathered (a collective)."""
    t = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()
    return t.to("cpu", dtype or t.dtype).contiguous()


def _file_tensors(layers: Mapping[str, RandLoraAdapter],
                  saved: Mapping[str, SavedModule]) -> list[tuple[str, torch.Tensor]]:
    """An adapter file's tensors, gathered to CPU; NaN/Inf refused (naming the layer) before any file changes."""
    items = [(f"{n}.{p}", _gather(getattr(m, p), torch.float32)) for n, m in layers.items() for p in ("lam", "gam")]
    items += [(f"{n}.{k}", _gather(v)) for n, s in saved.items() for k, v in s.trained.state_dict().items()]
    for key, t in items:
        if t.dtype not in _ST_CODES:
            raise TypeError(f"{_short(key)} is {t.dtype}, which randlora does not save (it saves "
                            f"{', '.join(str(d).removeprefix('torch.') for d in _ST_CODES)})")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{_short(key)} has NaN or Inf values (a diverged step?); "
                             "not saved, files left as they were")
    return items


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapter to one small safetensors file, atomically, with a checksum (README: What a saved adapter
    guarantees). Under torch.distributed every rank calls it (FSDP2 shards are gathered) and rank 0 writes."""
    _save_adapter(model, _path(path), _is_writer())


def _save_adapter(model: nn.Module, path: str, writer: bool) -> None:
    """:func:`save_adapter` on every rank; only ``writer`` touches ``path``."""
    model = getattr(model, "_orig_mod", model)  # the model inside a torch.compile wrapper: its names
    layers = dict(named_adapters(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no RandLoRA layers to save")
    c, saved = _file_config(layers), _saved_modules(model)
    items = _file_tensors(layers, saved)
    if writer:
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "randlora_version": __version__,
                "rank": str(c.rank), "alpha": repr(c.alpha), "seed": str(c.seed), "bases": c.bases,
                "modules_to_save": json.dumps(list(saved)),
                "layers": json.dumps({n: [m.out_features, m.in_features, m.config.dropout, m.strategy]
                                      for n, m in layers.items()})}
        meta["checksum"] = _checksum(meta, items)
        _stat(path, stat.S_ISREG, "refusing to replace anything but a regular file")
        _atomic_write(os.path.realpath(path) if os.path.lexists(path) else path,  # a symlink: its target replaced
                      lambda tmp: _serialize(items, meta, tmp))


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a :func:`save_adapter` file into ``model``: a plain model gets the recorded layers, an adapted one the
    values (hot swap). Anything that does not fit or was changed is refused (``ValueError``), the model unchanged."""
    path = _path(path)
    with _open_safetensors(path) as f:
        version = (meta := f.metadata() or {}).get("format_version")
        if meta.get("format") != FORMAT_NAME:  # before reading what may be a large other file
            raise ValueError(f"{path} is not a randlora adapter (metadata format={_short(meta.get('format'))})")
        if version not in READ_VERSIONS:
            raise ValueError(f"{path} has format_version {_short(version)}; this randlora reads {READ_VERSIONS}")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if (odd := next((k for k, t in tensors.items() if t.dtype not in _ST_CODES), None)) is not None:
        raise ValueError(f"{path}: tensor {_short(odd)} is {tensors[odd].dtype}, which no randlora file holds")
    if version >= "3" and "checksum" not in meta:
        raise ValueError(f"{path} has no checksum, which format {version} files have: damaged metadata?")
    if "checksum" in meta and meta["checksum"] != _checksum(meta, list(tensors.items())):
        raise ValueError(f"{path}: checksum mismatch: "
                         "the file was damaged or changed after it was saved; refusing to load it")
    return _load(model, path, *_parse_metadata(meta, path, version), tensors)


def _parse_metadata(meta: Mapping[str, str], path: str, version: str) -> tuple[RandLoraConfig, dict, list[str]]:
    """A file's metadata, each field checked: the shared config, ``{layer: (out, in, config)}``, modules to save."""
    values, version_1 = {}, {"dropout": float} if version == "1" else {}  # format 1: one file-wide dropout
    for field, parse in dict(rank=int, alpha=float, seed=int, bases=str, **version_1, layers=json.loads,
                             modules_to_save=json.loads).items():
        try:
            values[field] = parse(meta.get(field, "[]") if field == "modules_to_save" else meta[field])
        except (KeyError, TypeError, ValueError, RecursionError) as e:  # RecursionError: "[[[[..." nested deep
            why = (f"missing or not JSON ({type(e).__name__})" if parse is json.loads
                   else f"{_short(meta.get(field, 'missing'))}, not a valid {parse.__name__}")
            raise ValueError(f"{path}: metadata field {field!r} is {why}") from None
    raw, names, layers, size = values.pop("layers"), values.pop("modules_to_save"), {}, 2 if version == "1" else 4
    try:
        shared = RandLoraConfig(**values)
    except ValueError as e:
        raise ValueError(f"{path}: metadata: {e}") from None
    if (not isinstance(raw, dict) or not isinstance(names, list) or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)):
        raise ValueError(f"{path}: metadata 'layers' must be a JSON object and "
                         "'modules_to_save' a list of distinct names")
    for name, e in raw.items():
        if not (isinstance(e, list) and len(e) == size and all(type(v) is int and v > 0 for v in e[:2])):
            raise ValueError(f"{path}: layer {_short(name)} has {_short(e)}, "
                             f"expected [out, in{', dropout, strategy' if size == 4 else ''}]")
        try:  # a strategy recorded as "merged" (build's name before 0.2) loads as build
            config = dataclasses.replace(shared, **({} if size == 2 else dict(
                dropout=e[2], strategy="build" if e[3] == "merged" else e[3])))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: layer {_short(name)}: {err}") from None
        layers[name] = (e[0], e[1], config)
    return shared, layers, names


# -----------------------------------------------------------------------------
# Hugging Face Trainer (transformers is imported only when asked for)

TRAINER_ADAPTER_NAME = "adapter.safetensors"
_TRAINER_MODEL_FILES = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")


def trainer_class(base: type | None = None) -> type:
    """A ``transformers.Trainer`` (or ``base``) subclass whose saves are adapter-only (README: Training with the Hugging
    Face Trainer)."""
    import transformers

    class RandLoraTrainer(base or transformers.Trainer):
        def train(self, *args, **kwargs):
            _check_checkpoints(self.model, self.args, "trainer_class")
            return super().train(*args, **kwargs)

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            output_dir = output_dir or self.args.output_dir
            if created := self.args.should_save and not os.path.isdir(output_dir):
                os.makedirs(output_dir, exist_ok=True)
            try:
                _adapter_checkpoint(self.model, output_dir, self.args.should_save)  # every rank: FSDP2 shards gathered
            except BaseException:
                if created:  # no incomplete checkpoint folder for resume_from_checkpoint=True to pick
                    shutil.rmtree(output_dir, ignore_errors=True)
                raise
            if self.args.should_save and getattr(self, "processing_class", None) is not None:
                self.processing_class.save_pretrained(output_dir)

    return RandLoraTrainer


def trainer_callback():
    """A ``TrainerCallback`` replacing each checkpoint's whole model by :func:`trainer_class`'s adapter-only files."""
    import transformers

    class RandLoraCheckpoints(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            _check_checkpoints(model, args, "trainer_callback")
            return control

        def on_step_end(self, args, state, control, model=None, **kwargs):
            # a diverged adapter is refused before the Trainer writes, or rotates away, a checkpoint
            if control.should_save:
                _file_tensors(dict(named_adapters(model)), _saved_modules(model))
            return control

        on_epoch_end = on_step_end

        def on_save(self, args, state, control, model=None, **kwargs):
            folder = os.path.join(
                args.output_dir, f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if args.should_save and not os.path.isdir(folder):
                raise FileNotFoundError(f"randlora.trainer_callback: the Trainer wrote no checkpoint folder {folder}")
            try:
                _adapter_checkpoint(model, folder, args.should_save)
            except (TypeError, ValueError) as e:  # refused before any write: the Trainer's whole-model files stay
                # renamed out of the Trainer's "checkpoint-*": resume and save_total_limit's rotation never see it
                kept = os.path.join(args.output_dir, "refused-" + os.path.basename(folder))
                if args.should_save:
                    shutil.rmtree(kept, ignore_errors=True)  # an earlier run's
                    os.rename(folder, kept)
                raise type(e)(f"{e}; the Trainer's checkpoint is kept as {kept}") from None
            return control

    return RandLoraCheckpoints()


def _check_checkpoints(model: nn.Module, args, how: str) -> None:
    """Refuse at the start of training a model whose checkpoints would be refused (or, with the callback, break the
    Trainer's own whole-model save) at the first save."""
    if str(getattr(args.save_strategy, "value", args.save_strategy)) == "no":
        return
    try:
        if layers := dict(named_adapters(model)):
            _file_config(layers)
    except ValueError as e:
        raise ValueError(f"randlora.{how}: cannot checkpoint this model: {e}") from None
    if how != "trainer_callback":  # trainer_class never writes the whole model
        return
    wrapped = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, (RandLoraAdapter, SavedModule)))
    names: dict[tuple, list[str]] = {}  # one tensor's names: one Parameter's, or two Parameters' on the same bytes
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(_span(p), []).append(n)
    # the Trainer's save drops the names a model declares tied (lm_head.weight); any other two names of one tensor fail
    declared = set(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or ())
    groups = ([n for n in ns if n not in declared] for ns in names.values())
    if tied := next((ns for ns in groups if len(ns) > 1 and any(n.startswith(wrapped) for n in ns)), None):
        raise ValueError(f"randlora.trainer_callback: {' and '.join(map(repr, tied))} are one tied weight under a "
                         "RandLoRA wrapper's name, which the Trainer's own whole-model save refuses; use "
                         "randlora.trainer_class(), whose checkpoints are adapter-only")


def _adapter_checkpoint(model: nn.Module, folder: str, writer: bool) -> None:
    """Make ``folder`` adapter-only: every rank calls this; only ``writer`` touches the folder."""
    _save_adapter(model, os.path.join(folder, TRAINER_ADAPTER_NAME), writer)
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    keep |= {f"{n}.trained.{k}" for n, s in _saved_modules(model).items() for k in s.trained.state_dict()}
    items = [(k, _gather(t)) for k, t in model.state_dict().items() if k in keep]
    if writer:  # the adapter-only model.safetensors replaces the whole model's, then its other files go
        _atomic_write(os.path.join(folder, "model.safetensors"), lambda tmp: _serialize(items, {"format": "pt"}, tmp))
        for name in os.listdir(folder):
            if _TRAINER_MODEL_FILES.fullmatch(name) and name != "model.safetensors":
                os.remove(os.path.join(folder, name))


# -----------------------------------------------------------------------------
# PEFT interop: a PEFT RandLoRA folder is translated onto the load pipeline above; to_peft and to_lora write folders
# PeftModel.from_pretrained loads. Keys: "base_model.model.<layer>.randlora_lambda" (r, n), ".randlora_gamma" (n, d),
# the shared bases "randlora_A" (r, 1, d_max) and "randlora_B" (D_max, n_max, r) at "base_model." (PEFT <= 0.21: and
# per layer), sized by the element-wise maximum of the targets' (out, in); ".lora_A.weight" (k, in) and
# ".lora_B.weight" (out, k) for LoRA.

PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, _PEFT = "adapter_config.json", "adapter_model.safetensors", "base_model.model."
_PEFT_FIELDS = {"r": (32, int), "randlora_alpha": (640, (int, float)), "randlora_dropout": (0.0, (int, float)),
                "bias": ("none", str), "projection_prng_key": (0, int), "save_projection": (True, bool),
                "sparse": (False, bool), "very_sparse": (False, bool), "fan_in_fan_out": (False, bool),
                "modules_to_save": (None, (list, type(None))), "target_modules": (None, (str, list))}
_PEFT_UNSUPPORTED = ("layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "exclude_modules",
                     "target_parameters", "trainable_token_indices", "layer_replication")


def _peft_regenerate(kind: str, rank: int, key: int, D: int, d: int,
                     draw_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT 0.21's bases without save_projection (docs/MATH.md#peft-draws): A (r, d), B (D, n, r), float32."""
    g, n = torch.Generator().manual_seed(key), _num_bases(d, rank)
    if kind == "dense":
        draw = lambda *s: nn.init.kaiming_uniform_(torch.empty(s, dtype=draw_dtype), a=math.sqrt(5), generator=g)
        A, B = draw(rank, 1, d), torch.cat([draw(D, 1, rank) for _ in range(n)], dim=1)
    else:
        p = 1 / (2 * (math.sqrt(d) if kind == "very_sparse" else 3))
        A, B = ((u > 1 - p).float() - (u < p).float()
                for u in (torch.rand((rank, 1, d), generator=g), torch.rand((D, n, rank), generator=g)))
    A, B = A / A.std(), B / B.std()  # in the draw dtype, as PEFT does
    return A[:, 0].float().contiguous(), B.float().contiguous()


def _peft_folder(path: str | os.PathLike) -> tuple[str, str]:
    """The PEFT folder at ``path`` and its adapter_config.json, refused naming a backup, several adapters or pickles."""
    folder = _path(path)
    if _stat(folder, stat.S_ISDIR, "from_peft expects the folder written by PEFT's save_pretrained") is None:
        backup = _backup_path(os.path.realpath(folder))
        hint = (f"; an interrupted save left the previous one at {backup} (rename it back)" if os.path.isdir(backup)
                else "")
        raise FileNotFoundError(f"no PEFT adapter folder at {folder}{hint}")
    subs = sorted(e.name for e in os.scandir(folder) if e.is_dir()
                  and os.path.isfile(os.path.join(e.path, PEFT_CONFIG_NAME)))
    several = f": several adapters in subfolders ({_short_list(subs)}): pass the one to load" if subs else ""
    pickle = next((f" (found {f}: pickle files are not read; re-save with safe_serialization=True)"
                   for f in ("adapter_model.bin", "adapter_model.pt") if os.path.isfile(os.path.join(folder, f))), "")
    for name, hint in ((PEFT_CONFIG_NAME, several), (PEFT_WEIGHTS_NAME, pickle)):
        if not os.path.lexists(os.path.join(folder, name)):
            raise ValueError(f"{folder} has no {name}{hint or ': not a PEFT adapter folder'}")
    file = os.path.join(folder, PEFT_CONFIG_NAME)
    if (st := _stat(file, stat.S_ISREG, "refusing to read anything but a regular file")) is None or st.st_size > 2**24:
        raise ValueError(f"{file} is {'missing' if st is None else 'larger than 16 MB'}: not a PEFT adapter folder")
    return folder, file


def _peft_config(path: str | os.PathLike) -> tuple[str, dict[str, object]]:
    """The PEFT folder at ``path`` and its adapter_config.json's fields, all checked, plus "config" and "kind"."""
    folder, file = _peft_folder(path)
    try:
        with open(file, "rb") as f:
            raw = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{file} is not UTF-8 JSON: {_short(str(e), 200)}") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "RANDLORA":
        got = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{file}: from_peft reads one RandLoRA adapter "
                         f"(a JSON object with peft_type 'RANDLORA'), got {_short(got)}")
    cfg = {k: raw.get(k, default) for k, (default, _) in _PEFT_FIELDS.items()}
    for k, (_, kinds) in _PEFT_FIELDS.items():
        if (isinstance(cfg[k], bool) and kinds is not bool) or not isinstance(cfg[k], kinds):
            raise ValueError(f"{file}: {k} must be {getattr(kinds, '__name__', kinds)}, got {_short(cfg[k])}")
    for k in ([k for k in _PEFT_UNSUPPORTED if raw.get(k) not in (None, [], {}, "")]
              + (["bias"] if cfg["bias"] != "none" else [])):
        why = " (only 'none': biases are not trained)" if k == "bias" else ""
        raise ValueError(f"{file}: {k}={_short(raw[k])} is not supported by from_peft{why}")
    t, saved = cfg["target_modules"], cfg["modules_to_save"] or []
    if (t.lower() == ALL_LINEAR if isinstance(t, str) else not (t and all(isinstance(e, str) and e for e in t))):
        raise ValueError(f"{file}: target_modules must list the module names or be a regex "
                         f"(not 'all-linear'), got {_short(t)}")
    if not all(isinstance(n, str) and n for n in saved):
        raise ValueError(f"{file}: modules_to_save must be null or a list of module names, got {_short(saved)}")
    try:
        config = RandLoraConfig(rank=cfg["r"], alpha=cfg["randlora_alpha"], dropout=cfg["randlora_dropout"])
        torch.Generator().manual_seed(cfg["projection_prng_key"])
        re.compile(t) if isinstance(t, str) else None
    except (ValueError, RuntimeError, OverflowError, re.error) as e:
        raise ValueError(f"{file}: {e} (r, randlora_alpha, randlora_dropout, "
                         "projection_prng_key, target_modules)") from None
    kind = "very_sparse" if cfg["very_sparse"] else "sparse" if cfg["sparse"] else "dense"
    return folder, cfg | {"modules_to_save": saved, "config": config, "kind": kind}


def from_peft(model: nn.Module, path: str | os.PathLike, *, draw_dtype: torch.dtype | None = None) -> nn.Module:
    """Load a Hugging Face PEFT RandLoRA folder into the plain ``model``, in place, checked as :func:`load_adapter`
    checks; outputs equal ``PeftModel.from_pretrained``'s. ``draw_dtype``: see README, PEFT interoperability."""
    model = getattr(model, "_orig_mod", model)  # the model inside a torch.compile wrapper: its names
    folder, cfg = _peft_config(path)
    if draw_dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"draw_dtype must be torch.bfloat16, torch.float16 or None, got {_short(draw_dtype)}")
    if any(True for _ in named_adapters(model)):
        raise ValueError(f"{type(model).__name__} already has RandLoRA layers; "
                         "from_peft adapts a plain model (eject() first)")
    t = cfg["target_modules"]  # PEFT's rules: a regex full-matched, or a list of names matched as inject matches them
    selects = (lambda n: re.fullmatch(t, n)) if isinstance(t, str) else (lambda n: any(_name_matches(n, e) for e in t))
    with _open_safetensors(weights := os.path.join(folder, PEFT_WEIGHTS_NAME)) as f:
        keys = set(f.keys())
    # PEFT <= 0.18 saves every module whose name ends with an entry, later ones the name or a ".name" suffix (and
    # ignore an entry that matches nothing, as task_type's defaults may): a looser match is saved where the file
    # holds its own state (not a target's randlora_ keys under its name, nor a strictly matched child's state)
    loose = [(n, m) for n, m in model.named_modules() if n and any(n.endswith(e) for e in cfg["modules_to_save"])]
    strict = tuple(f"{n}." for n, _ in loose if any(_name_matches(n, e) for e in cfg["modules_to_save"]))
    saved = [n for n, m in loose if f"{n}." in strict
             or any(f"{_PEFT}{n}.{k}" in keys and not f"{n}.{k}".startswith(strict) for k in m.state_dict())]
    inside = tuple(n + "." for n in saved)  # PEFT adapts no module that is, or is inside, a module to save
    found = {n: _features(m) for n, m in model.named_modules() if n and selects(n) and not f"{n}.".startswith(inside)}
    if not found or None in found.values():
        what = (f"selects {_short(next(n for n, f in found.items() if f is None))}, not a linear layer" if found
                else "matches no module")
        raise ValueError(f"{folder}: target_modules {_short(t)} {what}; "
                         f"the model's linear layers: {_linear_names(model)}")
    holders = _holders(model)  # a parent under any of the layer's names
    if reads := [n for n in found
                 if any(_weight_reader(p, a) == "computes" for p, a in holders[id(model.get_submodule(n))])]:
        raise ValueError(f"{folder}: layer {_short(reads[0])}'s parent reads its weight directly "
                         "(nn.MultiheadAttention, nn.TransformerEncoderLayer), where PEFT's update applies in some "
                         "modes and not in others: not loadable")
    d, D = sorted((max(o for _, o in found.values()), max(i for i, _ in found.values())))
    with _open_safetensors(weights) as f:
        tensors, bases = _peft_tensors(f, weights, model, found, saved, cfg, D, d)
    if not bases:
        bases = _peft_regenerate(cfg["kind"], cfg["r"], cfg["projection_prng_key"], D, d, draw_dtype or (torch.bfloat16
                                 if not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
                                 else torch.float16))
        if not all(torch.isfinite(b).all() for b in bases):
            raise ValueError(f"{folder}: PEFT's regenerated {cfg['kind']} bases are degenerate "
                             f"(NaN/Inf) for r={cfg['r']}")
    flags = {k: cfg[k] for k in ("sparse", "very_sparse", "projection_prng_key")}
    layers = {n: (o, i, cfg["config"]) for n, (i, o) in found.items()}
    return _load(model, folder, cfg["config"], layers, saved, tensors, _Bases(cfg["r"], stored=bases, peft=flags))


def _peft_tensors(f, weights: str, model: nn.Module, found: dict, saved: list[str], cfg: dict, D: int, d: int):
    """The file's tensors under our names and its stored bases ``(A (r, d), B (D, n, r))``, or ``()``; all checked."""
    tensors, bases, unexpected = {}, {}, []
    for k in f.keys():
        stem, _, suffix = k.rpartition(".")
        layer = stem.removeprefix(_PEFT)
        ours = stem.startswith(_PEFT) and layer in found  # a key of a target layer
        if any(k.startswith(f"{_PEFT}{n}.") for n in saved):  # a key of a module to save
            tensors[k.removeprefix(_PEFT)] = f.get_tensor(k)
        elif ours and suffix in ("randlora_lambda", "randlora_gamma"):
            tensors[f"{layer}.{suffix[9:12]}"] = f.get_tensor(k)  # randlora_lambda -> lam, randlora_gamma -> gam
        elif suffix in ("randlora_A", "randlora_B") and cfg["save_projection"] and (ours or stem == "base_model"):
            bases.setdefault(stem, {})[suffix] = k
        else:
            unexpected.append(k)
    missing = [f"{_PEFT}{n}.randlora_{p}" for n in found for p in ("lambda", "gamma") if f"{n}.{p[:3]}" not in tensors]
    missing += [f"{_PEFT}{n}.{k}" for n in saved for k in model.get_submodule(n).state_dict()
                if f"{n}.{k}" not in tensors]
    missing += [f"{s}.{x}" for s, got in bases.items() for x in ("randlora_A", "randlora_B") if x not in got]
    if cfg["save_projection"] and (not bases or 0 < len(set(bases) - {"base_model"}) < len(found)):
        missing.append("randlora_A/randlora_B")
    if missing or unexpected:
        hint = (" (the file adapts layers target_modules does not select here: wrong model?)"
                if any("randlora_" in k for k in unexpected) else "")
        hint += (" (save_projection=true: the bases belong at base_model. or to every layer)"
                 if "randlora_A/randlora_B" in missing else "")
        raise ValueError(f"{weights} does not fit the model: missing keys {_short_list(sorted(missing))}; unexpected "
                         f"keys {_short_list(sorted(unexpected))}{hint}")
    shapes, first = {"randlora_A": (cfg["r"], 1, d), "randlora_B": (D, _num_bases(d, cfg["r"]), cfg["r"])}, {}
    for x, k in sorted((x, k) for got in bases.values() for x, k in got.items()):
        t = f.get_tensor(k)
        ok = t.is_floating_point() and tuple(t.shape) == shapes[x]
        if not ok or not torch.isfinite(t).all():
            raise ValueError(f"{weights}: {_short(k)} " + (f"is {t.dtype} {tuple(t.shape)}; expected finite floats of "
                             f"shape {shapes[x]}" if not ok else "contains NaN or Inf values; expected finite floats"))
        if not torch.equal(first.setdefault(x, t), t):
            raise ValueError(f"{weights}: the stored copies of the shared bases differ "
                             f"({_short(k)}); the file is inconsistent")
    return tensors, (first["randlora_A"][:, 0], first["randlora_B"]) if first else ()


def _peft_layers(model: nn.Module, what: str) -> tuple[dict[str, RandLoraAdapter], dict[str, SavedModule]]:
    """The adapters and modules to save of ``model``, refusing what PEFT ``what`` would compute differently."""
    model = getattr(model, "_orig_mod", model)  # the model inside a torch.compile wrapper: its names
    layers, saved = dict(named_adapters(model)), _saved_modules(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no RandLoRA layers to save")
    for name, m in layers.items():
        if isinstance(m, RandLoraWeight) or m._dropout_refusal:  # its parent reads the weight, under any of its names
            raise ValueError(f"layer {_short(name)} adapts a weight its parent module reads directly "
                             f"(nn.MultiheadAttention, nn.TransformerEncoderLayer): PEFT {what} would skip it")
        if not (isinstance(m.base, nn.Linear) or _is_conv1d(m.base)):  # bitsandbytes' layers, hooked too, are nn.Linear
            raise ValueError(f"layer {_short(name)} wraps a {type(m.base).__name__}; PEFT {what} adapts only "
                             "nn.Linear, Conv1D and bitsandbytes' Linear8bitLt / Linear4bit")
    for name in saved:
        if others := [n for n, _ in model.named_modules() if n.endswith(name) and not f"{n}.".startswith(f"{name}.")]:
            raise ValueError(f"module to save {_short(name)}: PEFT up to 0.18 selects modules_to_save by name "
                             f"suffix and would also select {_short_list(others, 5)}; this adapter cannot be written "
                             "in PEFT's format")
    return layers, saved


def _peft_write(path: str | os.PathLike, items: list[tuple[str, torch.Tensor]], peft_type: str, layers: Mapping,
                saved: Mapping, **config) -> None:
    """Replace the folder ``path`` as a whole (:func:`_atomic_write`), with its other plain files; rank 0 writes."""
    items = [*items, *((_PEFT + k, t) for k, t in _file_tensors({}, saved))]  # and the modules to save, in full
    path = _path(path)
    target = os.path.realpath(path)  # checked where written: realpath("a/../b") is b, a or not
    backup = _backup_path(target)
    if os.path.isdir(backup) and _is_writer():  # a crash in an earlier save's window, or a backup it could not remove
        _drop(backup) if os.path.lexists(target) else os.rename(backup, target)
        if os.path.lexists(backup):
            raise ValueError(f"{backup}, an earlier save's copy of {path}, cannot be removed; remove it by hand")
    st = _stat(target, stat.S_ISDIR, "an adapter folder is written there", shown=path)
    if st and (subs := sorted(e.name for e in os.scandir(target) if e.is_dir(follow_symlinks=False))):
        raise ValueError(f"{path} has subfolders ({_short_list(subs, 5)}); "
                         "the adapter folder is replaced as a whole and they would be lost")
    config |= {"peft_type": peft_type, "base_model_name_or_path": None, "bias": "none", "inference_mode": True,
               "task_type": None, "fan_in_fan_out": any(_is_conv1d(m.base) for m in layers.values()),
               "modules_to_save": list(saved) or None,
               "target_modules": "(?:" + "|".join(re.escape(n) for n in layers) + ")"}

    def write(tmp: str) -> None:
        _serialize(items, {"format": "pt"}, os.path.join(tmp, PEFT_WEIGHTS_NAME))
        with open(os.path.join(tmp, PEFT_CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for e in os.scandir(target) if st else ():
            if e.name in (PEFT_WEIGHTS_NAME, PEFT_CONFIG_NAME):
                shutil.copymode(e.path, os.path.join(tmp, e.name))
            else:
                (os.symlink(os.readlink(e.path), os.path.join(tmp, e.name)) if e.is_symlink()
                 else shutil.copy2(e.path, os.path.join(tmp, e.name)))

    if _is_writer():
        os.makedirs(os.path.dirname(target), exist_ok=True)
        _atomic_write(target, write, folder=True)


def to_peft(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapter as a PEFT RandLoRA folder, bases stored, that ``PeftModel.from_pretrained(base, path)`` loads
    to compute what ``model`` computes. Refused, files untouched, for what PEFT would compute differently."""
    layers, saved = _peft_layers(model, "RandLoRA")
    first = next(iter(layers.values()))
    for name, m in layers.items():
        if m._bases is not first._bases or m.config.dropout != first.config.dropout:
            raise ValueError(f"layer {_short(name)} has other settings or bases than {_short(first.name)}; "
                             "a PEFT adapter has one of each")
    widths, bases, rank = sorted({m.d for m in layers.values()}), first._bases, first.rank
    if bases.kind == "very_sparse" and len(widths) > 1:
        raise ValueError("very_sparse bases use each layer's own sparsity sqrt(min(in, out)) and the layers "
                         f"have widths {widths}; PEFT shares one pair of bases with one sparsity: this adapter "
                         "cannot be written in its format")
    d, D = sorted((max(m.out_features for m in layers.values()), max(m.in_features for m in layers.values())))
    A, Bf = bases.dense(D, d, width=widths[0])
    for w in widths if bases.kind != "dense" else ():
        if not torch.equal(bases.dense(D, w)[0], A[:, :w]):
            raise ValueError(f"{bases.kind} bases choose a few entries of A per layer width min(in, out) so that ΔW "
                             f"is full rank (docs/MATH.md#sparse-bases), and width {w}'s A is not the first {w} "
                             "columns of the widest one's, all PEFT can express: save with save_adapter(), or use "
                             f"widths that are multiples of rank {rank}")
    items = [("base_model.randlora_A", A.reshape(rank, 1, d).contiguous()),  # once, as PEFT 0.22 writes them
             ("base_model.randlora_B", Bf.reshape(D, -1, rank).contiguous())]
    items += [(f"{_PEFT}{k[:-4]}.randlora_{'lambda' if k.endswith('lam') else 'gamma'}", t)
              for k, t in _file_tensors(layers, {})]
    flags = bases.peft or {k: bases.kind == k for k in ("sparse", "very_sparse")} | {"projection_prng_key": 0}
    _peft_write(path, items, "RANDLORA", layers, saved, r=rank,
                randlora_alpha=int(first.alpha) if first.alpha.is_integer() else first.alpha,
                randlora_dropout=first.config.dropout, save_projection=True, **flags)


def to_lora(model: nn.Module, path: str | os.PathLike, rank: int, *, verbose: bool = False) -> dict[str, float]:
    """Export as a PEFT **LoRA** folder: per layer the best rank-``rank`` approximation of ``scaling * ΔW``
    (docs/MATH.md#export-to-lora). Returns each layer's relative Frobenius error ``||ΔW - ΔW_k|| / ||ΔW||`` (printed
    with ``verbose``)."""
    RandLoraConfig(rank=rank)  # the rank check and message of inject's
    layers, saved = _peft_layers(model, "LoRA")
    items, errors = [], {}
    for name, m in layers.items():
        if not (torch.isfinite(m.lam).all() and torch.isfinite(m.gam).all()):
            raise ValueError(f"layer {_short(name)} has NaN or Inf in lam/gam (a diverged step?); nothing written")
        U, S, Vh = torch.linalg.svd(m.delta_weight(torch.float64), full_matrices=False)
        k, total = min(rank, S.numel()), S.square().sum()
        errors[name] = (S[k:].square().sum() / total).sqrt().item() if total > 0 else 0.0
        A, B = S.new_zeros(rank, m.in_features), S.new_zeros(m.out_features, rank)  # float64, as delta_weight
        A[:k], B[:, :k] = S[:k].sqrt()[:, None] * Vh[:k], U[:, :k] * S[:k].sqrt()
        items += [(f"{_PEFT}{name}.lora_A.weight", A.float().cpu()), (f"{_PEFT}{name}.lora_B.weight", B.float().cpu())]
    if verbose:
        print("\n".join(f"{n}: relative error {e:.4g}" for n, e in errors.items()))
    _peft_write(path, items, "LORA", layers, saved, r=rank, lora_alpha=rank, lora_dropout=0.0, use_rslora=False,
                use_dora=False, init_lora_weights=True)
    return errors
