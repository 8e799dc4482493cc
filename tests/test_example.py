"""End-to-end tests of train_example.py: the tiny comparison run and the --hf-model path."""

from __future__ import annotations

import collections
import math
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import randlora  # noqa: E402
from conftest import tiny_llama  # noqa: E402
import train_example  # noqa: E402

METHODS = ("frozen", "LoRA r", "RandLoRA r", "full fine-tuning")


def table_rows(output: str) -> dict[str, list[str]]:
    """The result table's rows, keyed by method, as lists of cells."""
    rows = {}
    for line in output.splitlines():
        if line.startswith("| ") and not line.startswith(("| method", "| ---")):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_tiny_comparison_end_to_end(tmp_path):
    out = tmp_path / "adapter.safetensors"
    # One thread: the tiny model's matmuls are too small to share, and a busy CI machine
    # makes two threads wait on each other.
    cmd = [sys.executable, os.path.join(ROOT, "train_example.py"), "--tiny", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    rows = table_rows(proc.stdout)
    for method in METHODS:
        matches = [cells for name, cells in rows.items() if name.startswith(method)]
        assert len(matches) == 1, f"no single table row for {method!r} in:\n{proc.stdout}"
        loss, ppl = float(matches[0][2]), float(matches[0][3])
        assert math.isfinite(loss) and 0 < loss < 10, matches[0]
        assert ppl == pytest.approx(math.exp(loss), rel=1e-3)
    # Adapters match in size (within LoRA's rank granularity); full fine-tuning trains everything.
    trainable = {name.split()[0]: int(cells[1].replace(",", "")) for name, cells in rows.items()}
    assert trainable["frozen"] == 0 and trainable["full"] > trainable["RandLoRA"] > 0 and trainable["LoRA"] > 0

    assert re.search(r"reload check: .* identical \(torch\.equal\)", proc.stdout), proc.stdout
    assert "ratio" in proc.stdout

    # The saved adapter loads into a fresh model of the tiny configuration.
    assert out.exists()
    args = train_example.parse_args(["--tiny"])
    cfg = train_example.GPTConfig(context=args.context, d_model=args.d_model, n_layer=args.layers, n_head=args.heads)
    model = randlora.load_adapter(train_example.GPT(cfg), out)
    adapted = [m for m in model.modules() if isinstance(m, randlora.RandLoraLinear)]
    assert len(adapted) == len(train_example.TARGETS) * cfg.n_layer
    assert any(m.lam.abs().sum() > 0 for m in adapted)  # trained, not the zero init


def test_default_out_is_not_in_repo_root():
    args = train_example.parse_args([])
    assert os.path.dirname(args.out) == "out"


def test_matching_lora_rank():
    # d_model 128, q/k/v/o 128x128 and up/down 128<->512, 4 layers: RandLoRA r16 = LoRA r3 exactly.
    shapes = [(128, 128)] * 4 * 4 + [(128, 512), (512, 128)] * 4
    budget = train_example.randlora_param_count(shapes, 16)
    assert budget == 27_648
    assert train_example.matching_lora_rank(shapes, budget) == 3
    model = train_example.GPT(train_example.GPTConfig())
    assert sorted(train_example.target_shapes(model, train_example.TARGETS)) == sorted(shapes)
    adapted = randlora.inject(model, train_example.TARGETS, rank=16)
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == budget


def _tiny_hf_model(folder: str, text: str) -> None:
    """A tiny LLaMA and a word-level tokenizer, both built offline, saved to ``folder``."""
    import transformers
    import tokenizers
    words = collections.Counter(re.findall(r"\w+|[^\w\s]", text))
    vocab = {"[UNK]": 0, "[EOS]": 1}
    for word, _ in words.most_common(254):
        vocab[word] = len(vocab)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    tiny_llama(vocab_size=len(vocab), num_key_value_heads=2, max_position_embeddings=128).save_pretrained(folder)


def test_hf_model_path(tmp_path, capsys):
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics)[:6])
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    _tiny_hf_model(str(tmp_path / "model"), text)
    out = tmp_path / "hf_adapter.safetensors"
    results = train_example.main([
        "--hf-model", str(tmp_path / "model"), "--text", str(tmp_path / "train.txt"), "--targets", "q_proj", "v_proj", "down_proj",
        "--rank", "4", "--steps", "8", "--batch", "4", "--context", "32", "--eval-tokens", "512", "--threads", "1", "--out", str(out),
    ])
    printed = capsys.readouterr().out
    assert [r.method for r in results] == ["frozen (no fine-tuning)", "RandLoRA r4"]
    assert all(math.isfinite(r.loss) for r in results)
    # lam (r, n) + gam (n, d), n = d / r: q_proj 32->32 and down_proj 64->32 (d 32, n 8) and
    # v_proj 32->16 (2 key-value heads of 8: d 16, n 4), in each of 2 layers.
    assert results[1].trainable == 2 * ((4 * 8 + 8 * 32) * 2 + (4 * 4 + 4 * 16))
    assert "reload check: outputs identical (torch.equal)" in printed

    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"), local_files_only=True)
    randlora.load_adapter(fresh, out)
    names = {n.split(".")[-1] for n, m in fresh.named_modules() if isinstance(m, randlora.RandLoraLinear)}
    assert names == {"q_proj", "v_proj", "down_proj"}
