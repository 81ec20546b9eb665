"""Settings that used to crash late or be ignored without a word: refused when the trainer is built, or warned."""

import logging
import math
import re

import pytest
import torch
from helpers import training_args
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback

from hf_bpmod import BPModifiedTrainer, get_adapter
from hf_bpmod.setup_checks import warn_about_ignored_settings
from hf_bpmod.testing import SyntheticImages, tiny_resnet, tiny_vit


def _args(tmp_path, **kw):
    return training_args(tmp_path / "out", **{"learning_rate": 1e-2, **kw})


def _lora(model, r: int = 2):
    targets = get_adapter(model).peft_target_modules(model)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=4, target_modules=targets, init_lora_weights=False))


# ---------------------------------------------------------------- a model wrapped twice in peft
def test_model_wrapped_twice_in_peft_is_refused_when_the_trainer_is_built(tmp_path):
    nested = _lora(_lora(tiny_vit(num_layers=4)), r=3)
    with pytest.raises(ValueError, match=r"wrapped in 2 peft models.*merge_and_unload"):
        BPModifiedTrainer(model=nested, args=_args(tmp_path, max_steps=1), train_dataset=SyntheticImages(32))


def test_the_advised_merge_then_wrap_again_trains_only_the_adapter(tmp_path):
    model = _lora(_lora(tiny_vit(num_layers=4)).merge_and_unload(), r=3)
    trainer = BPModifiedTrainer(
        model=model, args=_args(tmp_path, max_steps=2, bp_modified=False), train_dataset=SyntheticImages(32)
    )
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()
    params = dict(model.named_parameters())
    assert all((params[n] - p).abs().max() > 0 for n, p in trainable.items() if "lora_B" in n)
    assert all(torch.equal(params[n], p) for n, p in frozen.items())


# ---------------------------------------------------------------- bp_modified=True where no offset can apply
@pytest.mark.parametrize(
    ("factory", "horizon", "granularity"),
    [
        (lambda: tiny_vit(num_layers=1), 1, "layer"),  # one block
        (lambda: tiny_resnet(depths=(2, 2)), 4, "layer"),  # horizon = number of blocks
        (lambda: tiny_resnet(depths=(2, 1)), 2, "stage"),  # two stages, two blocks
    ],
    ids=["vit-one-block", "resnet-horizon-equals-blocks", "resnet-stages"],
)
def test_bp_modified_true_that_cannot_apply_warns_once(tmp_path, caplog, factory, horizon, granularity):
    args = _args(tmp_path, max_steps=1, bp_modified=True, local_horizon=horizon, block_granularity=granularity)
    with caplog.at_level(logging.WARNING, logger="hf_bpmod.trainer"):
        trainer = BPModifiedTrainer(model=factory(), args=args, train_dataset=SyntheticImages(32))
        trainer.train()
    assert not trainer.uses_offset
    messages = [r.getMessage() for r in caplog.records if "bp_modified=True has no effect" in r.getMessage()]
    assert len(messages) == 1, caplog.text
    assert f"local_horizon={horizon} >= the model's" in messages[0] and "bp_modified=False" in messages[0]


@pytest.mark.parametrize(("bp_modified", "horizon"), [(None, 4), (False, 4), (True, 1)])
def test_no_warning_where_the_offset_was_not_asked_for_or_applies(tmp_path, caplog, bp_modified, horizon):
    args = _args(tmp_path, max_steps=1, bp_modified=bp_modified, local_horizon=horizon, offset_batch_size=16)
    with caplog.at_level(logging.WARNING, logger="hf_bpmod.trainer"):
        trainer = BPModifiedTrainer(model=tiny_resnet(depths=(2, 2)), args=args, train_dataset=SyntheticImages(32))
    assert trainer.uses_offset == (bp_modified is not False and horizon < 4)
    assert "bp_modified=True has no effect" not in caplog.text


