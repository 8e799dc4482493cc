"""Checkpoint I/O: safetensors adapter files, exact resume, atomic writes, bad files."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import randlora
from conftest import TinyNet, assert_close, assert_unchanged, fresh_tiny, randomize_model_, ref_layer_delta, snapshot

TARGETS = ["embed", "block.0", "head"]
PEFT_W = "adapter_model.safetensors"


def adapted(seed=0, rank=2, bases="dense", alpha=None, dropout=0.0, targets=TARGETS, width=8):
    model = fresh_tiny(width=width)
    randlora.inject(model, targets, rank=rank, seed=seed, bases=bases, alpha=alpha, dropout=dropout)
    randomize_model_(model, 5)
    return model


def read_meta(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def rewrite(src, dst, *, tensors=None, meta=None, sign=True):
    """Write ``src`` again with other tensors / metadata. ``sign``: with a checksum recomputed over
    the new content (a crafted file), so that the checks behind the checksum are reached."""
    t = load_file(str(src)) if tensors is None else tensors
    m = dict(read_meta(src) if meta is None else meta)
    if sign and "checksum" in m:
        m["checksum"] = randlora._adapter_checksum(m, t.items())
    save_file(t, str(dst), metadata=m)


# -----------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("bases", randlora.BASES_KINDS)
@pytest.mark.parametrize("into", ["plain", "adapted"])
def test_save_load_bit_identical(tmp_path, bases, into):
    model = adapted(seed=3, rank=2, bases=bases, alpha=7.0, dropout=0.1)
    model.eval()
    x = torch.randn(4, 6)
    y = model(x).detach()
    path = tmp_path / "a.safetensors"
    randlora.save_adapter(model, path)
    fresh = fresh_tiny()
    if into == "adapted":
        randlora.inject(fresh, TARGETS, rank=2, seed=3, bases=bases, alpha=7.0)
    out = randlora.load_adapter(fresh, path)
    assert out is fresh
    fresh.eval()
    assert torch.equal(fresh(x), y)
    for n, m in randlora.named_adapters(fresh):
        src = model.get_submodule(n)
        assert torch.equal(m.lam, src.lam) and torch.equal(m.gam, src.gam)
        assert (m.rank, m.alpha, m._bases.seed, m._bases.kind) == (2, 7.0, 3, bases)
        if into == "plain":
            assert isinstance(m.dropout, nn.Dropout) and m.dropout.p == 0.1
    assert sorted(n for n, p in fresh.named_parameters() if p.requires_grad) == sorted(
        f"{t}.{p}" for t in TARGETS for p in ("lam", "gam")
    )


def test_file_is_plain_safetensors_with_metadata(tmp_path):
    model = adapted(seed=11, rank=3, alpha=4.5, dropout=0.25)
    path = tmp_path / "adapter.safetensors"
    randlora.save_adapter(model, path)
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert b"\x80\x04" not in raw[:2]  # not a pickle stream
    tensors = load_file(str(path))
    assert set(tensors) == {f"{t}.{p}" for t in TARGETS for p in ("lam", "gam")}
    assert all(t.dtype == torch.float32 for t in tensors.values())
    for k, t in tensors.items():
        assert torch.equal(t, model.get_submodule(k.rsplit(".", 1)[0]).get_parameter(k.rsplit(".", 1)[1]))
    meta = read_meta(path)
    assert meta == header["__metadata__"]
    assert meta["format"] == "randlora" and meta["format_version"] == randlora.FORMAT_VERSION
    assert int(meta["rank"]) == 3 and float(meta["alpha"]) == 4.5 and int(meta["seed"]) == 11
    assert meta["bases"] == "dense"
    layers = json.loads(meta["layers"])
    assert layers == {n: [m.out_features, m.in_features, 0.25, "auto"] for n, m in randlora.named_adapters(model)}
    assert layers["embed"] == [8, 6, 0.25, "auto"] and layers["head"] == [5, 8, 0.25, "auto"]
    # The bases are not stored: the file is tiny.
    assert len(raw) < 8 + header_len + 4 * sum(t.numel() for t in tensors.values()) + 1


def test_resume_training_is_exact(tmp_path):
    torch.manual_seed(0)
    data = [(torch.randn(8, 6), torch.randn(8, 5)) for _ in range(6)]

    def step(model, opt, xb, yb):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        opt.step()

    def make():
        m = fresh_tiny()
        randlora.inject(m, TARGETS, rank=2, seed=1, alpha=2.0)
        return m

    def sgd(m):
        return torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.02)

    full = make()
    opt = sgd(full)
    for xb, yb in data:
        step(full, opt, xb, yb)

    part = make()
    opt = sgd(part)
    for xb, yb in data[:3]:
        step(part, opt, xb, yb)
    path = tmp_path / "ckpt.safetensors"
    randlora.save_adapter(part, path)
    del part, opt

    resumed = fresh_tiny()
    randlora.load_adapter(resumed, path)
    opt = sgd(resumed)
    for xb, yb in data[3:]:
        step(resumed, opt, xb, yb)
    sd_full, sd_res = randlora.adapter_state_dict(full), randlora.adapter_state_dict(resumed)
    assert list(sd_full) == list(sd_res)
    assert all(torch.isfinite(v).all() for v in sd_full.values())
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in sd_full.items() if k.endswith(".lam"))
    for k in sd_full:
        assert torch.equal(sd_full[k], sd_res[k]), k
    x = torch.randn(3, 6)
    assert torch.equal(full(x), resumed(x))


def test_overwrite_and_no_layers(tmp_path):
    path = tmp_path / "a.safetensors"
    m1, m2 = adapted(), adapted()
    with torch.no_grad():
        m2.head.lam.add_(1)
    randlora.save_adapter(m1, path)
    randlora.save_adapter(m2, path)
    assert torch.equal(load_file(str(path))["head.lam"], m2.head.lam)
    assert os.listdir(tmp_path) == ["a.safetensors"]
    with pytest.raises(ValueError, match="no RandLoRA layers"):
        randlora.save_adapter(fresh_tiny(), tmp_path / "b.safetensors")
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_saved_file_has_default_permissions(tmp_path):
    # written through a private temporary file, but readable like any file open() would create
    umask = os.umask(0o022)
    try:
        randlora.save_adapter(adapted(), tmp_path / "a.safetensors")
        randlora.to_peft(adapted(), tmp_path / "peft")
    finally:
        os.umask(umask)
    for f in [tmp_path / "a.safetensors", *(tmp_path / "peft").iterdir()]:
        assert os.stat(f).st_mode & 0o777 == 0o644, f


# -----------------------------------------------------------------------------
# 10. Atomic writes


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_save_is_atomic(tmp_path, monkeypatch, exc):
    path = tmp_path / "adapter.safetensors"
    randlora.save_adapter(adapted(), path)
    good = path.read_bytes()
    calls = []

    def broken(f, items, metadata):
        calls.append(sorted(os.listdir(tmp_path)))  # the temporary file is beside the target
        f.write(good[: len(good) // 2])
        raise exc

    monkeypatch.setattr(randlora, "_write_safetensors", broken)
    changed = adapted()
    with torch.no_grad():
        changed.head.gam.mul_(2)
    with pytest.raises(type(exc)):
        randlora.save_adapter(changed, path)
    assert len(calls) == 1 and len(calls[0]) == 2 and "adapter.safetensors" in calls[0]
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["adapter.safetensors"]
    monkeypatch.undo()
    fresh = fresh_tiny()
    randlora.load_adapter(fresh, path)  # still loads


# -----------------------------------------------------------------------------
# 9. Files that do not fit: ValueError, model unchanged


def _check_refused(model, path, match=None):
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        randlora.load_adapter(model, path)
    assert_unchanged(model, snap)


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.safetensors"
    randlora.save_adapter(adapted(seed=0, rank=2), path)
    return path


@pytest.mark.parametrize(
    "other,match",
    [
        (dict(rank=3), "rank"),
        (dict(seed=1), "seed"),
        (dict(bases="sparse"), "bases"),
        (dict(alpha=3.0), "alpha"),
    ],
)
def test_load_settings_mismatch(good, other, match):
    kw = dict(seed=0, rank=2, bases="dense", alpha=None)
    kw.update(other)
    model = adapted(**kw)
    _check_refused(model, good, match)


def test_load_layer_shape_mismatch(good):
    class Wider(TinyNet):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 7)

    torch.manual_seed(0)
    plain = Wider()
    _check_refused(plain, good, "head")
    torch.manual_seed(0)
    ad = Wider()
    randlora.inject(ad, TARGETS, rank=2)
    _check_refused(ad, good, "head")


def test_load_missing_and_unexpected_layers(tmp_path, good):
    more = adapted(targets=TARGETS + ["block.2"])
    _check_refused(more, good, "block.2")  # layer missing in the file
    fewer = adapted(targets=["embed", "head"])
    _check_refused(fewer, good, "block.0")  # file has a layer the model has not adapted

    class NoHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(6, 8)
            self.block = nn.Sequential(nn.Linear(8, 16))

    _check_refused(NoHead(), good, "head")  # layer not in the plain model at all

    # Metadata and tensors disagree: a layer's tensors missing / an extra tensor.
    t = load_file(str(good))
    del t["head.gam"]
    bad = tmp_path / "missing_tensor.safetensors"
    rewrite(good, bad, tensors=t)
    _check_refused(fresh_tiny(), bad, "head.gam")
    _check_refused(adapted(), bad, "head.gam")
    t = load_file(str(good))
    t["block.2.lam"] = torch.zeros(2, 4)
    bad = tmp_path / "extra_tensor.safetensors"
    rewrite(good, bad, tensors=t)
    _check_refused(fresh_tiny(), bad, "block.2.lam")
    _check_refused(adapted(), bad, "block.2.lam")


def test_load_layer_that_is_not_linear_in_the_model(tmp_path, good):
    # A file recording "norm" (a LayerNorm in TinyNet) as an adapted 8x8 layer.
    t = load_file(str(good))
    t["norm.lam"], t["norm.gam"] = torch.zeros(2, 4), torch.zeros(4, 8)
    meta = read_meta(good)
    layers = json.loads(meta["layers"])
    layers["norm"] = [8, 8]
    meta["layers"] = json.dumps(layers)
    bad = tmp_path / "norm.safetensors"
    rewrite(good, bad, tensors=t, meta=meta)
    _check_refused(fresh_tiny(), bad, "'norm'.*LayerNorm")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("into", ["plain", "adapted"])
def test_load_non_finite(tmp_path, good, value, into):
    t = load_file(str(good))
    t["block.0.gam"][1, 2] = value
    bad = tmp_path / "nan.safetensors"
    rewrite(good, bad, tensors=t)
    model = fresh_tiny() if into == "plain" else adapted()
    _check_refused(model, bad, "NaN or Inf")


@pytest.mark.parametrize("change", ["shape", "int_dtype"])
def test_load_bad_tensor(tmp_path, good, change):
    t = load_file(str(good))
    t["head.lam"] = torch.zeros(2, 4) if change == "shape" else torch.zeros(2, 3, dtype=torch.int32)
    bad = tmp_path / "bad.safetensors"
    rewrite(good, bad, tensors=t)
    _check_refused(fresh_tiny(), bad, "head.lam")
    _check_refused(adapted(), bad, "head.lam")


@settings(max_examples=12)
@given(st.data())
def test_load_truncated(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("trunc")
    path = folder / "a.safetensors"
    randlora.save_adapter(adapted(), path)
    raw = path.read_bytes()
    cut = data.draw(st.integers(0, len(raw) - 1))
    path.write_bytes(raw[:cut])
    _check_refused(fresh_tiny(), path)
    _check_refused(adapted(), path)


@settings(max_examples=12)
@given(st.binary(min_size=0, max_size=300), st.booleans())
def test_load_garbage(tmp_path_factory, blob, with_header_len):
    folder = tmp_path_factory.mktemp("garbage")
    path = folder / "g.safetensors"
    if with_header_len:  # a plausible header length in front of garbage
        blob = len(blob).to_bytes(8, "little") + blob
    path.write_bytes(blob)
    _check_refused(fresh_tiny(), path)


def test_load_non_randlora_safetensors(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"head.lam": torch.zeros(2, 3)}, str(path))
    _check_refused(fresh_tiny(), path, "not a randlora adapter")
    save_file({"head.lam": torch.zeros(2, 3)}, str(path), metadata={"format": "pt"})
    _check_refused(adapted(), path, "not a randlora adapter")


@pytest.mark.parametrize(
    "edit,match",
    [
        (dict(format_version="99"), "format_version"),
        (dict(rank="two"), "metadata"),
        (dict(rank="1.5"), "metadata"),
        (dict(rank="0"), "rank"),
        (dict(seed="-1"), "seed"),
        (dict(alpha="nan"), "alpha"),
        (dict(bases="gaussian"), "bases"),
        (dict(layers='{"embed": [8, 6, 1.5, "auto"], "head": [5, 8, 0.0, "auto"]}'), "dropout"),
        (dict(layers='{"embed": [8, 6, 0.0, "fast"], "head": [5, 8, 0.0, "auto"]}'), "strategy"),
        (dict(layers="not json"), "metadata"),
        (dict(layers="[1, 2]"), "metadata"),
        (dict(layers="[" * 100_000), "metadata"),  # nested too deep for json: still a ValueError
        (dict(modules_to_save="[" * 100_000), "modules_to_save"),
        (dict(modules_to_save='["head", "head"]'), "modules_to_save"),
        (dict(modules_to_save='["nope"]'), "nope"),
    ],
)
def test_load_bad_metadata(tmp_path, good, edit, match):
    meta = read_meta(good)
    meta.update(edit)
    bad = tmp_path / "meta.safetensors"
    rewrite(good, bad, meta=meta)
    _check_refused(fresh_tiny(), bad, match)


def test_load_missing_file_raises_file_not_found(tmp_path):
    model = fresh_tiny()
    snap = snapshot(model)
    with pytest.raises(FileNotFoundError):
        randlora.load_adapter(model, tmp_path / "nope.safetensors")
    assert_unchanged(model, snap)


# -----------------------------------------------------------------------------
# load_adapter_state_dict


def test_load_adapter_state_dict_roundtrip():
    src = adapted()
    dst = adapted()
    randomize_model_(dst, 9)
    state = randlora.adapter_state_dict(src)
    state = {k: v.clone().to(torch.float16).float() if k == "head.gam" else v.clone() for k, v in state.items()}
    assert randlora.load_adapter_state_dict(dst, state) is dst
    for k, v in randlora.adapter_state_dict(dst).items():
        assert v.dtype == torch.float32 and torch.equal(v, state[k])
    # Half-precision tensors are accepted and widened.
    state16 = {k: v.to(torch.bfloat16) for k, v in state.items()}
    randlora.load_adapter_state_dict(dst, state16)
    assert randlora.adapter_state_dict(dst)["head.lam"].dtype == torch.float32


def _bad_states():
    good = randlora.adapter_state_dict(adapted())
    good = {k: v.clone() for k, v in good.items()}

    def edit(fn):
        s = {k: v.clone() for k, v in good.items()}
        fn(s)
        return s

    nan = float("nan")
    return {
        "missing": edit(lambda s: s.pop("head.gam")),
        "unexpected": edit(lambda s: s.__setitem__("norm.lam", torch.zeros(1))),
        "renamed": edit(lambda s: s.__setitem__("head.base.lam", s.pop("head.lam"))),
        "shape": edit(lambda s: s.__setitem__("head.lam", torch.zeros(3, 2))),
        "nan": edit(lambda s: s["block.0.lam"].__setitem__((0, 0), nan)),
        "inf": edit(lambda s: s["embed.gam"].__setitem__((0, 0), float("inf"))),
        "int": edit(lambda s: s.__setitem__("head.lam", torch.zeros(2, 3, dtype=torch.int64))),
        "not_tensor": edit(lambda s: s.__setitem__("head.lam", [[0.0] * 3] * 2)),
        "empty": {},
    }


@pytest.mark.parametrize("case", list(_bad_states()))
def test_load_adapter_state_dict_refuses(case):
    state = _bad_states()[case]
    model = adapted()
    snap = snapshot(model)
    with pytest.raises(ValueError):
        randlora.load_adapter_state_dict(model, state)
    assert_unchanged(model, snap)


def test_load_adapter_state_dict_plain_model_and_merged():
    plain = fresh_tiny()
    snap = snapshot(plain)
    with pytest.raises(ValueError, match="no RandLoRA layers"):
        randlora.load_adapter_state_dict(plain, {})
    assert_unchanged(plain, snap)
    model = adapted()
    state = randlora.adapter_state_dict(adapted(seed=0))
    randlora.merge(model)
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        randlora.load_adapter_state_dict(model, state)
    assert_unchanged(model, snap)


# -----------------------------------------------------------------------------
# Issue 10: merge state in model.state_dict() (the layer's extra state)


def _ref64(model, dtype=torch.float32):
    """A float64 TinyNet computing base + scaling * ΔW (conftest's element-wise reference)."""
    ref = fresh_tiny().to(dtype).double()
    with torch.no_grad():
        for name, m in randlora.named_adapters(model):
            ref.get_submodule(name).weight.add_(ref_layer_delta(m))
    return ref.eval()


def _close_to(model, ref, x, rtol):
    with torch.no_grad():
        assert_close(model(x), ref(x.double()), rtol)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.float64, 1e-9)])
