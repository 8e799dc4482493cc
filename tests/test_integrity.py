"""Issue #10: integrity under hostile use.

Three classes of failure, each fixed as a class:

* silent wrong results (merge state through ``state_dict``, merge inside ``disable``, a second
  inject, parametrized weights, fp16 outliers, rank of sparse bases),
* data loss (non-finite saves, atomicity of files and folders, temp files after a crash, file
  mode and symlinks on overwrite, a checksum over the file, settings lost on a round trip),
* unclear errors and hangs (bad arguments, bad files, FIFOs, symlink loops, huge strings).

Outputs are compared with an independent float64 reference built from conftest's helpers
(``ref_delta`` / ``ref_layer_delta`` on the bases), never with randlora's own arithmetic. Every
refusal is checked bitwise against a snapshot of the model and, where files are involved, of the
file system (bytes, mode, directory listing).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import randlora
from conftest import (
    assert_close,
    fresh_tiny,
    layer_bases64,
    nonzero_uniform,
    randomize_model_,
    ref_delta,
    ref_layer_delta,
)

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
TARGETS = ["embed", "block.0", "head"]
X_SEED = 77


# -----------------------------------------------------------------------------
# Helpers


def adapters(model: nn.Module):
    """(name, adapter) pairs: the contract's ``named_adapters``."""
    fn = getattr(randlora, "named_adapters", None) or randlora._adapted
    return list(fn(model))


def make(seed: int = 0, rank: int = 2, targets=TARGETS, values: int | None = 5, **kw) -> nn.Module:
    """TinyNet (seed 1234 weights) adapted on ``targets``, random non-zero lam/gam, eval mode."""
    model = fresh_tiny()
    randlora.inject(model, targets, rank=rank, seed=seed, **kw)
    if values is not None:
        randomize_model_(model, values)
    return model.eval()


def xs(n: int = 5, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(X_SEED)).to(dtype)


def dropout_of(layer: nn.Module) -> float:
    """The dropout probability the adapter branch really uses (any nn.Dropout outside the base)."""
    ps = [m.p for n, m in layer.named_modules() if isinstance(m, nn.Dropout) and not n.startswith("base")]
    assert len(ps) <= 1
    return ps[0] if ps else 0.0


