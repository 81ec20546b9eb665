"""Swin and SwinV2: the block chain is the model at every resolution the model runs at (padding to whole patches,
windows and merges, windows clamped to a small grid), with one block per layer or per stage; stage blocks learn the
gradients autograd gives; auxiliary heads follow each block's width; granularities that do not apply are refused;
LoRA targets are the query/value projections; gradient checkpointing keeps its effect on single-layer blocks."""

import pytest
import torch
from helpers import assert_local_gradients_match_reference, chain_of, float64_batch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from hf_bpmod import BPModifiedTrainer, BPModifiedTrainingArguments, compat, get_adapter, local_gradients
from hf_bpmod.testing import SyntheticImages, tiny_model

pytestmark = pytest.mark.compat  # the adapter finds the layers by structure, which moves across releases

KINDS = ["swin", "swinv2"]
THREE_STAGES = dict(patch_size=4, window_size=4, depths=[2, 2, 2], num_heads=[2, 2, 2])

#: (image size, config overrides): what each case makes the model's own modules do.
RESOLUTIONS = {
    "16px": (16, {}),  # 8 x 8 then 4 x 4 grids, shifted windows in both stages
    "28px": (28, {}),  # 14 x 14 then 7 x 7: the second stage pads to whole windows
    "32px": (32, {}),  # the memory test's size
    "30px_pads_patches": (30, dict(patch_size=4, window_size=3)),  # 30 px pad to 32 before the patch embedding
    "odd_grid_merges": (56, THREE_STAGES),  # 14 -> 7 -> 4: patch merging pads the odd 7 x 7 grid
    "window_clamped": (32, dict(patch_size=4, window_size=4)),  # 8 x 8 then 4 x 4 = the window: no shift there
    "single_layer_stages": (36, dict(patch_size=4, window_size=2, depths=[1, 2, 1], num_heads=[2, 2, 2])),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("granularity", ["layer", "stage"])
@pytest.mark.parametrize("case", list(RESOLUTIONS))
def test_chain_is_the_model_at_every_resolution(kind, granularity, case):
    size, overrides = RESOLUTIONS[case]
    model = tiny_model(kind, image_size=size, **overrides).double().eval()
    config = model.config
    x, _ = float64_batch(size, n=4)
    with torch.no_grad():
        expected = model(pixel_values=x).logits
        chain = chain_of(model, 1, granularity)
        outputs = chain.block_outputs(x)
        torch.testing.assert_close(chain.heads[-1](outputs[-1]), expected, rtol=0, atol=1e-12)
        for s, head in enumerate(chain.heads[:-1], start=1):  # each auxiliary head reads its block's output
            assert head(outputs[s - 1]).shape == expected.shape
    assert chain.num_blocks == (sum(config.depths) if granularity == "layer" else len(config.depths))
    assert not chain.uncovered_parameters(model)
    # between blocks: a (batch, height, width, channels) map whose width is the block's stage width
    widths = [head.classifier.in_features for head in chain.heads]
    assert [o.shape[-1] for o in outputs] == widths
    assert widths[-1] == model.classifier.in_features


def test_inputs_of_another_size_than_the_config():
    """Swin runs at any resolution (no absolute position embeddings): the chain follows the input's grid."""
    model = tiny_model("swin", image_size=16).double().eval()
    x, _ = float64_batch(28, n=4)
    with torch.no_grad():
        torch.testing.assert_close(chain_of(model, 1, "layer")(x), model(pixel_values=x).logits, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_block_split_and_head_widths(kind):
    model = tiny_model(kind, image_size=56, **THREE_STAGES)
    adapter = get_adapter(model)
    layer_blocks = adapter.blocks(model, "layer")
    stages = getattr(model, model.base_model_prefix).encoder.layers
    # block 0: patch embeddings + the first layer; a stage's patch merging goes with its last layer
    assert {id(p) for p in layer_blocks[0].parameters()} == {
        id(p)
        for p in [*getattr(model, model.base_model_prefix).embeddings.parameters(), *stages[0].blocks[0].parameters()]
    }
    assert {id(p) for p in layer_blocks[1].parameters()} == {
        id(p) for p in [*stages[0].blocks[1].parameters(), *stages[0].downsample.parameters()]
    }
    assert {id(p) for p in layer_blocks[-1].parameters()} == {id(p) for p in stages[2].blocks[1].parameters()}
    # auxiliary heads: layer norm + pooling + classifier at the width of the block's output (16, 32, 64 by stage)
    layer_widths = [adapter.aux_head(model, t, "layer").classifier.in_features for t in range(5)]
    assert layer_widths == [16, 32, 32, 64, 64]
    stage_widths = [adapter.aux_head(model, t, "stage").layernorm.normalized_shape[0] for t in range(2)]
    assert stage_widths == [32, 64]
    fresh = adapter.aux_head(model, 0, "layer")
    assert isinstance(fresh.pooler, nn.AdaptiveAvgPool1d)
    assert all(p.data_ptr() != q.data_ptr() for p in fresh.parameters() for q in model.parameters())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("horizon", [1, 2])
def test_stage_blocks_local_gradients_match_autograd(kind, horizon):
    model = tiny_model(kind, image_size=56, **THREE_STAGES).double().train()
    chain = chain_of(model, horizon, "stage")
    assert chain.num_blocks == 3
    x, loss_fn = float64_batch(56, n=4)
    assert_local_gradients_match_reference(chain, x, loss_fn, horizon)


@pytest.mark.parametrize("granularity", ["layer+stem", "block", "stages"])
def test_granularities_that_do_not_apply_are_refused(granularity):
    model = tiny_model("swin")
    adapter = get_adapter(model)
    with pytest.raises(ValueError, match="block_granularity") as raised:
        adapter.blocks(model, granularity)
    assert "'layer'" in str(raised.value)
    with pytest.raises(ValueError, match="block_granularity"):
        adapter.aux_heads(model, 1, granularity)


def test_trainer_refuses_layer_plus_stem_before_training(tmp_path):
    model = tiny_model("swinv2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = BPModifiedTrainingArguments(
        output_dir=str(tmp_path), block_granularity="layer+stem", report_to="none", use_cpu=True, max_steps=1
    )
    with pytest.raises(ValueError, match="block_granularity='layer\\+stem'.*Use 'layer' or 'stage'"):
        BPModifiedTrainer(model=model, args=args, train_dataset=SyntheticImages(16))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("kind", KINDS)
def test_stage_granularity_trains_through_the_trainer(tmp_path, kind):
    model = tiny_model(kind)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    args = BPModifiedTrainingArguments(
        output_dir=str(tmp_path),
        block_granularity="stage",
        local_horizon=1,
        max_steps=2,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        offset_batch_size=16,  # the offset is on by default for Swin
        report_to="none",
        use_cpu=True,
        save_strategy="no",
    )
    trainer = BPModifiedTrainer(model=model, args=args, train_dataset=SyntheticImages(32))
    assert trainer.uses_offset
    assert trainer.block_chain.num_blocks == 2 and list(trainer.aux_heads) == ["1"]
    trainer.train()
    moved = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, start[k])]
    first_stage = [k for k in moved if ".layers.0." in k or ".embeddings." in k]
    second_stage = [k for k in moved if ".layers.1." in k]
    assert first_stage and second_stage and any(k.startswith("classifier") for k in moved)