@pytest.mark.parametrize("src_merged,dst_merged", [(True, False), (False, True), (True, True)])
def test_state_dict_carries_merge_state(dtype, rtol, src_merged, dst_merged):
    src, dst = adapted().to(dtype).eval(), adapted().to(dtype).eval()
    randomize_model_(dst, 77)  # other lam/gam: the load must replace them
    ref, x = _ref64(src, dtype), torch.randn(4, 6, dtype=dtype)
    if src_merged:
        randlora.merge(src)
    if dst_merged:
        randlora.merge(dst)
    state = src.state_dict()
    assert ("head._extra_state" in state) == src_merged  # present only while merged
    dst.load_state_dict(state)
    assert all(m.merged == src_merged for _, m in randlora.named_adapters(dst))
    _close_to(dst, ref, x, rtol)  # ΔW counted once, never twice or not at all
    randlora.unmerge(dst)
    _close_to(dst, ref, x, rtol)
    base = fresh_tiny().to(dtype)
    eps = torch.finfo(dtype).eps
    for name, m in randlora.named_adapters(dst):  # unmerge subtracts what the weight holds (two roundings)
        w0 = base.get_submodule(name).weight.double()
        atol = 2 * eps * (w0.abs().max().item() + ref_layer_delta(m).abs().max().item())
        assert_close(m.base.weight, w0, 0, atol=atol)


