"""Seeded shared bases: full rank (every kind), reproducibility (and 0.2's bases, bit for bit), sharing, sparse kinds."""

from __future__ import annotations

import copy
import ctypes
import gc
import hashlib

import os
import weakref

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import randlora
from conftest import (
    CPU,
    fresh_tiny,
    nonzero_uniform,
    randomize_,
    randomize_model_,
    ref_delta,
    ref_layer_delta,
)


# Internal: reads the per-(device, dtype) cache of the bases object, which no public API exposes.
def _copies(bases: randlora._Bases) -> list[torch.Tensor]:
    """Every tensor the bases object keeps: (A, Bf) pairs per (device, dtype), and sparse kinds' A per exact d."""
    return [t for v in bases._copies.values() for t in (v if isinstance(v, tuple) else (v,)) if t is not None]


def _ptrs(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def _layer_bases(kind: str, rank: int, seed: int, D: int, d: int,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The bases a user's layer of shape (D, d), ``nn.Linear(d, D)``, gets from (rank, seed, kind): its public
    ``random_bases(dtype)``, ``A`` ``(r, d)`` and ``B`` ``(D, n, r)``. Drawn afresh for exactly this shape, as a new
    ``_Bases(rank, seed, kind)`` asked for (D, d) would be: the layer is checked to be the only holder of its bases
    (they go with it), so they were not read off a copy that another live layer had grown."""
    gc.collect()  # no layer left in a reference cycle still holds bases of this (rank, seed, kind)
    layer = randlora.RandLoraLinear(nn.Linear(d, D), randlora.RandLoraConfig(rank=rank, seed=seed, bases=kind))
    A, B = layer.random_bases(dtype)
    n = -(-d // rank)
    assert A.shape == (rank, d) and B.shape == (D, n, rank)
    assert A.dtype == B.dtype == dtype
    alive = weakref.ref(layer._bases)
    del layer
    if alive() is not None:  # a layer holds no reference cycle today: its bases go at `del`
        gc.collect()
    assert alive() is None, f"another live layer shares the bases of {(rank, seed, kind)}: not a fresh draw"
    return A, B


def _layer_dense(kind: str, rank: int, seed: int, D: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_layer_bases` in float32 with ``B`` flattened to ``Bf`` ``(D, n*r)``: the numbers (and shapes) that
    ``_Bases(rank, seed, kind).dense(D, d)`` returns."""
    A, B = _layer_bases(kind, rank, seed, D, d)
    return A, B.reshape(D, -1)


# -----------------------------------------------------------------------------
# 1. Full rank


@st.composite
def shape_and_rank(draw):
    in_f = draw(st.integers(2, 64))
    out_f = draw(st.integers(2, 64))
    d = min(in_f, out_f)
    # Bias towards ranks that do not divide d and towards the extremes.
    rank = draw(st.one_of(st.integers(1, d), st.sampled_from([1, d, max(1, d - 1), max(1, d // 2 + 1)])))
    return in_f, out_f, rank


@settings(max_examples=30)
@given(shape_and_rank(), st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1))
def test_full_rank(shape, seed, value_seed):
    in_f, out_f, rank = shape
    d, D = min(in_f, out_f), max(in_f, out_f)
    n = -(-d // rank)
    assert n * rank >= d
    A, B = _layer_bases("dense", rank, seed, D, d, torch.float64)
    g = torch.Generator().manual_seed(value_seed)
    lam = nonzero_uniform((rank, n), g, dtype=torch.float64)
    gam = nonzero_uniform((n, d), g, dtype=torch.float64)
    dW = ref_delta(A, B, lam, gam, out_f, in_f)
    assert dW.shape == (out_f, in_f)
    assert torch.isfinite(dW).all()
    assert torch.linalg.matrix_rank(dW).item() == d

    # The library's own ΔW agrees with the reference and is full rank too.
    layer = randlora.RandLoraLinear(nn.Linear(in_f, out_f), randlora.RandLoraConfig(rank=rank, seed=seed, alpha=rank))
    with torch.no_grad():
        layer.lam.copy_(lam)
        layer.gam.copy_(gam)
    lib = layer.delta_weight(torch.float64)
    ref = ref_layer_delta(layer)
    torch.testing.assert_close(lib, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert torch.linalg.matrix_rank(lib).item() == d

    # Contrast: only basis 0 active (LoRA-like) -> rank <= r.
    lam1 = lam.clone()
    lam1[:, 1:] = 0
    dW1 = ref_delta(A, B, lam1, gam, out_f, in_f)
    r1 = torch.linalg.matrix_rank(dW1).item()
    assert 1 <= r1 <= rank
    if rank < d:
        assert r1 < d


def test_full_rank_square_4096_like_layer_count():
    # The paper's selling point on one realistic-ish layer: 96x64, r=7 (7 does not divide 64).
    A, B = _layer_bases("dense", 7, 3, 96, 64, torch.float64)
    g = torch.Generator().manual_seed(0)
    lam = nonzero_uniform((7, 10), g, dtype=torch.float64)
    gam = nonzero_uniform((10, 64), g, dtype=torch.float64)
    dW = ref_delta(A, B, lam, gam, 96, 64)
    s = torch.linalg.svdvals(dW)
    assert torch.linalg.matrix_rank(dW).item() == 64
    assert (s[-1] / s[0]).item() > 1e-8  # not just numerically full rank


def _rank_of_delta(kind: str, out_f: int, in_f: int, rank: int, seed: int) -> tuple[int, int]:
    """rank(ΔW) of an injected layer with generic lam/gam (float64 reference), and min(in, out)."""
    model = nn.Sequential(nn.Linear(in_f, out_f))
    randlora.inject(model, ["0"], rank=rank, seed=seed, bases=kind)
    layer = model[0]
    g = torch.Generator().manual_seed(1000 + seed)
    lam = nonzero_uniform(tuple(layer.lam.shape), g, dtype=torch.float64)
    gam = nonzero_uniform(tuple(layer.gam.shape), g, dtype=torch.float64)
    with torch.no_grad():
        layer.lam.copy_(lam)
        layer.gam.copy_(gam)
    A, B = layer.random_bases(torch.float64)
    dW = ref_delta(A, B, lam, gam, out_f, in_f)
    assert dW.shape == (out_f, in_f)
    return int(torch.linalg.matrix_rank(dW)), min(out_f, in_f)


@settings(max_examples=45)
@given(
    kind=st.sampled_from(randlora.BASES_KINDS),
    out_f=st.integers(2, 96),
    in_f=st.integers(2, 96),
    data=st.data(),
    seed=st.integers(0, 3),
)
def test_delta_is_full_rank(kind, out_f, in_f, data, seed):
    """Seeded dense, sparse and very_sparse bases give rank(ΔW) == min(in, out), every shape and rank."""
    rank = data.draw(st.integers(1, min(out_f, in_f)), label="rank")
    got, want = _rank_of_delta(kind, out_f, in_f, rank, seed)
    assert got == want, f"{kind} {out_f}x{in_f} r={rank} seed={seed}: rank {got} < {want}"


@pytest.mark.parametrize("kind,out_f,in_f,rank", [("sparse", 640, 384, 8), ("very_sparse", 1024, 1024, 32)])
def test_delta_is_full_rank_reported_cases(kind, out_f, in_f, rank):
    got, want = _rank_of_delta(kind, out_f, in_f, rank, 0)
    assert got == want, f"{kind} {out_f}x{in_f} r={rank}: rank {got} < {want}"


# -----------------------------------------------------------------------------
# 2. Reproducibility and sharing


# Internal: asks one bases object for several shapes in turn, to pin its cache growing on demand.
def _dense(bases: randlora._Bases, D: int, d: int):
    A, Bf = bases.dense(D, d)
    return A.clone(), Bf.clone()


# sha256 of randlora 0.2's bases (commit cff14c9, /work/old/randlora_v02.py: `_Bases(rank, seed, kind).dense(D, d)`,
# float32), over str(tuple(A.shape)), A's bytes, str(tuple(Bf.shape)), Bf's bytes. Adapter files store no bases: they
# are regenerated from the seed, so a 0.2 file loads with these very bases only while 0.3 reproduces them bit for bit.
# Cases: each kind, rank 1 to 16, ranks not dividing d, d = 1, square layers, shapes past the 1024 generator block.
BASES_V02 = [
    (("dense", 4, 0, 40, 24), "62829ea188bae2296aeb8c84a8140027bcf2fc93291a131a0736a9380d29c61e"),
    (("dense", 7, 3, 96, 64), "c34d6e587645fc4283a9dd751f2615619a42e4d2f573b2d541b978d8512fa2b9"),
    (("dense", 1, 0, 5, 1), "fb666744d8a783f2b06597c476d5fd0b00b4306dd78de0c2a7fc82164ebeec17"),
    (("dense", 2, 9, 1100, 1030), "2586bf83ce67583e61f57193a0cb2b22c4a9f2e31fae82294dd8c77148796eb4"),
    (("sparse", 3, 1, 64, 33), "c4daef25ceb14c43d11717932df335b8169f55b16a03be1643439eb4b62c644b"),
    (("sparse", 5, 7, 50, 23), "17cc4a56977da90b264d8618461e8d97dab3c64f029296d370dedc3992cc69af"),
    (("sparse", 8, 0, 640, 384), "aa0eaaa4d37707ee0220c7a50a718d885fb2967d94bd68f50ac42246268eb40c"),
    (("very_sparse", 4, 5, 100, 36), "1581ef842e431956a1af0edcfd82d32d901a7bef522572f3d2671fab4457e21f"),
    (("very_sparse", 16, 2, 300, 200), "f3de078f532238b4b5b14d4063a6d1ebef9996c52d243e74b3e8b2d4b4ae0faf"),
    (("very_sparse", 3, 11, 7, 7), "fad2ee8c72c38386a8b7041cb1bccc83420952089935d31958d3bb6685309074"),
]


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        assert t.dtype == torch.float32
        h.update(str(tuple(t.shape)).encode())
        t = t.contiguous()
        h.update(ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()))  # the raw bytes (numpy-free)
    return h.hexdigest()


@pytest.mark.parametrize("case,digest", BASES_V02, ids=[str(c) for c, _ in BASES_V02])
def test_bases_bit_identical_to_v02(case, digest):
    kind, rank, seed, D, d = case
    assert _digest(*_layer_dense(kind, rank, seed, D, d)) == digest  # a fresh draw at exactly (D, d)
    # and what a layer of that shape computes with (its public view of the shared bases) is the same
    layer = randlora.RandLoraLinear(nn.Linear(d, D), randlora.RandLoraConfig(rank=rank, seed=seed, bases=kind))
    A, B = layer.random_bases()
    assert _digest(A, B.reshape(D, -1)) == digest


def test_bases_statistics_dense():
    A, Bf = _layer_dense("dense", 8, 0, 512, 256)
    for t in (A, Bf):
        assert t.dtype == torch.float32
        assert abs(t.mean().item()) < 0.05
        assert abs(t.std().item() - 1) < 0.05
        assert t.abs().max().item() <= 3**0.5 + 1e-6  # uniform on [-sqrt(3), sqrt(3)]
    assert A.shape == (8, 256) and Bf.shape == (512, 32 * 8)


@pytest.mark.parametrize("kind", randlora.BASES_KINDS)
def test_bases_same_seed_identical_different_seed_differ(kind):
    torch.manual_seed(0)
    a = _layer_dense(kind, 4, 11, 40, 24)
    torch.manual_seed(999)
    torch.rand(17)
    b = _layer_dense(kind, 4, 11, 40, 24)  # drawn again: a's layer, the only holder of its bases, is gone
    c = _layer_dense(kind, 4, 12, 40, 24)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    # Different rank, same seed: different bases (not merely a slice).
    e = _layer_dense(kind, 3, 11, 40, 24)
    assert not torch.equal(a[0][:3], e[0])


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_bases_depend_only_on_layer_shape(kind):
    small = _layer_dense(kind, 4, 5, 20, 12)
    # Same object: ask for a larger layer after a small one (the copy grows), then the small one again.
    # Internal: this checks one bases object's cache growing on demand (and reading the small shape off the grown copy).
    b = randlora._Bases(4, 5, kind)
    b.get(20, 12, CPU, torch.float32)
    big = _dense(b, 300, 200)  # grows D, d and n
    again = _dense(b, 20, 12)
    assert torch.equal(small[0], again[0]) and torch.equal(small[1], again[1])
    # The small layer's bases are a prefix of the big layer's (A columns; B rows and bases).
    n_small, n_big = 3, 50
    assert torch.equal(big[0][:, :12], small[0])
    assert torch.equal(big[1].view(300, n_big, 4)[:20, :n_small].reshape(20, -1), small[1])
    # And a fresh object asked only for the big shape agrees too.
    fresh_big = _layer_dense(kind, 4, 5, 300, 200)
    assert torch.equal(fresh_big[0], big[0]) and torch.equal(fresh_big[1], big[1])


def test_bases_prefix_across_generator_blocks():
    # Shapes past the 1024-column/row generator block.
    b1 = _layer_dense("dense", 2, 9, 1100, 3)
    b2 = _layer_dense("dense", 2, 9, 1500, 1030)
    assert torch.equal(b2[0][:, :3], b1[0])
    assert torch.equal(b2[1].view(1500, 515, 2)[:1100, :2].reshape(1100, -1), b1[1])


def test_adding_a_bigger_target_does_not_change_other_layers_bases():
    m1 = fresh_tiny()
    randlora.inject(m1, ["head"], rank=2, seed=3)
    ref = m1.head.random_bases()
    x = torch.randn(4, 6)
    randomize_(m1.head, 1)
    y1 = m1(x)
    del m1
    gc.collect()

    m2 = fresh_tiny()
    randlora.inject(m2, ["head", "block.0"], rank=2, seed=3)  # the bigger layer sizes the shared copy
    randomize_(m2.head, 1)
    m2.block[0](torch.randn(3, 8))
    got = m2.head.random_bases()
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    # Same output for the head (block.0 has lam = 0: its update is exactly zero).
    assert torch.equal(m2(x), y1)


def test_same_seed_same_outputs_across_fresh_injections_and_rng_states():
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    outs, bases = [], []
    for global_seed in (0, 1, 12345):
        model = fresh_tiny()  # same base weights every time
        torch.manual_seed(global_seed)
        torch.randn(global_seed % 7 + 1)
        randlora.inject(model, ["embed", "block.0", "block.2", "head"], rank=2, seed=42)
        randomize_model_(model, 7)
        outs.append(model(x).detach())
        bases.append(model.head.random_bases())
        del model
        gc.collect()
    for o, b in zip(outs[1:], bases[1:]):
        assert torch.equal(o, outs[0])
        assert torch.equal(b[0], bases[0][0]) and torch.equal(b[1], bases[0][1])
    model = fresh_tiny()
    randlora.inject(model, ["embed", "block.0", "block.2", "head"], rank=2, seed=43)
    randomize_model_(model, 7)
    assert not torch.allclose(model(x), outs[0])


def test_bases_not_in_state_dict_buffers_or_parameters():
    model = fresh_tiny()
    plain_keys = set(model.state_dict())
    randlora.inject(model, ["block.0", "head"], rank=2, seed=0)
    model(torch.randn(3, 6))
    keys = set(model.state_dict())
    expected = set()
    for k in plain_keys:
        for name in ("block.0", "head"):
            if k.startswith(name + "."):
                k = name + ".base." + k[len(name) + 1 :]
        expected.add(k)
    expected |= {"block.0.lam", "block.0.gam", "head.lam", "head.gam"}
    assert keys == expected
    assert list(model.buffers()) == []
    cache_ptrs = _ptrs(_copies(model.head._bases))
    assert cache_ptrs
    for t in [*model.parameters(), *model.buffers(), *model.state_dict().values()]:
        assert t.untyped_storage().data_ptr() not in cache_ptrs


def test_layers_view_the_newest_copy_after_the_bases_grow():
    """Targets where no layer covers the others in both D and d make the bases grow during inject: then every layer
    views the newest copy and the older one is freed (no cache of views may keep it, nor hand a layer views of it)."""
    model = nn.Sequential(nn.Linear(40, 4), nn.Linear(8, 16))  # (D, d) = (40, 4) first (larger), then (16, 8)
    randlora.inject(model, "all-linear", rank=2, seed=977)  # a seed of its own: no other layer holds these bases
    bases = model[0]._bases
    ((A, B),) = bases._copies.values()
    assert A.shape[1] == 8 and B.shape[0] == 40  # grown for both layers
    assert _ptrs(t for m in model for t in m._bases_in(torch.float32)) == _ptrs((A, B))
    for m, width in zip(model, (40, 8)):
        m(torch.randn(3, width))


def test_one_shared_copy_per_device_dtype():
    model = fresh_tiny()
    randlora.inject(model, ["embed", "block.0", "head"], rank=2, seed=0)
    model(torch.randn(3, 6))
    bases = model.head._bases
    assert model.embed._bases is bases and model.block[0]._bases is bases
    assert len(bases._copies) == 1
    views = [bases.get(m.D, m.d, CPU, torch.float32) for m in (model.embed, model.block[0], model.head)]
    ptrs_A = {v[0].untyped_storage().data_ptr() for v in views}
    ptrs_B = {v[1].untyped_storage().data_ptr() for v in views}
    assert len(ptrs_A) == 1 and len(ptrs_B) == 1
    # Asking for float64 adds exactly one more copy.
    model.double()
    model(torch.randn(3, 6, dtype=torch.float64))
    assert len(bases._copies) == 2
    assert {k[1] for k in bases._copies} == {torch.float32, torch.float64}
    # A second model with the same settings shares the bases object while both live.
    other = fresh_tiny()
    randlora.inject(other, ["head"], rank=2, seed=0)
    assert other.head._bases is bases
    # deepcopy keeps sharing.
    assert copy.deepcopy(model).head._bases is bases


# -----------------------------------------------------------------------------
# 3. Sparse kinds


@pytest.mark.parametrize("kind", ["sparse", "very_sparse"])
def test_sparse_bases_ternary_density_and_compact(kind):
    D, d, r = 256, 64, 4
    # Internal: the int8 store, its scale and its sharing across compute dtypes are what no public API shows (a
    # layer's random_bases are floats); dense bases' scale of None is likewise the object's own answer.
    b = randlora._Bases(r, 1, kind)
    scale = b.scale(d)
    assert scale is not None and randlora._Bases(r, 1).scale(d) is None  # int8 plus a scale; dense bases are floats
    A8, Bf8 = b.get(D, d, CPU, torch.float32)
    assert A8.dtype == torch.int8 and Bf8.dtype == torch.int8
    assert all(t.dtype == torch.int8 for t in _copies(b))
    s = 3.0 if kind == "sparse" else d**0.5
    assert abs(scale - s**0.5) < 1e-6
    A, Bf = b.dense(D, d)
    assert A.dtype == torch.float32
    for t, t8 in ((A, A8), (Bf, Bf8)):
        vals = torch.unique(t / scale)
        assert vals.tolist() == [-1.0, 0.0, 1.0]
        assert torch.equal(t, t8.float() * scale)
    allv = torch.cat([A.flatten(), Bf.flatten()])
    density = (allv != 0).float().mean().item()
    assert abs(density - 1 / s) < 0.02, density
    pos, neg = (allv > 0).float().mean().item(), (allv < 0).float().mean().item()
    assert abs(pos - neg) < 0.02
    assert abs(allv.std().item() - 1) < 0.1  # divided by their std
    # Same bytes for bf16 compute: the int8 store is shared across compute dtypes (no new copy).
    keys = list(b._copies)
    A16, Bf16 = b.get(D, d, CPU, torch.bfloat16)
    assert list(b._copies) == keys
    assert A16.data_ptr() == A8.data_ptr() and Bf16.data_ptr() == Bf8.data_ptr()


def test_very_sparse_uses_each_layers_own_sparsity():
    # Internal: one int8 store per sparsity (the cache's keys) and the per-width scale are the object's own.
    b = randlora._Bases(2, 0, "very_sparse")
    b.get(64, 16, CPU, torch.float32)
    b.get(64, 36, CPU, torch.float32)
    s1, s2 = b.scale(16), b.scale(36)
    assert abs(s1 - 16**0.25) < 1e-6 and abs(s2 - 36**0.25) < 1e-6
    assert {k[2] for k in b._copies} == {16**0.5, 36**0.5}  # one int8 store per sparsity
    for d, s in ((16, s1), (36, s2)):
        A, Bf = b.dense(64, d)
        assert torch.unique(torch.cat([A.flatten(), Bf.flatten()]) / s).tolist() == [-1.0, 0.0, 1.0]


@pytest.mark.parametrize("kind", ["sparse", "very_sparse"])
@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_sparse_layer_bit_identical_to_explicit_dense_bases(kind, shape):
    in_f, out_f = shape
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f)
    rank = 3
    layer = randlora.RandLoraLinear(base, randlora.RandLoraConfig(rank=rank, seed=4, bases=kind, alpha=6.0))
    randomize_(layer, 2)
    x = torch.randn(2, 5, in_f)
    outs = {}
    for strategy in ("factorized", "build"):
        layer.strategy = strategy
        outs[strategy] = layer(x)
    # The same values as explicit float32 bases (stored ones, as a PEFT file gives them): bit for bit.
    # Internal: stored bases `_Bases(rank, stored=...)` are built only by the PEFT loader; here they must be exactly
    # this layer's, which no PEFT file round trip would isolate.
    explicit = randlora.RandLoraLinear(
        copy.deepcopy(base), randlora.RandLoraConfig(rank=rank, alpha=6.0), bases=randlora._Bases(rank, stored=layer.random_bases())
    )
    assert layer._plan.scale is not None and explicit._plan.scale is None
    with torch.no_grad():
        explicit.lam.copy_(layer.lam)
        explicit.gam.copy_(layer.gam)
    for strategy in ("factorized", "build"):
        explicit.strategy = strategy
        assert torch.equal(explicit(x), outs[strategy]), strategy
    # And the output matches the float64 reference.
    W = base.weight.detach().double()
    ref = x.double() @ (W + ref_layer_delta(layer)).t() + base.bias.detach().double()
    torch.testing.assert_close(outs["build"].double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_a_pickled_model_shares_the_bases_again():
    """A whole model through torch.save/torch.load: its seeded bases are the one shared object again (a later inject on
    it shares them, so to_peft sees one adapter)."""
    import io
    import tempfile

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    randlora.inject(model, ["0"], rank=2, seed=0)
    randomize_model_(model, 1)
    x = torch.randn(3, 256)
    y = model(x)
    assert _copies(model[0]._bases)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), y)
    randlora.inject(loaded, ["2"], rank=2, seed=0)
    assert loaded[0]._bases is loaded[2]._bases is model[0]._bases
    with tempfile.TemporaryDirectory() as d:
        randlora.to_peft(loaded, os.path.join(d, "p"))


@pytest.mark.parametrize("default", [torch.float64, torch.bfloat16])
def test_bases_and_parameters_do_not_depend_on_torchs_default_dtype(default):
    """LLM loading code often sets a bf16 default dtype: the seeded bases are the same draws and lam/gam float32, so an
    adapter saved in one process loads to the same update in another. Each draw is the first of its seed (no cache)."""
    import gc

    seed = 424242 if default == torch.float64 else 434343  # drawn nowhere else: the first draw happens here
    layer = lambda kind: randlora.inject(nn.Sequential(nn.Linear(24, 16, dtype=torch.float32)), ["0"], 4, seed, bases=kind)[0]  # noqa
    for kind in ("dense", "sparse"):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(default)
        try:
            got = layer(kind)
            assert got.lam.dtype == got.gam.dtype == torch.float32
            drawn = got.random_bases()
        finally:
            torch.set_default_dtype(previous)
        del got
        gc.collect()  # the bases object goes with its last layer: the next one draws again, in float32
        assert all(torch.equal(a, b) for a, b in zip(drawn, layer(kind).random_bases()))
