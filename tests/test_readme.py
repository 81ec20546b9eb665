"""The README's quick start runs as pasted.

Every ```python block of README.md is executed, in order, in one namespace, with only the downloads replaced:
``datasets.load_dataset`` returns a small local ``DatasetDict`` with the columns of ``uoft-cs/cifar10`` (``img``,
``label`` with its ten class names), ``AutoImageProcessor.from_pretrained`` a local image processor, and
``AutoModelForImageClassification.from_pretrained`` a small ResNet built from a config with the same keyword
arguments. Everything else (the hf_bpmod helpers, the arguments, the trainer, evaluation, saving) is the real thing.
"""

from __future__ import annotations

import re
from pathlib import Path

import datasets
import numpy as np
import pytest
import transformers
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# 320 training images: five steps of 64 an epoch (a ResNet gets the offset, its B' chosen from them).
N_TRAIN, N_TEST, SIDE = 320, 40, 32


def readme_python_blocks(text: str) -> list[str]:
    """The contents of the README's ```python fenced blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def fake_cifar10(*args, **kwargs) -> datasets.DatasetDict:
    """Random RGB images with labels, in the layout of ``load_dataset("uoft-cs/cifar10")``."""
    assert args == ("uoft-cs/cifar10",), args
    rng = np.random.default_rng(0)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CIFAR10_NAMES)})

    def split(n: int) -> datasets.Dataset:
        images = [Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)) for _ in range(n)]
        labels = rng.integers(0, len(CIFAR10_NAMES), n).tolist()
        return datasets.Dataset.from_dict({"img": images, "label": labels}, features=features)

    return datasets.DatasetDict({"train": split(N_TRAIN), "test": split(N_TEST)})


def fake_image_processor(name: str, *args, **kwargs):
    """A local processor with ImageNet's mean and std, as ``microsoft/resnet-50``'s."""
    assert name == "microsoft/resnet-50", name
    try:
        from transformers import ViTImageProcessorPil as processor_cls  # transformers >= 5 without torchvision
    except ImportError:
        from transformers import ViTImageProcessor as processor_cls
    return processor_cls(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def fake_resnet(name: str, *args, ignore_mismatched_sizes: bool = False, **config_kwargs):
    """A 2-block ResNet from a config, taking the README's label arguments as ``from_pretrained`` would."""
    assert name == "microsoft/resnet-50", name
    config = transformers.ResNetConfig(
        embedding_size=4, hidden_sizes=[4, 8], depths=[1, 1], layer_type="basic", **config_kwargs
    )
    return transformers.ResNetForImageClassification(config)


@pytest.fixture
def offline_stand_ins(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", fake_cifar10)
    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", staticmethod(fake_image_processor))
    monkeypatch.setattr(transformers.AutoModelForImageClassification, "from_pretrained", staticmethod(fake_resnet))
    return tmp_path


def test_the_readme_has_one_quick_start_that_keeps_the_raw_columns():
    blocks = readme_python_blocks(README.read_text())
    assert blocks, "README.md has no ```python block"
    code = "\n".join(blocks)
    assert 'load_dataset("uoft-cs/cifar10")' in code
    assert "remove_unused_columns=False" in code
    for helper in ("with_pixel_values", "collate_fn", "compute_accuracy_metrics"):
        assert helper in code


def test_the_readme_quick_start_trains_evaluates_and_saves(offline_stand_ins, capsys):
    code = "\n".join(readme_python_blocks(README.read_text()))
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, str(README), "exec"), namespace)

    trainer = namespace["trainer"]
    assert trainer.state.global_step == 3 * (N_TRAIN // 64)  # 3 epochs of 5 steps
    assert trainer.bp_modified  # a ResNet trains with the offset by default
    refreshes = (offline_stand_ins / trainer.args.output_dir / trainer.args.offset_log_file).read_text().splitlines()
    assert len(refreshes) == 3  # one refresh per epoch
    evaluations = [entry for entry in trainer.state.log_history if "eval_accuracy" in entry]
    assert len(evaluations) == 3 + 1  # after each epoch, then trainer.evaluate()
    assert "eval_top5_accuracy" in capsys.readouterr().out

    saved = offline_stand_ins / "runs" / "resnet50-cifar10"
    assert (saved / "preprocessor_config.json").is_file()
    model, info = transformers.ResNetForImageClassification.from_pretrained(saved, output_loading_info=True)
    assert not any(info.values()), info  # the plain ResNet: no missing, unexpected or auxiliary-head weights
    assert model.config.id2label[0] == "airplane" and model.config.num_labels == 10
