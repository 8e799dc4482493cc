"""Training with transformers.Trainer: adapter-only checkpoints (randlora.trainer_callback) and
resuming from them, bit-exact against an uninterrupted run."""

from __future__ import annotations

import os

import pytest
import torch
import transformers  # a test extra: missing, this must fail, not skip
from safetensors import safe_open

import randlora
from conftest import tiny_llama

STEPS = 2
RANK = 8


class Rows(torch.utils.data.Dataset):
    """Token rows; labels are the tokens (causal LM) or one of 3 classes (classifier)."""

    def __init__(self, kind: str, n: int = 12) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, 8), generator=g)
        self.labels = self.ids if kind == "llama" else torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def base_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        return tiny_llama()
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=64,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(cfg)


# BERT: the classifier head is trained in full (modules_to_save) and must be checkpointed too.
SETUPS = {"llama": (["q_proj", "v_proj", "down_proj"], {}), "bert": (["query", "value"], {"modules_to_save": ["classifier"]})}


def adapted(kind: str) -> torch.nn.Module:
    targets, kw = SETUPS[kind]
    return randlora.inject(base_model(kind), targets, RANK, alpha=16.0, **kw)


def make_trainer(model, out, kind, max_steps=STEPS) -> "transformers.Trainer":
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, save_steps=1, per_device_train_batch_size=4, learning_rate=1e-2,
        use_cpu=True, report_to=[], logging_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=Rows(kind), callbacks=[randlora.trainer_callback()])


def adapter_values(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in randlora.adapter_state_dict(model).items()}


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_trainer_checkpoints_are_adapter_only_and_resume_exactly(kind, tmp_path):
    # Uninterrupted run.
    full = adapted(kind)
    trainer = make_trainer(full, tmp_path / "full", kind)
    trainer.train()
    want_values = adapter_values(full)
    want_opt = trainer.optimizer.state_dict()
    untrained = adapter_values(adapted(kind))
    assert all(not torch.equal(v, untrained[k]) for k, v in want_values.items()), "every trained tensor must change"
    if kind == "bert":
        assert {k for k in want_values if "classifier" in k} == {"classifier.weight", "classifier.bias"}

    # Each checkpoint holds the adapter, and its model file holds only the trainable tensors.
    ckpt = tmp_path / "full" / "checkpoint-1"
    names = sorted(os.listdir(ckpt))
    assert randlora.TRAINER_ADAPTER_NAME in names and "optimizer.pt" in names, names
    assert not [n for n in names if n.startswith(("model-", "pytorch_model"))], names
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    trainable = {n for n, p in full.named_parameters() if p.requires_grad}
    assert keys == trainable and all(k.endswith((".lam", ".gam")) or ".trained." in k for k in keys)
    size = sum(os.path.getsize(ckpt / n) for n in names if n.endswith((".safetensors", ".bin")))
    trainable_bytes = sum(p.numel() * 4 for p in full.parameters() if p.requires_grad)
    frozen_bytes = sum(p.numel() * 4 for p in full.parameters() if not p.requires_grad)
    assert size < 2 * trainable_bytes + 16384 < frozen_bytes, (size, trainable_bytes, frozen_bytes)

    # The adapter file loads into a plain model.
    plain = randlora.load_adapter(base_model(kind), tmp_path / "full" / f"checkpoint-{STEPS}" / randlora.TRAINER_ADAPTER_NAME)
    for k, v in randlora.adapter_state_dict(plain).items():
        assert torch.equal(v, want_values[k]), k

    # Interrupted after step 1, resumed as documented: same lam/gam and optimizer state.
    resumed = randlora.load_adapter(base_model(kind), ckpt / randlora.TRAINER_ADAPTER_NAME)
    assert not all(torch.equal(v, want_values[k]) for k, v in adapter_values(resumed).items())
    assert {n for n, p in resumed.named_parameters() if p.requires_grad} == trainable
    trainer2 = make_trainer(resumed, tmp_path / "full", kind)  # continues in the same output folder
    trainer2.train(resume_from_checkpoint=str(ckpt))
    assert trainer2.state.global_step == STEPS
    for k, v in adapter_values(resumed).items():
        assert torch.equal(v, want_values[k]), k
    got_opt = trainer2.optimizer.state_dict()
    assert got_opt["param_groups"] == want_opt["param_groups"]
    assert got_opt["state"].keys() == want_opt["state"].keys() and len(want_opt["state"]) == len(trainable)
    for i, s in want_opt["state"].items():
        for k, v in s.items():
            assert torch.equal(got_opt["state"][i][k], v), (i, k)
