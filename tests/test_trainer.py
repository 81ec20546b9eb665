"""BPModifiedTrainer against plain Trainer, saving, the Hub format, resuming, and argument errors."""

import json
import logging
import math
import os
import re

import pytest
import torch
from helpers import card_links, lokr_resnet, lora_vit, max_param_diff, read_card, training_args
from safetensors.torch import load_file
from transformers import (
    HfArgumentParser,
    ResNetForImageClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTForImageClassification,
)

import hf_bpmod
from hf_bpmod import BPModifiedTrainer, BPModifiedTrainingArguments
from hf_bpmod.adapters.base import ArchitectureAdapter
from hf_bpmod.adapters.vit import find_layer_list
from hf_bpmod.checkpoint import read_bpmod_state
from hf_bpmod.model_card import method_description
from hf_bpmod.testing import SyntheticImages, tiny_resnet, tiny_vit, weighted_cross_entropy

# Against plain Trainer: compat.py, checkpoints and resume, PEFT wrapping and the Hub format.
pytestmark = pytest.mark.compat


def _args(tmp_path, cls=BPModifiedTrainingArguments, **kw):
    return training_args(tmp_path / "out", cls, **kw)


@pytest.mark.parametrize("factory", [lambda: tiny_vit(num_layers=4), lambda: tiny_resnet(depths=(2, 2))])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_full_horizon_equals_plain_trainer(tmp_path, factory, accumulation):
    data = SyntheticImages(96)
    kw = dict(max_steps=4, gradient_accumulation_steps=accumulation, max_grad_norm=1.0)
    reference = factory()
    Trainer(model=reference, args=_args(tmp_path, TrainingArguments, **kw), train_dataset=data).train()
    model = factory()
    trainer = BPModifiedTrainer(model=model, args=_args(tmp_path, local_horizon=99, **kw), train_dataset=data)
    assert len(trainer.aux_heads) == 0  # h >= T needs no auxiliary head
    trainer.train()
    assert max_param_diff(model, factory()) > 1e-3  # it did train
    assert max_param_diff(model, reference) <= 1e-6


def _cross_entropy_per_item(outputs, labels, num_items_in_batch=None):
    """Cross-entropy summed over the micro-batch and divided by the examples of the whole accumulated batch."""
    loss = torch.nn.functional.cross_entropy(outputs.logits, labels, reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else len(labels))