def params64(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapters' lam/gam now, as float64 copies (what the model *should* compute)."""
    return {n: (m.lam.detach().double().clone(), m.gam.detach().double().clone()) for n, m in adapters(model)}


def reference64(src: nn.Module, params=None, *, dtype=torch.float32, adapted: bool = True) -> nn.Module:
    """A plain float64 TinyNet computing base + scaling * ΔW of ``src``'s adapters.

    The base weights come from a fresh TinyNet (the same seed), rounded to ``dtype`` (the dtype
    the adapted model runs in); ΔW comes from conftest's element-wise float64 reference with the
    layers' bases and ``params`` (default: the adapters' current lam/gam).
    """
    ref = fresh_tiny().to(dtype).double()
    if adapted:
        params = params64(src) if params is None else params
        with torch.no_grad():
            for name, m in adapters(src):
                lam, gam = params[name]
                ref.get_submodule(name).weight.add_(ref_layer_delta(m, lam, gam))
    return ref.eval()


def check_outputs(model: nn.Module, ref: nn.Module, x: torch.Tensor, rtol: float = 2e-5, what: str = "") -> None:
    with torch.no_grad():
        y = model(x)
        e = ref(x.double())
    assert_close(y, e, rtol, what=what or "output vs float64 reference")


def base_weights64(dtype=torch.float32) -> dict[str, torch.Tensor]:
    plain = fresh_tiny().to(dtype)
    return {n: m.weight.detach().double() for n, m in plain.named_modules() if isinstance(m, nn.Linear)}


def check_weights_consistent(model: nn.Module, params, dtype=torch.float32, slack: float = 4e-6) -> None:
    """A merged layer's base weight is W0 + scaling * ΔW(params); an unmerged one's is W0."""
    w0 = base_weights64(dtype)
    eps = {torch.float32: 1.0, torch.float64: 1.0, torch.bfloat16: 2e4, torch.float16: 2e3}[dtype]
    for name, m in adapters(model):
        d = ref_layer_delta(m, *params[name])
        w = m.base.weight.detach().double()
        expected = w0[name] + d if m.merged else w0[name]
        atol = slack * eps * max(d.abs().max().item(), w0[name].abs().max().item())
        assert_close(w, expected, 0, atol=atol, what=f"{name} base weight (merged={m.merged})")


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.dtype != torch.bool else t


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(_bits(a), _bits(b))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    return a == b


def snap(model: nn.Module):
    """Everything a refused call must leave untouched, bitwise (NaN-safe; extra state too)."""
    state = {}
    for k, v in model.state_dict().items():
        state[k] = v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
    return (
        state,
        [(n, type(m), m.training) for n, m in model.named_modules()],
        [(n, p.requires_grad, p.dtype, p.device) for n, p in model.named_parameters()],
        [(n, m.merged, m.disabled, getattr(m, "strategy", None), dropout_of(m)) for n, m in adapters(model)],
    )


def assert_unchanged(model: nn.Module, before) -> None:
    now = snap(model)
    assert list(now[0]) == list(before[0]), "state_dict keys changed"
    for k in before[0]:
        assert _same(now[0][k], before[0][k]), f"{k} changed"
    assert now[1] == before[1], "modules or train/eval modes changed"
    assert now[2] == before[2], "parameters' requires_grad/dtype/device changed"
    assert now[3] == before[3], "adapter flags changed"


def fs_snapshot(root) -> dict:
    """Every entry under ``root``: kind, mode, bytes (regular files) or link text (symlinks)."""
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


def read_meta(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def rewrite(src, dst, *, tensors=None, meta=None) -> None:
    save_file(load_file(str(src)) if tensors is None else tensors, str(dst), metadata=read_meta(src) if meta is None else meta)


def refused(model, fn, *args, exc=ValueError, match=None, fs_root=None):
    """``fn(*args)`` must raise ``exc`` (matching ``match``) and leave model and files as they were."""
    before = snap(model)
    fs_before = fs_snapshot(fs_root) if fs_root is not None else None
    with pytest.raises(exc, match=match) as info:
        fn(*args)
    assert_unchanged(model, before)
    if fs_root is not None:
        assert_fs_unchanged(fs_root, fs_before)
    return info.value


# =============================================================================
# 1. Silent wrong results
# -----------------------------------------------------------------------------
# Merge state travels with model.state_dict(): loading a merged state into an unmerged model
# (or the reverse, or merged into merged) gives the right outputs, or raises with the model
# unchanged. Never dW counted twice or not at all.


DTYPES = {torch.float32: 2e-5, torch.float64: 2e-6, torch.bfloat16: 3e-2}


@settings(max_examples=15)
@given(
    direction=st.sampled_from(["merged->unmerged", "unmerged->merged", "merged->merged"]),
    dtype=st.sampled_from(list(DTYPES)),
    seed=st.integers(0, 50),
)
def test_state_dict_carries_merge_state(direction, dtype, seed):
    # alpha keeps scaling * ΔW comparable to W, so bf16 merge/unmerge rounding stays small
    # while ΔW counted twice (or not at all) stays far outside the tolerance.
    src = make(values=seed, alpha=0.5).to(dtype)
    params = params64(src)
    ref = reference64(src, params, dtype=dtype)
    base_ref = reference64(src, dtype=dtype, adapted=False)
    x = xs(dtype=dtype)
    rtol = DTYPES[dtype]
    if direction.startswith("merged"):
        randlora.merge(src)
    check_outputs(src, ref, x, rtol, "source")
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in src.state_dict().items()}

    dst = make(values=seed + 100, alpha=0.5).to(dtype)  # other lam/gam: a load must replace them
    if direction.endswith("->merged"):
        randlora.merge(dst)
    before = snap(dst)
    try:
        dst.load_state_dict(state)
    except (RuntimeError, ValueError) as e:
        assert_unchanged(dst, before)
        assert "merge" in str(e).lower(), f"refusal does not say why: {e}"
        return
    check_outputs(dst, ref, x, rtol, f"{direction}: loaded")
    check_weights_consistent(dst, params, dtype)
    randlora.unmerge(dst)  # subtracts exactly what is in the weight
    check_outputs(dst, ref, x, rtol, f"{direction}: after unmerge")
    check_weights_consistent(dst, params, dtype)
    assert not any(m.merged for _, m in adapters(dst))
    randlora.merge(dst)
    check_outputs(dst, ref, x, rtol, f"{direction}: merged again")
    check_weights_consistent(dst, params, dtype)
    with randlora.disable(dst):
        check_outputs(dst, base_ref, x, rtol, f"{direction}: disabled")


def test_state_dict_of_merged_model_differs_from_unmerged():
    """Self-describing: the same lam/gam merged and unmerged give state dicts that differ in
    more than the base weights (the merge state itself is recorded)."""
    a, b = make(), make()
    randlora.merge(a)
    sa, sb = a.state_dict(), b.state_dict()
    weight_keys = {f"{n}.base.weight" for n, _ in adapters(a)}
    other_diff = [k for k in sa if k not in weight_keys and (k not in sb or not _same(sa[k], sb[k]))]
    assert other_diff or set(sa) != set(sb), "merge state is not in the state dict"


# -----------------------------------------------------------------------------
# merge() inside `with disable(model):` is refused, or keeps base outputs inside and a
# consistent state after.


@pytest.mark.parametrize("start_merged", [False, True])
def test_merge_inside_disable(start_merged):
    model = make()
    params = params64(model)
    ref, base_ref, x = reference64(model, params), reference64(model, adapted=False), xs()
    if start_merged:
        randlora.merge(model)
    with randlora.disable(model):
        before = snap(model)
        try:
            randlora.merge(model)
        except (RuntimeError, ValueError) as e:
            assert_unchanged(model, before)
            assert "disable" in str(e).lower()
        check_outputs(model, base_ref, x, what="inside disable after merge()")
        randlora.unmerge(model)
        check_outputs(model, base_ref, x, what="inside disable after unmerge()")
        randlora.merge(model) if not start_merged else None
        check_outputs(model, base_ref, x, what="inside disable after a second merge()")
    check_outputs(model, ref, x, what="after disable")
    check_weights_consistent(model, params)
    assert not any(m.disabled for _, m in adapters(model))
    randlora.unmerge(model)
    check_weights_consistent(model, params)
    check_outputs(model, ref, x, what="after disable, unmerged")
    with randlora.disable(model):
        check_outputs(model, base_ref, x, what="disabled again")


# -----------------------------------------------------------------------------
# A property over sequences: merge / unmerge / disable (nested) / load_adapter_state_dict /
# save_adapter + load_adapter / state_dict round trips, always against a float64 reference.


class MergeDisableMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.model = make(values=1)
        self.params = params64(self.model)
        self.ctxs: list = []
        self.x = xs()
        self.tmp = tempfile.mkdtemp(prefix="randlora-sm-")
        self.n = 0
        self.base_ref = reference64(self.model, adapted=False)

    def teardown(self):
        while self.ctxs:
            self.ctxs.pop().__exit__(None, None, None)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def any_merged(self):
        return any(m.merged for _, m in adapters(self.model))

    @precondition(lambda self: not self.any_merged())
    @rule(seed=st.integers(0, 10_000))
    def set_params(self, seed):
        g = torch.Generator().manual_seed(seed)
        state = {}
        for name, m in adapters(self.model):
            state[f"{name}.lam"] = nonzero_uniform(m.lam.shape, g)
            state[f"{name}.gam"] = nonzero_uniform(m.gam.shape, g) / m.d**0.5
        randlora.load_adapter_state_dict(self.model, state)
        self.params = {n: (state[f"{n}.lam"].double(), state[f"{n}.gam"].double()) for n, _ in adapters(self.model)}

    @rule()
    def merge(self):
        before = snap(self.model)
        try:
            randlora.merge(self.model)
        except (RuntimeError, ValueError):
            assert self.ctxs, "merge refused outside disable"
            assert_unchanged(self.model, before)

    @rule()
    def unmerge(self):
        randlora.unmerge(self.model)

    @precondition(lambda self: len(self.ctxs) < 2)
    @rule()
    def enter_disable(self):
        ctx = randlora.disable(self.model)
        assert ctx.__enter__() is self.model
        self.ctxs.append(ctx)

    @precondition(lambda self: self.ctxs)
    @rule()
    def exit_disable(self):
        self.ctxs.pop().__exit__(None, None, None)

    @precondition(lambda self: not self.ctxs)
    @rule()
    def save_and_load(self):
        self.n += 1
        path = os.path.join(self.tmp, f"{self.n}.safetensors")
        randlora.save_adapter(self.model, path)
        new = fresh_tiny().eval()
        randlora.load_adapter(new, path)
        self.model = new

    @precondition(lambda self: not self.ctxs)
    @rule(into_merged=st.booleans(), seed=st.integers(0, 100))
    def state_dict_round_trip(self, into_merged, seed):
        state = self.model.state_dict()
        new = make(values=seed + 7)
        if into_merged:
            randlora.merge(new)
        before = snap(new)
        try:
            new.load_state_dict(state)
        except (RuntimeError, ValueError):
            assert_unchanged(new, before)
            return
        self.model = new

    @invariant()
    def computes_the_reference(self):
        if self.ctxs:
            check_outputs(self.model, self.base_ref, self.x, 1e-4, "inside disable")
        else:
            check_outputs(self.model, reference64(self.model, self.params), self.x, 1e-4, "adapted")
            check_weights_consistent(self.model, self.params, slack=40e-6)


TestMergeDisableMachine = MergeDisableMachine.TestCase
TestMergeDisableMachine.settings = settings(max_examples=8, stateful_step_count=12, deadline=None)


# -----------------------------------------------------------------------------
# A second inject (same settings, other targets) leaves the first call's lam/gam trainable.


def test_second_inject_keeps_first_trainable():
    model = fresh_tiny()
    randlora.inject(model, ["head"], rank=2, seed=1)
    randlora.inject(model, ["block.0"], rank=2, seed=1)
    randlora.inject(model, ["embed"], rank=2, seed=1)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{t}.{p}" for t in TARGETS for p in ("lam", "gam"))
    randomize_model_(model, 3)
    model.train()
    model(xs()).square().sum().backward()
    for n, m in adapters(model):
        for p in (m.lam, m.gam):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {k: v.clone() for k, v in randlora.adapter_state_dict(model).items()}
    opt.step()
    after = randlora.adapter_state_dict(model)
    assert all(not torch.equal(before[k], after[k]) for k in before)


# -----------------------------------------------------------------------------
# weight_norm / parametrized Linear: merge is correct, or the target is refused at inject.


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w

    def right_inverse(self, w):
        return w / 2


def _parametrized_net(kind: str) -> nn.Module:
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    for i in (0, 2):
        if kind == "weight_norm":
            torch.nn.utils.parametrizations.weight_norm(net[i])
        elif kind == "custom":
            torch.nn.utils.parametrize.register_parametrization(net[i], "weight", _Double())
        else:  # the old hook-based weight_norm: weight recomputed from g, v before every forward
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.nn.utils.weight_norm(net[i])
    return net


def _computed_weight(lin: nn.Module) -> torch.Tensor:
    """The weight a linear module really computes with, through its own forward (hooks and
    parametrizations included): (lin(I) - lin(0))^T."""
    eye = torch.eye(lin.in_features, dtype=torch.float64)
    with torch.no_grad():
        lin64 = copy.deepcopy(lin).double()
        return (lin64(eye) - lin64(torch.zeros_like(eye))).t()


def _parametrized_ref(w_eff, bias, layers, x):
    h = x.double()
    for i, name in enumerate(("0", "2")):
        m = layers[name]
        h = h @ (w_eff[name] + ref_layer_delta(m)).t() + bias[name]
        if i == 0:
            h = torch.tanh(h)
    return h


@pytest.mark.parametrize("kind", ["weight_norm", "custom", "old_weight_norm"])
def test_parametrized_linear_merge(kind):
    net = _parametrized_net(kind)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_base = net(x).detach()
    w_eff = {n: net.get_submodule(n).weight.detach().double().clone() for n in ("0", "2")}
    bias = {n: net.get_submodule(n).bias.detach().double().clone() for n in ("0", "2")}
    before = snap(net)
    try:
        randlora.inject(net, ["0", "2"], rank=2)
    except (TypeError, ValueError) as e:
        assert_unchanged(net, before)
        assert "'0'" in str(e) or "'2'" in str(e), f"refusal does not name the layer: {e}"
        return
    randomize_model_(net, 4)
    net.eval()
    layers = dict(adapters(net))
    ref = _parametrized_ref(w_eff, bias, layers, x)
    with torch.no_grad():
        assert_close(net(x), ref, 2e-5, what="unmerged")
        randlora.merge(net)
        assert all(m.merged for m in layers.values())
        assert_close(net(x), ref, 2e-5, what="merged")
        for n, m in layers.items():  # the weight the base computes with carries ΔW
            assert_close(_computed_weight(m.base), w_eff[n] + ref_layer_delta(m), 2e-5, what=f"{n} merged weight")
        with randlora.disable(net):
            assert_close(net(x), y_base, 2e-5, what="disabled")
        assert_close(net(x), ref, 2e-5, what="merged after disable")
        randlora.unmerge(net)
        assert_close(net(x), ref, 2e-5, what="unmerged again")
        for n, m in layers.items():
            assert_close(_computed_weight(m.base), w_eff[n], 0, atol=1e-5, what=f"{n} unmerged weight")
        randlora.eject(net)
        assert not adapters(net)
        assert_close(net(x), ref, 2e-5, what="ejected")


# -----------------------------------------------------------------------------
# fp16 outliers: a fresh adapter (ΔW = 0) on a 64x256 fp16 Linear (out < in) with one input
# channel at >= 1e4 gives finite outputs wherever nn.Linear's are (every strategy).


@pytest.mark.parametrize("strategy", ["auto", "build", "factorized"])
@settings(max_examples=6)
@given(
    channel=st.integers(0, 255),
    mag=st.sampled_from([1e4, 3e4, 6e4]),
    sign=st.sampled_from([1.0, -1.0]),
    tokens=st.sampled_from([1, 3, 64, 600]),
    grad=st.booleans(),
)
def test_fp16_outlier_fresh_adapter_finite(strategy, channel, mag, sign, tokens, grad):
    torch.manual_seed(0)
    lin = nn.Linear(256, 64).half()
    model = nn.Sequential(lin)
    randlora.inject(model, ["0"], rank=8, strategy=strategy)
    assert model[0].strategy == strategy
    g = torch.Generator().manual_seed(channel)
    x = torch.randn(tokens, 256, generator=g).half()
    x[:, channel] = mag * sign
    with torch.no_grad():
        y_base = lin(x)
    assert torch.isfinite(y_base).all()  # nn.Linear itself is fine
    with torch.set_grad_enabled(grad):
        y = model(x)
    assert y.dtype == torch.float16
    assert torch.isfinite(y).all(), f"{strategy}: {int((~torch.isfinite(y)).sum())} non-finite outputs"
    assert_close(y, y_base, 4e-3, what=f"{strategy}: fresh adapter vs nn.Linear")


# -----------------------------------------------------------------------------
# Full rank: seeded dense / sparse / very_sparse bases give rank(ΔW) == min(in, out) for generic
# lam/gam (float64 reference), every shape and rank.


def _rank_of_delta(kind: str, out_f: int, in_f: int, rank: int, seed: int) -> tuple[int, int]:
    model = nn.Sequential(nn.Linear(in_f, out_f))
    randlora.inject(model, ["0"], rank=rank, seed=seed, bases=kind)
    layer = model[0]
    g = torch.Generator().manual_seed(1000 + seed)
    lam = nonzero_uniform(tuple(layer.lam.shape), g, dtype=torch.float64)
    gam = nonzero_uniform(tuple(layer.gam.shape), g, dtype=torch.float64)
    with torch.no_grad():
        layer.lam.copy_(lam)
        layer.gam.copy_(gam)
    A, B = layer_bases64(layer)
    dW = ref_delta(A, B, lam, gam, out_f, in_f)
    assert dW.shape == (out_f, in_f)
    return int(torch.linalg.matrix_rank(dW)), min(out_f, in_f)


@settings(max_examples=45)
@given(
    kind=st.sampled_from(["dense", "sparse", "very_sparse"]),
    out_f=st.integers(2, 96),
    in_f=st.integers(2, 96),
    data=st.data(),
    seed=st.integers(0, 3),
)
def test_delta_is_full_rank(kind, out_f, in_f, data, seed):
    rank = data.draw(st.integers(1, min(out_f, in_f)), label="rank")
    got, want = _rank_of_delta(kind, out_f, in_f, rank, seed)
    assert got == want, f"{kind} {out_f}x{in_f} r={rank} seed={seed}: rank {got} < {want}"


@pytest.mark.parametrize("kind,out_f,in_f,rank", [("sparse", 640, 384, 8), ("very_sparse", 1024, 1024, 32)])
def test_delta_is_full_rank_reported_cases(kind, out_f, in_f, rank):
    got, want = _rank_of_delta(kind, out_f, in_f, rank, 0)
    assert got == want, f"{kind} {out_f}x{in_f} r={rank}: rank {got} < {want}"


# =============================================================================
# 2. Data loss
# -----------------------------------------------------------------------------
# save_adapter refuses non-finite lam/gam (naming the layer) before touching the file.


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("param", ["lam", "gam"])
def test_save_refuses_non_finite(tmp_path, value, param):
    path = tmp_path / "a.safetensors"
    randlora.save_adapter(make(), path)
    os.chmod(path, 0o640)
    model = make(values=8)
    with torch.no_grad():
        getattr(model.block[0], param)[0, 1] = value
    refused(model, randlora.save_adapter, model, path, match=r"block\.0", fs_root=tmp_path)
    refused(model, randlora.save_adapter, model, tmp_path / "new.safetensors", match=r"block\.0", fs_root=tmp_path)
    fresh = fresh_tiny()
    randlora.load_adapter(fresh, path)  # the old file is still good


# -----------------------------------------------------------------------------
# Atomicity under exceptions: a fault at any step of save_adapter / to_peft (the N-th call of
# os.replace / os.rename / os.fsync, for every N until the save succeeds) leaves the file or the
# folder exactly as it was, with no stray temp files.


def _faulty(n: int, counter: list):
    def wrap(real):
        def f(*a, **k):
            counter[0] += 1
            if counter[0] == n:
                raise OSError(28, "injected fault")
            return real(*a, **k)

        return f

    return wrap


def _marked(version: int) -> nn.Module:
    """An adapter whose version shows in its values (lam = version) and settings (alpha)."""
    model = fresh_tiny()
    randlora.inject(model, ["embed", "head"], rank=1, seed=0, alpha=float(version + 1))
    with torch.no_grad():
        for _, m in adapters(model):
            m.lam.fill_(float(version))
            m.gam.fill_(0.5)
    return model


def _version_of(model: nn.Module) -> int:
    """The version a loaded adapter came from; asserts settings and values are of one version."""
    versions = set()
    for n, m in adapters(model):
        v = m.lam.flatten()[0].item()
        assert torch.equal(m.lam, torch.full_like(m.lam, v)) and torch.equal(m.gam, torch.full_like(m.gam, 0.5)), n
        assert m.alpha == v + 1, f"{n}: alpha {m.alpha} from one save, lam {v} from another"
        versions.add(int(v))
    assert len(versions) == 1
    return versions.pop()


@pytest.mark.parametrize("api", ["save_adapter", "to_peft"])
def test_atomic_under_injected_faults(tmp_path, monkeypatch, api):
    target = tmp_path / ("a.safetensors" if api == "save_adapter" else "peft")
    (tmp_path / "notes.tmp").write_text("user file")
    save = getattr(randlora, api)
    save(_marked(1), target)
    before = fs_snapshot(tmp_path)
    real = {name: getattr(os, name) for name in ("replace", "rename", "fsync")}
    for n in range(1, 60):
        counter = [0]
        for name, fn in real.items():
            monkeypatch.setattr(os, name, _faulty(n, counter)(fn))
        try:
            save(_marked(2), target)
            ok = True
        except OSError:
            ok = False
        finally:
            for name, fn in real.items():
                monkeypatch.setattr(os, name, fn)
        if ok:
            break
        assert_fs_unchanged(tmp_path, before)
    else:
        pytest.fail("never completed")
    assert n > 1  # at least one fault was injected
    loaded = fresh_tiny()
    (randlora.load_adapter if api == "save_adapter" else randlora.from_peft)(loaded, target)
    assert _version_of(loaded) == 2
    assert sorted(os.listdir(tmp_path)) == sorted(["notes.tmp", target.name])
    if api == "to_peft":
        assert sorted(os.listdir(target)) == ["adapter_config.json", "adapter_model.safetensors"]


# -----------------------------------------------------------------------------
# Crashes: SIGKILL at every step of a save (forked children of one subprocess, killed at the
# N-th call of the file-system functions a save uses) and at random moments of a save loop.
# After the kill the last complete save loads (file: old or new, never mixed; to_peft's folder:
# config and weights of one save); after the next save no stale temp file remains, and the
# user's own files in the folder are kept.

_CRASH_CHILD = textwrap.dedent(
    r"""
    import json, os, random, signal, sys, time
    import torch
    torch.set_num_threads(1)
    sys.path[:0] = [sys.argv[2], sys.argv[3]]
    import randlora
    import test_integrity as T

    root = sys.argv[1]
    KILL = os.kill
    NAMES = ("replace", "rename", "fsync", "link", "symlink", "unlink", "remove", "rmdir", "mkdir", "chmod", "open")
    results = []

    def crash_at(k):
        count = [0]
        def wrap(real):
            def f(*a, **kw):
                count[0] += 1
                if count[0] == k:
                    KILL(os.getpid(), signal.SIGKILL)
                return real(*a, **kw)
            return f
        for name in NAMES:
            if hasattr(os, name):
                setattr(os, name, wrap(getattr(os, name)))

    v1, v2 = T._marked(1), T._marked(2)
    for api, target in (("save_adapter", "a.safetensors"), ("to_peft", "peft")):
        save = getattr(randlora, api)
        for k in range(1, 80):
            folder = os.path.join(root, f"{api}-{k}")
            os.makedirs(folder)
            open(os.path.join(folder, "notes.tmp"), "w").write("user file")
            save(v1, os.path.join(folder, target))
            pid = os.fork()
            if pid == 0:
                try:
                    crash_at(k)
                    save(v2, os.path.join(folder, target))
                    os._exit(0)
                except BaseException:
                    import traceback; traceback.print_exc()
                    os._exit(3)
            _, status = os.waitpid(pid, 0)
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            results.append(dict(mode="step", api=api, folder=folder, target=target, killed=killed, code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None))
            if not killed:
                break

    # Random moments of a loop of saves of a larger adapter.
    big = [T._marked(v) for v in (1, 2)]
    for trial in range(4):
        folder = os.path.join(root, f"loop-{trial}")
        os.makedirs(folder)
        open(os.path.join(folder, "notes.tmp"), "w").write("user file")
        api, target = ("save_adapter", "a.safetensors") if trial % 2 == 0 else ("to_peft", "peft")
        getattr(randlora, api)(big[0], os.path.join(folder, target))
        pid = os.fork()
        if pid == 0:
            try:
                i = 0
                while True:
                    getattr(randlora, api)(big[i % 2], os.path.join(folder, target))
                    i += 1
            except BaseException:
                import traceback; traceback.print_exc()
            os._exit(3)
        assert pid > 0
        time.sleep(random.Random(trial).uniform(0.05, 0.4))
        KILL(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status)
        results.append(dict(mode="loop", api=api, folder=folder, target=target, killed=killed, code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None))
    json.dump(results, open(os.path.join(root, "results.json"), "w"))
    """
)


def test_sigkill_during_saves(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_CRASH_CHILD)
    root = tmp_path / "runs"
    root.mkdir()
    proc = subprocess.run(
        [sys.executable, str(script), str(root), TESTS, REPO], capture_output=True, text=True, timeout=300,
        start_new_session=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((root / "results.json").read_text())
    for api in ("save_adapter", "to_peft"):
        runs = [r for r in results if r["api"] == api and r["mode"] == "step"]
        assert sum(r["killed"] for r in runs) >= 1, f"{api}: no kill point"
        assert all(r["killed"] or r["code"] == 0 for r in runs), f"{api}: a save failed: {runs}\n{proc.stderr[-4000:]}"
        loops = [r for r in results if r["api"] == api and r["mode"] == "loop"]
        assert loops and all(r["killed"] for r in loops), f"{api}: the save loop failed\n{proc.stderr[-4000:]}"
    for r in results:
        folder, target = r["folder"], os.path.join(r["folder"], r["target"])
        where = f"{os.path.basename(folder)} (killed={r['killed']})"
        loaded = fresh_tiny()
        if r["api"] == "save_adapter":
            randlora.load_adapter(loaded, target)
        else:
            randlora.from_peft(loaded, target)
        assert _version_of(loaded) in (1, 2), where
        # The next save in that folder cleans up after the crash, and keeps the user's files.
        getattr(randlora, r["api"])(_marked(3), target)
        assert sorted(os.listdir(folder)) == sorted(["notes.tmp", r["target"]]), where
        with open(os.path.join(folder, "notes.tmp")) as f:
            assert f.read() == "user file", where
        if r["api"] == "to_peft":
            assert sorted(os.listdir(target)) == ["adapter_config.json", "adapter_model.safetensors"], where
        loaded = fresh_tiny()
        (randlora.load_adapter if r["api"] == "save_adapter" else randlora.from_peft)(loaded, target)
        assert _version_of(loaded) == 3, where


# -----------------------------------------------------------------------------
# Overwrite keeps the file's mode; saving through a symlink writes the link's target.


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o604])
def test_overwrite_keeps_mode(tmp_path, mode):
    path = tmp_path / "a.safetensors"
    randlora.save_adapter(_marked(1), path)
    os.chmod(path, mode)
    randlora.save_adapter(_marked(2), path)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode
    loaded = fresh_tiny()
    randlora.load_adapter(loaded, path)
    assert _version_of(loaded) == 2
    assert os.listdir(tmp_path) == ["a.safetensors"]


