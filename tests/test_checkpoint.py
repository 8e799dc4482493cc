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
from conftest import TinyNet, assert_unchanged, fresh_tiny, randomize_model_, snapshot

TARGETS = ["embed", "block.0", "head"]


def adapted(seed=0, rank=2, bases="dense", alpha=None, dropout=0.0, targets=TARGETS, width=8):
    model = fresh_tiny(width=width)
    randlora.inject(model, targets, rank=rank, seed=seed, bases=bases, alpha=alpha, dropout=dropout)
    randomize_model_(model, 5)
    return model


def read_meta(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def rewrite(src, dst, *, tensors=None, meta=None):
    t = load_file(str(src)) if tensors is None else tensors
    m = read_meta(src) if meta is None else meta
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
    import safetensors.torch

    path = tmp_path / "adapter.safetensors"
    randlora.save_adapter(adapted(), path)
    good = path.read_bytes()
    calls = []

    def broken(tensors, filename, metadata=None):
        calls.append(filename)
        with open(filename, "wb") as f:
            f.write(good[: len(good) // 2])
        raise exc

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    changed = adapted()
    with torch.no_grad():
        changed.head.gam.mul_(2)
    with pytest.raises(type(exc)):
        randlora.save_adapter(changed, path)
    assert calls and os.path.abspath(calls[0]) != os.path.abspath(path)
    assert os.path.dirname(os.path.abspath(calls[0])) == str(tmp_path)  # same folder: rename is atomic
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
