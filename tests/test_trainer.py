"""Training with transformers.Trainer: adapter-only checkpoints, from the start (randlora.trainer_class) or by
replacing the Trainer's whole-model files after each save (randlora.trainer_callback), written where
``args.should_save`` says (every node's local rank 0 with ``save_on_each_node``), and resuming from them bit-exact
against an uninterrupted run."""

from __future__ import annotations

import os

import pytest
import safetensors.torch
import torch
import transformers  # a test extra: missing, this must fail, not skip
from safetensors import safe_open
from safetensors.torch import load_file

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
    )  # fmt: skip
    return transformers.BertForSequenceClassification(cfg)


# BERT: the classifier head is trained in full (modules_to_save) and must be checkpointed too.
SETUPS = {"llama": (["q_proj", "v_proj", "down_proj"], {}), "bert": (["query", "value"], {"modules_to_save": ["classifier"]})}


def adapted(kind: str) -> torch.nn.Module:
    targets, kw = SETUPS[kind]
    return randlora.inject(base_model(kind), targets, RANK, alpha=16.0, **kw)


def make_trainer(model, out, kind, how, max_steps=STEPS, **args) -> transformers.Trainer:
    """A Trainer saving every step: ``how`` = "class" (randlora.trainer_class()) or "callback" (transformers.Trainer
    with randlora.trainer_callback())."""
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, save_steps=1, per_device_train_batch_size=4, learning_rate=1e-2,
        use_cpu=True, report_to=[], logging_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True, **args,
    )  # fmt: skip
    if how == "class":
        cls = randlora.trainer_class()
        assert issubclass(cls, transformers.Trainer)
        return cls(model=model, args=args, train_dataset=Rows(kind))
    return transformers.Trainer(model=model, args=args, train_dataset=Rows(kind), callbacks=[randlora.trainer_callback()])


def adapter_values(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in randlora.adapter_state_dict(model).items()}


def no_whole_model_writes(monkeypatch) -> list:
    """Make every way the Trainer writes a whole model fail (save_pretrained, safetensors.torch.save_file / save_model)
    and record the files torch.save writes."""

    def refuse(what):
        def f(*a, **k):
            raise AssertionError(f"{what} was called: the whole model is being written")

        return f

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", refuse("save_pretrained"))
    monkeypatch.setattr(safetensors.torch, "save_file", refuse("safetensors.torch.save_file"))
    monkeypatch.setattr(safetensors.torch, "save_model", refuse("safetensors.torch.save_model"))
    written, real_save = [], torch.save

    def save(obj, f, *a, **k):
        written.append(os.path.basename(str(f)))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    return written


def check_adapter_only(ckpt, model) -> None:
    """The checkpoint holds the adapter, and its model file holds only the trainable tensors (under the model's keys)."""
    names = sorted(os.listdir(ckpt))
    assert randlora.TRAINER_ADAPTER_NAME in names and "model.safetensors" in names, names
    assert not [n for n in names if n.startswith(("model-", "pytorch_model"))], names
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert keys == trainable and all(k.endswith((".lam", ".gam")) or ".trained." in k for k in keys)
    size = sum(os.path.getsize(ckpt / n) for n in names if n.endswith((".safetensors", ".bin")))
    trainable_bytes = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    frozen_bytes = sum(p.numel() * 4 for p in model.parameters() if not p.requires_grad)
    assert size < 2 * trainable_bytes + 16384 < frozen_bytes, (size, trainable_bytes, frozen_bytes)