@pytest.mark.parametrize("factory", [lambda: tiny_vit(num_layers=4), lambda: tiny_resnet(depths=(2, 2))])
def test_full_horizon_equals_plain_trainer_under_sgd_with_uneven_accumulation(tmp_path, factory):
    """Plain SGD (no momentum, no clipping, no weight decay) moves the weights by exactly lr x the gradient, so a
    gradient of the wrong size shows (AdamW and clipping would hide a constant factor). 56 examples in micro-batches
    of 16 with 2 accumulation steps: every epoch has one step of 16 + 16 and one of 16 + 8 examples, each example
    weighted by 1 / ``num_items_in_batch`` (32, then 24), not each micro-batch by 1/2.

    The reference is plain ``Trainer`` with a ``compute_loss_func`` that does exactly that. (Plain ``Trainer`` with
    the model's own loss does it too for the ViT, whose forward passes ``num_items_in_batch`` to its loss; the
    ResNet's forward takes ``**kwargs`` but ignores it, so there plain ``Trainer`` adds the micro-batch means without
    dividing by the accumulation steps, an accumulated loss twice the size.) Where the installed Trainer does not
    pass ``num_items_in_batch`` to the model (transformers < 5: its forward takes no ``**kwargs``), training follows
    the Trainer's rule, each micro-batch mean divided by the accumulation steps, and the reference is plain
    ``Trainer`` with the model's own loss."""
    data = SyntheticImages(56)
    kw = dict(
        num_train_epochs=2, gradient_accumulation_steps=2, optim="sgd", learning_rate=0.1, max_grad_norm=0.0,
        weight_decay=0.0, lr_scheduler_type="constant",
    )  # fmt: skip
    reference = factory()
    ref_args = _args(tmp_path / "ref", TrainingArguments, **kw)
    per_item = Trainer(model=reference, args=ref_args, train_dataset=data).model_accepts_loss_kwargs
    plain = Trainer(
        model=reference, args=ref_args, train_dataset=data,
        compute_loss_func=_cross_entropy_per_item if per_item else None,
    )  # fmt: skip
    plain.train()
    model = factory()
    trainer = BPModifiedTrainer(model=model, args=_args(tmp_path / "ours", local_horizon=99, **kw), train_dataset=data)
    trainer.train()
    assert trainer.state.global_step == plain.state.global_step == 4
    assert all(group.get("momentum", 0) == 0 for group in trainer.optimizer.param_groups)
    assert max_param_diff(model, factory()) > 1e-2  # it did train
    state, ref_state = model.state_dict(), reference.state_dict()
    assert set(state) == set(ref_state)
    for key in state:  # weights and buffers (BatchNorm running statistics) alike
        torch.testing.assert_close(state[key], ref_state[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    losses = [[r["loss"] for r in t.state.log_history if "loss" in r] for t in (plain, trainer)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    if isinstance(model, ViTForImageClassification):  # the model's own loss in plain Trainer: the same run
        own = factory()
        Trainer(model=own, args=_args(tmp_path / "own", TrainingArguments, **kw), train_dataset=data).train()
        assert max_param_diff(own, model) <= 1e-6


class _MultiLabel(SyntheticImages):
    """Two classes per image, as multi-hot float labels."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(i)
        labels = torch.zeros(5)
        labels[[int(item["labels"]), (int(item["labels"]) + 1) % 5]] = 1.0
        return {"pixel_values": item["pixel_values"], "labels": labels}


class _Regression(SyntheticImages):
    """One float target per image."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(i)
        return {"pixel_values": item["pixel_values"], "labels": 10 * item["pixel_values"].mean().reshape(1)}


@pytest.mark.parametrize(
    "problem, factory, data",
    [
        ("multi_label_classification", lambda: tiny_vit(num_layers=4), _MultiLabel),
        ("multi_label_classification", lambda: tiny_resnet(depths=(2, 2)), _MultiLabel),
        ("regression", lambda: tiny_vit(num_layers=4, num_labels=1), _Regression),
    ],
)
def test_the_models_problem_type_is_the_loss(tmp_path, problem, factory, data):
    """Every head's loss is the model's own for its ``problem_type`` (BCE with logits for multi-label, MSE for
    regression): the full horizon equals plain ``Trainer``, and FF with the offset trains on the same loss."""
    data = data(96)

    def model():
        m = factory()
        m.config.problem_type = problem
        return m

    reference, full = model(), model()
    Trainer(model=reference, args=_args(tmp_path / "ref", TrainingArguments, max_steps=4), train_dataset=data).train()
    BPModifiedTrainer(
        model=full, args=_args(tmp_path / "full", local_horizon=99, max_steps=4), train_dataset=data
    ).train()
    assert max_param_diff(full, factory()) > 1e-4
    assert max_param_diff(full, reference) <= 1e-6
    args = _args(tmp_path / "ff", max_steps=4, offset_batch_size=32, offset_period="2", bp_modified=True)
    trainer = BPModifiedTrainer(model=model(), args=args, train_dataset=data)
    trainer.train()
    assert len(trainer.offset.state.blocks) == trainer.block_chain.num_blocks  # the offset pass ran on that loss
    assert math.isfinite(trainer.evaluate(data)["eval_loss"])


@pytest.mark.parametrize("accumulation", [1, 2])
def test_compute_loss_func_full_horizon_equals_plain_trainer(tmp_path, accumulation):
    """A ``compute_loss_func`` trains as in the Trainer, normalised by ``num_items_in_batch`` (no extra division by
    the accumulation steps)."""
    data = SyntheticImages(96)
    kw = dict(max_steps=3, gradient_accumulation_steps=accumulation, per_device_train_batch_size=16 // accumulation)
    reference = tiny_vit(num_layers=4)
    plain = Trainer(model=reference, args=_args(tmp_path, TrainingArguments, **kw), train_dataset=data,
                    compute_loss_func=weighted_cross_entropy)  # fmt: skip
    plain.train()
    model = tiny_vit(num_layers=4)
    trainer = BPModifiedTrainer(model=model, args=_args(tmp_path, local_horizon=99, **kw), train_dataset=data,
                                compute_loss_func=weighted_cross_entropy)  # fmt: skip
    trainer.train()
    assert max_param_diff(model, tiny_vit(num_layers=4)) > 1e-3
    assert max_param_diff(model, reference) <= 1e-6
    losses = [[r["loss"] for r in t.state.log_history if "loss" in r] for t in (plain, trainer)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_compute_loss_func_is_every_blocks_loss(tmp_path):
    """Local training with ``compute_loss_func`` = 2 x the model's loss under plain SGD equals the model's loss at twice
    the learning rate: the function reaches every block's head, the auxiliary heads included."""
    data = SyntheticImages(64)
    kw = dict(max_steps=3, local_horizon=1, bp_modified=False, optim="sgd", max_grad_norm=0.0, weight_decay=0.0)

    def doubled(outputs, labels, num_items_in_batch=None):
        return 2 * torch.nn.functional.cross_entropy(outputs.logits, labels)

    models = [tiny_vit(num_layers=4), tiny_vit(num_layers=4)]
    trainers = [
        BPModifiedTrainer(model=models[0], args=_args(tmp_path / "a", learning_rate=1e-2, **kw), train_dataset=data,
                          compute_loss_func=doubled),
        BPModifiedTrainer(model=models[1], args=_args(tmp_path / "b", learning_rate=2e-2, **kw), train_dataset=data),
    ]  # fmt: skip
    for trainer in trainers:
        trainer.train()
    assert max_param_diff(models[0], tiny_vit(num_layers=4)) > 1e-3
    assert max_param_diff(models[0], models[1]) <= 1e-6
    heads = [list(t.aux_heads.parameters()) for t in trainers]
    assert max((a - b).abs().max().item() for a, b in zip(*heads, strict=True)) <= 1e-6


def test_a_compute_loss_override_is_flagged(tmp_path):
    class Weighted(BPModifiedTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    with pytest.warns(UserWarning, match="overrides `compute_loss`.*pass `compute_loss_func"):
        Weighted(model=tiny_vit(), args=_args(tmp_path, bp_modified=False))


def test_local_training_trains_blocks_and_aux_heads(tmp_path):
    data = SyntheticImages(64)
    model = tiny_vit(num_layers=4)
    trainer = BPModifiedTrainer(
        model=model, args=_args(tmp_path, max_steps=3, local_horizon=1, bp_modified=False), train_dataset=data
    )
    assert sorted(trainer.aux_heads.keys(), key=int) == ["1", "2", "3"]
    before = [p.detach().clone() for p in trainer.aux_heads.parameters()]
    trainer.train()
    optimizer_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in optimizer_params for p in trainer.aux_heads.parameters())
    assert all(not torch.equal(b, p) for b, p in zip(before, trainer.aux_heads.parameters()))
    assert max_param_diff(model, tiny_vit(num_layers=4)) > 1e-4


def test_save_model_is_plain_transformers_model(tmp_path):
    data = SyntheticImages(64)
    model = tiny_resnet(depths=(2, 2))
    trainer = BPModifiedTrainer(
        model=model, args=_args(tmp_path, max_steps=2, offset_batch_size=32, offset_period="1"), train_dataset=data
    )
    trainer.train()
    trainer.save_model()
    trainer.create_model_card()
    out = tmp_path / "out"
    reloaded, info = ResNetForImageClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(pixel_values=x).logits, model(pixel_values=x).logits)
    card = (out / "README.md").read_text()
    assert "hf_bpmod" in card and "local_horizon: 1" in card and "offset_scaling" in card
    # built from a config: no base model to link (transformers would write "a fine-tuned version of []()")
    assert "This model was trained from scratch on " in card and "[](https://huggingface.co/)" not in card
    n = sum(p.numel() for p in model.parameters())
    assert f"- trained_parameters: {n:,} of {n:,} (100.00%)\n" in card and "peft" not in card
    assert card_links(read_card(out / "README.md")[1]) == []  # nothing of this run is on the Hub or an index


def test_the_model_card_says_which_adapters_and_how_many_parameters_were_trained_and_links_nothing_missing(tmp_path):
    model = lora_vit()
    trainer = BPModifiedTrainer(
        model=model, args=_args(tmp_path, max_steps=1, bp_modified=False), train_dataset=SyntheticImages(32)
    )
    trainer.train()
    trainer.save_model()  # peft writes its own card first, which create_model_card then updates
    trainer.create_model_card(tags="mine")
    metadata, text = read_card(tmp_path / "out" / "README.md")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    targets = ", ".join(sorted(model.peft_config["default"].target_modules))
    heads = sum(p.numel() for p in trainer.aux_heads.parameters())
    assert 0 < trained < total and heads > 0
    assert (
        "- peft: LoRA\n- peft_r: 2\n- peft_alpha: 4\n"
        f"- peft_target_modules: {targets}\n- peft_modules_to_save: classifier\n"
        f"- trained_parameters: {trained:,} of {total:,} ({trained / total:.2%})\n"
        f"- auxiliary_head_parameters: {heads:,} (trained with the model, not saved with it)\n"
    ) in text
    assert f"Trained with hf_bpmod {hf_bpmod.__version__}: each block learns" in text and "pypi" not in text
    assert card_links(text) == []  # the model was built from a config: nothing of it is on the Hub or an index
    assert metadata["library_name"] == "peft"
    # the tags asked for survive peft's update of the card, which rewrites the tags
    assert {"mine", "hf_bpmod", "local-learning", "generated_from_trainer"} <= set(metadata["tags"])


class _FakeHub:
    """Stands in for ``huggingface_hub.HfApi`` in ``transformers.trainer``: records what each upload would send (a copy
    of the folder, with the patterns the Trainer ignores left out) and finishes at once."""

    def __init__(self, root):
        self.root, self.uploads, self.repos = root, [], []

    def create_repo(self, repo_id, **kw):
        self.repos.append(repo_id)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, ignore_patterns=None, **kw):
        import concurrent.futures
        import fnmatch
        import shutil

        copy = self.root / f"upload-{len(self.uploads)}"
        ignored = ignore_patterns or []
        shutil.copytree(folder_path, copy, ignore=lambda d, names: [n for n in names if any(
            fnmatch.fnmatch(n, p) for p in ignored)])  # fmt: skip
        self.uploads.append((path_in_repo, copy))
        done = concurrent.futures.Future()
        done.set_result(None)
        return done


def test_push_to_hub_sends_the_plain_model_and_resumable_checkpoints(tmp_path, monkeypatch):
    """Offline, with the Hub client replaced: what ``push_to_hub`` uploads is the model alone (it reloads with
    ``from_pretrained``, no missing or unexpected keys, same logits) with its card, and ``hub_strategy="checkpoint"``
    also sends the last checkpoint with the auxiliary heads and the offset state, so a run can resume from the Hub."""
    import transformers.trainer

    hub = _FakeHub(tmp_path)
    if hasattr(transformers.trainer, "hf_api"):
        monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    else:  # transformers < 5 calls huggingface_hub's functions directly
        monkeypatch.setattr(transformers.trainer, "create_repo", hub.create_repo)
        monkeypatch.setattr(transformers.trainer, "upload_folder", hub.upload_folder)
    model = tiny_vit(num_layers=4)
    args = _args(
        tmp_path, max_steps=4, save_strategy="steps", save_steps=2, offset_batch_size=32, offset_period="2",
        bp_modified=True, push_to_hub=True, hub_model_id="someone/tiny-bpmod", hub_strategy="checkpoint",
    )  # fmt: skip
    trainer = BPModifiedTrainer(model=model, args=args, train_dataset=SyntheticImages(64))
    trainer.train()
    trainer.push_to_hub()
    assert hub.repos == ["someone/tiny-bpmod"]
    checkpoints = [folder for where, folder in hub.uploads if where == "last-checkpoint"]
    assert len(checkpoints) == 2  # at steps 2 and 4
    assert (checkpoints[-1] / "optimizer.pt").is_file()
    assert (checkpoints[-1] / "bpmod_state.json").is_file() and (checkpoints[-1] / "bpmod_state.safetensors").is_file()
    final = hub.uploads[-1][1]
    assert hub.uploads[-1][0] is None and not any(n.startswith("checkpoint-") for n in os.listdir(final))
    reloaded, info = ViTForImageClassification.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(pixel_values=x).logits, model.eval()(pixel_values=x).logits)
    card = (final / "README.md").read_text()
    assert "## Training method (hf_bpmod)" in card and "- bp_modified: True" in card


def test_peft_model_saves_as_adapter(tmp_path):
    data = SyntheticImages(64)
    model = lora_vit()
    trainer = BPModifiedTrainer(model=model, args=_args(tmp_path, max_steps=2, bp_modified=False), train_dataset=data)
    trainer.train()
    trainer.save_model()
    files = os.listdir(tmp_path / "out")
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    from peft import PeftModel
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "out" / "adapter_model.safetensors").keys()
    assert keys and all("lora" in k or "classifier" in k for k in keys)
    base = tiny_vit(num_layers=4)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "out").eval()
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x).logits, model(pixel_values=x).logits)