def test_the_ignored_settings_are_read_from_the_arguments_and_the_number_of_blocks(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_bpmod.trainer"):
        warn_about_ignored_settings(_args(tmp_path, bp_modified=True, local_horizon=3), num_blocks=4)
        assert "no effect" not in caplog.text
        warn_about_ignored_settings(_args(tmp_path, bp_modified=True, local_horizon=4), num_blocks=4)
    assert "bp_modified=True has no effect: local_horizon=4 >= the model's 4 blocks" in caplog.text


# ---------------------------------------------------------------- block_granularity a ViT does not have
@pytest.mark.parametrize("granularity", ["stage", "layer+stem"])
def test_vit_refuses_resnet_granularities_when_the_trainer_is_built(tmp_path, granularity):
    args = _args(tmp_path, max_steps=1, block_granularity=granularity)
    with pytest.raises(ValueError, match=re.escape(f"block_granularity='{granularity}'` is for ResNets")) as error:
        BPModifiedTrainer(model=tiny_vit(num_layers=4), args=args, train_dataset=SyntheticImages(32))
    assert "Use 'layer'" in str(error.value)


# ---------------------------------------------------------------- max_grad_norm and the auxiliary heads
class _HeadGradients(TrainerCallback):
    """Each auxiliary head's gradient norm as the Trainer leaves it (passed in ``callbacks``, it runs before the
    trainer's own callbacks)."""

    def __init__(self) -> None:
        self.trainer: BPModifiedTrainer | None = None
        self.norms: list[dict[str, float]] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        scale = self.trainer._grad_scale() if not self.trainer.accelerator.scaler else 1.0  # unscaled by clipping
        heads = self.trainer.aux_heads
        self.norms.append(
            {s: float(torch.cat([p.grad.flatten() for p in h.parameters()]).norm()) / scale for s, h in heads.items()}
        )


def _clipping_run(tmp_path, max_grad_norm: float, model=None, scaler=None, steps: int = 1):
    """SGD without momentum or weight decay at a constant rate: a head moves by exactly lr x its clipped gradient."""
    capture = _HeadGradients()
    args = _args(
        tmp_path, max_steps=steps, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
        max_grad_norm=max_grad_norm, bp_modified=False, local_horizon=1,
    )  # fmt: skip
    model = model if model is not None else tiny_resnet(depths=(2, 2))
    trainer = BPModifiedTrainer(model=model, args=args, train_dataset=SyntheticImages(64), callbacks=[capture])
    capture.trainer = trainer
    if scaler is not None:
        trainer.accelerator.scaler = scaler
    before = {s: [p.detach().clone() for p in h.parameters()] for s, h in trainer.aux_heads.items()}
    trainer.train()
    moved = {
        s: math.sqrt(sum(((p - b) ** 2).sum().item() for p, b in zip(h.parameters(), before[s], strict=True)))
        for s, h in trainer.aux_heads.items()
    }
    return trainer, capture.norms, moved


@pytest.mark.parametrize(
    "factory", [lambda: tiny_resnet(depths=(2, 2)), lambda: tiny_vit(num_layers=4)], ids=["resnet", "vit"]
)
def test_each_auxiliary_head_is_clipped_to_max_grad_norm_on_its_own(tmp_path, factory):
    max_norm = 1e-3
    trainer, norms, moved = _clipping_run(tmp_path, max_norm, model=factory())
    assert len(norms) == 1 and len(norms[0]) == 3  # heads on x_1, x_2, x_3
    assert all(n > 10 * max_norm for n in norms[0].values())  # every head's own gradient is far above the limit
    for s, distance in moved.items():  # each head's step is lr x max_norm: clipped, and on its own (not jointly)
        assert distance == pytest.approx(0.5 * max_norm, rel=1e-4), (s, distance, norms[0][s])


def test_auxiliary_heads_are_not_clipped_without_max_grad_norm(tmp_path):
    _, norms, moved = _clipping_run(tmp_path, 0.0)
    for s, distance in moved.items():
        assert distance == pytest.approx(0.5 * norms[0][s], rel=1e-4)


def test_fp16_loss_scale_is_removed_before_the_heads_are_clipped(tmp_path, monkeypatch):
    """A GradScaler at 2^10 (doubling every step) and ``max_grad_norm=10``, between the heads' true gradient norms
    (about 1) and their scaled ones (about 1000): the heads and the model move exactly as in the unscaled run, so the
    heads are clipped at their true norm. fp16 autocast needs a GPU; on CPU accelerate's fp16 unscaling (what its
    ``clip_grad_norm_`` does under fp16: ``scaler.unscale_`` on every prepared optimizer) is reproduced here."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)

    def unscale_gradients(self, optimizer=None):
        for opt in self._optimizers if self.scaler is not None else []:
            self.scaler.unscale_(opt.optimizer)

    monkeypatch.setattr(
        type(BPModifiedTrainer(model=tiny_resnet(), args=_args(tmp_path)).accelerator),
        "unscale_gradients",
        unscale_gradients,
    )
    scaled, _, moved_scaled = _clipping_run(tmp_path / "scaled", 10.0, scaler=scaler, steps=2)
    assert scaled.optimizer.scaler is scaler and scaler.get_scale() == 2.0**12
    plain, norms, moved_plain = _clipping_run(tmp_path / "plain", 10.0, steps=2)
    assert all(n < 10.0 for step in norms for n in step.values())
    for a, b in zip(
        [*scaled.model.parameters(), *scaled.aux_heads.parameters()],
        [*plain.model.parameters(), *plain.aux_heads.parameters()],
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert moved_scaled == pytest.approx(moved_plain, rel=1e-5)


# ---------------------------------------------------------------- offset arguments that are not read
@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        (
            dict(bp_modified=False, offset_period="5", offset_batch_size=64),
            "offset_batch_size=64, offset_period='5' have no effect with bp_modified=False",
        ),
        (
            dict(bp_modified=True, offset_fixed_lambda=0.9),
            "offset_fixed_lambda=0.9 has no effect with offset_scaling='aligned'",
        ),
        (dict(bp_modified=True, offset_scaling="fixed", offset_fixed_lambda=0.9), None),
        (dict(bp_modified=False), None),
        (dict(bp_modified=True, offset_period="5", offset_batch_size=64), None),
    ],
    ids=["no-offset", "not-fixed-scaling", "fixed-scaling", "defaults", "offset-on"],
)
def test_offset_arguments_that_are_not_read_are_warned_about(tmp_path, caplog, kw, expected):
    args = _args(tmp_path, max_steps=1, **kw)
    with caplog.at_level(logging.WARNING, logger="hf_bpmod.trainer"):
        BPModifiedTrainer(model=tiny_resnet(depths=(2, 2)), args=args, train_dataset=SyntheticImages(320))
    if expected is None:
        assert "no effect" not in caplog.text
    else:
        assert expected in caplog.text
