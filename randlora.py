"""RandLoRA: full-rank parameter-efficient fine-tuning, in one file.

A frozen linear layer ``y = x W^T + b`` (``W``: ``(out, in)``) is adapted with

    ΔW = Σ_b  B_b Λ_b A Γ_b        (b = 0 .. n-1)

where ``A`` (``(r, d)``) and the ``B_b`` (``(D, r)`` each) are fixed random bases shared by
every adapted layer, and only the diagonals ``lam`` (Λ, ``(r, n)``) and ``gam`` (Γ,
``(n, d)``) are trained. ``d = min(in, out)``, ``D = max(in, out)``, ``n = ceil(d / r)``,
so ``n * r >= d`` and the update can be full rank. Index conventions follow Hugging Face
PEFT exactly (see ``RANDLORA.md``): with the scaled small basis ``S`` ``(r*n, d)`` and the
flattened large basis ``Bf`` ``(D, n*r)``,

    S[k*n + b, j] = lam[k, b] * A[k, j] * gam[b, j]
    Bf[:, b*r + k] = B[:, b, k]
    M = Bf @ S                          (D, d)
    ΔW = M if out >= in else M^T
    y = x W^T + b + (alpha / r) * x ΔW^T

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


class _Bases:
    """The shared random bases of one adapter: ``A`` ``(r, d_max)`` and ``B`` ``(D_max, n_max, r)``.

    Seeded bases are generated on the CPU in float32 from ``seed`` alone, then cast and moved
    lazily: one copy per (device, dtype), grown when a larger layer asks, shared by every layer.
    Dense bases are uniform with unit variance (``(2u - 1) * sqrt(3)``); sparse kinds are ternary
    ``{-1, 0, +1} * sqrt(s)`` and are kept as int8 plus one float scale (4x smaller than bf16),
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
        if hit is None or hit[1].shape[0] < D or hit[0].shape[1] < d:
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
        A_all, B_all, scale = hit
        n = _num_bases(d, self.rank)
        return A_all[:, :d], B_all[:D, :n].flatten(1), scale

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


def _materialize(t: torch.Tensor, dtype: torch.dtype, scale: float | None) -> torch.Tensor:
    if scale is None:
        return t if t.dtype == dtype else t.to(dtype)
    return t.to(dtype).mul_(scale)


# -----------------------------------------------------------------------------
# The autograd function