def test_merge_state_partial_and_legacy_loads():
    model = adapted().eval()
    ref, x = _ref64(model), torch.randn(4, 6)
    randlora.merge(model)
    # lam/gam alone (strict=False) do not touch the weight: the merge state stays as it is.
    model.load_state_dict(randlora.adapter_state_dict(adapted()), strict=False)
    assert all(m.merged for _, m in randlora.named_adapters(model))
    randlora.unmerge(model)
    _close_to(model, ref, x, 2e-5)
    # A state dict without merge state (unmerged, or from randlora <= 0.2) loads strictly into a
    # merged model and leaves it unmerged with the loaded (unmerged) weights.
    plain_state = adapted().state_dict()
    assert not any(k.endswith("_extra_state") for k in plain_state)
    randlora.merge(model)
    model.load_state_dict(plain_state)
    assert not any(m.merged for _, m in randlora.named_adapters(model))
    _close_to(model, ref, x, 2e-5)


@pytest.mark.parametrize(
    "bad",
    [torch.ones(3), torch.zeros(2), torch.tensor([2.0]), torch.ones(1, 1), "merged", torch.tensor([1.0, float("nan")])],
)
def test_bad_merge_state_is_refused_before_the_layer_changes(bad):
    src = adapted()
    randlora.merge(src)
    state = dict(src.state_dict())
    state["head._extra_state"] = bad
    model = adapted()
    randomize_model_(model, 9)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="head.*merge state"):
        model.load_state_dict(state)
    assert torch.equal(model.head.lam, snap[0]["head.lam"]) and torch.equal(model.head.base.weight, snap[0]["head.base.weight"])
    assert not model.head.merged