@pytest.mark.parametrize("link_kind", ["absolute", "relative", "dangling"])
def test_save_through_symlink_writes_target(tmp_path, link_kind):
    store = tmp_path / "store"
    store.mkdir()
    real = store / "real.safetensors"
    if link_kind != "dangling":
        randlora.save_adapter(_marked(1), real)
        os.chmod(real, 0o600)
    link = tmp_path / "link.safetensors"
    text = str(real) if link_kind == "absolute" else os.path.join("store", "real.safetensors")
    os.symlink(text, link)
    randlora.save_adapter(_marked(2), link)
    assert os.path.islink(link) and os.readlink(link) == text
    assert os.path.isfile(real) and not os.path.islink(real)
    if link_kind != "dangling":
        assert stat.S_IMODE(os.stat(real).st_mode) == 0o600
    for p in (real, link):
        loaded = fresh_tiny()
        randlora.load_adapter(loaded, p)
        assert _version_of(loaded) == 2
    assert sorted(os.listdir(tmp_path)) == ["link.safetensors", "store"]
    assert os.listdir(store) == ["real.safetensors"]


# -----------------------------------------------------------------------------
# Integrity: a checksum over settings and tensor bytes. Every single-byte change of a saved
# file -> load raises ValueError naming the file; the model is unchanged.


