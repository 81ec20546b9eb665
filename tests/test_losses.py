"""``hf_bpmod.losses`` alone: the training loss on one head's logits against the Trainer's own ``compute_loss`` on
the same model, its per-micro-batch scaling, and the split of a batch into pixels and labels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from hf_bpmod import BPModifiedTrainer, BPModifiedTrainingArguments, compat
from hf_bpmod.losses import TrainingLoss, split_inputs
from hf_bpmod.testing import SyntheticImages, tiny_resnet, tiny_vit, weighted_cross_entropy

pytestmark = pytest.mark.compat  # the loss follows the Trainer's release-dependent rules (compat.py)


def _batch(n: int = 6, num_labels: int = 5) -> dict[str, torch.Tensor]:
    data = SyntheticImages(n, num_labels=num_labels)
    return {"pixel_values": data.pixel_values, "labels": data.labels}


def _trainer(tmp_path, model, compute_loss_func=None, **kw) -> Trainer:
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kw)
    return Trainer(model=model, args=args, compute_loss_func=compute_loss_func)


def _logits_and_labels(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.eval()(pixel_values=batch["pixel_values"]).logits, batch["labels"]


def _loss_of(trainer: Trainer) -> TrainingLoss:
    """The loss object built from the Trainer's attributes, as ``BPModifiedTrainer`` builds it."""
    return TrainingLoss(
        trainer.model,
        compute_loss_func=trainer.compute_loss_func,
        label_smoother=trainer.label_smoother,
        model_accepts_loss_kwargs=trainer.model_accepts_loss_kwargs,
        average_tokens_across_devices=trainer.args.average_tokens_across_devices,
    )


def _compare(trainer: Trainer, batch: dict[str, torch.Tensor], num_items_in_batch) -> tuple[torch.Tensor, ...]:
    """The loss object on the logits of a forward of ``batch``, and the Trainer's ``compute_loss`` on the same."""
    model = trainer.model.eval()
    with torch.no_grad():
        expected, outputs = trainer.compute_loss(
            model, dict(batch), return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        got = _loss_of(trainer)(outputs.logits, batch["labels"], num_items_in_batch)
    return got, expected


@pytest.mark.parametrize("num_items_in_batch", [None, 12])
def test_compute_loss_func_is_called_on_the_logits_as_the_trainer_calls_it(tmp_path, num_items_in_batch):
    trainer = _trainer(tmp_path, tiny_vit(num_layers=2), compute_loss_func=weighted_cross_entropy)
    batch = _batch()
    got, expected = _compare(trainer, batch, num_items_in_batch)
    assert torch.equal(got, expected)
    logits, labels = _logits_and_labels(trainer.model, batch)
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5, 3.0])
    by_hand = F.cross_entropy(logits, labels, weight=weight, reduction="sum") / (num_items_in_batch or len(labels))
    torch.testing.assert_close(got, by_hand)


@pytest.mark.parametrize("num_items_in_batch", [None, 12])
def test_label_smoothing_is_the_trainers(tmp_path, num_items_in_batch):
    """The Trainer's label smoother: ``(1 - 0.1) * NLL + 0.1 * mean over classes of -log p``, divided by
    ``num_items_in_batch`` where the installed smoother takes it (transformers >= 5), else by the batch."""
    trainer = _trainer(tmp_path, tiny_vit(num_layers=2), label_smoothing_factor=0.1)
    batch = _batch()
    got, expected = _compare(trainer, batch, num_items_in_batch)
    assert torch.equal(got, expected)
    logits, labels = _logits_and_labels(trainer.model, batch)
    items = num_items_in_batch if compat.LABEL_SMOOTHER_COUNTS_ITEMS and num_items_in_batch else len(labels)
    torch.testing.assert_close(got, F.cross_entropy(logits, labels, label_smoothing=0.1, reduction="sum") / items)


def _two_hot(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Two classes per image, as multi-hot float labels."""
    labels = batch["labels"]
    return (F.one_hot(labels, 5) + F.one_hot((labels + 1) % 5, 5)).float()


@pytest.mark.parametrize(
    "problem, factory, labels",
    [
        ("single_label_classification", lambda: tiny_vit(num_layers=2), lambda b: b["labels"]),
        ("single_label_classification", lambda: tiny_resnet(depths=(1, 1)), lambda b: b["labels"]),
        ("multi_label_classification", lambda: tiny_vit(num_layers=2), _two_hot),
        ("regression", lambda: tiny_vit(num_layers=2, num_labels=1), lambda b: b["pixel_values"].mean((1, 2, 3))),
    ],
)
def test_the_models_own_loss_follows_its_problem_type(tmp_path, problem, factory, labels):
    """Without ``compute_loss_func`` or label smoothing the loss is the model's own ``loss_function`` (its
    ``problem_type``); ``num_items_in_batch`` is left out: a ResNet's forward takes it but ignores it."""
    model = factory()
    model.config.problem_type = problem
    batch = _batch()
    batch["labels"] = labels(batch)
    got, expected = _compare(_trainer(tmp_path, model), batch, None)
    assert torch.equal(got, expected)
    logits, labels = _logits_and_labels(model, batch)
    by_hand = {
        "single_label_classification": lambda: F.cross_entropy(logits, labels),
        "multi_label_classification": lambda: F.binary_cross_entropy_with_logits(logits, labels),
        "regression": lambda: F.mse_loss(logits.squeeze(), labels.squeeze()),
    }[problem]()
    torch.testing.assert_close(got, by_hand)