def test_merged_state_inside_disable_is_refused():
    src = adapted()
    randlora.merge(src)
    model = adapted()
    with randlora.disable(model):
        with pytest.raises(ValueError, match="disable"):
            model.load_state_dict(src.state_dict())


# -----------------------------------------------------------------------------
# Issue 10: the file format (own reader and writer; checksum; versions)


def _write_with_randlora(path, tensors, meta):
    with open(path, "wb") as f:
        randlora._write_safetensors(f, list(tensors.items()), meta)


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool]


@settings(max_examples=20)
@given(st.data())
def test_reader_and_writer_agree_with_safetensors(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("st")
    n = data.draw(st.integers(0, 4))
    tensors = {}
    for i in range(n):
        dtype = data.draw(st.sampled_from(DTYPES))
        shape = tuple(data.draw(st.lists(st.integers(0, 5), max_size=3)))
        t = (torch.randn(shape) * 50).to(dtype) if dtype != torch.bool else torch.rand(shape) > 0.5
        tensors[f"t{i}.{data.draw(st.sampled_from(['lam', 'x', 'é']))}"] = t
    meta = {"format": "pt", "k": data.draw(st.text(max_size=20))}
    ours, theirs = folder / "ours.safetensors", folder / "theirs.safetensors"
    _write_with_randlora(ours, tensors, meta)
    save_file(tensors, str(theirs), metadata=meta)
    for path in (ours, theirs):
        assert load_file(str(path)).keys() == tensors.keys()  # the safetensors library reads ours
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata() == meta
            for k, t in tensors.items():
                assert f.get_tensor(k).dtype == t.dtype and torch.equal(f.get_tensor(k), t)
        with randlora._SafetensorsReader(str(path)) as f:  # ours reads the library's
            assert f.metadata == meta and sorted(f.keys()) == sorted(tensors)
            for k, t in tensors.items():
                got = f.tensor(k)
                assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)