def test_lokr_resnet_trains(tmp_path):
    model = lokr_resnet()
    trainer = BPModifiedTrainer(
        model=model,
        args=_args(tmp_path, max_steps=2, offset_batch_size=16, offset_period="1"),
        train_dataset=SyntheticImages(64),
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert any("lokr" in n for n in changed) and any("classifier" in n for n in changed)


@pytest.mark.parametrize("bp_modified", [False, True])
def test_resume_from_checkpoint_equals_uninterrupted(tmp_path, bp_modified):
    data = SyntheticImages(96)
    kw = dict(max_steps=6, local_horizon=1, bp_modified=bp_modified, offset_batch_size=32, offset_period="4")
    full = tiny_vit(num_layers=4)
    BPModifiedTrainer(model=full, args=_args(tmp_path / "a", **kw), train_dataset=data).train()

    first = tiny_vit(num_layers=4)
    args = _args(tmp_path / "b", save_strategy="steps", save_steps=3, **kw)
    trainer = BPModifiedTrainer(model=first, args=args, train_dataset=data)
    trainer.train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-3"
    saved, _ = read_bpmod_state(str(checkpoint))
    assert saved["aux_heads"] and not (checkpoint / "bpmod_state.pt").exists()
    if bp_modified:  # refreshed at step 0, next at step 4: the checkpoint is mid-period
        assert saved["offset"]["period_index"] == 1 and saved["offset"]["next_refresh_step"] == 4
    resumed = tiny_vit(num_layers=4, seed=123)  # different init: everything must come from the checkpoint
    trainer = BPModifiedTrainer(model=resumed, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert max_param_diff(resumed, full) <= 1e-6
    if bp_modified:
        out = tmp_path / "b" / "out"
        log = [json.loads(line) for line in open(out / "bpmod_offsets.jsonl")]
        # the interrupted run's record of step 4 (after its checkpoint) is replaced by the resumed run's
        assert [r["step"] for r in log] == [0, 4]
        assert log[0]["run_id"] != log[1]["run_id"] and log[1]["resumed_from_step"] == 3
        kept = [json.loads(line) for line in open(out / "bpmod_offsets.jsonl.1")]
        assert [r["step"] for r in kept] == [0, 4]  # the file as it was is kept
        assert kept[0]["run_id"] == kept[1]["run_id"] == log[0]["run_id"]
        # a fresh run in the same output_dir starts a fresh log; the earlier one is kept
        again = BPModifiedTrainer(model=tiny_vit(num_layers=4), args=_args(tmp_path / "a", **kw), train_dataset=data)
        again.train()
        log = [json.loads(line) for line in open(tmp_path / "a" / "out" / "bpmod_offsets.jsonl")]
        assert [r["step"] for r in log] == [0, 4]
        assert (tmp_path / "a" / "out" / "bpmod_offsets.jsonl.1").is_file()


def _assert_same(a, b, where="state"):
    """Nested dicts / lists / tensors / numbers equal (tensors to float32 rounding)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{where}: {m}")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), where
    else:
        assert a == b, where


def test_resnet_resume_restores_every_weight_buffer_head_and_offset(tmp_path):
    """A ResNet (offset on by default, h = 2, SGD with momentum) killed after its checkpoint at step 3 and resumed
    from it into a model of another initialisation ends exactly as the uninterrupted run: the whole ``state_dict``
    (BatchNorm running statistics and batch counters included, which training in train mode never reads back, so
    parameters alone would not show them lost), the auxiliary heads, and the offset refreshed at step 4 after the
    resume."""
    data = SyntheticImages(96)
    kw = dict(
        max_steps=6, local_horizon=2, offset_batch_size=32, offset_period="4", optim="sgd", optim_args="momentum=0.9",
        learning_rate=0.05,
    )  # fmt: skip
    full = tiny_resnet(depths=(2, 2))
    uninterrupted = BPModifiedTrainer(model=full, args=_args(tmp_path / "a", **kw), train_dataset=data)
    uninterrupted.train()
    assert uninterrupted.uses_offset and len(uninterrupted.aux_heads) > 0

    args = _args(tmp_path / "b", save_strategy="steps", save_steps=3, **kw)
    BPModifiedTrainer(model=tiny_resnet(depths=(2, 2)), args=args, train_dataset=data).train()
    resumed = tiny_resnet(depths=(2, 2), seed=123)
    with torch.no_grad():  # running statistics unlike the checkpoint's, as a model that has seen other data
        for name, buffer in resumed.named_buffers():
            if "running_mean" in name:
                buffer.add_(0.5)
    trainer = BPModifiedTrainer(model=resumed, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-3"))

    state, expected = resumed.state_dict(), full.state_dict()
    assert any("running_var" in k for k in state) and any("num_batches_tracked" in k for k in state)
    assert any(not torch.equal(v, tiny_resnet(depths=(2, 2)).state_dict()[k]) for k, v in state.items()
               if "running_mean" in k)  # fmt: skip
    _assert_same(state, expected)
    _assert_same(trainer.aux_heads.state_dict(), uninterrupted.aux_heads.state_dict(), "aux_heads")
    assert trainer.uses_offset
    assert trainer.offset.state.period_index == uninterrupted.offset.state.period_index == 2
    assert trainer.offset.state.next_refresh_step == uninterrupted.offset.state.next_refresh_step
    assert len(trainer.offset.state.blocks) == trainer.block_chain.num_blocks
    for got, want in zip(trainer.offset.state.blocks, uninterrupted.offset.state.blocks, strict=True):
        assert (got.scale, got.weight) == pytest.approx((want.scale, want.weight), rel=1e-5, abs=1e-7)
        _assert_same(got.unscaled_delta(), want.unscaled_delta(), "offset")


@pytest.mark.parametrize(
    "changed, message",
    [
        (dict(local_horizon=2), r"trained with `local_horizon=1`, this run has `local_horizon=2`"),
        (dict(block_granularity="stage"), r"trained with `block_granularity='layer'`, this run has .*'stage'"),
    ],
)
def test_resuming_under_another_block_split_fails_clearly(tmp_path, changed, message):
    """Another horizon or block split has other auxiliary heads: the error says which setting to restore, before
    the optimizer's state (whose parameter groups would not match) is touched."""
    data = SyntheticImages(96)
    kw = dict(max_steps=2, save_strategy="steps", save_steps=2, offset_batch_size=32, offset_period="2")
    BPModifiedTrainer(model=tiny_resnet(depths=(2, 2)), args=_args(tmp_path, **kw), train_dataset=data).train()
    args = _args(tmp_path / "again", **{**kw, "max_steps": 4, **changed})
    trainer = BPModifiedTrainer(model=tiny_resnet(depths=(2, 2)), args=args, train_dataset=data)
    with pytest.raises(ValueError, match=message):
        trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))