@pytest.mark.parametrize("how", ["class", "callback"])
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_trainer_checkpoints_are_adapter_only_and_resume_exactly(kind, how, tmp_path, monkeypatch):
    written = no_whole_model_writes(monkeypatch) if how == "class" else []  # trainer_class: never the whole model
    # Uninterrupted run.
    full = adapted(kind)
    trainer = make_trainer(full, tmp_path / "full", kind, how)
    trainer.train()
    want_values = adapter_values(full)
    want_opt = trainer.optimizer.state_dict()
    untrained = adapter_values(adapted(kind))
    assert all(not torch.equal(v, untrained[k]) for k, v in want_values.items()), "every trained tensor must change"
    if kind == "bert":
        assert {k for k in want_values if "classifier" in k} == {"classifier.weight", "classifier.bias"}

    ckpt = tmp_path / "full" / "checkpoint-1"
    for step in range(1, STEPS + 1):
        check_adapter_only(tmp_path / "full" / f"checkpoint-{step}", full)
    assert "optimizer.pt" in os.listdir(ckpt)
    trainable = {n for n, p in full.named_parameters() if p.requires_grad}
    last = tmp_path / "full" / f"checkpoint-{STEPS}"
    for k, v in load_file(str(last / "model.safetensors")).items():
        assert torch.equal(v, full.get_parameter(k)), k

    # The adapter file loads into a plain model.
    plain = randlora.load_adapter(base_model(kind), last / randlora.TRAINER_ADAPTER_NAME)
    for k, v in randlora.adapter_state_dict(plain).items():
        assert torch.equal(v, want_values[k]), k

    # Interrupted after step 1, resumed as documented: same lam/gam and optimizer state.
    resumed = randlora.load_adapter(base_model(kind), ckpt / randlora.TRAINER_ADAPTER_NAME)
    assert not all(torch.equal(v, want_values[k]) for k, v in adapter_values(resumed).items())
    assert {n for n, p in resumed.named_parameters() if p.requires_grad} == trainable
    trainer2 = make_trainer(resumed, tmp_path / "full", kind, how)  # continues in the same output folder
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
    check_adapter_only(tmp_path / "full" / f"checkpoint-{STEPS}", resumed)
    if how == "class":
        assert "optimizer.pt" in written and not [n for n in written if n.startswith(("model", "pytorch_model"))], written


def as_node_1(monkeypatch) -> None:
    """This process becomes global rank 2 of 4, local rank 0 of its node (node 1, two processes per node), as far as
    the Trainer's arguments say and, while it saves (checkpoint and callbacks), torch.distributed's rank (the Trainer
    itself still trains as one process: its data loader would ask an initialized process group for its size)."""
    monkeypatch.setattr(transformers.TrainingArguments, "process_index", property(lambda self: 2))
    monkeypatch.setattr(transformers.TrainingArguments, "local_process_index", property(lambda self: 0))

    def as_rank_2(real):
        def f(*a, **k):
            dist, saved = torch.distributed, (torch.distributed.is_initialized, torch.distributed.get_rank)
            dist.is_initialized, dist.get_rank = (lambda: True), (lambda group=None: 2)
            try:
                return real(*a, **k)
            finally:
                dist.is_initialized, dist.get_rank = saved

        return f

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", as_rank_2(transformers.Trainer._save_checkpoint))
    handler = transformers.trainer_callback.CallbackHandler
    monkeypatch.setattr(handler, "on_save", as_rank_2(handler.on_save))


@pytest.mark.parametrize("how", ["class", "callback"])
def test_save_on_each_node_writes_adapter_checkpoints_on_node_1(how, tmp_path, monkeypatch):
    """Issue 19.6: with save_on_each_node=True, node 1's local rank 0 (global rank 2: args.should_save is True there)
    writes complete adapter checkpoints, which load; without it, that rank writes no adapter file."""
    as_node_1(monkeypatch)
    model = adapted("llama")
    trainer = make_trainer(model, tmp_path / "node1", "llama", how, save_on_each_node=True)
    assert trainer.args.should_save and not trainer.is_world_process_zero()
    ranks, real_checkpoint = [], randlora._adapter_checkpoint

    def checkpoint(*a, **k):  # records the rank torch.distributed reports while a checkpoint is written
        ranks.append(torch.distributed.get_rank() if torch.distributed.is_initialized() else None)
        return real_checkpoint(*a, **k)

    monkeypatch.setattr(randlora, "_adapter_checkpoint", checkpoint)
    trainer.train()
    assert ranks and set(ranks) == {2}, ranks  # the saves ran as global rank 2
    want = adapter_values(model)
    for step in range(1, STEPS + 1):
        ckpt = tmp_path / "node1" / f"checkpoint-{step}"
        check_adapter_only(ckpt, model)
        plain = randlora.load_adapter(base_model("llama"), ckpt / randlora.TRAINER_ADAPTER_NAME)
        assert set(randlora.adapter_state_dict(plain)) == set(want)
    for k, v in randlora.adapter_state_dict(plain).items():
        assert torch.equal(v, want[k]), k
    for k, v in load_file(str(ckpt / "model.safetensors")).items():
        assert torch.equal(v, model.get_parameter(k)), k

    other = make_trainer(adapted("llama"), tmp_path / "not_saving", "llama", how, max_steps=1)  # save_on_each_node=False
    assert not other.args.should_save
    if how == "callback":  # the Trainer writes no checkpoint folder there; the callback writes nothing either
        other.train()
    else:
        other.save_model(str(tmp_path / "not_saving" / "final"))
        other.train()
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "not_saving") for f in fs]
    assert not [f for f in files if f.endswith((randlora.TRAINER_ADAPTER_NAME, "model.safetensors"))], files