def _small_adapter() -> nn.Module:
    model = fresh_tiny()
    randlora.inject(model, ["head"], rank=5, seed=2)  # head 8 -> 5: lam (5, 1), gam (1, 5)
    randomize_model_(model, 6)
    return model


def test_every_single_byte_change_is_caught(tmp_path):
    good = tmp_path / "good.safetensors"
    randlora.save_adapter(_small_adapter(), good)
    raw = good.read_bytes()
    assert len(raw) < 8192, f"adapter file unexpectedly large ({len(raw)} bytes)"
    bad = tmp_path / "bad.safetensors"
    plain, adapted = fresh_tiny(), _small_adapter()
    randomize_model_(adapted, 99)
    before = {id(plain): snap(plain), id(adapted): snap(adapted)}
    silent = []
    for i in range(len(raw)):
        for mask in (1 << (i % 8), 0xFF):
            data = bytearray(raw)
            data[i] ^= mask
            bad.write_bytes(bytes(data))
            model = plain if (i + mask) % 2 else adapted
            try:
                randlora.load_adapter(model, bad)
            except ValueError as e:
                assert str(bad) in str(e), f"byte {i} ^ {mask:#x}: error does not name the file: {str(e)[:300]}"
                continue
            except Exception as e:  # noqa: BLE001
                pytest.fail(f"byte {i} ^ {mask:#x}: {type(e).__name__} instead of ValueError: {str(e)[:300]}")
            silent.append((i, mask))
            break
        if silent:
            break
    assert not silent, f"a change at byte {silent[0][0]} of {len(raw)} loaded silently"
    assert_unchanged(plain, before[id(plain)])
    assert_unchanged(adapted, before[id(adapted)])


