"""The block-by-block forward reproduces the model's own logits, for every supported layout."""

import re

import pytest
import torch
from helpers import KINDS, make
from torch import nn

from hf_bpmod import get_adapter
from hf_bpmod.adapters import ADAPTERS, register_adapter, unwrap_model
from hf_bpmod.testing import emulate_legacy_vit_layout

pytestmark = pytest.mark.compat  # the adapters find layers by structure and unwrap peft, which move across releases


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_block_forward_reproduces_logits(kind, mode):
    model, granularity = make(kind)
    getattr(model, mode)()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    if kind == "vit_legacy":
        emulate_legacy_vit_layout(unwrap_model(model))
        assert not hasattr(unwrap_model(model).vit, "layers")
    adapter = get_adapter(model)
    chain = adapter.chain(model, adapter.aux_heads(model, 1, granularity), granularity)
    with torch.no_grad():
        got = chain(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_block_counts_and_parameters_partition():
    model, _ = make("resnet")
    adapter = get_adapter(model)
    assert adapter.chain(model).num_blocks == 4  # embedder + layer 0, then 3 more residual layers
    stage_chain = adapter.chain(model, granularity="stage")
    assert stage_chain.num_blocks == 2
    # every trainable parameter of the model sits in exactly one block or in the head
    chain = adapter.chain(model)
    ids = [id(p) for p in chain.trainable_parameters()]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}


def test_stem_as_its_own_block():
    model, _ = make("resnet_stem")
    adapter = get_adapter(model)
    chain = adapter.chain(model, granularity="layer+stem")
    assert chain.num_blocks == 5  # the embedder, then the 4 residual layers
    stem = {id(p) for p in unwrap_model(model).resnet.embedder.parameters()}
    assert {id(p) for p in chain.block_params[0]} == stem
    heads = adapter.aux_heads(model, horizon=1, granularity="layer+stem")
    assert heads["1"][-1].in_features == model.config.embedding_size  # the stem's output width
    assert heads["2"][-1].in_features == model.config.hidden_sizes[0]
    vit, _ = make("vit")
    with pytest.raises(ValueError, match="'layer\\+stem'` is for ResNets"):
        get_adapter(vit).chain(vit, granularity="layer+stem")


def test_peft_blocks_hold_only_adapter_weights():
    model, _ = make("vit_lora")
    chain = get_adapter(model).chain(model)
    for params in chain.block_params[1:]:
        assert params and all(p.requires_grad for p in params)
        assert all("lora" in n for n, p in model.named_parameters() if any(p is q for q in params))


def test_aux_heads_are_independent_and_shaped_like_the_head():
    model, _ = make("resnet_stage")
    adapter = get_adapter(model)
    heads = adapter.aux_heads(model, horizon=1, granularity="stage")
    assert sorted(heads.keys(), key=int) == ["1", "2"]  # outputs of blocks 0 and 1 (T = 3)
    assert heads["1"][-1].in_features == 8 and heads["2"][-1].in_features == 16  # follow the stage widths
    head_ids = {id(p) for p in heads.parameters()}
    assert not head_ids & {id(p) for p in model.parameters()}
    assert "2" not in adapter.aux_heads(model, horizon=3, granularity="stage")  # h >= T: no aux head at all
    assert list(adapter.aux_heads(model, horizon=2, granularity="stage").keys()) == ["2"]


def test_unsupported_model_error_lists_supported_types():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    )
    supported = re.escape(", ".join(sorted(ADAPTERS)))  # every registered type, in order
    with pytest.raises(ValueError, match=rf"model_type='bert'.*Supported model types: {supported}\."):
        get_adapter(model)


def test_registry_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_adapter("vit")(type("Dup", (), {}))
    assert set(ADAPTERS) >= {"vit", "resnet"}


def test_legacy_vit_without_layer_list_fails_clearly():
    model, _ = make("vit")
    parent = model.vit if hasattr(model.vit, "layers") else model.vit.encoder  # `vit.encoder.layer` before 5.9
    name = "layers" if parent is model.vit else "layer"
    setattr(parent, name, nn.ModuleList(list(getattr(parent, name))[:2]))
    with pytest.raises(ValueError, match="Could not find the 4 encoder layers"):
        get_adapter(model).chain(model)