@pytest.mark.parametrize(
    "writer, message",
    [
        ("model_only", r"holds no training state .* as `save_only_model=True` writes"),
        ("plain_trainer", r"bpmod_state.json: the file is missing .* not written by BPModifiedTrainer"),
    ],
)
def test_resuming_from_a_checkpoint_without_our_state_fails_clearly(tmp_path, writer, message):
    data = SyntheticImages(96)
    kw = dict(max_steps=2, save_strategy="steps", save_steps=2)
    if writer == "model_only":
        args = _args(tmp_path, save_only_model=True, offset_batch_size=32, **kw)
        BPModifiedTrainer(model=tiny_vit(num_layers=4), args=args, train_dataset=data).train()
    else:
        Trainer(
            model=tiny_vit(num_layers=4), args=_args(tmp_path, TrainingArguments, **kw), train_dataset=data
        ).train()
    args = _args(tmp_path / "again", max_steps=4, offset_batch_size=32)
    trainer = BPModifiedTrainer(model=tiny_vit(num_layers=4), args=args, train_dataset=data)
    with pytest.raises(FileNotFoundError, match=message):
        trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))


class _ModelAtTrainBegin(TrainerCallback):
    """The model's state once a checkpoint is loaded, before the first step."""

    def __init__(self, trainer) -> None:
        self.trainer, self.state = trainer, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.state = {k: v.clone() for k, v in self.trainer.model.state_dict().items()}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_resume_loads_the_saved_weights_whatever_dtype_the_config_names(tmp_path, dtype):
    """A checkpoint's `config.json` edited to name another dtype (`torch_dtype` before transformers 5, `dtype`
    since): the resumed model gets the saved weights bit for bit, in its own dtype, as the plain Trainer loads them."""
    data = SyntheticImages(96)
    kw = dict(max_steps=3, save_strategy="steps", save_steps=3)
    args = _args(tmp_path, offset_batch_size=32, **kw)
    BPModifiedTrainer(model=tiny_resnet(depths=(2, 2)), args=args, train_dataset=data).train()
    checkpoint = tmp_path / "out" / "checkpoint-3"
    config = json.loads((checkpoint / "config.json").read_text())
    edited = [key for key in ("torch_dtype", "dtype") if key in config]
    assert edited and all(config[key] == "float32" for key in edited)
    (checkpoint / "config.json").write_text(json.dumps({**config, **dict.fromkeys(edited, dtype)}))
    saved = load_file(checkpoint / "model.safetensors")

    plain = Trainer(model=tiny_resnet(depths=(2, 2), seed=123), args=_args(tmp_path / "plain", TrainingArguments))
    plain._load_from_checkpoint(str(checkpoint))  # the Trainer's own loading of the model's weights
    model = tiny_resnet(depths=(2, 2), seed=123)
    trainer = BPModifiedTrainer(
        model=model, args=_args(tmp_path / "again", offset_batch_size=32, **kw), train_dataset=data
    )
    probe = _ModelAtTrainBegin(trainer)
    trainer.add_callback(probe)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert next(model.parameters()).dtype == torch.float32
    loaded = {"Trainer": plain.model.state_dict(), "BPModifiedTrainer": probe.state}
    for name, state in loaded.items():
        assert state.keys() == saved.keys(), name
        different = [k for k, v in saved.items() if v.dtype != state[k].dtype or not torch.equal(v, state[k])]
        assert not different, f"{name}: {different[:3]}"