@pytest.mark.parametrize(
    "edit",
    ["seed", "alpha", "dropout", "bases", "tensor_ulp", "tensor_flip"],
)
def test_consistent_rewrites_are_caught(tmp_path, edit):
    """A well-formed safetensors file whose settings or tensor values were changed after saving
    (e.g. seed '0' -> '1', one ulp of one value) is refused: it would load silently otherwise."""
    good = tmp_path / "good.safetensors"
    randlora.save_adapter(make(seed=0, rank=2, values=5, dropout=0.1), good)
    meta, tensors = read_meta(good), load_file(str(good))
    if edit == "seed":
        meta["seed"] = "1"
    elif edit == "alpha":
        meta["alpha"] = repr(float(meta["alpha"]) + 1)
    elif edit == "dropout":
        meta["dropout"] = "0.2"
    elif edit == "bases":
        meta["bases"] = "sparse"
    elif edit == "tensor_ulp":
        t = tensors["head.gam"]
        t[0, 0] = torch.nextafter(t[0, 0], torch.tensor(math.inf))
    else:
        tensors["head.lam"] = tensors["head.lam"].flip(0).contiguous()
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    assert bad.read_bytes() != good.read_bytes()
    for model in (fresh_tiny(), make(seed=0, rank=2, values=9)):
        e = refused(model, randlora.load_adapter, model, bad, fs_root=tmp_path)
        assert str(bad) in str(e)


