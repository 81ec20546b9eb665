"""Non-finite losses or gradients never reach the weights: the step is skipped, and too many in a row stop training."""

import contextlib
import copy
import math
import warnings

import pytest
import torch
from helpers import training_args
from transformers import TrainerCallback, default_data_collator

from hf_bpmod import BPModifiedTrainer
from hf_bpmod.guard import NonFiniteTrainingError
from hf_bpmod.testing import SyntheticImages, tiny_resnet, tiny_vit

BATCH = 16
#: The offset on, refreshed every 2 steps from two micro-batches (helpers.COMMON holds the rest).
OFFSET = dict(
    per_device_train_batch_size=BATCH,
    bp_modified=True,
    offset_batch_size=16,
    offset_micro_batch_size=8,
    offset_period=2,
)
FACTORIES = {"vit": lambda: tiny_vit(num_layers=3), "resnet": lambda: tiny_resnet(depths=(1, 1))}


def _args(tmp_path, **kw):
    return training_args(tmp_path / "out", **{**OFFSET, **kw})


class Poison:
    """The data collator, with ``poison(batch)`` applied to the training micro-batches whose index (from 0) is in
    ``which`` (``None``: all). The offset pass's micro-batches (of ``offset_micro_batch_size``) are left alone unless
    ``refresh=True``."""

    def __init__(self, poison, which=None, refresh=False) -> None:
        self.poison, self.which, self.refresh, self.count = poison, which, refresh, 0

    def __call__(self, features):
        batch = default_data_collator(features)
        if len(features) == BATCH:
            if self.which is None or self.count in self.which:
                self.poison(batch)
            self.count += 1
        elif self.refresh:
            self.poison(batch)
        return batch


def nan_pixel(batch):
    batch["pixel_values"][3, 1, 2, 2] = float("nan")


def inf_pixel(batch):
    batch["pixel_values"][0, 0, 0, 0] = float("inf")


