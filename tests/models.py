"""Model factories shared by the tests (tiny, from configs, optionally peft-wrapped)."""

from __future__ import annotations

from peft import LoKrConfig, LoraConfig, get_peft_model

from hf_bpmod import get_adapter
from hf_bpmod.testing import emulate_legacy_vit_layout, tiny_resnet, tiny_vit

KINDS = ["vit", "vit_legacy", "resnet", "resnet_stem", "resnet_stage", "vit_lora", "resnet_lokr"]


def lora_vit(num_layers: int = 4, **kw):
    model = tiny_vit(num_layers=num_layers, **kw)
    targets = get_adapter(model).peft_target_modules(model)  # q_proj/v_proj, or query/value before transformers 5.9
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=targets, modules_to_save=["classifier"], init_lora_weights=False
    )
    return get_peft_model(model, config)


def lokr_resnet(**kw):
    model = tiny_resnet(**kw)
    config = LoKrConfig(
        r=2, alpha=4, target_modules=["convolution"], modules_to_save=["classifier"], init_weights=False
    )
    return get_peft_model(model, config)


def make(kind: str):
    """``(model, granularity)`` for a test kind."""
    if kind == "vit":
        return tiny_vit(num_layers=4), "layer"
    if kind == "vit_legacy":
        return tiny_vit(num_layers=4), "layer"
    if kind == "resnet":
        return tiny_resnet(depths=(2, 2)), "layer"
    if kind == "resnet_stem":
        return tiny_resnet(depths=(2, 2)), "layer+stem"
    if kind == "resnet_stage":
        return tiny_resnet(depths=(2, 1, 1)), "stage"
    if kind == "vit_lora":
        return lora_vit(), "layer"
    if kind == "resnet_lokr":
        return lokr_resnet(), "layer"
    raise KeyError(kind)


__all__ = ["KINDS", "emulate_legacy_vit_layout", "lokr_resnet", "lora_vit", "make"]