def test_checksum_covers_settings_and_tensors(tmp_path):
    path = tmp_path / "a.safetensors"
    randlora.save_adapter(adapted(), path)
    meta, t = read_meta(path), load_file(str(path))
    assert meta["checksum"] == randlora._adapter_checksum(meta, t.items())
    assert meta["checksum"].startswith("sha256:") and len(meta["checksum"]) == 7 + 64
    # Independent of the layout: the same content in another order has the same checksum.
    assert randlora._adapter_checksum(dict(reversed(list(meta.items()))), list(t.items())[::-1]) == meta["checksum"]
    for change in (dict(seed="1"), dict(extra="x")):
        assert randlora._adapter_checksum({**meta, **change}, t.items()) != meta["checksum"]
    t2 = dict(t)
    t2["head.lam"] = t["head.lam"].to(torch.float64)  # same values, other dtype
    assert randlora._adapter_checksum(meta, t2.items()) != meta["checksum"]
    t2["head.lam"] = t["head.lam"].reshape(-1)  # same bytes, other shape
    assert randlora._adapter_checksum(meta, t2.items()) != meta["checksum"]


@settings(max_examples=20)
@given(st.data())
def test_any_single_byte_change_is_refused(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("flip")
    path = folder / "a.safetensors"
    randlora.save_adapter(adapted(), path)
    raw = bytearray(path.read_bytes())
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255).filter(lambda v: v != raw[i]))
    path.write_bytes(bytes(raw))
    for model in (fresh_tiny(), adapted()):
        snap = snapshot(model)
        with pytest.raises(ValueError) as e:
            randlora.load_adapter(model, path)
        assert str(path) in str(e.value)
        assert_unchanged(model, snap)