class Recorder(TrainerCallback):
    """Everything an optimizer step may change, before and after each step."""

    def __init__(self, trainer) -> None:
        self.trainer, self.before, self.after = trainer, {}, {}

    def _state(self):
        t = self.trainer
        return copy.deepcopy(
            {
                "model": t.model.state_dict(),
                "heads": t.aux_heads.state_dict(),
                "optimizer": t.optimizer.state_dict()["state"],
                "offset": t.offset.state.state_dict(),
            }
        )

    def on_step_begin(self, args, state, control, **kw):
        self.before[state.global_step] = self._state()

    def on_step_end(self, args, state, control, **kw):
        self.after[state.global_step - 1] = self._state()


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) if a.is_floating_point() else a.equal(b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _finite(trainer) -> bool:
    tensors = [*trainer.model.state_dict().values(), *trainer.aux_heads.state_dict().values()]
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def _train(tmp_path, arch, collator, **kw):
    trainer = BPModifiedTrainer(
        model=FACTORIES[arch](),
        args=_args(tmp_path, **{"max_steps": 5, **kw}),
        train_dataset=SyntheticImages(96),
        data_collator=collator,
    )
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    return trainer, recorder


@pytest.mark.parametrize("arch", ["vit", "resnet"])
@pytest.mark.parametrize("poison", [nan_pixel, inf_pixel])
def test_a_non_finite_image_skips_its_step_and_training_goes_on(tmp_path, arch, poison):
    trainer, rec = _train(tmp_path, arch, Poison(poison, which={2}), optim="adamw_torch")
    with pytest.warns(
        RuntimeWarning, match=r"Step 2: the loss of head 1 is not finite; the optimizer step is skipped"
    ):
        trainer.train()
    for part in ("model", "heads", "optimizer"):  # weights, buffers, heads, optimizer moments and step counts
        assert _equal(rec.before[2][part], rec.after[2][part])
    # the refresh due at step 2 ran as scheduled (on its own sample): the next is due at step 4
    before, after = rec.before[2]["offset"], rec.after[2]["offset"]
    assert (before["period_index"], before["next_refresh_step"]) == (1, 2)
    assert (after["period_index"], after["next_refresh_step"]) == (2, 4)
    for step in (1, 3):  # the steps around it train
        assert not _equal(rec.before[step]["model"], rec.after[step]["model"])
        assert not _equal(rec.before[step]["optimizer"], rec.after[step]["optimizer"])
    assert trainer.state.global_step == 5
    assert _finite(trainer)
    assert trainer.guard.skipped_in_a_row == 0


@pytest.mark.parametrize("allowed", [0, 2])
def test_all_nan_data_stops_after_max_nonfinite_steps_with_the_model_untouched(tmp_path, allowed):
    trainer, rec = _train(tmp_path, "resnet", Poison(nan_pixel), max_nonfinite_steps=allowed)
    with pytest.warns(RuntimeWarning) if allowed else contextlib.nullcontext():
        with pytest.raises(NonFiniteTrainingError) as error:
            trainer.train()
    message = str(error.value)
    assert f"Step {allowed}: the loss of head 1 is not finite" in message
    assert f"max_nonfinite_steps={allowed}" in message
    assert "Check the data (NaN or Inf pixels or labels" in message and "learning rate" in message
    assert "left as they were after the last finite step" in message
    initial, after = rec.before[0], rec._state()
    assert _equal(initial["model"], after["model"]) and _equal(initial["heads"], after["heads"])
    assert after["optimizer"] == {}  # no step was ever taken
    assert _finite(trainer)


def _one_hot(batch):
    batch["labels"] = torch.nn.functional.one_hot(batch["labels"], 5).float()


def test_a_nan_label_skips_its_step(tmp_path):
    def nan_label(batch):
        batch["labels"][5, 1] = float("nan")

    class MultiLabel(Poison):
        def __call__(self, features):
            batch = default_data_collator(features)
            _one_hot(batch)
            if len(features) == BATCH:
                if self.count in self.which:
                    nan_label(batch)
                self.count += 1
            return batch

    trainer, rec = _train(tmp_path, "vit", MultiLabel(None, which={1}))
    trainer.model.config.problem_type = "multi_label_classification"
    with pytest.warns(RuntimeWarning, match=r"Step 1: the loss of head 1 is not finite"):
        trainer.train()
    assert _equal(rec.before[1], rec.after[1])
    assert not _equal(rec.before[2]["model"], rec.after[2]["model"])
    assert _finite(trainer)


def test_a_non_finite_gradient_with_a_finite_loss_is_caught_and_named(tmp_path):
    trainer, rec = _train(tmp_path, "vit", Poison(lambda b: None, which=set()))
    block = trainer.block_chain.block_params[1][0]
    block.register_hook(lambda g: g if trainer.state.global_step != 3 else torch.full_like(g, math.inf))
    with pytest.warns(RuntimeWarning, match=r"Step 3: the gradient of block 1 \(with its offset\) is not finite"):
        trainer.train()
    assert _equal(rec.before[3], rec.after[3])
    assert _finite(trainer)


def test_non_finite_refreshes_keep_the_offset_and_count_in_a_row(tmp_path):
    # every refresh sees a NaN image, training batches are clean: refreshes at steps 0, 2 and 4 fail
    trainer, rec = _train(tmp_path, "resnet", Poison(nan_pixel, which=set(), refresh=True), max_nonfinite_steps=1)
    with pytest.raises(
        NonFiniteTrainingError, match=r"Step 2: the offset refresh gave non-finite statistics, the 2nd"
    ):
        trainer.train()
    assert trainer.offset.state.blocks == []  # no offset was ever made of non-finite statistics
    assert trainer.state.global_step == 2 and _finite(trainer)  # steps 0 and 1 trained with clean batches
    assert not _equal(rec.before[0]["model"], rec.after[1]["model"])

    trainer, _ = _train(tmp_path, "resnet", Poison(nan_pixel, which=set(), refresh=True), max_nonfinite_steps=2)
    with pytest.raises(NonFiniteTrainingError, match=r"Step 4: the offset refresh .* the 3rd refresh in a row"):
        trainer.train()  # two failures in a row are allowed, the third stops


def test_a_gradient_the_offset_makes_non_finite_skips_its_step(tmp_path):
    """The largest `offset_fixed_a` allowed (1e6) on a finite gradient of 1e33 gives 1e39, past float32: the step is
    skipped like any non-finite step, naming the block, and training goes on."""
    trainer, rec = _train(
        tmp_path, "vit", Poison(lambda b: None, which=set()), offset_scaling="fixed", offset_fixed_a=1e6
    )
    bias = trainer.block_chain.block_params[0][-1]
    assert bias.dim() == 1 and bias.numel() * 1e33 < 3e38  # the gradient's sum stays finite
    bias.register_hook(lambda g: g if trainer.state.global_step != 3 else torch.full_like(g, 1e33))
    with pytest.warns(RuntimeWarning, match=r"Step 3: the gradient of block 0 \(with its offset\) is not finite"):
        trainer.train()
    assert _equal(rec.before[3], rec.after[3])
    assert not _equal(rec.before[4]["model"], rec.after[4]["model"])
    assert trainer.state.global_step == 5 and _finite(trainer) and trainer.guard.skipped_in_a_row == 0


class _CountersAtTrainBegin(TrainerCallback):
    def __init__(self, trainer) -> None:
        self.trainer, self.seen = trainer, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.seen = (self.trainer.guard.skipped_in_a_row, self.trainer.guard.failed_refreshes_in_a_row)


@pytest.mark.compat  # resumes through the Trainer's own loading
@pytest.mark.parametrize("what", ["steps", "refreshes"])
def test_a_resumed_run_stops_where_the_uninterrupted_run_stops(tmp_path, what):
    """Non-finite gradients from step 2 on, 3 allowed in a row, stop a run without the offset at step 5; refreshes
    that all fail, 2 allowed in a row, stop it at the refresh of step 4. Resumed from the checkpoint of step 4 or 3,
    whose counters say how many failed in a row before it, the run stops at the same step with the same error."""
    if what == "steps":
        collator = Poison(lambda b: None, which=set())
        kw = dict(max_nonfinite_steps=3, save_steps=4, bp_modified=False)
    else:
        collator, kw = Poison(nan_pixel, which=set(), refresh=True), dict(max_nonfinite_steps=2, save_steps=3)
    errors, counters = [], []
    for resume in (None, str(tmp_path / "out" / f"checkpoint-{kw['save_steps']}")):
        trainer, _ = _train(tmp_path, "vit", collator, max_steps=12, save_strategy="steps", **kw)
        if what == "steps":
            param = trainer.block_chain.block_params[1][0]
            param.register_hook(lambda g, t=trainer: g if t.state.global_step < 2 else torch.full_like(g, math.inf))
        probe = _CountersAtTrainBegin(trainer)
        trainer.add_callback(probe)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with pytest.raises(NonFiniteTrainingError) as error:
                trainer.train(resume_from_checkpoint=resume)
        errors.append(str(error.value))
        counters.append(probe.seen)
    if what == "steps":
        assert "Step 5: the gradient of block 1" in errors[0] and "the 4th step in a row" in errors[0]
        assert counters == [(0, 0), (2, 0)]  # steps 2 and 3 skipped before the checkpoint of step 4
    else:
        assert "Step 4: the offset refresh gave non-finite statistics, the 3rd refresh in a row" in errors[0]
        assert counters == [(0, 0), (0, 2)]  # the refreshes of steps 0 and 2 failed
    assert errors[1] == errors[0]


def _small_chain():
    from hf_bpmod.chain import BlockChain

    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)) for _ in range(3)]
    heads = [torch.nn.Linear(4, 2) for _ in range(3)]
    return BlockChain(blocks=blocks, heads=heads), torch.nn.ModuleList(blocks + heads)