def _without(*names):
    return lambda checkpoint: [os.remove(checkpoint / name) for name in names]


def _truncated(name):
    def tear(checkpoint):
        path = checkpoint / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return tear


#: What a kill during the save of a checkpoint leaves (the Trainer writes the model, the optimizer, our state, the
#: RNG state and, last, trainer_state.json), and what the warning says of it.
TORN = {
    "no trainer_state.json": (_without("trainer_state.json"), r"lacks trainer_state.json"),
    "half a trainer_state.json": (
        _truncated("trainer_state.json"),
        r"lacks a trainer_state.json that is readable JSON with a `global_step`",
    ),
    "no bpmod_state.json": (
        _without("bpmod_state.json", "rng_state.pth", "trainer_state.json"),
        r"lacks bpmod_state.json, trainer_state.json",
    ),
    "no optimizer state": (
        _without(
            "optimizer.pt",
            "scheduler.pt",
            "bpmod_state.safetensors",
            "bpmod_state.json",
            "rng_state.pth",
            "trainer_state.json",
        ),
        r"lacks optimizer.pt, bpmod_state.json, trainer_state.json",
    ),  # fmt: skip
    "only the config": (
        lambda c: [os.remove(p) for p in c.iterdir() if p.name != "config.json"],
        r"lacks the model's weights, optimizer.pt, bpmod_state.json, trainer_state.json",
    ),
}


@pytest.mark.parametrize("torn", list(TORN))
def test_resume_from_the_last_checkpoint_skips_one_a_kill_tore(tmp_path, torn, caplog):
    """`resume_from_checkpoint=True` with the save of checkpoint-6 cut short: the run resumes from checkpoint-3, with
    a warning naming checkpoint-6 and what it lacks, and ends as the uninterrupted run; checkpoint-6 is left as it
    was."""
    data = SyntheticImages(96)
    kw = dict(max_steps=6, offset_batch_size=32, offset_period="4", bp_modified=True)
    full = tiny_vit(num_layers=4)
    BPModifiedTrainer(
        model=full, args=_args(tmp_path, save_strategy="steps", save_steps=3, **kw), train_dataset=data
    ).train()
    tear, lacks = TORN[torn]
    newest = tmp_path / "out" / "checkpoint-6"
    tear(newest)
    left = {p.name: p.read_bytes() for p in newest.iterdir()}

    resumed = tiny_vit(num_layers=4, seed=123)
    trainer = BPModifiedTrainer(model=resumed, args=_args(tmp_path, **kw), train_dataset=data)
    with caplog.at_level(logging.WARNING, logger="hf_bpmod"):
        trainer.train(resume_from_checkpoint=True)
    assert max_param_diff(resumed, full) <= 1e-6
    assert re.search(rf"{re.escape(str(newest))} is not a complete checkpoint \(it {lacks}", caplog.text), caplog.text
    assert f"resuming from {tmp_path / 'out' / 'checkpoint-3'}, the newest complete one" in caplog.text
    assert {p.name: p.read_bytes() for p in newest.iterdir()} == left