def test_unsigned_edits_are_refused_by_the_checksum(good, tmp_path):
    meta = read_meta(good)
    meta["seed"] = "1"
    bad = tmp_path / "edited.safetensors"
    rewrite(good, bad, meta=meta, sign=False)
    _check_refused(fresh_tiny(), bad, "checksum mismatch")
    del meta["checksum"]
    rewrite(good, bad, meta=meta, sign=False)
    _check_refused(fresh_tiny(), bad, "no checksum")


@pytest.mark.parametrize("version", ["1", "2"])
def test_older_versions_load_without_checksum(tmp_path, version):
    model = adapted(dropout=0.1)
    path = tmp_path / "new.safetensors"
    randlora.save_adapter(model, path)
    meta = read_meta(path)
    del meta["checksum"], meta["modules_to_save"]
    meta["format_version"] = version
    if version == "1":  # [out, in] per layer, one file-wide dropout
        meta["layers"] = json.dumps({n: v[:2] for n, v in json.loads(meta["layers"]).items()})
        meta["dropout"] = "0.1"
    old = tmp_path / f"v{version}.safetensors"
    rewrite(path, old, meta=meta)
    loaded = fresh_tiny()
    randlora.load_adapter(loaded, old)
    x = torch.randn(3, 6)
    model.eval(), loaded.eval()
    assert torch.equal(model(x), loaded(x))
    assert all(m.dropout_p == 0.1 for _, m in randlora.named_adapters(loaded))


# -----------------------------------------------------------------------------
# Issue 10: temp files of killed saves, modes, symlinks, non-regular files