# -----------------------------------------------------------------------------
# Settings survive a round trip: per-layer dropout and the forced strategy; resume after
# save/load (AdamW, dropout active) is bit-exact.


def _mixed_model() -> nn.Module:
    model = fresh_tiny()
    randlora.inject(model, ["embed"], rank=2, seed=1, alpha=2.0, dropout=0.1)
    randlora.inject(model, ["block.0"], rank=2, seed=1, alpha=2.0, dropout=0.3)
    randlora.inject(model, ["head"], rank=2, seed=1, alpha=2.0, dropout=0.0)
    model.block[0].strategy = "build"
    model.head.strategy = "factorized"
    return model


EXPECTED = {"embed": (0.1, "auto"), "block.0": (0.3, "build"), "head": (0.0, "factorized")}


def test_per_layer_dropout_and_strategy_round_trip(tmp_path):
    model = _mixed_model()
    assert {n: (dropout_of(m), m.strategy) for n, m in adapters(model)} == EXPECTED
    path = tmp_path / "a.safetensors"
    randlora.save_adapter(model, path)
    loaded = fresh_tiny()
    randlora.load_adapter(loaded, path)
    assert {n: (dropout_of(m), m.strategy) for n, m in adapters(loaded)} == EXPECTED


def test_resume_is_bit_exact_with_adamw(tmp_path):
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 6, generator=gen), torch.randn(16, 5, generator=gen)) for _ in range(6)]

    def train(model, opt, batches, start):
        model.train()
        for i, (xb, yb) in enumerate(batches):
            torch.manual_seed(1000 + start + i)  # dropout masks
            opt.zero_grad()
            nn.functional.mse_loss(model(xb), yb).backward()
            opt.step()

    def adamw(model):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)

    full = _mixed_model()
    randomize_model_(full, 2)
    opt = adamw(full)
    train(full, opt, data, 0)

    part = _mixed_model()
    randomize_model_(part, 2)
    opt = adamw(part)
    train(part, opt, data[:3], 0)
    path = tmp_path / "ckpt.safetensors"
    randlora.save_adapter(part, path)
    opt_state = copy.deepcopy(opt.state_dict())
    del part, opt

    resumed = fresh_tiny()
    randlora.load_adapter(resumed, path)
    opt = adamw(resumed)
    opt.load_state_dict(opt_state)
    train(resumed, opt, data[3:], 3)
    a, b = randlora.adapter_state_dict(full), randlora.adapter_state_dict(resumed)
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max diff {(a[k] - b[k]).abs().max().item():.3g}"
    full.eval(), resumed.eval()
    assert torch.equal(full(xs()), resumed(xs()))