class Diverge(transformers.TrainerCallback):
    """Puts a NaN into one lam at the end of step ``at`` (a diverged step), before that step's save."""

    def __init__(self, model, at: int) -> None:
        self.model, self.at = model, at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            with torch.no_grad():
                next(m for _, m in randlora.named_adapters(self.model)).lam[0, 0] = float("nan")
        return control


@pytest.mark.parametrize("how", ["class", "callback"])
def test_a_diverged_save_leaves_the_last_good_checkpoint_for_resume(how, tmp_path):
    """A NaN at a save step is refused, and nothing is left that resume_from_checkpoint=True would pick instead of
    the last good checkpoint: trainer_class leaves no folder; the callback keeps the Trainer's as refused-checkpoint-N.
    Resuming from there gives the uninterrupted run's values at that step."""
    model = adapted("llama")
    trainer = make_trainer(model, tmp_path, "llama", how, max_steps=3)
    trainer.add_callback(Diverge(model, 2))
    with pytest.raises(ValueError, match=r"lam' has NaN or Inf values"):
        trainer.train()
    assert transformers.trainer_utils.get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-1")
    names = sorted(os.listdir(tmp_path))
    assert names == (["checkpoint-1"] if how == "class" else ["checkpoint-1", "refused-checkpoint-2"]), names
    good = tmp_path / "checkpoint-1"
    check_adapter_only(good, model)
    reference = adapted("llama")
    make_trainer(reference, tmp_path / "ref", "llama", how, max_steps=1).train()
    resumed = randlora.load_adapter(base_model("llama"), good / randlora.TRAINER_ADAPTER_NAME)
    for k, v in adapter_values(resumed).items():
        assert torch.equal(v, adapter_values(reference)[k]), k


class DivergeInStep(transformers.TrainerCallback):
    """Puts a NaN into one lam in the optimizer step of step ``at``, as a diverging update does: before any on_step_end."""

    def __init__(self, model, at: int) -> None:
        self.model, self.at = model, at

    def on_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.at:
            with torch.no_grad():
                next(m for _, m in randlora.named_adapters(self.model)).lam[0, 0] = float("nan")
        return control


@pytest.mark.parametrize("how", ["class", "callback"])
def test_a_diverged_step_with_save_total_limit_keeps_the_last_good_checkpoint(how, tmp_path):
    """save_total_limit=1: the Trainer deletes older checkpoints once it has written a new one. The callback refuses a
    diverged adapter at the step's end, before the Trainer writes (and rotates): checkpoint-1 stays for resume."""
    model = adapted("llama")
    trainer = make_trainer(model, tmp_path, "llama", how, max_steps=3, save_total_limit=1)
    trainer.add_callback(DivergeInStep(model, 2))
    with pytest.raises(ValueError, match=r"lam' has NaN or Inf values"):
        trainer.train()
    assert transformers.trainer_utils.get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-1")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1"]
    check_adapter_only(tmp_path / "checkpoint-1", model)


@pytest.mark.parametrize("how", ["class", "callback"])
def test_a_refused_folder_is_never_taken_for_a_checkpoint_by_a_later_run(how, tmp_path):
    """A later run into the same output_dir with save_total_limit=1: the Trainer's rotation keeps the newest
    checkpoint-N; a refused-checkpoint-N left by an earlier refusal is not one, so the good checkpoint stays."""
    model = adapted("llama")
    trainer = make_trainer(model, tmp_path, "llama", "callback", max_steps=3)
    trainer.add_callback(Diverge(model, 2))
    with pytest.raises(ValueError, match=r"kept as .*refused-checkpoint-2"):
        trainer.train()
    model = adapted("llama")
    make_trainer(model, tmp_path, "llama", how, max_steps=2, save_total_limit=1).train()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "refused-checkpoint-2"]
    assert transformers.trainer_utils.get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    check_adapter_only(tmp_path / "checkpoint-2", model)