def _small_basis(lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``S`` ``(r*n, d)`` in ``dtype``: ``S[k*n + b, j] = lam[k, b] * A[k, j] * gam[b, j]``.

    Built in float32 (float64 for float64 compute) and rounded once.
    """
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    S = lam.to(acc)[:, :, None] * gam.to(acc)[None, :, :]
    S.mul_(A.to(acc)[:, None, :])
    return S.flatten(0, 1).to(dtype)


def _merged_weight(W: torch.Tensor | None, S: torch.Tensor, Bf: torch.Tensor, scaling: float, out_ge_in: bool) -> torch.Tensor:
    """``W + scaling * ΔW`` ``(out, in)`` in the compute dtype, in one matmul."""
    lhs, rhs = (Bf, S) if out_ge_in else (S.t(), Bf.t())
    if W is None:
        return torch.mm(lhs, rhs).mul_(scaling)
    return torch.addmm(W, lhs, rhs, alpha=scaling)


def _scale_grads(
    dS: torch.Tensor, lam: torch.Tensor, gam: torch.Tensor, A: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``dlam`` ``(r, n)`` and ``dgam`` ``(n, d)`` from ``dS`` ``(r*n, d)`` (RANDLORA.md §2)."""
    acc = torch.float64 if dS.dtype == torch.float64 else torch.float32
    r, n = lam.shape
    dSA = dS.to(acc).view(r, n, -1).mul_(A.to(acc)[:, None, :])  # dS is a temporary: in place is safe
    dlam = torch.einsum("kbj,bj->kb", dSA, gam.to(acc))
    dgam = torch.einsum("kbj,kb->bj", dSA, lam.to(acc))
    return dlam.to(lam.dtype), dgam.to(gam.dtype)


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
            if y is None:
                y = torch.mm(lhs, rhs).mul_(scaling)
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
        dY = dY.to(dtype)
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
                    dS = (Bf_.t() @ G) if out_ge_in else (G @ Bf_).t()
                    dS.mul_(s)
                del G
        else:
            if out_ge_in:  # y += s (x S^T) Bf^T
                dH = (dY @ Bf_).mul_(s)  # (N, r*n)
                if need_x:
                    dX = dH @ S if W is None else (dY @ W).addmm_(dH, S)
                if need_lam or need_gam:
                    dS = dH.t() @ x
            else:  # y += s (x Bf) S
                if need_x:
                    dU = (dY @ S.t()).mul_(s)
                    dX = dU @ Bf_.t() if W is None else (dY @ W).addmm_(dU, Bf_.t())
                if need_lam or need_gam:
                    dS = (x @ Bf_).t() @ dY
                    dS.mul_(s)
            if need_W:
                dW = dY.t() @ x
        dlam = dgam = None
        if dS is not None:
            dlam, dgam = _scale_grads(dS, lam, gam, A_)
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


# Multiplies the merged path's count before comparing: > 1 favours factorized. Tuned on an
# H100 in benchmarks/bench_gpu.py (skinny matmuls of the factorized path run below peak).
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
            forward (e.g. a quantized linear; adapted through the factorized path, not mergeable).
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
        self.merged = False
        self.disabled = False
        self._merged_params: tuple[torch.Tensor, torch.Tensor] | None = None
        device = _module_device(base)
        self.lam = nn.Parameter(torch.zeros(rank, self.n, dtype=torch.float32, device=device))
        self.gam = nn.Parameter(torch.full((self.n, self.d), 1 / max(self.n, self.d), dtype=torch.float32, device=device))

    @property
    def kind(self) -> str:
        """``"linear"``, ``"conv1d"`` or ``"other"`` (linear-like; adapter computed beside it)."""
        return "linear" if isinstance(self.base, nn.Linear) else "conv1d" if _is_conv1d(self.base) else "other"

    @property
    def mergeable(self) -> bool:
        return self.kind != "other"

    def _weight(self) -> torch.Tensor:
        """The base weight as ``(out, in)`` (a view for Conv1D)."""
        w = self.base.weight
        return w if self.kind == "linear" else w.t()

    def _apply(self, fn, recurse: bool = True):
        # model.half() / .to(bfloat16) casts the base but keeps lam/gam float32.
        super()._apply(fn, recurse)
        for p in (self.lam, self.gam):
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bases={self.n}, scaling={self.scaling:g}, kind={self._bases.kind}, path={self.path!r}"
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
        A, Bf, bscale = self._bases.get(self.D, self.d, x.device, dtype)
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
        with torch.autocast(dt, enabled=False):
            if fused:
                W = self._weight().to(dtype)
                b = self.base.bias
                b = b.to(dtype) if b is not None else None
                y = RandLoraFunction.apply(x2.to(dtype), W, b, self.lam, self.gam, A, Bf, bscale, self.scaling, out_ge_in, merged)
                return y.view(*lead, self.out_features)
            delta = RandLoraFunction.apply(
                self.dropout(x2).to(dtype), None, None, self.lam, self.gam, A, Bf, bscale, self.scaling, out_ge_in, merged
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
        hits = [(n, m) for n, m in modules if n == entry or n.endswith("." + entry)]
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
        lines.insert(0, f"RandLoRA: {len(rows)} layers, rank {first.rank}, alpha {first.alpha:g} (scaling {first.scaling:g}), seed {b.seed}, bases {b.kind}")
    lines.append(f"trainable parameters: {trainable} of {total} ({100 * trainable / max(total, 1):.4f}%)")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Checkpoint I/O (safetensors; no pickle anywhere)


def _gather(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 shards parameters as DTensors: every rank must call this collective.
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else t


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
        "dropout": first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0,
    }
    for name, m in layers.items():
        got = (m.rank, m.alpha, m._bases.seed, m._bases.kind)
        if got != (cfg["rank"], cfg["alpha"], cfg["seed"], cfg["bases"]):
            raise ValueError(f"layer {name!r} has settings {got} unlike the others {tuple(cfg.values())[:4]}; one adapter per file")
        if m._bases.explicit is not None:
            raise ValueError(f"layer {name!r} uses explicit (non-seeded) bases; save it with to_peft() instead")
    return cfg


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
        tensors[f"{name}.lam"] = _gather(m.lam.detach()).to("cpu", torch.float32).contiguous()
        tensors[f"{name}.gam"] = _gather(m.gam.detach()).to("cpu", torch.float32).contiguous()
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
    fd, tmp = tempfile.mkstemp(prefix=".randlora-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _read_adapter(path: str | os.PathLike) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
    """Parse and validate a randlora file's metadata; return (config, tensors)."""
    from safetensors import SafetensorsError
    from safetensors.torch import load_file
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorsError, ValueError, OSError) as e:
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
            raise TypeError(f"{path}: adapter layer {name!r} is a {type(m).__name__} in the model, not a linear layer")
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