def test_resume_from_the_last_checkpoint_when_none_is_complete_names_each_and_what_it_lacks(tmp_path):
    data = SyntheticImages(96)
    kw = dict(max_steps=4, offset_batch_size=32, save_strategy="steps", save_steps=2)
    BPModifiedTrainer(model=tiny_vit(num_layers=4), args=_args(tmp_path, **kw), train_dataset=data).train()
    os.remove(tmp_path / "out" / "checkpoint-2" / "trainer_state.json")
    os.remove(tmp_path / "out" / "checkpoint-4" / "bpmod_state.json")
    trainer = BPModifiedTrainer(model=tiny_vit(num_layers=4), args=_args(tmp_path, **kw), train_dataset=data)
    with pytest.raises(FileNotFoundError) as error:
        trainer.train(resume_from_checkpoint=True)
    message = str(error.value)
    assert message.startswith(f"resume_from_checkpoint=True: {tmp_path / 'out'} holds no complete checkpoint")
    assert f"{tmp_path / 'out' / 'checkpoint-4'} lacks bpmod_state.json" in message
    assert f"{tmp_path / 'out' / 'checkpoint-2'} lacks trainer_state.json" in message
    assert trainer.state.global_step == 0 and not trainer.optimizer
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_gradient_checkpointing_recomputes_and_changes_nothing(tmp_path):
    """``gradient_checkpointing=True`` (the Trainer enables it on the model) recomputes each layer in its backward,
    in the training steps and in the offset pass alike, and gives the same weights as without it. Before transformers
    4.53 (layers that do not checkpoint themselves) it is refused, since it would do nothing."""
    data = SyntheticImages(96)
    kw = dict(max_steps=4, bp_modified=True, offset_batch_size=32, offset_micro_batch_size=8, offset_period="2")
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        GradientCheckpointingLayer = ()  # noqa: N806
    probe = tiny_vit(num_layers=4)
    if not isinstance(find_layer_list(probe.vit, 4)[1], GradientCheckpointingLayer):
        with pytest.raises(ValueError, match="would have no effect.*transformers >= 4.53"):
            BPModifiedTrainer(model=probe, args=_args(tmp_path, gradient_checkpointing=True, **kw), train_dataset=data)
        return
    models, forwards = {}, {}
    for checkpointing in (False, True):
        model = tiny_vit(num_layers=4)
        calls = []
        layer = find_layer_list(model.vit, model.config.num_hidden_layers)[1]
        layer.attention.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        args = _args(tmp_path / str(checkpointing), gradient_checkpointing=checkpointing, **kw)
        BPModifiedTrainer(model=model, args=args, train_dataset=data).train()
        models[checkpointing], forwards[checkpointing] = model, len(calls)
    # 4 steps + 2 refreshes of 4 micro-batches; recomputed: once per training backward, twice per micro-batch
    # (its local and its true gradient)
    assert (forwards[False], forwards[True]) == (12, 32)
    assert max_param_diff(models[True], tiny_vit(num_layers=4)) > 1e-3
    assert max_param_diff(models[True], models[False]) <= 1e-6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(local_horizon=0), r"`local_horizon` \(0\) must be an integer >= 1"),
        (dict(block_granularity="block"), r"`block_granularity` \('block'\) must be 'layer'"),
        (dict(offset_batch_size=100, offset_micro_batch_size=16), r"`offset_micro_batch_size` \(16\) must divide"),
        (dict(offset_batch_size=8, offset_micro_batch_size=8), "at least two micro-batches"),
        (dict(offset_period="often"), r"`offset_period` \('often'\) is not understood"),
        (dict(offset_period="0"), "must be positive"),
        (dict(offset_period="1.5"), "whole number"),
        (dict(offset_scaling="best"), r"`offset_scaling` \('best'\) must be one of"),
        (dict(offset_fixed_lambda=2.0), r"`offset_fixed_lambda` \(2.0\) must lie in \[0, 1\]"),
        (dict(torch_compile=True), "torch_compile"),
        (dict(torch_compile_backend="inductor"), "torch_compile"),
        (dict(fsdp="full_shard"), "not supported by BPModifiedTrainer"),
    ],
)
def test_bad_arguments_are_rejected(tmp_path, kwargs, message):
    environment = dict(os.environ)
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **kwargs)
    # rejected arguments leave nothing behind (TrainingArguments exports fsdp and compile settings to accelerate
    # through the environment, which would change every later Trainer of this process)
    assert dict(os.environ) == environment


def test_gradient_checkpointing_on_a_model_without_it_is_refused_before_training(tmp_path):
    """transformers has no gradient checkpointing for ResNets: refused when the trainer is built, naming the
    argument, not when training starts."""
    model = tiny_resnet()
    assert not model.supports_gradient_checkpointing
    with pytest.raises(ValueError, match="`gradient_checkpointing=True`.*ResNetForImageClassification"):
        BPModifiedTrainer(
            model=model, args=_args(tmp_path, gradient_checkpointing=True), train_dataset=SyntheticImages(32)
        )


def test_gradient_checkpointing_is_non_reentrant(tmp_path):
    """Local gradients use ``torch.autograd.grad``, which reentrant checkpointing (transformers 4.x's default) cannot
    differentiate: unset, ``use_reentrant`` becomes False; set to True, the arguments are rejected."""
    args = _args(tmp_path, gradient_checkpointing=True)
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    kept = _args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"preserve_rng_state": False})
    assert kept.gradient_checkpointing_kwargs == {"preserve_rng_state": False, "use_reentrant": False}
    with pytest.raises(ValueError, match="use_reentrant.*not supported by BPModifiedTrainer"):
        _args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})


