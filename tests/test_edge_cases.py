"""Settings that used to crash late or be ignored without a word: refused when the trainer is built, or warned."""

import logging
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hf_bpmod import BPModifiedTrainer, BPModifiedTrainingArguments, get_adapter
from hf_bpmod.testing import SyntheticImages, tiny_resnet, tiny_vit

COMMON = dict(
    per_device_train_batch_size=16,
    learning_rate=1e-2,
    report_to="none",
    use_cpu=True,
    save_strategy="no",
    seed=0,
    disable_tqdm=True,
)


def _args(tmp_path, **kw):
    return BPModifiedTrainingArguments(output_dir=str(tmp_path / "out"), **{**COMMON, **kw})


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
    assert "has no effect" not in caplog.text


# ---------------------------------------------------------------- block_granularity a ViT does not have
@pytest.mark.parametrize("granularity", ["stage", "layer+stem"])
def test_vit_refuses_resnet_granularities_when_the_trainer_is_built(tmp_path, granularity):
    args = _args(tmp_path, max_steps=1, block_granularity=granularity)
    with pytest.raises(ValueError, match=re.escape(f"block_granularity='{granularity}'` is for ResNets")) as error:
        BPModifiedTrainer(model=tiny_vit(num_layers=4), args=args, train_dataset=SyntheticImages(32))
    assert "Use 'layer'" in str(error.value)