def _dead_pid():
    import subprocess, sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_next_save_removes_stale_temps_only(tmp_path):
    host = randlora._host_tag()
    dead = tmp_path / f".randlora-{host}-{_dead_pid()}-ab12.tmp"
    alive = tmp_path / f".randlora-{host}-{os.getppid()}-cd34.tmp"  # a live process's save in progress
    mine = tmp_path / f".randlora-{host}-{os.getpid()}-ef56.tmp"  # another thread of this process
    other_new = tmp_path / ".randlora-00000000-1-aa.tmp"  # another host: kept for a day
    other_old = tmp_path / ".randlora-00000000-2-bb.tmp"
    dead_dir = tmp_path / f".randlora-{host}-{_dead_pid()}-cc.tmp"  # a killed to_peft's folder
    users = [tmp_path / ".randlora-notes.tmp", tmp_path / "x.tmp", tmp_path / f".randlora-{host}-1-zz.tmp.bak"]
    for p in [dead, alive, mine, other_new, other_old, *users]:
        p.write_bytes(b"x")
    dead_dir.mkdir()
    (dead_dir / "adapter_model.safetensors").write_bytes(b"partial")
    os.utime(other_old, (0, 0))
    randlora.save_adapter(adapted(), tmp_path / "a.safetensors")
    left = set(os.listdir(tmp_path))
    assert left == {p.name for p in [alive, mine, other_new, *users]} | {"a.safetensors"}


def test_save_refuses_non_regular_targets(tmp_path):
    model = adapted()
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "p")
    for name in ("d", "p"):
        with pytest.raises(ValueError, match="not a regular file"):
            randlora.save_adapter(model, tmp_path / name)
    assert sorted(os.listdir(tmp_path)) == ["d", "p"] and os.listdir(tmp_path / "d") == []


def test_symlink_chain_is_followed_and_kept(tmp_path):
    (tmp_path / "store").mkdir()
    os.symlink("store/real.safetensors", tmp_path / "l1")
    os.symlink("l1", tmp_path / "l2")
    model = adapted()
    randlora.save_adapter(model, tmp_path / "l2")
    assert os.readlink(tmp_path / "l2") == "l1" and os.readlink(tmp_path / "l1") == "store/real.safetensors"
    assert (tmp_path / "store" / "real.safetensors").is_file()
    loaded = fresh_tiny()
    randlora.load_adapter(loaded, tmp_path / "l2")
    assert torch.equal(loaded.head.lam, model.head.lam)


# -----------------------------------------------------------------------------
# Issue 10: to_peft replaces its folder as a whole


def _peft_model(v):
    model = adapted()
    with torch.no_grad():
        model.head.lam.fill_(float(v))
    return model


def _peft_version(folder):
    loaded = fresh_tiny()
    randlora.from_peft(loaded, folder)
    return int(loaded.head.lam[0, 0].item())


def test_to_peft_keeps_other_files_and_modes(tmp_path):
    folder = tmp_path / "peft"
    randlora.to_peft(_peft_model(1), folder)
    (folder / "README.md").write_text("model card")
    os.chmod(folder / PEFT_W, 0o600)
    os.chmod(folder, 0o750)
    randlora.to_peft(_peft_model(2), folder)
    assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", PEFT_W]
    assert (folder / "README.md").read_text() == "model card"
    assert os.stat(folder / PEFT_W).st_mode & 0o777 == 0o600 and os.stat(folder).st_mode & 0o777 == 0o750
    assert _peft_version(folder) == 2
    assert sorted(os.listdir(tmp_path)) == ["peft"]


