"""ConvNeXt, ConvNeXt V2 and RegNet adapters beyond the checks every architecture passes: each block granularity is
the model (logits, and BatchNorm statistics in training mode) with local gradients equal to autograd, auxiliary
heads fit their block's width, the layout of transformers < 5 splits the same, bad granularities are refused, and
the gradients they accumulate keep their parameters' memory layout (which torch's fused Adam relies on)."""

import copy

import pytest
import torch
from helpers import assert_local_gradients_match_reference, chain_of, float64_batch
from peft import LoraConfig, get_peft_model
from torch import nn

from hf_bpmod import get_adapter, local_gradients
from hf_bpmod.adapters import ConvNextAdapter, ConvNextV2Adapter, RegNetAdapter
from hf_bpmod.adapters.convnext import ConvNextHead
from hf_bpmod.testing import tiny_model

pytestmark = pytest.mark.compat  # the adapters find the layers by structure, which moves across releases

CONV_KINDS = ["convnext", "convnextv2", "regnet"]
GRANULARITIES = ["layer", "layer+stem", "stage"]
#: Three stages of unequal depth, so that "stage" gives three blocks and stage 1 has a downsampling and two layers.
THREE_STAGES = {
    "convnext": dict(num_stages=3, hidden_sizes=[8, 16, 24], depths=[1, 2, 1]),
    "convnextv2": dict(num_stages=3, hidden_sizes=[8, 16, 24], depths=[1, 2, 1]),
    "regnet": dict(hidden_sizes=[8, 16, 24], depths=[1, 2, 1]),
}
NUM_BLOCKS = {"layer": 4, "layer+stem": 5, "stage": 3}


def _model(kind, image_size=16):
    model = tiny_model(kind, image_size=image_size, **THREE_STAGES[kind]).double()
    if kind == "convnextv2":  # GRN starts at zero (the identity); give it weights so that its gradients are tested
        for name, p in model.named_parameters():
            if ".grn." in name:
                nn.init.normal_(p, std=0.5)
    return model


def test_registered_adapters():
    assert type(get_adapter(tiny_model("convnext"))) is ConvNextAdapter
    assert type(get_adapter(tiny_model("convnextv2"))) is ConvNextV2Adapter
    assert type(get_adapter(tiny_model("regnet"))) is RegNetAdapter


