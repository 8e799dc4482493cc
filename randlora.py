"""RandLoRA: full-rank parameter-efficient fine-tuning, in one file.

A frozen linear layer ``y = x W^T + b`` (``W``: ``(out, in)``) is adapted, in the paper's words,
with ``ΔW = Σ_b B_b Λ_b A Γ_b``: fixed random bases ``A`` ``(r, d)`` and ``B`` ``(D, n, r)``
shared by every adapted layer, and only the diagonals ``lam`` (Λ, ``(r, n)``) and ``gam``
(Γ, ``(n, d)``) trained. ``d = min(in, out)``, ``D = max(in, out)``, ``n = ceil(d / r)``, so
``n * r >= d`` and the update can be full rank. We compute exactly what Hugging Face PEFT
computes (RANDLORA.md §1), so PEFT adapters load bit for bit: with the scaled small basis ``S``
``(r*n, d)`` and the flattened large bases ``Bf`` ``(D, n*r)``,

    S[k*n + b, j] = lam[k, b] * A[k, j] * gam[b, j]
    Bf[:, b*r + k] = B[:, b, k]
    M = Bf @ S                          (D, d)
    ΔW = M if out >= in else M^T
    y = x W^T + b + (alpha / r) * x ΔW^T

The two flattenings pair column ``b*r + k`` of ``Bf`` with row ``k*n + b`` of ``S``: for r, n > 1
that is not the literal per-basis sum above, but it is still a sum of ``n`` rank-``r`` products
(each large basis meets ``r`` rows of ``A``, each scaled by its own ``lam`` and ``gam``), and full rank
for generic ``lam``, ``gam``.

The file reads top to bottom: seeded bases -> autograd function -> layer ->
model-level verbs -> checkpoint I/O.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
import weakref
from typing import Callable, Iterator, Mapping, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__version__ = "0.1.0"

__all__ = [
    "RandLoraLinear",
    "inject",
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

BASES_KINDS = ("dense", "sparse", "very_sparse")
PATHS = ("auto", "merged", "factorized")
FORMAT_NAME = "randlora"
FORMAT_VERSION = "1"

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

    Seeded bases are generated on the CPU in float32 from ``seed`` alone, then cast and moved
    lazily: one copy per (device, dtype), grown when a larger layer asks, shared by every layer.
    Dense bases are uniform with unit variance (``(2u - 1) * sqrt(3)``); sparse kinds are ternary
    ``{-1, 0, +1} * sqrt(s)`` and are kept as int8 plus one float scale (half of bf16),
    rebuilt in the compute dtype only inside a call. Very sparse bases use ``s = sqrt(d)`` of
    the layer asking, so they are cached per distinct ``d``.

    ``explicit`` bases (e.g. loaded from a PEFT adapter) are given tensors instead of a seed.
    Instances are immutable and shared: deepcopy returns the same object.
    """

    def __init__(
        self,
        rank: int,
        seed: int = 0,
        kind: str = "dense",
        explicit: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.rank, self.seed, self.kind = rank, seed, kind
        self.explicit = None
        if explicit is not None:
            A, B = explicit
            self.explicit = (A.detach().to("cpu", torch.float32).contiguous(), B.detach().to("cpu", torch.float32).contiguous())
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, float | None]] = {}

    def __deepcopy__(self, memo: dict) -> "_Bases":
        return self

    @property
    def compact(self) -> bool:
        return self.explicit is None and self.kind != "dense"

    def _generate(self, D: int, d: int, s: float | None) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        """Bases of at least (D, d) on the CPU: float32, or int8 ternary plus its scale."""
        if self.explicit is not None:
            return self.explicit[0], self.explicit[1], None
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
            if self.explicit is not None:
                A_all, B_all = self.explicit
                if A_all.shape[1] < d or B_all.shape[0] < D or B_all.shape[1] < _num_bases(d, self.rank):
                    raise ValueError(
                        f"the adapter's stored bases A {tuple(A_all.shape)} and B {tuple(B_all.shape)} are too small "
                        f"for a layer with D={D}, d={d} at rank {self.rank}"
                    )
            grow_D, grow_d = D, d
            if hit is not None and self.explicit is None:  # grow: every previous slice keeps its values
                grow_D, grow_d = max(D, hit[1].shape[0]), max(d, hit[0].shape[1])
            A_all, B_all, scale = self._generate(grow_D, grow_d, s)
            hit = (A_all.to(device=device, dtype=store), B_all.to(device=device, dtype=store), scale)
            self._cache[key] = hit
        return hit

    def dense(self, D: int, d: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The float version of one layer's bases, ``A`` ``(r, d)`` and ``Bf`` ``(D, n*r)``."""
        A, B, scale = self.get(D, d, torch.device(device), dtype)
        return _materialize(A, dtype, scale), _materialize(B, dtype, scale)


_SHARED_BASES: "weakref.WeakValueDictionary[tuple, _Bases]" = weakref.WeakValueDictionary()


def _seeded_bases(rank: int, seed: int, kind: str) -> _Bases:
    """One bases object per (rank, seed, kind) while any layer uses it."""
    key = (rank, seed, kind)
    bases = _SHARED_BASES.get(key)
    if bases is None:
        bases = _Bases(rank, seed, kind)
        _SHARED_BASES[key] = bases
    return bases


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Skips the dispatch of a no-op .to(): this runs several times per layer and call.
    return t if t.dtype == dtype else t.to(dtype)


def _materialize(t: torch.Tensor, dtype: torch.dtype, scale: float | None) -> torch.Tensor:
    """Bases in ``dtype``: dense ones as they are, int8 ones times their scale (a temporary)."""
    return _as(t, dtype) if scale is None else t.to(dtype).mul_(scale)


# -----------------------------------------------------------------------------
# The autograd function


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


def _merged_weight(W: torch.Tensor | None, S: torch.Tensor, Bf: torch.Tensor, scaling: float, out_ge_in: bool) -> torch.Tensor:
    """``W + scaling * ΔW`` ``(out, in)`` in the compute dtype, in one matmul."""
    lhs, rhs = (Bf, S) if out_ge_in else (S.t(), Bf.t())
    if W is None:
        return torch.mm(lhs, rhs).mul_(scaling)
    return torch.addmm(W, lhs, rhs, alpha=scaling)


def _scale_grads_eager(
    dS: torch.Tensor, lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``dlam`` ``(r, n)`` and ``dgam`` ``(n, d)`` from unscaled ``dS`` ``(r*n, d)`` (RANDLORA.md §2).

    ``dlam[k, b] = s Σ_j dS[k*n+b, j] A[k, j] gam[b, j]``, ``dgam[b, j] = s Σ_k dS[k*n+b, j] lam[k, b] A[k, j]``,
    in float32 (float64 for float64 compute): products and sums that inductor fuses under compile.
    """
    acc = torch.float64 if dS.dtype == torch.float64 else torch.float32
    r, n = lam.shape
    dSA = dS.view(r, n, -1) * (_as(A, acc) * scaling).unsqueeze(1)  # (r, n, d)
    dlam = (dSA * _as(gam, acc)).sum(-1)
    dgam = (dSA * _as(lam, acc).unsqueeze(-1)).sum(0)
    return _as(dlam, lam.dtype), _as(dgam, gam.dtype)


# On CUDA, the two elementwise steps above each become one Triton kernel (Triton ships with
# CUDA builds of PyTorch): S is written once in the compute dtype, dS is read once. That is
# what keeps the merged path within a few percent of full fine-tuning (benchmarks/). Without
# Triton, on the CPU, under torch.compile (inductor fuses the eager code itself) or with
# RANDLORA_TRITON=0, the eager versions run; both compute the same float32 expressions.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # tests run the kernels on the CPU
_USE_TRITON = os.environ.get("RANDLORA_TRITON", "1") != "0"
try:
    if not _USE_TRITON:
        raise ImportError
    import triton
    import triton.language as tl
except Exception:  # not installed (CPU builds), or broken: the eager path is always there
    triton = None

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


def _fused(t: torch.Tensor) -> bool:
    return triton is not None and (t.is_cuda or _TRITON_INTERPRET) and t.dtype != torch.float64 and not torch.compiler.is_compiling()


def _small_basis(lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``S`` ``(r*n, d)`` in ``dtype``: ``S[k*n + b, j] = lam[k, b] * A[k, j] * gam[b, j]``."""
    if not _fused(A) or A.stride(1) != 1 or gam.stride(1) != 1 or not lam.is_contiguous():
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
    if not _fused(dS) or dS.stride(1) != 1 or A.stride(1) != 1 or gam.stride(1) != 1 or not lam.is_contiguous():
        return _scale_grads_eager(dS, lam, gam, A, scaling)
    r, n = lam.shape
    d = gam.shape[1]
    blocks = triton.cdiv(d, 256)
    dgam = torch.empty(n, d, dtype=torch.float32, device=dS.device)
    part = torch.empty(r, n, blocks, dtype=torch.float32, device=dS.device)
    _scale_grads_kernel[(n, blocks)](dS, A, lam, gam, dgam, part, r, n, d, dS.stride(0), A.stride(0), gam.stride(0), scaling, BLOCK=256)
    return _as(part.sum(-1), lam.dtype), _as(dgam, gam.dtype)


class RandLoraFunction(torch.autograd.Function):
    """``y = x W^T + b + scaling * x ΔW^T`` with nothing kept for backward but the input.

    Two exact strategies, chosen by the caller (``merged``):

    * factorized: ``x S^T Bf^T`` (out >= in) or ``x Bf S`` (out < in); cheap for few tokens.
    * merged: build ``W' = W + scaling * ΔW`` in the compute dtype, use it, drop it; rebuild it
      in backward and take ``dlam``/``dgam`` from ``G = dY^T X``. Best for many tokens.

    ``S`` and ``W'`` are rebuilt in backward from the parameters and the shared bases, so saved
    tensors are only ``x``, ``W``, ``lam``, ``gam`` and the bases (which are shared).

    Shapes: ``x`` (N, in), ``W`` (out, in) or None (adapter branch only), ``bias`` (out,) or
    None, ``lam`` (r, n), ``gam`` (n, d), ``A`` (r, d), ``Bf`` (D, n*r) -> ``y`` (N, out).
    """

    @staticmethod
    def forward(ctx, x, W, bias, lam, gam, A, Bf, bases_scale, scaling, out_ge_in, merged):
        dtype = x.dtype
        A_, Bf_ = _materialize(A, dtype, bases_scale), _materialize(Bf, dtype, bases_scale)
        S = _small_basis(lam, gam, A_, dtype)
        if merged:
            y = F.linear(x, _merged_weight(W, S, Bf_, scaling, out_ge_in), bias)
        else:
            y = F.linear(x, W, bias) if W is not None else None
            lhs, rhs = (x @ S.t(), Bf_.t()) if out_ge_in else (x @ Bf_, S)
            if y is None:  # adapter only: bias (if any) still added, as the merged path does
                y = torch.mm(lhs, rhs).mul_(scaling) if bias is None else torch.addmm(bias, lhs, rhs, alpha=scaling)
            else:
                y.addmm_(lhs, rhs, alpha=scaling)
        ctx.save_for_backward(x, W, lam, gam, A, Bf)
        ctx.has_bias = bias is not None
        ctx.bases_scale, ctx.scaling, ctx.out_ge_in, ctx.merged = bases_scale, scaling, out_ge_in, merged
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
        dX = dW = db = dS = None
        if ctx.merged:
            if need_x:
                dX = dY @ _merged_weight(W, S, Bf_, s, out_ge_in)
            if need_W or need_lam or need_gam:
                G = dY.t() @ x  # (out, in): full fine-tuning's weight gradient
                dW = G if need_W else None
                if need_lam or need_gam:
                    dS = Bf_.t() @ (G if out_ge_in else G.t())  # (r*n, d), unscaled: _scale_grads applies it
                del G
        else:
            if out_ge_in:  # y += s (x S^T) Bf^T
                dH = dY @ Bf_  # (N, r*n), unscaled
                if need_x:
                    dX = torch.mm(dH, S).mul_(s) if W is None else torch.addmm(dY @ W, dH, S, alpha=s)
                if need_lam or need_gam:
                    dS = dH.t() @ x
            else:  # y += s (x Bf) S
                if need_x:
                    dU = dY @ S.t()
                    dX = torch.mm(dU, Bf_.t()).mul_(s) if W is None else torch.addmm(dY @ W, dU, Bf_.t(), alpha=s)
                if need_lam or need_gam:
                    dS = (x @ Bf_).t() @ dY
            if need_W:
                dW = dY.t() @ x
        dlam = dgam = None
        if dS is not None:
            dlam, dgam = _scale_grads(dS, lam, gam, A_, s)
        if need_b and ctx.has_bias:
            db = dY.sum(0)
        return dX, dW, db, dlam, dgam, None, None, None, None, None, None


def _choose_merged(N: int, out_f: int, in_f: int, rn: int, backward: bool) -> bool:
    """Pick the cheaper exact strategy for ``N`` tokens from the multiply-add counts of
    RANDLORA.md §3 (forward + backward when a backward will follow)."""
    D, d = max(out_f, in_f), min(out_f, in_f)
    base = N * D * d
    build = D * d * rn
    fact = base + N * rn * (D + d)
    merged = base + build
    if backward:
        recompute = N * D * rn if in_f > out_f else 0
        fact += base + N * rn * (D + d) + N * rn * d + recompute
        merged += 2 * base + 2 * build
    return merged * _MERGED_COST_FACTOR < fact


# Multiplies the merged path's count before comparing (> 1 favours factorized). Measured on an
# H100 (benchmarks/bench.py, crossover table): with the fused kernels the plain counts pick the
# faster path everywhere but within a few percent of the crossover, so no correction is needed.
_MERGED_COST_FACTOR = 1.0


# -----------------------------------------------------------------------------
# The layer


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


def _module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


class RandLoraLinear(nn.Module):
    """A frozen linear layer plus a RandLoRA update.

    Args:
        base: the layer to adapt: ``nn.Linear``, transformers' ``Conv1D`` (weight stored
            ``(in, out)``) or any linear-like module with ``in_features``, ``out_features`` and a
            forward (e.g. a quantized linear: the adapter runs beside it; not mergeable).
        rank: ``r``, the rank of each random basis; ``1 <= r <= min(in, out)``.
        bases: the shared :class:`_Bases`.
        alpha: ``scaling = alpha / r``.
        dropout: dropout probability on the adapter branch's input (training only).
        path: ``"auto"`` (per call, from the token count), ``"merged"`` or ``"factorized"``.
        name: the layer's qualified name, for messages.

    Parameters: ``lam`` ``(r, n)`` and ``gam`` ``(n, d)``, float32, initialised as PEFT does
    (``lam = 0`` so ΔW = 0, ``gam = 1 / max(n, d)``). Input ``(*, in)`` -> output ``(*, out)``.
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        bases: _Bases,
        alpha: float,
        dropout: float = 0.0,
        path: str = "auto",
        name: str = "",
    ) -> None:
        super().__init__()
        feats = _features(base)
        if feats is None:
            raise TypeError(f"{name or type(base).__name__}: {type(base).__name__} is not a linear-like layer")
        self.base = base
        self.in_features, self.out_features = feats
        self.d, self.D = min(feats), max(feats)
        self.rank, self.n = rank, _num_bases(self.d, rank)
        self.alpha, self.scaling = float(alpha), float(alpha) / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.path, self.name = path, name
        self._bases = bases
        self._views: tuple | None = None
        self.merged = False
        self.disabled = False
        self._merged_params: tuple[torch.Tensor, torch.Tensor] | None = None
        # "linear", "conv1d" (weight stored (in, out)) or "other" (linear-like: the adapter runs
        # beside the base's own forward and never touches its weights)
        self.kind = "linear" if isinstance(base, nn.Linear) else "conv1d" if _is_conv1d(base) else "other"
        device = _module_device(base)
        self.lam = nn.Parameter(torch.zeros(rank, self.n, dtype=torch.float32, device=device))
        self.gam = nn.Parameter(torch.full((self.n, self.d), 1 / max(self.n, self.d), dtype=torch.float32, device=device))

    @property
    def dropout_p(self) -> float:
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0

    @property
    def mergeable(self) -> bool:
        return self.kind != "other"

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

    def _weight(self) -> torch.Tensor:
        """The base weight as ``(out, in)`` (a view for Conv1D)."""
        w = self.base.weight
        return w if self.kind == "linear" else w.t()

    def _apply(self, fn, recurse: bool = True):
        # model.half() / .to(bfloat16) casts the base but keeps lam/gam float32, with their values
        # taken from before the cast (a round trip through the half type would round them).
        before = (self.lam.data, self.gam.data)
        super()._apply(fn, recurse)
        for p, old in zip((self.lam, self.gam), before):
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = old.to(device=p.device, dtype=torch.float32)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bases={self.n} ({self._bases.kind}), scaling={self.scaling:g}, path={self.path!r}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"RandLoraLinear {self.name!r}: input has {x.shape[-1]} features in its last dim, "
                f"expected in_features={self.in_features} (input shape {tuple(x.shape)})"
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
        path = self.path
        if path == "auto":
            merged = _choose_merged(x2.shape[0], self.out_features, self.in_features, self.rank * self.n, backward)
        else:
            merged = path == "merged"
        out_ge_in = self.out_features >= self.in_features
        # Dropout makes the adapter's input differ from the base's: then the base runs on its own.
        fused = self.kind != "other" and (isinstance(self.dropout, nn.Identity) or not self.training)
        with torch.autocast(dt, enabled=False) if dtype is not x.dtype else contextlib.nullcontext():
            if fused:
                W = _as(self._weight(), dtype)
                b = self.base.bias
                b = _as(b, dtype) if b is not None else None
                y = RandLoraFunction.apply(_as(x2, dtype), W, b, self.lam, self.gam, A, Bf, bscale, self.scaling, out_ge_in, merged)
                return y.view(*lead, self.out_features)
            delta = RandLoraFunction.apply(
                _as(self.dropout(x2), dtype), None, None, self.lam, self.gam, A, Bf, bscale, self.scaling, out_ge_in, merged
            )
        y = self.base(x)
        return y + delta.view(*lead, self.out_features).to(y.dtype)

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

    @torch.no_grad()
    def merge(self) -> None:
        """Add ``scaling * ΔW`` to the base weight (float32 arithmetic). A no-op if merged."""
        if self.merged:
            return
        if not self.mergeable:
            raise TypeError(
                f"RandLoraLinear {self.name!r}: cannot merge into a {type(self.base).__name__}, which has no "
                "plain weight; keep the adapter unmerged (the factorized path computes it beside the layer)"
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
        dW = dW if self.kind == "linear" else dW.t()
        w.data.copy_((w.data.float() + dW.to(w.device)).to(w.dtype))


# -----------------------------------------------------------------------------
# Model-level verbs

Targets = Union[str, Sequence[str], Callable[[str, nn.Module], bool]]


def _adapted(model: nn.Module) -> Iterator[tuple[str, RandLoraLinear]]:
    for name, m in model.named_modules():
        if isinstance(m, RandLoraLinear):
            yield name, m


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and _features(m) is not None and not isinstance(m, RandLoraLinear)]


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


def _check_config(rank: object, seed: object, alpha: object, dropout: object, bases: object, path: object) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0):
        raise ValueError(f"alpha must be a positive finite number or None, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if bases not in BASES_KINDS:
        raise ValueError(f"bases must be one of {BASES_KINDS}, got {bases!r}")
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def inject(
    model: nn.Module,
    targets: Targets,
    rank: int,
    seed: int = 0,
    *,
    alpha: float | None = None,
    dropout: float = 0.0,
    bases: str = "dense",
    path: str = "auto",
) -> nn.Module:
    """Wrap the targeted linear layers of ``model`` in :class:`RandLoraLinear`, in place.

    Every other parameter is frozen; the new ``lam``/``gam`` are trainable. Everything is
    validated before anything changes, so a failed call leaves ``model`` as it was.

    Args:
        model: any ``nn.Module``.
        targets: a list of names (a module matches when its qualified name equals an entry or
            ends with ``"." + entry``; each entry must match), a regex string (full match on the
            qualified name) or a callable ``(name, module) -> bool``.
        rank: ``r``; ``1 <= r <= min(in, out)`` of every target. Smaller ranks mean more bases
            (``n = ceil(min(in, out) / r)``) and more trainable parameters.
        seed: seeds the shared random bases (they are regenerated from it, never saved).
        alpha: ``scaling = alpha / rank``; ``None`` means ``20 * rank`` (PEFT's default ratio).
        dropout: dropout on the adapter branch's input, as PEFT does it.
        bases: ``"dense"``, ``"sparse"`` or ``"very_sparse"`` (ternary bases of the paper).
        path: ``"auto"``, ``"merged"`` or ``"factorized"`` (see :class:`RandLoraFunction`);
            can be changed later through each layer's ``path`` attribute.

    Returns:
        ``model``, adapted.
    """
    _check_config(rank, seed, alpha, dropout, bases, path)
    alpha = 20.0 * rank if alpha is None else float(alpha)
    found = _match(model, targets)
    if not found:
        raise ValueError(f"targets {targets!r} selected no module; linear layers: {_short_list(_linear_names(model))}")
    inside = {n + ".base" for n, _ in _adapted(model)}
    existing = [m for _, m in _adapted(model)]
    for name, m in found:
        if isinstance(m, RandLoraLinear) or name in inside or any(name.startswith(p + ".") for p in inside):
            raise ValueError(f"layer {name!r} is already adapted with RandLoRA; eject(model) first to re-adapt it")
        feats = _features(m)
        if feats is None:
            raise TypeError(
                f"target {name!r} is a {type(m).__name__}, not a linear layer (nn.Linear, Conv1D, or a module "
                "with in_features, out_features and forward)"
            )
        if rank > min(feats):
            raise ValueError(
                f"rank {rank} is larger than min(in, out) = {min(feats)} of layer {name!r} "
                f"(in_features={feats[0]}, out_features={feats[1]})"
            )
    for m in existing:
        if (m.rank, m._bases.seed, m._bases.kind, m.alpha) != (rank, seed, bases, alpha) or m._bases.explicit is not None:
            raise ValueError(
                f"model already has RandLoRA layers with rank={m.rank}, seed={m._bases.seed}, bases={m._bases.kind!r}, "
                f"alpha={m.alpha:g}; a second inject must use the same settings (got rank={rank}, seed={seed}, "
                f"bases={bases!r}, alpha={alpha:g})"
            )
    shared = _seeded_bases(rank, seed, bases)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in found:
        _replace(model, name, RandLoraLinear(m, rank, shared, alpha, dropout, path, name))
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def merge(model: nn.Module) -> nn.Module:
    """Add every adapter's ``scaling * ΔW`` into its base weight (idempotent).

    A merged layer computes as its plain base layer (inference at base speed). Its ``lam``/``gam``
    are then unused: a training-mode forward with gradients enabled raises; call :func:`unmerge`
    to keep training.
    """
    layers = [m for _, m in _adapted(model)]
    for m in layers:
        if not m.mergeable:
            raise TypeError(f"cannot merge: layer {m.name!r} wraps a {type(m.base).__name__}, which has no plain weight")
    for m in layers:
        m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract every merged adapter's update again (idempotent)."""
    for _, m in _adapted(model):
        m.unmerge()
    return model


def eject(model: nn.Module) -> nn.Module:
    """Merge, then replace each :class:`RandLoraLinear` by its base layer. Returns ``model``."""
    merge(model)
    for name, m in list(_adapted(model)):
        _replace(model, name, m.base)
    return model


@contextlib.contextmanager
def disable(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside, ``model`` computes as the base model (e.g. the reference model
    of a DPO loss). Merged layers are unmerged for the duration and merged again after."""
    layers = [m for _, m in _adapted(model)]
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
    for _, m in _adapted(model):
        m.lam.requires_grad_(True)
        m.gam.requires_grad_(True)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors only: ``{"<layer path>.lam": (r, n), "<layer path>.gam": (n, d)}``."""
    state = {}
    for name, m in _adapted(model):
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
    layers = dict(_adapted(model))
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


def summary(model: nn.Module) -> str:
    """A table of adapted layers (name, shape, bases, trainable parameters), then the exact
    number of trainable parameters and their share of all parameters."""
    rows = [(n, f"{m.out_features}x{m.in_features}", str(m.n), f"{m.lam.numel() + m.gam.numel():,}") for n, m in _adapted(model)]
    head = ("layer", "out x in", "bases", "trainable")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines = [fmt(head), *map(fmt, rows)]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    first = next((m for _, m in _adapted(model)), None)
    if first is not None:
        b = first._bases
        origin = "bases loaded from a file" if b.explicit is not None else f"seed {b.seed}, bases {b.kind}"
        lines.insert(0, f"RandLoRA: {len(rows)} layers, rank {first.rank}, alpha {first.alpha:g} (scaling {first.scaling:g}), {origin}")
    lines.append(f"trainable parameters: {trainable} of {total} ({100 * trainable / max(total, 1):.4f}%)")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Checkpoint I/O (safetensors; no pickle anywhere)


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


def _layers_config(layers: dict[str, RandLoraLinear]) -> dict[str, object]:
    first = next(iter(layers.values()))
    cfg = {
        "rank": first.rank,
        "alpha": first.alpha,
        "seed": first._bases.seed,
        "bases": first._bases.kind,
        "dropout": first.dropout_p,
    }
    for name, m in layers.items():
        got = (m.rank, m.alpha, m._bases.seed, m._bases.kind)
        if got != (cfg["rank"], cfg["alpha"], cfg["seed"], cfg["bases"]):
            raise ValueError(f"layer {name!r} has settings {got} unlike the others {tuple(cfg.values())[:4]}; one adapter per file")
        if m._bases.explicit is not None:
            raise ValueError(f"layer {name!r} uses explicit (non-seeded) bases; save it with to_peft() instead")
    return cfg


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

    layers = dict(_adapted(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no RandLoRA layers to save")
    cfg = _layers_config(layers)
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
        "rank": str(cfg["rank"]),
        "alpha": repr(cfg["alpha"]),
        "seed": str(cfg["seed"]),
        "bases": cfg["bases"],
        "dropout": repr(cfg["dropout"]),
        "layers": json.dumps({n: [m.out_features, m.in_features] for n, m in layers.items()}),
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


def _read_adapter(path: str | os.PathLike) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
    """Parse and validate a randlora file's metadata; return (config, tensors)."""
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
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {meta.get('format_version')!r}; this randlora reads {FORMAT_VERSION!r}")
    try:
        cfg = {
            "rank": int(meta["rank"]),
            "alpha": float(meta["alpha"]),
            "seed": int(meta["seed"]),
            "bases": meta["bases"],
            "dropout": float(meta["dropout"]),
            "layers": {k: tuple(v) for k, v in json.loads(meta["layers"]).items()},
        }
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: malformed randlora metadata ({type(e).__name__}: {e})") from None
    _check_config(cfg["rank"], cfg["seed"], cfg["alpha"], cfg["dropout"], cfg["bases"], "auto")
    return cfg, tensors


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter written by :func:`save_adapter`.

    Into a plain model, it injects exactly the recorded layers with the recorded settings; into an
    already adapted model, it checks that rank, seed, bases kind, alpha and layers agree. Any
    mismatch (settings, missing or unexpected layers, shapes, NaN/Inf, a corrupt file) raises
    ``ValueError`` and leaves the model as it was. Returns ``model``.
    """
    cfg, tensors = _read_adapter(path)
    layers = dict(_adapted(model))
    recorded = cfg["layers"]
    if layers:
        first = next(iter(layers.values()))
        have = {"rank": first.rank, "seed": first._bases.seed, "bases": first._bases.kind, "alpha": first.alpha}
        for key, value in have.items():
            if cfg[key] != value:
                raise ValueError(f"{path}: adapter has {key}={cfg[key]!r} but the model's RandLoRA layers have {key}={value!r}")
        if set(layers) != set(recorded):
            raise ValueError(
                f"{path}: adapter layers differ from the model's: missing in file {_short_list(sorted(set(layers) - set(recorded)), 10)}; "
                f"not in model {_short_list(sorted(set(recorded) - set(layers)), 10)}"
            )
    modules = dict(model.named_modules())
    for name, (out_f, in_f) in recorded.items():
        m = layers.get(name, modules.get(name))
        if m is None:
            raise ValueError(f"{path}: adapter layer {name!r} is not in the model; its linear layers: {_short_list(_linear_names(model))}")
        feats = (m.in_features, m.out_features) if isinstance(m, RandLoraLinear) else _features(m)
        if feats is None:
            raise ValueError(f"{path}: adapter layer {name!r} is a {type(m).__name__} in the model, not a linear layer")
        if feats != (in_f, out_f):
            raise ValueError(f"{path}: layer {name!r} is (out, in) = {(out_f, in_f)} in the adapter but {feats[::-1]} in the model")
    if not layers:
        # Validate the tensors against a dry run of the layers' shapes before touching the model.
        probe = {n: _ShapeProbe(cfg["rank"], out_f, in_f, n) for n, (out_f, in_f) in recorded.items()}
        _check_state(probe, tensors, str(path))
        inject(model, lambda n, m: n in recorded, cfg["rank"], cfg["seed"], alpha=cfg["alpha"], dropout=cfg["dropout"], bases=cfg["bases"])
    load_adapter_state_dict(model, tensors)
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

# Explicit bases loaded from PEFT remember the flags they came with (written back by to_peft).
_PEFT_ORIGIN: "weakref.WeakKeyDictionary[_Bases, dict]" = weakref.WeakKeyDictionary()


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
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file} must hold one JSON object (one adapter), got {type(raw).__name__}")
    if raw.get("peft_type") != "RANDLORA":
        raise ValueError(f"{file}: peft_type is {raw.get('peft_type')!r}; from_peft reads only RandLoRA adapters (peft_type 'RANDLORA')")
    for name, what in _PEFT_REFUSED_FIELDS.items():
        value = raw.get(name)
        if value not in (None, [], {}, "", ()):
            raise ValueError(f"{file}: {name}={value!r} ({what}) is not supported by from_peft")
    if raw.get("bias", "none") != "none":
        raise ValueError(f"{file}: bias={raw['bias']!r} is not supported by from_peft (only 'none': biases are not trained)")

    def number(name: str, default: object, kinds: tuple[type, ...]) -> object:
        v = raw.get(name, default)
        if isinstance(v, bool) or not isinstance(v, kinds):
            raise ValueError(f"{file}: {name} must be {' or '.join(k.__name__ for k in kinds)}, got {v!r}")
        return v

    def flag(name: str, default: bool) -> bool:
        v = raw.get(name, default)
        if not isinstance(v, bool):
            raise ValueError(f"{file}: {name} must be true or false, got {v!r}")
        return v

    rank = number("r", 32, (int,))
    alpha = number("randlora_alpha", 640, (int, float))
    dropout = number("randlora_dropout", 0.0, (int, float))
    key = number("projection_prng_key", 0, (int,))
    try:
        _check_config(rank, 0, alpha, dropout, "dense", "auto")
    except ValueError as e:
        raise ValueError(f"{file}: {e} (from r / randlora_alpha / randlora_dropout)") from None
    try:
        torch.Generator(device="cpu").manual_seed(key)
    except (RuntimeError, OverflowError, ValueError) as e:
        raise ValueError(f"{file}: projection_prng_key={key} is not a valid torch seed: {e}") from None
    save_projection = flag("save_projection", True)
    kind = "very_sparse" if flag("very_sparse", False) else "sparse" if flag("sparse", False) else "dense"
    flag("fan_in_fan_out", False)  # PEFT follows each layer's type (Linear or Conv1D) whatever this says
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            raise ValueError(f"{file}: target_modules='all-linear' is not supported by from_peft; list the module names")
        try:
            re.compile(targets)
        except re.error as e:
            raise ValueError(f"{file}: target_modules {targets!r} is not a valid regular expression: {e}") from None
    elif isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets):
        targets = list(targets)
    else:
        raise ValueError(f"{file}: target_modules must be a non-empty list of names or a regex string, got {targets!r}")
    return {
        "rank": rank,
        "alpha": float(alpha),
        "dropout": float(dropout),
        "key": key,
        "save_projection": save_projection,
        "kind": kind,
        "targets": targets,
    }


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
    from safetensors import SafetensorError, safe_open

    folder = _peft_folder(path)
    cfg = _peft_config(folder)
    rank, kind = cfg["rank"], cfg["kind"]
    if draw_dtype is not None and draw_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"draw_dtype must be torch.bfloat16, torch.float16 or None, got {draw_dtype!r}")
    if any(True for _ in _adapted(model)):
        raise ValueError(f"{type(model).__name__} already has RandLoRA layers; from_peft adapts a plain model (eject() first)")

    # Targets, by PEFT's rules, and the shared bases' size.
    found = _peft_match(model, cfg["targets"])
    if not found:
        raise ValueError(
            f"{folder}: target_modules {cfg['targets']!r} matches no module of {type(model).__name__}; "
            f"its linear layers: {_short_list(_linear_names(model))}"
        )
    feats: dict[str, tuple[int, int]] = {}
    for name, m in found:
        f = _features(m)
        if f is None:
            raise ValueError(f"{folder}: target {name!r} is a {type(m).__name__}, not a linear layer (nn.Linear, Conv1D or linear-like)")
        if any(name.startswith(other + ".") for other in feats):
            raise ValueError(f"{folder}: targets {name!r} and its parent are both matched by target_modules")
        feats[name] = f
    O = max(o for _, o in feats.values())
    I = max(i for i, _ in feats.values())
    D_max, d_max = max(O, I), min(O, I)
    n_max = _num_bases(d_max, rank)

    # Keys.
    weights = os.path.join(folder, PEFT_WEIGHTS_NAME)
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
        elif suffix in _PEFT_SUFFIXES and stem.startswith(_PEFT_LAYER_PREFIX) and stem[len(_PEFT_LAYER_PREFIX) :] in feats:
            by_layer.setdefault(stem[len(_PEFT_LAYER_PREFIX) :], {})[suffix] = k
        else:
            unexpected.append(k)
    need = ("randlora_lambda", "randlora_gamma")
    missing = [f"{_PEFT_LAYER_PREFIX}{n}.{s}" for n in feats for s in need if s not in by_layer.get(n, {})]
    if cfg["save_projection"]:
        layer_copies = [n for n in feats if by_layer.get(n, {}).keys() & {"randlora_A", "randlora_B"}]
        for n in layer_copies:
            missing += [f"{_PEFT_LAYER_PREFIX}{n}.{s}" for s in ("randlora_A", "randlora_B") if s not in by_layer[n]]
        if layer_copies and len(layer_copies) != len(feats):
            missing += [f"{_PEFT_LAYER_PREFIX}{n}.randlora_A/B" for n in feats if n not in layer_copies]
        if len(shared) == 1:
            missing.append(f"{_PEFT_SHARED_PREFIX}{({'randlora_A', 'randlora_B'} - set(shared)).pop()}")
        if not layer_copies and not shared:
            missing.append("randlora_A and randlora_B (the config says save_projection=true)")
    else:
        unexpected += sorted(shared.values())
        unexpected += sorted(k for n in by_layer for s, k in by_layer[n].items() if s in ("randlora_A", "randlora_B"))
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

    # Values.
    def checked(f, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = f.get_tensor(key)
        if not t.is_floating_point():
            raise ValueError(f"{weights}: {key} must be a floating-point tensor, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{weights}: {key} has shape {tuple(t.shape)}, expected {shape}")
        t = t.to(torch.float32)
        if not torch.isfinite(t).all():
            raise ValueError(f"{weights}: {key} contains NaN or Inf values")
        return t

    params: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    A = B = None
    with safe_open(weights, framework="pt") as f:
        for name, (i, o) in feats.items():
            d = min(i, o)
            n = _num_bases(d, rank)
            lam = checked(f, by_layer[name]["randlora_lambda"], (rank, n))
            gam = checked(f, by_layer[name]["randlora_gamma"], (n, d))
            params[name] = (lam, gam)
        if cfg["save_projection"]:
            sources = [shared] if shared else []
            sources += [by_layer[n] for n in feats if "randlora_A" in by_layer[n]]
            for src in sources:
                a = checked(f, src["randlora_A"], (rank, 1, d_max))
                b = checked(f, src["randlora_B"], (D_max, n_max, rank))
                if A is None:
                    A, B = a, b
                elif not (torch.equal(a, A) and torch.equal(b, B)):
                    raise ValueError(
                        f"{weights}: the stored copies of the shared bases differ ({src['randlora_A']} / "
                        f"{src['randlora_B']} vs the first copy); the file is inconsistent"
                    )
            A = A[:, 0]
    if A is None:
        A, B = _peft_regenerate(kind, rank, cfg["key"], O, I, draw_dtype or _peft_draw_dtype())
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(f"{folder}: PEFT's regenerated {kind} bases are degenerate (NaN/Inf) for r={rank}, shape {(O, I)}")

    # Everything is valid: adapt.
    bases = _Bases(rank, explicit=(A, B))
    _PEFT_ORIGIN[bases] = {"sparse": kind == "sparse", "very_sparse": kind == "very_sparse", "projection_prng_key": cfg["key"]}
    modules = dict(found)
    layers = {n: RandLoraLinear(modules[n], rank, bases, cfg["alpha"], cfg["dropout"], "auto", n) for n in feats}
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in layers.items():
        with torch.no_grad():
            layer.lam.copy_(params[name][0])
            layer.gam.copy_(params[name][1])
        _replace(model, name, layer)
    return model


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
    layers = dict(_adapted(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no RandLoRA layers to save")
    first = next(iter(layers.values()))
    bases = first._bases
    for name, m in layers.items():
        if (m.rank, m.alpha, m.dropout_p) != (first.rank, first.alpha, first.dropout_p):
            raise ValueError(
                f"layer {name!r} has rank/alpha/dropout {(m.rank, m.alpha, m.dropout_p)} unlike {first.name!r} "
                f"{(first.rank, first.alpha, first.dropout_p)}; a PEFT adapter has one of each"
            )
        same = m._bases is bases or (
            bases.explicit is None and m._bases.explicit is None and (m._bases.seed, m._bases.kind) == (bases.seed, bases.kind)
        )
        if not same:
            raise ValueError(f"layer {name!r} uses other random bases than {first.name!r}; a PEFT adapter shares one pair")
        if m.kind == "other":
            raise ValueError(f"layer {name!r} wraps a {type(m.base).__name__}; PEFT's RandLoRA adapts only nn.Linear and Conv1D")
    rank = first.rank
    O = max(m.out_features for m in layers.values())
    I = max(m.in_features for m in layers.values())
    D_max, d_max = max(O, I), min(O, I)
    n_max = _num_bases(d_max, rank)
    if bases.explicit is not None:
        A_all, B_all = bases.explicit
        if A_all.shape[1] < d_max or B_all.shape[0] < D_max or B_all.shape[1] < n_max:
            raise ValueError(f"the model's explicit bases A {tuple(A_all.shape)}, B {tuple(B_all.shape)} are too small for {(D_max, d_max)}")
        A, B = A_all[:, :d_max], B_all[:D_max, :n_max]
        origin = _PEFT_ORIGIN.get(bases, {})
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
        A, B = A[:, :d_max], B[:D_max, :n_max]
        origin = {"sparse": bases.kind == "sparse", "very_sparse": bases.kind == "very_sparse", "projection_prng_key": 0}
    A = A.detach().to("cpu", torch.float32).reshape(rank, 1, d_max).contiguous()
    B = B.detach().to("cpu", torch.float32).contiguous()

    items: list[tuple[str, torch.Tensor]] = []
    for name, m in layers.items():
        items.append((f"{_PEFT_LAYER_PREFIX}{name}.randlora_lambda", _gather(m.lam)))
        items.append((f"{_PEFT_LAYER_PREFIX}{name}.randlora_gamma", _gather(m.gam)))
    if not _is_writer():
        return
    for name in layers:
        items += [(f"{_PEFT_LAYER_PREFIX}{name}.randlora_A", A), (f"{_PEFT_LAYER_PREFIX}{name}.randlora_B", B)]
    items += [(f"{_PEFT_SHARED_PREFIX}randlora_A", A), (f"{_PEFT_SHARED_PREFIX}randlora_B", B)]
    alpha = first.alpha
    config = {
        "auto_mapping": None,
        "base_model_name_or_path": None,
        "bias": "none",
        "fan_in_fan_out": any(m.kind == "conv1d" for m in layers.values()),
        "inference_mode": True,
        "init_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "modules_to_save": None,
        "peft_type": "RANDLORA",
        "projection_prng_key": origin.get("projection_prng_key", 0),
        "r": rank,
        "randlora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "randlora_dropout": first.dropout_p,
        "revision": None,
        "save_projection": True,
        "sparse": origin.get("sparse", False),
        "very_sparse": origin.get("very_sparse", False),
        "target_modules": "(?:" + "|".join(re.escape(n) for n in layers) + ")",
        "task_type": None,
    }
    folder = os.fspath(path)
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