def test_to_peft_refusals_leave_files_alone(tmp_path):
    folder = tmp_path / "peft"
    randlora.to_peft(_peft_model(1), folder)
    (folder / "sub").mkdir()
    before = sorted(os.listdir(folder))
    with pytest.raises(ValueError, match="subfolders"):
        randlora.to_peft(_peft_model(2), folder)
    assert sorted(os.listdir(folder)) == before and _peft_version(folder) == 1
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="a file"):
        randlora.to_peft(_peft_model(2), tmp_path / "file")
    nan = _peft_model(2)
    with torch.no_grad():
        nan.head.gam[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'head'.*NaN"):
        randlora.to_peft(nan, tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["file", "peft"]


def test_to_peft_through_a_symlinked_folder(tmp_path):
    (tmp_path / "store").mkdir()
    randlora.to_peft(_peft_model(1), tmp_path / "store" / "peft")
    os.symlink("store/peft", tmp_path / "link")
    randlora.to_peft(_peft_model(2), tmp_path / "link")
    assert os.readlink(tmp_path / "link") == "store/peft"
    assert _peft_version(tmp_path / "store" / "peft") == 2
    assert sorted(os.listdir(tmp_path / "store")) == ["peft"]


def test_to_peft_two_rename_fallback_and_recovery(tmp_path, monkeypatch):
    """Where the atomic exchange is not available: old -> backup, new -> folder. A crash between
    the two renames leaves the old folder complete at the backup path: from_peft names it, the
    next to_peft puts it back first."""
    monkeypatch.setattr(randlora, "_exchange", lambda a, b: False)
    folder = tmp_path / "peft"
    randlora.to_peft(_peft_model(1), folder)
    randlora.to_peft(_peft_model(2), folder)
    assert _peft_version(folder) == 2 and sorted(os.listdir(tmp_path)) == ["peft"]
    backup = randlora._backup_path(str(folder))
    os.rename(folder, backup)  # what a kill between the two renames leaves
    with pytest.raises(FileNotFoundError, match="interrupted to_peft.*randlora-old"):
        randlora.from_peft(fresh_tiny(), folder)
    real_rename, calls = os.rename, []

    def failing(a, b):  # the second rename of the swap fails: the first is undone
        calls.append((a, b))
        if len(calls) == 3:
            raise OSError(28, "injected")
        return real_rename(a, b)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="injected"):
        randlora.to_peft(_peft_model(3), folder)
    monkeypatch.setattr(os, "rename", real_rename)
    assert calls[0] == (backup, str(folder))  # recovery first
    assert _peft_version(folder) == 2 and sorted(os.listdir(tmp_path)) == ["peft"]


# -----------------------------------------------------------------------------
# Issue 10: modules to save travel in adapter files


def test_modules_to_save_round_trip(tmp_path):
    model = fresh_tiny()
    randlora.inject(model, ["embed", "block.0"], rank=2, seed=1, modules_to_save=["head"])
    randomize_model_(model, 3)
    with torch.no_grad():
        model.head.trained.weight.add_(1.0)
    state = randlora.adapter_state_dict(model)
    assert {"head.weight", "head.bias"} <= set(state)
    path = tmp_path / "a.safetensors"
    randlora.save_adapter(model, path)
    assert json.loads(read_meta(path)["modules_to_save"]) == ["head"]
    loaded = fresh_tiny()
    randlora.load_adapter(loaded, path)
    x = torch.randn(3, 6)
    model.eval(), loaded.eval()
    assert torch.equal(model(x), loaded(x))
    assert isinstance(loaded.head, randlora.SavedModule) and loaded.head.trained.weight.requires_grad
    with randlora.disable(loaded):
        assert torch.equal(loaded(x), fresh_tiny().eval()(x))
    other = adapted(targets=["embed", "block.0"], seed=1)  # adapted, but without the module to save
    _check_refused(other, path, "modules to save")


def test_from_peft_refuses_a_fifo_config_without_blocking(tmp_path):
    folder = tmp_path / "peft"
    randlora.to_peft(_peft_model(1), folder)
    os.remove(folder / "adapter_config.json")
    os.mkfifo(folder / "adapter_config.json")
    model = fresh_tiny()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="adapter_config.json is a FIFO.*not a regular file"):
        randlora.from_peft(model, folder)
    assert_unchanged(model, snap)


def test_deeply_nested_header_is_a_value_error(tmp_path):
    header = b"[" * 100_000
    path = tmp_path / "deep.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    _check_refused(fresh_tiny(), path, "not a readable safetensors file")


@settings(max_examples=10)
@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    width=st.integers(2, 12),
    rank=st.integers(1, 2),
    merged=st.booleans(),
)
def test_round_trip_any_dtype_width_and_merge_state(tmp_path_factory, dtype, width, rank, merged):
    """lam/gam stay float32 in every model dtype; the file holds them exactly, merged or not."""
    path = tmp_path_factory.mktemp("rt") / "a.safetensors"
    model = adapted(rank=rank, width=width).to(dtype).eval()
    want = {k: v.clone() for k, v in randlora.adapter_state_dict(model).items()}
    x = torch.randn(3, 6, dtype=dtype)
    y = model(x)  # before merge: merge + unmerge rounds the base weight
    if merged:
        randlora.merge(model)
    randlora.save_adapter(model, path)
    loaded = fresh_tiny(width=width).to(dtype).eval()
    randlora.load_adapter(loaded, path)
    got = randlora.adapter_state_dict(loaded)
    assert list(got) == list(want) and all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(loaded(x), y)