@pytest.mark.parametrize(("given", "read"), [("no", False), ("off", False), ("false", False), ("yes", True)])
def test_use_reentrant_from_a_config_file_is_read_as_the_command_line_reads_it(tmp_path, given, read):
    """A config file's ``gradient_checkpointing_kwargs: {use_reentrant: no}`` holds the string "no", which torch would
    take as true: it is read as False, and "yes" is refused as True is."""
    kwargs = {"use_reentrant": given}
    if read:
        with pytest.raises(ValueError, match="use_reentrant.*not supported by BPModifiedTrainer"):
            _args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs=kwargs)
        return
    args = _args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs=kwargs)
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert getattr(args, "activation_checkpointing_kwargs", args.gradient_checkpointing_kwargs) == {
        "use_reentrant": False
    }
    with pytest.raises(ValueError, match="`gradient_checkpointing_kwargs.use_reentrant` \\('maybe'\\)"):
        _args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": "maybe"})


def test_sgd_takes_its_optim_args(tmp_path):
    """``optim="sgd"`` with ``optim_args`` (the paper recipes: momentum 0.9) gets them, whichever transformers is
    installed (4.x dropped them)."""
    args = _args(tmp_path, optim="sgd", optim_args="momentum=0.9, nesterov=True", learning_rate=0.05)
    optimizer_cls, kwargs = BPModifiedTrainer.get_optimizer_cls_and_kwargs(args, tiny_vit())
    assert optimizer_cls is torch.optim.SGD
    assert kwargs["lr"] == 0.05 and kwargs["momentum"] == 0.9 and kwargs["nesterov"] is True
    trainer = BPModifiedTrainer(model=tiny_vit(), args=args, train_dataset=SyntheticImages(320))
    assert all(group["momentum"] == 0.9 for group in trainer.create_optimizer().param_groups)


def test_trainer_level_errors(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    bert = BertForSequenceClassification(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    )
    with pytest.raises(ValueError, match="Supported model types: .*resnet.*vit"):
        BPModifiedTrainer(model=bert, args=_args(tmp_path))
    with pytest.raises(TypeError, match="must be a BPModifiedTrainingArguments"):
        BPModifiedTrainer(model=tiny_vit(), args=_args(tmp_path, TrainingArguments))
    with pytest.raises(ValueError, match=r"`offset_batch_size` \(320\) is larger than the training set \(64"):
        BPModifiedTrainer(
            model=tiny_vit(),
            args=_args(tmp_path, bp_modified=True, offset_batch_size=320),
            train_dataset=SyntheticImages(64),
        )
    # by default B' follows the data: a ResNet (offset on) on 64 images is built
    trainer = BPModifiedTrainer(model=tiny_resnet(), args=_args(tmp_path), train_dataset=SyntheticImages(64))
    assert trainer.uses_offset and trainer.offset.settings.sample_size == 16


def test_a_streamed_training_set_is_rejected_for_the_offset_only(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            data = SyntheticImages(64)
            return (data[i] for i in range(len(data)))

    with pytest.raises(ValueError, match="needs a map-style dataset .* got Stream.*bp_modified=False"):
        BPModifiedTrainer(
            model=tiny_vit(),
            args=_args(tmp_path, offset_batch_size=32, max_steps=2, bp_modified=True),
            train_dataset=Stream(),
        )
    model = tiny_vit(num_layers=4)
    BPModifiedTrainer(
        model=model, args=_args(tmp_path, bp_modified=False, max_steps=2), train_dataset=Stream()
    ).train()
    assert max_param_diff(model, tiny_vit(num_layers=4)) > 1e-4  # without the offset it trains


def test_flags_parse_from_the_command_line(tmp_path):
    (args,) = HfArgumentParser(BPModifiedTrainingArguments).parse_args_into_dataclasses(
        [
            "--output_dir", str(tmp_path), "--local_horizon", "2", "--block_granularity", "stage",
            "--bp_modified", "false", "--offset_period", "0.5epoch", "--report_to", "none",
        ]
    )  # fmt: skip
    assert args.local_horizon == 2 and args.block_granularity == "stage" and args.bp_modified is False
    for flags, expected in (([], None), (["--bp_modified", "true"], True)):
        (parsed,) = HfArgumentParser(BPModifiedTrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), *flags]
        )
        assert parsed.bp_modified is expected  # unset: the architecture's default
    assert args.offset_period == "0.5epoch"
    with pytest.raises(ValueError, match="local_horizon"):
        HfArgumentParser(BPModifiedTrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--local_horizon", "-1"]
        )


def test_bp_modified_defaults_to_the_architectures_measured_choice(tmp_path, caplog):
    """``bp_modified=None``, the default, is resolved per architecture: no offset on a
    ViT, with a warning that says how to turn it on, the offset on a ResNet. An explicit value wins, and the
    arguments are left as given, so one ``args`` serves both models."""
    data = SyntheticImages(64)  # a fixed scaling (a = 1, lambda = 0.5) applies the offset from the first refresh
    args = _args(tmp_path / "auto", max_steps=2, offset_batch_size=16, offset_period="1", offset_scaling="fixed")
    assert args.bp_modified is None

    def train(factory, args):
        model = factory()
        trainer = BPModifiedTrainer(model=model, args=args, train_dataset=data)
        trainer.train()
        return trainer, model

    vit, resnet = (lambda: tiny_vit(num_layers=4)), (lambda: tiny_resnet(depths=(2, 2)))
    with caplog.at_level(logging.WARNING, logger="hf_bpmod.trainer"):
        trainer, auto = train(vit, args)
    assert not trainer.uses_offset and "Pass `bp_modified=True` for the paper's method" in caplog.text
    assert (
        method_description(trainer.args, trainer.block_chain.num_blocks, trainer.uses_offset)["bp_modified"] is False
    )  # what the model card records
    _, plain = train(vit, _args(tmp_path / "off", max_steps=2, bp_modified=False))
    assert max_param_diff(auto, plain) == 0.0
    _, forced = train(
        vit,
        _args(
            tmp_path / "on",
            max_steps=2,
            offset_batch_size=16,
            offset_period="1",
            offset_scaling="fixed",
            bp_modified=True,
        ),
    )
    assert max_param_diff(auto, forced) > 1e-4

    caplog.clear()
    trainer, auto = train(resnet, args)
    assert trainer.uses_offset and args.bp_modified is None and "bp_modified" not in caplog.text
    on = _args(
        tmp_path / "on", max_steps=2, offset_batch_size=16, offset_period="1", offset_scaling="fixed", bp_modified=True
    )
    _, forced = train(resnet, on)
    assert max_param_diff(auto, forced) == 0.0
    trainer = BPModifiedTrainer(model=resnet(), args=_args(tmp_path / "off", bp_modified=False), train_dataset=data)
    assert not trainer.uses_offset
    assert ArchitectureAdapter.offset_by_default is True  # an adapter a user registers: the paper's method

    with pytest.raises(ValueError, match="must be True, False or None"):
        _args(tmp_path, bp_modified="maybe")


