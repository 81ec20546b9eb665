"""DeiT, BEiT and DINOv2 beyond the checks every architecture passes (``test_architectures.py``): the DeiT with a
distillation token (whose ``forward`` takes no labels) without a loss function, BEiT's relative position bias at any
image size and its shared variant (refused, and made trainable by giving each layer its own copy), the chains at the
sizes the other tests use, the auxiliary heads' structure, and the granularities an encoder does not have."""

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_local_gradients_match_reference,
    chain_of,
    float64_batch,
    max_param_diff,
    training_args,
)
from transformers import AutoModelForImageClassification, Trainer, TrainingArguments

from hf_bpmod import BPModifiedTrainer, get_adapter, local_gradients
from hf_bpmod.adapters import unshare_relative_position_bias
from hf_bpmod.testing import SyntheticImages, tiny_model

ENCODERS = ["deit", "deit_distilled", "beit", "dinov2"]


def _randomise_position_bias(model, seed=3):
    """Non-zero relative position bias tables (transformers initialises them to zero, where the bias does nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _chain_and_model_logits(model, x):
    chain = chain_of(model, 1)
    with torch.no_grad():
        return chain.heads[-1](chain.block_outputs(x)[-1]), model(pixel_values=x).logits


# ---------------------------------------------------------------- the DeiT with a distillation token
# (test_architectures.py runs every common check on it too, with a loss function for the plain Trainer.)
def test_distilled_deit_trains_and_evaluates_without_a_loss_function(tmp_path):
    """No ``compute_loss_func``, default ``label_names``: the trainer keeps the labels and evaluates the model's
    cross-entropy on its (mean) logits."""
    data, held_out = SyntheticImages(64), SyntheticImages(24, seed=5)
    model = tiny_model("deit_distilled")
    args = training_args(tmp_path, local_horizon=1, max_steps=2)
    trainer = BPModifiedTrainer(model=model, args=args, train_dataset=data)
    assert trainer.train().training_loss > 0
    assert max_param_diff(model, tiny_model("deit_distilled")) > 1e-4
    metrics = trainer.evaluate(held_out)
    with torch.no_grad():
        expected = F.cross_entropy(model.eval()(pixel_values=held_out.pixel_values).logits, held_out.labels)
    assert metrics["eval_loss"] == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------- image sizes, and BEiT's patch grid
@pytest.mark.parametrize("kind", ENCODERS)
@pytest.mark.parametrize("size", [16, 28, 32])
def test_chain_computes_the_models_logits_at_each_size(kind, size):
    model = _randomise_position_bias(tiny_model(kind, image_size=size).double().eval())
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    got, expected = _chain_and_model_logits(model, x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_beit_chain_keeps_the_patch_grid_of_a_non_square_image():
    """A 16 x 28 image has a 4 x 7 patch grid; every layer's relative position bias depends on it, and the chain
    carries it from block to block."""
    model = _randomise_position_bias(tiny_model("beit").double().eval())
    x = torch.randn(3, 3, 16, 28, dtype=torch.float64)
    got, expected = _chain_and_model_logits(model, x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    x_t = chain_of(model, 1).blocks[0](x)
    assert x_t.shape == (3, 4 + 1, 7, model.config.hidden_size)
    without_bias = tiny_model("beit").double().eval()
    with torch.no_grad():
        assert (without_bias(pixel_values=x).logits - expected).abs().max() > 1e-5  # the bias matters


@pytest.mark.parametrize("horizon", [1, 2])
def test_beit_local_gradients_on_a_non_square_image_match_autograd(horizon):
    model = _randomise_position_bias(tiny_model("beit").double().train())
    chain = chain_of(model, horizon)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 20, 12, generator=g, dtype=torch.float64), torch.randint(0, 5, (4,), generator=g)
    loss_fn = lambda logits: F.cross_entropy(logits, y)  # noqa: E731
    assert_local_gradients_match_reference(chain, x, loss_fn, horizon)
    tables = {id(p) for n, p in model.named_parameters() if n.endswith("relative_position_bias_table")}
    assert [len(tables & {id(p) for p in params}) for params in chain.block_params] == [1, 1, 1, 1]  # one per block


# ---------------------------------------------------------------- BEiT's shared relative position bias
def test_shared_relative_position_bias_is_refused_before_training(tmp_path):
    args = training_args(tmp_path / "run", max_steps=1)
    with pytest.raises(ValueError, match="use_shared_relative_position_bias=True") as error:
        BPModifiedTrainer(model=tiny_model("beit_shared"), args=args, train_dataset=SyntheticImages(32))
    assert "unshare_relative_position_bias(model)" in str(error.value)


@pytest.mark.parametrize("use_relative_position_bias", [False, True])
def test_unshared_bias_computes_the_same_logits(use_relative_position_bias):
    """Each layer gets its own copy of the shared table (added to its own table where it has one): the same
    logits at the model's size and at another, non-square one."""
    model = tiny_model("beit_shared", use_relative_position_bias=use_relative_position_bias).double().eval()
    model = _randomise_position_bias(model)
    unshared = unshare_relative_position_bias(model)
    assert not unshared.config.use_shared_relative_position_bias and unshared.config.use_relative_position_bias
    assert model.config.use_shared_relative_position_bias  # the given model is left as it was
    tables = [p for n, p in unshared.named_parameters() if n.endswith("relative_position_bias_table")]
    assert len(tables) == model.config.num_hidden_layers and len({id(p) for p in tables}) == len(tables)
    for x in (torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.randn(2, 3, 24, 16, dtype=torch.float64)):
        with torch.no_grad():
            expected = model(pixel_values=x).logits
        got, logits = _chain_and_model_logits(unshared, x)
        torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_unshared_beit_trains_as_backprop_at_full_horizon_and_reloads(tmp_path):
    """The converted model is a plain per-layer BEiT: h >= T equals the plain Trainer on it, and what is saved
    reloads with no missing or unexpected keys and the same logits."""
    data = SyntheticImages(64)
    kw = dict(max_steps=3, max_grad_norm=1.0)

    def converted():
        return unshare_relative_position_bias(_randomise_position_bias(tiny_model("beit_shared")))

    reference = converted()
    Trainer(
        model=reference,
        args=training_args(tmp_path / "a", TrainingArguments, **kw),
        train_dataset=data,
    ).train()
    model = converted()
    args = training_args(tmp_path / "b", local_horizon=99, **kw)
    trainer = BPModifiedTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert max_param_diff(model, converted()) > 1e-4
    assert max_param_diff(model, reference) <= 1e-6
    trainer.save_model()
    reloaded, info = AutoModelForImageClassification.from_pretrained(str(tmp_path / "b"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(pixel_values=x).logits, model.eval()(pixel_values=x).logits)


def test_unshare_leaves_other_models_alone_and_refuses_wrappers():
    from peft import LoraConfig, get_peft_model

    beit = tiny_model("beit")
    assert unshare_relative_position_bias(beit) is beit  # no shared bias: nothing to do
    with pytest.raises(ValueError, match="for BEiT models"):
        unshare_relative_position_bias(tiny_model("deit"))
    wrapped = get_peft_model(tiny_model("beit_shared"), LoraConfig(r=2, target_modules=["classifier"]))
    with pytest.raises(ValueError, match="before `get_peft_model`"):
        unshare_relative_position_bias(wrapped)


# ---------------------------------------------------------------- heads, unused parameters, granularities
def test_auxiliary_heads_have_the_model_heads_structure_and_their_own_weights():
    for kind in ENCODERS + ["beit_shared"]:
        model = tiny_model(kind)
        if kind == "beit_shared":
            model = unshare_relative_position_bias(model)  # CLS pooling: a layer norm before the pooler
        adapter = get_adapter(model)
        heads = adapter.aux_heads(model, 1)
        own = adapter.head(model)
        assert sorted(heads) == ["1", "2", "3"]
        for head in heads.values():
            assert type(head) is type(own)
            own_shapes = [(n, p.shape) for n, p in own.named_parameters()]
            assert [(n, p.shape) for n, p in head.named_parameters()] == own_shapes, kind
            assert not {id(p) for p in head.parameters()} & {id(p) for p in model.parameters()}
    dinov2 = tiny_model("dinov2")
    assert get_adapter(dinov2).aux_head(dinov2, 0).classifier.in_features == 2 * 32  # CLS + mean of the patches


def test_dinov2_mask_token_gets_a_zero_gradient():
    """Classification never uses the pre-training mask token: its gradient is zero, as backprop's is."""
    model = tiny_model("dinov2").double().train()
    mask_token = model.dinov2.embeddings.mask_token
    with torch.no_grad():
        mask_token.normal_()
    chain = chain_of(model, 1)
    x, loss_fn = float64_batch()
    got = local_gradients(chain, x, loss_fn, 1)
    index = next(i for i, p in enumerate(chain.block_params[0]) if p is mask_token)
    assert torch.equal(got.local[0][index], torch.zeros_like(mask_token))
    assert got.local[0][0].abs().sum() > 0  # the other parameters of block 0 do learn


@pytest.mark.parametrize("kind", ["deit", "beit", "dinov2"])
@pytest.mark.parametrize("granularity", ["stage", "layer+stem"])
def test_encoders_refuse_granularities_they_do_not_have(kind, granularity):
    model = tiny_model(kind)
    with pytest.raises(ValueError, match=f"block_granularity='{granularity.replace('+', '.')}'") as error:
        get_adapter(model).chain(model, granularity=granularity)
    assert "Use 'layer'" in str(error.value)