@pytest.mark.parametrize("kind", KINDS)
def test_lora_targets_are_the_query_and_value_projections(kind):
    model = tiny_model(kind)
    targets = get_adapter(model).peft_target_modules(model)
    layers = [layer for stage in getattr(model, model.base_model_prefix).encoder.layers for layer in stage.blocks]
    for name in targets:
        found = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == name]
        assert len(found) == len(layers) and all(isinstance(m, nn.Linear) for m in found)
        assert all(any(m is f for m in layer.attention.modules()) for layer, f in zip(layers, found, strict=True))
    assert targets in (["q_proj", "v_proj"], ["query", "value"])
    if kind == "swinv2":
        assert targets == ["query", "value"]


def test_lora_targets_refused_when_absent():
    model = tiny_model("swin")
    for _, module in list(model.named_modules()):
        for name in ("q_proj", "query"):
            if hasattr(module, name):
                setattr(module, name + "_renamed", getattr(module, name))
                delattr(module, name)
    with pytest.raises(ValueError, match="target_modules"):
        get_adapter(model).peft_target_modules(model)


def _checkpoints_layers(model):
    return any(isinstance(m, GradientCheckpointingLayer) for m in model.modules())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("granularity", ["layer", "stage"])
def test_gradient_checkpointing_recomputes_every_layer(kind, granularity):
    """With checkpointing on, each Swin layer's forward runs again in backward, whether a block is one layer (SwinV2
    checkpoints only whole stages itself) or a stage; the gradients do not change."""
    model = tiny_model(kind).double().train()
    if not _checkpoints_layers(model):
        with pytest.raises(ValueError, match="gradient_checkpointing"):
            compat.check_layer_checkpointing(model)
        return
    attentions = [layer.attention for stage in model.base_model.encoder.layers for layer in stage.blocks]
    calls = [0] * len(attentions)
    for i, attention in enumerate(attentions):
        attention.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    x, loss_fn = float64_batch(16, n=4)
    chain = chain_of(model, 1, granularity)

    def run():
        calls[:] = [0] * len(attentions)
        return local_gradients(chain, x, loss_fn, 1).local, list(calls)

    plain, plain_calls = run()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})  # the checkpointing kwargs, under either name
    checkpointed, checkpointed_calls = run()
    assert plain_calls == [1] * len(attentions)
    assert all(c >= 2 for c in checkpointed_calls), checkpointed_calls
    for a_block, b_block in zip(plain, checkpointed, strict=True):
        for a, b in zip(a_block, b_block, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
