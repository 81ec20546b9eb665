"""The model side of ``examples/run_image_classification.py`` (``examples/image_classification_model.py`` and
``examples/image_classification_peft.py``), in process: building and loading models, the checks that refuse what
cannot work before any data is loaded, loading with the Hub offline or unreachable, and what a peft run saves
(reloaded with plain transformers/peft and compared logit for logit with the trained model).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from helpers import SHAPES, TINY_CONFIG, make_shape_folder, put_in_hub_cache, save_pretrained_vit, script_args
from huggingface_hub import constants
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    MobileNetV2Config,
    ViTConfig,
)

from hf_bpmod import BPModifiedTrainingArguments, get_adapter
from hf_bpmod.adapters import ADAPTERS, ResNetAdapter
from hf_bpmod.peft_from_config import ADAPTER_FILES, BASE_MODEL_DIR
from hf_bpmod.testing import tiny_vit

pytestmark = pytest.mark.compat  # loading models and configs, and peft's save and merge, vary across releases

LABELS = list(SHAPES)
# Logits of a model and of its saved-and-reloaded copy: the same float32 computation, with the adapters' low-rank
# products folded into the weights (a different summation order) for a merged model.
LOGIT_ATOL = 1e-5
TRANSFORMER_DEFAULTS = ("beit", "deit", "dinov2", "swin", "swinv2", "vit")
CONVNET_DEFAULTS = ("convnext", "convnextv2", "regnet", "resnet")


@pytest.fixture(scope="module")
def model_side(script) -> ModuleType:
    """``examples/image_classification_model.py``, as the script imported it (monkeypatches reach its calls)."""
    return importlib.import_module("image_classification_model")


@pytest.fixture(scope="module")
def peft_side(script) -> ModuleType:
    """``examples/image_classification_peft.py``, as the script imported it."""
    return importlib.import_module("image_classification_peft")


def pixels(n: int = 6, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(pixel_values=x).logits


def parse(script: ModuleType, argv: list[str]):
    parser = HfArgumentParser((script.ModelArguments, script.DataTrainingArguments, BPModifiedTrainingArguments))
    return parser.parse_args_into_dataclasses(args=argv)


def run_main(script: ModuleType, monkeypatch, argv: list[str]):
    """Run the script's ``main(argv)`` in this process; return the trainer it built."""
    built = []

    class Recording(script.ExampleTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(script, "ExampleTrainer", Recording)
    script.main(argv)
    assert len(built) == 1
    return built[0]


def common_args(out: Path) -> list[str]:
    return [*script_args(out), "--per_device_eval_batch_size", "64", "--learning_rate", "5e-3"]


# ------------------------------------------------------------------ supported models, refused early


def test_model_type_help_lists_the_registered_types(script):
    help_text = next(f for f in script.ModelArguments.__dataclass_fields__.values() if f.name == "model_type")
    text = help_text.metadata["help"]
    assert all(model_type in text for model_type in ADAPTERS)
    assert "any other" not in text and "--model_name_or_path for" not in text


def test_unsupported_model_type_is_refused_when_parsing(script, tmp_path):
    with pytest.raises(ValueError, match="--model_type 'mobilenet_v2' is not supported") as error:
        parse(script, ["--output_dir", str(tmp_path), "--model_type", "mobilenet_v2"])
    assert all(model_type in str(error.value) for model_type in ADAPTERS)


@pytest.mark.parametrize("argument", ["--model_name_or_path", "--config_name"])
def test_unsupported_model_is_refused_before_any_data_loads(script, tmp_path, monkeypatch, logging_restored, argument):
    """Only the config is read (the folder holds nothing else), and the error comes before the data: an empty folder
    here, whose loading would fail otherwise."""
    folder = tmp_path / "mobilenet"
    MobileNetV2Config(num_labels=3).save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    (tmp_path / "empty").mkdir()
    argv = [*common_args(tmp_path / "out"), argument, str(folder), "--dataset_name", str(tmp_path / "empty")]
    with pytest.raises(ValueError, match="'mobilenet_v2' model, which hf_bpmod cannot split into blocks") as error:
        run_main(script, monkeypatch, argv)
    assert f"{argument} '{folder}'" in str(error.value)
    assert f"Supported model types: {', '.join(sorted(ADAPTERS))}." in str(error.value)


# ------------------------------------------------------------------ models built from a config


@pytest.mark.parametrize("model_type", ["vit", "resnet"])
def test_from_config_default_model(script, model_side, model_type):
    model_args = script.ModelArguments(model_type=model_type)
    model, processor, image_size, mean, std = model_side.build_model(model_args, LABELS, native_size=28)
    defaults = model_side.SCRATCH_DEFAULTS[model_type]
    assert all(getattr(model.config, key) == value for key, value in defaults.items())
    assert model.config.num_channels == 3 and model.config.id2label == dict(enumerate(LABELS))
    assert image_size == 28 and model_side.image_size_from_processor(processor) == 28 and mean == std == [0.5] * 3
    if model_type == "vit":
        assert model.config.image_size == 28
    blocks = get_adapter(model).chain(model).num_blocks
    assert blocks == (defaults["num_hidden_layers"] if model_type == "vit" else sum(defaults["depths"]))
    assert logits(model, pixels(2, 28)).shape == (2, 3)


@pytest.mark.parametrize("model_type", TRANSFORMER_DEFAULTS)
@pytest.mark.parametrize("size", [16, 28, 32])
def test_small_default_config_of_each_transformer(model_side, model_type, size):
    """Each listed default builds and runs at the input sizes people bring (every stage holds a Swin window)."""
    config = model_side.scratch_config(model_type, {}, size, {"num_labels": 3})
    model_side.pin_image_classifier(config)
    model = AutoModelForImageClassification.from_config(config)
    assert config.image_size == size and logits(model, pixels(2, size)).shape == (2, 3)
    if model_type == "deit":  # the plain classifier, not the one with a distillation token
        assert type(model).__name__ == "DeiTForImageClassification"


@pytest.mark.parametrize("model_type", CONVNET_DEFAULTS)
@pytest.mark.parametrize("size", [16, 28, 32])
def test_small_default_config_of_each_convnet(model_side, model_type, size):
    config = model_side.scratch_config(model_type, {}, size, {"num_labels": 3})
    model = AutoModelForImageClassification.from_config(config)
    assert logits(model, pixels(2, size)).shape == (2, 3)


def test_every_scratch_default_is_tested(model_side):
    assert set(model_side.SCRATCH_DEFAULTS) == set(TRANSFORMER_DEFAULTS) | set(CONVNET_DEFAULTS)


def test_registered_type_without_a_default_starts_from_transformers_config(script, model_side, monkeypatch):
    monkeypatch.setitem(ADAPTERS, "mobilenet_v2", ResNetAdapter)  # registered: the example accepts the type
    model_args = script.ModelArguments(model_type="mobilenet_v2", config_overrides="depth_multiplier=0.35")
    model, _, image_size, _, _ = model_side.build_model(model_args, LABELS, native_size=20)
    assert model.config.image_size == image_size == 20 and model.config.depth_multiplier == 0.35
    assert model.config.num_labels == 3 and logits(model, pixels(2, 20)).shape == (2, 3)


def test_config_name_builds_a_model_from_that_config(script, model_side, tmp_path):
    folder = tmp_path / "config"
    ViTConfig(image_size=16, patch_size=4, hidden_size=24, num_hidden_layers=3, num_attention_heads=2).save_pretrained(
        folder
    )
    model, _, image_size, _, _ = model_side.build_model(
        script.ModelArguments(config_name=str(folder)), LABELS, native_size=28
    )
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.num_labels) == (24, 3, 3)
    assert image_size == model.config.image_size == 16  # the config's size, not the images'
    model, _, image_size, _, _ = model_side.build_model(
        script.ModelArguments(config_name=str(folder), image_size=32), LABELS, native_size=28
    )
    assert image_size == model.config.image_size == 32
    with pytest.raises(ValueError, match="--config_overrides only applies to a model built from --model_type"):
        script.ModelArguments(config_name=str(folder), config_overrides="hidden_size=8")
    with pytest.raises(ValueError, match="not both"):
        script.ModelArguments(config_name=str(folder), model_type="vit")