@pytest.mark.parametrize("kind", CONV_KINDS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("image_size", [16, 28, 32])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_chain_is_the_model(kind, granularity, image_size, mode):
    """The blocks reproduce the model's logits, in training mode its BatchNorm running statistics too, and every
    auxiliary head reads its block's output (its input width is that output's channels)."""
    model = getattr(_model(kind, image_size), mode)()
    reference = copy.deepcopy(model)
    chain = chain_of(model, 1, granularity)
    assert chain.num_blocks == NUM_BLOCKS[granularity]
    assert not chain.uncovered_parameters(model)
    x, _ = float64_batch(image_size)
    with torch.no_grad():
        outputs = chain.block_outputs(x)
        torch.testing.assert_close(chain.heads[-1](outputs[-1]), reference(pixel_values=x).logits, rtol=0, atol=0)
        for s, out in enumerate(outputs[:-1], start=1):
            assert out.dim() == 4 and chain.heads[s - 1](out).shape == (len(x), 5)
    for a, b in zip(model.buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind", CONV_KINDS)
@pytest.mark.parametrize("granularity", ["layer+stem", "stage"])
@pytest.mark.parametrize("horizon", [1, 2, "T"])
def test_local_gradients_match_autograd_at_each_granularity(kind, granularity, horizon):
    """Block t's streamed gradient equals plain autograd of L(x_{min(t+h, T)}) on a fresh forward (eq. 4)."""
    model = _model(kind).train()
    h = NUM_BLOCKS[granularity] if horizon == "T" else horizon
    chain = chain_of(model, h, granularity)
    x, loss_fn = float64_batch()
    assert_local_gradients_match_reference(chain, x, loss_fn, h)


def _names(model, block):
    ids = {id(p) for p in block.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("kind", ["convnext", "convnextv2"])
def test_convnext_split(kind):
    """'layer': the embeddings join stage 0's first layer, a stage's downsampling its first layer; 'stage': one block
    per stage, the embeddings in block 0; 'layer+stem': the embeddings alone."""
    model = _model(kind)
    adapter = get_adapter(model)
    stages = f"{kind}.encoder.stages"
    layer = [_names(model, b) for b in adapter.blocks(model, "layer")]
    assert {n.split(".")[1] for n in layer[0]} == {"embeddings", "encoder"}
    assert all(n.startswith((f"{kind}.embeddings.", f"{stages}.0.layers.0.")) for n in layer[0])
    assert all(n.startswith((f"{stages}.1.downsampling_layer.", f"{stages}.1.layers.0.")) for n in layer[1])
    assert any("downsampling_layer" in n for n in layer[1])
    assert all(n.startswith(f"{stages}.1.layers.1.") for n in layer[2])
    assert all(n.startswith((f"{stages}.2.downsampling_layer.", f"{stages}.2.layers.0.")) for n in layer[3])
    stem = [_names(model, b) for b in adapter.blocks(model, "layer+stem")]
    assert all(n.startswith(f"{kind}.embeddings.") for n in stem[0]) and stem[1:] == [layer[0] - stem[0]] + layer[1:]
    stage = [_names(model, b) for b in adapter.blocks(model, "stage")]
    assert stage == [layer[0], layer[1] | layer[2], layer[3]]
    head = adapter.aux_head(model, 0)
    assert isinstance(head, ConvNextHead) and isinstance(head.layernorm, nn.LayerNorm)
    assert head.layernorm.normalized_shape == (8,) and head.classifier.in_features == 8
    assert not set(map(id, head.parameters())) & set(map(id, model.parameters())), "independent weights"


def test_regnet_split():
    """RegNet splits as a ResNet: the embedder joins the first layer, each later layer is a block."""
    model = _model("regnet")
    adapter = get_adapter(model)
    layer = [_names(model, b) for b in adapter.blocks(model, "layer")]
    assert all(n.startswith(("regnet.embedder.", "regnet.encoder.stages.0.layers.0.")) for n in layer[0])
    assert all(n.startswith("regnet.encoder.stages.1.layers.0.") for n in layer[1])
    assert all(n.startswith("regnet.encoder.stages.1.layers.1.") for n in layer[2])
    assert all(n.startswith("regnet.encoder.stages.2.layers.0.") for n in layer[3])
    head = adapter.aux_head(model, 0, "layer+stem")  # the stem's output: embedding_size channels
    assert [type(m) for m in head] == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear]
    assert head[2].in_features == model.config.embedding_size


def _emulate_legacy_convnext_layout(model):
    """transformers < 5: a stage's downsampling is an ``nn.Sequential`` (``nn.Identity`` where it keeps the size)
    and its layers an ``nn.Sequential``. Only the chain runs afterwards (the model's own forward may not)."""
    for stage in model.base_model.encoder.stages:
        if isinstance(stage.downsampling_layer, nn.ModuleList):
            parts = list(stage.downsampling_layer)
            stage.downsampling_layer = nn.Sequential(*parts) if parts else nn.Identity()
            stage.layers = nn.Sequential(*stage.layers)
    return model


@pytest.mark.parametrize("kind", ["convnext", "convnextv2"])
@pytest.mark.parametrize("granularity", ["layer", "layer+stem"])  # "stage" runs each release's own stage forward
def test_the_layout_of_transformers_4_splits_the_same(kind, granularity):
    model = _model(kind).eval()
    x, _ = float64_batch()
    with torch.no_grad():
        expected = model(pixel_values=x).logits
        chain = chain_of(_emulate_legacy_convnext_layout(model), 1, granularity)
        assert chain.num_blocks == NUM_BLOCKS[granularity] and not chain.uncovered_parameters(model)
        torch.testing.assert_close(chain.forward(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", CONV_KINDS)
@pytest.mark.parametrize("granularity", ["block", "layers", None])
def test_unknown_granularity_is_refused(kind, granularity):
    model = tiny_model(kind)
    with pytest.raises(ValueError, match="block_granularity.*'layer', 'layer\\+stem' or 'stage'"):
        get_adapter(model).blocks(model, granularity)


@pytest.mark.parametrize("kind", ["convnext", "convnextv2"])
def test_convnext_lora_targets_every_pointwise_layer(kind):
    model = _model(kind).float()
    targets = get_adapter(model).peft_target_modules(model)
    peft_model = get_peft_model(model, LoraConfig(r=1, lora_alpha=4, target_modules=targets))
    wrapped = {name.rsplit(".", 1)[-1] for name, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    count = sum(hasattr(m, "lora_A") for m in peft_model.modules())
    assert wrapped == {"pwconv1", "pwconv2"} and count == 2 * sum(THREE_STAGES[kind]["depths"])


@pytest.mark.parametrize("rank", [1, 2])
def test_regnet_lora_targets_every_ungrouped_convolution(rank):
    """Grouped convolutions (here groups 2 and 3) are left out: peft's LoRA needs the rank divisible by the groups."""
    model = _model("regnet").float()
    targets = get_adapter(model).peft_target_modules(model)
    convolutions = {name: m for name, m in model.named_modules() if name.endswith(".convolution")}
    assert {m.groups for m in convolutions.values()} == {1, 2, 3}
    peft_model = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    )
    wrapped = {
        name.removeprefix("base_model.model.") for name, m in peft_model.named_modules() if hasattr(m, "lora_A")
    }
    assert wrapped == {name for name, m in convolutions.items() if m.groups == 1} == set(targets)
    assert "regnet.embedder.embedder.convolution" in wrapped
    assert any(".shortcut." in name for name in wrapped)
    x, loss_fn = float64_batch()
    chain = chain_of(peft_model.double(), 1, "layer")
    got = local_gradients(chain, x, loss_fn, 1)
    assert all(g.abs().sum() > 0 for gs in got.local for g in gs), "every LoRA weight of a block learns"


@pytest.mark.parametrize("kind", ["convnext", "regnet"])
@pytest.mark.parametrize("horizon", [1, "T"])
def test_accumulated_gradients_have_the_parameters_layout(kind, horizon):
    """A ConvNeXt downsampling convolution reads a permuted (channels-last) view, so autograd returns its weight
    gradient channels-last; in ``.grad`` it must have the parameter's strides, as ``backward`` leaves it, or torch's
    fused Adam (the Trainer's default optimizer) updates the wrong elements."""
    model = _model(kind).float().train()
    h = NUM_BLOCKS["layer"] if horizon == "T" else horizon
    adapter = get_adapter(model)
    chain = adapter.chain(model, adapter.aux_heads(model, h))
    x, loss_fn = float64_batch()
    local_gradients(chain, x.float(), loss_fn, h, accumulate=True)
    params = [p for ps in chain.block_params + chain.head_params for p in ps]
    assert all(p.grad is not None and p.grad.stride() == p.stride() for p in params)
    reference = [nn.Parameter(p.detach().clone()) for p in params]
    for r, p in zip(reference, params, strict=True):
        r.grad = p.grad.contiguous()
    torch.optim.AdamW(reference, lr=1e-3, foreach=False).step()
    torch.optim.AdamW(params, lr=1e-3, fused=True).step()
    for p, r in zip(params, reference, strict=True):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-8)