def test_every_process_reaches_the_same_verdict_from_its_own_losses():
    # process 1's loss of head 2 is NaN, its gradients (averaged over both) finite: without the sum across
    # processes process 0 would step and process 1 skip, and their weights would part
    from hf_bpmod.guard import NonFiniteGuard

    chain, modules = _small_chain()
    other: dict[str, torch.Tensor] = {}

    def reduce_sum(t):
        t += other["vector"]

    guards = [NonFiniteGuard(chain, [modules], 3, reduce_sum=reduce_sum) for _ in range(2)]
    optimizer = torch.optim.SGD(modules.parameters(), lr=0.1)
    verdicts = []
    for rank, guard in enumerate(guards):
        guard.start_step()
        for p in modules.parameters():
            p.grad = torch.ones_like(p)
        losses = {1: torch.tensor(1.0), 2: torch.tensor(math.nan if rank == 1 else 1.0), 3: torch.tensor(1.0)}
        guard.add_losses(losses)
        # what the other process adds: its three losses (process 1's head 2 is NaN) and its gradients' sums
        other["vector"] = torch.tensor([1.0, math.nan if rank == 0 else 1.0, 1.0] + [1.0] * len(guard.params))
        with pytest.warns(RuntimeWarning, match="Step 7: the loss of head 2 is not finite"):
            verdicts.append(guard.finish_step(7, optimizer))
        assert all(p.grad is None for p in modules.parameters())
        before = [p.detach().clone() for p in modules.parameters()]
        optimizer.step()  # the armed skip
        assert all(torch.equal(a, p) for a, p in zip(before, modules.parameters()))
        assert "step" not in vars(optimizer)  # the optimizer's own step is back
    assert verdicts == [False, False]


def test_under_fp16_scaling_the_scaler_skips_and_the_guard_only_puts_the_batchnorm_statistics_back(tmp_path):
    # fp16 needs a GPU: an enabled CPU GradScaler stands in for it (as in tests/test_precision.py)
    trainer, rec = _train(tmp_path, "resnet", Poison(nan_pixel, which={2}), max_nonfinite_steps=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=100)
    trainer.accelerator.scaler = scaler
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an overflow is no warning and not counted: 0 allowed
        trainer.train()
    assert trainer.optimizer.scaler is scaler and scaler.get_scale() == 2.0**9  # the scaler saw it and skipped
    for part in ("model", "heads", "optimizer"):  # the weights by the scaler, the running statistics by the guard
        assert _equal(rec.before[2][part], rec.after[2][part])  # (the offset refresh due at step 2 ran)
    assert not _equal(rec.before[3]["model"], rec.after[3]["model"])
    assert trainer.guard.skipped_in_a_row == 0 and _finite(trainer)