# ------------------------------------------------------------------ pretrained models


def test_mismatched_head_needs_ignore_mismatched_sizes(script, model_side, tmp_path):
    pretrained = save_pretrained_vit(tmp_path / "vit5", num_labels=5)
    saved = AutoModelForImageClassification.from_pretrained(pretrained)
    with pytest.raises(ValueError, match="Pass --ignore_mismatched_sizes") as error:
        model_side.build_model(script.ModelArguments(model_name_or_path=str(pretrained)), LABELS, native_size=16)
    assert "classifier.weight" in str(error.value) and "3 classes" in str(error.value)

    model_args = script.ModelArguments(model_name_or_path=str(pretrained), ignore_mismatched_sizes=True)
    model, *_ = model_side.build_model(model_args, LABELS, native_size=16)
    assert model.classifier.weight.shape == (3, 32) and model.config.id2label == dict(enumerate(LABELS))
    for name, value in saved.vit.state_dict().items():  # the backbone is the pretrained one
        assert torch.equal(model.vit.state_dict()[name], value), name

    # A head that fits loads as it is, without the flag.
    five = [f"c{i}" for i in range(5)]
    model, *_ = model_side.build_model(script.ModelArguments(model_name_or_path=str(pretrained)), five, native_size=16)
    assert torch.equal(model.classifier.weight, saved.classifier.weight)

    # Another input size changes the position embeddings: also a mismatch, named as such.
    with pytest.raises(ValueError, match="--image_size 32 is not the pretrained image_size 16"):
        model_side.build_model(
            script.ModelArguments(model_name_or_path=str(pretrained), image_size=32), five, native_size=16
        )