# =============================================================================
# 3. Unclear errors and hangs: a clear error naming the argument or file; model untouched.
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("targets", [None, 3, 2.5, b"head", {"head": 1}])
def test_inject_bad_targets_type(targets):
    model = fresh_tiny()
    e = refused(model, randlora.inject, model, targets, 2, exc=(TypeError, ValueError))
    assert "targets" in str(e)


@pytest.mark.parametrize("state", [None, [], ["head.lam"], "head.lam", 3, ("head.lam", torch.zeros(2, 3))])
def test_load_adapter_state_dict_not_a_mapping(state):
    model = make()
    e = refused(model, randlora.load_adapter_state_dict, model, state, exc=(TypeError, ValueError))
    assert any(w in str(e).lower() for w in ("mapping", "dict")), str(e)


@pytest.mark.parametrize("kind", ["meta", "sparse", "sparse_csr"])
def test_state_dict_with_meta_or_sparse_tensors(kind):
    model = make()
    state = {k: v.clone() for k, v in randlora.adapter_state_dict(make(values=9)).items()}
    t = state["block.0.gam"]
    state["block.0.gam"] = (
        torch.empty(t.shape, device="meta") if kind == "meta" else t.to_sparse() if kind == "sparse" else t.to_sparse_csr()
    )
    e = refused(model, randlora.load_adapter_state_dict, model, state)
    assert "block.0.gam" in str(e) and ("meta" if kind == "meta" else "sparse") in str(e).lower(), str(e)


def test_from_peft_non_utf8_config(tmp_path):
    folder = tmp_path / "peft"
    randlora.to_peft(make(rank=1), folder)
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "modèle"
    cfg_path.write_bytes(json.dumps(cfg, ensure_ascii=False).encode("latin-1"))
    model = fresh_tiny()
    e = refused(model, randlora.from_peft, model, folder, fs_root=tmp_path)
    assert "adapter_config.json" in str(e) and "utf-8" in str(e).lower(), str(e)


@pytest.mark.parametrize("layers", [{"head": [5]}, {"head": [5, 8, 1]}, {"head": 5}, {"head": [5.0, 8.0]}, {"head": [True, 8]}, {"head": [-5, 8]}, {"head": ["5", "8"]}])
def test_layers_metadata_of_wrong_arity_or_type(tmp_path, layers):
    good = tmp_path / "good.safetensors"
    randlora.save_adapter(make(targets=["head"]), good)
    meta = read_meta(good)
    meta["layers"] = json.dumps(layers)
    bad = tmp_path / "bad.safetensors"
    rewrite(good, bad, meta=meta)
    for model in (fresh_tiny(), make(targets=["head"], values=3)):
        e = refused(model, randlora.load_adapter, model, bad, fs_root=tmp_path)
        assert str(bad) in str(e), str(e)


@pytest.mark.parametrize("targets", ["all-linear", r".*", lambda n, m: True, [""]])
def test_bare_linear_as_the_whole_model(targets):
    torch.manual_seed(0)
    lin = nn.Linear(8, 6)
    x = torch.randn(3, 8)
    w0, b0 = lin.weight.detach().double().clone(), lin.bias.detach().double().clone()
    before = snap(lin)
    try:
        out = randlora.inject(lin, targets, 2)
    except (TypeError, ValueError) as e:
        assert_unchanged(lin, before)
        msg = str(e)
        assert any(w in msg for w in ("Linear", "whole model", "itself", "root", "top-level")), msg
        return
    found = adapters(out)
    assert len(found) == 1, "inject returned without adapting anything"
    layer = found[0][1]
    randomize_model_(out, 3)
    assert not torch.equal(layer.lam, torch.zeros_like(layer.lam))
    expected = x.double() @ (w0 + ref_layer_delta(layer)).t() + b0
    with torch.no_grad():
        assert_close(out(x), expected, 2e-5)


@pytest.mark.parametrize("rank,in_f,out_f", [(0, 8, 4), (-1, 8, 4), (5, 8, 4), (9, 4, 8)])
def test_randloralinear_direct_bad_rank(rank, in_f, out_f):
    base = nn.Linear(in_f, out_f)
    w = base.weight.detach().clone()
    with pytest.raises(ValueError, match="rank"):
        randlora.RandLoraLinear(base, randlora.RandLoraConfig(rank=rank, alpha=2.0))
    assert torch.equal(base.weight, w) and base.weight.requires_grad