@pytest.mark.parametrize("where", ["target", "saved", "target-data-tie"])
def test_the_callback_refuses_a_tied_head_at_the_start_and_trainer_class_checkpoints_it(where, tmp_path):
    """A tied lm_head adapted or saved in full: the Trainer's own whole-model save (which the callback relies on)
    refuses the tie under RandLoRA's names, so the callback refuses before the first step, naming both; the
    adapter-only trainer_class checkpoints the model. A tie made through .data (two Parameters, one storage) too."""
    def tied():
        torch.manual_seed(0)
        model = tiny_llama(tie_word_embeddings=where != "target-data-tie")
        if where == "target-data-tie":
            model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.data)
        kw = {"modules_to_save": ["lm_head"]} if where == "saved" else {}
        return randlora.inject(model, ["q_proj", *(["lm_head"] if where != "saved" else [])], RANK, **kw)

    model = tied()
    before = adapter_values(model)
    with pytest.raises(ValueError, match=r"trainer_callback: 'model.embed_tokens.weight' and 'lm_head\.(base|original)"
                                         r"\.weight' are one tied weight.*trainer_class"):
        make_trainer(model, tmp_path / "cb", "llama", "callback", max_steps=2).train()
    assert not os.path.exists(tmp_path / "cb" / "checkpoint-1")
    assert all(torch.equal(v, before[k]) for k, v in adapter_values(model).items())
    model = tied()
    make_trainer(model, tmp_path / "cls", "llama", "class", max_steps=2).train()
    check_adapter_only(tmp_path / "cls" / "checkpoint-2", model)


def test_the_callback_trains_a_model_whose_tie_the_trainer_declares(tmp_path):
    """embed_tokens saved in full: its original stays tied to lm_head.weight, a tie the model declares, which the
    Trainer's save drops: not refused, and the checkpoints are adapter-only."""
    torch.manual_seed(0)
    model = randlora.inject(tiny_llama(tie_word_embeddings=True), ["q_proj"], RANK, modules_to_save=["embed_tokens"])
    make_trainer(model, tmp_path, "llama", "callback", max_steps=2).train()
    check_adapter_only(tmp_path / "checkpoint-2", model)


@pytest.mark.parametrize("how", ["class", "callback"])
def test_a_model_from_peft_is_refused_at_the_start_of_training_when_it_would_checkpoint(how, tmp_path):
    """Its bases are stored, not seeded, so no adapter checkpoint can hold it: refused before the first step (not at
    the first save), and trained as usual with save_strategy="no"."""
    peft_folder = tmp_path / "peft"
    randlora.to_peft(adapted("llama"), peft_folder)
    model = randlora.from_peft(base_model("llama"), peft_folder)
    with pytest.raises(ValueError, match=f"randlora.trainer_{'class' if how == 'class' else 'callback'}: cannot "
                                         "checkpoint this model: .*bases loaded from a PEFT file"):
        make_trainer(model, tmp_path / "out", "llama", how, max_steps=2).train()
    assert not os.path.exists(tmp_path / "out" / "checkpoint-1")
    make_trainer(model, tmp_path / "nosave", "llama", how, max_steps=2, save_strategy="no").train()


def test_a_second_refusal_at_the_same_step_replaces_the_earlier_refused_folder(tmp_path):
    """A rerun into the same output_dir that diverges at the same step again: the refusal is the ValueError (not an
    OSError from renaming onto the earlier refused-checkpoint-N), and no checkpoint-N is left for resume to pick."""
    (tmp_path / "refused-checkpoint-2").mkdir()
    (tmp_path / "refused-checkpoint-2" / "model.safetensors").write_bytes(b"an earlier run's")
    model = adapted("llama")
    trainer = make_trainer(model, tmp_path, "llama", "callback", max_steps=3)
    trainer.add_callback(Diverge(model, 2))
    with pytest.raises(ValueError, match=r"lam' has NaN or Inf values"):
        trainer.train()
    assert transformers.trainer_utils.get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-1")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "refused-checkpoint-2"]
    assert (tmp_path / "refused-checkpoint-2" / "model.safetensors").read_bytes() != b"an earlier run's"


def test_a_failed_adapter_write_keeps_the_trainers_whole_model_checkpoint(tmp_path, monkeypatch):
    """Callback mode: when writing the adapter-only file fails (disk full), the Trainer's own model file is still in
    the checkpoint folder: it is replaced only after the adapter file is complete, never removed first."""
    model = adapted("llama")
    trainer = make_trainer(model, tmp_path, "llama", "callback", max_steps=1)
    real = os.replace

    def replace(src, dst, *a, **kw):
        if str(dst).endswith("checkpoint-1/model.safetensors") and ".randlora-" in str(src):
            raise OSError(28, "No space left on device")
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    state = load_file(str(tmp_path / "checkpoint-1" / "model.safetensors"))
    whole = {k for k in model.state_dict() if ".base." in k or "embed_tokens" in k}
    assert whole and whole <= set(state), sorted(state)[:5]
    assert not [n for n in os.listdir(tmp_path / "checkpoint-1") if ".randlora-" in n]
