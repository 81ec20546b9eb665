"""PEFT on a model built from a config (:mod:`hf_bpmod.peft_from_config`): the merged save reloads with plain
transformers and the trained model's logits, and the plan for the untrained base saves it once, finds it again on
resume, and refuses what would orphan a run's checkpoints."""

import json

import pytest
import torch
from peft import LoKrConfig, LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForImageClassification

from hf_bpmod import get_adapter
from hf_bpmod.peft_from_config import ADAPTER_FILES, BASE_MODEL_DIR, base_for_resume, plan_base, save_merged_model
from hf_bpmod.testing import tiny_model

pytestmark = pytest.mark.compat  # peft's merge and save vary across releases

# Logits of a model and of its merged copy: the adapters' low-rank products folded into the weights sum in another order.
LOGIT_ATOL = 1e-5


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(pixel_values=x).logits


@pytest.mark.parametrize("method", ["lora", "lokr"])
@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_merged_save_reloads_with_plain_transformers(tmp_path, method, kind):
    torch.manual_seed(0)
    base = tiny_model(kind, num_labels=3)
    targets, head = get_adapter(base).peft_target_modules(base), ["classifier"]
    config = (
        LoraConfig(r=2, lora_alpha=4, target_modules=targets, modules_to_save=head)
        if method == "lora"
        else LoKrConfig(r=2, alpha=4, target_modules=targets, modules_to_save=head)
    )
    model = get_peft_model(base, config)
    with torch.no_grad():  # trained-looking adapters and head (peft starts the adapters as an identity)
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = logits(model, x)
    (tmp_path / "adapter_config.json").write_text("{}")  # left by an earlier adapter save: must go
    save_merged_model(model, str(tmp_path))
    assert not any((tmp_path / name).exists() for name in ADAPTER_FILES)
    reloaded, info = AutoModelForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(logits(reloaded, x), expected, atol=LOGIT_ATOL, rtol=0)
    with model.disable_adapter():  # the adapters changed the function: the merge is tested, not a no-op
        assert (logits(model, x) - expected).abs().max() > 100 * LOGIT_ATOL
    assert any(method in name for name, _ in model.named_parameters())  # the trainer's model kept its adapters


def test_a_new_run_saves_the_base_in_its_output_dir_once(tmp_path):
    assert plan_base(str(tmp_path / "new"), None) == (None, str(tmp_path / "new" / BASE_MODEL_DIR))
    (tmp_path / "checkpoint-2").mkdir()
    assert plan_base(str(tmp_path), None) == (None, str(tmp_path / BASE_MODEL_DIR))  # checkpoints, but no base yet
    (tmp_path / BASE_MODEL_DIR).mkdir()
    with pytest.raises(ValueError, match="would replace .*_base_model.* --resume_from_checkpoint last"):
        plan_base(str(tmp_path), None)


@pytest.mark.parametrize("strategy", ["every_save", "checkpoint", "all_checkpoints"])
def test_hub_pushes_of_checkpoint_adapters_are_refused(tmp_path, strategy):
    with pytest.raises(ValueError, match=f"--hub_strategy {strategy} would also upload.*Pass --hub_strategy end"):
        plan_base(str(tmp_path), None, push_to_hub=True, hub_strategy=strategy)
    assert plan_base(str(tmp_path), None, push_to_hub=True, hub_strategy="end")[1] is not None


def test_resume_finds_the_base_its_adapters_name_else_the_one_beside_it(tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    elsewhere = tmp_path / "elsewhere"
    AutoConfig.for_model("vit").save_pretrained(elsewhere)
    (checkpoint / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(elsewhere)}))
    assert plan_base(str(tmp_path), str(checkpoint)) == (str(elsewhere), None)
    (checkpoint / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/moved/away"}))
    with pytest.raises(ValueError, match="/moved/away or .*_base_model, which hold no model"):
        base_for_resume(str(checkpoint))
    AutoConfig.for_model("vit").save_pretrained(tmp_path / BASE_MODEL_DIR)  # an output_dir that was moved
    assert base_for_resume(str(checkpoint)) == str(tmp_path / BASE_MODEL_DIR)