@pytest.mark.parametrize("bad", ["factorised", "Build", "merged ", "", None, 1])
def test_misspelled_strategy(bad):
    model = make()
    before = snap(model)
    with pytest.raises(ValueError, match="strategy"):
        randlora.inject(fresh_tiny(), ["head"], rank=2, strategy=bad)
    try:
        model.head.strategy = bad
    except (ValueError, TypeError) as e:
        assert "strategy" in str(e)
        assert_unchanged(model, before)
        return
    with pytest.raises(ValueError, match="strategy"):
        model(xs())  # never silently factorized


@pytest.mark.parametrize("where", ["layer", "model"])
def test_zero_dim_input(where):
    model = make()
    x = torch.tensor(1.0)
    before = snap(model)
    with pytest.raises((ValueError, RuntimeError, TypeError)) as e:
        (model.embed if where == "layer" else model)(x)
    assert not isinstance(e.value, IndexError)
    assert "embed" in str(e.value), str(e.value)
    assert_unchanged(model, before)


HUGE = 2_000_000
BOUND = 10_000


@pytest.mark.parametrize("field", ["format", "format_version", "rank", "seed", "alpha", "bases", "dropout", "layers", "layer_name"])
def test_huge_metadata_strings_are_not_echoed(tmp_path, field):
    good = tmp_path / "good.safetensors"
    randlora.save_adapter(make(targets=["head"]), good)
    meta, tensors = read_meta(good), load_file(str(good))
    if field == "layers":
        meta["layers"] = "[" * HUGE
    elif field == "layer_name":
        name = "x" * HUGE
        meta["layers"] = json.dumps({name: [5, 8]})
        tensors = {f"{name}.lam": tensors["head.lam"], f"{name}.gam": tensors["head.gam"]}
    else:
        meta[field] = "9" * HUGE if field in ("rank", "seed", "alpha", "dropout") else "z" * HUGE
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    for model in (fresh_tiny(), make(targets=["head"])):
        e = refused(model, randlora.load_adapter, model, bad, fs_root=tmp_path)
        assert len(str(e)) < BOUND, f"{field}: message of {len(str(e))} characters"
        assert str(bad) in str(e)


def test_huge_state_dict_key_is_not_echoed():
    model = make()
    state = dict(randlora.adapter_state_dict(model))
    state["y" * HUGE] = torch.zeros(2)
    e = refused(model, randlora.load_adapter_state_dict, model, state)
    assert len(str(e)) < BOUND, f"message of {len(str(e))} characters"


def test_huge_peft_config_string_is_not_echoed(tmp_path):
    folder = tmp_path / "peft"
    randlora.to_peft(make(rank=1), folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["peft_type"] = "Q" * HUGE
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    model = fresh_tiny()
    e = refused(model, randlora.from_peft, model, folder, fs_root=tmp_path)
    assert len(str(e)) < BOUND, f"message of {len(str(e))} characters"


def _load_with_watchdog(model, path, seconds: float = 5.0):
    """load_adapter(model, path), unblocking a reader stuck on a FIFO after ``seconds`` (so a
    regression fails instead of hanging). The watchdog is a separate process: a reader blocked
    inside a native call may hold the GIL. Returns (exception or None, elapsed)."""
    watchdog = subprocess.Popen(
        ["sh", "-c", f'sleep {seconds}; while :; do : > "$0"; sleep 0.2; done', str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    t0 = time.monotonic()
    err = None
    try:
        randlora.load_adapter(model, path)
    except Exception as e:  # noqa: BLE001
        err = e
    finally:
        elapsed = time.monotonic() - t0
        watchdog.kill()
        watchdog.wait()
    return err, elapsed


@pytest.mark.parametrize("kind", ["fifo", "directory", "char_device"])
def test_load_refuses_non_regular_files(tmp_path, kind):
    if kind == "fifo":
        path = tmp_path / "a.safetensors"
        os.mkfifo(path)
    elif kind == "directory":
        path = tmp_path / "a.safetensors"
        path.mkdir()
    else:
        path = "/dev/null"
    for model in (fresh_tiny(), make()):
        before, fs_before = snap(model), fs_snapshot(tmp_path)
        err, elapsed = _load_with_watchdog(model, str(path))
        assert elapsed < 4.5, f"load_adapter blocked on a {kind} ({elapsed:.1f} s)"
        assert isinstance(err, (ValueError, OSError)) and not isinstance(err, FileNotFoundError), repr(err)
        assert "regular file" in str(err) and str(path) in str(err), str(err)
        assert_unchanged(model, before)
        assert_fs_unchanged(tmp_path, fs_before)


def test_fifo_behind_a_symlink_is_refused(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "a.safetensors"
    os.symlink(fifo, link)
    model = fresh_tiny()
    before = snap(model)
    err, elapsed = _load_with_watchdog(model, str(link))
    assert elapsed < 4.5, f"load_adapter blocked on a FIFO behind a link ({elapsed:.1f} s)"
    assert isinstance(err, (ValueError, OSError)) and "regular file" in str(err), repr(err)
    assert_unchanged(model, before)


def test_symlink_loop_is_reported_as_such(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    os.symlink(b, a)
    os.symlink(a, b)
    model = make()
    fs_before = fs_snapshot(tmp_path)
    e = refused(model, randlora.load_adapter, model, a, exc=(ValueError, OSError), fs_root=tmp_path)
    assert not isinstance(e, FileNotFoundError), f"reported as missing: {e!r}"
    assert "loop" in str(e).lower() or "too many levels of symbolic links" in str(e).lower(), str(e)
    assert str(a) in str(e)
    e = refused(model, randlora.save_adapter, model, a, exc=(ValueError, OSError), fs_root=tmp_path)
    assert not isinstance(e, FileNotFoundError) and ("loop" in str(e).lower() or "symbolic links" in str(e).lower()), str(e)
    assert_fs_unchanged(tmp_path, fs_before)