def test_trust_remote_code_reaches_every_load(script, model_side, tmp_path, monkeypatch):
    pretrained = save_pretrained_vit(tmp_path / "vit")
    seen: list[tuple[str, object]] = []
    for cls in (AutoConfig, AutoImageProcessor, AutoModelForImageClassification):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _name=cls.__name__, _original=original, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code", "missing")))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    for trust in (False, True):
        seen.clear()
        model_args = script.ModelArguments(model_name_or_path=str(pretrained), trust_remote_code=trust)
        model_side.build_model(model_args, LABELS, native_size=16)
        assert sorted(name for name, _ in seen) == [
            "AutoConfig",
            "AutoImageProcessor",
            "AutoModelForImageClassification",
        ]
        assert all(value is trust for _, value in seen), seen


def test_code_in_a_model_folder_does_not_run_by_default(script, model_side, tmp_path, monkeypatch):
    pretrained = save_pretrained_vit(tmp_path / "vit")
    marker = tmp_path / "code-ran"
    (pretrained / "configuration_marker.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import ViTConfig\n\n\n"
        "class MarkerConfig(ViTConfig):\n    pass\n"
    )
    config = json.loads((pretrained / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_marker.MarkerConfig"}
    (pretrained / "config.json").write_text(json.dumps(config))
    access = model_side.model_hub_access(script.ModelArguments(model_name_or_path=str(pretrained)))
    model_side.check_model_source(script.ModelArguments(model_name_or_path=str(pretrained)), access)
    model, *_ = model_side.build_model(
        script.ModelArguments(model_name_or_path=str(pretrained)), LABELS, native_size=16
    )
    assert type(model.config).__name__ == "ViTConfig" and not marker.exists()


# ------------------------------------------------------------------ the Hub: offline, unreachable


def test_offline_name_not_in_the_cache_says_how_to_run_offline(script, model_side, tmp_path):
    assert constants.HF_HUB_OFFLINE  # conftest.py
    model_args = script.ModelArguments(model_name_or_path="hf-bpmod-tests/not-cached", cache_dir=str(tmp_path))
    access = model_side.model_hub_access(model_args)
    assert access.problem is not None and "HF_HUB_OFFLINE" in access.problem
    with pytest.raises(OSError, match="--model_name_or_path 'hf-bpmod-tests/not-cached' is neither a local") as error:
        model_side.check_model_source(model_args, access)
    assert "HF_HUB_OFFLINE=1" in str(error.value) and "local folder" in str(error.value)


def test_unreachable_hub_fails_at_once_with_the_offline_fix(script, model_side, tmp_path, unreachable_hub):
    model_args = script.ModelArguments(model_name_or_path="hf-bpmod-tests/not-cached", cache_dir=str(tmp_path))
    access = model_side.model_hub_access(model_args)
    assert len(unreachable_hub) == 1 and "Connect" in unreachable_hub[0]  # one try, a refused connection
    assert access.kwargs["local_files_only"] is True and "unreachable" in access.problem
    with pytest.raises(OSError, match="is neither a local folder nor in the local Hugging Face cache") as error:
        model_side.check_model_source(model_args, access)
    message = str(error.value)
    assert "the Hub (http://127.0.0.1:" in message and "HF_HUB_OFFLINE=1" in message
    assert "HF_HUB_ETAG_TIMEOUT" in message


def test_unreachable_hub_loads_a_cached_model_at_once(script, model_side, tmp_path, unreachable_hub):
    cache = tmp_path / "cache"
    put_in_hub_cache(cache, "hf-bpmod-tests/tiny-vit", save_pretrained_vit(tmp_path / "vit"))
    model_args = script.ModelArguments(model_name_or_path="hf-bpmod-tests/tiny-vit", cache_dir=str(cache))
    access = model_side.model_hub_access(model_args)
    model_side.check_model_source(model_args, access)
    model, _, image_size, *_ = model_side.build_model(model_args, LABELS, native_size=16, access=access)
    saved = AutoModelForImageClassification.from_pretrained(tmp_path / "vit")
    assert image_size == 16 and torch.equal(model.vit.embeddings.cls_token, saved.vit.embeddings.cls_token)
    assert len(unreachable_hub) == 1


def test_local_paths_never_try_the_hub(script, model_side, tmp_path, unreachable_hub):
    model_args = script.ModelArguments(model_name_or_path=str(save_pretrained_vit(tmp_path / "vit")))
    access = model_side.model_hub_access(model_args)
    assert unreachable_hub == [] and access.problem is None and "local_files_only" not in access.kwargs


# ------------------------------------------------------------------ what a peft run saves


def test_peft_on_a_model_from_a_config_saves_what_reloads(
    script, peft_side, tmp_path, monkeypatch, logging_restored, capsys, caplog
):
    """A LoRA run on a ViT built from a config: the output folder holds the merged model, which plain transformers
    reloads with the trained model's logits; each checkpoint holds the adapter naming the saved untrained base, which
    plain peft reloads with the logits of the model at that step; resuming builds on that base."""
    from peft import PeftModel

    out = tmp_path / "out"
    argv = [
        *common_args(out), "--model_type", "vit", "--config_overrides", TINY_CONFIG,
        "--dataset_name", str(make_shape_folder(tmp_path / "images", per_class=12)), "--peft", "lora", "--peft_rank", "2",
        "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--bp_modified", "false",
    ]  # fmt: skip
    trainer = run_main(script, monkeypatch, argv)
    stdout = capsys.readouterr().out
    x = pixels(6)
    trained = logits(trainer.model, x)

    # The output folder: the merged model, a plain transformers model, and no adapter files.
    assert not any((out / name).exists() for name in ADAPTER_FILES)
    merged, info = AutoModelForImageClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert merged.config.id2label == dict(enumerate(LABELS))
    torch.testing.assert_close(logits(merged, x), trained, atol=LOGIT_ATOL, rtol=0)
    assert AutoImageProcessor.from_pretrained(out).size["height"] == 16
    assert f"Saved the trained model to {out}, the lora adapters merged" in caplog.text
    assert stdout.count("final eval accuracy:") == 1

    # The base: the untrained weights, which training left alone (LoRA trains only the adapters and the head).
    base_dir = out / BASE_MODEL_DIR
    base = AutoModelForImageClassification.from_pretrained(base_dir)
    patch = "vit.embeddings.patch_embeddings.projection.weight"
    assert torch.equal(base.state_dict()[patch], trainer.model.get_base_model().state_dict()[patch])
    assert (logits(base, x) - trained).abs().max() > 100 * LOGIT_ATOL  # and the adapters did learn something

    # The last checkpoint: the adapter on that base, reloaded with plain peft.
    checkpoint = out / "checkpoint-4"
    adapter_config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base_dir.resolve())
    reloaded = PeftModel.from_pretrained(
        AutoModelForImageClassification.from_pretrained(adapter_config["base_model_name_or_path"]), checkpoint
    )
    torch.testing.assert_close(logits(reloaded, x), trained, atol=LOGIT_ATOL, rtol=0)

    # Resuming from the first checkpoint trains on the saved base and ends where the first run ended.
    resumed = run_main(script, monkeypatch, [*argv, "--resume_from_checkpoint", str(out / "checkpoint-2")])
    assert f"Loaded the untrained base weights of the run from {base_dir.resolve()}" in caplog.text
    torch.testing.assert_close(logits(resumed.model, x), trained, atol=1e-4, rtol=0)

    # Starting from scratch in the same folder would orphan the checkpoints' base: refused.
    with pytest.raises(ValueError, match="would replace .*_base_model"):
        run_main(script, monkeypatch, argv)


def test_peft_base_plan_applies_to_peft_training_on_a_model_from_a_config(script, peft_side, tmp_path):
    """The base plan (tests/test_peft_from_config.py) is made only for peft training on a model from a config."""
    model_args = script.ModelArguments(model_type="vit", peft="lora")
    args = SimpleNamespace(do_train=True, push_to_hub=False, hub_strategy="every_save", output_dir=str(tmp_path))
    assert peft_side.peft_base_plan(model_args, args, None) == (None, str(tmp_path / BASE_MODEL_DIR))
    assert peft_side.peft_base_plan(script.ModelArguments(model_type="vit"), args, None) == (None, None)
    not_training = SimpleNamespace(**{**vars(args), "do_train": False})
    assert peft_side.peft_base_plan(model_args, not_training, None) == (None, None)
    pretrained = script.ModelArguments(model_name_or_path=str(tmp_path), peft="lora")
    assert peft_side.peft_base_plan(pretrained, args, None) == (None, None)
    with pytest.raises(ValueError, match="Pass --hub_strategy end"):
        peft_side.peft_base_plan(model_args, SimpleNamespace(**{**vars(args), "push_to_hub": True}), None)


def test_resume_base_weights_are_loaded_not_rebuilt(script, model_side, tmp_path):
    base = tiny_vit(num_layers=2, image_size=16, num_labels=3, seed=5)
    base.config.id2label, base.config.label2id = dict(enumerate(LABELS)), {n: i for i, n in enumerate(LABELS)}
    base.save_pretrained(tmp_path / "base")
    model_args = script.ModelArguments(model_type="vit", config_overrides=TINY_CONFIG, peft="lora")
    model, *_ = model_side.build_model(model_args, LABELS, native_size=16, base_model_dir=str(tmp_path / "base"))
    torch.testing.assert_close(logits(model, pixels()), logits(base, pixels()), atol=0, rtol=0)
    with pytest.raises(ValueError, match="were built for the labels"):
        model_side.build_model(model_args, ["a", "b", "c"], native_size=16, base_model_dir=str(tmp_path / "base"))