@pytest.mark.parametrize("recorded", [True, False])
def test_resume_keeps_the_checkpoints_method_when_bp_modified_is_left_unset(tmp_path, caplog, recorded):
    """A ViT run that started with the offset (explicitly, or by a default that applied it) resumes with it under
    ``bp_modified=None``, and ends where the uninterrupted run ends; checkpoints without the record of the method
    are read from their offset state."""
    data = SyntheticImages(96)
    kw = dict(max_steps=6, offset_batch_size=32, offset_period="4")
    full = tiny_vit(num_layers=4)
    BPModifiedTrainer(model=full, args=_args(tmp_path / "a", bp_modified=True, **kw), train_dataset=data).train()

    args = _args(tmp_path / "b", save_strategy="steps", save_steps=3, bp_modified=True, **kw)
    BPModifiedTrainer(model=tiny_vit(num_layers=4), args=args, train_dataset=data).train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-3"
    state, _ = read_bpmod_state(str(checkpoint))
    assert state["bp_modified"] is True
    if not recorded:  # as an earlier release wrote it
        del state["bp_modified"]
        torch.save(state, checkpoint / "bpmod_state.pt")
        os.remove(checkpoint / "bpmod_state.json")
        os.remove(checkpoint / "bpmod_state.safetensors")
    resumed = tiny_vit(num_layers=4, seed=123)
    args = _args(tmp_path / "b", save_strategy="steps", save_steps=3, **kw)
    trainer = BPModifiedTrainer(model=resumed, args=args, train_dataset=data)
    assert not trainer.uses_offset  # the ViT's default, until the checkpoint says otherwise
    with caplog.at_level(logging.WARNING, logger="hf_bpmod.trainer"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.uses_offset and "resuming with the BP offset, as the checkpoint was trained" in caplog.text
    assert max_param_diff(resumed, full) <= 1e-6


def test_vit_reload_identical_logits(tmp_path):
    model = tiny_vit(num_layers=4)
    trainer = BPModifiedTrainer(
        model=model, args=_args(tmp_path, max_steps=2, bp_modified=False), train_dataset=SyntheticImages(64)
    )
    trainer.train()
    trainer.save_model()
    reloaded, info = ViTForImageClassification.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(pixel_values=x).logits, model.eval()(pixel_values=x).logits)


@pytest.mark.parametrize("factory", [lambda: tiny_vit(num_layers=4), lambda: tiny_resnet(depths=(2, 2))])
def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path, factory):
    """The best checkpoint (here the first of three, by a scripted metric) is the model at the end, every weight and
    buffer of it: transformers 5.24's own reload drops the ViT's encoder weights (legacy key names on disk)."""
    scores = iter([0.9, 0.5, 0.1])
    model = factory()
    args = _args(
        tmp_path, num_train_epochs=3, eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
        metric_for_best_model="score", local_horizon=1, offset_batch_size=32,
    )  # fmt: skip
    trainer = BPModifiedTrainer(
        model=model, args=args, train_dataset=SyntheticImages(96), eval_dataset=SyntheticImages(32),
        compute_metrics=lambda _: {"score": next(scores)},
    )  # fmt: skip
    trainer.train()
    out = tmp_path / "out"
    assert trainer.state.best_model_checkpoint == str(out / "checkpoint-6")
    best = type(model).from_pretrained(out / "checkpoint-6").state_dict()
    last = type(model).from_pretrained(out / "checkpoint-18").state_dict()
    state = model.state_dict()
    assert set(state) == set(best)
    assert all(torch.equal(state[k], best[k]) for k in state)
    assert any(
        not torch.equal(state[k], last[k])
        for k in state
        if k.startswith(("vit.layers", "vit.encoder", "resnet.encoder"))
    )


@pytest.mark.parametrize("disable_tqdm", [True, False])
def test_the_console_line_leaves_the_per_block_details_to_the_logs(tmp_path, capsys, disable_tqdm):
    """A refresh adds eight keys per block to its log (``offset/block_<t>/...``), next to every head's loss: the
    printed line used to carry them all (about 2,400 characters on an 8-block ResNet). It leaves them out; the log
    history and every other callback (a recording one, standing in for TensorBoard) still get them."""

    class Recorder(TrainerCallback):
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    recorder = Recorder()
    args = _args(tmp_path, max_steps=3, offset_batch_size=16, offset_period="2", disable_tqdm=disable_tqdm)
    trainer = BPModifiedTrainer(
        model=tiny_resnet(depths=(2, 2, 2, 2)), args=args, train_dataset=SyntheticImages(64), callbacks=[recorder]
    )
    trainer.train()
    lines = [line for line in capsys.readouterr().out.splitlines() if "'loss'" in line]
    assert len(lines) == 3
    assert "'offset/seconds'" in lines[0] and "'grad_norm'" in lines[0]
    assert all("offset/block_" not in line and "block_1_loss" not in line for line in lines)
    assert max(len(line) for line in lines) < 160
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    for logged in (history, [entry for entry in recorder.logs if "loss" in entry]):
        assert [sorted(k for k in entry if k.startswith("offset/block_")) == [] for entry in logged] == [
            False, True, False,
        ]  # refreshes at steps 0 and 2  # fmt: skip
        assert len([k for k in logged[0] if k.startswith("offset/block_")]) == 8 * 8
        assert all(f"block_{s}_loss" in entry for entry in logged for s in range(1, 9))