def test_a_model_that_counts_items_normalises_by_them(tmp_path):
    """A ViT's loss takes ``num_items_in_batch``: the sum over the micro-batch divided by it, as in the Trainer."""
    trainer = _trainer(tmp_path, tiny_vit(num_layers=2))
    if not trainer.model_accepts_loss_kwargs:
        pytest.skip("this transformers' ViT does not take num_items_in_batch")
    batch = _batch()
    got, expected = _compare(trainer, batch, 12)
    assert torch.equal(got, expected)
    mean = _loss_of(trainer)(*_logits_and_labels(trainer.model, batch))
    torch.testing.assert_close(got, mean * len(batch["labels"]) / 12)


@pytest.mark.parametrize(
    "kw",
    [dict(compute_loss_func=weighted_cross_entropy), dict(label_smoothing_factor=0.1), {}],
    ids=["compute_loss_func", "label_smoothing", "model_loss"],  # stable ids: pytest-xdist workers compare them
)
def test_the_bp_modified_trainer_builds_its_loss_from_its_settings(tmp_path, kw):
    """``BPModifiedTrainer.training_loss`` on a model's logits is the plain Trainer's loss of the same model."""
    compute_loss_func = kw.pop("compute_loss_func", None)
    args = BPModifiedTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kw)
    model = tiny_vit(num_layers=2)
    trainer = BPModifiedTrainer(model=model, args=args, compute_loss_func=compute_loss_func)
    batch = _batch()
    got = trainer.training_loss(*_logits_and_labels(model, batch), 12)
    expected = _compare(_trainer(tmp_path, model, compute_loss_func, **kw), batch, 12)[1]
    assert torch.equal(got, expected)


def _fixed_loss(**kw) -> TrainingLoss:
    return TrainingLoss(
        torch.nn.Module(), compute_loss_func=lambda outputs, labels, num_items_in_batch=None: 3.0, **kw
    )


@pytest.mark.parametrize(
    "settings, num_items_in_batch, scaling, factor",
    [
        ({}, None, dict(data_processes=4, accumulation_steps=2, scaled_for_ga=False), 1 / 2),
        ({}, 16, dict(data_processes=4, accumulation_steps=2, scaled_for_ga=True), 1.0),
        (dict(average_tokens_across_devices=True), 16, dict(data_processes=4, accumulation_steps=3, scaled_for_ga=True), 4),
        (dict(average_tokens_across_devices=True), 16, dict(data_processes=4, accumulation_steps=3, scaled_for_ga=False), 4 / 3),
        (dict(average_tokens_across_devices=True), None, dict(data_processes=4, accumulation_steps=3, scaled_for_ga=False), 1 / 3),
    ],
)  # fmt: skip
def test_a_micro_batchs_loss_is_scaled_as_the_trainers_training_step_scales_it(
    settings, num_items_in_batch, scaling, factor
):
    """Times the data-parallel processes with ``average_tokens_across_devices`` when the loss counts items, divided by
    the accumulation steps of this window unless the loss is already scaled for them."""
    loss_fn = _fixed_loss(**settings).micro_batch(torch.zeros(2), num_items_in_batch, **scaling)
    assert loss_fn(torch.zeros(2, 5)) == pytest.approx(3.0 * factor, rel=1e-15)


def test_a_loss_that_counts_no_items_is_not_multiplied_by_the_processes():
    """The model's own loss without ``model_accepts_loss_kwargs`` is a batch mean: no factor of the processes."""

    class Mean(torch.nn.Module):
        config = None

        def loss_function(self, labels, logits, config):
            return logits.mean()

    loss = TrainingLoss(Mean(), average_tokens_across_devices=True)
    loss_fn = loss.micro_batch(None, 16, data_processes=4, accumulation_steps=2, scaled_for_ga=False)
    assert loss_fn(torch.full((2, 3), 6.0)).item() == 3.0


def test_split_inputs_takes_pixels_and_labels_and_nothing_else():
    batch = _batch()
    pixel_values, labels = split_inputs(batch)
    assert pixel_values is batch["pixel_values"] and labels is batch["labels"]
    with pytest.raises(ValueError, match=r"expects batches with `pixel_values` and `labels`, got \['pixel_values'\]"):
        split_inputs({"pixel_values": batch["pixel_values"]})
    with pytest.raises(ValueError, match=r"cannot pass \['mask'\] to it"):
        split_inputs({**batch, "mask": batch["labels"]})
